// The oracle of tests/reference_differential.rs: the real
// distribution/reference, pinned, parsing what the test sends. See main.go.
module image-rewriter/tests/reference-oracle

go 1.24.0

require github.com/distribution/reference v0.6.0

require github.com/opencontainers/go-digest v1.0.0
