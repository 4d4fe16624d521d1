#!/usr/bin/env bash
# Build the real programs used by the engine tests (issue 7) into a cache
# OUTSIDE the repository, from the Go module proxy at pinned versions:
#
#   pulumi                      the Pulumi CLI (engine, backends, plugin host)
#   pulumi-resource-kubernetes  the Kubernetes provider plugin
#   kube-apiserver, kube-controller-manager, kube-scheduler, kubectl,
#   kubelet, kube-proxy         (k8s.io/kubernetes, one build)
#   etcd                        (go.etcd.io/etcd/server/v3 etcdmain)
#   kwok                        (fake nodes: makes scheduled pods Running/Ready)
#   pulumi-resource-hcloud      the hcloud provider plugin (scripts/build-hcloud-provider.sh)
#   pulumi-resource-tailscale   the test-only Tailscale provider stand-in
#                               (scripts/build-tailscale-provider.sh)
#
# Usage: build-engine-bins.sh [component...]   components: pulumi provider
#        hcloud tailscale kubernetes (with etcd) kwok; default: all. KUBE_EXTRA="<cmd> ..." adds
#        more k8s.io/kubernetes/cmd/<cmd> to the one kubernetes build.
#
# Idempotent: a binary already built for the pinned version is kept.
# Output: $TS_EGRESS_CACHE/bin/<name>-<version>/<binary>, plus stable symlinks
# $TS_EGRESS_CACHE/bin/<binary>. Modules that carry replace directives cannot
# be `go install`ed by version: each is built from a throwaway module under
# $TS_EGRESS_CACHE/src/ that requires it and repeats the replaces it needs.
set -euo pipefail

# This script's directory (the builds below cd into the cache).
SCRIPTS=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)

# The Pulumi CLI: the pinned SDK is 3.272.0, but the proxy refuses
# pkg/v3@v3.272.0; v3.274.1 is the nearest version it serves.
PULUMI_VERSION=v3.274.1
# An sdk/v3 whose module still carries pulumi-analyzer-policy-python (v3.230.0 no longer does).
POLICY_SCRIPT_SDK_VERSION=v3.220.0
# pulumi-kubernetes' provider module is served only as a pseudo-version (its
# tags are vX.Y.Z, not provider/vX.Y.Z). Its commit f47bc2d6f199 is exactly
# the tag v4.25.0 (`git describe --tags` in pulumi/pulumi-kubernetes); that
# release goes into the plugin's version ldflag, which the engine reads.
PROVIDER_MODULE=github.com/pulumi/pulumi-kubernetes/provider/v4
PROVIDER_PSEUDO=v4.0.0-20260115033456-f47bc2d6f199
PROVIDER_RELEASE=v4.25.0
# v1.35.4: its 31 staging modules all resolve on the proxy (v1.34.4's
# k8s.io/kube-proxy is missing), and 1.35 is the last release whose kubelet
# runs on cgroup v1 (issue 9).
KUBERNETES_VERSION=v1.35.4
# The etcd that k8s.io/kubernetes v1.35.4's go.mod requires (what its own
# integration tests run against); built in the same module and build.
ETCD_VERSION=v3.6.5
KWOK_VERSION=v0.8.0

CACHE="${TS_EGRESS_CACHE:-$HOME/.cache/tailscale-egress}"
BIN="$CACHE/bin"
SRC="$CACHE/src"

die() { echo "build-engine-bins: ERROR: $*" >&2; exit 1; }

command -v go >/dev/null 2>&1 || die "go not found on PATH (need Go >= 1.26)"

export CGO_ENABLED=0
export GOFLAGS="-trimpath -buildvcs=false"
export GOTOOLCHAIN=local

# has_dep <binary> <module> <version>: the binary was built with that module
# version (as main module or dependency).
has_dep() {
    [[ -x "$1" ]] && go version -m "$1" 2>/dev/null \
        | grep -qE "^[[:space:]]+(mod|dep)[[:space:]]+${2//./\\.}[[:space:]]+${3//./\\.}([[:space:]]|$)"
}

# run <log> <cmd...>: run a build step; on failure print the command, where it
# ran and its output.
run() {
    local log=$1
    shift
    echo "+ (cd $PWD && $*)" >> "$log"
    if ! "$@" >> "$log" 2>&1; then
        tail -n 60 "$log" >&2
        die "command failed (in $PWD): $*   (full log: $log)"
    fi
}

# new_module <dir> <module path>: a fresh throwaway module.
new_module() {
    mkdir -p "$1"
    rm -f "$1/go.mod" "$1/go.sum" "$1/tools.go"
    printf 'module %s\n\ngo 1.26\n' "$2" > "$1/go.mod"
}

# took <name> <start epoch>: how long a component took (cold builds: minutes).
took() {
    echo "$1: $(($(date +%s) - $2)) s"
}

build_pulumi() {
    local dir="$BIN/pulumi-$PULUMI_VERSION" mod="$SRC/pulumi-$PULUMI_VERSION"
    local out="$dir/pulumi" log="$dir/build.log" gomod replace sdkdir
    if has_dep "$out" github.com/pulumi/pulumi/pkg/v3 "$PULUMI_VERSION"; then
        echo "up to date: $out"
    else
        echo "building: github.com/pulumi/pulumi/pkg/v3/cmd/pulumi@$PULUMI_VERSION -> $out"
        mkdir -p "$dir"
        : > "$log"
        new_module "$mod" tailscale-egress.invalid/pulumi-build
        cd "$mod"
        # The CLI's go.mod replaces atotto/clipboard with a fork; repeat it
        # (its other replace, sdk/v3 => ../sdk, becomes a plain require).
        gomod=$(go mod download -json "github.com/pulumi/pulumi/pkg/v3@$PULUMI_VERSION" \
            | sed -n 's/^[[:space:]]*"GoMod": "\(.*\)",$/\1/p')
        [[ -f "$gomod" ]] || die "go mod download github.com/pulumi/pulumi/pkg/v3@$PULUMI_VERSION gave no go.mod"
        replace=$(grep -E '^replace github\.com/atotto/clipboard =>' "$gomod") \
            || die "no atotto/clipboard replace in $gomod: check the CLI's go.mod"
        echo "$replace" >> go.mod
        printf '//go:build tools\n\npackage tools\n\nimport _ "github.com/pulumi/pulumi/pkg/v3/cmd/pulumi"\n' > tools.go
        run "$log" go get "github.com/pulumi/pulumi/pkg/v3@$PULUMI_VERSION" "github.com/pulumi/pulumi/sdk/v3@$PULUMI_VERSION"
        run "$log" go mod tidy
        run "$log" go build -o "$out" \
            -ldflags "-X github.com/pulumi/pulumi/sdk/v3/go/common/version.Version=$PULUMI_VERSION" \
            github.com/pulumi/pulumi/pkg/v3/cmd/pulumi
    fi
    ln -sfn "pulumi-$PULUMI_VERSION/pulumi" "$BIN/pulumi"
    # Python policy packs: the CLI runs them through the Python language host
    # (not served by the proxy) or, without one, through the script
    # pulumi-analyzer-policy-python (`python -m pulumi.policy <engine> .`),
    # which the CLI distribution shipped up to v3.220 (sdk/v3's python/dist/;
    # gone from v3.230.0 on, absent from $PULUMI_VERSION). v3.274.1 still runs
    # it (sdk/go/common/resource/plugin/analyzer_plugin.go): take it from the
    # sdk/v3 pinned above.
    local v
    for v in "$PULUMI_VERSION" "$POLICY_SCRIPT_SDK_VERSION"; do
        sdkdir=$(go mod download -json "github.com/pulumi/pulumi/sdk/v3@$v" \
            | sed -n 's/^[[:space:]]*"Dir": "\(.*\)",$/\1/p')
        if [[ -f "$sdkdir/python/dist/pulumi-analyzer-policy-python" ]]; then
            install -m 0755 "$sdkdir/python/dist/pulumi-analyzer-policy-python" "$dir/"
            ln -sfn "pulumi-$PULUMI_VERSION/pulumi-analyzer-policy-python" "$BIN/pulumi-analyzer-policy-python"
            echo "pulumi-analyzer-policy-python: from github.com/pulumi/pulumi/sdk/v3@$v"
            break
        fi
    done
}

build_provider() {
    local dir="$BIN/pulumi-resource-kubernetes-$PROVIDER_RELEASE" mod="$SRC/pulumi-kubernetes-$PROVIDER_RELEASE"
    local out="$dir/pulumi-resource-kubernetes" log="$dir/build.log" moddir f
    local version=${PROVIDER_RELEASE#v} # the provider's Makefile uses 4.25.0, not v4.25.0
    if has_dep "$out" "$PROVIDER_MODULE" "$PROVIDER_PSEUDO"; then
        echo "up to date: $out"
    else
        echo "building: $PROVIDER_MODULE/cmd/pulumi-resource-kubernetes@$PROVIDER_PSEUDO ($PROVIDER_RELEASE) -> $out"
        mkdir -p "$dir"
        : > "$log"
        new_module "$mod" tailscale-egress.invalid/pulumi-kubernetes-build
        cd "$mod"
        # The provider's go.mod replaces its SDK with ../sdk (same repository):
        # require the SDK published for the same release instead.
        run "$log" go get "$PROVIDER_MODULE@$PROVIDER_PSEUDO" \
            "github.com/pulumi/pulumi-kubernetes/sdk/v4@$PROVIDER_RELEASE"
        moddir=$(go list -m -f '{{.Dir}}' "$PROVIDER_MODULE")
        # The plugin's main package embeds schema-embed.json and
        # terraform-mapping-embed.json, which its `go generate` step writes
        # from schema.json (not in the module: generated files are not
        # committed). The module cache is read-only: build the main package
        # from a copy here.
        rm -rf cmd && mkdir -p cmd/pulumi-resource-kubernetes
        for f in main.go generate.go schema.json terraform-mapping.json; do
            install -m 0644 "$moddir/cmd/pulumi-resource-kubernetes/$f" cmd/pulumi-resource-kubernetes/
        done
        # generate.go (build tag `ignore`) needs pulumi's codegen/schema:
        # keep it in go.sum through a tools file.
        printf '//go:build tools\n\npackage tools\n\nimport _ "github.com/pulumi/pulumi/pkg/v3/codegen/schema"\n' > tools.go
        # Placeholders so that the main package loads before generation.
        touch cmd/pulumi-resource-kubernetes/schema-embed.json cmd/pulumi-resource-kubernetes/terraform-mapping-embed.json
        run "$log" go mod tidy
        run "$log" env VERSION="$version" go generate ./cmd/pulumi-resource-kubernetes
        run "$log" go build -o "$out" \
            -ldflags "-X $PROVIDER_MODULE/pkg/version.Version=$version" \
            ./cmd/pulumi-resource-kubernetes
    fi
    ln -sfn "pulumi-resource-kubernetes-$PROVIDER_RELEASE/pulumi-resource-kubernetes" "$BIN/pulumi-resource-kubernetes"
}

# The Kubernetes control plane, and etcd, from ONE module and ONE `go build`
# so that the packages they share compile once. etcd is the version
# k8s.io/kubernetes itself requires (its integration tests embed it), built
# from a wrapper around etcdmain.
# kubectl (the preflight and the engine suite run it), kubelet and kube-proxy
# (issue 9) come almost free: measured from an empty Go build cache on 2 busy
# cores, apiserver + controller manager + scheduler + etcd took 632 s of CPU
# (627 s wall), these three 115 s of CPU more (228 s wall).
read -r -a KUBE_EXTRA_CMDS <<< "${KUBE_EXTRA:-}"
KUBE_CMDS=(kube-apiserver kube-controller-manager kube-scheduler kubectl kubelet kube-proxy "${KUBE_EXTRA_CMDS[@]}")
build_kubernetes() {
    local kdir="$BIN/kubernetes-$KUBERNETES_VERSION" edir="$BIN/etcd-$ETCD_VERSION"
    local mod="$SRC/kubernetes-$KUBERNETES_VERSION" log="$kdir/build.log"
    local staging="v0.${KUBERNETES_VERSION#v1.}" gomod cmd pkgs=() ldflags minor build_date
    mkdir -p "$kdir" "$edir"
    for cmd in "${KUBE_CMDS[@]}"; do
        if has_dep "$kdir/$cmd" k8s.io/kubernetes "$KUBERNETES_VERSION"; then
            echo "up to date: $kdir/$cmd"
        else
            pkgs+=("k8s.io/kubernetes/cmd/$cmd")
        fi
    done
    if has_dep "$edir/etcd" go.etcd.io/etcd/server/v3 "$ETCD_VERSION"; then
        echo "up to date: $edir/etcd"
    else
        pkgs+=(./cmd/etcd)
    fi
    if [[ ${#pkgs[@]} -gt 0 ]]; then
        echo "building: ${pkgs[*]} (k8s.io/kubernetes@$KUBERNETES_VERSION, etcd $ETCD_VERSION) -> $kdir"
        : > "$log"
        new_module "$mod" tailscale-egress.invalid/kubernetes-build
        cd "$mod"
        gomod=$(go mod download -json "k8s.io/kubernetes@$KUBERNETES_VERSION" \
            | sed -n 's/^[[:space:]]*"GoMod": "\(.*\)",$/\1/p')
        [[ -f "$gomod" ]] || die "go mod download k8s.io/kubernetes@$KUBERNETES_VERSION gave no go.mod"
        {
            printf 'module tailscale-egress.invalid/kubernetes-build\n\n'
            # Same language version and GODEBUG defaults as upstream's binaries.
            grep -E '^(go|godebug) ' "$gomod"
            # k8s.io/kubernetes replaces its staging modules (k8s.io/api, ...)
            # with ./staging/src/...: require the published ones, v0.<minor>.<patch>.
            echo 'replace ('
            sed -n "s|^[[:space:]]*\(k8s\.io/[a-z0-9-]*\) => \./staging/src/k8s\.io/[a-z0-9-]*\$|\t\1 => \1 $staging|p" "$gomod"
            echo ')'
        } > go.mod
        grep -q "k8s.io/api => k8s.io/api $staging" go.mod \
            || die "no staging replaces generated from $gomod: check its format"
        mkdir -p cmd/etcd
        printf '// etcd, as upstream'"'"'s main.go runs it.\npackage main\n\nimport (\n\t"os"\n\n\t"go.etcd.io/etcd/server/v3/etcdmain"\n)\n\nfunc main() { etcdmain.Main(os.Args) }\n' > cmd/etcd/main.go
        {
            printf '//go:build tools\n\npackage tools\n\nimport (\n'
            for cmd in "${KUBE_CMDS[@]}"; do
                printf '\t_ "k8s.io/kubernetes/cmd/%s"\n' "$cmd"
            done
            printf ')\n'
        } > tools.go
        run "$log" go get "k8s.io/kubernetes@$KUBERNETES_VERSION" "go.etcd.io/etcd/server/v3@$ETCD_VERSION"
        run "$log" go mod tidy
        # Without a version, clients cannot parse the server's (kubectl,
        # client-go's discovery): the values upstream's hack/lib/version.sh sets.
        # The commit is not known from the module proxy; the build date is the
        # release's (the proxy's timestamp), for reproducible binaries.
        build_date=$(go list -m -f '{{.Time.UTC.Format "2006-01-02T15:04:05Z"}}' k8s.io/kubernetes)
        minor=${KUBERNETES_VERSION#v1.}
        minor=${minor%%.*}
        ldflags=""
        for p in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
            ldflags+=" -X $p.gitVersion=$KUBERNETES_VERSION -X $p.gitMajor=1 -X $p.gitMinor=$minor"
            ldflags+=" -X $p.gitCommit= -X $p.gitTreeState=clean -X $p.buildDate=$build_date"
        done
        run "$log" go build -o "$kdir/" -ldflags "$ldflags" "${pkgs[@]}"
        if [[ -f "$kdir/etcd" ]]; then
            mv -f "$kdir/etcd" "$edir/etcd"
        fi
    fi
    for cmd in "${KUBE_CMDS[@]}"; do
        ln -sfn "kubernetes-$KUBERNETES_VERSION/$cmd" "$BIN/$cmd"
    done
    ln -sfn "etcd-$ETCD_VERSION/etcd" "$BIN/etcd"
}

build_kwok() {
    local dir="$BIN/kwok-$KWOK_VERSION" mod="$SRC/kwok-$KWOK_VERSION"
    local out="$dir/kwok" log="$dir/build.log"
    if has_dep "$out" sigs.k8s.io/kwok "$KWOK_VERSION"; then
        echo "up to date: $out"
    else
        # A throwaway module rather than `go install ...@version`, which asks
        # the proxy for the version list (refused here).
        echo "building: sigs.k8s.io/kwok/cmd/kwok@$KWOK_VERSION -> $out"
        mkdir -p "$dir"
        : > "$log"
        new_module "$mod" tailscale-egress.invalid/kwok-build
        cd "$mod"
        run "$log" go get "sigs.k8s.io/kwok/cmd/kwok@$KWOK_VERSION"
        run "$log" go build -o "$out" sigs.k8s.io/kwok/cmd/kwok
    fi
    # kwok alone simulates nothing until it is given Stages: the ones kwokctl
    # embeds by default (node initialise + lease heartbeat, pod ready /
    # complete / delete), from the same module version.
    local moddir stage
    moddir=$(cd "$SRC/kwok-$KWOK_VERSION" 2>/dev/null && go list -m -f '{{.Dir}}' sigs.k8s.io/kwok) \
        || moddir=$(go mod download -json "sigs.k8s.io/kwok@$KWOK_VERSION" | sed -n 's/^[[:space:]]*"Dir": "\(.*\)",$/\1/p')
    mkdir -p "$dir/stages"
    for stage in node/fast/node-initialize node/heartbeat-with-lease/node-heartbeat-with-lease \
        pod/fast/pod-ready pod/fast/pod-complete pod/fast/pod-delete; do
        install -m 0644 "$moddir/kustomize/stage/$stage.yaml" "$dir/stages/" \
            || die "kwok $KWOK_VERSION has no kustomize/stage/$stage.yaml in $moddir"
    done
    ln -sfn "kwok-$KWOK_VERSION/stages" "$BIN/kwok-stages"
    ln -sfn "kwok-$KWOK_VERSION/kwok" "$BIN/kwok"
}

main() {
    local components=("$@")
    [[ ${#components[@]} -gt 0 ]] || components=(pulumi provider hcloud tailscale kubernetes kwok)
    mkdir -p "$BIN" "$SRC"
    local c start
    for c in "${components[@]}"; do
        start=$(date +%s)
        case "$c" in
            pulumi) build_pulumi ;;
            provider) build_provider ;;
            kubernetes | etcd) build_kubernetes ;;
            kwok) build_kwok ;;
            hcloud) bash "$SCRIPTS/build-hcloud-provider.sh" ;;
            tailscale) bash "$SCRIPTS/build-tailscale-provider.sh" ;;
            *) die "unknown component '$c' (known: pulumi provider hcloud tailscale kubernetes etcd kwok)" ;;
        esac
        took "$c" "$start"
        cd "$CACHE"
    done
    cat > "$BIN/ENGINE-VERSIONS" <<VERSIONS
PULUMI_VERSION=$PULUMI_VERSION
PROVIDER_RELEASE=$PROVIDER_RELEASE
PROVIDER_PSEUDO=$PROVIDER_PSEUDO
KUBERNETES_VERSION=$KUBERNETES_VERSION
ETCD_VERSION=$ETCD_VERSION
KWOK_VERSION=$KWOK_VERSION
VERSIONS
    echo "binaries:"
    for b in pulumi pulumi-analyzer-policy-python pulumi-resource-kubernetes pulumi-resource-hcloud pulumi-resource-tailscale "${KUBE_CMDS[@]}" etcd kwok; do
        [[ -e "$BIN/$b" ]] && echo "  $BIN/$b"
    done
    return 0
}

main "$@"; exit  # on one line: bash reads this script as it runs it
