# distrain worker image: `docker build -t distrain:latest .`
# PyPI's torch wheels for Linux bundle CUDA, so this one image runs on GPU nodes (with the NVIDIA
# container runtime) and on CPU-only nodes alike.
FROM python:3.11-slim

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app
COPY setup.cfg pyproject.toml README.md ./
COPY distrain ./distrain
COPY configs ./configs
COPY launch ./launch
RUN pip install --no-cache-dir "./[deepspeed]" \
    && useradd --create-home --uid 1000 distrain \
    && mkdir -p /runs && chown distrain /runs
USER 1000

# `distrain schedule` forwards SIGTERM to its workers, which save at the next step and exit 75.
ENTRYPOINT ["distrain"]
CMD ["schedule", "--workers", "1", "--procs-per-worker", "1", "--config", "configs/digits.yaml"]
