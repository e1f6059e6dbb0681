"""Test suite. A package so that ``tests.pgserver`` is importable from benchmarks too."""
