#!/usr/bin/env bash
# Build pulumi-resource-tailscale, a TEST-ONLY stand-in of the Tailscale
# provider plugin (issue 18, point 3), into a cache OUTSIDE the repository,
# from the Go module proxy at pinned versions.
#
# No real Tailscale provider can be built here: pulumi-tailscale's provider
# module and terraform-provider-tailscale are not served by the proxy. The
# stand-in (scripts/go/tailscale-provider/: go.mod, go.sum, *.go) is written
# with github.com/pulumi/pulumi-go-provider v1.3.2 and
# tailscale.com/client/tailscale/v2 v2.12.0 and implements exactly the tokens
# the program uses, with the pinned pulumi-tailscale SDK's token strings and
# property names. It talks to the Tailscale API v2 as that client calls it.
#
# The plugin reports the version of the pulumi-tailscale SDK pinned in
# requirements.txt: the engine runs the plugin whose version the SDK asks for.
#
# Cold build (empty Go build cache, modules already downloaded, 2 busy cores):
# 68 s wall, 100 s of CPU (measured at load 1.2). Warm cache: about 3 s.
#
# Idempotent: a plugin built from the same sources for the same version is kept.
# Output: $TS_EGRESS_CACHE/bin/pulumi-resource-tailscale-v<version>/pulumi-resource-tailscale
# (with schema.json, build.log and SOURCE beside it), plus the stable symlink
# $TS_EGRESS_CACHE/bin/pulumi-resource-tailscale.
set -euo pipefail

# shellcheck source=scripts/plugin-build.sh
source "$(dirname "${BASH_SOURCE[0]}")/plugin-build.sh"
plugin_build_setup tailscale tailscale-provider pulumi-tailscale

start=$(date +%s)
if [[ -x "$out" && -s "$dir/schema.json" && "$(cat "$dir/SOURCE" 2>/dev/null)" == "$fingerprint" ]]; then
    echo "up to date: $out"
else
    echo "building: pulumi-resource-tailscale $SDK_VERSION (scripts/go/tailscale-provider) -> $out"
    mkdir -p "$dir"
    : > "$log"
    rm -rf "$mod" && mkdir -p "$mod"
    # The tests stay in the repository (go test there); the build needs none.
    find "$MODULE_DIR" -maxdepth 1 \( -name go.mod -o -name go.sum -o -name '*.go' \) ! -name '*_test.go' \
        -exec cp {} "$mod/" \;
    cd "$mod"
    run go build -ldflags "-X main.version=$SDK_VERSION" -o "$out.new" .
    # The schema the plugin serves (GetSchema), written beside it.
    "$out.new" --schema > "$dir/schema.json.new" 2>> "$log" || die "$out.new --schema failed (log: $log)"
    grep -q "^  \"version\": \"$SDK_VERSION\",\$" "$dir/schema.json.new" || die "the schema does not carry version $SDK_VERSION"
    mv -f "$out.new" "$out"
    mv -f "$dir/schema.json.new" "$dir/schema.json"
    echo "$fingerprint" > "$dir/SOURCE"
fi
plugin_link "$start"
