#!/usr/bin/env bash
# End to end on Docker Compose: builds the images offline (scripts/images.sh),
# brings compose.yaml up with made-up secrets, sends a message through ingress
# and reads the streamed reply (convctl send), scales every service to 2,
# sends through each ingress and projections instance, and tears everything
# down (volumes included). Exit 0 with a note when Docker does not answer.
#
#   scripts/compose-smoke.sh                   # host ports 8080-8081 (ingress) and 8090-8091 (projections)
#   CONV_INGRESS_PORT=18080-18081 CONV_PROJECTIONS_PORT=18090-18091 scripts/compose-smoke.sh
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/.." && pwd)
cd "$root"

if ! docker info >/dev/null 2>&1; then
  echo "compose-smoke: Docker does not answer; skipped"
  exit 0
fi
if command -v docker-compose >/dev/null 2>&1; then
  compose_cmd=(docker-compose)
elif docker compose version >/dev/null 2>&1; then
  compose_cmd=(docker compose)
else
  echo "compose-smoke: neither docker-compose nor docker compose is installed; skipped"
  exit 0
fi
compose() { "${compose_cmd[@]}" -p "$project" -f "$root/compose.yaml" "$@"; }
secret() { head -c 24 /dev/urandom | od -An -tx1 | tr -d ' \n'; }

export CONV_IMAGE=${CONV_IMAGE:-conv:local}
"$here/images.sh" >/dev/null
convctl=${CARGO_TARGET_DIR:-$root/target}/${CONV_PROFILE:-debug}/convctl

for u in INGRESS RUNTIME EFFECTS PROJECTIONS ADMIN; do export "CONV_NATS_${u}_PASSWORD=$(secret)"; done
export CONV_INGRESS_API_KEYS="smoke-$(secret)"
export CONV_CALLBACK_SECRET=$(secret)
# Two host ports each: one per instance once scaled.
export CONV_INGRESS_PORT=${CONV_INGRESS_PORT:-8080-8081} CONV_PROJECTIONS_PORT=${CONV_PROJECTIONS_PORT:-8090-8091}
project=convsmoke$$
started=$(date +%s)
say() { echo "[compose-smoke +$(( $(date +%s) - started ))s] $*"; }
cleanup() {
  local rc=$?
  if [ $rc -ne 0 ]; then
    say "failed; the stack's logs:"
    compose logs --no-color --tail 40 || true
  fi
  compose down -v --remove-orphans >/dev/null 2>&1 || true
  exit $rc
}
trap cleanup EXIT

compose config -q
say "up: nats, setup, ingress :$CONV_INGRESS_PORT, runtime, effects, projections :$CONV_PROJECTIONS_PORT"
compose up -d
wait_ready() {
  for _ in $(seq 1 120); do
    if curl -fs "http://127.0.0.1:$1/readyz" >/dev/null 2>&1; then return 0; fi
    sleep 0.5
  done
  say "127.0.0.1:$1 never got ready"; return 1
}
# The host port of instance $2 of service $1 (container port $3).
port_of() { compose port --index="$2" "$1" "$3" | sed 's/.*://'; }
ready_instance() { wait_ready "$(port_of ingress "$1" 8080)" && wait_ready "$(port_of projections "$1" 8081)"; }
ready_instance 1

# Sends through ingress instance $2, reads from projections instance $2.
send() {
  local out ingress projections
  ingress=$(port_of ingress "$2" 8080)
  projections=$(port_of projections "$2" 8081)
  out=$(CONV_INGRESS_ADDR=127.0.0.1:$ingress CONV_PROJECTIONS_ADDR=127.0.0.1:$projections \
        CONV_API_KEY=$CONV_INGRESS_API_KEYS timeout 90 "$convctl" send "$1" "hello from compose" --timeout-secs 60)
  say "reply in $1 (ingress :$ingress, projections :$projections): $out"
  case "$out" in
    "You said: hello from compose."*) ;;
    *) say "unexpected reply"; return 1 ;;
  esac
}
send smoke-1 1

# Without a key ingress refuses.
status=$(curl -s -o /dev/null -w '%{http_code}' -XPOST "http://127.0.0.1:$(port_of ingress 1 8080)/v1/conversations/smoke-x/messages" \
  -H 'content-type: application/json' -d '{"text":"no key"}')
[ "$status" = 401 ] || { say "a request without a key got $status, not 401"; exit 1; }

say "scaling every service to 2"
compose up -d --no-recreate --scale runtime=2 --scale effects=2 --scale ingress=2 --scale projections=2
for svc in runtime effects ingress projections; do
  for _ in $(seq 1 60); do
    [ "$(compose ps -q "$svc" | wc -l)" -ge 2 ] && break
    sleep 0.5
  done
  [ "$(compose ps -q "$svc" | wc -l)" -ge 2 ] || { say "$svc did not scale to 2"; exit 1; }
done
ready_instance 2
sleep 3   # the new instances join and partitions move
send smoke-2 2
send smoke-3 1
send smoke-4 2
say "passed"
