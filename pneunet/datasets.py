"""Where the data sets live and how their splits are read: the patient-grouped Kermany split file and
``nih_adult224``'s labels (numpy only). Training, evaluation, export checks and benchmarks read the same
lists from here; ``training.data`` builds the split file and the datasets.

    examples = read_split(DEFAULT_SPLIT_FILE, "val")      # [Example(path, label, patient, split), ...]
    adults = read_nih(DEFAULT_NIH_DIR, "test")
"""

from __future__ import annotations

import csv
import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_DATA_DIR = Path(os.environ.get("PNEUNET_DATA", REPO_ROOT.parent / "shared" / "data" / "kermany224"))
DEFAULT_SPLIT_FILE = REPO_ROOT / "training" / "splits" / "kermany224.csv"
# Adult X-rays from another hospital (patient-grouped train/val/test in its labels.csv): the external check.
DEFAULT_NIH_DIR = DEFAULT_DATA_DIR.parent / "nih_adult224"
LABELS = {"NORMAL": 0, "PNEUMONIA": 1}
_PATIENT_PATTERNS = (
    re.compile(r"^(person\d+)_(?:bacteria|virus)(?:_\d+)+$"),
    re.compile(r"^((?:NORMAL2-)?IM-\d+)(?:-\d+)+$"),
)


def patient_key(file_name: str) -> str:
    """The patient a Kermany file belongs to: ``person1946_bacteria_4874`` -> ``person1946``,
    ``IM-0115-0001`` -> ``IM-0115``, ``NORMAL2-IM-0012-0001`` -> ``NORMAL2-IM-0012``."""
    stem = Path(file_name).stem
    for pattern in _PATIENT_PATTERNS:
        match = pattern.match(stem)
        if match:
            return match.group(1)
    raise ValueError(f"{file_name}: no patient key in the file name (expected personN_... or IM-NNNN-NNNN)")


@dataclass(frozen=True)
class Example:
    path: str  # relative to the data directory, e.g. train/NORMAL/IM-0115-0001.jpeg
    label: int  # 1 = pneumonia
    patient: str
    split: str  # train, val or test


def read_split(split_file: Path = DEFAULT_SPLIT_FILE, split: str | None = None) -> list[Example]:
    with open(split_file, newline="") as handle:
        rows = [Example(row["path"], int(row["label"]), row["patient"], row["split"]) for row in csv.DictReader(handle)]
    return [row for row in rows if split is None or row.split == split]


def read_nih(nih_dir: Path = DEFAULT_NIH_DIR, split: str | None = None) -> list[Example]:
    """``nih_adult224``'s images of one split (paths relative to ``nih_dir``), from its labels.csv."""
    with open(Path(nih_dir) / "labels.csv", newline="") as handle:
        rows = [Example(row["path"], int(row["label"]), f"nih-{row['patient']}", row["split"]) for row in csv.DictReader(handle)]
    return [row for row in rows if split is None or row.split == split]


def subsample(examples: list[Example], limit: int | None, seed: int = 0) -> list[Example]:
    """At most ``limit`` examples, keeping the class balance (for smoke runs)."""
    if limit is None or limit >= len(examples):
        return examples
    rng = np.random.default_rng(seed)
    chosen = []
    for label in (0, 1):
        members = [e for e in examples if e.label == label]
        share = max(1, round(limit * len(members) / len(examples)))
        chosen += [members[i] for i in sorted(rng.choice(len(members), min(share, len(members)), replace=False))]
    return chosen


def data_arguments(out: str | None = "unset", out_help: str = "output folder", nih: bool = False):
    """A parent ``argparse`` parser with the options every training / evaluation command shares: ``--data-dir``,
    ``--split-file``, ``--nih-dir`` (with ``nih``) and ``--out`` (``out``: its default; None makes it
    optional without one, "unset" leaves it out, "required" makes it required)."""
    import argparse

    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--data-dir", default=str(DEFAULT_DATA_DIR), help="Kermany 224 folder (default: %(default)s)")
    parser.add_argument("--split-file", default=str(DEFAULT_SPLIT_FILE), help="split CSV (default: %(default)s)")
    if nih:
        parser.add_argument("--nih-dir", default=str(DEFAULT_NIH_DIR), help="nih_adult224 folder (default: %(default)s)")
    if out == "required":
        parser.add_argument("--out", required=True, help=out_help)
    elif out != "unset":
        parser.add_argument("--out", default=out, help=out_help + (" (default: %(default)s)" if out else ""))
    return parser
