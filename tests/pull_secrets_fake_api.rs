//! Pull secret sync against a FAKE API server: an in-process HTTP server
//! that speaks the apiserver's JSON for the Secret endpoints the sync uses
//! (list and watch with field selectors and resourceVersion, get, create
//! with 409, replace with resourceVersion conflicts), driven through the
//! real `kube::Client`. It exists for what a real apiserver cannot be made
//! to do on demand: answer 500, hang, drop watches, and count every call.
//! The happy paths run against a real kube-apiserver in tests/e2e.rs.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU8, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{Path, Query, State};
use axum::http::{Method, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use image_rewriter::config::ConfigFile;
use image_rewriter::metrics::Metrics;
use image_rewriter::policy::Policy;
use image_rewriter::pullsecrets::{
    MANAGED_BY_LABEL, PullSecretSync, RESYNC_INTERVAL, SOURCE_ANNOTATION,
};
use serde_json::{Value, json};
use tokio::sync::broadcast;

const SOURCE_NS: &str = "image-rewriter";
const SECRET: &str = "harbor-pull";

#[derive(Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
enum Fault {
    None = 0,
    /// Every call but list/watch answers 500.
    ServerError = 1,
    /// Every call but list/watch never answers.
    Hang = 2,
    /// A create answers 409 AlreadyExists and stores nothing (the Secret was
    /// made by someone else and deleted again before the next read).
    CreateConflict = 3,
    /// Every update (PUT) never answers; other calls do.
    HangUpdates = 4,
}

/// The fake's state: Secrets by (namespace, name), a resourceVersion clock,
/// watch subscribers, and counters.
struct Fake {
    secrets: Mutex<BTreeMap<(String, String), Value>>,
    revision: AtomicU64,
    events: broadcast::Sender<(u64, Value)>,
    /// Every event, so a watch from an older resourceVersion is replayed
    /// what it missed, as the apiserver's watch cache does.
    history: Mutex<Vec<(u64, Value)>>,
    fault: AtomicU8,
    calls: AtomicUsize,
    /// Replace calls received, and those that wrote.
    put_attempts: AtomicUsize,
    puts_written: AtomicUsize,
    watches_started: AtomicUsize,
    /// Bumping this ends every open watch stream (a dropped connection).
    watch_generation: AtomicU64,
    /// A namespace whose creates never answer (another admission webhook on
    /// Secrets, scoped to it and hanging, say); others answer.
    creates_hang_in: Mutex<Option<String>>,
    /// A Secret name whose creates never answer, in every namespace.
    creates_hang_for: Mutex<Option<String>>,
    /// How long each get of one Secret, and each create, takes to answer
    /// (a slow apiserver), in milliseconds; they answer as usual then.
    get_delay_ms: AtomicU64,
    create_delay_ms: AtomicU64,
    /// A create is followed at once by another writer's change of the data
    /// (a person, another tool), seen by the watches before the create's
    /// own answer arrives: that answer is the object as created.
    edit_after_create: std::sync::atomic::AtomicBool,
    /// Namespaces that do not exist: a create there answers 404.
    gone_namespaces: Mutex<Vec<String>>,
    /// Namespaces where a create answers 500 (another webhook refusing
    /// Secrets there, say); other calls answer.
    creates_fail_in: Mutex<Vec<String>>,
    /// Create calls received, by namespace.
    creates: Mutex<BTreeMap<String, usize>>,
}

impl Fake {
    fn new() -> Arc<Self> {
        Arc::new(Self {
            secrets: Mutex::default(),
            revision: AtomicU64::new(100),
            events: broadcast::channel(1024).0,
            history: Mutex::default(),
            fault: AtomicU8::new(Fault::None as u8),
            calls: AtomicUsize::new(0),
            put_attempts: AtomicUsize::new(0),
            puts_written: AtomicUsize::new(0),
            watches_started: AtomicUsize::new(0),
            watch_generation: AtomicU64::new(0),
            creates_hang_in: Mutex::default(),
            creates_hang_for: Mutex::default(),
            get_delay_ms: AtomicU64::new(0),
            create_delay_ms: AtomicU64::new(0),
            edit_after_create: std::sync::atomic::AtomicBool::new(false),
            gone_namespaces: Mutex::default(),
            creates_fail_in: Mutex::default(),
            creates: Mutex::default(),
        })
    }

    /// Removes a Secret and tells the watchers, as a delete that a
    /// finalizer no longer holds up does.
    fn delete(&self, namespace: &str, name: &str) {
        let Some(secret) = self
            .secrets
            .lock()
            .unwrap()
            .remove(&(namespace.to_owned(), name.to_owned()))
        else {
            return;
        };
        let revision = self.revision.fetch_add(1, Ordering::SeqCst) + 1;
        let event = json!({"type": "DELETED", "object": secret});
        self.history.lock().unwrap().push((revision, event.clone()));
        let _ = self.events.send((revision, event));
    }

    fn creates_in(&self, namespace: &str) -> usize {
        self.creates
            .lock()
            .unwrap()
            .get(namespace)
            .copied()
            .unwrap_or(0)
    }

    fn fault(&self) -> Fault {
        match self.fault.load(Ordering::SeqCst) {
            1 => Fault::ServerError,
            2 => Fault::Hang,
            3 => Fault::CreateConflict,
            4 => Fault::HangUpdates,
            _ => Fault::None,
        }
    }

    fn set_fault(&self, fault: Fault) {
        self.fault.store(fault as u8, Ordering::SeqCst);
    }

    /// Stores a secret with a new resourceVersion and tells the watchers.
    fn put(&self, namespace: &str, mut secret: Value, event: &str) -> Value {
        let revision = self.revision.fetch_add(1, Ordering::SeqCst) + 1;
        secret["apiVersion"] = json!("v1");
        secret["kind"] = json!("Secret");
        secret["metadata"]["namespace"] = json!(namespace);
        secret["metadata"]["resourceVersion"] = json!(revision.to_string());
        secret["metadata"]["uid"] = json!(format!("uid-{namespace}-{revision}"));
        let name = secret["metadata"]["name"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        self.secrets
            .lock()
            .unwrap()
            .insert((namespace.to_owned(), name), secret.clone());
        let event = json!({"type": event, "object": secret.clone()});
        self.history.lock().unwrap().push((revision, event.clone()));
        let _ = self.events.send((revision, event));
        secret
    }

    fn get(&self, namespace: &str, name: &str) -> Option<Value> {
        self.secrets
            .lock()
            .unwrap()
            .get(&(namespace.to_owned(), name.to_owned()))
            .cloned()
    }
}

fn status(code: u16, reason: &str, message: &str) -> Response {
    let body = json!({
        "kind": "Status", "apiVersion": "v1", "metadata": {},
        "status": "Failure", "message": message, "reason": reason, "code": code
    });
    (StatusCode::from_u16(code).unwrap(), axum::Json(body)).into_response()
}

/// Applies the fault, if any, to a non-watch call.
async fn faulted(fake: &Fake) -> Option<Response> {
    fake.calls.fetch_add(1, Ordering::SeqCst);
    match fake.fault() {
        Fault::None => None,
        Fault::ServerError => Some(status(
            500,
            "InternalError",
            "etcdserver: request timed out",
        )),
        Fault::Hang => {
            tokio::time::sleep(Duration::from_secs(3600)).await;
            None
        }
        Fault::CreateConflict | Fault::HangUpdates => None,
    }
}

fn name_selector(query: &BTreeMap<String, String>) -> Option<String> {
    query
        .get("fieldSelector")
        .and_then(|s| s.strip_prefix("metadata.name="))
        .map(str::to_owned)
}

async fn list_or_watch(
    State(fake): State<Arc<Fake>>,
    Query(query): Query<BTreeMap<String, String>>,
) -> Response {
    let selected = name_selector(&query);
    let matches = move |secret: &Value| {
        selected
            .as_deref()
            .is_none_or(|name| secret["metadata"]["name"] == name)
    };
    if query.get("watch").map(String::as_str) != Some("true") {
        let items: Vec<Value> = fake
            .secrets
            .lock()
            .unwrap()
            .values()
            .filter(|s| matches(s))
            .cloned()
            .collect();
        let revision = fake.revision.load(Ordering::SeqCst);
        return axum::Json(json!({
            "kind": "SecretList", "apiVersion": "v1",
            "metadata": {"resourceVersion": revision.to_string()},
            "items": items
        }))
        .into_response();
    }
    fake.watches_started.fetch_add(1, Ordering::SeqCst);
    let since: u64 = query
        .get("resourceVersion")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let generation = fake.watch_generation.load(Ordering::SeqCst);
    let mut events = fake.events.subscribe();
    let missed: Vec<(u64, Value)> = fake
        .history
        .lock()
        .unwrap()
        .iter()
        .filter(|(revision, _)| *revision > since)
        .cloned()
        .collect();
    let fake = fake.clone();
    let stream = async_stream(
        move |sender: tokio::sync::mpsc::Sender<Result<Bytes, Infallible>>| async move {
            let mut since = since;
            for (revision, event) in missed {
                since = revision;
                if matches(&event["object"]) {
                    let mut line = serde_json::to_vec(&event).unwrap();
                    line.push(b'\n');
                    if sender.send(Ok(Bytes::from(line))).await.is_err() {
                        return;
                    }
                }
            }
            loop {
                if fake.watch_generation.load(Ordering::SeqCst) != generation {
                    return;
                }
                match tokio::time::timeout(Duration::from_millis(50), events.recv()).await {
                    Ok(Ok((revision, event))) if revision > since && matches(&event["object"]) => {
                        let mut line = serde_json::to_vec(&event).unwrap();
                        line.push(b'\n');
                        if sender.send(Ok(Bytes::from(line))).await.is_err() {
                            return;
                        }
                    }
                    Ok(Ok(_)) | Err(_) => {}
                    Ok(Err(_)) => return,
                }
            }
        },
    );
    Response::builder()
        .header("Content-Type", "application/json")
        .body(stream)
        .unwrap()
}

/// A streaming body fed by a task.
fn async_stream<F, Fut>(produce: F) -> Body
where
    F: FnOnce(tokio::sync::mpsc::Sender<Result<Bytes, Infallible>>) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let (sender, receiver) = tokio::sync::mpsc::channel(16);
    tokio::spawn(produce(sender));
    Body::from_stream(futures::stream::unfold(
        receiver,
        |mut receiver| async move { receiver.recv().await.map(|item| (item, receiver)) },
    ))
}

async fn namespaced_collection(
    State(fake): State<Arc<Fake>>,
    Path(namespace): Path<String>,
    body: Bytes,
) -> Response {
    if let Some(response) = faulted(&fake).await {
        return response;
    }
    *fake
        .creates
        .lock()
        .unwrap()
        .entry(namespace.clone())
        .or_default() += 1;
    if fake.gone_namespaces.lock().unwrap().contains(&namespace) {
        return status(
            404,
            "NotFound",
            &format!("namespaces \"{namespace}\" not found"),
        );
    }
    if fake.creates_fail_in.lock().unwrap().contains(&namespace) {
        return status(
            500,
            "InternalError",
            "admission webhook \"secrets.example\" failed",
        );
    }
    let secret: Value = serde_json::from_slice(&body).unwrap();
    let name = secret["metadata"]["name"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    let hangs_here = fake.creates_hang_in.lock().unwrap().as_deref() == Some(namespace.as_str())
        || fake.creates_hang_for.lock().unwrap().as_deref() == Some(name.as_str());
    if hangs_here {
        tokio::time::sleep(Duration::from_secs(3600)).await;
    }
    let delay = fake.create_delay_ms.load(Ordering::SeqCst);
    tokio::time::sleep(Duration::from_millis(delay)).await;
    if fake.get(&namespace, &name).is_some() || fake.fault() == Fault::CreateConflict {
        return status(
            409,
            "AlreadyExists",
            &format!("secrets \"{name}\" already exists"),
        );
    }
    let created = fake.put(&namespace, secret, "ADDED");
    if fake.edit_after_create.load(Ordering::SeqCst) {
        let mut edited = created.clone();
        edited["data"] = json!({".dockerconfigjson": base64("edited by hand")});
        fake.put(&namespace, edited, "MODIFIED");
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    (StatusCode::CREATED, axum::Json(created)).into_response()
}

async fn namespaced_item(
    State(fake): State<Arc<Fake>>,
    method: Method,
    Path((namespace, name)): Path<(String, String)>,
    body: Bytes,
) -> Response {
    if let Some(response) = faulted(&fake).await {
        return response;
    }
    if method == Method::GET {
        let delay = fake.get_delay_ms.load(Ordering::SeqCst);
        tokio::time::sleep(Duration::from_millis(delay)).await;
    }
    let current = fake.get(&namespace, &name);
    match method {
        Method::GET => match current {
            Some(secret) => axum::Json(secret).into_response(),
            None => status(404, "NotFound", &format!("secrets \"{name}\" not found")),
        },
        Method::PUT => {
            fake.put_attempts.fetch_add(1, Ordering::SeqCst);
            if fake.fault() == Fault::HangUpdates {
                tokio::time::sleep(Duration::from_secs(3600)).await;
            }
            let secret: Value = serde_json::from_slice(&body).unwrap();
            let Some(current) = current else {
                return status(404, "NotFound", "not found");
            };
            if secret["metadata"]["resourceVersion"] != current["metadata"]["resourceVersion"] {
                return status(409, "Conflict", "the object has been modified");
            }
            if secret["type"] != current["type"] {
                return status(422, "Invalid", "type: Invalid value: field is immutable");
            }
            // As the apiserver's ValidateSecretUpdate: once immutable, neither
            // the data nor `immutable` itself may change.
            if current["immutable"] == json!(true)
                && (secret["immutable"] != current["immutable"]
                    || secret["data"] != current["data"])
            {
                return status(
                    422,
                    "Invalid",
                    "data: Forbidden: field is immutable when `immutable` is set",
                );
            }
            fake.puts_written.fetch_add(1, Ordering::SeqCst);
            axum::Json(fake.put(&namespace, secret, "MODIFIED")).into_response()
        }
        _ => StatusCode::METHOD_NOT_ALLOWED.into_response(),
    }
}

async fn start_fake() -> (Arc<Fake>, kube::Client) {
    let fake = Fake::new();
    let app = Router::new()
        .route("/api/v1/secrets", get(list_or_watch))
        .route(
            "/api/v1/namespaces/{namespace}/secrets",
            axum::routing::post(namespaced_collection),
        )
        .route(
            "/api/v1/namespaces/{namespace}/secrets/{name}",
            get(namespaced_item).put(namespaced_item),
        )
        .with_state(fake.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr: SocketAddr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    let config = kube::Config::new(format!("http://{addr}").parse().unwrap());
    (fake, kube::Client::try_from(config).unwrap())
}

fn source_secret(password: &str) -> Value {
    let auth = format!(r#"{{"auths":{{"harbor.corp.example":{{"auth":"{password}"}}}}}}"#);
    json!({
        "metadata": {"name": SECRET},
        "type": "kubernetes.io/dockerconfigjson",
        "data": {".dockerconfigjson": base64(&auth)}
    })
}

fn base64(text: &str) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode(text)
}

fn policy(wait: &str) -> Policy {
    ConfigFile::from_yaml(&format!(
        "rules:\n  - match: docker.io\n    target: harbor.corp.example/dockerhub\n    pullSecret: {SECRET}\n\
         pullSecretSync:\n  waitForCopy: {wait}\n"
    ))
    .unwrap()
    .into_policy(Some(SOURCE_NS))
    .unwrap()
}

fn policy_with_source(namespace: &str) -> Policy {
    ConfigFile::from_yaml(&format!(
        "rules:\n  - match: docker.io\n    target: harbor.corp.example/dockerhub\n    pullSecret: {SECRET}\n\
         pullSecretSync:\n  waitForCopy: 2s\n  sourceNamespace: {namespace}\n"
    ))
    .unwrap()
    .into_policy(Some(SOURCE_NS))
    .unwrap()
}

async fn started_sync(
    fake: &Fake,
    client: kube::Client,
    policy: &Policy,
) -> (PullSecretSync, Arc<Metrics>) {
    started_sync_with_resync(fake, client, policy, RESYNC_INTERVAL).await
}

async fn started_sync_with_resync(
    fake: &Fake,
    client: kube::Client,
    policy: &Policy,
    resync_every: Duration,
) -> (PullSecretSync, Arc<Metrics>) {
    let metrics = Arc::new(Metrics::new());
    let sync = PullSecretSync::start_with_resync(client, metrics.clone(), resync_every);
    sync.configure(policy);
    let deadline = Instant::now() + Duration::from_secs(10);
    while !sync.is_synced() || fake.watches_started.load(Ordering::SeqCst) == 0 {
        assert!(Instant::now() < deadline, "the watch cache never synced");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // The first listing queues a reconcile, which reads the source: let it
    // have, so that a test counting calls from here counts only its own.
    if policy.pull_secret_sync().enabled && fake.get(SOURCE_NS, SECRET).is_some() {
        eventually("the first reconcile read the source", || {
            fake.calls.load(Ordering::SeqCst) > 0
        })
        .await;
    }
    (sync, metrics)
}

/// Admits a pod in `namespace` that needs the pull secret: no warning.
async fn admit(sync: &PullSecretSync, policy: &Policy, namespace: &str) {
    let warnings = sync
        .ensure_for_pod(policy, namespace, &[SECRET.into()], None)
        .await;
    assert!(warnings.is_empty(), "{namespace}: {warnings:?}");
}

/// A pod's admission in `namespace` needing the pull secret, left to run:
/// its warnings when it is done.
fn admit_in_background(
    sync: &PullSecretSync,
    policy: &Policy,
    namespace: &str,
) -> tokio::task::JoinHandle<Vec<String>> {
    let (sync, policy, namespace) = (sync.clone(), policy.clone(), namespace.to_owned());
    tokio::spawn(async move {
        sync.ensure_for_pod(&policy, &namespace, &[SECRET.into()], None)
            .await
    })
}

async fn eventually(what: &str, check: impl FnMut() -> bool) {
    eventually_within(Duration::from_secs(10), what, check).await;
}

async fn eventually_within(limit: Duration, what: &str, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !check() {
        assert!(Instant::now() < deadline, "timed out waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn the_first_pod_gets_a_copy_and_the_second_costs_no_api_call() {
    let (fake, client) = start_fake().await;
    fake.put(SOURCE_NS, source_secret("s3cret"), "ADDED");
    let policy = policy("2s");
    let (sync, metrics) = started_sync(&fake, client, &policy).await;

    let warnings = sync
        .ensure_for_pod(&policy, "team-a", &[SECRET.into()], None)
        .await;
    assert!(warnings.is_empty(), "{warnings:?}");
    let copy = fake
        .get("team-a", SECRET)
        .expect("the copy exists once the admission returns");
    assert_eq!(
        copy["metadata"]["labels"][MANAGED_BY_LABEL],
        "image-rewriter"
    );
    assert_eq!(
        copy["metadata"]["annotations"]["image-rewriter.io/source"],
        "image-rewriter/harbor-pull"
    );
    assert_eq!(copy["data"], fake.get(SOURCE_NS, SECRET).unwrap()["data"]);
    assert_eq!(copy["type"], "kubernetes.io/dockerconfigjson");

    let calls = fake.calls.load(Ordering::SeqCst);
    for _ in 0..5 {
        let warnings = sync
            .ensure_for_pod(&policy, "team-a", &[SECRET.into()], None)
            .await;
        assert!(warnings.is_empty());
    }
    assert_eq!(
        fake.calls.load(Ordering::SeqCst),
        calls,
        "known copies cost no API call"
    );
    let text = metrics.encode();
    assert!(
        text.contains("image_rewriter_pull_secret_copies_total{result=\"created\"} 1"),
        "{text}"
    );
    // The source namespace itself needs nothing.
    admit(&sync, &policy, SOURCE_NS).await;
    assert_eq!(fake.calls.load(Ordering::SeqCst), calls);
}

#[tokio::test]
async fn rotation_reaches_every_copy_and_user_secrets_are_left_alone() {
    let (fake, client) = start_fake().await;
    fake.put(SOURCE_NS, source_secret("v1"), "ADDED");
    let mut users_own = source_secret("mine");
    users_own["metadata"]["labels"] = json!({"team": "b"});
    fake.put("team-b", users_own.clone(), "ADDED");
    let policy = policy("2s");
    let (sync, metrics) = started_sync(&fake, client, &policy).await;
    // Found by the first list: counted at once, not when a pod needs it.
    assert_eq!(user_owned_count(&metrics), 1);

    for namespace in ["team-a", "team-c", "team-d"] {
        admit(&sync, &policy, namespace).await;
    }
    // team-b has its own Secret of that name: used as it is, never touched.
    admit(&sync, &policy, "team-b").await;

    let rotated = fake.put(SOURCE_NS, source_secret("v2"), "MODIFIED");
    eventually("every copy carries the rotated password", || {
        ["team-a", "team-c", "team-d"].iter().all(|ns| {
            fake.get(ns, SECRET)
                .is_some_and(|copy| copy["data"] == rotated["data"])
        })
    })
    .await;
    assert_eq!(
        fake.get("team-b", SECRET).unwrap()["data"],
        users_own["data"]
    );
}

/// `pull_secret_copies_total{result="user_owned"}`: one per Secret of a
/// user found where a copy would go, whenever it turns up, counted once
/// however many pods and events pass it by.
#[tokio::test]
async fn each_users_secret_is_counted_once_whenever_it_turns_up() {
    let (fake, client) = start_fake().await;
    fake.put(SOURCE_NS, source_secret("v1"), "ADDED");
    let policy = policy("2s");
    let (sync, metrics) = started_sync(&fake, client, &policy).await;
    assert_eq!(user_owned_count(&metrics), 0);

    // Made by a user after the start: seen by the watch.
    let mut users_own = source_secret("mine");
    users_own["metadata"]["labels"] = json!({"team": "b"});
    let users_own = fake.put("team-b", users_own, "ADDED");
    eventually("the watch counts the user's Secret", || {
        user_owned_count(&metrics) == 1
    })
    .await;
    let mut edited = users_own.clone();
    edited["data"] = source_secret("mine, rotated")["data"].clone();
    fake.put("team-b", edited, "MODIFIED");
    for _ in 0..3 {
        admit(&sync, &policy, "team-b").await;
    }

    // A copy of ours that a user takes over (our label removed) is theirs.
    admit(&sync, &policy, "team-c").await;
    let mut taken_over = fake.get("team-c", SECRET).unwrap();
    taken_over["metadata"]["labels"] = json!({"team": "c"});
    fake.put("team-c", taken_over, "MODIFIED");
    eventually("the taken-over copy is counted", || {
        user_owned_count(&metrics) == 2
    })
    .await;
    // A rotation passes both by, and counts neither again.
    let rotated = fake.put(SOURCE_NS, source_secret("v2"), "MODIFIED");
    admit(&sync, &policy, "team-d").await;
    eventually("the new copy carries the rotated password", || {
        is_copy_of(&fake, "team-d", &rotated)
    })
    .await;
    assert_eq!(user_owned_count(&metrics), 2);
    assert_ne!(fake.get("team-c", SECRET).unwrap()["data"], rotated["data"]);
}

fn user_owned_count(metrics: &Metrics) -> u64 {
    let text = metrics.encode();
    let series = "image_rewriter_pull_secret_copies_total{result=\"user_owned\"} ";
    text.lines()
        .find_map(|line| line.strip_prefix(series))
        .unwrap_or_else(|| panic!("no {series} in {text}"))
        .parse()
        .unwrap()
}

/// A rotation whose sync met API errors is not lost: the periodic resync
/// brings the copies to the source once the API answers again (events alone
/// would wait for the next change of the source).
#[tokio::test]
async fn a_rotation_that_met_api_errors_reaches_the_copies_at_the_next_resync() {
    let (fake, client) = start_fake().await;
    fake.put(SOURCE_NS, source_secret("v1"), "ADDED");
    let policy = policy("2s");
    let (sync, metrics) =
        started_sync_with_resync(&fake, client, &policy, Duration::from_millis(300)).await;
    admit(&sync, &policy, "team-a").await;

    fake.set_fault(Fault::ServerError);
    let rotated = fake.put(SOURCE_NS, source_secret("v2"), "MODIFIED");
    eventually("the sync of the rotation failed", || {
        metrics
            .encode()
            .contains("image_rewriter_pull_secret_sync_errors_total 1")
    })
    .await;
    fake.set_fault(Fault::None);
    eventually("the copy carries the rotated password", || {
        fake.get("team-a", SECRET)
            .is_some_and(|copy| copy["data"] == rotated["data"])
    })
    .await;
}

/// A managed copy edited by hand is put back as soon as its change is seen;
/// labels and annotations others added to it stay.
#[tokio::test]
async fn a_copy_edited_by_hand_is_put_back_and_keeps_others_annotations() {
    let (fake, client) = start_fake().await;
    let source = fake.put(SOURCE_NS, source_secret("v1"), "ADDED");
    let policy = policy("2s");
    let (sync, _metrics) = started_sync(&fake, client, &policy).await;
    admit(&sync, &policy, "team-a").await;

    let mut edited = fake.get("team-a", SECRET).unwrap();
    edited["data"] = source_secret("tampered")["data"].clone();
    edited["metadata"]["annotations"]["backup.velero.io/exclude"] = json!("true");
    fake.put("team-a", edited, "MODIFIED");
    eventually("the copy holds the source's data again", || {
        is_copy_of(&fake, "team-a", &source)
    })
    .await;
    let copy = fake.get("team-a", SECRET).unwrap();
    assert_eq!(
        copy["metadata"]["annotations"]["backup.velero.io/exclude"],
        "true"
    );
    assert_eq!(
        copy["metadata"]["labels"][MANAGED_BY_LABEL],
        "image-rewriter"
    );
}

/// The pods of a rollout that need the same copy at once share one job: with
/// the API failing, the source is read once, and every pod is warned.
#[tokio::test]
async fn the_pods_of_a_rollout_share_one_copy_request() {
    let (fake, client) = start_fake().await;
    fake.put(SOURCE_NS, source_secret("v1"), "ADDED");
    let policy = policy("2s");
    let (sync, _metrics) = started_sync(&fake, client, &policy).await;

    fake.set_fault(Fault::ServerError);
    let calls = fake.calls.load(Ordering::SeqCst);
    let names = [SECRET.to_owned()];
    let admissions = (0..20).map(|_| sync.ensure_for_pod(&policy, "team-a", &names, None));
    let warnings = futures::future::join_all(admissions).await;
    for warned in &warnings {
        assert_eq!(warned.len(), 1, "{warned:?}");
        assert!(warned[0].contains("could not be copied"), "{warned:?}");
    }
    assert_eq!(
        fake.calls.load(Ordering::SeqCst) - calls,
        1,
        "one read of the source for the twenty pods"
    );
}

/// With `enabled: false` nothing is written: not even the copies made while
/// it was on follow a rotation (another tool may own them now).
#[tokio::test]
async fn with_sync_disabled_existing_copies_are_not_written() {
    let (fake, client) = start_fake().await;
    let source = fake.put(SOURCE_NS, source_secret("v1"), "ADDED");
    let policy = policy("2s");
    let (sync, _metrics) =
        started_sync_with_resync(&fake, client, &policy, Duration::from_millis(100)).await;
    admit(&sync, &policy, "team-a").await;
    let disabled = ConfigFile::from_yaml(&format!(
        "rules:\n  - match: docker.io\n    target: harbor.corp.example/dockerhub\n    pullSecret: {SECRET}\n\
         pullSecretSync:\n  enabled: false\n"
    ))
    .unwrap()
    .into_policy(Some(SOURCE_NS))
    .unwrap();
    sync.configure(&disabled);
    fake.put(SOURCE_NS, source_secret("v2"), "MODIFIED");
    // Ten resync periods, and the source event itself.
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(is_copy_of(&fake, "team-a", &source), "the copy was written");
}

/// Two replicas (each runs the sync) write each copy once per rotation: the
/// second finds the first's write and leaves it.
#[tokio::test]
async fn two_replicas_write_each_copy_once_per_rotation() {
    let (fake, client) = start_fake().await;
    fake.put(SOURCE_NS, source_secret("v1"), "ADDED");
    let policy = policy("2s");
    let (first, _) = started_sync(&fake, client.clone(), &policy).await;
    let (_second, second_metrics) = started_sync(&fake, client, &policy).await;
    let namespaces = ["team-a", "team-b", "team-c", "team-d"];
    for namespace in namespaces {
        admit(&first, &policy, namespace).await;
    }
    eventually("the second replica has seen the copies", || {
        second_metrics
            .encode()
            .contains("image_rewriter_pull_secret_cache_size 5")
    })
    .await;

    let rotated = fake.put(SOURCE_NS, source_secret("v2"), "MODIFIED");
    eventually("every copy is rotated", || {
        namespaces.iter().all(|namespace| {
            fake.get(namespace, SECRET)
                .is_some_and(|copy| copy["data"] == rotated["data"])
        })
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(fake.puts_written.load(Ordering::SeqCst), namespaces.len());
}

/// Two replicas with different sources (during a reload that moves the
/// source, until both have it) do not overwrite each other on every event:
/// the copies follow the one that wrote last, until the configs agree.
#[tokio::test]
async fn replicas_with_different_sources_do_not_fight_over_the_copies() {
    let (fake, client) = start_fake().await;
    fake.put(SOURCE_NS, source_secret("v1"), "ADDED");
    let moved = fake.put("vault", source_secret("v2"), "ADDED");
    let policy = policy("2s");
    let (old_config, _) = started_sync(&fake, client.clone(), &policy).await;
    for namespace in ["team-a", "team-b", "team-c"] {
        admit(&old_config, &policy, namespace).await;
    }
    let (_new_config, _) = started_sync(&fake, client, &policy_with_source("vault")).await;
    eventually(
        "the replica with the new config has moved the copies",
        || {
            ["team-a", "team-b", "team-c"]
                .iter()
                .all(|namespace| is_copy_of(&fake, namespace, &moved))
        },
    )
    .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let written = fake.puts_written.load(Ordering::SeqCst);
    assert!(written <= 6, "{written} writes for three copies");
}

/// A Secret's type cannot change: when the source's has, its copies are
/// left as they are (no update the apiserver would refuse) and it is
/// counted as an error.
#[tokio::test]
async fn a_source_whose_type_changed_leaves_its_copies_and_says_so() {
    let (fake, client) = start_fake().await;
    fake.put(SOURCE_NS, source_secret("v1"), "ADDED");
    let policy = policy("2s");
    let (sync, metrics) = started_sync(&fake, client, &policy).await;
    admit(&sync, &policy, "team-a").await;
    let copy = fake.get("team-a", SECRET).unwrap();

    let mut retyped = source_secret("v2");
    retyped["type"] = json!("kubernetes.io/dockercfg");
    retyped["data"] = json!({".dockercfg": base64("{}")});
    fake.put(SOURCE_NS, retyped, "MODIFIED");
    eventually("the type change is counted", || {
        metrics
            .encode()
            .contains("image_rewriter_pull_secret_copies_total{result=\"failed\"} 1")
    })
    .await;
    assert_eq!(fake.get("team-a", SECRET).unwrap(), copy);
    assert_eq!(fake.put_attempts.load(Ordering::SeqCst), 0);
}

/// A copy someone made immutable cannot take the source's new data: it is
/// left as it is (no update the apiserver would refuse) and counted as an
/// error. When only the source's place moves, its annotation still follows,
/// and the copy stays immutable.
#[tokio::test]
async fn an_immutable_copy_is_left_as_it_is_and_still_follows_a_moved_source() {
    let (fake, client) = start_fake().await;
    let source = fake.put(SOURCE_NS, source_secret("v1"), "ADDED");
    let policy = policy("2s");
    let (sync, metrics) = started_sync(&fake, client, &policy).await;
    admit(&sync, &policy, "team-a").await;
    let mut copy = fake.get("team-a", SECRET).unwrap();
    copy["immutable"] = json!(true);
    fake.put("team-a", copy, "MODIFIED");

    // The same data in another namespace: only the source annotation moves.
    fake.put("vault", source_secret("v1"), "ADDED");
    sync.configure(&policy_with_source("vault"));
    eventually("the copy names its new source", || {
        fake.get("team-a", SECRET).is_some_and(|copy| {
            copy["metadata"]["annotations"]["image-rewriter.io/source"]
                == json!("vault/harbor-pull")
        })
    })
    .await;
    let copy = fake.get("team-a", SECRET).unwrap();
    assert_eq!(copy["immutable"], json!(true));
    assert_eq!(copy["data"], source["data"]);
    assert!(
        metrics
            .encode()
            .contains("image_rewriter_pull_secret_copies_total{result=\"failed\"} 0"),
        "{}",
        metrics.encode()
    );

    let attempts = fake.put_attempts.load(Ordering::SeqCst);
    fake.put("vault", source_secret("v2"), "MODIFIED");
    // Counted at each reconcile that meets it: a reconcile the move queued
    // may still run after the rotation, and count it too.
    eventually("the refusal is counted", || {
        !metrics
            .encode()
            .contains("image_rewriter_pull_secret_copies_total{result=\"failed\"} 0")
    })
    .await;
    assert_eq!(fake.get("team-a", SECRET).unwrap(), copy);
    assert_eq!(fake.put_attempts.load(Ordering::SeqCst), attempts);
}

/// A create that meets a Secret which is gone by the next read is a failed
/// copy, with a warning for the pod: not a user's Secret to leave alone.
#[tokio::test]
async fn a_conflict_over_a_secret_gone_again_is_a_failed_copy() {
    let (fake, client) = start_fake().await;
    fake.put(SOURCE_NS, source_secret("v1"), "ADDED");
    let policy = policy("2s");
    let (sync, metrics) = started_sync(&fake, client, &policy).await;
    fake.set_fault(Fault::CreateConflict);
    let warnings = sync
        .ensure_for_pod(&policy, "team-a", &[SECRET.into()], None)
        .await;
    assert_eq!(warnings.len(), 1, "{warnings:?}");
    assert!(warnings[0].contains("deleted again"), "{warnings:?}");
    let text = metrics.encode();
    assert!(
        text.contains("image_rewriter_pull_secret_copies_total{result=\"failed\"} 1")
            && text.contains("image_rewriter_pull_secret_copies_total{result=\"user_owned\"} 0"),
        "{text}"
    );
}

#[tokio::test]
async fn a_dropped_watch_reconnects_and_loses_nothing() {
    let (fake, client) = start_fake().await;
    fake.put(SOURCE_NS, source_secret("v1"), "ADDED");
    let policy = policy("2s");
    let (sync, metrics) = started_sync(&fake, client, &policy).await;
    admit(&sync, &policy, "team-a").await;

    // The connection drops; while no watch is open, the source rotates and a
    // copy appears in another namespace (another replica made it).
    let watches = fake.watches_started.load(Ordering::SeqCst);
    fake.watch_generation.fetch_add(1, Ordering::SeqCst);
    let rotated = fake.put(SOURCE_NS, source_secret("v2"), "MODIFIED");
    let mut elsewhere = source_secret("v2");
    elsewhere["metadata"]["labels"] = json!({MANAGED_BY_LABEL: "image-rewriter"});
    fake.put("team-z", elsewhere, "ADDED");

    eventually("the watch reconnected", || {
        fake.watches_started.load(Ordering::SeqCst) > watches
    })
    .await;
    eventually("the copy made during the outage was rotated", || {
        fake.get("team-a", SECRET)
            .is_some_and(|copy| copy["data"] == rotated["data"])
    })
    .await;
    eventually("the cache holds the source and both copies", || {
        metrics
            .encode()
            .contains("image_rewriter_pull_secret_cache_size 3")
    })
    .await;
    let calls = fake.calls.load(Ordering::SeqCst);
    admit(&sync, &policy, "team-z").await;
    assert_eq!(
        fake.calls.load(Ordering::SeqCst),
        calls,
        "the copy seen after reconnecting is cached"
    );
}

#[tokio::test]
async fn api_errors_become_warnings_within_the_budget() {
    let (fake, client) = start_fake().await;
    fake.put(SOURCE_NS, source_secret("v1"), "ADDED");
    // A budget a busy CI machine cannot overrun by accident; the fake
    // answers its error at once.
    let policy = policy("2s");
    let (sync, metrics) = started_sync(&fake, client, &policy).await;

    fake.set_fault(Fault::ServerError);
    let started = Instant::now();
    let warnings = sync
        .ensure_for_pod(&policy, "team-a", &[SECRET.into()], None)
        .await;
    assert!(
        started.elapsed() < Duration::from_millis(2500),
        "took {:?}",
        started.elapsed()
    );
    assert_eq!(warnings.len(), 1, "{warnings:?}");
    assert!(
        warnings[0].contains("\"harbor-pull\"") && warnings[0].contains("\"team-a\""),
        "{warnings:?}"
    );
    assert!(
        metrics
            .encode()
            .contains("image_rewriter_pull_secret_copies_total{result=\"failed\"} 1")
    );

    // Once the API recovers, the next pod gets its copy.
    fake.set_fault(Fault::None);
    admit(&sync, &policy, "team-a").await;
    assert!(fake.get("team-a", SECRET).is_some());
}

#[tokio::test]
async fn a_hanging_api_never_delays_admission_beyond_its_budget() {
    let (fake, client) = start_fake().await;
    fake.put(SOURCE_NS, source_secret("v1"), "ADDED");
    let policy = policy("300ms");
    let (sync, _metrics) = started_sync(&fake, client, &policy).await;

    fake.set_fault(Fault::Hang);
    for namespace in ["team-a", "team-b", "team-c"] {
        let started = Instant::now();
        let warnings = sync
            .ensure_for_pod(&policy, namespace, &[SECRET.into()], None)
            .await;
        let took = started.elapsed();
        // The 300 ms budget and a slack for a busy machine; the hanging
        // call itself would last the 5 s API call timeout.
        assert!(
            took < Duration::from_millis(1300),
            "{namespace}: admission waited {took:?}"
        );
        // Still in progress: no warning yet, the kubelet retries its pull.
        assert!(warnings.is_empty(), "{warnings:?}");
    }
}

/// A rotation updates its copies one after another, each update bounded
/// only by the API call timeout: the copy a new namespace's first pod
/// waits for must not queue behind them.
#[tokio::test]
async fn a_rotation_in_progress_never_holds_up_a_new_namespaces_copy() {
    let (fake, client) = start_fake().await;
    fake.put(SOURCE_NS, source_secret("v1"), "ADDED");
    let policy = policy("2s");
    let (sync, _metrics) = started_sync(&fake, client, &policy).await;
    for namespace in ["team-a", "team-b", "team-c"] {
        admit(&sync, &policy, namespace).await;
    }

    fake.set_fault(Fault::HangUpdates);
    fake.put(SOURCE_NS, source_secret("v2"), "MODIFIED");
    eventually("the rotation's first update is under way", || {
        fake.put_attempts.load(Ordering::SeqCst) > 0
    })
    .await;
    // The updates under way hang for the 5 s API call timeout each, well
    // past the 2 s this admission waits.
    admit(&sync, &policy, "team-new").await;
    assert!(
        fake.get("team-new", SECRET).is_some(),
        "the copy exists once the admission returns"
    );
}

#[tokio::test]
async fn with_sync_disabled_a_missing_secret_is_a_warning() {
    let (fake, client) = start_fake().await;
    fake.put(SOURCE_NS, source_secret("v1"), "ADDED");
    let policy = ConfigFile::from_yaml(&format!(
        "rules:\n  - match: docker.io\n    target: harbor.corp.example/dockerhub\n    pullSecret: {SECRET}\n\
         pullSecretSync:\n  enabled: false\n"
    ))
    .unwrap()
    .into_policy(Some(SOURCE_NS))
    .unwrap();
    let (sync, _metrics) = started_sync(&fake, client, &policy).await;
    let calls = fake.calls.load(Ordering::SeqCst);
    let warnings = sync
        .ensure_for_pod(&policy, "team-a", &[SECRET.into()], None)
        .await;
    assert_eq!(warnings.len(), 1, "{warnings:?}");
    assert!(warnings[0].contains("disabled"), "{warnings:?}");
    assert!(fake.get("team-a", SECRET).is_none());
    assert_eq!(
        fake.calls.load(Ordering::SeqCst),
        calls,
        "nothing is created"
    );
    // A dry run is told the same, from the cache alone.
    assert_eq!(
        sync.warnings_without_copying(&policy, "team-a", &[SECRET.into()]),
        warnings
    );
    assert_eq!(fake.calls.load(Ordering::SeqCst), calls);
}

/// A dry run makes no copy (`sideEffects: NoneOnDryRun`) and warns of none it
/// would make: the real request makes it.
#[tokio::test]
async fn a_dry_run_with_sync_enabled_copies_nothing_and_warns_of_nothing() {
    let (fake, client) = start_fake().await;
    fake.put(SOURCE_NS, source_secret("v1"), "ADDED");
    let policy = policy("2s");
    let (sync, _metrics) = started_sync(&fake, client, &policy).await;
    let calls = fake.calls.load(Ordering::SeqCst);
    let warnings = sync.warnings_without_copying(&policy, "team-a", &[SECRET.into()]);
    assert!(warnings.is_empty(), "{warnings:?}");
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(fake.calls.load(Ordering::SeqCst), calls, "no API call");
    assert!(fake.get("team-a", SECRET).is_none());
}

/// Whether the copy in `namespace` holds `source`'s data and names it.
fn is_copy_of(fake: &Fake, namespace: &str, source: &Value) -> bool {
    let origin = format!(
        "{}/{SECRET}",
        source["metadata"]["namespace"].as_str().unwrap()
    );
    fake.get(namespace, SECRET).is_some_and(|copy| {
        copy["data"] == source["data"]
            && copy["metadata"]["annotations"][SOURCE_ANNOTATION] == origin
    })
}

#[tokio::test]
async fn a_reload_that_moves_the_source_brings_every_copy_to_the_new_source() {
    let (fake, client) = start_fake().await;
    let old_source = fake.put(SOURCE_NS, source_secret("v1"), "ADDED");
    let new_source = fake.put("vault", source_secret("v2"), "ADDED");
    let mut users_own = source_secret("mine");
    users_own["metadata"]["labels"] = json!({"team": "b"});
    let users_own = fake.put("team-b", users_own, "ADDED");
    let policy = policy("2s");
    let (sync, _metrics) = started_sync(&fake, client, &policy).await;
    for namespace in ["team-a", "team-c", "team-b"] {
        admit(&sync, &policy, namespace).await;
    }
    assert!(is_copy_of(&fake, "team-a", &old_source));

    sync.configure(&policy_with_source("vault"));
    eventually("every copy holds the new source and names it", || {
        ["team-a", "team-c"]
            .iter()
            .all(|namespace| is_copy_of(&fake, namespace, &new_source))
    })
    .await;
    // Neither a user's Secret nor the old source is written to.
    assert_eq!(fake.get("team-b", SECRET).unwrap(), users_own);
    assert_eq!(fake.get(SOURCE_NS, SECRET).unwrap(), old_source);

    // The new source's rotations reach the copies; the old one is no source.
    let rotated = fake.put("vault", source_secret("v3"), "MODIFIED");
    eventually("the copies follow the new source", || {
        ["team-a", "team-c"]
            .iter()
            .all(|namespace| is_copy_of(&fake, namespace, &rotated))
    })
    .await;
}

#[tokio::test]
async fn a_moved_source_with_the_same_content_is_named_by_every_copy() {
    let (fake, client) = start_fake().await;
    fake.put(SOURCE_NS, source_secret("same"), "ADDED");
    let new_source = fake.put("vault", source_secret("same"), "ADDED");
    let policy = policy("2s");
    let (sync, _metrics) = started_sync(&fake, client, &policy).await;
    admit(&sync, &policy, "team-a").await;

    sync.configure(&policy_with_source("vault"));
    eventually("the copy names its new source", || {
        is_copy_of(&fake, "team-a", &new_source)
    })
    .await;
}

/// A rotation updates a copy's data and annotation only: the finalizers and
/// owner references others set on it stay (a PUT without them removes them,
/// which breaks the contract of whoever set them).
#[tokio::test]
async fn a_rotation_keeps_the_finalizers_and_owner_references_others_set() {
    let (fake, client) = start_fake().await;
    fake.put(SOURCE_NS, source_secret("v1"), "ADDED");
    let policy = policy("2s");
    let (sync, _metrics) = started_sync(&fake, client, &policy).await;
    admit(&sync, &policy, "team-a").await;

    let mut copy = fake.get("team-a", SECRET).unwrap();
    let finalizers = json!(["backup.example.com/protect"]);
    let owners = json!([{
        "apiVersion": "v1", "kind": "ConfigMap", "name": "team-a-registry",
        "uid": "0b7b8d1e-0000-4000-8000-000000000001"
    }]);
    copy["metadata"]["finalizers"] = finalizers.clone();
    copy["metadata"]["ownerReferences"] = owners.clone();
    fake.put("team-a", copy, "MODIFIED");

    let rotated = fake.put(SOURCE_NS, source_secret("v2"), "MODIFIED");
    eventually("the copy carries the rotated password", || {
        is_copy_of(&fake, "team-a", &rotated)
    })
    .await;
    let copy = fake.get("team-a", SECRET).unwrap();
    assert_eq!(copy["metadata"]["finalizers"], finalizers, "{copy:#}");
    assert_eq!(copy["metadata"]["ownerReferences"], owners, "{copy:#}");
}

/// The copy one namespace's first pod waits for is not held up by another
/// namespace's copy whose create hangs (up to the 5 s API call timeout,
/// well past the 2 s this admission waits).
#[tokio::test]
async fn a_copy_that_hangs_in_one_namespace_never_holds_up_another_namespaces() {
    let (fake, client) = start_fake().await;
    fake.put(SOURCE_NS, source_secret("v1"), "ADDED");
    let policy = policy("2s");
    let (sync, _metrics) = started_sync(&fake, client, &policy).await;

    *fake.creates_hang_in.lock().unwrap() = Some("team-slow".into());
    let calls = fake.calls.load(Ordering::SeqCst);
    let slow = admit_in_background(&sync, &policy, "team-slow");
    // Its read of the source, then its create.
    eventually("the create in team-slow is under way", || {
        fake.calls.load(Ordering::SeqCst) >= calls + 2
    })
    .await;
    admit(&sync, &policy, "team-fast").await;
    assert!(
        fake.get("team-fast", SECRET).is_some(),
        "the copy exists once the admission returns"
    );
    // Still under way: no warning yet, the kubelet retries its pull.
    assert!(slow.await.unwrap().is_empty());
}

/// A pod that needs two pull secrets is warned of the copy that failed
/// within its wait, even when the other copy is still under way when the
/// wait ends.
#[tokio::test]
async fn a_failed_copy_is_warned_of_while_another_is_still_under_way() {
    const OTHER: &str = "quay-pull";
    let (fake, client) = start_fake().await;
    fake.put(SOURCE_NS, source_secret("v1"), "ADDED");
    // No source for quay-pull: its copy fails at once.
    let policy = ConfigFile::from_yaml(&format!(
        "rules:\n  - match: docker.io\n    target: harbor.corp.example/dockerhub\n    pullSecret: {SECRET}\n\
         \x20 - match: quay.io\n    target: harbor.corp.example/quay\n    pullSecret: {OTHER}\n\
         pullSecretSync:\n  waitForCopy: 1s\n"
    ))
    .unwrap()
    .into_policy(Some(SOURCE_NS))
    .unwrap();
    let (sync, _metrics) = started_sync(&fake, client, &policy).await;

    // harbor-pull's create hangs past the wait.
    *fake.creates_hang_for.lock().unwrap() = Some(SECRET.into());
    let warnings = sync
        .ensure_for_pod(&policy, "team-a", &[SECRET.into(), OTHER.into()], None)
        .await;
    assert_eq!(warnings.len(), 1, "{warnings:?}");
    assert!(
        warnings[0].contains(&format!("{OTHER:?}")) && warnings[0].contains("does not exist"),
        "{warnings:?}"
    );
}

/// `pull_secret_cache_size` follows a reload that drops a name: its Secrets
/// leave the cache, and the gauge.
#[tokio::test]
async fn a_reload_without_the_pull_secret_empties_the_cache_gauge() {
    let (fake, client) = start_fake().await;
    fake.put(SOURCE_NS, source_secret("v1"), "ADDED");
    let policy = policy("2s");
    let (sync, metrics) = started_sync(&fake, client, &policy).await;
    admit(&sync, &policy, "team-a").await;
    assert!(
        metrics
            .encode()
            .contains("image_rewriter_pull_secret_cache_size 2\n")
    );

    let without = ConfigFile::from_yaml(
        "rules:\n  - match: docker.io\n    target: harbor.corp.example/dockerhub\n",
    )
    .unwrap()
    .into_policy(Some(SOURCE_NS))
    .unwrap();
    sync.configure(&without);
    let text = metrics.encode();
    assert!(
        text.contains("image_rewriter_pull_secret_cache_size 0\n"),
        "{text}"
    );
}

fn policy_with_sync_disabled() -> Policy {
    ConfigFile::from_yaml(&format!(
        "rules:\n  - match: docker.io\n    target: harbor.corp.example/dockerhub\n    pullSecret: {SECRET}\n\
         pullSecretSync:\n  enabled: false\n"
    ))
    .unwrap()
    .into_policy(Some(SOURCE_NS))
    .unwrap()
}

/// A reload that turns the sync off while a copy is reading its source
/// (a slow apiserver): the copy is not written afterwards, since with
/// `enabled: false` nothing is.
#[tokio::test]
async fn a_copy_under_way_when_a_reload_turns_the_sync_off_is_not_written() {
    let (fake, client) = start_fake().await;
    fake.put(SOURCE_NS, source_secret("v1"), "ADDED");
    let policy = policy("3s");
    let (sync, _metrics) = started_sync(&fake, client, &policy).await;

    fake.get_delay_ms.store(1000, Ordering::SeqCst);
    let calls = fake.calls.load(Ordering::SeqCst);
    let pod = admit_in_background(&sync, &policy, "team-a");
    eventually("the copy is reading its source", || {
        fake.calls.load(Ordering::SeqCst) > calls
    })
    .await;
    sync.configure(&policy_with_sync_disabled());
    pod.await.unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        fake.get("team-a", SECRET).is_none(),
        "a copy was written after a reload turned the sync off: {:#}",
        fake.get("team-a", SECRET).unwrap()
    );
}

/// A rotation that is reading a copy (a slow apiserver) when a reload turns
/// the sync off does not write it afterwards.
#[tokio::test]
async fn a_rotation_under_way_when_a_reload_turns_the_sync_off_writes_nothing() {
    let (fake, client) = start_fake().await;
    fake.put(SOURCE_NS, source_secret("v1"), "ADDED");
    let policy = policy("2s");
    let (sync, _metrics) = started_sync(&fake, client, &policy).await;
    admit(&sync, &policy, "team-a").await;
    let copy = fake.get("team-a", SECRET).unwrap();

    fake.get_delay_ms.store(1000, Ordering::SeqCst);
    let calls = fake.calls.load(Ordering::SeqCst);
    fake.put(SOURCE_NS, source_secret("v2"), "MODIFIED");
    // The source's read, then the copy's.
    eventually("the rotation is reading the copy", || {
        fake.calls.load(Ordering::SeqCst) >= calls + 2
    })
    .await;
    sync.configure(&policy_with_sync_disabled());
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(fake.puts_written.load(Ordering::SeqCst), 0);
    assert_eq!(fake.get("team-a", SECRET).unwrap(), copy);
}

/// A reload that moves the source while a copy's create is under way (a
/// slow apiserver): the copy made from the old source is brought to the new
/// one as soon as it is made, not at the next resync a minute on; the
/// reconcile the reload queued ran before the copy existed.
#[tokio::test]
async fn a_copy_being_created_when_the_source_moves_follows_the_new_source() {
    let (fake, client) = start_fake().await;
    fake.put(SOURCE_NS, source_secret("v1"), "ADDED");
    let new_source = fake.put("vault", source_secret("v2"), "ADDED");
    let policy = policy("3s");
    let (sync, _metrics) = started_sync(&fake, client, &policy).await;

    fake.create_delay_ms.store(1000, Ordering::SeqCst);
    let calls = fake.calls.load(Ordering::SeqCst);
    let pod = admit_in_background(&sync, &policy, "team-a");
    // Its read of the source, then its create.
    eventually("the copy's create is under way", || {
        fake.calls.load(Ordering::SeqCst) >= calls + 2
    })
    .await;
    sync.configure(&policy_with_source("vault"));
    pod.await.unwrap();
    eventually("the copy holds the new source and names it", || {
        is_copy_of(&fake, "team-a", &new_source)
    })
    .await;
}

/// A copy changed by another writer just after it was created, with the
/// change seen by the watch before the create's answer arrived, is put back
/// (as any copy edited by hand is): the answer, older than what the watch
/// has seen, must not make the cache take the copy for current.
#[tokio::test]
async fn a_copy_changed_before_its_create_answers_is_put_back() {
    let (fake, client) = start_fake().await;
    let source = fake.put(SOURCE_NS, source_secret("v1"), "ADDED");
    let policy = policy("3s");
    let (sync, _metrics) = started_sync(&fake, client, &policy).await;

    // The reconcile the change queues reads the source after the create's
    // answer is in.
    fake.get_delay_ms.store(500, Ordering::SeqCst);
    fake.edit_after_create.store(true, Ordering::SeqCst);
    admit(&sync, &policy, "team-a").await;
    fake.edit_after_create.store(false, Ordering::SeqCst);
    eventually("the edited copy is put back", || {
        is_copy_of(&fake, "team-a", &source)
    })
    .await;
}

/// The resync period of the retry tests, so that retries come within one.
const FAST_RESYNC: Duration = Duration::from_millis(300);

/// A sync over a new fake API, resyncing every [`FAST_RESYNC`], waiting
/// `wait` for a copy, with the source Secret there or not yet.
async fn fast_sync(with_source: bool, wait: &str) -> (Arc<Fake>, PullSecretSync, Policy) {
    let (fake, client) = start_fake().await;
    if with_source {
        fake.put(SOURCE_NS, source_secret("v1"), "ADDED");
    }
    let policy = policy(wait);
    let (sync, _metrics) = started_sync_with_resync(&fake, client, &policy, FAST_RESYNC).await;
    (fake, sync, policy)
}

/// The warnings of a pod admitted in `namespace` that needs the pull secret.
async fn warnings_in(sync: &PullSecretSync, policy: &Policy, namespace: &str) -> Vec<String> {
    sync.ensure_for_pod(policy, namespace, &[SECRET.into()], None)
        .await
}

/// Resyncs every 300 ms here: a copy kept to try again has had a few once
/// this has passed.
const A_FEW_RESYNCS: Duration = Duration::from_millis(1500);

/// A pod admitted while the source Secret was missing (an install that
/// created it after the webhook) gets its copy once the source exists,
/// with no other pod admitted there: a pod that fails to pull is not
/// recreated, so no admission would ask again.
#[tokio::test]
async fn a_copy_that_failed_for_a_missing_source_is_made_once_the_source_exists() {
    let (fake, sync, policy) = fast_sync(false, "2s").await;
    let warnings = warnings_in(&sync, &policy, "team-a").await;
    assert_eq!(warnings.len(), 1, "{warnings:?}");
    assert!(warnings[0].contains("does not exist"), "{warnings:?}");
    let source = fake.put(SOURCE_NS, source_secret("v1"), "ADDED");
    eventually("the copy is made once the source exists", || {
        is_copy_of(&fake, "team-a", &source)
    })
    .await;
    // Made (the first try read no source, and created nothing): not tried
    // again.
    tokio::time::sleep(A_FEW_RESYNCS).await;
    assert_eq!(fake.creates_in("team-a"), 1);
}

/// A copy still under way when the admission stopped waiting (the pod got
/// no warning), which then failed, is made once the API answers again.
#[tokio::test]
async fn a_copy_that_fails_after_the_wait_is_made_when_the_api_recovers() {
    let (fake, sync, policy) = fast_sync(true, "300ms").await;
    fake.set_fault(Fault::Hang);
    let warnings = warnings_in(&sync, &policy, "team-a").await;
    assert!(warnings.is_empty(), "{warnings:?}");
    // The API answers again; the hung call runs into its 5 s timeout.
    tokio::time::sleep(Duration::from_millis(500)).await;
    fake.set_fault(Fault::None);
    eventually_within(Duration::from_secs(15), "the copy is made", || {
        fake.get("team-a", SECRET).is_some()
    })
    .await;
}

/// A pod admitted while its namespace's copy is being deleted (a finalizer
/// holds it) is told so, and the copy is made again once it is gone.
#[tokio::test]
async fn a_copy_being_deleted_at_admission_is_made_again_once_gone() {
    let (fake, client) = start_fake().await;
    fake.put(SOURCE_NS, source_secret("v1"), "ADDED");
    let policy = policy("2s");
    // The default resync (60 s): the deletion itself is the cue.
    let (sync, _metrics) = started_sync(&fake, client, &policy).await;
    admit(&sync, &policy, "team-a").await;
    let mut copy = fake.get("team-a", SECRET).unwrap();
    copy["metadata"]["deletionTimestamp"] = json!("2026-01-01T00:00:00Z");
    copy["metadata"]["finalizers"] = json!(["backup.example/hold"]);
    fake.put("team-a", copy, "MODIFIED");
    tokio::time::sleep(Duration::from_millis(300)).await;
    let warnings = warnings_in(&sync, &policy, "team-a").await;
    assert_eq!(warnings.len(), 1, "{warnings:?}");
    assert!(warnings[0].contains("being deleted"), "{warnings:?}");
    fake.delete("team-a", SECRET);
    eventually("the copy the admitted pod references exists again", || {
        fake.get("team-a", SECRET)
            .is_some_and(|copy| copy["metadata"]["deletionTimestamp"].is_null())
    })
    .await;
}

/// A copy into a namespace that is gone is not tried again: no pod there
/// needs it.
#[tokio::test]
async fn a_copy_into_a_namespace_that_is_gone_is_not_tried_again() {
    let (fake, sync, policy) = fast_sync(true, "2s").await;
    fake.gone_namespaces
        .lock()
        .unwrap()
        .push("team-gone".into());
    fake.set_fault(Fault::ServerError);
    let failed = warnings_in(&sync, &policy, "team-a").await;
    assert_eq!(failed.len(), 1, "{failed:?}");
    fake.set_fault(Fault::None);
    let gone = warnings_in(&sync, &policy, "team-gone").await;
    assert_eq!(gone.len(), 1, "{gone:?}");
    assert!(gone[0].contains("not found"), "{gone:?}");
    // The failure that may pass is tried again (and made); the other not.
    eventually("the failed copy is made", || {
        fake.get("team-a", SECRET).is_some()
    })
    .await;
    tokio::time::sleep(A_FEW_RESYNCS).await;
    assert_eq!(fake.creates_in("team-gone"), 1);
}

/// Served outside a cluster (a kubeconfig) with no namespace given and
/// none in the config, there is no source: a pod given a pull secret is
/// told it was neither checked nor copied, rather than nothing.
#[tokio::test]
async fn with_no_source_namespace_a_pod_is_told_nothing_is_copied() {
    let (fake, client) = start_fake().await;
    let policy = ConfigFile::from_yaml(&format!(
        "rules:\n  - match: docker.io\n    target: harbor.corp.example/dockerhub\n    pullSecret: {SECRET}\n"
    ))
    .unwrap()
    .into_policy(None)
    .unwrap();
    let (sync, _metrics) = started_sync(&fake, client, &policy).await;
    let warnings = warnings_in(&sync, &policy, "team-a").await;
    assert_eq!(warnings.len(), 1, "{warnings:?}");
    assert!(
        warnings[0].contains("no source namespace") && warnings[0].contains("--namespace"),
        "{warnings:?}"
    );
    assert_eq!(fake.creates_in("team-a"), 0);
}

/// A copy that keeps failing is tried again later each time (the resync
/// period, then twice it, four times, ...), not at every resync: here ten
/// resyncs pass, and it is tried a handful of times.
#[tokio::test]
async fn a_copy_that_keeps_failing_is_tried_less_and_less_often() {
    let (fake, sync, policy) = fast_sync(true, "2s").await;
    fake.creates_fail_in.lock().unwrap().push("team-a".into());
    let warnings = warnings_in(&sync, &policy, "team-a").await;
    assert_eq!(warnings.len(), 1, "{warnings:?}");
    tokio::time::sleep(Duration::from_secs(3)).await;
    let tries = fake.creates_in("team-a");
    assert!((2..=6).contains(&tries), "{tries} creates in ten resyncs");
    // It is still kept: once creates answer, it is made.
    fake.creates_fail_in.lock().unwrap().clear();
    eventually("the copy is made", || fake.get("team-a", SECRET).is_some()).await;
}

/// A reload that turns the sync off forgets the copies kept to try again:
/// turned on later, nothing is written for pods admitted before.
#[tokio::test]
async fn a_reload_that_turns_the_sync_off_forgets_the_retries() {
    let (fake, sync, policy) = fast_sync(true, "2s").await;
    fake.creates_fail_in.lock().unwrap().push("team-a".into());
    let warnings = warnings_in(&sync, &policy, "team-a").await;
    assert_eq!(warnings.len(), 1, "{warnings:?}");
    sync.configure(&policy_with_sync_disabled());
    fake.creates_fail_in.lock().unwrap().clear();
    sync.configure(&policy);
    tokio::time::sleep(A_FEW_RESYNCS).await;
    assert_eq!(fake.creates_in("team-a"), 1);
    assert!(fake.get("team-a", SECRET).is_none());
}
