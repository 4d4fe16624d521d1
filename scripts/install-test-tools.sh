#!/usr/bin/env bash
# Installs the Debian packages the tests need, where this machine can:
#   (default)    cloud-init (for `cloud-init schema`) and shellcheck
#   --datapath   iptables, iproute2, util-linux, curl, openssl (network namespaces)
#   --engine     openssl (the engine tests' certificates)
#   --cluster    the --datapath set plus the node's runtime (make cluster-up):
#                containerd, runc, CNI plugins, ipset, conntrack, umoci, busybox-static
# Under CI=true a tool that cannot be installed is an error; elsewhere the
# tests that need it are skipped, naming the command that installs it.
set -euo pipefail

if [ "${1:-}" = "--datapath" ]; then
  wanted=(iptables:iptables ip:iproute2 nsenter:util-linux setpriv:util-linux curl:curl openssl:openssl)
elif [ "${1:-}" = "--engine" ]; then
  wanted=(openssl:openssl)
elif [ "${1:-}" = "--cluster" ]; then
  wanted=(iptables:iptables ip:iproute2 nsenter:util-linux setpriv:util-linux curl:curl openssl:openssl
    containerd:containerd runc:runc /usr/lib/cni/bridge:containernetworking-plugins ipset:ipset
    conntrack:conntrack umoci:umoci /bin/busybox:busybox-static)
else
  wanted=(cloud-init:cloud-init shellcheck:shellcheck)
fi

missing=()
for entry in "${wanted[@]}"; do
  tool="${entry%%:*}"
  if [[ $tool == /* ]]; then [ -x "$tool" ]; else command -v "$tool" >/dev/null; fi || missing+=("${entry#*:}")
done
[ ${#missing[@]} -eq 0 ] && exit 0
mapfile -t missing < <(printf '%s\n' "${missing[@]}" | sort -u)

as_root=()
[ "$(id -u)" = 0 ] || as_root=(sudo -n)
if command -v apt-get >/dev/null && "${as_root[@]}" true 2>/dev/null; then
  echo "install-test-tools: installing ${missing[*]}"
  "${as_root[@]}" apt-get update -qq
  "${as_root[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  exit 0
fi
msg="install-test-tools: cannot install ${missing[*]} here (needs apt-get as root): apt-get install ${missing[*]}"
if [ "${CI:-}" = "true" ]; then echo "$msg" >&2; exit 1; fi
echo "$msg (the tests that need them will be skipped)" >&2
