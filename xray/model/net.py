"""The pneumonia CNN: a small residual network trained from scratch on one-channel radiographs, and
the helpers every user of a net shares (device placement, mixed precision, test-time augmentation)."""
from __future__ import annotations

import contextlib
import copy
from dataclasses import asdict, dataclass, replace

import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from xray.io.preprocess import TTA_SHIFTS, normalise


@dataclass(frozen=True)
class ModelConfig:
    """Architecture; stored in the model card so a version rebuilds exactly."""

    widths: tuple[int, ...] = (32, 64, 128, 256)  # channels of each stage
    strides: tuple[int, ...] = (2, 2, 2, 1)  # last stage keeps resolution so Grad-CAM is not 4x4
    dropout: float = 0.3  # before the classifier
    normalisation: str = "standardise"  # per-image intensity normalisation (xray.io.preprocess.normalise)
    stem: str = "conv"  # conv: 3x3 stride 2 + 3x3 (S/2); patch4: one 4x4 stride-4 patch convolution (S/4)
    members: int = 1  # > 1: a deep ensemble of this many independently seeded nets, averaged in logit space

    def to_dict(self) -> dict:
        d = {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}
        if self.members == 1:
            del d["members"]  # cards of single nets stay as they were
        return d

    @property
    def member(self) -> "ModelConfig":
        """The architecture of one member."""
        return replace(self, members=1)

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        unknown = set(d) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"unknown model config keys: {sorted(unknown)}")
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})


STEMS = {"conv": 2, "patch4": 4}  # stem -> how much it reduces the resolution


def stage_strides(stem: str, stages: int) -> tuple[int, ...]:
    """Strides that bring the last stages to 1/16 of the input (8x8 at 128 px, Grad-CAM's grid) and
    keep that resolution after: (2, 2, 2, 1) for the conv stem with 4 stages, (2, 2, 1) for patch4 with 3."""
    reduction, strides = STEMS[stem], []
    for _ in range(stages):
        strides.append(2 if reduction < 16 else 1)
        reduction *= strides[-1]
    return tuple(strides)


def cpu_memory_format(config: ModelConfig) -> torch.memory_format:
    """channels_last about doubles CPU speed, but torch 2.14's CPU backward crashes (SIGSEGV) in a
    residual block fed 8 channels in channels_last; nets with a stem narrower than 16 stay contiguous."""
    return torch.channels_last if config.widths[0] // 2 >= 16 else torch.contiguous_format


def to_input(batch: torch.Tensor, device: torch.device, config: ModelConfig) -> torch.Tensor:
    """(B, 1, S, S) grey levels -> float on ``device`` in the memory format the net runs fastest in."""
    x = batch.to(device).float()  # the net normalises (its config says how)
    return x.contiguous(memory_format=cpu_memory_format(config)) if device.type == "cpu" else x


def place(net: nn.Module, device: torch.device) -> nn.Module:
    """``net`` moved to ``device`` in the memory format it runs fastest in there (the one place this is decided)."""
    net = net.to(device)
    if device.type == "cpu":
        net = net.to(memory_format=cpu_memory_format(net.config))
    return net


def autocast_for(device: torch.device) -> contextlib.AbstractContextManager:
    """Mixed precision on a CUDA GPU (bf16 where supported, else fp16); plain float32 on the CPU."""
    if device.type != "cuda":
        # float32 on the CPU: bf16 is faster on CPUs with AVX512-BF16/AMX (xray/bench.py measures it)
        # but moves probabilities near the threshold away from those the card was calibrated on
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.autocast("cuda", dtype=dtype)


def tta_logits(net: nn.Module, x: torch.Tensor, tta: str, logits: torch.Tensor | None = None) -> torch.Tensor:
    """(B, 1, S, S) network input -> (B,) logits, averaged over the card's test-time augmentation.

    ``tta`` is "none" or "shift" (the mean logit over the image and four 4-pixel shifts: cheap
    robustness to framing). ``logits`` of the unshifted input may be passed when already computed.
    """
    logits = net(x) if logits is None else logits
    if tta == "shift":
        for dx, dy in TTA_SHIFTS:
            logits = logits + net(torch.roll(x, shifts=(dy, dx), dims=(2, 3)))
        logits = logits / (len(TTA_SHIFTS) + 1)
    elif tta != "none":
        raise ValueError(f"unknown test-time augmentation {tta!r}; one of none, shift")
    return logits


def conv_bn(c_in: int, c_out: int, stride: int = 1, k: int = 3, padding: int | None = None) -> nn.Sequential:
    padding = k // 2 if padding is None else padding
    return nn.Sequential(nn.Conv2d(c_in, c_out, k, stride, padding, bias=False),
                         nn.BatchNorm2d(c_out), nn.ReLU(inplace=True))


class ResidualBlock(nn.Module):
    """Two 3x3 convolutions with a projected shortcut when the shape changes."""

    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        self.conv1 = conv_bn(c_in, c_out, stride)
        self.conv2 = nn.Sequential(nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False), nn.BatchNorm2d(c_out))
        self.shortcut = nn.Identity()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.conv2(self.conv1(x)) + self.shortcut(x))


class PneumoniaNet(nn.Module):
    """Input (B, 1, S, S) grey levels in [0, 255] (normalised inside); output (B,) logit of pneumonia."""

    def __init__(self, config: ModelConfig = ModelConfig()):
        super().__init__()
        self.config = config
        stem_width = config.widths[0] // 2
        if config.stem == "conv":
            self.stem = nn.Sequential(conv_bn(1, stem_width, stride=2), conv_bn(stem_width, stem_width))
        elif config.stem == "patch4":  # lossless-capable: 16 pixels -> 16 channels, 16x fewer positions after
            self.stem = conv_bn(1, stem_width, stride=4, k=4, padding=0)
        else:
            raise ValueError(f"unknown stem {config.stem!r}; one of {sorted(STEMS)}")
        stages, c_in = [], stem_width
        for width, stride in zip(config.widths, config.strides):
            stages.append(ResidualBlock(c_in, width, stride))
            c_in = width
        self.stages = nn.Sequential(*stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(config.dropout)
        self.classifier = nn.Linear(c_in, 1)

    @property
    def target_layer(self) -> nn.Module:
        """The layer Grad-CAM explains: the last stage, at 1/16 of the input resolution."""
        return self.stages[-1]

    def feature_map(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 1, S, S) -> (B, C, S/16, S/16): the last stage (Grad-CAM's layer; the OOD check pools it)."""
        x = normalise(x, self.config.normalisation)  # preprocessing travels with the weights
        return self.trunk(x)

    def trunk(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 1, S, S) already normalised -> (B, C, S/16, S/16): ``feature_map`` without the normalisation."""
        return self.stages(self.stem(x))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 1, S, S) -> (B, C) pooled features of the last stage: what the classifier sees."""
        return self.pool(self.feature_map(x)).flatten(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classify(self.features(x))

    def classify(self, features: torch.Tensor) -> torch.Tensor:
        """(B, C) features -> (B,) logits."""
        return self.classifier(self.dropout(features)).squeeze(1)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def count_macs(model: PneumoniaNet, image_size: int) -> int:
    """Multiply-accumulates of one forward pass at (1, 1, S, S), counted from conv and linear layers."""
    macs = 0

    def hook(module, inputs, output):
        nonlocal macs
        if isinstance(module, nn.Conv2d):
            k = module.kernel_size[0] * module.kernel_size[1] * module.in_channels // module.groups
            macs += output.numel() * k
        elif isinstance(module, nn.Linear):
            macs += output.numel() * module.in_features

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    was_training = model.training
    model.eval()
    with torch.inference_mode():
        model(torch.zeros(1, 1, image_size, image_size))
    model.train(was_training)
    for h in handles:
        h.remove()
    return macs


def fold_batchnorm(net: PneumoniaNet) -> PneumoniaNet:
    """An inference-only copy with every Conv2d + BatchNorm2d pair folded into one convolution:
    the same outputs to float rounding, about 6% faster on CPU, and no BatchNorm left to train."""
    net = copy.deepcopy(net).eval()
    for module in list(net.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, nn.Sequential):
                items = list(child)
                for i in range(len(items) - 1):
                    if isinstance(items[i], nn.Conv2d) and isinstance(items[i + 1], nn.BatchNorm2d):
                        items[i], items[i + 1] = fuse_conv_bn_eval(items[i], items[i + 1]), nn.Identity()
                setattr(module, name, nn.Sequential(*items))
    return net


class EnsembleNet(nn.Module):
    """A deep ensemble (Lakshminarayanan et al., NeurIPS 2017): ``members`` nets of one architecture,
    trained from different seeds on the same split, their logits averaged (logit space).

    It has the single net's interface: ``feature_map`` concatenates the members' last stages along the
    channels, and ``classifier`` is the members' linear layers side by side, each weight divided by the
    number of members (bias: their mean), so ``classify(pool(feature_map(x)))`` is exactly the mean
    logit, and CAM/HiResCAM and the OOD features stay exact for the ensemble.
    """

    def __init__(self, config: ModelConfig):
        super().__init__()
        if config.members < 2:
            raise ValueError("an ensemble needs at least 2 members")
        self.config = config
        self.members = nn.ModuleList(PneumoniaNet(config.member) for _ in range(config.members))
        self.pool = nn.AdaptiveAvgPool2d(1)

    @property
    def target_layer(self) -> nn.Module:
        return self.members[0].target_layer

    @property
    def classifier(self) -> nn.Linear:
        """The combined head: (K * C) -> 1, equal to the mean of the members' heads (made on each call)."""
        k = len(self.members)
        weights = torch.cat([m.classifier.weight for m in self.members], dim=1) / k
        bias = torch.stack([m.classifier.bias for m in self.members]).mean(dim=0)
        head = nn.Linear(weights.shape[1], 1).to(weights.device, weights.dtype)
        with torch.no_grad():
            head.weight.copy_(weights)
            head.bias.copy_(bias)
        return head.eval()

    def feature_map(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 1, S, S) -> (B, K * C, S/16, S/16): every member's last stage (the members share the
        normalisation, so it runs once)."""
        x = normalise(x, self.config.normalisation)
        return torch.cat([m.trunk(x) for m in self.members], dim=1)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(self.feature_map(x)).flatten(1)

    def classify(self, features: torch.Tensor) -> torch.Tensor:
        """(B, K * C) pooled features -> (B,) mean of the members' logits."""
        c = features.shape[1] // len(self.members)
        return torch.stack([m.classify(features[:, i * c:(i + 1) * c]) for i, m in enumerate(self.members)]).mean(dim=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = normalise(x, self.config.normalisation)
        return torch.stack([m.classify(m.pool(m.trunk(x)).flatten(1)) for m in self.members]).mean(dim=0)


def build_net(config: ModelConfig) -> nn.Module:
    """The network a config describes: one ``PneumoniaNet`` or an ``EnsembleNet``."""
    return EnsembleNet(config) if config.members > 1 else PneumoniaNet(config)
