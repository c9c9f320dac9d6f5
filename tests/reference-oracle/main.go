// Command reference-oracle parses image references with the real
// github.com/distribution/reference (pinned in go.mod), for the differential
// test tests/reference_differential.rs.
//
// Input, on stdin: one JSON string a line (so that any string, newlines
// included, can be sent). Output, on stdout: one JSON object a line, in the
// same order:
//
//	{"parse": R, "normalized": R}
//
// where "parse" is reference.Parse and "normalized" is
// reference.ParseNormalizedNamed, and each R is either
//
//	{"error": NAME, "message": err.Error()}
//	{"string": ..., "domain": ..., "path": ..., "tag": ..., "digest": ...}
//
// NAME is the upstream error variable the error is (errors.Is), or, for the
// errors ParseNormalizedNamed builds with fmt.Errorf, one of
// "fmt:NameIsIdentifier" (a 64-hex string), "fmt:NameContainsUppercase" (its
// own lowercase check of the repository name) or "fmt:NoName"; "other" for
// anything else. "tag" and "digest" are null when absent; "domain" is ""
// when Parse found none.
//
// With the argument -unicode-version it prints the version of Go's Unicode
// tables instead (strings.ToLower's, which decide whether a name is
// uppercase) and exits.
package main

import (
	"bufio"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"strings"
	"unicode"

	// go-digest supports an algorithm only when its hash is linked into the
	// program. The binaries that pull images (kubelet, containerd, CRI-O)
	// link sha256, and sha384 and sha512 through crypto/tls: so does this.
	_ "crypto/sha256"
	_ "crypto/sha512"

	"github.com/distribution/reference"
	"github.com/opencontainers/go-digest"
)

type failure struct {
	Error   string `json:"error"`
	Message string `json:"message"`
}

type success struct {
	String string  `json:"string"`
	Domain string  `json:"domain"`
	Path   string  `json:"path"`
	Tag    *string `json:"tag"`
	Digest *string `json:"digest"`
}

type line struct {
	Parse      any `json:"parse"`
	Normalized any `json:"normalized"`
}

// Order matters only where two variables share a message: reference's own
// ErrDigestInvalidFormat is never returned by Parse, go-digest's is.
var sentinels = []struct {
	name string
	err  error
}{
	{"ErrNameEmpty", reference.ErrNameEmpty},
	{"ErrNameContainsUppercase", reference.ErrNameContainsUppercase},
	{"ErrNameTooLong", reference.ErrNameTooLong},
	{"ErrReferenceInvalidFormat", reference.ErrReferenceInvalidFormat},
	{"ErrTagInvalidFormat", reference.ErrTagInvalidFormat},
	{"ErrDigestInvalidFormat", reference.ErrDigestInvalidFormat},
	{"ErrNameNotCanonical", reference.ErrNameNotCanonical},
	{"digest.ErrDigestInvalidFormat", digest.ErrDigestInvalidFormat},
	{"digest.ErrDigestUnsupported", digest.ErrDigestUnsupported},
	{"digest.ErrDigestInvalidLength", digest.ErrDigestInvalidLength},
}

func errorName(err error) string {
	for _, s := range sentinels {
		if errors.Is(err, s.err) {
			return s.name
		}
	}
	message := err.Error()
	switch {
	case strings.HasPrefix(message, "invalid repository name (") &&
		strings.HasSuffix(message, "), cannot specify 64-byte hexadecimal strings"):
		return "fmt:NameIsIdentifier"
	case strings.HasPrefix(message, "invalid reference format: repository name (") &&
		strings.HasSuffix(message, ") must be lowercase"):
		return "fmt:NameContainsUppercase"
	case strings.HasPrefix(message, "reference ") && strings.HasSuffix(message, " has no name"):
		return "fmt:NoName"
	}
	return "other"
}

func describe(ref reference.Reference, err error) any {
	if err != nil {
		return failure{Error: errorName(err), Message: err.Error()}
	}
	r := success{String: ref.String()}
	named, ok := ref.(reference.Named)
	if !ok {
		// Parse returns a name whenever the grammar matched (the path is
		// never empty), so a bare digest reference would be news.
		return failure{Error: "other", Message: fmt.Sprintf("%q has no name", ref.String())}
	}
	r.Domain, r.Path = reference.Domain(named), reference.Path(named)
	if tagged, ok := ref.(reference.Tagged); ok {
		tag := tagged.Tag()
		r.Tag = &tag
	}
	if digested, ok := ref.(reference.Digested); ok {
		d := digested.Digest().String()
		r.Digest = &d
	}
	return r
}

func main() {
	if len(os.Args) == 2 && os.Args[1] == "-unicode-version" {
		fmt.Println(unicode.Version)
		return
	}
	in := bufio.NewScanner(os.Stdin)
	in.Buffer(make([]byte, 0, 1<<16), 1<<26)
	out := bufio.NewWriter(os.Stdout)
	encoder := json.NewEncoder(out)
	encoder.SetEscapeHTML(false)
	for number := 1; in.Scan(); number++ {
		var input string
		if err := json.Unmarshal(in.Bytes(), &input); err != nil {
			fmt.Fprintf(os.Stderr, "reference-oracle: line %d is not a JSON string: %v\n", number, err)
			os.Exit(2)
		}
		parsed, err := reference.Parse(input)
		normalized, normalizedErr := reference.ParseNormalizedNamed(input)
		if err := encoder.Encode(line{
			Parse:      describe(parsed, err),
			Normalized: describe(normalized, normalizedErr),
		}); err != nil {
			fmt.Fprintf(os.Stderr, "reference-oracle: %v\n", err)
			os.Exit(1)
		}
	}
	if err := in.Err(); err != nil {
		fmt.Fprintf(os.Stderr, "reference-oracle: reading stdin: %v\n", err)
		os.Exit(1)
	}
	if err := out.Flush(); err != nil {
		fmt.Fprintf(os.Stderr, "reference-oracle: %v\n", err)
		os.Exit(1)
	}
}
