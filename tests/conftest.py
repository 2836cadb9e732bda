"""Shared fixtures. The end-to-end tests build a real git + DVC repository in a temporary
directory, with a small ImageFolder cut from scikit-learn's digits, and run the real flow on it:
real DVC, Great Expectations, MLflow (a SQLite store inside that repository) and Prefect (its
temporary local API)."""

from __future__ import annotations

import atexit
import os
import shutil
import signal
import subprocess
import tempfile
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from calibflow.environment import apply_quiet_defaults  # noqa: E402

apply_quiet_defaults()
# Prefect's home for the tests: kept between runs (its temporary server starts faster with a
# warm database) but apart from the user's ~/.prefect.
# A test session started from a background job (`cmd &` in a script) inherits SIGINT ignored, and
# so would every process it starts; the served-deployment test stops `calibflow schedule` with the
# Ctrl-C a terminal would send. A Python handler (unlike SIG_IGN) becomes the default after exec.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)
os.environ.setdefault("PREFECT_HOME", str(REPO / ".calibflow" / "prefect-home-tests"))
# Prefect creates its SQLite file but not missing parent folders: on a fresh clone .calibflow/
# does not exist yet, and the temporary API server would fail to open its database.
Path(os.environ["PREFECT_HOME"]).mkdir(parents=True, exist_ok=True)
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
# One content-keyed cache for every checkout the tests make (calibflow.disk_cache): each test's
# fresh copy of the tiny repository would otherwise simulate the same gate power again (about half
# a minute a run on two cores). Tests of the cache itself pass their own folders.
if "CALIBFLOW_CACHE_DIR" not in os.environ:
    os.environ["CALIBFLOW_CACHE_DIR"] = tempfile.mkdtemp(prefix="calibflow-test-cache-")
    atexit.register(shutil.rmtree, os.environ["CALIBFLOW_CACHE_DIR"], ignore_errors=True)
for variable, value in {
    "GIT_AUTHOR_NAME": "calibflow tests",
    "GIT_AUTHOR_EMAIL": "tests@calibflow.invalid",
    "GIT_COMMITTER_NAME": "calibflow tests",
    "GIT_COMMITTER_EMAIL": "tests@calibflow.invalid",
}.items():
    os.environ.setdefault(variable, value)

TINY_PARAMS = """\
seed: 0
data:
  path: data/tiny
  min_per_class: 10
split: {train: 0.5, val: 0.1, calibration: 0.2, test: 0.2}
model: {arch: small_cnn, width: 8}
train: {epochs: 5, batch_size: 32, lr: 0.05, val_every: 2}
calibration: {min_temperature: 0.01}
gates: {max_ece: 0.3, min_accuracy: 0.5}
registry: {model_name: tiny-digits, experiment: tiny}
"""


def run(*args: str, cwd: Path, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run(list(args), cwd=cwd, capture_output=True, text=True)
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(args)} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
    return result


def dvc(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return run(str(Path(sys.executable).parent / "dvc"), *args, cwd=cwd)


def make_repo(root: Path, classes=(0, 1, 2, 3, 4), per_class: int = 60) -> Path:
    """A git + DVC repository holding data/tiny (an ImageFolder of digits) and params.yaml."""
    from calibflow.data.prepare import write_digits

    root.mkdir(parents=True, exist_ok=True)
    run("git", "init", "-q", "-b", "main", cwd=root)
    dvc("init", "-q", cwd=root)
    dvc("config", "core.analytics", "false", cwd=root)
    write_digits(root / "data" / "tiny", classes=tuple(classes), per_class=per_class)
    (root / "params.yaml").write_text(TINY_PARAMS)
    (root / "dvc.yaml").write_text("metrics:\n  - reports/metrics.json\n")
    (root / ".gitignore").write_text("mlflow.db\nmlruns/\nmlartifacts/\n.calibflow/\nreports/metrics.json\n")
    dvc("add", "-q", "data/tiny", cwd=root)
    run("git", "add", "-A", cwd=root)
    run("git", "commit", "-qm", "tiny digits", cwd=root)
    return root


class ServedModel:
    """`mlflow models serve -m model_uri` (MLflow's own scoring server; `env` must put the venv's
    bin/ on PATH, for its uvicorn), started in its own process group and answering /ping;
    predict() queries it over HTTP, stop() ends it with its workers. Its log: `log`."""

    def __init__(self, model_uri: str, env: dict[str, str], log: Path, ping_timeout_s: float = 120):
        import socket

        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        self.log = log
        venv_bin = Path(sys.executable).parent
        command = [str(venv_bin / "mlflow"), "models", "serve", "-m", model_uri, "--env-manager", "local"]
        with open(log, "wb") as out:
            self.process = subprocess.Popen(
                [*command, "--host", "127.0.0.1", "--port", str(self.port)],
                env=env,
                cwd=log.parent,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its uvicorn workers in its own group, stopped with it
            )
        try:
            self._wait_for_ping(ping_timeout_s)
        except BaseException:
            self.stop()
            raise

    def _wait_for_ping(self, timeout_s: float) -> None:
        import time
        import urllib.request

        deadline = time.monotonic() + timeout_s
        while True:
            said = self.log.read_text()[-4000:]
            assert self.process.poll() is None, f"mlflow models serve exited {self.process.returncode}:\n{said}"
            assert time.monotonic() < deadline, f"no answer to /ping within {timeout_s:.0f} s:\n{said}"
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/ping", timeout=5) as answer:
                    if answer.status == 200:
                        return
            except OSError:
                time.sleep(1)

    def predict(self, images):
        """The server's predictions for uint8 `images`, as float64."""
        import numpy as np

        status, answer = self.answer(images)
        assert status == 200, answer
        return np.asarray(answer["predictions"], dtype=np.float64)

    def answer(self, images) -> tuple[int, dict]:
        """The HTTP status and JSON body the server answers for `images`."""
        import json
        import urllib.error
        import urllib.request

        request = urllib.request.Request(
            f"http://127.0.0.1:{self.port}/invocations",
            data=json.dumps({"inputs": images.tolist()}).encode(),
            headers={"Content-Type": "application/json"},
        )
        try:
            with urllib.request.urlopen(request, timeout=60) as answer:
                return answer.status, json.loads(answer.read())
        except urllib.error.HTTPError as refused:
            return refused.code, json.loads(refused.read())

    def stop(self) -> None:
        try:
            os.killpg(self.process.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()


def mlflow_server(repo: Path, model_uri: str, work: Path) -> ServedModel:
    """`mlflow models serve -m model_uri` over the repo's SQLite store, answering; the caller stops
    it. Its log: work/serve.log."""
    env = {
        **os.environ,
        "MLFLOW_TRACKING_URI": f"sqlite:///{repo.resolve() / 'mlflow.db'}",
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
    }
    return ServedModel(model_uri, env, work / "serve.log")


def mlflow_serve_predict(repo: Path, model_uri: str, images, work: Path):
    """The predictions `mlflow models serve -m model_uri` answers for `images`, as float64; the
    server is stopped before this returns."""
    server = mlflow_server(repo, model_uri, work)
    try:
        return server.predict(images)
    finally:
        server.stop()


@pytest.fixture(scope="session")
def tiny_repo_template(tmp_path_factory) -> Path:
    return make_repo(tmp_path_factory.mktemp("template") / "repo")


@pytest.fixture
def tiny_repo(tiny_repo_template, tmp_path, monkeypatch) -> Path:
    """A fresh copy of the template repository (DVC cache included), with no MLflow store yet."""
    repo = tmp_path / "repo"
    shutil.copytree(tiny_repo_template, repo, symlinks=True)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)  # use the embedded default store
    return repo


@dataclass(frozen=True)
class UntrainedModel:
    """A 3-class small_cnn on 8x8 grayscale, untrained, with a temperature fitted to its logits:
    what a registry or a served model needs to hold, when the model's quality does not matter."""

    network: object  # the torch module, in eval mode
    checkpoint: Path
    calibration_state: Path
    images: object  # (40, 1, 8, 8) uint8 tensor
    logits: object  # the network's logits of `images`


def untrained_model(work: Path, classes=("a", "b", "c")) -> UntrainedModel:
    import json

    import torch

    from calibflow.calibrators import fit_calibrator
    from calibflow.training.models import ModelSpec, build_model, save_checkpoint

    torch.manual_seed(0)
    spec = ModelSpec(arch="small_cnn", in_channels=1, num_classes=3, image_height=8, image_width=8, width=4)
    network = build_model(spec).eval()
    work.mkdir(parents=True, exist_ok=True)
    checkpoint = save_checkpoint(work / "checkpoint.pt", network, spec, list(classes), "L")
    images = torch.randint(0, 256, (40, 1, 8, 8), dtype=torch.uint8)
    with torch.no_grad():
        logits = network(images)
    # Labels that mostly agree with the network, so the temperature has an interior optimum.
    labels = torch.where(torch.arange(40) % 4 == 0, torch.arange(40) % 3, logits.argmax(dim=1))
    state = work / "calibration.json"
    state.write_text(json.dumps(fit_calibrator("temperature", logits, labels).to_state()))
    return UntrainedModel(network, checkpoint, state, images, logits)
