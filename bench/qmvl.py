#!/usr/bin/env python
"""QMVL benchmark: fused vs unfused vs the pure-PyTorch reference composition.

A thin script over :mod:`vlssm.bench.qmvl` (the implementation, shared with
``vlssm bench qmvl``): ``python bench/qmvl.py --help`` lists the options.
"""
import sys

from vlssm.bench import main  # an installed vlssm, or PYTHONPATH=<checkout>

if __name__ == "__main__":
    sys.exit(main(["qmvl", *sys.argv[1:]]))
