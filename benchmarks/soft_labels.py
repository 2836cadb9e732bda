"""Soft and noisy labels on blended digits: does training on the annotators' distribution help?

Issue 27. The claim tested: training with one-hot labels makes a classifier output near 0 or 1 even
where the truth is ambiguous; soft labels (train on each image's distribution) and noisy labels (a
class drawn from it, a new draw each epoch) are two remedies, the first the better.

One blended-digits ImageFolder (calibflow.data.blended_digits: --clean MNIST digits labelled
one-hot, --blended blends of two digits labelled (a, 1-a), a in [0.3, 0.7], with soft_labels.csv)
is added with `calibflow data add` to a scratch project (git + DVC, as a user's). For each seed and
each of `train.targets` hard, soft and sampled, one `calibflow run` with the same network, epochs
and learning rate, and `data.soft_labels=soft_labels.csv` (so the run logs its soft metrics); the
seed seeds the split too, so the three arms of a seed share their test images. Gates any model
passes (every run registers; the numbers, not the verdict, are the point), and a model name per
run (no champion comparison).

From each run's checkpoint, split indices, manifest and fitted temperature T, on its test split,
separately on the clean and on the blended images (from the file name), before and after scaling
by T: accuracy (against the folder's label), ECE (15 bins), NLL against the soft targets
(calibflow.metrics.soft_report's soft_nll), soft ECE, and the mean top-label confidence, beside
the mean of max(a, 1-a) (what a model calibrated to the annotators would say on the blends). The
same recomputation over the whole test split must give the run's logged accuracy and
test/{uncalibrated,calibrated}/soft_nll: the table says whether it did.

    python benchmarks/soft_labels.py [--seeds 0-2] [--epochs 20] [--json docs/results/soft_labels.json]
        # 9 runs of about 1 min each on 2 cores
    python benchmarks/soft_labels.py --smoke --out /tmp/soft_smoke   # 1 seed, tiny data, seconds
    python benchmarks/soft_labels.py --render docs/results/soft_labels.json  # the text again, no runs

Epochs: 20. The comparison means something only where hard-label training is over-confident on
the blends; a probe of one hard run (seed 0, 1500 + 1500 images, width 16) gave a mean top-label
confidence on blended test images of 0.857 at 20 epochs and 0.888 at 30, against 0.601 for the
annotators (mean max(a, 1-a)), and soft NLL on blends of 2.39 and 2.88 against their entropy's 0.67:
20 epochs already show it, and keep 9 runs within about 10 minutes. The full run checks it again
and says so in its results.

--smoke writes its digits archive from scikit-learn's digits (_common.image_archive, 16x16 PNG):
nothing is read from ../shared/datasets. A full run writes docs/results/soft_labels.md (or --out).
"""

from __future__ import annotations

import argparse
import csv
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common  # noqa: E402
import finetune_own_weights as shared  # noqa: E402  (the scratch project's runs and MLflow reads)

NAME = "soft_labels"
TITLE = "Soft and noisy labels on blended digits: hard vs soft vs sampled targets, with and without scaling"
ARMS = ("hard", "soft", "sampled")
SUBSETS = ("clean", "blended")
# before scaling; after the run's T (fitted against the folder's labels); after a T fitted here, on
# the same calibration split, against the soft labels (what calibration.targets: soft fits)
STAGES = ("before", "after", "soft_T")
STAGE_WORDS = {
    "before": "before scaling",
    "after": "after the run's scaling",
    "soft_T": "with T fitted on the soft labels",
}
SPLIT = {"train": 0.6, "val": 0.05, "calibration": 0.15, "test": 0.2}
PARAMS = """\
seed: 0
data: {{path: data/blended, min_per_class: 5, soft_labels: soft_labels.csv}}
split: {{train: {p[train]}, val: {p[val]}, calibration: {p[calibration]}, test: {p[test]}}}
model: {{arch: small_cnn, width: {width}}}
train: {{epochs: {epochs}, batch_size: 64, lr: 0.05, val_every: {epochs}, threads: {threads}}}
shift: {{corruptions: [], severities: []}}
calibration: {{min_temperature: 0.01, max_temperature: 100}}
gates: {{max_ece: 1.0, min_accuracy: 0.0, max_ece_increase: null, max_accuracy_drop: null}}
registry: {{model_name: blended, experiment: blended}}
"""
# (label, key of a subset's stage, digits, better: "high" | "low" | None)
METRICS = (
    ("accuracy", "accuracy", 3, "high"),
    ("ECE", "ece", 4, "low"),
    ("soft NLL", "soft_nll", 4, "low"),
    ("soft ECE", "soft_ece", 4, "low"),
    ("mean confidence", "confidence", 3, None),
)


# ------------------------------------------------------------------ the data and the project


def dataset(work: Path, smoke: bool, clean: int, blended: int, seed: int):
    """work/blended: the blended-digits ImageFolder (from MNIST's train split, or in the smoke from
    a 16x16 digits archive written here)."""
    from calibflow.data.blended_digits import DEFAULT_ARCHIVE, write_blended_digits

    if smoke:
        # three digit classes, little pixel noise: a network learns them in a few epochs, so that a
        # temperature can be fitted (logits that carry nothing put T on the search range's edge)
        names = ["0", "1", "2"]
        archive = _common.image_archive(
            work / "digits.tar.gz", names, 80, 0, size=16, rgb=False, suffix=".png", noise_sd=20.0
        )
    else:
        archive = DEFAULT_ARCHIVE
    written = write_blended_digits(work / "blended", clean=clean, blended=blended, seed=seed, archive=archive)
    return archive, written


def project(root: Path, folder: Path, params: str, env: dict[str, str]) -> Path:
    """A git + DVC repository with params.yaml and data/blended added by `calibflow data add`."""
    dvc = str(Path(sys.executable).with_name("dvc"))
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    shared._run(["git", "init", "-q", "-b", "main"], root, env)
    shared._run([dvc, "init", "-q"], root, env)
    shared._run([dvc, "config", "core.analytics", "false"], root, env)
    (root / "params.yaml").write_text(params)
    (root / ".gitignore").write_text("mlflow.db\nmlruns/\nmlartifacts/\n.calibflow/\nreports/\n")
    shared._run(["git", "add", "-A"], root, env)
    shared._run(["git", "commit", "-qm", "project"], root, env)
    shared._run([*_common.calibflow_command(), "data", "add", str(folder), "--name", "blended"], root, env)
    return root


# ------------------------------------------------------------------ one run, recomputed


def soft_rows(path: Path) -> dict[str, list[float]]:
    with open(path, newline="") as handle:
        return {row.pop("path"): [float(v) for v in row.values()] for row in csv.DictReader(handle)}


def measure(probs, labels, targets) -> dict:
    from calibflow.metrics import accuracy, expected_calibration_error, soft_report

    soft = soft_report(probs, targets)
    return {
        "accuracy": accuracy(probs, labels),
        "ece": expected_calibration_error(probs, labels),
        "soft_nll": soft["soft_nll"],
        "soft_ece": soft["soft_ece"],
        "soft_accuracy": soft["soft_accuracy"],
        "confidence": probs.max(dim=1).values.mean().item(),
    }


def test_split(repo: Path, client, run_id: str, data_path: str, temperature: float, scratch: Path) -> dict:
    """The run's test split from its checkpoint, split indices and manifest, before and after T:
    every metric on the whole split, on its clean images and on its blends."""
    import numpy as np
    import torch
    from PIL import Image

    from calibflow.calibrators.temperature import fit_temperature
    from calibflow.metrics import mean_entropy
    from calibflow.training.loop import collect_logits
    from calibflow.training.models import load_checkpoint

    where = scratch / run_id
    where.mkdir(parents=True, exist_ok=True)
    # prepared as the flow reads its logits (BatchNorm folded, laid out), so its numbers come back
    checkpoint = load_checkpoint(
        client.download_artifacts(run_id, "checkpoint/checkpoint.pt", str(where)), for_inference=True
    )
    splits = json.loads(Path(client.download_artifacts(run_id, "data/splits.json", str(where))).read_text())
    with open(client.download_artifacts(run_id, "data/manifest.csv", str(where)), newline="") as handle:
        rows = list(csv.DictReader(handle))
    soft = soft_rows(repo / data_path / "soft_labels.csv")

    def split_of(name: str):
        """(rows, labels, soft targets, logits) of one split, from its files."""
        chosen = [rows[i] for i in splits["indices"][name]]
        pixels = []
        for row in chosen:
            with Image.open(repo / data_path / row["path"]) as image:
                array = np.asarray(image.convert(checkpoint.image_mode))
            pixels.append(array[None] if array.ndim == 2 else array.transpose(2, 0, 1))
        logits = collect_logits(checkpoint.model, torch.from_numpy(np.stack(pixels)), 512).double()
        labels = torch.tensor([int(row["label_index"]) for row in chosen])
        return chosen, labels, torch.tensor([soft[row["path"]] for row in chosen], dtype=torch.float64), logits

    chosen, labels, targets, logits = split_of("test")
    blend = torch.tensor([Path(row["path"]).name.startswith("blend_") for row in chosen])
    # temperature scaling against the soft labels, by the product's solver (calibration.targets: soft)
    _, calibration_labels, calibration_targets, calibration_logits = split_of("calibration")
    soft_temperature = fit_temperature(
        calibration_logits, calibration_labels, 0.01, 100.0, targets=calibration_targets
    ).temperature
    probs = {
        "before": logits.softmax(dim=1),
        "after": (logits / temperature).softmax(dim=1),
        "soft_T": (logits / soft_temperature).softmax(dim=1),
    }
    found: dict = {"all": {}, "clean": {}, "blended": {}}
    for subset, mask in (("all", torch.ones_like(blend)), ("clean", ~blend), ("blended", blend)):
        for stage, p in probs.items():
            found[subset][stage] = measure(p[mask], labels[mask], targets[mask])
    found["test_images"] = {"all": len(chosen), "clean": int((~blend).sum()), "blended": int(blend.sum())}
    found["soft_temperature"] = soft_temperature
    found["train_images"] = len(splits["indices"]["train"])
    # what a model calibrated to the annotators says on the blends, and the least soft NLL there
    found["blended"]["target_confidence"] = targets[blend].max(dim=1).values.mean().item()
    found["blended"]["target_entropy"] = mean_entropy(targets[blend])
    return found


def read_run(repo: Path, experiment: str, exit_code: int, wall: float, command: str, scratch: Path) -> dict:
    """One run's record: what it logged, and its test split recomputed (test_split)."""
    client, run = shared.latest_run(repo, experiment)
    metrics, tags = run.data.metrics, run.data.tags
    config = yaml.safe_load(Path(client.download_artifacts(run.info.run_id, "config.yaml", str(scratch))).read_text())
    temperature = metrics["calibration/temperature"]
    logged = {
        "accuracy": metrics["test/uncalibrated/accuracy"],
        "soft_nll_before": metrics["test/uncalibrated/soft_nll"],
        "soft_nll_after": metrics["test/calibrated/soft_nll"],
        "ece_before": metrics["test/uncalibrated/ece"],
        "ece_after": metrics["test/calibrated/ece"],
    }
    found = test_split(repo, client, run.info.run_id, config["data"]["path"], temperature, scratch)
    whole = found["all"]
    recomputed = {
        "accuracy": whole["before"]["accuracy"],
        "soft_nll_before": whole["before"]["soft_nll"],
        "soft_nll_after": whole["after"]["soft_nll"],
        "ece_before": whole["before"]["ece"],
        "ece_after": whole["after"]["ece"],
    }
    reproduced = recomputed["accuracy"] == logged["accuracy"] and all(
        abs(recomputed[k] - logged[k]) <= 1e-6 * max(1.0, abs(logged[k])) for k in logged if k != "accuracy"
    )
    return {
        "run_id": run.info.run_id,
        "command": command,
        "exit_code": exit_code,
        "registered": exit_code == 0,
        "verdict": tags.get("verdict/absolute"),
        "seed": int(config["seed"]),
        "targets": config["train"]["targets"],
        "temperature": temperature,
        "wall_s": wall,
        "logged": logged,
        "recomputed": recomputed,
        "reproduced": reproduced,
        **found,
    }


# ------------------------------------------------------------------ the numbers


def value(run: dict, subset: str, stage: str, key: str) -> float:
    return run[subset][stage][key]


def summarise(runs: list[dict], arms: list[str]) -> dict:
    """Per arm, subset, stage and metric: the spread over seeds; per arm other than hard, the paired
    difference to hard seed by seed."""
    ran = [r for r in runs if r["exit_code"] != 2]
    by_arm = {arm: [r for r in ran if r["arm"] == arm] for arm in arms}
    cells = [(s, t, key) for s in SUBSETS for t in STAGES for _, key, _, _ in METRICS]
    summary = {
        arm: {f"{s}/{t}/{k}": shared.spread([value(r, s, t, k) for r in rows]) for s, t, k in cells}
        for arm, rows in by_arm.items()
        if rows
    }
    paired = {}
    base = {r["seed"]: r for r in by_arm.get("hard", [])}
    for arm in arms:
        pairs = [(r, base[r["seed"]]) for r in by_arm[arm] if r["seed"] in base]
        if arm == "hard" or not pairs:
            continue
        paired[arm] = {}
        for s, t, k in cells:
            diffs = [value(a, s, t, k) - value(b, s, t, k) for a, b in pairs]
            paired[arm][f"{s}/{t}/{k}"] = {
                **shared.spread(diffs),
                "higher": sum(d > 0 for d in diffs),
                "lower": sum(d < 0 for d in diffs),
                "by_seed": {b["seed"]: d for (_, b), d in zip(pairs, diffs)},
            }
    target = [r["blended"]["target_confidence"] for r in ran]
    return {
        "arms": summary,
        "paired": paired,
        "target_confidence": shared.spread(target),
        "target_entropy": shared.spread([r["blended"]["target_entropy"] for r in ran]),
        "temperature": {arm: shared.spread([r["temperature"] for r in rows]) for arm, rows in by_arm.items() if rows},
    }


def _cell(s: dict, d: int) -> str:
    sd = f" ± {s['sd']:.{d}f}" if s["sd"] is not None else ""
    return f"{s['mean']:.{d}f}{sd} ({s['min']:.{d}f}-{s['max']:.{d}f})" if s["n"] > 1 else f"{s['mean']:.{d}f}"


def _diff(s: dict, d: int) -> str:
    by_seed = ", ".join(f"{v:+.{d}f}" for v in s["by_seed"].values())
    return f"{s['mean']:+.{d}f} [{by_seed}]"


def _words(diff: dict) -> str:
    """The paired difference's sign in words: every seed agrees, or not."""
    n, higher, lower = diff["n"], diff["higher"], diff["lower"]
    if higher == n:
        return "higher in every seed" if n > 1 else "higher (one seed)"
    if lower == n:
        return "lower in every seed" if n > 1 else "lower (one seed)"
    if higher == lower == 0:
        return "equal in every seed"
    return f"higher in {higher}, lower in {lower} of {n} seeds"


def soft_minus_sampled(paired: dict, stage: str) -> list[float]:
    """Per seed both arms ran: soft's blend soft NLL minus sampled's at `stage` (their paired
    differences to hard share hard's value, so it cancels); [] without both arms."""
    if "soft" not in paired or "sampled" not in paired:
        return []
    key = f"blended/{stage}/soft_nll"
    soft, sampled = paired["soft"][key]["by_seed"], paired["sampled"][key]["by_seed"]
    return [soft[seed] - sampled[seed] for seed in sorted(set(soft) & set(sampled))]


def scaled_hard_against(runs: list[dict], arm: str, key: str) -> list[tuple[int, float]]:
    """Per seed: the hard model after temperature scaling minus `arm` before it, on the blends."""
    hard = {r["seed"]: r for r in runs if r["arm"] == "hard" and r["exit_code"] != 2}
    return [
        (r["seed"], hard[r["seed"]]["blended"]["after"][key] - r["blended"]["before"][key])
        for r in runs
        if r["arm"] == arm and r["exit_code"] != 2 and r["seed"] in hard
    ]


def conclusions(record: dict) -> str:
    """Where the claim holds and where it does not, from the numbers alone."""
    summary, arms = record["summary"], record["setup"]["arms"]
    a, p = summary["arms"], summary["paired"]
    if "hard" not in a:
        return "No `hard` run: nothing to compare the remedies with."
    target = summary["target_confidence"]["mean"]
    hard_conf = a["hard"]["blended/before/confidence"]["mean"]
    parts = [
        f"**Is hard-label training over-confident on the blends?** The hard model's mean top-label confidence "
        f"on blended test images is {hard_conf:.3f} before scaling, against {target:.3f} for the annotators "
        f"(mean max(a, 1-a)); its soft NLL on blends is {a['hard']['blended/before/soft_nll']['mean']:.4f}, "
        f"against the least reachable {summary['target_entropy']['mean']:.4f} (the blends' mean entropy). "
        + (
            "Against the annotators it is over-confident, so the comparison means something."
            if hard_conf > target + 0.02
            else "It is not clearly over-confident: the comparison below says little about the claim."
        )
        + f" Against the folder's label (the heavier digit of the blend) the same model has accuracy "
        f"{a['hard']['blended/before/accuracy']['mean']:.3f} on blends at mean confidence {hard_conf:.3f}, ECE "
        f"{a['hard']['blended/before/ece']['mean']:.4f}"
        + (
            ': close to calibrated for "which digit weighs more", which is what its labels asked, not for '
            '"how would annotators split".'
            if a["hard"]["blended/before/ece"]["mean"] < 0.05
            else "."
        )
        + " Temperature scaling is fitted on the calibration split "
        "against the folder's label, not the soft targets; the fitted T (mean over seeds): "
        + ", ".join(f"{arm} {summary['temperature'][arm]['mean']:.3f}" for arm in arms if arm in summary["temperature"])
        + "."
    ]
    for arm in [x for x in arms if x in p]:
        d = p[arm]
        conf, nll = d["blended/before/confidence"], d["blended/before/soft_nll"]
        conf_after, nll_after = d["blended/after/confidence"], d["blended/after/soft_nll"]
        acc_clean, acc_blend = d["clean/before/accuracy"], d["blended/before/accuracy"]
        parts.append(
            f"**`{arm}` - `hard`** (paired by seed). Before scaling, on blends: mean confidence "
            f"{conf['mean']:+.3f} ({_words(conf)}; {a[arm]['blended/before/confidence']['mean']:.3f} against the "
            f"annotators' {target:.3f}), soft NLL {nll['mean']:+.4f} ({_words(nll)}). After each run's own "
            f"temperature scaling: confidence {conf_after['mean']:+.3f} ({_words(conf_after)}), soft NLL on blends "
            f"{nll_after['mean']:+.4f} ({_words(nll_after)}); the hard model's soft NLL on blends went from "
            f"{a['hard']['blended/before/soft_nll']['mean']:.4f} to {a['hard']['blended/after/soft_nll']['mean']:.4f} "
            f"with scaling alone, {arm}'s from {a[arm]['blended/before/soft_nll']['mean']:.4f} to "
            f"{a[arm]['blended/after/soft_nll']['mean']:.4f}. Accuracy: clean {acc_clean['mean']:+.3f} "
            f"({_words(acc_clean)}), blended {acc_blend['mean']:+.3f} ({_words(acc_blend)}); ECE on clean images "
            f"after scaling {d['clean/after/ece']['mean']:+.4f} ({_words(d['clean/after/ece'])})."
        )
        against = scaled_hard_against(record["runs"], arm, "soft_nll")
        if against:
            values = [v for _, v in against]
            parts[-1] += (
                f" Temperature scaling alone against the remedy alone: the scaled `hard` model's soft NLL on blends "
                f"minus the unscaled `{arm}` model's is {sum(values) / len(values):+.4f} "
                f"[{', '.join(f'{v:+.4f}' for v in values)}] (negative: scaling alone did better)."
            )
    if soft_minus_sampled(p, "before"):
        lines = []
        for stage in STAGES:
            diffs = soft_minus_sampled(p, stage)
            lower = sum(x < 0 for x in diffs)
            lines.append(
                f"{STAGE_WORDS[stage]} soft - sampled "
                f"{sum(diffs) / len(diffs):+.4f} (soft lower in {lower} of {len(diffs)} seeds)"
            )
        parts.append(
            "**Soft against sampled** (the text says soft works better), soft NLL on blends: "
            + "; ".join(lines)
            + f". Mean confidence on blends before scaling: soft {a['soft']['blended/before/confidence']['mean']:.3f}, "
            f"sampled {a['sampled']['blended/before/confidence']['mean']:.3f}."
        )
    parts.append(verdict(record))
    return "\n\n".join(parts)


def _all(diff: dict, sign: int) -> bool:
    """Every seed's paired difference has this sign (-1: lower, +1: higher)."""
    return diff["n"] > 0 and (diff["lower"] if sign < 0 else diff["higher"]) == diff["n"]


def verdict(record: dict) -> str:
    """The claim, part by part: holds, does not, or mixed, from the signs over the seeds."""
    summary, runs = record["summary"], record["runs"]
    a, p = summary["arms"], summary["paired"]
    target = summary["target_confidence"]["mean"]
    hard_conf = a["hard"]["blended/before/confidence"]["mean"]
    items = [
        f"- One-hot training is over-confident on ambiguous images: "
        f"{'holds' if hard_conf > target + 0.02 else 'not shown'} here (hard: {hard_conf:.3f} mean confidence on "
        f"blends, annotators {target:.3f})."
    ]
    for arm in ("soft", "sampled"):
        if arm not in p:
            continue
        conf, nll = p[arm]["blended/before/confidence"], p[arm]["blended/before/soft_nll"]
        both = _all(conf, -1) and _all(nll, -1)
        neither = _all(conf, +1) and _all(nll, +1)
        items.append(
            f"- `{arm}` targets as a remedy (no scaling): {'holds' if both else 'does not hold' if neither else 'mixed'}"
            f" (blend confidence {conf['mean']:+.3f}, {_words(conf)}; blend soft NLL {nll['mean']:+.4f}, "
            f"{_words(nll)}; paired against hard)."
        )
        against = [v for _, v in scaled_hard_against(runs, arm, "soft_nll")]
        scaled = p[arm]["blended/after/soft_nll"]
        if against:
            items.append(
                f"- Temperature scaling of the hard model instead of `{arm}` targets: scaled hard minus unscaled "
                f"`{arm}`, soft NLL on blends {sum(against) / len(against):+.4f} "
                f"({'scaling alone is worse in every seed' if all(v > 0 for v in against) else 'scaling alone is as good or better in every seed' if all(v <= 0 for v in against) else 'mixed over seeds'}); "
                f"`{arm}` minus hard, both scaled: {scaled['mean']:+.4f} ({_words(scaled)}); scaling changed `{arm}`'s "
                f"blend soft NLL by {a[arm]['blended/after/soft_nll']['mean'] - a[arm]['blended/before/soft_nll']['mean']:+.4f}."
            )
    diffs = soft_minus_sampled(p, "before")
    if diffs:
        lower = sum(d < 0 for d in diffs)
        word = "holds" if lower == len(diffs) else "does not hold" if lower == 0 else "mixed"
        items.append(
            f"- Soft better than sampled (blend soft NLL, no scaling): {word} (soft - sampled "
            f"{sum(diffs) / len(diffs):+.4f}, soft lower in {lower} of {len(diffs)} seeds)."
        )
    return '**In short** ("holds" only where every seed agrees):\n\n' + "\n".join(items)


def soft_temperature_paragraph(record: dict) -> str:
    """What fitting T against the soft labels (calibration.targets: soft) does, per arm, on blends."""
    a = record["summary"]["arms"]
    parts = []
    for arm in record["setup"]["arms"]:
        if arm not in a:
            continue
        nll = [a[arm][f"blended/{stage}/soft_nll"]["mean"] for stage in STAGES]
        conf = [a[arm][f"blended/{stage}/confidence"]["mean"] for stage in STAGES]
        parts.append(
            f"{arm}: soft NLL on blends {nll[0]:.4f} before, {nll[1]:.4f} with T fitted on the folder's labels, "
            f"{nll[2]:.4f} with T fitted on the soft labels (mean confidence {conf[0]:.3f} / {conf[1]:.3f} / "
            f"{conf[2]:.3f})"
        )
    return (
        "**Temperature scaling against the soft labels** (`calibration.targets: soft`; here fitted by the "
        "product's solver on each run's calibration split, means over seeds): " + "; ".join(parts) + "."
    )


def render(record: dict) -> str:
    setup, runs, summary = record["setup"], record["runs"], record["summary"]
    arms = setup["arms"]
    first = next(r for r in runs if r["exit_code"] != 2)
    n = first["test_images"]
    lines = [
        f"Data: {setup['clean']} clean MNIST digits (one-hot) and {setup['blended']} blends of two digits of "
        f"different classes (labelled (a, 1-a), a uniform in [0.3, 0.7]), from `{setup['archive']}` "
        f"(`{setup['split_of_archive']}`), blended-digits seed {setup['data_seed']}, "
        f"`calibflow.data.blended_digits`. Split {SPLIT['train']:.0%} train / {SPLIT['val']:.0%} val / "
        f"{SPLIT['calibration']:.0%} calibration / {SPLIT['test']:.0%} test: {first['train_images']} training "
        f"images; {n['all']} test images per run ({n['clean']} clean, {n['blended']} blended). `small_cnn` "
        f"width {setup['width']}, {setup['epochs']} epochs, batch 64, lr 0.05 (one-cycle), shift augmentation, "
        f"{setup['threads']} torch thread(s), CPU; temperature scaling fitted by each run on its calibration split "
        f"(against the folder's label). Seeds {', '.join(map(str, setup['seeds']))}: each seeds the split, the "
        "initial weights, the data order and the sampled targets; the arms of a seed share their test images.",
        "",
        "Arms, `--set train.targets=...`: `hard` (the folder's class), `soft` (cross-entropy against each image's "
        "row of soft_labels.csv), `sampled` (a class drawn from the row, a new draw each epoch). Every run also "
        "has `data.soft_labels=soft_labels.csv`, so it logs its soft metrics.",
        "",
        "Metrics on the test split, recomputed from each run's checkpoint and T: accuracy against the folder's "
        "label, ECE (15 equal-width bins, against the folder's label), soft NLL (cross-entropy of the annotators' "
        "distribution under the model), soft ECE (top-label confidence against the annotators' share of the top "
        f"class), mean top-label confidence. On blends a model calibrated to the annotators would say "
        f"{summary['target_confidence']['mean']:.3f} on average (mean max(a, 1-a)), and no model's soft NLL on "
        f"blends can go below {summary['target_entropy']['mean']:.4f} (their mean entropy).",
    ]
    for subset in SUBSETS:
        lines += [
            "",
            f"**{subset.capitalize()} test images**, over the seeds: mean ± sd (min-max); "
            "stage `before` scaling, `after` the run's temperature scaling (T fitted against the folder's "
            "label), `soft_T` after a T fitted on the same calibration split against the soft labels:",
            "",
            "| arm | stage | " + " | ".join(label for label, _, _, _ in METRICS) + " |",
            "| --- | --- | " + " | ".join("---:" for _ in METRICS) + " |",
        ]
        for arm in arms:
            if arm not in summary["arms"]:
                lines.append(f"| {arm} | | " + " | ".join("no run" for _ in METRICS) + " |")
                continue
            for stage in STAGES:
                cells = [_cell(summary["arms"][arm][f"{subset}/{stage}/{key}"], d) for _, key, d, _ in METRICS]
                lines.append(f"| {arm} | {stage} | " + " | ".join(cells) + " |")
    if summary["paired"]:
        lines += [
            "",
            "Paired differences to `hard` (same seed, same test images): mean [seed by seed]:",
            "",
            "| arm - hard | images | stage | " + " | ".join(label for label, _, _, _ in METRICS) + " |",
            "| --- | --- | --- | " + " | ".join("---:" for _ in METRICS) + " |",
        ]
        for arm, diffs in summary["paired"].items():
            for subset in SUBSETS:
                for stage in STAGES:
                    cells = [_diff(diffs[f"{subset}/{stage}/{key}"], d) for _, key, d, _ in METRICS]
                    lines.append(f"| {arm} - hard | {subset} | {stage} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "Every run (T: the run's fitted temperature; \"reproduced\": the whole test split's accuracy, ECE and "
        "soft NLL before and after scaling recomputed here from the checkpoint equal the run's logged "
        "`test/uncalibrated/accuracy`, `test/*/ece` and `test/*/soft_nll` to 1e-6):",
        "",
        "| arm | seed | T | T on soft labels | logged soft NLL after | recomputed | reproduced | accuracy (all) | gates | wall |",
        "| --- | ---: | ---: | ---: | ---: | ---: | --- | ---: | --- | ---: |",
    ]
    for r in runs:
        if r["exit_code"] == 2:
            lines.append(f"| {r['arm']} | {r['seed']} | | | | | | | could not run: {r['error'][:150]} | |")
            continue
        gates = "passed, registered" if r["registered"] else f"refused ({r['verdict']})"
        lines.append(
            f"| {r['arm']} | {r['seed']} | {r['temperature']:.3f} | {r['soft_temperature']:.3f} | "
            f"{r['logged']['soft_nll_after']:.6f} | "
            f"{r['recomputed']['soft_nll_after']:.6f} | {'yes' if r['reproduced'] else 'NO'} | "
            f"{r['logged']['accuracy']:.3f} | {gates} | {r['wall_s']:.0f} s |"
        )
    lines += ["", conclusions(record), "", soft_temperature_paragraph(record)]
    lines += ["", f"Total wall time {record['wall_s']:.0f} s."]
    return "\n".join(lines)


# ------------------------------------------------------------------ main


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    _common.add_arguments(parser)
    parser.add_argument("--seeds", type=shared.parse_seeds, default=None, help="default 0-2 (0 with --smoke)")
    parser.add_argument("--arms", default=",".join(ARMS), help=f"comma-separated, of {', '.join(ARMS)}")
    parser.add_argument("--clean", type=int, default=None, help="clean digits (default 1500; 60 with --smoke)")
    parser.add_argument("--blended", type=int, default=None, help="blends (default 1500; 60 with --smoke)")
    parser.add_argument("--data-seed", type=int, default=0, help="blended_digits' seed (default 0)")
    parser.add_argument("--epochs", type=int, default=None, help="default 20 (10 with --smoke)")
    parser.add_argument("--width", type=int, default=None, help="small_cnn's width (default 16; 8 with --smoke)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads per run (default 2; 1 with --smoke)")
    parser.add_argument("--work", type=Path, default=None, help="where the images and the project go (kept)")
    parser.add_argument("--json", dest="json_path", type=Path, default=None, help="also write the record here")
    parser.add_argument(
        "--render",
        type=Path,
        default=None,
        help="write the results file again from a full run's --json record, running nothing (a change to the text)",
    )
    args = parser.parse_args(argv)
    if args.render is not None:
        return rerender(args, parser, argv)
    arms = [a.strip() for a in args.arms.split(",") if a.strip()]
    if not arms or set(arms) - set(ARMS) or len(set(arms)) != len(arms):
        parser.error(f"--arms {args.arms}: of {', '.join(ARMS)}, each once")
    out = _common.results_dir(args, parser)
    smoke = args.smoke
    seeds = args.seeds or ([0] if smoke else [0, 1, 2])
    clean = args.clean if args.clean is not None else (60 if smoke else 1500)
    blended = args.blended if args.blended is not None else (60 if smoke else 1500)
    epochs = args.epochs or (10 if smoke else 20)
    threads = args.threads or (1 if smoke else 2)
    width = args.width or (8 if smoke else 16)
    work = args.work or (out / f"{NAME}_work" if smoke else Path(tempfile.mkdtemp(prefix="calibflow-soft-")))
    work.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()

    archive, written = dataset(work, smoke, clean, blended, args.data_seed)
    params = PARAMS.format(p=SPLIT, width=width, epochs=epochs, threads=threads)

    import run_timing

    runs = []
    with run_timing.temporary_server() as api_url:
        env = shared.environment(api_url)
        repo = project(work / "project", written.out, params, env)
        scratch = work / "artifacts"
        for seed in seeds:
            for arm in arms:
                experiment = f"blended-{arm}-s{seed}"
                sets = [
                    f"seed={seed}",
                    f"train.targets={arm}",
                    f"registry.model_name={experiment}",
                    f"registry.experiment={experiment}",
                ]
                code, wall, command, said = shared.calibflow_run(repo, sets, env)
                if code == 2:  # could not run: recorded, left out of the spreads
                    runs.append({"arm": arm, "seed": seed, "exit_code": 2, "error": said, "command": command})
                    print(f"{arm} seed {seed}: could not run: {said}", flush=True)
                    continue
                record = {"arm": arm, **read_run(repo, experiment, code, wall, command, scratch)}
                runs.append(record)
                b = record["blended"]
                print(
                    f"{arm} seed {seed}: accuracy {record['logged']['accuracy']:.3f}, T {record['temperature']:.3f}, "
                    f"blend confidence {b['before']['confidence']:.3f} -> {b['after']['confidence']:.3f} "
                    f"(annotators {b['target_confidence']:.3f}), blend soft NLL {b['before']['soft_nll']:.4f} -> "
                    f"{b['after']['soft_nll']:.4f}, reproduced {record['reproduced']} ({wall:.0f} s)",
                    flush=True,
                )

    if not any(r["exit_code"] != 2 for r in runs):
        raise SystemExit("no run could run: " + "; ".join(r["error"] for r in runs))
    setup = {
        "archive": archive.name,
        "split_of_archive": "train",
        "data_seed": args.data_seed,
        "clean": written.clean,
        "blended": written.blended,
        "epochs": epochs,
        "width": width,
        "threads": threads,
        "arms": arms,
        "seeds": seeds,
        "split": SPLIT,
    }
    record = {"setup": setup, "runs": runs, "summary": summarise(runs, arms), "wall_s": 0.0}
    record["wall_s"] = time.perf_counter() - started
    text = render(record)
    print(text)
    _common.publish_record(NAME, TITLE, text, record, args, out, argv)
    if not smoke and args.work is None:
        shutil.rmtree(work, ignore_errors=True)
    return record


def rerender(args: argparse.Namespace, parser: argparse.ArgumentParser, argv: list[str] | None) -> dict:
    """The results file of a recorded full run, rendered again by this version's text: the numbers
    are the record's (its runs), the summary is recomputed from them."""
    record = json.loads(args.render.read_text())
    record["summary"] = summarise(record["runs"], record["setup"]["arms"])
    out = _common.results_dir(args, parser)
    text = render(record)
    _common.publish(NAME, TITLE, text, args, out, argv, _common.jsonable(record))
    return record


if __name__ == "__main__":
    main()
