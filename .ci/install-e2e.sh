#!/usr/bin/env bash
# Install what stackd's e2e tests need: podman + crun + conmon + netavark, Debian's distribution
# registry, a static busybox for the test image, and podman-compose (PyPI) in the project venv.
# Idempotent; Debian 12 (podman 4.3) and Debian 13 (podman 5.x). Run as root.
set -euo pipefail

cd "$(dirname "$0")/.."
VENV="${VENV:-.venv}"
PODMAN_COMPOSE_VERSION="${PODMAN_COMPOSE_VERSION:-1.6.0}"

# Packages present on both releases. No iptables: the tests use host networking only.
pkgs=(podman crun conmon netavark aardvark-dns uidmap busybox-static docker-registry
      fuse-overlayfs catatonit util-linux)
# Optional second provider (Debian 12: docker-compose 1.29 in Python; 13: v2 in Go).
optional=()
[[ ${STACKD_E2E_COMPOSE:-} == docker-compose ]] && optional=(docker-compose)

missing=()
for p in "${pkgs[@]}" "${optional[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
if ((${#missing[@]})); then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  want=()
  for p in "${missing[@]}"; do
    # Keep only names this release knows (a package may be renamed or dropped on 13).
    if apt-cache show "$p" >/dev/null 2>&1; then
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
echo "install-e2e: $(podman --version), $("$VENV/bin/podman-compose" version | head -1)"
