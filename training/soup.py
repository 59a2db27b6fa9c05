"""Average the weights of several fine-tuned checkpoints of one recipe (a uniform "model soup",
Wortsman et al. 2022), then re-fit temperature and threshold on validation.

    python -m training.soup runs/efficientnet_lite0-seed0/model.safetensors \\
        runs/efficientnet_lite0-seed1/model.safetensors runs/efficientnet_lite0-seed2/model.safetensors \\
        --out runs/efficientnet_lite0-soup

All ingredients start from the same ImageNet weights and share their frozen blocks, which is what makes
weight averaging work (one model, the robustness of an ensemble, no extra inference cost).
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from pneunet.checkpoint import load_checkpoint, save_checkpoint, sha256_of
from pneunet.datasets import data_arguments, read_split
from training.data import XrayDataset, load_images
from training.train import calibrate_on_validation, git_commit


def main(args: argparse.Namespace) -> Path:
    models, configs = zip(*(load_checkpoint(path) for path in args.checkpoints))
    architectures = {config.architecture for config in configs}
    if len(architectures) != 1:
        raise SystemExit(f"all ingredients must share one architecture, got {sorted(architectures)}")
    soup, config = models[0], configs[0]
    states = [model.state_dict() for model in models]
    averaged = {}
    for name, tensor in states[0].items():
        if tensor.is_floating_point():
            averaged[name] = torch.stack([state[name] for state in states]).mean(0)
        else:  # integer buffers (BatchNorm's num_batches_tracked)
            averaged[name] = tensor
    soup.load_state_dict(averaged)
    examples = read_split(Path(args.split_file), "val")
    loader = DataLoader(XrayDataset(load_images(examples, Path(args.data_dir)), [e.label for e in examples], config), batch_size=64)
    device = torch.device("cpu")
    soup.to(memory_format=torch.channels_last)
    temperature, threshold, val_summary = calibrate_on_validation(soup, loader, device, args.min_sensitivity)
    ingredients = [{"checkpoint": str(path), "sha256": sha256_of(path), "command": c.provenance.get("command"),
                    "git_commit": c.provenance.get("git_commit"), "seed": c.provenance.get("seed"),
                    "hardware": c.provenance.get("hardware"),
                    "seconds_per_epoch_median": c.provenance.get("seconds_per_epoch_median"),
                    "train_seconds_total": c.provenance.get("train_seconds_total"),
                    "val_auc": c.provenance.get("val", {}).get("auc")}
                   for path, c in zip(args.checkpoints, configs)]
    config.temperature, config.threshold = temperature, threshold
    config.provenance = {
        **{key: value for key, value in configs[0].provenance.items() if key not in ("seed", "val", "command", "git_commit")},
        "command": "python -m training.soup " + " ".join(shlex.quote(a) for a in sys.argv[1:]),
        "git_commit": git_commit(),
        "soup_of": ingredients,
        "threshold_rule": f"highest threshold with validation sensitivity >= {args.min_sensitivity}",
        "val": val_summary,
    }
    out = Path(args.out)
    digest = save_checkpoint(soup.cpu(), config, out / "model.safetensors")
    print(f"soup of {len(states)} -> {out / 'model.safetensors'} (sha256 {digest[:12]}...): temperature "
          f"{temperature:.3f}, threshold {threshold:.3f}, val AUC {val_summary['auc']:.4f}, val loss {val_summary['log_loss']:.4f}")
    return out / "model.safetensors"


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(parents=[data_arguments(out="required")], description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoints", nargs="+", help="ingredient .safetensors files (same architecture)")
    parser.add_argument("--min-sensitivity", type=float, default=0.97, help="(default: %(default)s)")
    return parser


if __name__ == "__main__":
    main(get_args_parser().parse_args())
