#!/usr/bin/env bash
# Build pulumi-resource-hcloud, the real hcloud provider plugin (issue 18), into
# a cache OUTSIDE the repository, from the Go module proxy at pinned versions.
#
# pulumi-hcloud's own provider module is not served by the proxy, so the plugin
# is bridged here the way pulumi-hcloud bridges theirs: Hetzner's
# terraform-provider-hcloud (its SDKv2 and plugin-framework halves muxed into
# one) through pulumi-terraform-bridge, with the published SDK's tokens
# (hcloud:index/server:Server, ...). The module (go.mod, go.sum, *.go) lives
# in scripts/go/hcloud-provider/; it is built from a throwaway copy under
# $TS_EGRESS_CACHE/src/ in two steps: its tfgen build writes schema.json and
# bridge-metadata.json, which the plugin build embeds.
#
# The plugin reports the version of the pulumi-hcloud SDK pinned in
# requirements.txt: the engine runs the plugin whose version the SDK asks for.
#
# Idempotent: a plugin built from the same sources for the same version is kept.
# Output: $TS_EGRESS_CACHE/bin/pulumi-resource-hcloud-v<version>/pulumi-resource-hcloud
# (and schema.json beside it), plus the stable symlink $TS_EGRESS_CACHE/bin/pulumi-resource-hcloud.
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
MODULE_DIR="$REPO/scripts/go/hcloud-provider"
CACHE="${TS_EGRESS_CACHE:-$HOME/.cache/tailscale-egress}"
BIN="$CACHE/bin"
SRC="$CACHE/src"

die() { echo "build-hcloud-provider: ERROR: $*" >&2; exit 1; }

command -v go >/dev/null 2>&1 || die "go not found on PATH (need Go >= 1.26.4)"

SDK_VERSION=$(sed -n 's/^pulumi-hcloud==\([0-9][0-9.]*\)$/\1/p' "$REPO/requirements.txt")
[[ -n "$SDK_VERSION" ]] || die "no pulumi-hcloud==X.Y.Z pin in $REPO/requirements.txt"

export CGO_ENABLED=0
# go.sum is pinned in the repo: never resolve anything anew.
export GOFLAGS="-trimpath -buildvcs=false -mod=readonly"
export GOTOOLCHAIN=local

dir="$BIN/pulumi-resource-hcloud-v$SDK_VERSION"
mod="$SRC/hcloud-provider-v$SDK_VERSION"
out="$dir/pulumi-resource-hcloud"
log="$dir/build.log"

# What the plugin is built from: the module's files, this script's steps and
# the version it reports.
fingerprint=$(cd "$MODULE_DIR" && {
    echo "version $SDK_VERSION"
    sha256sum go.mod go.sum ./*.go
    sha256sum < "$REPO/scripts/build-hcloud-provider.sh"
} | sha256sum | cut -d' ' -f1)

run() {
    echo "+ (cd $PWD && $*)" >> "$log"
    if ! "$@" >> "$log" 2>&1; then
        tail -n 60 "$log" >&2
        die "command failed (in $PWD): $*   (full log: $log)"
    fi
}

start=$(date +%s)
if [[ -x "$out" && "$(cat "$dir/SOURCE" 2>/dev/null)" == "$fingerprint" ]]; then
    echo "up to date: $out"
else
    echo "building: pulumi-resource-hcloud $SDK_VERSION (scripts/go/hcloud-provider) -> $out"
    mkdir -p "$dir"
    : > "$log"
    rm -rf "$mod" && mkdir -p "$mod"
    cp "$MODULE_DIR"/go.mod "$MODULE_DIR"/go.sum "$MODULE_DIR"/*.go "$mod/"
    cd "$mod"
    # Step 1: the schema generator, with empty metadata and schema embedded.
    : > bridge-metadata.json
    : > schema.json
    run go build -tags tfgen -ldflags "-X main.version=$SDK_VERSION" -o pulumi-tfgen-hcloud .
    run ./pulumi-tfgen-hcloud schema --skip-docs --out gen
    [[ -s gen/schema.json && -s gen/bridge-metadata.json ]] || die "tfgen wrote no schema.json or bridge-metadata.json in $mod/gen"
    # Step 2: the plugin, with both embedded; tfgen leaves the version out of
    # the schema (as upstream's generate step adds it, so does this).
    cp gen/bridge-metadata.json .
    sed '0,/^    "name": "hcloud",$/s//    "name": "hcloud",\n    "version": "'"$SDK_VERSION"'",/' gen/schema.json > schema.json
    grep -q "^    \"version\": \"$SDK_VERSION\",\$" schema.json || die "could not set the version in $mod/schema.json"
    run go build -ldflags "-X main.version=$SDK_VERSION" -o "$out.new" .
    mv -f "$out.new" "$out"
    install -m 0644 schema.json "$dir/schema.json"
    echo "$fingerprint" > "$dir/SOURCE"
fi
ln -sfn "pulumi-resource-hcloud-v$SDK_VERSION/pulumi-resource-hcloud" "$BIN/pulumi-resource-hcloud"
echo "hcloud provider: $(($(date +%s) - start)) s"
echo "  $BIN/pulumi-resource-hcloud -> $out"
