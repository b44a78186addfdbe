# The MLflow tracking server for Kubernetes (`distrain k8s render` names it distrain-mlflow):
# `docker build -f docker/mlflow.Dockerfile -t registry.example.com/distrain-mlflow:0.1.0 docker`
# MLflow at the version the workers log with, PostgreSQL's driver (psycopg 3) and boto3 for s3:// artifacts;
# no torch, so the image is small and the server is not restarted with the training image.
FROM python:3.11.11-slim-bookworm

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

RUN apt-get update \
    && apt-get install -y --no-install-recommends tini=0.19.0-1+b3 \
    && rm -rf /var/lib/apt/lists/* \
    && pip install --no-cache-dir mlflow==3.17.2 "psycopg[binary]==3.3.9" boto3==1.44.5 \
    && useradd --create-home --uid 1000 --user-group mlflow
USER 1000:1000
EXPOSE 5000

ENTRYPOINT ["tini", "--"]
CMD ["mlflow", "server", "--host", "0.0.0.0", "--port", "5000"]
