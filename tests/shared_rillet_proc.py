"""Kept for tests/server/conftest.py until it imports `from support import rillet_proc` (the one
process helper, tests/support/rillet_proc.py); delete this file then."""

from support import rillet_proc

__all__ = ["rillet_proc"]
