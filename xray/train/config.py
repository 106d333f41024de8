"""Training settings: the one config dataclass shared by the CLI, the Retrain page form and the card,
its command-line arguments (every default stated in ``--help``), and the command that reproduces a
run."""
from __future__ import annotations

import argparse
import shlex
from dataclasses import asdict, dataclass, fields

from xray.io.augment import PRESETS
from xray.model.net import STEMS, ModelConfig, stage_strides
from xray.io.preprocess import NORMALISATIONS


@dataclass
class TrainConfig:
    """Every training setting; shared by the CLI and the Retrain page form."""

    data_dir: str = ""  # folder with NORMAL/ and PNEUMONIA/ at any depth
    epochs: int = 40  # upper bound; early stopping may end sooner
    image_size: int = 128  # square model input in pixels
    batch_size: int = 64
    lr: float = 3e-3  # peak learning rate of the one-cycle schedule
    weight_decay: float = 5e-4  # AdamW decoupled weight decay
    val_fraction: float = 0.15  # patients held out for validation when the folder has no val/ part
    seed: int = 0  # the validation split's seed (and the weights' when init_seed is -1)
    split: str = "id-range"  # id-range | patients: how validation patients are chosen (xray.io.folders.SPLITS)
    calibrate_on: str = "perturbed"  # perturbed | clean: the validation images Platt scaling and the threshold see
    init_seed: int = -1  # seed of the weights, augmentation and batch order; -1 = seed (ensemble members differ here)
    patience: int = 8  # epochs without validation improvement before stopping
    label_smoothing: float = 0.05
    augment: str = "strong"  # xray.io.augment.PRESETS (docs/experiments.md: strong generalises best; "The width shortcut")
    mixup: float = 0.0  # Beta(a, a) mixup strength; 0 = off
    ema: float = 0.998  # decay of the weight moving average used for evaluation; 0 = off
    dropout: float = 0.3
    normalisation: str = "standardise"  # per-image intensity normalisation: standardise | equalise
    widths: tuple[int, ...] = (32, 48, 64)
    stem: str = "patch4"  # patch4 | conv (xray.model.STEMS); stage strides follow from it (docs/experiments.md: p4s)
    threshold_rule: str = "min-sensitivity>=0.95"  # max specificity with sensitivity >= 0.95 under every perturbation
    tta: str = "none"  # none | shift: test-time augmentation stored in the card
    init_from: str = ""  # "" = from scratch; "active" or a version id = fine-tune from it
    registry: str = ""  # registry folder; "" = weights/ or $XRAY_WEIGHTS
    run_dir: str = ""  # checkpoints + events; "" = <registry>/runs/<run id>
    resume: bool = False  # continue from run_dir/checkpoint.pt
    activate: bool = False  # make the new version active when training succeeds
    threads: int = 0  # torch CPU threads; 0 = all cores
    workers: int = 0  # decoding processes; 0 = automatic
    max_minutes: float = 0.0  # stop after this many minutes of training; 0 = no limit
    tag: str = ""  # appended to the version id
    members: int = 3  # > 1: a deep ensemble of this many nets from different seeds, one version (docs/experiments.md)

    @property
    def run_seed(self) -> int:
        """The seed of the weights, augmentation and batch order."""
        return self.seed if self.init_seed < 0 else self.init_seed

    def folder_options(self) -> dict:
        """The settings ``xray.io.folders.load_training_data`` reads: ``load_training_data(cfg.data_dir, **cfg.folder_options())``."""
        return {"image_size": self.image_size, "split": self.split, "val_fraction": self.val_fraction,
                "seed": self.seed, "workers": self.workers}

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        unknown = set(d) - {f.name for f in fields(cls)}
        if unknown:
            raise ValueError(f"unknown training settings: {sorted(unknown)}")
        d = {**LEGACY, **d}  # a card written before a setting existed ran with the old behaviour
        d = {k: tuple(v) if k == "widths" else v for k, v in d.items()}
        return cls(**d)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["widths"] = list(self.widths)
        return d


LEGACY = {"split": "patients", "calibrate_on": "clean"}  # what cards without these settings did


def model_config(cfg: TrainConfig) -> ModelConfig:
    """The architecture a from-scratch run of ``cfg`` builds."""
    return ModelConfig(widths=tuple(cfg.widths), strides=stage_strides(cfg.stem, len(cfg.widths)),
                       dropout=cfg.dropout, normalisation=cfg.normalisation, stem=cfg.stem, members=cfg.members)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    d = TrainConfig()
    parser.add_argument("data_dir", help="folder with NORMAL/ and PNEUMONIA/ subfolders at any depth")
    parser.add_argument("--epochs", type=int, default=d.epochs, help=f"maximum epochs (default {d.epochs})")
    parser.add_argument("--image-size", type=int, default=d.image_size, help=f"square input size (default {d.image_size})")
    parser.add_argument("--batch-size", type=int, default=d.batch_size, help=f"(default {d.batch_size})")
    parser.add_argument("--lr", type=float, default=d.lr, help=f"peak learning rate (default {d.lr})")
    parser.add_argument("--weight-decay", type=float, default=d.weight_decay, help=f"(default {d.weight_decay})")
    parser.add_argument("--val-fraction", type=float, default=d.val_fraction,
                        help=f"fraction of patients held out for validation (default {d.val_fraction})")
    parser.add_argument("--seed", type=int, default=d.seed, help=f"validation split seed (default {d.seed})")
    parser.add_argument("--split", choices=("id-range", "patients"), default=d.split,
                        help="validation patients: id-range = the lowest and highest patient numbers of each "
                             "acquisition batch (imitates acquisition drift); patients = at random (default "
                             f"{d.split})")
    parser.add_argument("--calibrate-on", choices=("perturbed", "clean"), default=d.calibrate_on,
                        help="validation images that Platt scaling and the threshold rule see: perturbed = "
                             "the images plus their acquisition perturbations (xray.io.augment.PERTURBATIONS); "
                             f"clean = the images alone (default {d.calibrate_on})")
    parser.add_argument("--init-seed", type=int, default=d.init_seed,
                        help="seed of the initial weights, augmentation and batch order; -1 = --seed "
                             f"(default {d.init_seed}); members of an ensemble share --seed and differ here")
    parser.add_argument("--patience", type=int, default=d.patience, help=f"early-stopping patience in epochs (default {d.patience})")
    parser.add_argument("--label-smoothing", type=float, default=d.label_smoothing, help=f"(default {d.label_smoothing})")
    parser.add_argument("--augment", choices=sorted(PRESETS), default=d.augment, help=f"(default {d.augment})")
    parser.add_argument("--mixup", type=float, default=d.mixup, help=f"mixup Beta parameter, 0 = off (default {d.mixup})")
    parser.add_argument("--ema", type=float, default=d.ema, help=f"weight EMA decay, 0 = off (default {d.ema})")
    parser.add_argument("--normalisation", choices=NORMALISATIONS, default=d.normalisation,
                        help=f"per-image intensity normalisation (default {d.normalisation})")
    parser.add_argument("--dropout", type=float, default=d.dropout, help=f"(default {d.dropout})")
    parser.add_argument("--widths", type=lambda s: tuple(int(x) for x in s.split(",")), default=d.widths,
                        help=f"channels per stage, comma-separated (default {','.join(map(str, d.widths))})")
    parser.add_argument("--stem", choices=sorted(STEMS), default=d.stem,
                        help=f"conv: two 3x3 convolutions; patch4: one 4x4 stride-4 patch convolution, about 4x "
                             f"cheaper (default {d.stem})")
    parser.add_argument("--threshold-rule", default=d.threshold_rule,
                        help=f"youden | sensitivity>=X (default {d.threshold_rule})")
    parser.add_argument("--tta", choices=["none", "shift"], default=d.tta, help=f"test-time augmentation (default {d.tta})")
    parser.add_argument("--fine-tune", dest="init_from", nargs="?", const="active", default="",
                        help="start from the active model (or the version given) instead of from scratch")
    parser.add_argument("--registry", default="", help="registry folder (default weights/ or $XRAY_WEIGHTS)")
    parser.add_argument("--run-dir", default="", help="checkpoint/event folder (default <registry>/runs/<time>)")
    parser.add_argument("--resume", action="store_true", help="continue from <run-dir>/checkpoint.pt")
    parser.add_argument("--activate", action="store_true", help="activate the new version when done")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: all cores)")
    parser.add_argument("--workers", type=int, default=0, help="image decoding processes (default: automatic)")
    parser.add_argument("--max-minutes", type=float, default=0.0, help="training time limit (default: none)")
    parser.add_argument("--tag", default="", help="suffix for the version id")
    parser.add_argument("--members", type=int, default=d.members,
                        help=f"train a deep ensemble of this many nets (different seeds, same split), averaged in "
                             f"logit space, as one version (default {d.members})")
    parser.add_argument("--events", default="", help="JSON-lines event file (default <run-dir>/events.jsonl)")


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    names = {f.name for f in fields(TrainConfig)}
    return TrainConfig.from_dict({k: v for k, v in vars(args).items() if k in names})


def command_line(cfg: TrainConfig) -> str:
    """The ``python -m xray train`` command that reproduces ``cfg`` (settings at their default left out)."""
    default = TrainConfig()
    words = ["python", "-m", "xray", "train", cfg.data_dir]
    for f in fields(TrainConfig):
        value = getattr(cfg, f.name)
        if f.name == "data_dir" or value == getattr(default, f.name) or (
                isinstance(value, list) and tuple(value) == getattr(default, f.name)):
            continue
        flag = "--fine-tune" if f.name == "init_from" else "--" + f.name.replace("_", "-")
        if isinstance(value, bool):
            words.append(flag)  # store_true switches; only True differs from the default
        elif isinstance(value, (tuple, list)):
            words += [flag, ",".join(str(v) for v in value)]
        else:
            words += [flag, str(value)]
    return shlex.join(words)
