"""python -m fastres.train: the CLI (cli.py), the training loop (trainer.py), the paper's experiments
(experiments.py), layer-response probes (probes.py), plots (plots.py) and data sets (data.py)."""
