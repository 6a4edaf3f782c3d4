#!/usr/bin/env bash
# Builds the conv image offline: FROM scratch, holding the five binaries built
# on this host plus exactly the shared libraries they load (from ldd), so no
# base image is pulled. Also builds the NATS image (scripts/nats-image.sh).
# Prints the image name.
#
#   scripts/images.sh                 # debug binaries (cargo build --workspace --bins)
#   CONV_PROFILE=release scripts/images.sh
#   CONV_IMAGE=conv:dev scripts/images.sh
#
# With a registry, docker/Dockerfile is the conventional multi-stage build.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/.." && pwd)
IMAGE=${CONV_IMAGE:-conv:local}
PROFILE=${CONV_PROFILE:-debug}
BINS="conv-ingress conv-runtime conv-effects conv-projections convctl"

"$here/nats-image.sh" >/dev/null

cd "$root"
if [ "$PROFILE" = release ]; then
  cargo build --release --workspace --bins >&2
else
  cargo build --workspace --bins >&2
fi
target=${CARGO_TARGET_DIR:-$root/target}/$PROFILE

ctx=$(mktemp -d)
trap 'rm -rf "$ctx"' EXIT
mkdir -p "$ctx/rootfs/usr/local/bin" "$ctx/rootfs/etc" "$ctx/rootfs/tmp"
for b in $BINS; do
  [ -x "$target/$b" ] || { echo "images.sh: $target/$b is missing" >&2; exit 1; }
  # Debug info is most of a debug binary; the image does not need it.
  objcopy --strip-debug "$target/$b" "$ctx/rootfs/usr/local/bin/$b"
  # Every library it loads, at the same path (the dynamic loader included).
  ldd "$target/$b" | grep -o '/[^ ]*' | while read -r lib; do
    mkdir -p "$ctx/rootfs$(dirname "$lib")"
    cp -L -n "$lib" "$ctx/rootfs$lib"
  done
done
# Name resolution of compose service names (glibc reads these).
printf 'hosts: files dns\n' > "$ctx/rootfs/etc/nsswitch.conf"
printf 'nobody:x:65534:65534:nobody:/:/nonexistent\n' > "$ctx/rootfs/etc/passwd"
printf 'nogroup:x:65534:\n' > "$ctx/rootfs/etc/group"
# Root certificates, for an HTTPS model endpoint.
if [ -f /etc/ssl/certs/ca-certificates.crt ]; then
  mkdir -p "$ctx/rootfs/etc/ssl/certs"
  cp /etc/ssl/certs/ca-certificates.crt "$ctx/rootfs/etc/ssl/certs/"
fi
chmod 1777 "$ctx/rootfs/tmp"
cat > "$ctx/Dockerfile" <<'DOCKERFILE'
FROM scratch
COPY rootfs/ /
USER 65534:65534
ENTRYPOINT ["/usr/local/bin/convctl"]
DOCKERFILE
echo "building $IMAGE from $target ($PROFILE)..." >&2
DOCKER_BUILDKIT=0 docker build --quiet -t "$IMAGE" "$ctx" >&2
echo "$IMAGE"
