"""The guard's home-vs-outside CNN (issue 23, docs/ood.md round 4): a few small networks that read a
64-pixel, histogram-equalised copy of the model input and score "from another hospital or an older
patient" against "like the training hospital's children".

Histogram equalisation removes exposure and contrast (any monotone change of the grey levels), so what
is left is anatomy and layout (body size, shape of the thorax, collimation); the training augmentation
(framing, rotation, blur, noise, coarse quantisation, black or white borders) removes more of what is
specific to one hospital's equipment. The members differ in their seed only; their logits are averaged
(an average has a tighter tail on the home films than any one member). The networks travel with a model
version as ``outside_net.pt`` (checksummed in its card); the limit that uses their score is in
``ood.npz`` (``OodStats``).
"""
from __future__ import annotations

import io
import math
from dataclasses import asdict, dataclass
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from xray.io.augment import PRESETS, augment

OUTSIDE_NET_FILE = "outside_net.pt"  # extra file of a model version, checksummed in its card


@dataclass(frozen=True)
class OutsideNetConfig:
    """How the home-vs-outside networks are built and trained (saved with their weights)."""

    size: int = 64  # input side in pixels, after equalisation
    widths: tuple[int, ...] = (8, 16, 32, 32)  # channels of the conv blocks; each block halves the side
    members: int = 3  # networks, different seeds, logits averaged (docs/ood.md: 3 measured as well as 5, 40% cheaper)
    epochs: int = 6  # passes over the home training films and the outside films
    batch_size: int = 128
    lr: float = 3e-3  # AdamW, cosine to zero
    weight_decay: float = 1e-3
    seed: int = 0  # member k uses seed + k
    border_p: float = 0.3  # probability of a black or white border strip (collimation) in augmentation
    quantise_p: float = 0.3  # probability of coarse grey levels (16-64 levels) in augmentation

    @classmethod
    def from_dict(cls, data: dict) -> "OutsideNetConfig":
        unknown = set(data) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"unknown outside-net settings: {sorted(unknown)}")
        return cls(**{**data, **({"widths": tuple(data["widths"])} if "widths" in data else {})})


def equalise(pixels: torch.Tensor, size: int) -> torch.Tensor:
    """(B, S, S) or (B, 1, S, S) grey levels in [0, 255] -> (B, 1, size, size) float in [0, 1]:
    each image's grey levels replaced by their rank (histogram equalisation on 256 levels), then
    area-averaged down to ``size``."""
    x = pixels.reshape(pixels.shape[0], -1, *pixels.shape[-2:])[:, :1].float()  # (B, 1, S, S)
    b, _, h, w = x.shape
    levels = x.round().clamp(0, 255).long().view(b, -1)  # (B, S*S)
    histogram = torch.zeros(b, 256).scatter_add_(1, levels, torch.ones(levels.shape))
    cdf = histogram.cumsum(1) / (h * w)  # (B, 256) share of pixels at or below each level
    equalised = torch.gather(cdf, 1, levels).view(b, 1, h, w)
    return F.adaptive_avg_pool2d(equalised, size) if (h, w) != (size, size) else equalised


def _max_pool2(x: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, C, H // 2, W // 2): ``nn.MaxPool2d(2)``'s numbers as the maximum of the four 2x2
    phases, 8-12x faster on CPU for these few-channel maps (torch's pooling kernel was three quarters of the
    networks' time in ``predict``)."""
    x = x[..., : x.shape[-2] // 2 * 2, : x.shape[-1] // 2 * 2]  # floor odd sizes, as MaxPool2d
    return torch.maximum(torch.maximum(x[..., 0::2, 0::2], x[..., 0::2, 1::2]),
                         torch.maximum(x[..., 1::2, 0::2], x[..., 1::2, 1::2]))


class MaxPool2(nn.Module):
    """``_max_pool2`` as a layer (no parameters)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _max_pool2(x)


class OutsideNet(nn.Module):
    """(B, 1, size, size) equalised film -> (B,) log-odds that it is from elsewhere."""

    def __init__(self, widths: tuple[int, ...]):
        super().__init__()
        blocks, channels = [], 1
        for width in widths:
            blocks += [nn.Conv2d(channels, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU(),
                       MaxPool2()]
            channels = width
        self.features = nn.Sequential(*blocks)
        self.head = nn.Linear(channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.features((x - 0.5) / 0.29)  # an equalised image is uniform on [0, 1]: sd 0.29
        return self.head(z.mean(dim=(2, 3))).squeeze(1)  # (B,)


class OutsideEnsemble(nn.Module):
    """Several ``OutsideNet``s; ``score`` averages their logits."""

    def __init__(self, config: OutsideNetConfig, n_home: int = 0, n_outside: int = 0):
        super().__init__()
        self.config = config
        self.n_home, self.n_outside = n_home, n_outside
        self.members = nn.ModuleList(OutsideNet(config.widths) for _ in range(config.members))
        self._inference: list | None = None  # the members folded once, for a loaded (read-only) ensemble

    @torch.no_grad()
    def score(self, pixels: torch.Tensor | np.ndarray, batch_size: int = 256) -> np.ndarray:
        """(B, S, S) or (B, 1, S, S) uint8 model inputs -> (B,) mean log-odds of "from elsewhere"."""
        pixels = torch.as_tensor(pixels)
        self.eval()
        members = self._inference or [self._folded(member) for member in self.members]
        out = []
        for start in range(0, len(pixels), batch_size):
            x = (equalise(pixels[start:start + batch_size], self.config.size) - 0.5) / 0.29  # as OutsideNet.forward
            logits = []
            for blocks, head in members:
                z = x
                for weight, bias in blocks:
                    z = F.relu(_max_pool2(F.conv2d(z, weight, bias, padding=1)))  # ReLU and max-pool commute
                logits.append(head(z.mean(dim=(2, 3))).squeeze(1))  # (B,)
            out.append(torch.stack(logits).mean(0).double())
        return torch.cat(out).numpy() if out else np.zeros(0)

    @staticmethod
    def _folded(member: "OutsideNet") -> tuple[list[tuple[torch.Tensor, torch.Tensor]], nn.Linear]:
        """One member for inference: each convolution with its BatchNorm folded in, (C_out, C_in, 3, 3) and
        (C_out,); the same logits as ``OutsideNet.forward`` in eval mode to float rounding, 20% faster."""
        blocks = []
        for b in range(0, len(member.features), 4):
            conv, norm = member.features[b], member.features[b + 1]
            scale = norm.weight / torch.sqrt(norm.running_var + norm.eps)  # (C_out,)
            blocks.append(((conv.weight * scale.view(-1, 1, 1, 1)).contiguous(),
                           (norm.bias - norm.running_mean * scale).contiguous()))
        return blocks, member.head

    def to_bytes(self) -> bytes:
        buffer = io.BytesIO()
        torch.save({"config": {**asdict(self.config), "widths": list(self.config.widths)},
                    "n_home": self.n_home, "n_outside": self.n_outside,
                    "state": {k: v.detach().cpu() for k, v in self.state_dict().items()}}, buffer)
        return buffer.getvalue()

    @classmethod
    def from_bytes(cls, data: bytes) -> "OutsideEnsemble":
        """Parse ``outside_net.pt``; ValueError when it is not a consistent file."""
        try:
            saved = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
            ensemble = cls(OutsideNetConfig.from_dict(saved["config"]), int(saved["n_home"]),
                           int(saved["n_outside"]))
            ensemble.load_state_dict(saved["state"])
        except Exception as exc:  # zip, key and shape errors all mean a damaged file
            raise ValueError(f"outside-net file is damaged: {exc}") from None
        if not all(torch.isfinite(v).all() for v in ensemble.state_dict().values() if v.is_floating_point()):
            raise ValueError("outside-net file has non-finite weights")
        with torch.no_grad():  # loaded weights never change: fold each member once, not on every ``score``
            ensemble._inference = [cls._folded(member.eval()) for member in ensemble.members]
        return ensemble.eval()

    def summary(self) -> dict:
        c = self.config
        return {"method": (f"{c.members} small CNNs ({'-'.join(map(str, c.widths))} channels) on the {c.size}-pixel "
                           "histogram-equalised film, home vs outside, logits averaged"),
                "members": c.members, "epochs": c.epochs, "size": c.size, "n_home": self.n_home,
                "n_outside": self.n_outside,
                "parameters": sum(p.numel() for p in self.parameters())}


def _hospital_blind(x: torch.Tensor, config: OutsideNetConfig, g: torch.Generator) -> torch.Tensor:
    """(B, 1, S, S) float grey levels -> the same after changes that a hospital's equipment makes:
    the classifier's strong augmentation (framing, rotation, gamma, blur, noise), then black or white
    border strips (collimation, burnt-in margins) and coarse quantisation."""
    x = augment(x, PRESETS["strong"], g)
    b, _, h, w = x.shape
    for i in torch.nonzero(torch.rand(b, generator=g) < config.border_p).flatten().tolist():
        side = int(torch.randint(4, (1,), generator=g))
        width = int(torch.randint(2, max(3, h // 8), (1,), generator=g))
        value = 255.0 * float(torch.randint(2, (1,), generator=g))
        if side == 0:
            x[i, :, :width] = value
        elif side == 1:
            x[i, :, -width:] = value
        elif side == 2:
            x[i, :, :, :width] = value
        else:
            x[i, :, :, -width:] = value
    coarse = torch.rand(b, generator=g) < config.quantise_p
    if coarse.any():
        step = (256.0 / torch.randint(16, 65, (int(coarse.sum()),), generator=g).float()).view(-1, 1, 1, 1)
        x[coarse] = (x[coarse] / step).floor() * step
    return x


def fit_outside_net(home: torch.Tensor, outside: torch.Tensor, config: OutsideNetConfig = OutsideNetConfig(),
                    progress: Callable[[int, int, float], None] = lambda member, epoch, loss: None
                    ) -> OutsideEnsemble:
    """Train the members on (N, S, S) uint8 home training films (label 0) against (M, S, S) uint8 outside
    hospitals' films (label 1), classes weighted to balance; ``progress(member, epoch, mean loss)``."""
    if len(home) < 2 or len(outside) < 1:
        raise ValueError("the home-vs-outside networks need home films and outside films")
    images = torch.cat([torch.as_tensor(home), torch.as_tensor(outside)]).unsqueeze(1)  # (N+M, 1, S, S) uint8
    labels = torch.cat([torch.zeros(len(home)), torch.ones(len(outside))])
    pos_weight = torch.tensor(len(home) / len(outside))
    ensemble = OutsideEnsemble(config, len(home), len(outside))
    steps = config.epochs * math.ceil(len(images) / config.batch_size)
    for k, net in enumerate(ensemble.members):
        g = torch.Generator().manual_seed(config.seed + k)
        torch.manual_seed(config.seed + k)
        for layer in net.modules():  # a fresh start per member from its own seed
            if hasattr(layer, "reset_parameters"):
                layer.reset_parameters()
        optimiser = torch.optim.AdamW(net.parameters(), lr=config.lr, weight_decay=config.weight_decay)
        schedule = torch.optim.lr_scheduler.OneCycleLR(optimiser, config.lr, total_steps=steps, pct_start=0.15)
        net.train()
        for epoch in range(config.epochs):
            order, total = torch.randperm(len(images), generator=g), 0.0
            for start in range(0, len(images), config.batch_size):
                idx = order[start:start + config.batch_size]
                x = equalise(_hospital_blind(images[idx].float(), config, g), config.size)
                loss = F.binary_cross_entropy_with_logits(net(x), labels[idx], pos_weight=pos_weight)
                optimiser.zero_grad()
                loss.backward()
                optimiser.step()
                schedule.step()
                total += loss.item() * len(idx)
            progress(k, epoch, total / len(images))
        net.eval()
    return ensemble.eval()
