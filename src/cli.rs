//! The command line. Every flag also reads an `IMAGE_REWRITER_*` variable.

use std::io::{Read as _, Write as _};
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};

use crate::config::load_policy;
use crate::offline::{RewriteReport, mutate_documents};

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

#[derive(Debug, Subcommand)]
pub enum Command {
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
    let mut all_valid = true;
    for image in &args.images {
        let report = RewriteReport::new(&policy, image);
        all_valid &= report.is_valid_input();
        let line = match args.output {
            OutputFormat::Text => report.to_text(),
            OutputFormat::Json => serde_json::to_string(&report)?,
        };
        writeln!(stdout, "{line}")?;
    }
    if all_valid {
        Ok(ExitCode::SUCCESS)
    } else {
        eprintln!("image-rewriter: some images are not valid references");
        Ok(ExitCode::FAILURE)
    }
}

fn mutate(args: &MutateArgs) -> anyhow::Result<ExitCode> {
    let policy = load_policy(&args.config, args.namespace.as_deref())?;
    let input = if args.file.as_os_str() == "-" {
        let mut text = String::new();
        std::io::stdin().read_to_string(&mut text)?;
        text
    } else {
        std::fs::read_to_string(&args.file)
            .map_err(|e| anyhow::anyhow!("cannot read {}: {e}", args.file.display()))?
    };
    let mutated = mutate_documents(&policy, &input)?;
    for warning in &mutated.warnings {
        eprintln!("warning: {warning}");
    }
    std::io::stdout()
        .lock()
        .write_all(mutated.output.as_bytes())?;
    Ok(ExitCode::SUCCESS)
}

fn check_config(args: &CheckConfigArgs) -> anyhow::Result<ExitCode> {
    let policy = load_policy(&args.config, None)?;
    println!(
        "{}: OK, {} rule(s); never touched: namespaces {}",
        args.config.display(),
        policy.rules().len(),
        policy.excluded_namespaces().collect::<Vec<_>>().join(", ")
    );
    Ok(ExitCode::SUCCESS)
}
