#!/bin/bash
# deltamask edge agent on an NVIDIA Jetson Nano with JetPack 4.6 (L4T 32.x, Ubuntu 18.04, aarch64).
#
# JetPack 4.6's Python is 3.6. The agent needs Python 3.9+ (the generated gRPC code needs grpcio >= 1.70,
# whose oldest Python is 3.8; the project needs 3.9), so the board's own Python cannot run it. Two routes:
#
#   default, --container: a container built from docker/client.Dockerfile (docker ships with JetPack 4.6)
#     python:       the image's Python (3.9+), not the board's
#     torch:        the image's CPU torch (aarch64 wheel; the Nano's GPU is not used)
#     pyfusefilter: built from the sdist inside the image (the Dockerfile installs a C compiler)
#   --build-python (or --python PATH): CPython 3.11 built from python.org's source into
#       /opt/deltamask/python (30-60 min on the Nano; or point --python at one from deadsnakes/pyenv)
#     python:       that Python -> venv /opt/deltamask/venv, the same unit as on a Pi
#     torch:        CPU wheel index; NOTE Ubuntu 18.04's glibc is 2.27 and recent aarch64 torch wheels
#                   are tagged manylinux_2_28: pip may find no torch for it; set TORCH_SPEC to an older
#                   one (e.g. TORCH_SPEC="torch==2.5.1 torchvision==0.20.1") if it does not.
#     pyfusefilter: built from the sdist: build-essential libffi-dev (installed here)
#
#   sudo deploy/install-jetson-nano.sh [--dry-run] [--start] [--container | --build-python | --python PATH]
#
# See deploy/README.md.
set -eu

BOARD=jetson-nano
ROLE=agent
ALLOW_OTHER_PYTHON=1
DM_EXTRA_USAGE="[--container | --build-python]
  --container     (default) run the agent in an image built from docker/client.Dockerfile
  --build-python  build CPython \$PYTHON_BUILD_VERSION (3.11.9) into PREFIX/python, then a venv"
# shellcheck source=common.sh source-path=SCRIPTDIR
. "$(dirname "$0")/common.sh"

dm_board_route() {
    if [ "$BUILD_PYTHON" = 1 ] || [ -n "$PYTHON" ]; then
        CONTAINER=0
        if [ "$BUILD_PYTHON" = 1 ]; then
            ROUTE_PYTHON="CPython $PYTHON_BUILD_VERSION built from source into $PREFIX/python (JetPack 4.6's own is 3.6, too old) -> venv"
        else
            ROUTE_PYTHON="$PYTHON (must be 3.9+; JetPack 4.6's own python3 is 3.6) -> venv"
        fi
        ROUTE_TORCH="CPU wheel index https://download.pytorch.org/whl/cpu, CPU only (glibc 2.27: may need an older TORCH_SPEC)"
        ROUTE_PYFUSEFILTER="built from the sdist on the board: build-essential libffi-dev"
    else
        CONTAINER=1
        ROUTE_PYTHON="container from docker/client.Dockerfile: the image's Python 3.9+ (JetPack 4.6's own is 3.6, too old)"
        ROUTE_TORCH="inside the image: aarch64 CPU torch (the Nano's GPU is not used)"
        ROUTE_PYFUSEFILTER="built from the sdist inside the image (docker/client.Dockerfile)"
    fi
}

dm_main_routed "$@"
