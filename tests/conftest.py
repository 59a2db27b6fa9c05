"""Session-wide fixtures: what several test files need is built once per run.

- ``served_predictor``: the served model (the committed export through the inference core, with its lung-field
  segmenter and input gate), loaded once. Tests that change it build their own.
The app is started by tests/test_app.py and tests/test_privacy.py each (the privacy test reads its own server's
complete log, so it cannot share one); the export is built once in tests/test_export.py, the smoke model
trained once in tests/test_training.py.
"""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def served_predictor():
    from pneunet.predictor import Predictor

    return Predictor.load()
