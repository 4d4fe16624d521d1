#!/usr/bin/env bash
# make test-all, what CI runs: lint, the fast suite, the real data path, the
# exit node booted in QEMU, the real engine, the real single-node cluster and
# the default stack end to end (its exit node booted by the emulated Hetzner),
# in that order.
#
# From cold caches the builds of the engine's and the cluster's programs (the
# Pulumi CLI and provider, Kubernetes, kwok, kube-router, CoreDNS, the images:
# about 45 minutes on 2 cores) would come after the data-path suite, which
# mostly waits on timeouts. So they run beside it instead, in the background
# at the lowest CPU priority (nice 19: the suites' own processes come first),
# and the engine and cluster suites start once they are done. With the
# programs already built the builds are no-ops and this is plain sequence.
# The boot images come first in that background chain (minutes), so that the
# boot suite (about 20 minutes of emulated VMs) runs right after the data-path
# suite, while the longer builds go on beside it, instead of after them.
# The background's output goes to build/test-all-builds.log, shown on failure.
set -euo pipefail
cd "$(dirname "$0")/.."

log=build/test-all-builds.log
mkdir -p build
make datapath-bins  # the cluster's relay image is made of them: first, in the foreground

boot_ready=build/.test-all-boot-images
rm -f "$boot_ready"
setsid -w bash -c "nice -n 19 bash scripts/build-boot-image.sh && touch $boot_ready \
    && nice -n 19 bash scripts/build-engine-bins.sh && nice -n 19 bash scripts/build-cluster-bins.sh" \
    >"$log" 2>&1 &
builds=$!
# On any failure or interrupt, the background builds stop with this script.
trap 'kill -- -"$builds" 2>/dev/null || true' EXIT

failed() {
    tail -n 60 "$log" >&2
    echo "test-all: the background builds failed (whole log: $log)" >&2
    exit 1
}

make lint lint-bins test test-datapath

echo "waiting for the boot images (log: $log)"
while [ ! -e "$boot_ready" ]; do
    kill -0 "$builds" 2>/dev/null || { wait "$builds" || failed; }
    sleep 5
done
make test-boot

echo "waiting for the engine's and the cluster's builds (log: $log)"
wait "$builds" || failed
trap - EXIT
make test-engine test-cluster test-default-stack
