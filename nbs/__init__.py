"Makes nbs/conftest.py importable as nbs.conftest, so it never shadows tests/conftest.py (both are named conftest)."
