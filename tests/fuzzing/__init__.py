"""Helpers of the hostile-input tests (tests/test_hostile_input.py, test_hostile_regressions.py):
the worker, the valid tiny files, the mutations and the fixtures."""
