"""Fixtures of the service tests live in tests/conftest.py (Redis, artefacts); helpers that drive
the app in-process are in tests/support.py."""
