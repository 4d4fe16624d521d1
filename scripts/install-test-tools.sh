#!/usr/bin/env bash
# Installs the Debian packages the test suite needs (cloud-init for
# `cloud-init schema`, shellcheck), where this machine can. Under CI=true a
# tool that cannot be installed is an error; elsewhere the tests that need it
# are skipped with the command that installs it.
set -euo pipefail

packages=(cloud-init shellcheck)
missing=()
command -v cloud-init >/dev/null || missing+=(cloud-init)
command -v shellcheck >/dev/null || missing+=(shellcheck)
[ ${#missing[@]} -eq 0 ] && exit 0

if command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
  echo "install-test-tools: installing ${missing[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
elif command -v apt-get >/dev/null && command -v sudo >/dev/null && sudo -n true 2>/dev/null; then
  sudo apt-get update -qq
  sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
else
  msg="install-test-tools: cannot install ${missing[*]} here (needs apt-get as root); install them with your package manager: ${packages[*]}"
  if [ "${CI:-}" = "true" ]; then echo "$msg" >&2; exit 1; fi
  echo "$msg (the tests that need them will be skipped)" >&2
fi
