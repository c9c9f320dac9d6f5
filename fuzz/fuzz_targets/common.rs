//! The policy every target uses: the design's rules, a nested match, a
//! Docker Hub target (the `library/` trap), a port, and exclusions.

use std::sync::LazyLock;

use image_rewriter::config::ConfigFile;
use image_rewriter::policy::Policy;

pub const CONFIG: &str = r#"
rules:
  - match: docker.io
    target: harbor.corp.example/dockerhub
    pullSecret: harbor-pull
  - match: docker.io/library
    target: 10.0.0.5:8443
  - match: quay.io
    target: harbor.corp.example/quay
    pullSecret: harbor-pull
  - match: localhost:5000
    target: harbor.corp.example/local
    pullSecret: local-pull
  - match: ghcr.io/org
    target: docker.io/mirror
exclude:
  images: ["registry.k8s.io/**", "docker.io/bitnami/*"]
  namespaces: [legacy]
"#;

pub static POLICY: LazyLock<Policy> = LazyLock::new(|| {
    ConfigFile::from_yaml(CONFIG)
        .expect("fuzz config parses")
        .into_policy(Some("image-rewriter"))
        .expect("fuzz config is valid")
});
