# syntax=docker/dockerfile:1
#
# image-rewriter container image.
#
#   docker build -t image-rewriter:dev .
#   docker build --build-arg RUST_VERSION=1.95 --build-arg VERSION=0.1.0 \
#                --build-arg REVISION="$(git rev-parse HEAD)" -t image-rewriter:0.1.0 .
#
# The binary is static, glibc linked in (`+crt-static`), and runs on
# distroless/static: CA certificates, /etc/nsswitch.conf and a passwd entry for
# uid 65532; no libc, no shell, no package manager. glibc, not musl: musl's
# memcpy made a review cost ~20% more CPU, where the static glibc build costs
# what the dynamic one the benchmarks measure does (BENCHMARKS.md). Of glibc's
# name services it has only the built-in `files` and `dns`, and can load no
# other: they serve distroless's `hosts: files dns` (/etc/hosts, then DNS),
# while its `passwd: compat` finds no user. The server looks up none: kube's
# search for a kubeconfig asks for the user's home only when HOME is unset
# (container runtimes set it), and goes on to the in-cluster config if that
# finds nothing. scripts/image-build-check.py checks that the binary is static
# and runs it chrooted into such a root. The manifests run it as uid 65532 with a read-only root
# filesystem; it writes nothing to disk.

# Rust toolchain of the build stage (edition 2024 needs 1.85 or later).
ARG RUST_VERSION=1.95
# The LLVM major version of that rustc (`rustc -vV`; 1.95's is 22): the
# profile-guided build merges its profiles with Debian's llvm-profdata of that
# version, and scripts/pgo-build.sh refuses another. Change the two together.
ARG LLVM_VERSION=22
# The build image's Debian release; the static binary runs on any runtime.
ARG DEBIAN_SUITE=bookworm

# Native builds: amd64 on amd64 hosts, arm64 on arm64 hosts (or under emulation
# with `docker buildx build --platform linux/arm64`). The slim image has the C
# compiler that ring and mimalloc need.
FROM docker.io/library/rust:${RUST_VERSION}-slim-${DEBIAN_SUITE} AS build
SHELL ["/bin/bash", "-o", "pipefail", "-c"]

# Keep symbol names (panic backtraces), drop debug info. Static: with RUSTFLAGS,
# every cargo build names its --target (the build's own platform), so that the
# flag reaches the binary only, not the proc-macros and build scripts, which
# cannot be static.
ENV CARGO_PROFILE_RELEASE_STRIP=debuginfo \
    CARGO_TERM_COLOR=never \
    RUSTFLAGS="-C target-feature=+crt-static"
WORKDIR /src

# llvm-profdata, which merges the profiles of the profile-guided build below
# (bookworm has LLVM 22 in bookworm-security). Not pinned further: the major
# version is what must match, and Debian replaces the revision with each
# security update.
ARG LLVM_VERSION
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends "llvm-${LLVM_VERSION}" \
 && rm -rf /var/lib/apt/lists/*

# Dependencies first, against stand-in sources: this layer is rebuilt only when
# Cargo.toml, Cargo.lock or the build script change, not on every source edit.
# It builds the profiling build's dependencies (those of the profile-guided
# build depend on the profile, so are built with it). Cargo refuses a manifest
# whose declared [[bench]]/[[example]]/[[test]] files are missing, so those get
# empty stand-ins too, as does the load benchmark the profiling build builds.
COPY Cargo.toml Cargo.lock ./
COPY scripts/pgo-build.sh scripts/
RUN mkdir -p src examples \
 && echo 'fn main() {}' > src/main.rs \
 && touch src/lib.rs \
 && echo 'fn main() {}' > examples/loadbench.rs \
 && awk ' \
      function flush() { \
        if (kind != "" && path != "") print path; \
        else if (kind != "" && kind != "bin" && name != "") print dir[kind] "/" name ".rs"; \
        kind = ""; name = ""; path = "" \
      } \
      BEGIN { dir["bench"] = "benches"; dir["example"] = "examples"; dir["test"] = "tests" } \
      /^[[:space:]]*\[/ { flush() } \
      /^[[:space:]]*\[\[(bin|bench|example|test)\]\]/ { kind = $0; gsub(/[^a-z]/, "", kind) } \
      kind != "" && /^[[:space:]]*name[[:space:]]*=/ { name = $0; sub(/^[^"]*"/, "", name); sub(/".*/, "", name) } \
      kind != "" && /^[[:space:]]*path[[:space:]]*=/ { path = $0; sub(/^[^"]*"/, "", path); sub(/".*/, "", path) } \
      END { flush() }' Cargo.toml \
    | while read -r stub; do \
        mkdir -p "$(dirname "$stub")" && { [ -e "$stub" ] || echo 'fn main() {}' > "$stub"; }; \
      done \
 && scripts/pgo-build.sh --dependencies-only \
 && rm -rf src

# The real sources: the whole (.dockerignore-trimmed) context, since the crate
# may include files from outside src/ (include_str!), and the load benchmark,
# which trains the profile. COPY keeps the files' modification times, which may
# be older than the stand-in build above: touch the crate roots so cargo
# rebuilds them instead of using the stand-ins (the --help check at the end
# would catch a stand-in server, which prints nothing; pgo-build.sh a stand-in
# trainer, whose profile would hold no review).
#
# The binary is profile-guided: pgo-build.sh builds it with -Cprofile-generate,
# runs the load benchmark against it (HTTP/1.1, HTTP/2, new TLS connections;
# about a minute), then builds it again with the profile. A review costs about
# 20% less CPU than in a plain release build (BENCHMARKS.md).
COPY . .
RUN touch src/main.rs examples/loadbench.rs \
 && if [ -f src/lib.rs ]; then touch src/lib.rs; fi \
 && scripts/pgo-build.sh /out \
 && /out/image-rewriter --help | grep -q serve

FROM gcr.io/distroless/static-debian12:nonroot

ARG VERSION=0.1.0
ARG REVISION=unknown
# Where the sources live; pass your repository's URL with --build-arg.
ARG SOURCE_URL=https://example.invalid/image-rewriter
LABEL org.opencontainers.image.title="image-rewriter" \
      org.opencontainers.image.description="Kubernetes mutating admission webhook that rewrites container images to a private registry" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.source="${SOURCE_URL}" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}"

COPY --from=build /out/image-rewriter /image-rewriter

# mimalloc (the server's allocator) then disables transparent huge pages for
# the process before its first mapping: on nodes where THP is "always" they
# took peak RSS from ~16 to ~27 MiB.
ENV MIMALLOC_ALLOW_THP=0

# distroless's "nonroot"; numeric so that runAsNonRoot can verify it.
USER 65532:65532

# 8443: HTTPS (/mutate, /healthz, /readyz). 9090: plain HTTP /metrics.
EXPOSE 8443 9090

ENTRYPOINT ["/image-rewriter"]
# The paths the manifests mount the ConfigMap and the TLS Secret at.
CMD ["serve", "--config", "/etc/image-rewriter/config/config.yaml", "--tls-cert", "/etc/image-rewriter/tls/tls.crt", "--tls-key", "/etc/image-rewriter/tls/tls.key"]
