//! The shipped manifests applied to a [`ControlPlane`], with `image-rewriter
//! serve` running as a separate process behind them.
//!
//! [`Env::start`] renders an overlay of a scratch copy of `manifests/` with the
//! control plane's own `kubectl kustomize`, applies every object as shipped
//! with `kubectl apply` (admin identity), except:
//!
//! - the MutatingWebhookConfiguration's `clientConfig`, which becomes
//!   `url: https://127.0.0.1:PORT/mutate` with the test server's caBundle. A
//!   `clientConfig.service` would make the apiserver dial a ClusterIP, which
//!   leaves this machine; [`assert_loopback_only`] guards every apply;
//! - cert-manager's own objects (`cert-manager.io/*` Issuer and Certificate):
//!   there are no cert-manager CRDs here. The caBundle cert-manager's
//!   cainjector would write is set like every other caBundle.
//!
//! Then it creates the source pull Secret `harbor-pull` in `image-rewriter`,
//! starts `image-rewriter serve` with the rendered ConfigMap's `config.yaml`
//! and a kubeconfig for the webhook's ServiceAccount (so the shipped RBAC
//! decides what it may do), applies the webhook configuration and waits until
//! the apiserver calls it.
#![allow(dead_code)]

use std::io::{BufRead as _, BufReader, Write as _};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex, mpsc};
use std::time::{Duration, Instant};

use base64::Engine as _;
use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::{Namespace, Pod, Secret};
use kube::api::{Api, ObjectMeta, Patch, PatchParams, PostParams};
use serde::Deserialize as _;
use serde_json::{Value, json};

use crate::harness::{ControlPlane, Identity, WEBHOOK_NAMESPACE};

pub const BIN: &str = env!("CARGO_BIN_EXE_image-rewriter");
pub const REPO: &str = env!("CARGO_MANIFEST_DIR");
pub const WEBHOOK_CONFIGURATION: &str = "image-rewriter";
pub const WEBHOOK_NAME: &str = "image-rewriter.image-rewriter.io";
pub const ENABLED_LABEL: &str = "image-rewriter.io/enabled";
pub const ORIGINAL_IMAGES: &str = "image-rewriter.io/original-images";
pub const PULL_SECRET: &str = "harbor-pull";
pub const MANAGED_BY: &str = "app.kubernetes.io/managed-by";
pub const SOURCE_ANNOTATION: &str = "image-rewriter.io/source";
/// Covered in both modes (labelled `true`): where [`Env`] probes that the
/// apiserver calls the webhook.
pub const PROBE_NAMESPACE: &str = "e2e-probe";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Overlay {
    ClusterWide,
    OptIn,
    ClusterWideCertManager,
    OptInCertManager,
}

impl Overlay {
    pub const ALL: [Overlay; 4] = [
        Overlay::ClusterWide,
        Overlay::OptIn,
        Overlay::ClusterWideCertManager,
        Overlay::OptInCertManager,
    ];

    pub fn dir(self) -> &'static str {
        match self {
            Overlay::ClusterWide => "cluster-wide",
            Overlay::OptIn => "opt-in",
            Overlay::ClusterWideCertManager => "cluster-wide-cert-manager",
            Overlay::OptInCertManager => "opt-in-cert-manager",
        }
    }

    /// Uses `../../../certs` (`image-rewriter certs` output) rather than cert-manager.
    pub fn generated_certs(self) -> bool {
        matches!(self, Overlay::ClusterWide | Overlay::OptIn)
    }
}

/// `kind namespace/name` of a rendered object.
pub fn describe(object: &Value) -> String {
    format!(
        "{} {}/{}",
        object["kind"].as_str().unwrap_or("?"),
        object["metadata"]["namespace"].as_str().unwrap_or(""),
        object["metadata"]["name"].as_str().unwrap_or("?")
    )
}

pub fn is_cert_manager_object(object: &Value) -> bool {
    object["apiVersion"]
        .as_str()
        .is_some_and(|v| v.starts_with("cert-manager.io/"))
}

pub fn is_webhook_configuration(object: &Value) -> bool {
    object["kind"] == "MutatingWebhookConfiguration"
        || object["kind"] == "ValidatingWebhookConfiguration"
}

/// Panics unless every webhook of `object` (if it is a webhook
/// configuration) calls a `https://127.0.0.1:` URL: nothing this suite
/// registers may make the apiserver dial off the machine.
pub fn assert_loopback_only(object: &Value) {
    if !is_webhook_configuration(object) {
        return;
    }
    for webhook in object["webhooks"].as_array().into_iter().flatten() {
        let client = &webhook["clientConfig"];
        assert!(
            client.get("service").is_none(),
            "refusing to apply {}: clientConfig.service would make the apiserver dial a ClusterIP",
            describe(object)
        );
        let url = client["url"].as_str().unwrap_or("");
        assert!(
            url.starts_with("https://127.0.0.1:"),
            "refusing to apply {}: clientConfig.url {url:?} is not loopback",
            describe(object)
        );
    }
}

/// The shipped webhook configuration with only its `clientConfig` changed.
pub fn with_url_client_config(mwc: &Value, url: &str, ca_pem: &str) -> Value {
    let mut mwc = mwc.clone();
    let ca = base64::engine::general_purpose::STANDARD.encode(ca_pem.as_bytes());
    for webhook in mwc["webhooks"]
        .as_array_mut()
        .expect("the webhook configuration has webhooks")
    {
        assert!(
            webhook["clientConfig"].get("service").is_some(),
            "the shipped webhook is expected to call its Service: {webhook}"
        );
        webhook["clientConfig"] = json!({ "url": url, "caBundle": ca });
    }
    assert_loopback_only(&mwc);
    mwc
}

/// A scratch copy of `manifests/` and `certs/kustomization.yaml` (never the
/// developer's own generated `certs/*`).
pub struct Workspace {
    pub dir: tempfile::TempDir,
}

impl Workspace {
    pub fn new() -> Workspace {
        let dir = tempfile::Builder::new()
            .prefix("image-rewriter-e2e-manifests-")
            .tempdir()
            .expect("tempdir");
        copy_dir(
            &Path::new(REPO).join("manifests"),
            &dir.path().join("manifests"),
        );
        std::fs::create_dir(dir.path().join("certs")).expect("mkdir certs");
        std::fs::copy(
            Path::new(REPO).join("certs/kustomization.yaml"),
            dir.path().join("certs/kustomization.yaml"),
        )
        .expect("copy certs/kustomization.yaml");
        Workspace { dir }
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// `image-rewriter certs --out <copy>/certs` (the files the certs overlays need).
    pub fn generate_certs(&self) {
        let out = Command::new(BIN)
            .args([
                "certs",
                "--service",
                "image-rewriter",
                "--namespace",
                WEBHOOK_NAMESPACE,
                "--out",
            ])
            .arg(self.path().join("certs"))
            .output()
            .expect("run image-rewriter certs");
        assert!(
            out.status.success(),
            "image-rewriter certs failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// `kubectl kustomize manifests/overlays/<overlay>`, one JSON value per object.
    pub fn render(&self, kubectl: &Path, overlay: Overlay) -> Vec<Value> {
        if overlay.generated_certs() && !self.path().join("certs/secret.yaml").is_file() {
            self.generate_certs();
        }
        self.render_dir(kubectl, overlay.dir())
    }

    /// An overlay of the base and `components` (paths from the overlay's
    /// directory), written into the copy as `manifests/overlays/<name>`.
    pub fn write_overlay(&self, name: &str, components: &[&str]) {
        let dir = self.path().join("manifests/overlays").join(name);
        std::fs::create_dir_all(&dir).expect("mkdir overlay");
        let mut kustomization = String::from(
            "apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\nresources:\n  - ../../base\ncomponents:\n",
        );
        for component in components {
            kustomization.push_str(&format!("  - {component}\n"));
        }
        std::fs::write(dir.join("kustomization.yaml"), kustomization).expect("write overlay");
    }

    /// `kubectl kustomize manifests/overlays/<name>`, one JSON value per object.
    pub fn render_dir(&self, kubectl: &Path, name: &str) -> Vec<Value> {
        let dir = self.path().join("manifests/overlays").join(name);
        let out = Command::new(kubectl)
            .arg("kustomize")
            .arg(&dir)
            .output()
            .expect("run kubectl kustomize");
        assert!(
            out.status.success(),
            "kubectl kustomize manifests/overlays/{name} failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let text = String::from_utf8(out.stdout).expect("UTF-8 YAML");
        let objects: Vec<Value> = serde_yaml_ng::Deserializer::from_str(&text)
            .map(|doc| Value::deserialize(doc).expect("rendered YAML parses"))
            .filter(|v| !v.is_null())
            .collect();
        assert!(!objects.is_empty(), "{name} rendered nothing");
        objects
    }
}

impl Default for Workspace {
    fn default() -> Self {
        Self::new()
    }
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).expect("mkdir");
    for entry in std::fs::read_dir(from).expect("read_dir") {
        let entry = entry.expect("dir entry");
        let target = to.join(entry.file_name());
        if entry.file_type().expect("file type").is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), &target).expect("copy");
        }
    }
}

/// A CA and a serving certificate for 127.0.0.1/localhost, from the crate's
/// own generator. Returns (ca_pem, cert_pem, key_pem).
pub fn loopback_certificate() -> (String, String, String) {
    let bundle = image_rewriter::certs::generate(&image_rewriter::certs::CertRequest {
        subject_alt_names: vec!["127.0.0.1".into(), "localhost".into()],
        key_type: image_rewriter::certs::KeyType::EcdsaP256,
        validity_days: 2,
        ca_validity_days: 2,
    })
    .expect("generate a serving certificate");
    (bundle.ca_cert, bundle.cert, bundle.key)
}

/// `image-rewriter serve`, as a child process; killed on drop.
pub struct WebhookProcess {
    pub child: Child,
    pub https_addr: SocketAddr,
    pub metrics_addr: SocketAddr,
    pub log: Arc<Mutex<Vec<String>>>,
}

impl WebhookProcess {
    pub fn spawn(
        cp: &ControlPlane,
        dir: &Path,
        config: &Path,
        cert_pem: &str,
        key_pem: &str,
        kubeconfig: &Path,
    ) -> WebhookProcess {
        let cert = dir.join("tls.crt");
        let key = dir.join("tls.key");
        std::fs::write(&cert, cert_pem).expect("write tls.crt");
        std::fs::write(&key, key_pem).expect("write tls.key");
        let mut cmd = Command::new(BIN);
        cmd.args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--metrics-listen",
            "127.0.0.1:0",
            "--log-format",
            "json",
            "--namespace",
            WEBHOOK_NAMESPACE,
            "--shutdown-delay",
            "0s",
            "--reload-interval",
            "200ms",
            // Idle HTTP/2 connections are closed after this (GOAWAY): short
            // here so the apiserver meets that between the tests' reviews.
            "--header-read-timeout",
            "3s",
        ])
        .arg("--config")
        .arg(config)
        .arg("--tls-cert")
        .arg(&cert)
        .arg("--tls-key")
        .arg(&key)
        .env("KUBECONFIG", kubeconfig)
        .env_remove("KUBERNETES_SERVICE_HOST")
        .env_remove("KUBERNETES_SERVICE_PORT")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
        for (name, _) in std::env::vars_os() {
            if name.to_string_lossy().starts_with("IMAGE_REWRITER_") {
                cmd.env_remove(name);
            }
        }
        let mut child = cp
            .spawn_tied_to_test(cmd)
            .expect("start image-rewriter serve");
        let log = Arc::new(Mutex::new(Vec::new()));
        let (tx, rx) = mpsc::channel();
        let stdout = child.stdout.take().expect("stdout");
        let stderr = child.stderr.take().expect("stderr");
        {
            let log = log.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(stdout).lines() {
                    let Ok(line) = line else { break };
                    if let Ok(event) = serde_json::from_str::<Value>(&line)
                        && event["message"] == "listening"
                    {
                        let _ = tx.send((
                            event["https_addr"].as_str().unwrap_or("").to_string(),
                            event["metrics_addr"].as_str().unwrap_or("").to_string(),
                        ));
                    }
                    log.lock().unwrap().push(line);
                }
            });
        }
        {
            let log = log.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(stderr).lines() {
                    let Ok(line) = line else { break };
                    log.lock().unwrap().push(format!("stderr: {line}"));
                }
            });
        }
        let (https, metrics) = match rx.recv_timeout(Duration::from_secs(30)) {
            Ok(addrs) => addrs,
            Err(err) => {
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "image-rewriter serve never logged \"listening\" ({err}); its log:\n{}",
                    log.lock().unwrap().join("\n")
                );
            }
        };
        WebhookProcess {
            child,
            https_addr: https.parse().expect("https_addr"),
            metrics_addr: metrics.parse().expect("metrics_addr"),
            log,
        }
    }

    pub fn url(&self) -> String {
        format!("https://127.0.0.1:{}/mutate", self.https_addr.port())
    }

    pub fn log_text(&self) -> String {
        self.log.lock().unwrap().join("\n")
    }

    /// SIGSTOP: the kernel still accepts connections, nobody answers.
    pub fn freeze(&self) {
        signal(self.child.id(), "STOP");
    }

    pub fn thaw(&self) {
        signal(self.child.id(), "CONT");
    }

    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// `GET /metrics` on the plain HTTP listener.
    pub async fn metrics(&self) -> String {
        reqwest::Client::new()
            .get(format!("http://{}/metrics", self.metrics_addr))
            .timeout(Duration::from_secs(5))
            .send()
            .await
            .and_then(|r| r.error_for_status())
            .expect("GET webhook /metrics")
            .text()
            .await
            .expect("webhook /metrics body")
    }
}

fn signal(pid: u32, name: &str) {
    let status = Command::new("kill")
        .arg(format!("-{name}"))
        .arg(pid.to_string())
        .status()
        .expect("run kill");
    assert!(status.success(), "kill -{name} {pid} failed");
}

impl Drop for WebhookProcess {
    fn drop(&mut self) {
        self.kill();
        if std::thread::panicking() {
            eprintln!("image-rewriter serve log:\n{}", self.log_text());
        } else {
            // Warnings and errors are worth seeing even when the test passed.
            let log = self.log.lock().unwrap();
            let notable: Vec<&String> = log
                .iter()
                .filter(|l| {
                    l.starts_with("stderr: ")
                        || l.contains("\"level\":\"WARN\"")
                        || l.contains("\"level\":\"ERROR\"")
                })
                .collect();
            if !notable.is_empty() {
                eprintln!(
                    "image-rewriter serve: {} warning/error log lines:",
                    notable.len()
                );
                for line in notable {
                    eprintln!("  {line}");
                }
            }
        }
    }
}

/// A control plane with an overlay applied and the webhook serving it.
pub struct Env {
    pub webhook: WebhookProcess,
    pub cp: ControlPlane,
    pub ws: Workspace,
    pub kubectl: PathBuf,
    pub admin_kubeconfig: PathBuf,
    pub webhook_ca_pem: String,
    pub overlay: Overlay,
    /// The rendered objects of `overlay`, as shipped.
    pub objects: Vec<Value>,
    /// The data of the source pull Secret as first created.
    pub source_data: serde_json::Map<String, Value>,
}

impl Env {
    pub async fn start(overlay: Overlay) -> Env {
        let cp = ControlPlane::start().await;
        println!(
            "kube-apiserver version: {} ({})",
            cp.version(),
            cp.base_url()
        );
        let kubectl = cp.kubectl_path();
        assert!(
            kubectl.is_file(),
            "{} is missing; run tests/control-plane/build.sh",
            kubectl.display()
        );
        let ws = Workspace::new();
        let admin_kubeconfig = ws.path().join("admin.kubeconfig");
        cp.write_kubeconfig(&admin_kubeconfig, Identity::Admin)
            .expect("admin kubeconfig");
        let webhook_kubeconfig = ws.path().join("webhook.kubeconfig");
        cp.write_kubeconfig(&webhook_kubeconfig, Identity::Webhook)
            .expect("webhook kubeconfig");

        // Everything but the webhook configuration first, so the RBAC is in
        // place before the server starts watching Secrets with it.
        let objects = ws.render(&kubectl, overlay);
        let first: Vec<Value> = objects
            .iter()
            .filter(|o| !is_webhook_configuration(o) && !is_cert_manager_object(o))
            .cloned()
            .collect();
        kubectl_apply(&kubectl, &admin_kubeconfig, &first);
        cp.ensure_default_service_account(WEBHOOK_NAMESPACE)
            .await
            .expect("default ServiceAccount in image-rewriter");

        let admin = cp.admin_client();
        let source_data = serde_json::Map::from_iter([(
            ".dockerconfigjson".to_string(),
            json!(docker_config_json("robot$e2e", "first-password")),
        )]);
        create_pull_secret(&admin, WEBHOOK_NAMESPACE, &source_data, None).await;

        // The shipped config, from the rendered ConfigMap, with the longest
        // wait for a pull secret copy: two control planes share the CI
        // machine's two cores, and the tests that read a copy right after
        // the pod's admission must not race the shipped 1 s wait.
        let config_map = objects
            .iter()
            .find(|o| o["kind"] == "ConfigMap" && o["metadata"]["name"] == "image-rewriter-config")
            .expect("the overlay renders ConfigMap image-rewriter-config");
        let shipped = config_map["data"]["config.yaml"]
            .as_str()
            .expect("config.yaml key");
        let mut config_value: Value =
            serde_yaml_ng::from_str(shipped).expect("shipped config YAML");
        assert!(
            config_value.get("pullSecretSync").is_none(),
            "the shipped config now sets pullSecretSync; merge instead of replacing it"
        );
        config_value["pullSecretSync"] = json!({ "waitForCopy": "3s" });
        let config = ws.path().join("config.yaml");
        std::fs::write(
            &config,
            serde_yaml_ng::to_string(&config_value).expect("config YAML"),
        )
        .expect("write config.yaml");

        let (ca_pem, cert_pem, key_pem) = loopback_certificate();
        let serve_dir = ws.path().join("serve");
        std::fs::create_dir_all(&serve_dir).expect("mkdir serve");
        let webhook = WebhookProcess::spawn(
            &cp,
            &serve_dir,
            &config,
            &cert_pem,
            &key_pem,
            &webhook_kubeconfig,
        );
        let env = Env {
            webhook,
            cp,
            ws,
            kubectl,
            admin_kubeconfig,
            webhook_ca_pem: ca_pem,
            overlay,
            objects,
            source_data,
        };
        env.wait_ready().await;
        env.namespace(PROBE_NAMESPACE, &[(ENABLED_LABEL, "true")])
            .await;
        env.apply_webhook_configuration(&env.objects.clone());
        env.wait_webhook_called(true).await;
        env
    }

    pub fn admin(&self) -> kube::Client {
        self.cp.admin_client()
    }

    /// `/readyz` of the server answers 200 over TLS with its certificate.
    /// Over HTTP/1.1 only: the apiserver is then the webhook's only h2 client
    /// (see the cluster-wide test).
    pub async fn wait_ready(&self) {
        let client = reqwest::Client::builder()
            .http1_only()
            .use_rustls_tls()
            .tls_built_in_root_certs(false)
            .add_root_certificate(
                reqwest::Certificate::from_pem(self.webhook_ca_pem.as_bytes()).expect("CA"),
            )
            .timeout(Duration::from_secs(2))
            .build()
            .expect("client");
        let url = format!(
            "https://127.0.0.1:{}/readyz",
            self.webhook.https_addr.port()
        );
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            match client.get(&url).send().await {
                Ok(r) if r.status().as_u16() == 200 => return,
                other if Instant::now() > deadline => panic!(
                    "the webhook never became ready ({other:?}); log:\n{}",
                    self.webhook.log_text()
                ),
                _ => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
    }

    /// Adds `rule` to the running webhook's config file and waits until the
    /// webhook has reloaded it.
    pub async fn add_rule(&self, rule: Value) {
        let path = self.ws.path().join("config.yaml");
        let text = std::fs::read_to_string(&path).expect("read config.yaml");
        let mut config: Value = serde_yaml_ng::from_str(&text).expect("config YAML");
        config["rules"]
            .as_array_mut()
            .expect("the config's rules")
            .push(rule);
        let reloads = |metrics: &str| {
            sample(
                metrics,
                "image_rewriter_config_reloads_total{result=\"success\"}",
            )
        };
        let before = reloads(&self.webhook.metrics().await);
        // Renamed into place, so that a reload never reads half a file.
        let written = self.ws.path().join("config.yaml.new");
        std::fs::write(
            &written,
            serde_yaml_ng::to_string(&config).expect("config YAML"),
        )
        .expect("write config.yaml.new");
        std::fs::rename(&written, &path).expect("rename over config.yaml");
        eventually(
            "the webhook reloads its config",
            Duration::from_secs(20),
            || async {
                let now = reloads(&self.webhook.metrics().await);
                if now > before {
                    Ok(())
                } else {
                    Err(format!("{now} successful reloads"))
                }
            },
        )
        .await;
    }

    /// Applies the webhook configuration of `objects` with only its
    /// clientConfig changed to the running server.
    pub fn apply_webhook_configuration(&self, objects: &[Value]) {
        let mwc = objects
            .iter()
            .find(|o| o["kind"] == "MutatingWebhookConfiguration")
            .expect("a MutatingWebhookConfiguration");
        let mwc = with_url_client_config(mwc, &self.webhook.url(), &self.webhook_ca_pem);
        kubectl_apply(&self.kubectl, &self.admin_kubeconfig, &[mwc]);
    }

    /// Applies every object of `objects`, the webhook configuration pointed
    /// at the running server (cert-manager's objects need
    /// [`Env::install_crds`]`("cert-manager")` first). Returns what kubectl
    /// printed (`-o name`).
    pub fn apply_all(&self, objects: &[Value]) -> String {
        let applied: Vec<Value> = objects
            .iter()
            .map(|o| {
                if o["kind"] == "MutatingWebhookConfiguration" {
                    with_url_client_config(o, &self.webhook.url(), &self.webhook_ca_pem)
                } else {
                    o.clone()
                }
            })
            .collect();
        kubectl_apply(&self.kubectl, &self.admin_kubeconfig, &applied)
    }

    /// Runs one kubectl command as the admin (as the README writes it);
    /// returns stdout, fails the test on a non-zero exit.
    pub fn kubectl_as_admin(&self, args: &[&str]) -> String {
        let output = Command::new(&self.kubectl)
            .arg("--kubeconfig")
            .arg(&self.admin_kubeconfig)
            .args(args)
            .output()
            .expect("run kubectl");
        assert!(
            output.status.success(),
            "kubectl {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8_lossy(&output.stdout).into_owned()
    }

    /// Installs the CRDs vendored in `tests/fixtures/<fixture>/` (every
    /// `*.yaml` there) and waits until the apiserver serves them.
    pub fn install_crds(&self, fixture: &str) {
        let dir = Path::new(REPO).join("tests/fixtures").join(fixture);
        let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
            .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
            .map(|entry| entry.expect("dir entry").path())
            .filter(|path| path.extension().is_some_and(|ext| ext == "yaml"))
            .collect();
        files.sort();
        assert!(!files.is_empty(), "no CRDs in {}", dir.display());
        for file in files {
            let text = std::fs::read_to_string(&file).expect("read CRD");
            let crd: Value = serde_yaml_ng::from_str(&text).expect("CRD YAML");
            assert_eq!(
                crd["kind"],
                "CustomResourceDefinition",
                "{}",
                file.display()
            );
            let name = crd["metadata"]["name"].as_str().expect("CRD name");
            // Server-side: the larger CRDs exceed the last-applied annotation's limit.
            self.kubectl_as_admin(&[
                "apply",
                "--server-side",
                "-f",
                file.to_str().expect("UTF-8 path"),
            ]);
            self.wait_crd_established(name);
        }
    }

    /// Polls until the CRD's `Established` condition is `True` and discovery
    /// serves its resource, so the next `kubectl apply` can map the kind.
    /// Neither `kubectl wait --for=condition=Established` nor a jsonpath
    /// filter on the conditions: both fail at once ("accessor error: <nil>",
    /// "<nil> is not array or slice") when they read the CRD before the
    /// apiserver has written its status conditions, which CI hit. Discovery
    /// is filled in apart from the condition, a little later.
    fn wait_crd_established(&self, name: &str) {
        let deadline = Instant::now() + Duration::from_secs(60);
        let crd = format!("crd/{name}");
        loop {
            let object: Value =
                serde_json::from_str(&self.kubectl_as_admin(&["get", &crd, "-o", "json"]))
                    .expect("kubectl get -o json");
            let established = object["status"]["conditions"]
                .as_array()
                .into_iter()
                .flatten()
                .find(|condition| condition["type"] == "Established")
                .map(|condition| condition["status"].clone())
                .unwrap_or(Value::Null);
            // A CRD's name is `<plural>.<group>`, which `kubectl get` resolves
            // through discovery.
            let listed = Command::new(&self.kubectl)
                .arg("--kubeconfig")
                .arg(&self.admin_kubeconfig)
                .args(["get", name, "--all-namespaces", "-o", "name"])
                .output()
                .expect("run kubectl");
            if established == "True" && listed.status.success() {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{crd} not served within 60 s (Established: {established:?}; kubectl get {name}: {})",
                String::from_utf8_lossy(&listed.stderr)
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Waits until a dry-run pod in [`PROBE_NAMESPACE`] comes back rewritten
    /// (`called`) or not (the webhook configuration is gone or ignored).
    pub async fn wait_webhook_called(&self, called: bool) {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let probe = pod("probe", &[("app", "nginx:1.27")], &[]);
            let created = self
                .create_pod_dry_run(PROBE_NAMESPACE, &probe)
                .await
                .expect("dry-run probe pod");
            let rewritten = container_images(&created, "containers")[0].1 != "nginx:1.27";
            if rewritten == called {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "the apiserver did not {} the webhook within 20 s; webhook log:\n{}\napiserver log:\n{}",
                if called {
                    "start calling"
                } else {
                    "stop calling"
                },
                self.webhook.log_text(),
                self.cp.apiserver_log_tail(30)
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Creates (or relabels) a namespace and what a controller-manager would
    /// put in it (the `default` ServiceAccount pods need).
    pub async fn namespace(&self, name: &str, labels: &[(&str, &str)]) {
        let api: Api<Namespace> = Api::all(self.admin());
        let labels: serde_json::Map<String, Value> = labels
            .iter()
            .map(|(k, v)| (k.to_string(), json!(v)))
            .collect();
        if api.get_opt(name).await.expect("get namespace").is_some() {
            if !labels.is_empty() {
                api.patch(
                    name,
                    &PatchParams::default(),
                    &Patch::Merge(json!({ "metadata": { "labels": labels } })),
                )
                .await
                .expect("label namespace");
            }
        } else {
            let ns: Namespace = serde_json::from_value(json!({
                "metadata": { "name": name, "labels": labels }
            }))
            .expect("namespace");
            api.create(&PostParams::default(), &ns)
                .await
                .expect("create namespace");
        }
        self.cp
            .ensure_default_service_account(name)
            .await
            .expect("default ServiceAccount");
    }

    pub async fn create_pod(&self, namespace: &str, pod: &Pod) -> Pod {
        Api::<Pod>::namespaced(self.admin(), namespace)
            .create(&PostParams::default(), pod)
            .await
            .unwrap_or_else(|err| {
                panic!(
                    "creating pod {namespace}/{:?}: {err}; webhook log:\n{}",
                    pod.metadata.name,
                    self.webhook.log_text()
                )
            })
    }

    /// A `dryRun=All` create: the pod as admission left it, nothing stored.
    pub async fn create_pod_dry_run(&self, namespace: &str, pod: &Pod) -> kube::Result<Pod> {
        let dry_run = PostParams {
            dry_run: true,
            ..Default::default()
        };
        Api::<Pod>::namespaced(self.admin(), namespace)
            .create(&dry_run, pod)
            .await
    }

    /// The apiserver's own `/metrics` (admin).
    pub async fn apiserver_metrics(&self) -> String {
        self.cp
            .http_client()
            .get(format!("{}/metrics", self.cp.base_url()))
            .bearer_auth(self.cp.token(Identity::Admin))
            .send()
            .await
            .and_then(|r| r.error_for_status())
            .expect("GET apiserver /metrics")
            .text()
            .await
            .expect("apiserver /metrics body")
    }
}

/// `kubectl apply -f -` of `objects` (JSON documents are YAML documents).
pub fn kubectl_apply(kubectl: &Path, kubeconfig: &Path, objects: &[Value]) -> String {
    for object in objects {
        assert_loopback_only(object);
    }
    let stream: String = objects
        .iter()
        .map(|o| format!("---\n{}\n", serde_json::to_string(o).expect("JSON")))
        .collect();
    let mut child = Command::new(kubectl)
        .arg("--kubeconfig")
        .arg(kubeconfig)
        .args(["apply", "-f", "-", "-o", "name"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run kubectl apply");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(stream.as_bytes())
        .expect("write to kubectl");
    let out = child.wait_with_output().expect("kubectl apply");
    let objects_list: Vec<String> = objects.iter().map(describe).collect();
    assert!(
        out.status.success(),
        "kubectl apply refused some of {objects_list:?}:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

pub fn docker_config_json(user: &str, password: &str) -> String {
    let b64 = base64::engine::general_purpose::STANDARD;
    let config = json!({
        "auths": { "harbor.corp.example": {
            "username": user,
            "password": password,
            "auth": b64.encode(format!("{user}:{password}")),
        }}
    });
    b64.encode(config.to_string())
}

/// A `kubernetes.io/dockerconfigjson` Secret `harbor-pull`; `data` values are base64.
pub async fn create_pull_secret(
    client: &kube::Client,
    namespace: &str,
    data: &serde_json::Map<String, Value>,
    labels: Option<Value>,
) -> Secret {
    let secret: Secret = serde_json::from_value(json!({
        "metadata": { "name": PULL_SECRET, "namespace": namespace, "labels": labels.unwrap_or(json!({})) },
        "type": "kubernetes.io/dockerconfigjson",
        "data": data,
    }))
    .expect("Secret");
    Api::<Secret>::namespaced(client.clone(), namespace)
        .create(&PostParams::default(), &secret)
        .await
        .unwrap_or_else(|err| panic!("creating Secret {namespace}/{PULL_SECRET}: {err}"))
}

pub fn secret_data(secret: &Secret) -> std::collections::BTreeMap<String, ByteString> {
    secret.data.clone().unwrap_or_default()
}

/// A pod that passes the `restricted` Pod Security Standard (the webhook's
/// namespace enforces it). `containers`: (name, image); names starting with
/// `init-` become initContainers.
pub fn pod(name: &str, containers: &[(&str, &str)], labels: &[(&str, &str)]) -> Pod {
    let security = json!({
        "allowPrivilegeEscalation": false,
        "capabilities": { "drop": ["ALL"] },
    });
    let make = |(n, image): &(&str, &str)| json!({ "name": n, "image": image, "securityContext": security });
    let init: Vec<Value> = containers
        .iter()
        .filter(|(n, _)| n.starts_with("init-"))
        .map(make)
        .collect();
    let main: Vec<Value> = containers
        .iter()
        .filter(|(n, _)| !n.starts_with("init-"))
        .map(make)
        .collect();
    let labels: serde_json::Map<String, Value> = labels
        .iter()
        .map(|(k, v)| (k.to_string(), json!(v)))
        .collect();
    let mut spec = json!({
        "containers": main,
        "securityContext": {
            "runAsNonRoot": true,
            "runAsUser": 65532,
            "seccompProfile": { "type": "RuntimeDefault" },
        },
    });
    if !init.is_empty() {
        spec["initContainers"] = json!(init);
    }
    serde_json::from_value(json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": { "name": name, "labels": labels },
        "spec": spec,
    }))
    .expect("pod")
}

/// (name, image) of `list` (`containers`, `initContainers`, `ephemeralContainers`).
pub fn container_images(pod: &Pod, list: &str) -> Vec<(String, String)> {
    let value = serde_json::to_value(pod).expect("pod JSON");
    value["spec"][list]
        .as_array()
        .into_iter()
        .flatten()
        .map(|c| {
            (
                c["name"].as_str().unwrap_or("").to_string(),
                c["image"].as_str().unwrap_or("").to_string(),
            )
        })
        .collect()
}

pub fn pull_secret_names(pod: &Pod) -> Vec<String> {
    pod.spec
        .as_ref()
        .and_then(|s| s.image_pull_secrets.as_ref())
        .map(|l| l.iter().map(|r| r.name.clone()).collect())
        .unwrap_or_default()
}

pub fn original_images(pod: &Pod) -> Option<Value> {
    pod.metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(ORIGINAL_IMAGES))
        .map(|text| serde_json::from_str(text).expect("original-images is JSON"))
}

/// The pod as sent: images as written, no pull secrets, no annotation.
pub fn assert_untouched(pod: &Pod, sent: &Pod, why: &str) {
    for list in ["initContainers", "containers"] {
        assert_eq!(
            container_images(pod, list),
            container_images(sent, list),
            "{why}: {list} images must be left as written"
        );
    }
    assert!(
        pull_secret_names(pod).is_empty(),
        "{why}: no imagePullSecrets expected, got {:?}",
        pull_secret_names(pod)
    );
    assert_eq!(
        original_images(pod),
        None,
        "{why}: no {ORIGINAL_IMAGES} expected"
    );
}

pub fn namespace_of(meta: &ObjectMeta) -> String {
    meta.namespace.clone().unwrap_or_default()
}

/// The value of one series of a `/metrics` text, named with its labels as
/// written there (`name{label="value"}`); 0 when it has no sample.
pub fn sample(metrics: &str, series: &str) -> f64 {
    metrics
        .lines()
        .find_map(|line| line.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or(0.0)
}

/// Polls `check` every 100 ms until it returns Some, or panics after `timeout`.
pub async fn eventually<T, F, Fut>(what: &str, timeout: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, String>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        match check().await {
            Ok(value) => return value,
            Err(last) if Instant::now() >= deadline => {
                panic!("{what}: not within {timeout:?}; last: {last}")
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
}
