"""The `env` fixture lives in compat_helpers (a unique module name: several test folders
have a conftest.py)."""

from compat_helpers import env

__all__ = ["env"]
