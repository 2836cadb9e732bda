# syntax=docker/dockerfile:1
# MLflow tracking server 3.17.2 on Postgres (psycopg2) with S3/MinIO artifacts (boto3).
# Build context: the repository root (for requirements.lock), e.g.
#   docker build -f infra/mlflow.Dockerfile -t calibflow/mlflow-server:3.17.2 .
# infra/mlflow.Dockerfile.dockerignore (BuildKit) keeps the context to the two files it copies.
# Configuration comes from the environment at run time (MLFLOW_BACKEND_STORE_URI, AWS_*,
# MLFLOW_S3_ENDPOINT_URL): nothing secret is baked into the image.
FROM python:3.11-slim-bookworm

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    DO_NOT_TRACK=1 \
    MLFLOW_DISABLE_TELEMETRY=true

COPY requirements.lock /tmp/requirements.lock
COPY infra/requirements-mlflow.txt /tmp/requirements-mlflow.txt
# -c requirements.lock: the server's packages at the same versions as calibflow's own client.
RUN pip install -c /tmp/requirements.lock -r /tmp/requirements-mlflow.txt \
    && rm /tmp/requirements.lock /tmp/requirements-mlflow.txt

RUN useradd --create-home --uid 1000 mlflow
USER 1000
WORKDIR /home/mlflow

EXPOSE 5000
# docker-compose.yml and infra/k8s/mlflow.yaml pass the full command line; this is the shape.
CMD ["mlflow", "server", "--host=0.0.0.0", "--port=5000", "--serve-artifacts", "--artifacts-destination=s3://mlflow/"]
