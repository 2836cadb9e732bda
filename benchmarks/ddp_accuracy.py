"""Does DDP train as well as one process at the same global batch? (issue 14)

scikit-learn's digits (1,000 train, 100 val, 697 test images, shuffled per seed), small_cnn width
16, 8 epochs, global batch 64, on the CPU: one process (calibflow.training.loop.train_classifier) and
`--nproc` gloo processes under torchrun (calibflow.training.distributed.train_distributed), for each seed.
Prints each seed's test accuracy, the means and standard deviations, the paired difference with
its standard error, and the wall time of each side (torchrun's launch included). About 1 minute
for 5 seeds on 2 cores.

    python benchmarks/ddp_accuracy.py [--seeds 5] [--nproc 2] [--epochs 8]
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def main(argv: list[str] | None = None) -> int:
    from calibflow.training.distributed import train_distributed
    from calibflow.training.loop import train_classifier
    from tests.test_distributed import DDP, SPEC, accuracy, digits

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=8)
    args = parser.parse_args(argv)
    config = dataclasses.replace(DDP, epochs=args.epochs, nproc=args.nproc)
    single_config = dataclasses.replace(config, distributed="none", nproc="auto")
    one, many, seconds = [], [], {"one": 0.0, "ddp": 0.0}
    for seed in range(args.seeds):
        train, val, (test_x, test_y) = digits(seed)
        started = time.perf_counter()
        single, _ = train_classifier(SPEC, *train, *val, single_config, seed, progress=False)
        seconds["one"] += time.perf_counter() - started
        started = time.perf_counter()
        with tempfile.TemporaryDirectory() as work:
            distributed, _ = train_distributed(SPEC, *train, *val, config, seed, work)
        seconds["ddp"] += time.perf_counter() - started
        one.append(accuracy(single, test_x, test_y))
        many.append(accuracy(distributed, test_x, test_y))
        print(f"seed {seed}: 1 process {one[-1]:.4f}, {args.nproc} processes {many[-1]:.4f}", flush=True)
    difference = np.array(many) - np.array(one)
    print(f"1 process:   mean {np.mean(one):.4f}, sd {np.std(one, ddof=1):.4f}, {seconds['one']:.1f} s")
    print(f"{args.nproc} processes: mean {np.mean(many):.4f}, sd {np.std(many, ddof=1):.4f}, {seconds['ddp']:.1f} s")
    print(
        f"paired difference {difference.mean():+.4f}, standard error "
        f"{difference.std(ddof=1) / np.sqrt(len(difference)):.4f} ({args.seeds} seeds)"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
