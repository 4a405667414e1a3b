"""Reports for `rillet bench` and the benchmark scripts: text and Markdown tables, a JSON file,
a PNG plot and a side-by-side comparison."""

from __future__ import annotations

import json
import platform
import sys
import time
from pathlib import Path
from typing import Any, Sequence

__all__ = ["compare_table", "fmt", "fmt_ratio", "load_result", "log", "make_result", "markdown_table", "plot", "ratio",
           "table", "text_table", "write_json"]

SCHEMA = "rillet-bench/1"


def make_result(levels: Sequence[dict], **meta: Any) -> dict:
    """The JSON document `--json` writes: {"schema", "meta": {...}, "levels": [...]}"""
    meta = {"created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "host": platform.node(), **meta}
    return {"schema": SCHEMA, "meta": meta, "levels": list(levels)}


def write_json(result: dict, path: str | Path) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def log(message: str) -> None:
    """A progress line on stderr, with the time."""
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b == 0:
        return None
    return round(a / b, 2)


def fmt(value: float | None, digits: int = 1) -> str:
    """A number for a table: thousands separated, "-" for none."""
    return "-" if value is None else f"{value:,.{digits}f}"


def fmt_ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---:" if i else "---" for i in range(len(headers))) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def text_table(headers: Sequence[str], rows: Sequence[Sequence[Any]], *, first_left: bool = False) -> str:
    """Columns padded to their widest cell, right-aligned (the first left-aligned with `first_left`)."""
    widths = [max(len(str(h)), *(len(str(row[i])) for row in rows)) if rows else len(str(h))
              for i, h in enumerate(headers)]

    def line(cells: Sequence[Any]) -> str:
        return "  ".join(str(c).ljust(w) if first_left and not i else str(c).rjust(w)
                         for i, (c, w) in enumerate(zip(cells, widths)))

    return "\n".join([line(headers), "  ".join("-" * w for w in widths), *(line(row) for row in rows)])


def load_result(path: str | Path) -> dict:
    obj = json.loads(Path(path).read_text(encoding="utf-8"))
    if isinstance(obj, list):  # a bare list of levels
        obj = make_result(obj)
    if not isinstance(obj, dict) or not isinstance(obj.get("levels"), list):
        raise ValueError(f"{path}: not a rillet bench result (no 'levels')")
    return obj


def _fmt(value: Any, digits: int = 1) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def _errors(level: dict) -> str:
    errors = level.get("errors") or {}
    return ",".join(f"{k}:{v}" for k, v in sorted(errors.items())) or "0"


def _latency(key: str, q: str) -> Any:
    return lambda r: _fmt(r[f"{key}_ms"].get(q))


COLUMNS: list[tuple[str, Any]] = [
    ("conc", lambda r: r.get("concurrency")),
    ("reqs", lambda r: f"{r.get('completed')}/{r.get('num_requests')}"),
    ("req/s", lambda r: _fmt(r.get("request_throughput"), 2)),
    ("tok/s", lambda r: _fmt(r.get("output_token_throughput"), 1)),
    *((f"{key} {q}", _latency(key, q)) for key in ("ttft", "tpot", "itl", "e2e") for q in ("p50", "p90", "p99")),
    ("errors", _errors),
    ("U+FFFD", lambda r: r.get("replacement_chars", 0)),
]


def table(levels: Sequence[dict]) -> str:
    """One row per concurrency level; latencies in milliseconds."""
    rows = [[str(get(level)) for _, get in COLUMNS] for level in levels]
    return text_table([name for name, _ in COLUMNS], rows) + "\n(latencies in ms; tok/s = output tokens per second)"


def _label(result: dict, path: str) -> str:
    return str(result.get("meta", {}).get("label") or Path(path).stem)


COMPARE_METRICS: list[tuple[str, Any]] = [
    ("req/s", lambda r: r.get("request_throughput")),
    ("tok/s", lambda r: r.get("output_token_throughput")),
    ("ttft p50", lambda r: r["ttft_ms"].get("p50")),
    ("ttft p99", lambda r: r["ttft_ms"].get("p99")),
    ("tpot p50", lambda r: r["tpot_ms"].get("p50")),
    ("itl p99", lambda r: r["itl_ms"].get("p99")),
    ("e2e p99", lambda r: r["e2e_ms"].get("p99")),
    ("errors", lambda r: r.get("failed")),
]


def compare_table(results: Sequence[tuple[str, dict]]) -> str:
    """Side by side: for each concurrency level, one row per result file."""
    labels = _labels(results)
    by_level: list[dict[int, dict]] = [{lvl["concurrency"]: lvl for lvl in result["levels"]} for _, result in results]
    concurrencies = sorted({c for levels in by_level for c in levels})
    header = ["conc", "run"] + [name for name, _ in COMPARE_METRICS]
    rows = []
    for c in concurrencies:
        for label, levels in zip(labels, by_level):
            if c in levels:
                rows.append([str(c), label] + [_fmt(get(levels[c]), 1) for _, get in COMPARE_METRICS])
    legend = "\n".join(f"  {label}: {path}" for label, (path, _) in zip(labels, results))
    return text_table(header, rows) + "\n(latencies in ms)\n" + legend


def _labels(results: Sequence[tuple[str, dict]]) -> list[str]:
    """Each result's label (meta.label, else the file name), made unique."""
    labels: list[str] = []
    for path, result in results:
        label = _label(result, path)
        if label in labels:
            label = f"{label}#{len(labels) + 1}"
        labels.append(label)
    return labels


PLOT_EXTRA_HINT = "pip install 'rillet[bench]'"


def plot_available() -> str | None:
    """None if --plot can work here, else why not (matplotlib is the optional extra `bench`)."""
    try:
        import matplotlib  # noqa: F401
    except ImportError as exc:
        return f"--plot needs matplotlib, which is not installed ({exc}); install it with: {PLOT_EXTRA_HINT}"
    return None


def plot(results: Sequence[tuple[str, dict]], path: str | Path) -> None:
    """Output-token throughput and TTFT (p50, p99) against concurrency, one line per result."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    fig, (ax_tp, ax_ttft) = plt.subplots(1, 2, figsize=(11, 4.2))
    ticks = sorted({lvl["concurrency"] for _, result in results for lvl in result["levels"]})
    for label, result in results:
        levels = sorted(result["levels"], key=lambda lvl: lvl["concurrency"])
        xs = [lvl["concurrency"] for lvl in levels]
        ax_tp.plot(xs, [lvl.get("output_token_throughput") or 0 for lvl in levels], marker="o", label=label)
        ax_ttft.plot(xs, [lvl["ttft_ms"].get("p50") or 0 for lvl in levels], marker="o", label=f"{label} p50")
        ax_ttft.plot(xs, [lvl["ttft_ms"].get("p99") or 0 for lvl in levels], marker="x", linestyle="--",
                     label=f"{label} p99")
    ax_tp.set(title="Output throughput", xlabel="concurrency", ylabel="output tokens / s")
    ax_ttft.set(title="Time to first token", xlabel="concurrency", ylabel="TTFT (ms)")
    for ax in (ax_tp, ax_ttft):
        ax.set_xscale("log", base=2)
        ax.set_xticks(ticks)
        ax.xaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%d"))
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_ylim(bottom=0)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
