#!/usr/bin/env bash
# Builds the test control plane -- kube-apiserver and kubectl (k8s.io/kubernetes)
# and etcd (go.etcd.io/etcd/server/v3) -- from the Go modules pinned in
# go.mod/go.sum next to this script, into a cache directory keyed by their versions
# and by a hash of go.mod, go.sum and this script (any other pin or build flag):
#
#   ${IMAGE_REWRITER_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/image-rewriter}/control-plane/k8s-<ver>-etcd-<ver>-<hash>/{kube-apiserver,etcd,kubectl}
#
# Usage:
#   tests/control-plane/build.sh               build what is missing (no-op when all three exist)
#   tests/control-plane/build.sh --print-dir   print the directory; exit 1 unless all three exist
#   tests/control-plane/build.sh --rebuild     build all three again even if present
#
# Each run marks its directory used (its mtime); a build that publishes new
# binaries removes the sibling directories no run has used for more than 30 days.
#
# Environment: GO (go binary to use; default: `go` on PATH, else /usr/local/go/bin/go),
# IMAGE_REWRITER_CACHE, XDG_CACHE_HOME; the usual GOMODCACHE/GOCACHE/GOPROXY.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"

die() {
    echo "control-plane/build.sh: error: $*" >&2
    exit 1
}

# Versions come straight from go.mod (no go invocation, so --print-dir is fast
# and works without a Go toolchain).
mod_version() {
    local v
    v="$(awk -v m="$1" '$1 == m && $2 ~ /^v/ { print $2; exit }' "$here/go.mod")"
    [[ -n "$v" ]] || die "cannot find the version of $1 in $here/go.mod"
    printf '%s\n' "$v"
}

k8s_version="$(mod_version k8s.io/kubernetes)"
etcd_version="$(mod_version go.etcd.io/etcd/server/v3)"
cache_root="${IMAGE_REWRITER_CACHE:-${XDG_CACHE_HOME:-${HOME:?HOME is not set}/.cache}/image-rewriter}"
# The versions name the build; the hash makes any other change to what is
# built (a replace, an indirect pin, go.sum, a flag here) a new build, not a
# stale cache hit. The Go toolchain is left out, so that --print-dir needs none.
recipe_hash="$(cat "$here/go.mod" "$here/go.sum" "${BASH_SOURCE[0]}" | sha256sum)"
recipe_hash="${recipe_hash:0:12}"
out_dir="$cache_root/control-plane/k8s-${k8s_version}-etcd-${etcd_version}-${recipe_hash}"

binaries=(kube-apiserver etcd kubectl)

built() {
    local bin
    for bin in "${binaries[@]}"; do
        [[ -x "$out_dir/$bin" ]] || return 1
    done
}

# The binaries to build: all of them with --rebuild, else the missing ones (a
# cache directory from before kubectl was added only gets kubectl).
wanted() {
    local bin
    for bin in "${binaries[@]}"; do
        if [[ "$mode" == rebuild || ! -x "$out_dir/$bin" ]]; then
            printf '%s\n' "$bin"
        fi
    done
}

mode=build
case "${1:-}" in
    "") ;;
    --print-dir) mode=print ;;
    --rebuild) mode=rebuild ;;
    -h | --help)
        # The comment block under the shebang, whatever its length.
        awk 'NR > 1 && !/^#/ { exit } NR > 1 { sub(/^# ?/, ""); print }' "${BASH_SOURCE[0]}"
        exit 0
        ;;
    *) die "unknown argument '$1' (try --help)" ;;
esac

# A directory's mtime is when a run last used it, so that a build can tell
# stale builds (an older pin, an older recipe) from those another checkout
# still uses. Best effort: a read-only cache still serves.
mark_used() {
    touch "$out_dir" 2>/dev/null || true
}

if [[ "$mode" == print ]]; then
    if built; then
        mark_used
        printf '%s\n' "$out_dir"
        exit 0
    fi
    echo "control-plane/build.sh: kube-apiserver/etcd/kubectl are not all built in $out_dir;" \
        "run tests/control-plane/build.sh first (cold build takes 5-10 minutes on 2 cores)" >&2
    exit 1
fi

if [[ "$mode" == build ]] && built; then
    mark_used
    exit 0
fi

go_bin="${GO:-}"
if [[ -z "$go_bin" ]]; then
    if command -v go >/dev/null 2>&1; then
        go_bin="$(command -v go)"
    elif [[ -x /usr/local/go/bin/go ]]; then
        go_bin=/usr/local/go/bin/go
    else
        die "no Go toolchain found (need go >= 1.24 on PATH, at /usr/local/go/bin/go, or in \$GO)"
    fi
fi
go_version="$("$go_bin" env GOVERSION 2>/dev/null)" || die "'$go_bin env GOVERSION' failed; is Go installed correctly?"
# go.mod's `tool` block needs 1.24; an older go would fail on it obscurely, or
# try to download a newer toolchain.
# (Before 1.16 GOVERSION is empty; a development build says `devel go1.N-...`.)
if [[ ! "$go_version" =~ go1\.([0-9]+) ]] || ((BASH_REMATCH[1] < 24)); then
    die "$go_bin is ${go_version:-older than go1.16}; the control plane needs go >= 1.24"
fi

mkdir -p "$cache_root/control-plane"

# Serialise concurrent builds (e.g. two test runs starting at once).
if command -v flock >/dev/null 2>&1; then
    exec 9>"$cache_root/control-plane/.build.lock"
    flock 9
    if [[ "$mode" == build ]] && built; then
        mark_used
        exit 0
    fi
    # Under the lock no other build is running: scratch directories left here
    # are from one that was killed (SIGKILL runs no EXIT trap).
    rm -rf "$cache_root/control-plane"/.build.*/
fi

tmp_dir="$(mktemp -d "$cache_root/control-plane/.build.XXXXXX")"
trap 'rm -rf "$tmp_dir"' EXIT

# gitMajor/gitMinor from v<major>.<minor>.<patch>
k8s_semver="${k8s_version#v}"
k8s_major="${k8s_semver%%.*}"
k8s_minor="${k8s_semver#*.}"
k8s_minor="${k8s_minor%%.*}"
build_date="1970-01-01T00:00:00Z" # fixed: keeps the binaries reproducible

k8s_ldflags="-s -w"
for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
    k8s_ldflags+=" -X $pkg.gitVersion=$k8s_version"
    k8s_ldflags+=" -X $pkg.gitMajor=$k8s_major"
    k8s_ldflags+=" -X $pkg.gitMinor=$k8s_minor"
    k8s_ldflags+=" -X $pkg.gitTreeState=clean"
    k8s_ldflags+=" -X $pkg.buildDate=$build_date"
done

export CGO_ENABLED=0
# -mod=readonly: build exactly what go.mod/go.sum pin; never rewrite them.
export GOFLAGS="-mod=readonly -buildvcs=false"

mapfile -t todo < <(wanted)

start=$SECONDS
echo "control-plane/build.sh: building ${todo[*]} (kubernetes $k8s_version, etcd $etcd_version) with $("$go_bin" version)" >&2
echo "control-plane/build.sh: output: $out_dir (a cold build takes 5-10 minutes on 2 cores)" >&2

cd "$here"
for bin in "${todo[@]}"; do
    case "$bin" in
        kube-apiserver | kubectl)
            pkg="k8s.io/kubernetes/cmd/$bin"
            ldflags="$k8s_ldflags"
            ;;
        etcd)
            pkg=go.etcd.io/etcd/server/v3
            ldflags="-s -w"
            ;;
        *) die "internal error: unknown binary $bin" ;;
    esac
    # Up to three tries: a cold build downloads hundreds of modules, and the
    # go command does not retry a proxy's transient error (a retry resumes
    # from the module and build caches).
    for attempt in 1 2 3; do
        "$go_bin" build -trimpath -ldflags="$ldflags" -o "$tmp_dir/$bin" "$pkg" && break
        [[ $attempt -lt 3 ]] || die "building $bin ($pkg) failed 3 times (see the go output above)"
        echo "control-plane/build.sh: building $bin failed (try $attempt of 3); again in 10 s" >&2
        sleep 10
    done
    echo "control-plane/build.sh: $bin built after $((SECONDS - start)) s" >&2
done

for bin in "${todo[@]}"; do
    case "$bin" in
        kubectl) "$tmp_dir/kubectl" version --client >/dev/null 2>&1 ;;
        *) "$tmp_dir/$bin" --version >/dev/null 2>&1 ;;
    esac || die "the built $bin does not run"
done

# Publish: each binary appears in $out_dir by an atomic rename, only once it
# has been built and run, so a binary in $out_dir is always complete.
mkdir -p "$out_dir"
chmod 755 "$out_dir"
for bin in "${todo[@]}"; do
    mv -f "$tmp_dir/$bin" "$out_dir/$bin"
done
echo "control-plane/build.sh: done in $((SECONDS - start)) s: $out_dir" >&2
# Each build is ~180 MB and a pin or recipe change makes a new one. The lock
# is still held (when flock exists), so no sibling is being built; one a
# checkout used within 30 days is kept, as that checkout would otherwise
# have to build it again. Best effort: a directory that cannot be removed
# (another user's) is left, and the build still succeeds.
stale_builds() {
    find "$cache_root/control-plane" -mindepth 1 -maxdepth 1 -type d \
        -name 'k8s-*-etcd-*' ! -path "$out_dir" -mtime +30 -print
}
while IFS= read -r stale; do
    echo "control-plane/build.sh: removing $stale (unused for more than 30 days)" >&2
    rm -rf -- "$stale" || echo "control-plane/build.sh: cannot remove $stale; left as it is" >&2
done < <(stale_builds)
# The first line of each version, read whole and not piped into head: a
# binary still writing when head has exited gets SIGPIPE, and under pipefail
# that failed this script after a good build (1 run in 5 for kubectl here).
first_line() { local text; text=$("$@" 2>&1); printf '%s\n' "${text%%$'\n'*}" >&2; }
first_line "$out_dir/kube-apiserver" --version
first_line "$out_dir/etcd" --version
first_line "$out_dir/kubectl" version --client
