# distrain worker image: `docker build -t registry.example.com/distrain:0.1.0 .`
# torch 2.15.0 from PyPI bundles CUDA 13.2, so GPU nodes need an NVIDIA driver >= 580 (Turing or newer; no
# V100). On an older node `distrain schedule --gpus-per-worker G` exits 4 with one line instead of training on
# CPU. Dependencies come from docker/requirements.lock and are installed before the sources are copied, so a
# code change rebuilds only the last layers.
FROM python:3.11.11-slim-bookworm

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# tini as PID 1: forwards SIGTERM to `distrain schedule` (which saves and exits 75) and reaps zombies.
# gcc and libc6-dev: torch.compile's inductor has Triton build its GPU launcher with a C compiler on first use
# ("Failed to find C compiler" without one); the image's Python headers come with the base image.
RUN apt-get update \
    && apt-get install -y --no-install-recommends tini=0.19.0-1+b3 gcc=4:12.2.0-3 libc6-dev=2.36-9+deb12u14 \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --create-home --uid 1000 --user-group distrain

WORKDIR /app
COPY docker/requirements.lock ./
RUN pip install --no-cache-dir --requirement requirements.lock

COPY setup.cfg pyproject.toml README.md ./
COPY distrain ./distrain
COPY configs ./configs
COPY launch ./launch
RUN pip install --no-cache-dir --no-deps --editable . && mkdir -p /runs && chown 1000:1000 /runs
USER 1000:1000

ENTRYPOINT ["tini", "--", "distrain"]
CMD ["schedule", "--workers", "1", "--procs-per-worker", "1", "--config", "configs/digits.yaml"]
