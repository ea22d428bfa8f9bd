#!/usr/bin/env bash
# Installs the system packages Hearth needs and the machine lacks. One script for `make run`,
# `make test` and `.ci/run`.
#
#   deploy/system-deps.sh run     PostgreSQL's server, nginx, a JDK (17+) and Maven
#   deploy/system-deps.sh test    the same, plus Debian's Chromium for the browser tests
#   deploy/system-deps.sh containers   the test set, plus Docker's engine (docker.io), debootstrap
#                                 (base images without a registry) and docker-compose
#
# As root it runs apt-get itself. As another user it uses sudo when sudo is there and the user
# allows it (HEARTH_SUDO=1, or "y" at the prompt on a terminal); otherwise it prints the one
# command to run and exits 1. HEARTH_SKIP_SYSTEM_DEPS=1 skips the whole check.
set -euo pipefail

mode="${1:-run}"
[ "${HEARTH_SKIP_SYSTEM_DEPS:-0}" = 1 ] && exit 0

need=()
have() { command -v "$1" >/dev/null 2>&1; }

have nginx || [ -x /usr/sbin/nginx ] || need+=(nginx-light)
ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || need+=(postgresql)
java_ok=0
if have java; then
  v="$(java -version 2>&1 | sed -n 's/.*version "\([0-9]*\).*/\1/p' | head -1)"
  [ -n "$v" ] && [ "$v" -ge 17 ] && java_ok=1
fi
[ "$java_ok" = 1 ] || need+=(openjdk-17-jre-headless)
have mvn || need+=(maven)
if [ "$mode" = test ] || [ "$mode" = containers ]; then
  have chromium || [ -x /usr/bin/chromium ] || need+=(chromium)
fi
if [ "$mode" = containers ]; then
  have dockerd || need+=(docker.io)
  have debootstrap || [ -x /usr/sbin/debootstrap ] || need+=(debootstrap)
  have docker-compose || need+=(docker-compose)
fi

[ ${#need[@]} -eq 0 ] && exit 0

cmd="apt-get update && apt-get install -y ${need[*]}"
run_apt() {
  echo "hearth: installing system packages: ${need[*]}" >&2
  "$@" apt-get update -qq
  "$@" DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
}

if [ "$(id -u)" = 0 ]; then
  run_apt env
  exit 0
fi
if have sudo; then
  allowed="${HEARTH_SUDO:-}"
  if [ -z "$allowed" ] && [ -t 0 ]; then
    read -r -p "hearth: install ${need[*]} with sudo? [y/N] " answer
    case "$answer" in y|Y|yes) allowed=1 ;; esac
  fi
  if [ "$allowed" = 1 ]; then
    run_apt sudo env
    exit 0
  fi
fi
echo "hearth: missing system packages: ${need[*]}" >&2
echo "hearth: install them with:  sudo sh -c '$cmd'   (or set HEARTH_SUDO=1 to let make use sudo)" >&2
exit 1
