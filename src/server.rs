//! The process the cluster runs: `/mutate`, `/healthz` and `/readyz` over
//! TLS, `/metrics` over plain HTTP, reloads, and a graceful shutdown.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use arc_swap::ArcSwapOption;
use axum::Router;
use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use bytes::{Bytes, BytesMut};
use http_body_util::BodyExt as _;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, SemaphorePermit, watch};
use tokio_rustls::TlsAcceptor;
use tracing::{debug, error, info, warn};

use crate::admission::{self, ReviewSummary};
use crate::coalesce;
use crate::connection::{self, Activity, Counted, Lifetime, Requests};
use crate::deadline;
use crate::metrics::Metrics;
use crate::policy::Policy;
use crate::pullsecrets::{self, ApiAccess, PullSecretSync};
use crate::readahead::ReadAhead;
use crate::reload::{self, Sources};
use crate::tls::{self, CertificateSlot};

/// What `serve` needs; the CLI fills it from flags and environment.
#[derive(Debug, Clone)]
pub struct ServeOptions {
    pub config: PathBuf,
    pub tls_cert: PathBuf,
    pub tls_key: PathBuf,
    pub listen: SocketAddr,
    pub metrics_listen: SocketAddr,
    /// The webhook's own namespace, never touched.
    pub namespace: Option<String>,
    /// Largest AdmissionReview body accepted; larger gets 413.
    pub max_body_bytes: usize,
    /// How often the config and certificate files are re-read.
    pub reload_interval: Duration,
    /// After SIGTERM, how long `/readyz` fails while requests are still
    /// served, so endpoints stop routing here before the listener closes.
    pub shutdown_delay: Duration,
    /// How long in-flight requests may take to finish after that.
    pub shutdown_grace: Duration,
    /// Slow-client bounds: request headers, and the whole body.
    pub header_read_timeout: Duration,
    pub body_read_timeout: Duration,
    pub max_connections: usize,
    /// Copy pull secrets when an API server is reachable (config may still
    /// turn copying off); `false` never talks to the API.
    pub pull_secret_sync: bool,
}

/// The smallest body limit allowed: what controller-runtime's webhook
/// server reads (an UPDATE review carries two Pods of up to 3 MiB).
pub const MIN_BODY_LIMIT: usize = 7 * 1024 * 1024;
pub const DEFAULT_BODY_LIMIT: usize = 8 * 1024 * 1024;
/// The largest body limit allowed: far past any review (etcd's default
/// object limit is 1.5 MiB), and small enough that the body budget, twice
/// the limit, is counted in `u32` units without overflow.
pub const MAX_BODY_LIMIT: usize = 1024 * 1024 * 1024;

const H2_KEEP_ALIVE_INTERVAL: Duration = Duration::from_secs(30);
const H2_KEEP_ALIVE_TIMEOUT: Duration = Duration::from_secs(10);
/// A peer gone without closing (its node lost) is found by TCP keepalive on
/// every connection, so an idle HTTP/1.1 connection does not hold its slot
/// forever: probes after 30 s idle, every 10 s, closed after 3 unanswered.
const TCP_KEEPALIVE_IDLE: Duration = Duration::from_secs(30);
const TCP_KEEPALIVE_INTERVAL: Duration = Duration::from_secs(10);
const TCP_KEEPALIVE_RETRIES: u32 = 3;
/// Keepalive probes only an idle connection; an answer the peer never
/// acknowledges would otherwise be retransmitted for ~15 minutes
/// (`tcp_retries2`). Also caps the keepalive detection above at a minute.
const TCP_USER_TIMEOUT: Duration = Duration::from_secs(60);
const H2_MAX_CONCURRENT_STREAMS: u32 = 32;
const H2_STREAM_WINDOW: u32 = BODY_FREE_BYTES as u32;
const METRICS_SHUTDOWN_GRACE: Duration = Duration::from_secs(1);
/// Open `/metrics` connections at most; more wait to be accepted. A few
/// Prometheus replicas need one each.
const METRICS_MAX_CONNECTIONS: usize = 64;
/// Bodies being read and decoded at once may hold this many times the body
/// limit in bytes (past each body's free first part); the rest wait (up to
/// the body timeout), then get 503. Bounds what a burst of huge reviews
/// holds, whatever their number.
const BODY_BUDGET_FACTOR: usize = 2;
/// What every body may hold without a reservation: more than a review of an
/// ordinary pod (a few KiB; a pod with a long env list some tens).
const BODY_FREE_BYTES: usize = 64 * 1024;
/// The free first parts of bodies that may grow past them (a declared
/// length over [`BODY_FREE_BYTES`], or none), all together: 256 bodies'
/// worth. Such a body that finds it full reserves from the budget instead.
/// Bodies that declare at most the free part never wait for the budget, so
/// they are not counted: a burst of large ones cannot turn them away.
const FREE_BODY_BYTES_IN_FLIGHT: usize = 256 * BODY_FREE_BYTES;
/// The bytes received of bodies that declare at most [`BODY_FREE_BYTES`],
/// all together: 1024 such bodies' worth, 64 MiB. Past it a small body gets
/// 503 at once. The apiserver's bodies are read in microseconds, so its
/// reviews never come near this; clients that declare a small body, send
/// most of it and stall (32 streams a connection) could otherwise hold
/// 64 KiB each, up to 2 GiB at 1024 connections. Bytes, not bodies: a
/// stalled body that sent nothing holds nothing, so many cheap empty
/// streams cannot turn reviews away.
const SMALL_BODY_BYTES_IN_FLIGHT: usize = 1024 * BODY_FREE_BYTES;
/// Bodies waiting for budget at once, at most; one more gets 503 at once.
/// Each holds what it read (its free part, counted above, and the chunk
/// that took it past that), its connection's buffers and, on HTTP/2, up to
/// a stream window of unread data, so the cap is what bounds all but the
/// first in a burst; a 1 MiB body is read and decoded in
/// milliseconds, so 32 in line still get in well within a webhook timeout.
const MAX_BODIES_WAITING_FOR_BUDGET: usize = 32;
/// hyper's HTTP/1.1 read buffer, at most: the largest chunk a body gets,
/// kept alive while its body waits (hyper's default, ~400 KiB, made the
/// waiting bodies of a burst pin several times what they had read). Also
/// the largest request head accepted (the apiserver's is well under 1 KiB).
const HTTP1_MAX_BUFFER: usize = 64 * 1024;
const BODY_BUDGET_UNIT: usize = 1024;

/// State shared by every request.
pub struct AppState {
    policy: ArcSwapOption<Policy>,
    pull_secrets: std::sync::OnceLock<PullSecretSync>,
    /// In a pod with no API access: pull secrets are given unchecked.
    api_missing_in_pod: AtomicBool,
    certificate_loaded: AtomicBool,
    shutting_down: AtomicBool,
    pub metrics: Arc<Metrics>,
    max_body_bytes: usize,
    body_read_timeout: Duration,
    /// In units of [`BODY_BUDGET_UNIT`] bytes.
    body_budget: Semaphore,
    /// In bytes: the free first parts of bodies that may grow past them.
    free_body_bytes: Semaphore,
    /// A permit per body waiting for `body_budget`.
    waiting_for_budget: Semaphore,
    /// In bytes: what bodies that declare at most the free part received.
    small_body_bytes: Semaphore,
}

impl AppState {
    pub fn new(max_body_bytes: usize, body_read_timeout: Duration) -> Self {
        Self {
            policy: ArcSwapOption::empty(),
            pull_secrets: std::sync::OnceLock::new(),
            api_missing_in_pod: AtomicBool::new(false),
            certificate_loaded: AtomicBool::new(false),
            shutting_down: AtomicBool::new(false),
            metrics: Arc::new(Metrics::new()),
            max_body_bytes,
            body_read_timeout,
            body_budget: Semaphore::new(max_body_bytes * BODY_BUDGET_FACTOR / BODY_BUDGET_UNIT),
            free_body_bytes: Semaphore::new(FREE_BODY_BYTES_IN_FLIGHT),
            waiting_for_budget: Semaphore::new(MAX_BODIES_WAITING_FOR_BUDGET),
            small_body_bytes: Semaphore::new(SMALL_BODY_BYTES_IN_FLIGHT),
        }
    }

    pub fn set_policy(&self, policy: Policy) {
        self.metrics.expose_rules(policy.rules());
        if let Some(sync) = self.pull_secrets.get() {
            sync.configure(&policy);
        }
        self.policy.store(Some(Arc::new(policy)));
    }

    /// Turns on pull secret sync (once), following the current config.
    pub fn enable_pull_secret_sync(&self, sync: PullSecretSync) {
        if let Some(policy) = self.policy.load_full() {
            sync.configure(&policy);
        }
        let _ = self.pull_secrets.set(sync);
    }

    /// Running in a pod whose Kubernetes API configuration did not load:
    /// each admission that gives a pod a pull secret warns and counts a
    /// sync error, as none can be checked or copied.
    pub fn mark_api_missing_in_pod(&self) {
        self.api_missing_in_pod.store(true, Ordering::Relaxed);
    }

    /// Whether a config has loaded since the start.
    pub fn has_policy(&self) -> bool {
        self.policy.load().is_some()
    }

    pub fn mark_certificate_loaded(&self) {
        self.certificate_loaded.store(true, Ordering::Release);
    }

    /// Whether a certificate has loaded since the start.
    pub fn has_certificate(&self) -> bool {
        self.certificate_loaded.load(Ordering::Acquire)
    }

    pub fn begin_shutdown(&self) {
        self.shutting_down.store(true, Ordering::Release);
    }

    /// Ready once a config and a certificate are loaded, until shutdown.
    pub fn is_ready(&self) -> bool {
        self.has_policy() && self.has_certificate() && !self.shutting_down.load(Ordering::Acquire)
    }
}

/// The TLS listener's routes.
pub fn router(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/mutate", post(mutate))
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .with_state(state)
}

/// The plain-HTTP metrics listener's routes.
pub fn metrics_router(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .with_state(state)
}

async fn readyz(State(state): State<Arc<AppState>>) -> Response {
    if state.is_ready() {
        (StatusCode::OK, "ready").into_response()
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "not ready").into_response()
    }
}

/// OpenMetrics for a scraper that asks for it (Prometheus does), else the
/// Prometheus text format 0.0.4 (curl, and scrapers that only read that).
async fn metrics(State(state): State<Arc<AppState>>, headers: HeaderMap) -> Response {
    let (content_type, text) = if wants_openmetrics(&headers) {
        (
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
            state.metrics.encode(),
        )
    } else {
        (
            "text/plain; version=0.0.4; charset=utf-8",
            state.metrics.encode_prometheus_text(),
        )
    };
    (
        [
            (header::CONTENT_TYPE, content_type),
            (header::VARY, "Accept"),
        ],
        text,
    )
        .into_response()
}

/// Whether to answer with OpenMetrics: `Accept` gives it a quality above 0
/// and above that of `text/plain`. On a tie OpenMetrics wins only when named
/// and `text/plain` is not; no `Accept`, or wildcards alone, get the plain
/// text format.
fn wants_openmetrics(headers: &HeaderMap) -> bool {
    let ranges: Vec<(&str, f32)> = headers
        .get_all(header::ACCEPT)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| split_unquoted(value, b','))
        .filter_map(|range| {
            let mut parts = split_unquoted(range, b';').map(str::trim);
            let media = parts.next()?;
            let quality = parts
                .filter_map(|parameter| parameter.split_once('='))
                .find(|(name, _)| name.trim().eq_ignore_ascii_case("q"))
                .map_or(Some(1.0), |(_, q)| qvalue(q.trim()))
                .unwrap_or(0.0);
            Some((media, quality))
        })
        .collect();
    let (openmetrics, named) = accepted(&ranges, "application/openmetrics-text");
    let (plain_text, plain_named) = accepted(&ranges, "text/plain");
    openmetrics > 0.0
        && (openmetrics > plain_text || (openmetrics == plain_text && named && !plain_named))
}

/// `text` split at each `separator` outside an RFC 9110 quoted string
/// (`"…"`, where `\` escapes the next character): a parameter value such as
/// `"a,b;q=0"` stays whole instead of starting a range or a parameter.
fn split_unquoted(text: &str, separator: u8) -> impl Iterator<Item = &str> {
    let mut rest = Some(text);
    std::iter::from_fn(move || {
        let remaining = rest?;
        let (mut quoted, mut escaped) = (false, false);
        for (index, byte) in remaining.bytes().enumerate() {
            if escaped {
                escaped = false;
            } else if quoted && byte == b'\\' {
                escaped = true;
            } else if byte == b'"' {
                quoted = !quoted;
            } else if !quoted && byte == separator {
                rest = Some(&remaining[index + 1..]);
                return Some(&remaining[..index]);
            }
        }
        rest = None;
        Some(remaining)
    })
}

/// An RFC 9110 qvalue (`0` to `1`, at most three decimals); anything else
/// (`nan`, `-1`, `1e3`, `bad`) is `None`, which counts as not acceptable.
fn qvalue(text: &str) -> Option<f32> {
    let (whole, decimals) = text.split_once('.').unwrap_or((text, ""));
    let well_formed = matches!(whole, "0" | "1")
        && decimals.len() <= 3
        && decimals.bytes().all(|b| b.is_ascii_digit())
        && (whole == "0" || decimals.bytes().all(|b| b == b'0'));
    well_formed.then(|| text.parse().ok()).flatten()
}

/// The quality `Accept`'s `ranges` give `media`: that of the most specific
/// range covering it (RFC 9110: `type/subtype`, else `type/*`, else `*/*`;
/// 0 when none does), and whether that range names `media` itself.
fn accepted(ranges: &[(&str, f32)], media: &str) -> (f32, bool) {
    let kind = media.split('/').next().unwrap_or_default();
    let specificity = |range: &str| {
        if range.eq_ignore_ascii_case(media) {
            Some(0)
        } else if range
            .strip_suffix("/*")
            .is_some_and(|range_kind| range_kind.eq_ignore_ascii_case(kind))
        {
            Some(1)
        } else {
            (range == "*/*").then_some(2)
        }
    };
    ranges
        .iter()
        .filter_map(|&(range, quality)| Some((specificity(range)?, quality)))
        .min_by(|a, b| a.0.cmp(&b.0).then(b.1.total_cmp(&a.1)))
        .map_or((0.0, false), |(specificity, quality)| {
            (quality, specificity == 0)
        })
}

fn is_json(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.split(';').next())
        .is_some_and(|media| media.trim().eq_ignore_ascii_case("application/json"))
}

fn plain(status: StatusCode, message: String) -> Response {
    (
        status,
        [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
        message,
    )
        .into_response()
}

async fn mutate(State(state): State<Arc<AppState>>, request: Request) -> Response {
    let started = Instant::now();
    let waiting_for_budget = AtomicBool::new(false);
    let mut on_record = OnRecord {
        state: &state,
        started,
        waiting_for_budget: &waiting_for_budget,
        answered: false,
    };
    let response = answer(&state, request, started, &waiting_for_budget).await;
    on_record.answered = true;
    response
}

/// Puts every review on record, the one its client gave up on included:
/// when the apiserver's timeout passes, or it resets the HTTP/2 stream,
/// hyper drops the handler mid-wait, and that review would otherwise be
/// neither counted nor timed (the overload the alerts watch for among them).
struct OnRecord<'a> {
    state: &'a AppState,
    started: Instant,
    waiting_for_budget: &'a AtomicBool,
    /// `answer` returned: it counted the request itself.
    answered: bool,
}

impl Drop for OnRecord<'_> {
    fn drop(&mut self) {
        let elapsed = self.started.elapsed();
        if std::thread::panicking() {
            // A bug, not a client that went away: its own message is logged
            // by the panic hook, and the review gets no result.
            error!(
                elapsed_ms = elapsed.as_secs_f64() * 1000.0,
                "a review's handler panicked"
            );
        } else if !self.answered {
            let was_waiting_for_budget = self.waiting_for_budget.load(Ordering::Relaxed);
            let result = if was_waiting_for_budget {
                "overloaded"
            } else {
                "cancelled"
            };
            self.state.metrics.count_request(result);
            warn!(
                elapsed_ms = elapsed.as_secs_f64() * 1000.0,
                was_waiting_for_budget, "the client gave up on a review before its answer"
            );
        }
        self.state
            .metrics
            .admission_duration
            .observe(elapsed.as_secs_f64());
    }
}

async fn answer(
    state: &AppState,
    request: Request,
    started: Instant,
    waiting_for_budget: &AtomicBool,
) -> Response {
    let metrics = &state.metrics;
    if !is_json(request.headers()) {
        metrics.count_request("unsupported_media_type");
        return plain(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "Content-Type must be application/json\n".into(),
        );
    }
    let apiserver_timeout = request.uri().query().and_then(deadline::timeout_param);
    let stop_waiting_by =
        apiserver_timeout.map(|timeout| deadline::stop_waiting_by(started, timeout));
    let declared_length = request
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.parse::<usize>().ok());
    let read = tokio::time::timeout(
        state.body_read_timeout,
        read_body(
            state,
            request.into_body(),
            declared_length,
            waiting_for_budget,
            stop_waiting_by,
        ),
    )
    .await;
    let (bytes, hold) = match read {
        Ok(Ok(read)) => read,
        Ok(Err(BodyError::TooLarge)) => {
            metrics.count_request("too_large");
            return plain(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!(
                    "AdmissionReview body exceeds {} bytes\n",
                    state.max_body_bytes
                ),
            );
        }
        Ok(Err(BodyError::Unreadable(error))) => {
            metrics.count_request(if client_gave_up(&error) {
                "cancelled"
            } else {
                "bad_request"
            });
            return plain(
                StatusCode::BAD_REQUEST,
                format!("cannot read body: {error}\n"),
            );
        }
        Ok(Err(BodyError::Overloaded)) => return overloaded(metrics, TOO_MANY_LARGE_BODIES),
        Ok(Err(BodyError::TooManySmallBodies)) => {
            return overloaded(metrics, TOO_MANY_SMALL_BODIES);
        }
        Err(_) if waiting_for_budget.load(Ordering::Relaxed) => {
            return overloaded(metrics, TOO_MANY_LARGE_BODIES);
        }
        Err(_) => {
            metrics.count_request("bad_request");
            return plain(
                StatusCode::REQUEST_TIMEOUT,
                "body not received in time\n".into(),
            );
        }
    };
    let Some(policy) = state.policy.load_full() else {
        metrics.count_request("not_ready");
        return plain(
            StatusCode::SERVICE_UNAVAILABLE,
            "no config loaded yet\n".into(),
        );
    };
    let planned = admission::plan_review(&policy, &bytes);
    // The plan owns what it needs: the body and its hold on the memory
    // bounds go back now, not after the wait for a pull secret copy (up to 3 s).
    drop(hold);
    drop(bytes);
    match planned {
        Ok(mut planned) => {
            let warnings = match (state.pull_secrets.get(), planned.pull_secrets_needed()) {
                (Some(sync), Some(needed)) if needed.dry_run => {
                    sync.warnings_without_copying(&policy, needed.namespace, needed.names)
                }
                (Some(sync), Some(needed)) => {
                    sync.ensure_for_pod(&policy, needed.namespace, needed.names, stop_waiting_by)
                        .await
                }
                (None, Some(needed)) if state.api_missing_in_pod.load(Ordering::Relaxed) => {
                    let warnings =
                        pullsecrets::warnings_without_api(&policy, needed.namespace, needed.names);
                    if !warnings.is_empty() && !needed.dry_run {
                        metrics.pull_secret_sync_errors.inc();
                    }
                    warnings
                }
                _ => Vec::new(),
            };
            for warning in warnings {
                planned.add_warning(warning);
            }
            let reviewed = planned.into_response();
            record(state, &reviewed.summary, started, apiserver_timeout);
            (
                [(header::CONTENT_TYPE, "application/json")],
                Body::from(reviewed.body),
            )
                .into_response()
        }
        Err(error) => {
            metrics.count_request("bad_request");
            warn!(%error, "malformed AdmissionReview");
            plain(StatusCode::BAD_REQUEST, format!("{error}\n"))
        }
    }
}

const TOO_MANY_LARGE_BODIES: &str = "too many large AdmissionReviews in flight; retry\n";
const TOO_MANY_SMALL_BODIES: &str = "too many AdmissionReviews being received at once; retry\n";

/// Whether a body read failed because its client gave up: an HTTP/2 stream
/// it reset (what the apiserver's client does at its timeout), or a
/// connection closed or dropped mid-body. Not a malformed request: no one
/// reads the answer.
fn client_gave_up(error: &axum::Error) -> bool {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(error);
    while let Some(cause) = source {
        if let Some(hyper_error) = cause.downcast_ref::<hyper::Error>()
            && hyper_error.is_incomplete_message()
        {
            return true;
        }
        if let Some(h2_error) = cause.downcast_ref::<h2::Error>() {
            // h2 keeps its I/O error to itself, not as a source.
            if (h2_error.is_reset() && h2_error.is_remote())
                || h2_error.get_io().is_some_and(is_connection_lost)
            {
                return true;
            }
        }
        if let Some(io_error) = cause.downcast_ref::<std::io::Error>()
            && is_connection_lost(io_error)
        {
            return true;
        }
        source = cause.source();
    }
    false
}

/// A connection dropped without TLS close_notify, or reset.
fn is_connection_lost(error: &std::io::Error) -> bool {
    matches!(
        error.kind(),
        std::io::ErrorKind::UnexpectedEof
            | std::io::ErrorKind::ConnectionReset
            | std::io::ErrorKind::ConnectionAborted
            | std::io::ErrorKind::BrokenPipe
    )
}

/// 503, counted as `overloaded`: a memory bound of the body reads is full.
fn overloaded(metrics: &Metrics, reason: &str) -> Response {
    metrics.count_request("overloaded");
    plain(StatusCode::SERVICE_UNAVAILABLE, reason.to_owned())
}

enum BodyError {
    TooLarge,
    Unreadable(axum::Error),
    /// No room in the budget, and [`MAX_BODIES_WAITING_FOR_BUDGET`] bodies
    /// already waiting for it.
    Overloaded,
    /// [`SMALL_BODY_BYTES_IN_FLIGHT`] taken by small bodies being read.
    TooManySmallBodies,
}

/// What a body being read holds of the server's memory bounds: its bytes
/// of the free first parts (when counted), and what it reserved of the
/// budget past them. Given back when the review is decoded.
#[derive(Default)]
struct BodyHold<'a> {
    free: Option<SemaphorePermit<'a>>,
    reserved: Option<SemaphorePermit<'a>>,
    small: Option<SemaphorePermit<'a>>,
}

impl BodyHold<'_> {
    fn free_bytes(&self) -> usize {
        self.free.as_ref().map_or(0, SemaphorePermit::num_permits)
    }
}

/// Reads a body of at most the body limit. The first [`BODY_FREE_BYTES`]
/// need no reservation, so a review of an ordinary pod never waits behind
/// large or slow ones. A body that may grow past them counts them against
/// [`FREE_BODY_BYTES_IN_FLIGHT`] as they arrive; one that actually sends
/// more, or finds that full, reserves, at that moment and in one piece,
/// what it will hold past what it took for free: its declared length, else
/// the limit. One piece, because a body that held part of the budget while
/// waiting for more could deadlock with others doing the same. What a
/// client only announces reserves nothing until it sends more than the
/// free part, or any byte while the free parts are all taken.
/// `waiting_for_budget` tells the caller's timeout which of the two it ran
/// out waiting for.
async fn read_body<'a>(
    state: &'a AppState,
    mut body: Body,
    declared_length: Option<usize>,
    waiting_for_budget: &AtomicBool,
    stop_waiting_by: Option<Instant>,
) -> Result<(Bytes, BodyHold<'a>), BodyError> {
    if declared_length.is_some_and(|length| length > state.max_body_bytes) {
        return Err(BodyError::TooLarge);
    }
    let counts_free_bytes = declared_length.is_none_or(|length| length > BODY_FREE_BYTES);
    let mut collected = Collected::Empty;
    let mut hold = BodyHold::default();
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(BodyError::Unreadable)?;
        let Ok(chunk) = frame.into_data() else {
            continue; // trailers
        };
        let total = collected.len() + chunk.len();
        if total > state.max_body_bytes {
            return Err(BodyError::TooLarge);
        }
        if hold.reserved.is_none()
            && (total > BODY_FREE_BYTES
                || (counts_free_bytes
                    && !take_bytes(&state.free_body_bytes, &mut hold.free, chunk.len())))
        {
            let expected = declared_length.unwrap_or(state.max_body_bytes).max(total);
            let units = (expected - hold.free_bytes()).div_ceil(BODY_BUDGET_UNIT);
            // At most the body limit (at most MAX_BODY_LIMIT) in units:
            // fits, and the budget (a multiple of the limit) can grant it.
            let units = u32::try_from(units).unwrap_or(u32::MAX);
            hold.reserved = Some(reserve(state, units, waiting_for_budget, stop_waiting_by).await?);
            collected.make_room_for(expected);
        }
        if !counts_free_bytes && !take_bytes(&state.small_body_bytes, &mut hold.small, chunk.len())
        {
            return Err(BodyError::TooManySmallBodies);
        }
        collected.push(chunk);
    }
    Ok((collected.into_bytes(), hold))
}

/// Adds `bytes` (at most [`BODY_FREE_BYTES`]) of `pool` to `held`;
/// `false`, taking nothing, when they do not fit.
fn take_bytes<'a>(
    pool: &'a Semaphore,
    held: &mut Option<SemaphorePermit<'a>>,
    bytes: usize,
) -> bool {
    let Ok(taken) = pool.try_acquire_many(u32::try_from(bytes).unwrap_or(u32::MAX)) else {
        return false;
    };
    match held {
        Some(held) => held.merge(taken),
        None => *held = Some(taken),
    }
    true
}

/// `units` of the body budget, waiting for them (up to the caller's
/// timeout, and no later than `stop_waiting_by`, so that the apiserver
/// still reads the 503) only while fewer than
/// [`MAX_BODIES_WAITING_FOR_BUDGET`] bodies wait: past that, a burst is
/// turned away at once instead of piling up bodies half read.
async fn reserve<'a>(
    state: &'a AppState,
    units: u32,
    waiting_for_budget: &AtomicBool,
    stop_waiting_by: Option<Instant>,
) -> Result<SemaphorePermit<'a>, BodyError> {
    if let Ok(reserved) = state.body_budget.try_acquire_many(units) {
        return Ok(reserved);
    }
    let Ok(_in_line) = state.waiting_for_budget.try_acquire() else {
        return Err(BodyError::Overloaded);
    };
    waiting_for_budget.store(true, Ordering::Relaxed);
    let acquire = state.body_budget.acquire_many(units);
    let acquired = match stop_waiting_by {
        Some(deadline) => tokio::time::timeout_at(deadline.into(), acquire)
            .await
            .map_err(|_| BodyError::Overloaded)?,
        None => acquire.await,
    };
    let reserved = acquired.map_err(|_| BodyError::Overloaded)?;
    waiting_for_budget.store(false, Ordering::Relaxed);
    Ok(reserved)
}

/// A body as it arrives: one chunk is kept as it is (the usual case for a
/// small review), several are joined.
enum Collected {
    Empty,
    One(Bytes),
    Many(BytesMut),
}

impl Collected {
    fn len(&self) -> usize {
        match self {
            Collected::Empty => 0,
            Collected::One(bytes) => bytes.len(),
            Collected::Many(bytes) => bytes.len(),
        }
    }

    /// One buffer of room for `total` bytes, so that reaching the reserved
    /// length never doubles the buffer (as growing it chunk by chunk does)
    /// and the body holds what it reserved, not up to twice that.
    fn make_room_for(&mut self, total: usize) {
        let mut joined = match std::mem::replace(self, Collected::Empty) {
            Collected::Many(joined) => joined,
            earlier => {
                let mut joined = BytesMut::with_capacity(total);
                joined.extend_from_slice(&earlier.into_bytes());
                joined
            }
        };
        joined.reserve(total.saturating_sub(joined.len()));
        *self = Collected::Many(joined);
    }

    fn push(&mut self, chunk: Bytes) {
        *self = match std::mem::replace(self, Collected::Empty) {
            Collected::Empty => Collected::One(chunk),
            Collected::One(first) => {
                let mut joined = BytesMut::with_capacity(first.len() + chunk.len());
                joined.extend_from_slice(&first);
                joined.extend_from_slice(&chunk);
                Collected::Many(joined)
            }
            Collected::Many(mut joined) => {
                joined.extend_from_slice(&chunk);
                Collected::Many(joined)
            }
        };
    }

    fn into_bytes(self) -> Bytes {
        match self {
            Collected::Empty => Bytes::new(),
            Collected::One(bytes) => bytes,
            Collected::Many(bytes) => bytes.freeze(),
        }
    }
}

/// Metrics and the one log line per review: identities and counts only,
/// never the pod spec (env values can be secrets). `apiserver_timeout` is
/// the `?timeout=` the apiserver sent, if it parsed.
fn record(
    state: &AppState,
    summary: &ReviewSummary,
    started: Instant,
    apiserver_timeout: Option<Duration>,
) {
    let metrics = &state.metrics;
    let result = match (summary.examined, summary.patched) {
        (false, _) => "skipped",
        (true, true) => "patched",
        (true, false) => "unchanged",
    };
    metrics.count_request(result);
    for image in &summary.rewritten {
        metrics
            .images_rewritten
            .get_or_create(&crate::metrics::RuleLabel {
                rule: image.rule.clone(),
            })
            .inc();
    }
    if summary.unparsable > 0 {
        metrics.images_unparsable.inc_by(summary.unparsable as u64);
    }
    // One event with every field rather than a span recorded field by field.
    // At `info` only when the user was warned: a line for every admission
    // cost a third of the server's CPU per review, and a rewrite is already
    // on record (the pod's original-images annotation, the apiserver's audit
    // annotation, the metrics). `RUST_LOG=image_rewriter=debug` logs them all.
    macro_rules! reviewed {
        ($level:expr) => {
            tracing::event!(
                $level,
                uid = summary.uid,
                namespace = summary.namespace,
                name = summary.name,
                operation = summary.operation,
                result,
                rewritten = summary.rewritten.len(),
                dry_run = summary.dry_run,
                unparsable = summary.unparsable,
                warnings = summary.warnings,
                elapsed_us = started.elapsed().as_micros() as u64,
                apiserver_timeout_ms = apiserver_timeout.map(|timeout| timeout.as_millis() as u64),
                "admission reviewed"
            )
        };
    }
    if summary.warnings > 0 {
        reviewed!(tracing::Level::INFO);
    } else {
        reviewed!(tracing::Level::DEBUG);
    }
}

/// A running server: its bound addresses, and the handle to stop it.
pub struct Server {
    pub https_addr: SocketAddr,
    pub metrics_addr: SocketAddr,
    pub state: Arc<AppState>,
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

impl Server {
    /// Binds both listeners, starts the reload loop, and serves. The first
    /// config and certificate load happen before this returns; if they fail
    /// the server stays up but not ready, and keeps retrying.
    pub async fn start(options: ServeOptions) -> anyhow::Result<Self> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let state = Arc::new(AppState::new(
            options.max_body_bytes.max(MIN_BODY_LIMIT),
            options.body_read_timeout,
        ));
        let slot = Arc::new(CertificateSlot::default());
        let sources = Sources::new(&options, provider.clone());
        let mut watcher = reload::Watcher::new(sources, state.clone(), slot.clone());
        watcher.poll();
        if options.pull_secret_sync {
            match PullSecretSync::connect(state.metrics.clone()).await {
                ApiAccess::Connected(sync) => state.enable_pull_secret_sync(sync),
                ApiAccess::MissingInPod => state.mark_api_missing_in_pod(),
                ApiAccess::OutsideACluster => {}
            }
        }

        let tls_config = tls::server_config(provider, slot)?;
        let acceptor = TlsAcceptor::from(Arc::new(tls_config));
        let https = TcpListener::bind(options.listen)
            .await
            .with_context(|| format!("cannot listen on --listen {}", options.listen))?;
        let metrics = TcpListener::bind(options.metrics_listen)
            .await
            .with_context(|| {
                format!(
                    "cannot listen on --metrics-listen {}",
                    options.metrics_listen
                )
            })?;
        let https_addr = https.local_addr()?;
        let metrics_addr = metrics.local_addr()?;
        let worker_threads = tokio::runtime::Handle::current().metrics().num_workers();
        info!(%https_addr, %metrics_addr, worker_threads, "listening");

        let (stop, stopped) = watch::channel(false);
        let task = tokio::spawn(run(
            options,
            state.clone(),
            acceptor,
            https,
            metrics,
            watcher,
            stopped,
        ));
        Ok(Self {
            https_addr,
            metrics_addr,
            state,
            stop,
            task,
        })
    }

    /// Starts the graceful shutdown: not ready at once, then stop
    /// accepting and drain.
    pub fn shutdown(&self) {
        self.state.begin_shutdown();
        let _ = self.stop.send(true);
    }

    /// Waits until the server has drained and stopped.
    pub async fn wait(self) {
        if let Err(error) = self.task.await {
            error!(%error, "server task failed");
        }
    }
}

async fn run(
    options: ServeOptions,
    state: Arc<AppState>,
    acceptor: TlsAcceptor,
    https: TcpListener,
    metrics: TcpListener,
    mut watcher: reload::Watcher,
    mut stopped: watch::Receiver<bool>,
) {
    let reload_interval = options.reload_interval;
    let mut reload_stop = stopped.clone();
    let reloads = tokio::spawn(async move {
        loop {
            tokio::select! {
                () = tokio::time::sleep(reload_interval) => watcher.poll(),
                _ = reload_stop.changed() => break,
            }
        }
    });

    let metrics_server = tokio::spawn(serve_metrics(
        metrics,
        metrics_router(state.clone()),
        options.header_read_timeout,
        stopped.clone(),
    ));

    // Each connection's task holds a permit until its connection has
    // closed, so having them all back is the drain being done.
    let max_connections = options.max_connections.clamp(1, u32::MAX as usize);
    let connections = Arc::new(Semaphore::new(max_connections));
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(options.header_read_timeout)
        .max_buf_size(HTTP1_MAX_BUFFER)
        .keep_alive(true);
    // Pings also find an HTTP/2 peer that keeps its socket but stopped
    // answering; few streams per connection bound the bodies one connection
    // can hold in memory.
    builder
        .http2()
        .timer(TokioTimer::new())
        .keep_alive_interval(Some(H2_KEEP_ALIVE_INTERVAL))
        .keep_alive_timeout(H2_KEEP_ALIVE_TIMEOUT)
        .max_concurrent_streams(H2_MAX_CONCURRENT_STREAMS)
        // A stream waiting for body budget stops reading; with hyper's
        // defaults (1 MiB for a stream and for the connection) its unread
        // data would fill the connection's window and stall every other
        // review on the apiserver's connection. A stream may hold what a
        // body reads for free, the connection that for all its streams.
        .initial_stream_window_size(H2_STREAM_WINDOW)
        .initial_connection_window_size(H2_STREAM_WINDOW * H2_MAX_CONCURRENT_STREAMS);
    // The protocol comes from ALPN, never from sniffing the first bytes:
    // that phase has no timeout, so a silent client would hold its
    // connection slot forever.
    let http1 = Arc::new(builder.clone().http1_only());
    let http2 = Arc::new(builder.http2_only());

    let tasks = ConnectionTasks {
        acceptor,
        app: router(state.clone()),
        http1,
        http2,
        stopped: stopped.clone(),
        handshake_timeout: options.header_read_timeout,
        // Within the drain's own bound, so a late first request can still
        // be answered before the process exits.
        first_request_within: options.header_read_timeout.min(options.shutdown_grace / 2),
        finish_grace: options.shutdown_grace,
        metrics: state.metrics.clone(),
    };
    while let Some((stream, peer, permit)) = accept(&https, &connections, &mut stopped).await {
        tasks.spawn(stream, peer, permit);
    }
    // Connections the kernel completed before the stop wait in the listen
    // backlog, and closing the listener would reset them: take them in too,
    // so that their first request is answered like any new connection's.
    for (stream, peer, permit) in accept_backlog(&https, &connections) {
        tasks.spawn(stream, peer, permit);
    }
    drop(https);
    info!("stopped accepting; draining connections");
    let drained = connections.acquire_many(max_connections as u32);
    if tokio::time::timeout(options.shutdown_grace, drained)
        .await
        .is_err()
    {
        warn!("grace period over; closing remaining connections");
    }
    let _ = reloads.await;
    let _ = metrics_server.await;
    info!("shut down");
}

/// What each webhook connection's task needs: TLS, the routes, the two
/// protocols' settings, and the bounds of its life.
struct ConnectionTasks {
    acceptor: TlsAcceptor,
    app: Router,
    http1: Arc<auto::Builder<TokioExecutor>>,
    http2: Arc<auto::Builder<TokioExecutor>>,
    stopped: watch::Receiver<bool>,
    handshake_timeout: Duration,
    first_request_within: Duration,
    finish_grace: Duration,
    metrics: Arc<Metrics>,
}

impl ConnectionTasks {
    /// Serves one accepted connection in its own task, which holds
    /// `permit` (its connection slot) until the connection has closed.
    fn spawn(&self, stream: tokio::net::TcpStream, peer: SocketAddr, permit: OwnedSemaphorePermit) {
        let acceptor = self.acceptor.clone();
        let service = TowerToHyperService::new(self.app.clone());
        let (http1, http2) = (self.http1.clone(), self.http2.clone());
        let mut stop = self.stopped.clone();
        let stopping = async move {
            // Err: the server is gone, which is a stop too.
            let _ = stop.wait_for(|stopped| *stopped).await;
        };
        let handshake_timeout = self.handshake_timeout;
        let first_request_within = self.first_request_within;
        let finish_grace = self.finish_grace;
        let metrics = self.metrics.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let stream = ReadAhead::new(stream);
            let mut tls =
                match tokio::time::timeout(handshake_timeout, acceptor.accept(stream)).await {
                    Ok(Ok(tls)) => tls,
                    Ok(Err(error)) => {
                        debug!(%peer, %error, "TLS handshake failed");
                        return;
                    }
                    Err(_) => {
                        debug!(%peer, "TLS handshake timed out");
                        return;
                    }
                };
            let http2_negotiated = tls.get_ref().1.alpn_protocol() == Some(b"h2");
            metrics.count_connection(http2_negotiated);
            if !http2_negotiated {
                tls.get_mut().0.pass_through();
            }
            // Counted over both protocols: a connection that has had no
            // request when the server stops gets to send its first.
            let activity = Arc::new(Activity::default());
            let service = Counted::new(service, activity.clone());
            let requests = Requests {
                activity: &activity,
                idle_close: None,
                first_request_within,
            };
            let served = if http2_negotiated {
                let lifetime = Lifetime {
                    requests: Some(Requests {
                        idle_close: Some(handshake_timeout),
                        ..requests
                    }),
                    finish_grace,
                };
                // Many answers per turn of the connection: send them together.
                let (io, driver) = coalesce::split(tls);
                let connection = http2.serve_connection(TokioIo::new(io), service);
                driver
                    .run(
                        connection::serve(
                            connection,
                            |connection| connection.graceful_shutdown(),
                            lifetime,
                            stopping,
                        ),
                        finish_grace,
                    )
                    .await
            } else {
                let lifetime = Lifetime {
                    requests: Some(requests),
                    finish_grace,
                };
                let connection = http1.serve_connection(TokioIo::new(tls), service);
                connection::serve(
                    connection,
                    |connection| connection.graceful_shutdown(),
                    lifetime,
                    stopping,
                )
                .await
            };
            match served {
                Some(Ok(())) => {}
                Some(Err(error)) => {
                    debug!(%peer, error = %error, "connection ended with an error");
                }
                None => debug!(%peer, "connection closed: idle, or past the grace to finish"),
            }
        });
    }
}

/// The connections waiting in `listener`'s backlog, accepted without
/// waiting, while connection slots last.
fn accept_backlog(
    listener: &TcpListener,
    connections: &Arc<Semaphore>,
) -> Vec<(tokio::net::TcpStream, SocketAddr, OwnedSemaphorePermit)> {
    let mut accepted = Vec::new();
    // The accept call itself, not tokio's readiness, which the reactor may
    // not have updated yet for the last connections.
    let socket = socket2::SockRef::from(listener);
    while let Ok(permit) = connections.clone().try_acquire_owned() {
        let Ok((stream, peer)) = socket.accept() else {
            break;
        };
        let Some(peer) = peer.as_socket() else {
            continue;
        };
        let stream = std::net::TcpStream::from(stream);
        let registered = stream
            .set_nonblocking(true)
            .and_then(|()| tokio::net::TcpStream::from_std(stream));
        match registered {
            Ok(stream) => {
                tune(&stream, peer);
                accepted.push((stream, peer, permit));
            }
            Err(error) => debug!(%peer, %error, "could not take a connection from the backlog"),
        }
    }
    accepted
}

/// `/metrics` over plain HTTP/1.1, with the bounds of the webhook's own
/// listener: a request head within `header_read_timeout` (which also ends
/// idle keep-alive connections) and a cap on connections, so scrapers, or
/// clients that connect and send nothing, cannot pile up connections that
/// take file descriptors and memory from the webhook. At `stopped`, a
/// scrape stuck mid-request gets [`METRICS_SHUTDOWN_GRACE`], not more.
async fn serve_metrics(
    listener: TcpListener,
    router: Router,
    header_read_timeout: Duration,
    mut stopped: watch::Receiver<bool>,
) {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(header_read_timeout)
        .max_buf_size(HTTP1_MAX_BUFFER)
        .keep_alive(true);
    let http1 = Arc::new(builder.http1_only());
    let connections = Arc::new(Semaphore::new(METRICS_MAX_CONNECTIONS));
    while let Some((stream, peer, permit)) = accept(&listener, &connections, &mut stopped).await {
        let service = TowerToHyperService::new(router.clone());
        let http1 = http1.clone();
        let mut stop = stopped.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let connection = http1.serve_connection(TokioIo::new(stream), service);
            let lifetime = Lifetime {
                requests: None,
                finish_grace: METRICS_SHUTDOWN_GRACE,
            };
            let stopping = async move {
                let _ = stop.wait_for(|stopped| *stopped).await;
            };
            let served = connection::serve(
                connection,
                |connection| connection.graceful_shutdown(),
                lifetime,
                stopping,
            )
            .await;
            if let Some(Err(error)) = served {
                debug!(%peer, %error, "metrics connection ended with an error");
            }
        });
    }
    drop(listener);
    let drained = connections.acquire_many(METRICS_MAX_CONNECTIONS as u32);
    let _ = tokio::time::timeout(METRICS_SHUTDOWN_GRACE, drained).await;
}

/// The next connection on `listener`, tuned, with the slot of
/// `connections` it holds until it closes (waiting for a free slot before
/// accepting); `None` once `stopped` changes.
async fn accept(
    listener: &TcpListener,
    connections: &Arc<Semaphore>,
    stopped: &mut watch::Receiver<bool>,
) -> Option<(tokio::net::TcpStream, SocketAddr, OwnedSemaphorePermit)> {
    let permit = tokio::select! {
        permit = connections.clone().acquire_owned() => permit.ok()?,
        _ = stopped.changed() => return None,
    };
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    // Out of file descriptors and the like: back off, don't spin.
                    warn!(%error, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = stopped.changed() => return None,
        };
        tune(&stream, peer);
        return Some((stream, peer, permit));
    }
}

/// [`tune_accepted`], whose failure costs only the tuning: logged, and
/// the connection served.
fn tune(stream: &tokio::net::TcpStream, peer: SocketAddr) {
    if let Err(error) = tune_accepted(stream) {
        debug!(%peer, %error, "could not set TCP_NODELAY, keepalive or TCP_USER_TIMEOUT");
    }
}

/// Answers leave at once (no Nagle delay), and a peer that vanished without
/// closing is found within about a minute, idle or not. Each option is set
/// even if another fails; the first error is returned.
fn tune_accepted(stream: &tokio::net::TcpStream) -> std::io::Result<()> {
    let socket = socket2::SockRef::from(stream);
    let keepalive = socket2::TcpKeepalive::new()
        .with_time(TCP_KEEPALIVE_IDLE)
        .with_interval(TCP_KEEPALIVE_INTERVAL)
        .with_retries(TCP_KEEPALIVE_RETRIES);
    let results = [
        stream.set_nodelay(true),
        socket.set_tcp_keepalive(&keepalive),
        socket.set_tcp_user_timeout(Some(TCP_USER_TIMEOUT)),
    ];
    results.into_iter().collect()
}

/// Runs until SIGTERM or SIGINT, then shuts down gracefully.
pub async fn serve_until_signal(options: ServeOptions) -> anyhow::Result<()> {
    let delay = options.shutdown_delay;
    // Listen before the server can report ready: until a handler is
    // installed, SIGTERM's default action kills the process without the
    // drain (seen once in CI, under load, right after /readyz said 200).
    let signalled = shutdown_signal()?;
    let server = Server::start(options).await?;
    signalled.await;
    info!(
        delay_ms = delay.as_millis() as u64,
        "shutdown signal received; not ready"
    );
    server.state.begin_shutdown();
    tokio::time::sleep(delay).await;
    server.shutdown();
    server.wait().await;
    Ok(())
}

/// Installs the SIGTERM and SIGINT handlers now; the future completes at
/// the first of them.
fn shutdown_signal() -> anyhow::Result<impl std::future::Future<Output = ()>> {
    use anyhow::Context as _;
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    Ok(async move {
        tokio::select! {
            _ = term.recv() => {},
            _ = int.recv() => {},
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A CREATE review of a pod with one Docker Hub image.
    const REVIEW: &str = r#"{
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "request": {
            "uid": "705ab4f5-6393-11e8-b7cc-42010a800002",
            "kind": {"group": "", "version": "v1", "kind": "Pod"},
            "resource": {"group": "", "version": "v1", "resource": "pods"},
            "namespace": "team-a",
            "operation": "CREATE",
            "userInfo": {"username": "system:serviceaccount:kube-system:replicaset-controller"},
            "object": {
                "apiVersion": "v1",
                "kind": "Pod",
                "metadata": {"name": "web", "namespace": "team-a"},
                "spec": {"containers": [{"name": "web", "image": "nginx:1.27"}]}
            },
            "dryRun": false
        }
    }"#;

    fn state_with_policy(body_read_timeout: Duration) -> AppState {
        let state = AppState::new(MIN_BODY_LIMIT, body_read_timeout);
        let config = crate::config::ConfigFile::from_yaml(
            "rules:\n  - match: docker.io\n    target: harbor.corp.example/dockerhub\n",
        )
        .expect("config");
        state.set_policy(config.into_policy(None).expect("policy"));
        state
    }

    fn review_request(body: Body, content_length: Option<usize>) -> Request {
        let mut request = Request::new(body);
        let headers = request.headers_mut();
        headers.insert(
            header::CONTENT_TYPE,
            "application/json".parse().expect("type"),
        );
        if let Some(length) = content_length {
            headers.insert(header::CONTENT_LENGTH, length.into());
        }
        request
    }

    /// All of the body budget, held until dropped.
    fn the_whole_budget(state: &AppState) -> SemaphorePermit<'_> {
        let everything = state.body_budget.available_permits() as u32;
        state
            .body_budget
            .try_acquire_many(everything)
            .expect("nothing else holds the budget")
    }

    /// [`REVIEW`] padded to over 1 MiB: past the free part, within the limit.
    fn large_review() -> Vec<u8> {
        let mut padded: serde_json::Value = serde_json::from_str(REVIEW).expect("fixture");
        padded["request"]["object"]["metadata"]["annotations"]["padding"] =
            "x".repeat(1024 * 1024).into();
        serde_json::to_vec(&padded).expect("encode")
    }

    /// A body that sends `first` and then never another byte.
    fn stalled_body(first: Bytes) -> Body {
        use futures::StreamExt as _;
        let stream = futures::stream::iter([Ok::<_, std::io::Error>(first)])
            .chain(futures::stream::pending());
        Body::from_stream(stream)
    }

    async fn answer_now(state: &AppState, request: Request) -> StatusCode {
        answer(state, request, Instant::now(), &AtomicBool::new(false))
            .await
            .status()
    }

    /// The whole budget held by bodies already read: a large body waits and
    /// gets 503 when the body timeout passes, a review of an ordinary pod
    /// (under the free part) is answered at once, and once the budget is
    /// back the large body gets in.
    #[tokio::test]
    async fn a_full_budget_turns_away_large_bodies_and_never_small_reviews() {
        let state = state_with_policy(Duration::from_millis(200));
        let everything = state.body_budget.available_permits() as u32;
        let held = the_whole_budget(&state);

        let small = review_request(Body::from(REVIEW), Some(REVIEW.len()));
        assert_eq!(answer_now(&state, small).await, StatusCode::OK);

        let large = large_review();
        let request = review_request(Body::from(large.clone()), Some(large.len()));
        assert_eq!(
            answer_now(&state, request).await,
            StatusCode::SERVICE_UNAVAILABLE
        );

        drop(held);
        let request = review_request(Body::from(large.clone()), Some(large.len()));
        assert_eq!(answer_now(&state, request).await, StatusCode::OK);
        assert_eq!(state.body_budget.available_permits() as u32, everything);
        let scrape = state.metrics.encode();
        assert!(
            scrape.contains("image_rewriter_admission_requests_total{result=\"overloaded\"} 1"),
            "{scrape}"
        );
    }

    /// The free parts of bodies that may grow filling their allowance, and
    /// the budget full too: a review that declares an ordinary length is
    /// still answered (never counted, it never waits); one that declares no
    /// length has to reserve instead, and is turned away until the budget
    /// has room.
    #[tokio::test]
    async fn a_full_free_allowance_turns_away_only_bodies_that_may_grow() {
        let state = state_with_policy(Duration::from_millis(200));
        let everything = state.body_budget.available_permits();
        let all_free = state
            .free_body_bytes
            .try_acquire_many(FREE_BODY_BYTES_IN_FLIGHT as u32)
            .expect("all of it");
        let held = the_whole_budget(&state);

        let declared = review_request(Body::from(REVIEW), Some(REVIEW.len()));
        assert_eq!(answer_now(&state, declared).await, StatusCode::OK);
        let undeclared = review_request(Body::from(REVIEW), None);
        assert_eq!(
            answer_now(&state, undeclared).await,
            StatusCode::SERVICE_UNAVAILABLE
        );

        drop(held);
        let undeclared = review_request(Body::from(REVIEW), None);
        assert_eq!(answer_now(&state, undeclared).await, StatusCode::OK);
        drop(all_free);
        assert_eq!(
            state.free_body_bytes.available_permits(),
            FREE_BODY_BYTES_IN_FLIGHT
        );
        assert_eq!(state.body_budget.available_permits(), everything);
    }

    /// Small bodies that stall hold what they sent until the body timeout
    /// (one that sent nothing holds nothing); with all those bytes taken the
    /// next small review gets 503 at once, while one that declares no length
    /// (counted against the free allowance instead) is still answered; the
    /// bytes come back.
    #[tokio::test]
    async fn stalled_small_bodies_hold_what_they_sent_and_no_more_than_the_bound() {
        let state = state_with_policy(Duration::from_millis(300));
        let all = SMALL_BODY_BYTES_IN_FLIGHT;
        let available = || state.small_body_bytes.available_permits();
        let sent_nothing = review_request(stalled_body(Bytes::new()), Some(REVIEW.len()));
        let sent_some = review_request(
            stalled_body(Bytes::from_static(&REVIEW.as_bytes()[..100])),
            Some(REVIEW.len()),
        );
        let (nothing, some, ()) = tokio::join!(
            answer_now(&state, sent_nothing),
            answer_now(&state, sent_some),
            async {
                let counted = async {
                    while available() == all {
                        tokio::task::yield_now().await;
                    }
                };
                tokio::time::timeout(Duration::from_secs(5), counted)
                    .await
                    .expect("the stalled small body was never counted");
                assert_eq!(available(), all - 100, "counted: the bytes sent");
                let rest = state
                    .small_body_bytes
                    .try_acquire_many(available() as u32)
                    .expect("the rest");
                let small = review_request(Body::from(REVIEW), Some(REVIEW.len()));
                assert_eq!(
                    answer_now(&state, small).await,
                    StatusCode::SERVICE_UNAVAILABLE
                );
                let undeclared = review_request(Body::from(REVIEW), None);
                assert_eq!(answer_now(&state, undeclared).await, StatusCode::OK);
                drop(rest);
            }
        );
        assert_eq!(nothing, StatusCode::REQUEST_TIMEOUT);
        assert_eq!(some, StatusCode::REQUEST_TIMEOUT);
        assert_eq!(available(), all);
        let small = review_request(Body::from(REVIEW), Some(REVIEW.len()));
        assert_eq!(answer_now(&state, small).await, StatusCode::OK);
        assert_eq!(available(), all);
        let scrape = state.metrics.encode();
        assert!(
            scrape.contains("image_rewriter_admission_requests_total{result=\"overloaded\"} 1"),
            "{scrape}"
        );
    }

    /// Bodies past their free part while the budget is full wait for it,
    /// but only so many at once: one more is turned away at once, not after
    /// the body timeout, and the waiting ones get 503 at the timeout.
    #[tokio::test]
    async fn past_the_waiting_limit_large_bodies_are_turned_away_at_once() {
        let body_timeout = Duration::from_secs(1);
        let state = Arc::new(state_with_policy(body_timeout));
        let everything = state.body_budget.available_permits() as u32;
        let held = the_whole_budget(&state);
        let past_the_free_part = || {
            let first = Bytes::from(vec![b' '; BODY_FREE_BYTES + 1]);
            review_request(stalled_body(first), Some(1024 * 1024))
        };
        let waiting: Vec<_> = (0..MAX_BODIES_WAITING_FOR_BUDGET)
            .map(|_| {
                let state = state.clone();
                let request = past_the_free_part();
                tokio::spawn(async move { answer_now(&state, request).await })
            })
            .collect();
        tokio::time::timeout(body_timeout / 2, async {
            while state.waiting_for_budget.available_permits() > 0 {
                tokio::task::yield_now().await;
            }
        })
        .await
        .expect("every body past its free part waits for the budget");

        let started = Instant::now();
        assert_eq!(
            answer_now(&state, past_the_free_part()).await,
            StatusCode::SERVICE_UNAVAILABLE
        );
        assert!(
            started.elapsed() < body_timeout / 2,
            "{:?}",
            started.elapsed()
        );
        for waiting in waiting {
            assert_eq!(
                waiting.await.expect("task"),
                StatusCode::SERVICE_UNAVAILABLE
            );
        }
        assert_eq!(
            state.waiting_for_budget.available_permits(),
            MAX_BODIES_WAITING_FOR_BUDGET
        );
        drop(held);
        assert_eq!(state.body_budget.available_permits() as u32, everything);
    }

    /// What a client only claims it will send reserves nothing: bodies that
    /// declare the whole limit and stall hold no budget, end with 408 at the
    /// body timeout, and a review sent meanwhile is answered at once.
    #[tokio::test]
    async fn stalled_bodies_hold_no_budget() {
        // The body timeout is long enough that "at once" below cannot be a
        // busy machine's luck, and short enough for a unit test.
        let body_timeout = Duration::from_secs(2);
        let state = Arc::new(state_with_policy(body_timeout));
        let everything = state.body_budget.available_permits();
        const FIRST_BYTES: &[u8] = b"{\"apiVersion\"";
        let stalled: Vec<_> = (0..4)
            .map(|_| {
                let state = state.clone();
                tokio::spawn(async move {
                    let body = stalled_body(Bytes::from_static(FIRST_BYTES));
                    let request = review_request(body, Some(MIN_BODY_LIMIT));
                    answer_now(&state, request).await
                })
            })
            .collect();
        let all_free = FREE_BODY_BYTES_IN_FLIGHT;
        tokio::time::timeout(body_timeout / 2, async {
            while state.free_body_bytes.available_permits() > all_free - 4 * FIRST_BYTES.len() {
                tokio::task::yield_now().await;
            }
        })
        .await
        .expect("every stalled body read its first bytes, counted as free");
        assert_eq!(state.body_budget.available_permits(), everything);

        let started = Instant::now();
        let small = review_request(Body::from(REVIEW), None);
        assert_eq!(answer_now(&state, small).await, StatusCode::OK);
        assert!(
            started.elapsed() < body_timeout / 2,
            "{:?}",
            started.elapsed()
        );

        for stalled in stalled {
            assert_eq!(stalled.await.expect("task"), StatusCode::REQUEST_TIMEOUT);
        }
        assert_eq!(state.body_budget.available_permits(), everything);
        assert_eq!(state.free_body_bytes.available_permits(), all_free);
    }

    /// A body that reserved its length is collected in one buffer of that
    /// length: it holds what it reserved, not the up to twice that of a
    /// buffer doubled as chunks arrive.
    #[test]
    fn a_reserved_body_is_collected_in_one_buffer_of_its_length() {
        let chunk = Bytes::from(vec![b'x'; 16 * 1024]);
        let total = 10 * chunk.len() + 1;
        let mut collected = Collected::Empty;
        collected.push(chunk.clone());
        collected.make_room_for(total);
        for _ in 1..10 {
            collected.push(chunk.clone());
        }
        collected.push(Bytes::from_static(b"}"));
        let Collected::Many(joined) = &collected else {
            panic!("more than one chunk is joined");
        };
        assert_eq!((joined.len(), joined.capacity()), (total, total));
        let bytes = collected.into_bytes();
        assert!(bytes[..total - 1].iter().all(|&b| b == b'x') && bytes[total - 1] == b'}');
    }

    /// A body fed by the test, chunk by chunk.
    fn fed_body() -> (tokio::sync::mpsc::UnboundedSender<Bytes>, Body) {
        let (feed, chunks) = tokio::sync::mpsc::unbounded_channel::<Bytes>();
        let stream = futures::stream::unfold(chunks, |mut chunks| async move {
            let chunk = chunks.recv().await?;
            Some((Ok::<_, std::io::Error>(chunk), chunks))
        });
        (feed, Body::from_stream(stream))
    }

    /// Three large bodies arriving interleaved, together more than the
    /// budget: none may hold part of it while waiting for more (they would
    /// wait for each other until the timeout); two are read, the third
    /// waits for them, and all three are answered.
    #[tokio::test]
    async fn large_bodies_arriving_together_never_deadlock() {
        let state = Arc::new(state_with_policy(Duration::from_secs(20)));
        let mut padded: serde_json::Value = serde_json::from_str(REVIEW).expect("review");
        padded["request"]["object"]["metadata"]["annotations"] =
            serde_json::json!({"padding": "x".repeat(5 * 1024 * 1024)});
        let large = Bytes::from(serde_json::to_vec(&padded).expect("encode"));
        assert!(3 * large.len() > MIN_BODY_LIMIT * BODY_BUDGET_FACTOR);

        let mut feeds = Vec::new();
        let mut answers = Vec::new();
        for _ in 0..3 {
            let (feed, body) = fed_body();
            feeds.push(feed);
            let state = state.clone();
            let request = review_request(body, Some(large.len()));
            answers.push(tokio::spawn(
                async move { answer_now(&state, request).await },
            ));
        }
        let mut offset = 0;
        while offset < large.len() {
            let end = (offset + 16 * 1024).min(large.len());
            for feed in &feeds {
                let _ = feed.send(large.slice(offset..end));
            }
            offset = end;
            tokio::task::yield_now().await;
        }
        drop(feeds);
        for answer in answers {
            assert_eq!(answer.await.expect("task"), StatusCode::OK);
        }
        assert_eq!(
            state.body_budget.available_permits(),
            MIN_BODY_LIMIT * BODY_BUDGET_FACTOR / BODY_BUDGET_UNIT
        );
        assert_eq!(
            state.free_body_bytes.available_permits(),
            FREE_BODY_BYTES_IN_FLIGHT
        );
    }

    /// An API server that accepts connections and never answers; the
    /// first line of each request it is sent goes to the receiver.
    async fn silent_api() -> (String, tokio::sync::mpsc::UnboundedReceiver<String>) {
        use tokio::io::AsyncBufReadExt as _;
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let url = format!("http://{}", listener.local_addr().expect("addr"));
        let (seen, request_lines) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let seen = seen.clone();
                tokio::spawn(async move {
                    let mut stream = tokio::io::BufReader::new(stream);
                    let mut line = String::new();
                    if stream.read_line(&mut line).await.is_ok() {
                        let _ = seen.send(line);
                    }
                    // Held open, unanswered, until the test ends.
                    std::future::pending::<()>().await;
                    drop(stream);
                });
            }
        });
        (url, request_lines)
    }

    /// A server state whose pods need the pull secret `harbor-pull`
    /// (`waitForCopy: 3s`), synced through an API server that never answers
    /// (see [`silent_api`]).
    async fn syncing_with_a_silent_api()
    -> (Arc<AppState>, tokio::sync::mpsc::UnboundedReceiver<String>) {
        let (api_url, api_requests) = silent_api().await;
        let api_config = kube::Config::new(api_url.parse().expect("url"));
        let client = kube::Client::try_from(api_config).expect("client");
        let state = Arc::new(AppState::new(MIN_BODY_LIMIT, Duration::from_secs(5)));
        let config = crate::config::ConfigFile::from_yaml(
            "rules:\n  - match: docker.io\n    target: harbor.corp.example/dockerhub\n    \
             pullSecret: harbor-pull\npullSecretSync:\n  sourceNamespace: image-rewriter\n  \
             waitForCopy: 3s\n",
        )
        .expect("config");
        state.set_policy(config.into_policy(None).expect("policy"));
        state.enable_pull_secret_sync(PullSecretSync::start(client, state.metrics.clone()));
        (state, api_requests)
    }

    /// Waits (at most 5 s) until the copy's first call, which reads the
    /// source secret, reaches the silent API server.
    async fn the_copy_asks_for_its_source(
        api_requests: &mut tokio::sync::mpsc::UnboundedReceiver<String>,
    ) {
        let source_secret = "/api/v1/namespaces/image-rewriter/secrets/harbor-pull ";
        tokio::time::timeout(Duration::from_secs(5), async {
            while let Some(line) = api_requests.recv().await {
                if line.contains(source_secret) {
                    return;
                }
            }
        })
        .await
        .expect("the copy asks the API server for the source secret");
    }

    /// A large review whose pod needs a pull secret copy gives its body
    /// budget back once decoded: while the copy is awaited (the API server
    /// here never answers, so for the whole waitForCopy) the budget is full
    /// again, and the review is still answered when the wait ends.
    #[tokio::test]
    async fn the_budget_is_back_while_a_pull_secret_copy_is_awaited() {
        let (state, mut api_requests) = syncing_with_a_silent_api().await;
        let everything = state.body_budget.available_permits();

        let large = large_review();
        let request = review_request(Body::from(large.clone()), Some(large.len()));
        let started = Instant::now();
        let answer = {
            let state = state.clone();
            tokio::spawn(async move { answer_now(&state, request).await })
        };
        // The copy's first call: the review has been decoded and waits.
        the_copy_asks_for_its_source(&mut api_requests).await;
        assert!(!answer.is_finished(), "the review waits for the copy");
        assert_eq!(state.body_budget.available_permits(), everything);

        assert_eq!(answer.await.expect("task"), StatusCode::OK);
        assert!(
            started.elapsed() >= Duration::from_secs(3),
            "waited for the copy"
        );
    }

    /// A review dropped while it waits for a copy (its client gave up: hyper
    /// drops the handler) is counted `cancelled` and timed.
    #[tokio::test]
    async fn a_review_abandoned_during_the_wait_for_a_copy_is_on_record() {
        let (state, mut api_requests) = syncing_with_a_silent_api().await;
        let request = review_request(Body::from(REVIEW), Some(REVIEW.len()));
        let review = tokio::spawn(mutate(State(state.clone()), request));
        the_copy_asks_for_its_source(&mut api_requests).await;
        assert!(!review.is_finished(), "answered before the copy came");
        review.abort();
        assert!(review.await.expect_err("aborted").is_cancelled());

        let text = state.metrics.encode();
        assert!(
            text.contains("image_rewriter_admission_requests_total{result=\"cancelled\"} 1\n"),
            "{text}"
        );
        assert!(
            text.contains("image_rewriter_admission_duration_seconds_count 1\n"),
            "{text}"
        );
    }

    /// The apiserver's `?timeout=` ends the wait for a copy before it ends
    /// the apiserver's own wait: with 2 s left there, a review whose copy
    /// never comes (`waitForCopy: 3s`) is answered after 0.5 s
    /// ([`deadline::ANSWER_RESERVE`] kept back), not after 3 s.
    #[tokio::test]
    async fn the_wait_for_a_copy_ends_before_the_apiservers_timeout() {
        let (state, mut api_requests) = syncing_with_a_silent_api().await;

        let mut request = review_request(Body::from(REVIEW), Some(REVIEW.len()));
        *request.uri_mut() = "/mutate?timeout=2s".parse().expect("uri");
        let started = Instant::now();
        let status = answer(&state, request, started, &AtomicBool::new(false))
            .await
            .status();
        let took = started.elapsed();
        assert_eq!(status, StatusCode::OK);
        // The wait was for a copy under way.
        the_copy_asks_for_its_source(&mut api_requests).await;
        assert!(
            took >= Duration::from_millis(500) && took < Duration::from_millis(1500),
            "answered after {took:?}, not 2 s less the reserve"
        );
    }

    /// Each rule in force has its `images_rewritten_total` series from the
    /// moment its config loads, at 0: `increase()` cannot see the first
    /// rewrite of a series born at 1, so a rule's first rewrite after a
    /// start (or a reload that adds the rule) would be lost.
    #[test]
    fn every_rule_in_force_has_its_rewrite_count_at_zero() {
        let rewritten = |state: &AppState| -> Vec<String> {
            state
                .metrics
                .encode_prometheus_text()
                .lines()
                .filter(|line| line.starts_with("image_rewriter_images_rewritten_total"))
                .map(str::to_owned)
                .collect()
        };
        let state = state_with_policy(Duration::from_secs(1));
        assert_eq!(
            rewritten(&state),
            ["image_rewriter_images_rewritten_total{rule=\"docker.io\"} 0"]
        );
        let text = state.metrics.encode_prometheus_text();
        assert!(
            text.contains("# TYPE image_rewriter_images_rewritten_total counter\n"),
            "{text}"
        );
        // A reload that adds a rule (written as the legacy Docker Hub host,
        // labelled as its match reads) adds its series; the count of a rule
        // already there is kept.
        state
            .metrics
            .images_rewritten
            .get_or_create(&crate::metrics::RuleLabel {
                rule: "docker.io".into(),
            })
            .inc();
        let config = crate::config::ConfigFile::from_yaml(
            "rules:\n  - match: index.docker.io\n    target: harbor.corp.example/dockerhub\n  \
             - match: quay.io\n    target: harbor.corp.example/quay\n",
        )
        .expect("config");
        state.set_policy(config.into_policy(None).expect("policy"));
        let mut series = rewritten(&state);
        series.sort();
        assert_eq!(
            series,
            [
                "image_rewriter_images_rewritten_total{rule=\"docker.io\"} 1",
                "image_rewriter_images_rewritten_total{rule=\"quay.io\"} 0",
            ]
        );
    }

    #[test]
    fn openmetrics_only_when_asked_for_and_preferred() {
        let accepting = |values: &[&str]| {
            let mut headers = HeaderMap::new();
            for value in values {
                headers.append(header::ACCEPT, value.parse().expect("header"));
            }
            wants_openmetrics(&headers)
        };
        // Prometheus 2.42's scrape header.
        assert!(accepting(&[
            "application/openmetrics-text;version=1.0.0,application/openmetrics-text;\
             version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1"
        ]));
        assert!(accepting(&["application/openmetrics-text"]));
        assert!(accepting(&[
            "text/plain;q=0.2",
            "Application/OpenMetrics-Text ; q=0.3"
        ]));
        // A scraper that prefers the plain format, and those that name none.
        assert!(!accepting(&[
            "text/plain;version=0.0.4;q=1,application/openmetrics-text;q=0.5"
        ]));
        assert!(!accepting(&["*/*"]));
        assert!(!accepting(&[]));
        // `*/*` covers text/plain at 1 here, above OpenMetrics' 0.5.
        assert!(!accepting(&["application/openmetrics-text;q=0.5, */*"]));
        assert!(!accepting(&[
            "application/openmetrics-text;q=0.5, text/*;q=0.6"
        ]));
        // Named, and tied with a wildcard only: OpenMetrics.
        assert!(accepting(&["application/openmetrics-text, */*"]));
        // Covered by `application/*` at 1, above text/plain's 0.9.
        assert!(accepting(&["application/*, text/*;q=0.9"]));
        // A q that is not an RFC 9110 qvalue counts as 0, never above 1.
        assert!(accepting(&[
            "application/openmetrics-text, text/plain;q=nan"
        ]));
        assert!(!accepting(&[
            "application/openmetrics-text;q=1e3, text/plain;q=0.5"
        ]));
        assert!(!accepting(&["application/openmetrics-text;q=-1"]));
        assert!(!accepting(&["application/openmetrics-text;q=1.5"]));
        assert!(accepting(&["application/openmetrics-text;q=0.001"]));
        assert!(accepting(&[
            "application/openmetrics-text;q=1.000, text/plain;q=0.999"
        ]));
        assert!(!accepting(&["application/openmetrics-text;q=0.0001"]));
        // A specific range overrides a wildcard's quality.
        assert!(accepting(&[
            "application/openmetrics-text, text/plain;q=0, */*"
        ]));
        assert!(!accepting(&["application/openmetrics-text;q=0, */*"]));
        assert!(!accepting(&["application/openmetrics-text;q=0"]));
        assert!(!accepting(&["application/openmetrics-text;q=bad"]));
        // Separators inside a quoted parameter value split nothing.
        assert!(accepting(&[
            r#"text/plain;note="a,b;q=1";q=0.1, application/openmetrics-text;q=0.5"#
        ]));
        assert!(!accepting(&[
            r#"application/openmetrics-text;note="x\";q=1,y";q=0.2, text/plain;q=0.3"#
        ]));
    }

    /// Past the limit, declared or not: 413 without waiting for the rest.
    #[tokio::test]
    async fn bodies_past_the_limit_get_413() {
        let state = state_with_policy(Duration::from_secs(5));
        let declared = review_request(
            stalled_body(Bytes::from_static(b"{")),
            Some(MIN_BODY_LIMIT + 1),
        );
        assert_eq!(
            answer_now(&state, declared).await,
            StatusCode::PAYLOAD_TOO_LARGE
        );
        let sent = review_request(Body::from(vec![b' '; MIN_BODY_LIMIT + 1]), None);
        assert_eq!(
            answer_now(&state, sent).await,
            StatusCode::PAYLOAD_TOO_LARGE
        );
    }

    /// At a stop, connections the kernel completed but the server had not
    /// accepted yet are taken from the backlog, as many as there are slots;
    /// the rest stay where they were.
    #[tokio::test]
    async fn the_backlog_is_taken_in_while_slots_last() {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let address = listener.local_addr().expect("addr");
        let mut clients = Vec::new();
        for _ in 0..3 {
            clients.push(
                tokio::net::TcpStream::connect(address)
                    .await
                    .expect("connect"),
            );
        }
        let slots = Arc::new(Semaphore::new(2));
        let taken = accept_backlog(&listener, &slots);
        assert_eq!(taken.len(), 2);
        assert_eq!(slots.available_permits(), 0);
        let client_ports: Vec<u16> = clients
            .iter()
            .map(|client| client.local_addr().expect("addr").port())
            .collect();
        for (stream, peer, _) in &taken {
            assert!(client_ports.contains(&peer.port()));
            assert!(
                stream.nodelay().expect("TCP_NODELAY"),
                "tuned like any accepted one"
            );
        }
        drop(taken);
        let (_, peer) = listener.accept().await.expect("the third is still waiting");
        assert!(client_ports.contains(&peer.port()));
        assert!(accept_backlog(&listener, &slots).is_empty());
    }

    #[tokio::test]
    async fn accepted_connections_get_nodelay_and_keepalive() {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let client = tokio::net::TcpStream::connect(listener.local_addr().expect("addr"));
        let (accepted, _client) = tokio::join!(listener.accept(), client);
        let (stream, _) = accepted.expect("accept");
        let socket = socket2::SockRef::from(&stream);
        assert!(!socket.keepalive().expect("SO_KEEPALIVE"), "off before");

        tune_accepted(&stream).expect("tuned");
        assert!(stream.nodelay().expect("TCP_NODELAY"));
        assert!(socket.keepalive().expect("SO_KEEPALIVE"));
        assert_eq!(
            socket.tcp_keepalive_time().expect("TCP_KEEPIDLE"),
            TCP_KEEPALIVE_IDLE
        );
        assert_eq!(
            socket.tcp_keepalive_interval().expect("TCP_KEEPINTVL"),
            TCP_KEEPALIVE_INTERVAL
        );
        assert_eq!(
            socket.tcp_keepalive_retries().expect("TCP_KEEPCNT"),
            TCP_KEEPALIVE_RETRIES
        );
        assert_eq!(
            socket.tcp_user_timeout().expect("TCP_USER_TIMEOUT"),
            Some(TCP_USER_TIMEOUT)
        );
    }
}
