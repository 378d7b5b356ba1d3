"""Fixtures of the dashboard tests (defined in dash_harness.py)."""
from dash_harness import dash, http  # noqa: F401 - fixtures
