"""The argument parser every fastres command line uses (train, bench, parity, kernels.report).

Bad arguments give one line on stderr and exit status 2, not argparse's usage block. It lives here,
in the lowest package (no triton, no torch), so that every entry point, fastres.kernels.report
included, can import it.
"""
import argparse

__all__ = ["OneLineParser"]


class OneLineParser(argparse.ArgumentParser):
    """argparse.ArgumentParser whose errors are one line: "PROG: error: MESSAGE (--help for the options)"."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (--help for the options)\n")
