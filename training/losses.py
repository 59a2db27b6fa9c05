"""Losses for an imbalanced binary task (pneumonia is ~74 % of train)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class FocalLoss(nn.Module):
    """Binary focal loss (Lin et al. 2017) on logits. ``alpha`` weighs the positive (pneumonia) class."""

    def __init__(self, alpha: float = 0.25, gamma: float = 2.0):
        super().__init__()
        self.alpha, self.gamma = alpha, gamma

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        bce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
        p_true = torch.exp(-bce)
        weight = self.alpha * targets + (1 - self.alpha) * (1 - targets)
        return (weight * (1 - p_true) ** self.gamma * bce).mean()


def make_loss(name: str, positive_fraction: float, focal_gamma: float = 2.0) -> nn.Module:
    """``focal`` / ``weighted_bce`` balance the classes by the train prevalence; ``bce`` does not."""
    if name == "focal":
        return FocalLoss(alpha=1 - positive_fraction, gamma=focal_gamma)
    if name == "weighted_bce":
        return nn.BCEWithLogitsLoss(pos_weight=torch.tensor((1 - positive_fraction) / positive_fraction))
    if name == "bce":
        return nn.BCEWithLogitsLoss()
    raise ValueError(f"unknown loss {name!r}; choose focal, weighted_bce or bce")


def outside_lung_share(features: torch.Tensor, weight: torch.Tensor, lung_cells: torch.Tensor) -> torch.Tensor:
    """Mean share of the evidence that lies outside the lung fields: per image, sum |w . F_ij| weighted by
    (1 - lung fraction of cell ij) over sum |w . F_ij|. ``features`` (N, C, h, w), ``weight`` (C,) of the
    pooled-linear head, ``lung_cells`` (N, h, w) in [0, 1]. Scale-free, so it neither rewards shrinking nor
    inflating the logits; 0 when every cell outside the lungs says nothing."""
    evidence = torch.einsum("c,nchw->nhw", weight, features).abs()
    outside = (evidence * (1.0 - lung_cells)).flatten(1).sum(1)
    return (outside / (evidence.flatten(1).sum(1) + 1e-6)).mean()
