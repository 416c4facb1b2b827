#!/usr/bin/env python
"""QMVL benchmark: fused vs unfused vs the pure-PyTorch reference composition.

A thin script over :mod:`vlssm.bench.qmvl` (the implementation, shared with
``vlssm bench qmvl``): ``python bench/qmvl.py --help`` lists the options.
"""
import os
import sys

try:
    from vlssm.bench import main
except ImportError:  # run from a source checkout without an install
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from vlssm.bench import main

if __name__ == "__main__":
    sys.exit(main(["qmvl", *sys.argv[1:]]))
