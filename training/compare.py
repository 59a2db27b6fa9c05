"""Train and evaluate every registry model under one protocol and write a comparison table.

    python -m training.compare --out docs/comparison                     # every model, its recipe
    python -m training.compare --models cnn64 cnn5 --epochs 3 --out DIR  # a subset, capped epochs

Same split file, same preprocessing, temperature and threshold fitted on validation, test touched once
per model to report. A model whose run folder already holds a checkpoint is evaluated, not retrained
(``--retrain`` forces training). Writes OUT/comparison.md and OUT/comparison.json.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from pneunet.checkpoint import read_sidecar
from pneunet.config import ModelConfig
from pneunet.models import REGISTRY, build_model
from training import evaluate, train
from pneunet.datasets import REPO_ROOT, data_arguments


def run_model(name: str, args: argparse.Namespace) -> dict:
    run_dir = Path(args.runs) / f"{name}-seed{args.seed}"
    checkpoint = run_dir / "model.safetensors"
    if args.retrain or not checkpoint.is_file():
        train_args = ["--model", name, "--seed", str(args.seed), "--out", str(run_dir),
                      "--data-dir", args.data_dir, "--split-file", args.split_file]
        if args.epochs:
            train_args += ["--epochs", str(args.epochs)]
        if args.threads:
            train_args += ["--threads", str(args.threads)]
        if args.workers:
            train_args += ["--workers", str(args.workers)]
        train_namespace = train.get_args_parser().parse_args(train_args)
        train_namespace.argv = train_args  # so the checkpoint records the training command, not compare's
        train.main(train_namespace)
    config = ModelConfig.from_dict(read_sidecar(checkpoint)["config"])
    provenance = config.provenance
    results = {}
    for split in ("val", "test"):
        results[split] = evaluate.main(evaluate.get_args_parser().parse_args(
            ["--checkpoint", str(checkpoint), "--split", split, "--out", str(run_dir / f"eval-{split}"),
             "--data-dir", args.data_dir, "--split-file", args.split_file]))["metrics"]
    model = build_model(config)
    return {
        "architecture": name,
        "description": REGISTRY[name].description,
        "parameters": sum(p.numel() for p in model.parameters()),
        "input_size": config.image_size,
        "pretrained": provenance["pretrained"],
        "epochs_run": provenance["epochs_run"],
        "epochs_planned": args.epochs or REGISTRY[name].recipe.epochs,
        "seconds_per_epoch": provenance["seconds_per_epoch_median"],
        "train_minutes": provenance["train_seconds_total"] / 60,
        "hardware": provenance["hardware"],
        "val": {k: results["val"][k] for k in ("auc", "accuracy", "sensitivity", "specificity", "ece")},
        "test": {k: results["test"][k] for k in ("auc", "auc_ci95", "accuracy", "sensitivity", "specificity", "ece")},
        "checkpoint": str(checkpoint),
    }


def write_table(rows: list[dict], out: Path, command: str) -> None:
    lines = [
        "# Model comparison (one protocol: same split, preprocessing, validation-fitted temperature and threshold)",
        "",
        f"Produced by `{command}`. Test metrics at each model's validation-chosen threshold; test was "
        "evaluated once per model, after training, and never used for any choice.",
        "",
        "| architecture | params | input | pretrained | epochs run / planned | s/epoch | val AUC | test AUC (95 % CI) | "
        "test acc | test sens | test spec | test ECE | hardware |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        t = r["test"]
        lines.append(
            f"| {r['architecture']} | {r['parameters'] / 1e6:.2f} M | {r['input_size']} | "
            f"{'ImageNet' if r['pretrained'].startswith('ImageNet') else r['pretrained'].split(' ')[0]} | "
            f"{r['epochs_run']} / {r['epochs_planned']} | {r['seconds_per_epoch']:.0f} | {r['val']['auc']:.4f} | "
            f"{t['auc']:.4f} ({t['auc_ci95'][0]:.3f}–{t['auc_ci95'][1]:.3f}) | {t['accuracy']:.4f} | "
            f"{t['sensitivity']:.4f} | {t['specificity']:.4f} | {t['ece']:.4f} | {r['hardware']} |")
    lines += ["", "Descriptions:", ""] + [f"- `{r['architecture']}`: {r['description']}" for r in rows]
    (out / "comparison.md").write_text("\n".join(lines) + "\n")
    (out / "comparison.json").write_text(json.dumps(rows, indent=2) + "\n")


def main(args: argparse.Namespace) -> list[dict]:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = [run_model(name, args) for name in args.models]
    command = "python -m training.compare " + " ".join(
        [f"--models {' '.join(args.models)}", f"--out {args.out}"] + ([f"--epochs {args.epochs}"] if args.epochs else []))
    write_table(rows, out, command)
    print((out / "comparison.md").read_text())
    return rows


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(parents=[data_arguments(out=str(REPO_ROOT / "docs" / "comparison"), out_help="report folder")], description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=list(REGISTRY), choices=list(REGISTRY), help="(default: all)")
    parser.add_argument("--runs", default=str(REPO_ROOT / "runs"), help="where run folders live (default: %(default)s)")
    parser.add_argument("--epochs", type=int, default=None, help="cap every model's epochs (default: each recipe's)")
    parser.add_argument("--seed", type=int, default=0, help="(default: %(default)s)")
    parser.add_argument("--threads", type=int, default=0, help="CPU threads for torch (default: torch's choice)")
    parser.add_argument("--workers", type=int, default=0, help="data-loader worker processes (default: %(default)s)")
    parser.add_argument("--retrain", action="store_true", help="train even if a checkpoint exists")
    return parser


if __name__ == "__main__":
    main(get_args_parser().parse_args())
