"""Every shared fixture and helper lives in tests/support.py, loaded here as a plugin."""

pytest_plugins = ["tests.support"]
