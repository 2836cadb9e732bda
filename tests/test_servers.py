"""The production shape on loopback: a real Prefect server and a real MLflow tracking server
(SQLite store, proxied artifacts), started as processes of their own.

- The retraining deployment is served by `calibflow schedule` (a separate process, started from
  another directory), triggered through Prefect's API, and registers its model on the MLflow
  server, with its lineage tags and @champion.
- The same deployment registered with a work pool (`calibflow schedule --deploy`) is run by a
  process worker; as data, params and code equal @champion's, the retrain is skipped.
- The MLflow server dies right before registration: MLflow's own HTTP retries give up (the task
  does not retry them again), the run fails naming the server and how long it waited, and once
  the server is back nothing was registered and no alias moved.
- A tracking server that is not there at all: `calibflow status` and `calibflow run` exit 2
  within 2 minutes, saying how long they waited.
- A run killed with SIGKILL leaves Prefect's temporary API server running and its MLflow run
  RUNNING; the next run stops that server and marks that run KILLED.

Both servers are fixtures of this module (`prefect_server`, `mlflow_server`): each is started in
its own process group, waited for on its health endpoint, and stopped with every process it
started (checked when it stops).
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import textwrap
import time
import urllib.request
from pathlib import Path

import pytest
import yaml
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from calibflow import leftovers
from calibflow.config import load_config
from calibflow.environment import STORE_PATIENCE_DEFAULTS
from tests.conftest import make_repo, run

pytestmark = pytest.mark.e2e
BIN = Path(sys.executable).parent
MODEL = "tiny-digits"
SCHEDULE = {
    "deployment": "test-retrain",
    "cron": "15 3 * * 1",
    "timezone": "Europe/Paris",
    "work_pool": "calibflow",
    "data_rev": None,
}
REQUIRED_TAGS = ("data_hash", "git_commit", "params_hash", "seed", "test/calibrated/ece", "calibration/temperature")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def live_members(pgid: int) -> list[str]:
    """Processes of group `pgid` that are still running (zombies, already dead, do not count)."""
    members = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue
        name_end = text.rindex(")")
        fields = text[name_end + 2 :].split()
        if int(fields[2]) == pgid and fields[0] != "Z":
            members.append(f"{stat.parent.name} {text[text.index('(') + 1 : name_end]}")
    return members


def stop_group(process: subprocess.Popen, first_signal: int = signal.SIGTERM, grace_s: float = 20) -> None:
    """Signal the process group, wait for it, kill what is left; fail if anything survives."""
    pgid = process.pid  # start_new_session: the leader's pid is the group id
    try:
        os.killpg(pgid, first_signal)
    except ProcessLookupError:
        pass
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline and (process.poll() is None or live_members(pgid)):
        time.sleep(0.2)
    if process.poll() is None or live_members(pgid):
        try:
            os.killpg(pgid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        process.wait(timeout=10)
        time.sleep(0.5)
    left = live_members(pgid)
    assert not left, f"processes left behind: {left}"


class Server:
    """A server command started in its own session (process group), healthy when `health_url`
    answers 200."""

    def __init__(self, name: str, command: list[str], health_url: str, env: dict[str, str], log: Path):
        self.name, self.command, self.health_url, self.env, self.log = name, command, health_url, env, log
        self.process: subprocess.Popen | None = None
        self.startup_s: list[float] = []

    def start(self, timeout_s: float = 120) -> float:
        started = time.monotonic()
        with open(self.log, "ab") as log:
            self.process = subprocess.Popen(
                self.command,
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        while time.monotonic() - started < timeout_s:
            if self.process.poll() is not None:
                raise AssertionError(f"{self.name} exited with {self.process.returncode}:\n{self.log_tail()}")
            if healthy(self.health_url):
                self.startup_s.append(round(time.monotonic() - started, 1))
                return self.startup_s[-1]
            time.sleep(0.25)
        self.stop()
        raise AssertionError(f"{self.name} not healthy after {timeout_s} s:\n{self.log_tail()}")

    def stop(self) -> None:
        if self.process is not None:
            stop_group(self.process)
            self.process = None

    def log_tail(self, chars: int = 4000) -> str:
        return self.log.read_text(errors="replace")[-chars:]


def healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


def client_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PREFECT_API_URL", "MLFLOW_TRACKING_URI")}
    env.update({"PREFECT_LOGGING_LEVEL": "INFO", **extra})
    return env


@pytest.fixture(scope="module")
def prefect_server(tmp_path_factory):
    """`prefect server start` on a free loopback port, with a Prefect home (and database) of its own."""
    home = tmp_path_factory.mktemp("prefect-server")
    port = free_port()
    command = [str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)]
    server = Server(
        "prefect server",
        command,
        f"http://127.0.0.1:{port}/api/health",
        client_env(PREFECT_HOME=str(home), PREFECT_UI_ENABLED="false", PREFECT_LOGGING_LEVEL="WARNING"),
        home / "server.log",
    )
    server.api_url = f"http://127.0.0.1:{port}/api"
    server.start()
    try:
        yield server
    finally:
        server.stop()
        print(f"\nprefect server startup: {server.startup_s} s")


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    """`mlflow server` on a free loopback port: SQLite backend store, artifacts proxied by the server
    (mlflow-artifacts:/) into a local directory, as an S3 bucket would be in production. Stop and
    start it again with `.stop()` / `.start()`: same port, same store."""
    root = tmp_path_factory.mktemp("mlflow-server")
    port = free_port()
    command = [
        str(BIN / "mlflow"),
        "server",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--workers",
        "1",
        "--backend-store-uri",
        f"sqlite:///{root / 'mlflow.db'}",
        "--serve-artifacts",
        "--artifacts-destination",
        str(root / "artifacts"),
    ]
    # The server's job runner (huey consumers for GenAI jobs) is not used by calibflow.
    server = Server(
        "mlflow server",
        command,
        f"http://127.0.0.1:{port}/health",
        client_env(MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false"),
        root / "server.log",
    )
    server.url, server.root = f"http://127.0.0.1:{port}", root
    server.start()
    try:
        yield server
    finally:
        server.stop()
        print(f"\nmlflow server startups: {server.startup_s} s")


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> Path:
    """A git + DVC repo with the tiny digits, whose params.yaml has a `schedule:` section."""
    root = make_repo(tmp_path_factory.mktemp("servers") / "repo")
    params = yaml.safe_load((root / "params.yaml").read_text())
    (root / "params.yaml").write_text(yaml.safe_dump({**params, "schedule": SCHEDULE}, sort_keys=False))
    run("git", "commit", "-qam", "a retraining schedule", cwd=root)
    return root


def prefect_api(url: str):
    from prefect.settings import PREFECT_API_URL, temporary_settings

    return temporary_settings(updates={PREFECT_API_URL: url})


def registry_state(client: MlflowClient) -> tuple[list[str], dict[str, str]]:
    """(versions, aliases) of MODEL; empty when it was never registered."""
    try:
        aliases = {k: str(v) for k, v in client.get_registered_model(MODEL).aliases.items()}
    except MlflowException as error:
        if error.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise
        return [], {}
    return sorted(str(v.version) for v in client.search_model_versions(f"name='{MODEL}'")), aliases


@pytest.mark.timeout(300)
def test_served_deployment_runs_on_the_prefect_server_and_registers_on_the_mlflow_server(
    prefect_server, mlflow_server, repo, tmp_path
):
    from prefect.client.orchestration import get_client
    from prefect.deployments import run_deployment

    env = client_env(
        PREFECT_API_URL=prefect_server.api_url,
        MLFLOW_TRACKING_URI=mlflow_server.url,
        PREFECT_HOME=str(tmp_path / "prefect-client"),
        PREFECT_RUNNER_POLL_FREQUENCY="1",
    )
    log = tmp_path / "serve.log"
    with open(log, "wb") as out:  # from another directory: the deployment carries the absolute repo path
        serving = subprocess.Popen(
            [str(BIN / "calibflow"), "schedule", "--repo", str(repo)],
            cwd=tmp_path,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
    name = f"calibflow-train/{SCHEDULE['deployment']}"
    try:
        started = time.monotonic()
        with prefect_api(prefect_server.api_url), get_client(sync_client=True) as prefect:
            deployment = None
            while deployment is None:
                assert serving.poll() is None, f"calibflow schedule exited:\n{log.read_text()[-4000:]}"
                assert time.monotonic() - started < 120, f"deployment not registered:\n{log.read_text()[-4000:]}"
                try:
                    deployment = prefect.read_deployment_by_name(name)
                except Exception:  # ObjectNotFound until the served process has registered it
                    time.sleep(0.5)
            registered_s = time.monotonic() - started
            [schedule] = deployment.schedules
            assert (schedule.schedule.cron, schedule.schedule.timezone) == (SCHEDULE["cron"], SCHEDULE["timezone"])
            assert schedule.active
            assert deployment.entrypoint == "flows.train_calibrate.train_calibrate_register"
            assert deployment.parameters == {
                "repo_root": str(repo.resolve()),
                "params_path": "params.yaml",
                "overrides": [],
                "data_rev": None,
                "force": False,
            }

            flow_run = run_deployment(name, timeout=240, poll_interval=1)
            ran_s = time.monotonic() - started - registered_s
            assert flow_run.state.is_completed(), f"{flow_run.state}\n{log.read_text()[-6000:]}"
            print(f"\ndeployment registered after {registered_s:.1f} s; triggered run completed in {ran_s:.1f} s")
    finally:
        stop_group(serving, signal.SIGINT)  # Prefect pauses the schedule as it shuts down
    with prefect_api(prefect_server.api_url), get_client(sync_client=True) as prefect:
        # nothing serves it now: no runs pile up
        assert prefect.read_deployment_by_name(name).paused, f"not paused:\n{log.read_text()[-3000:]}"

    # The model is on the MLflow server, read over HTTP.
    client = MlflowClient(tracking_uri=mlflow_server.url, registry_uri=mlflow_server.url)
    assert registry_state(client) == (["1"], {"champion": "1"})
    version = client.get_model_version_by_alias(MODEL, "champion")
    assert set(REQUIRED_TAGS) <= set(version.tags)
    assert version.tags["data_hash"] == yaml.safe_load((repo / "data" / "tiny.dvc").read_text())["outs"][0]["md5"]
    assert version.tags["git_commit"] == run("git", "rev-parse", "HEAD", cwd=repo).stdout.strip()
    assert version.tags["params_hash"] == load_config(repo / "params.yaml").params_hash
    assert version.tags["seed"] == "0"
    assert (
        0 <= float(version.tags["test/calibrated/ece"]) <= 0.25 and float(version.tags["calibration/temperature"]) > 0
    )
    mlflow_run = client.get_run(version.run_id)
    assert mlflow_run.data.tags["prefect.flow_run_id"] == str(flow_run.id)  # Prefect run <-> MLflow run
    assert mlflow_run.info.artifact_uri.startswith("mlflow-artifacts:/")  # proxied by the server
    assert any((mlflow_server.root / "artifacts").rglob("MLmodel"))


@pytest.mark.timeout(300)
def test_deployed_to_a_work_pool_a_process_worker_runs_it_and_an_unchanged_retrain_is_skipped(
    prefect_server, mlflow_server, repo, tmp_path, capsys
):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.deployments import run_deployment
    from prefect.workers.process import ProcessWorker

    from cli.main import main as calibflow

    client = MlflowClient(tracking_uri=mlflow_server.url, registry_uri=mlflow_server.url)
    before = registry_state(client)  # a champion when the served run above registered one
    deploy = [
        "schedule",
        "--deploy",
        "--repo",
        str(repo),
        "--set",
        "schedule.deployment=pool-retrain",
        "--set",
        "schedule.work_pool=test-pool",
    ]
    with prefect_api(prefect_server.api_url), get_client(sync_client=True) as prefect:
        assert calibflow(deploy) == 2
        assert "prefect work-pool create test-pool --type process" in capsys.readouterr().err
        # What `prefect work-pool create test-pool --type process` does.
        prefect.create_work_pool(
            WorkPoolCreate(
                name="test-pool", type="process", base_job_template=ProcessWorker.get_default_base_job_template()
            )
        )
        assert calibflow(deploy) == 0
        deployment = prefect.read_deployment_by_name("calibflow-train/pool-retrain")
        assert deployment.work_pool_name == "test-pool" and deployment.pull_steps in (None, [])
        assert deployment.parameters["overrides"] == []  # schedule.* shaped the deployment, not the runs

        env = client_env(
            PREFECT_API_URL=prefect_server.api_url,
            MLFLOW_TRACKING_URI=mlflow_server.url,
            PREFECT_HOME=str(tmp_path / "prefect-worker"),
            PREFECT_WORKER_QUERY_SECONDS="1",
        )
        log = tmp_path / "worker.log"
        with open(log, "wb") as out:
            worker = subprocess.Popen(
                [
                    str(BIN / "prefect"),
                    "worker",
                    "start",
                    "--pool",
                    "test-pool",
                    "--type",
                    "process",
                    "--limit",
                    "1",
                    "--install-policy",
                    "never",
                ],
                cwd=tmp_path,
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        try:
            started = time.monotonic()
            flow_run = run_deployment("calibflow-train/pool-retrain", timeout=240, poll_interval=1)
            assert flow_run.state.is_completed(), f"{flow_run.state}\n{log.read_text()[-6000:]}"
            print(f"\nwork pool run completed in {time.monotonic() - started:.1f} s")
        finally:
            stop_group(worker, signal.SIGINT)

    [mlflow_run] = client.search_runs(
        [client.get_experiment_by_name("tiny").experiment_id],
        filter_string=f"tags.`prefect.flow_run_id` = '{flow_run.id}'",
    )
    if before[1].get("champion"):  # same data, params and code as @champion: nothing to retrain
        assert mlflow_run.data.tags["calibflow.status"] == "skipped"
        assert registry_state(client) == before
    else:
        assert mlflow_run.data.tags["calibflow.status"] == "succeeded"


DRIVER = textwrap.dedent("""\
    # `calibflow run` in this process, with the MLflow server stopped right before registration.
    import json, os, signal, sys, time, urllib.request
    from calibflow.tracking import registration
    from calibflow.tracking import served_model
    from calibflow.tracking import store

    calls = {"log_calibrated_model": 0, "register_version": 0}
    log_calibrated_model, register_version = served_model.log_calibrated_model, registration.register_version

    def save():
        with open(os.environ["CALLS_FILE"], "w") as handle:
            json.dump(calls, handle)

    def counted_log(*args, **kwargs):  # the register task's first call to the server
        calls["log_calibrated_model"] += 1
        save()
        return log_calibrated_model(*args, **kwargs)

    def stop_server_then_register(*args, **kwargs):
        calls["register_version"] += 1
        save()
        if calls["register_version"] == 1:
            os.killpg(int(os.environ["MLFLOW_SERVER_PGID"]), signal.SIGTERM)
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline:
                try:
                    urllib.request.urlopen(os.environ["MLFLOW_TRACKING_URI"] + "/health", timeout=1)
                    time.sleep(0.2)
                except OSError:
                    break
        return register_version(*args, **kwargs)

    served_model.log_calibrated_model, registration.register_version = counted_log, stop_server_then_register
    from cli.main import main
    sys.exit(main(sys.argv[1:]))
""")


@pytest.mark.timeout(480)  # the servers' startups (30-45 s each) count too, and the run trains (200 s on loaded CI)
def test_tracking_server_down_at_registration_fails_once_retried_with_nothing_registered(
    prefect_server, mlflow_server, repo, tmp_path
):
    client = MlflowClient(tracking_uri=mlflow_server.url, registry_uri=mlflow_server.url)
    before = registry_state(client)  # a champion when the served run above registered one
    driver, calls_file = tmp_path / "driver.py", tmp_path / "calls.json"
    driver.write_text(DRIVER)
    env = client_env(
        PREFECT_API_URL=prefect_server.api_url,
        MLFLOW_TRACKING_URI=mlflow_server.url,
        PREFECT_HOME=str(tmp_path / "prefect-client"),
        MLFLOW_SERVER_PGID=str(mlflow_server.process.pid),
        CALLS_FILE=str(calls_file),
        # Short waits for the test: calibflow's task retries (which must not repeat
        # MLflow's for a server that is gone), and MLflow's own HTTP retries.
        CALIBFLOW_STORE_RETRY_DELAYS="0.1,0.2,0.3",
        MLFLOW_HTTP_REQUEST_MAX_RETRIES="0",
        MLFLOW_HTTP_REQUEST_TIMEOUT="10",
    )
    started = time.monotonic()
    try:
        result = subprocess.run(
            [sys.executable, str(driver), "run", "--repo", str(repo), "--force"],
            env=env,
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=400,
        )
    finally:
        mlflow_server.stop()  # already stopped by the driver: reap it, check nothing is left
    failed_s = time.monotonic() - started
    output = result.stdout + result.stderr

    assert result.returncode != 0, output
    # MLflow's HTTP client has retried the server already: the task tries once, not 1 + 3 times.
    assert json.loads(calls_file.read_text()) == {"log_calibrated_model": 1, "register_version": 1}
    server = mlflow_server.url.removeprefix("http://")
    last_line = output.strip().splitlines()[-1]
    assert server in last_line and "did not answer" in last_line, output[-3000:]  # the last word names the server
    assert re.search(r"gave up after waiting [\d.]+ s", last_line), last_line  # and how long it waited

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
    from prefect.client.schemas.sorting import FlowRunSort

    with prefect_api(prefect_server.api_url), get_client(sync_client=True) as prefect:
        [flow_run] = prefect.read_flow_runs(sort=FlowRunSort.START_TIME_DESC, limit=1)
        assert flow_run.state.is_failed(), flow_run.state
        task_runs = prefect.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run.id])))
    [register] = [t for t in task_runs if t.name.startswith("register-model")]
    assert register.state.is_failed() and register.run_count == 1
    assert server in flow_run.state.message  # the Prefect UI says which server did not answer

    mlflow_server.start()  # same port, same store
    assert registry_state(client) == before
    print(f"\nfailed in {failed_s:.1f} s after start; state message: {flow_run.state.message}")


@pytest.mark.timeout(300)
def test_dead_tracking_server_ends_status_and_run_with_exit_2_within_two_minutes_saying_how_long(repo, tmp_path):
    dead = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    env = client_env(MLFLOW_TRACKING_URI=dead)
    for name in STORE_PATIENCE_DEFAULTS:  # calibflow's own defaults, as a user gets them
        env.pop(name, None)
    commands = {
        "status": [str(BIN / "calibflow"), "status", "--model", MODEL, "--repo", str(repo)],
        "run": [str(BIN / "calibflow"), "run", "--repo", str(repo), "--force"],
    }
    started = time.monotonic()
    processes = {
        name: subprocess.Popen(
            command,
            env=env,
            cwd=tmp_path,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        for name, command in commands.items()
    }
    ended: dict[str, tuple[int, float, str]] = {}
    try:
        while len(ended) < len(processes) and time.monotonic() - started < 150:
            for name, process in processes.items():
                if name not in ended and process.poll() is not None:
                    ended[name] = (process.returncode, time.monotonic() - started, process.communicate()[1])
            time.sleep(0.2)
    finally:
        for process in processes.values():
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)
    assert set(ended) == set(processes), f"still running after 150 s: {set(processes) - set(ended)}"
    for name, (code, seconds, err) in ended.items():
        assert code == 2, (name, err[-3000:])
        assert seconds < 120, (name, seconds)
        [said] = [
            line for line in err.splitlines() if line.startswith(("calibflow:", f"calibflow {name}:"))
        ]  # its line
        assert dead in said and "did not answer" in said, (name, err[-3000:])
        waited = float(re.search(r"gave up after waiting ([\d.]+) s", said).group(1))
        assert 0 < waited <= seconds, (name, said)
        print(f"\n{name}: exit 2 after {seconds:.1f} s; {said}")


def server_records(repo: Path) -> list[dict]:
    return [json.loads(path.read_text()) for path in (repo / ".calibflow" / "servers").glob("*.json")]


@pytest.mark.timeout(300)
def test_killed_run_leaves_a_server_and_a_running_run_that_the_next_run_ends(tiny_repo, tmp_path, monkeypatch):
    from calibflow.tracking import store
    from cli.main import main as calibflow

    log = tmp_path / "killed-run.log"
    with open(log, "wb") as out:  # no PREFECT_API_URL: the run starts Prefect's temporary API server
        killed = subprocess.Popen(
            [str(BIN / "calibflow"), "run", "--repo", str(tiny_repo)],
            env=client_env(),
            cwd=tmp_path,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        started = time.monotonic()
        while not server_records(tiny_repo):  # written once its MLflow run exists
            assert killed.poll() is None, log.read_text()[-4000:]
            assert time.monotonic() - started < 180, log.read_text()[-4000:]
            time.sleep(0.2)
        os.kill(killed.pid, signal.SIGKILL)  # the run's own process only, as the OOM killer does
        killed.wait(timeout=30)
        [record] = server_records(tiny_repo)
        server = leftovers.ProcessId(**record["server"])
        [killed_run_id] = [p.name for p in (tiny_repo / ".calibflow" / "runs").iterdir()]
        assert leftovers.alive(server)  # what the issue saw: the server outlives its run

        # The next run: one that ends early (data changed without `dvc add`), after its housekeeping.
        next((tiny_repo / "data" / "tiny" / "1").glob("*.png")).unlink()
        assert calibflow(["run", "--repo", str(tiny_repo)]) == 2
        deadline = time.monotonic() + 10
        while leftovers.alive(server) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not leftovers.alive(server)
        assert record not in server_records(tiny_repo)  # forgotten; this process's own server is recorded now

        store.configure_tracking(tiny_repo)
        marked = MlflowClient().get_run(killed_run_id)
        assert marked.info.status == "KILLED" and marked.data.tags["calibflow.status"] == "killed"
        assert f"pid {killed.pid}" in marked.data.tags["calibflow.reason"]
    finally:
        try:
            os.killpg(killed.pid, signal.SIGKILL)  # whatever is left of the killed run's group
        except ProcessLookupError:
            pass
