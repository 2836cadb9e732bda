# syntax=docker/dockerfile:1
# The calibflow Prefect worker: the project and its pinned environment, polling the calibflow-gpu
# work pool and running each flow run (train, calibrate, register) as a local process on the GPU.
# Build context: the repository root, e.g.
#   docker build -f infra/worker.Dockerfile -t calibflow/worker:0.1.0 .
# infra/worker.Dockerfile.dockerignore (BuildKit) keeps .venv, data, mlruns etc. out of the context.
#
# Base image: python:3.11-slim, not nvidia/cuda. torch 2.14.1 from requirements.lock is PyPI's
# CUDA build: the CUDA runtime, cuDNN, cuBLAS, NCCL... come as nvidia-* / cuda-toolkit wheels
# (pinned in the lock) inside site-packages, so a CUDA base image would only add a second, unused
# copy of CUDA and a Python that is not the lock's 3.11. What the image cannot carry is the driver:
# on the host, the NVIDIA driver and the NVIDIA Container Toolkit inject libcuda into the container
# when the GPU is reserved (compose `deploy.resources.reservations.devices`, Kubernetes
# `nvidia.com/gpu`). The lock's CUDA 13 wheels need a driver that supports CUDA 13 (R580 or newer).
# Without a GPU the same image trains on the CPU.
FROM python:3.11-slim-bookworm

# NVIDIA_DRIVER_CAPABILITIES: read by the NVIDIA Container Toolkit (mount the compute libraries).
# NVIDIA_VISIBLE_DEVICES is deliberately not set here: the GPU reservation (compose) or the device
# plugin (Kubernetes) sets it to the devices granted; `all` in the image would hand every GPU to a
# container on a host whose default runtime is nvidia. The rest: telemetry off in every library,
# as in calibflow.environment.
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility \
    DO_NOT_TRACK=1 \
    PREFECT_SERVER_ANALYTICS_ENABLED=false \
    PREFECT_CLOUD_ENABLE_ORCHESTRATION_TELEMETRY=false \
    PREFECT_TELEMETRY_ENABLE_RESOURCE_METRICS=false \
    MLFLOW_DISABLE_TELEMETRY=true \
    MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR=false \
    DVC_NO_ANALYTICS=1 \
    GX_ANALYTICS_ENABLED=false \
    GIT_PYTHON_REFRESH=quiet

# git: DVC and calibflow's lineage read the flow run's repository checkout (a deployment's
# git_clone pull step); ca-certificates for HTTPS remotes.
RUN apt-get update \
    && apt-get install -y --no-install-recommends git ca-certificates \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /opt/calibflow

# Dependencies first (a layer that only changes with the lock): exactly requirements.lock, then DVC's
# S3 support for the MinIO remote, constrained to the lock's versions.
COPY requirements.lock ./
COPY infra/requirements-worker.txt ./infra/
RUN pip install -r requirements.lock \
    && pip install -c requirements.lock -r infra/requirements-worker.txt

# The project itself, editable as in the Makefile (no dependency changes: all pinned above).
COPY pyproject.toml README.md* ./
COPY calibflow/ calibflow/
COPY tasks/ tasks/
COPY flows/ flows/
COPY cli/ cli/
RUN pip install --no-deps --no-build-isolation -e . \
    && python -c "import calibflow, cli.main, flows.train_calibrate, dvc_s3"

RUN useradd --create-home --uid 1000 calibflow
USER 1000
WORKDIR /home/calibflow

# Worker healthcheck server (--with-healthcheck).
EXPOSE 8080
CMD ["prefect", "worker", "start", "--pool=calibflow-gpu", "--type=process", "--with-healthcheck", "--install-policy=never"]
