//! `image-rewriter serve` as a separate process: the key encodings it loads,
//! readiness turning off at SIGTERM, a clean exit, and what it logs.

mod common;

use std::io::{BufRead as _, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;

const SERVICE_HOST: &str = "image-rewriter.image-rewriter.svc";

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/tls")
        .join(name)
}

/// The running binary; killed if a test fails before it exits.
struct Process {
    child: Child,
    https_addr: SocketAddr,
    /// Every JSON log line after "listening", as it arrives.
    log: Arc<Mutex<Vec<Value>>>,
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn spawn(config: &Path, cert: &Path, key: &Path, extra: &[&str]) -> Process {
    let mut command = serve();
    command
        .arg("--config")
        .arg(config)
        .arg("--tls-cert")
        .arg(cert)
        .arg("--tls-key")
        .arg(key)
        .args(extra);
    start(command)
}

/// `serve` on ports the kernel chooses, logging JSON, without its files.
fn serve() -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_image-rewriter"));
    command
        .args(["serve", "--log-format", "json", "--listen", "127.0.0.1:0"])
        .args([
            "--metrics-listen",
            "127.0.0.1:0",
            "--namespace",
            "image-rewriter",
        ])
        // Outside a cluster wherever the tests run: in a pod, serve would
        // want that pod's API access.
        .env_remove("KUBERNETES_SERVICE_HOST")
        .stdout(Stdio::piped())
        .stderr(Stdio::null());
    command
}

/// Runs `serve` until it logs that it listens.
fn start(mut command: Command) -> Process {
    let mut child = command.spawn().expect("the binary starts");
    // The JSON log's "listening" line says which port the kernel gave us.
    let stdout = child.stdout.take().expect("stdout");
    let mut lines = BufReader::new(stdout).lines();
    let https_addr = loop {
        let line = lines
            .next()
            .expect("the server logs before it exits")
            .expect("log line");
        let Ok(event) = serde_json::from_str::<serde_json::Value>(&line) else {
            continue;
        };
        if event["message"] == "listening" {
            break event["https_addr"].as_str().unwrap().parse().unwrap();
        }
    };
    // Keep draining the log so the process never blocks on a full pipe.
    let log = Arc::new(Mutex::new(Vec::new()));
    std::thread::spawn({
        let log = log.clone();
        move || {
            for line in lines.map_while(Result::ok) {
                if let Ok(event) = serde_json::from_str(&line) {
                    log.lock().unwrap().push(event);
                }
            }
        }
    });
    Process {
        child,
        https_addr,
        log,
    }
}

fn client(process: &Process, root_pem: &[u8]) -> reqwest::Client {
    let _ = rustls::crypto::ring::default_provider().install_default();
    reqwest::Client::builder()
        .use_rustls_tls()
        .tls_built_in_root_certs(false)
        .add_root_certificate(reqwest::Certificate::from_pem(root_pem).unwrap())
        .resolve(SERVICE_HOST, process.https_addr)
        .timeout(Duration::from_secs(5))
        .build()
        .unwrap()
}

async fn status(client: &reqwest::Client, process: &Process, path: &str) -> Option<u16> {
    let url = format!("https://{SERVICE_HOST}:{}{path}", process.https_addr.port());
    client
        .get(url)
        .send()
        .await
        .ok()
        .map(|r| r.status().as_u16())
}

async fn wait_for_status(client: &reqwest::Client, process: &Process, path: &str, wanted: u16) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while status(client, process, path).await != Some(wanted) {
        assert!(Instant::now() < deadline, "{path} never answered {wanted}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn config_file(dir: &Path) -> PathBuf {
    let path = dir.join("config.yaml");
    std::fs::write(
        &path,
        "rules:\n  - match: docker.io\n    target: harbor.corp.example/dockerhub\n",
    )
    .unwrap();
    path
}

#[tokio::test]
async fn loads_pkcs1_sec1_and_pkcs8_keys() {
    let dir = tempfile::tempdir().unwrap();
    let config = config_file(dir.path());
    for (cert, key) in [
        ("rsa.crt", "rsa-pkcs1.key"),
        ("ec.crt", "ec-sec1.key"),
        ("ec.crt", "ec-pkcs8.key"),
    ] {
        let process = spawn(&config, &fixture(cert), &fixture(key), &[]);
        let root = std::fs::read(fixture(cert)).unwrap();
        let client = client(&process, &root);
        wait_for_status(&client, &process, "/readyz", 200).await;
        assert_eq!(
            status(&client, &process, "/healthz").await,
            Some(200),
            "{key}"
        );
    }
}

#[tokio::test]
async fn sigterm_turns_readiness_off_then_exits_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let config = config_file(dir.path());
    let mut process = spawn(
        &config,
        &fixture("ec.crt"),
        &fixture("ec-pkcs8.key"),
        // A delay long enough for a busy CI machine to see both answers in it.
        &["--shutdown-delay", "5s", "--shutdown-grace", "2s"],
    );
    let client = client(&process, &std::fs::read(fixture("ec.crt")).unwrap());
    wait_for_status(&client, &process, "/readyz", 200).await;

    sigterm(&process);
    // Within the shutdown delay: still serving, but not ready.
    wait_for_status(&client, &process, "/readyz", 503).await;
    assert_eq!(status(&client, &process, "/healthz").await, Some(200));

    let exit = exit_after_sigterm(&mut process).await;
    assert!(exit.success(), "exit status {exit}");
}

fn sigterm(process: &Process) {
    let killed = Command::new("kill")
        .args(["-TERM", &process.child.id().to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
}

async fn exit_after_sigterm(process: &mut Process) -> ExitStatus {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(exit) = process.child.try_wait().unwrap() {
            return exit;
        }
        assert!(
            Instant::now() < deadline,
            "the server did not exit after SIGTERM"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// `--dev-self-signed` writes a throwaway CA key: to a directory of its own
/// choosing without `--dev-dir`, which a clean exit removes; `--dev-dir`'s
/// is the user's and stays.
#[tokio::test]
async fn a_development_run_removes_the_directory_it_chose_at_exit() {
    let scratch = tempfile::tempdir().unwrap();
    let temp_dir = scratch.path().join("tmp");
    std::fs::create_dir(&temp_dir).unwrap();
    let given = scratch.path().join("given");
    for dev_dir in [None, Some(&given)] {
        let mut command = serve();
        command
            .args(["--dev-self-signed", "--shutdown-delay", "0s"])
            .env("TMPDIR", &temp_dir);
        if let Some(dir) = dev_dir {
            command.arg("--dev-dir").arg(dir);
        }
        let mut process = start(command);
        let written = dev_dir.cloned().unwrap_or_else(|| {
            temp_dir.join(format!("image-rewriter-dev-{}-0", process.child.id()))
        });
        assert!(written.join("ca.key").is_file(), "{dev_dir:?}: no CA key");

        sigterm(&process);
        let exit = exit_after_sigterm(&mut process).await;
        assert!(exit.success(), "{dev_dir:?}: exit status {exit}");
        let left: Vec<_> = std::fs::read_dir(&temp_dir)
            .unwrap()
            .map(|entry| entry.unwrap().path())
            .collect();
        assert_eq!(left, Vec::<PathBuf>::new(), "{dev_dir:?}: left behind");
        if let Some(dir) = dev_dir {
            assert!(dir.join("ca.key").is_file(), "--dev-dir's files removed");
        }
    }
}

/// `image-rewriter certs` output, end to end: the server serves the pair it
/// wrote, and a client that trusts only the `caBundle` from the generated
/// kustomize patch connects with the Service DNS name as server name.
#[tokio::test]
async fn the_certs_command_output_is_served_and_trusted_through_its_ca_bundle() {
    use base64::Engine as _;
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("certs");
    let status = Command::new(env!("CARGO_BIN_EXE_image-rewriter"))
        .args([
            "certs",
            "--service",
            "image-rewriter",
            "--namespace",
            "image-rewriter",
        ])
        .args(["--key-type", "ecdsa-p384", "--validity-days", "30", "--out"])
        .arg(&out)
        .stdout(Stdio::null())
        .status()
        .unwrap();
    assert!(status.success());

    let patch: serde_json::Value = serde_yaml_ng::from_str(
        &std::fs::read_to_string(out.join("webhook-ca-bundle.yaml")).unwrap(),
    )
    .unwrap();
    assert_eq!(patch[0]["op"], "add");
    assert_eq!(patch[0]["path"], "/webhooks/0/clientConfig/caBundle");
    let ca_bundle = base64::engine::general_purpose::STANDARD
        .decode(patch[0]["value"].as_str().unwrap())
        .unwrap();
    assert_eq!(ca_bundle, std::fs::read(out.join("ca.crt")).unwrap());

    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt as _;
        for private in ["ca.key", "tls.key", "secret.yaml"] {
            let mode = std::fs::metadata(out.join(private))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o077, 0, "{private} is readable by others: {mode:o}");
        }
    }

    let config = config_file(dir.path());
    let process = spawn(&config, &out.join("tls.crt"), &out.join("tls.key"), &[]);
    let client = client(&process, &ca_bundle);
    wait_for_status(&client, &process, "/readyz", 200).await;
    // Every Service DNS name the apiserver may use is in the certificate.
    for name in [
        "image-rewriter",
        "image-rewriter.image-rewriter",
        "image-rewriter.image-rewriter.svc",
        "image-rewriter.image-rewriter.svc.cluster.local",
    ] {
        let client = reqwest::Client::builder()
            .use_rustls_tls()
            .tls_built_in_root_certs(false)
            .add_root_certificate(reqwest::Certificate::from_pem(&ca_bundle).unwrap())
            .resolve(name, process.https_addr)
            .build()
            .unwrap();
        let url = format!("https://{name}:{}/healthz", process.https_addr.port());
        let response = client
            .get(url)
            .send()
            .await
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(response.status(), 200, "{name}");
    }
}

/// Default logging (`info`): a review that warned the user is logged with
/// its uid; a clean rewrite is not (it is on record in the pod's annotation,
/// the audit annotation and the metrics).
#[tokio::test]
async fn reviews_that_warn_are_logged_at_info_and_clean_ones_are_not() {
    let dir = tempfile::tempdir().unwrap();
    let config = config_file(dir.path());
    let process = spawn(&config, &fixture("ec.crt"), &fixture("ec-pkcs8.key"), &[]);
    let root = std::fs::read(fixture("ec.crt")).unwrap();
    let client = client(&process, &root);
    wait_for_status(&client, &process, "/readyz", 200).await;
    let url = format!(
        "https://{SERVICE_HOST}:{}/mutate?timeout=10s",
        process.https_addr.port()
    );
    let mut uids = Vec::new();
    for image in ["nginx:1.27", "NGINX:latest"] {
        let review = common::admission_review(
            common::pod("shop", &[], &[("app", image)], None),
            "CREATE",
            "shop",
        );
        let response = client.post(&url).json(&review).send().await.unwrap();
        assert_eq!(response.status(), 200);
        let body = response.bytes().await.unwrap();
        common::check_response(&review, &body);
        uids.push(common::uid_of(&review).to_owned());
    }
    let (clean, warned) = (&uids[0], &uids[1]);
    let reviewed = |uid: &str| {
        process
            .log
            .lock()
            .unwrap()
            .iter()
            .find(|event| event["message"] == "admission reviewed" && event["uid"] == uid)
            .cloned()
    };
    let deadline = Instant::now() + Duration::from_secs(5);
    let line = loop {
        if let Some(line) = reviewed(warned) {
            break line;
        }
        assert!(
            Instant::now() < deadline,
            "no log line for the warned review"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(line["level"], "INFO");
    assert_eq!(line["unparsable"], 1);
    assert_eq!(line["namespace"], "shop");
    // The `?timeout=10s` of the URL, as read for the wait on pull secrets.
    assert_eq!(line["apiserver_timeout_ms"], 10_000);
    // Lines arrive in order: the clean review's would be there by now.
    assert_eq!(reviewed(clean), None);
}
