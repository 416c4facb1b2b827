"""``vlssm bench --workload models``: MVLR's whole-model costs, side by side in one run.

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

import sys
import time
from typing import Any, Dict, List

#: MS-COCO's 80 class names in label order (category ids sorted), as the multi-label papers use them.
COCO_CLASSES = (
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat", "traffic light",
    "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog", "horse", "sheep", "cow",
    "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella", "handbag", "tie", "suitcase", "frisbee",
    "skis", "snowboard", "sports ball", "kite", "baseball bat", "baseball glove", "skateboard", "surfboard",
    "tennis racket", "bottle", "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple",
    "sandwich", "orange", "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch",
    "potted plant", "bed", "dining table", "toilet", "tv", "laptop", "mouse", "remote", "keyboard", "cell phone",
    "microwave", "oven", "toaster", "sink", "refrigerator", "book", "clock", "vase", "scissors", "teddy bear",
    "hair drier", "toothbrush",
)



def classnames(C: int) -> List[str]:
    """C class names: COCO's first C, then "class k" for k >= 80."""
    return [COCO_CLASSES[i] if i < len(COCO_CLASSES) else f"class {i}" for i in range(C)]


def _build(cfg: Dict[str, Any], name: str, **over):
    import torch

    from vlssm import models

    torch.manual_seed(cfg["seed"])
    return models.create_model(name, classnames(cfg["c"]), backbone=cfg["backbone"], image_size=cfg["image_size"],
                               **over)


def bench_provider(cfg: Dict[str, Any]) -> Dict[str, Any]:
    """Time one row in this process (the subprocess worker of vlssm.bench calls it)."""
    import torch

    from .bench import _log, _PhaseMemory, _time_phase

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
    mem = _PhaseMemory("cpu", res) if cfg["memory"] else None
    _log(t0, f"{row:<15} {reps} rep(s) + {cfg['warmup']} warm-up")
    t = _time_phase(fn, reps, cfg["warmup"], cfg["budget"], "cpu")
    res.update(ms=t["median_s"] * 1e3, min_ms=t["min_s"] * 1e3, reps=t["reps"])
    if mem:
        mem.end_phase(phase, last=True)
        res["peak_mem_increase_mb"] = res.pop(f"peak_mem_{phase}_increase_mb", None)
    _log(t0, f"{row:<15} median {res['ms']:10.2f} ms over {t['reps']} rep(s)")
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
    from .bench import _bench_in_subprocess_or_here, _fmt, _log, _machine_columns, _write_rows_csv

    if args.device != "cpu":
        print("vlssm bench: error: --workload models runs on the CPU only for now", file=sys.stderr)
        return 2
    cfg = {"workload": "models", "t0": time.time(), "threads": args.threads, "seed": args.seed,
           "backbone": args.model_backbone, "image_size": args.model_image_size, "c": args.model_c,
           "infer_batch": args.model_infer_batch, "train_batch": args.model_train_batch, "reps": args.reps,
           "train_reps": args.model_train_reps, "warmup": args.warmup, "budget": args.budget,
           "memory": args.memory, "device": "cpu", "dtype": "float32"}
    _log(cfg["t0"], f"models: {cfg['backbone']} at {cfg['image_size']}, C={cfg['c']}, rows {','.join(args.model_rows)}")
    results = {row: _bench_in_subprocess_or_here(cfg, row) for row in args.model_rows}
    env = _machine_columns(cfg)
    lines = [f"{'row':<16}{'ms':>12}{'min ms':>12}{'reps':>6}{'peak MB':>10}{'+MB':>8}  note"]
    for row, r in results.items():
        if r.get("error"):
            lines.append(f"{row:<16}FAILED: {r['error']}")
            continue
        note = f"{r['text_tokens']} text tokens" if "text_tokens" in r else ""
        lines.append(f"{row:<16}{_fmt(r.get('ms'), '.1f'):>12}{_fmt(r.get('min_ms'), '.1f'):>12}{r['reps']:>6}"
                     f"{_fmt(r.get('peak_mem_mb'), '.0f'):>10}{_fmt(r.get('peak_mem_increase_mb'), '.0f'):>8}  {note}")
    print(f"MVLR whole model, {cfg['backbone']} {cfg['image_size']}x{cfg['image_size']}, C={cfg['c']}, float32, "
          f"{env['device_name']}, {env['cpu_threads']} threads; infer batch {cfg['infer_batch']}, "
          f"train batch {cfg['train_batch']}")
    print("\n".join(lines))
    for k, v in _ratios(results).items():
        print(f"{k}: {_fmt(v, '.2f')}")
    cols = ["row", "ms", "min_ms", "reps", "peak_mem_mb", "peak_mem_increase_mb", "mem_kind", "text_tokens",
            "backbone", "image_size", "c", "infer_batch", "train_batch", "error"]
    path = _write_rows_csv(args.out, f"models-{cfg['backbone']}-{cfg['image_size']}-c{cfg['c']}", results, cols, env,
                           {k: cfg[k] for k in ("backbone", "image_size", "c", "infer_batch", "train_batch")})
    print(f"CSV: {path}")
    return 1 if any(r.get("error") for r in results.values()) else 0
