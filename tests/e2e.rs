//! End-to-end tests against a real kube-apiserver + etcd (see tests/e2e/harness.rs).
//!
//! Needs the control plane binaries (kube-apiserver, etcd, kubectl): run
//! `tests/control-plane/build.sh` once (Go required; 5-10 minutes cold).
//! Without them these tests fail, they never skip.
//!
//! Each scenario starts its own control plane (about 3 s), applies a shipped
//! overlay with the control plane's own kubectl and runs `image-rewriter
//! serve` as a separate process under the webhook ServiceAccount's identity
//! (see tests/e2e/env.rs). The webhook configurations only ever call
//! `https://127.0.0.1:PORT`: nothing here makes the apiserver dial off the
//! machine.
//!
//! `apiserver_pod_creation_benchmark` is `#[ignore]`d: run it with
//! `cargo test --release --test e2e -- --ignored --nocapture apiserver_pod_creation_benchmark`.

#[path = "e2e/harness.rs"]
mod harness;

#[path = "e2e/env.rs"]
mod env;

#[path = "e2e/injector.rs"]
mod injector;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use env::{
    ENABLED_LABEL, Env, MANAGED_BY, ORIGINAL_IMAGES, Overlay, PROBE_NAMESPACE, PULL_SECRET,
    SOURCE_ANNOTATION, WEBHOOK_NAME, assert_untouched, container_images, eventually,
    original_images, pod, pull_secret_names, secret_data,
};
use harness::{ControlPlane, Identity, WEBHOOK_NAMESPACE, WEBHOOK_SERVICE_ACCOUNT};
use k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration;
use k8s_openapi::api::authentication::v1::SelfSubjectReview;
use k8s_openapi::api::core::v1::{Namespace, Pod, Secret, ServiceAccount};
use k8s_openapi::api::rbac::v1::{PolicyRule, Role, RoleBinding, RoleRef, Subject};
use kube::api::{Api, DeleteParams, ListParams, ObjectMeta, Patch, PatchParams, PostParams};
use serde_json::{Value, json};

fn is_forbidden<T: std::fmt::Debug>(result: &Result<T, kube::Error>) -> bool {
    matches!(result, Err(kube::Error::Api(status)) if status.is_forbidden())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn control_plane_starts_and_serves_rbac() {
    let cp = ControlPlane::start().await;
    println!(
        "kube-apiserver version: {} ({})",
        cp.version(),
        cp.base_url()
    );
    assert!(
        cp.version().starts_with("v1."),
        "unexpected /version gitVersion {:?}",
        cp.version()
    );

    let admin = cp.admin_client();
    let webhook = cp.webhook_identity_client();

    // The static tokens map to the identities we expect.
    for (identity, client) in [(Identity::Admin, &admin), (Identity::Webhook, &webhook)] {
        let review = Api::<SelfSubjectReview>::all(client.clone())
            .create(&PostParams::default(), &SelfSubjectReview::default())
            .await
            .unwrap_or_else(|err| panic!("SelfSubjectReview as {identity:?}: {err}"));
        let user = review
            .status
            .and_then(|s| s.user_info)
            .expect("SelfSubjectReview has userInfo");
        assert_eq!(
            user.username.as_deref(),
            Some(identity.user_name().as_str())
        );
        let groups = user.groups.unwrap_or_default();
        for group in identity.groups() {
            assert!(
                groups.contains(&group),
                "{identity:?} lacks group {group}: {groups:?}"
            );
        }
    }

    // The admin creates the webhook's namespace and what a controller-manager would.
    let namespaces: Api<Namespace> = Api::all(admin.clone());
    namespaces
        .create(
            &PostParams::default(),
            &Namespace {
                metadata: ObjectMeta {
                    name: Some(WEBHOOK_NAMESPACE.into()),
                    ..Default::default()
                },
                ..Default::default()
            },
        )
        .await
        .expect("admin creates a namespace");
    cp.ensure_default_service_account(WEBHOOK_NAMESPACE)
        .await
        .expect("default ServiceAccount");
    cp.ensure_default_service_account(WEBHOOK_NAMESPACE)
        .await
        .expect("idempotent");
    Api::<ServiceAccount>::namespaced(admin.clone(), WEBHOOK_NAMESPACE)
        .get("default")
        .await
        .expect("default ServiceAccount exists");

    // RBAC is enforced: the webhook identity has no grants yet.
    let admin_secrets = Api::<Secret>::all(admin.clone())
        .list(&ListParams::default())
        .await;
    assert!(
        admin_secrets.is_ok(),
        "admin must list secrets cluster-wide: {admin_secrets:?}"
    );
    let webhook_secrets = Api::<Secret>::all(webhook.clone())
        .list(&ListParams::default())
        .await;
    assert!(
        is_forbidden(&webhook_secrets),
        "the webhook identity must be FORBIDDEN to list secrets cluster-wide, got {webhook_secrets:?}"
    );

    // ...and grants take effect: allow listing secrets in its own namespace only.
    let role = Role {
        metadata: ObjectMeta {
            name: Some("read-secrets".into()),
            ..Default::default()
        },
        rules: Some(vec![PolicyRule {
            api_groups: Some(vec!["".into()]),
            resources: Some(vec!["secrets".into()]),
            verbs: vec!["list".into()],
            ..Default::default()
        }]),
    };
    Api::<Role>::namespaced(admin.clone(), WEBHOOK_NAMESPACE)
        .create(&PostParams::default(), &role)
        .await
        .expect("create Role");
    let binding = RoleBinding {
        metadata: ObjectMeta {
            name: Some("read-secrets".into()),
            ..Default::default()
        },
        role_ref: RoleRef {
            api_group: "rbac.authorization.k8s.io".into(),
            kind: "Role".into(),
            name: "read-secrets".into(),
        },
        subjects: Some(vec![Subject {
            kind: "ServiceAccount".into(),
            name: WEBHOOK_SERVICE_ACCOUNT.into(),
            namespace: Some(WEBHOOK_NAMESPACE.into()),
            ..Default::default()
        }]),
    };
    Api::<RoleBinding>::namespaced(admin.clone(), WEBHOOK_NAMESPACE)
        .create(&PostParams::default(), &binding)
        .await
        .expect("create RoleBinding");
    let in_namespace = Api::<Secret>::namespaced(webhook.clone(), WEBHOOK_NAMESPACE);
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        // The authorizer's informer cache catches up with the new binding quickly.
        match in_namespace.list(&ListParams::default()).await {
            Ok(_) => break,
            Err(_) if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(err) => panic!("the RoleBinding did not take effect: {err}"),
        }
    }
    let still_cluster_wide = Api::<Secret>::all(webhook.clone())
        .list(&ListParams::default())
        .await;
    assert!(
        is_forbidden(&still_cluster_wide),
        "cluster-wide must stay forbidden: {still_cluster_wide:?}"
    );

    // A kubeconfig written for a separate process works too.
    let kubeconfig_path = cp.dir().join("webhook.kubeconfig");
    cp.write_kubeconfig(&kubeconfig_path, Identity::Webhook)
        .expect("write kubeconfig");
    let kubeconfig =
        kube::config::Kubeconfig::read_from(&kubeconfig_path).expect("read kubeconfig back");
    let config = kube::Config::from_custom_kubeconfig(
        kubeconfig,
        &kube::config::KubeConfigOptions::default(),
    )
    .await
    .expect("kubeconfig loads");
    let from_file = kube::Client::try_from(config).expect("client from kubeconfig");
    Api::<Secret>::namespaced(from_file, WEBHOOK_NAMESPACE)
        .list(&ListParams::default())
        .await
        .expect("the kubeconfig authenticates as the webhook identity");
}

// ---------------------------------------------------------------------------
// The webhook behind the shipped manifests

const REWRITTEN: [(&str, &str, &str); 3] = [
    (
        "init-setup",
        "busybox:1.36",
        "harbor.corp.example/dockerhub/library/busybox:1.36",
    ),
    (
        "app",
        "nginx:1.27",
        "harbor.corp.example/dockerhub/library/nginx:1.27",
    ),
    (
        "metrics",
        "quay.io/prometheus/node-exporter:v1.8.2",
        "harbor.corp.example/quay/prometheus/node-exporter:v1.8.2",
    ),
];

/// An init container, a Docker Hub and a Quay container.
fn app_pod(name: &str, labels: &[(&str, &str)]) -> Pod {
    let containers: Vec<(&str, &str)> = REWRITTEN.iter().map(|(n, i, _)| (*n, *i)).collect();
    pod(name, &containers, labels)
}

/// What the apiserver returns for [`app_pod`] when the webhook rewrote it.
fn assert_rewritten(pod: &Pod, why: &str) {
    let mut images: BTreeMap<String, String> = container_images(pod, "initContainers")
        .into_iter()
        .chain(container_images(pod, "containers"))
        .collect();
    for (name, _, rewritten) in REWRITTEN {
        assert_eq!(
            images.remove(name).as_deref(),
            Some(rewritten),
            "{why}: container {name}"
        );
    }
    assert_eq!(
        pull_secret_names(pod),
        vec![PULL_SECRET.to_string()],
        "{why}: imagePullSecrets"
    );
    let expected: serde_json::Map<String, Value> = REWRITTEN
        .iter()
        .map(|(n, i, _)| (n.to_string(), json!(i)))
        .collect();
    assert_eq!(
        original_images(pod),
        Some(Value::Object(expected)),
        "{why}: {ORIGINAL_IMAGES}"
    );
}

fn pods(env: &Env, namespace: &str) -> Api<Pod> {
    Api::namespaced(env.admin(), namespace)
}

/// 1. Every overlay renders with the control plane's kubectl and the apiserver
/// accepts every object of it, as shipped but for the webhook's clientConfig;
/// cert-manager's Issuers and Certificates against cert-manager's own CRDs
/// (v1.21.2, `tests/fixtures/cert-manager`; no controller runs, so nothing
/// is issued), stored with the specs as shipped. They are applied one over
/// the other, the way the README switches modes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shipped_overlays_are_accepted_by_the_apiserver() {
    let env = Env::start(Overlay::ClusterWide).await;
    env.install_crds("cert-manager");
    let mwcs: Api<MutatingWebhookConfiguration> = Api::all(env.admin());
    for overlay in Overlay::ALL {
        let objects = env.ws.render(&env.kubectl, overlay);
        let out = env.apply_all(&objects);
        let names: Vec<&str> = out.lines().filter(|l| !l.trim().is_empty()).collect();
        println!(
            "overlay {}: the apiserver accepted {} objects: {}",
            overlay.dir(),
            names.len(),
            names.join(", "),
        );
        assert_eq!(
            names.len(),
            objects.len(),
            "kubectl applied fewer objects than rendered"
        );
        let cert_manager: Vec<&Value> = objects
            .iter()
            .filter(|o| env::is_cert_manager_object(o))
            .collect();
        if overlay.generated_certs() {
            assert!(cert_manager.is_empty());
        } else {
            // Issuers image-rewriter-selfsigned and image-rewriter-ca,
            // Certificates image-rewriter-ca and image-rewriter.
            let described: Vec<String> = cert_manager.iter().map(|o| env::describe(o)).collect();
            assert_eq!(described.len(), 4, "cert-manager's objects: {described:?}");
            for shipped in cert_manager {
                let kind = shipped["kind"].as_str().unwrap();
                assert!(matches!(kind, "Issuer" | "Certificate"), "{described:?}");
                let name = shipped["metadata"]["name"].as_str().unwrap();
                let namespace = shipped["metadata"]["namespace"].as_str().unwrap();
                let resource = format!("{}.cert-manager.io", kind.to_lowercase());
                let stored =
                    env.kubectl_as_admin(&["get", &resource, name, "-n", namespace, "-o", "json"]);
                let stored: Value = serde_json::from_str(&stored).expect("kubectl get -o json");
                assert_eq!(
                    stored["spec"], shipped["spec"],
                    "{kind} {namespace}/{name}: stored spec"
                );
            }
        }

        // The webhook configuration as stored is the shipped one, field by field.
        let shipped = objects
            .iter()
            .find(|o| o["kind"] == "MutatingWebhookConfiguration")
            .expect("a MutatingWebhookConfiguration");
        let stored =
            serde_json::to_value(mwcs.get("image-rewriter").await.expect("get MWC")).expect("JSON");
        for (index, webhook) in shipped["webhooks"].as_array().unwrap().iter().enumerate() {
            for (field, value) in webhook.as_object().unwrap() {
                if field == "clientConfig" {
                    continue;
                }
                assert_eq!(
                    &stored["webhooks"][index][field],
                    value,
                    "{}: stored webhooks[{index}].{field}",
                    overlay.dir()
                );
            }
        }
        for (key, value) in shipped["metadata"]["annotations"]
            .as_object()
            .into_iter()
            .flatten()
        {
            assert_eq!(
                &stored["metadata"]["annotations"][key], value,
                "annotation {key}"
            );
        }
        // ...and the apiserver calls it (the probe namespace is labelled "true").
        env.wait_webhook_called(true).await;
        let created = env
            .create_pod(
                PROBE_NAMESPACE,
                &app_pod(&format!("after-{}", overlay.dir()), &[]),
            )
            .await;
        assert_rewritten(&created, overlay.dir());
    }
}

/// 2a. Cluster-wide mode: every namespace but those labelled "false", the
/// system namespaces and the webhook's own; a pod labelled "false" never.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_wide_mode_rewrites_every_namespace_but_the_excluded() {
    let env = Env::start(Overlay::ClusterWide).await;
    env.namespace("team-a", &[]).await;
    env.namespace("legacy", &[(ENABLED_LABEL, "false")]).await;
    env.namespace("kube-system", &[]).await;

    let created = env.create_pod("team-a", &app_pod("web", &[])).await;
    assert_rewritten(&created, "team-a (unlabelled)");
    // What the API stores, not only what create returned.
    let stored = pods(&env, "team-a").get("web").await.expect("get pod");
    assert_rewritten(&stored, "team-a, read back");

    // An image volume is pulled as a container image is: the apiserver
    // stores it rewritten, recorded in an annotation of its own.
    let mut with_volume = app_pod("web-image-volume", &[]);
    if let Some(spec) = with_volume.spec.as_mut() {
        spec.volumes = Some(vec![
            serde_json::from_value(json!({
                "name": "models",
                "image": {"reference": "quay.io/org/models:v3", "pullPolicy": "IfNotPresent"}
            }))
            .expect("a Volume"),
        ]);
    }
    env.create_pod("team-a", &with_volume).await;
    let stored = pods(&env, "team-a")
        .get("web-image-volume")
        .await
        .expect("get pod");
    let volume = stored
        .spec
        .as_ref()
        .and_then(|spec| spec.volumes.as_ref())
        .and_then(|volumes| volumes.first())
        .and_then(|volume| volume.image.as_ref())
        .and_then(|image| image.reference.clone());
    assert_eq!(
        volume.as_deref(),
        Some("harbor.corp.example/quay/org/models:v3"),
        "the stored image volume"
    );
    let volume_originals = stored
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get("image-rewriter.io/original-volume-images"))
        .map(|text| serde_json::from_str::<Value>(text).expect("JSON"));
    assert_eq!(
        volume_originals,
        Some(json!({"models": "quay.io/org/models:v3"}))
    );

    // The selectors keep these from the webhook: it is never called for
    // them (it would leave them untouched itself too, so the pods alone
    // cannot tell).
    let opted_out = app_pod("web-opted-out", &[(ENABLED_LABEL, "false")]);
    let created = never_sent(&env, "team-a", &opted_out).await;
    assert_untouched(&created, &opted_out, "pod labelled enabled=false");
    for namespace in ["legacy", "kube-system", WEBHOOK_NAMESPACE] {
        let sent = app_pod("web", &[]);
        let created = never_sent(&env, namespace, &sent).await;
        assert_untouched(&created, &sent, namespace);
    }

    // A static pod's mirror, as a kubelet creates it: the matchCondition keeps
    // it from the webhook. Rewritten, it would carry an imagePullSecrets
    // entry, and the apiserver refuses a mirror pod that references a secret.
    let mut mirror = app_pod("web-mirror", &[]);
    mirror.metadata.annotations = Some(BTreeMap::from([(
        "kubernetes.io/config.mirror".to_string(),
        "5c1d6a0b3f".to_string(),
    )]));
    // The apiserver requires a mirror pod to name its node.
    if let Some(spec) = mirror.spec.as_mut() {
        spec.node_name = Some("node-1".to_string());
    }
    let created = never_sent(&env, "team-a", &mirror).await;
    assert_untouched(&created, &mirror, "a mirror pod");

    // The apiserver calls the webhook over HTTP/2: the tests' own client of
    // the TLS port (`wait_ready`) speaks HTTP/1.1 only, so an h2 connection
    // is the apiserver's. BENCHMARKS.md weighs HTTP/2 for this reason.
    let metrics = env.webhook.metrics().await;
    let h2_connections = tls_connections(&metrics, "h2");
    println!(
        "webhook TLS connections: h2 {h2_connections}, http/1.1 {}",
        tls_connections(&metrics, "http/1.1")
    );
    assert!(
        h2_connections >= 1.0,
        "the apiserver reached the webhook without HTTP/2:\n{metrics}"
    );

    // The webhook closes an HTTP/2 connection idle for one to two header
    // read timeouts (3 s here) with GOAWAY; the apiserver sends its next
    // review on a new connection, and that review is not lost.
    tokio::time::sleep(Duration::from_secs(8)).await;
    let after_idle = app_pod("web-after-idle", &[]);
    let created = env.create_pod("team-a", &after_idle).await;
    assert_rewritten(
        &created,
        "team-a, after the webhook closed an idle connection",
    );
    let metrics = env.webhook.metrics().await;
    assert!(
        tls_connections(&metrics, "h2") > h2_connections,
        "the review after a quiet spell came on the old connection:\n{metrics}"
    );
}

/// `image_rewriter_tls_connections_total` for one protocol.
fn tls_connections(metrics: &str, protocol: &str) -> f64 {
    env::sample(
        metrics,
        &format!("image_rewriter_tls_connections_total{{protocol=\"{protocol}\"}}"),
    )
}

/// 2b. Opt-in mode: only namespaces labelled "true"; never the system
/// namespaces or the webhook's own, even when labelled "true".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn opt_in_mode_rewrites_only_namespaces_labelled_true() {
    let env = Env::start(Overlay::OptIn).await;
    env.namespace("team-a", &[(ENABLED_LABEL, "true")]).await;
    env.namespace("team-b", &[]).await;
    env.namespace("legacy", &[(ENABLED_LABEL, "false")]).await;
    env.namespace("kube-system", &[(ENABLED_LABEL, "true")])
        .await;
    env.namespace(WEBHOOK_NAMESPACE, &[(ENABLED_LABEL, "true")])
        .await;

    let created = env.create_pod("team-a", &app_pod("web", &[])).await;
    assert_rewritten(&created, "team-a (labelled true)");

    let opted_out = app_pod("web-opted-out", &[(ENABLED_LABEL, "false")]);
    let created = never_sent(&env, "team-a", &opted_out).await;
    assert_untouched(&created, &opted_out, "pod labelled enabled=false");

    for namespace in ["team-b", "legacy", "kube-system", WEBHOOK_NAMESPACE] {
        let sent = app_pod("web", &[]);
        let created = never_sent(&env, namespace, &sent).await;
        assert_untouched(&created, &sent, namespace);
    }
}

/// Creates `pod` and asserts that the apiserver did not call the webhook
/// for it: the webhook configuration (its selectors or its match
/// condition) left it out.
async fn never_sent(env: &Env, namespace: &str, pod: &Pod) -> Pod {
    let reviews_before = admission_requests(&env.webhook.metrics().await);
    let created = env.create_pod(namespace, pod).await;
    assert_eq!(
        admission_requests(&env.webhook.metrics().await),
        reviews_before,
        "{namespace}/{}: sent to the webhook, which its configuration should have prevented",
        pod.metadata.name.as_deref().unwrap_or_default()
    );
    created
}

/// 3. dryRun=All: the answer is the rewritten pod, and nothing is written:
/// no pod, no pull secret copy (`sideEffects: NoneOnDryRun`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dry_run_returns_the_rewritten_pod_and_copies_no_secret() {
    let env = Env::start(Overlay::ClusterWide).await;
    env.namespace("team-a", &[]).await;
    let created = env
        .create_pod_dry_run("team-a", &app_pod("web", &[]))
        .await
        .expect("dry-run create");
    assert_rewritten(&created, "dry-run answer");
    assert!(
        pods(&env, "team-a").get_opt("web").await.unwrap().is_none(),
        "a dry run must not store the pod"
    );
    // The README's check, with kubectl as a user runs it.
    let output = std::process::Command::new(&env.kubectl)
        .arg("--kubeconfig")
        .arg(&env.admin_kubeconfig)
        .args([
            "run",
            "check",
            "--image=nginx:1.27",
            "-n",
            "team-a",
            "--dry-run=server",
        ])
        .args(["-o", "jsonpath={.spec.containers[0].image}"])
        .output()
        .expect("kubectl runs");
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&output.stdout),
        "harbor.corp.example/dockerhub/library/nginx:1.27"
    );
    // Give a (wrong) background copy time to show up before checking.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let secrets: Api<Secret> = Api::namespaced(env.admin(), "team-a");
    assert!(
        secrets.get_opt(PULL_SECRET).await.unwrap().is_none(),
        "a dry run must not copy {PULL_SECRET} into the namespace"
    );

    // The same request for real does copy it: the dry run was the difference.
    let created = env.create_pod("team-a", &app_pod("web", &[])).await;
    assert_rewritten(&created, "real create");
    eventually(
        "the real create makes its pull secret copy",
        Duration::from_secs(10),
        || async {
            match secrets.get_opt(PULL_SECRET).await {
                Ok(Some(_)) => Ok(()),
                Ok(None) => Err(format!("no {PULL_SECRET} in team-a")),
                Err(error) => Err(error.to_string()),
            }
        },
    )
    .await;
}

/// 3b. A pod whose annotations fill the apiserver's 256 KiB exactly: the
/// webhook's original-images record would take it past, and the apiserver
/// would refuse the pod (shown by a pod one byte over, which the webhook
/// never sees). So the images are rewritten, the record is left out, and
/// the user is told.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pod_at_the_annotation_limit_is_rewritten_without_the_record() {
    const LIMIT: usize = 256 * 1024;
    const FILLER: &str = "example.com/blob";
    let env = Env::start(Overlay::ClusterWide).await;
    env.namespace("team-a", &[]).await;
    let post = |name: &str, annotation_bytes: usize, labels: &[(&str, &str)]| {
        let mut pod = serde_json::to_value(app_pod(name, labels)).unwrap();
        pod["metadata"]["annotations"] =
            json!({ FILLER: "x".repeat(annotation_bytes - FILLER.len()) });
        let request = env
            .cp
            .http_client()
            .post(format!(
                "{}/api/v1/namespaces/team-a/pods",
                env.cp.base_url()
            ))
            .bearer_auth(env.cp.token(Identity::Admin))
            .json(&pod);
        async move {
            let response = request.send().await.expect("POST pod");
            let (status, warnings) = (response.status(), warning_headers(&response));
            (status, response.text().await.expect("body"), warnings)
        }
    };

    let (status, body, _) = post("over", LIMIT + 1, &[(ENABLED_LABEL, "false")]).await;
    assert_eq!(status, 422, "one byte over the limit: {body}");
    assert!(body.contains("Too long"), "{body}");

    let (status, body, warnings) = post("at-the-limit", LIMIT, &[]).await;
    assert!(status.is_success(), "{status}: {body}");
    let created: Pod = serde_json::from_str(&body).expect("a Pod");
    let images: BTreeMap<String, String> = container_images(&created, "initContainers")
        .into_iter()
        .chain(container_images(&created, "containers"))
        .collect();
    for (name, _, rewritten) in REWRITTEN {
        assert_eq!(images[name], rewritten, "container {name}");
    }
    assert_eq!(pull_secret_names(&created), [PULL_SECRET]);
    assert_eq!(original_images(&created), None);
    assert!(
        warnings
            .iter()
            .any(|w| w.contains(ORIGINAL_IMAGES) && w.contains("not written")),
        "{warnings:?}"
    );
}

/// The apiserver's `Warning` headers: the admission warnings a user sees.
fn warning_headers(response: &reqwest::Response) -> Vec<String> {
    response
        .headers()
        .get_all("warning")
        .iter()
        .map(|v| v.to_str().unwrap_or("").to_string())
        .collect()
}

/// PATCHes `pods/<pod>/ephemeralcontainers` the way `kubectl debug` does (a
/// strategic merge patch adding one container); returns the pod and the
/// `Warning` headers.
async fn add_ephemeral_container(
    env: &Env,
    namespace: &str,
    pod: &str,
    name: &str,
    image: &str,
) -> (Pod, Vec<String>) {
    let url = format!(
        "{}/api/v1/namespaces/{namespace}/pods/{pod}/ephemeralcontainers",
        env.cp.base_url()
    );
    let patch = json!({ "spec": { "ephemeralContainers": [{
        "name": name,
        "image": image,
        "targetContainerName": "app",
        "stdin": true,
        "tty": true,
        "terminationMessagePolicy": "File",
        "imagePullPolicy": "IfNotPresent",
    }]}});
    let response = env
        .cp
        .http_client()
        .patch(url)
        .bearer_auth(env.cp.token(Identity::Admin))
        .header("Content-Type", "application/strategic-merge-patch+json")
        .body(patch.to_string())
        .send()
        .await
        .expect("PATCH ephemeralcontainers");
    let (status, warnings) = (response.status(), warning_headers(&response));
    let body = response.text().await.expect("body");
    assert!(
        status.is_success(),
        "the apiserver refused the ephemeralcontainers patch: {status} {body}"
    );
    (serde_json::from_str(&body).expect("a Pod"), warnings)
}

/// 4. `kubectl debug`'s path: only the ephemeral container being added is
/// rewritten, nothing else changes, and the answer warns that the pod lacks
/// the pull secret the new image needs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ephemeral_containers_update_rewrites_only_the_new_container() {
    let env = Env::start(Overlay::ClusterWide).await;
    env.namespace("team-a", &[]).await;

    // A pod the webhook never saw (opted out at creation), with an ephemeral
    // container added while it was still opted out.
    let sent = pod(
        "legacy",
        &[("app", "nginx:1.27")],
        &[(ENABLED_LABEL, "false")],
    );
    let created = env.create_pod("team-a", &sent).await;
    assert_untouched(&created, &sent, "opted-out pod");
    let (_, warnings) =
        add_ephemeral_container(&env, "team-a", "legacy", "debug-1", "busybox:1.36").await;
    assert!(warnings.is_empty(), "not sent to the webhook: {warnings:?}");
    pods(&env, "team-a")
        .patch(
            "legacy",
            &PatchParams::default(),
            &Patch::Merge(json!({ "metadata": { "labels": { ENABLED_LABEL: null } } })),
        )
        .await
        .expect("drop the opt-out label");

    let (after, warnings) =
        add_ephemeral_container(&env, "team-a", "legacy", "debug-2", "alpine:3.20").await;
    println!("ephemeralcontainers warnings: {warnings:?}");
    // (A strategic merge patch without `$setElementOrder` puts the new entry
    // first; the order is the apiserver's business, not the webhook's.)
    let ephemeral: BTreeMap<String, String> = container_images(&after, "ephemeralContainers")
        .into_iter()
        .collect();
    assert_eq!(
        ephemeral,
        BTreeMap::from([
            ("debug-1".to_string(), "busybox:1.36".to_string()),
            (
                "debug-2".to_string(),
                "harbor.corp.example/dockerhub/library/alpine:3.20".to_string()
            ),
        ]),
        "only the new ephemeral container is rewritten"
    );
    assert_eq!(
        container_images(&after, "containers"),
        vec![("app".to_string(), "nginx:1.27".to_string())],
        "containers are not touched on this subresource"
    );
    assert!(pull_secret_names(&after).is_empty(), "no pull secret added");
    assert_eq!(
        original_images(&after),
        None,
        "no annotation on this subresource"
    );
    assert!(
        warnings.iter().any(|w| w.contains(PULL_SECRET)),
        "a warning must name the missing pull secret {PULL_SECRET}: {warnings:?}"
    );
    // The review warned, so it is logged at `info`, with the `?timeout=` the
    // apiserver sent: the shipped `timeoutSeconds: 5`, as the webhook read it
    // (it bounds the wait for pull secret copies).
    let logged_timeout = || {
        env.webhook.log_text().lines().find_map(|line| {
            let event: Value = serde_json::from_str(line).ok()?;
            (event["message"] == "admission reviewed"
                && event["operation"] == "UPDATE"
                && event["name"] == "legacy")
                .then(|| event["apiserver_timeout_ms"].clone())
        })
    };
    let deadline = Instant::now() + Duration::from_secs(5);
    let timeout = loop {
        if let Some(timeout) = logged_timeout() {
            break timeout;
        }
        assert!(
            Instant::now() < deadline,
            "no log line for the ephemeral container review:\n{}",
            env.webhook.log_text()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(timeout, 5_000, "the apiserver's ?timeout=, in milliseconds");

    // A pod that has the pull secret: rewritten, and no such warning.
    let created = env.create_pod("team-a", &app_pod("web", &[])).await;
    assert_rewritten(&created, "web");
    let (after, warnings) =
        add_ephemeral_container(&env, "team-a", "web", "debug", "busybox:1.36").await;
    assert_eq!(
        container_images(&after, "ephemeralContainers"),
        vec![(
            "debug".to_string(),
            "harbor.corp.example/dockerhub/library/busybox:1.36".to_string()
        )]
    );
    assert_rewritten(&after, "web after debug");
    assert!(
        !warnings.iter().any(|w| w.contains(PULL_SECRET)),
        "the pod has {PULL_SECRET}; no warning expected: {warnings:?}"
    );
}

/// 5. A sidecar injector that runs after us (webhook configurations run in
/// name order: image-rewriter < sidecar-injector): with the shipped
/// `reinvocationPolicy: IfNeeded` the apiserver calls us again and the sidecar
/// is rewritten too, with no prefix stacked on the containers rewritten before.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reinvocation_rewrites_a_sidecar_injected_after_us() {
    let env = Env::start(Overlay::ClusterWide).await;
    // A rule whose `match` covers the other rules' targets, so that the
    // reinvocation's already rewritten images would be moved again (a
    // stacked prefix, `harbor.corp.example/cache/dockerhub/...`) were they
    // not recognised as already under a target.
    env.add_rule(json!({"match": "harbor.corp.example", "target": "harbor.corp.example/cache"}))
        .await;
    let (ca, cert, key) = env::loopback_certificate();
    let injector = injector::Injector::start(&cert, &key).await;
    let label = ("sidecar-injection", "enabled");
    env.namespace("mesh", &[label]).await;
    env::kubectl_apply(
        &env.kubectl,
        &env.admin_kubeconfig,
        &[injector::configuration(&injector.url(), &ca, label)],
    );

    let sent = app_pod("web", &[]);
    eventually(
        "the injector is called",
        Duration::from_secs(20),
        || async {
            let created = env
                .create_pod_dry_run("mesh", &sent)
                .await
                .map_err(|e| e.to_string())?;
            if container_images(&created, "containers")
                .iter()
                .any(|(n, _)| n == injector::SIDECAR_NAME)
            {
                Ok(())
            } else {
                Err("no sidecar yet".to_string())
            }
        },
    )
    .await;
    let calls_before = injector.calls.load(Ordering::SeqCst);
    let reviews_before = admission_requests(&env.webhook.metrics().await);
    let created = env.create_pod("mesh", &sent).await;
    let reviews = admission_requests(&env.webhook.metrics().await) - reviews_before;
    let images: BTreeMap<String, String> = container_images(&created, "initContainers")
        .into_iter()
        .chain(container_images(&created, "containers"))
        .collect();
    println!("reinvocation: {images:?}");
    assert_eq!(
        images.get(injector::SIDECAR_NAME).map(String::as_str),
        Some("harbor.corp.example/dockerhub/istio/proxyv2:1.22.0"),
        "the injected sidecar must come back rewritten"
    );
    for (name, _, rewritten) in REWRITTEN {
        assert_eq!(
            images.get(name).map(String::as_str),
            Some(rewritten),
            "{name}: rewritten once, no stacked prefix"
        );
    }
    assert_eq!(pull_secret_names(&created), vec![PULL_SECRET.to_string()]);
    let annotation = original_images(&created).expect("original-images");
    assert_eq!(
        annotation[injector::SIDECAR_NAME],
        json!(injector::SIDECAR_IMAGE)
    );
    assert_eq!(annotation["app"], json!("nginx:1.27"));
    assert!(
        injector.calls.load(Ordering::SeqCst) > calls_before,
        "the injector saw the pod"
    );
    assert_eq!(
        reviews, 2.0,
        "image-rewriter must have been called twice for the pod: first, then reinvoked"
    );

    // Control: with reinvocationPolicy Never the same pod keeps the sidecar
    // as injected, so it is the shipped IfNeeded that rewrote it above.
    let mut never = env
        .objects
        .iter()
        .find(|o| o["kind"] == "MutatingWebhookConfiguration")
        .unwrap()
        .clone();
    never["webhooks"][0]["reinvocationPolicy"] = json!("Never");
    env.apply_webhook_configuration(&[never]);
    let control = app_pod("web-control", &[]);
    eventually(
        "reinvocationPolicy Never takes effect",
        Duration::from_secs(20),
        || async {
            let created = env
                .create_pod_dry_run("mesh", &control)
                .await
                .map_err(|e| e.to_string())?;
            let images: BTreeMap<String, String> = container_images(&created, "containers")
                .into_iter()
                .collect();
            match images.get(injector::SIDECAR_NAME).map(String::as_str) {
                Some(injector::SIDECAR_IMAGE) => {
                    assert_eq!(
                        images.get("app").map(String::as_str),
                        Some("harbor.corp.example/dockerhub/library/nginx:1.27")
                    );
                    Ok(())
                }
                other => Err(format!("sidecar {other:?}")),
            }
        },
    )
    .await;
}

/// `image_rewriter_admission_requests_total`, summed over its labels.
fn admission_requests(metrics: &str) -> f64 {
    metrics
        .lines()
        .filter(|l| l.starts_with("image_rewriter_admission_requests_total"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// The webhook's account may write only what the webhook writes. RBAC cannot
/// restrict `create` by name, so the shipped ValidatingAdmissionPolicy
/// refuses the rest: a token Secret under a pull secret's name (which
/// kube-controller-manager would fill with a long-lived token the account
/// could then read), a Secret without the copy's label, an update of a
/// user's own pull secret, writes in the system namespaces and in its own.
/// A copy as the webhook makes it is allowed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_webhook_account_may_write_only_pull_secret_copies() {
    let env = Env::start(Overlay::ClusterWide).await;
    let admin = env.admin();
    let as_webhook = env.cp.webhook_identity_client();
    for namespace in ["team-probe", "team-x", "team-own"] {
        env.namespace(namespace, &[]).await;
    }
    env.namespace("team-off", &[(ENABLED_LABEL, "false")]).await;
    let data = serde_json::Map::from_iter([(
        ".dockerconfigjson".to_string(),
        json!(env::docker_config_json("someone", "password")),
    )]);
    let own = env::create_pull_secret(&admin, "team-own", &data, None).await;
    let copy_labels = json!({ MANAGED_BY: "image-rewriter" });
    let secret = |namespace: &str, type_: &str, labels: Value| -> Secret {
        serde_json::from_value(json!({
            "metadata": {
                "name": PULL_SECRET,
                "namespace": namespace,
                "labels": labels,
                "annotations": { "kubernetes.io/service-account.name": "default" },
            },
            "type": type_,
            "data": if type_ == "kubernetes.io/service-account-token" { json!({}) } else { json!(data) },
        }))
        .expect("Secret")
    };
    let create = |namespace: &'static str, secret: Secret| {
        let api = Api::<Secret>::namespaced(as_webhook.clone(), namespace);
        async move { api.create(&PostParams::default(), &secret).await }
    };
    let refused_by_the_policy = |result: kube::Result<Secret>, why: &str| match result {
        Err(kube::Error::Api(status)) if status.is_forbidden() => assert!(
            status.message.contains("image-rewriter-secret-writes") && status.message.contains(why),
            "refused, but not by the policy for {why:?}: {}",
            status.message
        ),
        other => panic!("expected the policy to refuse ({why}), got {other:?}"),
    };

    // The policy takes effect once the apiserver has compiled it: probe with
    // throwaway names elsewhere until it refuses.
    let probes = AtomicUsize::new(0);
    eventually("the policy is in force", Duration::from_secs(20), || {
        let mut probe = secret(
            "team-probe",
            "kubernetes.io/service-account-token",
            json!({}),
        );
        probe.metadata.name = Some(format!("probe-{}", probes.fetch_add(1, Ordering::SeqCst)));
        let result = create("team-probe", probe);
        async move {
            match result.await {
                Err(kube::Error::Api(status)) if status.is_forbidden() => Ok(()),
                other => Err(format!("{other:?}")),
            }
        }
    })
    .await;
    let token = secret(
        "team-x",
        "kubernetes.io/service-account-token",
        copy_labels.clone(),
    );
    refused_by_the_policy(create("team-x", token).await, "writes only pull secrets");
    refused_by_the_policy(
        create(
            "team-x",
            secret("team-x", "kubernetes.io/dockerconfigjson", json!({})),
        )
        .await,
        "labelled app.kubernetes.io/managed-by=image-rewriter",
    );
    let mut other_name = secret(
        "team-x",
        "kubernetes.io/dockerconfigjson",
        copy_labels.clone(),
    );
    other_name.metadata.name = Some("chart-registry-credentials".into());
    refused_by_the_policy(
        create("team-x", other_name).await,
        "named like a rule's pullSecret",
    );
    for namespace in ["kube-system", WEBHOOK_NAMESPACE] {
        let elsewhere = secret(
            namespace,
            "kubernetes.io/dockerconfigjson",
            copy_labels.clone(),
        );
        refused_by_the_policy(
            create(namespace, elsewhere).await,
            "in the system namespaces or in its own",
        );
    }
    refused_by_the_policy(
        create(
            "team-off",
            secret(
                "team-off",
                "kubernetes.io/dockerconfigjson",
                copy_labels.clone(),
            ),
        )
        .await,
        "no pull secret into a namespace labelled image-rewriter.io/enabled=false",
    );
    let other_data = |user: &str| {
        let config = env::docker_config_json(user, "another-password");
        let bytes = base64::Engine::decode(&base64::engine::general_purpose::STANDARD, config)
            .expect("base64");
        Some(BTreeMap::from([(
            ".dockerconfigjson".to_string(),
            k8s_openapi::ByteString(bytes),
        )]))
    };
    let mut taken_over = Api::<Secret>::namespaced(as_webhook.clone(), "team-own")
        .get(PULL_SECRET)
        .await
        .expect("RBAC lets the webhook read a pull secret of that name");
    taken_over.metadata.labels = Some(BTreeMap::from([(
        MANAGED_BY.into(),
        "image-rewriter".into(),
    )]));
    taken_over.data = other_data("intruder");
    assert_ne!(taken_over.data, own.data);
    refused_by_the_policy(
        Api::<Secret>::namespaced(as_webhook.clone(), "team-own")
            .replace(PULL_SECRET, &PostParams::default(), &taken_over)
            .await,
        "updates only the copies it made",
    );
    let untouched = Api::<Secret>::namespaced(admin.clone(), "team-own")
        .get(PULL_SECRET)
        .await
        .expect("the user's Secret");
    assert_eq!(untouched.data, own.data);

    // What the webhook itself writes passes: a labelled copy, then its update.
    let copy = create(
        "team-x",
        secret("team-x", "kubernetes.io/dockerconfigjson", copy_labels),
    )
    .await
    .expect("a copy as the webhook makes it is allowed");
    let copies = Api::<Secret>::namespaced(as_webhook.clone(), "team-x");
    let rotated = other_data("rotated");
    assert_ne!(rotated, copy.data);
    let written =
        update_retrying_conflicts(&copies, &rotated, "an update of its own copy is allowed").await;
    assert_eq!(written.data, rotated);
    // A namespace that opts out keeps a copy the webhook may keep current.
    env.namespace("team-x", &[(ENABLED_LABEL, "false")]).await;
    let rotated_again = other_data("rotated-again");
    let written = update_retrying_conflicts(
        &copies,
        &rotated_again,
        "an update of its copy in a namespace that opted out is allowed",
    )
    .await;
    assert_eq!(written.data, rotated_again);
}

/// `copies`' pull secret updated to `data`, read again and retried on a
/// conflict: the running webhook sees the copy as differing from its
/// source and brings it back meanwhile, which is no refusal. Any other
/// error fails the test.
async fn update_retrying_conflicts(
    copies: &Api<Secret>,
    data: &Option<BTreeMap<String, k8s_openapi::ByteString>>,
    what: &str,
) -> Secret {
    eventually(what, Duration::from_secs(10), || {
        let copies = copies.clone();
        let data = data.clone();
        async move {
            let mut copy = copies.get(PULL_SECRET).await.map_err(|e| e.to_string())?;
            copy.data = data;
            match copies
                .replace(PULL_SECRET, &PostParams::default(), &copy)
                .await
            {
                Ok(written) => Ok(written),
                Err(error) if format!("{error:?}").contains("Conflict") => Err(error.to_string()),
                Err(error) => panic!("{what}: refused: {error:?}"),
            }
        }
    })
    .await
}

/// Reviews are not authenticated: anything that reaches the webhook's port
/// can send one, naming any namespace, and the webhook copies the pull
/// secret its images need there. In opt-in mode the shipped policy keeps
/// new copies to the namespaces labelled `true`: a review naming another
/// one is answered (with a warning) and leaves no copy behind, so the
/// registry credential never reaches a namespace that did not opt in.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_review_from_anyone_copies_no_pull_secret_outside_opted_in_namespaces() {
    let env = Env::start(Overlay::OptIn).await;
    env.namespace("team-a", &[(ENABLED_LABEL, "true")]).await;
    env.namespace("team-b", &[]).await;
    env.namespace("team-probe", &[]).await;

    // The policy takes effect once the apiserver has compiled it: probe
    // with throwaway names until the webhook's account is refused.
    let as_webhook = env.cp.webhook_identity_client();
    let probes = AtomicUsize::new(0);
    eventually("the policy is in force", Duration::from_secs(20), || {
        let secret: Secret = serde_json::from_value(json!({
            "metadata": {
                "name": format!("probe-{}", probes.fetch_add(1, Ordering::SeqCst)),
                "labels": { MANAGED_BY: "image-rewriter" },
            },
            "type": "kubernetes.io/dockerconfigjson",
            "data": { ".dockerconfigjson": env::docker_config_json("probe", "probe") },
        }))
        .expect("Secret");
        let api = Api::<Secret>::namespaced(as_webhook.clone(), "team-probe");
        async move {
            match api.create(&PostParams::default(), &secret).await {
                Err(kube::Error::Api(status)) if status.is_forbidden() => Ok(()),
                other => Err(format!("{other:?}")),
            }
        }
    })
    .await;

    let client = harness::https_client(&env.webhook_ca_pem).expect("HTTPS client");
    let forge = |namespace: &str| {
        let mut review: Value =
            serde_json::from_str(include_str!("../examples/admission-review.json"))
                .expect("the example review");
        review["request"]["namespace"] = json!(namespace);
        review["request"]["object"]["metadata"]["namespace"] = json!(namespace);
        let request = client
            .post(format!("{}?timeout=10s", env.webhook.url()))
            .header("Content-Type", "application/json")
            .body(review.to_string());
        async move {
            let answer: Value = request
                .send()
                .await
                .expect("the webhook answers")
                .json()
                .await
                .expect("an AdmissionReview");
            assert!(
                answer["response"]["patch"].is_string(),
                "the forged pod is rewritten: {answer}"
            );
            answer["response"]["warnings"]
                .as_array()
                .map(|warnings| {
                    warnings
                        .iter()
                        .filter_map(|w| w.as_str().map(str::to_owned))
                        .collect::<Vec<_>>()
                })
                .unwrap_or_default()
        }
    };
    let secrets = |namespace: &str| Api::<Secret>::namespaced(env.admin(), namespace);

    let warnings = forge("team-b").await;
    assert!(
        warnings.iter().any(|w| w.contains(PULL_SECRET)
            && w.contains("could not be copied")
            && w.contains("only into namespaces labelled image-rewriter.io/enabled=true")),
        "the answer says why no copy was made: {warnings:?}"
    );
    assert!(
        secrets("team-b")
            .get_opt(PULL_SECRET)
            .await
            .unwrap()
            .is_none(),
        "a review naming a namespace that did not opt in left a copy of {PULL_SECRET} there"
    );

    let warnings = forge("team-a").await;
    assert!(warnings.is_empty(), "{warnings:?}");
    let copy = secrets("team-a")
        .get_opt(PULL_SECRET)
        .await
        .unwrap()
        .expect("a namespace that opted in gets its copy");
    assert_eq!(
        copy.metadata
            .labels
            .unwrap_or_default()
            .get(MANAGED_BY)
            .map(String::as_str),
        Some("image-rewriter")
    );
}

/// 6. Pull secret copies under the shipped RBAC: the first pod in a new
/// namespace finds its copy; rotating the source updates every copy; a
/// user's own Secret of that name is never overwritten.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pull_secret_copies_follow_the_source_under_the_shipped_rbac() {
    let env = Env::start(Overlay::ClusterWide).await;
    let admin = env.admin();

    // The shipped RBAC is what the server runs with: not a Secret beyond its names.
    let as_webhook: Api<Secret> =
        Api::namespaced(env.cp.webhook_identity_client(), WEBHOOK_NAMESPACE);
    let forbidden = as_webhook.get("image-rewriter-tls").await;
    assert!(
        is_forbidden(&forbidden),
        "the webhook identity must not read other Secrets: {forbidden:?}"
    );

    let mut copies = Vec::new();
    for namespace in ["team-a", "team-b"] {
        env.namespace(namespace, &[]).await;
        let created = env.create_pod(namespace, &app_pod("web", &[])).await;
        assert_rewritten(&created, namespace);
        // No polling: the admission waited for the copy (pullSecretSync.waitForCopy).
        let copy = Api::<Secret>::namespaced(admin.clone(), namespace)
            .get_opt(PULL_SECRET)
            .await
            .expect("get copy");
        let Some(copy) = copy else {
            let appeared = eventually("the copy appears later", Duration::from_secs(10), || {
                let api = Api::<Secret>::namespaced(admin.clone(), namespace);
                async move {
                    api.get_opt(PULL_SECRET)
                        .await
                        .map_err(|e| e.to_string())?
                        .ok_or_else(|| "absent".to_string())
                }
            })
            .await;
            panic!(
                "the first pod in {namespace} was admitted before its {PULL_SECRET} copy existed \
                 (it appeared later: {:?}); webhook log:\n{}",
                appeared.metadata.creation_timestamp,
                env.webhook.log_text()
            );
        };
        let labels = copy.metadata.labels.clone().unwrap_or_default();
        assert_eq!(
            labels.get(MANAGED_BY).map(String::as_str),
            Some("image-rewriter")
        );
        let annotations = copy.metadata.annotations.clone().unwrap_or_default();
        assert_eq!(
            annotations.get(SOURCE_ANNOTATION).map(String::as_str),
            Some("image-rewriter/harbor-pull")
        );
        assert_eq!(
            copy.type_.as_deref(),
            Some("kubernetes.io/dockerconfigjson")
        );
        copies.push(namespace);
    }

    // A user's own harbor-pull, made before any pod there.
    env.namespace("team-own", &[]).await;
    let own_data = serde_json::Map::from_iter([(
        ".dockerconfigjson".to_string(),
        json!(env::docker_config_json("team-own", "their-password")),
    )]);
    let own = env::create_pull_secret(&admin, "team-own", &own_data, None).await;
    let created = env.create_pod("team-own", &app_pod("web", &[])).await;
    assert_rewritten(&created, "team-own");

    // Rotate the source.
    let sources: Api<Secret> = Api::namespaced(admin.clone(), WEBHOOK_NAMESPACE);
    let mut source = sources.get(PULL_SECRET).await.expect("source");
    let rotated = env::docker_config_json("robot$e2e", "rotated-password");
    let rotated_bytes =
        base64::Engine::decode(&base64::engine::general_purpose::STANDARD, &rotated)
            .expect("base64");
    source.data = Some(BTreeMap::from([(
        ".dockerconfigjson".to_string(),
        k8s_openapi::ByteString(rotated_bytes.clone()),
    )]));
    sources
        .replace(PULL_SECRET, &PostParams::default(), &source)
        .await
        .expect("rotate the source");
    let rotated_at = Instant::now();
    for namespace in &copies {
        let api = Api::<Secret>::namespaced(admin.clone(), namespace);
        let wanted = rotated_bytes.clone();
        eventually(
            &format!("the copy in {namespace} follows the rotation"),
            Duration::from_secs(10),
            || {
                let api = api.clone();
                let wanted = wanted.clone();
                async move {
                    let copy = api.get(PULL_SECRET).await.map_err(|e| e.to_string())?;
                    let data = secret_data(&copy);
                    if data.get(".dockerconfigjson").map(|b| &b.0) == Some(&wanted) {
                        Ok(())
                    } else {
                        Err("still the old content".to_string())
                    }
                }
            },
        )
        .await;
    }
    println!(
        "pull secret rotation reached {} copies after {:?}",
        copies.len(),
        rotated_at.elapsed()
    );
    // The user's Secret: unchanged, even after the copies were updated.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let after = Api::<Secret>::namespaced(admin.clone(), "team-own")
        .get(PULL_SECRET)
        .await
        .expect("user's secret");
    assert_eq!(
        secret_data(&after),
        secret_data(&own),
        "the user's Secret was overwritten"
    );
    assert_eq!(
        after.metadata.resource_version,
        own.metadata.resource_version
    );
    assert!(
        !after
            .metadata
            .labels
            .unwrap_or_default()
            .contains_key(MANAGED_BY),
        "the user's Secret was relabelled"
    );
}

/// Sum of the apiserver's `apiserver_admission_webhook_fail_open_count` for our webhook.
fn fail_open_count(metrics: &str) -> f64 {
    metrics
        .lines()
        .filter(|l| {
            l.starts_with("apiserver_admission_webhook_fail_open_count{")
                && l.contains(&format!("name=\"{WEBHOOK_NAME}\""))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// 7. The webhook unavailable: with the shipped `failurePolicy: Ignore` pods
/// are created un-rewritten, within the shipped `timeoutSeconds: 5` (+ slack).
/// Frozen (SIGSTOP: connections accepted, never answered) the apiserver
/// waits out the timeout; killed, the loopback port refuses at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webhook_down_pods_are_created_unrewritten_within_the_timeout() {
    let mut env = Env::start(Overlay::ClusterWide).await;
    let shipped = env
        .objects
        .iter()
        .find(|o| o["kind"] == "MutatingWebhookConfiguration")
        .unwrap()["webhooks"][0]
        .clone();
    assert_eq!(shipped["failurePolicy"], "Ignore");
    assert_eq!(shipped["timeoutSeconds"], 5);
    env.namespace("team-a", &[]).await;
    let created = env.create_pod("team-a", &app_pod("before", &[])).await;
    assert_rewritten(&created, "webhook up");
    let fail_open_before = fail_open_count(&env.apiserver_metrics().await);

    env.webhook.freeze();
    let sent = app_pod("frozen", &[]);
    let started = Instant::now();
    let created = pods(&env, "team-a")
        .create(&PostParams::default(), &sent)
        .await;
    let frozen_took = started.elapsed();
    env.webhook.thaw();
    let created = created.expect("pod creation succeeds while the webhook hangs");
    println!("webhook frozen (SIGSTOP): pod created un-rewritten after {frozen_took:?}");
    assert_untouched(&created, &sent, "webhook frozen");
    assert!(
        // 5 s and the apiserver's own work; a slack for a busy CI machine,
        // still far below the apiserver's 60 s request timeout.
        frozen_took < Duration::from_secs(15),
        "pod creation took {frozen_took:?} with the webhook hanging (timeoutSeconds 5)"
    );

    env.webhook.kill();
    let sent = app_pod("killed", &[]);
    let started = Instant::now();
    let created = pods(&env, "team-a")
        .create(&PostParams::default(), &sent)
        .await
        .expect("pod creation succeeds with the webhook gone");
    let killed_took = started.elapsed();
    println!("webhook killed: pod created un-rewritten after {killed_took:?}");
    assert_untouched(&created, &sent, "webhook killed");
    assert!(
        killed_took < Duration::from_secs(15),
        "took {killed_took:?}"
    );

    let fail_open_after = fail_open_count(&env.apiserver_metrics().await);
    println!(
        "apiserver_admission_webhook_fail_open_count{{name=\"{WEBHOOK_NAME}\"}}: {fail_open_before} -> {fail_open_after}"
    );
    assert!(
        fail_open_after >= fail_open_before + 2.0,
        "the apiserver should count both calls as failed open"
    );
}

/// 7b. The optional fail-closed component, applied over the running install:
/// the apiserver accepts its PriorityClass (a user-defined class may not pass
/// 1e9) and the Deployment naming it; with the webhook gone, a pod in a
/// covered namespace is refused, while the namespaces the webhook's own
/// pods depend on, its own and cert-manager's, still create theirs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fail_closed_refuses_covered_pods_while_the_webhook_is_down_but_not_its_own() {
    let mut env = Env::start(Overlay::ClusterWide).await;
    let overlay = "e2e-cluster-wide-fail-closed";
    env.ws.write_overlay(
        overlay,
        &[
            "../../components/cluster-wide",
            "../../components/fail-closed",
            "../../../certs",
        ],
    );
    let objects = env.ws.render_dir(&env.kubectl, overlay);
    let applied = env.apply_all(&objects);
    assert_eq!(
        applied.lines().filter(|l| !l.trim().is_empty()).count(),
        objects.len(),
        "kubectl applied fewer objects than rendered: {applied}"
    );
    let class: Value = serde_json::from_str(&env.kubectl_as_admin(&[
        "get",
        "priorityclass",
        "image-rewriter",
        "-o",
        "json",
    ]))
    .expect("kubectl get -o json");
    let template_class = env.kubectl_as_admin(&[
        "get",
        "deployment",
        "image-rewriter",
        "-n",
        WEBHOOK_NAMESPACE,
        "-o",
        "jsonpath={.spec.template.spec.priorityClassName}",
    ]);
    assert_eq!(
        (class["value"].as_i64(), template_class.as_str()),
        (Some(1_000_000_000), "image-rewriter")
    );
    env.namespace("team-a", &[]).await;
    env.namespace("cert-manager", &[]).await;

    env.webhook.kill();
    // The apiserver's webhook configuration cache sees `Fail` a moment
    // after the apply: until then a pod is created un-rewritten.
    let attempts = AtomicUsize::new(0);
    let refusal = eventually(
        "a covered pod refused with the webhook down",
        Duration::from_secs(20),
        || async {
            let name = format!("covered-{}", attempts.fetch_add(1, Ordering::Relaxed));
            match pods(&env, "team-a")
                .create(&PostParams::default(), &app_pod(&name, &[]))
                .await
            {
                Ok(_) => Err("created (the configuration still says Ignore)".to_owned()),
                Err(error) => Ok(error.to_string()),
            }
        },
    )
    .await;
    println!("fail-closed, webhook down: team-a refused: {refusal}");
    assert!(
        refusal.contains(WEBHOOK_NAME) && refusal.contains("failed calling webhook"),
        "{refusal}"
    );
    for namespace in [WEBHOOK_NAMESPACE, "cert-manager"] {
        let sent = app_pod("left-out", &[]);
        let created = env.create_pod(namespace, &sent).await;
        assert_untouched(&created, &sent, namespace);
    }
}

// ---------------------------------------------------------------------------
// Benchmark

/// Cumulative buckets of histogram `name` (le, count), summed over the
/// series whose labels contain every one of `labels`, plus its count and sum.
fn histogram(metrics: &str, name: &str, labels: &[&str]) -> (Vec<(f64, f64)>, f64, f64) {
    let mut buckets: BTreeMap<String, f64> = BTreeMap::new();
    let (mut count, mut sum) = (0.0, 0.0);
    for line in metrics.lines() {
        if !line.starts_with(name) || !labels.iter().all(|l| line.contains(l)) {
            continue;
        }
        let Some(value) = line.rsplit(' ').next().and_then(|v| v.parse::<f64>().ok()) else {
            continue;
        };
        let series = &line[name.len()..];
        if series.starts_with("_bucket") {
            let le = series
                .split("le=\"")
                .nth(1)
                .and_then(|r| r.split('"').next())
                .unwrap_or("+Inf")
                .to_string();
            *buckets.entry(le).or_default() += value;
        } else if series.starts_with("_count") {
            count += value;
        } else if series.starts_with("_sum") {
            sum += value;
        }
    }
    let mut list: Vec<(f64, f64)> = buckets
        .into_iter()
        .map(|(le, n)| (le.parse::<f64>().unwrap_or(f64::INFINITY), n))
        .collect();
    list.sort_by(|a, b| a.0.partial_cmp(&b.0).unwrap());
    (list, count, sum)
}

/// The apiserver's `apiserver_admission_webhook_admission_duration_seconds`
/// for our webhook's CREATE admissions.
fn webhook_duration_buckets(metrics: &str) -> (Vec<(f64, f64)>, f64, f64) {
    histogram(
        metrics,
        "apiserver_admission_webhook_admission_duration_seconds",
        &[&format!("name=\"{WEBHOOK_NAME}\""), "operation=\"CREATE\""],
    )
}

/// `after - before`, bucket by bucket.
fn bucket_delta(before: &[(f64, f64)], after: &[(f64, f64)]) -> Vec<(f64, f64)> {
    after
        .iter()
        .map(|&(le, n)| {
            let old = before
                .iter()
                .find(|b| b.0 == le)
                .map(|b| b.1)
                .unwrap_or(0.0);
            (le, n - old)
        })
        .collect()
}

/// Quantile from cumulative buckets by linear interpolation within a bucket
/// (what Prometheus' histogram_quantile does).
fn bucket_quantile(buckets: &[(f64, f64)], q: f64) -> f64 {
    let total = buckets.last().map(|b| b.1).unwrap_or(0.0);
    if total == 0.0 {
        return f64::NAN;
    }
    let rank = q * total;
    let mut previous = (0.0, 0.0);
    for &(le, n) in buckets {
        if n >= rank {
            if le.is_infinite() {
                return previous.0;
            }
            let in_bucket = n - previous.1;
            if in_bucket == 0.0 {
                return le;
            }
            return previous.0 + (le - previous.0) * (rank - previous.1) / in_bucket;
        }
        previous = (le, n);
    }
    previous.0
}

struct Phase {
    pods: usize,
    elapsed: Duration,
    latency: hdrhistogram::Histogram<u64>,
}

async fn create_pods(env: &Env, namespace: &str, total: usize, clients: usize) -> Phase {
    let next = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..clients {
        // One client (one connection) per worker: 32 independent clients.
        let api: Api<Pod> = Api::namespaced(env.cp.admin_client(), namespace);
        let next = next.clone();
        tasks.push(tokio::spawn(async move {
            let mut latency = hdrhistogram::Histogram::<u64>::new(3).unwrap();
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= total {
                    return latency;
                }
                let body = app_pod(&format!("pod-{i:05}"), &[]);
                let t = Instant::now();
                api.create(&PostParams::default(), &body)
                    .await
                    .unwrap_or_else(|e| panic!("create pod-{i}: {e}"));
                latency.record(t.elapsed().as_micros() as u64).unwrap();
            }
        }));
    }
    let mut latency = hdrhistogram::Histogram::<u64>::new(3).unwrap();
    for task in tasks {
        latency.add(task.await.expect("worker")).unwrap();
    }
    Phase {
        pods: total,
        elapsed: started.elapsed(),
        latency,
    }
}

fn report(label: &str, phase: &Phase) -> f64 {
    let rate = phase.pods as f64 / phase.elapsed.as_secs_f64();
    println!(
        "{label}: {} pods in {:.2} s = {rate:.1} pods/s; client latency p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
        phase.pods,
        phase.elapsed.as_secs_f64(),
        phase.latency.value_at_quantile(0.5) as f64 / 1000.0,
        phase.latency.value_at_quantile(0.99) as f64 / 1000.0,
        phase.latency.max() as f64 / 1000.0,
    );
    rate
}

/// Pod creation throughput through the apiserver with and without the
/// webhook (cluster-wide overlay, 32 concurrent clients), and the apiserver's
/// own view of the webhook's latency. Not a pass/fail test.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "benchmark: cargo test --release --test e2e -- --ignored --nocapture apiserver_pod_creation_benchmark"]
async fn apiserver_pod_creation_benchmark() {
    const PODS: usize = 2000;
    const CLIENTS: usize = 32;
    let env = Env::start(Overlay::ClusterWide).await;
    println!(
        "benchmark: {PODS} pods per phase, {CLIENTS} concurrent clients, {} build of image-rewriter, {} CPUs",
        if cfg!(debug_assertions) {
            "debug"
        } else {
            "release"
        },
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(0)
    );
    for ns in ["bench-warmup", "bench-webhook", "bench-no-webhook"] {
        env.namespace(ns, &[]).await;
    }
    // Warm-up: connections, the pull secret copy, the apiserver's caches.
    create_pods(&env, "bench-warmup", 200, CLIENTS).await;

    let (before, _, _) = webhook_duration_buckets(&env.apiserver_metrics().await);
    let own_metric = "image_rewriter_admission_duration_seconds";
    let (own_before, _, _) = histogram(&env.webhook.metrics().await, own_metric, &[]);
    let with = create_pods(&env, "bench-webhook", PODS, CLIENTS).await;
    let (after, _, _) = webhook_duration_buckets(&env.apiserver_metrics().await);
    let (own_after, _, _) = histogram(&env.webhook.metrics().await, own_metric, &[]);
    let sample = pods(&env, "bench-webhook").get("pod-00000").await.unwrap();
    assert_rewritten(&sample, "benchmark pod");

    Api::<MutatingWebhookConfiguration>::all(env.admin())
        .delete("image-rewriter", &DeleteParams::default())
        .await
        .expect("delete the webhook configuration");
    env.wait_webhook_called(false).await;
    let without = create_pods(&env, "bench-no-webhook", PODS, CLIENTS).await;
    let sample = pods(&env, "bench-no-webhook")
        .get("pod-00000")
        .await
        .unwrap();
    assert_eq!(container_images(&sample, "containers")[0].1, "nginx:1.27");

    let with_rate = report("with the webhook   ", &with);
    let without_rate = report("without the webhook", &without);
    println!(
        "throughput ratio with/without: {:.3} ({:.1}% of the webhook-free rate)",
        with_rate / without_rate,
        100.0 * with_rate / without_rate
    );
    for (what, delta) in [
        (
            format!(
                "apiserver_admission_webhook_admission_duration_seconds{{name=\"{WEBHOOK_NAME}\",operation=\"CREATE\"}} (the apiserver's view: TLS, HTTP, encode/decode, our answer)"
            ),
            bucket_delta(&before, &after),
        ),
        (
            format!("{own_metric} (the webhook's own view: body read to response encoded)"),
            bucket_delta(&own_before, &own_after),
        ),
    ] {
        let calls = delta.last().map(|b| b.1).unwrap_or(0.0);
        println!(
            "{what} during the webhook phase: {calls} calls, p50 ~{:.3} ms, p99 ~{:.3} ms (interpolated in buckets)",
            bucket_quantile(&delta, 0.5) * 1000.0,
            bucket_quantile(&delta, 0.99) * 1000.0,
        );
        println!(
            "  cumulative buckets (le: calls): {}",
            delta
                .iter()
                .map(|(le, n)| format!("{le}: {n}"))
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    let webhook_metrics = env.webhook.metrics().await;
    for line in webhook_metrics
        .lines()
        .filter(|l| l.starts_with("image_rewriter_admission_requests_total"))
    {
        println!("  webhook: {line}");
    }
}

/// 8. The optional prometheus-operator component with the operator's own
/// CRDs installed (v0.85.0, `tests/fixtures/prometheus-operator`): kubectl
/// applies its PodMonitor and PrometheusRule (strict field validation, so a
/// field the schemas do not know fails), and the apiserver stores their specs
/// field for field as shipped (nothing pruned or defaulted away).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_prometheus_operator_component_is_accepted_with_the_operators_crds() {
    let env = Env::start(Overlay::ClusterWide).await;
    env.install_crds("prometheus-operator");

    let overlay = "e2e-cluster-wide-prometheus-operator";
    env.ws.write_overlay(
        overlay,
        &[
            "../../components/cluster-wide",
            "../../components/prometheus-operator",
            "../../../certs",
        ],
    );
    let monitoring: Vec<Value> = env
        .ws
        .render_dir(&env.kubectl, overlay)
        .into_iter()
        .filter(|o| {
            o["apiVersion"]
                .as_str()
                .is_some_and(|v| v.starts_with("monitoring.coreos.com/"))
        })
        .collect();
    let kinds: Vec<&str> = monitoring
        .iter()
        .map(|o| o["kind"].as_str().unwrap())
        .collect();
    assert_eq!(kinds.len(), 2, "{kinds:?}");
    assert!(kinds.contains(&"PodMonitor") && kinds.contains(&"PrometheusRule"));
    // `install_crds` saw both CRDs Established: the apiserver serves them.
    let applied = env::kubectl_apply(&env.kubectl, &env.admin_kubeconfig, &monitoring);
    println!("applied: {}", applied.trim().replace('\n', ", "));

    for shipped in &monitoring {
        let kind = shipped["kind"].as_str().unwrap().to_lowercase();
        let name = shipped["metadata"]["name"].as_str().unwrap();
        let namespace = shipped["metadata"]["namespace"].as_str().unwrap();
        let stored: Value = serde_json::from_str(
            &env.kubectl_as_admin(&["get", &kind, name, "-n", namespace, "-o", "json"]),
        )
        .expect("kubectl get -o json");
        assert_eq!(
            stored["spec"], shipped["spec"],
            "{kind} {namespace}/{name}: stored spec"
        );
    }
}

/// The README's kubectl commands, verbatim, against the real apiserver:
/// the source pull secret (made again with kubectl), labelling a namespace out in cluster-wide mode, the dry-run check, and
/// the uninstall steps.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_readme_kubectl_commands_work() {
    let env = Env::start(Overlay::ClusterWide).await;
    env.kubectl_as_admin(&["delete", "secret", "harbor-pull", "-n", "image-rewriter"]);
    env.kubectl_as_admin(&[
        "create",
        "secret",
        "docker-registry",
        "harbor-pull",
        "-n",
        "image-rewriter",
        "--docker-server=harbor.corp.example",
        "--docker-username=robot$pull",
        "--docker-password=secret",
    ]);
    let check_image = |namespace: &str| {
        env.kubectl_as_admin(&[
            "run",
            "check",
            "--image=nginx:1.27",
            "-n",
            namespace,
            "--dry-run=server",
            "-o",
            "jsonpath={.spec.containers[0].image}",
        ])
    };
    for namespace in ["team-a", "legacy-app"] {
        env.kubectl_as_admin(&["create", "namespace", namespace]);
        env.cp
            .ensure_default_service_account(namespace)
            .await
            .expect("default ServiceAccount");
    }
    env.kubectl_as_admin(&[
        "label",
        "namespace",
        "legacy-app",
        "image-rewriter.io/enabled=false",
    ]);
    assert_eq!(
        check_image("team-a"),
        "harbor.corp.example/dockerhub/library/nginx:1.27"
    );
    // The apiserver matches namespaceSelector against its namespace cache,
    // which sees the new label a moment after `kubectl label` returns.
    eventually(
        "legacy-app labelled out",
        Duration::from_secs(10),
        || async {
            match check_image("legacy-app") {
                image if image == "nginx:1.27" => Ok(()),
                image => Err(format!("still rewritten to {image}")),
            }
        },
    )
    .await;

    // A real pod in team-a makes a pull secret copy that uninstall removes.
    env.create_pod("team-a", &app_pod("web", &[])).await;
    let copies = |namespace: &str| {
        let secrets: Api<Secret> = Api::namespaced(env.admin(), namespace);
        async move { secrets.get_opt(PULL_SECRET).await.unwrap().is_some() }
    };
    eventually("the copy in team-a", Duration::from_secs(10), || async {
        if copies("team-a").await {
            Ok(())
        } else {
            Err(format!("no {PULL_SECRET} in team-a"))
        }
    })
    .await;

    env.kubectl_as_admin(&["delete", "mutatingwebhookconfiguration", "image-rewriter"]);
    env.wait_webhook_called(false).await;
    assert_eq!(check_image("team-a"), "nginx:1.27");
    env.kubectl_as_admin(&[
        "delete",
        "secret",
        "-A",
        "-l",
        "app.kubernetes.io/managed-by=image-rewriter",
    ]);
    assert!(!copies("team-a").await, "the copy is removed");
    assert!(
        copies(WEBHOOK_NAMESPACE).await,
        "the source is not a copy and stays"
    );
}

/// The apiserver replaces a Secret's finalizers and owner references with
/// those of the update's body: a rotation must carry over the ones others
/// set on a copy, not remove them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotation_keeps_the_finalizers_and_owner_references_of_a_copy() {
    let env = Env::start(Overlay::ClusterWide).await;
    let admin = env.admin();
    env.namespace("team-f", &[]).await;
    let created = env.create_pod("team-f", &app_pod("web", &[])).await;
    assert_rewritten(&created, "team-f");
    let copies: Api<Secret> = Api::namespaced(admin.clone(), "team-f");
    let owner = json!({
        "apiVersion": "v1", "kind": "ConfigMap", "name": "team-f-registry",
        "uid": "0b7b8d1e-0000-4000-8000-000000000001"
    });
    copies
        .patch(
            PULL_SECRET,
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {
                "finalizers": ["backup.example.com/protect"],
                "ownerReferences": [owner],
            }})),
        )
        .await
        .expect("a finalizer and an owner on the copy");

    let sources: Api<Secret> = Api::namespaced(admin.clone(), WEBHOOK_NAMESPACE);
    let rotated = env::docker_config_json("robot$e2e", "rotated-password");
    let rotated_bytes =
        base64::Engine::decode(&base64::engine::general_purpose::STANDARD, &rotated)
            .expect("base64");
    sources
        .patch(
            PULL_SECRET,
            &PatchParams::default(),
            &Patch::Merge(json!({"data": {".dockerconfigjson": rotated}})),
        )
        .await
        .expect("rotate the source");
    let copy = eventually(
        "the copy follows the rotation",
        Duration::from_secs(10),
        || {
            let copies = copies.clone();
            let wanted = rotated_bytes.clone();
            async move {
                let copy = copies.get(PULL_SECRET).await.map_err(|e| e.to_string())?;
                if secret_data(&copy).get(".dockerconfigjson").map(|b| &b.0) == Some(&wanted) {
                    Ok(copy)
                } else {
                    Err("still the old content".to_string())
                }
            }
        },
    )
    .await;
    assert_eq!(
        copy.metadata.finalizers,
        Some(vec!["backup.example.com/protect".to_string()]),
        "webhook log:\n{}",
        env.webhook.log_text()
    );
    let owners = copy.metadata.owner_references.unwrap_or_default();
    assert_eq!(
        owners.iter().map(|o| o.name.as_str()).collect::<Vec<_>>(),
        ["team-f-registry"]
    );
}
