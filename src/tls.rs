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
    #[error("cannot read {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
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
            read_file(path).map_err(|source| TlsError::Read {
                path: path.display().to_string(),
                source,
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
