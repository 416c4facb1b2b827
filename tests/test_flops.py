"""Analytic QMVL FLOPs (vlssm.profile.flops): docs/design.md's numbers and torch's own count."""
import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from vlssm.profile.flops import FlopBreakdown, mamba_block_flops, mamba_dims, qmvl_flops, qmvl_flops_per_image

MATMUL_OPS = ("mm", "addmm", "bmm", "baddbmm")


def test_design_numbers():
    """docs/design.md section 2: d=512, M=196, C=80: 3.86 -> 1.45 GFLOP per image, about 2.7x."""
    unfused = qmvl_flops_per_image(m=196, c=80, d_model=512, fused=False)
    fused = qmvl_flops_per_image(m=196, c=80, d_model=512, fused=True)
    assert round(unfused, 2) == 3.86
    assert round(fused, 2) == 1.45
    assert round(unfused / fused, 1) == 2.7


def test_breakdown_and_batch_scaling():
    one = qmvl_flops(1, 196, 80, 512, fused=True)
    four = qmvl_flops(4, 196, 80, 512, fused=True)
    assert four.total == 4 * one.total
    assert one.total == one.matmul + one.conv + one.scan + one.skip + one.gate
    assert one.as_dict()["total"] == one.total
    # The matmuls dominate; the scan is 9 FLOPs per (token, channel, state).
    assert one.matmul > 0.9 * one.total
    E, N = 1024, 16
    assert one.scan == 9 * E * N * 3 * (196 + 80)  # 3(M + C) scan steps per QMVL, docs/design.md section 2
    unf = qmvl_flops(1, 196, 80, 512, fused=False)
    assert unf.scan == 9 * E * N * 4 * (196 + 80)  # 4(M + C)


@pytest.mark.parametrize("m,c,d", [(1, 1, 16), (5, 3, 48), (197, 63, 256), (784, 81, 512)])
def test_fused_does_less_work(m, c, d):
    f = qmvl_flops(2, m, c, d, fused=True)
    u = qmvl_flops(2, m, c, d, fused=False)
    assert f.total < u.total
    # in_proj: the suffix's x and z halves once, the prefix's x half once (its z is never used), instead
    # of both halves of every token twice: per block (p, s) and image, 2d (s 2E + p E) vs 2 * 2d (p + s) 2E
    E = 2 * d
    assert f.in_proj == 2 * 2 * d * ((c * 2 * E + m * E) + (m * 2 * E + c * E))
    assert u.in_proj == 2 * 2 * 2 * (2 * d * 2 * E * (m + c))  # batch x blocks x twice x (m + c) tokens
    assert f.out_proj * 4 == u.out_proj  # out_proj: over s tokens per block instead of 2(p + s)
    assert f.x_proj * 4 == u.x_proj * 3  # scan-side work: 3(M + C) tokens instead of 4(M + C)


def test_mamba_dims():
    assert mamba_dims(512) == {"d_model": 512, "d_inner": 1024, "d_state": 16, "d_conv": 4, "dt_rank": 32}
    assert mamba_dims(100)["dt_rank"] == 7  # ceil(100 / 16)
    with pytest.raises(ValueError, match="d_model"):
        mamba_dims(0)
    with pytest.raises(ValueError, match="batch"):
        qmvl_flops(-1, 1, 1, 16)


def test_shared_labels_saves_label_in_proj_when_fused():
    B, M, C, d = 4, 196, 80, 512
    shared = qmvl_flops(B, M, C, d, fused=True, shared_labels=True)
    per_image = qmvl_flops(B, M, C, d, fused=True)
    saved = per_image.in_proj - shared.in_proj
    # (B-1) copies of C tokens: both halves (2E) in the label block, the x half (E) in the visual block
    assert saved == (B - 1) * (2 * C * d * 2 * (2 * d) + 2 * C * d * (2 * d))
    assert shared.total - shared.in_proj == per_image.total - per_image.in_proj
    assert qmvl_flops(B, M, C, d, fused=False, shared_labels=True) == qmvl_flops(B, M, C, d, fused=False)


def _torch_counts(model, x, t):
    with FlopCounterMode(display=False) as fc:
        with torch.no_grad():
            model(x, t)
    counts = fc.get_flop_counts()["Global"]
    by_name = {getattr(op, "__name__", str(op)).split(".")[0]: n for op, n in counts.items()}
    matmul = sum(n for name, n in by_name.items() if name in MATMUL_OPS)
    return matmul, by_name.get("convolution", 0)


def _cpu_backend_or_skip():
    from vlssm import _backend

    if _backend.load_extension() is None:
        pytest.skip(f"compiled extension not available: {_backend.extension_error()}")


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "unfused"])
@pytest.mark.parametrize("shared_labels", [False, True], ids=["t3d", "t2d"])
def test_matmul_part_matches_flop_counter(fused, shared_labels):
    """The projections' FLOPs equal what torch.utils.flop_counter counts on a tiny QMVL.

    On the compiled backend the scan and the fork conv are opaque custom ops, so
    torch's count is exactly the four projections (plus, unfused, nn.Conv1d).
    """
    _cpu_backend_or_skip()
    import vlssm

    B, M, C, d, N = 2, 7, 3, 40, 4  # dt_rank = ceil(40 / 16) = 3
    torch.manual_seed(0)
    model = vlssm.QMVL(d, d_state=N, fused=fused, backend="cpu")
    x = torch.randn(B, M, d)
    t = torch.randn(C, d) if shared_labels else torch.randn(B, C, d)
    matmul, conv = _torch_counts(model, x, t)
    want = qmvl_flops(B, M, C, d, d_state=N, fused=fused, shared_labels=shared_labels)
    assert matmul == want.matmul
    if not fused:
        # nn.Conv1d pads K - 1 on both sides and the causal part is sliced off afterwards:
        # torch counts 2 * K per channel for L + K - 1 outputs, the formula for the L causal ones.
        L, K = M + C, 4
        assert conv * L == want.conv * (L + K - 1)


def test_block_flops_match_flop_counter_on_plain_linears():
    """Independent of vlssm's modules: one mixer pass's projections with plain nn.Linear layers."""
    d, N, K = 24, 4, 4
    dims = mamba_dims(d, N, K)
    E, R = dims["d_inner"], dims["dt_rank"]
    in_proj = torch.nn.Linear(d, 2 * E, bias=False)
    x_proj = torch.nn.Linear(E, R + 2 * N, bias=False)
    dt_proj = torch.nn.Linear(R, E, bias=True)
    out_proj = torch.nn.Linear(E, d, bias=False)
    conv = torch.nn.Conv1d(E, E, K, groups=E, padding=K - 1)
    n_in, n_scan, n_out = 11, 15, 4
    with FlopCounterMode(display=False) as fc:
        with torch.no_grad():
            in_proj(torch.randn(2, n_in, d))
            u = conv(torch.randn(2, E, n_scan))[..., :n_scan].transpose(1, 2)
            dt_proj(x_proj(u)[..., :R])
            out_proj(torch.randn(2, n_out, E))
    counts = {getattr(op, "__name__", str(op)).split(".")[0]: n for op, n in fc.get_flop_counts()["Global"].items()}
    want = mamba_block_flops(n_in, n_scan, n_out, d, N, K).scale(2)
    assert sum(n for k, n in counts.items() if k in MATMUL_OPS) == want.matmul
    assert counts["convolution"] * n_scan == want.conv * (n_scan + K - 1)  # padded outputs, see above
    assert isinstance(want, FlopBreakdown)
