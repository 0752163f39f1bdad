"""Triton's compile cache on a GPU run: which lookups hit, how many compiles a warm cache saved.

    TRITON_CACHE_MANAGER=triton_cache:LoggingFileCacheManager TRITON_CACHE_LOG=FILE   (scripts/ on PYTHONPATH)
    python scripts/triton_cache.py stats --log FILE [--warm DIR]

LoggingFileCacheManager is Triton's FileCacheManager that appends one line per kernel lookup
("hit KEY NAME" / "miss KEY NAME") and per stored kernel ("put KEY NAME") to TRITON_CACHE_LOG; every
process of a run (pytest shards, benchmarks) appends to the same file. Triton reads the manager class
from TRITON_CACHE_MANAGER in each process; the variable does not enter Triton's cache key.
`stats` counts them: lookups, hits, compiles (puts), and the hits whose KEY is a folder of the warm
cache DIR (copied into the run's cache before it started): compiles the warm cache saved.
"""
import argparse
import os
import sys

if __name__ == "__main__":  # `stats`: no Triton needed (nor its import time)
    FileCacheManager = object
else:  # imported by Triton inside every process of a GPU run
    from triton.runtime.cache import FileCacheManager


def _log(event, key, name):
    path = os.environ.get("TRITON_CACHE_LOG")
    if path:
        with open(path, "a") as f:  # one short write per line: lines of parallel processes do not mix
            f.write(f"{event} {key} {name}\n")


class LoggingFileCacheManager(FileCacheManager):
    """FileCacheManager that logs kernel lookups (get_group) and stores (put_group)."""

    def get_group(self, filename):
        group = super().get_group(filename)
        if filename.endswith(".json"):
            _log("hit" if group and filename in group else "miss", self.key, filename)
        return group

    def put_group(self, filename, group):
        if filename.endswith(".json"):
            _log("put", self.key, filename)
        return super().put_group(filename, group)


def stats(log, warm):
    counts = {"hit": 0, "miss": 0, "put": 0}
    warm_keys = set(os.listdir(warm)) if warm and os.path.isdir(warm) else set()
    saved = set()
    if os.path.exists(log):
        with open(log) as f:
            for line in f:
                parts = line.split()
                if len(parts) == 3 and parts[0] in counts:
                    counts[parts[0]] += 1
                    if parts[0] == "hit" and parts[1] in warm_keys:
                        saved.add(parts[1])
    print(f"triton cache: {counts['hit'] + counts['miss']} kernel lookups, {counts['hit']} hits, "
          f"{counts['put']} compiles")
    if warm:
        print(f"warm cache {warm}: {len(warm_keys)} kernels, {len(saved)} of them used "
              f"(compiles saved: {len(saved)})" if warm_keys else f"warm cache {warm}: none")
    return counts, len(saved)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    st = sub.add_parser("stats", help="count lookups, hits, compiles and warm-cache savings of a run's log")
    st.add_argument("--log", required=True)
    st.add_argument("--warm", default="")
    args = ap.parse_args(argv)
    if args.cmd == "stats":
        stats(args.log, args.warm)
    return 0


if __name__ == "__main__":
    sys.exit(main())
