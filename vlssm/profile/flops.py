"""Analytic forward FLOPs of QMVL: fused vs the literal four-sequence composition.

Counting rules (per token, per Mamba block; E = expand * d_model, N = d_state,
R = dt_rank = ceil(d_model / 16), K = d_conv):

=========  ==========================  =====================================
part       FLOPs per token             tokens (unfused | fused, per block)
=========  ==========================  =====================================
in_proj    2 * d_model * 2E            p + s per sequence | s (x half: p)
conv1d     2 * K * E                   p + s per sequence | p + 2s
x_proj     2 * E * (R + 2N)            p + s per sequence | p + 2s
dt_proj    2 * R * E                   p + s per sequence | p + 2s
scan       9 * E * N                   p + s per sequence | p + 2s
D skip     E                           p + s per sequence | p + 2s
gate       E                           p + s per sequence | s
out_proj   2 * E * d_model             p + s per sequence | s
=========  ==========================  =====================================

Matmuls count ``2*m*n*k`` (a multiply and an add per term; biases are free, as
in ``torch.utils.flop_counter``). The depthwise causal conv counts ``2*K`` per
channel (likewise torch's convolution count). The scan counts 9 FLOPs per
(token, channel, state) — the convention of VMamba's ``flops_selective_scan_fn``
and of counting mamba_ssm's ``selective_scan_ref``: delta*A, exp, delta*B*u (2),
the state update a*x + b (2), the readout C*x summed over N (2), plus one more
for the discretisation — plus one FLOP per (token, channel) for the D skip
and one for the SiLU(z) gate. LayerNorm, SiLU/softplus, biases and the
residual adds are not counted (< 1 % here, and the same for both paths).

The literal composition (docs/design.md section 1) runs four sequences of
``M + C`` tokens through full Mamba mixers: each block twice, every op over
every token. The fused path (section 2) runs, per block with prefix length p
and suffix length s, in_proj over the s suffix tokens and only its x half (d -> E)
over the p prefix tokens (their gate half z is never used), the conv / x_proj / dt_proj /
scan over p + 2s tokens (the prefix once, the suffix forward and reversed), and
the gate and out_proj over the s output tokens only. label_block has p = M,
s = C; visual_block has p = C, s = M.

At d_model = 512, M = 196, C = 80 (defaults d_state = 16, d_conv = 4,
expand = 2) this gives 3.86 GFLOP per image unfused and 1.45 fused (2.66x).

Units: every count here is in FLOPs with a multiply-add counted as 2 (torch's
``torch.utils.flop_counter`` convention). Papers and fvcore / thop usually
report multiply-accumulates ("FLOPs" there, GMACs here): half these numbers
(1.45 GFLOPs = 0.73 GMACs).

:func:`count_flops` measures instead of modelling: it runs a function under
``torch.utils.flop_counter.FlopCounterMode``, which counts vlssm's custom ops
through the formulas of :mod:`vlssm.ops.flops` (the same conventions as above),
and returns a :class:`FlopCount`. On a fused ``vlssm.QMVL`` forward it equals
``qmvl_flops(..., fused=True).total``.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import asdict, dataclass, fields
from typing import Any, Callable, Dict, Union

__all__ = ["FlopBreakdown", "mamba_dims", "mamba_block_flops", "qmvl_flops", "qmvl_flops_per_image",
           "SCAN_FLOPS_PER_STATE", "FlopCount", "count_flops"]

#: FLOPs per (token, channel, state element) of the selective scan.
SCAN_FLOPS_PER_STATE = 9


@dataclass(frozen=True)
class FlopBreakdown:
    """Forward FLOPs by part. ``matmul`` = the four projections; ``total`` = everything counted."""

    in_proj: int = 0
    x_proj: int = 0
    dt_proj: int = 0
    out_proj: int = 0
    conv: int = 0
    scan: int = 0
    skip: int = 0
    gate: int = 0

    @property
    def matmul(self) -> int:
        return self.in_proj + self.x_proj + self.dt_proj + self.out_proj

    @property
    def total(self) -> int:
        return self.matmul + self.conv + self.scan + self.skip + self.gate

    def __add__(self, other: "FlopBreakdown") -> "FlopBreakdown":
        return FlopBreakdown(**{f.name: getattr(self, f.name) + getattr(other, f.name) for f in fields(self)})

    def scale(self, k: int) -> "FlopBreakdown":
        return FlopBreakdown(**{f.name: getattr(self, f.name) * k for f in fields(self)})

    def as_dict(self) -> Dict[str, int]:
        d = asdict(self)
        d["matmul"] = self.matmul
        d["total"] = self.total
        return d


def mamba_dims(d_model: int, d_state: int = 16, d_conv: int = 4, expand: int = 2,
               dt_rank: Union[int, str] = "auto") -> Dict[str, int]:
    """mamba_ssm ``Mamba``'s derived sizes: d_inner = expand * d_model, dt_rank = ceil(d_model / 16)."""
    for name, v in (("d_model", d_model), ("d_state", d_state), ("d_conv", d_conv), ("expand", expand)):
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise ValueError(f"{name} must be a positive int, got {v!r}")
    if dt_rank == "auto":
        dt_rank = math.ceil(d_model / 16)
    if not isinstance(dt_rank, int) or dt_rank < 1:
        raise ValueError(f"dt_rank must be 'auto' or a positive int, got {dt_rank!r}")
    return {"d_model": d_model, "d_inner": expand * d_model, "d_state": d_state, "d_conv": d_conv,
            "dt_rank": dt_rank}


def mamba_block_flops(n_in: int, n_scan: int, n_out: int, d_model: int, d_state: int = 16, d_conv: int = 4,
                      expand: int = 2, dt_rank: Union[int, str] = "auto", n_in_x: int = 0) -> FlopBreakdown:
    """FLOPs of one Mamba mixer pass that projects ``n_in`` tokens in (both halves, x and z) and
    ``n_in_x`` more tokens to their x half only, convolves and scans ``n_scan`` tokens, and gates and
    projects ``n_out`` tokens out."""
    m = mamba_dims(d_model, d_state, d_conv, expand, dt_rank)
    D, E, N, K, R = m["d_model"], m["d_inner"], m["d_state"], m["d_conv"], m["dt_rank"]
    return FlopBreakdown(
        in_proj=2 * n_in * D * 2 * E + 2 * n_in_x * D * E,
        conv=2 * n_scan * K * E,
        x_proj=2 * n_scan * E * (R + 2 * N),
        dt_proj=2 * n_scan * R * E,
        scan=SCAN_FLOPS_PER_STATE * n_scan * E * N,
        skip=n_scan * E,
        gate=n_out * E,
        out_proj=2 * n_out * E * D,
    )


def qmvl_flops(batch: int, m: int, c: int, d_model: int, d_state: int = 16, d_conv: int = 4, expand: int = 2,
               fused: bool = True, dt_rank: Union[int, str] = "auto", shared_labels: bool = False) -> FlopBreakdown:
    """Forward FLOPs of one QMVL layer on ``batch`` images of ``m`` visual and ``c`` label tokens.

    ``fused=False`` counts the literal composition: four sequences of m + c tokens
    (the reference composition does the same arithmetic). ``shared_labels``
    (t of shape (C, d)): the fused path projects the shared label tokens once
    for the whole batch (in_proj over c tokens, not batch * c, in each block: both halves
    in the label block, where T is the suffix, the x half in the visual block);
    everything after in_proj depends on the image and is counted per image. The
    literal composition broadcasts t first, so its count does not change.
    """
    for name, v in (("batch", batch), ("m", m), ("c", c)):
        if not isinstance(v, int) or isinstance(v, bool) or v < 0:
            raise ValueError(f"{name} must be a non-negative int, got {v!r}")
    kw = dict(d_model=d_model, d_state=d_state, d_conv=d_conv, expand=expand, dt_rank=dt_rank)
    total = FlopBreakdown()
    # label_block: prefix X (m tokens), suffix T (c); visual_block: prefix T (c), suffix X (m).
    for p, s in ((m, c), (c, m)):
        if fused:
            total = total + mamba_block_flops(s, p + 2 * s, s, n_in_x=p, **kw)
        else:
            total = total + mamba_block_flops(p + s, p + s, p + s, **kw).scale(2)
    total = total.scale(batch)
    if fused and shared_labels and batch > 1:
        # in_proj of the shared label tokens runs once per block instead of once per image.
        saved = mamba_block_flops(c, 0, 0, n_in_x=c, **kw).in_proj * (batch - 1)
        total = dataclasses.replace(total, in_proj=total.in_proj - saved)
    return total


def qmvl_flops_per_image(m: int = 196, c: int = 80, d_model: int = 512, fused: bool = True, **kw) -> float:
    """Total forward GFLOPs (multiply-add = 2) of one QMVL layer per image (docs/design.md: 3.86 unfused,
    1.45 fused); GMACs are half."""
    return qmvl_flops(1, m, c, d_model, fused=fused, **kw).total / 1e9


@dataclass(frozen=True)
class FlopCount:
    """What ``torch.utils.flop_counter.FlopCounterMode`` counted while a function ran (:func:`count_flops`).

    Attributes:
        flops: total FLOPs, torch's convention (a multiply-add = 2 FLOPs), an int.
        by_op: op name (``"aten.mm"``, ``"vlssm.fork_scan"``, ...) -> FLOPs; sums to ``flops``.
        by_module: module name -> FLOPs of everything that ran inside it, its submodules
            included, forward and backward (FlopCounterMode's ModuleTracker: the root
            module's class name, then attribute names, e.g. ``"QMVL.label_block.mixer.in_proj"``).
            Only modules entered through ``module(...)`` (forward hooks) get a row: work in
            another method (the fused QMVL's ``MambaBlock.fork``) counts for the modules that
            called it. Empty when no ``nn.Module`` ran.
    """

    flops: int
    by_op: Dict[str, int] = dataclasses.field(default_factory=dict)
    by_module: Dict[str, int] = dataclasses.field(default_factory=dict)

    @property
    def macs(self) -> float:
        """Multiply-accumulates, ``flops / 2`` (a float: a scan step counts an odd number of FLOPs):
        the unit papers, fvcore and thop call "FLOPs"."""
        return self.flops / 2

    @property
    def gflops(self) -> float:
        """``flops / 1e9``: GFLOPs, a multiply-add counted as 2."""
        return self.flops / 1e9

    @property
    def gmacs(self) -> float:
        """``macs / 1e9``: GMACs (= the "GFLOPs" of papers that count multiply-adds once)."""
        return self.macs / 1e9


def count_flops(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> FlopCount:
    """Run ``fn(*args, **kwargs)`` under ``FlopCounterMode(display=False)`` and return what it counted.

    vlssm's custom ops count through their formulas (:mod:`vlssm.ops.flops`), registered
    by ``import vlssm.ops``, which this function does before it starts counting.
    Whatever ``fn`` runs is counted: wrap a forward in ``torch.no_grad()`` yourself, or
    call ``.backward()`` inside ``fn`` to count forward and backward. The result of
    ``fn`` is discarded.

    Example::

        c = count_flops(model, x, t)
        print(f"{c.gflops:.3f} GFLOPs = {c.gmacs:.3f} GMACs")
    """
    from torch.utils.flop_counter import FlopCounterMode

    from .. import ops  # noqa: F401  (registers the formulas; the mode snapshots the registry when built)

    with FlopCounterMode(display=False) as mode:
        fn(*args, **kwargs)
    counts = mode.get_flop_counts()
    by_op = {str(op): int(n) for op, n in counts.get("Global", {}).items()}
    by_module = {name: int(sum(ops_.values())) for name, ops_ in counts.items() if name != "Global"}
    return FlopCount(flops=int(mode.get_total_flops()), by_op=by_op, by_module=by_module)
