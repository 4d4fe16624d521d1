# shellcheck shell=bash
# What the provider plugin builds share (sourced by build-hcloud-provider.sh
# and build-tailscale-provider.sh, not run): where the plugin goes, the
# version it reports (the SDK pinned in requirements.txt), the fingerprint of
# what it is built from, and the logged step runner.
#
#   plugin_build_setup <name> <module dir under scripts/go> <SDK package>
#
# sets REPO, MODULE_DIR, CACHE, BIN, SRC, SDK_VERSION, dir (the plugin's
# directory in the cache), mod (a throwaway copy of the module), out (the
# plugin binary), log and fingerprint (the module's go.mod, go.sum and *.go,
# the calling script, this file and the version), and exports the Go settings
# of a pinned build (go.sum in the repository: nothing is resolved anew).

die() { echo "build-$PLUGIN-provider: ERROR: $*" >&2; exit 1; }

plugin_build_setup() {
    PLUGIN=$1
    local module=$2 sdk=$3
    REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
    MODULE_DIR="$REPO/scripts/go/$module"
    CACHE="${TS_EGRESS_CACHE:-$HOME/.cache/tailscale-egress}"
    BIN="$CACHE/bin"
    SRC="$CACHE/src"

    command -v go >/dev/null 2>&1 || die "go not found on PATH (need Go >= 1.26.4)"
    SDK_VERSION=$(sed -n "s/^$sdk==\([0-9][0-9.]*\)\$/\1/p" "$REPO/requirements.txt")
    [[ -n "$SDK_VERSION" ]] || die "no $sdk==X.Y.Z pin in $REPO/requirements.txt"

    export CGO_ENABLED=0
    export GOFLAGS="-trimpath -buildvcs=false -mod=readonly"
    export GOTOOLCHAIN=local

    dir="$BIN/pulumi-resource-$PLUGIN-v$SDK_VERSION"
    # shellcheck disable=SC2034  # mod, fingerprint: for the calling script
    mod="$SRC/$module-v$SDK_VERSION"
    out="$dir/pulumi-resource-$PLUGIN"
    log="$dir/build.log"
    # shellcheck disable=SC2034
    fingerprint=$(cd "$MODULE_DIR" && {
        echo "version $SDK_VERSION"
        sha256sum go.mod go.sum ./*.go
        sha256sum < "$REPO/scripts/build-$PLUGIN-provider.sh"
        sha256sum < "$REPO/scripts/plugin-build.sh"
    } | sha256sum | cut -d' ' -f1)
}

run() {
    echo "+ (cd $PWD && $*)" >> "$log"
    if ! "$@" >> "$log" 2>&1; then
        tail -n 60 "$log" >&2
        die "command failed (in $PWD): $*   (full log: $log)"
    fi
}

# plugin_link <start epoch>: the stable symlink, and how long the build took.
plugin_link() {
    local start=$1
    ln -sfn "pulumi-resource-$PLUGIN-v$SDK_VERSION/pulumi-resource-$PLUGIN" "$BIN/pulumi-resource-$PLUGIN"
    echo "$PLUGIN provider: $(($(date +%s) - start)) s"
    echo "  $BIN/pulumi-resource-$PLUGIN -> $out"
}
