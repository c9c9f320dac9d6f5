#!/usr/bin/env bash
# Builds the test control plane -- kube-apiserver (k8s.io/kubernetes) and etcd
# (go.etcd.io/etcd/server/v3) -- from the Go modules pinned in go.mod/go.sum
# next to this script, into a cache directory keyed by their versions:
#
#   ${IMAGE_REWRITER_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/image-rewriter}/control-plane/k8s-<ver>-etcd-<ver>/{kube-apiserver,etcd}
#
# Usage:
#   tests/control-plane/build.sh               build if missing (no-op when already built)
#   tests/control-plane/build.sh --print-dir   print the directory; exit 1 if not built
#   tests/control-plane/build.sh --rebuild     build again even if present
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
out_dir="$cache_root/control-plane/k8s-${k8s_version}-etcd-${etcd_version}"

built() {
    [[ -x "$out_dir/kube-apiserver" && -x "$out_dir/etcd" ]]
}

mode=build
case "${1:-}" in
    "") ;;
    --print-dir) mode=print ;;
    --rebuild) mode=rebuild ;;
    -h | --help)
        sed -n '2,15p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'
        exit 0
        ;;
    *) die "unknown argument '$1' (try --help)" ;;
esac

if [[ "$mode" == print ]]; then
    if built; then
        printf '%s\n' "$out_dir"
        exit 0
    fi
    echo "control-plane/build.sh: kube-apiserver/etcd are not built in $out_dir;" \
        "run tests/control-plane/build.sh first (cold build takes 5-10 minutes on 2 cores)" >&2
    exit 1
fi

if [[ "$mode" == build ]] && built; then
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
"$go_bin" version >/dev/null 2>&1 || die "'$go_bin version' failed; is Go installed correctly?"

mkdir -p "$cache_root/control-plane"

# Serialise concurrent builds (e.g. two test runs starting at once).
if command -v flock >/dev/null 2>&1; then
    exec 9>"$cache_root/control-plane/.build.lock"
    flock 9
    if [[ "$mode" == build ]] && built; then
        exit 0
    fi
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

start=$SECONDS
echo "control-plane/build.sh: building kube-apiserver $k8s_version and etcd $etcd_version with $("$go_bin" version)" >&2
echo "control-plane/build.sh: output: $out_dir (a cold build takes 5-10 minutes on 2 cores)" >&2

cd "$here"
"$go_bin" build -trimpath -ldflags="$k8s_ldflags" -o "$tmp_dir/kube-apiserver" \
    k8s.io/kubernetes/cmd/kube-apiserver ||
    die "building kube-apiserver $k8s_version failed (see the go output above)"
echo "control-plane/build.sh: kube-apiserver built after $((SECONDS - start)) s" >&2

"$go_bin" build -trimpath -ldflags="-s -w" -o "$tmp_dir/etcd" go.etcd.io/etcd/server/v3 ||
    die "building etcd $etcd_version failed (see the go output above)"
echo "control-plane/build.sh: etcd built after $((SECONDS - start)) s" >&2

"$tmp_dir/kube-apiserver" --version >/dev/null 2>&1 || die "the built kube-apiserver does not run"
"$tmp_dir/etcd" --version >/dev/null 2>&1 || die "the built etcd does not run"

# Publish atomically: the directory either holds both binaries or does not exist.
rm -rf "$out_dir"
mv "$tmp_dir" "$out_dir"
chmod 755 "$out_dir"
trap - EXIT
echo "control-plane/build.sh: done in $((SECONDS - start)) s: $out_dir" >&2
"$out_dir/kube-apiserver" --version >&2
"$out_dir/etcd" --version | head -n 1 >&2
