"""The `sampa-train` command: SGD, SAM and SAMPa compared on real data.

It lives in the package (not in examples/) because it is the README's main
job and an installed command: `pip install .` must bring it, and its tests
import it. It needs what the library does not (tqdm, matplotlib for plots,
scikit-learn for the digits data): the `[train]` extra.

    cli.py     arguments, runs, the compare table, results.json, plots
    data.py    digits / MNIST-style data sets, label noise, batches
    models.py  the small CNN and the CIFAR ResNet the CLI trains
"""
from .cli import build_parser, gradient_counts, main, parse_engine_opt, parse_method, parse_seeds, run_experiment

__all__ = ["build_parser", "gradient_counts", "main", "parse_engine_opt", "parse_method", "parse_seeds",
           "run_experiment"]
