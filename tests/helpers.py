"""Shared test helpers: where the real data is, and small real images."""

from __future__ import annotations

from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = REPO_ROOT / "pneunet" / "examples"
DATA_DIR = REPO_ROOT.parent / "shared" / "data" / "kermany224"


def require_data() -> Path:
    """The Kermany folder; tests that need it fail loudly in CI (where it must exist) and skip elsewhere."""
    import os

    if DATA_DIR.is_dir():
        return DATA_DIR
    if os.environ.get("CI"):
        pytest.fail(f"{DATA_DIR} is missing: CI must run beside ../shared/data")
    pytest.skip(f"{DATA_DIR} not present")
