"""The ``vlssm`` command line: ``vlssm env`` and ``vlssm bench``.

    vlssm env [--json]        what vlssm runs on here: versions, the compiled
                              extension, threads, what backend "auto" picks
    vlssm bench [options]     QMVL fused vs unfused vs reference (see
                              ``vlssm bench --help``)
    vlssm train MODEL [...]   train a model (demo data by default; ``vlssm train --help``)
    vlssm eval MODEL --checkpoint PATH [...]
                              evaluate a training checkpoint (model and EMA)

Also runnable as ``python -m vlssm.cli``.
"""
from __future__ import annotations

import argparse
import json
import sys
from typing import Optional, Sequence

__all__ = ["main", "build_parser"]


def _version() -> str:
    from . import __version__

    return __version__


def build_parser() -> argparse.ArgumentParser:
    from . import bench

    p = argparse.ArgumentParser(
        prog="vlssm",
        description="vlssm: fused selective-scan kernels for QMVL (quadruplet Mamba) layers.",
    )
    p.add_argument("--version", action="version", version=f"vlssm {_version()}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    e = sub.add_parser("env", help="report versions, the compiled extension, threads and backends",
                       description="Report the environment vlssm runs in: torch/CUDA/triton versions, CUDA "
                                   "availability, the compiled extension vlssm._C, CPU threads and what "
                                   "backend 'auto' resolves to.")
    e.add_argument("--json", action="store_true", help="print the report as JSON")
    b = sub.add_parser("bench", help="benchmark QMVL: fused vs unfused vs the pure-PyTorch reference",
                       description=bench.__doc__.split("\n\n")[0] if bench.__doc__ else None)
    bench.add_arguments(b)
    from . import train

    t = sub.add_parser("train", help="train a model (MVLR, CAPNET, Candle; demo data by default)",
                       description=train.__doc__.split("\n\n")[0])
    train.add_train_arguments(t)
    v = sub.add_parser("eval", help="evaluate a training checkpoint (model and EMA)",
                       description="Evaluate a vlssm train checkpoint (model and EMA).")
    train.add_eval_arguments(v)
    return p


def _env(args: argparse.Namespace) -> int:
    from .env import collect, format_report

    info = collect(probe_cuda=True)
    if args.json:
        print(json.dumps(info, indent=2, sort_keys=False))
    else:
        print(format_report(info))
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in ("train", "eval"):  # their own parsers: presets, --config and checkpoint defaults
        from . import train

        run = train.train if argv[0] == "train" else train.evaluate
        return run(argv[1:], prog=f"vlssm {argv[0]}")
    args = build_parser().parse_args(argv)
    if args.command == "env":
        return _env(args)
    if args.command == "bench":
        from .bench import run

        return run(args)
    raise AssertionError(args.command)  # pragma: no cover


if __name__ == "__main__":
    sys.exit(main())
