"""The GPU benchmark's CPU-checkable parts: byte counts, baselines, options.

The benchmark itself needs CUDA (bench/gpu.sh runs it); these tests keep its
arithmetic and its baseline layers honest without one.
"""
import math

import pytest
import torch
import torch.nn.functional as F

from vlssm import _backend
from vlssm.bench import build_parser
from vlssm.bench.gpu import GPU_PROVIDERS
from vlssm.bench.scan import fork_scan_bytes
from vlssm.modules.baselines import SDPACross, SDPASelf


@pytest.mark.skipif(_backend.load_extension() is None, reason="needs the compiled CPU kernels")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fork_scan_bytes_counts_every_operand_and_output_once(dtype):
    """The bandwidth denominator equals the bytes of the op's actual operands and outputs."""
    b, p, s, E, N = 2, 70, 9, 24, 16
    L = p + 2 * s
    args = dict(u=torch.randn(b, L, E, dtype=dtype), delta=torch.randn(b, L, E, dtype=dtype),
                A=-torch.rand(E, N), B=torch.randn(b, L, N, dtype=dtype), C=torch.randn(b, L, N, dtype=dtype),
                D=torch.randn(E), z=torch.randn(b, s, E, dtype=dtype), delta_bias=torch.randn(E))
    outs = torch.ops.vlssm.fork_scan(*args.values(), p, True)
    want = sum(t.nbytes for t in args.values()) + sum(t.nbytes for t in outs)
    assert fork_scan_bytes(b, p, s, E, N, dtype) == want


def _heads_attention(q, k, v, h):
    """Literal multi-head softmax attention, (B, L, d) operands."""
    B, Lq, d = q.shape
    split = lambda t: t.reshape(B, t.shape[1], h, d // h).transpose(1, 2)  # noqa: E731
    q, k, v = split(q), split(k), split(v)
    p = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d // h), -1)
    return (p @ v).transpose(1, 2).reshape(B, Lq, d)


def _block_literal(blk, q_in, kv_in, h):
    nq, nkv = blk.norm_q(q_in), blk.norm_kv(kv_in)
    k, v = F.linear(nkv, blk.kv.weight, blk.kv.bias).chunk(2, -1)
    return blk.out(_heads_attention(blk.q(nq), k, v, h))


def test_sdpa_baselines_compute_attention_blocks():
    torch.manual_seed(0)
    d, h = 32, 4
    x, t = torch.randn(2, 7, d, dtype=torch.float64), torch.randn(2, 3, d, dtype=torch.float64)
    self_blk = SDPASelf(d, h, None, torch.float64)
    xt = torch.cat([x, t], 1)
    want = xt + _block_literal(self_blk.block, xt, xt, h)
    got = torch.cat(self_blk(x, t), 1)
    torch.testing.assert_close(got, want)
    cross = SDPACross(d, h, None, torch.float64)
    gx, gt = cross(x, t)
    torch.testing.assert_close(gx, x + _block_literal(cross.x_from_t, x, t, h))
    torch.testing.assert_close(gt, t + _block_literal(cross.t_from_x, t, x, h))
    cross.residual = False
    torch.testing.assert_close(cross(x, t)[0], _block_literal(cross.x_from_t, x, t, h))


def test_gpu_options_default_to_the_mvlr_sweep():
    a = build_parser().parse_args(["gpu"])
    assert a.gpu_providers == list(GPU_PROVIDERS) and a.device == "cuda"
    assert (a.gpu_m, a.gpu_c, a.gpu_dtypes, a.batch) == ([196, 784], [20, 80], ["float32", "bfloat16"], 32)
    a = build_parser().parse_args(["gpu", "--gpu-providers", "sdpa-self,fused-cuda,sdpa-self"])
    assert a.gpu_providers == ["sdpa-self", "fused-cuda"]
