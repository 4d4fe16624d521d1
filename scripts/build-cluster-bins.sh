#!/usr/bin/env bash
# Build the parts of the test cluster (issue 9, `make cluster-up`) that are not
# Kubernetes itself, into a cache OUTSIDE the repository:
#
#   kube-router   k3s's fork github.com/k3s-io/kube-router/v2 at the version k3s
#                 pins, NetworkPolicy controller only, run as k3s embeds it
#                 (our main: scripts/go/kube-router, hashes pinned in its go.sum)
#   coredns       github.com/coredns/coredns with the plugins the Corefile uses
#                 (scripts/go/coredns)
#   probe         the test workloads' network client (scripts/go/probe)
#   pause         build/pause/linux/pause.c from the k8s.io/kubernetes module
#                 (gcc -static)
#   images        OCI archives (umoci) for containerd: the pause image,
#                 ghcr.io/tailscale/tailscale:<tag>, local/probe:1, coredns
#
# kube-apiserver, kube-controller-manager, kube-scheduler, kubelet, kube-proxy
# and etcd come from scripts/build-engine-bins.sh (one k8s.io/kubernetes build):
#   KUBE_EXTRA="kubelet kube-proxy" bash scripts/build-engine-bins.sh kubernetes
# tailscaled, tailscale and containerboot from scripts/build-datapath-bins.sh.
#
# Usage: build-cluster-bins.sh [component...]  (default: all, in the order above)
# Idempotent: a binary already built from the pinned version is kept; images
# are rebuilt only when an input changed. Needs Go; installs what else it runs
# itself (gcc with static glibc, umoci, busybox-static, iptables:
# scripts/install-test-tools.sh --cluster-bins), so it works on a fresh machine.
# Output: $TS_EGRESS_CACHE/bin/<name>, $TS_EGRESS_CACHE/images/<name>.tar
set -euo pipefail

# The kube-router version k3s pins (k3s go.mod: replace
# github.com/cloudnativelabs/kube-router/v2 => github.com/k3s-io/kube-router/v2).
KUBE_ROUTER_VERSION=v2.6.3-k3s1
COREDNS_VERSION=v1.15.0
# The pause.c of the Kubernetes release the cluster runs; the image tag is the
# one kubelet v1.35 defaults to.
KUBERNETES_VERSION=v1.35.4
PAUSE_TAG=3.10.1
# Must equal scripts/build-datapath-bins.sh's TAILSCALE_VERSION (the relay's
# image tag in the rendered manifests).
TAILSCALE_VERSION=v1.102.5
PROBE_IMAGE=local/probe:1
PAUSE_IMAGE="registry.k8s.io/pause:$PAUSE_TAG"
TAILSCALE_IMAGE="ghcr.io/tailscale/tailscale:$TAILSCALE_VERSION"
COREDNS_IMAGE="local/coredns:${COREDNS_VERSION#v}"
# Bumped when what goes into an image changes (2: iptables in the relay
# image): tests/support/cluster_env.py rebuilds images of another layout.
IMAGES_LAYOUT=2

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
CACHE="${TS_EGRESS_CACHE:-$HOME/.cache/tailscale-egress}"
BIN="$CACHE/bin"
IMAGES="$CACHE/images"
BUSYBOX=/bin/busybox

die() { echo "build-cluster-bins: ERROR: $*" >&2; exit 1; }

export CGO_ENABLED=0
export GOFLAGS="-trimpath -buildvcs=false"
export GOTOOLCHAIN=local
# The checksum database does not know k3s's fork: its hashes are in
# scripts/go/kube-router/go.sum, which `go build` checks (-mod=readonly).
export GONOSUMDB=github.com/k3s-io
export PATH="$PATH:/usr/local/go/bin"

timed() {
    local name=$1 start
    shift
    start=$(date +%s)
    "$@"
    echo "$name: $(($(date +%s) - start)) s"
}

# has_dep <binary> <module> <version>
has_dep() {
    [[ -x "$1" ]] && go version -m "$1" 2>/dev/null \
        | grep -qE "^[[:space:]]+(mod|dep)[[:space:]]+${2//./\\.}[[:space:]]+${3//./\\.}([[:space:]]|$)"
}

# go_build <name> <module dir under scripts/go> <pinned module> <version>
go_build() {
    local name=$1 src="$HERE/go/$2" module=$3 version=$4
    local dir="$BIN/$name-$version" out log
    out="$dir/$name"
    log="$dir/build.log"
    command -v go >/dev/null 2>&1 || die "go not found on PATH (need Go >= 1.26)"
    # The binary must also be newer than our main: a changed main rebuilds.
    if has_dep "$out" "$module" "$version" && [[ "$out" -nt "$src/main.go" ]]; then
        echo "up to date: $out"
    else
        echo "building: $module@$version ($src) -> $out"
        mkdir -p "$dir"
        if ! (cd "$src" && go build -mod=readonly -o "$out" .) > "$log" 2>&1; then
            tail -n 40 "$log" >&2
            die "command failed (in $src): GONOSUMDB=$GONOSUMDB CGO_ENABLED=0 go build -mod=readonly -o $out .  (log: $log)"
        fi
    fi
    ln -sfn "$name-$version/$name" "$BIN/$name"
}

build_kube_router() { go_build kube-router kube-router github.com/cloudnativelabs/kube-router/v2 "$KUBE_ROUTER_VERSION"; }
build_coredns() { go_build coredns coredns github.com/coredns/coredns "$COREDNS_VERSION"; }

# shellcheck source=scripts/build-local-go.sh
source "$HERE/build-local-go.sh"
build_probe() { build_local_go probe "$HERE/go/probe" "$BIN"; }

build_pause() {
    local dir="$BIN/pause-$KUBERNETES_VERSION" src
    if [[ -x "$dir/pause" ]]; then
        echo "up to date: $dir/pause"
    else
        command -v gcc >/dev/null || die "gcc not found (apt-get install gcc libc6-dev)"
        # Only the module zip is needed (no k8s.io/kubernetes build here).
        src=$(GOFLAGS=-mod=mod go mod download -json "k8s.io/kubernetes@$KUBERNETES_VERSION" \
            | sed -n 's/^[[:space:]]*"Dir": "\(.*\)",$/\1/p')
        [[ -f "$src/build/pause/linux/pause.c" ]] \
            || die "no build/pause/linux/pause.c in k8s.io/kubernetes@$KUBERNETES_VERSION (go mod download gave '$src')"
        mkdir -p "$dir"
        echo "building: pause.c (k8s.io/kubernetes@$KUBERNETES_VERSION) -> $dir/pause"
        gcc -Os -Wall -Werror -static -DVERSION="$PAUSE_TAG" -o "$dir/pause" "$src/build/pause/linux/pause.c" \
            || die "command failed: gcc -static -o $dir/pause $src/build/pause/linux/pause.c"
        strip "$dir/pause"
    fi
    ln -sfn "pause-$KUBERNETES_VERSION/pause" "$BIN/pause"
}

# ---------------------------------------------------------------- images
# image <archive name> <image name> <uid> <entrypoint json> <cmd json> <rootfs dir>
# An OCI archive of one layer made with umoci, with the annotation that
# `ctr images import` names the image by.
image() {
    local archive="$IMAGES/$1.tar" name=$2 uid=$3 entry=$4 cmd=$5 rootfs=$6
    local work="$IMAGES/.work-$1" stamp sum
    sum=$( (echo "normalized-name $name $uid $entry $cmd"; cd "$rootfs" && find . -printf '%p %l %m\n' | sort && find . -type f -print0 | sort -z | xargs -0 sha256sum) | sha256sum | cut -c1-16)
    stamp="$archive.$sum"
    if [[ -f "$archive" && -f "$stamp" ]]; then
        echo "up to date: $archive ($name)"
        return 0
    fi
    echo "building image: $name -> $archive"
    rm -rf "$work" "$archive" "$archive".*
    mkdir -p "$work"
    umoci init --layout "$work/oci"
    umoci new --image "$work/oci:img"
    umoci insert --image "$work/oci:img" "$rootfs" /
    local cfg=(--image "$work/oci:img" --config.user "$uid:$uid" --config.workingdir /
        --config.env "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
        --architecture amd64 --os linux --clear=config.entrypoint --clear=config.cmd)
    while read -r x; do [[ -n $x ]] && cfg+=(--config.entrypoint "$x"); done < <(python3 -c 'import json,sys; print("\n".join(json.loads(sys.argv[1])))' "$entry")
    while read -r x; do [[ -n $x ]] && cfg+=(--config.cmd "$x"); done < <(python3 -c 'import json,sys; print("\n".join(json.loads(sys.argv[1])))' "$cmd")
    umoci config "${cfg[@]}"
    umoci gc --layout "$work/oci"
    # containerd names an imported image after this annotation; the kubelet
    # asks for the normalized reference (local/probe:1 is
    # docker.io/local/probe:1), so that is the name to give.
    python3 - "$work/oci/index.json" "$name" <<'PY'
import json, sys
path, name = sys.argv[1], sys.argv[2]
first = name.split("/", 1)[0]
if "/" not in name:
    name = "docker.io/library/" + name
elif "." not in first and ":" not in first and first != "localhost":
    name = "docker.io/" + name
idx = json.load(open(path))
for m in idx["manifests"]:
    m.setdefault("annotations", {})["io.containerd.image.name"] = name
json.dump(idx, open(path, "w"))
PY
    tar -C "$work/oci" -cf "$archive" .
    rm -rf "$work"
    touch "$stamp"
}

# busybox_root <dir>: busybox-static with every applet linked in /bin.
busybox_root() {
    local root=$1 applet
    mkdir -p "$root/bin" "$root/etc" "$root/tmp"
    chmod 1777 "$root/tmp"
    install -m 0755 "$BUSYBOX" "$root/bin/busybox"
    for applet in $("$BUSYBOX" --list); do
        [[ $applet == busybox ]] || ln -sfn busybox "$root/bin/$applet"
    done
    printf 'root:x:0:0:root:/:/bin/sh\nnobody:x:65534:65534:nobody:/:/bin/false\nnonroot:x:65532:65532:nonroot:/:/bin/false\n' > "$root/etc/passwd"
    printf 'root:x:0:\nnobody:x:65534:\nnonroot:x:65532:\n' > "$root/etc/group"
}

# iptables_root <dir>: iptables-legacy and iptables-nft from this host's Debian
# iptables package, under the command names ghcr.io/tailscale/tailscale
# (Alpine) has: the node guard calls iptables-{legacy,nft}[-save|-restore] and
# ip6tables-*; containerboot's linuxfw finds plain iptables/ip6tables, linked
# to legacy upstream (tailscale issue 17854), the -save/-restore to nft. With
# the shared libraries ldd names, the dynamic loader and the extension modules
# (the path Debian compiled in as XTABLES_LIBDIR).
IPTABLES_MULTI=(/usr/sbin/xtables-legacy-multi /usr/sbin/xtables-nft-multi)
XTABLES_LIBDIR=/usr/lib/x86_64-linux-gnu/xtables
iptables_root() {
    local root=$1 f lib b fam
    for f in "${IPTABLES_MULTI[@]}"; do
        [[ -x $f ]] || die "$f not found (apt-get install iptables)"
    done
    [[ -d $XTABLES_LIBDIR ]] || die "$XTABLES_LIBDIR not found (apt-get install iptables)"
    mkdir -p "$root/usr/sbin" "$root$XTABLES_LIBDIR" "$root/run"
    for f in "${IPTABLES_MULTI[@]}"; do install -m 0755 "$f" "$root/usr/sbin/"; done
    cp -a "$XTABLES_LIBDIR/." "$root$XTABLES_LIBDIR/"
    # Every library the binaries and the modules load, at the path ldd resolves.
    for lib in $( (ldd "${IPTABLES_MULTI[@]}" "$XTABLES_LIBDIR"/*.so || true) \
        | awk '$2 == "=>" && $3 ~ /^\// {print $3} $1 ~ /^\/.*ld-linux/ {print $1}' | sort -u); do
        mkdir -p "$root$(dirname "$lib")"
        cp -L "$lib" "$root$lib"
    done
    [[ -e $root/lib64/ld-linux-x86-64.so.2 ]] || die "no dynamic loader found by ldd for ${IPTABLES_MULTI[*]}"
    for fam in iptables ip6tables; do
        for b in "" -save -restore; do
            ln -sfn xtables-legacy-multi "$root/usr/sbin/$fam-legacy$b"
            ln -sfn xtables-nft-multi "$root/usr/sbin/$fam-nft$b"
            ln -sfn xtables-nft-multi "$root/usr/sbin/$fam$b"
        done
        ln -sfn "$fam-legacy" "$root/usr/sbin/$fam"
    done
    [[ -f /etc/protocols ]] && install -m 0644 /etc/protocols "$root/etc/protocols"
    # Proof it runs in there, before it becomes an image.
    chroot "$root" /usr/sbin/iptables-legacy --version >/dev/null \
        && chroot "$root" /usr/sbin/iptables-nft --version >/dev/null \
        || die "iptables does not run in the relay image's root $root (ldd missed a library?)"
}

# ca_bundle <dir>: the system CA bundle, plus $TSE_IMAGE_EXTRA_CA (the test
# topology's CA, so the relay trusts headscale's certificate) when set.
ca_bundle() {
    mkdir -p "$1/etc/ssl/certs"
    cat /etc/ssl/certs/ca-certificates.crt ${TSE_IMAGE_EXTRA_CA:+"$TSE_IMAGE_EXTRA_CA"} > "$1/etc/ssl/certs/ca-certificates.crt"
}

build_images() {
    command -v umoci >/dev/null || die "umoci not found (bash scripts/install-test-tools.sh --cluster-bins)"
    [[ -x $BUSYBOX ]] || die "$BUSYBOX not found (apt-get install busybox-static)"
    mkdir -p "$IMAGES"
    local roots="$IMAGES/.roots" r
    rm -rf "$roots"
    mkdir -p "$roots"
    for need in pause probe coredns tailscaled tailscale containerboot; do
        [[ -x "$BIN/$need" ]] || die "$BIN/$need missing: build it first (this script; build-datapath-bins.sh for tailscale)"
    done

    r="$roots/pause"
    mkdir -p "$r"
    install -m 0755 "$BIN/pause" "$r/pause"
    image pause "$PAUSE_IMAGE" 65535 '["/pause"]' '[]' "$r"

    # The relay image: what ghcr.io/tailscale/tailscale has at /usr/local/bin,
    # plus the /bin/sh and awk the rendered probes run (busybox) and the
    # iptables backends the node guard and containerboot use.
    r="$roots/tailscale"
    busybox_root "$r"
    ca_bundle "$r"
    iptables_root "$r"
    mkdir -p "$r/usr/local/bin"
    for b in containerboot tailscaled tailscale; do install -m 0755 "$BIN/$b" "$r/usr/local/bin/$b"; done
    image tailscale "$TAILSCALE_IMAGE" 0 '["/usr/local/bin/containerboot"]' '[]' "$r"

    r="$roots/probe"
    busybox_root "$r"
    ca_bundle "$r"
    mkdir -p "$r/usr/local/bin"
    install -m 0755 "$BIN/probe" "$r/usr/local/bin/probe"
    image probe "$PROBE_IMAGE" 65532 '[]' '["/bin/sleep","86400"]' "$r"

    r="$roots/coredns"
    mkdir -p "$r/etc/ssl/certs"
    install -m 0755 "$BIN/coredns" "$r/coredns"
    image coredns "$COREDNS_IMAGE" 65532 '["/coredns"]' '[]' "$r"
    rm -rf "$roots"

    cat > "$IMAGES/IMAGES" <<EOF
PAUSE_IMAGE=$PAUSE_IMAGE
TAILSCALE_IMAGE=$TAILSCALE_IMAGE
PROBE_IMAGE=$PROBE_IMAGE
COREDNS_IMAGE=$COREDNS_IMAGE
IMAGES_LAYOUT=$IMAGES_LAYOUT
EOF
}

main() {
    local components=("$@")
    [[ ${#components[@]} -gt 0 ]] || components=(kube-router coredns probe pause images)
    # What pause and images run, installed here rather than by a later test
    # step (seconds when all is there; under CI=true a failure stops the build).
    bash "$HERE/install-test-tools.sh" --cluster-bins
    mkdir -p "$BIN"
    for c in "${components[@]}"; do
        case "$c" in
            kube-router) timed kube-router build_kube_router ;;
            coredns) timed coredns build_coredns ;;
            probe) timed probe build_probe ;;
            pause) timed pause build_pause ;;
            images) timed images build_images ;;
            *) die "unknown component '$c' (known: kube-router coredns probe pause images)" ;;
        esac
    done
}

main "$@"
