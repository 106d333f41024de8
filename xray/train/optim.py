"""What a training step needs besides the net: the loss, the optimiser and its schedule, and the weight
moving average. One factory (``make_optimizer``) serves training and the bench."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def make_optimizer(net: torch.nn.Module, lr: float, weight_decay: float, epochs: int,
                   steps_per_epoch: int) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    """AdamW with decoupled weight decay (Loshchilov and Hutter, ICLR 2019) and a one-cycle schedule
    peaking at ``lr`` after 20% of the steps (Smith and Topin, 2019): the recipe of every shipped version."""
    optimizer = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=weight_decay)
    total = max(1, epochs) * max(1, steps_per_epoch)
    # OneCycleLR ends the warm-up at step pct_start * total - 1; at exactly 0 (5 steps in all: a small folder's
    # one step per epoch for 5 epochs) that phase has no length and torch divides by zero (issue 26):
    # warm up for one step then, peaking at the second step instead of the first
    pct_start = 0.2 if 0.2 * total != 1 else 2 / total
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=total, pct_start=pct_start)
    return optimizer, scheduler


class EMA:
    """Exponential moving average of parameters and buffers (BatchNorm statistics included)."""

    def __init__(self, model: torch.nn.Module, decay: float):
        self.decay = decay
        self.updates = 0
        self.shadow = {k: v.detach().clone() for k, v in model.state_dict().items()}

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        self.updates += 1
        decay = min(self.decay, (1 + self.updates) / (10 + self.updates))  # warm-up: forget the random init
        for k, v in model.state_dict().items():
            if v.dtype.is_floating_point:
                self.shadow[k].mul_(decay).add_(v.detach(), alpha=1 - decay)
            else:
                self.shadow[k].copy_(v)


def loss_fn(logits: torch.Tensor, targets: torch.Tensor, pos_weight: float, smoothing: float) -> torch.Tensor:
    """Class-balanced binary cross-entropy with label smoothing; targets in [0, 1]."""
    soft = targets * (1 - smoothing) + 0.5 * smoothing
    weights = torch.where(targets > 0.5, torch.full_like(targets, pos_weight), torch.ones_like(targets))
    return (F.binary_cross_entropy_with_logits(logits, soft, reduction="none") * weights).sum() / weights.sum()
