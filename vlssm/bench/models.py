"""``vlssm bench models``: MVLR's whole-model costs, side by side in one run.

Rows (each a fresh subprocess, for its peak memory; random weights, nothing downloaded):

* ``infer-mvlr`` / ``infer-baseline``: eval-mode latency of MVLR and of its Baseline at batch
  ``--model-infer-batch`` (default 1), the label embeddings cached (the papers exclude the text
  encoder from inference). Goal: MVLR / Baseline <= 1.2 on a CPU (the paper: 13.1 / 9.1 = 1.44
  on its GPU).
* ``train-default`` / ``train-reference``: one MVLR training step (forward, loss, backward, AdamW
  step) at batch ``--model-train-batch`` with vlssm's default backend, and with
  ``backend="reference", fused=False`` (the literal four-sequence composition in plain PyTorch).
* ``text-truncated`` / ``text-full``: the soft-prompt text encoding of a training step (T^soft
  forward and backward to the context) cut after the last end-of-text token, and over all 77
  positions. Goal: truncated >= 4x faster.

The defaults are the paper's: RN101 at 448 x 448, the 80 MS-COCO classes, float32.
"""
from __future__ import annotations

import time
from typing import Any, Dict

from .._argtypes import positive_int
from . import _harness as H

ROWS = ("infer-mvlr", "infer-baseline", "train-default", "train-reference", "text-truncated", "text-full")


def add_arguments(p, common: bool = True):
    """The whole-model workload's options (``--model-*``) and the shared run options."""
    gm = p.add_argument_group("whole model")
    gm.add_argument("--model-backbone", default="RN101", help="open_clip backbone (default RN101)")
    gm.add_argument("--model-image-size", type=positive_int, default=448, help="image side S (default 448)")
    gm.add_argument("--model-c", type=positive_int, default=80, help="classes C (default 80: MS-COCO's names)")
    gm.add_argument("--model-infer-batch", type=positive_int, default=1, help="inference batch (default 1)")
    gm.add_argument("--model-train-batch", type=positive_int, default=1, help="training-step batch (default 1)")
    gm.add_argument("--model-train-reps", type=positive_int, default=2,
                    help="timed training steps per row (default 2; the reference row takes ~20 s a step)")
    gm.add_argument("--model-rows", type=H.choice_list(ROWS, "row"), default=list(ROWS),
                    help=f"comma list of {','.join(ROWS)} (default all)")
    if common:
        H.add_common_arguments(p, devices=("cpu",), dtypes=("float32",))
    return p

def _build(cfg: Dict[str, Any], name: str, **over):
    import torch

    from vlssm import models
    from vlssm.data.coco import coco_classnames

    torch.manual_seed(cfg["seed"])
    return models.create_model(name, coco_classnames(cfg["c"]), backbone=cfg["backbone"],
                               image_size=cfg["image_size"],
                               **over)


def bench_provider(cfg: Dict[str, Any]) -> Dict[str, Any]:
    """Time one row in this process (the subprocess worker of vlssm.bench calls it)."""
    import torch

    row, t0 = cfg["provider"], cfg["t0"]
    if cfg.get("threads"):
        torch.set_num_threads(cfg["threads"])
    res: Dict[str, Any] = {"provider": row, "error": ""}
    g = torch.Generator().manual_seed(cfg["seed"] + 1)
    S, C = cfg["image_size"], cfg["c"]
    if row.startswith("infer-"):
        model = _build(cfg, "mvlr" if row == "infer-mvlr" else "mvlr_baseline").eval()
        images = torch.randn(cfg["infer_batch"], 3, S, S, generator=g)

        def fn():
            with torch.no_grad():
                model(images)
        reps, phase = cfg["reps"], "infer"
    elif row.startswith("train-"):
        over = {} if row == "train-default" else {"backend": "reference", "fused": False}
        model = _build(cfg, "mvlr", **over).train()
        images = torch.randn(cfg["train_batch"], 3, S, S, generator=g)
        targets = (torch.rand(cfg["train_batch"], C, generator=g) < 0.1).float()
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

        def fn():
            opt.zero_grad(set_to_none=True)
            model(images, targets).loss.backward()
            opt.step()
        reps, phase = cfg["train_reps"], "train"
    else:
        model = _build(cfg, "mvlr").train()
        pdlr = model.pdlr
        pdlr.truncate = row == "text-truncated"
        res["text_tokens"] = pdlr.soft_length if pdlr.truncate else pdlr.text_encoder.context_length

        def fn():
            pdlr.ctx.grad = None
            pdlr.soft().sum().backward()
        reps, phase = cfg["reps"], "text"
    fn()  # prime (and fill the eval caches) before the memory baseline
    mem = H.PhaseMemory("cpu", res) if cfg["memory"] else None
    H.log(t0, f"{row:<15} {reps} rep(s) + {cfg['warmup']} warm-up")
    t = H.time_phase(fn, reps, cfg["warmup"], cfg["budget"], "cpu")
    res.update(ms=t["median_s"] * 1e3, min_ms=t["min_s"] * 1e3, reps=t["reps"])
    if mem:
        mem.end_phase(phase, last=True)
        res["peak_mem_increase_mb"] = res.pop(f"peak_mem_{phase}_increase_mb", None)
    H.log(t0, f"{row:<15} median {res['ms']:10.2f} ms over {t['reps']} rep(s)")
    return res


def _ratios(rows: Dict[str, Dict[str, Any]]) -> Dict[str, float]:
    def r(a, b):
        ra, rb = rows.get(a, {}), rows.get(b, {})
        return ra["ms"] / rb["ms"] if ra.get("ms") and rb.get("ms") else None
    return {"MVLR / Baseline inference": r("infer-mvlr", "infer-baseline"),
            "reference / default training step": r("train-reference", "train-default"),
            "full / truncated text encoding": r("text-full", "text-truncated")}


def run(args) -> int:
    """Run the rows of ``args.model_rows`` (each in a subprocess unless ``--no-memory``); prints the
    table and the three ratios, writes one CSV to ``args.out``; returns 1 when a row failed."""
    cfg = {"workload": "models", "worker": __name__, "t0": time.time(), "threads": args.threads, "seed": args.seed,
           "backbone": args.model_backbone, "image_size": args.model_image_size, "c": args.model_c,
           "infer_batch": args.model_infer_batch, "train_batch": args.model_train_batch, "reps": args.reps,
           "train_reps": args.model_train_reps, "warmup": args.warmup, "budget": args.budget,
           "memory": args.memory, "device": "cpu", "dtype": "float32"}
    H.log(cfg["t0"], f"models: {cfg['backbone']} at {cfg['image_size']}, C={cfg['c']}, "
                     f"rows {','.join(args.model_rows)}")
    results = {row: H.run_row(cfg, row) for row in args.model_rows}
    env = H.machine_columns(cfg)
    rows = [dict(r, row=row) for row, r in results.items()]
    table = H.format_table(rows, [("row", "row", "s"), ("ms", "ms", ".1f"), ("min ms", "min_ms", ".1f"),
                                  ("reps", "reps", "d"), ("peak MB", "peak_mem_mb", ".0f"),
                                  ("+MB", "peak_mem_increase_mb", ".0f"), ("text tokens", "text_tokens", "d")])
    print(f"MVLR whole model, {cfg['backbone']} {cfg['image_size']}x{cfg['image_size']}, C={cfg['c']}, float32, "
          f"{env['device_name']}, {env['cpu_threads']} threads; infer batch {cfg['infer_batch']}, "
          f"train batch {cfg['train_batch']}")
    print(table)
    for k, v in _ratios(results).items():
        print(f"{k}: {H.fmt(v, '.2f')}")
    cols = ["row", "ms", "min_ms", "reps", "peak_mem_mb", "peak_mem_increase_mb", "mem_kind", "text_tokens",
            "backbone", "image_size", "c", "infer_batch", "train_batch", "error"]
    stem = f"models-{cfg['backbone']}-{cfg['image_size']}-c{cfg['c']}"
    path = H.write_rows_csv(args.out, stem, results, cols, env,
                           {k: cfg[k] for k in ("backbone", "image_size", "c", "infer_batch", "train_batch")})
    print(f"CSV: {path}")
    return 1 if any(r.get("error") for r in results.values()) else 0
