"""Does `calibflow gate plan` plan the right number of test images?

For each model shape, a population with known truth (a reliability curve, a confidence law, how
the wrong labels fall) stands in for the world. One test split of `--sample` images is drawn from
it: the model at hand. `plan_sample_size` plans n from that one sample, for every configured gate
(max_ece, min_accuracy, max_nll, and the champion comparison max_ece_increase and
max_accuracy_drop against the next candidate, a retrain of the model). Then fresh test splits of
the planned n are drawn from the population itself (the next candidate a retrain drawn the same
way) and put through `evaluate_gates`: the share that pass is the power the plan delivered. The
target is 80%; the plan is right when the measured rate lies in 65-95% (95% Wilson intervals).

Shapes: spread and over-confident (10 classes, accuracy ~0.72, the gap growing with
confidence), very confident (10 classes, accuracy ~0.99, ECE 0.004), 100 classes (accuracy
~0.61). Each with an identical retrain (what a deterministic rerun gives); the spread shape also
with a retrain that predicts independently on 30% of the images (planned with
retrain_fresh_share = 0.3).

    python benchmarks/gate_plan_power.py            # docs/results/gate_plan_power.md, minutes
    python benchmarks/gate_plan_power.py --smoke    # tiny sizes, seconds
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common  # noqa: E402
from calibflow.config import GatesConfig  # noqa: E402
from calibflow.gates.checks import Predictions, evaluate_gates  # noqa: E402
from calibflow.gates.plan import SIZES, plan_sample_size, retrain_of  # noqa: E402

NAME = "gate_plan_power"
TARGET, LOW, HIGH = 0.8, 0.65, 0.95
SAMPLE, SIMULATIONS, TRIALS = 2_000, 100, 300
Z95 = 1.959964


class Population:
    """A model's predictions on the world's images: top-label confidence c from `confidence`, the
    rest of the mass over the other classes by a Dirichlet(alpha); right with probability
    right(c); a wrong label drawn in proportion to the other classes' probabilities."""

    def __init__(self, k: int, confidence, right, alpha: float = 0.3):
        self.k, self.confidence, self.right, self.alpha = k, confidence, right, alpha

    def draw(self, n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        c = self.confidence(n, rng)
        rows = np.arange(n)
        predicted = rng.integers(0, self.k, n)
        rest = rng.gamma(self.alpha, 1.0, (n, self.k)) + 1e-300
        rest[rows, predicted] = 0.0
        rest = rest / rest.sum(1, keepdims=True) * (1.0 - c)[:, None]
        rest = np.minimum(rest, 0.999 * c[:, None])  # the top class stays on top
        probs = rest / rest.sum(1, keepdims=True) * (1.0 - c)[:, None]
        probs[rows, predicted] = c
        others = probs.copy()
        others[rows, predicted] = 0.0
        others /= others.sum(1, keepdims=True)
        wrong = (others.cumsum(1) < rng.random((n, 1))).sum(1).clip(0, self.k - 1)
        wrong = np.where(wrong == predicted, (predicted + 1) % self.k, wrong)
        return probs, np.where(rng.random(n) < self.right(c), predicted, wrong)


@dataclass(frozen=True)
class Shape:
    name: str
    population: Population
    gates: GatesConfig
    fresh_share: float = 0.0  # the true next candidate: independent predictions on this share


def _gates(max_ece: float, min_accuracy: float, max_nll: float) -> GatesConfig:
    return GatesConfig(
        max_ece=max_ece, min_accuracy=min_accuracy, max_nll=max_nll, max_ece_increase=0.01, max_accuracy_drop=0.01
    )


SPREAD = Population(10, lambda n, r: 0.25 + 0.75 * r.beta(2.5, 1.0, n), lambda c: c - 0.08 * c)
SHAPES = (
    Shape("spread over-confident", SPREAD, _gates(0.09, 0.68, 1.05)),
    Shape(
        "very confident",
        Population(10, lambda n, r: 1.0 - r.beta(0.6, 80.0, n), lambda c: np.clip(c - 0.004, 0.0, 1.0)),
        _gates(0.02, 0.975, 0.15),
    ),
    Shape(
        "100 classes",
        Population(
            100, lambda n, r: 0.05 + 0.95 * r.beta(2.0, 1.2, n), lambda c: np.clip(c - 0.03, 0.0, 1.0), alpha=0.1
        ),
        _gates(0.05, 0.58, 1.8),
    ),
    Shape("spread over-confident, retrain 30% fresh", SPREAD, _gates(0.09, 0.68, 1.05), fresh_share=0.3),
)


def truth(shape: Shape, rng: np.random.Generator, n: int) -> dict[str, float]:
    """The population's accuracy, top-label ECE (E|c - right(c)|) and NLL, on n draws."""
    probs, labels = shape.population.draw(n, rng)
    conf = probs.max(1)
    true_class = probs[np.arange(n), labels]
    return {
        "accuracy": float(np.mean(shape.population.right(conf))),
        "ece": float(np.mean(np.abs(conf - shape.population.right(conf)))),
        "nll": float(np.mean(-np.log(np.clip(true_class, np.finfo(np.float64).eps, 1.0)))),
    }


def draw_test_set(shape: Shape, n: int, rng: np.random.Generator):
    """A fresh test split from the world: the champion's predictions and the next candidate's."""
    probs, labels = shape.population.draw(n, rng)
    champion = Predictions(probs, labels)
    candidate = Predictions(retrain_of(probs, labels, shape.population, shape.fresh_share, rng), labels)
    return candidate, (candidate, champion)


def wilson(passes: int, trials: int, z: float = Z95) -> tuple[float, float]:
    if trials == 0:
        return 0.0, 1.0
    p = passes / trials
    centre = (p + z * z / (2 * trials)) / (1 + z * z / trials)
    half = z * math.sqrt(p * (1 - p) / trials + z * z / (4 * trials * trials)) / (1 + z * z / trials)
    return max(0.0, centre - half), min(1.0, centre + half)


def run_shape(
    shape: Shape, *, sample: int, simulations: int, trials: int, seed: int, truth_n: int, sizes=SIZES
) -> dict:
    rng = np.random.default_rng(seed)
    started = time.perf_counter()
    probs, labels = shape.population.draw(sample, rng)
    plan = plan_sample_size(
        Predictions(probs, labels),
        shape.gates,
        simulations=simulations,
        seed=seed,
        retrain_fresh_share=shape.fresh_share,
        sizes=sizes,
    )
    row = {
        "shape": shape.name,
        "classes": shape.population.k,
        "fresh_share": shape.fresh_share,
        "truth": truth(shape, rng, truth_n),
        "gates": {
            g: getattr(shape.gates, g)
            for g in ("max_ece", "min_accuracy", "max_nll", "max_ece_increase", "max_accuracy_drop")
        },
        "sample": sample,
        "simulations": simulations,
        "planned": plan.needed,
        "comparison": plan.comparison,
    }
    # with no size planned, the largest simulated one is measured: how far from the power it is
    at = plan.needed or plan.rows[-1].n
    row["measured_at"] = at
    passes, per_gate = 0, {}
    for trial in range(trials):
        candidate, pair = draw_test_set(shape, at, rng)
        verdict = evaluate_gates(candidate, shape.gates, pair, seed=trial, report_estimates=False)
        passes += verdict.passed
        for check in verdict.checks:
            per_gate[check.name] = per_gate.get(check.name, 0) + check.passed
    low, high = wilson(passes, trials)
    row.update(
        trials=trials,
        passes=passes,
        rate=passes / trials,
        wilson_low=low,
        wilson_high=high,
        gate_rates={g: k / trials for g, k in per_gate.items()},
    )
    row["within_target"] = bool(plan.needed is not None and LOW <= row["rate"] <= HIGH)
    row["seconds"] = time.perf_counter() - started
    return row


def _run_job(job) -> dict:
    index, settings = job
    return run_shape(SHAPES[index], **settings)


def report(rows: list[dict], *, sample: int, simulations: int, trials: int) -> str:
    lines = [
        f"Plan from one test split of {sample:,} images of the model (`plan_sample_size`, {simulations} simulated "
        f"sets a size), then {trials} fresh test splits of the planned size from the world; power target "
        f"{TARGET:.0%}, the plan right when the measured pass rate is in {LOW:.0%}-{HIGH:.0%}. Gates at one-sided "
        "95%, the default metric (smooth ECE); rates with 95% Wilson intervals.",
        "",
        "| shape | classes | true accuracy | true ECE | true NLL | gates (ECE, acc, NLL) | next candidate "
        "| planned n | passes at planned n | 95% Wilson | in 65-95% |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        t, g = r["truth"], r["gates"]
        retrain = "identical retrain" if r["fresh_share"] == 0 else f"retrain, {r['fresh_share']:.0%} fresh"
        planned = f"{r['planned']:,}" if r["planned"] else f"none up to {r['measured_at']:,} (measured there)"
        lines.append(
            f"| {r['shape']} | {r['classes']} | {t['accuracy']:.4f} | {t['ece']:.4f} | {t['nll']:.3f} | "
            f"{g['max_ece']}, {g['min_accuracy']}, {g['max_nll']} | {retrain} | {planned} | "
            f"{r['rate']:.1%} ({r['passes']}/{r['trials']}) | {r['wilson_low']:.1%}-{r['wilson_high']:.1%} | "
            f"{'yes' if r['within_target'] else 'NO'} |"
        )
    lines += [
        "",
        "Per gate, the pass rate at the planned n (fresh splits from the world):",
        "",
        "| shape | " + " | ".join(GATE_ORDER) + " |",
        "| --- |" + " --- |" * len(GATE_ORDER),
    ]
    for r in rows:
        rates = r["gate_rates"]
        lines.append(
            f"| {r['shape']} | " + " | ".join(f"{rates[g]:.1%}" if g in rates else "n/a" for g in GATE_ORDER) + " |"
        )
    lines += [
        "",
        "max_ece_increase and max_accuracy_drop: the model at hand is the champion and the next candidate a "
        "retrain of it on the same images; the plan assumes what the world does (an identical retrain, or "
        "`retrain_fresh_share` 0.3). A plan made for an identical retrain is optimistic for a retrain that "
        "differs: say which retrain to plan for.",
    ]
    return "\n".join(lines)


GATE_ORDER = ("max_ece", "min_accuracy", "max_nll", "max_ece_increase", "max_accuracy_drop")


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    _common.add_arguments(parser)
    parser.add_argument("--sample", type=int, default=None, help=f"the model at hand's test split (default {SAMPLE})")
    parser.add_argument("--simulations", type=int, default=None, help=f"the plan's sets a size (default {SIMULATIONS})")
    parser.add_argument("--trials", type=int, default=None, help=f"fresh splits at the planned n (default {TRIALS})")
    parser.add_argument("--workers", type=int, default=None, help="processes, one shape each (default 2)")
    args = parser.parse_args(argv)
    out = _common.results_dir(args, parser)
    sample = args.sample or (100 if args.smoke else SAMPLE)
    simulations = args.simulations or (2 if args.smoke else SIMULATIONS)
    trials = args.trials or (2 if args.smoke else TRIALS)
    truth_n = 5_000 if args.smoke else 1_000_000
    # a smoke run plans on a short grid: it shows the code runs, its numbers measure nothing
    settings = dict(sample=sample, simulations=simulations, trials=trials, truth_n=truth_n)
    if args.smoke:
        settings["sizes"] = (100, 200)
    jobs = [(i, {**settings, "seed": 1000 + i}) for i in range(len(SHAPES))]  # SHAPES hold lambdas: by index
    workers = args.workers or (1 if args.smoke else 2)
    pool = ProcessPoolExecutor(workers) if workers > 1 else None
    rows = []
    for row in (pool.map if pool else map)(_run_job, jobs):
        rows.append(row)
        print(
            f"{row['shape']}: planned {row['planned']}, passes {row['rate']:.1%} "
            f"[{row['wilson_low']:.1%}, {row['wilson_high']:.1%}] ({row['seconds']:.0f} s)",
            file=sys.stderr,
            flush=True,
        )
    if pool:
        pool.shutdown()
    body = report(rows, sample=sample, simulations=simulations, trials=trials)
    _common.publish(NAME, "gate plan: the power the planned n delivers", body, args, out, argv, rows)
    return rows


def check_smoke(data: list[dict], markdown: str) -> None:
    """What tests/test_benchmarks_smoke.py asserts of a smoke run (any size)."""
    assert [r["shape"] for r in data] == [s.name for s in SHAPES]
    assert {r["classes"] for r in data} == {10, 100}
    for r in data:
        assert 0.0 <= r["wilson_low"] <= r["rate"] <= r["wilson_high"] <= 1.0, r
        assert r["planned"] is None or r["planned"] > 0
        assert 0.0 < r["truth"]["accuracy"] < 1.0 and r["truth"]["ece"] >= 0.0
        assert r["comparison"].startswith("the next candidate is"), r["comparison"]
    assert "| shape | classes |" in markdown and "| very confident | 10 |" in markdown


if __name__ == "__main__":
    main()
