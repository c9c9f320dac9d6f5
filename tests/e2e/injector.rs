//! A tiny sidecar-injecting mutating webhook, served in-process over TLS on
//! 127.0.0.1 (axum + hyper-util + tokio-rustls): it adds the container
//! `istio-proxy` (`istio/proxyv2:1.22.0`) to every pod that lacks it, like
//! Istio's injector. Idempotent, so a reinvocation adds nothing.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use axum::Json;
use axum::Router;
use axum::extract::State;
use axum::routing::post;
use base64::Engine as _;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::service::TowerToHyperService;
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use serde_json::{Value, json};
use tokio::net::TcpListener;

pub const SIDECAR_NAME: &str = "istio-proxy";
pub const SIDECAR_IMAGE: &str = "istio/proxyv2:1.22.0";

pub struct Injector {
    pub addr: SocketAddr,
    /// AdmissionReviews received.
    pub calls: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl Injector {
    pub async fn start(cert_pem: &str, key_pem: &str) -> Injector {
        crate::harness::install_crypto_provider();
        let certs: Vec<CertificateDer<'static>> =
            CertificateDer::pem_slice_iter(cert_pem.as_bytes())
                .collect::<Result<_, _>>()
                .expect("certificate PEM");
        let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes()).expect("key PEM");
        let mut config = rustls::ServerConfig::builder()
            .with_no_client_auth()
            .with_single_cert(certs, key)
            .expect("TLS config");
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let calls = Arc::new(AtomicUsize::new(0));
        let app = Router::new()
            .route("/inject", post(inject))
            .with_state(calls.clone());
        let task = tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    continue;
                };
                let acceptor = acceptor.clone();
                let app = app.clone();
                tokio::spawn(async move {
                    let Ok(tls) = acceptor.accept(tcp).await else {
                        return;
                    };
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(tls), TowerToHyperService::new(app))
                        .await;
                });
            }
        });
        Injector { addr, calls, task }
    }

    pub fn url(&self) -> String {
        format!("https://127.0.0.1:{}/inject", self.addr.port())
    }
}

impl Drop for Injector {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn inject(State(calls): State<Arc<AtomicUsize>>, Json(review): Json<Value>) -> Json<Value> {
    calls.fetch_add(1, Ordering::SeqCst);
    let request = &review["request"];
    let uid = request["uid"].clone();
    let has_sidecar = request["object"]["spec"]["containers"]
        .as_array()
        .into_iter()
        .flatten()
        .any(|c| c["name"] == SIDECAR_NAME);
    let mut response = json!({ "uid": uid, "allowed": true });
    if !has_sidecar {
        let patch = json!([{
            "op": "add",
            "path": "/spec/containers/-",
            "value": {
                "name": SIDECAR_NAME,
                "image": SIDECAR_IMAGE,
                "securityContext": {
                    "allowPrivilegeEscalation": false,
                    "capabilities": { "drop": ["ALL"] },
                },
            },
        }]);
        response["patchType"] = json!("JSONPatch");
        response["patch"] =
            json!(base64::engine::general_purpose::STANDARD.encode(patch.to_string()));
    }
    Json(json!({
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "response": response,
    }))
}

/// The injector's MutatingWebhookConfiguration. Webhook configurations are
/// called in the order of their names, so `sidecar-injector` runs after
/// `image-rewriter`: the sidecar appears after our first call, and only the
/// shipped `reinvocationPolicy: IfNeeded` gets it rewritten.
pub fn configuration(url: &str, ca_pem: &str, namespace_label: (&str, &str)) -> Value {
    json!({
        "apiVersion": "admissionregistration.k8s.io/v1",
        "kind": "MutatingWebhookConfiguration",
        "metadata": { "name": "sidecar-injector" },
        "webhooks": [{
            "name": "sidecar-injector.e2e.example",
            "admissionReviewVersions": ["v1"],
            "sideEffects": "None",
            // Fail: a broken injector must fail the test loudly, not be skipped.
            "failurePolicy": "Fail",
            "timeoutSeconds": 5,
            "reinvocationPolicy": "IfNeeded",
            "rules": [{
                "operations": ["CREATE"],
                "apiGroups": [""],
                "apiVersions": ["v1"],
                "resources": ["pods"],
                "scope": "Namespaced",
            }],
            "namespaceSelector": { "matchLabels": { (namespace_label.0): namespace_label.1 } },
            "clientConfig": {
                "url": url,
                "caBundle": base64::engine::general_purpose::STANDARD.encode(ca_pem.as_bytes()),
            },
        }],
    })
}
