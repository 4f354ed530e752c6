"""Access to the optional reference implementations (torch + transformers).

Tests that compare against them call require_transformers(): it skips when they are not
installed, except under LMDECODE_REQUIRE_ORACLE=1 (CI), where a missing oracle is a failure.
"""
import importlib
import os

import pytest


def _required() -> bool:
    return os.environ.get("LMDECODE_REQUIRE_ORACLE", "") not in ("", "0")


def require_module(name: str):
    try:
        return importlib.import_module(name)
    except ImportError as e:
        if _required():
            pytest.fail(f"LMDECODE_REQUIRE_ORACLE=1 but {name} cannot be imported: {e}")
        pytest.skip(f"{name} is not installed")


def require_transformers():
    """(torch, transformers), or a skip (a failure under LMDECODE_REQUIRE_ORACLE=1)."""
    torch = require_module("torch")
    transformers = require_module("transformers")
    return torch, transformers
