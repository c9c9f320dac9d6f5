//! The command line. Every flag also reads an `IMAGE_REWRITER_*` variable.

use std::ffi::OsString;
use std::io::{IsTerminal as _, Read as _, Write as _};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use clap::builder::BoolishValueParser;
use clap::{Parser, Subcommand, ValueEnum};

use crate::certs::{self, CertRequest, KeyType};
use crate::config::{self, ConfigFile, is_dns_label, is_dns_subdomain, load_policy};
use crate::offline::{RewriteReport, mutate_documents};
use crate::server::{DEFAULT_BODY_LIMIT, MAX_BODY_LIMIT, MIN_BODY_LIMIT, ServeOptions};

/// The sample config `serve --dev-self-signed` runs when given none.
const SAMPLE_CONFIG: &str = include_str!("../examples/config.yaml");
/// Where a pod's service account token mount says its namespace.
const SERVICE_ACCOUNT_NAMESPACE: &str = "/var/run/secrets/kubernetes.io/serviceaccount/namespace";

#[derive(Debug, Parser)]
#[command(
    name = "image-rewriter",
    version,
    about = "Moves container images to a private registry, as a Kubernetes mutating admission webhook"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

impl Cli {
    /// This process's command line, as [`Cli::parse_args`] reads it; a
    /// usage error ends the process (exit 2).
    pub fn from_process() -> Self {
        Self::parse_args(std::env::args_os()).unwrap_or_else(|error| error.exit())
    }

    /// Parses `args` (the program's name first) and the `IMAGE_REWRITER_*`
    /// variables. A value refused that came from a variable, its flag not
    /// given, says so: clap names only the flag, which a pod that sets the
    /// variable in its env never passed.
    pub fn parse_args<I, T>(args: I) -> Result<Self, clap::Error>
    where
        I: IntoIterator<Item = T>,
        T: Into<OsString> + Clone,
    {
        let args: Vec<OsString> = args.into_iter().map(Into::into).collect();
        Self::try_parse_from(&args).map_err(|error| naming_the_variable(error, &args))
    }
}

/// `error` with a tip naming the variable its refused value came from, when
/// it came from one: parsed again with that flag's variable ignored, the
/// same value is no longer refused.
fn naming_the_variable(mut error: clap::Error, args: &[OsString]) -> clap::Error {
    use clap::CommandFactory as _;
    use clap::error::{ContextKind, ContextValue, ErrorKind};
    if !matches!(
        error.kind(),
        ErrorKind::InvalidValue | ErrorKind::ValueValidation
    ) {
        return error;
    }
    let refused = |error: &clap::Error| {
        (
            error.kind(),
            error.get(ContextKind::InvalidArg).map(ToString::to_string),
            error
                .get(ContextKind::InvalidValue)
                .map(ToString::to_string),
        )
    };
    let Some(ContextValue::String(shown)) = error.get(ContextKind::InvalidArg) else {
        return error;
    };
    let shown = shown.clone();
    let mut command = Cli::command();
    // Built, as clap builds it to parse: an argument is shown as in errors.
    command.build();
    // Every subcommand names a flag by the same variable.
    let Some((long, variable)) = command.get_subcommands().find_map(|sub| {
        sub.get_arguments()
            .find(|arg| arg.to_string() == shown)
            .and_then(|arg| Some((arg.get_long()?.to_owned(), arg.get_env()?.to_owned())))
    }) else {
        return error;
    };
    // Found on the built command; mutated on a fresh one, as clap expects.
    let without_variable = Cli::command().mut_subcommands(|sub| {
        let ids: Vec<_> = sub
            .get_arguments()
            .filter(|arg| arg.get_long() == Some(long.as_str()))
            .map(|arg| arg.get_id().clone())
            .collect();
        ids.into_iter()
            .fold(sub, |sub, id| sub.mut_arg(id, |arg| arg.env(None::<&str>)))
    });
    let still_refused = without_variable
        .try_get_matches_from(args)
        .err()
        .is_some_and(|again| refused(&again) == refused(&error));
    if still_refused {
        return error;
    }
    let variable = variable.to_string_lossy();
    let empty = matches!(
        error.get(ContextKind::InvalidValue),
        Some(ContextValue::String(value)) if value.is_empty()
    );
    let tip = if empty {
        format!(
            "the value comes from {variable}, which is set but empty (--{long} was not given): \
             unset it, or give it a value"
        )
    } else {
        format!("the value comes from {variable} (--{long} was not given)")
    };
    let mut tips = match error.get(ContextKind::Suggested) {
        Some(ContextValue::StyledStrs(tips)) => tips.clone(),
        _ => Vec::new(),
    };
    tips.push(tip.into());
    error.insert(ContextKind::Suggested, ContextValue::StyledStrs(tips));
    error
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the webhook: /mutate, /healthz, /readyz over TLS; /metrics over HTTP.
    Serve(Box<ServeArgs>),
    /// Generate a CA, a serving certificate, the TLS Secret and the caBundle patch.
    Certs(CertsArgs),
    /// Show what the policy does to image references.
    Rewrite(RewriteArgs),
    /// Mutate Pods and workloads (YAML or JSON, multi-document) offline.
    Mutate(MutateArgs),
    /// Validate a config file.
    CheckConfig(CheckConfigArgs),
}

#[derive(Debug, Clone, Copy, ValueEnum, PartialEq, Eq)]
pub enum OutputFormat {
    Text,
    Json,
}

#[derive(Debug, Clone, Copy, ValueEnum, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

fn parse_duration(text: &str) -> Result<Duration, String> {
    humantime::parse_duration(text).map_err(|e| e.to_string())
}

/// A timeout of zero would cut every client off at once.
fn parse_timeout(text: &str) -> Result<Duration, String> {
    let timeout = parse_duration(text)?;
    if timeout.is_zero() {
        return Err("must be more than 0 (every client would be cut off at once)".into());
    }
    Ok(timeout)
}

/// The files are read in full on every check, so a tiny interval is a busy
/// loop, not a faster reload.
const MIN_RELOAD_INTERVAL: Duration = Duration::from_millis(100);

fn parse_reload_interval(text: &str) -> Result<Duration, String> {
    let interval = parse_duration(text)?;
    if interval < MIN_RELOAD_INTERVAL {
        return Err(format!(
            "must be at least {}: the config and certificate files are read in full on every check",
            humantime::format_duration(MIN_RELOAD_INTERVAL)
        ));
    }
    Ok(interval)
}

fn parse_body_limit(text: &str) -> Result<usize, String> {
    let bytes: usize = text.parse().map_err(|e| format!("{e}"))?;
    if bytes < MIN_BODY_LIMIT {
        return Err(format!(
            "must be at least {MIN_BODY_LIMIT} bytes (7 MiB): an UPDATE review carries two Pods of up to 3 MiB"
        ));
    }
    if bytes > MAX_BODY_LIMIT {
        return Err(format!(
            "must be at most {MAX_BODY_LIMIT} bytes (1 GiB): twice the limit is held in memory under load"
        ));
    }
    Ok(bytes)
}

/// Worker threads when `--worker-threads` is not given: one per CPU the
/// process may use, at most this many. A review takes microseconds of CPU, so
/// a few workers serve far more than an apiserver sends, while every worker
/// keeps its own allocator caches: on a large node without a CPU limit (the
/// shipped Deployment sets none), one per CPU multiplied the memory a burst
/// of large reviews peaks at (BENCHMARKS.md: 64 workers took a burst past
/// the shipped 256 MiB limit; 2 kept it near half).
const MAX_DEFAULT_WORKER_THREADS: usize = 2;
/// More would be a typo, not a tuning.
const MAX_WORKER_THREADS: usize = 256;

fn parse_worker_threads(text: &str) -> Result<usize, String> {
    let threads: usize = text.parse().map_err(|e| format!("{e}"))?;
    if !(1..=MAX_WORKER_THREADS).contains(&threads) {
        return Err(format!("must be from 1 to {MAX_WORKER_THREADS}"));
    }
    Ok(threads)
}

/// Connection slots are semaphore permits, all taken back at once (as a
/// `u32`) to see the drain done.
const MAX_CONNECTIONS: usize = u32::MAX as usize;

fn parse_max_connections(text: &str) -> Result<usize, String> {
    let connections: usize = text.parse().map_err(|e| format!("{e}"))?;
    if !(1..=MAX_CONNECTIONS).contains(&connections) {
        return Err(format!(
            "must be from 1 to {MAX_CONNECTIONS} (with 0, no connection would be accepted)"
        ));
    }
    Ok(connections)
}

fn default_worker_threads() -> usize {
    std::thread::available_parallelism()
        .map_or(1, usize::from)
        .min(MAX_DEFAULT_WORKER_THREADS)
}

#[derive(Debug, clap::Args)]
pub struct ServeArgs {
    /// The config file (watched; reloaded on change).
    #[arg(
        long,
        env = "IMAGE_REWRITER_CONFIG",
        required_unless_present = "dev_self_signed"
    )]
    pub config: Option<PathBuf>,
    /// PEM certificate chain (watched; reloaded on change).
    #[arg(
        long,
        env = "IMAGE_REWRITER_TLS_CERT",
        requires = "tls_key",
        required_unless_present = "dev_self_signed"
    )]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key: PKCS#8, PKCS#1 or SEC1.
    #[arg(
        long,
        env = "IMAGE_REWRITER_TLS_KEY",
        requires = "tls_cert",
        required_unless_present = "dev_self_signed"
    )]
    pub tls_key: Option<PathBuf>,
    #[arg(long, env = "IMAGE_REWRITER_LISTEN", default_value = "0.0.0.0:8443")]
    pub listen: SocketAddr,
    #[arg(
        long,
        env = "IMAGE_REWRITER_METRICS_LISTEN",
        default_value = "0.0.0.0:9090"
    )]
    pub metrics_listen: SocketAddr,
    /// The webhook's own namespace (never touched); defaults to the service
    /// account's namespace file.
    #[arg(long, env = "IMAGE_REWRITER_NAMESPACE")]
    pub namespace: Option<String>,
    /// Largest AdmissionReview body, in bytes (at least 7 MiB).
    #[arg(long, env = "IMAGE_REWRITER_MAX_BODY_BYTES", default_value_t = DEFAULT_BODY_LIMIT, value_parser = parse_body_limit)]
    pub max_body_bytes: usize,
    /// How often the config and certificate files are checked for changes.
    #[arg(long, env = "IMAGE_REWRITER_RELOAD_INTERVAL", default_value = "2s", value_parser = parse_reload_interval)]
    pub reload_interval: Duration,
    /// After SIGTERM: /readyz fails but requests are still served this long.
    #[arg(long, env = "IMAGE_REWRITER_SHUTDOWN_DELAY", default_value = "5s", value_parser = parse_duration)]
    pub shutdown_delay: Duration,
    /// Then in-flight requests get this long to finish.
    #[arg(long, env = "IMAGE_REWRITER_SHUTDOWN_GRACE", default_value = "15s", value_parser = parse_duration)]
    pub shutdown_grace: Duration,
    /// Time allowed for the TLS handshake and the request headers.
    #[arg(long, env = "IMAGE_REWRITER_HEADER_READ_TIMEOUT", default_value = "10s", value_parser = parse_timeout)]
    pub header_read_timeout: Duration,
    /// Time allowed for the request body.
    #[arg(long, env = "IMAGE_REWRITER_BODY_READ_TIMEOUT", default_value = "10s", value_parser = parse_timeout)]
    pub body_read_timeout: Duration,
    /// Open connections at most; more wait to be accepted.
    #[arg(long, env = "IMAGE_REWRITER_MAX_CONNECTIONS", default_value_t = 1024, value_parser = parse_max_connections)]
    pub max_connections: usize,
    /// Threads serving requests [default: one per CPU the process may use,
    /// at most 2].
    #[arg(long, env = "IMAGE_REWRITER_WORKER_THREADS", value_parser = parse_worker_threads)]
    pub worker_threads: Option<usize>,
    #[arg(
        long,
        env = "IMAGE_REWRITER_LOG_FORMAT",
        value_enum,
        default_value = "text"
    )]
    pub log_format: LogFormat,
    /// Never talk to the Kubernetes API (no pull secret copies or cache).
    #[arg(long, env = "IMAGE_REWRITER_NO_API", value_parser = BoolishValueParser::new())]
    pub no_api: bool,
    /// Development only: generate a throwaway CA and a certificate for
    /// localhost (and run the sample config if --config is not given).
    #[arg(long, env = "IMAGE_REWRITER_DEV_SELF_SIGNED", value_parser = BoolishValueParser::new())]
    pub dev_self_signed: bool,
    /// Where --dev-self-signed writes its files.
    #[arg(long, env = "IMAGE_REWRITER_DEV_DIR")]
    pub dev_dir: Option<PathBuf>,
}

#[derive(Debug, clap::Args)]
pub struct CertsArgs {
    /// The webhook Service's name.
    #[arg(long, env = "IMAGE_REWRITER_SERVICE", default_value = "image-rewriter")]
    pub service: String,
    /// The webhook Service's namespace.
    #[arg(
        long,
        env = "IMAGE_REWRITER_NAMESPACE",
        default_value = "image-rewriter"
    )]
    pub namespace: String,
    #[arg(long, env = "IMAGE_REWRITER_OUT")]
    pub out: PathBuf,
    #[arg(
        long,
        env = "IMAGE_REWRITER_KEY_TYPE",
        value_enum,
        default_value = "ecdsa-p256"
    )]
    pub key_type: KeyType,
    /// Serving certificate validity.
    #[arg(long, env = "IMAGE_REWRITER_VALIDITY_DAYS", default_value_t = 365)]
    pub validity_days: u32,
    /// Validity of a new CA (one made on the first run, or with --new-ca).
    #[arg(long, env = "IMAGE_REWRITER_CA_VALIDITY_DAYS", default_value_t = 3650)]
    pub ca_validity_days: u32,
    /// Replace the CA that an earlier run left in --out (kept by default, so
    /// that a rotation leaves the webhook's caBundle as it is).
    #[arg(long, env = "IMAGE_REWRITER_NEW_CA", value_parser = BoolishValueParser::new())]
    pub new_ca: bool,
    /// The TLS Secret's name, as the Deployment mounts it.
    #[arg(
        long,
        env = "IMAGE_REWRITER_SECRET_NAME",
        default_value = "image-rewriter-tls"
    )]
    pub secret_name: String,
    /// More DNS names or IP addresses for the serving certificate.
    #[arg(
        long = "extra-san",
        env = "IMAGE_REWRITER_EXTRA_SANS",
        value_delimiter = ','
    )]
    pub extra_sans: Vec<String>,
}

#[derive(Debug, clap::Args)]
pub struct RewriteArgs {
    #[arg(long, env = "IMAGE_REWRITER_CONFIG")]
    pub config: PathBuf,
    #[arg(
        long,
        env = "IMAGE_REWRITER_OUTPUT",
        value_enum,
        default_value = "text"
    )]
    pub output: OutputFormat,
    /// Image references, as a pod spec would write them.
    #[arg(required = true)]
    pub images: Vec<String>,
}

#[derive(Debug, clap::Args)]
pub struct MutateArgs {
    #[arg(long, env = "IMAGE_REWRITER_CONFIG")]
    pub config: PathBuf,
    /// A file of Kubernetes objects, or `-` for standard input.
    #[arg(short = 'f', long = "filename", env = "IMAGE_REWRITER_FILENAME")]
    pub file: PathBuf,
    /// The webhook's own namespace, which is never touched.
    #[arg(long, env = "IMAGE_REWRITER_NAMESPACE")]
    pub namespace: Option<String>,
    /// The namespace the objects that name none go into, as with `kubectl
    /// apply -n`: its exclusions apply to them. Without it, they are taken
    /// to go where no exclusion applies.
    #[arg(
        short = 'n',
        long = "target-namespace",
        env = "IMAGE_REWRITER_TARGET_NAMESPACE"
    )]
    pub target_namespace: Option<String>,
}

#[derive(Debug, clap::Args)]
pub struct CheckConfigArgs {
    #[arg(long, env = "IMAGE_REWRITER_CONFIG")]
    pub config: PathBuf,
}

/// Runs a command; the exit code is 0 on success and 1 on bad input or
/// config, with the reason on stderr.
pub fn run(cli: Cli) -> ExitCode {
    let result = match cli.command {
        Command::Serve(args) => serve(*args),
        Command::Certs(args) => write_certs(&args),
        Command::Rewrite(args) => rewrite(&args),
        Command::Mutate(args) => mutate(&args),
        Command::CheckConfig(args) => check_config(&args),
    };
    match result {
        Ok(code) => code,
        Err(error) => {
            eprintln!("image-rewriter: {error:#}");
            ExitCode::FAILURE
        }
    }
}

fn rewrite(args: &RewriteArgs) -> anyhow::Result<ExitCode> {
    let policy = load_policy(&args.config, None)?;
    let mut stdout = std::io::stdout().lock();
    let mut invalid = Vec::new();
    for image in &args.images {
        let report = RewriteReport::new(&policy, image);
        if !report.is_valid_input() {
            invalid.push(format!("{image:?} ({})", report.reason));
        }
        let line = match args.output {
            OutputFormat::Text => report.to_text(),
            OutputFormat::Json => serde_json::to_string(&report)?,
        };
        writeln!(stdout, "{line}")?;
    }
    if invalid.is_empty() {
        Ok(ExitCode::SUCCESS)
    } else {
        eprintln!(
            "image-rewriter: not valid image references: {}",
            invalid.join(", ")
        );
        Ok(ExitCode::FAILURE)
    }
}

fn mutate(args: &MutateArgs) -> anyhow::Result<ExitCode> {
    let policy = load_policy(&args.config, namespace_flag(args.namespace.as_deref())?)?;
    let input = if args.file.as_os_str() == "-" {
        let mut text = String::new();
        std::io::stdin().read_to_string(&mut text)?;
        text
    } else {
        std::fs::read_to_string(&args.file)
            .map_err(|e| anyhow::anyhow!("cannot read {}: {e}", args.file.display()))?
    };
    // Empty counts as not given, as for `--namespace` and `serve`: what a
    // templated `IMAGE_REWRITER_TARGET_NAMESPACE: ""` means.
    let target_namespace = args.target_namespace.as_deref().filter(|ns| !ns.is_empty());
    if let Some(target) = target_namespace
        && !is_dns_label(target)
    {
        anyhow::bail!(
            "--target-namespace / IMAGE_REWRITER_TARGET_NAMESPACE {target:?} is not a namespace \
             name (a lower-case RFC 1123 label, at most 63 characters)"
        );
    }
    let mutated = mutate_documents(&policy, &input, target_namespace)?;
    for warning in &mutated.warnings {
        eprintln!("warning: {warning}");
    }
    std::io::stdout()
        .lock()
        .write_all(mutated.output.as_bytes())?;
    Ok(ExitCode::SUCCESS)
}

fn check_config(args: &CheckConfigArgs) -> anyhow::Result<ExitCode> {
    let text = config::read_config(&args.config)?;
    // A server already running refuses a file with no value rather than
    // drop its rules, so a gate that passed one would pass a ConfigMap
    // emptied by mistake.
    let Some(parsed) = ConfigFile::parse(&text)? else {
        anyhow::bail!(
            "{}: the file holds no value (blank lines and comments only): a server already \
             running refuses it and keeps its config, and one starting with it rewrites nothing; \
             write `rules: []` to remove every rule",
            args.config.display()
        );
    };
    // The webhook's own namespace comes from where `serve` runs, not from the file.
    let policy = parsed.into_policy(None)?;
    println!(
        "{}: OK, {} rule(s); never touched: namespaces {} and the webhook's own namespace",
        args.config.display(),
        policy.rules().len(),
        policy.excluded_namespaces().collect::<Vec<_>>().join(", ")
    );
    if policy.rules().is_empty() {
        eprintln!("warning: no rules: no image is rewritten");
    }
    for warning in policy.warnings() {
        eprintln!("warning: {warning}");
    }
    Ok(ExitCode::SUCCESS)
}

/// kube-client logs an API response it cannot decode whole, at `warn`
/// (`Client::request`), and a Secret's response holds its data. That line
/// stays out unless `RUST_LOG` names kube_client itself; the pull secret
/// sync says what failed in its own words.
const KUBE_CLIENT_RESPONSES_OFF: &str = "kube_client::client=error";

fn init_logging(format: LogFormat) {
    let mut filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let names_kube_client =
        std::env::var("RUST_LOG").is_ok_and(|given| given.contains("kube_client"));
    if !names_kube_client && let Ok(directive) = KUBE_CLIENT_RESPONSES_OFF.parse() {
        filter = filter.add_directive(directive);
    }
    // Colour codes only for a person at a terminal, not in collected logs.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stdout().is_terminal());
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().flatten_event(true).init(),
    }
}

fn serve(args: ServeArgs) -> anyhow::Result<ExitCode> {
    let given_files = args.given_files().unwrap_or_else(|usage| usage.exit());
    let namespace = own_namespace(args.namespace.as_deref(), || {
        std::fs::read_to_string(SERVICE_ACCOUNT_NAMESPACE).ok()
    })?;
    init_logging(args.log_format);
    let ((config, tls_cert, tls_key), own_dev_dir) = match given_files {
        Some(files) => (files, None),
        None => dev_files(&args)?,
    };
    let options = ServeOptions {
        config,
        tls_cert,
        tls_key,
        listen: args.listen,
        metrics_listen: args.metrics_listen,
        namespace,
        max_body_bytes: args.max_body_bytes,
        reload_interval: args.reload_interval,
        shutdown_delay: args.shutdown_delay,
        shutdown_grace: args.shutdown_grace,
        header_read_timeout: args.header_read_timeout,
        body_read_timeout: args.body_read_timeout,
        max_connections: args.max_connections,
        // A development run must never write Secrets into whatever cluster
        // the local kubeconfig points at.
        pull_secret_sync: !args.no_api && !args.dev_self_signed,
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(args.worker_threads.unwrap_or_else(default_worker_threads))
        .enable_all()
        .build()?;
    let served = runtime.block_on(crate::server::serve_until_signal(options));
    // Only once no task is left to read the files.
    drop(runtime);
    drop(own_dev_dir);
    served?;
    Ok(ExitCode::SUCCESS)
}

/// The config, certificate and key `serve` serves.
type ServedFiles = (PathBuf, PathBuf, PathBuf);

impl ServeArgs {
    /// The config, certificate and key to serve; `None` for a development
    /// run. clap's `required_unless_present` is not enough: a flag set from
    /// its variable counts as present even when the variable says false, so
    /// `IMAGE_REWRITER_DEV_SELF_SIGNED=false` alone would stand in for all
    /// three files and start a development server.
    fn given_files(&self) -> Result<Option<ServedFiles>, clap::Error> {
        use clap::Args as _;
        let usage = |kind, message: &str| {
            ServeArgs::augment_args(clap::Command::new("image-rewriter serve")).error(kind, message)
        };
        if self.dev_self_signed {
            if self.tls_cert.is_some() || self.tls_key.is_some() {
                return Err(usage(
                    clap::error::ErrorKind::ArgumentConflict,
                    "--dev-self-signed generates its own certificate: drop --tls-cert and \
                     --tls-key (or IMAGE_REWRITER_TLS_CERT and IMAGE_REWRITER_TLS_KEY)",
                ));
            }
            return Ok(None);
        }
        match (&self.config, &self.tls_cert, &self.tls_key) {
            (Some(config), Some(cert), Some(key)) => {
                Ok(Some((config.clone(), cert.clone(), key.clone())))
            }
            _ => Err(usage(
                clap::error::ErrorKind::MissingRequiredArgument,
                "--config, --tls-cert and --tls-key are required unless --dev-self-signed is on \
                 (IMAGE_REWRITER_DEV_SELF_SIGNED is set, but not to a true value)",
            )),
        }
    }
}

/// `--namespace` / `IMAGE_REWRITER_NAMESPACE` as given. Empty counts as not
/// given: a manifest's `value: ""` must not stand for a namespace.
fn namespace_flag(given: Option<&str>) -> anyhow::Result<Option<&str>> {
    match given {
        None | Some("") => Ok(None),
        Some(namespace) => namespace_name(namespace).map(Some),
    }
}

fn namespace_name(given: &str) -> anyhow::Result<&str> {
    if is_dns_label(given) {
        Ok(given)
    } else {
        anyhow::bail!(
            "--namespace / IMAGE_REWRITER_NAMESPACE {given:?} is not a valid namespace name \
             (lower-case letters, digits and '-', starting and ending with a letter or digit, \
             at most 63 characters)"
        )
    }
}

/// `serve`'s own namespace: `--namespace`, else what the service account's
/// namespace file says.
fn own_namespace(
    given: Option<&str>,
    service_account_namespace: impl FnOnce() -> Option<String>,
) -> anyhow::Result<Option<String>> {
    if let Some(namespace) = namespace_flag(given)? {
        return Ok(Some(namespace.to_owned()));
    }
    let from_file = service_account_namespace()
        .map(|ns| ns.trim().to_owned())
        .filter(|ns| !ns.is_empty());
    match from_file {
        // The namespace is never touched and is the pull secrets' source, so a
        // garbled file must stop the server rather than protect nothing.
        Some(namespace) if !is_dns_label(&namespace) => anyhow::bail!(
            "{SERVICE_ACCOUNT_NAMESPACE} holds {namespace:?}, which is not a namespace name; \
             set --namespace / IMAGE_REWRITER_NAMESPACE"
        ),
        from_file => Ok(from_file),
    }
}

/// The directory `--dev-self-signed` chose for itself, without `--dev-dir`:
/// removed when dropped, as serving ends, since nobody asked to keep its CA
/// key.
struct OwnDevDir(PathBuf);

impl Drop for OwnDevDir {
    fn drop(&mut self) {
        match std::fs::remove_dir_all(&self.0) {
            Err(error) if error.kind() != std::io::ErrorKind::NotFound => tracing::warn!(
                dir = %self.0.display(),
                %error,
                "cannot remove the development files, a throwaway CA key among them: \
                 remove the directory by hand"
            ),
            _ => {}
        }
    }
}

/// A directory made for this process alone under `parent` (often a shared
/// /tmp): created afresh, never one that was there (which someone else
/// could read, or have made to catch the CA key), and readable by its owner
/// only.
fn new_private_dir(parent: &Path, prefix: &str) -> anyhow::Result<PathBuf> {
    use std::os::unix::fs::DirBuilderExt;
    let pid = std::process::id();
    for attempt in 0..100 {
        let dir = parent.join(format!("{prefix}-{pid}-{attempt}"));
        match std::fs::DirBuilder::new().mode(0o700).create(&dir) {
            Ok(()) => return Ok(dir),
            Err(error) if error.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(error) => {
                anyhow::bail!("cannot create a directory in {}: {error}", parent.display())
            }
        }
    }
    anyhow::bail!(
        "cannot create a directory in {}: {prefix}-{pid}-0 to -99 all exist; pass --dev-dir DIR",
        parent.display()
    )
}

/// `--dev-self-signed`: a throwaway CA and localhost certificate, and the
/// sample config when none was given. Prints where the CA is for `curl`.
fn dev_files(args: &ServeArgs) -> anyhow::Result<(ServedFiles, Option<OwnDevDir>)> {
    let (dir, own_dir) = match &args.dev_dir {
        Some(dir) => (dir.clone(), None),
        None => {
            let dir = new_private_dir(&std::env::temp_dir(), "image-rewriter-dev")?;
            // Before anything is written, so a failed start leaves nothing either.
            (dir.clone(), Some(OwnDevDir(dir)))
        }
    };
    let mut names = vec![
        "localhost".to_owned(),
        "127.0.0.1".to_owned(),
        "::1".to_owned(),
    ];
    names.extend(certs::service_dns_names("image-rewriter", "image-rewriter"));
    let bundle = certs::generate(&CertRequest {
        subject_alt_names: names,
        key_type: KeyType::EcdsaP256,
        // Past the expiry warning's week, so a development run starts quietly.
        validity_days: 30,
        ca_validity_days: 30,
    })?;
    certs::write_bundle(&bundle, &dir, "image-rewriter-tls", "image-rewriter")?;
    let config = match &args.config {
        Some(config) => config.clone(),
        None => {
            let path = dir.join("config.yaml");
            std::fs::write(&path, SAMPLE_CONFIG)?;
            path
        }
    };
    println!("development mode: throwaway certificate for localhost");
    println!("CA certificate: {}", dir.join("ca.crt").display());
    println!("config: {}", config.display());
    if own_dir.is_some() {
        println!(
            "{} is removed at exit; --dev-dir DIR keeps the files",
            dir.display()
        );
    }
    std::io::stdout().flush()?;
    Ok(((config, dir.join("tls.crt"), dir.join("tls.key")), own_dir))
}

/// Whether a subject alternative name is one a TLS client can match: an IP
/// address, or a DNS name (RFC 1123, in any case, as clients compare names
/// without it; a wildcard only as the whole first label).
fn is_san(name: &str) -> bool {
    name.parse::<std::net::IpAddr>().is_ok()
        || is_dns_subdomain(&name.strip_prefix("*.").unwrap_or(name).to_ascii_lowercase())
}

fn write_certs(args: &CertsArgs) -> anyhow::Result<ExitCode> {
    // No fallback here: the Secret and the certificate's names need one.
    let namespace = namespace_name(&args.namespace)?;
    // Service names are RFC 1035 labels: a namespace's rules, and a letter first.
    if !is_dns_label(&args.service) || !args.service.starts_with(|c: char| c.is_ascii_lowercase()) {
        anyhow::bail!(
            "--service {:?} is not a valid Service name (lower-case letters, digits and '-', \
             starting with a letter and ending with a letter or digit, at most 63 characters)",
            args.service
        );
    }
    if !is_dns_subdomain(&args.secret_name) {
        anyhow::bail!(
            "--secret-name {:?} is not a valid Secret name (lower-case letters, digits, '-' \
             and '.', at most 253 characters)",
            args.secret_name
        );
    }
    // Empty entries name nothing: an empty IMAGE_REWRITER_EXTRA_SANS, `a,,b`.
    let extra_sans = args.extra_sans.iter().filter(|san| !san.is_empty());
    if let Some(bad) = extra_sans.clone().find(|san| !is_san(san)) {
        anyhow::bail!(
            "--extra-san {bad:?} is neither an IP address nor a DNS name (letters, digits, '-' \
             and '.', at most 253 characters; '*.' may lead)"
        );
    }
    let mut names = certs::service_dns_names(&args.service, namespace);
    names.extend(extra_sans.cloned());
    let request = CertRequest {
        subject_alt_names: names,
        key_type: args.key_type,
        validity_days: args.validity_days,
        ca_validity_days: args.ca_validity_days,
    };
    let existing_ca = if args.new_ca {
        None
    } else {
        certs::ExistingCa::read(&args.out)?
    };
    let mut outgoing_ca = None;
    let bundle = match &existing_ca {
        Some(ca) => certs::renew(&request, ca)?,
        None => {
            let mut bundle = certs::generate(&request)?;
            outgoing_ca = certs::outgoing_ca(&args.out);
            if let Some(outgoing) = &outgoing_ca {
                bundle.ca_cert.push_str(outgoing);
            }
            bundle
        }
    };
    let written = certs::write_bundle(&bundle, &args.out, &args.secret_name, namespace)?;
    for path in written {
        println!("wrote {}", path.display());
    }
    match &existing_ca {
        Some(ca) => println!(
            "kept the CA in {} (valid until {}): the webhook's caBundle is unchanged",
            args.out.join("ca.crt").display(),
            ca.not_after().date()
        ),
        None if outgoing_ca.is_some() => println!(
            "made a new CA; ca.crt and the caBundle also hold the CA it replaces, so pods still \
             serving that CA's certificate stay trusted until they load the new one"
        ),
        None => println!("made a new CA"),
    }
    match certs_overlay_reading(&args.out) {
        Some(overlay) => println!(
            "next: kubectl apply -k {} (or opt-in); it reads {}",
            overlay.display(),
            args.out.display()
        ),
        None => println!(
            "next: the overlays {CERTS_OVERLAY} and opt-in read the repository's certs/, not {}: \
             copy secret.yaml and webhook-ca-bundle.yaml there (or run again with --out certs/ \
             from the repository's root), then kubectl apply -k {CERTS_OVERLAY} (or opt-in)",
            args.out.display()
        ),
    }
    Ok(ExitCode::SUCCESS)
}

/// An overlay that takes the serving certificate from `image-rewriter
/// certs`, as the repository's root names it; it reads `../../../certs`.
const CERTS_OVERLAY: &str = "manifests/overlays/cluster-wide";

/// The overlay that reads the files `certs` wrote to `out`, when `out` is a
/// repository's `certs` directory; named from the repository's root when
/// that is the working directory, else in full.
fn certs_overlay_reading(out: &Path) -> Option<PathBuf> {
    let certs = out.canonicalize().ok()?;
    let repository = certs.parent()?;
    let overlay = repository.join(CERTS_OVERLAY);
    if certs.file_name()? != "certs" || !overlay.join("kustomization.yaml").is_file() {
        return None;
    }
    let at_root = std::env::current_dir()
        .and_then(|dir| dir.canonicalize())
        .is_ok_and(|dir| dir == repository);
    Some(if at_root {
        PathBuf::from(CERTS_OVERLAY)
    } else {
        overlay
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_development_directory_is_made_afresh_and_private() {
        use std::os::unix::fs::PermissionsExt;
        let parent = tempfile::tempdir().unwrap();
        let taken = parent
            .path()
            .join(format!("image-rewriter-dev-{}-0", std::process::id()));
        std::fs::create_dir(&taken).unwrap();
        std::fs::write(taken.join("theirs"), "").unwrap();

        let made = new_private_dir(parent.path(), "image-rewriter-dev").unwrap();
        assert_ne!(made, taken, "a directory that was there is never used");
        assert!(taken.join("theirs").exists());
        let mode = std::fs::metadata(&made).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o700, "{mode:o}");
    }

    fn from_service_account() -> Option<String> {
        Some("from-sa\n".to_owned())
    }

    #[test]
    fn the_flag_wins_over_the_service_account() {
        let namespace = own_namespace(Some("webhooks"), from_service_account).unwrap();
        assert_eq!(namespace.as_deref(), Some("webhooks"));
    }

    #[test]
    fn no_flag_reads_the_service_account() {
        let namespace = own_namespace(None, from_service_account).unwrap();
        assert_eq!(namespace.as_deref(), Some("from-sa"));
        assert_eq!(own_namespace(None, || None).unwrap(), None);
    }

    #[test]
    fn an_empty_flag_counts_as_not_given() {
        // `IMAGE_REWRITER_NAMESPACE: ""` in a manifest, or `--namespace ""`.
        let namespace = own_namespace(Some(""), from_service_account).unwrap();
        assert_eq!(namespace.as_deref(), Some("from-sa"));
    }

    #[test]
    fn a_flag_that_is_no_namespace_name_is_refused_naming_the_flag() {
        let too_long = "a".repeat(64);
        for given in ["Foo", "-a", "a-", "a.b", "a_b", " a", too_long.as_str()] {
            let refusal = own_namespace(Some(given), from_service_account)
                .err()
                .map(|e| e.to_string())
                .unwrap_or_default();
            assert!(
                refusal.contains("--namespace") && refusal.contains("IMAGE_REWRITER_NAMESPACE"),
                "{given:?}: {refusal:?}"
            );
        }
        let longest = "a".repeat(63);
        assert!(own_namespace(Some(&longest), from_service_account).is_ok());
    }

    #[test]
    fn a_service_account_file_that_is_no_namespace_name_is_refused_naming_the_file() {
        for garbled in ["Foo\n", "a b", "ns/other", "\u{feff}ns"] {
            let refusal = own_namespace(None, || Some(garbled.to_owned()))
                .err()
                .map(|e| e.to_string())
                .unwrap_or_default();
            assert!(
                refusal.contains(SERVICE_ACCOUNT_NAMESPACE) && refusal.contains("--namespace"),
                "{garbled:?}: {refusal:?}"
            );
        }
        // The flag still overrides a garbled file.
        let namespace = own_namespace(Some("webhooks"), || Some("Foo".to_owned())).unwrap();
        assert_eq!(namespace.as_deref(), Some("webhooks"));
    }
}
