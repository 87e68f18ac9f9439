#!/bin/bash
# deltamask coordinator on a Linux server (Debian 12 / Ubuntu 22.04 or newer; x86_64 or aarch64).
#
#   python:       the system's python3 (3.9+) in a venv under /opt/deltamask/venv
#   torch:        CPU wheel index https://download.pytorch.org/whl/cpu by default (the coordinator only
#                 averages heads and scores theta; PyPI's default torch brings GBs of CUDA packages).
#                 TORCH_INDEX= (empty) installs PyPI's build instead.
#   pyfusefilter: a wheel on x86_64 with CPython <= 3.11; elsewhere built from the sdist:
#                 build-essential python3-dev libffi-dev (installed here; the compiled membership kernel
#                 is built with the same compiler on first use)
#
#   sudo deploy/install-server.sh [--dry-run] [--start] [--prefix DIR] [--python PATH]
#
# Then edit /etc/deltamask/server.yaml and `systemctl start deltamask-server`. See deploy/README.md.
set -eu

BOARD=server
ROLE=server
DEFAULT_PYTHON=python3
ROUTE_PYTHON="system python3 (3.9+) -> venv /opt/deltamask/venv"
ROUTE_TORCH="CPU wheel index https://download.pytorch.org/whl/cpu (TORCH_INDEX= for PyPI's)"
ROUTE_PYFUSEFILTER="wheel where one exists (x86_64, CPython <= 3.11), else the sdist: build-essential python3-dev libffi-dev"
# shellcheck source=common.sh source-path=SCRIPTDIR
. "$(dirname "$0")/common.sh"

dm_board_install() {
    dm_venv_install python3 python3-venv python3-dev build-essential libffi-dev
}

dm_main "$@"
