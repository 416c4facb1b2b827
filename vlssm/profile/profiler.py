"""``vlssm profile MODEL``: whole-model FLOPs, parameters, latency and peak memory, by part.

    vlssm profile mvlr --backbone RN101 --image-size 448 --num-classes 80 --no-timing
    vlssm profile mvlr_baseline --backbone RN101 --image-size 448 --json
    vlssm profile qmvl --d 512 --batch 1,8,32          # one layer, M from the backbone at that size

MODEL is a registered model (:func:`vlssm.models.list_models`, built with random weights by
:func:`vlssm.models.create_model` on COCO's first C class names, :func:`vlssm.data.coco.coco_classnames`)
or one of the layers ``qmvl`` (:class:`vlssm.QMVL`), ``ifm`` (:class:`vlssm.IFM`), ``self-attn`` and
``cross-attn`` (:class:`vlssm.modules.baselines.SDPASelfBlock` / ``SDPACrossBlock``: pre-norm transformer
blocks, attention + MLP of ratio 4), run on visual tokens (B, M, d) and label tokens (B, C, d) with
d = ``--d`` and M the backbone's token count at ``--image-size`` ((S / 32)^2 for ResNets, (S / patch)^2
for ViTs).

What is measured (the columns of the MVLR paper's Table 9):

* FLOPs: ``torch.utils.flop_counter.FlopCounterMode`` with the formulas of vlssm's custom ops
  (:mod:`vlssm.ops.flops`; the label side through :func:`vlssm.profile.flops.count_flops`) over one
  eval-mode forward under ``torch.no_grad``. Reported both as
  ``gflops`` (torch's convention: a multiply-add is 2 FLOPs) and ``gmacs`` = gflops / 2 (multiply-adds:
  what fvcore, thop and the papers call "FLOPs"). Biases, norms, activations and other elementwise ops
  count 0 (torch's formulas).
* The label side is cached: the papers exclude the text encoder, since inference reuses the label
  embeddings (MVLR's PDLR caches T^soft in eval mode, IFM its label attention, CAPNET its GCN output;
  the Baseline and Candle keep them as buffers). The label side is counted on its own, once, with the
  caches emptied (part ``text``, and what IFM / the GCN compute from the labels alone); then the
  inference totals count the forward with the caches filled. A part whose only cost is that one-off
  computation (``text``; CAPNET's ``gcn``) has ``in_total: false`` and reports the one-off cost; a part
  with both (MVLR's ``ifm``) reports its per-forward cost and the one-off cost as ``once_gmacs``.
  The Baseline and Candle hold no text encoder (params 0); their ``text`` cost is that of encoding
  their prompts with the backbone's text tower, counted on the meta device.
* Parts: the model's top-level submodules (``backbone``; ``pdlr`` as ``text``; ``ifm``, ``qmvl``,
  ``gcn``, ``fusion``, ...), CAPNET's adapters (inside the backbone) as ``adapters``, and ``head``:
  the model's own parameters (``logit_scale``, ``ifm_gate``, projections) and everything its
  ``forward`` computes outside the submodules (the cosine logits). Each op's FLOPs go to the part of
  the innermost module on the Python call stack (whatever method runs, so QMVL's ``fork`` counts as its
  blocks), else to the one part whose parameters it reads, else to ``head``; parameters go by name.
  ``params`` = ``sum(p.numel())`` over the parameters (buffers excluded), trainable = requires_grad,
  ``used_params`` = the parameters the (cached) inference forward reads (MVLR does not read CLIP's
  attention-pool query / key projections, nor, with the caches filled, the text encoder).
* Latency: in a fresh subprocess (:func:`vlssm.bench._harness.run_isolated`, this module's
  :func:`bench_provider`): the model built again, one priming forward (fills the caches), ``--warmup``
  untimed forwards, then ``--reps`` timed ones: median, min, max and IQR (host clock around a
  synchronised call on CPU, CUDA events on GPU; ``--cuda-graphs`` replays a captured graph,
  ``--compile`` runs ``torch.compile(model)``). Per-part times: forward pre/post hooks on the parts'
  modules (and a wrapper of ``MambaBlock.fork``), synchronised on CUDA, over separate, hooked forwards
  (eager only); the rest of the forward's time goes to ``head``. Code a model runs on a part's weights
  outside that part's forward (IFM's functional first MLP layer) is timed in the caller's part.
* Peak memory (same subprocess): on CUDA ``torch.cuda.max_memory_allocated`` (weights included); on
  CPU the peak RSS increase of the timed forwards over the built, primed model (the freed heap given
  back first with glibc's ``malloc_trim``; VmHWM reset where /proc allows), with the absolute peak RSS
  (construction and the label side included) beside it.

Output: a text table (default), ``--json`` (one JSON object; with several ``--batch`` values an object
``{"runs": [...]}`` of one profile per batch), ``--csv PATH`` (one row per part and a ``total`` row per
batch). Bad arguments exit 2 naming the flag; a run that fails (out of memory, ...) is reported with its
configuration, the next batch size is tried, and the exit status is 1.
"""
from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import math
import statistics
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from .._argtypes import nonneg_int, positive_int
from ..bench import _harness as H

__all__ = ["LAYERS", "build_parser", "main", "profile", "bench_provider"]

#: the layers ``vlssm profile`` takes besides the registered models
LAYERS = ("qmvl", "ifm", "self-attn", "cross-attn")

#: defaults of the layers' backbone and image size (MVLR's), which give M
_LAYER_BACKBONE, _LAYER_IMAGE_SIZE, _LAYER_D = "RN101", 448, 512

_MB = 2 ** 20


# ----------------------------------------------------------------------------- arguments

def build_parser(prog: str = "vlssm profile") -> argparse.ArgumentParser:
    """The ``vlssm profile`` options (MODEL is validated in :func:`main`, against the registry)."""
    p = argparse.ArgumentParser(
        prog=prog,
        description="Whole-model (or one layer's) FLOPs / MACs, parameters, latency and peak memory, by part, "
                    "with the label embeddings cached as at inference (the text encoder reported apart).",
        epilog="GMACs = 1e9 multiply-adds (the 'FLOPs' of fvcore, thop and the papers); GFLOPs = 2 x GMACs "
               "(torch.utils.flop_counter's convention).")
    p.add_argument("model", metavar="MODEL",
                   help=f"a registered model (vlssm.models.list_models()) or a layer: {', '.join(LAYERS)}")
    g = p.add_argument_group("configuration")
    g.add_argument("--backbone", default=None,
                   help="open_clip backbone (default: the model's own; RN101 for the layers, which take M from it)")
    g.add_argument("--image-size", type=positive_int, default=None,
                   help="image side S (default: the model's own; 448 for the layers)")
    g.add_argument("--num-classes", type=positive_int, default=80,
                   help="classes C (COCO's first C names, then 'class k'; default 80)")
    g.add_argument("--batch", type=H.int_list, default=[1],
                   help="batch size, or a comma list (one profile each; default 1)")
    g.add_argument("--d", type=positive_int, default=None,
                   help=f"layers only: token width d (default {_LAYER_D}); a model's width is its backbone's")
    g.add_argument("--heads", type=positive_int, default=None,
                   help="layers only: attention heads (ifm default 1, MVLR's; self-attn / cross-attn default "
                        "d // 64); must divide --d")
    g.add_argument("--seed", type=int, default=0, help="seed of the random weights and inputs (default 0)")
    r = p.add_argument_group("run")
    r.add_argument("--dtype", choices=H.DTYPES, default="float32", help="parameter and input dtype (default float32)")
    r.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="device (default cpu)")
    r.add_argument("--no-timing", dest="timing", action="store_false",
                   help="count FLOPs and parameters only: no latency, no memory")
    r.add_argument("--reps", type=positive_int, default=10, help="timed forwards (default 10)")
    r.add_argument("--warmup", type=nonneg_int, default=2, help="untimed forwards before them (default 2)")
    r.add_argument("--compile", action="store_true", help="time torch.compile(model) (FLOPs are counted eagerly)")
    r.add_argument("--cuda-graphs", action="store_true", help="time a CUDA-graph replay of the forward (cuda only)")
    r.add_argument("--threads", type=positive_int, default=None, help="torch intra-op threads (default: torch's)")
    o = p.add_argument_group("output")
    o.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    o.add_argument("--csv", metavar="PATH", default=None,
                   help="also write a CSV: one row per part and a 'total' row (per batch size)")
    return p


def _arg_error(p: argparse.ArgumentParser, flag: str, msg: str) -> int:
    """argparse's error format (usage, then ``prog: error: argument FLAG: msg``); returns 2."""
    p.print_usage(sys.stderr)
    print(f"{p.prog}: error: argument {flag}: {msg}", file=sys.stderr)
    return 2


def _model_defaults(name: str) -> Tuple[str, int]:
    """(backbone, image_size) defaults of a registered model's config dataclass."""
    from ..models import _registry

    defaults = {f.name: f.default for f in dataclasses.fields(_registry._REGISTRY[name].config_cls)}
    return defaults["backbone"], defaults["image_size"]


def _validate(p: argparse.ArgumentParser, args: argparse.Namespace) -> Optional[int]:
    """Resolve the defaults and check every flag before anything is built; an exit status (2) on error."""
    from .. import models
    from ..models._clip import _config_kind
    from ..modules.pdlr import _import_open_clip

    choices = list(models.list_models()) + list(LAYERS)
    if args.model not in choices:
        return _arg_error(p, "MODEL", f"invalid choice: {args.model!r} (choose from {', '.join(choices)})")
    args.kind = "layer" if args.model in LAYERS else "model"
    msg = H.check_device(args.device, p.prog)
    if msg:
        p.print_usage(sys.stderr)
        print(msg, file=sys.stderr)
        return 2
    if args.cuda_graphs and args.device != "cuda":
        return _arg_error(p, "--cuda-graphs", "needs --device cuda")
    if args.kind == "model":
        for flag, v in (("--d", args.d), ("--heads", args.heads)):
            if v is not None:
                return _arg_error(p, flag, f"is for the layers ({', '.join(LAYERS)}); model {args.model!r} takes "
                                           "its width from its backbone")
        backbone, size = _model_defaults(args.model)
    else:
        backbone, size = _LAYER_BACKBONE, _LAYER_IMAGE_SIZE
        if args.d is None:
            args.d = _LAYER_D
        if args.model == "qmvl" and args.heads is not None:
            return _arg_error(p, "--heads", "qmvl has no attention heads")
        if args.model == "ifm" and args.heads is None:
            args.heads = 1
        if args.model in ("self-attn", "cross-attn") and args.heads is None:
            from ..modules.baselines import default_heads

            args.heads = default_heads(args.d)
        if args.heads is not None and args.d % args.heads:
            return _arg_error(p, "--d", f"d = {args.d} is not divisible by --heads {args.heads}")
    args.backbone = backbone if args.backbone is None else args.backbone
    args.image_size = size if args.image_size is None else args.image_size
    open_clip = _import_open_clip("vlssm profile")
    if args.backbone not in open_clip.list_models():
        return _arg_error(p, "--backbone", f"unknown open_clip backbone {args.backbone!r}; choose one of "
                                           "open_clip.list_models(), e.g. RN50, RN101, ViT-B-16")
    try:
        kind, stride, _ = _config_kind(open_clip, args.backbone)
    except ValueError as e:
        return _arg_error(p, "--backbone", str(e))
    if args.image_size % stride:
        what = "32 (the ResNet's stride)" if kind == "resnet" else f"{stride} (the ViT's patch size)"
        return _arg_error(p, "--image-size", f"{args.image_size} is not a multiple of {what} for backbone "
                                             f"{args.backbone!r}")
    args.tokens = (args.image_size // stride) ** 2
    args.backbone_config = open_clip.get_model_config(args.backbone)
    return None


# ----------------------------------------------------------------------------- the profiled target

@dataclass
class _Target:
    """A built model or layer, ready to profile.

    module: the nn.Module (eval mode, on the device, in the dtype); inputs: the positional arguments of
    its inference forward (images (B, 3, S, S), or the layer's tokens). part_of: qualified name of a
    part's module -> part. rest: the part of everything outside them. label_steps: (part, fn) pairs
    computing the label side once (with the caches emptied by ``clear``). info: what to report about it.
    """

    module: Any
    inputs: Tuple[Any, ...]
    part_of: Dict[str, str]
    rest: str
    label_steps: List[Tuple[str, Callable[[], Any]]] = field(default_factory=list)
    clear: Callable[[], None] = lambda: None
    info: Dict[str, Any] = field(default_factory=dict)

    def forward(self, module: Any = None) -> Any:
        """One inference forward (through ``module``, e.g. a compiled one, instead of ``self.module``)."""
        return (self.module if module is None else module)(*self.inputs)


def _register_backbone_config(cfg: Dict[str, Any]) -> None:
    """Make ``cfg["backbone"]`` known to open_clip in this process (a subprocess does not inherit
    configs registered at run time, e.g. the tests' tiny ones): its config, through a temporary folder."""
    import os
    import tempfile

    from ..modules.pdlr import _import_open_clip

    open_clip = _import_open_clip("vlssm profile")
    if cfg["backbone"] in open_clip.list_models() or not cfg.get("backbone_config"):
        return
    with tempfile.TemporaryDirectory(prefix="vlssm-profile-") as d:  # read at once: open_clip keeps the config
        with open(os.path.join(d, f"{cfg['backbone']}.json"), "w") as f:
            json.dump(cfg["backbone_config"], f)
        open_clip.add_model_config(d)


def _meta_text_step(backbone: str, prompts: Sequence[str]) -> Callable[[], Any]:
    """Encoding ``prompts`` with ``backbone``'s text tower built on the meta device (shapes only: for
    counting the cost of label embeddings a model keeps as a buffer, without their text tower)."""
    from ..modules.pdlr import _CHUNK, _import_open_clip, _text_source, _TextEncoder

    open_clip = _import_open_clip("vlssm profile")
    with torch.device("meta"):
        clip = open_clip.create_model(backbone, device="meta")
    enc = _TextEncoder(_text_source(clip))
    tokens = open_clip.get_tokenizer(backbone, context_length=enc.context_length)(list(prompts))
    chunks = [t[:, :enc.eos_length(t)].to("meta") for t in tokens.split(_CHUNK)]  # as PDLR's encode

    def run():
        return [enc(enc.embed(t), t) for t in chunks]
    return run


def _clean_names(names: Sequence[str]) -> List[str]:
    return [n.replace("_", " ").strip() for n in names]


def _model_target(cfg: Dict[str, Any]) -> _Target:
    """A registered model on images (B, 3, S, S), its parts and label side."""
    from .. import models
    from ..data.coco import coco_classnames
    from ..models.candle import Candle
    from ..models.capnet import Adapter, CAPNet, ConvAdapter
    from ..models.mvlr import MVLR, MVLRBaseline

    torch.manual_seed(cfg["seed"])
    model = models.create_model(cfg["model"], coco_classnames(cfg["num_classes"]), backbone=cfg["backbone"],
                                image_size=cfg["image_size"])
    dev, dt = torch.device(cfg["device"]), H.torch_dtype(cfg["dtype"])
    model = model.to(device=dev, dtype=dt).eval()
    mk = H.seeded_randn(cfg["seed"] + 1, cfg["device"], cfg["dtype"])
    S = cfg["image_size"]
    images = mk(cfg["batch"], 3, S, S)
    info: Dict[str, Any] = {"tokens": getattr(getattr(model, "backbone", None), "num_tokens", None),
                            "d": getattr(getattr(model, "backbone", None), "out_dim", None)}

    if isinstance(model, Candle):  # needs its base prototypes: random image features of every base class
        nb = model.num_base
        model.set_base_prototypes(mk(nb, model.feature_dim), torch.arange(nb, device=dev))

    part_of: Dict[str, str] = {}
    for name, child in model.named_children():
        if any(True for _ in child.parameters()):
            part_of[name] = "text" if name == "pdlr" else name
    for name, m in model.named_modules():
        if isinstance(m, (Adapter, ConvAdapter)):
            part_of[name] = "adapters"

    steps: List[Tuple[str, Callable[[], Any]]] = []
    clear_fns: List[Callable[[], None]] = []
    pdlr = getattr(model, "pdlr", None)
    if pdlr is not None:
        def clear_pdlr():
            pdlr._soft_cache = None
        clear_fns.append(clear_pdlr)
        steps += [("text", pdlr.soft), ("text", lambda: pdlr.text_encoder.encode(pdlr.hard_tokens))]
    if isinstance(model, MVLR):
        def clear_ifm():
            model.ifm._cache = None
        clear_fns.append(clear_ifm)
        steps.append(("ifm", lambda: model.ifm.label_attention(pdlr.t_hard.to(dt))))
    elif isinstance(model, CAPNet):
        def clear_gcn():
            model._label_cache = None
        clear_fns.append(clear_gcn)
        steps.append(("gcn", model.label_features))
    elif isinstance(model, (MVLRBaseline, Candle)):
        template = model.config.baseline_template if isinstance(model, MVLRBaseline) else model.config.template
        prompts = [template.format(n) for n in _clean_names(model.classnames)]
        steps.append(("text", _meta_text_step(cfg["backbone"], prompts)))
        info["text_note"] = "no text encoder held: label embeddings are a buffer; text cost on the meta device"

    def clear():
        for f in clear_fns:
            f()

    return _Target(model, (images,), part_of, "head", steps, clear, info)


def _layer_target(cfg: Dict[str, Any]) -> _Target:
    """A layer on visual tokens (B, M, d) and label tokens (B, C, d) (IFM: (C, d) hard and soft labels)."""
    from .. import IFM, QMVL
    from ..modules import baselines

    torch.manual_seed(cfg["seed"])
    dev, dt = torch.device(cfg["device"]), H.torch_dtype(cfg["dtype"])
    B, M, C, d, name = cfg["batch"], cfg["tokens"], cfg["num_classes"], cfg["d"], cfg["model"]
    mk = H.seeded_randn(cfg["seed"] + 1, cfg["device"], cfg["dtype"])
    x = mk(B, M, d)
    steps: List[Tuple[str, Callable[[], Any]]] = []
    clear_fns: List[Callable[[], None]] = []
    if name == "qmvl":
        layer = QMVL(d)
        inputs: Tuple[Any, ...] = (x, mk(B, C, d))
    elif name == "ifm":
        layer = IFM(d, heads=cfg["heads"])
        t_hard = mk(C, d)
        inputs = (x, t_hard, mk(C, d))

        def clear_ifm():
            layer._cache = None
        clear_fns.append(clear_ifm)
        steps.append(("label_attn", lambda: layer.label_attention(t_hard)))
    else:
        cls = baselines.SDPASelfBlock if name == "self-attn" else baselines.SDPACrossBlock
        layer = cls(d, cfg["heads"])
        inputs = (x, mk(B, C, d))
    layer = layer.to(device=dev, dtype=dt).eval()
    part_of = {n: n for n, c in layer.named_children() if any(True for _ in c.parameters())}
    info = {"tokens": M, "d": d, "heads": cfg.get("heads"), "layer_class": f"{type(layer).__module__}."
            f"{type(layer).__qualname__}"}
    return _Target(layer, inputs, part_of, "other", steps, lambda: [f() for f in clear_fns], info)


def _build_target(cfg: Dict[str, Any]) -> _Target:
    _register_backbone_config(cfg)
    return _layer_target(cfg) if cfg["kind"] == "layer" else _model_target(cfg)


# ----------------------------------------------------------------------------- attribution

def _part_for(name: str, part_of: Dict[str, str], rest: str) -> str:
    """The part of a qualified module or parameter name: its longest enclosing part module, else ``rest``."""
    best, part = -1, rest
    for m, p in part_of.items():
        if (name == m or name.startswith(m + ".")) and len(m) > best:
            best, part = len(m), p
    return part


def _enclosing(m: str, part_of: Dict[str, str]) -> Optional[str]:
    """The nearest part module strictly enclosing module ``m`` (None: the root)."""
    outer = [k for k in part_of if m.startswith(k + ".")]
    return max(outer, key=len) if outer else None


def _exclusive(inclusive: Dict[str, float], total: float, part_of: Dict[str, str], rest: str) -> Dict[str, float]:
    """Per part: the inclusive times of its modules minus those of the part modules nested in them;
    ``rest`` gets ``total`` minus the outermost part modules."""
    out = {p: 0.0 for p in [*part_of.values(), rest]}
    out[rest] += total
    for m, p in part_of.items():
        v = inclusive.get(m, 0.0)
        out[p] += v
        outer = _enclosing(m, part_of)
        out[rest if outer is None else part_of[outer]] -= v
    return out


def _count(fn: Callable[[], Any]) -> int:
    """FLOPs of ``fn()`` under ``torch.no_grad`` (:func:`vlssm.profile.flops.count_flops`)."""
    from .flops import count_flops

    with torch.no_grad():
        return count_flops(fn).flops


def _storage(t: torch.Tensor) -> int:
    try:
        return t.untyped_storage().data_ptr()
    except (RuntimeError, NotImplementedError):  # pragma: no cover - storage-less tensors
        return 0


class _Attribution(TorchDispatchMode):
    """Attributes each op's FLOPs to a part, on top of a ``FlopCounterMode`` (the counter's increase while
    the op runs), and records the storages ops take (which parameters the forward reads).

    The part of an op: the innermost module on the Python call stack (in any method: ``forward``, QMVL's
    ``fork``, ...) that lies in a part; failing that (code of the root module itself), the part whose
    parameters the op reads when there is exactly one (IFM's functional use of its MLP weights, the
    head's logit scale); else ``rest``.
    """

    def __init__(self, counter: Any, module_part: Dict[int, str], param_part: Dict[int, str], rest: str) -> None:
        super().__init__()
        self.counter, self.module_part, self.param_part, self.rest = counter, module_part, param_part, rest
        self.flops: Dict[str, int] = {}
        self.ptrs: set = set()

    def _stack_part(self) -> Optional[str]:
        f = sys._getframe(2)
        while f is not None:
            obj = f.f_locals.get("self") if "self" in f.f_code.co_varnames else None
            part = self.module_part.get(id(obj)) if obj is not None else None
            if part is not None:
                return part
            f = f.f_back
        return None

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        ptrs = {_storage(a) for a in tree_leaves((args, kwargs)) if isinstance(a, torch.Tensor)}
        self.ptrs |= ptrs
        before = self.counter.get_total_flops()
        out = func(*args, **kwargs)
        delta = self.counter.get_total_flops() - before
        if delta:
            part = self._stack_part()
            if part is None:
                owners = {self.param_part[p] for p in ptrs if p in self.param_part}
                part = owners.pop() if len(owners) == 1 else self.rest
            self.flops[part] = self.flops.get(part, 0) + delta
        return out


def _counts(target: _Target) -> Dict[str, Any]:
    """FLOPs (the label side once, then the cached inference forward) and parameters, by part."""
    from torch.utils.flop_counter import FlopCounterMode

    from ..ops import flops as op_flops

    op_flops.register()  # vlssm's formulas, before the counter snapshots the registry (idempotent)

    target.clear()
    once: Dict[str, int] = {}
    for part, fn in target.label_steps:
        once[part] = once.get(part, 0) + _count(fn)

    module = target.module
    module_part = {id(m): _part_for(n, target.part_of, "") for n, m in module.named_modules()}
    module_part = {k: v for k, v in module_part.items() if v}
    named = list(module.named_parameters())
    param_part = {_storage(p): _part_for(n, target.part_of, target.rest) for n, p in named if p.numel()}
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        with _Attribution(counter, module_part, param_part, target.rest) as attr:
            target.forward()
    total_flops = counter.get_total_flops()
    by_op = {str(k): int(v) for k, v in counter.get_flop_counts().get("Global", {}).items()}

    order = {"backbone": 0, "adapters": 1, "text": 2, target.rest: 9}
    names = sorted(dict.fromkeys([*target.part_of.values(), *once, target.rest]), key=lambda n: order.get(n, 3))
    parts: Dict[str, Dict[str, Any]] = {n: {"params": 0, "trainable_params": 0, "used_params": 0} for n in names}
    for pname, prm in named:
        d = parts[_part_for(pname, target.part_of, target.rest)]
        k = prm.numel()
        d["params"] += k
        d["trainable_params"] += k if prm.requires_grad else 0
        d["used_params"] += k if k and _storage(prm) in attr.ptrs else 0
    for n, d in parts.items():
        f_inf, f_once = attr.flops.get(n, 0), once.get(n, 0)
        d["in_total"] = not (f_inf == 0 and f_once > 0)
        f = f_inf if d["in_total"] else f_once
        d.update(gflops=f / 1e9, gmacs=f / 2e9)
        if d["in_total"] and f_once:
            d.update(once_gflops=f_once / 1e9, once_gmacs=f_once / 2e9)
    if sum(attr.flops.values()) != total_flops:  # pragma: no cover - an op counted outside the attribution
        raise AssertionError(f"FLOPs by part sum to {sum(attr.flops.values())}, the forward counted {total_flops}")
    once_total = sum(once.values())
    return {
        "gmacs": total_flops / 2e9, "gflops": total_flops / 1e9,
        "params": sum(d["params"] for d in parts.values()),
        "trainable_params": sum(d["trainable_params"] for d in parts.values()),
        "used_params": sum(d["used_params"] for d in parts.values()),
        "buffer_elements": sum(b.numel() for b in module.buffers()),
        "label_once": {"gmacs": once_total / 2e9, "gflops": once_total / 1e9, "in_total": False,
                       "by_part_gmacs": {k: v / 2e9 for k, v in once.items()}},
        "flops_by_op": dict(sorted(by_op.items(), key=lambda kv: -kv[1])),
        "parts": parts,
    }


# ----------------------------------------------------------------------------- timing (subprocess)

#: methods other than ``forward`` through which a part's module may be entered (``MambaBlock.fork``:
#: QMVL's fused path); timed like forward
_ENTRY_METHODS = ("fork",)


def _part_times(target: _Target, reps: int, device: str) -> Dict[str, float]:
    """Median per-part time (ms) over ``reps`` hooked forwards: forward pre/post hooks (and wrappers of
    :data:`_ENTRY_METHODS`) on the parts' modules, synchronised on CUDA; nested parts subtracted, the
    rest of the forward to ``target.rest``."""
    mods = dict(target.module.named_modules())
    acc: Dict[str, float] = {}
    start: Dict[str, float] = {}
    depth: Dict[str, int] = {}

    def enter(name: str) -> None:
        depth[name] = depth.get(name, 0) + 1
        if depth[name] == 1:
            H.sync(device)
            start[name] = time.perf_counter()

    def leave(name: str) -> None:
        depth[name] -= 1
        if depth[name] == 0:
            H.sync(device)
            acc[name] = acc.get(name, 0.0) + (time.perf_counter() - start.pop(name)) * 1e3

    def wrap(name: str, method: Callable[..., Any]) -> Callable[..., Any]:
        def timed(*a, **k):
            enter(name)
            try:
                return method(*a, **k)
            finally:
                leave(name)
        return timed

    handles, wrapped = [], []
    for name in target.part_of:
        m = mods[name]
        handles.append(m.register_forward_pre_hook(lambda mod, inp, name=name: enter(name)))
        handles.append(m.register_forward_hook(lambda mod, inp, out, name=name: leave(name)))
        for meth in _ENTRY_METHODS:
            if callable(getattr(type(m), meth, None)):
                m.__dict__[meth] = wrap(name, getattr(m, meth))
                wrapped.append((m, meth))
    runs: List[Dict[str, float]] = []
    try:
        with torch.no_grad():
            for _ in range(reps):
                acc.clear()
                H.sync(device)
                s = time.perf_counter()
                target.forward()
                H.sync(device)
                total = (time.perf_counter() - s) * 1e3
                runs.append(_exclusive(dict(acc), total, target.part_of, target.rest))
    finally:
        for h in handles:
            h.remove()
        for m, meth in wrapped:
            del m.__dict__[meth]
    return {p: statistics.median(r[p] for r in runs) for p in runs[0]}


def _trim_heap() -> bool:
    """Give the C heap's free memory back to the OS (glibc ``malloc_trim(0)``), so that the RSS baseline
    of the timed phase does not already hold the priming forward's freed activations; False where there
    is no glibc."""
    import ctypes
    import ctypes.util

    try:
        return bool(ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim(0))
    except (OSError, AttributeError):  # pragma: no cover - not glibc
        return False


def bench_provider(cfg: Dict[str, Any]) -> Dict[str, Any]:
    """Latency and peak memory of one configuration, in this process (the subprocess worker of
    :func:`vlssm.bench._harness.run_isolated` calls it with ``cfg["worker"]`` = this module).

    Returns ``{"latency_ms": {median, min, max, iqr, reps}, "timer", "peak_mem_mb", "mem_kind",
    "part_time_ms": {part: ms} (eager only), ...}``.
    """
    t0, device = cfg.get("t0", time.time()), cfg["device"]
    if cfg.get("threads"):
        torch.set_num_threads(cfg["threads"])
    H.log(t0, f"timing: building {cfg['model']} in a fresh process")
    target = _build_target(cfg)
    res: Dict[str, Any] = {"error": ""}
    compiled = torch.compile(target.module) if cfg.get("compile") else None

    def fn() -> Any:
        return target.forward(compiled)

    with torch.no_grad():
        fn()  # prime: fills the label caches (and compiles)
        if cfg.get("cuda_graphs"):
            fn = H.capture_graph(fn)
        trimmed = device == "cpu" and _trim_heap()
        mem = H.PhaseMemory(device, res)
        H.log(t0, f"timing: {cfg['warmup']} warm-up + {cfg['reps']} timed forward(s)")
        if device == "cuda":
            times = H.cuda_times_ms(fn, cfg["reps"], cfg["warmup"])
            res["timer"] = "cuda events" + (" (graph replay)" if cfg.get("cuda_graphs") else "")
        else:
            t = H.time_phase(fn, cfg["reps"], cfg["warmup"], math.inf, device)
            times = [s * 1e3 for s in t["times_s"]]
            res["timer"] = "perf_counter"
        mem.end_phase("infer", last=True)
    res["latency_ms"] = dict(H.time_stats(times), warmup=cfg["warmup"])
    inc = res.pop("peak_mem_infer_increase_mb", None)
    if device == "cuda":
        res["peak_mem_increase_mb"] = inc
    else:  # the increase of the timed forwards over the built, primed model; the absolute peak beside it
        res["peak_rss_mb"] = res["peak_mem_mb"]
        res["peak_mem_mb"] = inc
        res["mem_kind"] = (f"{res['mem_kind']}: increase during the timed forwards over the built, primed model"
                           f"{' (heap trimmed)' if trimmed else ''}")
    res["weights_mb"] = sum(t.numel() * t.element_size()
                            for t in (*target.module.parameters(), *target.module.buffers())) / _MB
    if cfg.get("compile") or cfg.get("cuda_graphs"):
        res["part_time_note"] = "per-part times are measured on the eager model only"
    else:
        H.log(t0, "timing: per-part hooks")
        res["part_time_ms"] = _part_times(target, min(cfg["reps"], 5), device)
    H.log(t0, f"timing: median {res['latency_ms']['median']:.2f} ms over {len(times)} forward(s)")
    return res


# ----------------------------------------------------------------------------- one profile

def _describe(r: Dict[str, Any]) -> str:
    what = (f"{r['model']} ({r['backbone']} {r['image_size']}x{r['image_size']}" if r["kind"] == "model"
            else f"{r['model']} (d={r['d']}, M={r['tokens']}")
    return f"{what}, C={r['num_classes']}, batch {r['batch']}, {r['dtype']}, {r['device']})"


def profile(cfg: Dict[str, Any]) -> Dict[str, Any]:
    """Profile one configuration (``cfg``: the resolved options and one ``batch``); the result dict of
    the module docstring, with ``"error"`` set (and the rest partial) when a step failed."""
    t0 = cfg["t0"]
    r: Dict[str, Any] = {k: cfg[k] for k in ("model", "kind", "backbone", "image_size", "num_classes", "batch",
                                              "dtype", "device")}
    r.update(tokens=cfg.get("tokens"), d=cfg.get("d"), heads=cfg.get("heads"), seed=cfg["seed"], error="")
    r["units"] = {"gmacs": "1e9 multiply-adds (fvcore / thop / the papers' 'FLOPs')",
                  "gflops": "1e9 FLOPs, 2 per multiply-add (torch.utils.flop_counter)",
                  "params": "parameter count (sum of numel; buffers excluded)", "time": "ms", "memory": "MiB"}
    step, target = "building", None
    try:
        H.log(t0, f"building {_describe(r)}")
        target = _build_target(cfg)
        r.update({k: v for k, v in target.info.items() if v is not None})
        step = "counting FLOPs"
        H.log(t0, "counting FLOPs: the label side once, then the inference forward with the caches filled")
        r.update(_counts(target))
        H.log(t0, f"counted: {r['gmacs']:.3f} GMACs, {r['params'] / 1e6:.3f} M params")
    except Exception as e:
        r["error"] = f"{'out of memory' if H.is_oom(e) else type(e).__name__} while {step} {_describe(r)}: {e}"
        return r
    finally:  # free the model (and the device memory) before the timing subprocess or the next batch
        target = None
        gc.collect()
        if cfg["device"] == "cuda":
            torch.cuda.empty_cache()
    r["latency_ms"], r["peak_mem_mb"], r["mem_kind"] = None, None, None
    if cfg["timing"]:
        H.log(t0, "timing in a fresh subprocess (its own peak memory)")
        res = H.run_isolated(dict(cfg, worker=__name__))
        if res.get("error"):
            r["error"] = f"{res['error']} while timing {_describe(r)}"
            return r
        r.update(latency_ms=res["latency_ms"], timer=res["timer"], peak_mem_mb=res["peak_mem_mb"],
                 mem_kind=res["mem_kind"], weights_mb=res["weights_mb"])
        for k in ("peak_rss_mb", "peak_mem_increase_mb", "part_time_note"):
            if k in res:
                r[k] = res[k]
        for part, ms in (res.get("part_time_ms") or {}).items():
            if part in r["parts"]:
                r["parts"][part]["time_ms"] = ms
    return r


# ----------------------------------------------------------------------------- output

_TABLE = [("part", "part", ""), ("in total", "in_total_s", ""), ("GMACs", "gmacs", ".3f"),
          ("GFLOPs", "gflops", ".3f"), ("once GMACs", "once_gmacs", ".3f"), ("params (M)", "params_m", ".3f"),
          ("trainable (M)", "trainable_m", ".3f"), ("used (M)", "used_m", ".3f"), ("time (ms)", "time_ms", ".2f")]


def _table_rows(r: Dict[str, Any]) -> List[Dict[str, Any]]:
    rows = []
    for name, d in r["parts"].items():
        rows.append(dict(d, part=name, in_total_s="yes" if d["in_total"] else "no: once",
                         params_m=d["params"] / 1e6, trainable_m=d["trainable_params"] / 1e6,
                         used_m=d["used_params"] / 1e6))
    lat = r.get("latency_ms") or {}
    rows.append({"part": "total", "in_total_s": "", "gmacs": r["gmacs"], "gflops": r["gflops"],
                 "once_gmacs": r["label_once"]["gmacs"] or None, "params_m": r["params"] / 1e6,
                 "trainable_m": r["trainable_params"] / 1e6, "used_m": r["used_params"] / 1e6,
                 "time_ms": lat.get("median")})
    return rows


def format_profile(r: Dict[str, Any]) -> str:
    """The text report of one profile."""
    head = f"vlssm profile {_describe(r)}"
    if r.get("layer_class"):
        head += f"\nlayer: {r['layer_class']}" + (f", {r['heads']} head(s)" if r.get("heads") else "")
    elif r.get("tokens"):
        head += f"\nbackbone tokens M = {r['tokens']}, width d = {r['d']}"
    if r.get("error"):
        return f"{head}\nFAILED: {r['error']}"
    lines = [head, H.format_table(_table_rows(r), _TABLE, left=2)]
    lat = r.get("latency_ms")
    if lat:
        lines.append(f"latency: median {lat['median']:.2f} ms (min {lat['min']:.2f}, max {lat['max']:.2f}, IQR "
                     f"{lat['iqr']:.2f}; {lat['reps']} timed after {lat['warmup']} warm-up, {r['timer']})")
        lines.append(f"peak memory: {r['peak_mem_mb']:.1f} MiB ({r['mem_kind']})"
                     + (f"; peak RSS {r['peak_rss_mb']:.0f} MiB" if r.get("peak_rss_mb") is not None else "")
                     + f"; weights and buffers {r['weights_mb']:.1f} MiB")
        if r.get("part_time_note"):
            lines.append(f"time (ms) per part: {r['part_time_note']}")
    else:
        lines.append("latency, memory: not measured (--no-timing)")
    once = r["label_once"]
    if once["gmacs"]:
        by = ", ".join(f"{k} {v:.3f}" for k, v in once["by_part_gmacs"].items())
        lines.append(f"label side, computed once and cached (not in the totals): {once['gmacs']:.3f} GMACs ({by})")
    if r.get("text_note"):
        lines.append(f"text: {r['text_note']}")
    lines.append("GMACs = 1e9 multiply-adds (the 'FLOPs' of fvcore, thop and the papers); GFLOPs = 2 x GMACs "
                 "(torch FlopCounterMode); used = parameters the cached inference forward reads")
    return "\n".join(lines)


_CSV_COLS = ["model", "kind", "backbone", "image_size", "num_classes", "tokens", "d", "heads", "batch", "part",
             "in_total", "gmacs", "gflops", "once_gmacs", "once_gflops", "params", "trainable_params",
             "used_params", "time_ms", "latency_median_ms", "latency_min_ms", "latency_max_ms", "latency_iqr_ms",
             "reps", "peak_mem_mb", "mem_kind", "error"]


def _csv_rows(r: Dict[str, Any], env: Dict[str, Any]) -> List[Dict[str, Any]]:
    base = {**env, **{k: r.get(k) for k in ("model", "kind", "backbone", "image_size", "num_classes", "tokens",
                                            "d", "heads", "batch", "error")}}
    rows = [dict(base, part=n, **{k: v for k, v in d.items()}) for n, d in (r.get("parts") or {}).items()]
    total = dict(base, part="total", in_total="")
    if "gmacs" in r:
        total.update(gmacs=r["gmacs"], gflops=r["gflops"], once_gmacs=r["label_once"]["gmacs"],
                     once_gflops=r["label_once"]["gflops"], params=r["params"],
                     trainable_params=r["trainable_params"], used_params=r["used_params"])
    lat = r.get("latency_ms") or {}
    total.update({f"latency_{k}_ms": lat.get(k) for k in ("median", "min", "max", "iqr")},
                 reps=lat.get("reps"), peak_mem_mb=r.get("peak_mem_mb"), mem_kind=r.get("mem_kind"),
                 time_ms=lat.get("median"))
    return rows + [total]


def main(argv: Optional[Sequence[str]] = None, prog: str = "vlssm profile") -> int:
    """``vlssm profile``: returns the exit status (0; 1 when a run failed; 2 for bad arguments)."""
    p = build_parser(prog)
    args = p.parse_args(list(sys.argv[1:] if argv is None else argv))
    status = _validate(p, args)
    if status is not None:
        return status
    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.time()
    cfg = {k: getattr(args, k) for k in ("model", "kind", "backbone", "image_size", "num_classes", "d", "heads",
                                         "tokens", "seed", "dtype", "device", "timing", "reps", "warmup",
                                         "compile", "cuda_graphs", "threads", "backbone_config")}
    cfg["t0"] = t0
    env = H.machine_columns(cfg)
    runs = []
    for b in args.batch:
        r = profile(dict(cfg, batch=b))
        r.update(compile=args.compile, cuda_graphs=args.cuda_graphs, env=env)
        if r["error"]:
            print(f"{prog}: {r['error']}", file=sys.stderr)
        runs.append(r)
    if args.csv:
        rows = [row for r in runs for row in _csv_rows(r, env)]
        H.write_csv(args.csv, rows, _CSV_COLS + list(env))
        H.log(t0, f"wrote {args.csv}")
    if args.json:
        print(json.dumps(runs[0] if len(runs) == 1 else {"runs": runs}, indent=2, default=str))
    else:
        print(H.header(f"vlssm profile {args.model}", env))
        print("\n\n".join(format_profile(r) for r in runs))
    return 1 if any(r["error"] for r in runs) else 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
