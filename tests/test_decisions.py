"""Decisions from calibrated probabilities (issue 13): the rules' edge cases, the served policy,
the decision gates, and a binary run end to end. The rules' guarantees are checked by simulation
against known truth in tests/test_decision_peers.py and benchmarks/decision_guarantees.py."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from scipy import stats

from calibflow.gates import decisions as d
from calibflow.config import GatesConfig, load_config
from calibflow.errors import ConfigError
from calibflow.gates.checks import Predictions, evaluate_gates
from calibflow.errors import GateInputError
from calibflow import errors


def calibrated_sample(n: int, k: int, seed: int, sharpness: float = 3.0) -> tuple[np.ndarray, np.ndarray]:
    """Probabilities and labels drawn from them: calibrated by construction."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=(n, k)) * sharpness
    p = np.exp(logits - logits.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    labels = (p.cumsum(axis=1) > rng.random((n, 1))).argmax(axis=1)
    return p, labels


# ---------------------------------------------------------------------------------------------
# Thresholds


def test_cost_threshold_is_the_bayes_threshold_and_refuses_non_positive_costs():
    assert d.cost_threshold(1.0, 4.0).threshold == pytest.approx(0.2)
    assert d.cost_threshold(3.0, 1.0).threshold == pytest.approx(0.75)
    for bad in ((0.0, 1.0), (1.0, -2.0), (float("nan"), 1.0)):
        with pytest.raises(ValueError, match="positive"):
            d.cost_threshold(*bad)


def test_kept_counts_are_a_fixed_increasing_grid_from_the_fewest_that_can_pass_to_n():
    counts = d.kept_counts(1000, 0.1, 0.05)
    assert counts == sorted(set(counts)) and counts[-1] == 1000
    # The first count is the fewest error-free images whose Clopper-Pearson bound at delta / (grid
    # size) clears the target; one image fewer cannot pass even with no error.
    level = 0.05 / len(counts)
    assert 1 - level ** (1 / counts[0]) < 0.1 <= 1 - level ** (1 / (counts[0] - 1))


def test_selective_threshold_keeps_everything_for_a_perfect_model_and_nothing_certifiable_on_a_tiny_split():
    conf = np.linspace(0.5, 1.0, 400)
    chosen = d.selective_threshold(conf, np.ones(400, bool), max_risk=0.05, delta=0.05)
    assert chosen.threshold == 0.0 and chosen.calibration_bound < 0.05
    with pytest.raises(errors.DecisionInfeasible, match="calibration split more images"):
        d.selective_threshold(conf[:20], np.ones(20, bool), max_risk=0.05, delta=0.05)


def test_selective_threshold_moves_up_past_confident_errors_and_its_bound_is_the_kept_images_clopper_pearson():
    rng = np.random.default_rng(0)
    conf = rng.uniform(0.3, 1.0, 2000)
    correct = rng.random(2000) < conf  # calibrated: risk falls as the threshold rises
    chosen = d.selective_threshold(conf, correct, max_risk=0.1, delta=0.05)
    kept = conf >= chosen.threshold
    errors, n = int((~correct & kept).sum()), int(kept.sum())
    grid = len(d.kept_counts(2000, 0.1, 0.05))
    assert chosen.calibration_bound == pytest.approx(stats.beta.ppf(1 - 0.05 / grid, errors + 1, n - errors))
    assert chosen.calibration_bound < 0.1 and 0.3 < chosen.threshold < 1.0


def test_a_confident_model_saturated_at_probability_one_gets_no_threshold_above_its_ties():
    # Float32 softmax saturates: 600 calibration images at exactly 1.0, 60 of them wrong. No
    # threshold can separate the tied images, so a 5% risk is not certifiable (a threshold above
    # 1.0 keeps nothing and proves nothing), and a 20% one keeps the whole tie, errors included.
    rng = np.random.default_rng(7)
    conf = np.concatenate([np.ones(600), rng.uniform(0.3, 0.99, 400)])
    correct = np.concatenate([np.arange(600) >= 60, rng.random(400) < 0.5])
    with pytest.raises(errors.DecisionInfeasible):
        d.selective_threshold(conf, correct, max_risk=0.05, delta=0.05)
    chosen = d.selective_threshold(conf, correct, max_risk=0.2, delta=0.05)
    kept = conf >= chosen.threshold
    assert chosen.threshold <= 1.0 and kept.sum() >= 600
    assert chosen.calibration_bound >= 1 - correct[kept].mean()  # the bound counts the tied errors


def test_selective_threshold_keeps_its_guarantee_with_a_hundred_classes():
    # Calibrated by construction, so the true risk above t is the mean of 1 - confidence there,
    # read off a large fresh sample.
    p, _ = calibrated_sample(200_000, 100, seed=8, sharpness=2.5)
    population = np.sort(p.max(axis=1))[::-1]
    risk_above = np.cumsum(1 - population) / np.arange(1, population.size + 1)

    def true_risk(threshold: float) -> float:
        return float(risk_above[np.searchsorted(-population, -threshold, side="right") - 1])

    violations = trials = 0
    for seed in range(150):
        q, y = calibrated_sample(1500, 100, seed=100 + seed, sharpness=2.5)
        top = q.argmax(axis=1)
        try:
            chosen = d.selective_threshold(q.max(axis=1), top == y, max_risk=0.3, delta=0.05)
        except errors.DecisionInfeasible:
            continue
        trials += 1
        violations += true_risk(chosen.threshold) > 0.3
    # Risk 0.3 is reached at 15% coverage (about 230 of 1,500 kept): feasible in most draws. A
    # plug-in threshold (empirical risk <= 0.3, no bound) violates in about half of them.
    assert trials >= 80, trials
    low = stats.binomtest(violations, trials).proportion_ci(0.95, method="wilson").low
    assert low <= 0.05, (violations, trials)


def test_conformal_sets_keep_their_coverage_with_a_hundred_classes():
    coverage = {score: [] for score in d.CONFORMAL_SCORES}
    for seed in range(40):
        p, y = calibrated_sample(3000, 100, seed=1000 + seed, sharpness=2.5)
        for score in d.CONFORMAL_SCORES:
            qhat = d.conformal_quantile(d.conformal_scores(p[:1000], y[:1000], score), 0.1)
            coverage[score].append(d.set_coverage(d.prediction_sets(p[1000:], qhat, score), y[1000:], 0.95)["coverage"])
    for score, values in coverage.items():
        # Marginal coverage is in [0.9, 0.9 + 1/1001]; 40 draws of one-draw sd ~0.012 put the mean
        # within about 0.006 of it.
        assert 0.894 <= np.mean(values) <= 0.908, (score, np.mean(values))


def test_min_recall_threshold_is_the_largest_order_statistic_the_binomial_tail_allows():
    scores = np.arange(1, 101) / 101.0  # 100 positives, distinct scores
    positive = np.ones(100, bool)
    chosen = d.min_recall_threshold(scores, positive, min_recall=0.9, delta=0.05)
    j = int(round(chosen.threshold * 101))  # the j-th smallest positive score
    assert stats.binom.cdf(j - 1, 100, 0.1) <= 0.05 < stats.binom.cdf(j, 100, 0.1)
    assert chosen.calibration_bound >= 0.9
    with pytest.raises(errors.DecisionInfeasible, match="at least 29"):
        d.min_recall_threshold(scores[:20], positive[:20], min_recall=0.9, delta=0.05)


def test_min_precision_threshold_certifies_precision_of_what_it_calls_positive():
    rng = np.random.default_rng(1)
    score = rng.random(3000)
    positive = rng.random(3000) < score  # P(positive | score) = score
    chosen = d.min_precision_threshold(score, positive, min_precision=0.8, delta=0.05)
    # True precision above t is E[s | s >= t] = (1 + t) / 2 for uniform scores.
    assert (1 + chosen.threshold) / 2 >= 0.8
    assert chosen.rule == "min_precision" and chosen.calibration_bound >= 0.8


# ---------------------------------------------------------------------------------------------
# Conformal sets


def test_conformal_quantile_is_the_finite_sample_corrected_order_statistic():
    scores = np.arange(1, 20) / 20.0  # n = 19
    assert d.conformal_quantile(scores, 0.1) == scores[math.ceil(20 * 0.9) - 1]
    with pytest.raises(errors.DecisionInfeasible, match="at least 19 calibration images"):
        d.conformal_quantile(scores[:10], 0.05)


def test_aps_scores_are_cumulative_mass_down_to_the_label_and_raps_adds_its_rank_penalty():
    p = np.array([[0.1, 0.6, 0.3], [0.5, 0.25, 0.25]])
    aps = d.all_label_scores(p, "aps")
    np.testing.assert_allclose(aps, [[1.0, 0.6, 0.9], [0.5, 0.75, 1.0]])  # ties ranked by class index
    raps = d.all_label_scores(p, "raps", raps_lambda=0.1, raps_k_reg=1)
    np.testing.assert_allclose(raps - aps, [[0.2, 0.0, 0.1], [0.0, 0.1, 0.2]])
    np.testing.assert_allclose(d.all_label_scores(p, "lac"), 1 - p)
    # The set is every label no stranger than qhat: the top label alone at qhat = 0.6.
    assert d.prediction_sets(p[:1], 0.6, "aps").tolist() == [[False, True, False]]


def test_conformal_sets_cover_at_least_one_minus_alpha_on_calibrated_ten_class_data():
    p, y = calibrated_sample(6000, 10, seed=2)
    for score in d.CONFORMAL_SCORES:
        qhat = d.conformal_quantile(d.conformal_scores(p[:1000], y[:1000], score), 0.1)
        measured = d.set_coverage(d.prediction_sets(p[1000:], qhat, score), y[1000:], 0.95)
        # One calibration draw: coverage ~ Beta(n + 1 - l, l) around 0.9; the test split adds its own noise.
        assert 0.87 <= measured["coverage"] <= 0.94, (score, measured["coverage"])
        assert len(measured["classwise_coverage"]) == 10


# ---------------------------------------------------------------------------------------------
# The policy


def decision_config(**values):
    overrides = [f"decision.{key}={value}" for key, value in values.items()]
    return load_config(None, overrides).decision


def test_policy_round_trips_through_json_and_decides_label_abstention_positive_and_sets():
    p, y = calibrated_sample(3000, 3, seed=3)
    classes = ("cat", "dog", "fox")
    config = decision_config(positive_class="dog", cost_fp=1, cost_fn=3, max_risk=0.2, conformal_alpha=0.1)
    policy = d.fit_policy(p, y, classes, config)
    again = d.DecisionPolicy.from_json(json.loads(json.dumps(policy.to_json())))
    assert again == policy
    out = policy.decide(p[:50])
    assert policy.positive.threshold == pytest.approx(0.25)
    np.testing.assert_array_equal(out["positive"], p[:50, 1] >= 0.25)
    abstained = p[:50].max(axis=1) < policy.abstain.threshold
    np.testing.assert_array_equal(out["abstained"], abstained)
    assert set(out["label"][abstained]) <= {d.ABSTAIN} and set(out["label"][~abstained]) <= set(classes)
    assert all(set(s) <= set(classes) for s in out["prediction_set"])


def test_empty_policy_decides_the_label_only_and_a_newer_schema_is_refused():
    p, _ = calibrated_sample(5, 3, seed=4)
    out = d.DecisionPolicy(("a", "b", "c")).decide(p)
    assert set(out) == {"label", "confidence"}
    state = d.DecisionPolicy(("a", "b", "c")).to_json() | {"schema_version": d.DECISION_SCHEMA_VERSION + 1}
    with pytest.raises(ValueError, match="upgrade calibflow"):
        d.DecisionPolicy.from_json(state)


def test_settings_that_cannot_work_are_refused_before_training_with_the_key_and_the_fix():
    counts = {"cat": 20, "dog": 20}
    with pytest.raises(errors.DecisionSettingsError, match="'wolf' is not a class"):
        d.check_decision_settings(decision_config(positive_class="wolf", min_recall=0.9), ("cat", "dog"), counts)
    with pytest.raises(
        errors.DecisionSettingsError, match="decision.min_recall .* at least 29 calibration images of 'dog'"
    ):
        d.check_decision_settings(decision_config(positive_class="dog", min_recall=0.9), ("cat", "dog"), counts)
    with pytest.raises(errors.DecisionSettingsError, match="decision.max_risk needs at least"):
        d.check_decision_settings(decision_config(max_risk=0.01), ("cat", "dog"), counts)
    with pytest.raises(errors.DecisionSettingsError, match="decision.conformal_alpha needs at least 99"):
        d.check_decision_settings(decision_config(conformal_alpha=0.01), ("cat", "dog"), counts)
    d.check_decision_settings(decision_config(conformal_alpha=0.1), ("cat", "dog"), counts)  # 40 >= 9


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["decision.conformal_alpha=0"], "decision.conformal_alpha = 0.0: must be in \\(0, 1\\)"),
        (["decision.conformal_alpha=1"], "decision.conformal_alpha = 1.0: must be in \\(0, 1\\)"),
        (["decision.positive_class=a", "decision.cost_fp=-1", "decision.cost_fn=1"], "decision.cost_fp = -1.0: costs"),
        (["decision.positive_class=a", "decision.cost_fp=1"], "cost_fn is not"),
        (["decision.positive_class=a", "decision.min_precision=0.9", "decision.min_recall=0.9"], "set one"),
        (["decision.min_precision=0.9"], "needs decision.positive_class"),
        (["decision.positive_class=a"], "no rule uses it"),
        (["decision.conformal_score=naive"], "decision.conformal_score"),
        (["gates.min_conformal_coverage=0.8"], "needs decision.conformal_alpha"),
        (["gates.max_selective_risk=0.1"], "needs decision.max_risk"),
    ],
)
def test_bad_decision_settings_are_config_errors_that_name_the_key(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, overrides)


# ---------------------------------------------------------------------------------------------
# The decision gates


def test_decision_gates_pass_a_calibrated_policy_and_fail_an_over_confident_one():
    p, y = calibrated_sample(6000, 5, seed=5)
    config = decision_config(max_risk=0.1, conformal_alpha=0.1)
    policy = d.fit_policy(p[:3000], y[:3000], tuple("abcde"), config)
    gates = GatesConfig(
        max_ece=1.0,
        min_accuracy=0.0,
        max_ece_increase=None,
        max_accuracy_drop=None,
        max_selective_risk=0.13,
        min_conformal_coverage=0.87,
    )
    test = Predictions(p[3000:], y[3000:])
    verdict = evaluate_gates(test, gates, decisions=policy, report_estimates=False)
    assert verdict.check("max_selective_risk").passed and verdict.check("min_conformal_coverage").passed
    assert verdict.absolute_passed

    # The same thresholds on a model whose probabilities are over-confident (logits doubled): the
    # kept predictions are wrong far more often, and its sets cover less.
    sharp = p[3000:] ** 4
    sharp /= sharp.sum(axis=1, keepdims=True)
    verdict = evaluate_gates(Predictions(sharp, y[3000:]), gates, decisions=policy, report_estimates=False)
    assert not verdict.check("max_selective_risk").passed and not verdict.check("min_conformal_coverage").passed
    assert not verdict.absolute_passed  # a decision gate blocks registration like max_ece


def test_a_decision_gate_without_its_fitted_rule_cannot_be_gated():
    p, y = calibrated_sample(200, 3, seed=6)
    gates = GatesConfig(max_selective_risk=0.1)
    with pytest.raises(GateInputError, match="no fitted abstention threshold"):
        evaluate_gates(Predictions(p, y), gates, decisions=d.DecisionPolicy(("a", "b", "c")), report_estimates=False)


# ---------------------------------------------------------------------------------------------
# The served model


def served(tmp_path: Path, decisions_path: Path | None):
    from calibflow.tracking.served_model import CalibratedImageClassifier, write_model_files
    from tests.conftest import untrained_model

    model = untrained_model(tmp_path / "work")
    files = write_model_files(model.checkpoint, model.calibration_state, tmp_path / "files", decisions_path)
    classifier = CalibratedImageClassifier()
    classifier.load(files)
    return classifier, model.images.permute(0, 2, 3, 1).numpy()


def test_served_output_defaults_to_the_probabilities_and_decisions_are_asked_for_by_param(tmp_path):
    policy = d.DecisionPolicy(
        ("a", "b", "c"),
        abstain=d.ChosenThreshold(0.5, "max_risk", 0.1, 0.05, 0.08, 100),
        conformal=d.ConformalRule(0.1, "lac", 0.8, 0.01, 1, 100),
    )
    classifier, images = served(tmp_path, Path(policy.save(str(tmp_path / "decisions.json"))))
    probabilities = classifier.predict(None, images)
    assert isinstance(probabilities, np.ndarray) and probabilities.shape == (40, 3)
    np.testing.assert_array_equal(classifier.predict(None, images, params={"output": "probabilities"}), probabilities)
    frame = classifier.predict(None, images, params={"output": "decisions"})
    assert list(frame.columns) == ["label", "confidence", "abstained", "prediction_set", "p_a", "p_b", "p_c"]
    np.testing.assert_array_equal(frame[["p_a", "p_b", "p_c"]].to_numpy(), probabilities)
    assert (frame["label"][frame["abstained"]] == "abstain").all()
    empty = classifier.predict(None, images[:0], params={"output": "decisions"})
    assert len(empty) == 0 and "label" in empty.columns
    with pytest.raises(ValueError, match="use one of probabilities, decisions"):
        classifier.predict(None, images, params={"output": "sets"})


def test_a_model_registered_before_decisions_still_loads_and_decides_the_label(tmp_path):
    classifier, images = served(tmp_path, None)
    frame = classifier.predict(None, images[:3], params={"output": "decisions"})
    assert list(frame.columns) == ["label", "confidence", "p_a", "p_b", "p_c"]


# ---------------------------------------------------------------------------------------------
# End to end: a binary data set


@pytest.mark.e2e
def test_binary_run_records_thresholds_serves_decisions_in_a_fresh_process_and_gates_them(
    tmp_path, monkeypatch, capsys
):
    from calibflow.tracking import store
    from cli.main import main as calibflow
    from tests.conftest import make_repo

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    repo = make_repo(tmp_path / "binary", classes=(3, 8), per_class=150)
    rules = [
        "--set",
        "decision.positive_class=8",
        "--set",
        "decision.min_recall=0.9",
        "--set",
        "decision.max_risk=0.1",
        "--set",
        "decision.conformal_alpha=0.1",
        "--set",
        "gates.max_selective_risk=0.2",
        "--set",
        "gates.min_conformal_coverage=0.75",
        "--set",
        "model.width=16",
        "--set",
        "train.epochs=8",
    ]

    # Bad input first: a class the data does not have is refused before training, nothing registered.
    assert calibflow(["run", "--repo", str(repo), *rules, "--set", "decision.positive_class=9"]) == 2
    assert "'9' is not a class of the data" in capsys.readouterr().err

    assert calibflow(["run", "--repo", str(repo), *rules]) == 0
    capsys.readouterr()
    store.configure_tracking(repo)
    from mlflow import MlflowClient

    client = MlflowClient()
    version = client.get_model_version_by_alias("tiny-digits", "champion")
    assert str(version.version) == "1"  # the refused run registered nothing
    metrics = client.get_run(version.run_id).data.metrics
    for name in (
        "positive_threshold",
        "positive_recall_lower",
        "selective_threshold",
        "selective_risk_upper",
        "set_coverage_lower",
        "set_mean_size",
    ):
        assert f"test/decision/{name}" in metrics, name
    report = json.loads((repo / "reports" / "metrics.json").read_text())["test"]["decision"]
    assert report["positive_threshold"] == metrics["test/decision/positive_threshold"]
    gates = json.loads(Path(store.download_run_artifact(version.run_id, "gates/gates.json", tmp_path)).read_text())
    assert {"max_selective_risk", "min_conformal_coverage"} <= {c["name"] for c in gates["checks"]}
    plots = {a.path for a in client.list_artifacts(version.run_id, "plots")}
    assert {"plots/decision_score_histograms.png", "plots/risk_coverage.png"} <= plots

    # A fresh process: MLflow's own loader accepts the declared params (the output, and the input
    # param that sends images calibflow framed itself), the default output is unchanged.
    script = textwrap.dedent(f"""
        import json, numpy as np
        from calibflow.tracking import registration
        from calibflow.tracking import store
        store.configure_tracking({str(repo)!r})
        model = registration.load_model("models:/tiny-digits@champion")
        images = np.stack([np.asarray(__import__("PIL.Image", fromlist=["Image"]).open(p).convert("L"))[..., None]
                           for p in sorted(__import__("glob").glob({str(repo / "data/tiny/8/*.png")!r}))[:6]])
        probabilities = model.predict(images)
        frame = model.predict(images, params={{"output": "decisions"}})
        print(json.dumps({{"shape": list(probabilities.shape), "columns": list(frame.columns),
                          "same": bool(np.array_equal(frame[["p_3", "p_8"]].to_numpy(), probabilities)),
                          "positive": frame["positive"].tolist(), "sets": frame["prediction_set"].tolist(),
                          "params": [p.name for p in model.metadata.get_params_schema().params]}}))
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=repo)
    assert done.returncode == 0, done.stderr
    answer = json.loads(done.stdout.strip().splitlines()[-1])
    assert answer["shape"] == [6, 2] and answer["same"] and answer["params"] == ["output", "input"]
    assert answer["columns"][:5] == ["label", "confidence", "abstained", "positive", "prediction_set"]
    assert sum(answer["positive"]) >= 4  # images of the positive class, at a recall-0.9 threshold
    assert all(set(s) <= {"3", "8"} for s in answer["sets"])

    # `calibflow evaluate` recomputes every decision number from the registry's files, exactly.
    out = tmp_path / "evaluate.json"
    evaluated = subprocess.run(
        [
            str(Path(sys.executable).parent / "calibflow"),
            "evaluate",
            "--model",
            "models:/tiny-digits@champion",
            "--repo",
            str(repo),
            "--json",
            str(out),
        ],
        capture_output=True,
        text=True,
        cwd=repo,
    )
    assert evaluated.returncode == 0, evaluated.stderr
    reproduced = json.loads(out.read_text())
    assert reproduced["mismatches"] == []
    assert (
        reproduced["logged"]["decision_selective_risk_upper"]
        == reproduced["recomputed"]["decision_selective_risk_upper"]
    )
    assert {"decision_positive_recall_lower", "decision_set_coverage_lower"} <= set(reproduced["recomputed"])

    # The registry gate recomputes the decision gates from the served policy.
    assert calibflow(["gate", "--model", "tiny-digits", "--repo", str(repo), "--candidate", "1", *rules]) in (0, 1)
    shown = capsys.readouterr().out
    assert "max_selective_risk" in shown and "min_conformal_coverage" in shown


@pytest.mark.e2e
def test_a_target_the_trained_model_cannot_meet_is_a_rejection_that_registers_nothing(tiny_repo, capsys):
    from cli.main import main as calibflow
    from tests.test_flow_e2e import mlflow_client

    # One epoch of a 5-class model: nowhere near 90% right on the 39 most confident images of 60.
    assert (
        calibflow(["run", "--repo", str(tiny_repo), "--set", "train.epochs=1", "--set", "decision.max_risk=0.1"]) == 1
    )
    message = capsys.readouterr().err
    assert "nothing registered" in message and "no confidence threshold certifies a selective risk <= 0.1" in message
    client = mlflow_client(tiny_repo)
    assert client.search_registered_models("name='tiny-digits'") == []
    assert not (tiny_repo / "reports" / "metrics.json").exists()


@pytest.mark.e2e
def test_an_ensemble_serves_decisions_fitted_on_its_averaged_calibrated_probabilities(tiny_repo, tmp_path):
    from calibflow.tracking import registration
    from calibflow.tracking import store
    from cli.main import main as calibflow
    from calibflow.gates.decisions import DecisionPolicy

    assert (
        calibflow(
            [
                "run",
                "--repo",
                str(tiny_repo),
                "--set",
                "model.ensemble=2",
                "--set",
                "decision.conformal_alpha=0.2",
                "--set",
                "decision.max_risk=0.3",
            ]
        )
        == 0
    )
    store.configure_tracking(tiny_repo)
    model = registration.load_model("models:/tiny-digits@champion")
    wrapped = model.unwrap_python_model()
    assert len(wrapped.members) == 2 and wrapped.decision_policy.conformal is not None
    images = np.stack(
        [
            np.asarray(__import__("PIL.Image", fromlist=["Image"]).open(p).convert("L"))[..., None]
            for p in sorted((tiny_repo / "data" / "tiny" / "2").glob("*.png"))[:5]
        ]
    )
    frame = model.predict(images, params={"output": "decisions"})
    probabilities = model.predict(images)
    # The sets are the policy's, applied to the ensemble's served (averaged, calibrated) probabilities.
    expected = DecisionPolicy.from_json(wrapped.decision_policy.to_json()).decide(probabilities)
    assert frame["prediction_set"].tolist() == expected["prediction_set"]
    assert frame["abstained"].tolist() == expected["abstained"].tolist()
