//! The real binary refuses flag values that parse but make no sense (a
//! `--namespace` that is not a namespace name, a zero timeout, a busy reload
//! interval, no certificate outside development) before it serves anything.

use std::io::{BufRead as _, BufReader};
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::time::{Duration, Instant};

mod common;

/// The binary with its output captured.
fn command() -> Command {
    let mut command = common::binary();
    command.stdout(Stdio::piped()).stderr(Stdio::piped());
    command
}

/// The child's output once it exits; `None` (and the child killed) when it
/// is still running at the deadline, as a server that accepted the flag is.
fn output_within(mut child: Child, deadline: Duration) -> Option<Output> {
    let start = Instant::now();
    while start.elapsed() < deadline {
        if child.try_wait().unwrap().is_some() {
            return Some(child.wait_with_output().unwrap());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    None
}

fn serve(dir: &Path) -> Command {
    let mut command = serve_leaving_the_api_to_the_environment(dir);
    command.arg("--no-api");
    command
}

fn serve_leaving_the_api_to_the_environment(dir: &Path) -> Command {
    serve_on(dir, "127.0.0.1:0", "127.0.0.1:0")
}

fn serve_on(dir: &Path, listen: &str, metrics_listen: &str) -> Command {
    let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tls");
    let config = dir.join("config.yaml");
    std::fs::write(&config, "rules: []\n").unwrap();
    let mut command = command();
    command
        .arg("serve")
        .arg("--config")
        .arg(config)
        .arg("--tls-cert")
        .arg(fixtures.join("ec.crt"))
        .arg("--tls-key")
        .arg(fixtures.join("ec-pkcs8.key"))
        .args(["--listen", listen])
        .args(["--metrics-listen", metrics_listen]);
    command
}

#[test]
fn serve_names_the_listener_whose_address_is_taken() {
    let dir = tempfile::tempdir().unwrap();
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let taken = taken.local_addr().unwrap().to_string();
    for (listen, metrics_listen, flag) in [
        (taken.as_str(), "127.0.0.1:0", "--listen"),
        ("127.0.0.1:0", taken.as_str(), "--metrics-listen"),
    ] {
        let mut serve = serve_on(dir.path(), listen, metrics_listen);
        let child = serve.arg("--no-api").spawn().unwrap();
        let output =
            output_within(child, Duration::from_secs(10)).expect("serving on a taken address");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(1), "stderr: {stderr}");
        assert!(
            stderr.contains(&format!("cannot listen on {flag} {taken}: ")),
            "stderr: {stderr}"
        );
    }
}

fn assert_refused_naming_the_flag(output: Option<Output>, value: &str) {
    let output = output.expect("still serving with a namespace that is no namespace name");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "stderr: {stderr}");
    assert!(
        stderr.contains("--namespace / IMAGE_REWRITER_NAMESPACE")
            && stderr.contains(&format!("{value:?}")),
        "stderr: {stderr}"
    );
}

#[test]
fn serve_refuses_a_namespace_that_is_no_namespace_name_by_flag_or_variable() {
    let dir = tempfile::tempdir().unwrap();
    let mut by_flag = serve(dir.path());
    by_flag.args(["--namespace", "Image-Rewriter"]);
    let mut by_variable = serve(dir.path());
    by_variable.env("IMAGE_REWRITER_NAMESPACE", "image_rewriter");
    for (mut serve, value) in [(by_flag, "Image-Rewriter"), (by_variable, "image_rewriter")] {
        let child = serve.spawn().unwrap();
        assert_refused_naming_the_flag(output_within(child, Duration::from_secs(10)), value);
    }
}

#[test]
fn mutate_refuses_a_namespace_that_is_no_namespace_name() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("config.yaml");
    std::fs::write(&config, "rules: []\n").unwrap();
    let pod = dir.path().join("pod.yaml");
    std::fs::write(
        &pod,
        "apiVersion: v1\nkind: Pod\nmetadata: {name: p}\nspec:\n  containers: [{name: c, image: nginx}]\n",
    )
    .unwrap();
    let child = command()
        .arg("mutate")
        .arg("--config")
        .arg(&config)
        .arg("-f")
        .arg(&pod)
        .args(["--namespace", "a.b"])
        .spawn()
        .unwrap();
    assert_refused_naming_the_flag(output_within(child, Duration::from_secs(10)), "a.b");
}

/// A zero timeout would cut every client off, a reload interval of a few
/// milliseconds would read the files in a loop, a body limit under an
/// UPDATE review's size would refuse some, one past 1 GiB is no review's,
/// no connection slot would accept no connection: refused as usage errors
/// (exit 2) naming the flag.
#[test]
fn serve_refuses_flag_values_that_cannot_work() {
    for (flag, value, why) in [
        ("--header-read-timeout", "0s", "more than 0"),
        ("--body-read-timeout", "0s", "more than 0"),
        ("--reload-interval", "0s", "at least 100ms"),
        ("--reload-interval", "10ms", "at least 100ms"),
        ("--max-body-bytes", "1048576", "at least 7340032"),
        ("--max-body-bytes", "1073741825", "at most 1073741824"),
        ("--worker-threads", "0", "from 1 to 256"),
        ("--worker-threads", "257", "from 1 to 256"),
        ("--max-connections", "0", "from 1 to 4294967295"),
        ("--max-connections", "4294967296", "from 1 to 4294967295"),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let child = serve(dir.path()).args([flag, value]).spawn().unwrap();
        let output = output_within(child, Duration::from_secs(10))
            .unwrap_or_else(|| panic!("still serving with {flag} {value}"));
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(2), "{flag} {value}: {stderr}");
        assert!(
            stderr.contains(flag) && stderr.contains(why),
            "{flag} {value}: {stderr}"
        );
    }
}

/// What a server printed to stdout up to its `listening` line (it is then
/// stopped); `None` when it exited first. Waiting for the line, not a fixed
/// time, keeps a slow machine from stopping it before it logged its start.
fn log_until_listening(mut child: Child) -> Option<String> {
    let stdout = child.stdout.take().expect("piped stdout");
    let (lines, received) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if lines.send(line).is_err() {
                break;
            }
        }
    });
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut log = String::new();
    let listening = loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match received.recv_timeout(left) {
            Ok(line) => {
                // The `listening` event, in the text or the JSON format.
                let listening = line.contains("listening") && line.contains("https_addr");
                log.push_str(&line);
                log.push('\n');
                if listening {
                    break true;
                }
            }
            Err(RecvTimeoutError::Disconnected) => break false,
            Err(RecvTimeoutError::Timeout) => {
                let _ = child.kill();
                panic!("no listening line within 30 s; stdout so far:\n{log}")
            }
        }
    };
    let _ = child.kill();
    let _ = child.wait();
    listening.then_some(log)
}

/// The server's runtime has the worker threads asked for, by flag or
/// variable; by default one per CPU it may use, at most 2 (not one per CPU
/// of a large node, each with its own allocator caches).
#[test]
fn serve_runs_the_worker_threads_asked_for_and_by_default_at_most_two() {
    let dir = tempfile::tempdir().unwrap();
    let cpus = std::thread::available_parallelism().unwrap().get();
    let by_flag = |threads: &str| {
        let mut serve = serve(dir.path());
        serve.args(["--worker-threads", threads]);
        serve
    };
    let by_variable = |threads: &str| {
        let mut serve = serve(dir.path());
        serve.env("IMAGE_REWRITER_WORKER_THREADS", threads);
        serve
    };
    for (mut serve, expected) in [
        (serve(dir.path()), cpus.min(2)),
        (by_flag("3"), 3),
        (by_flag("1"), 1),
        (by_variable("6"), 6),
    ] {
        let log = log_until_listening(serve.spawn().unwrap()).expect("the server stopped");
        let field = format!("worker_threads={expected}");
        assert!(
            log.split_whitespace().any(|word| word == field),
            "expected {expected} worker threads: {log}"
        );
    }
}

/// A valid config whose rule's target lies under another rule's match is
/// served, and its log says what `check-config` says of it.
#[test]
fn serve_logs_a_target_under_another_rules_match() {
    let dir = tempfile::tempdir().unwrap();
    let mut serve = serve(dir.path());
    // The file `serve` names, rewritten.
    std::fs::write(
        dir.path().join("config.yaml"),
        "rules:\n  - match: docker.io\n    target: harbor.corp.example/dockerhub\n\
         \x20 - match: harbor.corp.example\n    target: harbor-new.corp.example/old\n",
    )
    .unwrap();
    let log = log_until_listening(serve.spawn().unwrap()).expect("the server stopped");
    assert!(
        log.lines().any(|line| line.contains("WARN")
            && line.contains(
                "rules[0].target \"harbor.corp.example/dockerhub\" lies under rules[1].match"
            )),
        "{log}"
    );
}

#[test]
fn serve_reads_no_api_from_its_variable_in_the_usual_spellings() {
    let dir = tempfile::tempdir().unwrap();
    // With the API wanted but no way to reach it, the server says so once.
    const NO_API_CONFIGURATION: &str = "no Kubernetes API configuration";
    for (value, no_api) in [
        ("1", true),
        ("yes", true),
        ("on", true),
        ("true", true),
        ("0", false),
        ("no", false),
        ("off", false),
    ] {
        let mut serve = serve_leaving_the_api_to_the_environment(dir.path());
        serve
            .env("IMAGE_REWRITER_NO_API", value)
            .env("KUBECONFIG", dir.path().join("no-such-kubeconfig"))
            .env_remove("KUBERNETES_SERVICE_HOST");
        let log = log_until_listening(serve.spawn().unwrap())
            .unwrap_or_else(|| panic!("IMAGE_REWRITER_NO_API={value} stopped the server"));
        assert_eq!(
            !log.contains(NO_API_CONFIGURATION),
            no_api,
            "IMAGE_REWRITER_NO_API={value}: {log}"
        );
    }
    let mut serve = serve_leaving_the_api_to_the_environment(dir.path());
    serve.env("IMAGE_REWRITER_NO_API", "maybe");
    let output = output_within(serve.spawn().unwrap(), Duration::from_secs(10))
        .expect("still serving with IMAGE_REWRITER_NO_API=maybe");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(2), "stderr: {stderr}");
    assert!(stderr.contains("maybe"), "stderr: {stderr}");
}

/// In a pod whose service account token is not mounted, the sync cannot
/// reach the API: `serve` says so at `error` and serves on (a config with
/// no pull secrets needs no API; the admissions that give one warn).
#[test]
fn serve_in_a_pod_without_api_access_says_so_and_serves() {
    let in_cluster_token = Path::new("/var/run/secrets/kubernetes.io/serviceaccount/token");
    if in_cluster_token.exists() {
        eprintln!(
            "SKIPPED: this test plays a pod with no service account token, and this machine has one"
        );
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let mut serve = serve_leaving_the_api_to_the_environment(dir.path());
    serve
        .env_remove("IMAGE_REWRITER_NO_API")
        .env("KUBECONFIG", dir.path().join("no-such-kubeconfig"))
        .env("KUBERNETES_SERVICE_HOST", "10.96.0.1")
        .env("KUBERNETES_SERVICE_PORT", "443");
    let log = log_until_listening(serve.spawn().unwrap())
        .expect("serve stopped in a pod with no API access");
    let said = log
        .lines()
        .find(|line| line.contains("automountServiceAccountToken"))
        .unwrap_or_else(|| panic!("nothing said of the missing token: {log}"));
    assert!(said.contains("ERROR"), "{said}");
}

/// `IMAGE_REWRITER_DEV_SELF_SIGNED=false` is no development run: without
/// the config and certificate flags `serve` is a usage error, as with the
/// variable unset; and the throwaway certificate never silently replaces a
/// certificate that was given.
#[test]
fn serve_without_its_files_is_a_usage_error_whatever_the_dev_variable_says() {
    let dir = tempfile::tempdir().unwrap();
    for value in [None, Some("false"), Some("0"), Some("off")] {
        let mut serve = command();
        serve
            .args(["serve", "--no-api", "--listen", "127.0.0.1:0"])
            .args(["--metrics-listen", "127.0.0.1:0", "--dev-dir"])
            .arg(dir.path().join("dev"))
            .env_remove("IMAGE_REWRITER_CONFIG")
            .env_remove("IMAGE_REWRITER_TLS_CERT")
            .env_remove("IMAGE_REWRITER_TLS_KEY");
        match value {
            Some(value) => serve.env("IMAGE_REWRITER_DEV_SELF_SIGNED", value),
            None => serve.env_remove("IMAGE_REWRITER_DEV_SELF_SIGNED"),
        };
        let output = output_within(serve.spawn().unwrap(), Duration::from_secs(10))
            .unwrap_or_else(|| panic!("IMAGE_REWRITER_DEV_SELF_SIGNED={value:?} started a server"));
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(2), "{value:?}: {stderr}");
        assert!(stderr.contains("--tls-cert"), "{value:?}: {stderr}");
        assert!(
            !dir.path().join("dev").exists(),
            "{value:?}: a throwaway CA was written"
        );
    }

    let mut serve = serve(dir.path());
    serve.arg("--dev-self-signed");
    let output = output_within(serve.spawn().unwrap(), Duration::from_secs(10))
        .expect("--dev-self-signed with --tls-cert started a server");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("--dev-self-signed generates its own certificate"),
        "{stderr}"
    );
}

/// A Secret the API sends that its client cannot decode: kube-client logs
/// the whole response at `warn` (`Client::request`), data included. The
/// default log level keeps that line out, so no Secret's content reaches the
/// log; what failed is still said, by the sync's own error line.
#[test]
fn a_secret_the_client_cannot_decode_is_not_logged() {
    const TOKEN: &str = "s3cr3t-registry-token";
    let dir = tempfile::tempdir().unwrap();
    let api = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let api_addr = api.local_addr().unwrap();
    let requests = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counted = requests.clone();
    // Every GET answered with a Secret list whose one item's data is not
    // base64 (so it does not decode) and holds the token.
    std::thread::spawn(move || {
        for stream in api.incoming() {
            let Ok(mut stream) = stream else { break };
            counted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            let mut head = Vec::new();
            let mut byte = [0u8; 1];
            while !head.ends_with(b"\r\n\r\n") {
                match std::io::Read::read(&mut stream, &mut byte) {
                    Ok(1) => head.push(byte[0]),
                    _ => break,
                }
            }
            let body = format!(
                r#"{{"kind":"SecretList","apiVersion":"v1","metadata":{{"resourceVersion":"1"}},"items":[{{"metadata":{{"name":"harbor-pull","namespace":"image-rewriter"}},"type":"kubernetes.io/dockerconfigjson","data":{{".dockerconfigjson":"{TOKEN} is not base64"}}}}]}}"#
            );
            let response = format!(
                "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = std::io::Write::write_all(&mut stream, response.as_bytes());
        }
    });
    let kubeconfig = dir.path().join("kubeconfig");
    std::fs::write(
        &kubeconfig,
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: fake\n  cluster:\n    server: http://{api_addr}\n\
             users:\n- name: fake\n  user: {{}}\ncontexts:\n- name: fake\n  context: {{cluster: fake, user: fake}}\n\
             current-context: fake\n"
        ),
    )
    .unwrap();
    let mut serve = serve_leaving_the_api_to_the_environment(dir.path());
    std::fs::write(
        dir.path().join("config.yaml"),
        "rules:\n  - match: docker.io\n    target: harbor.example/hub\n    pullSecret: harbor-pull\n",
    )
    .unwrap();
    serve
        .args(["--namespace", "image-rewriter"])
        .env("KUBECONFIG", &kubeconfig)
        .env_remove("RUST_LOG")
        .env_remove("KUBERNETES_SERVICE_HOST");
    let mut child = serve.spawn().unwrap();
    // The watch lists at start, then again after its backoff: a few tries.
    let deadline = Instant::now() + Duration::from_secs(20);
    while requests.load(std::sync::atomic::Ordering::SeqCst) < 2 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    std::thread::sleep(Duration::from_millis(300));
    child.kill().unwrap();
    let output = child.wait_with_output().unwrap();
    let log = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(
        requests.load(std::sync::atomic::Ordering::SeqCst) >= 2,
        "the sync never listed the Secrets: {log}"
    );
    assert!(
        !log.contains(TOKEN),
        "a Secret's content was logged:\n{log}"
    );
    assert!(
        log.contains("pull secret watch failed; retrying secret=harbor-pull"),
        "the failed list is not on record in the sync's words:\n{log}"
    );
}
