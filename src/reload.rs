//! Re-reads the config and certificate files when their content changes.
//!
//! Polling by content, not inotify: Kubernetes updates mounted ConfigMaps and
//! Secrets by swapping a `..data` symlink, which inotify watches on the file
//! miss, and reading two small files every interval costs microseconds.
//! A file that fails to load is reported once per distinct content; the last
//! good config or certificate stays in force.

use std::path::PathBuf;
use std::sync::Arc;

use rustls::crypto::CryptoProvider;
use tracing::{error, info};

use crate::config::{ConfigError, ConfigFile};
use crate::metrics::Metrics;
use crate::server::{AppState, ServeOptions};
use crate::tls::{CertificateSlot, PemPair};

/// The files to watch, and what a load needs.
pub struct Sources {
    config: PathBuf,
    tls_cert: PathBuf,
    tls_key: PathBuf,
    namespace: Option<String>,
    provider: Arc<CryptoProvider>,
}

impl Sources {
    pub fn new(options: &ServeOptions, provider: Arc<CryptoProvider>) -> Self {
        Self {
            config: options.config.clone(),
            tls_cert: options.tls_cert.clone(),
            tls_key: options.tls_key.clone(),
            namespace: options.namespace.clone(),
            provider,
        }
    }
}

/// What the files held when last read, so only changes are loaded.
#[derive(Debug, PartialEq, Eq)]
enum Seen<T> {
    Nothing,
    Content(T),
    ReadError(String),
}

pub struct Watcher {
    sources: Sources,
    state: Arc<AppState>,
    slot: Arc<CertificateSlot>,
    config_seen: Seen<Vec<u8>>,
    certificate_seen: Seen<PemPair>,
}

impl Watcher {
    pub fn new(sources: Sources, state: Arc<AppState>, slot: Arc<CertificateSlot>) -> Self {
        Self {
            sources,
            state,
            slot,
            config_seen: Seen::Nothing,
            certificate_seen: Seen::Nothing,
        }
    }

    /// Loads whatever changed since the last poll.
    pub fn poll(&mut self) {
        self.poll_config();
        self.poll_certificate();
    }

    fn poll_config(&mut self) {
        let path = &self.sources.config;
        let seen = match std::fs::read(path) {
            Ok(bytes) => Seen::Content(bytes),
            Err(e) => Seen::ReadError(format!("cannot read config file {}: {e}", path.display())),
        };
        if seen == self.config_seen {
            return;
        }
        let loaded = match &seen {
            Seen::Content(bytes) => std::str::from_utf8(bytes)
                .map_err(|e| ConfigError::Syntax(format!("not UTF-8: {e}")))
                .and_then(ConfigFile::from_yaml)
                .and_then(|file| file.into_policy(self.sources.namespace.as_deref()))
                .map_err(|e| e.to_string()),
            Seen::ReadError(message) => Err(message.clone()),
            Seen::Nothing => return,
        };
        self.config_seen = seen;
        Metrics::count_reload(&self.state.metrics.config_reloads, loaded.is_ok());
        match loaded {
            Ok(policy) => {
                info!(path = %path.display(), rules = policy.rules().len(), "config loaded");
                self.state.set_policy(policy);
            }
            Err(reason) => error!(
                path = %path.display(),
                %reason,
                "config refused; the last good config stays in force"
            ),
        }
    }

    fn poll_certificate(&mut self) {
        let sources = &self.sources;
        let seen = match PemPair::read(&sources.tls_cert, &sources.tls_key) {
            Ok(pair) => Seen::Content(pair),
            Err(e) => Seen::ReadError(e.to_string()),
        };
        if seen == self.certificate_seen {
            return;
        }
        let loaded = match &seen {
            Seen::Content(pair) => pair
                .certified_key(&sources.provider, &sources.tls_cert, &sources.tls_key)
                .map_err(|e| e.to_string()),
            Seen::ReadError(message) => Err(message.clone()),
            Seen::Nothing => return,
        };
        self.certificate_seen = seen;
        Metrics::count_reload(&self.state.metrics.certificate_reloads, loaded.is_ok());
        match loaded {
            Ok(key) => {
                info!(cert = %sources.tls_cert.display(), "certificate loaded");
                self.slot.replace(key);
                self.state.mark_certificate_loaded();
            }
            Err(reason) => error!(
                %reason,
                "certificate refused; the last good certificate stays in force"
            ),
        }
    }
}
