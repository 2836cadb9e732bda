"""How well does a registered model's accuracy get estimated without labels? (issue 14)

Takes a registered version (trained by `calibflow run`, e.g. examples/cifar10-overconfident.yaml),
rebuilds its pinned test split from the registry, and cuts it in two halves: the *reference* half
plays the labeled data of registration (ATC's threshold is fitted there), the *new* half the
images that arrive later without labels. The new half is scored clean and under every corruption of
calibflow.evaluation.corruptions at severities 1-5, through the served pyfunc, and each estimator of
calibflow.evaluation.accuracy_estimation (CBPE, ATC-NE, ATC-MC) is compared with the true accuracy (the labels are
known here). Reported: the estimate and the truth per cell, the mean absolute error per method over
the cells, and how often each method's 95% interval covered the truth.

    python benchmarks/accuracy_estimation.py --repo /path/to/repo --model models:/NAME@champion \
        [--max-images 2000] [--severities 1 2 3 4 5]   # docs/results/accuracy_estimation.md
    python benchmarks/accuracy_estimation.py --smoke   # severity 1 on a tiny project's model: seconds

--repo defaults to this checkout and --model to its params.yaml's model at @champion. --smoke trains
a tiny project under --out (benchmarks/_common.py) unless --repo names one with a registered model.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

import _common  # noqa: E402


def main(argv: list[str] | None = None) -> dict:
    from calibflow.config import CORRUPTION_NAMES, load_config
    from calibflow.evaluation.accuracy_estimation import atc_accuracy, atc_threshold, cbpe_accuracy
    from calibflow.evaluation.corruptions import corrupt_batch
    from calibflow.lifecycle.reproduce import decode_rows, predict_in_batches, rebuild_test_split
    from calibflow.tracking import registration, store

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    _common.add_arguments(parser)
    parser.add_argument("--repo", type=Path, default=None, help="the project holding the registry (default this one)")
    parser.add_argument("--model", default=None, help="models:/NAME@ALIAS or models:/NAME/VERSION")
    parser.add_argument("--max-images", type=int, default=2000, help="images in each half of the test split")
    parser.add_argument("--severities", type=int, nargs="+", default=None, help="default 1-5; 1 with --smoke")
    args = parser.parse_args(argv)
    out = _common.results_dir(args, parser)
    if args.repo is None:
        args.repo = _common.train_smoke_project(out / "project") if args.smoke else REPO
    severities = args.severities or ([1] if args.smoke else [1, 2, 3, 4, 5])
    model_uri = args.model or f"models:/{load_config(args.repo / 'params.yaml', []).registry.model_name}@champion"

    started = time.perf_counter()
    store.configure_tracking(args.repo)
    record = registration.resolve_model_uri(model_uri)
    model = registration.load_model(model_uri)
    rebuilt = rebuild_test_split(record, args.repo)
    rows = rebuilt.split.indices["test"]
    order = np.random.default_rng(0).permutation(len(rows))  # the halves, seeded
    half = min(args.max_images, len(rows) // 2)
    reference_rows, new_rows = rows[order[:half]], rows[order[half : 2 * half]]
    labels = rebuilt.manifest["label_index"].to_numpy()
    reference = predict_in_batches(model, decode_rows(model, rebuilt.data.local_dir, rebuilt.manifest, reference_rows))
    thresholds = {
        score: atc_threshold(reference, labels[reference_rows], score)
        for score in ("negative_entropy", "max_probability")
    }
    new_images = decode_rows(model, rebuilt.data.local_dir, rebuilt.manifest, new_rows)
    truth_labels = labels[new_rows]

    cells = [("clean", 0)] + [(c, s) for c in CORRUPTION_NAMES for s in severities]
    rows_out = []
    for corruption, severity in cells:
        images = new_images if corruption == "clean" else corrupt_batch(new_images, corruption, severity, seed=0)
        probabilities = predict_in_batches(model, images)
        truth = float(np.mean(probabilities.argmax(axis=1) == truth_labels))
        estimates = {
            "cbpe": cbpe_accuracy(probabilities),
            "atc_ne": atc_accuracy(probabilities, thresholds["negative_entropy"], "negative_entropy"),
            "atc_mc": atc_accuracy(probabilities, thresholds["max_probability"], "max_probability"),
        }
        rows_out.append((corruption, severity, truth, estimates))
        print(
            f"{corruption:>17} s{severity} truth {truth:.3f}  "
            + "  ".join(f"{k} {e.estimate:.3f}" for k, e in estimates.items()),
            flush=True,
        )

    methods = ("cbpe", "atc_ne", "atc_mc")
    summary = {}
    lines = [
        f"{record.name} version {record.version}: {half} reference and {half} new test images, "
        f"{len(cells)} cells (clean, and {len(CORRUPTION_NAMES)} corruptions at severities "
        f"{', '.join(map(str, severities))}); {time.perf_counter() - started:.0f} s",
        "",
        "| method | mean absolute error | max absolute error | mean signed error | 95% interval covered the truth |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for method in methods:
        errors = np.array([e[method].estimate - truth for _, _, truth, e in rows_out])
        covered = sum(e[method].lower <= truth <= e[method].upper for _, _, truth, e in rows_out)
        summary[method] = {
            "mean_absolute_error": float(np.mean(np.abs(errors))),
            "max_absolute_error": float(np.max(np.abs(errors))),
            "mean_signed_error": float(np.mean(errors)),
            "covered": int(covered),
        }
        lines.append(
            f"| {method} | {np.mean(np.abs(errors)):.3f} | {np.max(np.abs(errors)):.3f} | "
            f"{np.mean(errors):+.3f} | {covered} of {len(rows_out)} |"
        )
    lines += [
        "",
        "| cell | true accuracy | " + " | ".join(methods) + " |",
        "| --- | ---: | " + " | ".join("---:" for _ in methods) + " |",
    ]
    for corruption, severity, truth, estimates in rows_out:
        name = "clean" if corruption == "clean" else f"{corruption} s{severity}"
        lines.append(f"| {name} | {truth:.3f} | " + " | ".join(f"{estimates[m].estimate:.3f}" for m in methods) + " |")
    table = "\n".join(lines)
    print("\n" + table)
    results = {
        "model": f"{record.name} version {record.version}",
        "half": int(half),
        "methods": summary,
        "cells": [
            {
                "corruption": corruption,
                "severity": severity,
                "truth": truth,
                **{m: {"estimate": e.estimate, "lower": e.lower, "upper": e.upper} for m, e in estimates.items()},
            }
            for corruption, severity, truth, estimates in rows_out
        ],
    }
    _common.publish("accuracy_estimation", "Accuracy estimated without labels", table, args, out, argv, results)
    return results


if __name__ == "__main__":
    main()
