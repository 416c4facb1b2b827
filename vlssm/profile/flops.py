"""Analytic forward FLOPs of QMVL: fused vs the literal four-sequence composition.

Counting rules (per token, per Mamba block; E = expand * d_model, N = d_state,
R = dt_rank = ceil(d_model / 16), K = d_conv):

=========  ==========================  =====================================
part       FLOPs per token             tokens (unfused | fused, per block)
=========  ==========================  =====================================
in_proj    2 * d_model * 2E            p + s per sequence | p + s
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

The literal composition (section 1 of DESIGN.md) runs four sequences of
``M + C`` tokens through full Mamba mixers: each block twice, every op over
every token. The fused path (section 2) runs, per block with prefix length p
and suffix length s, in_proj over p + s tokens, the conv / x_proj / dt_proj /
scan over p + 2s tokens (the prefix once, the suffix forward and reversed), and
the gate and out_proj over the s output tokens only. label_block has p = M,
s = C; visual_block has p = C, s = M.

At d_model = 512, M = 196, C = 80 (defaults d_state = 16, d_conv = 4,
expand = 2) this gives 3.86 GFLOP per image unfused and 1.74 fused (2.22x).
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import asdict, dataclass, fields
from typing import Dict, Union

__all__ = ["FlopBreakdown", "mamba_dims", "mamba_block_flops", "qmvl_flops", "qmvl_flops_per_image",
           "SCAN_FLOPS_PER_STATE"]

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
                      expand: int = 2, dt_rank: Union[int, str] = "auto") -> FlopBreakdown:
    """FLOPs of one Mamba mixer pass that projects ``n_in`` tokens in, convolves and scans
    ``n_scan`` tokens, and gates and projects ``n_out`` tokens out."""
    m = mamba_dims(d_model, d_state, d_conv, expand, dt_rank)
    D, E, N, K, R = m["d_model"], m["d_inner"], m["d_state"], m["d_conv"], m["dt_rank"]
    return FlopBreakdown(
        in_proj=2 * n_in * D * 2 * E,
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
    for the whole batch (in_proj over c tokens, not batch * c, in each block);
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
            total = total + mamba_block_flops(p + s, p + 2 * s, s, **kw)
        else:
            total = total + mamba_block_flops(p + s, p + s, p + s, **kw).scale(2)
    total = total.scale(batch)
    if fused and shared_labels and batch > 1:
        # in_proj of the shared label tokens runs once per block instead of once per image.
        saved = mamba_block_flops(c, 0, 0, **kw).in_proj * 2 * (batch - 1)
        total = dataclasses.replace(total, in_proj=total.in_proj - saved)
    return total


def qmvl_flops_per_image(m: int = 196, c: int = 80, d_model: int = 512, fused: bool = True, **kw) -> float:
    """Total forward GFLOP of one QMVL layer per image (DESIGN.md: 3.86 unfused, 1.74 fused)."""
    return qmvl_flops(1, m, c, d_model, fused=fused, **kw).total / 1e9
