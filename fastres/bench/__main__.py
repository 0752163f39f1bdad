"""python -m fastres.bench: see fastres/bench/cli.py."""
import sys

from fastres.bench.cli import main

sys.exit(main())
