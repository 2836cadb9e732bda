"""Speed and agreement of calibflow's temperature fit and ECE against their peers, in one process.

    python benchmarks/calibration_speed.py            # 50,000 x 100 logits, 5 repeats: docs/results/calibration_speed.md
    python benchmarks/calibration_speed.py --smoke    # 2,000 x 10, 1 repeat: seconds, numbers that measure nothing

(a) ``calibflow.calibrators.temperature.fit_temperature`` vs netcal's ``TemperatureScaling().fit`` (netcal takes
    probabilities, and its ``temperature`` property is the logit *multiplier* 1/T); and, as an
    ablation, our fit with the warm-started Halley solve switched off (bracketed Newton from T = 1
    on every row, what splits below ``WARM_START_MIN_ROWS`` get);
(b) ``calibflow.metrics.expected_calibration_error`` vs torchmetrics' ``MulticlassCalibrationError``
    (15 bins, l1), both on the same float32 probabilities;
(c) for information, ``bootstrap_ci("ece", ...)`` with 1,000 resamples on 10,000 x 10.

Each timing is the median of ``--repeats`` runs after one untimed warm-up run. Logits are
``z = 3 * N(0, 1)`` and labels are drawn from ``softmax(z / 2)``, so the optimal T is about 2 (an
interior optimum). Prints a markdown table and the agreement of the numbers, writes the table to
docs/results/calibration_speed.md (benchmarks/_common.py), and ``main()`` returns them as a dict.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

import _common  # noqa: E402
from calibflow.calibrators import temperature  # noqa: E402
from calibflow.calibrators.temperature import fit_temperature  # noqa: E402
from calibflow.metrics import bootstrap_ci, expected_calibration_error  # noqa: E402


def make_logits(n: int, k: int, seed: int, t_true: float = 2.0) -> tuple[torch.Tensor, torch.Tensor]:
    """float64 logits ``3 * N(0, 1)`` and labels drawn from ``softmax(z / t_true)``."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, k, generator=g, dtype=torch.float64) * 3.0
    y = torch.multinomial(torch.softmax(z / t_true, dim=1), 1, generator=g).squeeze(1)
    return z, y


def median_time(fn: Callable[[], Any], repeats: int) -> tuple[float, Any]:
    """Median wall time of ``fn()`` over ``repeats`` runs after one warm-up, and the last result."""
    result = fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def run(n: int, k: int, repeats: int, seed: int, boot_n: int, boot_k: int, boot_resamples: int) -> dict[str, Any]:
    from netcal.scaling import TemperatureScaling
    from torchmetrics.classification import MulticlassCalibrationError

    z, y = make_logits(n, k, seed)
    probs64 = torch.softmax(z, dim=1)
    probs64_np, y_np = probs64.numpy(), y.numpy()

    def netcal_fit() -> float:
        ts = TemperatureScaling()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ts.fit(probs64_np, y_np)
        return 1.0 / float(np.asarray(ts.temperature).reshape(-1)[0])

    def bracketed_fit():
        warm_start_min_rows = temperature.WARM_START_MIN_ROWS
        temperature.WARM_START_MIN_ROWS = n + 1
        try:
            return fit_temperature(z, y)
        finally:
            temperature.WARM_START_MIN_ROWS = warm_start_min_rows

    t_ours_s, fit = median_time(lambda: fit_temperature(z, y), repeats)
    t_bracketed_s, bracketed = median_time(bracketed_fit, repeats)
    t_netcal_s, t_netcal = median_time(netcal_fit, repeats)

    probs32 = probs64.float()

    def tm_ece() -> float:
        metric = MulticlassCalibrationError(num_classes=k, n_bins=15, norm="l1")
        metric.update(probs32, y)
        return float(metric.compute())

    e_ours_s, ece_ours = median_time(lambda: expected_calibration_error(probs32, y, n_bins=15), repeats)
    e_tm_s, ece_tm = median_time(tm_ece, repeats)

    zb, yb = make_logits(boot_n, boot_k, seed + 1)
    pb = torch.softmax(zb, dim=1)
    boot_s, ci = median_time(lambda: bootstrap_ci("ece", pb, yb, n_resamples=boot_resamples, seed=0), repeats)

    return {
        "n": n,
        "k": k,
        "repeats": repeats,
        "threads": torch.get_num_threads(),
        "temperature": {
            "ours_s": t_ours_s,
            "netcal_s": t_netcal_s,
            "speedup": t_netcal_s / t_ours_s,
            "T_ours": fit.temperature,
            "T_netcal": t_netcal,
            "rel_diff": abs(fit.temperature - t_netcal) / fit.temperature,
            "bracketed_s": t_bracketed_s,
            "T_bracketed": bracketed.temperature,
            "rel_diff_bracketed": abs(fit.temperature - bracketed.temperature) / fit.temperature,
        },
        "ece": {
            "ours_s": e_ours_s,
            "torchmetrics_s": e_tm_s,
            "speedup": e_tm_s / e_ours_s,
            "ece_ours": ece_ours,
            "ece_torchmetrics": ece_tm,
            "abs_diff": abs(ece_ours - ece_tm),
        },
        "bootstrap": {
            "n": boot_n,
            "k": boot_k,
            "n_resamples": boot_resamples,
            "seconds": boot_s,
            "ci": ci.as_dict(),
        },
    }


def markdown(r: dict[str, Any]) -> str:
    t, e, b = r["temperature"], r["ece"], r["bootstrap"]
    lines = [
        f"N = {r['n']:,}, K = {r['k']}, median of {r['repeats']} runs, {r['threads']} torch threads",
        "",
        "| task | calibflow (s) | peer | peer (s) | speed-up (peer / ours) | agreement |",
        "|---|---:|---|---:|---:|---|",
        f"| temperature fit | {t['ours_s']:.4f} | netcal TemperatureScaling | {t['netcal_s']:.4f} | "
        f"{t['speedup']:.1f}x | T {t['T_ours']:.6f} vs {t['T_netcal']:.6f}, rel. diff {t['rel_diff']:.2e} |",
        f"| temperature fit | {t['ours_s']:.4f} | calibflow, bracketed solve only (no warm start) | "
        f"{t['bracketed_s']:.4f} | {t['bracketed_s'] / t['ours_s']:.1f}x | T rel. diff {t['rel_diff_bracketed']:.1e} |",
        f"| ECE (15 bins) | {e['ours_s']:.4f} | torchmetrics MulticlassCalibrationError | {e['torchmetrics_s']:.4f} | "
        f"{e['speedup']:.1f}x | ECE {e['ece_ours']:.7f} vs {e['ece_torchmetrics']:.7f}, "
        f"abs. diff {e['abs_diff']:.1e} |",
        f"| bootstrap_ci('ece'), {b['n_resamples']:,} resamples of {b['n']:,} x {b['k']} | "
        f"{b['seconds']:.4f} | - | - | - | "
        f"CI [{b['ci']['low']:.4f}, {b['ci']['high']:.4f}] around {b['ci']['estimate']:.4f} |",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    _common.add_arguments(parser)
    parser.add_argument("--n", type=int, default=None, help="samples (default 50,000; 2,000 with --smoke)")
    parser.add_argument("--k", type=int, default=None, help="classes (default 100; 10 with --smoke)")
    parser.add_argument("--repeats", type=int, default=None, help="timed runs per task (default 5; 1 with --smoke)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=None, help="also write the results to this JSON file")
    args = parser.parse_args(argv)
    out = _common.results_dir(args, parser)
    smoke = args.smoke
    results = run(
        n=args.n or (2_000 if smoke else 50_000),
        k=args.k or (10 if smoke else 100),
        repeats=args.repeats or (1 if smoke else 5),
        seed=args.seed,
        boot_n=1_000 if smoke else 10_000,
        boot_k=10,
        boot_resamples=100 if smoke else 1_000,
    )
    table = markdown(results)
    print(table)
    _common.publish("calibration_speed", "Calibration speed", table, args, out, argv, results)
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()
