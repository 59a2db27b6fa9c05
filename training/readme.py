"""Regenerate README.md's results block from the reports (no number is typed by hand).

    python -m training.readme

Reads pneunet/weights/metrics.json (the shipped model) and docs/comparison/comparison.json (the model
comparison) and rewrites the text between the results markers in README.md.
"""

from __future__ import annotations

import json

from pneunet.datasets import REPO_ROOT

README = REPO_ROOT / "README.md"
START, END = "<!-- results:start (python -m training.readme) -->", "<!-- results:end -->"


def results_block() -> str:
    shipped = json.loads((REPO_ROOT / "pneunet" / "weights" / "metrics.json").read_text())
    t, v = shipped["test"], shipped["val"]
    lines = [
        "Shipped model on the 624-image Kermany test set (threshold and temperature from validation only; "
        "full report: [pneunet/weights/REPORT.md](pneunet/weights/REPORT.md)):",
        "",
        "| split | AUC (95 % CI) | accuracy | sensitivity | specificity | ECE |",
        "|---|---|---|---|---|---|",
        f"| validation ({v['n']}) | {v['auc']:.4f} ({v['auc_ci95'][0]:.4f}–{v['auc_ci95'][1]:.4f}) | {v['accuracy']:.4f} | "
        f"{v['sensitivity']:.4f} | {v['specificity']:.4f} | {v['ece']:.4f} |",
        f"| **test ({t['n']})** | **{t['auc']:.4f}** ({t['auc_ci95'][0]:.4f}–{t['auc_ci95'][1]:.4f}) | {t['accuracy']:.4f} | "
        f"{t['sensitivity']:.4f} | {t['specificity']:.4f} | {t['ece']:.4f} |",
        "",
        f"Median latency on 2 CPU threads: {shipped['inference_ms_2_threads']['predict']:.1f} ms per image, "
        f"{shipped['inference_ms_2_threads']['predict_with_heatmap']:.1f} ms with the heatmap"
        + (f", after {shipped['inference_ms_2_threads']['lung_fields']:.1f} ms to find the lung fields."
           if "lung_fields" in shipped["inference_ms_2_threads"] else "."),
    ]
    if shipped.get("baseline"):
        from training.ship import side_by_side

        lines += ["", "Where the evidence sits, on adults from another hospital and under the shortcut probe — the model "
                  "shipped before lung fields and this one, on the test splits (the same table for validation, the "
                  "images, and what each figure means: the report):", "",
                  *side_by_side([("previous model", shipped["baseline"]["test"]), ("**shipped model**", shipped["evaluation_test"])]
                                + [(f"ablation: {a['name']}", a["test"]) for a in shipped.get("ablations", [])])]
    comparison_file = REPO_ROOT / "docs" / "comparison" / "comparison.json"
    if comparison_file.exists():
        lines += ["", "Before lung fields (whole images, Kermany only), every registry architecture under one protocol, one seed each "
                  "([docs/comparison/comparison.md](docs/comparison/comparison.md), `python -m training.compare`):", "",
                  "| architecture | params | input | pretrained | epochs run / recipe | s/epoch | val AUC | test AUC | "
                  "test sens | test spec | hardware |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
        for row in json.loads(comparison_file.read_text()):
            pretrained = "ImageNet" if row["pretrained"].startswith("ImageNet") else "none"
            lines.append(f"| {row['architecture']} | {row['parameters'] / 1e6:.1f} M | {row['input_size']} | {pretrained} | "
                         f"{row['epochs_run']} / {row['epochs_planned']} | {row['seconds_per_epoch']:.0f} | "
                         f"{row['val']['auc']:.4f} | {row['test']['auc']:.4f} | "
                         f"{row['test']['sensitivity']:.4f} | {row['test']['specificity']:.4f} | {row['hardware']} |")
    sweep_file = REPO_ROOT / "docs" / "sweep" / "sweep.json"
    if sweep_file.exists():
        summary = json.loads(sweep_file.read_text())["summary"]
        chosen = next(entry for entry in summary if entry["chosen"])
        lines += ["", f"The earlier recipe (`{chosen['args']}` on top of the registry's) was chosen among "
                  f"{len(summary)} variants × {chosen['seeds']} seeds on validation and a shift proxy only "
                  "([docs/sweep/sweep.md](docs/sweep/sweep.md), `python -m training.sweep`)."]
    return "\n".join(lines)


def main() -> None:
    text = README.read_text()
    before, _, rest = text.partition(START)
    _, _, after = rest.partition(END)
    if not rest:
        raise SystemExit(f"README.md has no results markers ({START} ... {END})")
    README.write_text(f"{before}{START}\n{results_block()}\n{END}{after}")
    print("README.md results block updated")


if __name__ == "__main__":
    main()
