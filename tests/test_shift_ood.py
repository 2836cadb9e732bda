"""The corruption suite, the shift and OOD gates, and the OOD scores (no flow, no registry)."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
from scipy import stats

from calibflow.evaluation import corruptions
from calibflow.evaluation import shift
from calibflow.config import CORRUPTION_NAMES, GatesConfig, load_config
from calibflow.errors import ConfigError
from calibflow.gates.statistics import fpr_at_tpr_upper_bound
from calibflow.gates.checks import OODScores, Predictions, evaluate_gates
from calibflow.errors import GateInputError, OODDataError
from calibflow.evaluation.ood import detection_metrics, energy, ood_scores

GRAY = (np.random.default_rng(1).random((6, 8, 8, 1)) * 255).astype(np.uint8)
RGB = (np.random.default_rng(2).random((6, 32, 32, 3)) * 255).astype(np.uint8)


@pytest.mark.parametrize("images", [GRAY, RGB], ids=["gray-8x8", "rgb-32x32"])
@pytest.mark.parametrize("name", CORRUPTION_NAMES)
def test_every_corruption_keeps_shape_dtype_and_range_and_is_deterministic(name, images):
    for severity in range(1, 6):
        out = corruptions.corrupt_batch(images, name, severity, seed=7)
        assert out.shape == images.shape and out.dtype == np.uint8
        assert out.min() >= 0 and out.max() <= 255
        np.testing.assert_array_equal(out, corruptions.corrupt_batch(images, name, severity, seed=7))
        # an image's corruption does not depend on the batch it arrives in or its position
        np.testing.assert_array_equal(out[3:4], corruptions.corrupt_batch(images[3:4], name, severity, seed=7))
        np.testing.assert_array_equal(out[::-1], corruptions.corrupt_batch(images[::-1], name, severity, seed=7))


@pytest.mark.parametrize("name", ["gaussian_noise", "shot_noise", "impulse_noise", "speckle_noise"])
def test_noise_depends_on_the_seed_and_grows_with_severity(name):
    flat = np.full((20, 32, 32, 3), 128, np.uint8)
    assert not np.array_equal(
        corruptions.corrupt_batch(flat, name, 3, seed=0), corruptions.corrupt_batch(flat, name, 3, seed=1)
    )
    distortion = [np.abs(corruptions.corrupt_batch(flat, name, s).astype(int) - 128).mean() for s in range(1, 6)]
    assert distortion == sorted(distortion) and distortion[-1] > 2 * distortion[0]


def test_contrast_and_brightness_follow_their_formulas():
    image = np.array([[[0, 100, 200], [50, 50, 50]]], np.uint8)  # one row, two RGB pixels
    x = image / 255.0
    means = x.mean(axis=(0, 1), keepdims=True)
    expected = np.clip((x - means) * 0.15 + means, 0, 1)
    np.testing.assert_array_equal(
        corruptions.corrupt_image(image, "contrast", 5), (expected * 255 + 0.5).astype(np.uint8)
    )
    brighter = corruptions.corrupt_image(image, "brightness", 5).astype(float)
    # HSV value up by 0.3, hue and saturation kept: the channels keep their ratios
    assert brighter[0, 0].max() == pytest.approx(min(200 / 255 + 0.3, 1) * 255, abs=1)
    assert brighter[0, 0, 1] / brighter[0, 0, 2] == pytest.approx(100 / 200, abs=0.01)
    black = corruptions.corrupt_image(np.zeros((2, 2, 3), np.uint8), "brightness", 1)
    assert (black == round(0.05 * 255)).all()  # black turns gray, not NaN


@pytest.mark.parametrize("images", [GRAY, RGB], ids=["gray-8x8", "rgb-32x32"])
def test_contrast_by_lookup_is_the_pixelwise_formula_to_the_byte(images):
    """contrast looks each pixel up in a per-channel table: the same bytes as the float64 formula
    computed pixel by pixel, so the suites of versions registered before it rebuild unchanged."""
    for severity, c in enumerate(corruptions.SEVERITY_PARAMETERS["contrast"], start=1):
        x = images / 255.0
        means = x.mean(axis=(1, 2), keepdims=True)
        expected = (np.clip((x - means) * c + means, 0, 1) * 255 + 0.5).astype(np.uint8)
        np.testing.assert_array_equal(corruptions.corrupt_batch(images, "contrast", severity), expected)


def test_bad_inputs_to_a_corruption_are_refused():
    with pytest.raises(ValueError, match="unknown corruption"):
        corruptions.corrupt_image(GRAY[0], "fog", 1)
    with pytest.raises(ValueError, match="severity"):
        corruptions.corrupt_image(GRAY[0], "contrast", 6)
    with pytest.raises(ValueError, match="uint8"):
        corruptions.corrupt_image(GRAY[0].astype(np.float32), "contrast", 1)


def test_suite_images_and_logits_are_cached_by_content(tmp_path, monkeypatch):
    suite = shift.Suite(("gaussian_noise", "contrast"), (1, 5), 100, 0)
    first = shift.corrupted_images(GRAY, suite, tmp_path)
    calls = []
    logits_of = lambda images: calls.append(len(images)) or np.zeros((len(images), 3))  # noqa: E731
    shift.suite_logits(first, logits_of, "model-a", tmp_path)
    assert len(calls) == 4

    monkeypatch.setattr(shift, "corrupt_batch", lambda *a, **k: pytest.fail("recomputed a cached corruption"))
    again = shift.corrupted_images(GRAY, suite, tmp_path)
    assert all(np.array_equal(first[k], again[k]) for k in suite.keys)
    shift.suite_logits(again, logits_of, "model-a", tmp_path)
    assert len(calls) == 4  # nothing recomputed
    shift.suite_logits(again, logits_of, "model-b", tmp_path)
    assert len(calls) == 8  # other weights, other logits
    with pytest.raises(pytest.fail.Exception):
        shift.corrupted_images(GRAY[:3], suite, tmp_path)  # other images: not in the cache


def test_suite_logits_are_made_per_cell_and_cached_without_storing_corrupted_images(tmp_path, monkeypatch):
    suite = shift.Suite(("gaussian_noise", "contrast"), (1, 5), 100, 0)
    calls = []
    logits_of = lambda images: calls.append(images.copy()) or images.reshape(len(images), -1)[:, :3].astype(float)  # noqa: E731
    first = shift.cell_logits([GRAY], len(GRAY), suite, logits_of, "model-a", tmp_path)
    corrupted = shift.corrupted_images(GRAY, suite)
    assert len(calls) == 4
    assert all(any(np.array_equal(c, corrupted[k]) for c in calls) for k in suite.keys)  # in any order
    assert all(np.array_equal(first[k], corrupted[k].reshape(len(GRAY), -1)[:, :3]) for k in suite.keys)
    assert not (tmp_path / "images").exists()  # the logits are cached, never the corrupted copies

    monkeypatch.setattr(shift, "corrupt_batch", lambda *a, **k: pytest.fail("corrupted again"))
    again = shift.cell_logits([GRAY], len(GRAY), suite, logits_of, "model-a", tmp_path)
    assert len(calls) == 4 and all(np.array_equal(first[k], again[k]) for k in suite.keys)
    with pytest.raises(pytest.fail.Exception):
        shift.cell_logits([GRAY], len(GRAY), suite, logits_of, "model-b", tmp_path)  # other weights: not in the cache
    with pytest.raises(pytest.fail.Exception):
        shift.cell_logits(
            [GRAY[:3]], len(GRAY[:3]), suite, logits_of, "model-a", tmp_path
        )  # other images: not in the cache


@pytest.mark.parametrize(
    "override, message",
    [
        ("shift.corruptions=[fogg]", "unknown corruption 'fogg'"),
        ("shift.severities=[0, 3]", "not a severity"),
        ("shift.severities=[3, 3]", "each must appear once"),
        ("ood.max_images=0", "ood.max_images = 0: must be positive"),
    ],
)
def test_bad_shift_settings_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])


def test_shift_and_ood_gates_need_their_suite_and_folder():
    with pytest.raises(ConfigError, match="gates.max_shift_ece needs a corruption suite"):
        load_config(None, ["shift.corruptions=[]", "shift.severities=[]", "gates.max_shift_ece=0.1"])
    with pytest.raises(ConfigError, match="gates.max_ood_fpr95 needs ood.path"):
        load_config(None, ["gates.max_ood_fpr95=0.5"])
    config = load_config(None)
    assert config.gates.max_shift_ece is None and config.gates.max_shift_ece_increase is None
    assert config.gates.max_ood_fpr95 is None and config.ood.path is None and config.shift.corruptions


# ---------------------------------------------------------------------------------------------
# Shift gates: a model calibrated under shift passes, one with T far below 1 fails


def softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def shifted_cells(rng: np.random.Generator, n: int = 2000, k: int = 10) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Logits and labels drawn from softmax(logits): T = 1 is the true calibration. Stronger
    corruption, smaller margins."""
    cells = {}
    for severity, scale in ((1, 4.0), (3, 2.5), (5, 1.5)):
        z = rng.normal(size=(n, k)) * scale
        labels = np.array([rng.choice(k, p=p) for p in softmax(z)])
        cells[f"blur_s{severity}"] = (z, labels)
    return cells


def shift_predictions(cells, temperature: float) -> dict[str, Predictions]:
    return {key: Predictions(softmax(z / temperature), y) for key, (z, y) in cells.items()}


@pytest.mark.parametrize("metric", ["ece", "smooth_ece"])
def test_shift_gate_fails_a_model_with_t_far_below_one_and_passes_a_calibrated_one(metric):
    cells = shifted_cells(np.random.default_rng(0))
    gates = GatesConfig(max_ece=1.0, min_accuracy=0.0, metric=metric, max_shift_ece=0.08, max_shift_ece_increase=0.02)
    clean = next(iter(shift_predictions(cells, 1.0).values()))
    good = evaluate_gates(clean, gates, shift=shift_predictions(cells, 1.0))
    bad = evaluate_gates(clean, gates, shift=shift_predictions(cells, 0.2))
    assert good.check("max_shift_ece").passed and good.passed
    assert not bad.check("max_shift_ece").passed and not bad.absolute_passed
    assert bad.check("max_shift_ece").value > 0.15
    check = bad.to_json()["checks"][-1]
    assert check["name"] == "max_shift_ece" and "Bonferroni" in check["method"] and check["bound"] >= check["value"]

    champion = shift_predictions(cells, 1.0)
    pair = (clean, clean)
    same = evaluate_gates(
        clean, gates, pair, shift=champion, shift_comparison={k: (p, champion[k]) for k, p in champion.items()}
    )
    worse = shift_predictions(cells, 0.2)
    worsened = evaluate_gates(
        clean, gates, pair, shift=worse, shift_comparison={k: (worse[k], champion[k]) for k in champion}
    )
    assert same.check("max_shift_ece_increase").passed
    assert not worsened.check("max_shift_ece_increase").passed and not worsened.passed


def test_shift_gates_without_their_inputs_cannot_decide():
    clean = Predictions(softmax(np.eye(3) * 3), np.arange(3))
    with pytest.raises(GateInputError, match="no corruption suite"):
        evaluate_gates(clean, GatesConfig(max_shift_ece=0.1))
    with pytest.raises(GateInputError, match="no corrupted images shared"):
        evaluate_gates(
            clean,
            GatesConfig(max_shift_ece_increase=0.1, max_ece_increase=None, max_accuracy_drop=None),
            (clean, clean),
        )
    with pytest.raises(GateInputError, match="no OOD scores"):
        evaluate_gates(clean, GatesConfig(max_ood_fpr95=0.5))


def constant_confidence_cells(rng, n: int, ece: float, cells: int = 3, confidence: float = 0.9):
    """Binary predictions, every top confidence `confidence`, right with probability confidence - ece:
    true ECE (binned and smooth) exactly `ece` in every cell."""
    out = {}
    for c in range(cells):
        correct = rng.random(n) < confidence - ece
        probabilities = np.column_stack([np.full(n, confidence), np.full(n, 1 - confidence)])
        out[f"c{c}"] = Predictions(probabilities, np.where(correct, 0, 1))
    return out


def test_shift_gate_keeps_its_confidence_on_the_threshold_and_passes_at_a_third_of_it():
    """Simulation against known truth: every cell's true ECE sits on the threshold (0.05), the gate
    must pass at most 5% of the time; at a third of it, with 2,000 images a cell, most of the time."""
    rng = np.random.default_rng(11)
    gates = GatesConfig(max_ece=1.0, min_accuracy=0.0, metric="ece", max_shift_ece=0.05)
    clean = Predictions(np.array([[0.9, 0.1]]), np.array([0]))

    def pass_rate(ece: float, n: int, trials: int) -> float:
        return np.mean(
            [
                evaluate_gates(clean, gates, shift=constant_confidence_cells(rng, n, ece), report_estimates=False)
                .check("max_shift_ece")
                .passed
                for _ in range(trials)
            ]
        )

    on_limit = pass_rate(0.05, 1000, 200)
    assert on_limit <= 0.05, f"passed {on_limit:.1%} of models on the threshold"
    assert pass_rate(0.05 / 3, 2000, 40) >= 0.8


def paired_cells(
    rng, n: int, increase: float, champion_offset: float = 0.0, jitter: float = 0.0, cells: int = 3
) -> dict[str, tuple[Predictions, Predictions]]:
    """(candidate, champion) on the same images with known truth. Both call class 0; the champion's
    confidence p ~ U(0.6, 0.94) and the label is 0 with probability p - champion_offset, so the
    champion's true ECE is champion_offset (0: calibrated). The candidate says p + increase (+ noise
    of sd `jitter`, which averages out within a bin): its true ECE is champion_offset + increase."""
    out = {}
    for c in range(cells):
        p = rng.uniform(0.6, 0.94, n)
        labels = np.where(rng.random(n) < p - champion_offset, 0, 1)
        candidate = np.clip(p + increase + rng.normal(0.0, jitter, n) * (jitter > 0), 0.5, 1.0)
        out[f"c{c}"] = tuple(Predictions(np.column_stack([conf, 1 - conf]), labels) for conf in (candidate, p))
    return out


@pytest.mark.parametrize("champion_offset", [0.0, 0.02], ids=["calibrated-champion", "overconfident-champion"])
def test_shift_increase_gate_keeps_its_confidence_on_the_tolerance(champion_offset):
    """Simulation against known truth: the candidate is worse than the champion by exactly the
    tolerance (0.03) in every cell, against a perfectly calibrated champion (the hard case: its
    estimated error is biased upward, which flatters the candidate) and an over-confident one. The
    gate may pass at most 1 - confidence = 5% of these; the Wilson interval's lower end must be
    below it."""
    rng = np.random.default_rng(21)
    gates = GatesConfig(
        max_ece=1.0,
        min_accuracy=0.0,
        metric="ece",
        max_ece_increase=None,
        max_accuracy_drop=None,
        max_shift_ece_increase=0.03,
    )
    clean = Predictions(np.array([[0.9, 0.1]]), np.array([0]))
    trials = 200
    passed = sum(
        evaluate_gates(
            clean,
            gates,
            (clean, clean),
            shift_comparison=paired_cells(rng, 1000, 0.03, champion_offset),
            report_estimates=False,
        )
        .check("max_shift_ece_increase")
        .passed
        for _ in range(trials)
    )
    low = stats.binomtest(passed, trials).proportion_ci(0.95, method="wilson").low
    assert low <= 0.05, f"passed {passed} of {trials} candidates worse by the full tolerance"


def test_shift_increase_gate_passes_a_candidate_as_good_as_the_champion_given_enough_images():
    """Power: a retrain whose confidences differ from the champion's by noise (sd 0.01, same true
    ECE) passes most of the time with 8,000 corrupted images a cell (with 1,000 a cell it almost never
    does: docs/shift_and_ood.md, the suite's size decides what the increase gate can show)."""
    rng = np.random.default_rng(22)
    gates = GatesConfig(
        max_ece=1.0,
        min_accuracy=0.0,
        metric="ece",
        max_ece_increase=None,
        max_accuracy_drop=None,
        max_shift_ece_increase=0.03,
    )
    clean = Predictions(np.array([[0.9, 0.1]]), np.array([0]))

    def pass_rate(n: int, trials: int) -> float:
        return np.mean(
            [
                evaluate_gates(
                    clean,
                    gates,
                    (clean, clean),
                    shift_comparison=paired_cells(rng, n, 0.0, jitter=0.01),
                    report_estimates=False,
                )
                .check("max_shift_ece_increase")
                .passed
                for _ in range(trials)
            ]
        )

    assert pass_rate(8000, 20) >= 0.75


# ---------------------------------------------------------------------------------------------
# OOD: scores, metrics and the FPR95 bound


def test_energy_is_minus_t_logsumexp_and_scores_follow_the_calibrator():
    from calibflow.calibrators import TemperatureCalibrator

    z = np.array([[2.0, 0.0, -1.0], [0.5, 0.4, 0.3]])
    calibrator = TemperatureCalibrator()
    calibrator.temperature, calibrator.n_classes = 2.0, 3
    scores = ood_scores(z, calibrator)
    np.testing.assert_allclose(scores["energy"], -2.0 * np.log(np.exp(z / 2.0).sum(axis=1)))
    np.testing.assert_allclose(scores["msp"], softmax(z / 2.0).max(axis=1))
    members = np.stack([z, z + 1.0], axis=1)  # (N, M, K): the members' mean energy
    np.testing.assert_allclose(energy(members, 1.0), (energy(z, 1.0) + energy(z + 1.0, 1.0)) / 2)


def test_detection_metrics_against_their_definitions():
    rng = np.random.default_rng(3)
    inside, outside = rng.normal(1.0, 1.0, 400), rng.normal(0.0, 1.0, 300)
    metrics = detection_metrics(inside, outside)
    # AUROC is the Mann-Whitney probability that an in-distribution score is above an OOD one
    assert metrics["auroc"] == pytest.approx(np.mean(inside[:, None] > outside[None, :]))
    threshold = np.sort(inside)[int(np.floor(0.05 * 400))]
    assert np.mean(inside >= threshold) >= 0.95
    assert metrics["fpr95"] == pytest.approx(np.mean(outside >= threshold))
    assert 0.5 < metrics["aupr"] <= 1.0
    assert detection_metrics(inside, inside - 100)["fpr95"] == 0.0


@pytest.mark.parametrize("rounded", [False, True], ids=["continuous", "tied scores"])
def test_fpr95_bound_covers_the_true_fpr_at_its_stated_confidence(rounded):
    """Known truth: in-distribution scores N(0, 1), OOD N(-1.5, 1), FPR(t*) at the true 95%-TPR
    threshold t*; or both rounded to 0.1, so that many scores tie at the threshold (t* = -1.6, the
    largest grid value with P(S >= t) >= 0.95, and FPR = P(O >= -1.65)). The gate on the true value
    must pass at most 5% of the time."""
    rng = np.random.default_rng(5)
    mu = 1.5
    true_fpr = 1 - stats.norm.cdf((-1.65 if rounded else stats.norm.ppf(0.05)) + mu)
    misses, trials = 0, 1000
    for _ in range(trials):
        inside, outside = rng.normal(size=500), rng.normal(-mu, 1.0, 500)
        if rounded:
            inside, outside = np.round(inside, 1), np.round(outside, 1)
        misses += fpr_at_tpr_upper_bound(inside, outside, 0.95, 0.95).bound < true_fpr
    rate = misses / trials
    assert rate <= 0.05, f"bound below the true FPR95 {rate:.1%} of the time"
    assert rate >= 0.001  # and not vacuous: a bound near the truth, not 1


def test_ood_gate_passes_a_separable_model_and_fails_one_that_is_not():
    rng = np.random.default_rng(9)
    clean = Predictions(np.array([[0.9, 0.1]]), np.array([0]))
    gates = GatesConfig(max_ece=1.0, min_accuracy=0.0, max_ood_fpr95=0.2)
    good = evaluate_gates(clean, gates, ood=OODScores(rng.normal(3, 1, 1000), rng.normal(0, 1, 1000), "energy"))
    bad = evaluate_gates(clean, gates, ood=OODScores(rng.normal(0.5, 1, 1000), rng.normal(0, 1, 1000), "energy"))
    assert good.check("max_ood_fpr95").passed and not bad.check("max_ood_fpr95").passed
    assert "max_ood_fpr95" in {c["name"] for c in bad.to_json()["checks"]}
    tiny = fpr_at_tpr_upper_bound(np.arange(10.0), np.arange(10.0) - 100, 0.95, 0.95)
    assert tiny.bound == 1.0  # 10 in-distribution images cannot place a 95%-TPR threshold


# ---------------------------------------------------------------------------------------------
# Outlier exposure


def test_outlier_exposure_loss_is_cross_entropy_to_uniform():
    import torch

    from calibflow.training.losses import outlier_exposure_loss

    # minimum log K, at a uniform softmax
    assert float(outlier_exposure_loss(torch.zeros(4, 10))) == pytest.approx(np.log(10), abs=1e-6)
    assert float(outlier_exposure_loss(torch.full((3, 5), 7.0))) == pytest.approx(np.log(5), abs=1e-6)
    assert float(outlier_exposure_loss(torch.tensor([[0.1, 0.0, 0.0]]))) > np.log(3)
    z = torch.tensor([[3.0, 0.0, -1.0]])
    p = torch.softmax(z, dim=1)
    assert float(outlier_exposure_loss(z)) == pytest.approx(float(-(torch.log(p) / 3).sum()), rel=1e-6)


def test_outlier_exposure_lowers_confidence_on_outliers_and_keeps_accuracy():
    """Three classes of blobs; outliers are images of a fourth kind. Trained with them, the model's
    top softmax probability on held-out outliers drops; on its own classes it stays accurate."""
    import torch

    from calibflow.config import TrainConfig
    from calibflow.training.models import ModelSpec
    from calibflow.training.loop import TrainingInputs, collect_logits, train_classifier
    from tests.test_training import blobs

    x, y = blobs(classes=4, n_per_class=60)
    inside, outside = y < 3, y == 3
    x_in, y_in, x_out = x[inside], y[inside], x[outside]
    spec = ModelSpec(arch="small_cnn", in_channels=x.shape[1], num_classes=3, image_height=8, image_width=8, width=8)
    config = TrainConfig(epochs=6, batch_size=32, lr=0.05, augment=False)
    plain, _ = train_classifier(TrainingInputs(spec, x_in, y_in, x_in, y_in, config, seed=0), progress=False)
    exposed, history = train_classifier(
        TrainingInputs(spec, x_in, y_in, x_in, y_in, config, seed=0, outlier_images=x_out[:30]), progress=False
    )
    held_out = x_out[30:]
    msp = {
        name: torch.softmax(collect_logits(model, held_out), 1).max(1).values.mean().item()
        for name, model in (("plain", plain), ("exposed", exposed))
    }
    assert msp["exposed"] < msp["plain"] - 0.1, msp
    assert history[-1].val_accuracy > 0.9


def test_params_yaml_documents_the_new_keys_at_their_defaults():
    from calibflow.config import Config
    from tests.conftest import REPO

    documented, defaults = load_config(REPO / "params.yaml"), Config()
    assert documented.shift == defaults.shift and documented.ood == defaults.ood
    assert documented.train.outlier_exposure is None
    assert (documented.calibration.shift_aware, documented.calibration.shift_corruptions) == (
        defaults.calibration.shift_aware,
        defaults.calibration.shift_corruptions,
    )
    for gate in ("max_shift_ece", "max_shift_ece_increase", "max_ood_fpr95"):
        assert getattr(documented.gates, gate) is None


def test_the_benchmarks_jigsaw_outliers_are_permuted_patches_of_the_image():
    import importlib.util

    import torch

    from tests.conftest import REPO

    spec = importlib.util.spec_from_file_location("shift_and_ood", REPO / "benchmarks" / "shift_and_ood.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    jigsaw = bench.jigsaw
    images = torch.randint(0, 256, (3, 3, 32, 32), dtype=torch.uint8)
    shuffled = jigsaw(images, seed=0)
    assert shuffled.shape == images.shape and not torch.equal(shuffled, images)

    def patches(x):
        return sorted(x[:, r : r + 8, c : c + 8].flatten().tolist() for r in range(0, 32, 8) for c in range(0, 32, 8))

    assert all(patches(a) == patches(b) for a, b in zip(images, shuffled))
    assert torch.equal(jigsaw(images, seed=0), shuffled)


@pytest.mark.parametrize("cells_at_once", [1, 2])
def test_cells_are_corrupted_while_the_network_reads_others_holding_few_copies_and_cached_cells_are_skipped(
    tmp_path, monkeypatch, cells_at_once
):
    import threading

    suite = shift.Suite(("gaussian_noise", "contrast", "pixelate"), (1, 5), 100, 0)
    real_corrupt = shift.corrupt_batch
    lock = threading.Lock()
    made: list[str] = []
    state = {"held": 0, "most_held": 0, "reading": 0, "most_reading": 0}
    # what the first read waits for, which a serial suite would never give it: a second cell made
    # (one at once), or a second cell in the network beside it (two at once)
    overlapped = threading.Event()

    def corrupt(images, corruption, severity, seed):
        out = real_corrupt(images, corruption, severity, seed)
        with lock:
            made.append(shift.Suite.key(corruption, severity))
            state["held"] += 1
            state["most_held"] = max(state["most_held"], state["held"])
            if cells_at_once == 1 and len(made) == 2:
                overlapped.set()
        return out

    def logits_of(images):
        with lock:
            state["reading"] += 1
            state["most_reading"] = max(state["most_reading"], state["reading"])
            if state["reading"] == cells_at_once == 2:
                overlapped.set()
        assert overlapped.wait(timeout=30), "the cells were made and read one after another"
        out = images.reshape(len(images), -1)[:, :3].astype(float)
        with lock:
            state["reading"] -= 1
            state["held"] -= 1
        return out

    monkeypatch.setattr(shift, "corrupt_batch", corrupt)
    first = shift.cell_logits([GRAY], len(GRAY), suite, logits_of, "model-a", tmp_path, cells_at_once=cells_at_once)
    assert sorted(made) == sorted(suite.keys) and list(first) == suite.keys
    assert state["most_reading"] == cells_at_once  # as many in the network as allowed, never more
    assert state["most_held"] <= cells_at_once + 1  # copies held: one per thread
    expected = shift.corrupted_images(GRAY, suite)
    assert all(np.array_equal(first[k], expected[k].reshape(len(GRAY), -1)[:, :3]) for k in suite.keys)

    # One cell's cache entry lost: only that cell is made and read again, and the order holds.
    lost = next((tmp_path / "cell_logits").iterdir())
    lost.unlink()
    made.clear()
    overlapped.set()
    again = shift.cell_logits([GRAY], len(GRAY), suite, logits_of, "model-a", tmp_path, cells_at_once=cells_at_once)
    assert len(made) == 1 and list(again) == suite.keys
    assert all(np.array_equal(first[k], again[k]) for k in suite.keys)


@pytest.mark.parametrize("cells_at_once", [1, 2])
def test_a_cell_that_fails_fails_the_suite_at_once_and_no_other_cell_is_read_after_it(
    tmp_path, monkeypatch, cells_at_once
):
    import threading

    suite = shift.Suite(("gaussian_noise", "contrast", "pixelate"), (1, 3, 5), 100, 0)
    made: list[str] = []
    real_corrupt = shift.corrupt_batch
    all_made = threading.Event()

    def corrupt(images, corruption, severity, seed):
        made.append(shift.Suite.key(corruption, severity))
        if len(made) == cells_at_once + 1:
            all_made.set()  # every thread holds a cell: the others wait for the network
        return real_corrupt(images, corruption, severity, seed)

    reads = []

    def logits_of(images):
        first = not reads  # the network reads at most `cells_at_once` at once: list.append is atomic
        reads.append(len(images))
        assert all_made.wait(timeout=30)
        if first:
            raise RuntimeError("the network failed")
        return images.reshape(len(images), -1)[:, :3].astype(float)

    monkeypatch.setattr(shift, "corrupt_batch", corrupt)
    with pytest.raises(RuntimeError, match="the network failed"):
        shift.cell_logits([GRAY], len(GRAY), suite, logits_of, "model-a", tmp_path, cells_at_once=cells_at_once)
    # the cells already in the network beside the failed one finish; the one waiting is let go unread
    assert len(reads) <= cells_at_once and len(made) <= cells_at_once + 2 < len(suite.keys)


def test_the_suite_corrupts_every_class_of_a_larger_test_split_and_old_records_their_first_rows():
    import pandas as pd

    from calibflow.evaluation.shift import Suite, suite_of

    labels = np.repeat(np.arange(10), 100)  # a manifest in its order: class by class
    manifest = pd.DataFrame({"label_index": labels, "sha256": [f"{i:064x}" for i in range(1000)]})
    test_rows = np.flatnonzero(np.arange(1000) % 10 < 7)  # 70 per class, ascending as a Split holds them
    suite = suite_of(load_config(None, []).shift, seed=0)
    rows = suite.images(test_rows, manifest)
    assert suite.max_images == 500 and len(rows) == 500 and np.isin(rows, test_rows).all()
    assert np.bincount(labels[rows]).tolist() == [50] * 10
    assert np.array_equal(Suite.from_json(suite.to_json()).images(test_rows, manifest), rows)

    # a version registered before the suite recorded its selection was measured on the first rows
    old = json.loads(suite.to_json())
    del old["selection"]
    first = Suite.from_json(json.dumps(old)).images(test_rows, manifest)
    assert np.array_equal(first, test_rows[:500]) and np.bincount(labels[first], minlength=10).tolist()[7:] == [
        10,
        0,
        0,
    ]
    assert np.array_equal(suite.images(test_rows[:300], manifest), test_rows[:300])  # fewer: every one


def test_an_ood_folder_larger_than_max_images_is_sampled_from_every_sub_folder():
    from calibflow.evaluation.ood import _used

    files = [f"{folder}/{i:03d}.png" for folder in ("a", "b", "c", "d") for i in range(100)]
    digests = {name: hashlib.sha256(name.encode()).hexdigest() for name in files}
    used = _used(files, digests, 100)
    assert len(used) == 100 and list(used) == sorted(used)
    per_folder = [sum(name.startswith(f"{folder}/") for name in used) for folder in "abcd"]
    assert min(per_folder) >= 10, per_folder  # the first 100 by path: [100, 0, 0, 0]
    assert _used(files[:50], digests, 100) == tuple(files[:50])


def test_the_gate_scores_again_the_ood_images_the_run_scored(tmp_path, monkeypatch):
    """calibflow gate reads the version's OOD tag: a folder above ood.max_images gives the run's
    content-hash sample again, and a tag written before the sample (no "selection") its first files."""
    from types import SimpleNamespace

    from calibflow.data import versioning
    from calibflow.evaluation import ood
    from calibflow.pipeline.tagging import ood_tags

    for folder in "abcd":
        (tmp_path / folder).mkdir()
        for i in range(30):
            (tmp_path / folder / f"{i:02d}.png").write_bytes(f"{folder}{i}".encode())
    monkeypatch.setattr(versioning, "resolve_recorded_data", lambda *args: SimpleNamespace(local_dir=str(tmp_path)))
    files = ood._listed(tmp_path)
    digests = {name: hashlib.sha256((tmp_path / name).read_bytes()).hexdigest() for name in files}
    run_scored = ood._used(files, digests, 40)
    evaluation = SimpleNamespace(
        path="data/ood",
        rev="workspace",
        dvc_hash="h",
        n_images=40,
        score="energy",
        files_digest=ood.files_digest([digests[name] for name in run_scored]),
    )
    recorded = json.loads(ood_tags(evaluation)[ood.OOD_TAG])
    found = ood.recorded_ood_files(tmp_path, recorded)
    assert (found.local_dir, found.files) == (str(tmp_path), list(run_scored))
    assert found.sha256 == [digests[name] for name in run_scored]  # what the scoring read is checked against

    # one scored file's bytes changed: refused by the recorded digest, naming the folder
    changed = tmp_path / run_scored[3]
    original = changed.read_bytes()
    changed.write_bytes(b"changed")
    with pytest.raises(OODDataError, match=r"ood.path 'data/ood' at workspace: the 40 images .* not the bytes"):
        ood.recorded_ood_files(tmp_path, recorded)
    changed.write_bytes(original)
    assert ood.recorded_ood_files(tmp_path, recorded).files == list(run_scored)

    # a folder the run scored whole (no sample): one file's bytes changed, its size kept
    whole = {**recorded, "n_images": 120, "files_digest": ood.files_digest([digests[name] for name in files])}
    assert ood.recorded_ood_files(tmp_path, whole).sha256 == [digests[name] for name in files]
    changed = tmp_path / files[7]
    original = changed.read_bytes()
    changed.write_bytes(original[::-1])
    with pytest.raises(OODDataError, match=r"the 120 images read back are not the bytes"):
        ood.recorded_ood_files(tmp_path, whole)
    changed.write_bytes(original)

    # a tag written before the sample (no "selection") and before the digest: the first files
    del recorded["selection"], recorded["files_digest"]
    assert ood.recorded_ood_files(tmp_path, recorded).files == files[:40]


@pytest.mark.parametrize(
    "cores, threads, expected", [(1, 1, 1), (2, 1, 2), (2, 2, 1), (3, 2, 1), (8, 2, 4), (64, 1, 4)]
)
def test_the_suite_reads_as_many_cells_at_once_as_the_cores_hold_one_thread_passes_and_no_more_than_four(
    monkeypatch, cores, threads, expected
):
    from calibflow.pipeline import model_steps
    from calibflow.training.loop import intra_op_threads

    monkeypatch.setattr(model_steps, "cpu_cores", lambda: cores)
    with intra_op_threads(threads):
        assert model_steps.suite_cells_at_once("cpu") == expected
