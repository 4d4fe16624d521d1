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

# shellcheck source=scripts/plugin-build.sh
source "$(dirname "${BASH_SOURCE[0]}")/plugin-build.sh"
plugin_build_setup hcloud hcloud-provider pulumi-hcloud

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
plugin_link "$start"
