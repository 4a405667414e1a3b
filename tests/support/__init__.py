"""Helpers shared by the test packages (importable as `support.*`: pyproject puts tests/ on the pytest path)."""
