"""Fine-tuning from weights calibflow itself trained: what pretraining does to accuracy and calibration.

Issue 26, item 6. Two ImageFolders of 32x32 CIFAR-10 JPEGs from ../shared/datasets (the archive's
bytes, not re-encoded):

- **pretrain**: the 8 classes other than --holdout (default cat, dog), --pretrain-per-class images
  each from the archive's train/ folder;
- **few**: the 2 held-out classes, --few-per-class images each. calibflow splits it itself, with
  split.train 0.2: about 100 training images a class, and 40% of the folder as the test split, so
  that the gates read enough images.

In one scratch project (git + DVC, as a user's), both folders are added with `calibflow data add`,
then:

1. `calibflow run` pretrains on `data/pretrain` (gates any model passes: it must register, its
   numbers are not the point) and registers `pretrain-8`; its served weights are downloaded as a
   user would (`mlflow artifacts download -u models:/pretrain-8/1`: `artifacts/weights.pt`, the
   network's state dict);
2. for each seed, `calibflow run` on `data/few` in each arm, with the same network, epochs and
   learning rate:
   - `scratch`: the seeded initial weights;
   - `finetune`: `model.weights_path` = those weights (the 8-class head replaced by a new 2-class
     one), `train.backbone_lr_factor` 0.1;
   - `frozen`: the same weights, `train.freeze_backbone` true (only the new head trains).
   The seed seeds the split too, so the arms of one seed share their test images: the table
   gives each arm's spread over seeds and the paired difference to `scratch`.

These runs are gated by params.yaml's absolute gates (`max_ece`, `min_accuracy`); a run the gates
refuse (exit 1) is a result and is recorded as such. Each run has its own registered model name,
so none is compared with another's champion. Everything is read back from the run's MLflow record
(metrics, verdict tags, `checkpoint/checkpoint.pt`, `data/splits.json`): test accuracy, ECE (15
bins) before and after temperature scaling, NLL, the temperature; the mean top-label confidence
before and after scaling, which the run does not log, is recomputed from the checkpoint on the
test split, and the same recomputation must give the logged accuracy and ECE (the table says
whether it did).

    python benchmarks/finetune_own_weights.py [--seeds 0-4] [--arms scratch,finetune,frozen] \\
        [--json docs/results/finetune_own_weights.json]      # about 12 min on 2 busy cores
    python benchmarks/finetune_own_weights.py --smoke         # digits, 1 seed, a few epochs: about 2 min

--smoke runs the same steps on a tiny digit archive laid out as the CIFAR-10 one (_common), under
--out: nothing is read from ../shared/datasets. Writes docs/results/finetune_own_weights.md (a full
run), or --out.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common  # noqa: E402

NAME = "finetune_own_weights"
CIFAR = _common.REPO.parent / "shared" / "datasets" / "cifar10-jpg.tar.gz"
ARMS = ("scratch", "finetune", "frozen")
# what each arm adds to the few-image run (WEIGHTS: the pretrained weights.pt)
ARM_SETTINGS = {
    "scratch": (),
    "finetune": ("model.weights_path=WEIGHTS", "train.backbone_lr_factor=0.1"),
    "frozen": ("model.weights_path=WEIGHTS", "train.freeze_backbone=true"),
}
PRETRAIN_SPLIT = {"train": 0.7, "val": 0.05, "calibration": 0.1, "test": 0.15}
FEW_SPLIT = {"train": 0.2, "val": 0.05, "calibration": 0.35, "test": 0.4}
PRETRAIN_MODEL = "pretrain-8"
# The project's params.yaml; what is not named takes calibflow's defaults. No corruption suite:
# what it measures is not the question here and it would double each run's time.
PARAMS = """\
seed: 0
data: {{path: data/pretrain, min_per_class: 10}}
split: {{train: {p[train]}, val: {p[val]}, calibration: {p[calibration]}, test: {p[test]}}}
model: {{arch: {arch}, width: {width}}}
train: {{epochs: {pretrain_epochs}, batch_size: {batch_size}, lr: 0.05, hflip: true, val_every: 5, threads: 1}}
shift: {{corruptions: [], severities: []}}
{calibration}gates: {{max_ece: 1.0, min_accuracy: 0.0, max_ece_increase: null, max_accuracy_drop: null}}
registry: {{model_name: {model}, experiment: pretrain}}
"""
QUIET = {
    "DO_NOT_TRACK": "1",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "DVC_NO_ANALYTICS": "1",
    "GX_ANALYTICS_ENABLED": "false",
}
GIT_IDENTITY = {
    "GIT_AUTHOR_NAME": "calibflow benchmarks",
    "GIT_AUTHOR_EMAIL": "benchmarks@calibflow.invalid",
    "GIT_COMMITTER_NAME": "calibflow benchmarks",
    "GIT_COMMITTER_EMAIL": "benchmarks@calibflow.invalid",
}
# (label, key in a run record, digits, better: "high" | "low" | None)
METRICS = (
    ("test accuracy", "accuracy", 3, "high"),
    ("ECE before scaling", "ece_before", 4, "low"),
    ("ECE after scaling", "ece_after", 4, "low"),
    ("NLL after scaling", "nll_after", 4, "low"),
    ("mean confidence before", "confidence_before", 3, None),
    ("mean confidence after", "confidence_after", 3, None),
    ("temperature T", "temperature", 3, None),
)


# ------------------------------------------------------------------ the two folders


def folders(archive: Path, work: Path, holdout: list[str], pretrain_per_class: int, few_per_class: int) -> dict:
    """work/pretrain/<class>/ (the classes not held out) and work/few/<class>/ (the held-out ones),
    the first N files of each class of the archive's train/ folder in name order, bytes unchanged."""
    with tarfile.open(archive) as tar:
        members = [m for m in tar.getmembers() if m.isfile() and m.name.startswith("train/") and m.name.count("/") == 2]
        classes = sorted({m.name.split("/")[1] for m in members})
        missing = [name for name in holdout if name not in classes]
        if missing or len(set(holdout)) != len(holdout):
            raise SystemExit(f"--holdout {holdout}: each once, of the archive's classes {classes}")
        plan = {"pretrain": [c for c in classes if c not in holdout], "few": list(holdout)}
        wanted = {c: (pretrain_per_class if c not in holdout else few_per_class) for c in classes}
        kept: dict[str, int] = {c: 0 for c in classes}
        chosen = set()
        for member in sorted(members, key=lambda m: m.name):
            label = member.name.split("/")[1]
            if kept[label] < wanted[label]:
                chosen.add(member.name)
                kept[label] += 1
        for folder in plan:
            shutil.rmtree(work / folder, ignore_errors=True)
        # in the archive's own order: a gzip stream read backwards is decompressed again from its start
        for member in members:
            if member.name in chosen:
                label = member.name.split("/")[1]
                target = work / ("few" if label in holdout else "pretrain") / label / Path(member.name).name
                target.parent.mkdir(parents=True, exist_ok=True)
                with tar.extractfile(member) as handle:
                    target.write_bytes(handle.read())
    short = {c: n for c, n in kept.items() if n < wanted[c]}
    if short:
        raise SystemExit(f"{archive}: too few training images in {short}")
    return {"pretrain": plan["pretrain"], "few": plan["few"], "per_class": wanted}


# ------------------------------------------------------------------ the project and its runs


def environment(api_url: str | None) -> dict[str, str]:
    env = {**QUIET, **os.environ, **GIT_IDENTITY, "PYTHONPATH": str(_common.REPO)}
    env.pop("MLFLOW_TRACKING_URI", None)  # the project's own sqlite store, never a server of yours
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    if api_url:
        env["PREFECT_API_URL"] = api_url
    return env


def _run(command: list[str], cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    done = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(
            f"`{' '.join(command)}` exited {done.returncode}:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
        )
    return done


def project(root: Path, work: Path, params: str, env: dict[str, str]) -> Path:
    """A git + DVC repository with params.yaml, and data/pretrain and data/few added by `calibflow data add`."""
    dvc = str(Path(sys.executable).with_name("dvc"))
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    _run(["git", "init", "-q", "-b", "main"], root, env)
    _run([dvc, "init", "-q"], root, env)
    _run([dvc, "config", "core.analytics", "false"], root, env)
    (root / "params.yaml").write_text(params)
    (root / ".gitignore").write_text("mlflow.db\nmlruns/\nmlartifacts/\n.calibflow/\nreports/\n")
    _run(["git", "add", "-A"], root, env)
    _run(["git", "commit", "-qm", "project"], root, env)
    for name in ("pretrain", "few"):
        _run([*_common.calibflow_command(), "data", "add", str(work / name), "--name", name], root, env)
    return root


def calibflow_run(repo: Path, sets: list[str], env: dict[str, str]) -> tuple[int, float, str, str]:
    """`calibflow run --force --set ...`: (exit code, wall seconds, the command as a user types it,
    its last line on stderr). Exit 1 is a decision about the model (a gate refused it): a result.
    Exit 2 (could not run, e.g. no temperature optimum) is recorded by the caller, not a result."""
    arguments = ["run", "--force", *(arg for s in sets for arg in ("--set", s))]
    started = time.perf_counter()
    done = subprocess.run([*_common.calibflow_command(), *arguments], cwd=repo, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - started
    if done.returncode not in (0, 1, 2):
        raise SystemExit(
            f"`calibflow {' '.join(arguments)}` exited {done.returncode}:\n{done.stdout[-3000:]}\n{done.stderr[-5000:]}"
        )
    said = [line for line in done.stderr.splitlines() if line.startswith("calibflow run:")]
    return done.returncode, wall, "calibflow " + " ".join(arguments), (said or done.stderr.splitlines() or [""])[-1]


def tracking_uri(repo: Path) -> str:
    return f"sqlite:///{repo / 'mlflow.db'}"


def latest_run(repo: Path, experiment: str):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri(repo))
    found = client.get_experiment_by_name(experiment)
    runs = client.search_runs([found.experiment_id], order_by=["attribute.start_time DESC"], max_results=1)
    if not runs:
        raise SystemExit(f"no MLflow run in experiment {experiment} of {repo}")
    return client, runs[0]


def registered_weights(repo: Path, model: str, version: str, into: Path) -> Path:
    """The served model's weights.pt, downloaded from the registry as a user would
    (`mlflow artifacts download -u models:/NAME/VERSION`)."""
    import mlflow

    uri = tracking_uri(repo)
    # a models:/ URI is resolved by the global registry URI (download_artifacts' own argument is not
    # passed on to the models:/ repository in MLflow 3.x)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    local = mlflow.artifacts.download_artifacts(artifact_uri=f"models:/{model}/{version}", dst_path=str(into))
    weights = Path(local) / "artifacts" / "weights.pt"
    if not weights.is_file():
        raise SystemExit(f"models:/{model}/{version} has no artifacts/weights.pt under {local}")
    return weights


def test_split_check(repo: Path, client, run_id: str, data_path: str, temperature: float, scratch: Path) -> dict:
    """From the run's checkpoint, its split indices and manifest: the test split's mean top-label
    confidence before and after scaling by T, and accuracy and ECE recomputed, to compare with what
    the run logged."""
    import numpy as np
    import torch
    from PIL import Image

    from calibflow.metrics import accuracy, expected_calibration_error
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
    chosen = [rows[i] for i in splits["indices"]["test"]]
    labels = torch.tensor([int(row["label_index"]) for row in chosen])
    pixels = []
    for row in chosen:
        with Image.open(repo / data_path / row["path"]) as image:
            array = np.asarray(image.convert(checkpoint.image_mode))
        pixels.append(array[None] if array.ndim == 2 else array.transpose(2, 0, 1))
    images = torch.from_numpy(np.stack(pixels))
    logits = collect_logits(checkpoint.model, images, 256).double()
    before, after = logits.softmax(dim=1), (logits / temperature).softmax(dim=1)
    return {
        "train_images": len(splits["indices"]["train"]),
        "test_images": len(chosen),
        "confidence_before": before.max(dim=1).values.mean().item(),
        "confidence_after": after.max(dim=1).values.mean().item(),
        "recomputed": {
            "accuracy": accuracy(before, labels),
            "ece_before": expected_calibration_error(before, labels),
            "ece_after": expected_calibration_error(after, labels),
        },
    }


def read_run(repo: Path, experiment: str, exit_code: int, wall: float, command: str, scratch: Path) -> dict:
    """One run's record, from MLflow: its metrics, gate verdict and test-split confidence."""
    client, run = latest_run(repo, experiment)
    metrics, tags = run.data.metrics, run.data.tags
    config = yaml.safe_load(Path(client.download_artifacts(run.info.run_id, "config.yaml", str(scratch))).read_text())
    temperature = metrics["calibration/temperature"]
    record = {
        "run_id": run.info.run_id,
        "command": command,
        "exit_code": exit_code,
        "registered": exit_code == 0,
        "verdict": tags.get("verdict/absolute"),
        "failed_gates": tags.get("verdict/failed"),
        "seed": int(config["seed"]),
        "accuracy": metrics["test/calibrated/accuracy"],
        "accuracy_before": metrics["test/uncalibrated/accuracy"],
        "ece_before": metrics["test/uncalibrated/ece"],
        "ece_after": metrics["test/calibrated/ece"],
        "nll_before": metrics["test/uncalibrated/nll"],
        "nll_after": metrics["test/calibrated/nll"],
        "temperature": temperature,
        "val_accuracy": metrics.get("val/accuracy"),
        "gate_bounds": {
            "max_ece": metrics.get("gate/max_ece_bound"),
            "min_accuracy": metrics.get("gate/min_accuracy_bound"),
        },
        "wall_s": wall,
    }
    check = test_split_check(repo, client, run.info.run_id, config["data"]["path"], temperature, scratch)
    recomputed = check.pop("recomputed")
    record.update(check)
    record["reproduced"] = (
        recomputed["accuracy"] == record["accuracy_before"]
        and abs(recomputed["ece_before"] - record["ece_before"]) < 1e-6
        and abs(recomputed["ece_after"] - record["ece_after"]) < 1e-6
    )
    record["recomputed"] = recomputed
    return record


# ------------------------------------------------------------------ the numbers


def spread(values: list[float]) -> dict:
    return {
        "mean": statistics.fmean(values),
        "sd": statistics.stdev(values) if len(values) > 1 else None,
        "min": min(values),
        "max": max(values),
        "n": len(values),
    }


def summarise(runs: list[dict], arms: list[str]) -> dict:
    """Each arm's spread over the runs that ran (a run that could not, exit 2, is counted apart),
    and each pretrained arm's paired difference to `scratch`, seed by seed."""
    by_arm = {arm: [r for r in runs if r["arm"] == arm and r["exit_code"] != 2] for arm in arms}
    summary = {
        arm: {
            **({key: spread([r[key] for r in rows]) for _, key, _, _ in METRICS} if rows else {}),
            "passed": sum(r["registered"] for r in rows),
            "runs": len(rows),
            "could_not_run": sum(r["arm"] == arm and r["exit_code"] == 2 for r in runs),
        }
        for arm, rows in by_arm.items()
    }
    paired = {}
    for arm in arms:
        if arm == "scratch" or "scratch" not in arms:
            continue
        base = {r["seed"]: r for r in by_arm["scratch"]}
        pairs = [(r, base[r["seed"]]) for r in by_arm[arm] if r["seed"] in base]
        if not pairs:
            continue
        paired[arm] = {
            key: {
                **spread([a[key] - b[key] for a, b in pairs]),
                "higher": sum(a[key] > b[key] for a, b in pairs),
                "lower": sum(a[key] < b[key] for a, b in pairs),
            }
            for _, key, _, _ in METRICS
        }
    return {"arms": summary, "paired": paired}


def _sd(s: dict, digits: int) -> str:
    return f"{s['mean']:.{digits}f} ± {s['sd']:.{digits}f}" if s["sd"] is not None else f"{s['mean']:.{digits}f}"


def _word(d: dict, better: str | None) -> str:
    """A paired difference in a word: the same sign in every seed, in all but one of 4 or more
    ("mostly"), or "no consistent difference"."""
    n, higher, lower = d["n"], d["higher"], d["lower"]
    up = higher >= lower
    word = ("better" if up == (better == "high") else "worse") if better else ("higher" if up else "lower")
    if max(higher, lower) == n:
        return word if n > 1 else f"{word} (one seed)"
    if n >= 4 and max(higher, lower) == n - 1:
        return f"mostly {word}"
    return "no consistent difference"


def _fact(d: dict, digits: int, scale: float = 1, unit: str = "") -> str:
    return (
        f"{d['mean'] * scale:+.{digits}f} ± {(d['sd'] or 0) * scale:.{digits}f}{unit}, "
        f"higher in {d['higher']} and lower in {d['lower']} of {d['n']} seeds"
    )


def reading(paired: dict, arm: str) -> str:
    """What pretraining did in `arm` against scratch, in words (see _word), with the figures."""
    d = paired[arm]
    return (
        f"accuracy {_word(d['accuracy'], 'high')} ({_fact(d['accuracy'], 1, 100, ' points')}); "
        f"calibration before scaling {_word(d['ece_before'], 'low')} (ECE {_fact(d['ece_before'], 4)}; mean "
        f"confidence {_word(d['confidence_before'], None)}, {_fact(d['confidence_before'], 3)}); after temperature "
        f"scaling {_word(d['ece_after'], 'low')} (ECE {_fact(d['ece_after'], 4)}; NLL {_word(d['nll_after'], 'low')}, "
        f"{_fact(d['nll_after'], 4)})"
    )


def gate_reading(runs: list[dict], arms: list[str]) -> str:
    """How the gates read each arm: runs registered, and which gate refused how many."""
    parts = []
    for arm in arms:
        rows = [r for r in runs if r["arm"] == arm and r["exit_code"] != 2]
        failed: dict[str, int] = {}
        for r in rows:
            for item in (r.get("failed_gates") or "").split(";"):
                name = item.strip().split(" ")[0]
                if name and name != "none" and not r["registered"]:
                    failed[name] = failed.get(name, 0) + 1
        refusals = ", ".join(f"`{name}` in {count}" for name, count in sorted(failed.items()))
        parts.append(
            f"`{arm}` {sum(r['registered'] for r in rows)} of {len(rows)} registered"
            + (f" (refused by {refusals})" if refusals else "")
        )
    ran = [r["accuracy"] for r in runs if r["exit_code"] != 2]
    return (
        "**Gates** (params.yaml's, on each run's test split): "
        + "; ".join(parts)
        + f". Test accuracy over all these runs: {min(ran):.3f} to {max(ran):.3f}."
    )


def render(record: dict) -> str:
    setup, pre, runs, summary = record["setup"], record["pretrain"], record["runs"], record["summary"]
    arms = setup["arms"]
    few = setup["few_classes"]
    lines = [
        f"Pretraining: `{setup['arch']}`"
        + (f" width {setup['width']}" if setup["arch"] == "small_cnn" else "")
        + f" trained by `calibflow run` on {len(setup['pretrain_classes'])} classes "
        f"({', '.join(setup['pretrain_classes'])}; {setup['pretrain_per_class']} images a class, split "
        f"{PRETRAIN_SPLIT['train']:.0%} train, {pre['train_images']} training images), {setup['pretrain_epochs']} epochs; "
        f"its registered weights (`models:/{PRETRAIN_MODEL}/{pre['version']}`, `artifacts/weights.pt`) start the "
        f"fine-tuned arms. Few-image task: {' vs '.join(few)}, {setup['few_per_class']} images a class, split "
        f"{FEW_SPLIT['train']:.0%} train / {FEW_SPLIT['val']:.0%} val / {FEW_SPLIT['calibration']:.0%} calibration / "
        f"{FEW_SPLIT['test']:.0%} test ({setup['few_train_images']} training images, {setup['few_test_images']} "
        f"test images per run), {setup['epochs']} epochs, batch {setup['batch_size']}, lr 0.05 (one-cycle), "
        f"augmentation (shifts, flips); gates: params.yaml's `max_ece` {setup['gates']['max_ece']:g} and "
        f"`min_accuracy` {setup['gates']['min_accuracy']:g} at 95%. Seeds {', '.join(map(str, setup['seeds']))}: "
        "each seeds the split, initial weights (the new head, in the pretrained arms) and data order; the arms of "
        "one seed share their test images. CPU, 1 torch thread.",
        "",
        "Arms: `scratch` (seeded initial weights), `finetune` (`model.weights_path` = the pretrained weights, "
        "`train.backbone_lr_factor` 0.1), `frozen` (the same weights, `train.freeze_backbone` true: only the new "
        "head trains).",
        "",
        "| pretraining run | test accuracy | ECE before | ECE after | T | test images | wall |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
        f"| {len(setup['pretrain_classes'])} classes, `{pre['command']}` | {pre['accuracy']:.3f} | "
        f"{pre['ece_before']:.4f} | {pre['ece_after']:.4f} | {pre['temperature']:.3f} | {pre['test_images']} | "
        f"{pre['wall_s']:.0f} s |",
        "",
        "Over the seeds, mean ± sd (min-max):",
        "",
        "| arm | " + " | ".join(label for label, _, _, _ in METRICS) + " | gates passed |",
        "| --- | " + " | ".join("---:" for _ in METRICS) + " | ---: |",
    ]
    for arm in arms:
        s = summary["arms"][arm]
        if not s["runs"]:
            lines.append(f"| {arm} | " + " | ".join("no run" for _ in METRICS) + f" | 0 of {s['could_not_run']} |")
            continue
        cells = [f"{_sd(s[key], d)} ({s[key]['min']:.{d}f}-{s[key]['max']:.{d}f})" for _, key, d, _ in METRICS]
        tried = s["runs"] + s["could_not_run"]
        lines.append(f"| {arm} | " + " | ".join(cells) + f" | {s['passed']} of {tried} |")
    if summary["paired"]:
        lines += [
            "",
            "Paired difference to `scratch` (same seed, same test images), mean ± sd (min to max), and in how "
            "many seeds the arm's value is the higher / the lower:",
            "",
            "| arm - scratch | " + " | ".join(label for label, _, _, _ in METRICS) + " |",
            "| --- | " + " | ".join("---:" for _ in METRICS) + " |",
        ]
        for arm, diffs in summary["paired"].items():
            cells = [
                f"{diffs[key]['mean']:+.{d}f} ± {(diffs[key]['sd'] or 0):.{d}f} "
                f"({diffs[key]['min']:+.{d}f} to {diffs[key]['max']:+.{d}f}), "
                f"{diffs[key]['higher']} / {diffs[key]['lower']} of {diffs[key]['n']}"
                for _, key, d, _ in METRICS
            ]
            lines.append(f"| {arm} | " + " | ".join(cells) + " |")
    lines += [
        "",
        'Every run (gate verdict as the run recorded it; "reproduced": the test split\'s accuracy and ECE '
        "recomputed from the run's checkpoint, split indices and T equal the logged ones):",
        "",
        "| arm | seed | test accuracy | ECE before | ECE after | NLL before | NLL after | confidence before | "
        "confidence after | T | gates | reproduced | wall |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- | --- | ---: |",
    ]
    for r in runs:
        if r["exit_code"] == 2:
            lines.append(
                f"| {r['arm']} | {r['seed']} | " + " | ".join("" for _ in range(8)) + " | could not run: "
                f"{r['error'].replace('|', '/')[:200]} | | |"
            )
            continue
        gates = "passed, registered" if r["registered"] else f"refused: {r['failed_gates'] or r['verdict']}"
        lines.append(
            f"| {r['arm']} | {r['seed']} | {r['accuracy']:.3f} | {r['ece_before']:.4f} | {r['ece_after']:.4f} | "
            f"{r['nll_before']:.4f} | {r['nll_after']:.4f} | {r['confidence_before']:.3f} | "
            f"{r['confidence_after']:.3f} | {r['temperature']:.3f} | {gates} | {'yes' if r['reproduced'] else 'NO'} | "
            f"{r['wall_s']:.0f} s |"
        )
    if summary["paired"]:
        lines += [
            "",
            '**What pretraining did** (against `scratch`, paired by seed; "better" or "worse" when every '
            'seed agrees, "mostly" when all but one of 4 or more do):',
            "",
        ]
        for arm in summary["paired"]:
            lines.append(f"- `{arm}`: {reading(summary['paired'], arm)}.")
    lines += ["", gate_reading(runs, arms)]
    lines += ["", f"Total wall time {record['wall_s']:.0f} s."]
    return "\n".join(lines)


# ------------------------------------------------------------------ main


def parse_seeds(text: str) -> list[int]:
    seeds: list[int] = []
    for part in text.split(","):
        low, _, high = part.strip().partition("-")
        seeds += list(range(int(low), int(high or low) + 1))
    if not seeds or len(set(seeds)) != len(seeds) or min(seeds) < 0:
        raise argparse.ArgumentTypeError(f"seeds {text!r}: distinct non-negative integers, e.g. 0-2 or 0,3")
    return seeds


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    _common.add_arguments(parser)
    parser.add_argument("--seeds", type=parse_seeds, default=None, help="default 0-4 (0 with --smoke)")
    parser.add_argument("--arms", default=",".join(ARMS), help=f"comma-separated, of {', '.join(ARMS)}")
    parser.add_argument("--holdout", nargs=2, default=["cat", "dog"], help="the 2 classes fine-tuned on")
    parser.add_argument("--pretrain-per-class", type=int, default=None, help="default 500")
    parser.add_argument("--few-per-class", type=int, default=None, help="default 500 (20%% of them train)")
    parser.add_argument("--pretrain-epochs", type=int, default=None, help="default 15")
    parser.add_argument("--epochs", type=int, default=None, help="the few-image runs' epochs (default 30)")
    parser.add_argument("--arch", default="small_cnn")
    parser.add_argument("--width", type=int, default=16, help="small_cnn's width (default 16)")
    parser.add_argument("--work", type=Path, default=None, help="where the images and the project go (kept)")
    parser.add_argument("--json", dest="json_path", type=Path, default=None, help="also write the record here")
    args = parser.parse_args(argv)
    arms = [a.strip() for a in args.arms.split(",") if a.strip()]
    if not arms or set(arms) - set(ARMS) or len(set(arms)) != len(arms):
        parser.error(f"--arms {args.arms}: of {', '.join(ARMS)}, each once")
    out = _common.results_dir(args, parser)
    smoke = args.smoke
    seeds = args.seeds or ([0] if smoke else [0, 1, 2, 3, 4])
    # the smoke's few images learn nothing in one epoch, and a temperature fitted to logits that carry
    # nothing sits on the search range's edge: a run that cannot run (exit 2), not a result
    pretrain_per_class = args.pretrain_per_class or (30 if smoke else 500)
    few_per_class = args.few_per_class or (80 if smoke else 500)
    pretrain_epochs = args.pretrain_epochs or (5 if smoke else 15)
    epochs = args.epochs or (15 if smoke else 30)
    batch_size = 32
    work = args.work or (out / f"{NAME}_work" if smoke else Path(tempfile.mkdtemp(prefix="calibflow-finetune-")))
    work.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()

    if smoke:  # digits laid out as the CIFAR-10 archive, classes named as its are
        names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
        archive = _common.image_archive(
            work / "digits.tar.gz", names, max(pretrain_per_class, few_per_class), 0, size=16
        )
        # gates any model passes: a tiny test split cannot pass params.yaml's (exit 2, not a result)
        gates = {"max_ece": 1.0, "min_accuracy": 0.0}
    else:
        archive = CIFAR
        own = yaml.safe_load((_common.REPO / "params.yaml").read_text()).get("gates", {})
        gates = {"max_ece": float(own.get("max_ece", 0.07)), "min_accuracy": float(own.get("min_accuracy", 0.75))}
    classes = folders(archive, work, args.holdout, pretrain_per_class, few_per_class)
    params = PARAMS.format(
        p=PRETRAIN_SPLIT,
        arch=args.arch,
        width=args.width,
        pretrain_epochs=pretrain_epochs,
        batch_size=batch_size,
        model=PRETRAIN_MODEL,
        # the smoke's barely trained networks: a wider search range for T than the default [0.05, 20]
        calibration="calibration: {min_temperature: 0.01, max_temperature: 100}\n" if smoke else "",
    )

    import run_timing

    with run_timing.temporary_server() as api_url:
        env = environment(api_url)
        repo = project(work / "project", work, params, env)
        scratch = work / "artifacts"
        code, wall, command, said = calibflow_run(repo, [], env)
        if code != 0:
            raise SystemExit(f"the pretraining run ended with exit {code} (its gates pass any model): {said}")
        pretrain = read_run(repo, "pretrain", code, wall, command, scratch)
        _, run = latest_run(repo, "pretrain")
        pretrain["version"] = run.data.tags["registered_version"]
        weights = registered_weights(repo, PRETRAIN_MODEL, pretrain["version"], work / "weights")
        print(f"pretrained: accuracy {pretrain['accuracy']:.3f} ({wall:.0f} s); weights {weights}", flush=True)

        few_sets = [
            "data.path=data/few",
            *(f"split.{k}={v}" for k, v in FEW_SPLIT.items()),
            f"train.epochs={epochs}",
            *(f"gates.{k}={v}" for k, v in gates.items()),
        ]
        runs = []
        for seed in seeds:
            for arm in arms:
                experiment = f"few-{arm}-s{seed}"
                sets = [
                    *few_sets,
                    f"seed={seed}",
                    *(s.replace("WEIGHTS", str(weights)) for s in ARM_SETTINGS[arm]),
                    f"registry.model_name={experiment}",
                    f"registry.experiment={experiment}",
                ]
                code, wall, command, said = calibflow_run(repo, sets, env)
                if code == 2:  # could not run: recorded, left out of the spreads
                    runs.append({"arm": arm, "seed": seed, "exit_code": 2, "error": said, "command": command})
                    print(f"{arm} seed {seed}: could not run: {said}", flush=True)
                    continue
                record = {"arm": arm, **read_run(repo, experiment, code, wall, command, scratch)}
                runs.append(record)
                print(
                    f"{arm} seed {seed}: accuracy {record['accuracy']:.3f}, ECE {record['ece_before']:.4f} -> "
                    f"{record['ece_after']:.4f}, {'registered' if code == 0 else 'refused'} ({wall:.0f} s)",
                    flush=True,
                )

    ran = [r for r in runs if r["exit_code"] != 2]
    if not ran:
        raise SystemExit("no few-image run could run: " + "; ".join(r["error"] for r in runs))
    first = ran[0]
    setup = {
        "archive": archive.name,
        "holdout": args.holdout,
        "pretrain_classes": classes["pretrain"],
        "few_classes": classes["few"],
        "pretrain_per_class": pretrain_per_class,
        "few_per_class": few_per_class,
        "few_train_images": first["train_images"],
        "few_test_images": first["test_images"],
        "pretrain_epochs": pretrain_epochs,
        "epochs": epochs,
        "batch_size": batch_size,
        "arch": args.arch,
        "width": args.width,
        "arms": arms,
        "seeds": seeds,
        "gates": gates,
        "pretrain_split": PRETRAIN_SPLIT,
        "few_split": FEW_SPLIT,
    }
    record = {
        "setup": setup,
        "pretrain": pretrain,
        "runs": runs,
        "summary": summarise(runs, arms),
        "wall_s": time.perf_counter() - started,
    }
    text = render(record)
    print(text)
    title = "Fine-tuning from calibflow's own weights: pretrained on 8 CIFAR-10 classes, tuned on 2"
    _common.publish_record(NAME, title, text, record, args, out, argv)
    if not smoke and args.work is None:
        shutil.rmtree(work, ignore_errors=True)
    return record


if __name__ == "__main__":
    main()
