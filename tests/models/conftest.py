"""Shared set-up of the model tests: one intra-op thread per module, and the small learnable
problem of the "it trains" tests. The tiny open_clip configs the model tests name
(``vlssm-test-tiny-RN``, ``vlssm-test-tiny-ViT``, ``vlssm-test-timm-tower``) are registered for the
whole session by tests/conftest.py.
"""
from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread per module: on these tiny tensors OpenMP threads cost more than they
    save, badly so on a busy machine (a tiny ResNet step took seconds with 2 threads, ms with 1)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


class _Learnable:
    """A small learnable multi-label problem and a short training run on it, for the "it trains" tests:
    each image is noise plus a fixed random pattern per present class."""

    @staticmethod
    def problem(C: int, S: int, n: int = 32, seed: int = 0, every_class: bool = False):
        """(x_train, y_train, x_val, y_val): n images (n, 3, S, S) and multi-hot labels (n, C) each;
        every_class: the first C images of each split hold one class each (every class occurs)."""
        g = torch.Generator().manual_seed(seed)
        patterns = torch.randn(C, 3, S, S, generator=g)

        def data():
            y = (torch.rand(n, C, generator=g) < 0.4).float()
            if every_class:
                y[:C] = torch.eye(C)
            return 0.5 * torch.randn(n, 3, S, S, generator=g) + torch.einsum("nc,chwk->nhwk", y, patterns), y

        return (*data(), *data())

    @staticmethod
    def fit(model, problem, steps: int, lr: float, batch: int = 8):
        """AdamW on the trainable parameters over the training split in order; returns (mean loss of
        the first 4 steps, of the last 4, held-out mAP after training, the held-out positive rate: what
        random scores get on average)."""
        from vlssm.metrics import mean_average_precision

        xt, yt, xv, yv = problem
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
        losses = []
        for step in range(steps):
            i = torch.arange(batch) + batch * (step % (len(xt) // batch))
            loss = model(xt[i], yt[i]).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
        model.eval()
        with torch.no_grad():
            m = mean_average_precision(torch.sigmoid(model(xv)), yv)
        return sum(losses[:4]) / 4, sum(losses[-4:]) / 4, m, float(yv.mean())


@pytest.fixture
def learnable():
    return _Learnable
