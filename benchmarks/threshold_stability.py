"""Does calibration make the decision threshold stable across training seeds?

Issue 13's complaint: the score histograms of a binary classifier shift from one training run to
the next, so the production threshold looks arbitrary. Here five seeds of one recipe (calibflow's
small_cnn trained on CIFAR-10 cat vs dog, benchmarks/real_logits.py) are scored on the same 2,000
cat/dog test images, split once into the same calibration and test halves for every seed. For
each seed the threshold on p(dog) is chosen on the calibration half by the rules of
calibflow.gates.decisions, from the raw softmax and from the temperature-scaled probability (T fitted
on the same calibration half, as the pipeline does), and applied to the test half:

- cost, c_FP = c_FN: the threshold is 0.5 whatever the seed;
- cost, c_FP = 1, c_FN = 4 (a missed dog costs four false alarms): threshold 0.2;
- min_precision 0.8 and min_recall 0.95 at delta = 0.05: the threshold is learnt from the data.

Two recipes (benchmarks/real_logits.py): ``catdog`` (augmented, 6 epochs on 9,000 images: a
network that is nearly calibrated as trained) and ``catdog_overfit`` (2,000 images, no
augmentation, 12 epochs: over-confident, the condition of the issue's complaint).

The spread across seeds (std, range) of the threshold, of the realised test precision/recall,
of the positive-decision rate and of the realised cost is the answer. The std of the same figures
over random calibration/test splits of ONE seed is printed beside, as the floor that split noise
alone gives.

Note what temperature scaling cannot change: with two classes p(dog) = sigmoid((z_dog - z_cat)/T)
is increasing in the logit margin for every T > 0, so the threshold 0.5 makes the same decisions
before and after calibration, and a rule that only ranks the calibration scores (min_precision,
min_recall) picks the same decisions too, just under another number. Calibration can only move
the decisions of a fixed threshold other than 0.5 (the asymmetric cost).

    .venv/bin/python benchmarks/threshold_stability.py [--pools catdog catdog_overfit] [--json PATH]  # docs/results/
    .venv/bin/python benchmarks/threshold_stability.py --smoke   # synthetic logits, 10 noise splits: seconds
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common  # noqa: E402
from calibflow import errors  # noqa: E402
from calibflow.calibrators.temperature import fit_temperature  # noqa: E402
from calibflow.gates import decisions as D  # noqa: E402
from real_logits import load_pool, synthetic_pool  # noqa: E402

DELTA = 0.05
POSITIVE = 1  # dog
RULES = (
    ("cost 1:1", "cost", (1.0, 1.0)),
    ("cost 1:4", "cost", (1.0, 4.0)),
    ("precision >= 0.8", "min_precision", 0.8),
    ("recall >= 0.95", "min_recall", 0.95),
)


def softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def choose(kind: str, arg, scores: np.ndarray, pos: np.ndarray) -> float:
    if kind == "cost":
        return D.cost_threshold(*arg).threshold
    fn = D.min_precision_threshold if kind == "min_precision" else D.min_recall_threshold
    return fn(scores, pos, arg, DELTA).threshold


def evaluate(logits: np.ndarray, labels: np.ndarray, cal: np.ndarray, test: np.ndarray) -> dict:
    """Every rule, raw and calibrated, for one seed's logits on one calibration/test split."""
    temperature = fit_temperature(logits[cal], labels[cal]).temperature
    pos = labels == POSITIVE
    out = {"T": temperature, "accuracy": float((logits[test].argmax(1) == labels[test]).mean())}
    for mode, probs in (("raw", softmax(logits)), ("calibrated", softmax(logits / temperature))):
        score = probs[:, POSITIVE]
        # the skew of the histograms: mean p(dog) of the test cats and test dogs
        out[f"{mode}:mean_p_cat"] = float(score[test][~pos[test]].mean())
        out[f"{mode}:mean_p_dog"] = float(score[test][pos[test]].mean())
        for name, kind, arg in RULES:
            key = f"{mode}:{name}"
            try:
                threshold = choose(kind, arg, score[cal], pos[cal])
            except errors.DecisionInfeasible:
                out[key] = None
                continue
            pred = score[test] >= threshold
            tp = int((pred & pos[test]).sum())
            fp = int((pred & ~pos[test]).sum())
            fn = int((~pred & pos[test]).sum())
            cost_fp, cost_fn = arg if kind == "cost" else (1.0, 1.0)
            out[key] = {
                "threshold": threshold,
                "precision": tp / max(tp + fp, 1),
                "recall": tp / max(tp + fn, 1),
                "rate": float(pred.mean()),
                "cost": (cost_fp * fp + cost_fn * fn) / len(test),
            }
    return out


def spread(values: list[float]) -> dict:
    a = np.asarray(values, float)
    return {
        "mean": float(a.mean()),
        "std": float(a.std(ddof=1)) if len(a) > 1 else 0.0,
        "range": float(a.max() - a.min()),
    }


def stability(pool: dict, split_seed: int, noise_splits: int) -> dict:
    """Every seed on one shared calibration/test split, and seed 0 on `noise_splits` random splits."""
    logits_by_seed, labels = pool["logits"], pool["labels"]
    n = len(labels)
    rng = np.random.default_rng(split_seed)
    perm = rng.permutation(n)
    cal, test = perm[: n // 2], perm[n // 2 :]
    per_seed = [evaluate(z, labels, cal, test) for z in logits_by_seed]
    noise = []
    for _ in range(noise_splits):
        p = rng.permutation(n)
        noise.append(evaluate(logits_by_seed[0], labels, p[: n // 2], p[n // 2 :]))
    rows = []
    for mode in ("raw", "calibrated"):
        for name, _, _ in RULES:
            key = f"{mode}:{name}"
            chosen = [s[key] for s in per_seed if s[key] is not None]
            floor = [s[key] for s in noise if s[key] is not None]
            row = {"mode": mode, "rule": name, "seeds": len(chosen), "infeasible": len(per_seed) - len(chosen)}
            for metric in ("threshold", "precision", "recall", "rate", "cost"):
                if chosen:
                    row[metric] = spread([c[metric] for c in chosen])
                if len(floor) > 1:
                    row[metric + "_split_std"] = float(np.std([c[metric] for c in floor], ddof=1))
            rows.append(row)
    return {
        "seeds": [int(s) for s in pool["seeds"]],
        "per_seed": per_seed,
        "rows": rows,
        "n_cal": len(cal),
        "n_test": len(test),
        "noise_splits": noise_splits,
    }


def markdown(name: str, result: dict) -> str:
    lines = [
        f"#### {name}: {len(result['seeds'])} seeds, calibration {result['n_cal']} / test {result['n_test']} images "
        f"(the same for every seed)",
        "",
        "| seed | test accuracy | T | raw mean p(dog): cats / dogs | calibrated mean p(dog): cats / dogs |",
        "| --- | --- | --- | --- | --- |",
    ]
    for seed, s in zip(result["seeds"], result["per_seed"]):
        lines.append(
            f"| {seed} | {s['accuracy']:.3f} | {s['T']:.3f} | {s['raw:mean_p_cat']:.3f} / "
            f"{s['raw:mean_p_dog']:.3f} | {s['calibrated:mean_p_cat']:.3f} / {s['calibrated:mean_p_dog']:.3f} |"
        )
    lines += [
        "",
        f"Across seeds: mean, std (range); in brackets the std over {result['noise_splits']} random "
        "calibration/test splits of seed 0 (the split-noise floor). Cost per image: at the rule's costs for "
        "the cost rules, the error rate (1:1) for the others.",
        "",
        "| rule | probabilities | threshold | test precision | test recall | positive rate | cost per image |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for row in result["rows"]:
        cells = []
        for metric in ("threshold", "precision", "recall", "rate", "cost"):
            if metric not in row:
                cells.append("infeasible")
                continue
            m = row[metric]
            floor = row.get(metric + "_split_std")
            cells.append(
                f"{m['mean']:.3f}, {m['std']:.3f} ({m['range']:.3f})" + (f" [{floor:.3f}]" if floor is not None else "")
            )
        extra = f" ({row['infeasible']} of 5 infeasible)" if row["infeasible"] else ""
        lines.append(f"| {row['rule']}{extra} | {row['mode']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    _common.add_arguments(parser)
    parser.add_argument("--seed", type=int, default=0, help="seed of the calibration/test split")
    parser.add_argument("--noise-splits", type=int, default=100, help="random splits of seed 0 for the noise floor")
    parser.add_argument(
        "--pools",
        nargs="*",
        default=["catdog", "catdog_overfit"],
        help="logit pools of benchmarks/real_logits.py (built on first use)",
    )
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    out = _common.results_dir(args, parser)
    command = "benchmarks/threshold_stability.py " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
    started = time.perf_counter()
    results = {}
    if args.smoke:
        pool = synthetic_pool(2000, 2, seed=3, seeds=5)
        # different over-confidence per "seed": the raw histograms move, the calibrated ones should not
        pool["logits"] = pool["logits"] * np.linspace(0.6, 1.6, 5)[:, None, None]
        results["synthetic"] = stability(pool, args.seed, min(args.noise_splits, 10))
    else:
        for name in args.pools:
            results[name] = stability(load_pool(name), args.seed, args.noise_splits)
    wall = time.perf_counter() - started
    text = "\n\n".join(markdown(name, result) for name, result in results.items()) + f"\n\nwall time {wall:.0f} s"
    print(f"$ .venv/bin/python {command}\n")
    print(text)
    _common.publish(
        "threshold_stability",
        "Does calibration make a threshold stable across seeds?",
        text,
        args,
        out,
        argv,
        {"command": command, "wall_s": wall, "pools": results},
    )
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"command": command, "wall_s": wall, "pools": results}, indent=1))
    return results


if __name__ == "__main__":
    main()
