"""File integrity (stdlib only, so the torch-free edge runner shares it): the sha256 that sidecars record."""

from __future__ import annotations

import hashlib
from pathlib import Path


def sha256_of(path: str | Path) -> str:
    """Hex sha256 of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class ModelFileError(RuntimeError):
    """A model file (checkpoint, export, sidecar, gate, lung-field segmenter) is missing, damaged, changed
    or cannot be run here; the message names the file and says what to do."""
