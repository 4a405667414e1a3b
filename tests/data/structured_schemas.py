"""The structured-output schema corpus now lives in `rillet.bench.schemas` (the benchmark and the
tests share it); this name stays until the tests import it from there."""

from rillet.bench.schemas import SCHEMAS

__all__ = ["SCHEMAS"]
