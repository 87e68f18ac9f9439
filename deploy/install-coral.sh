#!/bin/bash
# deltamask edge agent on a Google Coral Dev Board with Mendel Linux (Debian-based, aarch64).
#
# Mendel's Python is 3.7. The agent needs Python 3.9+ (grpcio >= 1.70 for the generated gRPC code), so
# the board's own Python cannot run it. Two routes:
#
#   default, --build-python: CPython 3.11 built from python.org's source into /opt/deltamask/python
#       (about an hour on the board's 4 cores, once; or --python PATH for one you built with pyenv)
#     python:       that Python -> venv /opt/deltamask/venv, the same unit as on a Pi
#     torch:        CPU wheel index https://download.pytorch.org/whl/cpu (aarch64; the Edge TPU is not used)
#     pyfusefilter: built from the sdist: build-essential libffi-dev (installed here)
#   --container: an image from docker/client.Dockerfile (Mendel does not ship docker:
#       apt-get install docker.io first)
#     python / torch / pyfusefilter: the image's (Python 3.9+, CPU torch, pyfusefilter from the sdist)
#
# The 1 GB board is tight for torch + a backbone: use the 4 GB board, or a small backbone.
#
#   sudo deploy/install-coral.sh [--dry-run] [--start] [--build-python | --python PATH | --container]
#
# See deploy/README.md.
set -eu

BOARD=coral
ROLE=agent
ALLOW_OTHER_PYTHON=1
DM_EXTRA_USAGE="[--build-python | --container]
  --build-python  (default) build CPython \$PYTHON_BUILD_VERSION (3.11.9) into PREFIX/python, then a venv
  --container     run the agent in an image built from docker/client.Dockerfile (needs docker.io)"
# shellcheck source=common.sh source-path=SCRIPTDIR
. "$(dirname "$0")/common.sh"

dm_board_route() {
    if [ "$CONTAINER" = 1 ]; then
        ROUTE_PYTHON="container from docker/client.Dockerfile: the image's Python 3.9+ (Mendel's own is 3.7, too old)"
        ROUTE_TORCH="inside the image: aarch64 CPU torch"
        ROUTE_PYFUSEFILTER="built from the sdist inside the image (docker/client.Dockerfile)"
        return
    fi
    if [ -n "$PYTHON" ]; then
        ROUTE_PYTHON="$PYTHON (must be 3.9+; Mendel's own python3 is 3.7) -> venv"
    else
        BUILD_PYTHON=1
        ROUTE_PYTHON="CPython $PYTHON_BUILD_VERSION built from source into $PREFIX/python (Mendel's own is 3.7, too old) -> venv"
    fi
    ROUTE_TORCH="CPU wheel index https://download.pytorch.org/whl/cpu (aarch64, CPU only)"
    ROUTE_PYFUSEFILTER="built from the sdist on the board: build-essential libffi-dev"
}

dm_main_routed "$@"
