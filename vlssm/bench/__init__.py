"""``vlssm bench``: vlssm's benchmarks, one workload per module over one shared harness.

    vlssm bench [options]              the default: a short CPU run of the headline numbers
                                       (the qmvl workload at MVLR's shape, then the IFM sweep)
    vlssm bench qmvl [options]         one QMVL layer: fused vs unfused vs the pure-PyTorch reference
    vlssm bench ifm [options]          the IFM: fused vs the paper's formulas, over C x M
    vlssm bench attention [options]    QMVL vs the attention blocks it replaces (MVLR Table 6 / Figure 5),
                                       swept over resolution, C and d; ``--plot`` draws the figures
    vlssm bench scan [options]         the kernels alone: selective_scan, fork_scan, attention_with_probs
    vlssm bench models [options]       MVLR's whole-model costs (RN101 at 448; a few minutes)
    vlssm bench train [options]        training throughput and the data loader
    vlssm bench gpu [options]          the GPU sweep (CUDA only): QMVL providers, SDPA baselines, scan bandwidth

Every workload module (``vlssm.bench.<name>``) has ``add_arguments(parser)`` and
``run(args) -> exit code``, and imports only :mod:`vlssm.bench._harness` of this
package (timing, memory, subprocess isolation, CSV columns, the environment
header); ``vlssm profile`` uses the same harness. Every CSV row carries the
device, versions, dtype, shape and date.

Not a workload: :mod:`vlssm.bench.check_cuda`, the CUDA vs CPU kernels checker
(``python -m vlssm.bench.check_cuda``, run by bench/gpu.sh; its cases also run
under the CUDA emulation in tests/cuda_emu).
"""
from __future__ import annotations

import argparse
import importlib
import sys
from typing import Dict, List, Optional, Sequence

__all__ = ["WORKLOADS", "DEFAULT", "add_arguments", "build_parser", "run", "main"]

#: workload name -> one-line description (the module is ``vlssm.bench.<name>``).
WORKLOADS: Dict[str, str] = {
    "qmvl": "one QMVL layer: fused vs unfused vs the pure-PyTorch reference",
    "ifm": "the IFM: vlssm's fused ops vs the paper's formulas, over a sweep of C and M",
    "attention": "QMVL vs self-/cross-attention blocks over resolution, C and d (MVLR Table 6, Figure 5)",
    "scan": "kernel microbenchmarks: selective_scan, fork_scan and attention_with_probs vs their references",
    "models": "MVLR whole-model costs: inference, a training step, the soft-prompt text encoder",
    "train": "training throughput and whether the data loader keeps up",
    "gpu": "the GPU sweep: QMVL providers, SDPA baselines, mamba-ssm, fork_scan bandwidth (CUDA only)",
}

#: the name of the default run (no workload given): ``qmvl`` then ``ifm``, each at its defaults.
DEFAULT = "all"


def _module(name: str):
    return importlib.import_module(f"{__name__}.{name}")


def _add_default_arguments(p: argparse.ArgumentParser) -> None:
    """The default run's options: the QMVL workload's, plus the IFM sweep's as ``--ifm-c`` / ``--ifm-m``."""
    _module("qmvl").add_arguments(p)
    _module("ifm").add_arguments(p, common=False, prefix="ifm-")


def add_arguments(p: argparse.ArgumentParser, only: Optional[str] = None) -> argparse.ArgumentParser:
    """Add the workload sub-commands (and the default run's options) to ``p``. With ``only``, just that
    workload's module is imported and given its options (the others are listed for ``--help``)."""
    sub = p.add_subparsers(dest="workload", metavar="WORKLOAD")
    for name, help_ in WORKLOADS.items():
        if only is not None and name != only:
            sub.add_parser(name, help=help_)
            continue
        mod = _module(name)
        w = sub.add_parser(name, help=help_, description=(mod.__doc__ or help_).split("\n\n")[0],
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        mod.add_arguments(w)
    d = sub.add_parser(DEFAULT, help="the default run (also with no WORKLOAD): qmvl, then the IFM sweep",
                       description="The default benchmark: the qmvl workload, then the IFM sweep.")
    if only is None or only == DEFAULT:
        _add_default_arguments(d)
    return p


def build_parser(prog: str = "vlssm bench", argv: Optional[Sequence[str]] = None) -> argparse.ArgumentParser:
    """The ``vlssm bench`` parser; given the (normalised) ``argv`` it is about to parse, only the named
    workload's module is imported."""
    only = argv[0] if argv and (argv[0] in WORKLOADS or argv[0] == DEFAULT) else None
    p = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="`vlssm bench WORKLOAD --help` lists a workload's options; with no "
                                       "WORKLOAD, the default run takes the qmvl options and --ifm-c / --ifm-m.")
    return add_arguments(p, only=only)


def parse_args(argv: Sequence[str], prog: str = "vlssm bench") -> argparse.Namespace:
    """Parse ``vlssm bench`` arguments (no workload: the default run)."""
    argv = normalize_argv(argv)
    return build_parser(prog, argv).parse_args(argv)


def normalize_argv(argv: Sequence[str]) -> List[str]:
    """``vlssm bench [options]`` means the default run: insert its name when no workload is given."""
    argv = list(argv)
    if not argv or (argv[0].startswith("-") and argv[0] not in ("-h", "--help")):
        return [DEFAULT, *argv]
    return argv


def run(args: argparse.Namespace) -> int:
    """Run the workload of parsed ``args``; returns the exit code (2: a usage error found late)."""
    import os

    from ._harness import check_device

    err = check_device(getattr(args, "device", "cpu"))
    if err:
        print(err, file=sys.stderr)
        return 2
    flag = "--plot-from" if getattr(args, "plot_from", None) else "--plot" if getattr(args, "plot", False) else None
    if flag:  # the figures need matplotlib: fail before any timing when it is absent
        from .plot import MissingMatplotlib, require_matplotlib

        try:
            require_matplotlib()
        except MissingMatplotlib as e:
            print(f"vlssm bench {args.workload}: error: {flag}: {e}", file=sys.stderr)
            return 2
    try:  # fail early, before any timing, on an unwritable --out
        os.makedirs(args.out, exist_ok=True)
    except OSError as e:
        print(f"vlssm bench: error: --out {args.out!r}: {e}", file=sys.stderr)
        return 2
    if getattr(args, "threads", None):
        import torch

        torch.set_num_threads(args.threads)
    if args.workload != DEFAULT:
        return _module(args.workload).run(args)
    rc = _module("qmvl").run(args)
    print()
    return max(rc, _module("ifm").run(args))


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``vlssm bench`` without the ``vlssm`` prefix (also ``python -m vlssm.bench``)."""
    return run(parse_args(sys.argv[1:] if argv is None else argv))
