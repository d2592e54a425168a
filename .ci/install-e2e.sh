#!/usr/bin/env bash
# Install what stackd's e2e tests need: podman + crun + conmon + netavark, Debian's distribution
# registry, a static busybox for the test image, docker-compose (the provider the stack tests
# drive through `podman system service`), and podman-compose (PyPI) in the project venv for
# the podman-compose smoke test. Idempotent; Debian 12 (podman 4.3, docker-compose 1.29 in
# Python) and Debian 13 (podman 5.x, docker-compose v2 in Go). Run as root.
set -euo pipefail

cd "$(dirname "$0")/.."
VENV="${VENV:-.venv}"
PODMAN_COMPOSE_VERSION="${PODMAN_COMPOSE_VERSION:-1.6.0}"

# Packages present on both releases. No iptables: the tests use host networking only.
pkgs=(podman crun conmon netavark aardvark-dns uidmap busybox-static docker-registry
      fuse-overlayfs catatonit util-linux docker-compose)

missing=()
for p in "${pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
if ((${#missing[@]})); then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  want=()
  for p in "${missing[@]}"; do
    # Keep only names this release can install (a package may be renamed or dropped).
    if apt-cache policy "$p" 2>/dev/null | grep -q '^  Candidate: [^(]'; then
      want+=("$p")
    else
      echo "install-e2e: package $p not available on this release, skipped" >&2
    fi
  done
  if ((${#want[@]})); then
    apt-get install -y -qq --no-install-recommends "${want[@]}" >/dev/null
  fi
fi
for tool in podman crun conmon docker-registry nsenter unshare; do
  command -v "$tool" >/dev/null || { echo "install-e2e: $tool missing" >&2; exit 1; }
done
test -x /bin/busybox || { echo "install-e2e: /bin/busybox missing" >&2; exit 1; }
# Debian 13's docker-compose (v2) is a docker CLI plugin; the tests also look for it there.
compose=$(command -v docker-compose || true)
for plugin in /usr/libexec/docker/cli-plugins/docker-compose /usr/lib/docker/cli-plugins/docker-compose; do
  if [[ -z $compose && -x $plugin ]]; then compose=$plugin; fi
done
[[ -n $compose ]] || { echo "install-e2e: docker-compose missing" >&2; exit 1; }

# (On a systemd-booted host the docker-registry package enables a service on :5000; the tests
# run their own instance on a free loopback port and never use it.)
# Mount point for a tmpfs in the tests' private mount namespace: podman 4.3 writes its blob-info
# cache to /var/lib/containers/cache whatever the storage config says.
install -d -m 0700 /var/lib/containers

if [[ ! -x "$VENV/bin/python" ]]; then
  python3 -m venv "$VENV"
fi
if ! "$VENV/bin/podman-compose" version 2>/dev/null | grep -q "podman-compose version $PODMAN_COMPOSE_VERSION"; then
  "$VENV/bin/pip" install -q "podman-compose==$PODMAN_COMPOSE_VERSION"
fi
echo "install-e2e: $(podman --version), docker-compose $("$compose" version --short)," \
  "$("$VENV/bin/podman-compose" version | head -1)"
