//! Load benchmark of the real `image-rewriter serve` process, against a bare
//! rustls + hyper baseline that answers a fixed AdmissionReview of the same
//! size.
//!
//!     cargo run --release --example loadbench -- [--duration 10s] [--concurrency 32]
//!     cargo run --release --example loadbench -- --smoke            # ~1 s per mode (CI)
//!     cargo run --release --example loadbench -- --soak --requests 1000000
//!     cargo run --release --example loadbench -- --soak --requests 50000   # CI soak
//!
//! The server binary is `IMAGE_REWRITER_BIN` if set; otherwise the example
//! runs `cargo build --release --bin image-rewriter` itself (a no-op when it
//! is up to date; `--no-build` skips it) and uses `<target dir>/release/
//! image-rewriter`. Build the example with `--release` too: the load
//! generator shares the machine with the server.
//!
//! Placement (`--placement`, default `split` on 2 or more CPUs): the servers
//! run under `taskset` on the first half of the CPUs this process may use
//! (the smaller half of an odd count), the load generator (one runtime
//! worker per CPU) on the others, as when the apiserver runs on other cores
//! than the webhook. `shared` puts them all on every CPU; the generator then
//! competes with the server it measures, and the half-rate tails measure
//! that competition too (BENCHMARKS.md). The `gen %` column is the
//! generator's own CPU use over a run, as a share of what it can use; with
//! split CPUs, near 100% means the generator set the rate.
//!
//! What it does:
//! 1. Generates a CA and a serving certificate (ECDSA P-256, `certs::generate`)
//!    and a config with two rules; starts the server as a separate process
//!    and measures startup (process spawn to the first `/readyz` 200).
//! 2. Sends one apiserver-shaped CREATE review of a realistic pod (an init
//!    container and two containers, images from both rules), checks the
//!    answer (uid, patch applies, patched pod decodes, second review yields
//!    no patch) and keeps the response as the baseline's answer.
//! 3. Re-executes itself with `--baseline-server`: rustls + hyper, same
//!    certificate, reads the body and returns that fixed response.
//! 4. For each mode (HTTP/1.1 keep-alive, HTTP/2 on one connection, a new TLS
//!    connection per request), a fixed concurrency for a fixed time against
//!    ours and the baseline: requests/s, latency percentiles (hdrhistogram),
//!    errors, the server's peak RSS and CPU seconds per 1000 requests
//!    (`/proc/<pid>/stat`); then a rate-limited run at half of our measured
//!    peak rate in the keep-alive modes, requests released evenly spaced by
//!    a pacing thread (open loop: latency is also reported from each
//!    request's scheduled start). Each run is repeated `--rounds` times
//!    (default 3), ours and the baseline alternating; ratios and goals use
//!    the medians. The keep-alive modes send with hyper's HTTP/1.1 client
//!    connections (one per worker) and the h2 crate (one connection for all
//!    workers); new connections and the soak with reqwest (in the
//!    keep-alive modes it cost the generator ~40 µs of CPU per HTTP/1.1
//!    request, these ~27; BENCHMARKS.md).
//!
//! `--soak` instead sends `--requests` requests (half the workers on HTTP/1.1
//! keep-alive, half on one HTTP/2 connection, plus a new-connection probe
//! every 100 ms) while the certificate is rotated (same CA, files swapped
//! atomically like the kubelet does) and the config rewritten (temp file +
//! rename) every second. It fails unless no request failed, no keep-alive
//! connection was dropped, the probes saw the rotated certificates, every
//! reload succeeded, and RSS at the end is within 10% of RSS after warm-up.
//!
//! The exit status is 1 when any request failed or a check did not hold;
//! the performance goals are reported, and only fail the run with
//! `--enforce-goals`.

use std::collections::{BTreeMap, HashSet};
use std::net::{SocketAddr, TcpListener as StdTcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

#[path = "../tests/common/mod.rs"]
mod common;

use base64::Engine as _;
use clap::{Parser, ValueEnum};
use hdrhistogram::Histogram;
use serde_json::{Value, json};

const SERVICE_HOST: &str = "image-rewriter.image-rewriter.svc";
const UID_PLACEHOLDER: &str = "00000000-0000-4000-8000-000000000000";

const CONFIG_A: &str = "\
rules:
  - match: docker.io
    target: harbor.corp.example/dockerhub
    pullSecret: harbor-pull
  - match: quay.io
    target: harbor.corp.example/quay
    pullSecret: harbor-pull
";

/// The soak alternates with this one: a third rule and an exclusion that
/// do not change the answer for the benchmark pod.
const CONFIG_B: &str = "\
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
  namespaces: [legacy]
";

#[derive(Debug, Parser)]
#[command(about = "Load benchmark of image-rewriter serve against a bare rustls+hyper baseline")]
struct Args {
    /// Measured time per mode and server (after a warm-up).
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    duration: Duration,
    /// Requests in flight at once.
    #[arg(long, default_value_t = 32)]
    concurrency: usize,
    /// Modes to run.
    #[arg(long, value_enum, value_delimiter = ',', default_values_t = [Mode::H1, Mode::H2, Mode::NewConn])]
    modes: Vec<Mode>,
    /// The rate-limited run's rate, as a fraction of our peak rate.
    #[arg(long, default_value_t = 0.5)]
    rate_fraction: f64,
    /// How many times to start the server to measure startup.
    #[arg(long, default_value_t = 5)]
    startup_runs: usize,
    /// Runs per mode and server, ours and the baseline alternating; the
    /// rows show every round, the ratios and goals use the medians (peak:
    /// by requests/s; half rate: by p99). On a small shared machine one run
    /// can land in a fast or a slow scheduling pattern (the baseline's
    /// rate was seen at both ~35k and ~55k req/s in consecutive runs).
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// CI: each mode for about a second, one startup, one round.
    #[arg(long)]
    smoke: bool,
    /// Skip the baseline server.
    #[arg(long)]
    no_baseline: bool,
    /// Fail (exit 1) when a performance goal is missed, not only on errors.
    #[arg(long)]
    enforce_goals: bool,
    /// Soak: rotate the certificate and rewrite the config every second
    /// under load until `--requests` requests were answered.
    #[arg(long)]
    soak: bool,
    /// Requests the soak sends.
    #[arg(long, default_value_t = 1_000_000)]
    requests: u64,
    /// Use the server binary as it is, do not run `cargo build --release`.
    #[arg(long)]
    no_build: bool,
    /// Worker threads of the load generator's runtime [default: one per
    /// CPU of the load generator].
    #[arg(long)]
    client_threads: Option<usize>,
    /// Keep the temporary directory (certificates, configs, server logs,
    /// the request and the baseline's answer).
    #[arg(long)]
    keep_dir: bool,
    /// Where the servers and the load generator run. `split` (the default
    /// on 2 or more CPUs): the servers on half of this process's CPUs, the
    /// load generator on the others (the servers get the smaller half of an
    /// odd count). `shared`: the generator on every CPU, competing with the
    /// server it measures (which runs on every CPU too, unless
    /// `--server-cpus`).
    #[arg(long, value_enum)]
    placement: Option<Placement>,
    /// The servers' CPUs (`taskset -c LIST`) instead of the first half;
    /// with `--placement split` the load generator gets the others.
    #[arg(long)]
    server_cpus: Option<String>,

    // Internal: the example re-executes itself as the baseline server.
    #[arg(long, hide = true)]
    baseline_server: bool,
    #[arg(long, hide = true)]
    port: Option<u16>,
    #[arg(long, hide = true)]
    cert: Option<PathBuf>,
    #[arg(long, hide = true)]
    key: Option<PathBuf>,
    #[arg(long, hide = true)]
    response: Option<PathBuf>,
    /// Internal, for scripts/h2load-compare.sh: the baseline server writes
    /// HTTP/2 answers through image-rewriter's own coalescing transport,
    /// so only the handler differs.
    #[arg(long, hide = true)]
    same_transport: bool,
}

fn parse_duration(text: &str) -> Result<Duration, String> {
    humantime::parse_duration(text).map_err(|e| e.to_string())
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Placement {
    /// Servers and load generator on separate CPUs.
    Split,
    /// Servers and load generator on the same CPUs.
    Shared,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Mode {
    /// HTTP/1.1, keep-alive connections (one per worker).
    H1,
    /// HTTP/2, all workers multiplexed on one connection.
    H2,
    /// A new TLS connection (full handshake) per request, HTTP/1.1.
    NewConn,
}

impl Mode {
    fn label(self) -> &'static str {
        match self {
            Self::H1 => "http1 keep-alive",
            Self::H2 => "http2",
            Self::NewConn => "new TLS conn/req",
        }
    }
}

fn main() -> ExitCode {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let args = Args::parse();
    if args.baseline_server {
        return baseline::main(&args);
    }
    let bin = match prepare(&args) {
        Ok(bin) => bin,
        Err(error) => {
            eprintln!("loadbench: {error:#}");
            return ExitCode::FAILURE;
        }
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(placed().client_threads)
        .enable_all()
        .build()
        .expect("tokio runtime");
    match runtime.block_on(run(args, bin)) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(error) => {
            eprintln!("loadbench: {error:#}");
            ExitCode::FAILURE
        }
    }
}

// ---------------------------------------------------------------------------
// Processes and /proc.
// ---------------------------------------------------------------------------

/// Builds (or finds) the server binary on every CPU, then moves this
/// process onto the load generator's CPUs. Runs on the main thread before
/// any other thread exists, so every thread the generator starts later
/// inherits its CPUs.
fn prepare(args: &Args) -> anyhow::Result<PathBuf> {
    let plan = CpuPlan::new(args.placement, args.server_cpus.as_deref())?;
    let bin = server_binary(args.no_build)?;
    plan.pin_generator()?;
    // More threads than cores only adds wake-ups and context switches on
    // the generator's side.
    let client_threads = args
        .client_threads
        .unwrap_or_else(|| plan.generator_cpu_count())
        .max(1);
    let _ = PLACED.set(Placed {
        plan,
        client_threads,
    });
    Ok(bin)
}

/// Where everything runs, fixed by [`prepare`] before the first server starts.
struct Placed {
    plan: CpuPlan,
    client_threads: usize,
}

impl Placed {
    /// Servers and generator on disjoint CPUs: only then does a busy
    /// generator mean the generator set the rate.
    fn split(&self) -> bool {
        self.plan.generator.is_some()
    }

    /// How many CPUs' worth of time the generator can use at most.
    fn generator_capacity(&self) -> f64 {
        self.client_threads.min(self.plan.generator_cpu_count()) as f64
    }
}

static PLACED: std::sync::OnceLock<Placed> = std::sync::OnceLock::new();

fn placed() -> &'static Placed {
    PLACED.get().expect("prepare() ran first")
}

/// Which CPUs the servers and the load generator get; `None` is every CPU
/// this process may use.
struct CpuPlan {
    own: Vec<usize>,
    servers: Option<Vec<usize>>,
    generator: Option<Vec<usize>>,
}

impl CpuPlan {
    fn new(placement: Option<Placement>, server_cpus: Option<&str>) -> anyhow::Result<Self> {
        let servers = server_cpus.map(parse_cpu_list).transpose()?;
        let own = own_cpus()?;
        if placement == Some(Placement::Shared) {
            return Ok(Self {
                own,
                servers,
                generator: None,
            });
        }
        let servers = match servers {
            Some(servers) => servers,
            None if own.len() >= 2 => own[..own.len() / 2].to_vec(),
            None => {
                anyhow::ensure!(
                    placement.is_none(),
                    "--placement split needs 2 CPUs (this process may use {}) or --server-cpus",
                    format_cpu_list(&own)
                );
                eprintln!("loadbench: one CPU: servers and load generator share it");
                return Ok(Self {
                    own,
                    servers: None,
                    generator: None,
                });
            }
        };
        let generator: Vec<usize> = own
            .iter()
            .copied()
            .filter(|cpu| !servers.contains(cpu))
            .collect();
        anyhow::ensure!(
            !generator.is_empty(),
            "--placement split: no CPU left for the load generator (this process may use {}, the servers get {})",
            format_cpu_list(&own),
            format_cpu_list(&servers)
        );
        Ok(Self {
            own,
            servers: Some(servers),
            generator: Some(generator),
        })
    }

    /// Moves this process's only thread onto the generator's CPUs.
    fn pin_generator(&self) -> anyhow::Result<()> {
        let Some(cpus) = &self.generator else {
            return Ok(());
        };
        let status = Command::new("taskset")
            .args(["-p", "-c", &format_cpu_list(cpus)])
            .arg(std::process::id().to_string())
            .stdout(Stdio::null())
            .status()
            .map_err(|error| anyhow::anyhow!("running taskset (util-linux): {error}"))?;
        anyhow::ensure!(status.success(), "taskset -p failed: {status}");
        Ok(())
    }

    /// How many CPUs the load generator runs on.
    fn generator_cpu_count(&self) -> usize {
        self.generator.as_ref().unwrap_or(&self.own).len()
    }

    fn describe(&self) -> String {
        match (&self.servers, &self.generator) {
            (Some(servers), Some(generator)) => format!(
                "CPUs (split): servers on {} (taskset), load generator on {}",
                format_cpu_list(servers),
                format_cpu_list(generator)
            ),
            (Some(servers), None) => format!(
                "CPUs (shared): servers on {} (taskset), load generator on {}",
                format_cpu_list(servers),
                format_cpu_list(&self.own)
            ),
            (None, _) => format!(
                "CPUs (shared): servers and load generator on {}",
                format_cpu_list(&self.own)
            ),
        }
    }
}

/// Linux's own limit (`CONFIG_NR_CPUS` at most 8192).
const MAX_CPU: usize = 8191;

/// `0-2,5` -> [0, 1, 2, 5].
fn parse_cpu_list(list: &str) -> anyhow::Result<Vec<usize>> {
    let mut cpus = Vec::new();
    for part in list
        .split(',')
        .map(str::trim)
        .filter(|part| !part.is_empty())
    {
        let parse = |cpu: &str| {
            cpu.trim()
                .parse::<usize>()
                .map_err(|_| anyhow::anyhow!("not a CPU list: {list:?}"))
        };
        let (first, last) = match part.split_once('-') {
            Some((first, last)) => (parse(first)?, parse(last)?),
            None => (parse(part)?, parse(part)?),
        };
        anyhow::ensure!(
            first <= last && last <= MAX_CPU,
            "not a CPU list: {list:?} (ranges low-high, CPUs up to {MAX_CPU})"
        );
        cpus.extend(first..=last);
    }
    anyhow::ensure!(!cpus.is_empty(), "not a CPU list: {list:?}");
    cpus.sort_unstable();
    cpus.dedup();
    Ok(cpus)
}

fn format_cpu_list(cpus: &[usize]) -> String {
    let names: Vec<String> = cpus.iter().map(usize::to_string).collect();
    names.join(",")
}

/// The CPUs this process may run on (`Cpus_allowed_list`; without /proc,
/// the first `available_parallelism` CPUs).
fn own_cpus() -> anyhow::Result<Vec<usize>> {
    let listed = std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find_map(|line| line.strip_prefix("Cpus_allowed_list:"))
                .map(|list| list.trim().to_owned())
        });
    match listed {
        Some(list) => parse_cpu_list(&list),
        None => Ok((0..std::thread::available_parallelism().map_or(1, usize::from)).collect()),
    }
}

fn target_dir() -> anyhow::Result<PathBuf> {
    // <target>/<profile>/examples/loadbench
    let exe = std::env::current_exe()?;
    exe.ancestors()
        .nth(3)
        .map(Path::to_path_buf)
        .ok_or_else(|| anyhow::anyhow!("cannot locate the target directory from {exe:?}"))
}

/// The server binary: `IMAGE_REWRITER_BIN`, or a fresh release build.
fn server_binary(no_build: bool) -> anyhow::Result<PathBuf> {
    if let Some(bin) = std::env::var_os("IMAGE_REWRITER_BIN") {
        return Ok(PathBuf::from(bin));
    }
    let target = target_dir()?;
    if !no_build {
        let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
        let manifest = Path::new(env!("CARGO_MANIFEST_DIR")).join("Cargo.toml");
        eprintln!("loadbench: cargo build --release --bin image-rewriter");
        let status = Command::new(cargo)
            .args(["build", "--release", "--quiet", "--bin", "image-rewriter"])
            .arg("--manifest-path")
            .arg(&manifest)
            .env("CARGO_TARGET_DIR", &target)
            .status()?;
        anyhow::ensure!(status.success(), "cargo build --release failed");
    }
    let bin = target.join("release").join("image-rewriter");
    anyhow::ensure!(
        bin.exists(),
        "{} is missing: run `cargo build --release` first, or set IMAGE_REWRITER_BIN",
        bin.display()
    );
    Ok(bin)
}

fn free_port() -> anyhow::Result<u16> {
    Ok(StdTcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// A child process, ended when dropped: SIGTERM, then SIGKILL if it has not
/// exited within [`Proc::TERM_GRACE`]. A clean exit is what lets a server
/// built with `-Cprofile-generate` write its profile (scripts/pgo-build.sh
/// trains with this program); the servers exit at once on SIGTERM, as
/// nothing is in flight when a run ends.
struct Proc {
    child: Child,
}

impl Proc {
    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    const TERM_GRACE: Duration = Duration::from_secs(5);
}

impl Drop for Proc {
    fn drop(&mut self) {
        // Reaped already (it exited early): its pid may be another process's now.
        if self.exited().is_some() {
            return;
        }
        let terminated = rustix::process::Pid::from_raw(self.pid() as i32).is_some_and(|pid| {
            rustix::process::kill_process(pid, rustix::process::Signal::TERM).is_ok()
        });
        if terminated {
            let deadline = Instant::now() + Self::TERM_GRACE;
            while Instant::now() < deadline {
                if self.exited().is_some() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(10));
            }
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn clock_ticks() -> f64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(100.0)
}

/// `VmRSS`, `VmHWM` and the like from `/proc/<pid>/status`, in KiB.
fn proc_status_kib(pid: u32, field: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|line| line.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|rest| rest.split_whitespace().next()?.parse().ok())
}

/// utime + stime of `/proc/<pid>/stat`, in clock ticks.
fn proc_cpu_ticks(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    // Field 14 (utime) and 15 (stime); the first field after ')' is field 3.
    Some(fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?)
}

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

// ---------------------------------------------------------------------------
// Certificates and files.
// ---------------------------------------------------------------------------

struct Pki {
    ca_pem: String,
    issuer: rcgen::Issuer<'static, rcgen::KeyPair>,
}

impl Pki {
    fn new() -> anyhow::Result<Self> {
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new())?;
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Constrained(0));
        params.key_usages = vec![
            rcgen::KeyUsagePurpose::KeyCertSign,
            rcgen::KeyUsagePurpose::CrlSign,
        ];
        let mut name = rcgen::DistinguishedName::new();
        name.push(rcgen::DnType::CommonName, "loadbench CA");
        params.distinguished_name = name;
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
        let ca_pem = params.self_signed(&key)?.pem();
        Ok(Self {
            ca_pem,
            issuer: rcgen::Issuer::new(params, key),
        })
    }

    /// A fresh serving certificate (new key) for the Service DNS names.
    fn serving_pair(&self) -> anyhow::Result<(String, String)> {
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
        let names = image_rewriter::certs::service_dns_names("image-rewriter", "image-rewriter");
        let mut params = rcgen::CertificateParams::new(names)?;
        params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth];
        let cert = params.signed_by(&key, &self.issuer)?;
        Ok((cert.pem(), key.serialize_pem()))
    }
}

/// Writes `files` into `dir` the way the kubelet updates a mounted Secret:
/// a new versioned directory, the `..data` symlink swapped by rename, stable
/// symlinks to `..data/<name>`. Certificate and key change together.
fn write_atomically(dir: &Path, files: &[(&str, &[u8])]) -> anyhow::Result<()> {
    static VERSION: AtomicU64 = AtomicU64::new(0);
    std::fs::create_dir_all(dir)?;
    let version = format!("..v{}", VERSION.fetch_add(1, Ordering::Relaxed));
    std::fs::create_dir(dir.join(&version))?;
    for (name, content) in files {
        std::fs::write(dir.join(&version).join(name), content)?;
    }
    let previous = std::fs::read_link(dir.join("..data")).ok();
    let _ = std::fs::remove_file(dir.join("..data_tmp"));
    std::os::unix::fs::symlink(&version, dir.join("..data_tmp"))?;
    std::fs::rename(dir.join("..data_tmp"), dir.join("..data"))?;
    for (name, _) in files {
        let link = dir.join(name);
        if std::fs::symlink_metadata(&link).is_err() {
            std::os::unix::fs::symlink(Path::new("..data").join(name), link)?;
        }
    }
    if let Some(previous) = previous {
        std::fs::remove_dir_all(dir.join(previous))?;
    }
    Ok(())
}

/// Replaces `path` by writing a temporary file beside it and renaming it.
fn replace_file(path: &Path, content: &[u8]) -> anyhow::Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, content)?;
    std::fs::rename(&tmp, path)?;
    Ok(())
}

struct Files {
    dir: tempfile::TempDir,
    pki: Pki,
}

impl Files {
    fn new() -> anyhow::Result<Self> {
        let files = Self {
            dir: tempfile::Builder::new().prefix("loadbench-").tempdir()?,
            pki: Pki::new()?,
        };
        files.rotate_certificate()?;
        replace_file(&files.config(), CONFIG_A.as_bytes())?;
        Ok(files)
    }

    fn config(&self) -> PathBuf {
        self.dir.path().join("config.yaml")
    }

    fn cert(&self) -> PathBuf {
        self.dir.path().join("tls/tls.crt")
    }

    fn key(&self) -> PathBuf {
        self.dir.path().join("tls/tls.key")
    }

    fn rotate_certificate(&self) -> anyhow::Result<()> {
        let (cert, key) = self.pki.serving_pair()?;
        write_atomically(
            &self.dir.path().join("tls"),
            &[("tls.crt", cert.as_bytes()), ("tls.key", key.as_bytes())],
        )
    }
}

// ---------------------------------------------------------------------------
// The client side.
// ---------------------------------------------------------------------------

#[derive(Clone)]
struct Endpoint {
    addr: SocketAddr,
    root: reqwest::Certificate,
    /// For new connections: only our CA, HTTP/1.1, no session resumption
    /// (every request pays the full handshake, as a client without a
    /// session cache does).
    fresh_tls: rustls::ClientConfig,
}

impl Endpoint {
    fn new(addr: SocketAddr, ca_pem: &str) -> anyhow::Result<Self> {
        use rustls::pki_types::CertificateDer;
        use rustls::pki_types::pem::PemObject as _;
        let mut roots = rustls::RootCertStore::empty();
        for cert in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
            roots.add(cert?)?;
        }
        let mut fresh_tls = rustls::ClientConfig::builder()
            .with_root_certificates(roots)
            .with_no_client_auth();
        fresh_tls.alpn_protocols = vec![b"http/1.1".to_vec()];
        fresh_tls.resumption = rustls::client::Resumption::disabled();
        Ok(Self {
            addr,
            root: reqwest::Certificate::from_pem(ca_pem.as_bytes())?,
            fresh_tls,
        })
    }

    fn url(&self, path: &str) -> String {
        format!("https://{SERVICE_HOST}:{}{path}", self.addr.port())
    }

    fn client(&self, mode: Mode) -> reqwest::Client {
        let builder = reqwest::Client::builder()
            .resolve(SERVICE_HOST, self.addr)
            .timeout(REQUEST_TIMEOUT)
            .tls_info(true);
        let builder = match mode {
            Mode::H1 => self.verified(builder).http1_only(),
            Mode::H2 => self.verified(builder).http2_prior_knowledge(),
            Mode::NewConn => builder
                .use_preconfigured_tls(self.fresh_tls.clone())
                .pool_max_idle_per_host(0),
        };
        builder.build().expect("reqwest client")
    }

    /// TLS for [`Lane`]s: our CA, `alpn` only, sessions resumed.
    fn lane_tls(&self, alpn: &[u8]) -> Arc<rustls::ClientConfig> {
        let mut tls = self.fresh_tls.clone();
        tls.alpn_protocols = vec![alpn.to_vec()];
        tls.resumption = rustls::client::Resumption::default();
        Arc::new(tls)
    }

    fn verified(&self, builder: reqwest::ClientBuilder) -> reqwest::ClientBuilder {
        builder
            .use_rustls_tls()
            .tls_built_in_root_certs(false)
            .add_root_certificate(self.root.clone())
    }
}

/// The review body, with the uid to be filled in per request.
struct Payload {
    prefix: Vec<u8>,
    suffix: Vec<u8>,
}

impl Payload {
    fn new(review: &Value) -> Self {
        let text = serde_json::to_string(review).expect("serializes");
        let (prefix, suffix) = text
            .split_once(UID_PLACEHOLDER)
            .expect("the review carries the placeholder uid");
        Self {
            prefix: prefix.as_bytes().to_vec(),
            suffix: suffix.as_bytes().to_vec(),
        }
    }

    fn body(&self, uid: &str) -> Vec<u8> {
        let mut body = Vec::with_capacity(self.prefix.len() + uid.len() + self.suffix.len());
        body.extend_from_slice(&self.prefix);
        body.extend_from_slice(uid.as_bytes());
        body.extend_from_slice(&self.suffix);
        body
    }

    fn len(&self) -> usize {
        self.prefix.len() + UID_PLACEHOLDER.len() + self.suffix.len()
    }
}

fn uid(run: u32, seq: u64) -> String {
    format!("{run:08x}-0000-4000-8000-{:012x}", seq & 0xffff_ffff_ffff)
}

/// A Deployment's pod as the apiserver sends it after defaulting: an init
/// container and two containers, images from both rules.
fn sample_pod() -> Value {
    json!({
        "kind": "Pod",
        "apiVersion": "v1",
        "metadata": {
            "generateName": "web-7d4b9c8f6-",
            "namespace": "team-a",
            "creationTimestamp": null,
            "labels": {"app.kubernetes.io/name": "web", "pod-template-hash": "7d4b9c8f6"},
            "annotations": {"kubectl.kubernetes.io/restartedAt": "2025-01-01T00:00:00Z"},
            "ownerReferences": [{
                "apiVersion": "apps/v1", "kind": "ReplicaSet", "name": "web-7d4b9c8f6",
                "uid": "0f1e2d3c-4b5a-6978-8a9b-0c1d2e3f4a5b", "controller": true, "blockOwnerDeletion": true
            }],
            "managedFields": [{
                "manager": "kube-controller-manager", "operation": "Update", "apiVersion": "v1",
                "time": "2025-01-01T00:00:00Z", "fieldsType": "FieldsV1",
                "fieldsV1": {"f:metadata": {"f:generateName": {}, "f:labels": {".": {}, "f:app.kubernetes.io/name": {}, "f:pod-template-hash": {}}}}
            }]
        },
        "spec": {
            "volumes": [{"name": "kube-api-access-x7k2p", "projected": {"sources": [
                {"serviceAccountToken": {"expirationSeconds": 3607, "path": "token"}},
                {"configMap": {"name": "kube-root-ca.crt", "items": [{"key": "ca.crt", "path": "ca.crt"}]}},
                {"downwardAPI": {"items": [{"path": "namespace", "fieldRef": {"apiVersion": "v1", "fieldPath": "metadata.namespace"}}]}}
            ], "defaultMode": 420}}],
            "initContainers": [common::container("init", "busybox:1.36")],
            "containers": [
                common::container("web", "nginx:1.27"),
                common::container("exporter", "quay.io/prometheus/node-exporter:v1.8.0"),
            ],
            "restartPolicy": "Always",
            "terminationGracePeriodSeconds": 30,
            "dnsPolicy": "ClusterFirst",
            "serviceAccountName": "default",
            "serviceAccount": "default",
            "securityContext": {},
            "schedulerName": "default-scheduler",
            "tolerations": [
                {"key": "node.kubernetes.io/not-ready", "operator": "Exists", "effect": "NoExecute", "tolerationSeconds": 300},
                {"key": "node.kubernetes.io/unreachable", "operator": "Exists", "effect": "NoExecute", "tolerationSeconds": 300}
            ],
            "priority": 0,
            "enableServiceLinks": true,
            "preemptionPolicy": "PreemptLowerPriority"
        },
        "status": {}
    })
}

fn create_review(pod: Value, uid: &str) -> Value {
    json!({
        "kind": "AdmissionReview",
        "apiVersion": "admission.k8s.io/v1",
        "request": {
            "uid": uid,
            "kind": {"group": "", "version": "v1", "kind": "Pod"},
            "resource": {"group": "", "version": "v1", "resource": "pods"},
            "requestKind": {"group": "", "version": "v1", "kind": "Pod"},
            "requestResource": {"group": "", "version": "v1", "resource": "pods"},
            "namespace": "team-a",
            "operation": "CREATE",
            "userInfo": {
                "username": "system:serviceaccount:kube-system:replicaset-controller",
                "uid": "6b0c3b2c-3c9a-4a57-9d6c-1f7e6ab3d0a1",
                "groups": ["system:serviceaccounts", "system:serviceaccounts:kube-system", "system:authenticated"]
            },
            "object": pod,
            "oldObject": null,
            "dryRun": false,
            "options": {"kind": "CreateOptions", "apiVersion": "meta.k8s.io/v1"}
        }
    })
}

/// How a load response is judged.
#[derive(Clone, Copy)]
enum Check {
    /// Ours: 200 and the request's uid in the answer.
    Uid,
    /// Baseline: 200 and the fixed answer's length.
    Length(usize),
}

async fn post(
    client: &reqwest::Client,
    url: &str,
    body: Vec<u8>,
    uid: &str,
    check: Check,
) -> Result<reqwest::Version, String> {
    let response = client
        .post(url)
        .header("Content-Type", "application/json")
        .body(body)
        .send()
        .await
        .map_err(|e| format!("{e:?}"))?;
    let status = response.status();
    let version = response.version();
    let bytes = response.bytes().await.map_err(|e| format!("{e:?}"))?;
    check_answer(status, version, &bytes, uid, check)
}

/// The answer as the load runs accept it: 200, and the request's uid (ours)
/// or the fixed answer's length (the baseline).
fn check_answer(
    status: hyper::StatusCode,
    version: hyper::Version,
    bytes: &[u8],
    uid: &str,
    check: Check,
) -> Result<reqwest::Version, String> {
    if status != 200 {
        return Err(format!(
            "status {status}: {}",
            String::from_utf8_lossy(&bytes[..bytes.len().min(200)])
        ));
    }
    let ok = match check {
        Check::Uid => bytes
            .windows(uid.len())
            .any(|window| window == uid.as_bytes()),
        Check::Length(len) => bytes.len() == len,
    };
    if ok {
        Ok(version)
    } else {
        Err(format!(
            "unexpected answer: {}",
            String::from_utf8_lossy(&bytes[..bytes.len().min(200)])
        ))
    }
}

/// The keep-alive modes' client: hyper's client connections over
/// tokio-rustls, driven directly. reqwest (still used for new connections,
/// the soak and the checks) parses the URL, checks its pool out and back
/// and keeps redirect state on every request: on the generator's one core
/// that cost about as much per request as the server under test, and the
/// paced runs, where the generator must keep to the schedule, measured the
/// generator's queueing as much as the server.
///
/// A worker's lane holds its HTTP/1.1 connection, or its handle on the
/// run's one HTTP/2 connection. After an error or a timeout the worker
/// opens a connection of its own on its next request, as a pooling client
/// would (the run has failed by then: it fails on any error).
struct Lane {
    addr: SocketAddr,
    /// Offers exactly one protocol: the one the lane speaks.
    tls: Arc<rustls::ClientConfig>,
    host: String,
    target: hyper::Uri,
    connection: Option<Connection>,
}

enum Connection {
    Http1(hyper::client::conn::http1::SendRequest<LaneBody>),
    /// The h2 crate itself: hyper's HTTP/2 client spawns a task per
    /// request body and hands each request to the connection through a
    /// channel, which kept the generator at its limit over HTTP/2.
    Http2(h2::client::SendRequest<bytes::Bytes>),
}

type LaneBody = http_body_util::Full<bytes::Bytes>;

type Answer = (hyper::StatusCode, hyper::Version, bytes::Bytes);

/// What the apiserver allows a webhook call at most, and the URL's
/// `timeout` parameter.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
const MUTATE_PATH: &str = "/mutate?timeout=10s";

impl Lane {
    fn new(
        addr: SocketAddr,
        tls: Arc<rustls::ClientConfig>,
        connection: Option<Connection>,
    ) -> Self {
        let host = format!("{SERVICE_HOST}:{}", addr.port());
        let target = format!("https://{host}{MUTATE_PATH}")
            .parse()
            .expect("a valid URI");
        Self {
            addr,
            tls,
            host,
            target,
            connection,
        }
    }

    /// A new connection in the protocol `tls` offers.
    async fn open(addr: SocketAddr, tls: &Arc<rustls::ClientConfig>) -> anyhow::Result<Connection> {
        if tls.alpn_protocols.iter().any(|protocol| protocol == b"h2") {
            return Ok(Connection::Http2(Self::open_http2(addr, tls).await?));
        }
        let stream = lane_connect(addr, tls.clone()).await?;
        let (sender, driver) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream)).await?;
        tokio::spawn(driver);
        Ok(Connection::Http1(sender))
    }

    async fn open_http2(
        addr: SocketAddr,
        tls: &Arc<rustls::ClientConfig>,
    ) -> anyhow::Result<h2::client::SendRequest<bytes::Bytes>> {
        let stream = lane_connect(addr, tls.clone()).await?;
        let (sender, driver) = h2::client::handshake(stream).await?;
        tokio::spawn(driver);
        Ok(sender)
    }

    async fn post(
        &mut self,
        body: Vec<u8>,
        uid: &str,
        check: Check,
    ) -> Result<hyper::Version, String> {
        let answered = match tokio::time::timeout(REQUEST_TIMEOUT, self.send(body)).await {
            Ok(answered) => answered,
            Err(_) => Err(anyhow::anyhow!("no answer within {REQUEST_TIMEOUT:?}")),
        };
        match answered {
            Ok((status, version, bytes)) => check_answer(status, version, &bytes, uid, check),
            Err(error) => {
                self.connection = None;
                Err(format!("{error:#}"))
            }
        }
    }

    async fn send(&mut self, body: Vec<u8>) -> anyhow::Result<Answer> {
        // An HTTP/1.1 connection the server closed after its last answer
        // may not look closed yet; nothing has been sent on it, so a new
        // one takes the request.
        if let Some(Connection::Http1(sender)) = &mut self.connection
            && sender.ready().await.is_err()
        {
            self.connection = None;
        }
        let connection = match self.connection.take() {
            Some(connection) => connection,
            None => Self::open(self.addr, &self.tls).await?,
        };
        let length = body.len();
        match self.connection.insert(connection) {
            Connection::Http1(sender) => {
                let request = hyper::Request::post(MUTATE_PATH)
                    .header("host", &self.host)
                    .header("content-type", "application/json")
                    .header("content-length", length)
                    .body(LaneBody::new(body.into()))?;
                sender.ready().await?;
                let response = sender.send_request(request).await?;
                let status = response.status();
                let version = response.version();
                let bytes = http_body_util::BodyExt::collect(response.into_body())
                    .await?
                    .to_bytes();
                Ok((status, version, bytes))
            }
            Connection::Http2(sender) => {
                let request = hyper::Request::post(self.target.clone())
                    .header("content-type", "application/json")
                    .header("content-length", length)
                    .body(())?;
                let mut sender = sender.clone().ready().await?;
                let (response, mut stream) = sender.send_request(request, false)?;
                stream.send_data(body.into(), true)?;
                let response = response.await?;
                let status = response.status();
                let version = response.version();
                let mut answer = response.into_body();
                let mut bytes = bytes::BytesMut::new();
                while let Some(chunk) = answer.data().await {
                    let chunk = chunk?;
                    answer.flow_control().release_capacity(chunk.len())?;
                    bytes.extend_from_slice(&chunk);
                }
                Ok((status, version, bytes.freeze()))
            }
        }
    }
}

/// A TLS connection verified as `SERVICE_HOST` against the benchmark's CA,
/// with the one protocol `tls` offers.
async fn lane_connect(
    addr: SocketAddr,
    tls: Arc<rustls::ClientConfig>,
) -> anyhow::Result<tokio_rustls::client::TlsStream<tokio::net::TcpStream>> {
    let tcp = tokio::net::TcpStream::connect(addr).await?;
    tcp.set_nodelay(true)?;
    let name = rustls::pki_types::ServerName::try_from(SERVICE_HOST)?;
    let stream = tokio_rustls::TlsConnector::from(tls.clone())
        .connect(name, tcp)
        .await?;
    anyhow::ensure!(
        stream.get_ref().1.alpn_protocol() == tls.alpn_protocols.first().map(Vec::as_slice),
        "the server did not agree to {:?}",
        tls.alpn_protocols
    );
    Ok(stream)
}

/// Polls `/readyz` until it answers 200; the time since `spawned`.
async fn wait_ready(
    endpoint: &Endpoint,
    proc: &mut Proc,
    spawned: Instant,
) -> anyhow::Result<Duration> {
    let client = endpoint.client(Mode::H1);
    let url = endpoint.url("/readyz");
    let deadline = spawned + Duration::from_secs(30);
    loop {
        if let Ok(response) = client.get(&url).send().await
            && response.status() == 200
        {
            return Ok(spawned.elapsed());
        }
        if let Some(status) = proc.exited() {
            anyhow::bail!("the server exited before it was ready: {status}");
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "the server was not ready within 30 s"
        );
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

struct Started {
    proc: Proc,
    endpoint: Endpoint,
    metrics_addr: Option<SocketAddr>,
    startup: Duration,
}

/// A load generator this busy is what limits the rate it measures.
const GENERATOR_SATURATED: f64 = 0.95;

/// A command that runs `program` as a server: under `taskset` when the
/// servers have CPUs of their own (taskset execs it, so the pid is the
/// server's).
fn server_command(program: &Path) -> Command {
    match &placed().plan.servers {
        Some(cpus) => {
            let mut command = Command::new("taskset");
            command.args(["-c", &format_cpu_list(cpus)]).arg(program);
            command
        }
        None => Command::new(program),
    }
}

async fn start_ours(
    bin: &Path,
    files: &Files,
    reload_interval: &str,
    log: &Path,
) -> anyhow::Result<Started> {
    let port = free_port()?;
    let metrics_port = free_port()?;
    let mut command = server_command(bin);
    command
        .arg("serve")
        .arg("--config")
        .arg(files.config())
        .arg("--tls-cert")
        .arg(files.cert())
        .arg("--tls-key")
        .arg(files.key())
        .args(["--listen", &format!("127.0.0.1:{port}")])
        .args(["--metrics-listen", &format!("127.0.0.1:{metrics_port}")])
        .args(["--namespace", "image-rewriter"])
        .args(["--reload-interval", reload_interval])
        .args(["--shutdown-delay", "0s", "--shutdown-grace", "1s"])
        // Outside a cluster wherever it runs: in a pod, serve would want
        // that pod's API access.
        .env_remove("KUBERNETES_SERVICE_HOST");
    let metrics_addr = ([127, 0, 0, 1], metrics_port).into();
    start_server(command, port, Some(metrics_addr), files, log).await
}

async fn start_baseline(files: &Files, response: &Path, log: &Path) -> anyhow::Result<Started> {
    let port = free_port()?;
    let mut command = server_command(&std::env::current_exe()?);
    command
        .arg("--baseline-server")
        .args(["--port", &port.to_string()])
        .arg("--cert")
        .arg(files.cert())
        .arg("--key")
        .arg(files.key())
        .arg("--response")
        .arg(response);
    start_server(command, port, None, files, log).await
}

/// Spawns a server (its output to `log`) and waits until it is ready on
/// `port`; the startup time is measured from the spawn.
async fn start_server(
    mut command: Command,
    port: u16,
    metrics_addr: Option<SocketAddr>,
    files: &Files,
    log: &Path,
) -> anyhow::Result<Started> {
    let log = std::fs::File::create(log)?;
    let spawned = Instant::now();
    let child = command
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .spawn()?;
    let mut proc = Proc { child };
    let endpoint = Endpoint::new(([127, 0, 0, 1], port).into(), &files.pki.ca_pem)?;
    let startup = wait_ready(&endpoint, &mut proc, spawned).await?;
    Ok(Started {
        proc,
        endpoint,
        metrics_addr,
        startup,
    })
}

/// Sends one review to our server and checks the answer as the apiserver
/// would use it; returns the response body.
async fn capture_and_verify(endpoint: &Endpoint) -> anyhow::Result<Vec<u8>> {
    let client = endpoint.client(Mode::H1);
    let uid = "11111111-2222-4333-8444-555555555555";
    let review = create_review(sample_pod(), uid);
    let response = client
        .post(endpoint.url(MUTATE_PATH))
        .header("Content-Type", "application/json")
        .body(serde_json::to_vec(&review)?)
        .send()
        .await?;
    anyhow::ensure!(response.status() == 200, "status {}", response.status());
    let body = response.bytes().await?.to_vec();
    let answer: Value = serde_json::from_slice(&body)?;
    let inner = &answer["response"];
    anyhow::ensure!(inner["uid"] == uid, "uid mismatch: {answer}");
    anyhow::ensure!(inner["allowed"] == true, "not allowed: {answer}");
    anyhow::ensure!(inner["patchType"] == "JSONPatch", "no JSONPatch: {answer}");
    let patch_bytes = base64::engine::general_purpose::STANDARD
        .decode(inner["patch"].as_str().unwrap_or_default())?;
    let patch: json_patch::Patch = serde_json::from_slice(&patch_bytes)?;
    let mut pod = review["request"]["object"].clone();
    json_patch::patch(&mut pod, &patch)?;
    let typed: k8s_openapi::api::core::v1::Pod = serde_json::from_value(pod.clone())?;
    let spec = typed.spec.unwrap_or_default();
    let images: Vec<String> = spec
        .init_containers
        .iter()
        .flatten()
        .chain(&spec.containers)
        .filter_map(|c| c.image.clone())
        .collect();
    anyhow::ensure!(
        images
            == [
                "harbor.corp.example/dockerhub/library/busybox:1.36",
                "harbor.corp.example/dockerhub/library/nginx:1.27",
                "harbor.corp.example/quay/prometheus/node-exporter:v1.8.0",
            ],
        "unexpected images after the patch: {images:?}"
    );
    let again = create_review(pod, uid);
    let response = client
        .post(endpoint.url(MUTATE_PATH))
        .header("Content-Type", "application/json")
        .body(serde_json::to_vec(&again)?)
        .send()
        .await?;
    let second: Value = serde_json::from_slice(&response.bytes().await?)?;
    anyhow::ensure!(
        second["response"].get("patch").is_none(),
        "the second review patched again: {second}"
    );
    Ok(body)
}

// ---------------------------------------------------------------------------
// Load.
// ---------------------------------------------------------------------------

fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 60_000_000, 3).expect("histogram bounds")
}

#[derive(Default)]
struct Errors {
    count: AtomicU64,
    samples: Mutex<Vec<String>>,
}

impl Errors {
    fn record(&self, error: String) {
        self.count.fetch_add(1, Ordering::Relaxed);
        let mut samples = self.samples.lock().unwrap();
        if samples.len() < 5 {
            samples.push(error);
        }
    }
}

#[derive(Clone)]
struct LoadSpec {
    mode: Mode,
    concurrency: usize,
    warmup: Duration,
    duration: Duration,
    /// Requests per second, when rate-limited.
    rate: Option<f64>,
}

struct LoadResult {
    requests: u64,
    errors: u64,
    error_samples: Vec<String>,
    elapsed: Duration,
    /// Microseconds from send to the whole answer read.
    latency: Histogram<u64>,
    /// Rate-limited runs: microseconds from the scheduled start.
    from_schedule: Option<Histogram<u64>>,
    cpu_seconds: f64,
    /// The load generator's own CPU time over the run, as a share of what
    /// it can use (its CPUs, or its threads if fewer): near 1.0 with split
    /// CPUs, the generator, not the server, limited the run.
    generator_busy: f64,
    rss_max_kib: u64,
    version: Option<reqwest::Version>,
}

impl LoadResult {
    fn rps(&self) -> f64 {
        self.requests as f64 / self.elapsed.as_secs_f64()
    }

    fn ms(&self, quantile: f64) -> f64 {
        self.latency.value_at_quantile(quantile) as f64 / 1000.0
    }

    fn cpu_per_1000(&self) -> f64 {
        self.cpu_seconds / (self.requests.max(1) as f64 / 1000.0)
    }
}

/// Rate-limited runs: request numbers with their scheduled start, released
/// on time by [`pace`]; the first idle worker takes the next one.
type Schedule = tokio::sync::Mutex<tokio::sync::mpsc::UnboundedReceiver<(u64, Instant)>>;

/// Releases `rate` requests per second, evenly spaced, from `start` until
/// `deadline`, from a thread of its own: tokio's timer has a 1 ms
/// resolution, so sleeping on it released all the requests due within a
/// millisecond at once (bursts of `rate / 1000`), and their queueing showed
/// up in the latency as if the server had caused it.
fn pace(rate: f64, start: Instant, deadline: Instant) -> Arc<Schedule> {
    let (release, schedule) = tokio::sync::mpsc::unbounded_channel();
    // No rate (a peak run that answered nothing): release nothing.
    let rate = if rate.is_finite() && rate > 0.0 {
        rate
    } else {
        0.0
    };
    std::thread::spawn(move || {
        if rate == 0.0 {
            return;
        }
        for seq in 0u64.. {
            let at = start + Duration::from_secs_f64(seq as f64 / rate);
            if at >= deadline {
                break;
            }
            let now = Instant::now();
            if at > now {
                std::thread::sleep(at - now);
            }
            if release.send((seq, at)).is_err() {
                break;
            }
        }
    });
    Arc::new(tokio::sync::Mutex::new(schedule))
}

struct Phase {
    deadline: Instant,
    record: bool,
}

#[allow(clippy::too_many_arguments)]
async fn worker(
    mut lane: Option<Lane>,
    endpoint: Endpoint,
    url: Arc<str>,
    payload: Arc<Payload>,
    check: Check,
    spec: LoadSpec,
    phase: Arc<Phase>,
    next: Arc<AtomicU64>,
    schedule: Option<Arc<Schedule>>,
    errors: Arc<Errors>,
    run_id: u32,
) -> (
    Histogram<u64>,
    Histogram<u64>,
    u64,
    Option<reqwest::Version>,
    Option<Lane>,
) {
    let mut latency = histogram();
    let mut from_schedule = histogram();
    let mut requests = 0;
    let mut version = None;
    loop {
        let (seq, scheduled) = match &schedule {
            Some(schedule) => match schedule.lock().await.recv().await {
                Some((seq, at)) => (seq, Some(at)),
                None => break,
            },
            None => {
                if Instant::now() >= phase.deadline {
                    break;
                }
                (next.fetch_add(1, Ordering::Relaxed), None)
            }
        };
        let uid = uid(run_id, seq);
        let body = payload.body(&uid);
        let (sent, result) = match &mut lane {
            Some(lane) => {
                let sent = Instant::now();
                (sent, lane.post(body, &uid, check).await)
            }
            None => {
                // A new connection per request: a client of its own,
                // without session resumption, built before the clock starts.
                let client = endpoint.client(spec.mode);
                let sent = Instant::now();
                (sent, post(&client, &url, body, &uid, check).await)
            }
        };
        let done = Instant::now();
        match result {
            Ok(v) => {
                version = Some(v);
                if phase.record {
                    requests += 1;
                    latency.saturating_record((done - sent).as_micros() as u64);
                    if let Some(at) = scheduled {
                        from_schedule.saturating_record((done - at).as_micros() as u64);
                    }
                }
            }
            Err(error) => errors.record(error),
        }
    }
    (latency, from_schedule, requests, version, lane)
}

async fn run_load(
    endpoint: &Endpoint,
    pid: u32,
    payload: Arc<Payload>,
    check: Check,
    spec: &LoadSpec,
) -> LoadResult {
    static RUN: AtomicU64 = AtomicU64::new(1);
    let url: Arc<str> = endpoint.url(MUTATE_PATH).into();
    let ticks_per_second = clock_ticks();
    let mut result = None;
    // Each worker's lane, kept from the warm-up to the measurement so that
    // the measurement opens no connection.
    let tls = match spec.mode {
        Mode::H1 => Some(endpoint.lane_tls(b"http/1.1")),
        Mode::H2 => Some(endpoint.lane_tls(b"h2")),
        Mode::NewConn => None,
    };
    // HTTP/2: one connection for every worker, as the apiserver keeps one
    // to the webhook. If it cannot be opened, each worker tries its own
    // and records why it failed.
    let mut shared_http2 = None;
    if let (Mode::H2, Some(tls)) = (spec.mode, &tls) {
        match Lane::open_http2(endpoint.addr, tls).await {
            Ok(sender) => shared_http2 = Some(sender),
            Err(error) => eprintln!("  cannot open the HTTP/2 connection: {error:#}"),
        }
    }
    let mut lanes: Vec<Option<Lane>> = (0..spec.concurrency.max(1))
        .map(|_| {
            let tls = tls.clone()?;
            let connection = shared_http2.clone().map(Connection::Http2);
            Some(Lane::new(endpoint.addr, tls, connection))
        })
        .collect();
    // Warm-up (connections, allocator, caches) first, then the measurement.
    for record in [false, true] {
        let errors = Arc::new(Errors::default());
        let run_id = RUN.fetch_add(1, Ordering::Relaxed) as u32;
        let length = if record { spec.duration } else { spec.warmup };
        if length.is_zero() {
            continue;
        }
        let start = Instant::now();
        let phase = Arc::new(Phase {
            deadline: start + length,
            record,
        });
        let cpu_before = proc_cpu_ticks(pid).unwrap_or(0);
        let generator_before = proc_cpu_ticks(std::process::id()).unwrap_or(0);
        let sampling = Arc::new(AtomicBool::new(true));
        let sampler = tokio::spawn({
            let sampling = sampling.clone();
            async move {
                let mut max = 0;
                while sampling.load(Ordering::Relaxed) {
                    max = max.max(proc_status_kib(pid, "VmRSS").unwrap_or(0));
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                max.max(proc_status_kib(pid, "VmRSS").unwrap_or(0))
            }
        });
        let next = Arc::new(AtomicU64::new(0));
        let schedule = spec.rate.map(|rate| pace(rate, start, start + length));
        let workers: Vec<_> = lanes
            .drain(..)
            .map(|lane| {
                tokio::spawn(worker(
                    lane,
                    endpoint.clone(),
                    url.clone(),
                    payload.clone(),
                    check,
                    spec.clone(),
                    phase.clone(),
                    next.clone(),
                    schedule.clone(),
                    errors.clone(),
                    run_id,
                ))
            })
            .collect();
        let mut latency = histogram();
        let mut from_schedule = histogram();
        let mut requests = 0;
        let mut version = None;
        for handle in workers {
            let (l, s, n, v, lane) = handle.await.expect("worker");
            lanes.push(lane);
            latency.add(l).expect("same bounds");
            from_schedule.add(s).expect("same bounds");
            requests += n;
            version = version.or(v);
        }
        let elapsed = start.elapsed();
        sampling.store(false, Ordering::Relaxed);
        let rss_max_kib = sampler.await.unwrap_or(0);
        let cpu_after = proc_cpu_ticks(pid).unwrap_or(0);
        let generator_after = proc_cpu_ticks(std::process::id()).unwrap_or(0);
        let errors_count = errors.count.load(Ordering::Relaxed);
        let error_samples = std::mem::take(&mut *errors.samples.lock().unwrap());
        if record {
            result = Some(LoadResult {
                requests,
                errors: errors_count,
                error_samples,
                elapsed,
                latency,
                from_schedule: spec.rate.map(|_| from_schedule),
                cpu_seconds: cpu_after.saturating_sub(cpu_before) as f64 / ticks_per_second,
                generator_busy: generator_after.saturating_sub(generator_before) as f64
                    / ticks_per_second
                    / elapsed.as_secs_f64()
                    / placed().generator_capacity(),
                rss_max_kib,
                version,
            });
        } else if errors_count > 0 {
            eprintln!("  warm-up errors: {errors_count}: {error_samples:?}");
        }
    }
    result.expect("a measured phase")
}

fn print_header() {
    println!(
        "{:<18} {:<8} {:>9} {:>7} {:>8} {:>8} {:>8} {:>8} {:>7} {:>9} {:>8} {:>6}",
        "mode",
        "server",
        "req/s",
        "errors",
        "p50 ms",
        "p90 ms",
        "p99 ms",
        "max ms",
        "version",
        "cpu s/1k",
        "rss MiB",
        "gen %"
    );
}

/// The servers every run is made against, and how often.
struct Targets<'a> {
    ours: &'a Started,
    baseline: Option<&'a Started>,
    payload: &'a Arc<Payload>,
    /// The baseline's fixed answer's length, what its answers are checked by.
    response_len: usize,
    rounds: usize,
}

/// `rounds` runs of `spec` against ours, each followed by the same run
/// against the baseline when there is one; every run printed as a row,
/// then (with more than one round) the medians by `key` as `median_label`
/// rows. `ok` turns false on a failed request.
async fn run_rounds(
    targets: &Targets<'_>,
    spec: &LoadSpec,
    label: &str,
    median_label: &str,
    key: fn(&LoadResult) -> f64,
    ok: &mut bool,
) -> (LoadResult, Option<LoadResult>) {
    // One run against `server`, printed as a row.
    let run_one = async |server: &Started, check, name, ok: &mut bool| {
        let result = run_load(
            &server.endpoint,
            server.proc.pid(),
            targets.payload.clone(),
            check,
            spec,
        )
        .await;
        print_row(label, name, &result);
        *ok &= result.errors == 0 && result.requests > 0;
        result
    };
    let (mut mine, mut theirs) = (Vec::new(), Vec::new());
    for _ in 0..targets.rounds {
        mine.push(run_one(targets.ours, Check::Uid, "ours", ok).await);
        if let Some(baseline) = targets.baseline {
            let check = Check::Length(targets.response_len);
            theirs.push(run_one(baseline, check, "baseline", ok).await);
        }
    }
    let mine = median_by(mine, key);
    let theirs = (!theirs.is_empty()).then(|| median_by(theirs, key));
    if targets.rounds > 1 {
        print_row(median_label, "ours", &mine);
        if let Some(theirs) = &theirs {
            print_row(median_label, "baseline", theirs);
        }
    }
    (mine, theirs)
}

/// The middle result by `key` (the lower middle for an even count: keys
/// are chosen so that lower is worse).
fn median_by(mut results: Vec<LoadResult>, key: impl Fn(&LoadResult) -> f64) -> LoadResult {
    results.sort_by(|a, b| key(a).total_cmp(&key(b)));
    let middle = (results.len() - 1) / 2;
    results.swap_remove(middle)
}

fn print_row(mode: &str, server: &str, r: &LoadResult) {
    println!(
        "{:<18} {:<8} {:>9.0} {:>7} {:>8.3} {:>8.3} {:>8.3} {:>8.3} {:>7} {:>9.3} {:>8.1} {:>6.0}",
        mode,
        server,
        r.rps(),
        r.errors,
        r.ms(0.5),
        r.ms(0.9),
        r.ms(0.99),
        r.latency.max() as f64 / 1000.0,
        match r.version {
            Some(reqwest::Version::HTTP_11) => "h1.1",
            Some(reqwest::Version::HTTP_2) => "h2",
            _ => "?",
        },
        r.cpu_per_1000(),
        mib(r.rss_max_kib),
        r.generator_busy * 100.0,
    );
    for sample in &r.error_samples {
        println!("    error: {sample}");
    }
}

async fn scrape(addr: SocketAddr) -> anyhow::Result<BTreeMap<String, f64>> {
    let text = reqwest::get(format!("http://{addr}/metrics"))
        .await?
        .text()
        .await?;
    Ok(text
        .lines()
        .filter(|line| !line.starts_with('#'))
        .filter_map(|line| {
            let (name, value) = line.rsplit_once(' ')?;
            Some((name.to_owned(), value.parse().ok()?))
        })
        .collect())
}

async fn run(args: Args, bin: PathBuf) -> anyhow::Result<bool> {
    if cfg!(debug_assertions) {
        eprintln!("loadbench: WARNING: the load generator is a debug build; use --release");
    }
    if args.soak {
        return soak(&args, &bin).await;
    }
    let (duration, warmup, startup_runs) = if args.smoke {
        (Duration::from_secs(1), Duration::from_millis(200), 1)
    } else {
        (
            args.duration,
            (args.duration / 5).min(Duration::from_secs(2)),
            args.startup_runs.max(1),
        )
    };
    let files = Files::new()?;
    let log_dir = files.dir.path().to_path_buf();

    // Startup: spawn to the first /readyz 200, several times.
    let mut startups = Vec::new();
    for run in 0..startup_runs.saturating_sub(1) {
        let started = start_ours(
            &bin,
            &files,
            "2s",
            &log_dir.join(format!("startup-{run}.log")),
        )
        .await?;
        startups.push(started.startup);
    }
    let ours = start_ours(&bin, &files, "2s", &log_dir.join("server.log")).await?;
    startups.push(ours.startup);
    startups.sort();

    let response = capture_and_verify(&ours.endpoint).await?;
    let response_path = log_dir.join("response.json");
    std::fs::write(&response_path, &response)?;
    let payload = Arc::new(Payload::new(&create_review(sample_pod(), UID_PLACEHOLDER)));
    // With --keep-dir, what another load generator needs to send the same
    // review (certificates and config are kept there too).
    std::fs::write(log_dir.join("request.json"), payload.body(UID_PLACEHOLDER))?;

    let baseline = if args.no_baseline {
        None
    } else {
        Some(start_baseline(&files, &response_path, &log_dir.join("baseline.log")).await?)
    };

    println!("== image-rewriter loadbench ==");
    println!("server binary: {}", bin.display());
    println!(
        "machine: {} CPUs, {}; load average before: {}",
        machine_cpus(),
        cpu_model(),
        std::fs::read_to_string("/proc/loadavg")
            .unwrap_or_default()
            .trim()
    );
    println!("{}", placed().plan.describe());
    println!(
        "request: {} bytes (CREATE review, 1 init container + 2 containers); response: {} bytes",
        payload.len(),
        response.len()
    );
    println!(
        "concurrency {}, {:?} per run after {:?} warm-up; load generator: {} worker threads",
        args.concurrency,
        duration,
        warmup,
        placed().client_threads
    );
    println!(
        "startup (spawn -> /readyz 200) over {} runs: min {:.1} ms, median {:.1} ms, max {:.1} ms{}",
        startups.len(),
        ms(startups[0]),
        ms(startups[startups.len() / 2]),
        ms(startups[startups.len() - 1]),
        baseline
            .as_ref()
            .map(|b| format!(" (baseline: {:.1} ms)", ms(b.startup)))
            .unwrap_or_default()
    );
    println!(
        "server RSS when idle after startup: {:.1} MiB",
        mib(proc_status_kib(ours.proc.pid(), "VmRSS").unwrap_or(0))
    );
    println!();
    print_header();

    let targets = Targets {
        ours: &ours,
        baseline: baseline.as_ref(),
        payload: &payload,
        response_len: response.len(),
        rounds: if args.smoke { 1 } else { args.rounds.max(1) },
    };
    let mut ok = true;
    let mut ours_results: Vec<(Mode, LoadResult)> = Vec::new();
    let mut ratios = Vec::new();
    for &mode in &args.modes {
        let spec = LoadSpec {
            mode,
            concurrency: args.concurrency,
            warmup,
            duration,
            rate: None,
        };
        let median_label = format!("{} median", short(mode));
        let (mine, theirs) = run_rounds(
            &targets,
            &spec,
            mode.label(),
            &median_label,
            LoadResult::rps,
            &mut ok,
        )
        .await;
        if let Some(theirs) = theirs {
            ratios.push(Ratio {
                mode,
                throughput: mine.rps() / theirs.rps(),
                p99: mine.ms(0.99) / theirs.ms(0.99),
                cpu: mine.cpu_per_1000() / theirs.cpu_per_1000(),
                generator_busy: (mine.generator_busy, theirs.generator_busy),
            });
        }
        ours_results.push((mode, mine));
    }

    // Rate-limited: half of our peak rate in the keep-alive modes.
    let mut half_rate = Vec::new();
    let mut half_rate_baseline = Vec::new();
    for (mode, peak) in &ours_results {
        if *mode == Mode::NewConn {
            continue;
        }
        let rate = peak.rps() * args.rate_fraction;
        let spec = LoadSpec {
            mode: *mode,
            concurrency: args.concurrency,
            warmup,
            duration,
            rate: Some(rate),
        };
        let label = format!("{} @{:.0}/s", short(*mode), rate);
        // The same rate against the baseline: what the load generator, TLS
        // and the kernel alone give at this rate on this machine.
        let median_label = format!("{} @{:.0} median", short(*mode), rate);
        // Sorted worst first, so an even round count takes the worse middle.
        let p99 = |result: &LoadResult| -result.ms(0.99);
        let (limited, theirs) =
            run_rounds(&targets, &spec, &label, &median_label, p99, &mut ok).await;
        if let Some(theirs) = theirs {
            half_rate_baseline.push((*mode, theirs));
        }
        half_rate.push((*mode, rate, limited));
    }

    let hwm = proc_status_kib(ours.proc.pid(), "VmHWM").unwrap_or(0);
    let baseline_hwm = baseline
        .as_ref()
        .and_then(|b| proc_status_kib(b.proc.pid(), "VmHWM"))
        .unwrap_or(0);
    println!();
    if !ratios.is_empty() {
        println!("ours / baseline:");
        for ratio in &ratios {
            println!(
                "  {:<18} throughput x{:.2}   p99 x{:.2}   cpu/request x{:.2}",
                ratio.mode.label(),
                ratio.throughput,
                ratio.p99,
                ratio.cpu
            );
            if let Some(note) = ratio.generator_limit() {
                println!("    {note}");
            }
        }
    }
    for (mode, rate, r) in &half_rate {
        let scheduled = r
            .from_schedule
            .as_ref()
            .map_or(0.0, |h| h.value_at_quantile(0.99) as f64 / 1000.0);
        println!(
            "  {} at {:.0}/s ({:.0}% of peak): achieved {:.0}/s, p99 {:.3} ms (from the scheduled start: {:.3} ms)",
            mode.label(),
            rate,
            args.rate_fraction * 100.0,
            r.rps(),
            r.ms(0.99),
            scheduled
        );
        if let Some((_, theirs)) = half_rate_baseline.iter().find(|(m, _)| m == mode) {
            println!(
                "    the baseline at the same rate: p99 {:.3} ms (ours x{:.2})",
                theirs.ms(0.99),
                r.ms(0.99) / theirs.ms(0.99)
            );
        }
    }
    println!(
        "peak RSS (VmHWM) ours: {:.1} MiB; baseline: {:.1} MiB",
        mib(hwm),
        mib(baseline_hwm)
    );
    if let Some(metrics_addr) = ours.metrics_addr {
        let metrics = scrape(metrics_addr).await?;
        let patched = metrics
            .get("image_rewriter_admission_requests_total{result=\"patched\"}")
            .copied()
            .unwrap_or(0.0);
        println!("server counted {patched:.0} patched reviews");
    }

    println!();
    println!("goals:");
    let mut goals_met = true;
    for ratio in &ratios {
        let met = ratio.throughput >= 0.7;
        goals_met &= met;
        let caveat = if ratio.generator_limit().is_some() {
            format!(
                " (a rate the load generator limited; CPU per request x{:.2})",
                ratio.cpu
            )
        } else {
            String::new()
        };
        println!(
            "  [{}] throughput >= 0.7x baseline ({}): x{:.2}{caveat}",
            mark(met),
            ratio.mode.label(),
            ratio.throughput
        );
    }
    for (mode, _, r) in &half_rate {
        let met = r.ms(0.99) < 2.0;
        goals_met &= met;
        println!(
            "  [{}] p99 < 2 ms at half peak rate ({}): {:.3} ms",
            mark(met),
            mode.label(),
            r.ms(0.99)
        );
    }
    let met = mib(hwm) < 40.0;
    goals_met &= met;
    println!("  [{}] peak RSS < 40 MiB: {:.1} MiB", mark(met), mib(hwm));
    if !ok {
        println!("FAILED: some requests failed (see the errors above)");
    }
    if args.keep_dir {
        let kept = files.dir.keep();
        println!("kept {}", kept.display());
    }
    Ok(ok && (goals_met || !args.enforce_goals))
}

/// Ours against the baseline in one mode, at peak (the medians).
struct Ratio {
    mode: Mode,
    throughput: f64,
    p99: f64,
    cpu: f64,
    /// The load generator's busy share in our run and in the baseline's.
    generator_busy: (f64, f64),
}

impl Ratio {
    /// Why the throughput ratio does not compare the two servers, when the
    /// load generator (on CPUs of its own) set the baseline's rate.
    fn generator_limit(&self) -> Option<String> {
        let (ours, theirs) = self.generator_busy;
        if !placed().split() || theirs < GENERATOR_SATURATED {
            return None;
        }
        Some(if ours >= GENERATOR_SATURATED {
            format!(
                "the load generator was the limit in both runs ({:.0}% / {:.0}% busy): the throughput ratio compares it with itself; the servers compare by CPU per request (x{:.2})",
                ours * 100.0,
                theirs * 100.0,
                self.cpu
            )
        } else {
            format!(
                "the load generator was {:.0}% busy in the baseline's run: that rate is the generator's limit, not the baseline's, so the throughput ratio flatters ours; the servers compare by CPU per request (x{:.2})",
                theirs * 100.0,
                self.cpu
            )
        })
    }
}

fn short(mode: Mode) -> &'static str {
    match mode {
        Mode::H1 => "http1",
        Mode::H2 => "http2",
        Mode::NewConn => "new-conn",
    }
}

fn mark(met: bool) -> &'static str {
    if met { "met" } else { "MISSED" }
}

fn ms(duration: Duration) -> f64 {
    duration.as_secs_f64() * 1000.0
}

/// The machine's CPUs (not only those this process may use).
fn machine_cpus() -> usize {
    std::fs::read_to_string("/proc/cpuinfo")
        .map(|info| {
            info.lines()
                .filter(|line| line.starts_with("processor"))
                .count()
        })
        .unwrap_or(0)
}

fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|info| {
            info.lines().find_map(|l| {
                l.strip_prefix("model name")
                    .map(|r| r.trim_start_matches([' ', '\t', ':']).to_owned())
            })
        })
        .unwrap_or_else(|| "unknown CPU".into())
}

// ---------------------------------------------------------------------------
// Soak.
// ---------------------------------------------------------------------------

/// Client-side ports of the established TCP connections to `port` on
/// loopback, from /proc/net/tcp.
fn established_client_ports(port: u16) -> HashSet<u16> {
    let mut ports = HashSet::new();
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let Ok(text) = std::fs::read_to_string(table) else {
            continue;
        };
        for line in text.lines().skip(1) {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let (Some(local), Some(remote), Some(state)) =
                (fields.get(1), fields.get(2), fields.get(3))
            else {
                continue;
            };
            let port_of = |address: &str| {
                address
                    .rsplit_once(':')
                    .and_then(|(_, p)| u16::from_str_radix(p, 16).ok())
            };
            if *state == "01"
                && port_of(remote) == Some(port)
                && let Some(local) = port_of(local)
            {
                ports.insert(local);
            }
        }
    }
    ports
}

async fn soak(args: &Args, bin: &Path) -> anyhow::Result<bool> {
    let files = Arc::new(Files::new()?);
    let log_dir = files.dir.path().to_path_buf();
    // Reload checks every 250 ms, so every one-second rotation is picked up.
    let ours = start_ours(bin, &files, "250ms", &log_dir.join("server.log")).await?;
    let pid = ours.proc.pid();
    let metrics_addr = ours.metrics_addr.expect("ours has metrics");
    capture_and_verify(&ours.endpoint).await?;
    let payload = Arc::new(Payload::new(&create_review(sample_pod(), UID_PLACEHOLDER)));
    let url: Arc<str> = ours.endpoint.url(MUTATE_PATH).into();
    let total = args.requests;
    let concurrency = args.concurrency.max(2);
    println!("== image-rewriter soak ==");
    println!(
        "{total} requests, concurrency {concurrency} ({} HTTP/1.1 keep-alive + {} on one HTTP/2 connection) + a new-connection probe every 100 ms;",
        concurrency / 2,
        concurrency - concurrency / 2
    );
    println!(
        "certificate rotated (same CA) and config rewritten every second; server reloads every 250 ms"
    );
    println!("{}", placed().plan.describe());

    let errors = Arc::new(Errors::default());
    let next = Arc::new(AtomicU64::new(0));
    let done = Arc::new(AtomicU64::new(0));
    let warm = (total / 20).max(1000).min(total);
    let h1 = ours.endpoint.client(Mode::H1);
    let h2 = ours.endpoint.client(Mode::H2);

    // The keep-alive connections, once all workers have one.
    let warm_up = |client: &reqwest::Client| {
        let client = client.clone();
        let url = url.clone();
        let payload = payload.clone();
        async move {
            let uid = uid(0, 0);
            post(&client, &url, payload.body(&uid), &uid, Check::Uid).await
        }
    };
    let mut warmups = Vec::new();
    for i in 0..concurrency {
        warmups.push(tokio::spawn(warm_up(if i % 2 == 0 { &h1 } else { &h2 })));
    }
    for warmup in warmups {
        warmup
            .await?
            .map_err(|e| anyhow::anyhow!("warm-up request failed: {e}"))?;
    }
    let port = ours.endpoint.addr.port();
    let connections_before = established_client_ports(port);

    let started = Instant::now();
    let workers: Vec<_> = (0..concurrency)
        .map(|i| {
            let client = if i % 2 == 0 { h1.clone() } else { h2.clone() };
            let (url, payload, next, done, errors) = (
                url.clone(),
                payload.clone(),
                next.clone(),
                done.clone(),
                errors.clone(),
            );
            tokio::spawn(async move {
                let mut latency = histogram();
                loop {
                    let seq = next.fetch_add(1, Ordering::Relaxed);
                    if seq >= total {
                        break;
                    }
                    let uid = uid(1, seq);
                    let sent = Instant::now();
                    match post(&client, &url, payload.body(&uid), &uid, Check::Uid).await {
                        Ok(_) => latency.saturating_record(sent.elapsed().as_micros() as u64),
                        Err(error) => errors.record(error),
                    }
                    done.fetch_add(1, Ordering::Relaxed);
                }
                latency
            })
        })
        .collect();

    // Rotation: a new certificate and the other config every second.
    let stop = Arc::new(AtomicBool::new(false));
    let rotations = Arc::new(AtomicU64::new(0));
    let rotator = std::thread::spawn({
        let (files, stop, rotations) = (files.clone(), stop.clone(), rotations.clone());
        move || -> anyhow::Result<()> {
            while !stop.load(Ordering::Relaxed) {
                std::thread::sleep(Duration::from_secs(1));
                let n = rotations.fetch_add(1, Ordering::Relaxed);
                files.rotate_certificate()?;
                replace_file(
                    &files.config(),
                    if n % 2 == 0 { CONFIG_B } else { CONFIG_A }.as_bytes(),
                )?;
            }
            Ok(())
        }
    });

    // Probe: a new TLS connection every 100 ms, recording the certificate.
    let probe = tokio::spawn({
        let (endpoint, stop, payload, errors) = (
            ours.endpoint.clone(),
            stop.clone(),
            payload.clone(),
            errors.clone(),
        );
        async move {
            let mut certificates = HashSet::new();
            let mut probes = 0u64;
            let url = endpoint.url(MUTATE_PATH);
            while !stop.load(Ordering::Relaxed) {
                let client = endpoint.client(Mode::NewConn);
                let uid = uid(2, probes);
                probes += 1;
                match client
                    .post(&url)
                    .header("Content-Type", "application/json")
                    .body(payload.body(&uid))
                    .send()
                    .await
                {
                    Ok(response) if response.status() == 200 => {
                        if let Some(info) = response.extensions().get::<reqwest::tls::TlsInfo>()
                            && let Some(cert) = info.peer_certificate()
                        {
                            certificates.insert(cert.to_vec());
                        }
                        let _ = response.bytes().await;
                    }
                    Ok(response) => errors.record(format!("probe: status {}", response.status())),
                    Err(error) => errors.record(format!("probe: {error:?}")),
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            (probes, certificates.len())
        }
    });

    // RSS every second; the first sample after warm-up is the reference.
    let mut samples: Vec<(Duration, u64, u64)> = Vec::new();
    let mut last_print = Instant::now();
    while done.load(Ordering::Relaxed) < total && !workers.iter().all(|w| w.is_finished()) {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let answered = done.load(Ordering::Relaxed);
        let rss = proc_status_kib(pid, "VmRSS").unwrap_or(0);
        samples.push((started.elapsed(), answered, rss));
        if last_print.elapsed() >= Duration::from_secs(10) {
            last_print = Instant::now();
            println!(
                "  {:>6.0} s  {answered:>9} answered  {:.0}/s  RSS {:.1} MiB  errors {}",
                started.elapsed().as_secs_f64(),
                answered as f64 / started.elapsed().as_secs_f64(),
                mib(rss),
                errors.count.load(Ordering::Relaxed)
            );
        }
    }
    let mut latency = histogram();
    for worker in workers {
        latency.add(worker.await?).expect("same bounds");
    }
    let elapsed = started.elapsed();
    let rss_end = proc_status_kib(pid, "VmRSS").unwrap_or(0);
    samples.push((elapsed, total, rss_end));
    stop.store(true, Ordering::Relaxed);
    let (probes, certificates_seen) = probe.await?;
    rotator
        .join()
        .map_err(|_| anyhow::anyhow!("the rotation thread panicked"))??;
    // Give the server one more reload cycle, then read its counters.
    tokio::time::sleep(Duration::from_millis(600)).await;
    let connections_after = established_client_ports(port);
    let dropped = connections_before.difference(&connections_after).count();
    let metrics = scrape(metrics_addr).await?;
    let metric = |name: &str| metrics.get(name).copied().unwrap_or(0.0);

    let reference = samples
        .iter()
        .find(|(_, answered, _)| *answered >= warm)
        .or(samples.last())
        .map_or(rss_end, |s| s.2);
    let growth = (rss_end as f64 - reference as f64) / reference.max(1) as f64;
    let failed = errors.count.load(Ordering::Relaxed);
    println!();
    println!(
        "answered {total} in {:.1} s ({:.0}/s); p50 {:.3} ms, p99 {:.3} ms, max {:.3} ms",
        elapsed.as_secs_f64(),
        total as f64 / elapsed.as_secs_f64(),
        latency.value_at_quantile(0.5) as f64 / 1000.0,
        latency.value_at_quantile(0.99) as f64 / 1000.0,
        latency.max() as f64 / 1000.0
    );
    for sample in errors.samples.lock().unwrap().iter() {
        println!("  error: {sample}");
    }
    println!(
        "rotations: {}; server reloads: certificate {} ok / {} failed, config {} ok / {} failed",
        rotations.load(Ordering::Relaxed),
        metric("image_rewriter_certificate_reloads_total{result=\"success\"}"),
        metric("image_rewriter_certificate_reloads_total{result=\"failure\"}"),
        metric("image_rewriter_config_reloads_total{result=\"success\"}"),
        metric("image_rewriter_config_reloads_total{result=\"failure\"}"),
    );
    println!(
        "new-connection probes: {probes}, distinct server certificates seen: {certificates_seen}"
    );
    println!(
        "keep-alive connections: {} before, {} still open after, {dropped} dropped",
        connections_before.len(),
        connections_before.intersection(&connections_after).count()
    );
    let rss_series: Vec<String> = samples
        .iter()
        .step_by((samples.len() / 12).max(1))
        .map(|(t, _, rss)| format!("{:.0}s:{:.1}", t.as_secs_f64(), mib(*rss)))
        .collect();
    println!("RSS MiB over time: {}", rss_series.join(" "));
    println!(
        "RSS after warm-up {:.1} MiB, at the end {:.1} MiB ({:+.1}%), peak (VmHWM) {:.1} MiB",
        mib(reference),
        mib(rss_end),
        growth * 100.0,
        mib(proc_status_kib(pid, "VmHWM").unwrap_or(0))
    );

    let mut ok = true;
    let mut check = |met: bool, what: String| {
        ok &= met;
        println!("  [{}] {what}", if met { "ok" } else { "FAILED" });
    };
    println!("checks:");
    check(failed == 0, format!("zero failed requests ({failed})"));
    check(
        dropped == 0 && !connections_before.is_empty(),
        format!(
            "zero dropped keep-alive connections ({dropped} of {})",
            connections_before.len()
        ),
    );
    let mut rotation_seen =
        format!("probes saw the rotated certificates ({certificates_seen} distinct)");
    if certificates_seen < 2 && elapsed < Duration::from_millis(1500) {
        rotation_seen += &format!(
            ": the load lasted {:.1} s, too short for a rotation (one a second); raise --requests",
            elapsed.as_secs_f64()
        );
    }
    check(certificates_seen >= 2, rotation_seen);
    check(
        metric("image_rewriter_certificate_reloads_total{result=\"failure\"}") == 0.0
            && metric("image_rewriter_config_reloads_total{result=\"failure\"}") == 0.0,
        "no reload failed".into(),
    );
    check(
        growth.abs() <= 0.10,
        format!(
            "RSS at the end within 10% of after warm-up ({:+.1}%)",
            growth * 100.0
        ),
    );
    if args.keep_dir {
        let files = Arc::try_unwrap(files).map_err(|_| anyhow::anyhow!("files still shared"))?;
        println!("kept {}", files.dir.keep().display());
    }
    Ok(ok)
}

// ---------------------------------------------------------------------------
// The baseline server: rustls + hyper, a fixed answer.
// ---------------------------------------------------------------------------

mod baseline {
    use std::convert::Infallible;
    use std::process::ExitCode;
    use std::sync::Arc;

    use http_body_util::{BodyExt as _, Full};
    use hyper::body::{Bytes, Incoming};
    use hyper::{Request, Response};
    use hyper_util::rt::{TokioExecutor, TokioIo};
    use hyper_util::server::conn::auto;
    use image_rewriter::coalesce;
    use rustls::pki_types::pem::PemObject as _;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    use tokio::net::TcpListener;
    use tokio::signal::unix::{SignalKind, signal};
    use tokio_rustls::TlsAcceptor;

    use super::Args;

    pub fn main(args: &Args) -> ExitCode {
        // The same runtime as `serve`: multi-threaded, one worker per CPU.
        let runtime = tokio::runtime::Runtime::new().expect("tokio runtime");
        match runtime.block_on(serve(args)) {
            Ok(()) => ExitCode::SUCCESS,
            Err(error) => {
                eprintln!("baseline server: {error:#}");
                ExitCode::FAILURE
            }
        }
    }

    async fn serve(args: &Args) -> anyhow::Result<()> {
        let (Some(port), Some(cert), Some(key), Some(response)) =
            (args.port, &args.cert, &args.key, &args.response)
        else {
            anyhow::bail!("--baseline-server needs --port, --cert, --key and --response");
        };
        let chain = CertificateDer::pem_file_iter(cert)?.collect::<Result<Vec<_>, _>>()?;
        let key = PrivateKeyDer::from_pem_file(key)?;
        let mut config = rustls::ServerConfig::builder_with_protocol_versions(&[
            &rustls::version::TLS13,
            &rustls::version::TLS12,
        ])
        .with_no_client_auth()
        .with_single_cert(chain, key)?;
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        let acceptor = TlsAcceptor::from(Arc::new(config));
        let answer = Bytes::from(std::fs::read(response)?);
        let listener = TcpListener::bind(("127.0.0.1", port)).await?;
        let builder = Arc::new(auto::Builder::new(TokioExecutor::new()));
        let same_transport = args.same_transport;
        // Exits on SIGTERM, as `Proc` ends it, so that a build with
        // `-Cprofile-generate` writes its profile.
        let mut terminate = signal(SignalKind::terminate())?;
        loop {
            let (stream, _) = tokio::select! {
                accepted = listener.accept() => accepted?,
                _ = terminate.recv() => return Ok(()),
            };
            let _ = stream.set_nodelay(true);
            let (acceptor, answer, builder) = (acceptor.clone(), answer.clone(), builder.clone());
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(stream).await else {
                    return;
                };
                let service = fixed_answer(answer);
                if same_transport && tls.get_ref().1.alpn_protocol() == Some(b"h2") {
                    let (io, driver) = coalesce::split(tls);
                    let _ = driver
                        .run(
                            builder.serve_connection(TokioIo::new(io), service),
                            std::time::Duration::from_secs(15),
                        )
                        .await;
                } else {
                    let _ = builder.serve_connection(TokioIo::new(tls), service).await;
                }
            });
        }
    }

    /// Reads the whole body, as a real handler must, then sends `answer`.
    fn fixed_answer(
        answer: Bytes,
    ) -> impl hyper::service::Service<
        Request<Incoming>,
        Response = Response<Full<Bytes>>,
        Error = Infallible,
        Future: Send,
    > + Clone {
        hyper::service::service_fn(move |request: Request<Incoming>| {
            let answer = answer.clone();
            async move {
                let ready = request.uri().path() == "/readyz";
                let _ = request.into_body().collect().await;
                let response = if ready {
                    Response::new(Full::new(Bytes::from_static(b"ready")))
                } else {
                    Response::builder()
                        .header("content-type", "application/json")
                        .body(Full::new(answer))
                        .expect("a valid response")
                };
                Ok::<_, Infallible>(response)
            }
        })
    }
}
