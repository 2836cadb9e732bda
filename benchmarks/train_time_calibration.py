"""Train-time calibration methods compared on an over-confident CIFAR-10 model, before and after
temperature scaling.

Runs the recipe of examples/cifar10-overconfident.yaml (a small_cnn over-trained on 100 CIFAR-10
images per class) once per method, through the flow's own library steps (calibflow.pipeline:
manifest, split, train, logits, calibrator fit), and reports on the test split accuracy, 15-bin
ECE with its bootstrap standard deviation, smooth ECE (relplot), NLL and Brier, before and after
temperature scaling, with the wall time of each run and the served model's predict time per image.
The tables (the summary beside Mukhoti et al.'s, then the full one) are written to
docs/results/train_time_calibration.md (and printed), so they are regenerated, never typed.
Results accumulate in a JSON file as each method finishes, so an interrupted run keeps what it
measured (--resume skips the methods already there).

    python benchmarks/train_time_calibration.py [--archive ../shared/datasets/cifar10-jpg.tar.gz]
        [--work /tmp/calibflow-ttc] [--methods cross_entropy,mixup,...] [--resume]
    python benchmarks/train_time_calibration.py --subset-only --out DIR   # the recipe's ImageFolder
    python benchmarks/train_time_calibration.py --smoke   # 3 methods on a generated archive, 10 short epochs: seconds

The CIFAR-10 subset (the first 1,600 training images of each class, in file-name order) is built
from the archive by this script; nothing is downloaded. --smoke builds it from an archive of
digits it generates under --out, and shrinks the recipe (SMOKE_OVERRIDES). The benchmark does not
run the corruption suite, so there is no "ECE under shift" column.
"""

from __future__ import annotations

import argparse
import json
import sys
import tarfile
import time
from dataclasses import asdict
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

import _common  # noqa: E402

RECIPE = REPO / "examples" / "cifar10-overconfident.yaml"
# Mukhoti et al. 2020, CIFAR-10 ResNet-50 (Tables 1-2; torrvision/focal_calibration's README): ECE % before
# and after temperature scaling, and T. Their label smoothing is 0.05, ours 0.1.
MUKHOTI_RESNET50 = {
    "cross_entropy": "4.35% -> 1.35% (2.5)",
    "label_smoothing": "2.96% -> 1.67% (0.9), LS 0.05",
    "flsd53": "1.55% -> 0.95% (1.1)",
    "mmce": "4.56% -> 1.19% (2.6)",
}
PER_CLASS = 1600
# --smoke: the recipe on 40 generated images a class, a network that trains in a blink, and three
# methods that between them take every branch of run_method (a mix, one T per member)
SMOKE_PER_CLASS = 40
SMOKE_OVERRIDES = [
    "data.min_per_class=10",
    "split.train=0.4",
    "split.val=0.1",
    "split.calibration=0.25",
    "split.test=0.25",
    "model.width=8",
    "train.epochs=10",
    "train.batch_size=8",
]
SMOKE_METHODS = ("cross_entropy", "mixup", "ensemble")
# name, what the table calls it, the overrides of the recipe. Hyper-parameters are the papers':
# label smoothing 0.1 (Mueller et al. 2019's CIFAR setting), FLSD-53 (Mukhoti et al. 2020), beta
# 0.1 (Pereyra et al. 2017's range), MMCE weight 2, mixup alpha 0.3 (Thulasidasan et al. 2019 find
# 0.2-0.4 calibrates best), CutMix alpha 1 (Yun et al. 2019), 3 members, dropout 0.3 with 20 passes.
METHODS = (
    ("cross_entropy", "cross-entropy", []),
    ("label_smoothing", "label smoothing 0.1", ["train.label_smoothing=0.1"]),
    ("flsd53", "focal, FLSD-53", ["train.loss=flsd53"]),
    ("confidence_penalty", "confidence penalty 0.1", ["train.loss=confidence_penalty", "train.confidence_penalty=0.1"]),
    ("mmce", "MMCE (weight 2)", ["train.loss=mmce", "train.mmce_weight=2"]),
    ("mixup", "mixup (alpha 0.3)", ["train.mix=mixup", "train.mix_alpha=0.3"]),
    ("cutmix", "CutMix (alpha 1)", ["train.mix=cutmix", "train.mix_alpha=1"]),
    ("mc_dropout", "MC dropout (p 0.3, 20 passes)", ["model.dropout=0.3", "model.mc_dropout=20"]),
    ("ensemble", "deep ensemble of 3", ["model.ensemble=3"]),
)


def build_subset(archive: Path, out: Path, per_class: int = PER_CLASS) -> Path:
    """An ImageFolder of the first `per_class` training images of each class (file-name order)."""
    if out.is_dir() and sum(1 for _ in out.glob("*/*.jpg")) == 10 * per_class:
        return out
    out.mkdir(parents=True, exist_ok=True)
    # One pass over the compressed stream (random access into a .tar.gz re-reads it from the start).
    by_class: dict[str, dict[str, bytes]] = {}
    with tarfile.open(archive, "r|gz") as tar:
        for member in tar:
            parts = Path(member.name).parts
            if member.isfile() and len(parts) >= 3 and parts[-3] == "train":
                by_class.setdefault(parts[-2], {})[parts[-1]] = tar.extractfile(member).read()
    for name, files in sorted(by_class.items()):
        (out / name).mkdir(exist_ok=True)
        for filename in sorted(files)[:per_class]:
            (out / name / filename).write_bytes(files[filename])
    return out


def manifest_of(data_dir: Path, work: Path):
    """The flow's manifest of the subset, written once (hashing 16,000 files is not free)."""
    from calibflow.pipeline import data_steps

    record = work / "manifest.json"
    if record.is_file():
        saved = json.loads(record.read_text())
        return data_steps.ManifestRecord(**{**saved, "classes": tuple(saved["classes"])})
    manifest = data_steps.write_manifest(str(data_dir), str(work / "manifest.csv"))
    record.write_text(json.dumps(asdict(manifest)))
    return manifest


def run_method(
    name: str,
    overrides: list[str],
    data_dir: Path,
    work: Path,
    n_bins: int = 15,
    reuse_checkpoint: bool = False,
    n_resamples: int = 1000,
) -> dict:
    import torch

    from calibflow.config import load_config
    from calibflow.gates.statistics import smooth_ece
    from calibflow.metrics import bootstrap_ci, probability_report, top_label
    from calibflow.pipeline import data_steps, evaluation_steps, model_steps
    from calibflow.training.ensembles import served_probabilities, uncalibrated_probabilities
    from calibflow.training.models import load_checkpoint

    config = load_config(RECIPE, [f"data.path={data_dir}", *overrides])
    out = work / name
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    manifest = manifest_of(data_dir, work)
    split = data_steps.write_split(manifest.path, config.split, config.seed, str(work / "splits.json"))
    checkpoint = out / "checkpoint.pt"
    if reuse_checkpoint and checkpoint.is_file():  # e.g. a run that trained, then failed after training
        train_seconds = final_train_loss = None
    else:
        trained = model_steps.train_model(str(data_dir), manifest, split.path, config, str(out))
        train_seconds, final_train_loss = time.perf_counter() - started, trained.final_train_loss
    logits = {
        s: model_steps.write_split_logits(
            str(checkpoint),
            str(data_dir),
            manifest.path,
            split.path,
            s,
            str(out / f"logits_{s}.npz"),
            batch_size=config.evaluation.batch_size,
            device="cpu",
        )
        for s in ("calibration", "test")
    }
    fit = evaluation_steps.fit_calibration(logits["calibration"], config.calibration, str(out / "calibration.json"))
    z, labels = model_steps.load_logits(logits["test"])
    calibrator = evaluation_steps.load_calibrator(fit.state_path)

    row = {
        "method": name,
        "overrides": overrides,
        "n_train": split.sizes["train"],
        "n_test": int(len(labels)),
        "n_calibration": split.sizes["calibration"],
        "train_seconds": train_seconds,
        "final_train_loss": final_train_loss,
        "reused_checkpoint": train_seconds is None,
        "temperatures": [m["temperature"] for m in json.loads(Path(fit.state_path).read_text()).get("members", [])]
        or [fit.temperature],
    }
    for when, probs in (("before", uncalibrated_probabilities(z)), ("after", calibrator.transform(z))):
        report = probability_report(probs, labels, n_bins)
        interval = bootstrap_ci("ece", probs, labels, n_resamples=n_resamples, n_bins=n_bins)
        confidence, predicted = top_label(probs)
        smooth, _ = smooth_ece(confidence.numpy(), (predicted.numpy() == labels).astype(float))
        row[when] = {**report, "ece_low": interval.low, "ece_high": interval.high, "smooth_ece": smooth}
    # The served model's predict time: the function the registered pyfunc calls, on 1,000 test images.
    loaded = load_checkpoint(checkpoint)
    fmt = data_steps.ImageFormat(mode=loaded.image_mode, width=loaded.spec.image_width, height=loaded.spec.image_height)
    images, _, _ = data_steps.load_split_images(str(data_dir), manifest.path, split.path, "test", fmt, limit=1000)
    with torch.no_grad():
        served_probabilities(loaded.members, calibrator, images[:64], loaded.mc_samples, loaded.mc_seed)  # warm-up
        tick = time.perf_counter()
        served_probabilities(loaded.members, calibrator, images, loaded.mc_samples, loaded.mc_seed)
        row["predict_ms_per_image"] = 1000 * (time.perf_counter() - tick) / len(images)
    row["wall_seconds"] = time.perf_counter() - started
    return row


def _number(value, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def table(rows: list[dict]) -> str:
    labels = {name: label for name, label, _ in METHODS}

    def spread(m: dict) -> str:
        # The stored bounds are the 2.5% and 97.5% quantiles of 1,000 bootstrap plug-in ECEs. Near 0
        # a resample's binned ECE is biased upward, so no interval built from them covers the true
        # ECE reliably; the table gives their spread as a standard deviation (width / 3.92), the
        # size of the noise to read differences against.
        return f"{100 * m['ece']:.2f}% ± {100 * (m['ece_high'] - m['ece_low']) / 3.92:.2f}"

    lines = [
        "| method | accuracy | ECE before TS (± bootstrap sd) | ECE after TS (± bootstrap sd) | smooth ECE before / after | "
        "NLL before / after | Brier before / after | T (per member) | final training loss | run s | predict ms/image |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        b, a = r["before"], r["after"]
        temps = "/".join(f"{t:.2f}" for t in r["temperatures"])
        lines.append(
            f"| {labels.get(r['method'], r['method'])} | {a['accuracy']:.3f} | "
            f"{spread(b)} | {spread(a)} | "
            f"{100 * b['smooth_ece']:.2f}% / {100 * a['smooth_ece']:.2f}% | {b['nll']:.3f} / {a['nll']:.3f} | "
            f"{b['brier']:.3f} / {a['brier']:.3f} | {temps} | {_number(r['final_train_loss'], '.3f')} | "
            f"{_number(r['wall_seconds'], '.0f')}{' (checkpoint reused)' if r.get('reused_checkpoint') else ''} | "
            f"{r['predict_ms_per_image']:.2f} |"
        )
    return "\n".join(lines)


def summary_table(rows: list[dict]) -> str:
    labels = {name: label for name, label, _ in METHODS}
    lines = [
        "| method | accuracy | ECE before -> after TS (T) | Mukhoti et al. 2020, ResNet-50 |",
        "| --- | --- | --- | --- |",
    ]
    for r in rows:
        temps = "/".join(f"{t:.2f}" for t in r["temperatures"])
        lines.append(
            f"| {labels.get(r['method'], r['method'])} | {r['after']['accuracy']:.3f} | "
            f"{100 * r['before']['ece']:.2f}% -> {100 * r['after']['ece']:.2f}% ({temps}) | "
            f"{MUKHOTI_RESNET50.get(r['method'], 'not in their table')} |"
        )
    return "\n".join(lines)


def results_markdown(rows: list[dict]) -> str:
    """The summary beside Mukhoti et al.'s table, then the full table."""
    first = rows[0]
    return "\n".join(
        [
            f"{first['n_train']} training, {first['n_calibration']} calibration and {first['n_test']} test images, "
            "one seed (0) per method.",
            "",
            summary_table(rows),
            "",
            "Each ECE with the standard deviation of its bootstrap (the spread to read differences against), smooth "
            "ECE, NLL, Brier, the fitted temperatures, the run's wall time and the served model's predict time:",
            "",
            table(rows),
        ]
    )


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    _common.add_arguments(
        parser,
        out_help="folder for train_time_calibration.md (default docs/results/; with --smoke a new temporary "
        "folder); with --subset-only, where the ImageFolder goes",
    )
    parser.add_argument("--archive", type=Path, default=REPO.parent / "shared" / "datasets" / "cifar10-jpg.tar.gz")
    parser.add_argument("--work", type=Path, default=Path("/tmp/calibflow-ttc"))
    parser.add_argument("--methods", default=None, help="comma-separated (default: all)")
    parser.add_argument("--resume", action="store_true", help="keep the methods already in the work dir's results")
    parser.add_argument("--subset-only", action="store_true", help="only build the recipe's ImageFolder at --out")
    parser.add_argument(
        "--reuse-checkpoints",
        action="store_true",
        help="evaluate a method's checkpoint left in the work dir instead of training it again",
    )
    args = parser.parse_args(argv)

    from calibflow.environment import apply_quiet_defaults

    apply_quiet_defaults()
    if args.subset_only:
        print(build_subset(args.archive, args.out or args.work / "cifar10-1600"))
        return []
    out = _common.results_dir(args, parser)
    per_class, extra, n_resamples = PER_CLASS, [], 1000
    wanted = (args.methods or ",".join(name for name, _, _ in METHODS)).split(",")
    if args.smoke:
        args.work = out / "work"
        args.archive = _common.image_archive(out / "cifar10-jpg.tar.gz", ["airplane", "automobile", "bird"], 40, 0)
        per_class, extra, n_resamples = SMOKE_PER_CLASS, SMOKE_OVERRIDES, 100
        wanted = args.methods.split(",") if args.methods else list(SMOKE_METHODS)
    args.work.mkdir(parents=True, exist_ok=True)
    data_dir = build_subset(args.archive, args.work / f"cifar10-{per_class}", per_class)
    results_path = args.work / "results.json"
    rows = json.loads(results_path.read_text()) if args.resume and results_path.is_file() else []
    done = {r["method"] for r in rows}
    for name, label, overrides in METHODS:
        if name not in wanted or name in done:
            continue
        print(f"{label}: running", flush=True)
        row = run_method(
            name,
            [*extra, *overrides],
            data_dir,
            args.work,
            reuse_checkpoint=args.reuse_checkpoints,
            n_resamples=n_resamples,
        )
        rows.append(row)
        results_path.write_text(json.dumps(rows, indent=1))
        print(
            f"{label}: accuracy {row['after']['accuracy']:.3f}, ECE {row['before']['ece']:.4f} -> "
            f"{row['after']['ece']:.4f}, {row['wall_seconds']:.0f} s",
            flush=True,
        )
    if not rows:
        parser.error(f"no method ran: --methods {args.methods} names none of {', '.join(n for n, _, _ in METHODS)}")
    order = [name for name, _, _ in METHODS]
    rows.sort(key=lambda r: order.index(r["method"]))
    text = results_markdown(rows)
    print(text)
    _common.publish(
        "train_time_calibration", "Train-time calibration on over-confident CIFAR-10", text, args, out, argv, rows
    )
    return rows


if __name__ == "__main__":
    main()
