"""Training under torchrun: two CPU processes (gloo, DistributedDataParallel), one epoch on a few dozen real
images, give one checkpoint whose recorded validation metrics a single process reproduces."""

import csv
import os
import subprocess
import sys

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader

from pneunet.checkpoint import load_checkpoint, read_sidecar
from pneunet.datasets import DEFAULT_SPLIT_FILE, REPO_ROOT, read_split, subsample
from pneunet.predictor import Predictor
from training import train
from training.data import XrayDataset, load_images
from tests.helpers import EXAMPLES, require_data

VAL_LIMIT = 32


def test_two_process_training_writes_one_checkpoint_whose_validation_a_single_process_reproduces(tmp_path):
    data_dir = require_data()
    out = tmp_path / "run"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
               "-m", "training.train", "--model", "cnn64", "--epochs", "1", "--train-limit", "48",
               "--val-limit", str(VAL_LIMIT), "--batch-size", "8", "--threads", "1", "--workers", "0",
               "--out", str(out), "--data-dir", str(data_dir)]
    run = subprocess.run(command, cwd=REPO_ROOT, env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True,
                         text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]

    # Rank 0 alone logs and writes: one set of files, each epoch and the checkpoint reported once.
    assert sorted(path.name for path in out.iterdir()) == [
        "curves.png", "history.csv", "model.json", "model.safetensors", "resume.pt"]
    assert run.stdout.count("epoch 1:") == 1 and run.stdout.count("saved ") == 1, run.stdout
    checkpoint = out / "model.safetensors"
    provenance = read_sidecar(checkpoint)["config"]["provenance"]
    assert provenance["distributed"].startswith("torchrun, 2 processes (gloo), batch size 8 per process")
    assert provenance["train_images"] == 48 and provenance["val_images"] == VAL_LIMIT
    with open(out / "history.csv") as handle:
        (history,) = list(csv.DictReader(handle))

    result = Predictor.load(checkpoint).predict(EXAMPLES / "pneumonia_person1_virus_6.jpeg")
    assert result.label in ("normal", "pneumonia") and 0 <= result.pneumonia_probability <= 1

    # One process, the same validation subset, the saved weights: the metrics the run chose and calibrated on.
    model, config = load_checkpoint(checkpoint)
    val_examples = subsample(read_split(DEFAULT_SPLIT_FILE, "val"), VAL_LIMIT, seed=0)
    val_set = XrayDataset(load_images(val_examples, data_dir), [e.label for e in val_examples], config)
    val_loader = DataLoader(val_set, batch_size=64)
    cpu = torch.device("cpu")
    single = train.evaluate(model, val_loader, nn.BCEWithLogitsLoss(), cpu)
    for key in ("loss", "auc", "accuracy"):
        assert float(history[f"val_{key}"]) == pytest.approx(single[key], rel=1e-5, abs=1e-6), key
    temperature, threshold, summary = train.calibrate_on_validation(model, val_loader, cpu, min_sensitivity=0.97)
    assert (config.temperature, config.threshold) == pytest.approx((temperature, threshold), rel=1e-5)
    for key in ("n", "n_pneumonia", "auc", "average_precision", "brier", "log_loss", "sensitivity", "specificity"):
        assert provenance["val"][key] == pytest.approx(summary[key], rel=1e-5, abs=1e-6), key
