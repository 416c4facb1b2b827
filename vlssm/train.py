"""Train and evaluate vlssm's models: ``vlssm train MODEL`` and ``vlssm eval MODEL --checkpoint PATH``.

Also ``python -m vlssm.train MODEL ...`` (training), and under torchrun for more than one
process (DistributedDataParallel; gloo on CPU, nccl on GPU)::

    vlssm train mvlr                                  # the demo: digit mosaics, a tiny random CLIP
    vlssm train mvlr --data coco --data-root /data/coco --clip-checkpoint RN101.pt --out runs/coco
    torchrun --nproc_per_node 2 -m vlssm.train mvlr --batch-size 32 --out runs/ddp
    vlssm eval mvlr --checkpoint runs/coco/last.pt --json metrics.json

The recipe (MVLR section 4.2 unless noted): AdamW, weight decay 1e-4 (not given by the paper;
ASL's value, which MVLR follows), learning rate 1e-4 with a linear warm-up (``--warmup-epochs``,
1 by default; the paper gives none) and then a cosine decay to ``--min-lr-ratio`` x lr, batch 32,
30 epochs, an EMA of the weights with decay 0.9997 (with the usual warm-up
``min(decay, (1 + n) / (10 + n))`` after n updates, so that a short run's EMA is not its initial
weights), optional bf16 autocast (``--amp bf16``), gradient clipping (``--clip-grad``), gradient
accumulation (``--accum-steps``). CAPNET and Candle use the same recipe (their summaries give none).

Where settings come from, later wins: the built-in defaults, the demo preset (``--data demo``:
the random-weight ``vlssm-demo-RN`` backbone at 64 x 64, 10 epochs, lr 1e-3, no augmentation;
CAPNET and Candle, whose image encoder is frozen: ``vlssm-demo-ViT`` and lr 1e-2; CAPNET: a long
tail, imbalance 0.1; Candle: single-label base-to-new digits, 5 base classes, imbalance 0.1;
see ``DEMO_PRESET*``), ``--config FILE`` (YAML or JSON, the flags' names as keys, ``-`` or ``_``),
the flags given.

Outputs in ``--out DIR``: ``last.pt`` (written by rank 0 after every epoch, atomically: a
temporary file, fsync, rename), ``metrics.jsonl`` (one JSON object per evaluated epoch),
``config.json`` (the resolved settings), ``tb/`` (``--tensorboard``). ``--resume`` continues
from ``last.pt``: the model, EMA, optimizer, scheduler, epoch and step; the data order and every
random draw of an epoch are seeded from (seed, epoch, rank) at the start of the epoch, so a
resumed run repeats the epochs it lost exactly (on the CPU, bitwise) without saving RNG states.

Global batch: ``--batch-size`` is the batch of one optimizer step over all processes and
accumulation steps; each process takes ``batch_size / (world_size * accum_steps)`` per forward.
The training sampler is a :class:`~torch.utils.data.DistributedSampler` (also for one process), so
the images of a step are the same for any world size. Evaluation shards the split without padding
(rank r takes items r, r + W, ...) and gathers every prediction (all_gather, padded to the
largest shard and trimmed back), so metrics see each image once.
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import math
import os
import sys
import time
from contextlib import nullcontext
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
import torch.nn as nn

from ._argtypes import fraction, nonneg_float, positive_int

__all__ = ["main", "train", "evaluate", "add_train_arguments", "add_eval_arguments", "run_train", "run_eval",
           "gather_rows", "TRAIN_FORMAT", "DEMO_PRESET"]

#: the ``format`` field of a training checkpoint (``DIR/last.pt``)
TRAIN_FORMAT = "vlssm-train-1"

#: what ``--data demo`` changes (unless the config file or a flag says otherwise)
#: (no augmentation: random resized crops, flips and RandAugment's shears and posterization destroy 8 x 8
#: digit scans; measured: the Baseline reached test mAP 0.39 (chance) in 200 steps with the default
#: augmentation, 0.76 without)
DEMO_PRESET: Dict[str, Any] = {"backbone": "vlssm-demo-RN", "image_size": 64, "epochs": 10, "lr": 1e-3,
                               "warmup_epochs": 1.0, "augment": "none"}
#: and for the models with a frozen image encoder (CAPNET, Candle): the random ViT. A frozen random
#: ResNet maps every image to one feature (BatchNorm at its initial statistics and the zero-initialised
#: last BatchNorm of each block: mean pairwise cosine 0.999999 over the digit images, measured); the
#: random ViT keeps them apart (0.996; nearest class mean 0.74 on the digits). Their small heads take
#: lr 1e-2 (measured on the demo, 10 epochs: CAPNET mAP 0.52 at 1e-3, 0.72 at 1e-2; Candle base
#: accuracy 0.48 at 1e-3, 0.82 at 1e-2).
DEMO_PRESET_FROZEN: Dict[str, Any] = {"backbone": "vlssm-demo-ViT", "lr": 1e-2}
#: CAPNET: its papers' setting, a long tail (class i drawn with weight 0.1 ** (i / 9))
DEMO_PRESET_CAPNET: Dict[str, Any] = {"imbalance": 0.1}
#: Candle: its paper's setting, imbalanced base-to-new single-label classification
DEMO_PRESET_CANDLE: Dict[str, Any] = {"single_label": True, "num_base": 5, "imbalance": 0.1}

# settings that may differ between a run and its --resume (where and how it runs, not what it computes)
_RESUME_FREE = {"resume", "out", "workers", "device", "no_progress", "tensorboard", "config", "log_every",
                "skip_bad", "data_root", "eval_batch_size", "epochs"}


# ----------------------------------------------------------------------------------------------
# arguments
# ----------------------------------------------------------------------------------------------

def _model_names() -> List[str]:
    from .models import list_models

    return list_models()


def _common_arguments(p: argparse.ArgumentParser) -> None:
    from .data import add_data_arguments

    p.add_argument("model", choices=_model_names(), metavar="MODEL",
                   help=f"a registered model: {', '.join(_model_names())}")
    p.add_argument("--backbone", default=None,
                   help="open_clip architecture (default: the model's; demo: vlssm-demo-RN)")
    p.add_argument("--image-size", type=positive_int, default=None, help="input side S (default: the model's)")
    p.add_argument("--clip-checkpoint", default=None, metavar="FILE",
                   help="a local open_clip / OpenAI CLIP file for the encoders (default: random weights)")
    p.add_argument("--backend", default=None, help="vlssm op backend for the models that take one")
    p.add_argument("--device", default="auto", help="auto (cuda:LOCAL_RANK when CUDA is there), cpu, cuda")
    p.add_argument("--amp", choices=("none", "bf16"), default="none", help="bf16 autocast (CPU and GPU)")
    p.add_argument("--eval-batch-size", type=positive_int, default=None,
                   help="per-process evaluation batch (default: the per-process training batch)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    add_data_arguments(p)


def add_train_arguments(p: argparse.ArgumentParser) -> None:
    """The options of ``vlssm train`` (see the module docstring)."""
    _common_arguments(p)
    p.add_argument("--config", default=None, metavar="FILE", help="YAML or JSON file of settings (keys: the flags)")
    p.add_argument("--out", default=None, metavar="DIR", help="output directory (default: runs/MODEL-DATA)")
    p.add_argument("--resume", action="store_true", help="continue from DIR/last.pt (start anew when there is none)")
    p.add_argument("--epochs", type=positive_int, default=30)
    p.add_argument("--steps-per-epoch", type=positive_int, default=None,
                   help="cap each epoch at this many optimizer steps (a fixed step budget)")
    p.add_argument("--batch-size", type=positive_int, default=32, help="global batch of one optimizer step")
    p.add_argument("--accum-steps", type=positive_int, default=1, help="gradient accumulation steps")
    p.add_argument("--lr", type=nonneg_float, default=1e-4)
    p.add_argument("--weight-decay", type=nonneg_float, default=1e-4)
    p.add_argument("--warmup-epochs", type=nonneg_float, default=1.0, help="linear warm-up length (epochs)")
    p.add_argument("--min-lr-ratio", type=fraction, default=0.0, help="end of the cosine, as a fraction of lr")
    p.add_argument("--ema-decay", type=fraction, default=0.9997, help="EMA decay (0: no EMA)")
    p.add_argument("--clip-grad", type=nonneg_float, default=None, help="max gradient norm (default: none)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eval-every", type=positive_int, default=1, help="evaluate every N epochs (and the last)")
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--tensorboard", action="store_true", help="also log to DIR/tb (needs tensorboard)")
    p.add_argument("--log-every", type=positive_int, default=50, help="steps between progress-bar loss updates")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="a model config field (JSON value, e.g. --set n_ctx=8 --set fused=false); repeatable")


def add_eval_arguments(p: argparse.ArgumentParser) -> None:
    """The options of ``vlssm eval``."""
    _common_arguments(p)
    p.add_argument("--checkpoint", required=True, metavar="PATH", help="DIR/last.pt of vlssm train")
    p.add_argument("--json", nargs="?", const="-", default=None, metavar="FILE",
                   help="write the metrics as one JSON object (to FILE, or stdout without one)")
    p.add_argument("--weights", choices=("both", "model", "ema"), default="both", help="which weights to evaluate")


def _flag_dests(p: argparse.ArgumentParser) -> Dict[str, argparse.Action]:
    return {a.dest: a for a in p._actions if a.option_strings and a.dest != "help"}


def _read_config_file(path: str, p: argparse.ArgumentParser) -> Dict[str, Any]:
    if not os.path.isfile(path):
        p.error(f"--config: no such file {path!r}")
    with open(path, encoding="utf-8") as f:
        text = f.read()
    try:
        if path.endswith((".yaml", ".yml")):
            try:
                import yaml
            except ImportError:
                p.error("--config: reading YAML needs PyYAML (pip install pyyaml); or give a .json file")
            data = yaml.safe_load(text)
        else:
            data = json.loads(text)
    except Exception as e:  # the parser's message, naming the file
        p.error(f"--config {path!r}: not valid {'YAML' if path.endswith(('.yaml', '.yml')) else 'JSON'}: {e}")
    if data is None:
        data = {}
    if not isinstance(data, dict):
        p.error(f"--config {path!r}: expected a mapping of settings, got {type(data).__name__}")
    dests = _flag_dests(p)
    out = {}
    for k, v in data.items():
        key = str(k).replace("-", "_")
        if key in ("config", "resume"):
            p.error(f"--config {path!r}: {k!r} cannot be set from a config file")
        if key not in dests:
            p.error(f"--config {path!r}: unknown setting {k!r}; known: {', '.join(sorted(dests))}")
        action = dests[key]
        if action.type is not None and v is not None and not isinstance(v, (list, bool)):
            try:
                v = action.type(str(v))
            except (argparse.ArgumentTypeError, ValueError) as e:
                p.error(f"--config {path!r}: {k}: {e}")
        if action.choices is not None and v not in action.choices:
            p.error(f"--config {path!r}: {k}: {v!r} is not one of {list(action.choices)}")
        out[key] = v
    return out


def parse_train_args(p: argparse.ArgumentParser, argv: Optional[Sequence[str]]) -> argparse.Namespace:
    """Parse ``vlssm train`` arguments with the precedence defaults < demo preset < --config < flags."""
    first, _ = p.parse_known_args(argv)
    presets: Dict[str, Any] = {}
    if getattr(first, "data", "demo") == "demo":
        presets.update(DEMO_PRESET)
        if getattr(first, "model", None) in ("capnet", "candle"):
            presets.update(DEMO_PRESET_FROZEN)
        presets.update({"capnet": DEMO_PRESET_CAPNET, "candle": DEMO_PRESET_CANDLE}.get(
            getattr(first, "model", None), {}))
    dests = _flag_dests(p)
    p.set_defaults(**{k: v for k, v in presets.items() if k in dests})
    if first.config:
        p.set_defaults(**_read_config_file(first.config, p))
    args = p.parse_args(argv)
    if args.out is None:
        args.out = os.path.join("runs", f"{args.model}-{args.data}")
    return args


# ----------------------------------------------------------------------------------------------
# processes and devices
# ----------------------------------------------------------------------------------------------

@dataclasses.dataclass
class _Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def main(self) -> bool:
        return self.rank == 0


def _setup_processes(device: str) -> _Dist:
    """torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK) -> the process group and this process's device."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if device == "auto":
        dev = torch.device("cuda", local) if torch.cuda.is_available() else torch.device("cpu")
    else:
        try:
            dev = torch.device(device)
        except RuntimeError:
            raise ValueError(f"--device: not a device: {device!r} (auto, cpu, cuda, cuda:N)") from None
        if dev.type == "cuda":
            if not torch.cuda.is_available():
                raise ValueError("--device cuda: CUDA is not available here")
            if dev.index is None:
                dev = torch.device("cuda", local)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo")
    return _Dist(rank, world, local, dev)


def _barrier(d: _Dist) -> None:
    if d.world > 1:
        dist.barrier()


def gather_rows(t: torch.Tensor) -> torch.Tensor:
    """Concatenate each process's rows ``t`` (n_r, ...) in rank order: (sum_r n_r, ...).

    The shards may differ in length: each is padded to the longest before ``all_gather`` and
    trimmed back after, so no row is duplicated or lost. One process: ``t`` itself.
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return t
    world = dist.get_world_size()
    n = torch.tensor([t.shape[0]], device=t.device, dtype=torch.int64)
    sizes = [torch.zeros_like(n) for _ in range(world)]
    dist.all_gather(sizes, n)
    sizes_ = [int(s) for s in sizes]
    m = max(sizes_)
    padded = torch.cat([t, t.new_zeros((m - t.shape[0], *t.shape[1:]))]) if m > t.shape[0] else t.contiguous()
    out = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(out, padded)
    return torch.cat([o[:s] for o, s in zip(out, sizes_)])


class _Shard(torch.utils.data.Sampler):
    """Items rank, rank + W, rank + 2W, ... of the dataset: a partition, no padding, no shuffle."""

    def __init__(self, n: int, rank: int, world: int) -> None:
        self.idx = list(range(rank, n, world))

    def __iter__(self):
        return iter(self.idx)

    def __len__(self) -> int:
        return len(self.idx)


# ----------------------------------------------------------------------------------------------
# building the model
# ----------------------------------------------------------------------------------------------

def _parse_sets(items: Sequence[str], p: argparse.ArgumentParser) -> Dict[str, Any]:
    out = {}
    for it in items:
        if "=" not in it:
            p.error(f"--set {it!r}: expected KEY=VALUE")
        k, v = it.split("=", 1)
        try:
            out[k.strip()] = json.loads(v)
        except json.JSONDecodeError:
            out[k.strip()] = v  # a bare string (e.g. --set hard_template=A photo of {}.)
    return out


def _config_fields(name: str) -> set:
    from .models._registry import _REGISTRY

    return {f.name for f in dataclasses.fields(_REGISTRY[name].config_cls)}


def _model_overrides(args, train_ds, sets: Dict[str, Any]) -> Dict[str, Any]:
    """The model config fields that come from the command line and the training data."""
    fields = _config_fields(args.model)
    cfg: Dict[str, Any] = {}
    if args.backend is not None and "backend" in fields:
        cfg["backend"] = args.backend
    counts = list(train_ds.class_counts())
    if args.model == "capnet":  # the DB-focal loss's class frequencies, from the training labels
        cfg["class_freq"] = counts
        cfg["train_num"] = len(train_ds)
    if args.model == "candle":
        cfg["class_counts"] = counts
        cfg["num_base"] = train_ds.num_base
        cfg["multi_label"] = bool(train_ds.multi_label)
    cfg.update(sets)
    return cfg


def _build_model(args, classnames, overrides: Dict[str, Any], p: argparse.ArgumentParser):
    from .models import create_model

    try:
        return create_model(args.model, classnames, backbone=args.backbone, image_size=args.image_size,
                            pretrained=args.clip_checkpoint, **overrides)
    except (TypeError, ValueError, ImportError) as e:
        p.error(f"building {args.model}: {e}")


# ----------------------------------------------------------------------------------------------
# EMA, schedule, checkpoints
# ----------------------------------------------------------------------------------------------

def _ema(model: nn.Module, decay: float):
    """torch's AveragedModel as an EMA of the floating-point parameters and buffers (BatchNorm's running
    statistics too, as timm's ModelEma), decay ``min(decay, (1 + n) / (10 + n))`` after n updates.

    Integer buffers (token ids, BatchNorm's batch counts) are copied, not averaged: a float average
    written back into an integer tensor truncates (49406.9999 -> 49406: another token)."""
    from torch.optim.swa_utils import AveragedModel

    def avg(avg_p, p, n):
        if not avg_p.is_floating_point():
            return p
        d = min(decay, (1.0 + float(n)) / (10.0 + float(n)))
        return avg_p * d + p * (1.0 - d)

    ema = AveragedModel(model, avg_fn=avg, use_buffers=True)
    ema.requires_grad_(False)
    return ema


def _lr_lambda(total: int, warmup: int, min_ratio: float):
    def f(step: int) -> float:
        if warmup > 0 and step < warmup:
            return (step + 1) / warmup
        t = (step - warmup) / max(1, total - warmup)
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, t)))

    return f


def _atomic_save(obj: Any, path: str) -> None:
    """torch.save to a temporary file in the same folder, fsync, rename over ``path``, fsync the folder:
    a kill at any moment leaves the old file or the new one, never a torn one."""
    folder = os.path.dirname(os.path.abspath(path))
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    try:
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:  # pragma: no cover - folders cannot be fsync'ed on some file systems
        pass


def _read_train_checkpoint(path: str) -> dict:
    if not os.path.isfile(path):
        raise ValueError(f"checkpoint not found: {path!r}")
    try:
        ck = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"{path!r} is not a readable checkpoint: {type(e).__name__}: {e}") from None
    if not isinstance(ck, dict) or ck.get("format") != TRAIN_FORMAT:
        raise ValueError(f"{path!r} is not a vlssm training checkpoint (format {TRAIN_FORMAT!r})")
    return ck


def _check_same_model(ck: dict, path: str, model_name: str, classnames: List[str],
                      model_config: Optional[Dict[str, Any]] = None) -> None:
    """ValueError unless training checkpoint ``ck`` is of this model, these classnames and (when given)
    this model config, naming the difference."""
    from .models._registry import _check_checkpoint

    _check_checkpoint({"model": ck["model_name"], "classnames": ck["classnames"]}, model_name, list(classnames),
                      path, what="checkpoint")
    if model_config is not None:
        diff = sorted(k for k in set(ck["model_config"]) | set(model_config)
                      if _plain(ck["model_config"].get(k)) != _plain(model_config.get(k)))
        if diff:
            raise ValueError(f"{path!r} was trained with another model config: "
                             + "; ".join(f"{k}: {ck['model_config'].get(k)!r} != {model_config.get(k)!r}"
                                         for k in diff))


def _plain(v):
    """JSON-plain form of a config value (tuples as lists), for comparisons and checkpoints."""
    return json.loads(json.dumps(v))


def _jsonable(d: Dict[str, Any]) -> Dict[str, Any]:
    return {k: _plain(v) for k, v in d.items()}


# ----------------------------------------------------------------------------------------------
# evaluation
# ----------------------------------------------------------------------------------------------

def _finite(v: float) -> Optional[float]:
    return None if v is None or not math.isfinite(v) else float(v)


def compute_metrics(scores: torch.Tensor, targets: torch.Tensor, multi_label: bool,
                    train_counts: Optional[Sequence[int]] = None, num_base: Optional[int] = None) -> Dict[str, Any]:
    """The paper metrics of predictions ``scores`` (N, C) (logits) against ``targets``.

    Multi-label (targets (N, C) in {0, 1, -1 = ignore}): ``mAP``, ``CP CR CF1 OP OR OF1`` (threshold:
    probability 0.5) and, with ``train_counts``, the head / medium / tail mAP (>= 100 / 20-99 / < 20
    training images; None for an empty group). Single-label (targets (N,) class indices): ``accuracy``
    over all classes and, with ``num_base`` < C, Candle's base-to-new protocol: ``base`` (base-class
    images, argmax over the base classes), ``new`` (new-class images over the new classes), ``HM``.
    All values are fractions in [0, 1] (None where undefined).
    """
    from . import metrics as M

    scores = scores.float()
    if multi_label:
        out: Dict[str, Any] = {"mAP": M.mean_average_precision(scores, targets)}
        out.update(M.multilabel_scores(scores, targets, 0.5, from_logits=True))
        if train_counts is not None:
            g = M.group_mean_average_precision(scores, targets, list(train_counts))
            out.update({k: _finite(g[k]) for k in ("head", "medium", "tail")})
        return out
    out = {"accuracy": M.accuracy(scores, targets)}
    C = scores.shape[1]
    if num_base is not None and 0 < num_base < C:
        base = targets < num_base
        b = M.accuracy(scores[base][:, :num_base], targets[base]) if bool(base.any()) else float("nan")
        n = M.accuracy(scores[~base][:, num_base:], targets[~base] - num_base) if bool((~base).any()) else float("nan")
        out.update({"base": _finite(b), "new": _finite(n),
                    "HM": _finite(M.harmonic_mean(b, n)) if math.isfinite(b) and math.isfinite(n) else None})
    return out


@torch.no_grad()
def _predict(model: nn.Module, loader, d: _Dist, amp: str, progress: bool,
             desc: str) -> Tuple[torch.Tensor, torch.Tensor]:
    """Scores and targets of the loader's shard, gathered over all processes, in dataset order."""
    from tqdm.auto import tqdm

    was = model.training
    model.eval()
    idx_all, s_all, t_all = [], [], []
    pos = 0
    order = loader.sampler.idx
    for x, y in tqdm(loader, desc=desc, disable=not progress, leave=False, dynamic_ncols=True):
        x = x.to(d.device, non_blocking=True)
        with _autocast(d.device, amp):
            s = model(x)
        idx_all.append(torch.tensor(order[pos:pos + x.shape[0]], dtype=torch.int64))
        pos += x.shape[0]
        s_all.append(s.float().cpu())
        t_all.append(y.cpu())
    model.train(was)
    idx = torch.cat(idx_all) if idx_all else torch.zeros(0, dtype=torch.int64)
    scores = torch.cat(s_all) if s_all else torch.zeros(0)
    targets = torch.cat(t_all) if t_all else torch.zeros(0)
    if d.world > 1:
        dev = d.device
        idx = gather_rows(idx.to(dev)).cpu()
        scores = gather_rows(scores.to(dev)).cpu()
        targets = gather_rows(targets.to(dev)).cpu()
    order_ = torch.argsort(idx)
    return scores[order_], targets[order_]


def _autocast(device: torch.device, amp: str):
    if amp == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return nullcontext()


def _loader(ds, batch: int, d: _Dist, workers: int, *, train: bool, seed: int = 0, epoch: int = 0):
    if train:
        sampler = torch.utils.data.DistributedSampler(ds, num_replicas=d.world, rank=d.rank, shuffle=True,
                                                      seed=seed, drop_last=True)
        sampler.set_epoch(epoch)
    else:
        sampler = _Shard(len(ds), d.rank, d.world)
    g = torch.Generator()
    g.manual_seed(seed * 100_003 + epoch)  # workers' seeds (augmentation) per (seed, epoch)
    return torch.utils.data.DataLoader(ds, batch_size=batch, sampler=sampler, num_workers=workers,
                                       pin_memory=d.device.type == "cuda", drop_last=train, generator=g,
                                       persistent_workers=False)


def _evaluate_models(models: Dict[str, nn.Module], val_ds, d: _Dist, args, batch: int, train_counts,
                     progress: bool) -> Dict[str, Any]:
    loader = _loader(val_ds, batch, d, args.workers, train=False)
    out: Dict[str, Any] = {}
    for name, m in models.items():
        scores, targets = _predict(m, loader, d, args.amp, progress, f"eval {name}")
        r = compute_metrics(scores, targets, val_ds.multi_label, train_counts, getattr(val_ds, "num_base", None))
        if name == "model":
            out.update(r)
        else:
            out[name] = r
    return out


# ----------------------------------------------------------------------------------------------
# training
# ----------------------------------------------------------------------------------------------

def _datasets(args, p, image_size: int):
    from .data import datasets_from_args

    try:
        return datasets_from_args(args, image_size)
    except (ValueError, FileNotFoundError) as e:
        p.error(str(e))
    except ImportError as e:  # the demo needs scikit-learn, the transforms torchvision
        p.error(f"--data {args.data}: {e} (pip install \"vlssm[train]\")")


def _resolved_image_size(args) -> int:
    if args.image_size is not None:
        return args.image_size
    from .models._registry import _REGISTRY

    return _REGISTRY[args.model].config_cls().image_size if "image_size" in _config_fields(args.model) else 224


def _frozen_features(model, train_ds, val_ds, args, d: _Dist, out_dir: str, progress: bool):
    """Candle: encode both splits once with the frozen image encoder (cached in DIR/features-*.pt)."""
    from .data import cache_features

    key = json.dumps({"backbone": model.config.backbone, "image_size": model.config.image_size,
                      "clip_checkpoint": model.config.clip_checkpoint,
                      "weights": float(sum(float(p.double().sum()) for p in model.backbone.parameters()))})
    feats = []
    for split, ds in (("train", train_ds), ("val", val_ds)):
        ds.transform = val_ds.transform  # no augmentation under a cache
        if not d.main:  # rank 0 encodes and writes the file first; the others then read it
            _barrier(d)
        feats.append(cache_features(model.encode_images, ds, path=os.path.join(out_dir, f"features-{split}.pt"),
                                    key=f"{key}|{ds.describe()}", batch_size=64, num_workers=args.workers,
                                    device=d.device, desc=f"encoding {split}"))
        if d.main:
            _barrier(d)
    return feats


def run_train(args, p: argparse.ArgumentParser) -> int:
    """``vlssm train``: parse-checked ``args`` -> exit status."""
    from tqdm.auto import tqdm

    try:
        d = _setup_processes(args.device)
    except ValueError as e:
        p.error(str(e))
    progress = d.main and not args.no_progress
    world_batch = d.world * args.accum_steps
    if args.batch_size % world_batch:
        p.error(f"--batch-size {args.batch_size} is not divisible by world_size x accum_steps = "
                f"{d.world} x {args.accum_steps}")
    micro = args.batch_size // world_batch
    out_dir = args.out
    last = os.path.join(out_dir, "last.pt")
    if d.main:
        os.makedirs(out_dir, exist_ok=True)
    _barrier(d)
    if os.path.exists(last) and not args.resume:
        p.error(f"{out_dir!r} already holds a checkpoint (last.pt): pass --resume to continue it, or another --out")
    if args.tensorboard and d.main:
        try:
            importlib.import_module("torch.utils.tensorboard")
        except ImportError:
            p.error("--tensorboard needs the tensorboard package (pip install tensorboard)")

    image_size = _resolved_image_size(args)
    train_ds, val_ds = _datasets(args, p, image_size)
    if d.main:
        print(f"data: train {train_ds.describe()}; val {val_ds.describe()}", flush=True)
        for ds in (train_ds, val_ds):
            if getattr(ds, "bad_items", None):
                print(f"skipped {len(ds.bad_items)} bad item(s) of {ds.describe()}", flush=True)
    sets = _parse_sets(args.set, p)
    torch.manual_seed(args.seed)  # the initial weights
    model = _build_model(args, train_ds.classnames, _model_overrides(args, train_ds, sets), p)
    model_config = _jsonable(dataclasses.asdict(model.config))
    model.to(d.device)
    if args.model == "candle":
        train_ds, val_ds = _frozen_features(model, train_ds, val_ds, args, d, out_dir, progress)
        model.set_base_prototypes(train_ds.features.to(d.device), train_ds.labels().to(d.device))
    train_counts = list(train_ds.class_counts())

    params = [q for q in model.parameters() if q.requires_grad]
    decay = [q for q in params if q.dim() >= 2]
    no_decay = [q for q in params if q.dim() < 2]  # biases, norms, scalars: no weight decay (the usual rule)
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=args.lr)
    n_batches = len(train_ds) // args.batch_size
    if n_batches == 0:
        p.error(f"the training split has {len(train_ds)} items, fewer than one batch of {args.batch_size}")
    steps_per_epoch = n_batches if args.steps_per_epoch is None else min(n_batches, args.steps_per_epoch)
    total = steps_per_epoch * args.epochs
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, _lr_lambda(total, int(round(args.warmup_epochs * steps_per_epoch)), args.min_lr_ratio))
    ema = _ema(model, args.ema_decay) if args.ema_decay > 0 else None

    start_epoch, step = 0, 0
    config = _jsonable(vars(args))
    config["world_size"] = d.world
    if args.resume and os.path.exists(last):
        try:
            ck = _read_train_checkpoint(last)
            _check_same_model(ck, last, args.model, train_ds.classnames, model_config)
        except ValueError as e:
            p.error(str(e))
        changed = sorted(k for k in set(ck["config"]) | set(config) if k not in _RESUME_FREE | {"world_size"}
                         and ck["config"].get(k) != config.get(k))
        if changed:
            p.error(f"--resume: {last!r} was trained with other settings: "
                    + "; ".join(f"{k}: {ck['config'].get(k)!r} -> {config.get(k)!r}" for k in changed))
        model.load_state_dict(ck["model"])
        opt.load_state_dict(ck["optimizer"])
        sched.load_state_dict(ck["scheduler"])
        if ema is not None:
            ema.load_state_dict(ck["ema"])
        start_epoch, step = int(ck["epoch"]), int(ck["step"])
        if d.main:
            print(f"resumed from {last}: epoch {start_epoch}, step {step}", flush=True)
    elif args.resume and d.main:
        print(f"--resume: no checkpoint in {out_dir!r} yet; starting anew", flush=True)
    if d.main:
        with open(os.path.join(out_dir, "config.json"), "w") as f:
            json.dump({**config, "model_config": model_config}, f, indent=2)

    net: nn.Module = model
    if d.world > 1:
        net = nn.parallel.DistributedDataParallel(model, device_ids=[d.device.index] if d.device.type == "cuda"
                                                  else None)
    if args.compile:
        net = torch.compile(net)
    writer = None
    if args.tensorboard and d.main:
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(os.path.join(out_dir, "tb"))
    eval_batch = args.eval_batch_size or micro
    if d.main:
        n_train = sum(q.numel() for q in params)
        print(f"{args.model}: {sum(q.numel() for q in model.parameters()):,} parameters, {n_train:,} trainable; "
              f"{d.world} process(es) on {d.device}, global batch {args.batch_size} = {d.world} x "
              f"{args.accum_steps} x {micro}; {steps_per_epoch} steps/epoch, {args.epochs} epochs", flush=True)

    for epoch in range(start_epoch, args.epochs):
        torch.manual_seed(args.seed * 1_000_003 + epoch * 1009 + d.rank)  # dropout etc. of this epoch
        loader = _loader(train_ds, micro, d, args.workers, train=True, seed=args.seed, epoch=epoch)
        net.train()
        it = iter(loader)
        bar = tqdm(range(steps_per_epoch), desc=f"epoch {epoch + 1}/{args.epochs}", disable=not progress,
                   dynamic_ncols=True)
        t0, seen, loss_sum = time.perf_counter(), 0, torch.zeros((), device=d.device)
        for s in bar:
            opt.zero_grad(set_to_none=True)
            for a in range(args.accum_steps):
                x, y = next(it)
                x = x.to(d.device, non_blocking=True)
                y = y.to(d.device, non_blocking=True)
                if y.is_floating_point():
                    y = y.clamp_min(0)  # VOC's "ignore" (-1) entries train as negatives (the loss has no mask)
                sync = nullcontext() if (a == args.accum_steps - 1 or d.world == 1) else net.no_sync()
                with sync:
                    with _autocast(d.device, args.amp):
                        loss = net(x, y).loss / args.accum_steps
                    loss.backward()
                loss_sum += loss.detach()
                seen += x.shape[0]
            if args.clip_grad is not None:
                torch.nn.utils.clip_grad_norm_(params, args.clip_grad)
            opt.step()
            sched.step()
            if ema is not None:
                ema.update_parameters(model)
            step += 1
            if progress and (s + 1) % args.log_every == 0:
                bar.set_postfix(loss=f"{float(loss_sum) / (s + 1):.4f}", lr=f"{sched.get_last_lr()[0]:.2e}")
            if writer is not None and (s + 1) % args.log_every == 0:
                writer.add_scalar("train/loss", float(loss_sum) / (s + 1), step)
                writer.add_scalar("train/lr", sched.get_last_lr()[0], step)
        bar.close()
        dt = time.perf_counter() - t0
        mean_loss = float(loss_sum) / steps_per_epoch
        if d.world > 1:
            lt = torch.tensor([mean_loss], device=d.device)
            dist.all_reduce(lt)
            mean_loss = float(lt) / d.world
        record: Dict[str, Any] = {"epoch": epoch + 1, "step": step, "loss": mean_loss,
                                  "lr": sched.get_last_lr()[0], "images_per_s": seen * d.world / dt}
        if (epoch + 1) % args.eval_every == 0 or epoch + 1 == args.epochs:
            models = {"model": model}
            if ema is not None:
                models["ema"] = ema.module
            record.update(_evaluate_models(models, val_ds, d, args, eval_batch, train_counts, progress))
        if d.main:
            ck = {"format": TRAIN_FORMAT, "model_name": args.model, "classnames": list(train_ds.classnames),
                  "model_config": model_config, "config": config, "model": model.state_dict(),
                  "ema": ema.state_dict() if ema is not None else None, "optimizer": opt.state_dict(),
                  "scheduler": sched.state_dict(), "epoch": epoch + 1, "step": step, "metrics": record}
            _atomic_save(ck, last)
            if "mAP" in record or "accuracy" in record:
                with open(os.path.join(out_dir, "metrics.jsonl"), "a") as f:
                    f.write(json.dumps(record) + "\n")
            print(_format_record(record), flush=True)
            if writer is not None:
                for k, v in _flat(record).items():
                    if isinstance(v, (int, float)) and k not in ("epoch", "step"):
                        writer.add_scalar(f"epoch/{k}", v, step)
        _barrier(d)
    if writer is not None:
        writer.close()
    if d.world > 1:
        dist.destroy_process_group()
    return 0


def _flat(r: Dict[str, Any], prefix: str = "") -> Dict[str, Any]:
    out = {}
    for k, v in r.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}/"))
        else:
            out[prefix + k] = v
    return out


def _format_record(r: Dict[str, Any]) -> str:
    def fmt(k, v):
        if v is None:
            return f"{k} -"
        if isinstance(v, float) and k not in ("loss", "lr", "images_per_s"):
            return f"{k} {100 * v:.2f}"
        if k == "lr":
            return f"{k} {v:.2e}"
        if isinstance(v, float):
            return f"{k} {v:.4g}"
        return f"{k} {v}"

    parts = [fmt(k, v) for k, v in r.items() if not isinstance(v, dict)]
    for k, v in r.items():
        if isinstance(v, dict):
            parts.append(f"| {k}: " + " ".join(fmt(kk, vv) for kk, vv in v.items()))
    return " ".join(parts)


# ----------------------------------------------------------------------------------------------
# evaluation command
# ----------------------------------------------------------------------------------------------

def run_eval(args, p: argparse.ArgumentParser, ck: Optional[dict] = None) -> int:
    """``vlssm eval``: the metrics of a training checkpoint's model and EMA on the validation split.
    ``ck``: the checkpoint ``args.checkpoint`` already read (:func:`parse_eval_args` reads it), or None."""
    from .models import create_model

    if ck is None:
        try:
            ck = _read_train_checkpoint(args.checkpoint)
        except ValueError as e:
            p.error(str(e))
    if ck["model_name"] != args.model:
        p.error(f"{args.checkpoint!r} is a checkpoint of model {ck['model_name']!r}, not {args.model!r}")
    try:
        d = _setup_processes(args.device)
    except ValueError as e:
        p.error(str(e))
    saved = ck["config"]
    cfg = dict(ck["model_config"])
    if args.backend is not None and "backend" in cfg:
        cfg["backend"] = args.backend
    image_size = cfg.get("image_size") or _resolved_image_size(args)
    train_ds, val_ds = _datasets(args, p, image_size)
    try:
        _check_same_model(ck, args.checkpoint, args.model, val_ds.classnames)
    except ValueError as e:
        p.error(str(e))
    try:
        model = create_model(args.model, list(ck["classnames"]), **cfg)
    except (TypeError, ValueError, ImportError) as e:
        p.error(f"building {args.model} from {args.checkpoint!r}: {e}")
    model.load_state_dict(ck["model"])
    progress = d.main and not args.no_progress
    model.to(d.device)
    if args.model == "candle":
        train_ds, val_ds = _frozen_features(model, train_ds, val_ds, args, d, os.path.dirname(
            os.path.abspath(args.checkpoint)), progress)
    models: Dict[str, nn.Module] = {}
    if args.weights in ("both", "model"):
        models["model"] = model
    if args.weights in ("both", "ema"):
        if ck.get("ema") is None:
            if args.weights == "ema":
                p.error(f"{args.checkpoint!r} has no EMA (trained with --ema-decay 0)")
        else:
            ema = _ema(model, 0.5)
            ema.load_state_dict(ck["ema"])
            models["ema"] = ema.module
    # the training run's per-process batch (Candle's scores depend on the batch: its images share one
    # attention sequence)
    batch = args.eval_batch_size or saved.get("eval_batch_size") or max(1, int(saved["batch_size"]) // (
        int(saved.get("world_size", 1)) * int(saved.get("accum_steps", 1))))
    res = _evaluate_models(models, val_ds, d, args, batch, list(train_ds.class_counts()), progress)
    if "model" not in models:  # EMA only: its metrics at the top level
        res = res.pop("ema")
    res = {"checkpoint": os.path.abspath(args.checkpoint), "epoch": ck["epoch"], "step": ck["step"],
           "data": val_ds.describe(), **res}
    if d.main:
        print(_format_record(res), flush=True)
        if args.json == "-":
            print(json.dumps(res))
        elif args.json:
            with open(args.json, "w") as f:
                json.dump(res, f, indent=2)
    if d.world > 1:
        dist.destroy_process_group()
    return 0


# ----------------------------------------------------------------------------------------------

def parse_eval_args(p: argparse.ArgumentParser, argv: Optional[Sequence[str]]) -> Tuple[argparse.Namespace, dict]:
    """Parse ``vlssm eval`` arguments: ``(args, the checkpoint read)``; the data options default to those
    the checkpoint was trained with."""
    from .data import add_data_arguments

    first, _ = p.parse_known_args(argv)
    try:
        ck = _read_train_checkpoint(first.checkpoint)
    except ValueError as e:
        p.error(f"--checkpoint: {e}")
    probe = argparse.ArgumentParser(add_help=False)
    add_data_arguments(probe)
    data_keys = {a.dest for a in probe._actions if a.option_strings}
    p.set_defaults(**{k: v for k, v in ck["config"].items() if k in data_keys})
    return p.parse_args(argv), ck


def build_parser(prog: str = "python -m vlssm.train") -> argparse.ArgumentParser:
    """The ``vlssm train`` options."""
    p = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    add_train_arguments(p)
    return p


def build_eval_parser(prog: str = "vlssm eval") -> argparse.ArgumentParser:
    """The ``vlssm eval`` options."""
    p = argparse.ArgumentParser(prog=prog, description="Evaluate a vlssm train checkpoint (model and EMA).")
    add_eval_arguments(p)
    return p


def train(argv: Optional[Sequence[str]] = None, prog: str = "python -m vlssm.train") -> int:
    """``vlssm train`` with the arguments ``argv`` (default: sys.argv[1:]); returns the exit status."""
    p = build_parser(prog)
    return run_train(parse_train_args(p, argv), p)


def evaluate(argv: Optional[Sequence[str]] = None, prog: str = "vlssm eval") -> int:
    """``vlssm eval`` with the arguments ``argv``; returns the exit status."""
    p = build_eval_parser(prog)
    args, ck = parse_eval_args(p, argv)
    return run_eval(args, p, ck)


def main(argv: Optional[Sequence[str]] = None) -> int:
    return train(argv)


if __name__ == "__main__":
    sys.exit(main())
