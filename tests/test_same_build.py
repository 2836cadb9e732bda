"""registration.same_build on a real MLflow registry (a SQLite store in a temporary folder),
versions made by hand: which registered version a run with the same data, params and code would
rebuild, and which gates.* changed since that version's run was gated."""

from __future__ import annotations

import pytest
from mlflow import MlflowClient

from calibflow.tracking import registration, store

BUILD = {"data_hash": "d1.dir", "params_hash": "p1", "git_commit": "c" * 40}
GATES = {"gates.max_ece": 0.05, "gates.min_accuracy": 0.9, "gates.alternatives": [1, 2]}


@pytest.fixture(scope="module")
def registry(tmp_path_factory):
    """One store for the module (creating a SQLite store runs MLflow's migrations: seconds)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.delenv("MLFLOW_TRACKING_URI", raising=False)
        store.configure_tracking(tmp_path_factory.mktemp("registry"))
        yield MlflowClient()


@pytest.fixture
def model(registry, request) -> str:
    """A registered model of this test's own, in the module's store."""
    name = request.node.name[:60]
    registry.create_registered_model(name)
    return name


def add_version(client: MlflowClient, model: str, tags: dict[str, str], gates=GATES, alias: str | None = None) -> str:
    experiment = client.get_experiment_by_name("builds") or client.create_experiment("builds")
    experiment = getattr(experiment, "experiment_id", experiment)
    run = client.create_run(experiment)
    store.log_params(run.info.run_id, gates)
    version = str(client.create_model_version(model, "file:///nowhere", run.info.run_id, tags=tags).version)
    if alias:
        client.set_registered_model_alias(model, alias, version)
    return version


def find(model: str, **changes):
    build = {**BUILD, "git_dirty": False, **changes}
    return registration.same_build(
        model,
        data_hash=build["data_hash"],
        params_hash=build["params_hash"],
        git_commit=build["git_commit"],
        git_dirty=build["git_dirty"],
        gate_params=build.get("gate_params", GATES),
        code_tree=build.get("code_tree"),
        init_weights_sha256=build.get("init_weights_sha256"),
    )


def test_the_code_is_the_code_runs_read_not_the_commit(registry, model):
    add_version(registry, model, {**BUILD, "code_tree": "t1"}, alias="champion")
    # a later commit of reports or docs: another commit, the same code
    assert find(model, git_commit="d" * 40, code_tree="t1").version == "1"
    assert find(model, git_commit=BUILD["git_commit"], code_tree="t2") is None  # the digest decides when both have one
    assert find(model, git_commit="d" * 40, code_tree="t1", git_dirty=True) is None
    # a version registered before the digest was recorded is matched by its commit
    add_version(registry, model, BUILD)
    assert find(model, code_tree="t9").version == "2" and find(model, git_commit="e" * 40, code_tree="t9") is None


def test_a_challenger_built_from_the_same_inputs_is_found_and_named(registry, model):
    add_version(registry, model, {**BUILD, "data_hash": "d0.dir"}, alias="champion")
    add_version(registry, model, BUILD, alias="challenger")
    same = find(model)
    assert same.version == "2" and not same.is_champion and same.changed_gates == {}
    assert same.describe() == "version 2 (@challenger)"


def test_the_champion_wins_over_a_newer_version_of_the_same_build_and_recalibrations_never_count(registry, model):
    add_version(registry, model, BUILD, alias="champion")
    add_version(registry, model, BUILD)  # a forced retrain, no alias
    add_version(registry, model, {**BUILD, "recalibrated_from": "1"}, alias="challenger")
    assert find(model).version == "1" and find(model).is_champion
    registry.delete_registered_model_alias(model, "champion")
    assert find(model).describe() == "version 2 (no alias)"  # the newest that is not a recalibration


def test_other_data_params_code_or_a_dirty_tree_find_nothing(registry, model):
    add_version(registry, model, BUILD, alias="champion")
    assert find(model, data_hash="d2.dir") is None
    assert find(model, params_hash="p2") is None
    assert find(model, git_commit="e" * 40) is None
    assert find(model, git_dirty=True) is None
    assert (
        registration.same_build(
            "no-such-model", data_hash="d", params_hash="p", git_commit="c", git_dirty=False, gate_params={}
        )
        is None
    )


def test_changed_gates_are_those_that_differ_from_the_versions_run_as_it_logged_them(registry, model):
    add_version(registry, model, BUILD, alias="champion")
    assert find(model, gate_params=dict(GATES)).changed_gates == {}  # a list compares as MLflow holds it (JSON)
    same = find(model, gate_params={**GATES, "gates.max_ece": 0.02, "gates.max_nll": 1.5})
    assert same.changed_gates == {"gates.max_ece": ("0.05", "0.02"), "gates.max_nll": (None, "1.5")}
    assert same.describe_changes() == "gates.max_ece 0.05 -> 0.02, gates.max_nll None -> 1.5"


def test_the_initial_weights_are_part_of_the_build_by_their_bytes(registry, model):
    """model.weights_path or model.pretrained: the same path (params hash) with other bytes is another build."""
    add_version(registry, model, {**BUILD, "init_weights_sha256": "a" * 64}, alias="champion")
    assert find(model, init_weights_sha256="a" * 64).version == "1"
    assert find(model, init_weights_sha256="b" * 64) is None
    assert find(model) is None  # no weights file now: not the build of one that started from a file


def test_a_version_without_the_weights_digest_is_the_build_of_runs_that_name_no_weights_file(registry, model):
    """Versions registered before the digest was recorded have no tag: the same build as a seeded
    run, and never as one naming a weights file (which may have changed since)."""
    add_version(registry, model, BUILD, alias="champion")
    assert find(model).version == "1"
    assert find(model, init_weights_sha256="a" * 64) is None
