"""The model registry and factory: ``register_model``, ``list_models``, ``create_model``.

In the manner of timm's ``create_model`` and open_clip's factory: each family
file (``mvlr.py``, ...) registers its variants with :func:`register_model`;
:func:`create_model` builds one by name from the class names, an open_clip
backbone name, an image size and config overrides, and loads ``pretrained``
(a local file) when given. Nothing is downloaded.

A vlssm checkpoint (:func:`save_checkpoint`) records the model name, its class
names and its config beside the state_dict, so loading it into another model or
another class list fails with a ValueError instead of a shape error or, worse,
silently wrong labels.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any, Callable, Dict, List, NamedTuple, Optional, Sequence

import torch
import torch.nn as nn

__all__ = ["ModelOutput", "register_model", "list_models", "create_model", "save_checkpoint",
           "load_checkpoint", "check_classnames", "CHECKPOINT_FORMAT"]

#: the ``format`` field of a vlssm model checkpoint
CHECKPOINT_FORMAT = "vlssm-model-1"


class ModelOutput(NamedTuple):
    """What ``model(images, targets)`` returns (a NamedTuple: torch.compile and pytrees see through it).

    Fields:
        logits: (B, C) class scores before the sigmoid / softmax.
        loss: 0-dim training objective (the paper's), or None without targets.
        aux: named terms of the loss and other by-products (0-dim tensors or tensors), e.g.
            ``{"cls": ..., "kcr": ...}``.
    """

    logits: torch.Tensor
    loss: Optional[torch.Tensor]
    aux: Dict[str, torch.Tensor]


class _Entry(NamedTuple):
    builder: Callable[..., nn.Module]
    config_cls: type
    doc: str


_REGISTRY: Dict[str, _Entry] = {}


def register_model(name: str, config_cls: type, doc: str = "") -> Callable:
    """Decorator registering ``builder(classnames, config) -> nn.Module`` under ``name``.

    ``config_cls`` is the family's config dataclass; its defaults are the paper's
    settings of this variant.
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"model name must be a non-empty str, got {name!r}")
    if not dataclasses.is_dataclass(config_cls):
        raise TypeError(f"config_cls must be a dataclass, got {config_cls!r}")

    def wrap(builder: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if name in _REGISTRY:
            raise ValueError(f"model {name!r} is already registered")
        _REGISTRY[name] = _Entry(builder, config_cls, doc or (builder.__doc__ or "").strip().split("\n")[0])
        return builder

    return wrap


def list_models() -> List[str]:
    """The registered model names, sorted."""
    return sorted(_REGISTRY)


def check_classnames(classnames: Any) -> List[str]:
    """``classnames`` as a list of non-empty, distinct strings; TypeError / ValueError naming it otherwise."""
    if isinstance(classnames, (str, bytes)) or not isinstance(classnames, Sequence):
        raise TypeError(f"classnames must be a list or tuple of str, got {type(classnames).__name__}")
    names = list(classnames)
    if not names:
        raise ValueError("classnames must not be empty")
    for i, n in enumerate(names):
        if not isinstance(n, str):
            raise TypeError(f"classnames[{i}] must be a str, got {type(n).__name__}")
        if not n.strip():
            raise ValueError(f"classnames[{i}] is empty")
    seen: Dict[str, int] = {}
    for i, n in enumerate(names):
        key = n.replace("_", " ").strip().lower()
        if key in seen:
            raise ValueError(f"classnames has a duplicate: [{seen[key]}] {names[seen[key]]!r} and [{i}] {n!r}")
        seen[key] = i
    return names


def _config(name: str, entry: _Entry, overrides: Dict[str, Any]):
    fields = {f.name for f in dataclasses.fields(entry.config_cls)}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise TypeError(f"{name}: unknown config field(s) {unknown}; {entry.config_cls.__name__} has {sorted(fields)}")
    return entry.config_cls(**overrides)


def _read_checkpoint(path: str) -> Optional[dict]:
    """The vlssm checkpoint dict at ``path``, or None when the file is not one (e.g. open_clip's)."""
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # a TorchScript archive (OpenAI's CLIP files) or another format: not ours
        return None
    if isinstance(obj, dict) and obj.get("format") == CHECKPOINT_FORMAT:
        return obj
    return None


def create_model(name: str, classnames: Sequence[str], backbone: Optional[str] = None,
                 image_size: Optional[int] = None, pretrained: Optional[str] = None, **cfg) -> nn.Module:
    """Build a registered model.

    Args:
        name: one of :func:`list_models` (``"mvlr"``, ``"mvlr_baseline"``, ...).
        classnames: the C class names, in label order (distinct, non-empty).
        backbone: an open_clip model name (``"RN50"``, ``"RN101"``, ``"ViT-B-16"``, ...);
            default: the family config's (the paper's).
        image_size: input side S; default: the family config's.
        pretrained: None (random weights; nothing is downloaded) or a local file:
            a vlssm checkpoint of this model and class list (:func:`save_checkpoint`), loaded
            whole; or an open_clip / OpenAI CLIP checkpoint, loaded into the CLIP encoders.
        **cfg: fields of the family's config dataclass to override.

    Returns:
        the model, in training mode, on the CPU in float32 (move it as any module).
    """
    if name not in _REGISTRY:
        raise ValueError(f"unknown model {name!r}; registered: {list_models()}")
    entry = _REGISTRY[name]
    names = check_classnames(classnames)
    ckpt = None
    if pretrained is not None:
        if not isinstance(pretrained, (str, os.PathLike)):
            raise TypeError(f"pretrained must be a local file path or None, got {type(pretrained).__name__}")
        if not os.path.isfile(pretrained):
            raise ValueError(f"pretrained file not found: {os.fspath(pretrained)!r} (nothing is downloaded)")
        ckpt = _read_checkpoint(os.fspath(pretrained))
    if backbone is not None:
        cfg["backbone"] = backbone
    if image_size is not None:
        cfg["image_size"] = image_size
    if ckpt is not None:
        _check_checkpoint(ckpt, name, names, os.fspath(pretrained))
        saved = dict(ckpt.get("config", {}))
        saved.update(cfg)  # explicit arguments win (e.g. another backend)
        cfg = saved
    elif pretrained is not None:
        cfg["clip_checkpoint"] = os.fspath(pretrained)
    config = _config(name, entry, cfg)
    model = entry.builder(names, config)
    model.model_name = name
    if ckpt is not None:
        model.load_state_dict(ckpt["state_dict"])
    return model


def _check_checkpoint(ckpt: dict, name: str, classnames: List[str], path: str, what: str = "pretrained") -> None:
    """ValueError unless checkpoint ``ckpt`` (its ``model`` and ``classnames``) is of model ``name`` and
    these classnames; ``what`` names the file in the message (vlssm.train's checkpoints use it too)."""
    if ckpt.get("model") != name:
        raise ValueError(f"{what} {path!r} is a checkpoint of model {ckpt.get('model')!r}, not {name!r}")
    saved = list(ckpt.get("classnames", []))
    if saved != classnames:
        if len(saved) != len(classnames):
            raise ValueError(f"{what} {path!r} has {len(saved)} classes, classnames has {len(classnames)}")
        i = next(i for i, (a, b) in enumerate(zip(saved, classnames)) if a != b)
        raise ValueError(f"{what} {path!r} was trained on other classnames: [{i}] {saved[i]!r} != {classnames[i]!r}")


def save_checkpoint(model: nn.Module, path: str, **extra) -> None:
    """Write ``model`` (built by :func:`create_model`) as a vlssm checkpoint that
    ``create_model(name, classnames, pretrained=path)`` loads; atomically (a temporary file, then a rename).
    ``extra`` entries (plain data) are stored beside it."""
    name = getattr(model, "model_name", None)
    if name not in _REGISTRY:
        raise ValueError("save_checkpoint: model was not built by vlssm.models.create_model (no model_name)")
    obj = {"format": CHECKPOINT_FORMAT, "model": name, "classnames": list(model.classnames),
           "config": dataclasses.asdict(model.config), "state_dict": model.state_dict(), **extra}
    path = os.fspath(path)
    tmp = f"{path}.tmp{os.getpid()}"
    torch.save(obj, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: str) -> dict:
    """The contents of a vlssm checkpoint (``format``, ``model``, ``classnames``, ``config``,
    ``state_dict``, extras); ValueError when ``path`` is not one."""
    ckpt = _read_checkpoint(os.fspath(path))
    if ckpt is None:
        raise ValueError(f"{os.fspath(path)!r} is not a vlssm model checkpoint")
    return ckpt
