"""What knowing which parameters got a gradient costs (issue: parameters
unused in a step keep value and state, as torch leaves them). Times a SAMPa
step on ResNet-56 (167 parameter tensors, every one gets a gradient) with the
per-step tracking on and patched off, interleaved rounds, 1 thread, CPU.

    python bench/bench_grad_tracking.py [--rounds 6] [--steps 15]
"""
import argparse
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from models_bench import MODELS  # noqa: E402

import sampa_fused.passes as P  # noqa: E402
from sampa_fused import SAMPa  # noqa: E402


def main(rounds: int = 6, steps: int = 15) -> None:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = MODELS["resnet56"].make()
    x, y = torch.randn(8, 3, 8, 8), torch.randint(0, 10, (8,))
    opt = SAMPa(model, lambda m, b: F.cross_entropy(m(b[0]), b[1]), torch.optim.SGD, lr=0.05,
                momentum=0.9, rho=0.05, lam=0.2, backend="torch")
    tracking = P.PassRunner._accumulators

    def median_step() -> float:
        times = []
        for _ in range(steps):
            t = time.perf_counter()
            opt.step((x, y))
            times.append(time.perf_counter() - t)
        return statistics.median(times)

    for _ in range(3):
        opt.step((x, y))
    on, off = [], []
    try:
        for _ in range(rounds):
            P.PassRunner._accumulators = tracking
            on.append(median_step())
            P.PassRunner._accumulators = lambda self, leaves: None      # nothing tracked
            off.append(median_step())
    finally:
        P.PassRunner._accumulators = tracking
    a, b = statistics.median(on), statistics.median(off)
    print(f"{sum(1 for _ in model.parameters())} parameter tensors: step {1e3 * a:.2f} ms with tracking, "
          f"{1e3 * b:.2f} ms without, ratio {a / b:.3f}")


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=6, help="interleaved rounds with and without tracking")
    ap.add_argument("--steps", type=int, default=15, help="steps per round (their median is the round's time)")
    return ap.parse_args(argv)


if __name__ == "__main__":
    args = parse_args()
    main(args.rounds, args.steps)
