#!/usr/bin/env bash
# Build the real programs used by the data-path tests (tests/datapath/) and
# devtools/bench_datapath.py into a cache OUTSIDE the repository.
#
#   tailscale.com     cmd/tailscaled, cmd/tailscale, cmd/containerboot
#   headscale         cmd/headscale (open control server, sqlite, embedded DERP)
#   wanlink           the WAN bench's shaped link (scripts/go/wanlink, ours)
#
# Idempotent: a binary already built for the pinned version is kept.
# Output: $TS_EGRESS_CACHE/bin/<name>-<version>/<binary>, plus stable symlinks
# $TS_EGRESS_CACHE/bin/<binary>; the stable paths are printed at the end.
set -euo pipefail

# Must equal the tag of the relay image (ghcr.io/tailscale/tailscale:<version>).
TAILSCALE_VERSION=v1.102.5
# Newest headscale release (v0.27.1, v0.28.0, v0.29.0 on the proxy). It builds
# with Go 1.26 (its go.mod: go 1.26.4, no replace directives) and accepts
# tailscale v1.102 clients: it only enforces a MINIMUM capability version
# (hscontrol/noise.go: version >= capver.MinSupportedCapabilityVersion = 113;
# v1.102.5 sends 142).
HEADSCALE_VERSION=v0.29.0

CACHE="${TS_EGRESS_CACHE:-$HOME/.cache/tailscale-egress}"
BIN="$CACHE/bin"

die() { echo "build-datapath-bins: ERROR: $*" >&2; exit 1; }

command -v go >/dev/null 2>&1 || die "go not found on PATH (need Go >= 1.26)"

export CGO_ENABLED=0
export GOFLAGS="-trimpath -buildvcs=false"
export GOTOOLCHAIN=local

# build_one <module> <version> <pkg> <dest dir>
build_one() {
    local module=$1 version=$2 pkg=$3 dest=$4
    local name out
    name=$(basename "$pkg")
    out="$dest/$name"
    if [[ -x "$out" ]] && go version -m "$out" 2>/dev/null \
        | grep -qE "^[[:space:]]+mod[[:space:]]+${module//./\\.}[[:space:]]+${version//./\\.}([[:space:]]|$)"; then
        echo "up to date: $out"
        return 0
    fi
    mkdir -p "$dest"
    echo "building: $pkg@$version -> $out"
    if ! GOBIN="$dest" go install "$pkg@$version" 2> "$dest/$name.build.log"; then
        cat "$dest/$name.build.log" >&2
        die "command failed: GOBIN=$dest CGO_ENABLED=0 GOFLAGS='$GOFLAGS' go install $pkg@$version"
    fi
    [[ -x "$out" ]] || die "go install $pkg@$version produced no $out"
}

TS_DIR="$BIN/tailscale-$TAILSCALE_VERSION"
HS_DIR="$BIN/headscale-$HEADSCALE_VERSION"

for cmd in tailscaled tailscale containerboot; do
    build_one tailscale.com "$TAILSCALE_VERSION" "tailscale.com/cmd/$cmd" "$TS_DIR"
done
# `go install github.com/juanfont/headscale/cmd/headscale@<version>` fails: it
# looks up the module's deprecation in the version LIST, which the module
# proxy refuses (403). Build from a throwaway module in the cache instead.
build_headscale() {
    local out="$HS_DIR/headscale" mod="$CACHE/src/headscale-$HEADSCALE_VERSION"
    if [[ -x "$out" ]] && go version -m "$out" 2>/dev/null \
        | grep -qE "^[[:space:]]+(mod|dep)[[:space:]]+github\.com/juanfont/headscale[[:space:]]+${HEADSCALE_VERSION//./\\.}([[:space:]]|$)"; then
        echo "up to date: $out"
        return 0
    fi
    echo "building: github.com/juanfont/headscale/cmd/headscale@$HEADSCALE_VERSION -> $out"
    mkdir -p "$mod" "$HS_DIR"
    (
        cd "$mod"
        rm -f go.mod go.sum
        cat > go.mod <<GOMOD
module tailscale-egress.invalid/headscale-build

go 1.26
GOMOD
        go get "github.com/juanfont/headscale/cmd/headscale@$HEADSCALE_VERSION"
        go build -o "$out" github.com/juanfont/headscale/cmd/headscale
    ) > "$HS_DIR/headscale.build.log" 2>&1 || {
        cat "$HS_DIR/headscale.build.log" >&2
        die "command failed (in $mod): go get github.com/juanfont/headscale/cmd/headscale@$HEADSCALE_VERSION && go build -o $out github.com/juanfont/headscale/cmd/headscale"
    }
}
build_headscale

# wanlink: the repository's own program (scripts/go/wanlink).
# shellcheck source=scripts/build-local-go.sh
source "$(dirname "${BASH_SOURCE[0]}")/build-local-go.sh"
build_local_go wanlink "$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/go/wanlink" "$BIN"

# Stable paths (symlinks into the versioned directories).
for cmd in tailscaled tailscale containerboot; do
    ln -sfn "tailscale-$TAILSCALE_VERSION/$cmd" "$BIN/$cmd"
done
ln -sfn "headscale-$HEADSCALE_VERSION/headscale" "$BIN/headscale"

cat > "$BIN/VERSIONS" <<VERSIONS
TAILSCALE_VERSION=$TAILSCALE_VERSION
HEADSCALE_VERSION=$HEADSCALE_VERSION
VERSIONS

echo "binaries (TAILSCALE_VERSION=$TAILSCALE_VERSION HEADSCALE_VERSION=$HEADSCALE_VERSION):"
for cmd in tailscaled tailscale containerboot headscale wanlink; do
    echo "  $BIN/$cmd"
done
