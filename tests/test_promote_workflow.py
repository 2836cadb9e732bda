"""infra/cd/promote.yml runs as written: its `run:` steps, in order, in a fresh clone of this
repository, against a real MLflow server (SQLite store, proxied artifacts), a real Prefect
server and a DVC remote on local disk, over four nights of a team's life (after a broken one):

0. the Prefect server is not there: `calibflow run` exits 2, its step too, the job is red;
1. the first model: it becomes @champion, nothing to gate;
2. nothing new but a commit of the reports: the retrain is skipped (the code runs read is unchanged);
3. more data (the team adds the full digits set with `calibflow data add --replace --push`):
   promoted;
4. far fewer epochs: rejected with exit 1 (by `calibflow run` or `calibflow gate`), the job green,
   @champion unchanged and still answering `mlflow models serve` over HTTP.

Between nights the team commits the job's reports/, so `dvc metrics diff` and `dvc plots diff`
are checked between two nights' commits in another fresh clone.

The runner shim (`run_job`), what stands in for GitHub:
- `actions/checkout` (fetch-depth 0) is a full `git clone` of the team's origin into a new
  workspace each night; `actions/setup-python` is the Python 3.11 running this test;
  `actions/upload-artifact` is left out (its files are read from the workspace instead).
- `make setup` runs as written, against the venv running this test: the workspace's `.venv` is a
  link to it (make created it: its stamp must exist), and the clone's requirements.lock and
  pyproject.toml are dated before the stamp, so make finds it current instead of installing
  several GB. That venv's editable install points at the checkout running the test, so
  PYTHONPATH names the workspace: the clone's code is the code that runs.
- `${{ }}` expressions are evaluated as GitHub does for what the file uses: contexts (secrets,
  vars, inputs, github, steps.<id>.outputs, runner), string literals, ==, !=, &&, ||, !, and
  always()/success()/failure(); a missing value is ''. A step's `if:` without a status function
  runs only while every earlier step succeeded.
- `run:` is `bash -e {0}` (GitHub's default shell) in the workspace; each step gets its own
  $GITHUB_OUTPUT (name=value and name<<DELIMITER lines), $GITHUB_PATH (prepended to PATH for the
  later steps), $GITHUB_ENV and $GITHUB_STEP_SUMMARY files; the process environment is cut down
  to system paths with the venv's bin removed, so only $GITHUB_PATH puts it back.
- secrets.MLFLOW_TRACKING_URI and secrets.PREFECT_API_URL are the servers, vars.DVC_REMOTE_URL
  the remote's folder; every other secret is empty, as an unset one is on GitHub.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import yaml

from tests.conftest import ServedModel
from tests.test_servers import Server, client_env, free_port, stop_group

REPO = Path(__file__).resolve().parents[1]
WORKFLOW = REPO / "infra" / "cd" / "promote.yml"
JOB = "gate-and-promote"
VENV = Path(sys.executable).parent.parent
STEP_TIMEOUT_S = 600
# Sized for minutes on two shared cores: a small CNN for a few epochs, no corruption suite. Night 1
# reads SUBSET_PER_CLASS images of each digit, night 3 all of them (about 180 each).
SUBSET_PER_CLASS = 100
EPOCHS = 15
WORSE_EPOCHS = 1


# ---------------------------------------------------------------------------------------------
# GitHub expressions, as far as promote.yml uses them


_TOKEN = re.compile(
    r"\s*(?:(?P<string>'(?:[^']|'')*')|(?P<op>==|!=|&&|\|\||!|\(|\))|(?P<number>\d+(?:\.\d+)?)"
    r"|(?P<call>(?:always|success|failure|cancelled)\(\))|(?P<name>[A-Za-z_][\w-]*(?:\.[A-Za-z_][\w-]*)*))"
)
_STATUS_CALL = re.compile(r"\b(always|success|failure|cancelled)\(\)")


def evaluate(expression: str, contexts: dict, job_ok: bool = True):
    """The value of a GitHub expression (without its `${{ }}`), translated token by token to a
    Python expression over values looked up here: `||`/`&&` return an operand as GitHub's do."""
    python, values, position = [], {}, 0
    expression = expression.strip()
    while position < len(expression):
        match = _TOKEN.match(expression, position)
        if not match or match.end() == position:
            raise ValueError(f"cannot read the expression {expression!r} at {expression[position:]!r}")
        position = match.end()
        kind, text = match.lastgroup, match.group(match.lastgroup)
        if kind == "string":
            values[f"_v{len(values)}"] = text[1:-1].replace("''", "'")
            python.append(f"_v{len(values) - 1}")
        elif kind == "op":
            python.append({"&&": " and ", "||": " or ", "!": " not "}.get(text, f" {text} "))
        elif kind == "number":
            python.append(text)
        elif kind == "call":
            name = text[:-2]
            python.append(str({"always": True, "success": job_ok, "failure": not job_ok, "cancelled": False}[name]))
        else:
            literal = {"true": True, "false": False, "null": None}
            value = literal[text] if text in literal else _lookup(contexts, text)
            values[f"_v{len(values)}"] = value
            python.append(f"_v{len(values) - 1}")
    return eval("".join(python), {"__builtins__": {}}, values)  # noqa: S307 - built above from tokens only


def _lookup(contexts: dict, dotted: str):
    value = contexts
    for part in dotted.split("."):
        value = value.get(part, "") if isinstance(value, dict) else ""
    return value


def _as_text(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return "" if value is None else str(value)


def substitute(text: str, contexts: dict) -> str:
    return re.sub(r"\$\{\{(.*?)\}\}", lambda m: _as_text(evaluate(m.group(1), contexts)), str(text))


def condition(step: dict, contexts: dict, job_ok: bool) -> bool:
    text = str(step.get("if", "success()")).strip()
    if text.startswith("${{") and text.endswith("}}"):
        text = text[3:-2]
    if not _STATUS_CALL.search(text):
        text = f"success() && ({text})"
    return bool(evaluate(text, contexts, job_ok))


def test_expressions_evaluate_as_github_does():
    contexts = {"inputs": {"candidate": ""}, "steps": {"train": {"outputs": {"candidate": "3"}}}, "github": {}}
    assert evaluate("inputs.candidate || steps.train.outputs.candidate", contexts) == "3"
    assert evaluate("steps.gate.outputs.code == '0'", contexts) is False
    assert evaluate("github.event_name == 'schedule' || inputs.candidate == ''", contexts) is True
    assert condition({"if": "${{ steps.train.outputs.candidate != '' }}"}, contexts, job_ok=False) is False
    assert condition({"if": "always()"}, contexts, job_ok=False) is True
    assert substitute("x=${{ inputs.missing }}y", contexts) == "x=y"


def read_outputs(path: Path) -> dict[str, str]:
    """$GITHUB_OUTPUT's format: name=value lines, and name<<DELIMITER ... DELIMITER blocks."""
    outputs, lines = {}, path.read_text().splitlines() if path.exists() else []
    index = 0
    while index < len(lines):
        line = lines[index]
        if "<<" in line and ("=" not in line or line.index("<<") < line.index("=")):
            name, delimiter = line.split("<<", 1)
            end = lines.index(delimiter, index + 1)
            outputs[name] = "\n".join(lines[index + 1 : end])
            index = end + 1
            continue
        if "=" in line:
            name, value = line.split("=", 1)
            outputs[name] = value
        index += 1
    return outputs


def test_outputs_file_reads_both_forms(tmp_path):
    (tmp_path / "out").write_text("code=1\nreport<<EOF\na=b\nc\nEOF\ncandidate=7\n")
    assert read_outputs(tmp_path / "out") == {"code": "1", "report": "a=b\nc", "candidate": "7"}


# ---------------------------------------------------------------------------------------------
# What a fresh clone meets before the workflow's data step


def test_data_tracked_but_not_pulled_says_pull_or_repro_not_add(tiny_repo):
    from calibflow.data.versioning import resolve_data
    from calibflow.errors import DataVersionError

    shutil.rmtree(tiny_repo / "data" / "tiny")  # a fresh clone: the .dvc file without the files
    with pytest.raises(DataVersionError) as refused:
        resolve_data(tiny_repo, "data/tiny")
    message = str(refused.value)
    assert "`dvc pull data/tiny`" in message and "dvc repro prepare" in message
    assert "dvc add" not in message


def test_reports_docs_and_params_change_neither_the_code_nor_its_state_and_code_does(tiny_repo):
    from calibflow.data.versioning import code_version

    def commit(message: str, *paths: str) -> None:
        subprocess.run(["git", "add", "-f", *paths], cwd=tiny_repo, check=True)
        subprocess.run(["git", "commit", "-qm", message], cwd=tiny_repo, check=True)

    before = code_version(tiny_repo)
    reports = tiny_repo / "reports"
    reports.mkdir()
    (reports / "metrics.json").write_text("{}\n")
    (tiny_repo / "docs").mkdir(exist_ok=True)
    (tiny_repo / "docs" / "notes.md").write_text("what the team learned\n")
    commit("reports and docs", "reports", "docs")
    after = code_version(tiny_repo)
    assert after.commit != before.commit and after.tree == before.tree and not after.dirty
    (reports / "metrics.json").write_text('{"test": 1}\n')  # the next run rewrote it
    # params.yaml: the params hash covers what in it shapes a model (a new gate re-gates, no retrain)
    (tiny_repo / "params.yaml").write_text((tiny_repo / "params.yaml").read_text() + "\n")
    assert code_version(tiny_repo).dirty is False
    commit("params", "params.yaml")
    assert code_version(tiny_repo).tree == before.tree
    # code: uncommitted, the tree is dirty; committed, it is other code
    (tiny_repo / "augment.py").write_text("FLIP = True\n")
    commit("code", "augment.py")
    assert code_version(tiny_repo).tree != before.tree and not code_version(tiny_repo).dirty
    (tiny_repo / "augment.py").write_text("FLIP = False\n")
    assert code_version(tiny_repo).dirty is True


# ---------------------------------------------------------------------------------------------
# The runner


@dataclass
class Step:
    name: str
    id: str | None
    ran: bool
    code: int | None = None
    outputs: dict[str, str] = field(default_factory=dict)
    log: str = ""
    seconds: float = 0.0


@dataclass
class Job:
    workspace: Path
    steps: list[Step]

    @property
    def green(self) -> bool:
        return all(step.code in (None, 0) for step in self.steps)

    def step(self, step_id: str) -> Step:
        return next(step for step in self.steps if step.id == step_id)

    def output(self, step_id: str, name: str) -> str:
        return self.step(step_id).outputs.get(name, "")

    def transcript(self) -> str:
        parts = []
        for step in self.steps:
            head = f"--- {step.name}: " + (f"step exit {step.code}, {step.seconds:.0f} s" if step.ran else "skipped")
            parts.append(head + (f", outputs {step.outputs}" if step.outputs else "") + "\n" + step.log[-6000:])
        return "\n".join(parts)


def system_path() -> str:
    """PATH without the venv's bin: only the workflow's $GITHUB_PATH line may put it back."""
    venv_bin = str(VENV / "bin")
    return os.pathsep.join(p for p in os.environ.get("PATH", "/usr/bin:/bin").split(os.pathsep) if p != venv_bin)


def base_env(home: Path) -> dict[str, str]:
    keep = ("LANG", "LC_ALL", "TZ", "TMPDIR", "USER", "LOGNAME")
    env = {key: os.environ[key] for key in keep if key in os.environ}
    env.update(HOME=str(home), PATH=system_path(), CI="true", GITHUB_ACTIONS="true")
    return env


def checkout(origin: Path, workspace: Path) -> None:
    """actions/checkout with fetch-depth 0, and the shim's venv (see the module docstring)."""
    subprocess.run(["git", "clone", "-q", str(origin), str(workspace)], check=True)
    stamp = VENV / ".installed"
    assert stamp.exists(), f"{stamp} is missing: run the tests through make (make test-all) or `make setup` first"
    (workspace / ".venv").symlink_to(VENV, target_is_directory=True)
    before = stamp.stat().st_mtime - 60
    for name in ("requirements.lock", "pyproject.toml"):
        os.utime(workspace / name, (before, before))


def run_job(workflow: dict, *, origin: Path, workspace: Path, home: Path, secrets: dict, variables: dict) -> Job:
    """One run of the job on a schedule event, its steps in order (see the module docstring)."""
    checkout(origin, workspace)
    temp = workspace.parent / f"{workspace.name}-runner-temp"
    temp.mkdir()
    job = workflow["jobs"][JOB]
    contexts = {
        "secrets": secrets,
        "vars": variables,
        "inputs": {},
        "github": {"event_name": "schedule", "workspace": str(workspace)},
        "runner": {"temp": str(temp), "os": "Linux"},
        "steps": {},
        "env": {},
    }
    env = base_env(home)
    env.update(RUNNER_TEMP=str(temp), GITHUB_WORKSPACE=str(workspace), GITHUB_EVENT_NAME="schedule")
    env["PYTHONPATH"] = str(workspace)
    for scope in (workflow.get("env", {}), job.get("env", {})):
        for key, value in scope.items():
            env[key] = substitute(value, contexts)
    contexts["env"] = dict(env)
    path_prefix: list[str] = []
    steps, job_ok = [], True
    for index, step in enumerate(job["steps"]):
        name = step.get("name") or step.get("uses") or f"step {index}"
        if "uses" in step or not condition(step, contexts, job_ok):
            steps.append(Step(name, step.get("id"), ran=False))
            continue
        files = {key: temp / f"{key.lower()}-{index}" for key in ("GITHUB_OUTPUT", "GITHUB_PATH", "GITHUB_ENV")}
        for path in files.values():
            path.touch()
        step_env = {**env, **{key: str(path) for key, path in files.items()}}
        step_env["GITHUB_STEP_SUMMARY"] = str(temp / f"summary-{index}")
        step_env.update({key: substitute(value, contexts) for key, value in step.get("env", {}).items()})
        step_env["PATH"] = os.pathsep.join([*path_prefix, step_env["PATH"]])
        script = temp / f"step-{index}.sh"
        script.write_text(step["run"])
        started = time.monotonic()
        done = subprocess.run(
            ["bash", "-e", str(script)],
            cwd=workspace,
            env=step_env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            timeout=STEP_TIMEOUT_S,
        )
        outputs = read_outputs(files["GITHUB_OUTPUT"])
        seconds = time.monotonic() - started
        steps.append(Step(name, step.get("id"), True, done.returncode, outputs, done.stdout, seconds))
        if step.get("id"):
            contexts["steps"][step["id"]] = {
                "outputs": outputs,
                "outcome": "success" if done.returncode == 0 else "failure",
            }
        path_prefix = [*reversed(files["GITHUB_PATH"].read_text().split()), *path_prefix]
        env.update(read_outputs(files["GITHUB_ENV"]))
        job_ok = job_ok and done.returncode == 0
    return Job(workspace, steps)


# ---------------------------------------------------------------------------------------------
# The team's side: a clone, the DVC remote, data and params committed as a team would


class Team:
    def __init__(self, root: Path, origin: Path, remote: Path, home: Path):
        self.root, self.remote = root, remote
        self.env = {
            **base_env(home),
            "PATH": f"{VENV / 'bin'}{os.pathsep}{system_path()}",
            "PYTHONPATH": str(root),
            "GIT_AUTHOR_NAME": "team",
            "GIT_AUTHOR_EMAIL": "team@example.com",
            "GIT_COMMITTER_NAME": "team",
            "GIT_COMMITTER_EMAIL": "team@example.com",
            "DO_NOT_TRACK": "1",
        }
        subprocess.run(["git", "clone", "-q", str(origin), str(root)], check=True)
        self("dvc", "remote", "modify", "--local", "localdir", "url", str(remote))

    def __call__(self, *args: str) -> str:
        done = subprocess.run(args, cwd=self.root, env=self.env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, f"{' '.join(args)} exited {done.returncode}:\n{done.stdout}\n{done.stderr}"
        return done.stdout

    def set_params(self, message: str, **changes: dict) -> None:
        params_file = self.root / "params.yaml"
        params = yaml.safe_load(params_file.read_text())
        for section, values in changes.items():
            params[section] = {**params.get(section, {}), **values}
        params_file.write_text(yaml.safe_dump(params, sort_keys=False))
        self("git", "commit", "-qm", message, "--", "params.yaml")
        self("git", "push", "-q", "origin", "HEAD")

    def commit_reports(self, job: Job, message: str) -> str:
        """What the job uploaded as its artifact, committed by the team (dvc.yaml's metrics and plots)."""
        shutil.rmtree(self.root / "reports", ignore_errors=True)
        shutil.copytree(job.workspace / "reports", self.root / "reports")
        self("git", "add", "reports")
        self("git", "commit", "-qm", message)
        self("git", "push", "-q", "origin", "HEAD")
        return self("git", "rev-parse", "HEAD").strip()


def digit_images(folder: Path, per_class: int | None, out: Path) -> Path:
    """The first `per_class` images of each class folder (all of them: None), copied to `out`."""
    for class_dir in sorted(p for p in folder.iterdir() if p.is_dir()):
        target = out / class_dir.name
        target.mkdir(parents=True)
        for image in sorted(class_dir.iterdir())[:per_class]:
            shutil.copy2(image, target / image.name)
    return out


# ---------------------------------------------------------------------------------------------
# Servers: MLflow and Prefect as test_servers.py starts them; the champion served by MLflow


@pytest.fixture
def servers(tmp_path):
    prefect_home, mlflow_root = tmp_path / "prefect-server", tmp_path / "mlflow-server"
    prefect_home.mkdir()
    mlflow_root.mkdir()
    prefect_port, mlflow_port = free_port(), free_port()
    prefect = Server(
        "prefect server",
        [str(VENV / "bin" / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(prefect_port)],
        f"http://127.0.0.1:{prefect_port}/api/health",
        client_env(PREFECT_HOME=str(prefect_home), PREFECT_UI_ENABLED="false", PREFECT_LOGGING_LEVEL="WARNING"),
        prefect_home / "server.log",
    )
    mlflow = Server(
        "mlflow server",
        [
            str(VENV / "bin" / "mlflow"),
            "server",
            "--host",
            "127.0.0.1",
            "--port",
            str(mlflow_port),
            "--workers",
            "1",
            "--backend-store-uri",
            f"sqlite:///{mlflow_root / 'mlflow.db'}",
            "--serve-artifacts",
            "--artifacts-destination",
            str(mlflow_root / "artifacts"),
        ],
        f"http://127.0.0.1:{mlflow_port}/health",
        client_env(MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false"),
        mlflow_root / "server.log",
    )
    started = []
    try:
        for server in (prefect, mlflow):
            server.start()
            started.append(server)
        yield {"prefect": f"http://127.0.0.1:{prefect_port}/api", "mlflow": f"http://127.0.0.1:{mlflow_port}"}
    finally:
        for server in started:
            server.stop()


class ServedChampion(ServedModel):
    """`mlflow models serve -m models:/NAME@champion` against the team's tracking server; stopped
    with every process of its group, or the test fails."""

    def __init__(self, model: str, tracking_uri: str, log: Path):
        env = {**client_env(MLFLOW_TRACKING_URI=tracking_uri), "PATH": f"{VENV / 'bin'}{os.pathsep}{system_path()}"}
        super().__init__(f"models:/{model}@champion", env, log, ping_timeout_s=180)

    def stop(self) -> None:
        stop_group(self.process, signal.SIGTERM, grace_s=30)


def read_images(folder: Path, count: int) -> np.ndarray:
    from PIL import Image

    files = sorted(folder.rglob("*.png"))[:: max(1, len(list(folder.rglob("*.png"))) // count)][:count]
    return np.stack([np.asarray(Image.open(f))[..., None] for f in files]).astype(np.uint8)


def registry(tracking_uri: str, model: str) -> tuple[dict[str, str], list[str]]:
    """(aliases -> version, every version) of `model` on the MLflow server."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri)
    if not client.search_registered_models(f"name='{model}'"):
        return {}, []
    aliases = {alias: str(version) for alias, version in client.get_registered_model(model).aliases.items()}
    return aliases, sorted(str(v.version) for v in client.search_model_versions(f"name='{model}'"))


# ---------------------------------------------------------------------------------------------
# Four nights


@pytest.mark.e2e
@pytest.mark.slow
@pytest.mark.timeout(3600)
def test_promote_workflow_four_nights_in_fresh_clones(servers, tmp_path):
    workflow = yaml.safe_load(WORKFLOW.read_text())
    model = workflow["env"]["MODEL"]
    home, remote = tmp_path / "home", tmp_path / "dvc-remote"
    home.mkdir()
    remote.mkdir()
    origin = tmp_path / "origin.git"
    subprocess.run(["git", "clone", "-q", "--bare", "--no-local", str(REPO), str(origin)], check=True)
    team = Team(tmp_path / "team", origin, remote, home)
    secrets = {"MLFLOW_TRACKING_URI": servers["mlflow"], "PREFECT_API_URL": servers["prefect"]}
    variables = {"DVC_REMOTE_URL": str(remote)}

    def night(number: int, **secrets_changed: str) -> Job:
        job = run_job(
            workflow,
            origin=origin,
            workspace=tmp_path / f"night-{number}",
            home=home,
            secrets={**secrets, **secrets_changed},
            variables=variables,
        )
        print(f"\n=== night {number}\n{job.transcript()}")
        return job

    # The team's data: the embedded digits, a subset of each class first, pushed to the remote.
    team("calibflow", "prepare-digits", "--out", str(tmp_path / "all-digits"))
    subset = digit_images(tmp_path / "all-digits", SUBSET_PER_CLASS, tmp_path / "subset")
    team("calibflow", "data", "add", str(subset), "--name", "digits-team", "--push")
    team.set_params(
        "Nightly model: data/digits-team, a short schedule, no corruption suite",
        data={"path": "data/digits-team"},
        train={"epochs": EPOCHS},
        shift={"corruptions": [], "severities": []},
        # 400 test images (100 a class): the run's gate-power check says an identical retrain passes
        # max_ece_increase 0.01 on 0% of such splits ("add about 307 test images ... or loosen
        # gates.max_ece_increase to 0.0171"). Night 3's better model is no identical retrain: its
        # paired ECE values spread wider, and on 720 test images the 95% bound sat 0.07 above the
        # estimate (-0.0148 -> 0.0555), so the team loosens the tolerance to 0.08. A worse model
        # still fails: night 4's drops accuracy far below max_accuracy_drop.
        gates={"max_ece": 0.1, "min_accuracy": 0.7, "max_ece_increase": 0.08, "n_resamples": 100},
    )

    # Night 0: the Prefect server is not where the secret says: calibflow run exits 2, and so does its
    # step, unchanged; the job is red, nothing is gated and nothing registered.
    broken = night(0, PREFECT_API_URL=f"http://127.0.0.1:{free_port()}/api")
    assert not broken.green and broken.step("train").code == 2, broken.transcript()
    assert broken.output("train", "code") == "2" and "::error::calibflow run could not run" in broken.step("train").log
    assert not broken.step("gate").ran and not broken.step("promote").ran
    assert registry(servers["mlflow"], model) == ({}, [])

    # Night 1: the first model becomes @champion; nothing to gate.
    first = night(1)
    assert first.green, first.transcript()
    assert first.output("train", "code") == "0" and not first.output("train", "candidate")
    assert not first.step("gate").ran and not first.step("promote").ran
    aliases, versions = registry(servers["mlflow"], model)
    assert aliases == {"champion": "1"} and versions == ["1"]
    reports_1 = team.commit_reports(first, "Reports of night 1's run")

    # Night 2: the same data, params and code (a commit of reports only): skipped, naming version 1.
    second = night(2)
    assert second.green, second.transcript()
    assert "1" not in {second.output(s, "code") for s in ("train", "gate", "promote")}, second.transcript()
    run_2 = json.loads((second.workspace.parent / "night-2-runner-temp" / "run.json").read_text())
    assert run_2.get("skipped"), (run_2, second.transcript())
    aliases, versions = registry(servers["mlflow"], model)
    assert aliases == {"champion": "1"} and versions == ["1"]
    champion_2 = aliases["champion"]

    # Night 3: the team adds the full set as the next version of its data: a better model, promoted.
    everything = digit_images(tmp_path / "all-digits", None, tmp_path / "everything")
    team("calibflow", "data", "add", str(everything), "--name", "digits-team", "--replace", "--push")
    team("git", "push", "-q", "origin", "HEAD")
    third = night(3)
    assert third.green, third.transcript()
    candidate = third.output("train", "candidate")
    assert candidate and third.output("gate", "code") == "0", third.transcript()
    assert third.output("promote", "code") == "0", third.transcript()
    aliases, _ = registry(servers["mlflow"], model)
    assert aliases["champion"] == candidate and aliases.get("previous-champion") == champion_2, aliases
    reports_3 = team.commit_reports(third, "Reports of night 3's run")

    # dvc metrics / plots between two nights' commits, in a fresh clone.
    reader = tmp_path / "reader"
    subprocess.run(["git", "clone", "-q", str(origin), str(reader)], check=True)
    dvc_env = {**team.env, "PYTHONPATH": str(reader)}

    def dvc(*args: str) -> str:
        done = subprocess.run(["dvc", *args], cwd=reader, env=dvc_env, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, f"dvc {' '.join(args)} exited {done.returncode}:\n{done.stdout}\n{done.stderr}"
        return done.stdout

    shown = json.loads(dvc("metrics", "show", "--json"))
    assert "reports/metrics.json" in json.dumps(shown), shown
    diff = json.loads(dvc("metrics", "diff", reports_1, reports_3, "--json"))["reports/metrics.json"]
    changed = {key: d for key, d in diff.items() if isinstance(d.get("diff"), (int, float)) and d["diff"] != 0}
    assert changed, diff
    plots = json.loads(dvc("plots", "diff", reports_1, reports_3, "--json"))["data"]
    for curve in ("reports/plots/train.csv", "reports/plots/val.csv"):
        (plot,) = plots[curve]
        assert plot["revisions"] == [reports_1, reports_3], plot["revisions"]
        assert {row["rev"] for row in plot["content"]["data"]["values"]} == {reports_1, reports_3}
    diagrams = plots["reports/plots/reliability_diagram.png"]
    assert [d["revisions"] for d in diagrams] == [[reports_1], [reports_3]], diagrams

    # Night 4: far fewer epochs, served champion answering meanwhile: rejected with exit 1, job green.
    images = read_images(tmp_path / "all-digits", 8)
    served = ServedChampion(model, servers["mlflow"], tmp_path / "serve.log")
    try:
        before = served.predict(images)
        assert before.shape == (8, 10)
        team.set_params("Nightly model: a quicker schedule", train={"epochs": WORSE_EPOCHS})
        fourth = night(4)
        assert fourth.green, fourth.transcript()
        codes = (fourth.output("train", "code"), fourth.output("gate", "code"))
        assert codes in (("1", ""), ("0", "1")), fourth.transcript()
        assert not fourth.step("promote").ran
        aliases, _ = registry(servers["mlflow"], model)
        assert aliases["champion"] == candidate, aliases
        np.testing.assert_allclose(served.predict(images), before, rtol=0, atol=1e-9)
    finally:
        served.stop()
