"""The production topology in infra/: the Compose file validates with docker-compose 1.29 and takes
every secret from the environment, the Kubernetes manifests have what they need, and nothing under
infra/ looks like a committed secret.

The `docker-compose config` tests run where the command is installed (Debian:
`apt-get install -y --no-install-recommends docker-compose`) and skip elsewhere; the rest are
plain file checks. No Docker engine, cluster or GPU is needed: nothing is started.
"""

from __future__ import annotations

import copy
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
INFRA = REPO / "infra"
COMPOSE_FILE = INFRA / "docker-compose.yml"
K8S = INFRA / "k8s"

EXPECTED_SERVICES = {"postgres", "minio", "minio-setup", "mlflow", "prefect-server", "prefect-worker"}
# Recognisable dummy values: the rendered config must carry exactly these, proving each secret
# came from the environment rather than from the file.
DUMMY_SECRETS = {
    "POSTGRES_PASSWORD": "dummyPg0a1b2c",
    "MINIO_ROOT_USER": "dummyRootUser",
    "MINIO_ROOT_PASSWORD": "dummyRootPw3d4e5f",
    "AWS_ACCESS_KEY_ID": "dummyAccessKey",
    "AWS_SECRET_ACCESS_KEY": "dummySecretKey6g7h8i",
}
# Checked one at a time against docker-compose (with all the others set): a secret read by one
# service only, and one read by three.
ONE_MISSING = ("MINIO_ROOT_PASSWORD", "AWS_SECRET_ACCESS_KEY")
SECRET_NAME = re.compile(r"PASSWORD|SECRET|ACCESS_KEY|TOKEN|MINIO_ROOT_USER", re.IGNORECASE)
PLACEHOLDER = "CHANGE-ME"

docker_compose = shutil.which("docker-compose")
needs_compose = pytest.mark.skipif(
    docker_compose is None,
    reason="docker-compose is not installed (Debian: apt-get install -y --no-install-recommends docker-compose)",
)


# ---------------------------------------------------------------------------------------------
# docker-compose config


def _compose_env(secrets: dict[str, str]) -> dict[str, str]:
    """A clean environment: the caller's secrets (and any COMPOSE_* settings) left out, so that
    only `secrets` can satisfy the file's required variables."""
    keep = ("PATH", "HOME", "LANG", "LC_ALL", "TMPDIR")
    env = {key: os.environ[key] for key in keep if key in os.environ}
    env.update(secrets)
    return env


def _start_config(secrets: dict[str, str], empty_env_file: Path) -> subprocess.Popen:
    # --env-file: an empty file, so a developer's git-ignored infra/.env cannot supply values.
    return subprocess.Popen(
        [docker_compose, "--env-file", str(empty_env_file), "-f", str(COMPOSE_FILE), "config"],
        env=_compose_env(secrets),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=REPO,
    )


def _finish(process: subprocess.Popen) -> tuple[int, str, str]:
    stdout, stderr = process.communicate(timeout=60)
    return process.returncode, stdout, stderr


@pytest.fixture(scope="module")
def compose_runs(tmp_path_factory) -> dict[str | None, tuple[int, str, str]]:
    """`docker-compose config` with all dummy secrets (key None), with none ("all") and with one
    missing (key: its name), started together. Not every secret in turn: each run costs about half
    a second of CPU, and test_compose_file_reads_every_secret_as_a_required_variable already checks
    that each one is written `${VAR:?...}`; these show that 1.29 enforces it."""
    if docker_compose is None:
        pytest.skip(
            "docker-compose is not installed (Debian: apt-get install -y --no-install-recommends docker-compose)"
        )
    empty = tmp_path_factory.mktemp("compose") / "empty.env"
    empty.write_text("")
    cases: dict[str | None, dict[str, str]] = {None: dict(DUMMY_SECRETS), "all": {}}
    for name in ONE_MISSING:
        cases[name] = {key: value for key, value in DUMMY_SECRETS.items() if key != name}
    processes = {case: _start_config(secrets, empty) for case, secrets in cases.items()}
    return {case: _finish(process) for case, process in processes.items()}


@pytest.fixture(scope="module")
def rendered(compose_runs) -> dict:
    returncode, stdout, stderr = compose_runs[None]
    assert returncode == 0, f"docker-compose config failed ({returncode}):\n{stderr}"
    return yaml.safe_load(stdout)


def _environment(service: dict) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):  # KEY=VALUE form
        env = dict(item.split("=", 1) for item in env)
    return {key: "" if value is None else str(value) for key, value in env.items()}


@needs_compose
def test_compose_config_renders_the_topology(rendered):
    services = rendered["services"]
    assert set(services) == EXPECTED_SERVICES
    assert {"postgres-data", "minio-data"} <= set(rendered.get("volumes") or {})
    assert services["mlflow"]["build"]["dockerfile"] == "infra/mlflow.Dockerfile"
    assert services["prefect-worker"]["build"]["dockerfile"] == "infra/worker.Dockerfile"
    lock = _pins(REPO / "requirements.lock")
    assert services["prefect-server"]["image"] == f"prefecthq/prefect:{lock['prefect']}-python3.11"

    mlflow_command = services["mlflow"]["command"]
    assert "--serve-artifacts" in mlflow_command and "--artifacts-destination=s3://mlflow/" in mlflow_command
    assert _environment(services["mlflow"])["MLFLOW_BACKEND_STORE_URI"].startswith("postgresql://")
    assert _environment(services["prefect-server"])["PREFECT_SERVER_DATABASE_CONNECTION_URL"].startswith(
        "postgresql+asyncpg://"
    )
    assert services["prefect-server"]["command"][:3] == ["prefect", "server", "start"]

    worker = services["prefect-worker"]
    assert worker["command"][:3] == ["prefect", "worker", "start"]
    assert "--pool=calibflow-gpu" in worker["command"] and "--type=process" in worker["command"]
    worker_env = _environment(worker)
    assert worker_env["PREFECT_API_URL"] == "http://prefect-server:4200/api"
    assert worker_env["MLFLOW_TRACKING_URI"] == "http://mlflow:5000"
    assert worker_env["MLFLOW_S3_ENDPOINT_URL"] == "http://minio:9000"

    telemetry = {
        "DO_NOT_TRACK": "1",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "MLFLOW_DISABLE_TELEMETRY": "true",
        "DVC_NO_ANALYTICS": "1",
    }
    for name in ("mlflow", "prefect-server", "prefect-worker"):
        env = _environment(services[name])
        assert {key: env.get(key) for key in telemetry} == telemetry, name


@needs_compose
def test_worker_reserves_a_gpu(rendered):
    devices = rendered["services"]["prefect-worker"]["deploy"]["resources"]["reservations"]["devices"]
    assert len(devices) == 1
    gpu = devices[0]
    assert gpu["driver"] == "nvidia"
    assert "gpu" in gpu["capabilities"]
    # 1.29 turns only a literal integer (or "all") into a device request; an interpolated "1"
    # would pass `config` and fail at `up`.
    assert gpu["count"] == 1 and isinstance(gpu["count"], int)


@needs_compose
def test_startup_order_waits_for_health(rendered):
    services = rendered["services"]
    assert services["mlflow"]["depends_on"] == {
        "postgres": {"condition": "service_healthy"},
        "minio-setup": {"condition": "service_completed_successfully"},
    }
    assert services["prefect-server"]["depends_on"] == {"postgres": {"condition": "service_healthy"}}
    assert services["minio-setup"]["depends_on"] == {"minio": {"condition": "service_healthy"}}
    worker_deps = services["prefect-worker"]["depends_on"]
    assert worker_deps["prefect-server"]["condition"] == "service_healthy"
    assert worker_deps["mlflow"]["condition"] == "service_healthy"
    for name in ("postgres", "minio", "mlflow", "prefect-server", "prefect-worker"):
        assert services[name].get("healthcheck", {}).get("test"), f"{name} has no healthcheck"


@needs_compose
def test_published_ports_bind_to_localhost(rendered):
    published = [(name, port) for name, service in rendered["services"].items() for port in service.get("ports", [])]
    assert published, "expected the UIs and the S3 API to be published"
    for name, port in published:
        host_ip = port.split(":")[0] if isinstance(port, str) else port.get("host_ip")
        assert host_ip == "127.0.0.1", f"{name} publishes {port} beyond localhost"


@needs_compose
def test_secrets_in_the_rendered_config_come_from_the_environment(rendered):
    """Every secret-named variable of every service holds one of the dummy values given in the
    environment, and every connection URL carries the dummy Postgres password."""
    dummies = set(DUMMY_SECRETS.values())
    seen = set()
    for name, service in rendered["services"].items():
        for key, value in _environment(service).items():
            if SECRET_NAME.search(key):
                assert value in dummies, f"{name}: {key}={value!r} is not from the environment"
                seen.add(value)
            if "://" in value and "@" in value:  # credentials inside a URL
                assert f":{DUMMY_SECRETS['POSTGRES_PASSWORD']}@" in value, f"{name}: {key} has a literal password"
    assert seen == dummies, f"secrets not used by any service: {dummies - seen}"
    env = {name: _environment(service) for name, service in rendered["services"].items()}
    assert env["postgres"]["POSTGRES_PASSWORD"] == DUMMY_SECRETS["POSTGRES_PASSWORD"]
    assert env["minio"]["MINIO_ROOT_PASSWORD"] == DUMMY_SECRETS["MINIO_ROOT_PASSWORD"]
    for name in ("mlflow", "prefect-worker", "minio-setup"):
        assert env[name]["AWS_SECRET_ACCESS_KEY"] == DUMMY_SECRETS["AWS_SECRET_ACCESS_KEY"], name


@needs_compose
@pytest.mark.parametrize("missing", ONE_MISSING)
def test_each_secret_is_required(compose_runs, missing):
    returncode, stdout, stderr = compose_runs[missing]
    assert returncode != 0, f"docker-compose config succeeded without {missing}"
    assert "Missing mandatory value" in stderr, stderr
    assert f"set {missing} in infra/.env or the environment" in stderr, stderr


@needs_compose
def test_config_without_any_secret_fails(compose_runs):
    returncode, stdout, stderr = compose_runs["all"]
    assert returncode != 0
    assert "Missing mandatory value" in stderr and "see infra/.env.example" in stderr, stderr


def test_compose_file_reads_every_secret_as_a_required_variable():
    """Without docker-compose too: in the raw file, every secret-named variable is `${VAR:?...}`."""
    raw = yaml.safe_load(COMPOSE_FILE.read_text())
    for name, service in raw["services"].items():
        for key, value in _environment(service).items():
            if SECRET_NAME.search(key):
                assert re.fullmatch(r"\$\{" + key + r":\?[^}]+\}", value), f"{name}: {key}={value!r}"
            if "://" in value and "@" in value:  # credentials inside a URL
                assert "${POSTGRES_PASSWORD:?" in value, f"{name}: {key} embeds a literal credential"
    text = COMPOSE_FILE.read_text()
    for secret in DUMMY_SECRETS:
        assert "${" + secret + ":?" in text
        assert "${" + secret + ":-" not in text, f"{secret} must not have a default"


def test_compose_mounts_and_builds_files_that_exist():
    raw = yaml.safe_load(COMPOSE_FILE.read_text())
    init = INFRA / "postgres" / "10-create-prefect-db.sh"
    assert any(
        volume.startswith("./postgres/10-create-prefect-db.sh:/docker-entrypoint-initdb.d/")
        for volume in raw["services"]["postgres"]["volumes"]
    )
    assert init.is_file() and os.access(init, os.X_OK)
    assert "CREATE DATABASE" in init.read_text()
    for name in ("mlflow", "prefect-worker"):
        build = raw["services"][name]["build"]
        assert (INFRA / build["context"]).resolve() == REPO
        assert (REPO / build["dockerfile"]).is_file()


# ---------------------------------------------------------------------------------------------
# Images


def _pins(path: Path) -> dict[str, str]:
    pins = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if "==" in line:
            name, version = line.split("==", 1)
            pins[re.sub(r"[-_.]+", "-", name).lower()] = version.strip()
    return pins


def test_image_requirements_agree_with_the_lock():
    lock = _pins(REPO / "requirements.lock")
    for extra in ("requirements-worker.txt", "requirements-mlflow.txt"):
        for name, version in _pins(INFRA / extra).items():
            if name in lock:
                assert lock[name] == version, f"{extra} pins {name}=={version}, requirements.lock {lock[name]}"
    assert _pins(INFRA / "requirements-mlflow.txt")["mlflow"] == lock["mlflow"]
    assert "dvc-s3" in _pins(INFRA / "requirements-worker.txt")


def test_dockerfiles_install_the_project_and_copy_what_exists():
    worker = (INFRA / "worker.Dockerfile").read_text()
    assert re.search(r"^FROM python:3\.11", worker, re.MULTILINE)
    assert "pip install -r requirements.lock" in worker
    assert re.search(r"pip install .*-e \.", worker)
    assert "--pool=calibflow-gpu" in worker and "--type=process" in worker
    mlflow = (INFRA / "mlflow.Dockerfile").read_text()
    assert "requirements-mlflow.txt" in mlflow
    for dockerfile in ("worker.Dockerfile", "mlflow.Dockerfile"):
        text = (INFRA / dockerfile).read_text()
        ignore = (INFRA / f"{dockerfile}.dockerignore").read_text()
        for line in text.splitlines():
            if line.startswith("COPY "):
                for source in line.split()[1:-1]:
                    if "*" in source:
                        continue
                    assert (REPO / source).exists(), f"{dockerfile}: COPY {source} does not exist"
                    assert f"!{source.rstrip('/')}" in ignore.replace("/\n", "\n"), (
                        f"{dockerfile}.dockerignore leaves {source} out of the context"
                    )
        assert not re.search(r"^(ENV|ARG)\s+\S*(PASSWORD|SECRET|ACCESS_KEY)", text, re.MULTILINE | re.IGNORECASE)


def test_env_file_is_git_ignored():
    assert ".env" in (INFRA / ".gitignore").read_text().split()
    if shutil.which("git") and (REPO / ".git").exists():
        result = subprocess.run(["git", "check-ignore", "-q", "infra/.env"], cwd=REPO)
        assert result.returncode == 0, "infra/.env is not ignored by git"
    example = (INFRA / ".env.example").read_text()
    for secret in DUMMY_SECRETS:
        assert re.search(rf"^{secret}={PLACEHOLDER}$", example, re.MULTILINE), f".env.example: {secret}"


# ---------------------------------------------------------------------------------------------
# Kubernetes


def _k8s_documents() -> list[tuple[Path, dict]]:
    documents = []
    for path in sorted(K8S.glob("*.y*ml")):
        for document in yaml.safe_load_all(path.read_text()):
            if document is not None:
                documents.append((path, document))
    return documents


def _containers(document: dict) -> list[dict]:
    return document["spec"]["template"]["spec"]["containers"]


def test_k8s_documents_have_the_required_fields():
    documents = _k8s_documents()
    kinds = {(document["kind"], document["metadata"]["name"]) for _, document in documents}
    assert {("Deployment", "mlflow"), ("Service", "mlflow"), ("Deployment", "prefect-worker")} <= kinds
    for path, document in documents:
        assert isinstance(document.get("apiVersion"), str) and document["apiVersion"], path.name
        assert isinstance(document.get("kind"), str) and document["kind"], path.name
        assert document.get("metadata", {}).get("name"), f"{path.name}: {document['kind']} without metadata.name"
        if document["kind"] == "Deployment":
            spec = document["spec"]
            assert document["apiVersion"] == "apps/v1"
            labels = spec["template"]["metadata"]["labels"]
            assert spec["selector"]["matchLabels"].items() <= labels.items(), f"{path.name}: selector does not match"
            assert _containers(document), path.name
            for container in _containers(document):
                assert container.get("name") and container.get("image"), f"{path.name}: container without name/image"
        if document["kind"] == "Service":
            deployments = [d for _, d in documents if d["kind"] == "Deployment"]
            selector = document["spec"]["selector"].items()
            assert any(selector <= d["spec"]["template"]["metadata"]["labels"].items() for d in deployments), (
                f"{path.name}: Service {document['metadata']['name']} selects no Deployment"
            )


def test_k8s_worker_requests_a_gpu_and_targets_gpu_nodes():
    worker = next(
        d for _, d in _k8s_documents() if d["kind"] == "Deployment" and d["metadata"]["name"] == "prefect-worker"
    )
    container = _containers(worker)[0]
    assert str(container["resources"]["limits"]["nvidia.com/gpu"]) == "1"
    pod = worker["spec"]["template"]["spec"]
    assert pod.get("nodeSelector"), "expected a nodeSelector example for GPU nodes"
    assert any(toleration.get("key") == "nvidia.com/gpu" for toleration in pod.get("tolerations", []))
    assert container["command"][:3] == ["prefect", "worker", "start"]
    assert "--pool=calibflow-gpu" in container["command"]


def test_k8s_secrets_come_from_secret_key_refs():
    example = yaml.safe_load((K8S / "secret.example.yaml").read_text())
    assert example["kind"] == "Secret"
    assert all(value == PLACEHOLDER or key == "postgres-user" for key, value in example["stringData"].items())
    secret_keys = set(example["stringData"])
    references = 0
    for path, document in _k8s_documents():
        if path.name.endswith(".example.yaml"):
            continue
        assert document["kind"] != "Secret", f"{path.name}: a Secret with values belongs out of git"
        if document["kind"] == "ConfigMap":
            for key in document.get("data", {}):
                assert not SECRET_NAME.search(key), f"{path.name}: secret-looking key {key} in a ConfigMap"
        if document["kind"] != "Deployment":
            continue
        for container in _containers(document):
            defined = set()
            config_maps = {ref["configMapRef"]["name"] for ref in container.get("envFrom", []) if "configMapRef" in ref}
            for _, cm in _k8s_documents():
                if cm["kind"] == "ConfigMap" and cm["metadata"]["name"] in config_maps:
                    defined |= set(cm.get("data", {}))
            for variable in container.get("env", []):
                name = variable["name"]
                if SECRET_NAME.search(name):
                    ref = variable.get("valueFrom", {}).get("secretKeyRef")
                    assert ref and "value" not in variable, f"{path.name}: {name} must come from a secretKeyRef"
                    assert ref["name"] == example["metadata"]["name"] and ref["key"] in secret_keys, (
                        f"{path.name}: {ref}"
                    )
                    references += 1
                for used in re.findall(r"\$\((\w+)\)", variable.get("value", "")):
                    assert used in defined, f"{path.name}: {name} uses $({used}) before it is defined"
                defined.add(name)
    assert references >= 4


def test_kustomization_lists_the_manifests_but_not_the_example_secret():
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    resources = kustomization["resources"]
    assert "secret.example.yaml" not in resources
    for resource in resources:
        assert (K8S / resource).is_file(), resource
    listed = set(resources) | {"kustomization.yaml", "secret.example.yaml"}
    assert {path.name for path in K8S.glob("*.y*ml")} == listed


# Kubernetes 1.28 made the StatefulSet pod-index label the DDP followers read; 1.33 is a release
# every maintained cluster has reached. strict: a field the API does not have (a typo) fails too.
KUBERNETES_VERSION = "1.33.0"
K8S_DDP = K8S / "ddp"


def _all_k8s_objects() -> list[tuple[Path, dict]]:
    """Every Kubernetes API object under infra/k8s (kustomize's own files are not API objects)."""
    found = []
    for path in sorted([*K8S.glob("*.y*ml"), *K8S_DDP.glob("*.y*ml")]):
        for document in yaml.safe_load_all(path.read_text()):
            if document is not None and document.get("kind") != "Kustomization":
                found.append((path, document))
    return found


def test_every_k8s_manifest_validates_against_the_kubernetes_schema():
    import kubernetes_validate

    objects = _all_k8s_objects()
    assert {"Deployment", "StatefulSet", "Service", "ConfigMap", "Namespace", "Secret"} <= {
        d["kind"] for _, d in objects
    }
    for path, document in objects:
        try:
            kubernetes_validate.validate(document, KUBERNETES_VERSION, strict=True)
        except kubernetes_validate.ValidationError as error:
            pytest.fail(f"{path.relative_to(REPO)}: {document['kind']} {document['metadata']['name']}: {error.message}")


def test_the_schema_check_catches_a_misspelled_field_and_a_wrong_type():
    import kubernetes_validate

    followers = next(d for _, d in _all_k8s_objects() if d["kind"] == "StatefulSet")
    typo = copy.deepcopy(followers)
    typo["spec"]["template"]["spec"]["containers"][0]["imagePullPolcy"] = "IfNotPresent"
    wrong_type = copy.deepcopy(followers)
    wrong_type["spec"]["replicas"] = "two"
    for broken in (typo, wrong_type):
        with pytest.raises(kubernetes_validate.ValidationError):
            kubernetes_validate.validate(broken, KUBERNETES_VERSION, strict=True)


def test_ddp_followers_join_the_rendezvous_of_the_pod_that_runs_the_flow():
    from calibflow.config import DEFAULT_RENDEZVOUS_PORT, TrainConfig
    from calibflow.training.distributed import launcher_args

    objects = {(d["kind"], d["metadata"]["name"]): d for _, d in _all_k8s_objects()}
    settings = objects[("ConfigMap", "calibflow-ddp")]["data"]
    service = objects[("Service", "calibflow-ddp")]
    worker = objects[("Deployment", "prefect-worker")]
    followers = objects[("StatefulSet", "calibflow-ddp-follower")]
    # the rendezvous name resolves to the flow's pod, on the port it serves
    assert (
        settings["MASTER_ADDR"] == f"{service['metadata']['name']}.{service['metadata']['namespace']}.svc.cluster.local"
    )
    assert service["spec"]["clusterIP"] == "None"
    assert service["spec"]["selector"].items() <= worker["spec"]["template"]["metadata"]["labels"].items()
    port = int(settings["MASTER_PORT"])
    assert port == DEFAULT_RENDEZVOUS_PORT == service["spec"]["ports"][0]["port"]
    assert port in {p["containerPort"] for p in _containers(worker)[0]["ports"]}
    # one follower per node after node 0, each running what calibflow.training.distributed.launcher_args gives
    assert followers["spec"]["replicas"] == int(settings["NNODES"]) - 1
    script = _containers(followers)[0]["args"][0]
    config = TrainConfig(distributed="ddp", nnodes=2, rendezvous=f"host:{port}")
    for flag in launcher_args(config, 1, node_rank=0):
        assert flag.split("=")[0] + "=" in script, flag
    assert "-m calibflow.training.distributed" in script and "NODE_RANK=$((POD_INDEX + 1))" in script
    env = {e["name"]: e for e in _containers(followers)[0]["env"]}
    assert "apps.kubernetes.io/pod-index" in env["POD_INDEX"]["valueFrom"]["fieldRef"]["fieldPath"]
    # the ddp kustomization lists exactly its files
    resources = yaml.safe_load((K8S_DDP / "kustomization.yaml").read_text())["resources"]
    assert set(resources) | {"kustomization.yaml"} == {path.name for path in K8S_DDP.glob("*.y*ml")}


def _follower_script() -> str:
    followers = next(d for _, d in _all_k8s_objects() if d["kind"] == "StatefulSet")
    return _containers(followers)[0]["args"][0]


def test_the_follower_loop_joins_as_its_pod_index_plus_one_and_stops_on_sigterm(tmp_path):
    """The follower's shell loop, run with a stand-in torchrun: the rank is the pod index + 1, and
    SIGTERM (a rollout, a scale-down) reaches torchrun and ends the pod at once, not after the
    grace period."""
    import signal
    import time

    calls = tmp_path / "calls"
    fake = tmp_path / "torchrun"
    # the trap before the line the test waits for: a SIGTERM right after it must find the trap set
    fake.write_text(f'#!/bin/sh\ntrap "echo TERM >> {calls}; exit 0" TERM\necho "$@" >> {calls}\nsleep 60 & wait\n')
    fake.chmod(0o755)
    env = {"PATH": f"{tmp_path}:/usr/bin:/bin", "POD_INDEX": "2", "NNODES": "4", "NPROC_PER_NODE": "8"}
    env |= {"MASTER_ADDR": "calibflow-ddp.calibflow.svc.cluster.local", "MASTER_PORT": "29500"}
    loop = subprocess.Popen(["sh", "-c", _follower_script()], env=env)
    deadline = time.monotonic() + 20
    while not calls.exists():
        assert time.monotonic() < deadline and loop.poll() is None
        time.sleep(0.05)
    loop.send_signal(signal.SIGTERM)
    assert loop.wait(timeout=10) == 0
    joined, stopped = calls.read_text().splitlines()
    assert "--node-rank=3" in joined and "--nnodes=4" in joined and "--nproc-per-node=8" in joined
    assert "--master-addr=calibflow-ddp.calibflow.svc.cluster.local" in joined and stopped == "TERM"
    # without the pod-index label the pod stops instead of claiming another node's rank
    missing = subprocess.run(
        ["sh", "-c", _follower_script()], env={"PATH": env["PATH"]}, capture_output=True, text=True
    )
    assert missing.returncode != 0 and "pod-index label is missing" in missing.stderr


# ---------------------------------------------------------------------------------------------
# Committed secrets


# `password: hunter2`, `AWS_SECRET_ACCESS_KEY=abc`, `"secret_key": "abc"`: a secret-named key with a
# literal value. A value is fine when it is a reference (${VAR...}, $(VAR), $VAR, "$(cmd)"), empty,
# the placeholder, or the name of something else (a Secret key, a key: line).
SECRET_ASSIGNMENT = re.compile(
    r"""(?ix) ["']?[\w.-]*(password|passwd|secret[\w-]*key|secret|access[_-]?key[\w-]*|api[_-]?key|token)["']?
        \s*[:=]\s* ["']?(?P<value>[^\s"'#,}]*)"""
)
ALLOWED_VALUE = re.compile(r"^(|\$.*|CHANGE-ME|valueFrom|true|false|\||>|\.\.\.|<[^>]*>)$")
KEY_SHAPES = [
    re.compile(r"AKIA[0-9A-Z]{16}"),
    re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----"),
    re.compile(r"://[^\s:/@$]+:(?!\$)[^\s@/$]+@"),
]  # user:password@ in a URL


REFERENCE = re.compile(r"\$\{[^}]*\}|\$\([^)]*\)")  # ${VAR:?msg}, $(VAR), $(command)


def _secret_findings(text: str) -> list[str]:
    findings = []
    for number, line in enumerate(text.splitlines(), 1):
        flat = REFERENCE.sub("$REF", line)
        # Comments name things ("the Secret: see ..."); only key shapes count there.
        if not flat.lstrip().startswith("#"):
            for match in SECRET_ASSIGNMENT.finditer(flat):
                if not ALLOWED_VALUE.match(match.group("value")):
                    findings.append(f"line {number}: {line.strip()}")
        findings += [f"line {number}: {line.strip()}" for shape in KEY_SHAPES if shape.search(flat)]
    return findings


def test_secret_scanner_catches_literals():
    assert _secret_findings("POSTGRES_PASSWORD: hunter2")
    assert _secret_findings('  "aws_secret_access_key": "wJalrXUtnFEMI"')
    assert _secret_findings("AWS_ACCESS_KEY_ID=AKIAIOSFODNN7EXAMPLE")
    assert _secret_findings("uri: postgresql://calibflow:hunter2@postgres:5432/mlflow")
    assert not _secret_findings("POSTGRES_PASSWORD: ${POSTGRES_PASSWORD:?set it}")
    assert not _secret_findings("uri: postgresql://$(POSTGRES_USER):$(POSTGRES_PASSWORD)@host/mlflow")
    assert not _secret_findings("MINIO_ROOT_PASSWORD=CHANGE-ME")


def test_no_committed_secrets_under_infra():
    ignored = {".env"}  # git-ignored (infra/.gitignore): the one place real values may live locally
    findings = []
    for path in sorted(INFRA.rglob("*")):
        if not path.is_file() or path.name in ignored or ".example" in path.name:
            continue
        for finding in _secret_findings(path.read_text(errors="replace")):
            findings.append(f"{path.relative_to(REPO)} {finding}")
    assert not findings, "literal secrets under infra/:\n" + "\n".join(findings)


def test_cd_workflow_gates_then_promotes_only_on_exit_0():
    workflow = yaml.safe_load((INFRA / "cd" / "promote.yml").read_text())
    steps = workflow["jobs"]["gate-and-promote"]["steps"]
    gate = next(s for s in steps if s.get("id") == "gate")
    promote = next(s for s in steps if "calibflow promote" in s.get("run", ""))
    assert "calibflow gate" in gate["run"] and "--json" in gate["run"]
    assert promote["if"] == "${{ steps.gate.outputs.code == '0' }}"
    # calibflow itself, never make (which exits 2 for any failure): a rejection (1) keeps the job
    # green, anything else leaves the step with calibflow's own code. Run as written, four nights:
    # tests/test_promote_workflow.py.
    for step in steps:
        if re.search(r"^\s*calibflow ", step.get("run", ""), re.MULTILINE):
            assert "make " not in step["run"], step
            assert 'exit "$code"' in step["run"] and "1)" in step["run"], step


def test_cd_workflow_passes_inputs_to_the_shell_only_through_the_environment():
    # `${{ inputs.x }}` inside `run:` is substituted into the script text before bash parses it:
    # a crafted input would run as code. Through `env:` it is only ever a value.
    workflow = yaml.safe_load((INFRA / "cd" / "promote.yml").read_text())
    steps = workflow["jobs"]["gate-and-promote"]["steps"]
    for step in steps:
        assert "${{" not in step.get("run", ""), step
    for step in steps:
        if "--candidate" in step.get("run", ""):
            assert '--candidate "$CANDIDATE"' in step["run"]
            assert "inputs.candidate" in step["env"]["CANDIDATE"]
