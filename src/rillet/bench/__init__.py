"""Load generation and measurement: `rillet bench` (`loadgen.run_level`, `report`), and what the
benchmark scripts, scripts/soak.py and the tests share: `inprocess` (the load over an
AsyncEngine), `workload` (prompts), `machine` (where a run ran), `servers` (server subprocesses),
`rawhttp` and `reliability` (the reliability runs), `schemas` (the structured-output corpus),
`quality` (perplexity and greedy agreement)."""
