"""Where and on what a benchmark ran: CPU, instruction sets, the kernel variant rillet ran
(and the --rillet-isa stand-ins that hold torch and oneDNN to it), library versions, commit."""

from __future__ import annotations

import datetime as _dt
import os
import platform
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rillet.bench.report import log, write_json
from rillet.models import cpu_isa

__all__ = ["BenchRun", "ISA_ENV", "add_isa_argument", "apply_isa", "busy_machine_warning", "cpu_model", "git_commit",
           "header_line", "isa_env", "isa_flags", "machine_info", "rillet_isa"]

# The instruction-set flags that decide which kernels a CPU runs (rillet's, torch's, oneDNN's, ggml's).
X86_ISA_FLAGS = ("avx2", "fma", "f16c", "avx512f", "avx512_bf16", "avx512_vnni", "avx_vnni", "amx_bf16")
ARM_ISA_FLAGS = ("asimd", "asimddp", "bf16", "i8mm", "sve")
# --rillet-isa / --peers-isa stand-ins: the environment that also keeps torch (ATen's kernel dispatch)
# and oneDNN (its JIT) at that level, so an AVX-512 machine runs like one without AVX-512.
ISA_ENV = {
    "avx2": {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2"},
    "generic": {"ATEN_CPU_CAPABILITY": "default", "ONEDNN_MAX_CPU_ISA": "SSE41"},
}


def cpu_model() -> str:
    return cpu_isa.cpu_model()


def isa_flags() -> dict[str, bool]:
    """The flags that matter on this CPU's architecture, present or not."""
    names = ARM_ISA_FLAGS if cpu_isa.machine() == "aarch64" else X86_ISA_FLAGS
    flags = cpu_isa.cpu_flags()
    return {name: name in flags for name in names}


def rillet_isa(forced: str | None = None) -> dict:
    """Which CPU kernel variant rillet runs: `forced` (a --rillet-isa), else RILLET_CPU_ISA, else the best."""
    forced = forced or os.environ.get("RILLET_CPU_ISA") or None
    try:
        if forced:
            lacking = cpu_isa.missing(forced)
            selected = None if lacking else forced
            error = f"not on this CPU: it needs {' '.join(lacking)}" if lacking else None
        else:
            selected, error = cpu_isa.selected(), None
    except ValueError as exc:
        selected, error = None, str(exc)
    out: dict[str, Any] = {"selected": selected, "forced": forced, "supported": cpu_isa.supported_isas()}
    if error:
        out["error"] = error
    return out


def git_commit(cwd: str | Path | None = None) -> tuple[str | None, bool | None]:
    """(short commit, whether the tree differs from it: tracked changes or untracked, not ignored, files)."""
    def git(*cmd: str) -> str | None:
        try:
            done = subprocess.run(["git", *cmd], cwd=cwd, capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.SubprocessError):
            return None
        return done.stdout if done.returncode == 0 else None

    commit = (git("rev-parse", "--short", "HEAD") or "").strip() or None
    status = git("status", "--porcelain")
    return commit, (None if status is None else bool(status.strip()))


def machine_info(dtype: str | None = None, isa: str | None = None) -> dict:
    """Where and on what a result was measured. `isa`: the kernel variant the run forces on rillet."""
    import torch
    import transformers

    commit, dirty = git_commit()
    return {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "cpu_model": cpu_model(),
        "cpu_arch": platform.machine(),
        "cpu_cores": os.cpu_count(),
        "cpu_affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "cpu_isa_flags": isa_flags(),
        "bf16_cpu": cpu_isa.has_native_bf16(),
        "rillet_cpu_isa": rillet_isa(isa),
        "isa_env": {k: os.environ[k] for k in ("RILLET_CPU_ISA", "ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA")
                    if k in os.environ},
        "torch_threads": torch.get_num_threads(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "dtype": dtype,
        "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None,
        "git_commit": None if commit is None else commit + ("+dirty" if dirty else ""),
        "git_dirty": dirty,
    }


def isa_env(isa: str | None) -> dict[str, str]:
    """Environment that runs rillet's `isa` kernels and holds torch and oneDNN to the same level."""
    if not isa:
        return {}
    return {"RILLET_CPU_ISA": isa, **ISA_ENV.get(isa, {})}


def add_isa_argument(parser: Any) -> None:
    parser.add_argument("--rillet-isa", default=None, choices=("avx512", "avx2", "neon", "generic"),
                        help="run rillet's CPU kernels of this variant (RILLET_CPU_ISA); avx2 also sets "
                             "ATEN_CPU_CAPABILITY=avx2 and ONEDNN_MAX_CPU_ISA=AVX2 so torch's own ops stay "
                             "on AVX2 too: an AVX-512 machine standing in for an AVX2-only one "
                             "(default: the best variant this CPU runs)")


def apply_isa(isa: str | None) -> dict[str, str]:
    """Set isa_env(isa) in this process's environment (before torch is imported: ATen reads
    ATEN_CPU_CAPABILITY once); the engine process and servers started from here inherit it."""
    env = isa_env(isa)
    if env and "torch" in sys.modules:
        log("warning: torch was imported before --rillet-isa took effect; its own kernels may not follow it")
    os.environ.update(env)
    return env


def header_line(info: dict, isa: str | None = None, note: str | None = None) -> str:
    """The line every table begins with: the CPU, the ISA the run used, the commit."""
    flags = [name for name, present in (info.get("cpu_isa_flags") or {}).items() if present]
    rillet = info.get("rillet_cpu_isa") or {}
    used = isa or rillet.get("selected") or "?"
    how = note or ("forced" + (", torch/oneDNN held to it" if used in ISA_ENV else "") if rillet.get("forced")
                   else "native")
    return (f"CPU: {info.get('cpu_model')} ({info.get('cpu_cores')} cores, {info.get('cpu_arch')}: "
            f"{' '.join(flags) or 'no SIMD flags found'}); ISA: {used} ({how}); "
            f"commit {info.get('git_commit') or 'unknown'}")


def busy_machine_warning(info: dict) -> str | None:
    """A warning when the machine was not quiet: other work on the cores distorts both sides, and the
    seed most (its many small OpenMP regions stall whenever one of their threads is descheduled)."""
    load, cores = info.get("load_average"), info.get("cpu_cores") or 1
    if load and load[0] > 0.5 * cores:
        return (f"the machine is busy (1-min load average {load[0]:.1f} on {cores} cores): numbers, and the "
                "seed's single-stream rate most, are not representative; rerun on a quiet machine")
    return None


@dataclass
class BenchRun:
    """One benchmark script's run: the machine it ran on, its warnings (a busy machine first), its
    wall clock. `begin` at the start, `finish` to write the JSON, `print_warnings` at the end."""

    info: dict
    warnings: list[str] = field(default_factory=list)
    started: float = field(default_factory=time.perf_counter)

    @classmethod
    def begin(cls, parser: Any = None, dtype: str | None = None, isa: str | None = None) -> BenchRun:
        """Machine info; a --rillet-isa this CPU cannot run is a usage error of `parser`."""
        info = machine_info(dtype, isa)
        if parser is not None and (err := info["rillet_cpu_isa"].get("error")):
            parser.error(f"--rillet-isa {isa}: {err}")
        warning = busy_machine_warning(info)
        if warning:
            log(f"warning: {warning}")
        return cls(info, [warning] if warning else [])

    @property
    def header(self) -> str:
        return header_line(self.info)

    def finish(self, payload: dict, out: str | Path) -> dict:
        """Add the machine (and its load now), the warnings and the wall time; write `out`."""
        payload.setdefault("machine", self.info)
        payload["machine"]["load_average_end"] = os.getloadavg() if hasattr(os, "getloadavg") else None
        payload["warnings"] = list(self.warnings)
        payload["wall_s"] = round(time.perf_counter() - self.started, 1)
        write_json(payload, out)
        return payload

    def print_warnings(self) -> None:
        for warning in self.warnings:
            print(f"\nwarning: {warning}", file=sys.stderr)
