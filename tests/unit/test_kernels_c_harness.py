"""The C kernel check harness (tests/kernels/check_kernels.c) built with every kernel source and
run once per instruction set: natively for each variant of cpu_kernels' table this CPU runs
(its own flags), the avx512 variant again without BF16 and VNNI, the generic variant again
without OpenMP, and aarch64 NEON (with and without
dot products) cross-compiled with Debian's aarch64-linux-gnu-gcc and run under qemu-aarch64
(scripts/install-cross.sh installs both; without them those two skip).

Every build runs the same checks against a double-precision reference (see the harness's
comment for the tolerances); a build passes when the harness exits 0 with `N passed, 0 failed`.
The builds and runs happen concurrently in one fixture: about 35 s of CPU time in all,
mostly compiling (so under 30 s on 2 idle cores; a loaded machine takes longer).

By hand: K=src/rillet/models/kernels; cc -O2 -fopenmp -I$K tests/kernels/check_kernels.c $K/*.c -lm
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from rillet.models import cpu_isa, cpu_kernels

HARNESS = Path(__file__).resolve().parents[1] / "kernels" / "check_kernels.c"
KERNELS = cpu_kernels.KERNELS
CROSS_CC = "aarch64-linux-gnu-gcc"
QEMU = "qemu-aarch64"
AARCH64 = {"aarch64-dotprod": "-march=armv8.2-a+dotprod", "aarch64-armv8": "-march=armv8-a"}
NO_OPENMP = "generic-no-openmp"
# The avx512 variant as an AVX-512 CPU without BF16 and VNNI builds it (Skylake-X, Cascade Lake):
# its FMA and non-VNNI paths, which an AVX512-BF16 machine's own build skips.
AVX512_PLAIN = "avx512-no-bf16"
BUILDS = [*cpu_isa.VARIANTS, AVX512_PLAIN, NO_OPENMP, *AARCH64]
# The harness asks for up to 3 threads; on a loaded 2-core machine spinning OpenMP waiters make a
# 0.3 s run take 6 s. The wait policy changes no result.
RUN_ENV = {**os.environ, "OMP_WAIT_POLICY": "passive"}
SUMMARY = re.compile(r"^(\d+) passed, (\d+) failed$", re.M)
# Checks with scales float16 cannot represent, run apart (test_quant_scales_round_to_float16):
# packing rounds them to float16 (rillet_kernels.h), the reference the same way.
KNOWN = "float32 scales"


@dataclass
class Outcome:
    skip: str | None = None      # why this build cannot run here
    error: str | None = None     # why it did not build
    command: list[str] = field(default_factory=list)
    returncode: int | None = None
    output: str = ""
    known_returncode: int | None = None  # the KNOWN checks' run
    known_output: str = ""


def _native_compiler() -> str | None:
    return os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")


def _sources() -> tuple[list[str], list[str]]:
    """Every kernel source present, and cpu_kernels' defines standing in for optional ones not yet there."""
    sources = sorted(str(path) for path in KERNELS.glob("*.c"))
    defines = [define for name, define in cpu_kernels.OPTIONAL.items() if not (KERNELS / name).exists()]
    return sources, defines


def _strict() -> list[str]:
    """--strict (a kernel the sources do not define fails instead of skipping) once every source
    cpu_kernels builds is present."""
    return ["--strict"] if all((KERNELS / name).exists() for name in cpu_kernels.SOURCES) else []


def _plan(name: str) -> tuple[str | None, list[str], list[str], str | None]:
    """(compiler, flags, runner prefix, skip reason) of one build."""
    native = _native_compiler()
    if name in AARCH64:
        on_arm = cpu_isa.machine() == "aarch64"
        compiler = shutil.which(CROSS_CC) or (native if on_arm else None)
        if compiler is None:
            return None, [], [], f"{CROSS_CC} not installed (scripts/install-cross.sh, as root)"
        if on_arm:
            if name == "aarch64-dotprod" and "asimddp" not in cpu_isa.cpu_flags():
                runner = shutil.which(QEMU)
                if runner is None:
                    return None, [], [], f"this CPU lacks asimddp and {QEMU} is not installed"
                return compiler, ["-static", AARCH64[name]], [runner], None
            return compiler, ["-static", AARCH64[name]], [], None
        runner = shutil.which(QEMU)
        if runner is None:
            return None, [], [], f"{QEMU} not installed (scripts/install-cross.sh, as root)"
        return compiler, ["-static", AARCH64[name]], [runner], None
    if native is None:
        return None, [], [], "no C compiler (cc, gcc or clang)"
    isa = {NO_OPENMP: "generic", AVX512_PLAIN: "avx512"}.get(name, name)
    lacking = cpu_isa.missing(isa)
    if lacking:
        note = "; the aarch64 builds under qemu cover it" if isa == "neon" else ""
        return None, [], [], f"this CPU cannot run the {isa} variant, it lacks: {', '.join(lacking)}{note}"
    flags = cpu_isa.compile_flags(isa)
    if name == AVX512_PLAIN:
        flags = [flag for flag in flags if flag not in ("-mavx512bf16", "-mavx512vnni")]
    return native, flags, [], None


def _build_and_run(name: str, workdir: Path) -> Outcome:
    compiler, flags, runner, skip = _plan(name)
    if skip is not None:
        return Outcome(skip=skip)
    sources, defines = _sources()
    exe = workdir / f"check_kernels_{name}"
    base = [compiler, "-O2", *flags, *defines, "-Wall", "-Wno-unknown-pragmas", f"-I{KERNELS}", "-o", str(exe),
            str(HARNESS), *sources, "-lm"]
    # With OpenMP where the toolchain has it; where it has not (no static libgomp for a cross
    # build, a compiler without -fopenmp) without, which the kernels must support and NO_OPENMP
    # checks on purpose. The harness's first line says which build ran.
    attempts = [[*base, "-fno-openmp"]] if name == NO_OPENMP else [[*base, "-fopenmp"], base]
    errors = []
    for command in attempts:
        try:
            built = subprocess.run(command, capture_output=True, text=True, timeout=240)
        except subprocess.TimeoutExpired:
            return Outcome(error=f"compiling timed out: {' '.join(command)}")
        if built.returncode == 0:
            break
        errors.append(f"$ {' '.join(command)}\n{built.stderr[-6000:]}")
        if not re.search(r"gomp|openmp", built.stderr, re.I):
            return Outcome(error=errors[-1])  # not OpenMP's absence: a real build error
    else:
        return Outcome(error="\n\n".join(errors))
    outcome = Outcome(command=command)
    for selection in (["--exclude", KNOWN], ["--only", KNOWN]):
        try:
            ran = subprocess.run([*runner, str(exe), *_strict(), *selection], capture_output=True, text=True,
                                 timeout=240, env=RUN_ENV)
            returncode, output = ran.returncode, ran.stdout + ran.stderr
        except subprocess.TimeoutExpired as exc:
            returncode, output = -1, f"timed out after 240 s\n{exc.stdout or ''}"
        if selection[0] == "--exclude":
            outcome.returncode, outcome.output = returncode, output
        else:
            outcome.known_returncode, outcome.known_output = returncode, output
    return outcome


@pytest.fixture(scope="module")
def outcomes(request, tmp_path_factory) -> dict[str, Outcome]:
    """Every build the session selected (all of them when only test_quant_scales_round_to_float16 is),
    built and run concurrently."""
    selected = [item.callspec.params["build"] for item in request.session.items
                if item.path == request.path and "build" in getattr(getattr(item, "callspec", None), "params", {})]
    names = [name for name in BUILDS if name in selected] or BUILDS
    workdir = tmp_path_factory.mktemp("check_kernels")
    with ThreadPoolExecutor(max_workers=max(2, os.cpu_count() or 2)) as pool:
        futures = {name: pool.submit(_build_and_run, name, workdir) for name in names}
        return {name: future.result() for name, future in futures.items()}


def _assert_passed(build: str, command: list[str], returncode: int | None, output: str) -> None:
    summary = SUMMARY.findall(output)
    if returncode != 0 or not summary or summary[-1][1] != "0" or summary[-1][0] == "0":
        failures = "\n".join(line for line in output.splitlines() if line.startswith("FAIL"))
        pytest.fail(f"{build}: the kernel checks exited {returncode}\n$ {' '.join(command)}\n"
                    f"--- failures ---\n{failures}\n--- full output ---\n{output}", pytrace=False)


@pytest.mark.timeout(600)
@pytest.mark.parametrize("build", BUILDS)
def test_kernel_checks_pass(outcomes, build):
    outcome = outcomes[build]
    if outcome.skip:
        pytest.skip(outcome.skip)
    if outcome.error:
        pytest.fail(f"the {build} harness did not build:\n{outcome.error}", pytrace=False)
    _assert_passed(build, outcome.command, outcome.returncode, outcome.output)


@pytest.mark.timeout(600)
def test_quant_scales_round_to_float16(outcomes):
    """Q8/Q4 with scales that float16 does not represent: packing rounds them to float16, as
    rillet_kernels.h states, and nothing else changes, on every build that ran."""
    ran = {build: outcome for build, outcome in outcomes.items() if not outcome.skip and not outcome.error}
    if not ran:
        pytest.skip("no build of the harness ran here")
    for build, outcome in ran.items():
        _assert_passed(build, outcome.command, outcome.known_returncode, outcome.known_output)
