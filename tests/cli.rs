//! The real binary: `rewrite`, `check-config` and `mutate`, with files,
//! standard input, environment variables and the examples.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Output, Stdio};

use serde_json::{Value, json};

mod common;

use common::binary;

const DIGEST: &str = "sha256:4f53cda18c2baa0c0354bb5f9a3ecbe5ed12ab4d8e11ba873c2f11161202b945";

const CONFIG: &str = r#"
rules:
  - match: docker.io
    target: harbor.corp.example/dockerhub
    pullSecret: harbor-pull
  - match: quay.io
    target: harbor.corp.example/quay
    pullSecret: harbor-pull
  - match: ghcr.io
    target: harbor.corp.example/ghcr
exclude:
  images: ["registry.k8s.io/**"]
  namespaces: [legacy]
"#;

fn run(args: &[&str]) -> Output {
    binary().args(args).output().expect("binary runs")
}

fn run_stdin(args: &[&str], input: &str) -> Output {
    let mut child = binary()
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("binary runs");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(input.as_bytes())
        .unwrap();
    child.wait_with_output().unwrap()
}

/// `mutate --config CONFIG -f -` with `input` on standard input.
fn mutate_stdin(config: &Path, input: &str) -> Output {
    run_stdin(&["mutate", "--config", s(config), "-f", "-"], input)
}

fn stdout(output: &Output) -> String {
    String::from_utf8(output.stdout.clone()).unwrap()
}

fn stderr(output: &Output) -> String {
    String::from_utf8(output.stderr.clone()).unwrap()
}

fn assert_success(output: &Output) {
    assert!(
        output.status.success(),
        "exit {:?}\nstdout: {}\nstderr: {}",
        output.status.code(),
        stdout(output),
        stderr(output)
    );
}

fn assert_exit_1(output: &Output) {
    assert_eq!(
        output.status.code(),
        Some(1),
        "stdout: {}\nstderr: {}",
        stdout(output),
        stderr(output)
    );
}

struct Dir {
    dir: tempfile::TempDir,
}

impl Dir {
    fn new() -> Self {
        Self {
            dir: tempfile::tempdir().unwrap(),
        }
    }
    fn file(&self, name: &str, text: &str) -> PathBuf {
        let path = self.dir.path().join(name);
        std::fs::write(&path, text).unwrap();
        path
    }
    fn config(&self) -> PathBuf {
        self.file("config.yaml", CONFIG)
    }
}

fn s(path: &Path) -> &str {
    path.to_str().unwrap()
}

fn yaml_documents(text: &str) -> Vec<Value> {
    serde_yaml_ng::Deserializer::from_str(text)
        .map(|document| <Value as serde::Deserialize>::deserialize(document).unwrap())
        .filter(|value| !value.is_null())
        .collect()
}

fn images_at(document: &Value, pointer: &str) -> Vec<String> {
    document
        .pointer(pointer)
        .and_then(Value::as_array)
        .map(|containers| {
            containers
                .iter()
                .map(|c| c["image"].as_str().unwrap().to_owned())
                .collect()
        })
        .unwrap_or_default()
}

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

// ---------------------------------------------------------------------------
// rewrite
// ---------------------------------------------------------------------------

#[test]
fn rewrite_text() {
    let dir = Dir::new();
    let config = dir.config();
    let output = run(&[
        "rewrite",
        "--config",
        s(&config),
        "nginx",
        "quay.io/prometheus/node-exporter:v1.8.0",
        "registry.k8s.io/pause:3.9",
        "gcr.io/x/y",
    ]);
    assert_success(&output);
    let text = stdout(&output);
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 4, "{text}");
    assert!(
        lines[0].starts_with("nginx -> harbor.corp.example/dockerhub/library/nginx "),
        "{text}"
    );
    assert!(
        lines[0].contains("harbor-pull") && lines[0].contains("rewritten"),
        "{text}"
    );
    assert!(lines[1].starts_with(
        "quay.io/prometheus/node-exporter:v1.8.0 -> harbor.corp.example/quay/prometheus/node-exporter:v1.8.0"
    ));
    assert!(lines[2].starts_with("registry.k8s.io/pause:3.9 -> registry.k8s.io/pause:3.9"));
    assert!(lines[2].contains("excluded"), "{text}");
    assert!(lines[3].contains("no-matching-rule"), "{text}");
}

#[test]
fn rewrite_json_lines() {
    let dir = Dir::new();
    let config = dir.config();
    let pinned = format!("ghcr.io/org/app:1.0@{DIGEST}");
    // 251 characters of path, 256 under the target's "quay/": too long.
    let too_long_under_target = format!("quay.io/{}", "a".repeat(251));
    let output = run(&[
        "rewrite",
        "--config",
        s(&config),
        "--output",
        "json",
        "library/nginx:1.27",
        &pinned,
        "harbor.corp.example/quay/org/app:1",
        "registry.k8s.io/pause:3.9",
        &too_long_under_target,
    ]);
    assert_success(&output);
    let lines: Vec<Value> = stdout(&output)
        .lines()
        .map(|line| serde_json::from_str(line).unwrap_or_else(|e| panic!("{line}: {e}")))
        .collect();
    assert_eq!(lines.len(), 5);
    for line in &lines {
        let keys: Vec<&String> = line.as_object().unwrap().keys().collect();
        for key in ["input", "output", "rule", "pullSecret", "reason"] {
            assert!(line.get(key).is_some(), "{key} missing in {line}");
        }
        assert_eq!(keys.len(), 5, "{line}");
    }
    assert_eq!(
        lines[0],
        serde_json::json!({
            "input": "library/nginx:1.27",
            "output": "harbor.corp.example/dockerhub/library/nginx:1.27",
            "rule": "docker.io",
            "pullSecret": "harbor-pull",
            "reason": "rewritten"
        })
    );
    assert_eq!(
        lines[1]["output"],
        format!("harbor.corp.example/ghcr/org/app:1.0@{DIGEST}")
    );
    assert_eq!(lines[1]["rule"], "ghcr.io");
    assert!(lines[1]["pullSecret"].is_null());
    assert_eq!(lines[2]["output"], "harbor.corp.example/quay/org/app:1");
    assert_eq!(lines[2]["rule"], "quay.io");
    assert_eq!(lines[2]["pullSecret"], "harbor-pull");
    assert_eq!(lines[2]["reason"], "already-under-target");
    assert!(lines[3]["rule"].is_null());
    assert_eq!(lines[3]["reason"], "excluded");
    // The rule that matched is named, though its rewrite was refused; the
    // image stays where it was and needs no pull secret.
    assert_eq!(lines[4]["output"], too_long_under_target.as_str());
    assert_eq!(lines[4]["rule"], "quay.io");
    assert!(lines[4]["pullSecret"].is_null(), "{}", lines[4]);
    let reason = lines[4]["reason"].as_str().unwrap();
    assert!(reason.starts_with("invalid-result: "), "{reason}");
}

#[test]
fn rewrite_an_unparsable_image_fails_with_the_reason() {
    let dir = Dir::new();
    let config = dir.config();
    let output = run(&[
        "rewrite",
        "--config",
        s(&config),
        "--output",
        "json",
        "nginx",
        "NGINX",
    ]);
    assert_exit_1(&output);
    let lines: Vec<Value> = stdout(&output)
        .lines()
        .map(|line| serde_json::from_str(line).unwrap())
        .collect();
    assert_eq!(lines.len(), 2);
    assert_eq!(lines[1]["output"], "NGINX");
    assert!(
        lines[1]["reason"]
            .as_str()
            .unwrap()
            .starts_with("unparsable"),
        "{}",
        lines[1]
    );
    let err = stderr(&output);
    assert!(err.contains("not valid"), "{err}");
    // The reason names the image, so a log or a CI job shows which one.
    assert!(
        err.contains("NGINX"),
        "stderr does not name the image: {err}"
    );
}

#[test]
fn rewrite_with_a_missing_config_fails() {
    let dir = Dir::new();
    let missing = dir.dir.path().join("nope.yaml");
    let output = run(&["rewrite", "--config", s(&missing), "nginx"]);
    assert_exit_1(&output);
    let err = stderr(&output);
    assert!(err.contains("nope.yaml"), "{err}");
    assert_eq!(
        err.matches("No such file or directory").count(),
        1,
        "the reason once: {err}"
    );
    assert!(stdout(&output).is_empty());
}

#[test]
fn invalid_configs_are_refused_by_field() {
    let dir = Dir::new();
    for (yaml, field) in [
        (
            "rules:\n  - match: docker.io\n    target: Harbor.example/UP\n",
            "rules[0].target",
        ),
        (
            "rules:\n  - match: docker.io\n    target: h.example\n  - match: quay.io\n    target: h.example/q:1\n",
            "rules[1].target",
        ),
        (
            "rules:\n  - match: nginx\n    target: h.example\n",
            "rules[0].match",
        ),
        (
            "rules:\n  - match: docker.io\n    target: h.example\n    pullSecret: Bad_Secret\n",
            "rules[0].pullSecret",
        ),
        (
            "exclude:\n  namespaces: ['Not A Namespace']\n",
            "exclude.namespaces[0]",
        ),
        (
            "rules:\n  - match: docker.io\n    targt: h.example\n",
            "targt",
        ),
        ("rules: [", ""),
    ] {
        let config = dir.file("bad.yaml", yaml);
        for args in [
            vec!["rewrite", "--config", s(&config), "nginx"],
            vec!["check-config", "--config", s(&config)],
        ] {
            let output = run(&args);
            assert_exit_1(&output);
            let err = stderr(&output);
            assert!(err.contains(field), "{args:?} {yaml:?}: {err}");
            assert!(!err.contains("panicked"), "{err}");
        }
    }
}

// ---------------------------------------------------------------------------
// check-config
// ---------------------------------------------------------------------------

#[test]
fn check_config_accepts_valid_configs() {
    let dir = Dir::new();
    let config = dir.config();
    let output = run(&["check-config", "--config", s(&config)]);
    assert_success(&output);
    let text = stdout(&output);
    assert!(text.contains("OK"), "{text}");
    assert!(text.contains("3 rule"), "{text}");
    // The webhook's own namespace is not the file's to say, but `serve`
    // leaves it out all the same.
    assert!(
        text.contains(
            "never touched: namespaces kube-node-lease, kube-public, kube-system, legacy \
             and the webhook's own namespace\n"
        ),
        "{text}"
    );

    let example = root().join("examples/config.yaml");
    assert_success(&run(&["check-config", "--config", s(&example)]));
    let no_rules = dir.file("no-rules.yaml", "rules: []\n");
    let output = run(&["check-config", "--config", s(&no_rules)]);
    assert_success(&output);
    assert_eq!(
        stderr(&output),
        "warning: no rules: no image is rewritten\n"
    );
    assert_eq!(stderr(&run(&["check-config", "--config", s(&config)])), "");

    // Valid, but a match partly shadowed by another rule's target: said.
    let shadowed = dir.file(
        "shadowed.yaml",
        "rules:\n  - match: docker.io\n    target: harbor.corp.example/dockerhub\n\
         \x20 - match: harbor.corp.example\n    target: harbor-new.corp.example/old\n",
    );
    let output = run(&["check-config", "--config", s(&shadowed)]);
    assert_success(&output);
    assert_eq!(
        stderr(&output),
        "warning: rules[0].target \"harbor.corp.example/dockerhub\" lies under rules[1].match \
         \"harbor.corp.example\": images there count as already moved by rules[0], so rules[1] \
         never moves them to \"harbor-new.corp.example/old\"\n"
    );
    // What that warns of, as `rewrite` shows it.
    let output = run(&[
        "rewrite",
        "--config",
        s(&shadowed),
        "--output",
        "json",
        "harbor.corp.example/dockerhub/library/nginx",
        "harbor.corp.example/team/app",
    ]);
    let decisions: Vec<(Value, Value)> = stdout(&output)
        .lines()
        .map(|line| {
            let decision: Value = serde_json::from_str(line).unwrap();
            (decision["output"].clone(), decision["reason"].clone())
        })
        .collect();
    assert_eq!(
        decisions,
        [
            (
                json!("harbor.corp.example/dockerhub/library/nginx"),
                json!("already-under-target")
            ),
            (
                json!("harbor-new.corp.example/old/team/app"),
                json!("rewritten")
            ),
        ]
    );
}

/// A server already running refuses a file with no value and keeps its
/// config, so a CI gate must not pass a ConfigMap emptied by mistake.
#[test]
fn check_config_refuses_a_file_with_no_value() {
    let dir = Dir::new();
    for blank in ["", "\n\n", "# rules to come\n", "---\n", "~\n"] {
        let config = dir.file("blank.yaml", blank);
        let output = run(&["check-config", "--config", s(&config)]);
        assert_exit_1(&output);
        assert_eq!(stdout(&output), "", "{blank:?}");
        let err = stderr(&output);
        assert!(
            err.contains("holds no value")
                && err.contains("refuses it")
                && err.contains("write `rules: []` to remove every rule"),
            "{blank:?}: {err}"
        );
    }
}

#[test]
fn the_config_path_reads_the_environment() {
    let dir = Dir::new();
    let config = dir.config();
    let output = binary()
        .env("IMAGE_REWRITER_CONFIG", &config)
        .args(["rewrite", "quay.io/org/app:1"])
        .output()
        .unwrap();
    assert_success(&output);
    assert!(stdout(&output).contains("harbor.corp.example/quay/org/app:1"));

    let output = binary()
        .env("IMAGE_REWRITER_CONFIG", &config)
        .env("IMAGE_REWRITER_OUTPUT", "json")
        .args(["rewrite", "nginx"])
        .output()
        .unwrap();
    assert_success(&output);
    let line: Value = serde_json::from_str(stdout(&output).trim()).unwrap();
    assert_eq!(
        line["output"],
        "harbor.corp.example/dockerhub/library/nginx"
    );

    let output = binary()
        .env("IMAGE_REWRITER_CONFIG", &config)
        .arg("check-config")
        .output()
        .unwrap();
    assert_success(&output);

    let pod = dir.file("pod.yaml", POD);
    let output = binary()
        .env("IMAGE_REWRITER_CONFIG", &config)
        .args(["mutate", "-f", s(&pod)])
        .output()
        .unwrap();
    assert_success(&output);
    assert!(stdout(&output).contains("harbor.corp.example/dockerhub/library/nginx:1.27"));

    // Without the flag or the variable, the command refuses to guess.
    let output = run(&["rewrite", "nginx"]);
    assert!(!output.status.success());
    assert!(stderr(&output).contains("--config"), "{}", stderr(&output));
}

/// A value refused from a variable is said to come from it: a pod that
/// sets `IMAGE_REWRITER_LOG_FORMAT: JSON` in its env and no `--log-format`
/// in its args was told only of `--log-format`, a flag it never passed
/// (and of an empty variable, that no value was "supplied" for it).
#[test]
fn a_value_refused_from_a_variable_names_the_variable() {
    let dir = Dir::new();
    let config = dir.config();
    for (variable, value, args) in [
        ("IMAGE_REWRITER_OUTPUT", "JSON", vec!["rewrite", "nginx"]),
        ("IMAGE_REWRITER_OUTPUT", "", vec!["rewrite", "nginx"]),
        ("IMAGE_REWRITER_FILENAME", "", vec!["mutate"]),
        (
            "IMAGE_REWRITER_RELOAD_INTERVAL",
            "10ms",
            vec!["serve", "--tls-cert", "c", "--tls-key", "k"],
        ),
        ("IMAGE_REWRITER_NO_API", "maybe", vec!["serve"]),
        (
            "IMAGE_REWRITER_VALIDITY_DAYS",
            "-1",
            vec!["certs", "--out", "o"],
        ),
    ] {
        let output = binary()
            .env("IMAGE_REWRITER_CONFIG", &config)
            .env(variable, value)
            .args(&args)
            .output()
            .unwrap();
        let err = stderr(&output);
        assert_eq!(output.status.code(), Some(2), "{variable}={value:?}: {err}");
        assert!(
            err.contains(&format!("the value comes from {variable}")),
            "{variable}={value:?} {args:?}: {err}"
        );
    }
    // Given as a flag, the flag's value is the one refused, whatever the
    // variable holds: no word of the variable.
    let output = binary()
        .env("IMAGE_REWRITER_OUTPUT", "JSON")
        .args([
            "rewrite",
            "--config",
            s(&config),
            "--output",
            "xml",
            "nginx",
        ])
        .output()
        .unwrap();
    let err = stderr(&output);
    assert_eq!(output.status.code(), Some(2), "{err}");
    assert!(
        err.contains("'xml'") && !err.contains("IMAGE_REWRITER"),
        "{err}"
    );
    // A valid variable and a bad flag elsewhere: the variable is not blamed.
    let output = binary()
        .env("IMAGE_REWRITER_OUTPUT", "json")
        .args(["rewrite", "--config", s(&config), "--output=yaml", "nginx"])
        .output()
        .unwrap();
    let err = stderr(&output);
    assert_eq!(output.status.code(), Some(2), "{err}");
    assert!(!err.contains("IMAGE_REWRITER"), "{err}");
}

// ---------------------------------------------------------------------------
// mutate
// ---------------------------------------------------------------------------

const POD: &str = r#"apiVersion: v1
kind: Pod
metadata:
  name: web
  namespace: shop
  annotations:
    team: storefront
spec:
  initContainers:
    - name: init
      image: ghcr.io/org/init:1
  containers:
    - name: app
      image: nginx:1.27
    - name: pause
      image: registry.k8s.io/pause:3.9
  imagePullSecrets:
    - name: regcred
"#;

const DEPLOYMENT: &str = r#"apiVersion: apps/v1
kind: Deployment
metadata:
  name: web
  namespace: shop
spec:
  replicas: 2
  selector:
    matchLabels:
      app: web
  template:
    metadata:
      labels:
        app: web
    spec:
      containers:
        - name: app
          image: quay.io/org/web:2.0
        - name: nginx
          image: nginx
"#;

const CRONJOB: &str = r#"apiVersion: batch/v1
kind: CronJob
metadata:
  name: report
  namespace: shop
spec:
  schedule: "0 3 * * *"
  jobTemplate:
    spec:
      template:
        spec:
          restartPolicy: OnFailure
          containers:
            - name: report
              image: bitnami/kubectl:1.31
"#;

const POD_TEMPLATE: &str = r#"apiVersion: v1
kind: PodTemplate
metadata:
  name: worker
template:
  metadata:
    labels:
      app: worker
  spec:
    containers:
      - name: worker
        image: library/redis:7
"#;

const REPLICATION_CONTROLLER: &str = r#"apiVersion: v1
kind: ReplicationController
metadata:
  name: legacy
spec:
  replicas: 1
  template:
    spec:
      containers:
        - name: legacy
          image: quay.io/org/legacy@sha256:4c1e997385b8fb4ad4d1d3c7e5af7ff3f882e94d07cf5b78de9e889bc60830e6
"#;

const SERVICE_AND_JOB: &str = r#"---
apiVersion: v1
kind: Service
metadata:
  name: web
spec:
  selector:
    app: web
  ports:
    - port: 80
---
apiVersion: batch/v1
kind: Job
metadata:
  name: migrate
spec:
  template:
    spec:
      restartPolicy: Never
      containers:
        - name: migrate
          image: ghcr.io/org/migrate:3
"#;

#[test]
fn mutate_a_pod_file() {
    let dir = Dir::new();
    let config = dir.config();
    let pod = dir.file("pod.yaml", POD);
    let output = run(&["mutate", "--config", s(&config), "-f", s(&pod)]);
    assert_success(&output);
    let documents = yaml_documents(&stdout(&output));
    assert_eq!(documents.len(), 1);
    let pod = &documents[0];
    assert_eq!(
        images_at(pod, "/spec/initContainers"),
        ["harbor.corp.example/ghcr/org/init:1"]
    );
    assert_eq!(
        images_at(pod, "/spec/containers"),
        [
            "harbor.corp.example/dockerhub/library/nginx:1.27",
            "registry.k8s.io/pause:3.9"
        ]
    );
    assert_eq!(
        pod["spec"]["imagePullSecrets"],
        serde_json::json!([{"name": "regcred"}, {"name": "harbor-pull"}])
    );
    assert_eq!(pod["metadata"]["annotations"]["team"], "storefront");
    let originals: Value = serde_json::from_str(
        pod["metadata"]["annotations"]["image-rewriter.io/original-images"]
            .as_str()
            .unwrap(),
    )
    .unwrap();
    assert_eq!(
        originals,
        serde_json::json!({"init": "ghcr.io/org/init:1", "app": "nginx:1.27"})
    );
}

#[test]
fn mutate_workloads_from_stdin() {
    let dir = Dir::new();
    let config = dir.config();
    for (input, pointer, expected) in [
        (
            DEPLOYMENT,
            "/spec/template/spec/containers",
            vec![
                "harbor.corp.example/quay/org/web:2.0",
                "harbor.corp.example/dockerhub/library/nginx",
            ],
        ),
        (
            CRONJOB,
            "/spec/jobTemplate/spec/template/spec/containers",
            vec!["harbor.corp.example/dockerhub/bitnami/kubectl:1.31"],
        ),
        (
            POD_TEMPLATE,
            "/template/spec/containers",
            vec!["harbor.corp.example/dockerhub/library/redis:7"],
        ),
        (
            REPLICATION_CONTROLLER,
            "/spec/template/spec/containers",
            vec![
                "harbor.corp.example/quay/org/legacy@sha256:4c1e997385b8fb4ad4d1d3c7e5af7ff3f882e94d07cf5b78de9e889bc60830e6",
            ],
        ),
    ] {
        let output = mutate_stdin(&config, input);
        assert_success(&output);
        let documents = yaml_documents(&stdout(&output));
        assert_eq!(documents.len(), 1);
        assert_eq!(images_at(&documents[0], pointer), expected);
    }
}

/// A template with `metadata: null` (and no metadata at all) gets the
/// annotation in a metadata object of its own.
#[test]
fn mutate_a_template_without_metadata() {
    let dir = Dir::new();
    let config = dir.config();
    for metadata in ["    metadata: null\n", ""] {
        let job = format!(
            "apiVersion: batch/v1\nkind: Job\nmetadata:\n  name: once\nspec:\n  template:\n{metadata}\
             \x20   spec:\n      restartPolicy: Never\n      containers:\n        - name: web\n          image: nginx\n"
        );
        let output = mutate_stdin(&config, &job);
        assert_success(&output);
        let documents = yaml_documents(&stdout(&output));
        assert_eq!(
            images_at(&documents[0], "/spec/template/spec/containers"),
            ["harbor.corp.example/dockerhub/library/nginx"]
        );
        assert_eq!(
            documents[0]["spec"]["template"]["metadata"]["annotations"]["image-rewriter.io/original-images"],
            r#"{"web":"nginx"}"#,
            "{job}"
        );
    }
}

#[test]
fn mutate_a_multi_document_stream() {
    let dir = Dir::new();
    let config = dir.config();
    let stream = format!("{DEPLOYMENT}{SERVICE_AND_JOB}");
    let file = dir.file("all.yaml", &stream);
    let output = run(&["mutate", "--config", s(&config), "-f", s(&file)]);
    assert_success(&output);
    let documents = yaml_documents(&stdout(&output));
    let kinds: Vec<&str> = documents
        .iter()
        .map(|d| d["kind"].as_str().unwrap())
        .collect();
    assert_eq!(kinds, ["Deployment", "Service", "Job"]);
    assert_eq!(
        images_at(&documents[0], "/spec/template/spec/containers")[0],
        "harbor.corp.example/quay/org/web:2.0"
    );
    let service_in: Vec<Value> = yaml_documents(SERVICE_AND_JOB);
    assert_eq!(
        documents[1], service_in[0],
        "the Service passes through unchanged"
    );
    assert_eq!(
        images_at(&documents[2], "/spec/template/spec/containers"),
        ["harbor.corp.example/ghcr/org/migrate:3"]
    );
    // The ghcr rule has no pull secret: the Job gets none.
    assert!(
        documents[2]["spec"]["template"]["spec"]
            .get("imagePullSecrets")
            .is_none()
    );
}

/// Strings a YAML 1.1 reader (`kubectl apply`'s go-yaml v2, PyYAML) would
/// take for a boolean, a number, a timestamp or a value key, in a document
/// `mutate` changes and in one it passes through: both the output's own
/// reading and kubectl's must give back the very strings.
const AMBIGUOUS_STRINGS: &str = r#"
apiVersion: v1
kind: ConfigMap
metadata:
  name: flags
data:
  FEATURE_X: "on"
  ENABLED: "yes"
  OFF_SWITCH: "Off"
  BATCH: "1_000"
  OCTAL: "0o17"
  CLOCK: "12:30"
  SINCE: "2024-01-01"
  EQUALS: "="
  PORT: "8080"
  SCRIPT: |
    #!/bin/sh
    echo "ready: yes" # done
---
apiVersion: v1
kind: Pod
metadata:
  name: web
spec:
  containers:
    - name: web
      image: nginx:1.27
      args: ["--verbose", "-v", "no", "- x"]
      env:
        - {name: DEBUG, value: "yes"}
        - {name: RATIO, value: ".5"}
        - {name: EMPTY, value: ""}
        - {name: NULLISH, value: "~"}
"#;

#[test]
fn mutate_keeps_strings_other_yaml_readers_would_retype() {
    let dir = Dir::new();
    let config = dir.config();
    let output = mutate_stdin(&config, AMBIGUOUS_STRINGS);
    assert_success(&output);
    let mutated = stdout(&output);
    let written = yaml_documents(AMBIGUOUS_STRINGS);
    let read_back = yaml_documents(&mutated);
    assert_eq!(
        read_back[0], written[0],
        "the ConfigMap passes through:\n{mutated}"
    );
    assert_eq!(
        read_back[1]["spec"]["containers"][0]["env"], written[1]["spec"]["containers"][0]["env"],
        "{mutated}"
    );
    assert_eq!(
        images_at(&read_back[1], "/spec/containers"),
        ["harbor.corp.example/dockerhub/library/nginx:1.27"]
    );

    let Some(kubectl_read) = kubectl_reads(&dir, &mutated) else {
        return;
    };
    assert_eq!(
        kubectl_read, read_back,
        "kubectl reads mutate's output as mutate wrote it:\n{mutated}"
    );
}

/// The objects of a YAML stream as `kubectl apply` reads them, offline
/// (`kubectl label --local`, the label taken off again); `None` without
/// kubectl.
fn kubectl_reads(dir: &Dir, yaml: &str) -> Option<Vec<Value>> {
    let kubectl = common::kubectl("YAML read by kubectl")?;
    let file = dir.file("read-by-kubectl.yaml", yaml);
    let labelled = std::process::Command::new(kubectl)
        .args([
            "label",
            "--local",
            "-f",
            s(&file),
            "read=back",
            "-o",
            "json",
        ])
        .output()
        .expect("kubectl runs");
    assert_success(&labelled);
    let objects = serde_json::Deserializer::from_str(&stdout(&labelled))
        .into_iter::<Value>()
        .map(|object| {
            let mut object = object.unwrap();
            let metadata = object["metadata"].as_object_mut().unwrap();
            let labels = metadata["labels"].as_object_mut().unwrap();
            assert_eq!(labels.remove("read"), Some("back".into()));
            if labels.is_empty() {
                metadata.remove("labels");
            }
            object
        })
        .collect();
    Some(objects)
}

/// YAML 1.1, as kubectl reads it: an octal mode, booleans spelled `yes` and
/// `on`, a number with `_`, and a container merged from an anchor with `<<`.
const KUBECTL_YAML_1_1: &str = r#"apiVersion: apps/v1
kind: Deployment
metadata:
  name: web
  namespace: shop
  annotations:
    note: mine
    <<: {note: merged, other: "1"}
    tagged: !foo 123
spec:
  replicas: 1_0
  selector:
    matchLabels: {app: web}
  template:
    metadata:
      labels: {app: web}
    spec:
      hostNetwork: yes
      containers:
        - &base
          name: a
          image: nginx:1.27
          stdin: on
          volumeMounts: [{name: config, mountPath: /etc/app}]
        - <<: *base
          name: b
      volumes:
        - name: config
          secret:
            secretName: app
            defaultMode: 0644
            items: [{key: k, path: p, mode: 0400}]
"#;

/// After a byte order mark (files concatenated), a ConfigMap with a key
/// written twice, and a block scalar on the input's last line.
const CONFIG_MAP_LAST: &str = "apiVersion: v1
kind: ConfigMap
metadata: {name: scripts, namespace: shop}
data:
  k: one
  k: two
  run.sh: |
    #!/bin/sh
    exec app";

#[test]
fn mutate_reads_yaml_as_kubectl_does() {
    let dir = Dir::new();
    let config = dir.config();
    let input = format!("{KUBECTL_YAML_1_1}---\n\u{feff}{CONFIG_MAP_LAST}");
    let output = mutate_stdin(&config, &input);
    assert_success(&output);
    assert!(
        stderr(&output).contains("key \"k\" is written twice"),
        "{}",
        stderr(&output)
    );
    let mutated = stdout(&output);
    let documents = yaml_documents(&mutated);
    assert_eq!(documents[1]["data"]["k"], "two", "{mutated}");
    assert_eq!(documents[1]["data"]["run.sh"], "#!/bin/sh\nexec app\n");
    let deployment = &documents[0];
    assert_eq!(
        deployment["metadata"]["annotations"],
        serde_json::json!({"note": "merged", "other": "1", "tagged": "123"})
    );
    let spec = &deployment["spec"]["template"]["spec"];
    assert_eq!(deployment["spec"]["replicas"], 10, "{mutated}");
    assert_eq!(spec["hostNetwork"], true, "{mutated}");
    assert_eq!(
        spec["volumes"][0]["secret"]["defaultMode"], 420,
        "{mutated}"
    );
    assert_eq!(spec["volumes"][0]["secret"]["items"][0]["mode"], 256);
    for container in spec["containers"].as_array().unwrap() {
        assert_eq!(
            container["image"], "harbor.corp.example/dockerhub/library/nginx:1.27",
            "{mutated}"
        );
        assert_eq!(container["stdin"], true, "{mutated}");
        assert_eq!(container["volumeMounts"][0]["mountPath"], "/etc/app");
    }
    assert_eq!(spec["containers"][1]["name"], "b");

    // The same as kubectl reads the input, but for the images mutate moved.
    let Some(read_from_input) = kubectl_reads(&dir, &input) else {
        return;
    };
    let Some(read_from_output) = kubectl_reads(&dir, &mutated) else {
        return;
    };
    let mut expected = read_from_input[0].clone();
    for container in expected["spec"]["template"]["spec"]["containers"]
        .as_array_mut()
        .unwrap()
    {
        container["image"] = "harbor.corp.example/dockerhub/library/nginx:1.27".into();
    }
    let template = &mut expected["spec"]["template"];
    template["spec"]["imagePullSecrets"] = serde_json::json!([{"name": "harbor-pull"}]);
    template["metadata"]["annotations"] =
        read_from_output[0]["spec"]["template"]["metadata"]["annotations"].clone();
    assert_eq!(read_from_output[0], expected, "{mutated}");
    assert_eq!(read_from_output[1], read_from_input[1], "{mutated}");
}

#[test]
fn mutate_json_in_json_out() {
    let dir = Dir::new();
    let config = dir.config();
    let pod: Value = serde_yaml_ng::from_str(POD).unwrap();
    let output = mutate_stdin(&config, &serde_json::to_string_pretty(&pod).unwrap());
    assert_success(&output);
    let mutated: Value = serde_json::from_str(&stdout(&output))
        .unwrap_or_else(|e| panic!("output is not JSON: {e}\n{}", stdout(&output)));
    assert_eq!(
        images_at(&mutated, "/spec/containers")[0],
        "harbor.corp.example/dockerhub/library/nginx:1.27"
    );
}

#[test]
fn mutate_reads_json_values_in_a_row_and_flow_style_yaml() {
    let dir = Dir::new();
    let config = dir.config();
    let pod: Value = serde_yaml_ng::from_str(POD).unwrap();
    let mut other = pod.clone();
    other["metadata"]["name"] = "other".into();
    other["spec"]["containers"][0]["image"] = "quay.io/org/api:2".into();
    let two_in_a_row = format!(
        "{}\n{}",
        serde_json::to_string_pretty(&pod).unwrap(),
        serde_json::to_string(&other).unwrap()
    );
    let output = mutate_stdin(&config, &two_in_a_row);
    assert_success(&output);
    let mutated: Vec<Value> = serde_json::Deserializer::from_str(&stdout(&output))
        .into_iter()
        .collect::<Result<_, _>>()
        .unwrap_or_else(|e| panic!("output is not JSON values: {e}\n{}", stdout(&output)));
    let images: Vec<Vec<String>> = mutated
        .iter()
        .map(|pod| images_at(pod, "/spec/containers"))
        .collect();
    assert_eq!(
        images,
        [
            [
                "harbor.corp.example/dockerhub/library/nginx:1.27",
                "registry.k8s.io/pause:3.9"
            ],
            [
                "harbor.corp.example/quay/org/api:2",
                "registry.k8s.io/pause:3.9"
            ]
        ]
    );

    let flow = "{apiVersion: v1, kind: Pod, metadata: {name: f}, spec: {containers: [{name: a, image: nginx}]}}\n";
    let output = mutate_stdin(&config, flow);
    assert_success(&output);
    let documents = yaml_documents(&stdout(&output));
    assert_eq!(
        images_at(&documents[0], "/spec/containers"),
        ["harbor.corp.example/dockerhub/library/nginx"]
    );

    let output = mutate_stdin(
        &config,
        &format!("{}\n{{\"kind\": ", serde_json::to_string(&pod).unwrap()),
    );
    assert_exit_1(&output);
    assert!(
        stderr(&output).contains("document 2"),
        "{}",
        stderr(&output)
    );
}

/// A document that is not an object holds no pod: it is printed back as
/// it was, with a warning naming it, not passed over in silence (a JSON
/// array of pods looks like input that was mutated).
#[test]
fn mutate_warns_about_documents_that_are_not_objects() {
    let dir = Dir::new();
    let config = dir.config();
    let pod: Value = serde_yaml_ng::from_str(POD).unwrap();
    let array = serde_json::to_string(&[&pod]).unwrap();
    let output = mutate_stdin(&config, &array);
    assert_success(&output);
    let printed: Value = serde_json::from_str(&stdout(&output)).unwrap();
    assert_eq!(printed, Value::Array(vec![pod.clone()]));
    assert!(
        stderr(&output).contains("document 1: a list, not an object"),
        "{}",
        stderr(&output)
    );

    let yaml = format!("{POD}---\n- a\n---\nhello\n---\n---\n42\n");
    let output = mutate_stdin(&config, &yaml);
    assert_success(&output);
    let err = stderr(&output);
    for expected in [
        "document 2: a list, not an object",
        "document 3: a string, not an object",
        "document 5: a number, not an object",
    ] {
        assert!(err.contains(expected), "{expected}: {err}");
    }
    assert!(
        !err.contains("document 1:") && !err.contains("document 4:"),
        "{err}"
    );
    let documents = yaml_documents(&stdout(&output));
    assert_eq!(
        images_at(&documents[0], "/spec/containers")[0],
        "harbor.corp.example/dockerhub/library/nginx:1.27"
    );
    assert_eq!(
        documents[1..],
        [serde_json::json!(["a"]), "hello".into(), 42.into()]
    );
}

#[test]
fn mutate_warns_about_unparsable_images_and_leaves_them() {
    let dir = Dir::new();
    let config = dir.config();
    let pod = POD.replace("image: nginx:1.27", "image: NGINX");
    let output = mutate_stdin(&config, &pod);
    assert_success(&output);
    let documents = yaml_documents(&stdout(&output));
    assert_eq!(images_at(&documents[0], "/spec/containers")[0], "NGINX");
    let err = stderr(&output);
    assert!(
        err.contains("NGINX") && err.contains("not a valid reference"),
        "{err}"
    );
}

#[test]
fn mutate_respects_excluded_namespaces() {
    let dir = Dir::new();
    let config = dir.config();
    let pod = POD.replace("namespace: shop", "namespace: legacy");
    let output = mutate_stdin(&config, &pod);
    assert_success(&output);
    let documents = yaml_documents(&stdout(&output));
    assert_eq!(documents[0], yaml_documents(&pod)[0]);

    // An object that names no namespace goes where `--target-namespace`
    // (`-n`) says, as with `kubectl apply -n`; without it, where no
    // exclusion applies. One that names its own keeps it.
    let without_namespace = POD.replace("  namespace: shop\n", "");
    assert_ne!(without_namespace, POD);
    let into = |args: &[&str]| {
        let mut all = vec!["mutate", "--config", s(&config), "-f", "-"];
        all.extend_from_slice(args);
        let output = run_stdin(&all, &without_namespace);
        assert_success(&output);
        yaml_documents(&stdout(&output)).remove(0)
    };
    let untouched = yaml_documents(&without_namespace).remove(0);
    assert_eq!(into(&["-n", "legacy"]), untouched);
    assert_eq!(into(&["--target-namespace", "kube-system"]), untouched);
    assert_ne!(into(&["-n", "shop"]), untouched);
    assert_ne!(into(&[]), untouched);
    // Empty is not given, as for `--namespace`: a templated env value.
    assert_ne!(into(&["-n", ""]), untouched);
    // An object's empty namespace (`namespace: ""`, a template's empty
    // value) names none either: kubectl puts it where `-n` says.
    let empty_namespace = POD.replace("  namespace: shop\n", "  namespace: \"\"\n");
    assert_ne!(empty_namespace, POD);
    let output = run_stdin(
        &["mutate", "--config", s(&config), "-f", "-", "-n", "legacy"],
        &empty_namespace,
    );
    assert_success(&output);
    assert_eq!(
        yaml_documents(&stdout(&output))[0],
        yaml_documents(&empty_namespace)[0]
    );
    let named = run_stdin(
        &["mutate", "--config", s(&config), "-f", "-", "-n", "legacy"],
        POD,
    );
    assert_ne!(yaml_documents(&stdout(&named))[0], yaml_documents(POD)[0]);

    let refused = run_stdin(
        &[
            "mutate",
            "--config",
            s(&config),
            "-f",
            "-",
            "-n",
            "Not_A_Namespace",
        ],
        POD,
    );
    assert_exit_1(&refused);
    assert!(
        stderr(&refused).contains("--target-namespace"),
        "{}",
        stderr(&refused)
    );
}

/// A typed list's items carry no kind (the API leaves it out): they take the
/// list's. A custom resource whose kind is a workload's, in another group,
/// passes through. JSON after a byte order mark is still JSON.
#[test]
fn mutate_typed_lists_custom_kinds_and_a_byte_order_mark() {
    let dir = Dir::new();
    let config = dir.config();
    let pod_list = serde_json::json!({
        "apiVersion": "v1",
        "kind": "PodList",
        "items": [{"metadata": {"name": "a", "namespace": "shop"},
                   "spec": {"containers": [{"name": "c", "image": "nginx"}]}}]
    });
    let output = mutate_stdin(&config, &format!("\u{feff}{pod_list}"));
    assert_success(&output);
    let mutated: Value = serde_json::from_str(&stdout(&output)).expect("JSON out");
    assert_eq!(
        mutated["items"][0]["spec"]["containers"][0]["image"],
        "harbor.corp.example/dockerhub/library/nginx"
    );
    assert!(mutated["items"][0].get("kind").is_none(), "{mutated}");

    let custom = "apiVersion: rollouts.example.com/v1\nkind: Deployment\nmetadata: {name: r, namespace: shop}\n\
                  spec:\n  template:\n    spec:\n      containers: [{name: c, image: nginx}]\n";
    let output = mutate_stdin(&config, custom);
    assert_success(&output);
    assert_eq!(yaml_documents(&stdout(&output)), yaml_documents(custom));
    let apps = custom.replace("rollouts.example.com/v1", "apps/v1");
    let output = mutate_stdin(&config, &apps);
    assert_success(&output);
    assert_ne!(yaml_documents(&stdout(&output)), yaml_documents(&apps));

    // A custom resource's typed list: its items are the list's group's.
    let custom_list = "apiVersion: rollouts.example.com/v1\nkind: DeploymentList\nitems:\n\
                       - metadata: {name: r, namespace: shop}\n  spec:\n    template:\n      spec:\n\
                       \x20       containers: [{name: c, image: nginx}]\n";
    let output = mutate_stdin(&config, custom_list);
    assert_success(&output);
    assert_eq!(
        yaml_documents(&stdout(&output)),
        yaml_documents(custom_list)
    );
    let apps_list = custom_list.replace("rollouts.example.com/v1", "apps/v1");
    let output = mutate_stdin(&config, &apps_list);
    assert_success(&output);
    let mutated = yaml_documents(&stdout(&output));
    assert_eq!(
        mutated[0]["items"][0]["spec"]["template"]["spec"]["containers"][0]["image"],
        "harbor.corp.example/dockerhub/library/nginx",
        "{mutated:?}"
    );
}

/// `key:` with no value is `null` in YAML, and the apiserver reads a `null`
/// label or annotation value as "" and a `null` pull secret entry as an
/// empty reference (Helm output has them): `mutate` reads them so too,
/// as `/mutate` would the object the apiserver sends, and writes them back
/// as they were.
#[test]
fn mutate_reads_null_label_values_and_pull_secrets_as_the_apiserver_does() {
    let dir = Dir::new();
    let config = dir.config();
    let deployment = "apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: web, namespace: shop}\n\
                      spec:\n  template:\n    metadata:\n      labels: {tier: , image-rewriter.io/enabled: }\n\
                      \x20     annotations: {checksum/config: }\n    spec:\n\
                      \x20     imagePullSecrets: [~, {name: ~}]\n\
                      \x20     containers: [{name: c, image: nginx}]\n";
    let output = mutate_stdin(&config, deployment);
    assert_success(&output);
    let mutated = yaml_documents(&stdout(&output));
    let template = &mutated[0]["spec"]["template"];
    assert_eq!(
        template["spec"]["containers"][0]["image"],
        "harbor.corp.example/dockerhub/library/nginx"
    );
    assert_eq!(
        template["spec"]["imagePullSecrets"],
        serde_json::json!([null, {"name": null}, {"name": "harbor-pull"}])
    );
    assert_eq!(
        template["metadata"]["labels"],
        serde_json::json!({"tier": null, "image-rewriter.io/enabled": null})
    );
    assert_eq!(
        template["metadata"]["annotations"]["checksum/config"],
        Value::Null
    );
    assert!(
        template["metadata"]["annotations"]["image-rewriter.io/original-images"].is_string(),
        "{template}"
    );
}

#[test]
fn mutate_refuses_bad_input() {
    let dir = Dir::new();
    let config = dir.config();
    let output = mutate_stdin(&config, "kind: Pod\nspec: [\n");
    assert_exit_1(&output);
    assert!(
        stderr(&output).contains("document 1"),
        "{}",
        stderr(&output)
    );
    let missing = dir.dir.path().join("missing.yaml");
    let output = run(&["mutate", "--config", s(&config), "-f", s(&missing)]);
    assert_exit_1(&output);
    assert!(
        stderr(&output).contains("missing.yaml"),
        "{}",
        stderr(&output)
    );
    let output = mutate_stdin(
        &config,
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: x\nspec:\n  containers: nginx\n",
    );
    assert_exit_1(&output);
    assert!(stderr(&output).contains("spec"), "{}", stderr(&output));

    // Documents are counted as written, empty ones included; an object
    // without a name is named by its kind alone.
    let output = mutate_stdin(
        &config,
        "a: 1\n---\n---\nb: 2\n---\napiVersion: v1\nkind: Pod\nspec:\n  containers: 3\n",
    );
    assert_exit_1(&output);
    assert!(
        stderr(&output).contains("document 4 (Pod): spec is not valid"),
        "{}",
        stderr(&output)
    );
}

/// Aliases of aliases, each nesting the one before 126 sequences deeper,
/// build a value 15 000 levels deep from 32 KiB of YAML. The binary aborted
/// with a stack overflow (SIGABRT, no message) while it read them; now it
/// names the document and the limit, as for nesting written out.
#[test]
fn mutate_refuses_aliases_that_nest_past_the_depth_limit() {
    let dir = Dir::new();
    let config = dir.config();
    let mut yaml = format!("a0: &a0 {}0{}\n", "[".repeat(127), "]".repeat(127));
    for level in 1..=120 {
        let (open, close) = ("[".repeat(126), "]".repeat(126));
        yaml.push_str(&format!(
            "a{level}: &a{level} {open}*a{}{close}\n",
            level - 1
        ));
    }
    let output = mutate_stdin(&config, &yaml);
    assert_exit_1(&output);
    assert!(
        stderr(&output).contains("document 1: not valid YAML or JSON: nesting deeper than 128"),
        "{}",
        stderr(&output)
    );
}

// ---------------------------------------------------------------------------
// The examples, as the README runs them
// ---------------------------------------------------------------------------

#[test]
fn the_examples_mutate_with_the_example_config() {
    let config = root().join("examples/config.yaml");
    let mutate = |file: &str| {
        let path = root().join("examples").join(file);
        let output = run(&["mutate", "--config", s(&config), "-f", s(&path)]);
        assert_success(&output);
        yaml_documents(&stdout(&output))
    };

    let deployment = mutate("deployment.yaml");
    assert_eq!(deployment.len(), 1);
    let spec = "/spec/template/spec";
    assert_eq!(
        images_at(&deployment[0], &format!("{spec}/initContainers")),
        ["harbor.corp.example/ghcr/org/app-migrations:2.4.1"]
    );
    assert_eq!(
        images_at(&deployment[0], &format!("{spec}/containers")),
        [
            format!("harbor.corp.example/ghcr/org/app@{DIGEST}"),
            "harbor.corp.example/dockerhub/library/nginx:1.27".to_owned(),
            "harbor.corp.example/k8s/pause:3.9".to_owned(),
        ]
    );
    assert_eq!(
        deployment[0]
            .pointer(&format!("{spec}/imagePullSecrets"))
            .unwrap(),
        &serde_json::json!([{"name": "regcred"}, {"name": "harbor-pull"}])
    );

    let pod = mutate("pod.yaml");
    assert_eq!(images_at(&pod[0], "/spec/initContainers"), ["busybox:1.36"]);
    assert_eq!(
        images_at(&pod[0], "/spec/containers"),
        [
            "harbor.corp.example/dockerhub/library/nginx:1.27",
            "harbor.corp.example/quay/prometheus/node-exporter:v1.8.0"
        ]
    );

    let workloads = mutate("workloads.yaml");
    let kinds: Vec<&str> = workloads
        .iter()
        .map(|d| d["kind"].as_str().unwrap())
        .collect();
    assert_eq!(kinds, ["Deployment", "StatefulSet", "CronJob", "Service"]);
    assert_eq!(
        images_at(&workloads[0], "/spec/template/spec/containers"),
        [
            "harbor.corp.example/ghcr/org/api:v3.2.0",
            "harbor.corp.example/dockerhub/envoyproxy/envoy:v1.31.0"
        ]
    );
    assert_eq!(
        images_at(&workloads[1], "/spec/template/spec/initContainers"),
        ["busybox"]
    );
    assert_eq!(
        images_at(&workloads[1], "/spec/template/spec/containers"),
        [
            "harbor.corp.example/dockerhub/library/postgres:16.4",
            "harbor.corp.example/quay/prometheuscommunity/postgres-exporter:v0.15.0"
        ]
    );
    assert_eq!(
        images_at(
            &workloads[2],
            "/spec/jobTemplate/spec/template/spec/containers"
        ),
        [
            "harbor.corp.example/ghcr/org/report:2.1",
            "harbor.corp.example/k8s/pause:3.9"
        ]
    );
    let service: Vec<Value> =
        yaml_documents(&std::fs::read_to_string(root().join("examples/workloads.yaml")).unwrap());
    assert_eq!(workloads[3], service[3]);
}

/// `mutate` rewrites a workload's image volumes as the webhook does a
/// pod's, with their record.
#[test]
fn mutate_rewrites_image_volumes_in_a_template() {
    let input = "apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: models, namespace: shop}\n\
                 spec:\n  template:\n    spec:\n      containers: [{name: app, image: registry.internal.example/app:1}]\n      \
                 volumes:\n        - {name: token, emptyDir: {}}\n        - {name: models, image: {reference: 'quay.io/org/models:v3'}}\n";
    let output = mutate_stdin(&root().join("examples/config.yaml"), input);
    assert_success(&output);
    let out: serde_json::Value = serde_yaml_ng::from_str(&stdout(&output)).unwrap();
    let template = &out["spec"]["template"];
    assert_eq!(
        template["spec"]["volumes"][1]["image"]["reference"],
        "harbor.corp.example/quay/org/models:v3"
    );
    assert_eq!(
        template["spec"]["volumes"][0],
        serde_json::json!({"name": "token", "emptyDir": {}})
    );
    assert_eq!(
        template["spec"]["imagePullSecrets"][0]["name"],
        "harbor-pull"
    );
    assert_eq!(
        template["metadata"]["annotations"]["image-rewriter.io/original-volume-images"],
        r#"{"models":"quay.io/org/models:v3"}"#
    );
}
