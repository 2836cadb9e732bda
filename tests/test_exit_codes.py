"""docs/cli.md's exit-code table, walked: every code it promises for every command is produced,
here (the cheap paths, on a real MLflow registry whose versions are created directly, without
training) or by a named end-to-end test elsewhere. CD reads 1 as "rejected, keep the champion"
and 2 as "could not run, look at it", so a user mistake must never exit 1 nor print a traceback.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
from mlflow import MlflowClient

from calibflow.tracking import store
from cli.main import main as calibflow
from tests.conftest import REPO, TINY_PARAMS

CALIBFLOW = str(Path(sys.executable).parent / "calibflow")
QUOTED = "it's-digits"  # a name with a quote: MLflow registers it; `status` must list it
SOLO = "solo"  # one version, @champion, promoted from nothing


def documented_exit_codes() -> dict[str, set[int]]:
    """{command: exit codes} from docs/cli.md's command table ("data add" for `calibflow data
    add PATH ...`; the codes are the digits that open each `;`-separated part of the last cell)."""
    text = (REPO / "docs" / "cli.md").read_text()
    section = text[text.index("## Commands and exit codes") :]
    section = section[: section.index("\n## ", 1)]
    table: dict[str, set[int]] = {}
    for line in section.splitlines():
        if not line.startswith("| `calibflow "):
            continue
        usage = line.split("`")[1].split()[1:]
        words = []
        for word in usage:
            if not re.fullmatch(r"[a-z][a-z-]*", word):
                break
            words.append(word)
        codes = {int(code) for code in re.findall(r"(?:^|;)\s*([0-9])\b", line.rstrip(" |").rsplit("|", 1)[1])}
        table[" ".join(words)] = codes
    return table


@dataclass(frozen=True)
class Case:
    command: str  # as docs/cli.md names it
    code: int
    argv: tuple[str, ...]  # {repo}, {tmp}, {bad_params}, {tiny_repo}, {images}, {image} are filled in
    says: str = ""  # part of the one line on stderr (or stdout for exit 0)


CASES = [
    Case("run", 2, ("run", "--repo", "{repo}", "--params", "{bad_params}"), "is not UTF-8 text"),
    Case("run", 2, ("run", "--repo", "{repo}", "--set", "train.momentum=-3"), "train.momentum = -3.0"),
    Case("run", 2, ("run", "--repo", "{tmp}/nowhere"), "is not a directory"),
    Case("evaluate", 2, ("evaluate", "--model", "models:/nope@champion", "--repo", "{repo}"), "nope"),
    Case("evaluate", 2, ("evaluate", "--model", f"models:/{SOLO}@nope", "--repo", "{repo}"), "alias nope"),
    Case("evaluate", 2, ("evaluate", "--model", SOLO, "--repo", "{repo}"), "is not a registry URI"),
    Case("predict", 2, ("predict", "--model", "models:/nope@champion", "--repo", "{repo}", "{image}"), "nope"),
    Case("predict", 2, ("predict", "--model", f"models:/{SOLO}@nope", "--repo", "{repo}", "{image}"), "alias nope"),
    Case(
        "predict",
        2,
        ("predict", "--model", f"models:/{SOLO}@champion", "--repo", "{repo}", "{tmp}/missing.png"),
        "no such file",
    ),
    Case("gate", 2, ("gate", "--model", "nope", "--candidate", "1", "--repo", "{repo}"), "could not decide"),
    Case(
        "gate",
        2,
        ("gate", "--model", SOLO, "--candidate", "1", "--repo", "{repo}", "--set", "gates.max_nll=-1"),
        "gates.max_nll = -1.0",
    ),
    Case(
        "gate plan",
        0,
        ("gate", "plan", "--thresholds", "--repo", "{repo}", "--set", "gates.n_resamples=100"),
        "80% power to pass this model",
    ),
    Case("gate plan", 2, ("gate", "plan", "--model", "nope", "--candidate", "1", "--repo", "{repo}"), "nope"),
    Case("gate plan", 2, ("gate", "plan", "--thresholds", "--power", "2", "--repo", "{repo}"), "power = 2.0"),
    Case("gate plan", 2, ("gate", "plan", "--model", SOLO, "--repo", "{repo}"), "--candidate REF, or --thresholds"),
    Case("promote", 2, ("promote", "--model", SOLO, "--candidate", "1", "--repo", "{repo}", "--force"), "--reason"),
    Case("promote", 2, ("promote", "--model", "nope", "--candidate", "1", "--repo", "{repo}"), "could not decide"),
    Case(
        "promote",
        2,
        ("promote", "--model", SOLO, "--candidate", "1", "--repo", "{repo}", "--params", "../bad.yaml"),
        "is not UTF-8 text",
    ),
    Case("rollback", 0, ("rollback", "--model", QUOTED, "--repo", "{repo}"), "back at version 1"),
    Case("rollback", 2, ("rollback", "--model", SOLO, "--repo", "{repo}"), "no previous champion"),
    Case("rollback", 2, ("rollback", "--model", "nope", "--repo", "{repo}"), "nope"),
    Case("status", 0, ("status", "--model", QUOTED, "--repo", "{repo}"), "@champion"),
    Case("status", 2, ("status", "--model", "nope", "--repo", "{repo}"), "nope"),
    Case("data add", 0, ("data", "add", "{images}", "--name", "fives", "--repo", "{tiny_repo}"), "300 images"),
    Case("data add", 2, ("data", "add", "{tmp}", "--name", "x", "--repo", "{tiny_repo}"), "is not an ImageFolder"),
    Case("data add", 2, ("data", "add", "{images}", "--name", "x", "--repo", "{repo}"), "not the root of a DVC"),
    Case("schedule", 2, ("schedule", "--repo", "{repo}", "--params", "../bad.yaml"), "is not UTF-8 text"),
    Case("schedule", 2, ("schedule", "--repo", "{repo}"), "needs a Prefect server"),
    Case("prepare-digits", 0, ("prepare-digits", "--out", "{tmp}/digits"), "wrote 1797 images"),
    Case("prepare-digits", 2, ("prepare-digits", "--out", "{bad_params}/digits"), "cannot write"),
]

# Codes that need a trained model or running servers: the end-to-end tests that produce them.
MONITOR_VERDICTS = "tests/test_monitor_e2e.py::test_monitor_says_fine_recalibrate_retrain_or_cannot_tell"
RECALIBRATED = "tests/test_recalibrate_e2e.py::test_recalibrate_registers_the_same_network_with_a_new_calibrator"
ELSEWHERE = {
    ("monitor", 0): MONITOR_VERDICTS,
    ("monitor", 1): MONITOR_VERDICTS,
    ("monitor", 3): MONITOR_VERDICTS,
    ("monitor", 2): "tests/test_monitor_e2e.py::test_monitor_refuses_data_it_cannot_read_with_exit_2",
    ("recalibrate", 0): RECALIBRATED,
    ("recalibrate", 1): RECALIBRATED,
    (
        "recalibrate",
        2,
    ): "tests/test_recalibrate_e2e.py::test_recalibrate_refuses_what_it_cannot_use_and_registers_nothing",
    ("run", 0): "tests/test_flow_e2e.py::test_passing_run_registers_a_champion_that_reproduces_in_a_fresh_process",
    ("run", 1): "tests/test_flow_e2e.py::test_failing_gate_registers_nothing_and_moves_no_alias",
    ("evaluate", 0): "tests/test_flow_e2e.py::test_passing_run_registers_a_champion_that_reproduces_in_a_fresh_process",
    (
        "evaluate",
        1,
    ): "tests/test_promotion.py::test_evaluate_exits_1_when_the_recomputed_metrics_differ_from_the_logged",
    ("predict", 0): "tests/test_flow_e2e.py::test_passing_run_registers_a_champion_that_reproduces_in_a_fresh_process",
    ("gate", 0): "tests/test_promotion.py::test_gate_passes_with_exit_0_and_reports_each_check_against_the_champion",
    (
        "gate",
        1,
    ): "tests/test_promotion.py::test_candidate_passing_on_its_point_estimate_but_not_its_upper_bound_fails_with_exit_1",
    (
        "promote",
        0,
    ): "tests/test_promotion.py::test_promote_moves_champion_records_who_and_keeps_the_report_then_rollback_moves_it_back",
    ("promote", 1): "tests/test_promotion.py::test_failed_gate_does_not_promote_unless_forced_with_a_reason",
    (
        "schedule",
        0,
    ): "tests/test_servers.py::test_deployed_to_a_work_pool_a_process_worker_runs_it_and_an_unchanged_retrain_is_skipped",
}


def test_every_exit_code_the_docs_promise_is_exercised():
    documented = {(command, code) for command, codes in documented_exit_codes().items() for code in codes}
    assert {
        "run",
        "evaluate",
        "predict",
        "gate",
        "gate plan",
        "promote",
        "rollback",
        "status",
        "data add",
        "schedule",
        "prepare-digits",
    } <= {command for command, _ in documented}
    exercised = {(case.command, case.code) for case in CASES} | set(ELSEWHERE)
    assert documented == exercised
    for node in ELSEWHERE.values():
        path, name = node.split("::")
        assert f"def {name}(" in (REPO / path).read_text(), f"{node} does not exist"


@pytest.fixture(scope="module")
def registry_world(tmp_path_factory) -> Path:
    """A directory with params.yaml, a non-YAML bad.yaml beside it, and a real MLflow registry:
    QUOTED with two versions (v2 @champion, promoted from v1), SOLO with one (@champion). The
    versions are created directly (no training): these commands read only the registry."""
    world = tmp_path_factory.mktemp("exit-codes")
    repo = world / "repo"
    repo.mkdir()
    (repo / "params.yaml").write_text(TINY_PARAMS)
    (world / "bad.yaml").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\xff\xd8")
    from calibflow.data.prepare import write_digits

    write_digits(world / "images", classes=(5, 6, 7, 8, 9), per_class=60)  # read, never written, by the cases
    with pytest.MonkeyPatch.context() as patch:
        patch.delenv("MLFLOW_TRACKING_URI", raising=False)
        store.configure_tracking(repo)
        client = MlflowClient()
        experiment = client.create_experiment("exit-codes")
        run = client.create_run(experiment)
        client.set_terminated(run.info.run_id)
        for name, versions in ((QUOTED, 2), (SOLO, 1)):
            client.create_registered_model(name)
            for _ in range(versions):
                version = client.create_model_version(name, f"runs:/{run.info.run_id}/model", run.info.run_id)
                for key, value in {"ece_post": "0.01", "accuracy": "0.99", "temperature": "1.1"}.items():
                    client.set_model_version_tag(name, version.version, key, value)
        client.set_model_version_tag(QUOTED, "2", "promoted_from", "1")
        client.set_registered_model_alias(QUOTED, "champion", "2")
        client.set_registered_model_alias(SOLO, "champion", "1")
    return world


@pytest.fixture
def world(registry_world, tmp_path, monkeypatch) -> dict[str, str]:
    """A private copy of the registry world (rollback moves aliases) and the paths cases use."""
    copy = tmp_path / "world"
    shutil.copytree(registry_world / "repo", copy / "repo")
    shutil.copy(registry_world / "bad.yaml", copy / "bad.yaml")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    images = registry_world / "images"
    return {
        "repo": str(copy / "repo"),
        "bad_params": str(copy / "bad.yaml"),
        "tmp": str(scratch),
        "images": str(images),
        "image": str(min((images / "5").iterdir())),
    }


@pytest.mark.parametrize("case", CASES, ids=[f"{c.command}-{c.code}-{c.says}" for c in CASES])
def test_exit_code(case, world, request, capsys):
    if "{tiny_repo}" in case.argv:
        world = {**world, "tiny_repo": str(request.getfixturevalue("tiny_repo"))}
    argv = [part.format(**world) for part in case.argv]
    assert calibflow(argv) == case.code, capsys.readouterr()
    out, err = capsys.readouterr()
    if case.code == 0:
        assert case.says in out
    else:
        lines = err.strip().splitlines()
        assert len(lines) == 1 and case.says in lines[0], err  # one line, no traceback


def test_status_lists_the_versions_of_a_model_whose_name_has_a_quote(world, capsys):
    assert calibflow(["status", "--model", QUOTED, "--repo", world["repo"]]) == 0
    rows = capsys.readouterr().out.splitlines()[1:]
    assert [row.split()[0] for row in rows] == ["1", "2"]
    # the world's versions carry the tags of before calibflow.names (ece_post, accuracy, temperature)
    assert "@champion" in rows[1] and "0.99" in rows[1] and "0.01" in rows[1] and "1.1" in rows[1]


@pytest.mark.parametrize("bug", [RuntimeError("a bug nobody anticipated"), KeyError("model")])
def test_an_unanticipated_error_exits_2_not_1_with_its_traceback(world, monkeypatch, capsys, bug):
    """A KeyError is a LookupError, but no refusal: a missing key in our own data is a bug (the
    bare message "calibflow: 'model'" hid one), said with its traceback."""
    from calibflow.data import prepare

    def broken(*args, **kwargs):
        raise bug

    monkeypatch.setattr(prepare, "write_digits", broken)
    assert calibflow(["prepare-digits", "--out", f"{world['tmp']}/digits"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" in err and f"unexpected {type(bug).__name__}" in err and str(bug).strip("'") in err


@pytest.mark.parametrize(
    "argv, code, says",
    [
        (["run", "--params", "../bad.yaml"], 2, "is not UTF-8 text"),
        (["predict", "--model", f"models:/{SOLO}@nope", "{image}"], 2, "alias nope"),
    ],
    ids=["run-bad-params", "predict-missing-alias"],
)
def test_in_a_separate_process_a_user_mistake_exits_2_with_one_line_and_no_traceback(world, argv, code, says):
    argv = [part.format(**world) for part in argv]
    result = subprocess.run(
        [CALIBFLOW, *argv, "--repo", world["repo"]], capture_output=True, text=True, cwd=world["repo"]
    )
    assert result.returncode == code, result.stderr
    assert "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and says in result.stderr, result.stderr


@pytest.mark.parametrize("bad", ["bomb", "truncated", "not an image"])
def test_predict_on_an_image_it_cannot_decode_exits_2_with_one_line_naming_the_file(world, monkeypatch, capsys, bad):
    """Through the whole CLI, with the registered model's loading stubbed (the world's versions have
    no artifacts): the image is decoded after the model loads."""
    from types import SimpleNamespace

    from PIL import Image

    from calibflow.tracking import registration

    stub = SimpleNamespace(metadata=SimpleNamespace(metadata={"image_mode": "L", "image_size": [8, 8]}))
    monkeypatch.setattr(registration, "load_model", lambda uri: stub)
    path = Path(world["tmp"]) / "bad.jpg"
    Image.open(world["image"]).convert("RGB").resize((64, 64)).save(path, quality=95)
    if bad == "bomb":
        monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 64 * 64 // 3)  # past twice the limit: Pillow raises
    elif bad == "truncated":
        path.write_bytes(path.read_bytes()[:300])
    else:
        path.write_bytes(b"plain text, not a JPEG")
    assert calibflow(["predict", "--model", f"models:/{SOLO}@champion", "--repo", world["repo"], str(path)]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and str(path) in lines[0], lines  # one line, no traceback


PARAMS_COMMANDS = [
    ["run"],
    ["gate", "--model", SOLO, "--candidate", "1"],
    ["gate", "plan", "--thresholds"],
    ["promote", "--model", SOLO, "--candidate", "1"],
    ["monitor", "--model", f"models:/{SOLO}/1", "--data", "data/none"],
    ["recalibrate", "--model", f"models:/{SOLO}/1", "--data", "data/none"],
    ["schedule"],
]
BAD_SETTINGS = [
    ("train.batch_size=1e20", "train.batch_size = '1e20'"),
    ("train.batch_size=100000000000000000000", "the batch size must be at most"),
    ("train.epochs=100000000000", "the number of epochs must be at most"),
]


@pytest.mark.parametrize("setting, says", BAD_SETTINGS, ids=[s for s, _ in BAD_SETTINGS])
@pytest.mark.parametrize("command", PARAMS_COMMANDS, ids=[" ".join(c[:2]) for c in PARAMS_COMMANDS])
def test_every_command_that_reads_params_refuses_an_impossible_size_in_one_line(world, capsys, command, setting, says):
    """The adversarial review's bad settings, through every command that reads params.yaml: exit 2,
    one line naming the key, no traceback (never reaching a training, a model or a store)."""
    assert calibflow([*command, "--repo", world["repo"], "--set", setting]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and says in lines[0] and "Traceback" not in lines[0], lines
