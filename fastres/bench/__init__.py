"""python -m fastres.bench and the benchmark suite's rows: the CLI (cli.py), setups and providers
(config.py), the rows (cases.py), models and blocks (models.py), ops (ops.py), alternating timing
(timing.py) and the machine's description (environment.py)."""
