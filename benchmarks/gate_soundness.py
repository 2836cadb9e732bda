"""How often does the ECE gate promote a model it should not, and reject one it should pass?

Synthetic predictions with a known true calibration error: top-label confidence
c = 0.5 + 0.5 * Beta(5, 2) (a typical over-confident-looking spread between 0.5 and 1), and the
prediction is right with probability c - gap. The gap is the same everywhere, so the true
top-label ECE (binned or not) is exactly `gap`. For each test size and each true ECE the gate
(`calibflow.gates.evaluate_gates`, the code the flow and `calibflow gate` run) is applied to
independent draws:

- false promotion: true ECE >= max_ece, and the gate passes (target: at most 5% at every size);
- false rejection: true ECE = max_ece / 2, and the gate fails.

    python benchmarks/gate_soundness.py [--trials 500] [--sizes 200 1000 10000] [--quick]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from calibflow.config import GatesConfig  # noqa: E402
from calibflow.gates import Predictions, evaluate_gates  # noqa: E402


def draw(n: int, gap: float, rng: np.random.Generator) -> Predictions:
    confidence = 0.5 + 0.5 * rng.beta(5.0, 2.0, n)
    correct = rng.random(n) < confidence - gap
    probabilities = np.stack([confidence, 1.0 - confidence], axis=1)  # class 0 is the predicted one
    return Predictions(probabilities, np.where(correct, 0, 1))


def pass_rate(n: int, gap: float, trials: int, gates: GatesConfig, seed: int) -> tuple[float, float, float]:
    """Share of trials the gate passes, and the mean plug-in and debiased (l2) ECE estimates."""
    rng = np.random.default_rng(seed)
    passes, plugin, debiased = 0, [], []
    for trial in range(trials):
        verdict = evaluate_gates(draw(n, gap, rng), gates, seed=trial)
        passes += verdict.checks[0].passed  # max_ece
        plugin.append(verdict.estimates["ece_plugin"])
        debiased.append(verdict.estimates["ece_debiased_l2"])
    return passes / trials, float(np.mean(plugin)), float(np.mean(debiased))


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, default=500)
    parser.add_argument("--sizes", type=int, nargs="+", default=[200, 1000, 10000])
    parser.add_argument("--max-ece", type=float, default=0.05)
    parser.add_argument("--confidence", type=float, default=0.95)
    parser.add_argument("--resamples", type=int, default=1000)
    parser.add_argument("--quick", action="store_true", help="20 trials, 200 resamples: a smoke run")
    args = parser.parse_args(argv)
    if args.quick:
        args.trials, args.resamples = 20, 200
    gates = GatesConfig(max_ece=args.max_ece, min_accuracy=0.0, max_ece_increase=None, max_accuracy_drop=None,
                        confidence=args.confidence, n_resamples=args.resamples)
    scenarios = [("false promotion", args.max_ece), ("false promotion", 1.5 * args.max_ece),
                 ("false rejection", 0.5 * args.max_ece)]
    rows = []
    print(f"ECE gate: upper {args.confidence:.0%} bootstrap bound (15 bins, {args.resamples} resamples) <= "
          f"max_ece {args.max_ece}; {args.trials} trials per cell\n")
    print("| test size | true ECE | error measured | rate | mean plug-in ECE | mean debiased l2 ECE | seconds |")
    print("| ---: | ---: | --- | ---: | ---: | ---: | ---: |")
    for n in args.sizes:
        for k, (kind, gap) in enumerate(scenarios):
            started = time.perf_counter()
            passed, plugin, debiased = pass_rate(n, gap, args.trials, gates, seed=1000 * n + k)
            rate = passed if kind == "false promotion" else 1.0 - passed
            rows.append({"n": n, "true_ece": gap, "kind": kind, "rate": rate, "plugin": plugin, "debiased": debiased})
            print(f"| {n:,} | {gap:.3f} | {kind} | {rate:.1%} | {plugin:.4f} | {debiased:.4f} | "
                  f"{time.perf_counter() - started:.0f} |", flush=True)
    worst = max(r["rate"] for r in rows if r["kind"] == "false promotion")
    print(f"\nworst false-promotion rate: {worst:.1%} (target <= 5%)")
    return rows


if __name__ == "__main__":
    main()
