"""Calibration inputs for int8 quantisation: real training images through PneuNet's own preprocessing.

Never random data: activation ranges set on noise do not match X-rays, and int8 models calibrated that
way often collapse to one class. Never validation or test images either (those judge the export).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from pneunet.config import ModelConfig
from pneunet.preprocessing import preprocess

DEFAULT_CALIBRATION_IMAGES = 300


def calibration_inputs(config: ModelConfig, count: int = DEFAULT_CALIBRATION_IMAGES, seed: int = 0,
                       data_dir: Path | None = None, split_file: Path | None = None) -> tuple[np.ndarray, list[str]]:
    """``count`` class-balanced training images (same share of each class as the train split), as model
    inputs (N, channels, H, W) float32, and their paths relative to the data directory."""
    from training.data import DEFAULT_DATA_DIR, DEFAULT_SPLIT_FILE, read_split, subsample

    data_dir = Path(data_dir or DEFAULT_DATA_DIR)
    train = read_split(Path(split_file or DEFAULT_SPLIT_FILE), "train")
    if not train:
        raise RuntimeError("the split file has no train images; build it with: python -m training.data")
    chosen = subsample(train, count, seed=seed)
    inputs = np.stack([preprocess(data_dir / example.path, config) for example in chosen]).astype(np.float32)
    return inputs, [example.path for example in chosen]
