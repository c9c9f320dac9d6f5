//! The real server on 127.0.0.1:0, called as the kube-apiserver calls it:
//! TLS verified against the CA bundle with the Service DNS name as server
//! name, AdmissionReview v1 bodies in the apiserver's shape, responses read
//! the way the apiserver reads them, the patch applied with an independent
//! JSON Patch implementation, and the patched pod sent again.
//!
//! Config and certificate files are written the way the kubelet writes
//! mounted ConfigMaps and Secrets: a `..data` symlink swapped atomically.

mod common;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use common::{admission_review, check_response, pod, pod_after};
use image_rewriter::server::{DEFAULT_BODY_LIMIT, ServeOptions, Server};
use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair, KeyUsagePurpose};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

const SERVICE_HOST: &str = "image-rewriter.image-rewriter.svc";

const CONFIG: &str = "\
rules:
  - match: docker.io
    target: harbor.corp.example/dockerhub
    pullSecret: harbor-pull
  - match: quay.io
    target: harbor.corp.example/quay
    pullSecret: harbor-pull
";

fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// A root CA, an intermediate CA it signed, and serving certificates the
/// intermediate signs: the apiserver trusts only the root, so a handshake
/// succeeds only if the server sends the whole chain.
struct Pki {
    root_pem: String,
    root: Issuer<'static, KeyPair>,
    intermediate_pem: String,
    intermediate: Issuer<'static, KeyPair>,
}

fn ca_params() -> CertificateParams {
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    params
}

impl Pki {
    fn new() -> Self {
        let root_key = KeyPair::generate().unwrap();
        let root_params = ca_params();
        let root_pem = root_params.self_signed(&root_key).unwrap().pem();
        let root = Issuer::new(root_params, root_key);
        let intermediate_key = KeyPair::generate().unwrap();
        let intermediate_params = ca_params();
        let intermediate_pem = intermediate_params
            .signed_by(&intermediate_key, &root)
            .unwrap()
            .pem();
        Self {
            root_pem,
            root,
            intermediate_pem,
            intermediate: Issuer::new(intermediate_params, intermediate_key),
        }
    }

    /// A serving certificate chain (leaf + intermediate) and its PKCS#8 key.
    fn serving_pair(&self) -> (String, String) {
        self.serving_pair_with(|_| {})
    }

    fn serving_pair_with(&self, adjust: impl FnOnce(&mut CertificateParams)) -> (String, String) {
        Self::leaf_signed_by(&self.intermediate, &self.intermediate_pem, adjust)
    }

    /// A serving certificate chain through a new intermediate, `adjust`ed,
    /// that the root signed.
    fn serving_pair_through(
        &self,
        adjust: impl FnOnce(&mut CertificateParams),
    ) -> (String, String) {
        let key = KeyPair::generate().unwrap();
        let mut params = ca_params();
        adjust(&mut params);
        let pem = params.signed_by(&key, &self.root).unwrap().pem();
        Self::leaf_signed_by(&Issuer::new(params, key), &pem, |_| {})
    }

    fn leaf_signed_by(
        issuer: &Issuer<'_, KeyPair>,
        issuer_pem: &str,
        adjust: impl FnOnce(&mut CertificateParams),
    ) -> (String, String) {
        let key = KeyPair::generate().unwrap();
        let names = image_rewriter::certs::service_dns_names("image-rewriter", "image-rewriter");
        let mut params = CertificateParams::new(names).unwrap();
        adjust(&mut params);
        let leaf = params.signed_by(&key, issuer).unwrap();
        (format!("{}{issuer_pem}", leaf.pem()), key.serialize_pem())
    }
}

/// Writes files into `dir` as the kubelet's AtomicWriter does: a new
/// versioned directory, `..data` swapped to it by rename, stable symlinks.
fn write_like_kubelet(dir: &Path, files: &[(&str, &[u8])]) {
    static VERSION: AtomicUsize = AtomicUsize::new(0);
    std::fs::create_dir_all(dir).unwrap();
    let version = format!("..v{}", VERSION.fetch_add(1, Ordering::Relaxed));
    std::fs::create_dir(dir.join(&version)).unwrap();
    for (name, content) in files {
        std::fs::write(dir.join(&version).join(name), content).unwrap();
    }
    let previous = std::fs::read_link(dir.join("..data")).ok();
    std::os::unix::fs::symlink(&version, dir.join("..data_tmp")).unwrap();
    std::fs::rename(dir.join("..data_tmp"), dir.join("..data")).unwrap();
    for (name, _) in files {
        let link = dir.join(name);
        if std::fs::symlink_metadata(&link).is_err() {
            std::os::unix::fs::symlink(Path::new("..data").join(name), link).unwrap();
        }
    }
    if let Some(previous) = previous {
        std::fs::remove_dir_all(dir.join(previous)).unwrap();
    }
}

struct Harness {
    server: Option<Server>,
    dir: tempfile::TempDir,
    pki: Pki,
    https_addr: SocketAddr,
    metrics_addr: SocketAddr,
}

impl Harness {
    async fn start(config: &str) -> Self {
        Self::start_with(config, |_| {}).await
    }

    async fn start_with(config: &str, adjust: impl FnOnce(&mut ServeOptions)) -> Self {
        install_crypto_provider();
        let dir = tempfile::tempdir().unwrap();
        let pki = Pki::new();
        let (cert, key) = pki.serving_pair();
        write_like_kubelet(
            &dir.path().join("config"),
            &[("config.yaml", config.as_bytes())],
        );
        write_like_kubelet(
            &dir.path().join("tls"),
            &[("tls.crt", cert.as_bytes()), ("tls.key", key.as_bytes())],
        );
        let mut options = ServeOptions {
            config: dir.path().join("config/config.yaml"),
            tls_cert: dir.path().join("tls/tls.crt"),
            tls_key: dir.path().join("tls/tls.key"),
            listen: "127.0.0.1:0".parse().unwrap(),
            metrics_listen: "127.0.0.1:0".parse().unwrap(),
            namespace: Some("image-rewriter".into()),
            max_body_bytes: DEFAULT_BODY_LIMIT,
            reload_interval: Duration::from_millis(50),
            shutdown_delay: Duration::ZERO,
            shutdown_grace: Duration::from_secs(10),
            header_read_timeout: Duration::from_secs(5),
            body_read_timeout: Duration::from_secs(5),
            max_connections: 256,
            pull_secret_sync: false,
        };
        adjust(&mut options);
        let server = Server::start(options).await.unwrap();
        Self {
            https_addr: server.https_addr,
            metrics_addr: server.metrics_addr,
            server: Some(server),
            dir,
            pki,
        }
    }

    fn path(&self, relative: &str) -> PathBuf {
        self.dir.path().join(relative)
    }

    /// A client that verifies like the apiserver: only our root CA, and the
    /// Service DNS name as the server name.
    fn client(&self, http1_only: bool) -> reqwest::Client {
        let mut builder = reqwest::Client::builder()
            .use_rustls_tls()
            .tls_built_in_root_certs(false)
            .add_root_certificate(
                reqwest::Certificate::from_pem(self.pki.root_pem.as_bytes()).unwrap(),
            )
            .resolve(SERVICE_HOST, self.https_addr)
            .tls_info(true)
            .timeout(Duration::from_secs(10));
        if http1_only {
            builder = builder.http1_only();
        }
        builder.build().unwrap()
    }

    /// `GET /healthz` on a new connection of a new [`Self::client`].
    async fn healthz_on_new_connection(&self, http1_only: bool) -> reqwest::Response {
        self.client(http1_only)
            .get(self.url("/healthz"))
            .send()
            .await
            .unwrap()
    }

    fn url(&self, path: &str) -> String {
        format!("https://{SERVICE_HOST}:{}{path}", self.https_addr.port())
    }

    async fn post_review(&self, client: &reqwest::Client, review: &Value) -> reqwest::Response {
        client
            .post(self.url("/mutate?timeout=10s"))
            .header("Content-Type", "application/json")
            .body(serde_json::to_vec(review).unwrap())
            .send()
            .await
            .unwrap()
    }

    /// The body of a 200 answer to `review`.
    async fn answer(&self, client: &reqwest::Client, review: &Value) -> bytes::Bytes {
        let response = self.post_review(client, review).await;
        assert_eq!(response.status(), 200);
        response.bytes().await.unwrap()
    }

    /// One metric's value now: the sum of its series that carry `label`
    /// (`("", "")` for all of them).
    async fn metric(&self, name: &str, label: (&str, &str)) -> f64 {
        metric(&self.metrics().await, name, label)
    }

    /// Swaps in a certificate and key as the kubelet updates a Secret volume,
    /// then waits until the server has counted `count` reloads of `result`.
    async fn swap_certificate(&self, cert: &str, key: &str, result: &str, count: f64) {
        write_like_kubelet(
            &self.path("tls"),
            &[("tls.crt", cert.as_bytes()), ("tls.key", key.as_bytes())],
        );
        self.wait_for_metric(
            "image_rewriter_certificate_reloads_total",
            ("result", result),
            count,
        )
        .await;
    }

    async fn metrics(&self) -> prometheus_parse::Scrape {
        let text = reqwest::get(format!("http://{}/metrics", self.metrics_addr))
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        prometheus_parse::Scrape::parse(text.lines().map(|l| Ok(l.to_owned()))).unwrap()
    }

    async fn wait_for_metric(&self, name: &str, label: (&str, &str), at_least: f64) {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let value = metric(&self.metrics().await, name, label);
            if value >= at_least {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{name}{label:?} stayed at {value}, wanted {at_least}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn stop(mut self) {
        if let Some(server) = self.server.take() {
            server.shutdown();
            server.wait().await;
        }
    }
}

fn metric(scrape: &prometheus_parse::Scrape, name: &str, label: (&str, &str)) -> f64 {
    scrape
        .samples
        .iter()
        .filter(|s| s.metric == name)
        .filter(|s| label.0.is_empty() || s.labels.get(label.0) == Some(label.1))
        .map(|s| match s.value {
            prometheus_parse::Value::Counter(v)
            | prometheus_parse::Value::Gauge(v)
            | prometheus_parse::Value::Untyped(v) => v,
            _ => 0.0,
        })
        .sum()
}

fn sample_review() -> Value {
    admission_review(
        pod(
            "team-a",
            &[("init", "busybox:1.36")],
            &[
                ("web", "nginx:1.27"),
                ("exporter", "quay.io/prometheus/node-exporter:v1.8.0"),
            ],
            None,
        ),
        "CREATE",
        "team-a",
    )
}

/// One round trip as the apiserver does it, then the reinvocation.
async fn mutate_and_reinvoke(harness: &Harness, client: &reqwest::Client) -> reqwest::Version {
    let review = sample_review();
    let response = harness.post_review(client, &review).await;
    assert_eq!(response.status(), 200);
    let version = response.version();
    let body = response.bytes().await.unwrap();
    let patch = check_response(&review, &body).expect("a patch");
    let (patched, pod) = pod_after(&review["request"]["object"], Some(&patch));
    let spec = pod.spec.unwrap();
    let images: Vec<_> = spec
        .init_containers
        .iter()
        .flatten()
        .chain(&spec.containers)
        .map(|c| c.image.clone().unwrap())
        .collect();
    assert_eq!(
        images,
        [
            "harbor.corp.example/dockerhub/library/busybox:1.36",
            "harbor.corp.example/dockerhub/library/nginx:1.27",
            "harbor.corp.example/quay/prometheus/node-exporter:v1.8.0",
        ]
    );
    let secrets: Vec<_> = spec
        .image_pull_secrets
        .unwrap()
        .into_iter()
        .map(|s| s.name)
        .collect();
    assert_eq!(secrets, ["harbor-pull"]);
    assert_eq!(
        patched["spec"]["someFutureField"],
        review["request"]["object"]["spec"]["someFutureField"]
    );

    let again = admission_review(patched, "CREATE", "team-a");
    let body = harness.answer(client, &again).await;
    assert_eq!(
        check_response(&again, &body),
        None,
        "the second pass must change nothing"
    );
    version
}

#[tokio::test]
async fn mutates_over_http1_and_h2_as_the_apiserver_calls_it() {
    let harness = Harness::start(CONFIG).await;
    let version = mutate_and_reinvoke(&harness, &harness.client(true)).await;
    assert_eq!(version, reqwest::Version::HTTP_11);
    let version = mutate_and_reinvoke(&harness, &harness.client(false)).await;
    assert_eq!(version, reqwest::Version::HTTP_2);
    harness.stop().await;
}

#[tokio::test]
async fn only_tls_1_2_and_up_and_the_whole_chain_are_served() {
    let harness = Harness::start(CONFIG).await;
    // The client trusts only the root: the intermediate must come from the server.
    let response = harness.healthz_on_new_connection(true).await;
    let tls_info = response
        .extensions()
        .get::<reqwest::tls::TlsInfo>()
        .cloned();
    assert_eq!(response.status(), 200);
    assert!(
        tls_info
            .and_then(|i| i.peer_certificate().map(<[u8]>::to_vec))
            .is_some()
    );

    // A client that offers only TLS 1.2 still connects.
    let config = rustls::ClientConfig::builder_with_protocol_versions(&[&rustls::version::TLS12])
        .with_root_certificates(root_store(&harness.pki.root_pem))
        .with_no_client_auth();
    let stream = tls_connect(&harness, config).await;
    assert_eq!(
        stream.get_ref().1.protocol_version(),
        Some(rustls::ProtocolVersion::TLSv1_2)
    );
    harness.stop().await;
}

fn root_store(pem: &str) -> rustls::RootCertStore {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject as _;
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(pem.as_bytes()) {
        roots.add(cert.unwrap()).unwrap();
    }
    roots
}

async fn tls_connect(
    harness: &Harness,
    config: rustls::ClientConfig,
) -> tokio_rustls::client::TlsStream<tokio::net::TcpStream> {
    tls_connect_alpn(harness, config, b"http/1.1").await
}

async fn tls_connect_alpn(
    harness: &Harness,
    mut config: rustls::ClientConfig,
    protocol: &[u8],
) -> tokio_rustls::client::TlsStream<tokio::net::TcpStream> {
    config.alpn_protocols = vec![protocol.to_vec()];
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let tcp = tokio::net::TcpStream::connect(harness.https_addr)
        .await
        .unwrap();
    let name = rustls::pki_types::ServerName::try_from(SERVICE_HOST).unwrap();
    connector.connect(name, tcp).await.unwrap()
}

#[tokio::test]
async fn bad_requests_get_clear_http_answers() {
    let harness = Harness::start(CONFIG).await;
    let client = harness.client(true);
    let post = |body: Vec<u8>, content_type: &'static str| {
        client
            .post(harness.url("/mutate?timeout=10s"))
            .header("Content-Type", content_type)
            .body(body)
            .send()
    };

    let response = post(b"{not json".to_vec(), "application/json")
        .await
        .unwrap();
    assert_eq!(response.status(), 400);
    assert!(
        response
            .text()
            .await
            .unwrap()
            .contains("not an AdmissionReview")
    );

    let mut v1beta1 = sample_review();
    v1beta1["apiVersion"] = json!("admission.k8s.io/v1beta1");
    let response = post(serde_json::to_vec(&v1beta1).unwrap(), "application/json")
        .await
        .unwrap();
    assert_eq!(response.status(), 400);
    assert!(
        response
            .text()
            .await
            .unwrap()
            .contains("admission.k8s.io/v1beta1")
    );

    let mut no_object = sample_review();
    no_object["request"]["object"] = Value::Null;
    let response = post(serde_json::to_vec(&no_object).unwrap(), "application/json")
        .await
        .unwrap();
    assert_eq!(response.status(), 400);
    assert!(response.text().await.unwrap().contains("object is missing"));

    let response = post(serde_json::to_vec(&sample_review()).unwrap(), "text/plain")
        .await
        .unwrap();
    assert_eq!(response.status(), 415);

    let response = post(
        serde_json::to_vec(&sample_review()).unwrap(),
        "application/json; charset=utf-8",
    )
    .await
    .unwrap();
    assert_eq!(response.status(), 200);

    // Just above the 8 MiB default: 413; just under it (a big pod): answered.
    let mut huge = sample_review();
    huge["request"]["object"]["metadata"]["annotations"]["big"] =
        json!("x".repeat(DEFAULT_BODY_LIMIT));
    let response = post(serde_json::to_vec(&huge).unwrap(), "application/json")
        .await
        .unwrap();
    assert_eq!(response.status(), 413);
    let mut large = sample_review();
    large["request"]["object"]["metadata"]["annotations"]["big"] =
        json!("x".repeat(7 * 1024 * 1024));
    let response = post(serde_json::to_vec(&large).unwrap(), "application/json")
        .await
        .unwrap();
    assert_eq!(response.status(), 200);

    // Another kind reaching /mutate is allowed untouched.
    let mut deployment = sample_review();
    deployment["request"]["kind"] = json!({"group": "apps", "version": "v1", "kind": "Deployment"});
    deployment["request"]["resource"] =
        json!({"group": "apps", "version": "v1", "resource": "deployments"});
    deployment["request"]["object"] = json!({"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "web"}, "spec": {}});
    let response = post(serde_json::to_vec(&deployment).unwrap(), "application/json")
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let body = response.bytes().await.unwrap();
    assert_eq!(check_response(&deployment, &body), None);

    let response = client.get(harness.url("/mutate")).send().await.unwrap();
    assert_eq!(response.status(), 405);

    let scrape = harness.metrics().await;
    // Not JSON, v1beta1, no object.
    assert_eq!(
        metric(
            &scrape,
            "image_rewriter_admission_requests_total",
            ("result", "bad_request")
        ),
        3.0
    );
    assert_eq!(
        metric(
            &scrape,
            "image_rewriter_admission_requests_total",
            ("result", "too_large")
        ),
        1.0
    );
    assert_eq!(
        metric(
            &scrape,
            "image_rewriter_admission_requests_total",
            ("result", "unsupported_media_type")
        ),
        1.0
    );
    assert_eq!(
        metric(
            &scrape,
            "image_rewriter_admission_requests_total",
            ("result", "skipped")
        ),
        1.0
    );
    harness.stop().await;
}

#[tokio::test]
async fn metrics_move_with_requests() {
    let harness = Harness::start(CONFIG).await;
    let before = harness.metrics().await;
    assert_eq!(
        metric(&before, "image_rewriter_admission_requests_total", ("", "")),
        0.0
    );
    assert_eq!(
        metric(
            &before,
            "image_rewriter_config_reloads_total",
            ("result", "success")
        ),
        1.0
    );
    assert_eq!(
        metric(
            &before,
            "image_rewriter_certificate_reloads_total",
            ("result", "success")
        ),
        1.0
    );

    let client = harness.client(true);
    mutate_and_reinvoke(&harness, &client).await;
    let mut unparsable = sample_review();
    unparsable["request"]["object"]["spec"]["containers"][0]["image"] = json!("NGINX");
    let body = harness.answer(&client, &unparsable).await;
    check_response(&unparsable, &body);
    assert!(
        common::warnings_of(&body)
            .iter()
            .any(|w| w.contains("\"NGINX\""))
    );

    let after = harness.metrics().await;
    let requests = |result| {
        metric(
            &after,
            "image_rewriter_admission_requests_total",
            ("result", result),
        )
    };
    assert_eq!((requests("patched"), requests("unchanged")), (2.0, 1.0));
    assert_eq!(
        metric(
            &after,
            "image_rewriter_images_rewritten_total",
            ("rule", "docker.io")
        ),
        3.0
    );
    assert_eq!(
        metric(
            &after,
            "image_rewriter_images_rewritten_total",
            ("rule", "quay.io")
        ),
        2.0
    );
    assert_eq!(
        metric(&after, "image_rewriter_images_unparsable_total", ("", "")),
        1.0
    );
    assert_eq!(
        metric(
            &after,
            "image_rewriter_admission_duration_seconds_count",
            ("", "")
        ),
        3.0
    );
    harness.stop().await;
}

/// `/metrics` in the two formats (and the connections counted by protocol):
/// the Prometheus text format 0.0.4 unless
/// the scraper asks for OpenMetrics, as Prometheus does. The 0.0.4 text is
/// checked by Prometheus' own `promtool check metrics` (its parser and
/// lint), where installed (`IMAGE_REWRITER_REQUIRE_PROMTOOL=1`: required).
#[tokio::test]
async fn metrics_speak_the_format_the_scraper_asks_for() {
    let harness = Harness::start(CONFIG).await;
    // Connections are counted by the protocol ALPN settled on: two requests
    // on one HTTP/1.1 connection, one on another, one on an h2 connection.
    // The first connection is hyper's own, not a pooled client's, so that it
    // is one connection by construction.
    let connections = |protocol| {
        let harness = &harness;
        async move {
            harness
                .metric(
                    "image_rewriter_tls_connections_total",
                    ("protocol", protocol),
                )
                .await
        }
    };
    assert_eq!(
        (connections("http/1.1").await, connections("h2").await),
        (0.0, 0.0)
    );
    healthz_twice_on_one_http1_connection(&harness).await;
    for http1_only in [true, false] {
        let response = harness.healthz_on_new_connection(http1_only).await;
        assert_eq!(response.version() == reqwest::Version::HTTP_2, !http1_only);
    }
    assert_eq!(
        (connections("http/1.1").await, connections("h2").await),
        (2.0, 1.0)
    );
    mutate_and_reinvoke(&harness, &harness.client(true)).await;
    let url = format!("http://{}/metrics", harness.metrics_addr);
    let scrape = |accept: Option<&'static str>| {
        let url = url.clone();
        async move {
            let mut request = reqwest::Client::new().get(url);
            if let Some(accept) = accept {
                request = request.header("accept", accept);
            }
            let response = request.send().await.unwrap();
            // The body depends on Accept: a cache must not serve one
            // scraper's format to another.
            assert_eq!(response.headers()["vary"], "Accept");
            let content_type = response.headers()["content-type"]
                .to_str()
                .unwrap()
                .to_owned();
            (content_type, response.text().await.unwrap())
        }
    };

    let (content_type, text) = scrape(None).await;
    assert_eq!(content_type, "text/plain; version=0.0.4; charset=utf-8");
    assert!(text.contains("# TYPE image_rewriter_admission_requests_total counter\n"));
    assert!(
        text.contains("image_rewriter_images_rewritten_total{rule=\"docker.io\"} "),
        "{text}"
    );
    assert!(!text.contains("# EOF"));
    promtool_check_metrics(&text);

    let prometheus = "application/openmetrics-text;version=1.0.0,application/openmetrics-text;\
                      version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1";
    let (content_type, openmetrics) = scrape(Some(prometheus)).await;
    assert_eq!(
        content_type,
        "application/openmetrics-text; version=1.0.0; charset=utf-8"
    );
    assert!(openmetrics.contains("# TYPE image_rewriter_admission_requests counter\n"));
    assert!(openmetrics.ends_with("# EOF\n"));
    harness.stop().await;
}

/// Posts the sample review on `sender`'s connection; a 200 with a patch
/// that applies.
async fn review_on(
    sender: &mut hyper::client::conn::http1::SendRequest<http_body_util::Full<bytes::Bytes>>,
) {
    use http_body_util::BodyExt as _;
    let review = sample_review();
    let request = hyper::Request::post("/mutate?timeout=10s")
        .header(hyper::header::HOST, SERVICE_HOST)
        .header(hyper::header::CONTENT_TYPE, "application/json")
        .body(http_body_util::Full::new(bytes::Bytes::from(
            serde_json::to_vec(&review).unwrap(),
        )))
        .unwrap();
    let response = sender
        .send_request(request)
        .await
        .expect("the connection still open");
    assert_eq!(response.status(), 200);
    let body = response.into_body().collect().await.unwrap().to_bytes();
    assert!(check_response(&review, &body).is_some());
}

async fn healthz_twice_on_one_http1_connection(harness: &Harness) {
    use http_body_util::BodyExt as _;
    let stream = http1_connection(harness).await;
    let (mut sender, connection) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .unwrap();
    let driver = tokio::spawn(connection);
    for _ in 0..2 {
        let request = hyper::Request::get("/healthz")
            .header(hyper::header::HOST, SERVICE_HOST)
            .body(http_body_util::Empty::<bytes::Bytes>::new())
            .unwrap();
        let response = sender.send_request(request).await.unwrap();
        assert_eq!(response.status(), 200);
        response.into_body().collect().await.unwrap();
    }
    drop(sender);
    driver.await.unwrap().unwrap();
}

/// `promtool check metrics` on `text`: no parse error, no lint problem.
fn promtool_check_metrics(text: &str) {
    let Some(out) = common::promtool(
        &["check", "metrics"],
        Path::new("."),
        text.as_bytes(),
        "/metrics not linted",
    ) else {
        return;
    };
    assert!(
        out.status.success() && out.stdout.is_empty() && out.stderr.is_empty(),
        "promtool check metrics: {}\n{}{}\n--- the text:\n{text}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test]
async fn health_and_readiness() {
    let harness = Harness::start(CONFIG).await;
    let client = harness.client(true);
    let status = |path: &'static str| {
        let client = client.clone();
        let url = harness.url(path);
        async move { client.get(url).send().await.unwrap().status().as_u16() }
    };
    assert_eq!(status("/healthz").await, 200);
    assert_eq!(status("/readyz").await, 200);
    harness.server.as_ref().unwrap().state.begin_shutdown();
    assert_eq!(status("/readyz").await, 503);
    assert_eq!(status("/healthz").await, 200);
    harness.stop().await;
}

#[tokio::test]
async fn the_serving_certificates_expiration_is_exported_and_follows_rotation() {
    let harness = Harness::start(CONFIG).await;
    let expiration = || {
        harness.metric(
            "image_rewriter_certificate_expiration_timestamp_seconds",
            ("", ""),
        )
    };
    // rcgen's default notAfter, 4096-01-01T00:00:00Z.
    assert_eq!(expiration().await, 67_090_118_400.0);

    let (cert, key) = harness.pki.serving_pair_with(|params| {
        params.not_after = rcgen::date_time_ymd(2031, 5, 6);
    });
    harness.swap_certificate(&cert, &key, "success", 2.0).await;
    // 2031-05-06T00:00:00Z.
    assert_eq!(expiration().await, 1_935_792_000.0);

    // The apiserver refuses the chain once its intermediate has expired,
    // whatever the leaf's notAfter (rcgen's default, 4096).
    let (cert, key) = harness.pki.serving_pair_through(|intermediate| {
        intermediate.not_after = rcgen::date_time_ymd(2030, 2, 3);
    });
    harness.swap_certificate(&cert, &key, "success", 3.0).await;
    // 2030-02-03T00:00:00Z.
    assert_eq!(expiration().await, 1_896_307_200.0);
    harness.stop().await;
}

/// An expired certificate (an old Secret re-applied) does not replace one
/// still valid: the apiserver would refuse it and every review would fail.
#[tokio::test]
async fn an_expired_certificate_does_not_replace_a_valid_one() {
    let harness = Harness::start(CONFIG).await;
    let in_force = peer_certificate(&harness.healthz_on_new_connection(true).await);
    let (expired_cert, expired_key) = harness.pki.serving_pair_with(|params| {
        params.not_before = rcgen::date_time_ymd(2020, 1, 1);
        params.not_after = rcgen::date_time_ymd(2021, 1, 1);
    });
    harness
        .swap_certificate(&expired_cert, &expired_key, "failure", 1.0)
        .await;
    let served = peer_certificate(&harness.healthz_on_new_connection(true).await);
    assert_eq!(served, in_force, "the expired certificate was swapped in");
    assert_eq!(
        harness
            .metric(
                "image_rewriter_certificate_last_reload_successful",
                ("", "")
            )
            .await,
        0.0
    );
    // rcgen's default notAfter (the pair in force), not the expired one's.
    assert_eq!(
        harness
            .metric(
                "image_rewriter_certificate_expiration_timestamp_seconds",
                ("", "")
            )
            .await,
        67_090_118_400.0
    );
    harness.stop().await;
}

/// A certificate whose notBefore is still ahead (issued by a clock ahead of
/// ours, or staged early) does not replace one valid now: the apiserver
/// refuses it as it refuses an expired one ("certificate has expired or is
/// not yet valid"). Once its notBefore has passed, the same files load.
#[tokio::test]
async fn a_certificate_not_yet_valid_replaces_a_valid_one_only_once_it_is_valid() {
    let harness = Harness::start(CONFIG).await;
    let in_force = peer_certificate(&harness.healthz_on_new_connection(true).await);
    let valid_from = time::OffsetDateTime::now_utc() + time::Duration::seconds(4);
    let (early_cert, early_key) = harness.pki.serving_pair_with(|params| {
        params.not_before = valid_from;
    });
    harness
        .swap_certificate(&early_cert, &early_key, "failure", 1.0)
        .await;
    let served = peer_certificate(&harness.healthz_on_new_connection(true).await);
    assert_eq!(
        served, in_force,
        "a certificate not valid yet was swapped in"
    );
    assert_eq!(
        harness
            .metric(
                "image_rewriter_certificate_last_reload_successful",
                ("", "")
            )
            .await,
        0.0
    );
    // Nothing changes on disk: its notBefore passing is enough.
    harness
        .wait_for_metric(
            "image_rewriter_certificate_reloads_total",
            ("result", "success"),
            2.0,
        )
        .await;
    assert!(time::OffsetDateTime::now_utc() >= valid_from.replace_nanosecond(0).unwrap());
    let served = peer_certificate(&harness.healthz_on_new_connection(true).await);
    assert_ne!(served, in_force, "the new certificate never loaded");
    assert_eq!(
        harness
            .metric(
                "image_rewriter_certificate_last_reload_successful",
                ("", "")
            )
            .await,
        1.0
    );
    harness.stop().await;
}

#[tokio::test]
async fn not_ready_until_a_config_loads() {
    let harness = Harness::start("rules: [ {match: docker.io, target: Bad/Target} ]\n").await;
    let client = harness.client(true);
    let readyz = client.get(harness.url("/readyz")).send().await.unwrap();
    assert_eq!(readyz.status(), 503);
    let response = harness.post_review(&client, &sample_review()).await;
    assert_eq!(response.status(), 503);
    let refused = harness
        .metric(
            "image_rewriter_admission_requests_total",
            ("result", "not_ready"),
        )
        .await;
    assert_eq!(
        refused, 1.0,
        "a review refused for want of a config is counted"
    );

    write_like_kubelet(
        &harness.path("config"),
        &[("config.yaml", CONFIG.as_bytes())],
    );
    harness
        .wait_for_metric(
            "image_rewriter_config_reloads_total",
            ("result", "success"),
            1.0,
        )
        .await;
    let readyz = client.get(harness.url("/readyz")).send().await.unwrap();
    assert_eq!(readyz.status(), 200);
    harness.stop().await;
}

#[tokio::test]
async fn config_reloads_and_a_bad_config_keeps_the_last_good_one() {
    let harness = Harness::start(CONFIG).await;
    let client = harness.client(true);
    // The first container's image after a review under the config in force.
    let first_image = || async {
        let review = sample_review();
        let body = harness.answer(&client, &review).await;
        let patch = check_response(&review, &body);
        let (_, pod) = pod_after(&review["request"]["object"], patch.as_ref());
        pod.spec.unwrap().containers[0].image.clone().unwrap()
    };
    let reload = |config: String, result: &'static str, count: f64| {
        write_like_kubelet(
            &harness.path("config"),
            &[("config.yaml", config.as_bytes())],
        );
        harness.wait_for_metric(
            "image_rewriter_config_reloads_total",
            ("result", result),
            count,
        )
    };

    reload(
        CONFIG.replace("harbor.corp.example/dockerhub", "mirror.corp.example/hub"),
        "success",
        2.0,
    )
    .await;
    assert_eq!(
        first_image().await,
        "mirror.corp.example/hub/library/nginx:1.27"
    );
    let config_in_force =
        || harness.metric("image_rewriter_config_last_reload_successful", ("", ""));
    assert_eq!(config_in_force().await, 1.0);

    reload(
        "rules:\n  - match: docker.io\n    target: \"\"\n".to_owned(),
        "failure",
        1.0,
    )
    .await;
    assert_eq!(
        first_image().await,
        "mirror.corp.example/hub/library/nginx:1.27"
    );
    assert_eq!(
        config_in_force().await,
        0.0,
        "the file as it is was refused"
    );
    let readyz = client.get(harness.url("/readyz")).send().await.unwrap();
    assert_eq!(
        readyz.status(),
        200,
        "a refused reload must not make the server unready"
    );

    // An emptied file (a truncating write caught half-way) is refused too;
    // `rules: []` says "no rules" on purpose and is taken.
    reload("# nothing here yet\n\n".to_owned(), "failure", 2.0).await;
    assert_eq!(
        first_image().await,
        "mirror.corp.example/hub/library/nginx:1.27"
    );
    let rules_in_force = || harness.metric("image_rewriter_config_rules", ("", ""));
    assert_eq!(rules_in_force().await, 2.0);
    reload("rules: []\n".to_owned(), "success", 3.0).await;
    assert_eq!(first_image().await, "nginx:1.27");
    assert_eq!(rules_in_force().await, 0.0);
    harness.stop().await;
}

#[tokio::test]
async fn an_empty_config_file_at_startup_rewrites_nothing_and_is_ready() {
    let harness = Harness::start("").await;
    let client = harness.client(true);
    let readyz = client.get(harness.url("/readyz")).send().await.unwrap();
    assert_eq!(readyz.status(), 200, "a fresh, empty ConfigMap is a config");
    let review = sample_review();
    let body = harness.answer(&client, &review).await;
    assert_eq!(check_response(&review, &body), None, "no rules, no patch");
    assert_eq!(
        harness
            .metric("image_rewriter_config_rules", ("", ""))
            .await,
        0.0
    );
    harness.stop().await;
}

fn peer_certificate(response: &reqwest::Response) -> Vec<u8> {
    response
        .extensions()
        .get::<reqwest::tls::TlsInfo>()
        .and_then(|info| info.peer_certificate().map(<[u8]>::to_vec))
        .expect("TLS info")
}

#[tokio::test]
async fn certificate_rotation_under_live_traffic_fails_no_request() {
    // The kept connection below idles through the rotation, which a loaded
    // machine may stretch past the harness's 5 s, after which hyper closes
    // an idle HTTP/1.1 connection.
    let harness = Arc::new(
        Harness::start_with(CONFIG, |options| {
            options.header_read_timeout = Duration::from_secs(120);
        })
        .await,
    );
    let first = peer_certificate(&harness.healthz_on_new_connection(true).await);

    // Keep-alive clients and a new connection per request, all through the rotation.
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let answered: Arc<[AtomicUsize; 4]> = Arc::new(Default::default());
    let mut workers = Vec::new();
    for worker in 0..4 {
        let harness = harness.clone();
        let stop = stop.clone();
        let answered = answered.clone();
        workers.push(tokio::spawn(async move {
            let kept_alive = harness.client(worker % 2 == 0);
            while !stop.load(Ordering::Relaxed) {
                let client = if worker >= 2 {
                    harness.client(true)
                } else {
                    kept_alive.clone()
                };
                let review = sample_review();
                let body = harness.answer(&client, &review).await;
                assert!(check_response(&review, &body).is_some());
                answered[worker].fetch_add(1, Ordering::Relaxed);
            }
        }));
    }

    // One HTTP/1.1 connection that may not be replaced, as reqwest would
    // replace a closed one: the rotation drops no connection.
    let (mut one_connection, connection) = hyper::client::conn::http1::handshake(
        hyper_util::rt::TokioIo::new(http1_connection(&harness).await),
    )
    .await
    .unwrap();
    let one_connection_driver = tokio::spawn(connection);
    review_on(&mut one_connection).await;

    let (cert, key) = harness.pki.serving_pair();
    tokio::time::sleep(Duration::from_millis(200)).await;
    harness.swap_certificate(&cert, &key, "success", 2.0).await;
    // Every worker gets answers after the rotation too: counted, not
    // timed, as a loaded machine may answer few in a fixed while.
    let at_rotation: Vec<usize> = answered.iter().map(|n| n.load(Ordering::Relaxed)).collect();
    let deadline = Instant::now() + Duration::from_secs(30);
    // A worker that ended has failed: its await below says how.
    while !workers.iter().any(|worker| worker.is_finished())
        && answered
            .iter()
            .zip(&at_rotation)
            .any(|(now, then)| now.load(Ordering::Relaxed) < then + 3)
    {
        assert!(
            Instant::now() < deadline,
            "answers after the rotation, by worker: {answered:?}, at it: {at_rotation:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    review_on(&mut one_connection).await;
    stop.store(true, Ordering::Relaxed);
    for worker in workers {
        worker.await.expect("no request failed");
    }
    drop(one_connection);
    one_connection_driver.await.unwrap().unwrap();

    let second = peer_certificate(&harness.healthz_on_new_connection(true).await);
    assert_ne!(first, second, "new connections get the new certificate");
    let pair_in_force = || {
        harness.metric(
            "image_rewriter_certificate_last_reload_successful",
            ("", ""),
        )
    };
    assert_eq!(pair_in_force().await, 1.0);

    // A key that does not match its certificate is refused; the last good pair serves on.
    let (other_cert, _) = harness.pki.serving_pair();
    harness
        .swap_certificate(&other_cert, &key, "failure", 1.0)
        .await;
    let third = peer_certificate(&harness.healthz_on_new_connection(true).await);
    assert_eq!(second, third);
    assert_eq!(
        pair_in_force().await,
        0.0,
        "the files as they are were refused"
    );
    match Arc::try_unwrap(harness) {
        Ok(harness) => harness.stop().await,
        Err(_) => panic!("workers still hold the harness"),
    }
}

/// In a pod whose API configuration did not load, every admission that
/// gives a pod a pull secret says it is unchecked, and counts a sync error
/// (what the shipped alert watches); a dry run is told the same, as it
/// shows what the request would get, but counts nothing. With the sync
/// turned off the secrets are someone else's.
#[tokio::test]
async fn without_api_access_in_a_pod_each_pull_secret_given_is_a_warning() {
    for (config, warned) in [
        (CONFIG.to_owned(), true),
        (
            format!("{CONFIG}pullSecretSync:\n  enabled: false\n"),
            false,
        ),
    ] {
        let harness = Harness::start(&config).await;
        harness
            .server
            .as_ref()
            .unwrap()
            .state
            .mark_api_missing_in_pod();
        let client = harness.client(true);
        let review = sample_review();
        let body = harness.answer(&client, &review).await;
        check_response(&review, &body).expect("a patch");
        let warnings = common::warnings_of(&body);
        let unchecked =
            |w: &String| w.contains("\"harbor-pull\"") && w.contains("no Kubernetes API access");
        assert_eq!(
            warnings.iter().filter(|w| unchecked(w)).count(),
            usize::from(warned),
            "{config}: {warnings:?}"
        );

        let mut dry_run = sample_review();
        dry_run["request"]["dryRun"] = json!(true);
        let body = harness.answer(&client, &dry_run).await;
        assert_eq!(
            common::warnings_of(&body)
                .iter()
                .filter(|w| unchecked(w))
                .count(),
            usize::from(warned),
            "{config}: dry run"
        );
        assert_eq!(
            harness
                .metric("image_rewriter_pull_secret_sync_errors_total", ("", ""))
                .await,
            if warned { 1.0 } else { 0.0 },
            "{config}"
        );
        harness.stop().await;
    }
}

#[tokio::test]
async fn shutdown_drains_a_slow_in_flight_request() {
    let harness = Harness::start(CONFIG).await;
    let mut stream = http1_connection(&harness).await;
    let body = serde_json::to_vec(&sample_review()).unwrap();
    let head = mutate_head(&format!("Content-Length: {}", body.len()));
    stream.write_all(head.as_bytes()).await.unwrap();
    stream.write_all(&body[..body.len() / 2]).await.unwrap();
    stream.flush().await.unwrap();
    // Let the server start on the request: it is now in flight, body pending.
    tokio::time::sleep(Duration::from_millis(200)).await;

    let server = harness.server.as_ref().unwrap();
    server.shutdown();
    tokio::time::sleep(Duration::from_millis(300)).await;
    // New connections are refused once the listener closed...
    assert!(
        tokio::net::TcpStream::connect(harness.https_addr)
            .await
            .is_err()
    );
    // ...but the request already in flight completes.
    stream.write_all(&body[body.len() / 2..]).await.unwrap();
    stream.flush().await.unwrap();
    let mut response = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut response)).await;
    let text = String::from_utf8_lossy(&response);
    assert!(text.starts_with("HTTP/1.1 200"), "got {text:?}");
    assert!(text.contains("\"patchType\":\"JSONPatch\""));
    harness.stop().await;
}

/// A connection accepted before shutdown but still in its TLS handshake (or
/// still in the listen backlog) is waited for, and once the handshake is
/// done its first request is answered (hyper's graceful shutdown alone would
/// close it unread), over HTTP/1.1 and HTTP/2; the connection is closed
/// after that.
#[tokio::test]
async fn a_connection_mid_handshake_at_shutdown_has_its_first_request_answered() {
    let harness = Harness::start(CONFIG).await;
    let connect = || tokio::net::TcpStream::connect(harness.https_addr);
    let (http1_tcp, http2_tcp) = (connect().await.unwrap(), connect().await.unwrap());
    // Most likely accepted by now, waiting for their ClientHellos.
    tokio::time::sleep(Duration::from_millis(200)).await;
    harness.server.as_ref().unwrap().shutdown();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(connect().await.is_err(), "the listener is closed");

    let handshake = |tcp, protocol: &[u8]| {
        let mut config = rustls::ClientConfig::builder()
            .with_root_certificates(root_store(&harness.pki.root_pem))
            .with_no_client_auth();
        config.alpn_protocols = vec![protocol.to_vec()];
        let name = rustls::pki_types::ServerName::try_from(SERVICE_HOST).unwrap();
        tokio_rustls::TlsConnector::from(Arc::new(config)).connect(name, tcp)
    };
    let (http1_tls, http2_tls) = tokio::join!(
        handshake(http1_tcp, b"http/1.1"),
        handshake(http2_tcp, b"h2")
    );
    let mut stream = http1_tls.expect("the handshake completes during the drain");
    let tls = http2_tls.expect("the handshake completes during the drain");
    // Each request comes a moment after its handshake, as on a busy client.
    let moment = Duration::from_millis(100);
    tokio::time::sleep(moment).await;
    let body = serde_json::to_vec(&sample_review()).unwrap();
    let head = mutate_head(&format!("Content-Length: {}", body.len()));
    stream.write_all(head.as_bytes()).await.unwrap();
    stream.write_all(&body).await.unwrap();
    stream.flush().await.unwrap();
    let mut response = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut response))
        .await
        .expect("the connection is closed after its answer")
        .ok();
    let text = String::from_utf8_lossy(&response);
    assert!(text.starts_with("HTTP/1.1 200"), "got {text:?}");
    assert!(text.contains("\"patchType\":\"JSONPatch\""), "got {text:?}");

    let (mut client, connection) = h2::client::handshake(tls).await.unwrap();
    let connection = tokio::spawn(connection);
    tokio::time::sleep(moment).await;
    healthz_over_h2(&mut client).await;
    drop(client);
    tokio::time::timeout(Duration::from_secs(5), connection)
        .await
        .expect("the connection is closed after its answer")
        .unwrap()
        .expect("closed gracefully");
    harness.stop().await;
}

/// A TLS connection that verifies like the apiserver and speaks HTTP/1.1,
/// for requests written by hand.
async fn http1_connection(
    harness: &Harness,
) -> tokio_rustls::client::TlsStream<tokio::net::TcpStream> {
    let config = rustls::ClientConfig::builder()
        .with_root_certificates(root_store(&harness.pki.root_pem))
        .with_no_client_auth();
    tls_connect(harness, config).await
}

/// A TLS connection that verifies like the apiserver and has agreed on h2
/// by ALPN, with no HTTP/2 byte sent yet.
async fn http2_tls_connection(
    harness: &Harness,
) -> tokio_rustls::client::TlsStream<tokio::net::TcpStream> {
    let config = rustls::ClientConfig::builder()
        .with_root_certificates(root_store(&harness.pki.root_pem))
        .with_no_client_auth();
    let stream = tls_connect_alpn(harness, config, b"h2").await;
    assert_eq!(stream.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    stream
}

/// `GET /healthz` on an HTTP/2 connection, answered 200.
async fn healthz_over_h2(client: &mut h2::client::SendRequest<bytes::Bytes>) {
    let request = axum::http::Request::get(format!("https://{SERVICE_HOST}/healthz"))
        .body(())
        .unwrap();
    let (response, _) = client.send_request(request, true).unwrap();
    let response = response.await.unwrap();
    assert_eq!(response.status(), 200);
}

/// How long after `since` the server closed `stream` (read to its end, at
/// most 5 s).
async fn closed_after(
    stream: &mut (impl tokio::io::AsyncRead + Unpin),
    since: Instant,
) -> Duration {
    let mut buffer = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut buffer)).await;
    since.elapsed()
}

/// The head of a `/mutate` request with the body framed by `framing`
/// (a `Content-Length` or `Transfer-Encoding` header).
fn mutate_head(framing: &str) -> String {
    format!(
        "POST /mutate?timeout=10s HTTP/1.1\r\nHost: {SERVICE_HOST}\r\n\
         Content-Type: application/json\r\n{framing}\r\n\r\n"
    )
}

#[tokio::test]
async fn a_client_that_never_finishes_its_headers_is_cut_off() {
    let harness = Harness::start_with(CONFIG, |options| {
        options.header_read_timeout = Duration::from_millis(300);
    })
    .await;
    let mut stream = http1_connection(&harness).await;
    stream
        .write_all(b"POST /mutate HTTP/1.1\r\nHost: x\r\n")
        .await
        .unwrap();
    let kept = closed_after(&mut stream, Instant::now()).await;
    assert!(
        kept < Duration::from_secs(3),
        "slow client kept for {kept:?}"
    );
    harness.stop().await;
}

/// Clients that announce bodies of the whole limit (by Content-Length or
/// chunked) and then stall reserve nothing: a review sent meanwhile is
/// answered at once, not after the body timeout.
#[tokio::test]
async fn bodies_announced_but_not_sent_never_delay_a_review() {
    let harness = Harness::start_with(CONFIG, |options| {
        options.body_read_timeout = Duration::from_secs(30);
    })
    .await;
    let mut stalled = Vec::new();
    for framing in [
        format!("Content-Length: {DEFAULT_BODY_LIMIT}"),
        format!("Content-Length: {DEFAULT_BODY_LIMIT}"),
        "Transfer-Encoding: chunked".to_string(),
        "Transfer-Encoding: chunked".to_string(),
    ] {
        let mut stream = http1_connection(&harness).await;
        let first_bytes = if framing.starts_with("Transfer") {
            "1\r\n{\r\n"
        } else {
            "{"
        };
        let request = mutate_head(&framing) + first_bytes;
        stream.write_all(request.as_bytes()).await.unwrap();
        stream.flush().await.unwrap();
        stalled.push(stream);
    }
    // Let the server read every stalled body's first bytes.
    tokio::time::sleep(Duration::from_millis(200)).await;

    let client = harness.client(true);
    let started = Instant::now();
    let review = sample_review();
    let response = harness.post_review(&client, &review).await;
    assert_eq!(response.status(), 200);
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "a review waited {:?} behind bodies never sent",
        started.elapsed()
    );
    drop(stalled);
    harness.stop().await;
}

/// With the body budget taken (two clients each sent more than the free
/// part of an 8 MiB body, then stalled), large reviews on the apiserver's
/// HTTP/2 connection wait for budget; a small review on the same
/// connection must still get through, not wait behind their unread data in
/// the connection's flow-control window (with hyper's default windows, 1 MiB
/// a stream and a connection, it did: the reqwest timeout, 10 s).
#[tokio::test]
async fn large_reviews_waiting_for_budget_do_not_stall_their_http2_connection() {
    let harness = Harness::start_with(CONFIG, |options| {
        options.body_read_timeout = Duration::from_secs(30);
    })
    .await;
    let stalled = take_the_body_budget(&harness).await;

    let client = harness.client(false);
    let warm = client.get(harness.url("/healthz")).send().await.unwrap();
    assert_eq!(warm.version(), reqwest::Version::HTTP_2);
    let large = large_review();
    let large_reviews: Vec<_> = (0..3)
        .map(|_| {
            let client = client.clone();
            let url = harness.url("/mutate?timeout=10s");
            let body = serde_json::to_vec(&large).unwrap();
            tokio::spawn(async move {
                client
                    .post(url)
                    .header("Content-Type", "application/json")
                    .timeout(Duration::from_secs(60))
                    .body(body)
                    .send()
                    .await
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(300)).await;

    let started = Instant::now();
    let response = harness.post_review(&client, &sample_review()).await;
    assert_eq!(response.version(), reqwest::Version::HTTP_2);
    assert_eq!(response.status(), 200);
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "the small review waited {:?}",
        started.elapsed()
    );
    assert!(
        large_reviews.iter().all(|review| !review.is_finished()),
        "the large reviews did not wait for budget"
    );
    drop(stalled);
    for review in large_reviews {
        assert_eq!(review.await.unwrap().unwrap().status(), 200);
    }
    harness.stop().await;
}

/// Two HTTP/1.1 clients that each sent more than the free part of an 8 MiB
/// body and stalled: the body budget is taken until they are dropped.
async fn take_the_body_budget(harness: &Harness) -> Vec<impl Sized> {
    let mut stalled = Vec::new();
    for _ in 0..2 {
        let mut stream = http1_connection(harness).await;
        let head = mutate_head(&format!("Content-Length: {DEFAULT_BODY_LIMIT}")) + "{";
        stream.write_all(head.as_bytes()).await.unwrap();
        stream.write_all(&vec![b' '; 128 * 1024]).await.unwrap();
        stream.flush().await.unwrap();
        stalled.push(stream);
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    stalled
}

/// A review past the free part of the body budget: it must reserve some.
fn large_review() -> Value {
    let mut large = sample_review();
    large["request"]["object"]["metadata"]["annotations"]["big"] =
        json!("x".repeat(2 * 1024 * 1024));
    large
}

/// `admission_requests_total{result}` and the number of reviews timed by
/// `admission_duration_seconds`.
async fn requests_and_timed(harness: &Harness, result: &str) -> (f64, f64) {
    let scrape = harness.metrics().await;
    let requests = metric(
        &scrape,
        "image_rewriter_admission_requests_total",
        ("result", result),
    );
    let timed = scrape
        .samples
        .iter()
        .filter(|s| s.metric == "image_rewriter_admission_duration_seconds")
        .map(|s| match &s.value {
            prometheus_parse::Value::Histogram(buckets) => buckets
                .iter()
                .map(|bucket| bucket.count)
                .fold(0.0, f64::max),
            _ => 0.0,
        })
        .sum();
    (requests, timed)
}

/// On the apiserver's HTTP/2 connection, a review whose body is partly sent
/// (`sent` bytes of a `declared` one), its stream left open.
async fn partial_review_over_h2(
    client: &mut h2::client::SendRequest<bytes::Bytes>,
    query: &str,
    declared: usize,
    sent: usize,
) -> h2::SendStream<bytes::Bytes> {
    let request = axum::http::Request::post(format!("https://{SERVICE_HOST}/mutate?{query}"))
        .header("content-type", "application/json")
        .header("content-length", declared)
        .body(())
        .unwrap();
    let (_response, mut stream) = client.send_request(request, false).unwrap();
    let mut body = vec![b' '; sent];
    body[0] = b'{';
    stream.reserve_capacity(sent);
    stream.send_data(bytes::Bytes::from(body), false).unwrap();
    stream
}

/// Waiting for body budget ends in time for the apiserver to read the 503:
/// by its `?timeout=` less the answer's reserve (1.5 s), not at the body
/// read timeout (30 s here), long after it gave up.
#[tokio::test]
async fn a_review_waiting_for_budget_is_answered_before_the_apiserver_gives_up() {
    let harness = Harness::start_with(CONFIG, |options| {
        options.body_read_timeout = Duration::from_secs(30);
    })
    .await;
    let stalled = take_the_body_budget(&harness).await;

    let large = large_review();
    let client = harness.client(false);
    let started = Instant::now();
    let response = client
        .post(harness.url("/mutate?timeout=3s"))
        .header("Content-Type", "application/json")
        .timeout(Duration::from_secs(20))
        .body(serde_json::to_vec(&large).unwrap())
        .send()
        .await
        .unwrap();
    let waited = started.elapsed();
    assert_eq!(response.status(), 503);
    assert!(
        waited >= Duration::from_millis(1200) && waited < Duration::from_millis(2900),
        "answered after {waited:?}: the apiserver (timeout 3 s) must read it, and the \
         wait must last until 1.5 s"
    );
    assert_eq!(requests_and_timed(&harness, "overloaded").await.0, 1.0);
    drop(stalled);
    harness.stop().await;
}

/// A review its client gives up on is on record all the same: reset while
/// it waits for body budget (hyper drops the handler), it counts as
/// `overloaded`, what the alert watches; reset, closed or dropped mid-body
/// (over either protocol), as `cancelled`, not as a malformed request. Each
/// one is timed.
#[tokio::test]
async fn reviews_the_client_gave_up_on_are_counted_and_timed() {
    let harness = Harness::start_with(CONFIG, |options| {
        options.body_read_timeout = Duration::from_secs(30);
    })
    .await;
    let tls = http2_tls_connection(&harness).await;
    let (mut client, connection) = h2::client::handshake(tls).await.unwrap();
    let connection = tokio::spawn(connection);
    healthz_over_h2(&mut client).await;

    // Reset while waiting for budget.
    let stalled = take_the_body_budget(&harness).await;
    let mut waiting =
        partial_review_over_h2(&mut client, "timeout=30s", 2 * 1024 * 1024, 256 * 1024).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        requests_and_timed(&harness, "overloaded").await,
        (0.0, 0.0),
        "the review was answered instead of waiting for budget"
    );
    waiting.send_reset(h2::Reason::CANCEL);
    assert_eq!(
        eventually_moved(&harness, "overloaded", 0.0).await,
        (1.0, 1.0),
        "(overloaded, timed) once the waiting review was reset"
    );

    // The two stalled HTTP/1.1 bodies, their connections dropped.
    drop(stalled);
    let mut cancelled = 0.0;
    while cancelled < 2.0 {
        let moved = eventually_moved(&harness, "cancelled", cancelled).await.0;
        assert!(
            moved > cancelled,
            "the dropped connections were not counted"
        );
        cancelled = moved;
    }
    assert_eq!(requests_and_timed(&harness, "cancelled").await, (2.0, 3.0));

    // Reset mid-body, nothing to wait for.
    let mut half_sent = partial_review_over_h2(&mut client, "timeout=30s", 4096, 1024).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    half_sent.send_reset(h2::Reason::CANCEL);
    assert_eq!(
        eventually_moved(&harness, "cancelled", 2.0).await,
        (3.0, 4.0)
    );

    // An HTTP/1.1 connection closed mid-body (TLS close_notify, then FIN).
    let mut stream = http1_connection(&harness).await;
    let request = mutate_head("Content-Length: 4096") + "{\"apiVersion\"";
    stream.write_all(request.as_bytes()).await.unwrap();
    stream.flush().await.unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    stream.shutdown().await.unwrap();
    assert_eq!(
        eventually_moved(&harness, "cancelled", 3.0).await,
        (4.0, 5.0)
    );

    // An HTTP/2 connection dropped mid-body: no reset, no GOAWAY.
    assert!(
        !connection.is_finished(),
        "a reset stream closed the connection"
    );
    let tls = http2_tls_connection(&harness).await;
    let (mut dropped_client, dropped_connection) = h2::client::handshake(tls).await.unwrap();
    let dropped_connection = tokio::spawn(dropped_connection);
    let _half_sent = partial_review_over_h2(&mut dropped_client, "timeout=30s", 4096, 1024).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    dropped_connection.abort();
    assert_eq!(
        eventually_moved(&harness, "cancelled", 4.0).await,
        (5.0, 6.0)
    );

    assert_eq!(
        requests_and_timed(&harness, "bad_request").await.0,
        0.0,
        "a review the client gave up on is no bad request"
    );
    harness.stop().await;
}

/// `requests_and_timed` once the count of `result` has passed `before`
/// (within 5 s).
async fn eventually_moved(harness: &Harness, result: &str, before: f64) -> (f64, f64) {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let now = requests_and_timed(harness, result).await;
        if now.0 > before || Instant::now() > deadline {
            return now;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A client that finishes the TLS handshake and then sends nothing holds no
/// connection slot for long, over either protocol ALPN can choose (hyper
/// waits for an HTTP/2 client's preface without a timer of its own): with
/// one slot, a real client still gets in.
#[tokio::test]
async fn a_silent_connection_does_not_hold_a_slot_forever() {
    let harness = Harness::start_with(CONFIG, |options| {
        options.header_read_timeout = Duration::from_millis(300);
        options.max_connections = 1;
    })
    .await;
    for (protocol, version) in [
        (&b"http/1.1"[..], reqwest::Version::HTTP_11),
        (&b"h2"[..], reqwest::Version::HTTP_2),
    ] {
        let config = rustls::ClientConfig::builder()
            .with_root_certificates(root_store(&harness.pki.root_pem))
            .with_no_client_auth();
        let mut silent = tls_connect_alpn(&harness, config, protocol).await;
        assert_eq!(silent.get_ref().1.alpn_protocol(), Some(protocol));
        let kept = closed_after(&mut silent, Instant::now()).await;
        assert!(
            kept < Duration::from_secs(3),
            "a silent {version:?} connection was kept for {kept:?}"
        );
        let response = harness
            .healthz_on_new_connection(version == reqwest::Version::HTTP_11)
            .await;
        assert_eq!(response.version(), version);
        assert_eq!(response.status(), 200);
    }
    harness.stop().await;
}

/// The server's side of an established connection to `port`, from the
/// kernel's table: (timer kind, seconds until it fires). Timer kind 2 is the
/// keepalive timer (`proc(5)`, /proc/net/tcp).
fn server_socket_timers(port: u16) -> Vec<(u8, f64)> {
    let table = std::fs::read_to_string("/proc/net/tcp").unwrap_or_default();
    table
        .lines()
        .skip(1)
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let local_port = u16::from_str_radix(fields.get(1)?.rsplit_once(':')?.1, 16).ok()?;
            let established = *fields.get(3)? == "01";
            let (kind, when) = fields.get(5)?.split_once(':')?;
            let ticks = u64::from_str_radix(when, 16).ok()?;
            (local_port == port && established)
                .then(|| Some((u8::from_str_radix(kind, 16).ok()?, ticks as f64 / 100.0)))
                .flatten()
        })
        .collect()
}

/// A peer that disappears without closing (a node lost) is found by TCP
/// keepalive on every connection, HTTP/1.1 and HTTP/2 alike: the server's
/// socket has the keepalive timer armed at 30 s while idle.
#[tokio::test]
async fn idle_connections_are_probed_by_tcp_keepalive() {
    let harness = Harness::start(CONFIG).await;
    for http1_only in [true, false] {
        let client = harness.client(http1_only);
        let response = client.get(harness.url("/healthz")).send().await.unwrap();
        assert_eq!(response.status(), 200);
        let expected = if http1_only {
            reqwest::Version::HTTP_11
        } else {
            reqwest::Version::HTTP_2
        };
        assert_eq!(response.version(), expected);
        let _ = response.bytes().await.unwrap();
        tokio::time::sleep(Duration::from_millis(200)).await;
        let timers = server_socket_timers(harness.https_addr.port());
        let [(kind, seconds)] = timers[..] else {
            panic!("one established server socket expected, found {timers:?}");
        };
        assert_eq!(kind, 2, "keepalive timer armed (http1_only: {http1_only})");
        assert!(
            (25.0..=30.0).contains(&seconds),
            "first probe in {seconds} s, expected ~30 s"
        );
        drop(client);
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    harness.stop().await;
}

/// An HTTP/2 connection is kept while it has requests, however long, and
/// closed gracefully (GOAWAY, no error) once it has had none for the header
/// read timeout, as hyper closes an idle HTTP/1.1 keep-alive connection.
#[tokio::test]
async fn an_idle_http2_connection_is_closed_gracefully_and_a_busy_one_kept() {
    // Long enough that a loaded machine pausing the test for most of a
    // period between two requests (a tenth of one apart) is out of reach.
    let idle = Duration::from_secs(1);
    let harness = Harness::start_with(CONFIG, |options| {
        options.header_read_timeout = idle;
    })
    .await;
    let tls = http2_tls_connection(&harness).await;
    let (mut client, connection) = h2::client::handshake(tls).await.unwrap();
    let connection = tokio::spawn(connection);

    // Busy for three idle periods: a request every tenth of one.
    let busy_since = Instant::now();
    let last_answer = loop {
        healthz_over_h2(&mut client).await;
        let answered = Instant::now();
        if busy_since.elapsed() >= idle * 3 {
            break answered;
        }
        tokio::time::sleep(idle / 10).await;
    };
    assert!(!connection.is_finished(), "closed while busy");

    let closed = tokio::time::timeout(Duration::from_secs(5), connection).await;
    let closed_after = last_answer.elapsed();
    let closed = closed
        .expect("an idle HTTP/2 connection stayed open")
        .unwrap();
    assert!(closed.is_ok(), "closed with an error: {closed:?}");
    // The server's idle bound starts when the handler is done, a little
    // before the client has the answer.
    assert!(
        closed_after >= idle / 2,
        "closed {closed_after:?} after its last answer, well before the idle bound {idle:?}"
    );
    harness.stop().await;
}

/// The metrics listener has the webhook listener's header timeout: a
/// client that connects and sends nothing, or sends half a request head, is
/// cut off, and scrapes still work meanwhile.
#[tokio::test]
async fn a_silent_metrics_connection_is_cut_off() {
    let harness = Harness::start_with(CONFIG, |options| {
        options.header_read_timeout = Duration::from_millis(300);
    })
    .await;
    let silent = tokio::net::TcpStream::connect(harness.metrics_addr)
        .await
        .unwrap();
    let mut half_head = tokio::net::TcpStream::connect(harness.metrics_addr)
        .await
        .unwrap();
    half_head
        .write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n")
        .await
        .unwrap();
    let started = Instant::now();
    for mut stream in [silent, half_head] {
        let kept = closed_after(&mut stream, started).await;
        assert!(
            kept < Duration::from_secs(3),
            "a silent metrics connection was kept for {kept:?}"
        );
    }
    assert!(!harness.metrics().await.samples.is_empty());
    harness.stop().await;
}

/// A transport that stops reading, for good, once it has read `limit`
/// bytes: a peer that no longer reads its socket.
struct StopsReading<T> {
    io: T,
    read: usize,
    limit: usize,
}

impl<T: tokio::io::AsyncRead + Unpin> tokio::io::AsyncRead for StopsReading<T> {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        if self.read >= self.limit {
            return std::task::Poll::Pending;
        }
        let before = buf.filled().len();
        let polled = std::pin::Pin::new(&mut self.io).poll_read(cx, buf);
        self.read += buf.filled().len() - before;
        polled
    }
}

impl<T: tokio::io::AsyncWrite + Unpin> tokio::io::AsyncWrite for StopsReading<T> {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

/// An HTTP/2 peer that stops reading while large answers are due: its
/// connection is closed for idleness and given the finish grace (1 s
/// here), and then its slot (the only one) is free again, rather than
/// held until the kernel gives up on the socket (about a minute).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_h2_peer_that_stops_reading_gives_its_slot_back_after_the_grace() {
    let harness = Harness::start_with(CONFIG, |options| {
        options.header_read_timeout = Duration::from_secs(1);
        options.shutdown_grace = Duration::from_secs(1);
        options.max_connections = 1;
    })
    .await;
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let tcp = socket.connect(harness.https_addr).await.unwrap();
    let mut config = rustls::ClientConfig::builder()
        .with_root_certificates(root_store(&harness.pki.root_pem))
        .with_no_client_auth();
    config.alpn_protocols = vec![b"h2".to_vec()];
    let name = rustls::pki_types::ServerName::try_from(SERVICE_HOST).unwrap();
    let tls = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(name, tcp)
        .await
        .unwrap();
    let stalled = StopsReading {
        io: tls,
        read: 0,
        limit: 64 * 1024,
    };
    let (mut client, connection) = h2::client::Builder::new()
        .initial_window_size(1 << 30)
        .initial_connection_window_size(1 << 30)
        .handshake(stalled)
        .await
        .unwrap();
    tokio::spawn(connection);
    // About 2.5 MB of long image names: each answer is several MB.
    let image = format!("docker.io/team/{}:v1", "a".repeat(200));
    let mut object = pod("team-a", &[], &[("c", "nginx")], None);
    object["spec"]["containers"] = (0..10_000)
        .map(|i| json!({"name": format!("c{i}"), "image": image}))
        .collect();
    let body = bytes::Bytes::from(
        serde_json::to_vec(&admission_review(object, "CREATE", "team-a")).unwrap(),
    );
    let mut streams = Vec::new();
    for _ in 0..3 {
        let request =
            axum::http::Request::post(format!("https://{SERVICE_HOST}/mutate?timeout=10s"))
                .header("content-type", "application/json")
                .header("content-length", body.len())
                .body(())
                .unwrap();
        let (response, mut stream) = client.send_request(request, false).unwrap();
        stream.reserve_capacity(body.len());
        stream.send_data(body.clone(), true).unwrap();
        streams.push((response, stream));
    }
    // The answers fill the socket buffers; the peer reads no more.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let stalled_at = Instant::now();
    loop {
        let answered = tokio::time::timeout(
            Duration::from_secs(2),
            harness.client(false).get(harness.url("/healthz")).send(),
        )
        .await;
        if let Ok(Ok(response)) = answered {
            assert_eq!(response.status(), 200);
            break;
        }
        assert!(
            stalled_at.elapsed() < Duration::from_secs(120),
            "the slot was never given back"
        );
    }
    let waited = stalled_at.elapsed();
    assert!(
        waited < Duration::from_secs(10),
        "the stalled connection held the only slot {waited:?} more"
    );
    drop(streams);
    harness.stop().await;
}
