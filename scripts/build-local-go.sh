# shellcheck shell=bash
# Sourced by the build scripts: build_local_go <name> <source dir> <bin dir>
# builds one of the repository's own Go programs (scripts/go/<name>) into
# <bin dir>/<name>-local/<name>, linked as <bin dir>/<name>. It is rebuilt
# when its sources differ from the ones it was built from (a digest stamp
# beside it): clones of other commits share the cache, so a newer file says
# nothing. The caller defines die().
build_local_go() {
    local name=$1 src=$2 bin=$3 out sum
    out="$bin/$name-local/$name"
    sum=$( (cd "$src" && find . \( -name '*.go' -o -name go.mod \) -print0 | sort -z | xargs -0 sha256sum) | sha256sum | cut -c1-16)
    if [[ -x "$out" && "$(cat "$out.src" 2>/dev/null)" == "$sum" ]]; then
        echo "up to date: $out"
    else
        echo "building: $name ($src) -> $out"
        mkdir -p "$(dirname "$out")"
        (cd "$src" && go build -mod=readonly -o "$out" .) || die "command failed (in $src): go build -o $out ."
        echo "$sum" > "$out.src"
    fi
    ln -sfn "$name-local/$name" "$bin/$name"
}
