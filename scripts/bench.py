#!/usr/bin/env python
"""``python scripts/bench.py ARGS`` is ``freezetune bench ARGS``: see ``freezetune bench --help``."""

import sys

from freezetune.cli import main

main(["bench", *sys.argv[1:]])
