"""Compare training recipes of one architecture on validation only, over several seeds.

    python -m training.sweep --seeds 0 1 2 --jobs 3 --workers 4      # every variant below, on a GPU
    python -m training.sweep --variants default full_ft --seeds 0    # a subset

Each (variant, seed) is a plain ``python -m training.train`` run (so its checkpoint records its own
command), then ``training.evaluate --split val --shift-proxy``. Test is never touched. The recipe is
chosen by the same rule as ``training.ship`` applies to checkpoints, on seed means: variants whose mean
validation AUC is within 0.001 of the best, then the highest mean shift-proxy AUC, then the lower mean
validation log loss. Writes OUT/sweep.md and OUT/sweep.json; runs go to RUNS/VARIANT-seedSEED.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from pneunet.datasets import REPO_ROOT, data_arguments

# Changes to the efficientnet_lite0 recipe (pneunet.models), each robust-by-construction in its own way.
VARIANTS: dict[str, list[str]] = {
    "default": [],
    "longer": ["--epochs", "12", "--patience", "4"],
    "full_ft": ["--full-fine-tune", "--lr", "3e-4", "--epochs", "10", "--patience", "4"],
    "slow_ema": ["--ema-decay", "0.999", "--epochs", "10", "--patience", "4"],
    "weighted_bce": ["--loss", "weighted_bce"],
}


def run_one(variant: str, seed: int, args: argparse.Namespace) -> dict:
    run_dir = Path(args.runs) / f"{variant}-seed{seed}"
    checkpoint = run_dir / "model.safetensors"
    log = open(Path(args.runs) / f"{variant}-seed{seed}.log", "a")
    common = ["--data-dir", args.data_dir, "--split-file", args.split_file]
    if not checkpoint.is_file():
        command = [sys.executable, "-m", "training.train", "--model", args.model, "--seed", str(seed),
                   "--out", str(run_dir), "--workers", str(args.workers), *common, *VARIANTS[variant]]
        subprocess.run(command, check=True, stdout=log, stderr=subprocess.STDOUT, cwd=REPO_ROOT)
    metrics_file = run_dir / "eval-val" / "metrics.json"
    if not metrics_file.is_file():
        subprocess.run([sys.executable, "-m", "training.evaluate", "--checkpoint", str(checkpoint), "--split", "val",
                        "--shift-proxy", "--out", str(run_dir / "eval-val"), *common],
                       check=True, stdout=log, stderr=subprocess.STDOUT, cwd=REPO_ROOT)
    result = json.loads(metrics_file.read_text())
    provenance = json.loads((run_dir / "model.json").read_text())["config"]["provenance"]
    return {"variant": variant, "seed": seed, "checkpoint": str(checkpoint),
            "val_auc": result["metrics"]["auc"], "val_log_loss": result["metrics"]["log_loss"],
            "val_ece": result["metrics"]["ece"], "shift_proxy_mean_auc": result["shift_proxy_mean_auc"],
            "epochs_run": provenance["epochs_run"], "seconds_per_epoch": provenance["seconds_per_epoch_median"],
            "hardware": provenance["hardware"]}


def summarise(rows: list[dict]) -> list[dict]:
    summary = []
    for variant in dict.fromkeys(row["variant"] for row in rows):
        mine = [row for row in rows if row["variant"] == variant]
        entry = {"variant": variant, "args": " ".join(VARIANTS[variant]) or "(the recipe)", "seeds": len(mine)}
        for key in ("val_auc", "val_log_loss", "val_ece", "shift_proxy_mean_auc", "epochs_run", "seconds_per_epoch"):
            values = [row[key] for row in mine]
            entry[key] = statistics.mean(values)
            entry[key + "_sd"] = statistics.stdev(values) if len(values) > 1 else 0.0
        summary.append(entry)
    best_auc = max(entry["val_auc"] for entry in summary)
    eligible = [entry for entry in summary if entry["val_auc"] >= best_auc - 0.001]
    chosen = max(eligible, key=lambda e: (round(e["shift_proxy_mean_auc"], 4), -e["val_log_loss"]))
    for entry in summary:
        entry["chosen"] = entry is chosen
    return summary


def write_report(rows: list[dict], summary: list[dict], out: Path, command: str) -> None:
    lines = [
        "# Recipe sweep (validation only; test never evaluated here)", "",
        f"Produced by `{command}`. Each variant is trained with every seed; the figures are seed means (sd). "
        "Rule: variants with mean validation AUC within 0.001 of the best, then the highest mean shift-proxy AUC "
        "(validation images under acquisition changes never used in training), then the lower validation log loss.", "",
        "| variant | extra training arguments | seeds | val AUC | val log loss | val ECE | shift-proxy AUC | epochs run | s/epoch | chosen |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for e in summary:
        lines.append(
            f"| {e['variant']} | `{e['args']}` | {e['seeds']} | {e['val_auc']:.4f} ({e['val_auc_sd']:.4f}) | "
            f"{e['val_log_loss']:.4f} ({e['val_log_loss_sd']:.4f}) | {e['val_ece']:.4f} | "
            f"{e['shift_proxy_mean_auc']:.4f} ({e['shift_proxy_mean_auc_sd']:.4f}) | {e['epochs_run']:.1f} | "
            f"{e['seconds_per_epoch']:.1f} | {'**yes**' if e['chosen'] else ''} |")
    lines += ["", f"Hardware: {', '.join(sorted({row['hardware'] for row in rows}))}; runs trained concurrently, "
              "so seconds per epoch include sharing the machine.", ""]
    out.mkdir(parents=True, exist_ok=True)
    (out / "sweep.md").write_text("\n".join(lines))
    (out / "sweep.json").write_text(json.dumps({"runs": rows, "summary": summary}, indent=2) + "\n")


def main(args: argparse.Namespace) -> list[dict]:
    Path(args.runs).mkdir(parents=True, exist_ok=True)
    jobs = [(variant, seed) for variant in args.variants for seed in args.seeds]
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        rows = list(pool.map(lambda job: run_one(*job, args), jobs))
    summary = summarise(rows)
    command = (f"python -m training.sweep --variants {' '.join(args.variants)} --seeds {' '.join(map(str, args.seeds))} "
               f"--jobs {args.jobs} --workers {args.workers}")
    write_report(rows, summary, Path(args.out), command)
    print((Path(args.out) / "sweep.md").read_text())
    return summary


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(parents=[data_arguments(out=str(REPO_ROOT / "docs" / "sweep"), out_help="report folder")], description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="efficientnet_lite0", help="architecture (default: %(default)s)")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS), help="(default: all)")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2], help="(default: %(default)s)")
    parser.add_argument("--jobs", type=int, default=1, help="trainings at once (default: %(default)s)")
    parser.add_argument("--workers", type=int, default=0, help="data-loader workers per training (default: %(default)s)")
    parser.add_argument("--runs", default=str(REPO_ROOT / "runs" / "sweep"), help="(default: %(default)s)")
    return parser


if __name__ == "__main__":
    main(get_args_parser().parse_args())
