//! The serving certificate: PEM loading, and a resolver whose certificate
//! can be swapped while connections are open (cert-manager rotation).

use std::fmt;
use std::path::Path;
use std::sync::Arc;

use arc_swap::ArcSwapOption;
use rustls::ServerConfig;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::{self, PemObject as _};
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read {path}: {reason}")]
    Read {
        path: String,
        /// In the message, so not a `source` (the error chain would repeat it).
        reason: std::io::Error,
    },
    #[error("{path}: no PEM certificate found")]
    NoCertificate { path: String },
    #[error("{path}: {reason}")]
    BadPem { path: String, reason: String },
    #[error("certificate {cert} and key {key} do not form a usable pair: {reason}")]
    Mismatch {
        cert: String,
        key: String,
        reason: String,
    },
}

/// How many times a pair is read before one that may straddle a swap is
/// returned as it is.
const PAIR_READ_ATTEMPTS: usize = 3;

/// The bytes of a certificate file and its key file, as last read.
#[derive(Clone, PartialEq, Eq)]
pub struct PemPair {
    pub cert: Vec<u8>,
    pub key: Vec<u8>,
}

impl fmt::Debug for PemPair {
    // Never print the private key.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PemPair")
            .field("cert_bytes", &self.cert.len())
            .finish_non_exhaustive()
    }
}

impl PemPair {
    pub fn read(cert: &Path, key: &Path) -> Result<Self, TlsError> {
        Self::read_with(cert, key, |path| std::fs::read(path))
    }

    /// The two files are two opens, and kubelet swaps a Secret volume's
    /// `..data` symlink whenever it likes: an old certificate with a new key
    /// would be refused and counted as a failed reload. So the certificate is
    /// read again after the key, and the pair again when it changed.
    fn read_with(
        cert: &Path,
        key: &Path,
        mut read_file: impl FnMut(&Path) -> std::io::Result<Vec<u8>>,
    ) -> Result<Self, TlsError> {
        let mut read = |path: &Path| {
            crate::volume::read_across_swaps(path, &mut read_file).map_err(|reason| {
                TlsError::Read {
                    path: path.display().to_string(),
                    reason,
                }
            })
        };
        let mut pair = Self {
            cert: read(cert)?,
            key: read(key)?,
        };
        for _ in 1..PAIR_READ_ATTEMPTS {
            let cert_now = read(cert)?;
            if cert_now == pair.cert {
                return Ok(pair);
            }
            pair = Self {
                cert: cert_now,
                key: read(key)?,
            };
        }
        Ok(pair)
    }

    /// The whole chain in the certificate file, and the key (PKCS#8,
    /// PKCS#1 or SEC1), checked to belong together.
    pub fn certified_key(
        &self,
        provider: &CryptoProvider,
        cert_path: &Path,
        key_path: &Path,
    ) -> Result<CertifiedKey, TlsError> {
        let cert_name = cert_path.display().to_string();
        let key_name = key_path.display().to_string();
        let chain = CertificateDer::pem_slice_iter(&self.cert)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| TlsError::BadPem {
                path: cert_name.clone(),
                reason: pem_problem(&e).to_owned(),
            })?;
        if chain.is_empty() {
            return Err(TlsError::NoCertificate { path: cert_name });
        }
        let key = PrivateKeyDer::from_pem_slice(&self.key).map_err(|e| TlsError::BadPem {
            path: key_name.clone(),
            reason: match e {
                // Told apart before the parser's error, which for such a key
                // is "none found" or "invalid base64" (the legacy headers).
                _ if holds_encrypted_key(&self.key) => ENCRYPTED_KEY.to_owned(),
                pem::Error::NoItemsFound => "no private key found".to_owned(),
                e => format!("no usable private key: {}", pem_problem(&e)),
            },
        })?;
        CertifiedKey::from_der(chain, key, provider).map_err(|e| TlsError::Mismatch {
            cert: cert_name,
            key: key_name,
            reason: e.to_string(),
        })
    }
}

/// Why a passphrase-protected key is refused.
const ENCRYPTED_KEY: &str = "the private key is encrypted (passphrase-protected), and the \
     server reads only unencrypted keys: decrypt it (`openssl pkey -in KEY -out KEY.plain`)";

/// Whether a key file holds a passphrase-protected key: a PKCS#8 `ENCRYPTED
/// PRIVATE KEY` section, or OpenSSL's legacy `Proc-Type: 4,ENCRYPTED`
/// header in a PKCS#1 or SEC1 section. Only the marker lines are looked at.
fn holds_encrypted_key(pem: &[u8]) -> bool {
    pem.split(|&byte| byte == b'\n').any(|line| {
        let line = line.trim_ascii();
        line == b"-----BEGIN ENCRYPTED PRIVATE KEY-----"
            || (line.starts_with(b"Proc-Type:") && line.ends_with(b",ENCRYPTED"))
    })
}

/// What is wrong with a PEM file, in words that hold none of its content:
/// the parser's own messages quote the offending line, which in a key file
/// (or a certificate file with the key appended) is the private key, and
/// every refused reload logs the reason.
fn pem_problem(error: &pem::Error) -> &'static str {
    match error {
        pem::Error::IllegalSectionStart { .. } => {
            "a line starts a PEM section but is not a valid BEGIN line \
             (literal \\n escapes instead of line breaks?)"
        }
        pem::Error::MissingSectionEnd { .. } => "a PEM section has no END line",
        pem::Error::Base64Decode(_) => "invalid base64 in a PEM section",
        pem::Error::SectionTooLarge => "a PEM section is larger than 256 MB",
        pem::Error::NoItemsFound => "no PEM section of the expected kind",
        pem::Error::Io(_) => "the PEM data could not be read",
        _ => "not valid PEM",
    }
}

/// Less time than this left on a certificate just loaded is worth a warning
/// in the log: a healthy rotation (cert-manager renews at two thirds of the
/// lifetime) never comes this close.
pub const EXPIRY_WARNING_SECONDS: i64 = 7 * 24 * 60 * 60;

/// When the chain served is valid: the latest notBefore and the earliest
/// notAfter of the leaf and of the certificates in the PEM it chains
/// through, issuer after issuer (the apiserver refuses the chain while any
/// one of them is out of its dates: an intermediate that expires before the
/// leaf ends it), as Unix times; `None` if the leaf does not parse as
/// X.509. A certificate the leaf does not chain through (a CA staged for
/// the next rotation, or one left from the last) is not counted: the
/// apiserver builds its chain without it. Of two that could issue the same
/// certificate (a CA's renewed certificate beside its old one), the one
/// valid longest is counted. Certificates that do not parse are not
/// counted.
pub fn validity(chain: &[CertificateDer<'_>]) -> Option<(i64, i64)> {
    use x509_parser::certificate::X509Certificate;
    let dates = |certificate: &X509Certificate<'_>| {
        let validity = certificate.validity();
        (
            validity.not_before.timestamp(),
            validity.not_after.timestamp(),
        )
    };
    let (leaf, rest) = chain.split_first()?;
    let (_, leaf) = x509_parser::parse_x509_certificate(leaf.as_ref()).ok()?;
    let mut unused: Vec<X509Certificate<'_>> = rest
        .iter()
        .filter_map(|der| Some(x509_parser::parse_x509_certificate(der.as_ref()).ok()?.1))
        .collect();
    let (mut starts, mut ends) = dates(&leaf);
    let mut wanted = Some(leaf.issuer().as_raw().to_vec());
    // A root (its own issuer) ends the chain; each certificate is counted
    // once, so a loop of issuers ends it too.
    while let Some(issued_by) = wanted.take() {
        let Some(at) = unused
            .iter()
            .enumerate()
            .filter(|(_, candidate)| candidate.subject().as_raw() == issued_by.as_slice())
            .max_by_key(|(_, candidate)| dates(candidate).1)
            .map(|(at, _)| at)
        else {
            break;
        };
        let issuer = unused.swap_remove(at);
        let (from, until) = dates(&issuer);
        (starts, ends) = (starts.max(from), ends.min(until));
        if issuer.issuer().as_raw() != issuer.subject().as_raw() {
            wanted = Some(issuer.issuer().as_raw().to_vec());
        }
    }
    Some((starts, ends))
}

/// What to warn about a certificate valid until `not_after`, at `now`
/// (both Unix times): expired, or expiring within [`EXPIRY_WARNING_SECONDS`].
pub fn expiry_warning(not_after: i64, now: i64) -> Option<String> {
    let left = not_after - now;
    let span = humantime::format_duration(std::time::Duration::from_secs(left.unsigned_abs()));
    if left <= 0 {
        Some(format!(
            "the serving certificate expired {span} ago: the apiserver refuses it"
        ))
    } else if left < EXPIRY_WARNING_SECONDS {
        Some(format!("the serving certificate expires in {span}"))
    } else {
        None
    }
}

/// Why a certificate valid until `candidate` must not replace the one in
/// force, valid until `in_force`, at `now` (all Unix times): it has expired
/// and the one in force has not. The apiserver refuses an expired
/// certificate, so swapping it in would fail every review (an old Secret
/// re-applied, say); keeping the valid one loses nothing.
pub fn expired_replacement(
    candidate: Option<i64>,
    in_force: Option<i64>,
    now: i64,
) -> Option<String> {
    let (candidate, in_force) = (candidate?, in_force?);
    if candidate > now || in_force <= now {
        return None;
    }
    let ago = humantime::format_duration(std::time::Duration::from_secs(
        (now - candidate).unsigned_abs(),
    ));
    let left = humantime::format_duration(std::time::Duration::from_secs(
        (in_force - now).unsigned_abs(),
    ));
    Some(format!(
        "the new certificate expired {ago} ago, and the one in force is valid for {left} more"
    ))
}

/// Why a certificate valid from `candidate` (its notBefore) must not yet
/// replace the one in force, valid from `in_force.0` until `in_force.1`, at
/// `now` (all Unix times): it is not valid yet, and the one in force is. The
/// apiserver refuses a certificate before its notBefore as it refuses an
/// expired one, so swapping it in would fail every review until then (one
/// issued by a clock ahead of ours, or staged early). Once `now` reaches
/// `candidate` the same files may load.
pub fn premature_replacement(
    candidate: Option<i64>,
    in_force: Option<(i64, i64)>,
    now: i64,
) -> Option<String> {
    let (candidate, (valid_from, valid_until)) = (candidate?, in_force?);
    if candidate <= now || valid_from > now || valid_until <= now {
        return None;
    }
    let wait = humantime::format_duration(std::time::Duration::from_secs(
        (candidate - now).unsigned_abs(),
    ));
    Some(format!(
        "the new certificate is not valid yet (its notBefore is {wait} ahead), and the one in \
         force is valid; the new one loads once its notBefore has passed"
    ))
}

/// How often the warning about a certificate near its end is repeated.
pub const EXPIRY_WARNING_REPEAT_SECONDS: i64 = 60 * 60;

/// Warns about the certificate in force as its end nears: when it loads,
/// then once every [`EXPIRY_WARNING_REPEAT_SECONDS`] for as long as it stays
/// in force within the window (a stalled rotation goes on warning).
#[derive(Debug, Default)]
pub struct ExpiryReminder {
    not_after: Option<i64>,
    last_warned: Option<i64>,
}

impl ExpiryReminder {
    /// A certificate was loaded and is now in force.
    pub fn loaded(&mut self, not_after: Option<i64>) {
        self.not_after = not_after;
        self.last_warned = None;
    }

    /// The notAfter of the certificate in force, if one is and it parsed.
    pub fn not_after(&self) -> Option<i64> {
        self.not_after
    }

    /// The warning to log at `now` (a Unix time), if one is due.
    pub fn due(&mut self, now: i64) -> Option<String> {
        let warning = expiry_warning(self.not_after?, now)?;
        if self
            .last_warned
            .is_some_and(|at| now - at < EXPIRY_WARNING_REPEAT_SECONDS)
        {
            return None;
        }
        self.last_warned = Some(now);
        Some(warning)
    }
}

/// Hands every new TLS handshake the current certificate. A reload swaps it
/// without touching established connections; until the first load,
/// handshakes fail.
#[derive(Debug, Default)]
pub struct CertificateSlot(ArcSwapOption<CertifiedKey>);

impl CertificateSlot {
    pub fn replace(&self, key: CertifiedKey) {
        self.0.store(Some(Arc::new(key)));
    }
}

impl ResolvesServerCert for CertificateSlot {
    fn resolve(&self, _client_hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.0.load_full()
    }
}

/// TLS 1.2 and 1.3, ALPN h2 and http/1.1, the certificate from `slot`.
pub fn server_config(
    provider: Arc<CryptoProvider>,
    slot: Arc<CertificateSlot>,
) -> Result<ServerConfig, rustls::Error> {
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?
        .with_no_client_auth()
        .with_cert_resolver(slot);
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(config)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// At 03:04:05 UTC on that day.
    fn at(year: i32, month: u8, day: u8) -> time::OffsetDateTime {
        rcgen::date_time_ymd(year, month, day).replace_time(time::Time::from_hms(3, 4, 5).unwrap())
    }

    #[test]
    fn validity_reads_the_leaf_dates_as_unix_time() {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(vec!["localhost".to_owned()]).unwrap();
        params.not_before = at(2030, 1, 2);
        params.not_after = at(2031, 1, 2);
        let certificate = params.self_signed(&key).unwrap();
        // 2030-01-02T03:04:05Z and a year of 365 days later, computed apart
        // from any X.509 code.
        assert_eq!(
            validity(&[certificate.der().clone()]),
            Some((1_893_553_445, 1_893_553_445 + 365 * 86_400))
        );
        assert_eq!(validity(&[CertificateDer::from(vec![0x30, 0x00])]), None);
        assert_eq!(validity(&[]), None);
    }

    #[test]
    fn validity_of_a_chain_is_where_all_its_certificates_are_valid() {
        let ca_key = rcgen::KeyPair::generate().unwrap();
        let mut ca = rcgen::CertificateParams::new(Vec::new()).unwrap();
        ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        // Valid from a day after the leaf, until a year before it ends.
        ca.not_before = at(2030, 1, 3);
        ca.not_after = at(2030, 7, 2);
        let ca_der = ca.self_signed(&ca_key).unwrap().der().clone();
        let issuer = rcgen::Issuer::new(ca, &ca_key);
        let key = rcgen::KeyPair::generate().unwrap();
        let mut leaf = rcgen::CertificateParams::new(vec!["localhost".to_owned()]).unwrap();
        leaf.not_before = at(2030, 1, 2);
        leaf.not_after = at(2031, 7, 2);
        let leaf_der = leaf.signed_by(&key, &issuer).unwrap().der().clone();

        // 2030-01-03T03:04:05Z, and 2030-07-02T03:04:05Z (180 days later).
        let (ca_starts, ca_ends) = (1_893_639_845, 1_893_639_845 + 180 * 86_400);
        assert_eq!(
            validity(&[leaf_der.clone(), ca_der]),
            Some((ca_starts, ca_ends))
        );
        let not_x509 = CertificateDer::from(vec![0x30, 0x00]);
        assert_eq!(
            validity(&[leaf_der, not_x509]),
            Some((1_893_553_445, 1_893_553_445 + 546 * 86_400))
        );
    }

    /// A certificate in the PEM that the leaf does not chain through (a
    /// CA staged for the next rotation, an old one left in the bundle, a
    /// stale copy of the intermediate beside the current one) plays no part
    /// in the chain the apiserver builds, so neither do its dates.
    #[test]
    fn validity_of_a_chain_leaves_out_certificates_the_leaf_does_not_chain_through() {
        let named = |name: &str| {
            let mut params = rcgen::CertificateParams::new(Vec::new()).unwrap();
            params.distinguished_name = rcgen::DistinguishedName::new();
            params
                .distinguished_name
                .push(rcgen::DnType::CommonName, name);
            params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
            params
        };
        let ca_key = rcgen::KeyPair::generate().unwrap();
        let mut ca = named("issuing CA");
        ca.not_before = at(2030, 1, 3);
        ca.not_after = at(2030, 7, 2);
        let ca_der = ca.self_signed(&ca_key).unwrap().der().clone();
        // The same CA's certificate as it was before its renewal.
        let mut stale_ca = named("issuing CA");
        stale_ca.not_before = at(2020, 1, 1);
        stale_ca.not_after = at(2021, 1, 1);
        let stale_ca_der = stale_ca.self_signed(&ca_key).unwrap().der().clone();
        let issuer = rcgen::Issuer::new(ca, &ca_key);
        let key = rcgen::KeyPair::generate().unwrap();
        let mut leaf = named("localhost");
        leaf.is_ca = rcgen::IsCa::NoCa;
        leaf.not_before = at(2030, 1, 2);
        leaf.not_after = at(2031, 7, 2);
        let leaf_der = leaf.signed_by(&key, &issuer).unwrap().der().clone();
        let other_key = rcgen::KeyPair::generate().unwrap();
        let mut expired = named("an old CA");
        expired.not_before = at(2019, 1, 1);
        expired.not_after = at(2020, 1, 1);
        let expired_der = expired.self_signed(&other_key).unwrap().der().clone();
        let mut staged = named("the next CA");
        staged.not_before = at(2031, 1, 1);
        staged.not_after = at(2040, 1, 1);
        let staged_der = staged.self_signed(&other_key).unwrap().der().clone();

        let chain_dates = Some((1_893_639_845, 1_893_639_845 + 180 * 86_400));
        for chain in [
            vec![leaf_der.clone(), ca_der.clone(), expired_der.clone()],
            vec![leaf_der.clone(), staged_der.clone(), ca_der.clone()],
            vec![leaf_der.clone(), stale_ca_der.clone(), ca_der.clone()],
            vec![leaf_der.clone(), ca_der.clone(), stale_ca_der.clone()],
        ] {
            assert_eq!(validity(&chain), chain_dates);
        }
        // Only unrelated certificates after the leaf: the leaf's dates.
        assert_eq!(
            validity(&[leaf_der, expired_der, staged_der]),
            Some((1_893_553_445, 1_893_553_445 + 546 * 86_400))
        );
    }

    #[test]
    fn an_expired_certificate_replaces_only_one_expired_too() {
        let now = 1_800_000_000;
        let (past, future) = (now - 86_400, now + 3_600);
        let refused = expired_replacement(Some(past), Some(future), now).unwrap();
        assert!(refused.contains("expired 1day ago"), "{refused}");
        assert!(refused.contains("valid for 1h more"), "{refused}");
        // Expired at this very second counts as expired.
        assert!(expired_replacement(Some(now), Some(future), now).is_some());
        assert_eq!(expired_replacement(Some(future), Some(future), now), None);
        assert_eq!(expired_replacement(Some(past), Some(now), now), None);
        assert_eq!(expired_replacement(Some(past), None, now), None);
        assert_eq!(expired_replacement(None, Some(future), now), None);
    }

    #[test]
    fn a_certificate_not_yet_valid_replaces_only_one_not_valid_now() {
        let now = 1_800_000_000;
        let valid = (now - 86_400, now + 86_400);
        let refused = premature_replacement(Some(now + 90), Some(valid), now).unwrap();
        assert!(
            refused.contains("not valid yet (its notBefore is 1m 30s ahead)"),
            "{refused}"
        );
        // Valid from this very second is valid.
        assert_eq!(premature_replacement(Some(now), Some(valid), now), None);
        assert_eq!(premature_replacement(Some(now - 1), Some(valid), now), None);
        // The one in force is expired, or not valid yet itself: nothing is lost.
        let expired = (now - 86_400, now);
        assert_eq!(
            premature_replacement(Some(now + 90), Some(expired), now),
            None
        );
        let early = (now + 10, now + 86_400);
        assert_eq!(
            premature_replacement(Some(now + 90), Some(early), now),
            None
        );
        assert_eq!(premature_replacement(Some(now + 90), None, now), None);
        assert_eq!(premature_replacement(None, Some(valid), now), None);
    }

    #[test]
    fn the_reminder_repeats_hourly_while_the_certificate_stays() {
        let not_after = 1_800_000_000;
        let week_before = not_after - EXPIRY_WARNING_SECONDS;
        let mut reminder = ExpiryReminder::default();
        assert_eq!(reminder.due(week_before), None, "nothing loaded yet");
        reminder.loaded(Some(not_after));
        assert_eq!(reminder.due(week_before - 1), None, "more than a week left");
        assert!(
            reminder.due(week_before + 1).is_some(),
            "the first poll inside the week"
        );
        assert_eq!(reminder.due(week_before + 3599), None);
        assert!(reminder.due(week_before + 3601).is_some(), "an hour later");
        assert!(
            reminder
                .due(not_after + 3601 * 2)
                .unwrap()
                .contains("expired")
        );
        // A rotation: the new certificate is far from its end.
        reminder.loaded(Some(not_after + 90 * 86_400));
        assert_eq!(reminder.due(not_after + 3601 * 3), None);
        reminder.loaded(None);
        assert_eq!(reminder.due(not_after + 3601 * 4), None);
    }

    #[test]
    fn expiry_warns_within_a_week_and_after_it() {
        let now = 1_800_000_000;
        assert_eq!(expiry_warning(now + EXPIRY_WARNING_SECONDS, now), None);
        assert_eq!(
            expiry_warning(now + EXPIRY_WARNING_SECONDS - 3600, now).as_deref(),
            Some("the serving certificate expires in 6days 23h")
        );
        assert_eq!(
            expiry_warning(now - 90, now).as_deref(),
            Some("the serving certificate expired 1m 30s ago: the apiserver refuses it")
        );
        assert!(expiry_warning(now, now).unwrap().contains("expired"));
    }

    /// A Secret volume's two files, by version, as a kubelet `..data` swap
    /// changes them: every read sees the version current at that moment.
    struct SwappingVolume {
        version: usize,
        reads: usize,
        /// The version becomes `version + 1` after each read listed here
        /// (1-based).
        swap_after_reads: Vec<usize>,
    }

    impl SwappingVolume {
        fn new(swap_after_reads: &[usize]) -> Self {
            Self {
                version: 1,
                reads: 0,
                swap_after_reads: swap_after_reads.to_vec(),
            }
        }

        fn read(&mut self, path: &Path) -> std::io::Result<Vec<u8>> {
            let content = format!("{} v{}", path.display(), self.version).into_bytes();
            self.reads += 1;
            if self.swap_after_reads.contains(&self.reads) {
                self.version += 1;
            }
            Ok(content)
        }
    }

    fn pair(version: usize) -> PemPair {
        PemPair {
            cert: format!("tls.crt v{version}").into_bytes(),
            key: format!("tls.key v{version}").into_bytes(),
        }
    }

    fn read_pair(volume: &mut SwappingVolume) -> PemPair {
        PemPair::read_with(Path::new("tls.crt"), Path::new("tls.key"), |path| {
            volume.read(path)
        })
        .expect("the fake volume never fails")
    }

    #[test]
    fn a_quiet_volume_reads_one_pair() {
        let mut volume = SwappingVolume::new(&[]);
        assert_eq!(read_pair(&mut volume), pair(1));
    }

    #[test]
    fn a_swap_between_certificate_and_key_reads_the_new_pair() {
        // Swapped after the certificate was read, before the key was.
        let mut volume = SwappingVolume::new(&[1]);
        assert_eq!(read_pair(&mut volume), pair(2));
    }

    #[test]
    fn a_swap_after_the_key_reads_a_consistent_pair() {
        let mut volume = SwappingVolume::new(&[2]);
        let read = read_pair(&mut volume);
        assert!(read == pair(1) || read == pair(2), "{read:?}");
    }

    #[test]
    fn a_path_that_vanishes_for_a_moment_during_a_swap_is_read_again() {
        let mut volume = SwappingVolume::new(&[]);
        let mut not_found_once = true;
        let read = PemPair::read_with(Path::new("tls.crt"), Path::new("tls.key"), |path| {
            if path == Path::new("tls.key") && std::mem::take(&mut not_found_once) {
                return Err(std::io::ErrorKind::NotFound.into());
            }
            volume.read(path)
        });
        assert_eq!(read.unwrap(), pair(1));
    }

    #[test]
    fn swaps_that_never_stop_give_up_after_a_few_reads() {
        let mut volume = SwappingVolume::new(&(1..100).collect::<Vec<_>>());
        read_pair(&mut volume);
        assert!(
            volume.reads <= 2 * PAIR_READ_ATTEMPTS + 1,
            "{} reads",
            volume.reads
        );
    }
}
