"""Property-based fuzzing of every plugin (see test_fuzz_plugins.py)."""
