"""Helpers of the hostile-input tests (tests/test_hostile_input.py): the worker, the valid
tiny files and the mutations."""
