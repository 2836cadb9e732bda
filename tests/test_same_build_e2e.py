"""The flow on inputs it has seen: the same data, params and code register nothing new, whichever
version they built; a threshold-only change gates that version again without retraining; and
what a reviewer reads about a version (its page, `calibflow evaluate`, `calibflow status`)."""

from __future__ import annotations

import json
import re

import pytest
import yaml
from mlflow import MlflowClient

from calibflow import names
from calibflow.config import load_config
from calibflow.tracking import store
from cli.main import main as calibflow
from tests.conftest import run

pytestmark = pytest.mark.e2e
MODEL = "tiny-digits"


def client_of(repo) -> MlflowClient:
    store.configure_tracking(repo)
    return MlflowClient()


def versions(client: MlflowClient) -> list[str]:
    return sorted(str(v.version) for v in client.search_model_versions(f"name='{MODEL}'"))


def aliases(client: MlflowClient) -> dict[str, str]:
    return {k: str(v) for k, v in client.get_registered_model(MODEL).aliases.items()}


def latest_run(client: MlflowClient):
    experiment = client.get_experiment_by_name("tiny").experiment_id
    return client.search_runs([experiment], order_by=["start_time DESC"])[0]


def test_the_inputs_of_a_challenger_register_nothing_and_the_run_says_which_version(tiny_repo, capsys):
    repo = ["run", "--repo", str(tiny_repo)]
    assert calibflow(repo) == 0  # version 1, @champion
    # Provably no worse than version 1: two models this alike never are, so version 2 fails the
    # comparison with the champion and stays @challenger.
    strict = ["--set", "seed=1", "--set", "gates.max_accuracy_drop=0", "--set", "gates.max_ece_increase=0"]
    assert calibflow([*repo, *strict]) == 0
    client = client_of(tiny_repo)
    assert aliases(client) == {"champion": "1", "challenger": "2"}
    challenger = client.get_model_version(MODEL, "2")
    assert challenger.tags[names.VERDICT_CHAMPION] == names.FAILED
    assert challenger.tags[names.VERDICT_PROMOTED] == names.AT_CHALLENGER
    assert re.search(r"max_(ece_increase|accuracy_drop) \d\.\d{4} > 0", challenger.tags[names.VERDICT_FAILED])
    capsys.readouterr()

    assert calibflow([*repo, *strict]) == 0  # the same data, params and code as version 2
    out = capsys.readouterr().out
    assert "calibflow run: skipped" in out and "version 2 (@challenger)" in out and "nothing to retrain" in out
    assert versions(client) == ["1", "2"] and aliases(client) == {"champion": "1", "challenger": "2"}
    skipped = latest_run(client)
    assert skipped.data.tags["calibflow.status"] == "skipped"
    assert client.list_artifacts(skipped.info.run_id, "checkpoint") == []  # nothing was trained
    # --force still retrains: test_flow_e2e.test_unchanged_retrain_is_skipped_unless_forced


def test_a_threshold_only_change_gates_the_champion_again_without_retraining(tiny_repo, capsys):
    repo = ["run", "--repo", str(tiny_repo)]
    assert calibflow(repo) == 0
    client = client_of(tiny_repo)
    champion = client.get_model_version(MODEL, "1")

    # The version's page: its verdict, then its lineage, in the description and the tags.
    tags, description = champion.tags, champion.description
    assert description.splitlines()[0] == f"**{MODEL} version 1** (@champion): {names.verdict_text(tags)}"
    assert tags[names.VERDICT_ABSOLUTE] == names.PASSED and tags[names.VERDICT_PROMOTED] == names.PROMOTED
    sizes = json.loads(tags["split_sizes"])
    assert list(sizes) == ["train", "val", "calibration", "test"] and sum(sizes.values()) == 300
    assert tags["params/model.arch"] == "small_cnn" and tags["params/train.epochs"] == "5"
    head = run("git", "rev-parse", "HEAD", cwd=tiny_repo).stdout.strip()
    for shown in (
        tags["data_hash"],
        f"git commit `{head}`",
        load_config(tiny_repo / "params.yaml").params_hash,
        f"train {sizes['train']} · val {sizes['val']}",
        "seed 0",
        "model.arch small_cnn",
    ):
        assert shown in description, shown

    # evaluate: a verdict line before anything else; status: numbers as people read them.
    capsys.readouterr()
    assert calibflow(["evaluate", "--model", f"models:/{MODEL}@champion", "--repo", str(tiny_repo)]) == 0
    first = capsys.readouterr().out.splitlines()[0]
    assert first.startswith(f"calibflow evaluate: models:/{MODEL}@champion is version 1: metrics reproduced;")
    assert first.endswith(names.verdict_text(tags))
    assert calibflow(["status", "--model", MODEL, "--repo", str(tiny_repo)]) == 0
    header, row = capsys.readouterr().out.splitlines()
    ece, accuracy, temperature = (row.split()[header.split().index(c)] for c in ("ece", "accuracy", "temperature"))
    assert all(re.fullmatch(r"\d\.\d{4}", number) for number in (ece, accuracy, temperature)), row

    # Looser, committed to params.yaml as a team would: a new commit, but the same code (the params
    # hash covers what shapes a model), so the champion is gated again; nothing trained or registered.
    params = yaml.safe_load((tiny_repo / "params.yaml").read_text())
    params["gates"]["max_ece"] = 0.5
    (tiny_repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    run("git", "commit", "-qam", "looser max_ece", cwd=tiny_repo)
    assert calibflow(repo) == 0
    out = capsys.readouterr().out
    assert "only its gates changed (gates.max_ece 0.3 -> 0.5)" in out
    assert "@champion version 1 passes every new gate" in out
    regated = latest_run(client)
    assert regated.data.tags["regated_version"] == "1" and regated.data.tags["calibflow.status"] == "skipped"
    assert regated.data.tags[names.VERDICT_ABSOLUTE] == names.PASSED
    assert "passes every new gate" in regated.data.tags["mlflow.note.content"].splitlines()[0]
    assert client.list_artifacts(regated.info.run_id, "checkpoint") == []
    assert [a.path for a in client.list_artifacts(regated.info.run_id, "gates")] == ["gates/gates.json"]

    # Stricter than the champion can meet: exit 1, said plainly, and @champion stays where it was.
    result = tiny_repo.parent / "regated.json"
    assert calibflow([*repo, "--set", "gates.min_accuracy=0.999", "--json", str(result)]) == 1
    refused = json.loads(result.read_text())  # the CD job's artifact: the verdict it failed on
    assert refused["registered"] is False and refused["refused"].startswith("GatesFailed: ")
    assert [c["name"] for c in refused["gates"]["checks"] if not c["passed"]] == ["min_accuracy"]
    said = capsys.readouterr()
    said = said.out + said.err
    assert "@champion version 1 FAILS the new gates: min_accuracy" in said and "< 0.999" in said
    assert "Traceback" not in said
    assert versions(client) == ["1"] and aliases(client) == {"champion": "1"}
    failed = latest_run(client)
    assert failed.data.tags["calibflow.status"] == "failed" and failed.info.status == "FAILED"
    assert failed.data.tags[names.VERDICT_ABSOLUTE] == names.FAILED
    assert "min_accuracy" in failed.data.tags[names.VERDICT_FAILED]
    assert "FAILS the new gates" in failed.data.tags["mlflow.note.content"].splitlines()[0]


def test_a_run_that_reads_its_splits_from_the_files_is_the_in_memory_build(tiny_repo, capsys, tmp_path):
    """data.in_memory_max_mb = 0: every split is read from its files by a DataLoader worker. The
    version it registers reproduces in `calibflow evaluate` (which decodes into memory) to the
    logged numbers, and an in-memory run of the same inputs is the same build: skipped."""
    repo = ["run", "--repo", str(tiny_repo)]
    assert calibflow([*repo, "--set", "data.in_memory_max_mb=0", "--set", "data.workers=1"]) == 0
    client = client_of(tiny_repo)
    tags = client.get_model_version(MODEL, "1").tags
    out = tmp_path / "evaluate.json"
    assert calibflow(["evaluate", "--model", f"models:/{MODEL}/1", "--repo", str(tiny_repo), "--json", str(out)]) == 0
    recomputed = json.loads(out.read_text())["recomputed"]
    assert recomputed["accuracy"] == float(tags["test/calibrated/accuracy"])
    assert abs(recomputed["ece"] - float(tags["test/calibrated/ece"])) <= 1e-6
    capsys.readouterr()

    assert calibflow(repo) == 0
    assert "calibflow run: skipped" in capsys.readouterr().out and versions(client) == ["1"]


def test_a_weights_file_is_part_of_the_build_by_its_bytes_not_its_name(tiny_repo, capsys, monkeypatch, tmp_path):
    """model.weights_path, relative to --repo (not to the current directory): the same path with
    other bytes is another build, retrained and registered under its own digest; the same bytes
    are skipped, naming them."""
    import hashlib

    import torch

    from calibflow.training.models import ModelSpec, build_model

    weights = tiny_repo / "weights" / "init.pt"  # untracked: the working tree stays clean
    weights.parent.mkdir()

    def save_weights(seed: int) -> str:
        torch.manual_seed(seed)
        torch.save(build_model(ModelSpec("small_cnn", 1, 5, 8, 8, width=8)).backbone.state_dict(), weights)
        return hashlib.sha256(weights.read_bytes()).hexdigest()

    monkeypatch.chdir(tmp_path)  # a relative weights_path is read from the repository root
    repo = ["run", "--repo", str(tiny_repo), "--set", "model.weights_path=weights/init.pt"]
    first = save_weights(1)
    assert calibflow(repo) == 0
    client = client_of(tiny_repo)
    assert client.get_model_version(MODEL, "1").tags["init_weights_sha256"] == first

    second = save_weights(2)  # the same path and params: only the file's bytes differ
    capsys.readouterr()
    assert calibflow(repo) == 0
    assert "skipped" not in capsys.readouterr().out
    assert versions(client) == ["1", "2"]
    assert client.get_model_version(MODEL, "2").tags["init_weights_sha256"] == second
    assert latest_run(client).data.tags["init_weights_sha256"] == second

    assert calibflow(repo) == 0  # the same bytes again: version 2's build
    out = capsys.readouterr().out
    assert "calibflow run: skipped" in out and f"initial weights ({second[:12]})" in out and "version 2" in out
    assert versions(client) == ["1", "2"]
