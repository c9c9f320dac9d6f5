//! A certificate or key file that does not parse is refused with the file's
//! name and the kind of problem, and never with any of the file's content:
//! the reason is logged on every reload, and the content may be a private key.

use std::path::Path;

use image_rewriter::tls::{PemPair, TlsError};

const CERT: &str = include_str!("fixtures/tls/ec.crt");
const KEY: &str = include_str!("fixtures/tls/ec-pkcs8.key");

/// The key as it ends up when pasted into a Secret or a values file with
/// literal `\n` escapes: one line that starts like a BEGIN line but is not one.
fn escaped_one_line(pem: &str) -> String {
    pem.trim_end().replace('\n', "\\n") + "\\n"
}

fn refusal(cert: &str, key: &str) -> TlsError {
    let pair = PemPair {
        cert: cert.as_bytes().to_vec(),
        key: key.as_bytes().to_vec(),
    };
    let provider = rustls::crypto::ring::default_provider();
    match pair.certified_key(&provider, Path::new("tls.crt"), Path::new("tls.key")) {
        Ok(_) => panic!("a malformed pair was accepted"),
        Err(e) => e,
    }
}

/// Fails when `message` holds any 12 consecutive characters of the key's
/// base64 body, or its first bytes in the form `{:?}` prints a byte slice
/// (`[77, 73, ...]`), which is how the PEM parser's errors print a line.
fn assert_no_key_material(message: &str) {
    assert_no_material_of(KEY, message);
}

fn assert_no_material_of(key: &str, message: &str) {
    // The body's lines (a legacy encrypted key also has headers and a blank line).
    let body = key
        .lines()
        .filter(|line| !line.starts_with("-----") && !line.contains(':') && line.len() >= 12);
    for line in body {
        for window in line.as_bytes().windows(12) {
            let window = std::str::from_utf8(window).unwrap();
            assert!(
                !message.contains(window),
                "the key's body ({window}) is in the message: {message}"
            );
        }
        let as_list = format!("{:?}", &line.as_bytes()[..8]);
        let as_list = &as_list[1..as_list.len() - 1];
        assert!(
            !message.contains(as_list),
            "the key's body as a byte list ({as_list}) is in the message: {message}"
        );
    }
}

fn assert_says(error: &TlsError, file: &str, problem: &str) {
    let display = error.to_string();
    let debug = format!("{error:?}");
    assert_no_key_material(&display);
    assert_no_key_material(&debug);
    assert!(
        display.starts_with(&format!("{file}: ")),
        "does not name {file}: {display}"
    );
    assert!(
        display.contains(problem),
        "does not say {problem:?}: {display}"
    );
}

#[test]
fn a_key_with_escaped_newlines_is_refused_without_its_content() {
    let error = refusal(CERT, &escaped_one_line(KEY));
    assert_says(&error, "tls.key", "not a valid BEGIN line");
}

#[test]
fn a_combined_certificate_file_with_a_broken_key_is_refused_without_the_key() {
    let combined = format!("{CERT}{}", escaped_one_line(KEY));
    let error = refusal(&combined, KEY);
    assert_says(&error, "tls.crt", "not a valid BEGIN line");
}

#[test]
fn a_key_with_a_broken_body_is_refused_without_its_content() {
    // One character of the body replaced by one base64 does not have.
    let mut lines: Vec<String> = KEY.lines().map(str::to_owned).collect();
    lines[1].replace_range(10..11, "*");
    let broken = lines.join("\n") + "\n";
    let error = refusal(CERT, &broken);
    assert_says(&error, "tls.key", "invalid base64");
}

#[test]
fn a_key_without_its_end_line_is_refused_without_its_content() {
    let truncated: String = KEY
        .lines()
        .filter(|line| !line.starts_with("-----END"))
        .map(|line| format!("{line}\n"))
        .collect();
    let error = refusal(CERT, &truncated);
    assert_says(&error, "tls.key", "no END line");
}

#[test]
fn a_file_without_a_key_still_says_so() {
    let error = refusal(CERT, CERT);
    assert_says(&error, "tls.key", "no private key");
}

/// A passphrase-protected key, PKCS#8 (`BEGIN ENCRYPTED PRIVATE KEY`) or
/// OpenSSL's legacy form (`Proc-Type: 4,ENCRYPTED` headers in a `BEGIN EC
/// PRIVATE KEY` section): the key is there, and its base64 is valid, so
/// "no private key found" and "invalid base64" send the reader the wrong way.
#[test]
fn an_encrypted_key_is_refused_as_encrypted() {
    for encrypted in [
        include_str!("fixtures/tls/ec-pkcs8-encrypted.key"),
        include_str!("fixtures/tls/ec-sec1-encrypted.key"),
    ] {
        let error = refusal(CERT, encrypted);
        let display = error.to_string();
        assert_no_material_of(encrypted, &display);
        assert_no_material_of(encrypted, &format!("{error:?}"));
        assert_says(&error, "tls.key", "encrypted");
        assert!(!display.contains("no private key found"), "{display}");
        assert!(!display.contains("base64"), "{display}");
    }
}
