#!/bin/bash
# deltamask edge agent on a Raspberry Pi 4 (or 5) with 64-bit Raspberry Pi OS bookworm.
#
#   python:       the system's python3 (3.11 on bookworm) in a venv under /opt/deltamask/venv
#   torch:        from PyTorch's CPU wheel index (--index-url https://download.pytorch.org/whl/cpu):
#                 PyPI's aarch64 torch >= 2.11 pulls the CUDA packages (GBs, useless on a Pi)
#   pyfusefilter: no aarch64 wheel: pip builds 1.3.0 from its sdist (cffi + C compiler, ~1 min on a Pi):
#                 needs build-essential, python3-dev, libffi-dev (installed here)
#
# 32-bit Raspberry Pi OS (armv7l) has no torch wheels: use the 64-bit image.
#
#   sudo deploy/install-rpi4.sh [--dry-run] [--start] [--prefix DIR] [--python PATH]
#
# Then edit /etc/deltamask/agent.yaml (server, name, data) and `systemctl start deltamask-agent`.
# See deploy/README.md.
set -eu

BOARD=rpi4
ROLE=agent
DEFAULT_PYTHON=python3
ROUTE_PYTHON="system python3 (3.11 on Raspberry Pi OS bookworm) -> venv /opt/deltamask/venv"
ROUTE_TORCH="CPU wheel index https://download.pytorch.org/whl/cpu (PyPI's aarch64 torch >= 2.11 pulls CUDA packages)"
ROUTE_PYFUSEFILTER="built from the sdist (no aarch64 wheel): build-essential python3-dev libffi-dev"
# shellcheck source=common.sh source-path=SCRIPTDIR
. "$(dirname "$0")/common.sh"

dm_board_install() {
    dm_check_arch
    if [ -r /etc/os-release ] && ! grep -q '^VERSION_CODENAME=bookworm' /etc/os-release; then
        dm_say "note: not bookworm; the route still works with any Python 3.9+ (see --python)"
    fi
    dm_venv_install python3 python3-venv python3-dev build-essential libffi-dev i2c-tools
}

dm_main "$@"
