"""Train the lung-field segmenter on the Kermany lung masks, choose its epoch on validation, report on test.

    python -m training.train_lungs --out runs/lungs --epochs 10 --seed 0

Uses the classifier's patient-grouped split (training/splits/kermany224.csv) and the masks in
../shared/data/kermany224_lungs. The input is the classifier's own unit image (``pneunet.preprocessing.to_unit``)
through ``pneunet.lungs.segmenter_input``; the Dice that picks the epoch is measured at 224 px through
``pneunet.lungs.lung_fields``, the function every front uses. Writes OUT/lungs.safetensors + lungs.json,
OUT/history.csv, and with --report the test Dice / IoU (bootstrap CIs), a contact sheet on nih_adult224
test and report.md (the test evaluation is logged in docs/test_evaluations.csv).
"""

from __future__ import annotations

import argparse
import csv
import math
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from pneunet.lung_model import build_lung_model, save_lung_checkpoint
from pneunet.lungs import LungConfig, lung_fields, segmenter_input
from pneunet.models import default_config
from pneunet.preprocessing import to_unit
from pneunet.datasets import DEFAULT_DATA_DIR, REPO_ROOT, data_arguments, read_split
from training.train import git_commit, hardware

DEFAULT_LUNGS_DIR = DEFAULT_DATA_DIR.parent / "kermany224_lungs"
DEFAULT_NIH_DIR = DEFAULT_DATA_DIR.parent / "nih_adult224"


def mask_path(lungs_dir: Path, image_path: str) -> Path:
    return lungs_dir / Path(image_path).with_suffix(".png")


def load_masked_examples(split: str, data_dir: Path, lungs_dir: Path, split_file: Path, limit: int | None = None):
    """(units (N, 224, 224), masks (N, 224, 224) bool, paths) for the split's images that have a mask."""
    config = default_config("efficientnet_lite0")
    examples = [e for e in read_split(split_file, split) if mask_path(lungs_dir, e.path).is_file()]
    if limit:
        examples = examples[:: max(1, len(examples) // limit)][:limit]
    units = np.stack([to_unit(data_dir / e.path, config) for e in examples])
    masks = np.stack([np.asarray(Image.open(mask_path(lungs_dir, e.path))) >= 128 for e in examples])
    return units, masks, [e.path for e in examples]


def targets_at(masks: np.ndarray, size: int) -> np.ndarray:
    """Soft (N, size, size) targets: the share of each low-resolution cell covered by lung."""
    return np.stack([np.asarray(Image.fromarray(m.astype(np.uint8) * 255).resize((size, size), Image.Resampling.BOX),
                                dtype=np.float32) / 255.0 for m in masks])


def augment(images: torch.Tensor, targets: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Random flip, rotation, scale, shift (image and mask together) and gamma / contrast (image only)."""
    n = images.shape[0]
    uniform = lambda low, high: torch.empty(n).uniform_(low, high, generator=generator)  # noqa: E731
    angle, scale = uniform(-0.2, 0.2), uniform(0.8, 1.2)
    flip = torch.where(torch.rand(n, generator=generator) < 0.5, -1.0, 1.0)
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0], theta[:, 0, 1] = flip * torch.cos(angle) / scale, -torch.sin(angle) / scale
    theta[:, 1, 0], theta[:, 1, 1] = flip * torch.sin(angle) / scale, torch.cos(angle) / scale
    theta[:, 0, 2], theta[:, 1, 2] = uniform(-0.1, 0.1), uniform(-0.1, 0.1)
    grid = F.affine_grid(theta, images.shape, align_corners=False)
    unit = (images * 0.25 + 0.5).clamp(0, 1)
    unit = F.grid_sample(unit, grid, align_corners=False, padding_mode="zeros")
    targets = F.grid_sample(targets, grid, align_corners=False, padding_mode="zeros")
    gamma = uniform(0.6, 1.6).view(n, 1, 1, 1)
    contrast = uniform(0.7, 1.3).view(n, 1, 1, 1)
    unit = ((unit.clamp_min(1e-6) ** gamma - 0.5) * contrast + 0.5).clamp(0, 1)
    return (unit - 0.5) / 0.25, targets


def dice_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    probability = torch.sigmoid(logits)
    overlap = (probability * targets).sum(dim=(1, 2, 3))
    return (1 - (2 * overlap + 1) / (probability.sum(dim=(1, 2, 3)) + targets.sum(dim=(1, 2, 3)) + 1)).mean()


@torch.inference_mode()
def predict_logits(model, inputs: np.ndarray, batch_size: int = 64) -> np.ndarray:
    model.eval()
    return np.concatenate([model(torch.from_numpy(inputs[i:i + batch_size])).numpy()[:, 0]
                           for i in range(0, len(inputs), batch_size)])


def overlap_scores(predicted: np.ndarray, truth: np.ndarray) -> tuple[float, float]:
    """(Dice, IoU) of two bool masks."""
    intersection = float(np.logical_and(predicted, truth).sum())
    total = float(predicted.sum() + truth.sum())
    union = total - intersection
    return (2 * intersection / total if total else 1.0), (intersection / union if union else 1.0)


def segment_scores(model, config: LungConfig, units: np.ndarray, masks: np.ndarray) -> dict:
    """Dice / IoU at full size through ``lung_fields`` (the serving rule, template fallback included)."""
    logits = predict_logits(model, np.stack([segmenter_input(u, config) for u in units]))
    fields = [lung_fields(l, u.shape, config) for l, u in zip(logits, units)]
    scores = np.array([overlap_scores(f.mask, m) for f, m in zip(fields, masks)])
    return {"dice": scores[:, 0], "iou": scores[:, 1], "plausible": np.array([f.plausible for f in fields]), "fields": fields}


def population_template(masks: np.ndarray, size: int = 32) -> list[list[int]]:
    mean = targets_at(masks, size).mean(axis=0)
    return (mean >= 0.5).astype(int).tolist()


def contact_sheet(units: list[np.ndarray], fields, titles: list[str], path: Path, columns: int = 6) -> None:
    """Images with the lung outline in green (fallback template in red)."""
    from pneunet.lungs import lung_outline

    tiles = []
    for unit, field_ in zip(units, fields):
        rgb = np.repeat((unit * 255).astype(np.uint8)[..., None], 3, axis=2)
        outline = lung_outline(field_.mask)
        outline = outline | np.roll(outline, 1, axis=0) | np.roll(outline, 1, axis=1)
        rgb[outline] = (40, 230, 60) if field_.plausible else (240, 40, 40)
        tiles.append(rgb)
    rows = math.ceil(len(tiles) / columns)
    size = tiles[0].shape[0]
    sheet = np.zeros((rows * (size + 14), columns * size, 3), dtype=np.uint8)
    for index, tile in enumerate(tiles):
        r, c = divmod(index, columns)
        sheet[r * (size + 14):r * (size + 14) + size, c * size:(c + 1) * size] = tile
    image = Image.fromarray(sheet)
    from PIL import ImageDraw

    draw = ImageDraw.Draw(image)
    for index, title in enumerate(titles):
        r, c = divmod(index, columns)
        draw.text((c * size + 3, r * (size + 14) + size + 1), title[:36], fill=(255, 255, 255))
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)


def main(args: argparse.Namespace) -> Path:
    commit = git_commit()
    torch.manual_seed(args.seed)
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    data_dir, lungs_dir, split_file = Path(args.data_dir), Path(args.lungs_dir), Path(args.split_file)
    config = LungConfig(input_size=args.input_size, base_channels=args.base_channels, depth=args.depth)
    print("decoding images and masks", flush=True)
    train_units, train_masks, _ = load_masked_examples("train", data_dir, lungs_dir, split_file, args.train_limit)
    val_units, val_masks, _ = load_masked_examples("val", data_dir, lungs_dir, split_file, args.val_limit)
    config.template = population_template(train_masks)
    train_inputs = torch.from_numpy(np.stack([segmenter_input(u, config) for u in train_units]))
    train_targets = torch.from_numpy(targets_at(train_masks, config.input_size))[:, None]
    val_inputs = np.stack([segmenter_input(u, config) for u in val_units])
    val_targets = torch.from_numpy(targets_at(val_masks, config.input_size))[:, None]

    model = build_lung_model(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=1e-4)
    steps_per_epoch = math.ceil(len(train_inputs) / args.batch_size)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=args.lr, total_steps=args.epochs * steps_per_epoch, pct_start=0.15)
    generator = torch.Generator().manual_seed(args.seed)
    history, best = [], (-1.0, 0, None)
    for epoch in range(args.epochs):
        model.train()
        started, losses = time.perf_counter(), []
        order = torch.randperm(len(train_inputs), generator=generator)
        for start in range(0, len(order), args.batch_size):
            index = order[start:start + args.batch_size]
            images, targets = augment(train_inputs[index], train_targets[index], generator)
            logits = model(images)
            loss = F.binary_cross_entropy_with_logits(logits, targets) + dice_loss(logits, targets)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            losses.append(loss.item())
        seconds = time.perf_counter() - started
        val_logits = torch.from_numpy(predict_logits(model, val_inputs))[:, None]
        val_loss = float(F.binary_cross_entropy_with_logits(val_logits, val_targets) + dice_loss(val_logits, val_targets))
        val = segment_scores(model, config, val_units, val_masks)
        row = {"epoch": epoch + 1, "train_seconds": round(seconds, 1), "train_loss": float(np.mean(losses)),
               "val_loss": val_loss, "val_dice": float(val["dice"].mean()), "val_iou": float(val["iou"].mean()),
               "val_plausible": float(val["plausible"].mean())}
        history.append(row)
        if row["val_dice"] > best[0]:
            best = (row["val_dice"], epoch + 1, {k: v.detach().clone() for k, v in model.state_dict().items()})
            torch.save({"epoch": epoch + 1, "state": best[2]}, out / "best.pt")  # survives an interrupted run
        print(f"epoch {epoch + 1}: train loss {row['train_loss']:.4f} | val loss {val_loss:.4f} dice {row['val_dice']:.4f} "
              f"iou {row['val_iou']:.4f} plausible {row['val_plausible']:.3f} | {seconds:.0f}s{' *' if best[1] == epoch + 1 else ''}", flush=True)

    with open(out / "history.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(history[0]))
        writer.writeheader()
        writer.writerows(history)
    model.load_state_dict(best[2])
    config.provenance = {
        "command": "python -m training.train_lungs " + " ".join(shlex.quote(a) for a in sys.argv[1:]),
        "git_commit": commit, "seed": args.seed, "data": f"{lungs_dir} (masks), {data_dir} (images)",
        "split_file": str(split_file.relative_to(REPO_ROOT) if split_file.is_relative_to(REPO_ROOT) else split_file),
        "train_images": len(train_inputs), "val_images": len(val_inputs), "epochs_run": len(history), "best_epoch": best[1],
        "val_dice": best[0], "hardware": hardware(torch.device("cpu")), "torch": torch.__version__,
        "seconds_per_epoch_median": float(np.median([r["train_seconds"] for r in history])),
        "parameters": sum(p.numel() for p in model.parameters()),
    }
    weights = out / "lungs.safetensors"
    digest = save_lung_checkpoint(model, config, weights)
    print(f"saved {weights} (sha256 {digest[:12]}...): best epoch {best[1]}, val Dice {best[0]:.4f}", flush=True)
    if args.report:
        from training.lung_report import write_lung_report

        write_lung_report(weights, out / "report", data_dir, lungs_dir, split_file, Path(args.nih_dir))
    return weights


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(parents=[data_arguments(out=str(REPO_ROOT / "runs" / "lungs"), nih=True)], description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lungs-dir", default=str(DEFAULT_LUNGS_DIR), help="lung masks (default: %(default)s)")
    parser.add_argument("--epochs", type=int, default=10, help="(default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=32, help="(default: %(default)s)")
    parser.add_argument("--lr", type=float, default=3e-3, help="peak learning rate (default: %(default)s)")
    parser.add_argument("--input-size", type=int, default=128, help="segmenter input side in px (default: %(default)s)")
    parser.add_argument("--base-channels", type=int, default=8, help="U-Net width at full resolution (default: %(default)s)")
    parser.add_argument("--depth", type=int, default=4, help="U-Net poolings (default: %(default)s)")
    parser.add_argument("--train-limit", type=int, default=None, help="at most N train images (default: all)")
    parser.add_argument("--val-limit", type=int, default=None, help="at most N val images (default: all)")
    parser.add_argument("--seed", type=int, default=0, help="(default: %(default)s)")
    parser.add_argument("--threads", type=int, default=0, help="CPU threads for torch (default: torch's choice)")
    parser.add_argument("--report", action="store_true", help="after training, evaluate once on test and write OUT/report")
    return parser


if __name__ == "__main__":
    main(get_args_parser().parse_args())
