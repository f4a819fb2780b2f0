#!/usr/bin/env python
"""Run one scenario: ``python run_sim.py SCENARIO.yaml [--out DIR] [--set KEY=VALUE ...]``.

The same as ``fedens run ...``; everything else lives in ``fedens.cli``.
"""

import sys

from fedens.cli import main

if __name__ == "__main__":
    sys.exit(main(["run", *sys.argv[1:]]))
