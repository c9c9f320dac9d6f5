//! A CA and a serving certificate for the webhook Service, and the files a
//! platform team applies: the TLS Secret and the webhook's `caBundle` patch.

use std::path::{Path, PathBuf};

use base64::Engine as _;
use clap::ValueEnum;
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SignatureAlgorithm,
};
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject as _;
use time::{Duration, OffsetDateTime};

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum KeyType {
    EcdsaP256,
    EcdsaP384,
    Ed25519,
}

impl KeyType {
    fn algorithm(self) -> &'static SignatureAlgorithm {
        match self {
            Self::EcdsaP256 => &rcgen::PKCS_ECDSA_P256_SHA256,
            Self::EcdsaP384 => &rcgen::PKCS_ECDSA_P384_SHA384,
            Self::Ed25519 => &rcgen::PKCS_ED25519,
        }
    }
}

/// The longest validity issued, for the CA or the serving certificate:
/// 100 years. More is a typo, and would take `notAfter` out of the range
/// the date arithmetic can hold.
pub const MAX_VALIDITY_DAYS: u32 = 36_500;

/// What to issue.
#[derive(Debug, Clone)]
pub struct CertRequest {
    /// DNS names and IP addresses of the serving certificate.
    pub subject_alt_names: Vec<String>,
    pub key_type: KeyType,
    /// `--validity-days`: 1 to [`MAX_VALIDITY_DAYS`], at most the CA's.
    pub validity_days: u32,
    /// `--ca-validity-days`: 1 to [`MAX_VALIDITY_DAYS`].
    pub ca_validity_days: u32,
}

impl CertRequest {
    /// Refuses a certificate expired when written, one too far in the
    /// future, and a serving certificate that outlives the CA that signs it
    /// (clients would stop trusting it before it expires).
    pub fn check_validity(&self) -> Result<(), CertsError> {
        check_days("--validity-days", self.validity_days)?;
        check_days("--ca-validity-days", self.ca_validity_days)?;
        if self.validity_days > self.ca_validity_days {
            return Err(CertsError::OutlivesCa {
                days: self.validity_days,
                ca_days: self.ca_validity_days,
            });
        }
        Ok(())
    }
}

fn check_days(flag: &'static str, days: u32) -> Result<(), CertsError> {
    if days == 0 {
        Err(CertsError::NoValidity { flag })
    } else if days > MAX_VALIDITY_DAYS {
        Err(CertsError::ValidityTooLong { flag, days })
    } else {
        Ok(())
    }
}

/// PEM text of a CA and a serving certificate it signed.
pub struct CertBundle {
    pub ca_cert: String,
    pub ca_key: String,
    pub cert: String,
    pub key: String,
}

#[derive(Debug, thiserror::Error)]
pub enum CertsError {
    /// In the message, so not a `source` (the error chain would repeat it).
    #[error("certificate generation failed: {0}")]
    Generate(rcgen::Error),
    #[error(
        "{flag} 0: must be at least 1 (a certificate valid for 0 days has expired when written)"
    )]
    NoValidity { flag: &'static str },
    #[error("{flag} {days}: must be at most {MAX_VALIDITY_DAYS} (100 years)")]
    ValidityTooLong { flag: &'static str, days: u32 },
    #[error(
        "--validity-days {days} is more than --ca-validity-days {ca_days}: \
         the serving certificate would outlive the CA that signs it"
    )]
    OutlivesCa { days: u32, ca_days: u32 },
    #[error("{days} days from now is beyond the dates a certificate can hold")]
    OutOfRange { days: u32 },
    #[error(
        "{found} exists but {missing} does not, so that CA cannot sign: put {missing} back, \
         or pass --new-ca to replace the CA (the webhook's caBundle changes with it)"
    )]
    CaHalf { found: String, missing: String },
    #[error(
        "cannot sign with the CA in {path}: {reason}; fix it, or pass --new-ca to replace the \
         CA (the webhook's caBundle changes with it)"
    )]
    CaUnusable { path: String, reason: String },
    #[error(
        "the CA in {path} expires {expires}, before a serving certificate of --validity-days \
         {days} would: pass a smaller --validity-days, or --new-ca to replace the CA (the \
         webhook's caBundle changes with it)"
    )]
    CaExpiresFirst {
        path: String,
        expires: String,
        days: u32,
    },
    #[error(
        "the CA in {path} expired {expired}: pass --new-ca to replace it (the webhook's \
         caBundle changes with it)"
    )]
    CaExpired { path: String, expired: String },
    #[error("cannot write {path}: {reason}")]
    Write {
        path: String,
        /// In the message, so not a `source` (the error chain would repeat it).
        reason: std::io::Error,
    },
}

impl From<rcgen::Error> for CertsError {
    fn from(error: rcgen::Error) -> Self {
        Self::Generate(error)
    }
}

/// The names the apiserver may use for `service` in `namespace`.
pub fn service_dns_names(service: &str, namespace: &str) -> Vec<String> {
    vec![
        service.to_owned(),
        format!("{service}.{namespace}"),
        format!("{service}.{namespace}.svc"),
        format!("{service}.{namespace}.svc.cluster.local"),
    ]
}

/// A new CA, and a serving certificate it signs.
pub fn generate(request: &CertRequest) -> Result<CertBundle, CertsError> {
    request.check_validity()?;
    let dates = Dates::now();
    let ca_key = generate_key(request.key_type)?;
    let mut ca_params = CertificateParams::default();
    ca_params.distinguished_name = distinguished_name("image-rewriter CA");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    ca_params.not_before = dates.not_before;
    ca_params.not_after = dates.days_from_now(request.ca_validity_days)?;
    let ca_cert = ca_params.self_signed(&ca_key)?;
    let issuer = Issuer::new(ca_params, &ca_key);
    let (cert, key) = serving_certificate(request, &issuer, &dates)?;
    Ok(CertBundle {
        ca_cert: ca_cert.pem(),
        ca_key: ca_key.serialize_pem(),
        cert,
        key,
    })
}

/// A new serving certificate signed by a CA an earlier run wrote, which is
/// kept as it is: the webhook's `caBundle` already trusts it, so a rotation
/// has no moment where the apiserver trusts a CA the pods do not serve yet.
/// `--ca-validity-days` is not used; the CA must outlive the certificate.
pub fn renew(request: &CertRequest, ca: &ExistingCa) -> Result<CertBundle, CertsError> {
    check_days("--validity-days", request.validity_days)?;
    let dates = Dates::now();
    let not_after = dates.days_from_now(request.validity_days)?;
    let path = ca.cert_path.display().to_string();
    if ca.not_after <= dates.now {
        return Err(CertsError::CaExpired {
            path,
            expired: ca.not_after.date().to_string(),
        });
    }
    if ca.not_after < not_after {
        return Err(CertsError::CaExpiresFirst {
            path,
            expires: ca.not_after.date().to_string(),
            days: request.validity_days,
        });
    }
    let (cert, key) = serving_certificate(request, &ca.issuer, &dates)?;
    // What the apiserver will check, checked here: a CA this tool did not
    // make may name itself in a form rcgen writes back differently, or
    // carry extensions a verifier refuses; then no certificate it signs
    // would be trusted, and the run must not say the caBundle still works.
    trusted_under(&ca.der, &cert, &request.subject_alt_names).map_err(|reason| {
        CertsError::CaUnusable {
            path,
            reason: format!("a certificate it signs is not trusted under it ({reason})"),
        }
    })?;
    Ok(CertBundle {
        ca_cert: ca.cert_pem.clone(),
        ca_key: ca.key_pem.clone(),
        cert,
        key,
    })
}

/// Whether a client trusting `ca` alone accepts `cert` (PEM) for the first
/// of `names` a client can ask for, as rustls (webpki) verifies a server.
fn trusted_under(ca: &CertificateDer<'static>, cert: &str, names: &[String]) -> Result<(), String> {
    use rustls::client::danger::ServerCertVerifier as _;
    use rustls::pki_types::{ServerName, UnixTime};

    let mut roots = rustls::RootCertStore::empty();
    roots.add(ca.clone()).map_err(|error| error.to_string())?;
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let verifier =
        rustls::client::WebPkiServerVerifier::builder_with_provider(roots.into(), provider)
            .build()
            .map_err(|error| error.to_string())?;
    let leaf =
        CertificateDer::from_pem_slice(cert.as_bytes()).map_err(|error| format!("{error:?}"))?;
    let Some(name) = names
        .iter()
        .find_map(|name| ServerName::try_from(name.clone()).ok())
    else {
        // No name a client could ask for (wildcards only): nothing to check.
        return Ok(());
    };
    verifier
        .verify_server_cert(&leaf, &[], &name, &[], UnixTime::now())
        .map(|_| ())
        .map_err(|error| error.to_string())
}

/// When certificates issued now start and end.
struct Dates {
    now: OffsetDateTime,
    /// A little before now, for clocks that are behind ours.
    not_before: OffsetDateTime,
}

impl Dates {
    fn now() -> Self {
        let now = OffsetDateTime::now_utc();
        Self {
            now,
            not_before: now - Duration::minutes(5),
        }
    }

    fn days_from_now(&self, days: u32) -> Result<OffsetDateTime, CertsError> {
        self.now
            .checked_add(Duration::days(i64::from(days)))
            .ok_or(CertsError::OutOfRange { days })
    }
}

/// The serving certificate and its key, as PEM, signed by `issuer`.
fn serving_certificate(
    request: &CertRequest,
    issuer: &Issuer<'_, impl rcgen::SigningKey>,
    dates: &Dates,
) -> Result<(String, String), CertsError> {
    let key = generate_key(request.key_type)?;
    let mut params = CertificateParams::new(request.subject_alt_names.clone())?;
    let common_name = request
        .subject_alt_names
        .iter()
        .find(|name| name.ends_with(".svc"))
        .or(request.subject_alt_names.first())
        .cloned()
        .unwrap_or_else(|| "image-rewriter".to_owned());
    params.distinguished_name = distinguished_name(&common_name);
    // ECDSA and Ed25519 keys sign the handshake and encipher nothing
    // (keyEncipherment is for RSA key transport, RFC 5480 section 3).
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    // Names the CA key that signed it, so chain builders need not guess
    // (RFC 5280 section 4.2.1.1), as after a CA renewal.
    params.use_authority_key_identifier_extension = true;
    params.not_before = dates.not_before;
    params.not_after = dates.days_from_now(request.validity_days)?;
    let cert = params.signed_by(&key, issuer)?;
    Ok((cert.pem(), key.serialize_pem()))
}

/// The CA an earlier run left in an output directory (`ca.crt`, `ca.key`).
pub struct ExistingCa {
    cert_path: PathBuf,
    /// The certificate that signs (the first in `ca.crt`).
    der: CertificateDer<'static>,
    /// `ca.crt` as it was read: the `caBundle` stays byte for byte the same.
    cert_pem: String,
    key_pem: String,
    issuer: Issuer<'static, KeyPair>,
    not_after: OffsetDateTime,
}

impl ExistingCa {
    /// The CA in `dir`; `None` when neither of its files is there (a first
    /// run). Refuses half a CA, a key that is not the certificate's, and a
    /// certificate that is no CA: replacing it silently would change the
    /// `caBundle` the cluster trusts.
    pub fn read(dir: &Path) -> Result<Option<Self>, CertsError> {
        let cert_path = dir.join("ca.crt");
        let key_path = dir.join("ca.key");
        let cert_pem = read_if_present(&cert_path)?;
        let key_pem = read_if_present(&key_path)?;
        let (cert_pem, key_pem) = match (cert_pem, key_pem) {
            (None, None) => return Ok(None),
            (Some(cert), Some(key)) => (cert, key),
            (Some(_), None) => return Err(half(&cert_path, &key_path)),
            (None, Some(_)) => return Err(half(&key_path, &cert_path)),
        };
        let unusable = |reason: String| CertsError::CaUnusable {
            path: cert_path.display().to_string(),
            reason,
        };
        let key = KeyPair::from_pem(&key_pem).map_err(|error| {
            unusable(format!(
                "{} is not a key rcgen reads ({error})",
                key_path.display()
            ))
        })?;
        // The first certificate signs; the file may hold one more, the CA
        // a `--new-ca` replaced (see `outgoing_ca`).
        let der = CertificateDer::from_pem_slice(cert_pem.as_bytes())
            .map_err(|error| unusable(format!("no PEM certificate ({error:?})")))?;
        let (_, parsed) = x509_parser::parse_x509_certificate(&der)
            .map_err(|error| unusable(format!("not an X.509 certificate ({error})")))?;
        if !parsed.is_ca() {
            return Err(unusable(
                "not a CA certificate (no basicConstraints CA:TRUE)".to_owned(),
            ));
        }
        if let Ok(Some(usage)) = parsed.key_usage()
            && !usage.value.key_cert_sign()
        {
            return Err(unusable(
                "its keyUsage does not allow signing certificates (keyCertSign)".to_owned(),
            ));
        }
        if parsed.public_key().subject_public_key.data.as_ref() != key.public_key_raw() {
            return Err(unusable(format!(
                "{} is not this certificate's key",
                key_path.display()
            )));
        }
        let not_after = parsed.validity().not_after.to_datetime();
        // rcgen panics on some names it cannot hold (an empty attribute).
        let issuer = crate::unwind::catching(|| Issuer::from_ca_cert_der(&der, key))
            .map_err(unusable)?
            .map_err(|error| unusable(error.to_string()))?;
        let der = der.into_owned();
        Ok(Some(Self {
            cert_path,
            der,
            cert_pem,
            key_pem,
            issuer,
            not_after,
        }))
    }

    /// When the CA expires.
    pub fn not_after(&self) -> OffsetDateTime {
        self.not_after
    }
}

/// The CA certificate a new CA replaces (the first in `dir/ca.crt`, the
/// one that signed), as PEM, while it is still valid: kept after the new
/// one in `ca.crt`, and so in the `caBundle`, the apiserver trusts the pods
/// still serving a certificate it signed until they load the new one. Only
/// that one: a CA replaced before it (after a leak of its key, say) is
/// trusted no longer. `None` when there is none, or it is no CA, or it has
/// expired.
pub fn outgoing_ca(dir: &Path) -> Option<String> {
    let text = std::fs::read(dir.join("ca.crt")).ok()?;
    let der = CertificateDer::from_pem_slice(&text).ok()?;
    let (_, parsed) = x509_parser::parse_x509_certificate(&der).ok()?;
    let valid =
        parsed.is_ca() && parsed.validity().not_after.to_datetime() > OffsetDateTime::now_utc();
    valid.then(|| pem_certificate(&der))
}

/// `der` as a PEM certificate block, in lines of 64 characters.
fn pem_certificate(der: &[u8]) -> String {
    let encoded = base64::engine::general_purpose::STANDARD.encode(der);
    let mut pem = String::from("-----BEGIN CERTIFICATE-----\n");
    for line in encoded.as_bytes().chunks(64) {
        pem.push_str(&String::from_utf8_lossy(line));
        pem.push('\n');
    }
    pem.push_str("-----END CERTIFICATE-----\n");
    pem
}

fn read_if_present(path: &Path) -> Result<Option<String>, CertsError> {
    match std::fs::read_to_string(path) {
        Ok(text) => Ok(Some(text)),
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(error) => Err(CertsError::CaUnusable {
            path: path.display().to_string(),
            reason: error.to_string(),
        }),
    }
}

fn half(found: &Path, missing: &Path) -> CertsError {
    CertsError::CaHalf {
        found: found.display().to_string(),
        missing: missing.display().to_string(),
    }
}

/// A new key pair, kept in the PKCS#8 form every reader takes.
fn generate_key(key_type: KeyType) -> Result<KeyPair, rcgen::Error> {
    let key = KeyPair::generate_for(key_type.algorithm())?;
    match ed25519_pkcs8_v1(key.serialized_der()) {
        Some(v1) => KeyPair::from_pkcs8_der_and_sign_algo(&v1.into(), key_type.algorithm()),
        None => Ok(key),
    }
}

/// ring writes an Ed25519 key as PKCS#8 v2 (RFC 5958: the public key
/// follows the private one), which OpenSSL 3.0 refuses ("unsupported");
/// v1, the private key alone (RFC 8410 section 7), is read by OpenSSL, Go
/// and rustls alike. `None` for any other key.
fn ed25519_pkcs8_v1(pkcs8: &[u8]) -> Option<Vec<u8>> {
    // SEQUENCE (81 bytes) { INTEGER 1, ...
    const V2_HEADER: [u8; 5] = [0x30, 0x51, 0x02, 0x01, 0x01];
    // SEQUENCE (46 bytes) { INTEGER 0, ...
    const V1_HEADER: [u8; 5] = [0x30, 0x2e, 0x02, 0x01, 0x00];
    // ... SEQUENCE { OID 1.3.101.112 }, OCTET STRING { OCTET STRING (32 bytes) }
    const ALGORITHM_AND_KEY_HEADER: [u8; 11] = [
        0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x04, 0x22, 0x04, 0x20,
    ];
    const V2_LEN: usize = 2 + 0x51;

    let rest = pkcs8.strip_prefix(&V2_HEADER)?;
    let rest = rest.strip_prefix(&ALGORITHM_AND_KEY_HEADER)?;
    if pkcs8.len() != V2_LEN {
        return None;
    }
    let seed = rest.get(..32)?;
    Some([&V1_HEADER[..], &ALGORITHM_AND_KEY_HEADER, seed].concat())
}

fn distinguished_name(common_name: &str) -> DistinguishedName {
    let mut name = DistinguishedName::new();
    name.push(DnType::CommonName, common_name);
    name
}

/// The TLS Secret the Deployment mounts.
pub fn secret_manifest(bundle: &CertBundle, secret: &str, namespace: &str) -> String {
    let b64 = |text: &str| base64::engine::general_purpose::STANDARD.encode(text);
    format!(
        "# Generated by `image-rewriter certs`. Holds a private key: do not commit.\n\
         apiVersion: v1\n\
         kind: Secret\n\
         type: kubernetes.io/tls\n\
         metadata:\n  name: {secret}\n  namespace: {namespace}\n  labels:\n    app.kubernetes.io/name: image-rewriter\n\
         data:\n  tls.crt: {}\n  tls.key: {}\n  ca.crt: {}\n",
        b64(&bundle.cert),
        b64(&bundle.key),
        b64(&bundle.ca_cert),
    )
}

/// A JSON 6902 patch (kustomize) that sets the webhook's `caBundle`.
pub fn ca_bundle_patch(bundle: &CertBundle) -> String {
    let ca_bundle = base64::engine::general_purpose::STANDARD.encode(&bundle.ca_cert);
    format!(
        "# Generated by `image-rewriter certs`: the CA the apiserver trusts for the webhook.\n\
         - op: add\n  path: /webhooks/0/clientConfig/caBundle\n  value: {ca_bundle}\n"
    )
}

/// Writes the certificate files, the Secret manifest and the caBundle patch,
/// all of them or none: each is written whole beside its destination first,
/// and only then are they renamed into place, so a failure midway (a full
/// disk) leaves the files of an earlier run as they were, never a new
/// certificate beside an old key.
pub fn write_bundle(
    bundle: &CertBundle,
    out: &Path,
    secret: &str,
    namespace: &str,
) -> Result<Vec<PathBuf>, CertsError> {
    let files = [
        ("ca.crt", bundle.ca_cert.clone(), false),
        ("ca.key", bundle.ca_key.clone(), true),
        ("tls.crt", bundle.cert.clone(), false),
        ("tls.key", bundle.key.clone(), true),
        (
            "secret.yaml",
            secret_manifest(bundle, secret, namespace),
            true,
        ),
        ("webhook-ca-bundle.yaml", ca_bundle_patch(bundle), false),
    ];
    let write_error = |path: &Path, reason| CertsError::Write {
        path: path.display().to_string(),
        reason,
    };
    std::fs::create_dir_all(out).map_err(|reason| write_error(out, reason))?;
    // A directory in a file's place would refuse its rename only after
    // others were renamed.
    for (name, _, _) in &files {
        let path = out.join(name);
        if path.is_dir() {
            let reason = std::io::Error::new(std::io::ErrorKind::IsADirectory, "is a directory");
            return Err(write_error(&path, reason));
        }
    }
    let mut staged = Vec::with_capacity(files.len());
    for (name, content, private) in files {
        let path = out.join(name);
        let file = stage(out, name, content.as_bytes(), private)
            .map_err(|reason| write_error(&path, reason))?;
        staged.push((file, path));
    }
    let mut written = Vec::with_capacity(staged.len());
    for (file, path) in staged {
        file.persist(&path)
            .map_err(|failed| write_error(&path, failed.error))?;
        written.push(path);
    }
    Ok(written)
}

/// `content` in a new file in `dir`, named after `name` and removed when
/// dropped unless persisted. A new file, so a key never sits in one an
/// earlier run (or a person) left readable by others. A run killed before
/// the rename leaves it: `.gitignore` ignores its name in `certs/`.
fn stage(
    dir: &Path,
    name: &str,
    content: &[u8],
    private: bool,
) -> std::io::Result<tempfile::NamedTempFile> {
    use std::io::Write as _;
    let prefix = format!(".{name}.");
    let mut builder = tempfile::Builder::new();
    builder.prefix(&prefix).suffix(".tmp");
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt as _;
        builder.permissions(std::fs::Permissions::from_mode(if private {
            0o600
        } else {
            0o644
        }));
    }
    #[cfg(not(unix))]
    let _ = private;
    let mut file = builder.tempfile_in(dir)?;
    file.write_all(content)?;
    file.as_file().sync_all()?;
    Ok(file)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(validity_days: u32, ca_validity_days: u32) -> CertRequest {
        CertRequest {
            subject_alt_names: vec!["image-rewriter.image-rewriter.svc".to_owned()],
            key_type: KeyType::EcdsaP256,
            validity_days,
            ca_validity_days,
        }
    }

    #[test]
    fn validity_from_one_day_to_the_maximum_is_accepted() {
        for (days, ca_days) in [(1, 1), (365, 3650), (MAX_VALIDITY_DAYS, MAX_VALIDITY_DAYS)] {
            assert!(
                request(days, ca_days).check_validity().is_ok(),
                "{days} {ca_days}"
            );
        }
    }

    #[test]
    fn validity_out_of_range_is_refused_naming_the_flag() {
        for (days, ca_days, flag) in [
            (0, 3650, "--validity-days 0"),
            (MAX_VALIDITY_DAYS + 1, 3650, "--validity-days 36501"),
            (u32::MAX, u32::MAX, "--validity-days 4294967295"),
            (365, 0, "--ca-validity-days 0"),
            (365, MAX_VALIDITY_DAYS + 1, "--ca-validity-days 36501"),
            (
                400,
                10,
                "--validity-days 400 is more than --ca-validity-days 10",
            ),
        ] {
            let refusal = request(days, ca_days).check_validity().err();
            let message = refusal.map(|e| e.to_string()).unwrap_or_default();
            assert!(message.starts_with(flag), "{days} {ca_days}: {message:?}");
        }
    }

    #[test]
    fn the_serving_certificate_signs_and_names_its_issuers_key() {
        use rustls::pki_types::CertificateDer;
        use rustls::pki_types::pem::PemObject as _;
        use x509_parser::extensions::ParsedExtension;

        for key_type in [KeyType::EcdsaP256, KeyType::EcdsaP384, KeyType::Ed25519] {
            let bundle = generate(&CertRequest {
                key_type,
                ..request(365, 3650)
            })
            .unwrap();
            let ca_der = CertificateDer::from_pem_slice(bundle.ca_cert.as_bytes()).unwrap();
            let leaf_der = CertificateDer::from_pem_slice(bundle.cert.as_bytes()).unwrap();
            let (_, ca) = x509_parser::parse_x509_certificate(&ca_der).unwrap();
            let (_, leaf) = x509_parser::parse_x509_certificate(&leaf_der).unwrap();

            let usage = leaf.key_usage().unwrap().expect("a key usage").value;
            assert!(usage.digital_signature(), "{key_type:?}");
            assert!(!usage.key_encipherment(), "{key_type:?}: {usage}");

            let ca_key_id = ca
                .extensions()
                .iter()
                .find_map(|extension| match extension.parsed_extension() {
                    ParsedExtension::SubjectKeyIdentifier(id) => Some(id.0),
                    _ => None,
                })
                .expect("the CA has a subject key identifier");
            let named_key_id = leaf
                .extensions()
                .iter()
                .find_map(|extension| match extension.parsed_extension() {
                    ParsedExtension::AuthorityKeyIdentifier(id) => id.key_identifier.clone(),
                    _ => None,
                })
                .expect("the leaf names its issuer's key");
            assert_eq!(named_key_id.0, ca_key_id, "{key_type:?}");
        }
    }

    #[test]
    fn every_key_type_is_served_with_the_certificate_it_signs() {
        let provider = rustls::crypto::ring::default_provider();
        for key_type in [KeyType::EcdsaP256, KeyType::EcdsaP384, KeyType::Ed25519] {
            let bundle = generate(&CertRequest {
                key_type,
                ..request(365, 3650)
            })
            .unwrap();
            let pair = crate::tls::PemPair {
                cert: bundle.cert.into_bytes(),
                key: bundle.key.into_bytes(),
            };
            let served = pair.certified_key(&provider, Path::new("tls.crt"), Path::new("tls.key"));
            assert!(served.is_ok(), "{key_type:?}: {:?}", served.err());
        }
    }

    #[test]
    fn an_ed25519_key_is_written_as_pkcs8_v1() {
        let key = generate_key(KeyType::Ed25519).unwrap();
        let der = key.serialized_der();
        // SEQUENCE of 46 bytes, version 0: no public key after the private one.
        assert_eq!(der[..5], [0x30, 0x2e, 0x02, 0x01, 0x00], "{der:02x?}");
        assert_eq!(der.len(), 48, "{der:02x?}");
        for other in [KeyType::EcdsaP256, KeyType::EcdsaP384] {
            let key = KeyPair::generate_for(other.algorithm()).unwrap();
            assert_eq!(ed25519_pkcs8_v1(key.serialized_der()), None, "{other:?}");
        }
    }

    #[test]
    fn generate_refuses_what_check_validity_refuses() {
        assert!(matches!(
            generate(&request(4_000_000, 4_000_000)),
            Err(CertsError::ValidityTooLong { .. })
        ));
    }
}
