"""Data: the patient-grouped split file, in-memory datasets and training-only augmentation.

Build (or rebuild) the split file once; every run then reads the same split:

    python -m training.data --data-dir ../shared/data/kermany224
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from pneunet.config import ModelConfig
from pneunet.lungs import LungFinder, model_view
from pneunet.preprocessing import load_grey

from pneunet.datasets import Example, LABELS, data_arguments, patient_key


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
    (``pneunet.lungs.model_view``: with ``lungs``, the classifier sees the lung fields only). With
    ``lung_cells`` = s > 0 (and ``lungs``), items also carry the (s, s) share of each feature-map cell that
    the found lung fields cover, for the outside-the-lungs evidence loss."""

    def __init__(self, images: list[Image.Image], labels: list[int], config: ModelConfig, augment: torch.nn.Module | None = None,
                 lungs: LungFinder | None = None, lung_cells: int = 0):
        if lung_cells and (lungs is None or config.image_size % lung_cells):
            raise ValueError(f"lung_cells={lung_cells} needs a segmenter and to divide the image size {config.image_size}")
        self.images, self.labels, self.config, self.augment, self.lungs = images, labels, config, augment, lungs
        self.lung_cells = lung_cells

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        image = self.images[index]
        if self.augment is not None:
            image = self.augment(image)
        model_input, fields = model_view(image, self.config, self.lungs)
        item = torch.from_numpy(model_input), torch.tensor(float(self.labels[index]))
        if not self.lung_cells:
            return item
        side, cell = self.lung_cells, self.config.image_size // self.lung_cells
        cover = fields.mask.reshape(side, cell, side, cell).mean(axis=(1, 3), dtype=np.float32)
        return *item, torch.from_numpy(cover)


def main(args: argparse.Namespace) -> None:
    examples = make_split(Path(args.data_dir), seed=args.seed)
    write_split(examples, Path(args.split_file))
    for split in ("train", "val", "test"):
        part = [e for e in examples if e.split == split]
        print(f"{split}: {len(part)} images, {sum(e.label for e in part)} pneumonia, "
              f"{len({e.patient for e in part})} patients")


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(parents=[data_arguments()], description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seed", type=int, default=0, help="split seed (default: %(default)s)")
    return parser


if __name__ == "__main__":
    main(get_args_parser().parse_args())
