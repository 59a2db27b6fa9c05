"""Calibration inputs for int8 quantisation: real training images through PneuNet's own path to the
classifier's input (``pneunet.lungs.model_view``: lung-suppressed for a model trained on lung fields).

Never random data: activation ranges set on noise do not match X-rays, and int8 models calibrated that
way often collapse to one class. Never validation or test images either (those judge the export).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from pneunet.config import ModelConfig
from pneunet.lungs import LungFinder, model_view

DEFAULT_CALIBRATION_IMAGES = 300


def calibration_inputs(config: ModelConfig, count: int = DEFAULT_CALIBRATION_IMAGES, seed: int = 0,
                       data_dir: Path | None = None, split_file: Path | None = None,
                       lungs: LungFinder | None = None) -> tuple[np.ndarray, list[str]]:
    """``count`` class-balanced training images (same share of each class as the train split), as model
    inputs (N, channels, H, W) float32 cut to their lung fields by ``lungs`` (the checkpoint's segmenter,
    ``pneunet.predictor.load_lung_finder``; None for a model without them), and their paths relative to
    the data directory."""
    from pneunet.datasets import DEFAULT_DATA_DIR, DEFAULT_SPLIT_FILE, read_split, subsample

    if config.lungs and lungs is None:
        raise ValueError("this model was trained on lung fields: pass its segmenter (pneunet.predictor.load_lung_finder) "
                         "so int8 is calibrated on what the classifier sees")
    data_dir = Path(data_dir or DEFAULT_DATA_DIR)
    train = read_split(Path(split_file or DEFAULT_SPLIT_FILE), "train")
    if not train:
        raise RuntimeError("the split file has no train images; build it with: python -m training.data")
    chosen = subsample(train, count, seed=seed)
    inputs = np.stack([model_view(data_dir / example.path, config, lungs)[0] for example in chosen]).astype(np.float32)
    return inputs, [example.path for example in chosen]
