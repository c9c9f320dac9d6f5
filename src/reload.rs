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
use tracing::{error, info, warn};

use crate::config::{ConfigError, ConfigFile};
use crate::metrics::Metrics;
use crate::server::{AppState, ServeOptions};
use crate::tls::{self, CertificateSlot, PemPair};

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

/// Why a config file emptied while a config is in force is refused.
const BLANK_RELOAD: &str = "the file holds no value (blank lines and comments only): a ConfigMap key \
     emptied by mistake, or a file being rewritten; write `rules: []` to remove every rule";

/// What a file (or pair of files) held when last read, or why it could not
/// be read; `None` before the first poll.
type LastRead<T> = Option<Result<T, String>>;

/// Loads `read` when it differs from what was last read: `None` when nothing
/// changed, otherwise the load's result (a read error is a failed load, and
/// so is a load that panics: the last good one stays in force, and reloads
/// go on).
fn load_if_changed<B: PartialEq, T>(
    last: &mut LastRead<B>,
    read: Result<B, String>,
    load: impl FnOnce(&B) -> Result<T, String>,
) -> Option<Result<T, String>> {
    if last.as_ref() == Some(&read) {
        return None;
    }
    let loaded = match &read {
        Ok(content) => crate::unwind::catching(|| load(content))
            .unwrap_or_else(|panic| Err(format!("loading it {panic}"))),
        Err(reason) => Err(reason.clone()),
    };
    *last = Some(read);
    Some(loaded)
}

pub struct Watcher {
    sources: Sources,
    state: Arc<AppState>,
    slot: Arc<CertificateSlot>,
    config_seen: LastRead<Vec<u8>>,
    certificate_seen: LastRead<PemPair>,
    expiry: tls::ExpiryReminder,
    /// The notBefore of the certificate in force, if one is and it parsed.
    in_force_not_before: Option<i64>,
    /// When a pair refused only for not being valid yet becomes valid: the
    /// same files are loaded again then, though they have not changed.
    reconsider_at: Option<i64>,
}

fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |since| since.as_secs() as i64)
}

impl Watcher {
    pub fn new(sources: Sources, state: Arc<AppState>, slot: Arc<CertificateSlot>) -> Self {
        Self {
            sources,
            state,
            slot,
            config_seen: None,
            certificate_seen: None,
            expiry: tls::ExpiryReminder::default(),
            in_force_not_before: None,
            reconsider_at: None,
        }
    }

    /// Loads whatever changed since the last poll.
    pub fn poll(&mut self) {
        self.poll_config();
        self.poll_certificate();
        if let Some(warning) = self.expiry.due(unix_now()) {
            warn!(cert = %self.sources.tls_cert.display(), "{warning}");
        }
    }

    fn poll_config(&mut self) {
        let path = &self.sources.config;
        let namespace = self.sources.namespace.as_deref();
        let in_force = self.state.has_policy();
        let read = crate::volume::read_across_swaps(path, |path| std::fs::read(path))
            .map_err(|e| format!("cannot read config file {}: {e}", path.display()));
        let Some(loaded) = load_if_changed(&mut self.config_seen, read, |bytes| {
            let text = std::str::from_utf8(bytes)
                .map_err(|e| ConfigError::Syntax(format!("not UTF-8: {e}")).to_string())?;
            match ConfigFile::parse(text).map_err(|e| e.to_string())? {
                None if in_force => Err(BLANK_RELOAD.to_owned()),
                parsed => parsed
                    .unwrap_or_default()
                    .into_policy(namespace)
                    .map_err(|e| e.to_string()),
            }
        }) else {
            return;
        };
        let loaded_ok = loaded.is_ok();
        let metrics = &self.state.metrics;
        match loaded {
            Ok(policy) => {
                let rules = policy.rules().len();
                if rules == 0 {
                    warn!(path = %path.display(), "config loaded with no rules: no image is rewritten");
                } else {
                    info!(path = %path.display(), rules, "config loaded");
                }
                for warning in policy.warnings() {
                    warn!(path = %path.display(), "{warning}");
                }
                metrics.config_rules.set(rules as i64);
                self.state.set_policy(policy);
            }
            Err(reason) if in_force => error!(
                path = %path.display(),
                %reason,
                "config refused; the last good config stays in force"
            ),
            Err(reason) => error!(
                path = %path.display(),
                %reason,
                "config refused; no config has loaded yet, so /mutate answers 503 until one does"
            ),
        }
        // The count last: whoever sees it go up finds the config in force
        // and the gauge already set.
        metrics
            .config_last_reload_successful
            .set(i64::from(loaded_ok));
        Metrics::count_reload(&metrics.config_reloads, loaded_ok);
    }

    fn poll_certificate(&mut self) {
        let now = unix_now();
        if self.reconsider_at.is_some_and(|at| at <= now) {
            // Read as new: what was refused as not valid yet may load now.
            self.certificate_seen = None;
        }
        let sources = &self.sources;
        let read = PemPair::read(&sources.tls_cert, &sources.tls_key).map_err(|e| e.to_string());
        let Some(loaded) = load_if_changed(&mut self.certificate_seen, read, |pair| {
            pair.certified_key(&sources.provider, &sources.tls_cert, &sources.tls_key)
                .map_err(|e| e.to_string())
        }) else {
            return;
        };
        self.reconsider_at = None;
        let in_force = self.in_force_not_before.zip(self.expiry.not_after());
        let loaded = loaded.and_then(|key| {
            let dates = tls::validity(&key.cert);
            let (starts, expires) = (dates.map(|d| d.0), dates.map(|d| d.1));
            if let Some(reason) = tls::expired_replacement(expires, self.expiry.not_after(), now) {
                return Err(format!("{}: {reason}", sources.tls_cert.display()));
            }
            if let Some(reason) = tls::premature_replacement(starts, in_force, now) {
                self.reconsider_at = starts;
                return Err(format!("{}: {reason}", sources.tls_cert.display()));
            }
            Ok((key, expires, starts))
        });
        let metrics = &self.state.metrics;
        let loaded_ok = loaded.is_ok();
        match loaded {
            Ok((key, expires, starts)) => {
                metrics.certificate_expiration.set(expires);
                self.expiry.loaded(expires);
                self.in_force_not_before = starts;
                info!(
                    cert = %sources.tls_cert.display(),
                    days_left = expires.map(|expires| (expires - unix_now()).div_euclid(86_400)),
                    "certificate loaded"
                );
                self.slot.replace(key);
                self.state.mark_certificate_loaded();
            }
            Err(reason) if self.state.has_certificate() => error!(
                %reason,
                "certificate refused; the last good certificate stays in force"
            ),
            Err(reason) => error!(
                %reason,
                "certificate refused; none has loaded yet, so TLS handshakes fail until one does"
            ),
        }
        // The count last: whoever sees it go up finds the pair in force and
        // the gauges already set.
        metrics
            .certificate_last_reload_successful
            .set(i64::from(loaded_ok));
        Metrics::count_reload(&metrics.certificate_reloads, loaded_ok);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_load_that_panics_is_a_failed_load_and_is_not_retried_unchanged() {
        let mut last: LastRead<&str> = None;
        let panicking = |_: &&str| -> Result<u8, String> { panic!("a parser bug") };
        let loaded = load_if_changed(&mut last, Ok("rules: []"), panicking);
        assert_eq!(
            loaded,
            Some(Err("loading it panicked (a bug): a parser bug".to_owned()))
        );
        // Tried again when the file changes, not at every poll.
        assert_eq!(load_if_changed(&mut last, Ok("rules: []"), panicking), None);
        let fixed = load_if_changed(&mut last, Ok("rules: [] # fixed"), |_| Ok(1));
        assert_eq!(fixed, Some(Ok(1)));
    }
}
