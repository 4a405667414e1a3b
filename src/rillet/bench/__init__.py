"""Load generator and reports behind `rillet bench` (see `rillet.bench.loadgen.run_level`)."""
