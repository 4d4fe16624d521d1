#!/usr/bin/env bash
# Installs the Debian packages a step needs, where this machine can. Each step
# installs its own set, so that none relies on an earlier one (a fresh CI
# machine runs `make test` before anything else):
#   (default)       make test: cloud-init (`cloud-init schema`), shellcheck,
#                   busybox-static (the node guard's script runs in busybox sh),
#                   curl (tools/verify.py's curl probes), gnupg (the exit node's
#                   apt key fingerprints)
#   --datapath      iptables, iproute2, util-linux, curl, openssl (network namespaces)
#   --engine        openssl (the engine tests' certificates)
#   --cluster       the --datapath set plus the node's runtime (make cluster-up):
#                   containerd, runc, CNI plugins, ipset, conntrack, umoci, busybox-static
#   --cluster-bins  what scripts/build-cluster-bins.sh runs: umoci, busybox-static,
#                   iptables (copied into the relay image), gcc and libc6-dev (the
#                   static pause), binutils (strip), ca-certificates
#   --boot          make test-boot: the --datapath set plus what scripts/build-boot-image.sh
#                   and tests/boot run: mmdebstrap, e2fsprogs, dpkg-dev, apt-utils, gnupg,
#                   qemu-system-x86, qemu-utils, genisoimage, dnsmasq-base
# `--list <set>` prints the set's entries (<program or path>:<Debian package>),
# one a line, and installs nothing (tests/test_install_steps.py reads them).
# Under CI=true a tool that cannot be installed is an error; elsewhere the
# tests that need it are skipped, naming the command that installs it.
set -euo pipefail

list=false
if [ "${1:-}" = "--list" ]; then list=true; shift; fi

case "${1:-}" in
  "")
    wanted=(cloud-init:cloud-init shellcheck:shellcheck busybox:busybox-static curl:curl gpg:gnupg) ;;
  --datapath)
    wanted=(iptables:iptables ip6tables:iptables ip:iproute2 nsenter:util-linux setpriv:util-linux curl:curl
      openssl:openssl) ;;
  --engine)
    wanted=(openssl:openssl) ;;
  --cluster)
    wanted=(iptables:iptables ip6tables:iptables ip:iproute2 nsenter:util-linux setpriv:util-linux
      unshare:util-linux curl:curl openssl:openssl containerd:containerd ctr:containerd runc:runc
      /usr/lib/cni/bridge:containernetworking-plugins ipset:ipset conntrack:conntrack umoci:umoci
      busybox:busybox-static /bin/busybox:busybox-static) ;;
  --boot)
    wanted=(iptables:iptables ip6tables:iptables ip:iproute2 nsenter:util-linux setpriv:util-linux curl:curl
      openssl:openssl mmdebstrap:mmdebstrap mkfs.ext4:e2fsprogs dpkg-deb:dpkg dpkg-scanpackages:dpkg-dev
      apt-ftparchive:apt-utils gpg:gnupg qemu-system-x86_64:qemu-system-x86 qemu-img:qemu-utils
      genisoimage:genisoimage dnsmasq:dnsmasq-base) ;;
  --cluster-bins)
    wanted=(umoci:umoci /bin/busybox:busybox-static /usr/sbin/xtables-legacy-multi:iptables
      /usr/sbin/xtables-nft-multi:iptables gcc:gcc /usr/lib/x86_64-linux-gnu/libc.a:libc6-dev strip:binutils
      /etc/ssl/certs/ca-certificates.crt:ca-certificates) ;;
  *)
    echo "install-test-tools: unknown set '$1' (known: --datapath --engine --cluster --cluster-bins --boot)" >&2
    exit 2 ;;
esac

if $list; then printf '%s\n' "${wanted[@]}"; exit 0; fi

missing=()
for entry in "${wanted[@]}"; do
  tool="${entry%%:*}"
  if [[ $tool == /* ]]; then [ -e "$tool" ]; else command -v "$tool" >/dev/null; fi || missing+=("${entry#*:}")
done
[ ${#missing[@]} -eq 0 ] && exit 0
mapfile -t missing < <(printf '%s\n' "${missing[@]}" | sort -u)

as_root=()
[ "$(id -u)" = 0 ] || as_root=(sudo -n)
if command -v apt-get >/dev/null && "${as_root[@]}" true 2>/dev/null; then
  echo "install-test-tools: installing ${missing[*]}"
  # test-all runs a build (which installs its own set) beside a test step:
  # one apt-get at a time, and apt waits for dpkg's lock instead of failing.
  exec 9>"${TMPDIR:-/tmp}/tailscale-egress-apt.lock"
  flock 9
  "${as_root[@]}" apt-get -o DPkg::Lock::Timeout=600 update -qq
  "${as_root[@]}" env DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600 install -y -qq \
    --no-install-recommends "${missing[@]}" >/dev/null
  exit 0
fi
msg="install-test-tools: cannot install ${missing[*]} here (needs apt-get as root): apt-get install ${missing[*]}"
if [ "${CI:-}" = "true" ]; then echo "$msg" >&2; exit 1; fi
echo "$msg (the tests that need them will be skipped)" >&2
