//! A real Kubernetes control plane for end-to-end tests: etcd + kube-apiserver,
//! built from Go modules by `tests/control-plane/build.sh` (like
//! controller-runtime's envtest), started on free loopback ports in a temporary
//! directory, and stopped (kill + wait) when the [`ControlPlane`] is dropped.
//!
//! The apiserver is configured like a real cluster's: its own CA and serving
//! certificate, RBAC authorization, ServiceAccount token signing, the default
//! admission plugins (MutatingAdmissionWebhook, ServiceAccount, ...). There is
//! no controller-manager, scheduler or kubelet: what those would create (the
//! `default` ServiceAccount of a namespace, the `kube-root-ca.crt` ConfigMap)
//! the harness creates on request, see
//! [`ControlPlane::ensure_default_service_account`].
//!
//! Authentication uses a static token file with two identities, see [`Identity`].
//!
//! The binaries (kube-apiserver, etcd, and kubectl for rendering and applying
//! manifests) are found through `IMAGE_REWRITER_CONTROL_PLANE_DIR`, or else
//! `tests/control-plane/build.sh --print-dir`. When they are missing the test
//! fails (it never skips) and says to run `tests/control-plane/build.sh`.
//!
//! Set `IMAGE_REWRITER_E2E_KEEP_DIR=1` to keep the temporary directory (logs,
//! certificates, kubeconfigs) after the test for debugging.
//!
//! Included by test crates with `#[path = "e2e/harness.rs"] mod harness;`.
#![allow(dead_code)]

use std::fs::{self, File};
use std::io::{self, Read, Seek, SeekFrom};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use base64::Engine as _;
use k8s_openapi::api::core::v1::{ConfigMap, Namespace, ServiceAccount};
use kube::api::{Api, ObjectMeta, PostParams};

/// Namespace the webhook is deployed to (see manifests/).
pub const WEBHOOK_NAMESPACE: &str = "image-rewriter";
/// ServiceAccount the webhook runs as (see manifests/).
pub const WEBHOOK_SERVICE_ACCOUNT: &str = "image-rewriter";

/// How long etcd and then kube-apiserver may take to become ready.
const ETCD_READY_TIMEOUT: Duration = Duration::from_secs(60);
const APISERVER_READY_TIMEOUT: Duration = Duration::from_secs(120);
/// Attempts with fresh ports when a port turned out to be taken meanwhile.
const START_ATTEMPTS: usize = 3;

/// An identity the test can act as. Both are static bearer tokens
/// (`--token-auth-file`), so no controller is needed to mint them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Identity {
    /// `kubernetes-admin`, in group `system:masters` (cluster-admin).
    Admin,
    /// The webhook's ServiceAccount,
    /// `system:serviceaccount:image-rewriter:image-rewriter`, with the groups a
    /// ServiceAccount token carries. It has no permissions until RBAC grants
    /// them (e.g. by applying manifests/).
    Webhook,
}

impl Identity {
    /// The user name the apiserver sees.
    pub fn user_name(self) -> String {
        match self {
            Identity::Admin => "kubernetes-admin".to_string(),
            Identity::Webhook => {
                format!("system:serviceaccount:{WEBHOOK_NAMESPACE}:{WEBHOOK_SERVICE_ACCOUNT}")
            }
        }
    }

    /// The groups the apiserver sees (`system:authenticated` is always added).
    pub fn groups(self) -> Vec<String> {
        match self {
            Identity::Admin => vec!["system:masters".into(), "system:authenticated".into()],
            Identity::Webhook => vec![
                "system:serviceaccounts".into(),
                format!("system:serviceaccounts:{WEBHOOK_NAMESPACE}"),
                "system:authenticated".into(),
            ],
        }
    }

    fn uid(self) -> &'static str {
        match self {
            Identity::Admin => "uid-kubernetes-admin",
            Identity::Webhook => "uid-image-rewriter-sa",
        }
    }

    fn kubeconfig_user(self) -> &'static str {
        match self {
            Identity::Admin => "admin",
            Identity::Webhook => "image-rewriter",
        }
    }
}

/// A running etcd + kube-apiserver. Dropping it kills and reaps both processes
/// (also while a test panics) and removes the temporary directory.
pub struct ControlPlane {
    // Field order matters for Drop: processes first, then the spawner thread,
    // then the directory they were using.
    apiserver: ManagedProcess,
    etcd: ManagedProcess,
    spawner: Spawner,
    base_url: String,
    ca_pem: String,
    ca_der: Vec<u8>,
    admin_token: String,
    webhook_token: String,
    version: String,
    binaries: PathBuf,
    dir: Option<tempfile::TempDir>,
}

impl ControlPlane {
    /// Starts etcd and kube-apiserver and waits until `/readyz` answers 200.
    ///
    /// Panics with the reason (and the tail of the process logs) when the
    /// binaries are missing or the control plane does not come up.
    pub async fn start() -> ControlPlane {
        match Self::try_start().await {
            Ok(cp) => cp,
            Err(err) => panic!("test control plane failed to start: {err:?}"),
        }
    }

    /// Like [`ControlPlane::start`], but returns the error.
    pub async fn try_start() -> Result<ControlPlane> {
        install_crypto_provider();
        let binaries = control_plane_dir()?;
        let mut last_err = None;
        for attempt in 1..=START_ATTEMPTS {
            match Self::start_once(&binaries).await {
                Ok(cp) => return Ok(cp),
                Err(StartError::PortTaken(err)) if attempt < START_ATTEMPTS => {
                    eprintln!("control plane: port clash on attempt {attempt}, retrying: {err:#}");
                    last_err = Some(err);
                }
                Err(StartError::PortTaken(err)) | Err(StartError::Other(err)) => return Err(err),
            }
        }
        Err(last_err.unwrap_or_else(|| anyhow!("control plane did not start")))
    }

    async fn start_once(binaries: &Path) -> std::result::Result<ControlPlane, StartError> {
        let dir = tempfile::Builder::new()
            .prefix("image-rewriter-control-plane-")
            .tempdir()
            .context("creating the control plane's temporary directory")?;
        let root = dir.path().to_path_buf();
        let [etcd_client_port, etcd_peer_port, apiserver_port] = free_ports()?;
        let base_url = format!("https://127.0.0.1:{apiserver_port}");

        // --- PKI: cluster CA, apiserver serving cert, ServiceAccount signing key.
        let pki = Pki::generate()?;
        let pki_dir = root.join("pki");
        fs::create_dir_all(&pki_dir).context("creating pki dir")?;
        let ca_file = pki_dir.join("ca.crt");
        let serving_cert_file = pki_dir.join("apiserver.crt");
        let serving_key_file = pki_dir.join("apiserver.key");
        let sa_key_file = pki_dir.join("sa.key");
        let sa_pub_file = pki_dir.join("sa.pub");
        write_file(&ca_file, &pki.ca_pem)?;
        write_file(&serving_cert_file, &pki.serving_cert_pem)?;
        write_file(&serving_key_file, &pki.serving_key_pem)?;
        write_file(&sa_key_file, &pki.sa_key_pem)?;
        write_file(&sa_pub_file, &pki.sa_pub_pem)?;

        // --- static tokens: token,user,uid,"group1,group2"
        let admin_token = random_token()?;
        let webhook_token = random_token()?;
        let token_file = pki_dir.join("tokens.csv");
        let mut tokens = String::new();
        for (identity, token) in [
            (Identity::Admin, &admin_token),
            (Identity::Webhook, &webhook_token),
        ] {
            let groups = identity.groups();
            tokens.push_str(&format!(
                "{token},{},{},\"{}\"\n",
                identity.user_name(),
                identity.uid(),
                groups.join(",")
            ));
        }
        write_file(&token_file, &tokens)?;

        let spawner = Spawner::new()?;

        // --- etcd
        let etcd_data = root.join("etcd-data");
        let etcd_client_url = format!("http://127.0.0.1:{etcd_client_port}");
        let etcd_peer_url = format!("http://127.0.0.1:{etcd_peer_port}");
        let mut cmd = Command::new(binaries.join("etcd"));
        cmd.args([
            "--name=e2e".to_string(),
            format!("--data-dir={}", etcd_data.display()),
            format!("--listen-client-urls={etcd_client_url}"),
            format!("--advertise-client-urls={etcd_client_url}"),
            format!("--listen-peer-urls={etcd_peer_url}"),
            format!("--initial-advertise-peer-urls={etcd_peer_url}"),
            format!("--initial-cluster=e2e={etcd_peer_url}"),
            "--initial-cluster-state=new".to_string(),
            // Throw-away data: no fsync keeps the tests fast on slow disks.
            "--unsafe-no-fsync=true".to_string(),
            "--log-level=warn".to_string(),
        ]);
        let mut etcd = ManagedProcess::spawn(&spawner, "etcd", cmd, &root.join("etcd.log"))?;

        let plain_http = reqwest::Client::builder()
            .timeout(Duration::from_secs(5))
            .build()
            .context("building an HTTP client")?;
        let health_url = format!("{etcd_client_url}/health");
        let (client, url) = (&plain_http, &health_url);
        wait_until(&mut etcd, ETCD_READY_TIMEOUT, move || async move {
            match client.get(url).send().await {
                Ok(resp) if resp.status().is_success() => {
                    let body = resp.text().await.unwrap_or_default();
                    if body.contains("\"true\"") {
                        Ok(())
                    } else {
                        Err(format!("etcd /health: {body}"))
                    }
                }
                Ok(resp) => Err(format!("etcd /health: HTTP {}", resp.status())),
                Err(err) => Err(format!("etcd /health: {err}")),
            }
        })
        .await?;

        // --- kube-apiserver
        let mut cmd = Command::new(binaries.join("kube-apiserver"));
        cmd.args([
            format!("--etcd-servers={etcd_client_url}"),
            "--bind-address=127.0.0.1".to_string(),
            "--advertise-address=127.0.0.1".to_string(),
            format!("--secure-port={apiserver_port}"),
            format!("--cert-dir={}", pki_dir.display()),
            format!("--tls-cert-file={}", serving_cert_file.display()),
            format!("--tls-private-key-file={}", serving_key_file.display()),
            format!("--client-ca-file={}", ca_file.display()),
            format!("--token-auth-file={}", token_file.display()),
            "--authorization-mode=RBAC".to_string(),
            format!("--service-account-issuer={base_url}"),
            format!("--service-account-key-file={}", sa_pub_file.display()),
            format!(
                "--service-account-signing-key-file={}",
                sa_key_file.display()
            ),
            "--service-cluster-ip-range=10.96.0.0/16".to_string(),
            // The kubernetes Service's endpoints would point at 127.0.0.1, which
            // Endpoints validation rejects; nothing here routes to them anyway.
            "--endpoint-reconciler-type=none".to_string(),
            "--profiling=false".to_string(),
            // Image volumes, beta and off by default in 1.34 (on since
            // 1.35): off, the apiserver drops `volumes[].image` as sent.
            "--feature-gates=ImageVolume=true".to_string(),
        ]);
        let mut apiserver = ManagedProcess::spawn(
            &spawner,
            "kube-apiserver",
            cmd,
            &root.join("kube-apiserver.log"),
        )?;

        let ca_der = pki.ca_der.clone();
        let https = https_client(&pki.ca_pem)?;
        let readyz = format!("{base_url}/readyz");
        let started = Instant::now();
        let (client, url, token) = (&https, &readyz, &admin_token);
        wait_until(
            &mut apiserver,
            APISERVER_READY_TIMEOUT,
            move || async move {
                match client.get(url).bearer_auth(token).send().await {
                    Ok(resp) if resp.status().as_u16() == 200 => Ok(()),
                    Ok(resp) => {
                        let status = resp.status();
                        let body = resp.text().await.unwrap_or_default();
                        let failed: Vec<&str> =
                            body.lines().filter(|l| l.contains("failed")).collect();
                        Err(format!("/readyz: HTTP {status}: {}", failed.join("; ")))
                    }
                    Err(err) => Err(format!("/readyz: {err}")),
                }
            },
        )
        .await?;
        let ready_after = started.elapsed();

        let version: serde_json::Value = https
            .get(format!("{base_url}/version"))
            .bearer_auth(&admin_token)
            .send()
            .await
            .and_then(|r| r.error_for_status())
            .context("GET /version")?
            .json()
            .await
            .context("decoding /version")?;
        let version = version["gitVersion"]
            .as_str()
            .unwrap_or("unknown")
            .to_string();
        eprintln!(
            "control plane: kube-apiserver {version} ready at {base_url} after {:.1} s (dir {})",
            ready_after.as_secs_f64(),
            root.display()
        );

        Ok(ControlPlane {
            apiserver,
            etcd,
            spawner,
            base_url,
            ca_pem: pki.ca_pem,
            ca_der,
            admin_token,
            webhook_token,
            version,
            binaries: binaries.to_path_buf(),
            dir: Some(dir),
        })
    }

    /// `https://127.0.0.1:<port>` of the apiserver.
    pub fn base_url(&self) -> &str {
        &self.base_url
    }

    /// The cluster CA (PEM) that signed the apiserver's serving certificate.
    pub fn ca_pem(&self) -> &str {
        &self.ca_pem
    }

    /// The cluster CA certificate, DER.
    pub fn ca_der(&self) -> &[u8] {
        &self.ca_der
    }

    /// `gitVersion` from `/version`, e.g. `v1.34.4`.
    pub fn version(&self) -> &str {
        &self.version
    }

    /// The temporary directory holding logs, certificates and etcd's data.
    pub fn dir(&self) -> &Path {
        self.dir.as_ref().expect("control plane directory").path()
    }

    /// The directory holding the `kube-apiserver`, `etcd` and `kubectl` binaries.
    pub fn binaries_dir(&self) -> &Path {
        &self.binaries
    }

    /// `kubectl` built from the same `k8s.io/kubernetes` module as the
    /// apiserver (see [`kubectl_path`]).
    pub fn kubectl_path(&self) -> PathBuf {
        self.binaries.join("kubectl")
    }

    /// Starts `cmd` as the control plane's own processes are started: it
    /// is killed when the test process dies, even by SIGKILL, where no Drop
    /// runs (the webhook under test, say).
    pub fn spawn_tied_to_test(&self, cmd: Command) -> io::Result<Child> {
        self.spawner.spawn(cmd)
    }

    /// The bearer token of an identity.
    pub fn token(&self, identity: Identity) -> &str {
        match identity {
            Identity::Admin => &self.admin_token,
            Identity::Webhook => &self.webhook_token,
        }
    }

    /// A `kube::Config` for an identity (CA pinned, bearer token).
    pub fn kube_config(&self, identity: Identity) -> kube::Config {
        let mut config =
            kube::Config::new(self.base_url.parse().expect("apiserver URL is a valid URI"));
        config.root_cert = Some(vec![self.ca_der.clone()]);
        config.auth_info.token = Some(self.token(identity).to_string().into());
        config.default_namespace = "default".to_string();
        config
    }

    /// A client acting as `identity`. Must be called inside a tokio runtime.
    pub fn client(&self, identity: Identity) -> kube::Client {
        kube::Client::try_from(self.kube_config(identity))
            .unwrap_or_else(|err| panic!("building a kube client for {identity:?}: {err}"))
    }

    /// A cluster-admin client (`system:masters`).
    pub fn admin_client(&self) -> kube::Client {
        self.client(Identity::Admin)
    }

    /// A client authenticated as the webhook's ServiceAccount.
    pub fn webhook_identity_client(&self) -> kube::Client {
        self.client(Identity::Webhook)
    }

    /// A reqwest client that trusts the cluster CA (no token attached; use
    /// `.bearer_auth(cp.token(identity))`).
    pub fn http_client(&self) -> reqwest::Client {
        https_client(&self.ca_pem).expect("building an HTTPS client")
    }

    /// Writes a kubeconfig for `identity` (for a separate process, or kubectl).
    pub fn write_kubeconfig(&self, path: impl AsRef<Path>, identity: Identity) -> Result<()> {
        let path = path.as_ref();
        let user = identity.kubeconfig_user();
        let kubeconfig = serde_json::json!({
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{
                "name": "e2e",
                "cluster": {
                    "server": self.base_url,
                    "certificate-authority-data":
                        base64::engine::general_purpose::STANDARD.encode(self.ca_pem.as_bytes()),
                },
            }],
            "users": [{ "name": user, "user": { "token": self.token(identity) } }],
            "contexts": [{
                "name": user,
                "context": { "cluster": "e2e", "user": user, "namespace": "default" },
            }],
            "current-context": user,
        });
        // JSON is YAML, and every kubeconfig loader (kube-rs, client-go) reads it.
        let text = serde_json::to_string_pretty(&kubeconfig)?;
        write_file(path, &text)
    }

    /// Creates a namespace unless it exists.
    pub async fn ensure_namespace(&self, name: &str) -> Result<()> {
        let api: Api<Namespace> = Api::all(self.admin_client());
        let ns = Namespace {
            metadata: ObjectMeta {
                name: Some(name.to_string()),
                ..Default::default()
            },
            ..Default::default()
        };
        create_if_absent(&api, &ns)
            .await
            .with_context(|| format!("creating namespace {name}"))
    }

    /// Creates what the (absent) controller-manager would in namespace `ns`:
    /// the `default` ServiceAccount, which the ServiceAccount admission plugin
    /// requires before it admits a pod, and the `kube-root-ca.crt` ConfigMap.
    pub async fn ensure_default_service_account(&self, ns: &str) -> Result<()> {
        let client = self.admin_client();
        let sa_api: Api<ServiceAccount> = Api::namespaced(client.clone(), ns);
        let sa = ServiceAccount {
            metadata: ObjectMeta {
                name: Some("default".into()),
                ..Default::default()
            },
            ..Default::default()
        };
        create_if_absent(&sa_api, &sa)
            .await
            .with_context(|| format!("creating ServiceAccount {ns}/default"))?;

        let cm_api: Api<ConfigMap> = Api::namespaced(client, ns);
        let cm = ConfigMap {
            metadata: ObjectMeta {
                name: Some("kube-root-ca.crt".into()),
                ..Default::default()
            },
            data: Some(
                [("ca.crt".to_string(), self.ca_pem.clone())]
                    .into_iter()
                    .collect(),
            ),
            ..Default::default()
        };
        create_if_absent(&cm_api, &cm)
            .await
            .with_context(|| format!("creating ConfigMap {ns}/kube-root-ca.crt"))
    }

    /// The last `lines` lines of the apiserver's log.
    pub fn apiserver_log_tail(&self, lines: usize) -> String {
        self.apiserver.log_tail(lines)
    }

    /// The last `lines` lines of etcd's log.
    pub fn etcd_log_tail(&self, lines: usize) -> String {
        self.etcd.log_tail(lines)
    }
}

impl Drop for ControlPlane {
    fn drop(&mut self) {
        if thread::panicking() {
            eprintln!(
                "control plane: test panicked; last kube-apiserver log lines:\n{}",
                self.apiserver.log_tail(30)
            );
        }
        self.apiserver.stop();
        self.etcd.stop();
        let keep = std::env::var_os("IMAGE_REWRITER_E2E_KEEP_DIR")
            .is_some_and(|v| !v.is_empty() && v != "0");
        if keep && let Some(dir) = self.dir.take() {
            eprintln!("control plane: keeping {}", dir.keep().display());
        }
    }
}

async fn create_if_absent<K>(api: &Api<K>, obj: &K) -> Result<()>
where
    K: kube::Resource + Clone + serde::Serialize + serde::de::DeserializeOwned + std::fmt::Debug,
{
    match api.create(&PostParams::default(), obj).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(status)) if status.is_already_exists() => Ok(()),
        Err(err) => Err(err.into()),
    }
}

/// rustls has no process-wide default provider in this build; every TLS user
/// (kube, reqwest) needs one installed. Idempotent.
pub fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

pub fn https_client(ca_pem: &str) -> Result<reqwest::Client> {
    install_crypto_provider();
    let ca = reqwest::Certificate::from_pem(ca_pem.as_bytes()).context("parsing the cluster CA")?;
    reqwest::Client::builder()
        .use_rustls_tls()
        .tls_built_in_root_certs(false)
        .add_root_certificate(ca)
        .timeout(Duration::from_secs(10))
        .build()
        .context("building an HTTPS client")
}

/// Where the control plane binaries (kube-apiserver, etcd, kubectl) are:
/// `$IMAGE_REWRITER_CONTROL_PLANE_DIR`, or what
/// `tests/control-plane/build.sh --print-dir` prints.
pub fn control_plane_dir() -> Result<PathBuf> {
    const HOW: &str = "build them with `tests/control-plane/build.sh` (needs Go; takes 5-10 min cold), \
                       or point IMAGE_REWRITER_CONTROL_PLANE_DIR at a directory holding kube-apiserver, etcd and kubectl";
    let dir = if let Some(dir) =
        std::env::var_os("IMAGE_REWRITER_CONTROL_PLANE_DIR").filter(|d| !d.is_empty())
    {
        PathBuf::from(dir)
    } else {
        let manifest_dir = Path::new(env!("CARGO_MANIFEST_DIR"));
        let script = manifest_dir.join("tests/control-plane/build.sh");
        let out = Command::new("bash")
            .arg(&script)
            .arg("--print-dir")
            .current_dir(manifest_dir)
            .stdin(Stdio::null())
            .output()
            .with_context(|| format!("running `bash {} --print-dir`; {HOW}", script.display()))?;
        if !out.status.success() {
            bail!(
                "the test control plane (kube-apiserver, etcd) is not built: {}; {HOW}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        PathBuf::from(String::from_utf8_lossy(&out.stdout).trim())
    };
    for bin in CONTROL_PLANE_BINARIES {
        if !dir.join(bin).is_file() {
            bail!("{} does not exist; {HOW}", dir.join(bin).display());
        }
    }
    Ok(dir)
}

/// What `tests/control-plane/build.sh` builds into one directory.
pub const CONTROL_PLANE_BINARIES: [&str; 3] = ["kube-apiserver", "etcd", "kubectl"];

/// `kubectl` v1.34.4, built by `tests/control-plane/build.sh` next to the
/// apiserver, so rendering (`kubectl kustomize`) and applying need no kubectl
/// on the machine. Errors (with how to build it) when it is missing.
pub fn kubectl_path() -> Result<PathBuf> {
    Ok(control_plane_dir()?.join("kubectl"))
}

// ---------------------------------------------------------------------------
// processes

enum StartError {
    /// A process could not bind its port (taken between probing and use).
    PortTaken(anyhow::Error),
    Other(anyhow::Error),
}

impl From<anyhow::Error> for StartError {
    fn from(err: anyhow::Error) -> Self {
        StartError::Other(err)
    }
}

/// A child process whose output goes to a log file; killed and reaped on drop.
struct ManagedProcess {
    name: &'static str,
    child: Option<Child>,
    log: PathBuf,
}

impl ManagedProcess {
    fn spawn(
        spawner: &Spawner,
        name: &'static str,
        mut cmd: Command,
        log: &Path,
    ) -> Result<ManagedProcess> {
        let out = File::create(log).with_context(|| format!("creating {}", log.display()))?;
        let err = out.try_clone()?;
        cmd.stdin(Stdio::null()).stdout(out).stderr(err);
        let program = cmd.get_program().to_owned();
        let child = spawner
            .spawn(cmd)
            .with_context(|| format!("starting {name} ({})", Path::new(&program).display()))?;
        Ok(ManagedProcess {
            name,
            child: Some(child),
            log: log.to_path_buf(),
        })
    }

    fn try_wait(&mut self) -> Option<ExitStatus> {
        self.child
            .as_mut()
            .and_then(|c| c.try_wait().ok().flatten())
    }

    fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            // SIGKILL: the data is thrown away, there is nothing to shut down cleanly.
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    fn log_tail(&self, lines: usize) -> String {
        read_tail(&self.log, 64 * 1024)
            .map(|text| {
                let all: Vec<&str> = text.lines().collect();
                all[all.len().saturating_sub(lines)..].join("\n")
            })
            .unwrap_or_else(|err| format!("(cannot read {}: {err})", self.log.display()))
    }
}

impl Drop for ManagedProcess {
    fn drop(&mut self) {
        self.stop();
    }
}

fn read_tail(path: &Path, max: u64) -> io::Result<String> {
    let mut f = File::open(path)?;
    let len = f.metadata()?.len();
    f.seek(SeekFrom::Start(len.saturating_sub(max)))?;
    let mut buf = Vec::new();
    f.read_to_end(&mut buf)?;
    Ok(String::from_utf8_lossy(&buf).into_owned())
}

/// Polls `probe` until it succeeds, `process` exits, or `timeout` passes.
async fn wait_until<F, Fut>(
    process: &mut ManagedProcess,
    timeout: Duration,
    mut probe: F,
) -> std::result::Result<(), StartError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = std::result::Result<(), String>>,
{
    let deadline = Instant::now() + timeout;
    let mut delay = Duration::from_millis(50);
    loop {
        if let Some(status) = process.try_wait() {
            let tail = process.log_tail(40);
            let err = anyhow!(
                "{} exited during startup ({status}); last log lines:\n{tail}",
                process.name
            );
            return Err(if tail.contains("address already in use") {
                StartError::PortTaken(err)
            } else {
                StartError::Other(err)
            });
        }
        let last = match probe().await {
            Ok(()) => return Ok(()),
            Err(msg) => msg,
        };
        if Instant::now() >= deadline {
            return Err(StartError::Other(anyhow!(
                "{} not ready after {:?}: {last}; last log lines:\n{}",
                process.name,
                timeout,
                process.log_tail(40)
            )));
        }
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(Duration::from_millis(500));
    }
}

/// Spawns the control plane's processes from one dedicated thread that lives
/// exactly as long as the [`ControlPlane`]. On Linux each child is started with
/// `PR_SET_PDEATHSIG = SIGKILL`, which the kernel delivers when the spawning
/// *thread* ends: when the harness is dropped (after it already killed the
/// children), or when the test process dies in any way, including SIGKILL,
/// where no Drop runs. A dedicated thread keeps a control plane that is shared
/// between tests alive after the test that started it returns.
struct Spawner {
    tx: Option<mpsc::Sender<(Command, mpsc::Sender<io::Result<Child>>)>>,
    thread: Option<thread::JoinHandle<()>>,
}

impl Spawner {
    fn new() -> Result<Spawner> {
        let (tx, rx) = mpsc::channel::<(Command, mpsc::Sender<io::Result<Child>>)>();
        let thread = thread::Builder::new()
            .name("control-plane-spawner".into())
            .spawn(move || {
                for (mut cmd, reply) in rx {
                    die_with_parent_thread(&mut cmd);
                    let _ = reply.send(cmd.spawn());
                }
            })
            .context("starting the control plane's spawner thread")?;
        Ok(Spawner {
            tx: Some(tx),
            thread: Some(thread),
        })
    }

    fn spawn(&self, cmd: Command) -> io::Result<Child> {
        let (reply_tx, reply_rx) = mpsc::channel();
        let gone = || io::Error::other("control plane spawner thread is gone");
        self.tx
            .as_ref()
            .ok_or_else(gone)?
            .send((cmd, reply_tx))
            .map_err(|_| gone())?;
        reply_rx.recv().map_err(|_| gone())?
    }
}

impl Drop for Spawner {
    fn drop(&mut self) {
        drop(self.tx.take());
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

#[cfg(target_os = "linux")]
fn die_with_parent_thread(cmd: &mut Command) {
    use std::ffi::{c_int, c_ulong};
    use std::os::unix::process::CommandExt;

    // From the C library std already links; declared here to avoid a libc dependency.
    unsafe extern "C" {
        fn prctl(option: c_int, ...) -> c_int;
    }
    const PR_SET_PDEATHSIG: c_int = 1;
    const SIGKILL: c_ulong = 9;

    // SAFETY: runs in the forked child before exec; prctl is a plain system
    // call wrapper (async-signal-safe) and the closure allocates nothing.
    unsafe {
        cmd.pre_exec(|| {
            if prctl(PR_SET_PDEATHSIG, SIGKILL) == 0 {
                Ok(())
            } else {
                Err(io::Error::last_os_error())
            }
        });
    }
}

#[cfg(not(target_os = "linux"))]
fn die_with_parent_thread(_cmd: &mut Command) {}

// ---------------------------------------------------------------------------
// ports, files, keys

/// Distinct free loopback ports (all probed at once so they differ).
fn free_ports<const N: usize>() -> Result<[u16; N]> {
    let listeners = (0..N)
        .map(|_| TcpListener::bind("127.0.0.1:0"))
        .collect::<io::Result<Vec<_>>>()
        .context("probing for free loopback ports")?;
    let mut ports = [0u16; N];
    for (port, listener) in ports.iter_mut().zip(&listeners) {
        *port = listener.local_addr()?.port();
    }
    Ok(ports)
}

fn write_file(path: &Path, contents: &str) -> Result<()> {
    fs::write(path, contents).with_context(|| format!("writing {}", path.display()))
}

/// 32 random bytes from /dev/urandom, URL-safe base64 (no rand dependency).
fn random_token() -> Result<String> {
    let mut bytes = [0u8; 32];
    File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut bytes))
        .context("reading /dev/urandom")?;
    Ok(base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes))
}

struct Pki {
    ca_pem: String,
    ca_der: Vec<u8>,
    serving_cert_pem: String,
    serving_key_pem: String,
    sa_key_pem: String,
    sa_pub_pem: String,
}

impl Pki {
    fn generate() -> Result<Pki> {
        use rcgen::{
            BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer,
            KeyPair, KeyUsagePurpose,
        };

        let ca_key = KeyPair::generate().context("generating the CA key")?;
        let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(DnType::CommonName, "image-rewriter-e2e-ca");
        ca_params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let ca_cert = ca_params
            .self_signed(&ca_key)
            .context("self-signing the CA")?;
        let issuer = Issuer::new(ca_params, ca_key);

        let serving_key = KeyPair::generate().context("generating the serving key")?;
        let mut serving = CertificateParams::new(vec![
            "127.0.0.1".to_string(),
            "localhost".to_string(),
            "kubernetes".to_string(),
            "kubernetes.default".to_string(),
            "kubernetes.default.svc".to_string(),
            "kubernetes.default.svc.cluster.local".to_string(),
        ])?;
        serving
            .distinguished_name
            .push(DnType::CommonName, "kube-apiserver");
        serving.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        serving.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let serving_cert = serving
            .signed_by(&serving_key, &issuer)
            .context("signing the serving cert")?;

        // ECDSA P-256 (ES256) ServiceAccount token signing key.
        let sa_key = KeyPair::generate().context("generating the ServiceAccount signing key")?;

        Ok(Pki {
            ca_pem: ca_cert.pem(),
            ca_der: ca_cert.der().to_vec(),
            serving_cert_pem: serving_cert.pem(),
            serving_key_pem: serving_key.serialize_pem(),
            sa_key_pem: sa_key.serialize_pem(),
            sa_pub_pem: sa_key.public_key_pem(),
        })
    }
}
