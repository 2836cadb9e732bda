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
        [--max-images 2000] [--severities 1 2 3 4 5] [--out docs/accuracy_estimation_results.md]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def main(argv: list[str] | None = None) -> int:
    from calibflow.tracking import registration
    from calibflow.tracking import store
    from calibflow.config import CORRUPTION_NAMES
    from calibflow.evaluation.corruptions import corrupt_batch
    from calibflow.evaluation.accuracy_estimation import atc_accuracy, atc_threshold, cbpe_accuracy
    from calibflow.lifecycle.reproduce import decode_rows, predict_in_batches, rebuild_test_split

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repo", required=True)
    parser.add_argument("--model", required=True, help="models:/NAME@ALIAS or models:/NAME/VERSION")
    parser.add_argument("--max-images", type=int, default=2000, help="images in each half of the test split")
    parser.add_argument("--severities", type=int, nargs="+", default=[1, 2, 3, 4, 5])
    parser.add_argument("--out", type=Path, default=None, help="also write the markdown table here")
    args = parser.parse_args(argv)

    started = time.perf_counter()
    store.configure_tracking(args.repo)
    record = registration.resolve_model_uri(args.model)
    model = registration.load_model(args.model)
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

    cells = [("clean", 0)] + [(c, s) for c in CORRUPTION_NAMES for s in args.severities]
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
    lines = [
        f"{record.name} version {record.version}: {half} reference and {half} new test images, "
        f"{len(cells)} cells (clean, and {len(CORRUPTION_NAMES)} corruptions at severities "
        f"{', '.join(map(str, args.severities))}); {time.perf_counter() - started:.0f} s",
        "",
        "| method | mean absolute error | max absolute error | mean signed error | 95% interval covered the truth |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for method in methods:
        errors = np.array([e[method].estimate - truth for _, _, truth, e in rows_out])
        covered = sum(e[method].lower <= truth <= e[method].upper for _, _, truth, e in rows_out)
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
    if args.out:
        args.out.write_text(table + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
