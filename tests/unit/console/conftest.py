"""The console fixtures live in console_helpers.py (a unique module name: several test folders
have a conftest.py, and `from conftest import` would pick whichever was imported first)."""

from console_helpers import env

__all__ = ["env"]
