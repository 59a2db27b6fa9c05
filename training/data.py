"""Data: the patient-grouped split file, in-memory datasets and training-only augmentation.

Build (or rebuild) the split file once; every run then reads the same split:

    python -m training.data --data-dir ../shared/data/kermany224
"""

from __future__ import annotations

import argparse
import csv
import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from pneunet.config import ModelConfig
from pneunet.lungs import LungFinder, model_view
from pneunet.preprocessing import load_grey

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


def make_split(data_dir: Path, val_fraction_folds: int = 8, seed: int = 0) -> list[Example]:
    """Carve a patient-grouped, stratified validation split (1/``val_fraction_folds`` of patients) from
    train. Byte-identical files are put in one group too, so no duplicate straddles train and val."""
    from sklearn.model_selection import StratifiedGroupKFold

    hashes = {}
    manifest = data_dir / "MANIFEST.sha256"
    if manifest.is_file():
        for line in manifest.read_text().splitlines():
            digest, _, name = line.partition("  ")
            hashes[name.lstrip("./")] = digest
    examples = []
    for split in ("train", "test"):
        for class_name, label in LABELS.items():
            for path in sorted((data_dir / split / class_name).glob("*.jpeg")):
                relative = path.relative_to(data_dir).as_posix()
                examples.append(Example(relative, label, patient_key(path.name), split))
    train = [example for example in examples if example.split == "train"]
    # Union-find over patients, joined by identical content.
    parent: dict[str, str] = {}

    def root(key: str) -> str:
        while parent.setdefault(key, key) != key:
            key = parent[key]
        return key

    first_patient_of_hash: dict[str, str] = {}
    for example in train:
        digest = hashes.get(example.path)
        if digest is None:
            continue
        other = first_patient_of_hash.setdefault(digest, example.patient)
        parent[root(example.patient)] = root(other)
    groups = [root(example.patient) for example in train]
    splitter = StratifiedGroupKFold(n_splits=val_fraction_folds, shuffle=True, random_state=seed)
    _, val_index = next(splitter.split(np.zeros(len(train)), [e.label for e in train], groups))
    val_set = set(val_index.tolist())
    carved = [Example(e.path, e.label, e.patient, "val" if i in val_set else "train") for i, e in enumerate(train)]
    return carved + [example for example in examples if example.split == "test"]


def write_split(examples: list[Example], split_file: Path) -> None:
    split_file.parent.mkdir(parents=True, exist_ok=True)
    with open(split_file, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "label", "patient", "split"])
        for example in examples:
            writer.writerow([example.path, example.label, example.patient, example.split])


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


def load_images(examples: list[Example], data_dir: Path) -> list[Image.Image]:
    """Decode every image once (grey, at its stored size); epochs then never touch the disk."""
    return [load_grey(data_dir / example.path) for example in examples]


class _RandomGamma(torch.nn.Module):
    def __init__(self, low: float, high: float):
        super().__init__()
        self.low, self.high = low, high

    def forward(self, image: Image.Image) -> Image.Image:
        gamma = float(torch.empty(1).uniform_(self.low, self.high))
        table = [round(255 * (value / 255) ** gamma) for value in range(256)]
        return image.point(table)


class _GaussianNoise(torch.nn.Module):
    def __init__(self, max_sigma: float):
        super().__init__()
        self.max_sigma = max_sigma

    def forward(self, image: Image.Image) -> Image.Image:
        sigma = float(torch.empty(1).uniform_(0, self.max_sigma))
        pixels = np.asarray(image, dtype=np.float32)
        noise = torch.randn(pixels.shape).numpy() * sigma * 255
        return Image.fromarray(np.clip(pixels + noise, 0, 255).astype(np.uint8))


def training_augmentation(counterfactual: float = 0.0) -> torch.nn.Module:
    """Geometry and acquisition differences (contrast, gamma, blur, noise, crop and scale), on the grey
    PIL image before the shared preprocessing; with ``counterfactual`` > 0, that share of images (either
    class) also gets laterality letters, text stamps, corner marks or border occlusion pasted anywhere
    (``training.shortcuts``), so such marks carry no label. Never used for validation, test or inference."""
    from torchvision.transforms import v2

    from training.shortcuts import CounterfactualAugment

    return v2.Compose([
        CounterfactualAugment(counterfactual),
        v2.RandomHorizontalFlip(),
        v2.RandomApply([v2.RandomAffine(degrees=10, translate=(0.06, 0.06), scale=(0.85, 1.15), shear=6)], p=0.8),
        v2.RandomApply([v2.RandomResizedCrop(224, scale=(0.75, 1.0), ratio=(0.8, 1.25), antialias=True)], p=0.3),
        v2.RandomApply([v2.ColorJitter(brightness=0.3, contrast=0.3)], p=0.8),
        v2.RandomApply([_RandomGamma(0.7, 1.4)], p=0.5),
        v2.RandomApply([v2.GaussianBlur(5, sigma=(0.1, 1.5))], p=0.3),
        v2.RandomApply([_GaussianNoise(0.04)], p=0.3),
    ])


class XrayDataset(Dataset):
    """In-memory images -> (normalised tensor, label), through the one preprocessing path
    (``pneunet.lungs.model_view``: with ``lungs``, the classifier sees the lung fields only)."""

    def __init__(self, images: list[Image.Image], labels: list[int], config: ModelConfig, augment: torch.nn.Module | None = None,
                 lungs: LungFinder | None = None):
        self.images, self.labels, self.config, self.augment, self.lungs = images, labels, config, augment, lungs

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        image = self.images[index]
        if self.augment is not None:
            image = self.augment(image)
        model_input, _ = model_view(image, self.config, self.lungs)
        return torch.from_numpy(model_input), torch.tensor(float(self.labels[index]))


def main(args: argparse.Namespace) -> None:
    examples = make_split(Path(args.data_dir), seed=args.seed)
    write_split(examples, Path(args.split_file))
    for split in ("train", "val", "test"):
        part = [e for e in examples if e.split == split]
        print(f"{split}: {len(part)} images, {sum(e.label for e in part)} pneumonia, "
              f"{len({e.patient for e in part})} patients")


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", default=str(DEFAULT_DATA_DIR), help="Kermany 224 folder (default: %(default)s)")
    parser.add_argument("--split-file", default=str(DEFAULT_SPLIT_FILE), help="where to write (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="split seed (default: %(default)s)")
    return parser


if __name__ == "__main__":
    main(get_args_parser().parse_args())
