//! End-to-end tests against a real kube-apiserver + etcd (see tests/e2e/harness.rs).
//!
//! Needs the control plane binaries: run `tests/control-plane/build.sh` once
//! (Go required; 5-10 minutes cold). Without them these tests fail, they never skip.

#[path = "e2e/harness.rs"]
mod harness;

use std::time::{Duration, Instant};

use harness::{ControlPlane, Identity, WEBHOOK_NAMESPACE, WEBHOOK_SERVICE_ACCOUNT};
use k8s_openapi::api::authentication::v1::SelfSubjectReview;
use k8s_openapi::api::core::v1::{Namespace, Secret, ServiceAccount};
use k8s_openapi::api::rbac::v1::{PolicyRule, Role, RoleBinding, RoleRef, Subject};
use kube::api::{Api, ListParams, ObjectMeta, PostParams};

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
