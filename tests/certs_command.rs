//! `image-rewriter certs`: validity periods and names it refuses, the keys
//! it writes (read back by openssl), and the modes of the files that hold a
//! private key.

use std::path::Path;
use std::process::Output;

use base64::Engine as _;
use rustls::pki_types::pem::PemObject as _;

mod common;

/// `certs --out DIR` plus `args`.
fn certs(out: &Path, args: &[&str]) -> Output {
    common::binary()
        .arg("certs")
        .arg("--out")
        .arg(out)
        .args(args)
        .output()
        .expect("binary runs")
}

fn describe(output: &Output) -> String {
    format!(
        "exit {:?}\nstdout: {}\nstderr: {}",
        output.status.code(),
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

/// Exit 1 with a reason on stderr that names every one of `flags`, and
/// nothing written.
fn assert_refused(args: &[&str], flags: &[&str]) {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("certs");
    let output = certs(&out, args);
    assert_eq!(
        output.status.code(),
        Some(1),
        "{args:?}: {}",
        describe(&output)
    );
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.starts_with("image-rewriter: "), "{args:?}: {stderr}");
    for flag in flags {
        assert!(
            stderr.contains(flag),
            "{args:?}: does not name {flag}: {stderr}"
        );
    }
    assert!(!out.exists(), "{args:?}: wrote files although refused");
}

#[test]
fn a_validity_beyond_the_maximum_is_refused() {
    assert_refused(&["--validity-days", "4000000"], &["--validity-days"]);
    assert_refused(
        &["--validity-days", "365", "--ca-validity-days", "4000000"],
        &["--ca-validity-days"],
    );
    assert_refused(
        &["--validity-days", "36501", "--ca-validity-days", "36501"],
        &["--validity-days"],
    );
}

#[test]
fn a_validity_of_zero_days_is_refused() {
    assert_refused(&["--validity-days", "0"], &["--validity-days"]);
    assert_refused(&["--ca-validity-days", "0"], &["--ca-validity-days"]);
}

#[test]
fn a_serving_certificate_may_not_outlive_its_ca() {
    assert_refused(
        &["--validity-days", "400", "--ca-validity-days", "10"],
        &["--validity-days", "--ca-validity-days"],
    );
}

#[test]
fn the_limits_themselves_are_accepted() {
    for args in [
        ["--validity-days", "1", "--ca-validity-days", "1"],
        ["--validity-days", "36500", "--ca-validity-days", "36500"],
    ] {
        let dir = tempfile::tempdir().unwrap();
        let output = certs(dir.path(), &args);
        assert!(output.status.success(), "{args:?}: {}", describe(&output));
        assert!(dir.path().join("tls.crt").exists());
    }
}

#[cfg(unix)]
#[test]
fn files_with_a_private_key_are_private_even_when_they_existed() {
    use std::os::unix::fs::PermissionsExt as _;
    let dir = tempfile::tempdir().unwrap();
    let private = ["ca.key", "tls.key", "secret.yaml"];
    for name in private {
        let path = dir.path().join(name);
        // Longer than what replaces it, so a missing truncation shows.
        std::fs::write(&path, "an older run's key\n".repeat(1000)).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
    }
    // A `ca.key` with no `ca.crt` is half a CA: only --new-ca replaces it.
    let output = certs(dir.path(), &["--new-ca"]);
    assert!(output.status.success(), "{}", describe(&output));
    for name in private {
        let path = dir.path().join(name);
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "{name} has mode {mode:o}");
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(!text.contains("an older run's key"), "{name} not rewritten");
    }
    // The CA's key kept by a rotation is made private too.
    let ca_key = dir.path().join("ca.key");
    std::fs::set_permissions(&ca_key, std::fs::Permissions::from_mode(0o644)).unwrap();
    let output = certs(dir.path(), &[]);
    assert!(output.status.success(), "{}", describe(&output));
    assert!(String::from_utf8_lossy(&output.stdout).contains("kept the CA"));
    let mode = std::fs::metadata(&ca_key).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "a kept ca.key has mode {mode:o}");
}

#[test]
fn a_namespace_that_is_no_namespace_name_is_refused() {
    // An empty one would write a Secret with `namespace:` and names like
    // `image-rewriter..svc`.
    assert_refused(&["--namespace", ""], &["--namespace"]);
    assert_refused(&["--namespace", "Image-Rewriter"], &["--namespace"]);
}

#[test]
fn extra_names_no_client_could_match_are_refused() {
    for value in [
        "foo bar",
        "a_b.example",
        "*",
        "a.*.example",
        "-x.example",
        "x.",
    ] {
        assert_refused(&[&format!("--extra-san={value}")], &["--extra-san"]);
    }
    let dir = tempfile::tempdir().unwrap();
    for value in [
        "localhost",
        "10.0.0.5",
        "fd00::1",
        "*.webhooks.example",
        "Webhook.Example.com",
    ] {
        let output = certs(&dir.path().join(value), &["--extra-san", value]);
        assert!(output.status.success(), "{value}: {}", describe(&output));
    }
    // Empty entries name nothing (a variable set empty by a template).
    let out = dir.path().join("empty");
    let output = common::binary()
        .args(["certs", "--out"])
        .arg(&out)
        .env("IMAGE_REWRITER_EXTRA_SANS", "")
        .output()
        .unwrap();
    assert!(output.status.success(), "{}", describe(&output));
    let output = certs(
        &dir.path().join("commas"),
        &["--extra-san", "a.example,,b.example"],
    );
    assert!(output.status.success(), "{}", describe(&output));
    let cert = std::fs::read_to_string(dir.path().join("commas/tls.crt")).unwrap();
    let der = rustls::pki_types::CertificateDer::from_pem_slice(cert.as_bytes()).unwrap();
    let (_, leaf) = x509_parser::parse_x509_certificate(&der).unwrap();
    let names: Vec<String> = leaf
        .subject_alternative_name()
        .unwrap()
        .unwrap()
        .value
        .general_names
        .iter()
        .map(ToString::to_string)
        .collect();
    assert!(
        names.contains(&"DNSName(a.example)".to_owned()),
        "{names:?}"
    );
    assert!(
        names.contains(&"DNSName(b.example)".to_owned()),
        "{names:?}"
    );
    assert!(!names.contains(&"DNSName()".to_owned()), "{names:?}");
}

#[test]
fn service_and_secret_names_kubernetes_would_not_take_are_refused() {
    for (flag, value) in [
        ("--service", ""),
        ("--service", "Image_Rewriter"),
        ("--service", "1webhook"),
        ("--secret-name", ""),
        ("--secret-name", "tls/secret"),
    ] {
        assert_refused(&[flag, value], &[flag]);
    }
}

/// The last line `certs --out OUT` prints, run from `dir`.
fn next_step(dir: &Path, out: &Path) -> String {
    let output = common::binary()
        .current_dir(dir)
        .arg("certs")
        .arg("--out")
        .arg(out)
        .output()
        .unwrap();
    assert!(output.status.success(), "{}", describe(&output));
    let stdout = String::from_utf8(output.stdout).unwrap();
    stdout.lines().last().unwrap_or_default().to_owned()
}

/// The overlays read the repository's `certs/` and nothing else: the hint
/// to apply one is given only for that directory, and for any other the
/// files are to be copied there.
#[test]
fn the_next_step_names_the_overlay_only_when_it_reads_the_files_written() {
    let shipped = Path::new(env!("CARGO_MANIFEST_DIR")).join("manifests/overlays");
    for overlay in ["cluster-wide", "opt-in"] {
        let kustomization: serde_yaml_ng::Value = serde_yaml_ng::from_str(
            &std::fs::read_to_string(shipped.join(overlay).join("kustomization.yaml")).unwrap(),
        )
        .unwrap();
        let components = kustomization["components"].as_sequence().unwrap();
        assert!(
            components.iter().any(|c| c == "../../../certs"),
            "{overlay} no longer reads the repository's certs/: {components:?}"
        );
    }

    let scratch = tempfile::tempdir().unwrap();
    let repository = scratch.path().join("repository");
    let overlay = repository.join("manifests/overlays/cluster-wide");
    std::fs::create_dir_all(&overlay).unwrap();
    std::fs::write(overlay.join("kustomization.yaml"), "").unwrap();

    assert_eq!(
        next_step(&repository, Path::new("certs/")),
        "next: kubectl apply -k manifests/overlays/cluster-wide (or opt-in); it reads certs/"
    );
    let certs = repository.join("certs");
    assert_eq!(
        next_step(scratch.path(), &certs),
        format!(
            "next: kubectl apply -k {} (or opt-in); it reads {}",
            overlay.canonicalize().unwrap().display(),
            certs.display()
        )
    );
    for (dir, out) in [
        (repository.as_path(), Path::new("c8")),
        (repository.as_path(), Path::new("manifests/certs")),
        (scratch.path(), &scratch.path().join("elsewhere/certs")),
    ] {
        let next = next_step(dir, out);
        assert!(
            next.contains(&format!(
                "read the repository's certs/, not {}: copy secret.yaml and \
                 webhook-ca-bundle.yaml there",
                out.display()
            )) && !next.contains("it reads"),
            "--out {}: {next}",
            out.display()
        );
    }
}

/// `openssl args...`'s stdout; None (after saying so) without openssl.
fn openssl(args: &[&str], file: &Path) -> Option<String> {
    let output = match std::process::Command::new("openssl")
        .args(args)
        .arg(file)
        .output()
    {
        Ok(output) => output,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            common::skip_missing_tool(
                "openssl",
                "IMAGE_REWRITER_REQUIRE_OPENSSL",
                "keys not read back",
            );
            return None;
        }
        Err(e) => panic!("openssl: {e}"),
    };
    assert!(
        output.status.success(),
        "openssl {args:?} {}: {}",
        file.display(),
        describe(&output)
    );
    Some(String::from_utf8(output.stdout).expect("PEM is text"))
}

#[test]
fn openssl_reads_every_key_written_and_each_matches_its_certificate() {
    for key_type in ["ecdsa-p256", "ecdsa-p384", "ed25519"] {
        let dir = tempfile::tempdir().unwrap();
        let output = certs(dir.path(), &["--key-type", key_type]);
        assert!(output.status.success(), "{key_type}: {}", describe(&output));
        for (key, cert) in [("ca.key", "ca.crt"), ("tls.key", "tls.crt")] {
            let Some(from_key) = openssl(&["pkey", "-pubout", "-in"], &dir.path().join(key)) else {
                return;
            };
            let from_cert = openssl(
                &["x509", "-pubkey", "-noout", "-in"],
                &dir.path().join(cert),
            );
            assert_eq!(Some(from_key), from_cert, "{key_type}: {key} and {cert}");
        }
    }
}

/// The six files `certs` writes, by name, as they are now.
fn written_files(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let mut files: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|entry| {
            let entry = entry.unwrap();
            let name = entry.file_name().into_string().unwrap();
            (name, std::fs::read(entry.path()).unwrap())
        })
        .collect();
    files.sort();
    files
}

#[cfg(unix)]
#[test]
fn a_write_failing_midway_leaves_the_earlier_runs_files_as_they_were() {
    let dir = tempfile::tempdir().unwrap();
    let first = certs(dir.path(), &[]);
    assert!(first.status.success(), "{}", describe(&first));
    let before = written_files(dir.path());
    assert_eq!(
        before.len(),
        6,
        "{:?}",
        before.iter().map(|f| &f.0).collect::<Vec<_>>()
    );

    // A disk that fills midway: no file may grow past 1 KiB, so the keys and
    // certificates fit and the Secret manifest (~2.5 KB) does not. With
    // SIGXFSZ ignored, the write fails with EFBIG instead of killing it.
    let mut full_disk = std::process::Command::new("sh");
    full_disk
        .arg("-c")
        .arg(r#"trap '' XFSZ; ulimit -f 2; exec "$0" "$@""#)
        .arg(common::binary().get_program())
        .args(["certs", "--out"])
        .arg(dir.path());
    for (key, _) in std::env::vars_os() {
        if key.to_string_lossy().starts_with("IMAGE_REWRITER_") {
            full_disk.env_remove(key);
        }
    }
    let output = full_disk.output().unwrap();
    assert_eq!(output.status.code(), Some(1), "{}", describe(&output));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("secret.yaml"), "{stderr}");
    let after = written_files(dir.path());
    assert!(
        after == before,
        "files changed or left behind: {:?}",
        after.iter().map(|f| &f.0).collect::<Vec<_>>()
    );
}

#[test]
fn a_directory_in_a_files_place_is_named_before_anything_is_written() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("secret.yaml")).unwrap();
    let output = certs(dir.path(), &[]);
    assert_eq!(output.status.code(), Some(1), "{}", describe(&output));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("secret.yaml: is a directory"), "{stderr}");
    let left: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|entry| entry.unwrap().file_name())
        .collect();
    assert_eq!(left, ["secret.yaml"]);
}

/// Whether the apiserver, trusting the caBundle written in `dir`, would
/// accept the serving certificate `leaf` (PEM) for the webhook Service's
/// name (webpki, as rustls checks a server).
fn trusted_by_ca_bundle(dir: &Path, leaf: &[u8]) -> Result<(), rustls::Error> {
    use rustls::client::danger::ServerCertVerifier as _;
    use rustls::pki_types::{CertificateDer, ServerName, UnixTime};

    let patch = String::from_utf8(file(dir, "webhook-ca-bundle.yaml")).unwrap();
    let encoded = patch.rsplit_once("value: ").unwrap().1.trim();
    let ca_bundle = base64::engine::general_purpose::STANDARD
        .decode(encoded)
        .unwrap();
    assert_eq!(ca_bundle, file(dir, "ca.crt"), "the caBundle is ca.crt");
    let mut roots = rustls::RootCertStore::empty();
    for ca in CertificateDer::pem_slice_iter(&ca_bundle) {
        roots.add(ca.unwrap()).unwrap();
    }
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let verifier =
        rustls::client::WebPkiServerVerifier::builder_with_provider(roots.into(), provider)
            .build()
            .unwrap();
    let leaf = CertificateDer::from_pem_slice(leaf).unwrap();
    let name = ServerName::try_from("image-rewriter.image-rewriter.svc").unwrap();
    verifier
        .verify_server_cert(&leaf, &[], &name, &[], UnixTime::now())
        .map(|_| ())
}

fn file(dir: &Path, name: &str) -> Vec<u8> {
    std::fs::read(dir.join(name)).unwrap()
}

/// A rotation (the command run again) signs a new serving certificate with
/// the CA the first run made, so the caBundle the cluster trusts stays as
/// it is: no window in which the apiserver trusts a CA the pods do not
/// serve yet. `--new-ca` replaces it, and says so.
#[test]
fn running_again_renews_the_serving_certificate_under_the_same_ca() {
    let dir = tempfile::tempdir().unwrap();
    let first = certs(dir.path(), &["--key-type", "ed25519"]);
    assert!(first.status.success(), "{}", describe(&first));
    assert!(
        String::from_utf8_lossy(&first.stdout).contains("made a new CA"),
        "{}",
        describe(&first)
    );
    let before = written_files(dir.path());

    // Another key type for the serving key: the CA keeps its own.
    let second = certs(dir.path(), &["--key-type", "ecdsa-p384"]);
    assert!(second.status.success(), "{}", describe(&second));
    let stdout = String::from_utf8_lossy(&second.stdout);
    assert!(stdout.contains("kept the CA in"), "{stdout}");
    assert!(stdout.contains("caBundle is unchanged"), "{stdout}");
    let after = written_files(dir.path());
    for (name, unchanged) in [
        ("ca.crt", true),
        ("ca.key", true),
        ("webhook-ca-bundle.yaml", true),
        ("tls.crt", false),
        ("tls.key", false),
        ("secret.yaml", false),
    ] {
        let was = &before.iter().find(|f| f.0 == name).unwrap().1;
        let is = &after.iter().find(|f| f.0 == name).unwrap().1;
        assert_eq!(
            was == is,
            unchanged,
            "{name}: unchanged expected {unchanged}"
        );
    }
    let served = file(dir.path(), "tls.crt");
    trusted_by_ca_bundle(dir.path(), &served).expect("the renewed certificate, under the kept CA");

    // A new CA: the caBundle trusts it, and the CA it replaces too, so the
    // pods still serving the certificate above are not refused meanwhile.
    let replaced = certs(dir.path(), &["--new-ca"]);
    assert!(replaced.status.success(), "{}", describe(&replaced));
    let stdout = String::from_utf8_lossy(&replaced.stdout);
    assert!(stdout.contains("made a new CA"), "{stdout}");
    assert!(stdout.contains("also hold the CA it replaces"), "{stdout}");
    let old_ca = String::from_utf8(before[0].1.clone()).unwrap();
    let ca_file = String::from_utf8(file(dir.path(), "ca.crt")).unwrap();
    assert!(!ca_file.starts_with(&old_ca), "--new-ca kept the CA first");
    assert!(
        ca_file.ends_with(&old_ca),
        "the replaced CA is not kept after the new one"
    );
    trusted_by_ca_bundle(dir.path(), &file(dir.path(), "tls.crt")).expect("under the new CA");
    trusted_by_ca_bundle(dir.path(), &served).expect("the previous certificate, still trusted");

    // The next rotation signs with the new CA and keeps both.
    let renewed = certs(dir.path(), &[]);
    assert!(renewed.status.success(), "{}", describe(&renewed));
    assert_eq!(file(dir.path(), "ca.crt"), ca_file.as_bytes());
    trusted_by_ca_bundle(dir.path(), &file(dir.path(), "tls.crt")).expect("renewed under it");

    // Another new CA: the one it replaces is kept, the one before it (its
    // key may have leaked) is trusted no longer.
    let replaced_tls = file(dir.path(), "tls.crt");
    let again = certs(dir.path(), &["--new-ca"]);
    assert!(again.status.success(), "{}", describe(&again));
    let ca_file = String::from_utf8(file(dir.path(), "ca.crt")).unwrap();
    assert_eq!(ca_file.matches("BEGIN CERTIFICATE").count(), 2, "{ca_file}");
    trusted_by_ca_bundle(dir.path(), &replaced_tls).expect("the replaced CA's, still trusted");
    trusted_by_ca_bundle(dir.path(), &file(dir.path(), "tls.crt")).expect("under the newest CA");
    assert!(
        trusted_by_ca_bundle(dir.path(), &served).is_err(),
        "the first CA, replaced twice, is still trusted"
    );
}

/// A case of an unusable CA: its name, the arguments of the run that finds
/// it, what spoils the CA a first run wrote (given that run's directory and
/// another run's), and what the refusal must say.
type SpoiledCa = (
    &'static str,
    &'static [&'static str],
    fn(&Path, &Path),
    &'static [&'static str],
);

/// A CA that cannot sign is never replaced behind the user's back (the
/// cluster trusts it): half of it missing, a key that is not its own, a
/// certificate that is no CA, or one that expires before the new serving
/// certificate would. Each is refused with what to do, and nothing is
/// written.
#[test]
fn a_ca_that_cannot_sign_is_refused_and_nothing_written() {
    let other = tempfile::tempdir().unwrap();
    assert!(certs(other.path(), &[]).status.success());
    let cases: [SpoiledCa; 5] = [
        (
            "ca.key missing",
            &[],
            |dir, _| std::fs::remove_file(dir.join("ca.key")).unwrap(),
            &["ca.crt exists but", "ca.key does not", "--new-ca"],
        ),
        (
            "ca.crt missing",
            &[],
            |dir, _| std::fs::remove_file(dir.join("ca.crt")).unwrap(),
            &["ca.key exists but", "ca.crt does not", "--new-ca"],
        ),
        (
            "another CA's key",
            &[],
            |dir, other| {
                std::fs::copy(other.join("ca.key"), dir.join("ca.key"))
                    .map(drop)
                    .unwrap()
            },
            &["is not this certificate's key", "--new-ca"],
        ),
        (
            "a serving certificate as the CA",
            &[],
            |dir, _| {
                std::fs::copy(dir.join("tls.crt"), dir.join("ca.crt")).unwrap();
                std::fs::copy(dir.join("tls.key"), dir.join("ca.key")).unwrap();
            },
            &["not a CA certificate", "--new-ca"],
        ),
        (
            "a CA that expires first",
            &["--validity-days", "11"],
            |_, _| {},
            &["expires", "--validity-days 11", "--new-ca"],
        ),
    ];
    for (case, args, spoil, named) in cases {
        let dir = tempfile::tempdir().unwrap();
        let first = certs(
            dir.path(),
            &["--ca-validity-days", "10", "--validity-days", "10"],
        );
        assert!(first.status.success(), "{case}: {}", describe(&first));
        spoil(dir.path(), other.path());
        let before = written_files(dir.path());
        let output = certs(dir.path(), args);
        assert_eq!(
            output.status.code(),
            Some(1),
            "{case}: {}",
            describe(&output)
        );
        let stderr = String::from_utf8_lossy(&output.stderr);
        for text in named {
            assert!(
                stderr.contains(text),
                "{case}: does not say {text:?}: {stderr}"
            );
        }
        assert!(written_files(dir.path()) == before, "{case}: files changed");
        let replaced = certs(dir.path(), &[&["--new-ca"], args].concat());
        assert!(
            replaced.status.success(),
            "{case}, --new-ca: {}",
            describe(&replaced)
        );
    }
}

/// A CA openssl made (`subject` and `key_usage` as given), written to a new
/// directory as `ca.crt` and `ca.key`; None without openssl.
fn openssl_ca(subject: &str, key_usage: &str) -> Option<tempfile::TempDir> {
    let dir = tempfile::tempdir().unwrap();
    let made = std::process::Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
        ])
        .args(["-nodes", "-days", "30", "-subj", subject])
        .args(["-addext", "basicConstraints=critical,CA:TRUE"])
        .args(["-addext", &format!("keyUsage=critical,{key_usage}")])
        .arg("-keyout")
        .arg(dir.path().join("ca.key"))
        .arg("-out")
        .arg(dir.path().join("ca.crt"))
        .output();
    match made {
        Ok(output) => assert!(output.status.success(), "openssl: {}", describe(&output)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            common::skip_missing_tool(
                "openssl",
                "IMAGE_REWRITER_REQUIRE_OPENSSL",
                "CAs made elsewhere not tried",
            );
            return None;
        }
        Err(e) => panic!("openssl: {e}"),
    }
    Some(dir)
}

/// A CA made elsewhere (openssl) is kept when the certificates it signs
/// are trusted under it, and refused, with nothing written, when they
/// would not be: a subject with repeated attributes, which the signer
/// cannot name back as written, or a keyUsage without keyCertSign. Never
/// a certificate the apiserver would refuse beside "caBundle unchanged".
#[test]
fn a_ca_made_elsewhere_is_kept_only_when_what_it_signs_is_trusted() {
    let Some(plain) = openssl_ca("/O=Corp/CN=Corp CA", "keyCertSign,cRLSign") else {
        return;
    };
    let output = certs(plain.path(), &["--validity-days", "10"]);
    assert!(output.status.success(), "{}", describe(&output));
    assert!(String::from_utf8_lossy(&output.stdout).contains("kept the CA"));
    trusted_by_ca_bundle(plain.path(), &file(plain.path(), "tls.crt"))
        .expect("signed by the CA openssl made");

    for (subject, key_usage, says) in [
        (
            "/DC=example/DC=corp/OU=Platform/OU=Security/CN=Corp CA",
            "keyCertSign,cRLSign",
            "not trusted under it",
        ),
        ("/CN=Corp CA", "digitalSignature", "keyCertSign"),
    ] {
        let dir = openssl_ca(subject, key_usage).unwrap();
        let output = certs(dir.path(), &["--validity-days", "10"]);
        assert_eq!(
            output.status.code(),
            Some(1),
            "{subject}: {}",
            describe(&output)
        );
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(
            stderr.contains(says) && stderr.contains("--new-ca"),
            "{subject}: {stderr}"
        );
        assert!(
            !dir.path().join("tls.crt").exists(),
            "{subject}: wrote files"
        );
    }
}
