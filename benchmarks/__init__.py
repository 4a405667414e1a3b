"""The benchmark scripts. Run them from the repository root as modules,
`python -m benchmarks.bench_engine --quick`; their shared parts are in `rillet.bench`."""

from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = REPO_ROOT / "benchmarks" / "results"
