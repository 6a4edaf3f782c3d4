#!/usr/bin/env bash
# End to end on Docker Compose: builds the images offline (scripts/images.sh),
# brings compose.yaml up with made-up secrets, sends a message through ingress
# and reads the streamed reply (convctl send), scales the runtime to 2, sends
# again, and tears everything down (volumes included). Exit 0 with a note
# when Docker does not answer.
#
#   scripts/compose-smoke.sh
#   CONV_INGRESS_PORT=18080 CONV_PROJECTIONS_PORT=18081 scripts/compose-smoke.sh   # other host ports
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
export CONV_INGRESS_PORT=${CONV_INGRESS_PORT:-8080} CONV_PROJECTIONS_PORT=${CONV_PROJECTIONS_PORT:-8081}
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
wait_ready "$CONV_INGRESS_PORT"
wait_ready "$CONV_PROJECTIONS_PORT"

send() {
  local out
  out=$(CONV_INGRESS_ADDR=127.0.0.1:$CONV_INGRESS_PORT CONV_PROJECTIONS_ADDR=127.0.0.1:$CONV_PROJECTIONS_PORT \
        CONV_API_KEY=$CONV_INGRESS_API_KEYS timeout 90 "$convctl" send "$1" "hello from compose" --timeout-secs 60)
  say "reply in $1: $out"
  case "$out" in
    "You said: hello from compose."*) ;;
    *) say "unexpected reply"; return 1 ;;
  esac
}
send smoke-1

# Without a key ingress refuses.
status=$(curl -s -o /dev/null -w '%{http_code}' -XPOST "http://127.0.0.1:$CONV_INGRESS_PORT/v1/conversations/smoke-x/messages" \
  -H 'content-type: application/json' -d '{"text":"no key"}')
[ "$status" = 401 ] || { say "a request without a key got $status, not 401"; exit 1; }

say "scaling runtime to 2"
compose up -d --no-recreate --scale runtime=2
for _ in $(seq 1 60); do
  [ "$(compose ps -q runtime | wc -l)" -ge 2 ] && break
  sleep 0.5
done
[ "$(compose ps -q runtime | wc -l)" -ge 2 ] || { say "runtime did not scale to 2"; exit 1; }
sleep 3   # the new instance joins and partitions move
send smoke-2
send smoke-3
say "passed"
