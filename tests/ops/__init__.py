"""One test file per operation, each over every backend present (tests/conftest.py)."""
