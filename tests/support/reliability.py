"""Settings of the reliability tests' shared server (tests/reliability/conftest.py's
`main_server`); the load shapes and probes are `rillet.bench.reliability` (shared with
scripts/soak.py). The tests import these from here, never from a conftest (other test folders
have a conftest module of their own)."""

MAIN_KEY = "rel-5ecret-K3y-9f41c2"  # grepped for in the server's log by the auth test
STALL_TIMEOUT_S = 3.0
