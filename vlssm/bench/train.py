"""``vlssm bench train``: training throughput, and whether data loading keeps up.

Rows (each in a fresh subprocess; random weights, nothing downloaded), at two shapes:

* ``demo``: the demo of ``vlssm train mvlr`` (digit mosaics, ``vlssm-demo-RN`` at 64 x 64,
  C = 10, batch 32);
* ``real``: MVLR's shape (``--train-backbone`` RN101 at ``--train-image-size`` 448, C = 80,
  batch ``--train-batch`` 32; on a CPU each step takes minutes, so ``--train-reps`` is small).

For each shape:

* ``step-<shape>-default`` / ``step-<shape>-reference``: images/s of one MVLR training step
  (forward, loss, backward, AdamW step) with vlssm's default backend, and with
  ``backend="reference", fused=False`` (plain PyTorch, the literal four sequences of QMVL).
* ``loader-<shape>``: images/s of the training DataLoader alone (``--workers`` processes, the
  training transform, pinned memory on CUDA) over ``--loader-batches`` batches: for ``demo`` the
  mosaics, for ``real`` JPEG files (crops of scikit-learn's sample photos written to a temporary
  folder as a list-file dataset) through the default augmentation at 448 (random resized crop,
  flip, RandAugment). Goal: loader >= 3x the default step's images/s.

Printed: the table, the ratios reference / default (step time) and loader / step (images/s);
one CSV in ``--out`` with the device and versions.
"""
from __future__ import annotations

import os
import tempfile
import time
from typing import Any, Dict

from .._argtypes import positive_int
from . import _harness as H

ROWS = ("loader-demo", "step-demo-default", "step-demo-reference", "loader-real", "step-real-default",
        "step-real-reference")


def add_arguments(p, common: bool = True):
    """The training-throughput workload's options and the shared run options."""
    gt = p.add_argument_group("training throughput")
    gt.add_argument("--train-backbone", default="RN101", help="backbone of the real-shape rows (default RN101)")
    gt.add_argument("--train-image-size", type=positive_int, default=448, help="their image side (default 448)")
    gt.add_argument("--train-batch", type=positive_int, default=32, help="their batch (default 32, the paper's)")
    gt.add_argument("--train-reps", type=positive_int, default=2, help="timed real-shape steps (default 2)")
    gt.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1),
                    help="DataLoader worker processes of the loader rows (default min(4, CPUs))")
    gt.add_argument("--loader-batches", type=positive_int, default=8, help="timed loader batches (default 8)")
    gt.add_argument("--train-rows", type=H.choice_list(ROWS, "row"), default=list(ROWS),
                    help=f"comma list of {','.join(ROWS)} (default all)")
    if common:
        H.add_common_arguments(p, devices=("cpu",), dtypes=("float32",))
    return p



def _shape(cfg: Dict[str, Any], row: str) -> Dict[str, Any]:
    from ..data import DigitMosaics
    from ..data.coco import coco_classnames

    if row.endswith("demo") or "-demo-" in row:
        return {"backbone": "vlssm-demo-RN", "image_size": 64, "classnames": list(DigitMosaics.CLASSNAMES),
                "batch": 32}
    return {"backbone": cfg["backbone"], "image_size": cfg["image_size"], "classnames": coco_classnames(80),
            "batch": cfg["batch"]}


def _real_dataset(folder: str, image_size: int, n: int = 64):
    """A list-file dataset of n JPEG crops (640 x 480 photos of scikit-learn) at the default augmentation."""
    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_sample_image

    from ..data import ListDataset, build_transform
    from ..data.coco import coco_classnames

    rng = np.random.default_rng(0)
    photos = [load_sample_image(f) for f in ("china.jpg", "flower.jpg")]
    lines = []
    for i in range(n):
        p = photos[i % 2]
        h, w = p.shape[:2]
        y, x = rng.integers(0, h // 4), rng.integers(0, w // 4)
        Image.fromarray(p[y:y + 3 * h // 4, x:x + 3 * w // 4]).save(os.path.join(folder, f"{i}.jpg"), quality=90)
        lines.append(f"{i}.jpg {i % 80} {(7 * i) % 80}")
    with open(os.path.join(folder, "train.txt"), "w") as f:
        f.write("\n".join(lines) + "\n")
    return ListDataset(os.path.join(folder, "train.txt"), folder, coco_classnames(80),
                       transform=build_transform(image_size, train=True, augment="default"))


def bench_provider(cfg: Dict[str, Any]) -> Dict[str, Any]:
    """One row in this process (the subprocess worker of vlssm.bench calls it)."""
    import torch

    row, t0 = cfg["provider"], cfg["t0"]
    if cfg.get("threads"):
        torch.set_num_threads(cfg["threads"])
    sh = _shape(cfg, row)
    B, S = sh["batch"], sh["image_size"]
    res: Dict[str, Any] = {"provider": row, "error": "", "batch": B, "image_size": S, "backbone": sh["backbone"]}
    if row.startswith("loader-"):
        with tempfile.TemporaryDirectory() as tmp:
            if row == "loader-demo":
                from ..data import DigitMosaics, build_transform

                ds = DigitMosaics("train", image_size=S, transform=build_transform(S, train=True, augment="none"))
            else:
                ds = _real_dataset(tmp, S)
            sampler = torch.utils.data.RandomSampler(ds, replacement=True, num_samples=B * (cfg["loader_batches"] + 2))
            dl = torch.utils.data.DataLoader(ds, batch_size=B, sampler=sampler, num_workers=cfg["workers"],
                                             pin_memory=torch.cuda.is_available(), drop_last=True)
            it = iter(dl)
            next(it), next(it)  # start the workers
            s = time.perf_counter()
            n = 0
            for x, _ in it:
                n += x.shape[0]
            dt = time.perf_counter() - s
        res.update(images_per_s=n / dt, ms=1e3 * dt / max(1, n // B), reps=n // B, workers=cfg["workers"])
        H.log(t0, f"{row:<20} {res['images_per_s']:9.1f} images/s ({cfg['workers']} workers)")
        return res
    from ..models import create_model

    over = {"backend": "reference", "fused": False} if row.endswith("reference") else {}
    torch.manual_seed(cfg["seed"])
    model = create_model("mvlr", sh["classnames"], backbone=sh["backbone"], image_size=S, **over).train()
    g = torch.Generator().manual_seed(cfg["seed"] + 1)
    images = torch.randn(B, 3, S, S, generator=g)
    targets = (torch.rand(B, len(sh["classnames"]), generator=g) < 0.2).float()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    def fn():
        opt.zero_grad(set_to_none=True)
        model(images, targets).loss.backward()
        opt.step()

    reps = cfg["reps"] if "-demo-" in row else cfg["train_reps"]
    H.log(t0, f"{row:<20} {reps} rep(s) + {cfg['warmup']} warm-up at batch {B}")
    t = H.time_phase(fn, reps, cfg["warmup"], cfg["budget"], "cpu")
    res.update(ms=t["median_s"] * 1e3, min_ms=t["min_s"] * 1e3, reps=t["reps"], images_per_s=B / t["median_s"])
    H.log(t0, f"{row:<20} median {res['ms']:10.1f} ms a step, {res['images_per_s']:.1f} images/s")
    return res


def _ratios(rows: Dict[str, Dict[str, Any]]) -> Dict[str, Any]:
    def get(r, k):
        return rows.get(r, {}).get(k)

    out = {}
    for shape in ("demo", "real"):
        a, b = get(f"step-{shape}-reference", "ms"), get(f"step-{shape}-default", "ms")
        out[f"{shape}: reference / default step time"] = a / b if a and b else None
        a, b = get(f"loader-{shape}", "images_per_s"), get(f"step-{shape}-default", "images_per_s")
        out[f"{shape}: loader / default step images/s (goal >= 3)"] = a / b if a and b else None
    return out


def run(args) -> int:
    """Run ``args.train_rows`` (each in a subprocess unless ``--no-memory``); prints the table and
    the ratios, writes one CSV to ``args.out``; returns 1 when a row failed."""
    cfg = {"workload": "train", "worker": __name__, "t0": time.time(), "threads": args.threads, "seed": args.seed,
           "backbone": args.train_backbone, "image_size": args.train_image_size, "batch": args.train_batch,
           "reps": args.reps, "train_reps": args.train_reps, "warmup": args.warmup, "budget": args.budget,
           "workers": args.workers, "loader_batches": args.loader_batches, "memory": args.memory,
           "device": "cpu", "dtype": "float32"}
    H.log(cfg["t0"], f"train: rows {','.join(args.train_rows)}")
    results = {row: H.run_row(cfg, row) for row in args.train_rows}
    env = H.machine_columns(cfg)
    rows = [dict(r, row=row) for row, r in results.items()]
    table = H.format_table(rows, [("row", "row", "s"), ("backbone", "backbone", "s"), ("S", "image_size", "d"),
                                  ("batch", "batch", "d"), ("ms/step", "ms", ".1f"),
                                  ("images/s", "images_per_s", ".1f"), ("reps", "reps", "d")])
    print(f"Training throughput, MVLR, float32, {env['device_name']}, {env['cpu_threads']} threads, "
          f"loader workers {args.workers}")
    print(table)
    for k, v in _ratios(results).items():
        print(f"{k}: {H.fmt(v, '.2f')}")
    cols = ["row", "backbone", "image_size", "batch", "ms", "min_ms", "images_per_s", "reps", "workers", "error"]
    path = H.write_rows_csv(args.out, f"train-{args.train_backbone}-{args.train_image_size}", results, cols, env)
    print(f"CSV: {path}")
    return 1 if any(r.get("error") for r in results.values()) else 0
