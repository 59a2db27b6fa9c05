"""The split file and a real (tiny) training run end to end."""

import json

import numpy as np
import pytest

from pneunet.predictor import Predictor
from training import train
from pneunet.datasets import DEFAULT_SPLIT_FILE, patient_key, read_split
from training.data import make_split
from tests.helpers import EXAMPLES, require_data


def test_patient_keys():
    assert patient_key("person1946_bacteria_4874.jpeg") == "person1946"
    assert patient_key("person447_virus_921_1.jpeg") == "person447"
    assert patient_key("IM-0115-0001.jpeg") == "IM-0115"
    assert patient_key("NORMAL2-IM-0173-0001-0002.jpeg") == "NORMAL2-IM-0173"


def test_committed_split_is_patient_grouped_stratified_and_reproducible():
    data_dir = require_data()
    rows = read_split(DEFAULT_SPLIT_FILE)
    by_split = {name: [r for r in rows if r.split == name] for name in ("train", "val", "test")}
    assert len(by_split["train"]) + len(by_split["val"]) == 5216 and len(by_split["test"]) == 624
    assert not {r.patient for r in by_split["train"]} & {r.patient for r in by_split["val"]}
    assert 0.10 <= len(by_split["val"]) / 5216 <= 0.15
    prevalence = [np.mean([r.label for r in by_split[s]]) for s in ("train", "val")]
    assert abs(prevalence[0] - prevalence[1]) < 0.02
    assert [r.__dict__ for r in make_split(data_dir)] == [r.__dict__ for r in rows]


def test_one_epoch_smoke_training_produces_a_checkpoint_that_predicts(tmp_path):
    data_dir = require_data()
    out = tmp_path / "run"
    args = train.get_args_parser().parse_args([
        "--model", "efficientnet_lite0", "--epochs", "1", "--train-limit", "32", "--val-limit", "24",
        "--batch-size", "8", "--out", str(out), "--data-dir", str(data_dir), "--threads", "2"])
    checkpoint = train.main(args)
    assert (out / "history.csv").is_file() and (out / "curves.png").is_file()
    sidecar = json.loads(checkpoint.with_suffix(".json").read_text())
    provenance = sidecar["config"]["provenance"]
    assert provenance["train_images"] == 32 and provenance["seed"] == 0
    assert provenance["split_file_sha256"] and provenance["command"].startswith("python -m training.train")
    assert sidecar["config"]["temperature"] > 0 and 0 <= sidecar["config"]["threshold"] <= 1
    predictor = Predictor.load(checkpoint)
    result = predictor.predict(EXAMPLES / "pneumonia_person1_virus_6.jpeg")
    assert result.label in ("normal", "pneumonia") and 0 <= result.pneumonia_probability <= 1


def test_the_shipped_model_was_trained_with_the_one_recipe_file():
    """training/shipped_recipe.toml is the shipped model's recipe: its settings are the ones in the
    checkpoint's recorded training command (a new model or a new recipe updates both)."""

    from pneunet.backends import DEFAULT_CHECKPOINT
    from training.ship import trained_with_shipped_recipe

    provenance = json.loads(DEFAULT_CHECKPOINT.with_suffix(".json").read_text())["config"]["provenance"]
    assert trained_with_shipped_recipe(provenance), provenance["command"]


def test_a_recipe_file_sets_defaults_and_options_win(tmp_path):
    recipe = tmp_path / "recipe.toml"
    recipe.write_text('model = "cnn5"\nepochs = 3\ncounterfactual = 0.25\n')
    args = train.parse_args(["--recipe", str(recipe), "--epochs", "1"])
    assert (args.model, args.epochs, args.counterfactual) == ("cnn5", 1, 0.25)
    recipe.write_text("epochs = 3\nlearning_rate = 0.1\n")
    with pytest.raises(SystemExit, match="unknown settings"):
        train.parse_args(["--recipe", str(recipe)])
