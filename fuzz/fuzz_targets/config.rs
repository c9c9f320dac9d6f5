//! The config loader, from arbitrary text: YAML in, a validated policy out.
//!
//! Invariants: no panic; a policy that loads answers for any image without
//! panicking, and never rewrites an image it has already rewritten.
#![no_main]

use image_rewriter::config::ConfigFile;
use image_rewriter::policy::Decision;
use libfuzzer_sys::fuzz_target;

const IMAGES: [&str; 10] = [
    "nginx",
    "library/nginx:1.27",
    "docker.io/bitnami/redis@sha256:0000000000000000000000000000000000000000000000000000000000000000",
    "quay.io/prometheus/node-exporter:v1.8.0",
    "localhost:5000/x",
    "registry.k8s.io/pause:3.9",
    "harbor.corp.example/dockerhub/library/nginx",
    "10.0.0.5:8443/app",
    "ghcr.io/org/app/sub:tag",
    "NGINX",
];

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(file) = ConfigFile::from_yaml(text) else {
        return;
    };
    let Ok(policy) = file.into_policy(Some("image-rewriter")) else {
        return;
    };
    let _ = policy.excludes_namespace("default");
    for image in IMAGES
        .iter()
        .copied()
        .chain(policy.rules().iter().map(|r| r.match_prefix.as_str()))
    {
        if let Decision::Rewrite { image: moved, .. } = policy.decide(image) {
            let second = policy.decide(&moved);
            assert!(
                !matches!(second, Decision::Rewrite { .. }),
                "{image:?} -> {moved:?} would be rewritten again: {second:?}\nconfig:\n{text}"
            );
        }
    }
});
