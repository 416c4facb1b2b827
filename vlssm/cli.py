"""The ``vlssm`` command line.

    vlssm env [--json]        what vlssm runs on here: versions, the compiled
                              extension, threads, what backend "auto" picks
    vlssm bench [WORKLOAD] [options]
                              benchmarks (``vlssm bench --help`` lists the workloads;
                              no WORKLOAD: the short CPU default run)
    vlssm profile MODEL [...] FLOPs (GMACs and GFLOPs), params, latency and peak memory
                              of a model or layer, per part (``vlssm profile --help``)
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
    """The top-level parser. ``bench``, ``profile``, ``train`` and ``eval`` have parsers of their own
    (:func:`main` hands their arguments over before this one parses); they are listed here for help."""
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
    for name, help_ in _DELEGATED.items():
        sub.add_parser(name, help=help_, add_help=False)
    return p


#: commands whose own parser takes over all their arguments.
_DELEGATED = {
    "bench": "benchmarks: vlssm bench [WORKLOAD] (qmvl, ifm, attention, scan, models, train, gpu)",
    "profile": "FLOPs (GMACs and GFLOPs), params, latency and memory of a model or layer, per part",
    "train": "train a model (MVLR, CAPNET, Candle; demo data by default)",
    "eval": "evaluate a training checkpoint (model and EMA)",
}


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
    if argv and argv[0] == "bench":  # sub-commands per workload
        from . import bench

        return bench.run(bench.parse_args(argv[1:]))
    if argv and argv[0] == "profile":
        from .profile.profiler import main as profile_main

        return profile_main(argv[1:], prog="vlssm profile")
    args = build_parser().parse_args(argv)
    if args.command == "env":
        return _env(args)
    raise AssertionError(args.command)  # pragma: no cover


if __name__ == "__main__":
    sys.exit(main())
