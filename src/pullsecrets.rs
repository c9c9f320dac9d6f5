//! Pull secrets that exist: each rule's `pullSecret` is copied from the
//! source namespace into every namespace whose pods get it, and copies are
//! kept in sync when the source rotates.
//!
//! The request path never waits on the API when the copy is known to exist:
//! a watch cache (one field-selected watch per secret name, so it holds only
//! those Secrets) answers. A missing copy is created by a background task,
//! and copies are brought to a rotated source by another, so a rotation's
//! updates never hold up the copy a new namespace's first pod waits for;
//! the admission waits for it at most `pullSecretSync.waitForCopy`, and not
//! past the apiserver's `?timeout=` (less a reserve; `deadline`).
//! Secret contents are never logged.

use std::collections::btree_map::Entry;
use std::collections::hash_map::DefaultHasher;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::hash::{Hash as _, Hasher as _};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use futures::StreamExt as _;
use k8s_openapi::api::core::v1::Secret;
use kube::api::{Api, ObjectMeta, PostParams};
use kube::runtime::WatchStreamExt as _;
use kube::runtime::watcher::{self, Event};
use tokio::sync::{Semaphore, mpsc, oneshot};
use tracing::{error, info, warn};

use crate::metrics::Metrics;
use crate::policy::Policy;
use crate::unwind;

pub const MANAGED_BY_LABEL: &str = "app.kubernetes.io/managed-by";
pub const MANAGED_BY_VALUE: &str = "image-rewriter";
/// `namespace/name` of the Secret a copy was made from.
pub const SOURCE_ANNOTATION: &str = "image-rewriter.io/source";
/// The Secret types a kubelet reads as image pull secrets.
const PULL_SECRET_TYPES: [&str; 2] = ["kubernetes.io/dockerconfigjson", "kubernetes.io/dockercfg"];
/// Each API call of the background tasks gives up after this.
const API_CALL_TIMEOUT: Duration = Duration::from_secs(5);
const QUEUE_CAPACITY: usize = 1024;
/// Copies made at once, each for another (namespace, name): a copy whose
/// calls are slow or hang (up to [`API_CALL_TIMEOUT`] each) holds up only
/// its own namespace's pods, and a burst of new namespaces does not add up
/// one copy's latency after another.
const COPIES_AT_ONCE: usize = 8;
/// How often every copy is compared with its source anyway. Events alone
/// miss a rotation whose sync met an API error, and a copy edited by hand
/// while its source is unchanged is seen at once but not retried.
pub const RESYNC_INTERVAL: Duration = Duration::from_secs(60);
/// Copies kept to try again at most (see [`Inner::retries`]); past it a
/// failed copy is only logged and counted.
const RETRY_CAPACITY: usize = 4096;
/// Retries queued per name at one reconcile: the copy queue is the
/// admissions' too, and must keep room for them.
const RETRIES_PER_ROUND: usize = 64;
/// A copy that keeps failing is tried at the resync after its failure, then
/// after twice that, and so on up to this many resync periods apart.
const RETRY_MAX_PERIODS: u32 = 32;
/// A copy still failing after this long is given up (and said so): its
/// pods have long been deleted or fixed by hand.
const RETRY_GIVE_UP_AFTER: Duration = Duration::from_secs(24 * 3600);

/// What the cache knows of one Secret.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Cached {
    managed: bool,
    /// Hash of type and data, to see whether a copy matches its source.
    fingerprint: u64,
    /// Its `image-rewriter.io/source` annotation: a copy that names another
    /// source was made before the source moved.
    source: Option<String>,
    /// The version it was read or written at: which of two accounts of it
    /// is the later one.
    resource_version: Option<String>,
    /// Being deleted (a finalizer holds it): gone soon, so no pod counts on it.
    terminating: bool,
}

#[derive(Debug, Default)]
struct NameCache {
    /// The first list completed: absence in `namespaces` means absence.
    synced: bool,
    namespaces: HashMap<String, Cached>,
}

/// A requested copy: (namespace, secret name).
type CopyKey = (String, String);

/// One running watch. Its task writes the cache only while it is still the
/// registered watch of its name: an aborted task may be mid-event.
struct Watch {
    id: u64,
    task: tokio::task::JoinHandle<()>,
}

/// What happened to one requested copy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Exists,
    Created,
    UserOwned,
    Failed(String),
}

/// Its locks are taken even when poisoned ([`unwind::lock`]): a panic can
/// leave at most one name's cache entry behind, which that name's watch and
/// the resync write again, while the queues and maps change by single
/// operations. Refusing them would stop the sync until a restart.
struct Inner {
    client: kube::Client,
    metrics: Arc<Metrics>,
    cache: RwLock<HashMap<String, NameCache>>,
    source_namespace: RwLock<Option<String>>,
    /// `pullSecretSync.enabled`: when false, nothing is written.
    enabled: std::sync::atomic::AtomicBool,
    /// The admissions waiting for each queued copy: the pods of a rollout
    /// in one namespace share one job, and one API call when it fails.
    waiting: Mutex<HashMap<CopyKey, Vec<oneshot::Sender<Outcome>>>>,
    /// Names with a reconcile queued and not started: one is enough, so a
    /// burst of events (or another writer fighting over a copy) cannot fill
    /// the queue the copies for admissions go through.
    reconcile_queued: Mutex<BTreeSet<String>>,
    watches: Mutex<HashMap<String, Watch>>,
    next_watch_id: std::sync::atomic::AtomicU64,
    /// Copies to make; their waiters are in [`Inner::waiting`].
    copies: mpsc::Sender<CopyKey>,
    /// Copies that admitted pods reference and that could not be made yet
    /// (the API failed, the source was missing, the copy there was being
    /// deleted), tried again at each reconcile of their name: at every
    /// resync and when the source changes. Their pods sit in
    /// `ImagePullBackOff` meanwhile, and no new admission may come to ask
    /// again (a ReplicaSet does not recreate a pod that fails to pull).
    retries: Mutex<BTreeMap<CopyKey, RetryState>>,
    /// The resync period, the first delay of a retry.
    resync_every: Duration,
    /// Names whose copies to bring to their source. A queue and a task of
    /// their own: a rotation updates every copy, one API call after
    /// another, and the copy a new namespace's first pod waits for must
    /// not wait behind them.
    reconciles: mpsc::Sender<String>,
}

/// What [`PullSecretSync::connect`] found.
pub enum ApiAccess {
    Connected(PullSecretSync),
    /// No cluster here (a run on a workstation): nothing to copy.
    OutsideACluster,
    /// In a pod whose API configuration does not load, a service account
    /// token not mounted say: the pods given a pull secret may not find it.
    MissingInPod,
}

/// The admission warnings for a pod given `names` in `namespace` by a
/// webhook that cannot reach the API from its pod: none when the config
/// turned the sync off (the secrets are someone else's to place).
pub fn warnings_without_api(policy: &Policy, namespace: &str, names: &[String]) -> Vec<String> {
    let settings = policy.pull_secret_sync();
    if !settings.enabled || settings.source_namespace.as_deref() == Some(namespace) {
        return Vec::new();
    }
    names
        .iter()
        .map(|name| {
            format!(
                "imagePullSecret {name:?} was added, but image-rewriter has no Kubernetes API \
                 access and cannot check or copy it into namespace {namespace:?}: pulls that \
                 need it fail if it is missing"
            )
        })
        .collect()
}

/// The running sync; cheap to clone.
#[derive(Clone)]
pub struct PullSecretSync {
    inner: Arc<Inner>,
}

impl PullSecretSync {
    /// Connects with the in-cluster config or a kubeconfig; logs once when
    /// there is neither.
    pub async fn connect(metrics: Arc<Metrics>) -> ApiAccess {
        match kube::Client::try_default().await {
            Ok(client) => ApiAccess::Connected(Self::start(client, metrics)),
            Err(error)
                if std::env::var_os("KUBERNETES_SERVICE_HOST")
                    .is_some_and(|host| !host.is_empty()) =>
            {
                error!(
                    %error,
                    "running in a pod, but its Kubernetes API configuration does not load (is the \
                     service account token mounted? automountServiceAccountToken): no pull secret \
                     can be checked or copied, and each admission that gives a pod one says so"
                );
                ApiAccess::MissingInPod
            }
            Err(error) => {
                info!(%error, "no Kubernetes API configuration; pull secret sync is off");
                ApiAccess::OutsideACluster
            }
        }
    }

    /// Starts the background tasks, with a resync every
    /// [`RESYNC_INTERVAL`]; watches start with [`Self::configure`].
    pub fn start(client: kube::Client, metrics: Arc<Metrics>) -> Self {
        Self::start_with_resync(client, metrics, RESYNC_INTERVAL)
    }

    /// [`Self::start`] with another resync interval.
    pub fn start_with_resync(
        client: kube::Client,
        metrics: Arc<Metrics>,
        resync_every: Duration,
    ) -> Self {
        let (copies, copy_queue) = mpsc::channel(QUEUE_CAPACITY);
        let (reconciles, reconcile_queue) = mpsc::channel(QUEUE_CAPACITY);
        let inner = Arc::new(Inner {
            client,
            metrics,
            cache: RwLock::default(),
            source_namespace: RwLock::default(),
            enabled: std::sync::atomic::AtomicBool::new(true),
            waiting: Mutex::default(),
            reconcile_queued: Mutex::default(),
            watches: Mutex::default(),
            next_watch_id: std::sync::atomic::AtomicU64::new(0),
            copies,
            reconciles,
            retries: Mutex::default(),
            resync_every,
        });
        tokio::spawn(copy_worker(inner.clone(), copy_queue));
        tokio::spawn(reconcile_worker(inner.clone(), reconcile_queue));
        tokio::spawn(resync(inner.clone(), resync_every));
        Self { inner }
    }

    /// Follows a (re)loaded config: watches exactly the rules' secret names,
    /// and when the source namespace changed, brings the copies of the names
    /// already watched to the new source (a new watch does so once listed).
    /// The watches need not move: they cover every namespace.
    pub fn configure(&self, policy: &Policy) {
        let inner = &self.inner;
        let settings = policy.pull_secret_sync();
        if settings.enabled
            && settings.source_namespace.is_none()
            && !policy.pull_secret_names().is_empty()
        {
            warn!(
                "pull secrets cannot be copied: no source namespace is known (served outside a \
                 cluster?); set --namespace or pullSecretSync.sourceNamespace"
            );
        }
        inner
            .enabled
            .store(policy.pull_secret_sync().enabled, Ordering::Relaxed);
        let new_source = &policy.pull_secret_sync().source_namespace;
        let source_moved = {
            let mut source = unwind::write(&inner.source_namespace);
            let moved = *source != *new_source;
            source.clone_from(new_source);
            moved
        };
        let names = policy.pull_secret_names();
        let mut watches = unwind::lock(&inner.watches);
        if source_moved {
            let watched: Vec<String> = names
                .iter()
                .filter(|name| watches.contains_key(*name))
                .cloned()
                .collect();
            reconcile_in_background(inner.clone(), watched);
        }
        {
            let mut retries = unwind::lock(&inner.retries);
            if settings.enabled {
                retries.retain(|(_, name), _| names.contains(name));
            } else {
                retries.clear();
            }
        }
        watches.retain(|name, watch| {
            let keep = names.contains(name);
            if !keep {
                watch.task.abort();
                let mut cache = unwind::write(&inner.cache);
                cache.remove(name);
                // The gauge counts what is left: no event of the dropped
                // name's watch comes to update it.
                inner.update_cache_size(&cache);
            }
            keep
        });
        for name in names {
            watches.entry(name.clone()).or_insert_with(|| {
                // Its cache entry lives exactly as long as its watch.
                unwind::write(&inner.cache).entry(name.clone()).or_default();
                let id = inner
                    .next_watch_id
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let task = tokio::spawn(watch_name(inner.clone(), name, id));
                Watch { id, task }
            });
        }
    }

    /// Whether every watched name has completed its first list.
    pub fn is_synced(&self) -> bool {
        unwind::read(&self.inner.cache).values().all(|c| c.synced)
    }

    /// What a pod that will reference `names` in `namespace` is told from
    /// the cache alone, writing nothing: a dry run, or any pod while sync is
    /// disabled. That is a warning for each secret known missing with sync
    /// disabled; a copy the real request would make (and that could fail)
    /// is not tried.
    pub fn warnings_without_copying(
        &self,
        policy: &Policy,
        namespace: &str,
        names: &[String],
    ) -> Vec<String> {
        let settings = policy.pull_secret_sync();
        if settings.enabled || copy_source(settings, namespace).is_none() {
            return Vec::new();
        }
        names
            .iter()
            .filter_map(|name| match self.inner.lookup(name, namespace) {
                Lookup::Absent => Some(missing_without_sync(name, namespace)),
                Lookup::Terminating => Some(format!(
                    "imagePullSecret {name:?} in namespace {namespace:?} is being deleted and \
                     pullSecretSync is disabled: pulls that need it will fail once it is gone"
                )),
                Lookup::Present | Lookup::Unknown => None,
            })
            .collect()
    }

    /// Makes sure `names` exist in `namespace` for a pod being admitted:
    /// no API call when the cache has them, otherwise a copy requested and
    /// awaited at most `waitForCopy`, and not past `stop_waiting_by` (where
    /// the apiserver would no longer read the answer). Returns warnings for
    /// the response.
    pub async fn ensure_for_pod(
        &self,
        policy: &Policy,
        namespace: &str,
        names: &[String],
        stop_waiting_by: Option<Instant>,
    ) -> Vec<String> {
        let settings = policy.pull_secret_sync();
        if !settings.enabled {
            return self.warnings_without_copying(policy, namespace, names);
        }
        if settings.source_namespace.is_none() {
            return names
                .iter()
                .map(|name| no_source_namespace(name, namespace))
                .collect();
        }
        let Some(source_namespace) = copy_source(settings, namespace) else {
            return Vec::new();
        };
        let mut warnings = Vec::new();
        let mut pending = Vec::new();
        for name in names {
            if let Lookup::Present = self.inner.lookup(name, namespace) {
                continue;
            }
            match self.inner.request_copy(namespace, name) {
                Some(outcome) => pending.push((name, outcome)),
                None => {
                    self.inner.metrics.pull_secret_sync_errors.inc();
                    self.inner.retry_later(namespace, name, Retry::Yes);
                    warnings.push(format!(
                        "imagePullSecret {name:?} is missing in namespace {namespace:?} \
                         and the copy queue is full; pulls that need it may fail"
                    ));
                }
            }
        }
        if pending.is_empty() {
            return warnings;
        }
        let configured = tokio::time::Instant::now() + settings.wait_for_copy;
        let wait_until = match stop_waiting_by {
            Some(deadline) => configured.min(tokio::time::Instant::from_std(deadline)),
            None => configured,
        };
        // Each copy waited for on its own: one still under way must not
        // hide another that failed in time.
        let waited =
            futures::future::join_all(pending.into_iter().map(|(name, outcome)| async move {
                (name, tokio::time::timeout_at(wait_until, outcome).await)
            }))
            .await;
        for (name, outcome) in waited {
            // Not done in time: the copy goes on in the background and the
            // kubelet retries its pull; nothing to warn about yet.
            if let Ok(Ok(Outcome::Failed(reason))) = outcome {
                warnings.push(format!(
                    "imagePullSecret {name:?} is missing in namespace {namespace:?} and could \
                     not be copied from {source_namespace:?}: {reason}"
                ));
            }
        }
        warnings
    }
}

/// Where the copies a pod in `namespace` needs come from; `None` when it
/// needs none: without a source, or in the source's own namespace.
fn copy_source<'a>(
    settings: &'a crate::policy::PullSecretSync,
    namespace: &str,
) -> Option<&'a str> {
    settings
        .source_namespace
        .as_deref()
        .filter(|source| *source != namespace)
}

/// Served outside a cluster (a kubeconfig) with no `--namespace` and no
/// `pullSecretSync.sourceNamespace`: there is nowhere to copy from.
fn no_source_namespace(name: &str, namespace: &str) -> String {
    format!(
        "imagePullSecret {name:?} was added, but image-rewriter knows no source namespace to \
         copy it from into namespace {namespace:?} (set --namespace or \
         pullSecretSync.sourceNamespace): pulls that need it fail if it is missing"
    )
}

fn missing_without_sync(name: &str, namespace: &str) -> String {
    format!(
        "imagePullSecret {name:?} does not exist in namespace {namespace:?} and \
         pullSecretSync is disabled: pulls that need it will fail"
    )
}

enum Lookup {
    Present,
    Absent,
    /// There, but being deleted.
    Terminating,
    /// The watch has not listed yet.
    Unknown,
}

impl Inner {
    /// Queues a copy of `name` into `namespace`, or joins the one queued
    /// already; `None` when the queue is full.
    fn request_copy(&self, namespace: &str, name: &str) -> Option<oneshot::Receiver<Outcome>> {
        let (reply, outcome) = oneshot::channel();
        let mut waiting = unwind::lock(&self.waiting);
        let key = (namespace.to_owned(), name.to_owned());
        if let Some(waiters) = waiting.get_mut(&key) {
            waiters.push(reply);
            return Some(outcome);
        }
        self.copies.try_send(key.clone()).ok()?;
        waiting.insert(key, vec![reply]);
        Some(outcome)
    }

    /// Answers everyone waiting for the copy of `name` in `namespace`.
    fn copy_done(&self, namespace: &str, name: &str, outcome: &Outcome) {
        let key = (namespace.to_owned(), name.to_owned());
        let waiters = unwind::lock(&self.waiting).remove(&key).unwrap_or_default();
        for reply in waiters {
            let _ = reply.send(outcome.clone());
        }
    }

    fn is_enabled(&self) -> bool {
        self.enabled.load(Ordering::Relaxed)
    }

    /// Keeps the copy of `name` in `namespace` to try again, later each time
    /// it fails, or forgets it: when it needs no retry, when the sync is
    /// off or the name no longer configured (a copy job that was under way
    /// when a reload said so), or when it has failed for a day.
    fn retry_later(&self, namespace: &str, name: &str, retry: Retry) {
        let key = (namespace.to_owned(), name.to_owned());
        // Both held, in `configure`'s order, while deciding: a reload that
        // turns the sync off or drops the name between the check and the
        // insert would otherwise find nothing to clear, and leave it.
        let watches = unwind::lock(&self.watches);
        let mut retries = unwind::lock(&self.retries);
        let wanted = retry != Retry::No && self.is_enabled() && watches.contains_key(name);
        drop(watches);
        if !wanted {
            retries.remove(&key);
            return;
        }
        let now = Instant::now();
        if !retries.contains_key(&key) && retries.len() >= RETRY_CAPACITY {
            return;
        }
        let state = match retries.entry(key) {
            Entry::Occupied(failing)
                if now.duration_since(failing.get().since) > RETRY_GIVE_UP_AFTER =>
            {
                failing.remove();
                warn!(secret = %name, %namespace, "pull secret copy still failing after a day; no longer tried (a new pod there asks again)");
                return;
            }
            entry => entry.or_insert(RetryState {
                failures: 0,
                since: now,
                next: now,
            }),
        };
        state.failures = state.failures.saturating_add(1);
        let periods = 2_u32
            .saturating_pow(state.failures - 1)
            .min(RETRY_MAX_PERIODS);
        state.next = now
            + self
                .resync_every
                .saturating_mul(periods)
                .saturating_sub(self.resync_every / 2);
    }

    /// Makes every retry of `name` due: its source changed, so a copy that
    /// failed for want of it need not wait out its delay.
    fn retry_now(&self, name: &str) {
        let now = Instant::now();
        for ((_, retried), state) in unwind::lock(&self.retries).iter_mut() {
            if retried == name {
                state.next = now;
            }
        }
    }

    fn is_retried(&self, namespace: &str, name: &str) -> bool {
        unwind::lock(&self.retries).contains_key(&(namespace.to_owned(), name.to_owned()))
    }

    /// Queues again the copies of `name` kept to try again whose time has
    /// come, a few at a time; those the cache shows made meanwhile (by
    /// another replica, say) are forgotten.
    fn retry_copies(&self, name: &str) {
        let now = Instant::now();
        let due: Vec<CopyKey> = unwind::lock(&self.retries)
            .iter()
            .filter(|((_, retried), state)| retried == name && state.next <= now)
            .map(|(key, _)| key.clone())
            .take(RETRIES_PER_ROUND)
            .collect();
        for (namespace, name) in due {
            if let Lookup::Present = self.lookup(&name, &namespace) {
                self.retry_later(&namespace, &name, Retry::No);
            } else {
                // Nobody waits for it; a full queue leaves it for next time.
                let _ = self.request_copy(&namespace, &name);
            }
        }
    }

    /// Whether a managed copy of this replica's source differs from it in
    /// the cache: edited by hand, or left behind by a failed sync. A copy
    /// that names another source is another writer's (a replica still on
    /// the previous config, during a reload that moved the source): the
    /// resync settles it, not a race of writes on every event.
    fn differs_from_source(&self, name: &str, copy: &Cached) -> bool {
        let Some(source_namespace) = self.source_namespace() else {
            return false;
        };
        let origin = source_reference(&source_namespace, name);
        if copy.source.as_ref().is_some_and(|named| *named != origin) {
            return false;
        }
        unwind::read(&self.cache)
            .get(name)
            .and_then(|entry| entry.namespaces.get(&source_namespace))
            .is_some_and(|source| source.fingerprint != copy.fingerprint)
    }

    fn lookup(&self, name: &str, namespace: &str) -> Lookup {
        let cache = unwind::read(&self.cache);
        let Some(entry) = cache.get(name) else {
            return Lookup::Unknown;
        };
        match entry.namespaces.get(namespace) {
            Some(cached) if cached.terminating => Lookup::Terminating,
            Some(_) => Lookup::Present,
            None if entry.synced => Lookup::Absent,
            None => Lookup::Unknown,
        }
    }

    /// Queues a reconcile of `name` unless one is queued already.
    async fn request_reconcile(&self, name: &str) {
        let newly_queued = unwind::lock(&self.reconcile_queued).insert(name.to_owned());
        if newly_queued && self.reconciles.send(name.to_owned()).await.is_err() {
            unwind::lock(&self.reconcile_queued).remove(name);
        }
    }

    fn source_namespace(&self) -> Option<String> {
        unwind::read(&self.source_namespace).clone()
    }

    /// Runs `update` on the cache of `name` if watch `id` is still the one
    /// registered for it (locks in the order `configure` takes them).
    fn update_if_current(&self, name: &str, id: u64, update: impl FnOnce(&mut NameCache)) {
        let watches = unwind::lock(&self.watches);
        if watches.get(name).map(|watch| watch.id) != Some(id) {
            return;
        }
        let mut cache = unwind::write(&self.cache);
        update(cache.entry(name.to_owned()).or_default());
        self.update_cache_size(&cache);
    }

    /// Records a Secret just written or read, if its name is still watched
    /// (a reload may have dropped it while the call was under way), and
    /// reports it if it is a user's Secret not known as one before.
    ///
    /// The watch is the one ordered account of a Secret's versions; a
    /// call's answer may arrive after the watch has shown a later one (a
    /// change made since, say by hand), which it must not hide. So the
    /// answer is taken only where the cache knows no version of the Secret,
    /// the same one, or the one this write `replaced`; any other is the
    /// watch's later version, or an earlier one its next event replaces.
    fn remember(&self, name: &str, namespace: &str, cached: Cached, replaced: Option<&str>) {
        let managed = cached.managed;
        let mut cache = unwind::write(&self.cache);
        if let Some(entry) = cache.get_mut(name) {
            if let Some(known) = entry.namespaces.get(namespace) {
                let known = known.resource_version.as_deref();
                if known != cached.resource_version.as_deref()
                    && (replaced.is_none() || known != replaced)
                {
                    return;
                }
            }
            let before = entry.namespaces.insert(namespace.to_owned(), cached);
            self.update_cache_size(&cache);
            drop(cache);
            if newly_user_owned(before.as_ref(), managed) {
                self.found_users_own(name, namespace);
            }
        }
    }

    /// A Secret image-rewriter did not create stands where a copy would go:
    /// it is left alone, said once and counted once (at its first sight,
    /// whether the watch, a create's conflict or a sync found it), not at
    /// every admission or resync that passes it by.
    fn found_users_own(&self, name: &str, namespace: &str) {
        warn!(secret = %name, %namespace, "a Secret image-rewriter did not create has this name; it is left alone, and pods in this namespace use it as it is");
        self.count("user_owned");
    }

    fn update_cache_size(&self, cache: &HashMap<String, NameCache>) {
        let size: usize = cache.values().map(|c| c.namespaces.len()).sum();
        self.metrics.pull_secret_cache_size.set(size as i64);
    }

    fn count(&self, result: &'static str) {
        self.metrics.count_copy(result);
    }
}

fn fingerprint(secret: &Secret) -> u64 {
    let mut hasher = DefaultHasher::new();
    secret.type_.hash(&mut hasher);
    if let Some(data) = &secret.data {
        for (key, value) in data {
            key.hash(&mut hasher);
            value.0.hash(&mut hasher);
        }
    }
    hasher.finish()
}

fn is_managed(secret: &Secret) -> bool {
    secret
        .metadata
        .labels
        .as_ref()
        .and_then(|labels| labels.get(MANAGED_BY_LABEL))
        .is_some_and(|value| value == MANAGED_BY_VALUE)
}

/// Whether a Secret of ours, or none, stood where a user's (`managed` false)
/// is now.
fn newly_user_owned(before: Option<&Cached>, managed: bool) -> bool {
    !managed && before.is_none_or(|before| before.managed)
}

fn cached(secret: &Secret) -> Cached {
    Cached {
        managed: is_managed(secret),
        fingerprint: fingerprint(secret),
        source: secret
            .metadata
            .annotations
            .as_ref()
            .and_then(|annotations| annotations.get(SOURCE_ANNOTATION))
            .cloned(),
        resource_version: secret.metadata.resource_version.clone(),
        terminating: secret.metadata.deletion_timestamp.is_some(),
    }
}

/// The `image-rewriter.io/source` annotation of a copy of `name` from
/// `source_namespace`.
fn source_reference(source_namespace: &str, name: &str) -> String {
    format!("{source_namespace}/{name}")
}

/// Keeps the cache of one secret name current, across all namespaces.
async fn watch_name(inner: Arc<Inner>, name: String, id: u64) {
    let api: Api<Secret> = Api::all(inner.client.clone());
    let config = watcher::Config::default().fields(&format!("metadata.name={name}"));
    let mut events = watcher::watcher(api, config).default_backoff().boxed();
    let mut relisted: Option<HashMap<String, Cached>> = None;
    while let Some(event) = events.next().await {
        let source_namespace = inner.source_namespace();
        match event {
            Ok(Event::Init) => relisted = Some(HashMap::new()),
            Ok(Event::InitApply(secret)) => {
                if let (Some(list), Some(namespace)) =
                    (&mut relisted, secret.metadata.namespace.clone())
                {
                    list.insert(namespace, cached(&secret));
                }
            }
            Ok(Event::InitDone) => {
                let namespaces = relisted.take().unwrap_or_default();
                if source_namespace
                    .as_ref()
                    .is_some_and(|ns| !namespaces.contains_key(ns))
                {
                    error!(secret = %name, source = ?source_namespace, "source pull secret does not exist; no copies can be made");
                    inner.metrics.pull_secret_sync_errors.inc();
                }
                let mut users_own = Vec::new();
                inner.update_if_current(&name, id, |entry| {
                    users_own = namespaces
                        .iter()
                        .filter(|(namespace, listed)| {
                            source_namespace.as_deref() != Some(namespace.as_str())
                                && newly_user_owned(
                                    entry.namespaces.get(*namespace),
                                    listed.managed,
                                )
                        })
                        .map(|(namespace, _)| namespace.clone())
                        .collect();
                    entry.namespaces = namespaces;
                    entry.synced = true;
                });
                for namespace in users_own {
                    inner.found_users_own(&name, &namespace);
                }
                inner.request_reconcile(&name).await;
            }
            Ok(Event::Apply(secret)) => {
                let Some(namespace) = secret.metadata.namespace.clone() else {
                    continue;
                };
                let is_source = source_namespace.as_deref() == Some(namespace.as_str());
                let entry = cached(&secret);
                let managed = entry.managed;
                let drifted = !is_source && managed && inner.differs_from_source(&name, &entry);
                let mut users_own = false;
                inner.update_if_current(&name, id, |cache| {
                    let before = cache.namespaces.insert(namespace.clone(), entry);
                    users_own = !is_source && newly_user_owned(before.as_ref(), managed);
                });
                if users_own {
                    inner.found_users_own(&name, &namespace);
                }
                if is_source {
                    inner.retry_now(&name);
                }
                if is_source || drifted {
                    inner.request_reconcile(&name).await;
                }
            }
            Ok(Event::Delete(secret)) => {
                let Some(namespace) = secret.metadata.namespace.clone() else {
                    continue;
                };
                inner.update_if_current(&name, id, |entry| {
                    entry.namespaces.remove(&namespace);
                });
                // A copy that was being deleted when a pod needed it.
                if inner.is_retried(&namespace, &name) && inner.is_enabled() {
                    let _ = inner.request_copy(&namespace, &name);
                }
                if source_namespace.as_deref() == Some(namespace.as_str()) {
                    error!(secret = %name, %namespace, "source pull secret deleted; copies are left in place");
                    inner.metrics.pull_secret_sync_errors.inc();
                }
            }
            Err(error) => {
                warn!(secret = %name, %error, "pull secret watch failed; retrying");
                inner.metrics.pull_secret_sync_errors.inc();
            }
        }
    }
}

/// Creates the copies admissions asked for, off the request path, up to
/// [`COPIES_AT_ONCE`] at a time: one at a time, a copy whose create hung
/// made every other namespace's first pod wait behind it, past its
/// `waitForCopy`. Two jobs never share a key: a key's waiters join its one
/// job until it is done. The copies run beside the reconciles: a copy made
/// from a source read just before a rotation, and missed by that
/// rotation's reconcile, is seen by the watch as differing from the source
/// and reconciled again.
async fn copy_worker(inner: Arc<Inner>, mut queue: mpsc::Receiver<CopyKey>) {
    let slots = Arc::new(Semaphore::new(COPIES_AT_ONCE));
    while let Some((namespace, name)) = queue.recv().await {
        let Ok(slot) = slots.clone().acquire_owned().await else {
            return;
        };
        let inner = inner.clone();
        tokio::spawn(async move {
            // A copy that panicked still answers its waiters: otherwise its
            // key would stay queued, and every later pod would wait on a
            // copy that is never made.
            // A panic would only panic again: not retried.
            let (outcome, retry) =
                crate::unwind::catching_async(ensure_copy(&inner, &namespace, &name))
                    .await
                    .unwrap_or_else(|panic| {
                        error!(secret = %name, %namespace, "pull secret copy {panic}");
                        inner.metrics.pull_secret_sync_errors.inc();
                        (Outcome::Failed(format!("the copy {panic}")), Retry::No)
                    });
            inner.retry_later(&namespace, &name, retry);
            inner.copy_done(&namespace, &name, &outcome);
            // Its deletion may have been seen while this job ran, when it
            // was no retry yet (or it joined this job), so the watch's cue
            // is gone: asked here instead.
            if retry == Retry::WhenGone && matches!(inner.lookup(&name, &namespace), Lookup::Absent)
            {
                let _ = inner.request_copy(&namespace, &name);
            }
            drop(slot);
        });
    }
}

/// Brings copies to their source, one name at a time, off the request path.
async fn reconcile_worker(inner: Arc<Inner>, mut queue: mpsc::Receiver<String>) {
    while let Some(name) = queue.recv().await {
        // Unmarked before it runs: a change seen from here on needs a
        // reconcile of its own.
        unwind::lock(&inner.reconcile_queued).remove(&name);
        // One name's panic must not stop the reconciles of all the others.
        if let Err(panic) = crate::unwind::catching_async(reconcile(&inner, &name)).await {
            error!(secret = %name, "pull secret reconcile {panic}");
            inner.metrics.pull_secret_sync_errors.inc();
        }
    }
}

/// Queues a reconcile of each of `names` without blocking the caller.
fn reconcile_in_background(inner: Arc<Inner>, names: Vec<String>) {
    if names.is_empty() {
        return;
    }
    tokio::spawn(async move {
        for name in names {
            inner.request_reconcile(&name).await;
        }
    });
}

/// Queues a reconcile of every watched name that has listed, each period.
async fn resync(inner: Arc<Inner>, every: Duration) {
    let mut ticks = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticks.tick().await;
        // Outside a cluster with no namespace given there is no source to
        // compare with (and nothing was copied).
        if inner.source_namespace().is_none() {
            continue;
        }
        let names: Vec<String> = unwind::read(&inner.cache)
            .iter()
            .filter(|(_, entry)| entry.synced)
            .map(|(name, _)| name.clone())
            .collect();
        for name in names {
            inner.request_reconcile(&name).await;
        }
    }
}

async fn api_call<T>(
    future: impl Future<Output = Result<T, kube::Error>>,
) -> Result<T, kube::Error> {
    match tokio::time::timeout(API_CALL_TIMEOUT, future).await {
        Ok(result) => result,
        Err(_) => Err(kube::Error::Service(
            format!("no answer from the API server within {API_CALL_TIMEOUT:?}").into(),
        )),
    }
}

fn is_status(error: &kube::Error, code: u16) -> bool {
    matches!(error, kube::Error::Api(status) if status.code == code)
}

/// What an API error says, for a warning: a refusal's own message (another
/// admission webhook's, RBAC's), without kube's debug dump of the same.
fn api_reason(error: &kube::Error) -> String {
    match error {
        kube::Error::Api(status) => {
            format!("{} ({} {})", status.message, status.code, status.reason)
        }
        other => other.to_string(),
    }
}

/// The source Secret, checked to be a pull secret.
async fn source_secret(inner: &Inner, name: &str) -> Result<(String, Secret), String> {
    let Some(source_namespace) = inner.source_namespace() else {
        return Err("the source namespace is unknown".into());
    };
    let api: Api<Secret> = Api::namespaced(inner.client.clone(), &source_namespace);
    let secret = match api_call(api.get_opt(name)).await {
        Ok(Some(secret)) => secret,
        Ok(None) => {
            return Err(format!(
                "source Secret {source_namespace}/{name} does not exist"
            ));
        }
        Err(error) => {
            return Err(format!(
                "cannot read source Secret {source_namespace}/{name}: {}",
                api_reason(&error)
            ));
        }
    };
    let kind = secret.type_.as_deref().unwrap_or("Opaque");
    if !PULL_SECRET_TYPES.contains(&kind) {
        return Err(format!(
            "source Secret {source_namespace}/{name} has type {kind}, not kubernetes.io/dockerconfigjson"
        ));
    }
    Ok((source_namespace, secret))
}

fn copy_of(source: &Secret, source_namespace: &str, namespace: &str) -> Secret {
    let name = source.metadata.name.clone();
    Secret {
        metadata: ObjectMeta {
            name: name.clone(),
            namespace: Some(namespace.to_owned()),
            labels: Some(BTreeMap::from([(
                MANAGED_BY_LABEL.to_owned(),
                MANAGED_BY_VALUE.to_owned(),
            )])),
            annotations: Some(BTreeMap::from([(
                SOURCE_ANNOTATION.to_owned(),
                source_reference(source_namespace, name.as_deref().unwrap_or_default()),
            )])),
            ..ObjectMeta::default()
        },
        type_: source.type_.clone(),
        data: source.data.clone(),
        ..Secret::default()
    }
}

/// Whether a copy that was not made is tried again later.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Retry {
    Yes,
    /// A Secret of that name is being deleted: at once when it is gone.
    WhenGone,
    No,
}

/// A copy kept to try again.
#[derive(Debug, Clone, Copy)]
struct RetryState {
    failures: u32,
    /// Its first failure.
    since: Instant,
    /// Not tried again before this.
    next: Instant,
}

/// Makes the copy of `name` in `namespace` unless the cache has it; says
/// whether to try again: after a failure that may pass, not once it is
/// made (or a user's Secret stands there), nor for a namespace that is gone
/// or being deleted, nor while the sync is off.
async fn ensure_copy(inner: &Inner, namespace: &str, name: &str) -> (Outcome, Retry) {
    if matches!(inner.lookup(name, namespace), Lookup::Present) {
        return (Outcome::Exists, Retry::No);
    }
    // Queued before a reload turned the sync off.
    if !inner.is_enabled() {
        return (
            Outcome::Failed("pullSecretSync is disabled".into()),
            Retry::No,
        );
    }
    let (source_namespace, source) = match source_secret(inner, name).await {
        Ok(found) => found,
        Err(reason) => {
            error!(secret = %name, %namespace, %reason, "cannot copy pull secret");
            inner.metrics.pull_secret_sync_errors.inc();
            inner.count("failed");
            return (Outcome::Failed(reason), Retry::Yes);
        }
    };
    // A reload that turned the sync off while the source was read (each
    // call may take up to API_CALL_TIMEOUT): nothing is written from here.
    if !inner.is_enabled() {
        return (
            Outcome::Failed("pullSecretSync is disabled".into()),
            Retry::No,
        );
    }
    let api: Api<Secret> = Api::namespaced(inner.client.clone(), namespace);
    let copy = copy_of(&source, &source_namespace, namespace);
    let outcome = match api_call(api.create(&PostParams::default(), &copy)).await {
        Ok(created) => {
            info!(secret = %name, %namespace, "pull secret copied");
            inner.remember(name, namespace, cached(&created), None);
            inner.count("created");
            (Outcome::Created, Retry::No)
        }
        Err(error) if is_status(&error, 409) => {
            // Someone (a user, or another replica) was first.
            match api_call(api.get_opt(name)).await {
                Ok(Some(existing)) => {
                    // A user's Secret is counted by `remember`, once.
                    inner.remember(name, namespace, cached(&existing), None);
                    if existing.metadata.deletion_timestamp.is_some() {
                        warn!(secret = %name, %namespace, "a pull secret of this name is being deleted; the copy is made once it is gone");
                        inner.metrics.pull_secret_sync_errors.inc();
                        inner.count("failed");
                        let reason = "a Secret of that name is being deleted (a finalizer holds \
                                      it); the copy is made once it is gone";
                        (Outcome::Failed(reason.into()), Retry::WhenGone)
                    } else if is_managed(&existing) {
                        inner.count("exists");
                        (Outcome::Exists, Retry::No)
                    } else {
                        (Outcome::UserOwned, Retry::No)
                    }
                }
                Ok(None) => {
                    warn!(secret = %name, %namespace, "the pull secret was created by someone else and deleted again before it could be read");
                    inner.metrics.pull_secret_sync_errors.inc();
                    inner.count("failed");
                    let reason = "it was created by someone else and deleted again";
                    (Outcome::Failed(reason.into()), Retry::Yes)
                }
                Err(error) => {
                    warn!(secret = %name, %namespace, %error, "cannot read the pull secret that exists already");
                    inner.metrics.pull_secret_sync_errors.inc();
                    inner.count("failed");
                    let reason = format!(
                        "it exists already, and reading it failed: {}",
                        api_reason(&error)
                    );
                    (Outcome::Failed(reason), Retry::Yes)
                }
            }
        }
        Err(error) => {
            error!(secret = %name, %namespace, %error, "cannot create pull secret copy");
            inner.metrics.pull_secret_sync_errors.inc();
            inner.count("failed");
            let retry = if namespace_is_gone(&error) {
                Retry::No
            } else {
                Retry::Yes
            };
            (Outcome::Failed(api_reason(&error)), retry)
        }
    };
    // A reload moved the source while this copy was made from the old one:
    // the reconcile that reload queued ran before the copy was in the
    // cache, and its watch event is no cue (a copy naming another source
    // is left to the resync), so one is queued now.
    if inner
        .source_namespace()
        .is_some_and(|now| now != source_namespace)
    {
        inner.request_reconcile(name).await;
    }
    outcome
}

/// A create refused because its namespace does not exist (404) or is being
/// deleted (403, cause `NamespaceTerminating`): no pod there needs a copy.
fn namespace_is_gone(error: &kube::Error) -> bool {
    match error {
        kube::Error::Api(status) => {
            status.code == 404
                || (status.code == 403 && status.message.contains("being terminated"))
        }
        _ => false,
    }
}

/// Brings every managed copy of `name` to the source's content, and to
/// naming it. A copy that names no source is judged by its content alone,
/// so one labelled by hand is not rewritten just to gain the annotation.
async fn reconcile(inner: &Inner, name: &str) {
    if !inner.is_enabled() {
        return;
    }
    let (source_namespace, source) = match source_secret(inner, name).await {
        Ok(found) => found,
        Err(reason) => {
            error!(secret = %name, %reason, "cannot sync pull secret copies");
            inner.metrics.pull_secret_sync_errors.inc();
            return;
        }
    };
    let wanted = fingerprint(&source);
    let origin = source_reference(&source_namespace, name);
    let is_stale = |copy: &Cached| {
        copy.fingerprint != wanted || copy.source.as_ref().is_some_and(|named| *named != origin)
    };
    let stale: BTreeSet<String> = unwind::read(&inner.cache)
        .get(name)
        .map(|entry| {
            entry
                .namespaces
                .iter()
                .filter(|(ns, c)| **ns != source_namespace && c.managed && is_stale(c))
                .map(|(ns, _)| ns.clone())
                .collect()
        })
        .unwrap_or_default();
    for namespace in stale {
        if !inner.is_enabled() {
            return;
        }
        update_copy(inner, &source, &source_namespace, &namespace).await;
    }
    inner.retry_copies(name);
}

async fn update_copy(inner: &Inner, source: &Secret, source_namespace: &str, namespace: &str) {
    let name = source.metadata.name.clone().unwrap_or_default();
    let api: Api<Secret> = Api::namespaced(inner.client.clone(), namespace);
    // Read-modify-write with the resourceVersion just read; a conflict means
    // someone wrote in between, so read again (twice at most).
    for _ in 0..2 {
        let current = match api_call(api.get_opt(&name)).await {
            Ok(Some(current)) => current,
            Ok(None) => return,
            Err(error) => {
                warn!(secret = %name, %namespace, %error, "cannot read pull secret copy");
                inner.metrics.pull_secret_sync_errors.inc();
                return;
            }
        };
        if !is_managed(&current) {
            // Taken over by a user (our label removed): theirs now, left
            // alone, and counted once by `remember`.
            inner.remember(&name, namespace, cached(&current), None);
            return;
        }
        // A Secret's type cannot change: the apiserver would refuse the
        // update, at every resync.
        if current.type_ != source.type_ {
            error!(
                secret = %name, %namespace,
                copy_type = current.type_.as_deref().unwrap_or("Opaque"),
                source_type = source.type_.as_deref().unwrap_or("Opaque"),
                "the source's type changed, and a Secret's type cannot: delete this copy to have it made again"
            );
            inner.metrics.pull_secret_sync_errors.inc();
            inner.count("failed");
            return;
        }
        let origin = source_reference(source_namespace, &name);
        let as_is = cached(&current);
        let same_content = as_is.fingerprint == fingerprint(source);
        // Another replica (each runs this sync) may have written it already.
        if same_content && as_is.source.as_ref() == Some(&origin) {
            inner.remember(&name, namespace, as_is, None);
            return;
        }
        // An immutable Secret's data cannot change (someone made the copy
        // immutable): the apiserver would refuse the update, at every resync.
        if current.immutable == Some(true) && !same_content {
            error!(
                secret = %name, %namespace,
                "this copy is immutable, so it cannot follow its source: delete it to have it made again"
            );
            inner.metrics.pull_secret_sync_errors.inc();
            inner.count("failed");
            return;
        }
        let mut updated = copy_of(source, source_namespace, namespace);
        // Nor can `immutable` be unset; the source annotation may still change.
        updated.immutable = current.immutable;
        // The copy's metadata as read, with its resourceVersion (a write in
        // between is a conflict): an update replaces the labels, annotations,
        // finalizers and owner references with the body's, and those others
        // set (a backup tool's, say) must stay. Only the source annotation
        // changes; managedFields left out are kept as they are.
        let mut metadata = current.metadata.clone();
        metadata.managed_fields = None;
        metadata
            .annotations
            .get_or_insert_with(BTreeMap::new)
            .insert(SOURCE_ANNOTATION.to_owned(), origin);
        updated.metadata = metadata;
        // Turned off by a reload while the copy was read.
        if !inner.is_enabled() {
            return;
        }
        match api_call(api.replace(&name, &PostParams::default(), &updated)).await {
            Ok(written) => {
                info!(secret = %name, %namespace, "pull secret copy updated from its source");
                inner.remember(
                    &name,
                    namespace,
                    cached(&written),
                    current.metadata.resource_version.as_deref(),
                );
                inner.count("updated");
                return;
            }
            Err(error) if is_status(&error, 409) => continue,
            Err(error) => {
                warn!(secret = %name, %namespace, %error, "cannot update pull secret copy");
                inner.metrics.pull_secret_sync_errors.inc();
                inner.count("failed");
                return;
            }
        }
    }
    warn!(secret = %name, %namespace, "pull secret copy changed under each of two updates; the next resync tries again");
    inner.metrics.pull_secret_sync_errors.inc();
}
