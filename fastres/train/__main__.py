"""python -m fastres.train: see fastres/train/cli.py."""
import sys

from fastres.train.cli import cli

sys.exit(cli())
