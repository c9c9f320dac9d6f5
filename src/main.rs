use std::process::ExitCode;

use clap::Parser as _;

fn main() -> ExitCode {
    // One process-wide TLS provider: ring (no aws-lc-rs build needed).
    let _ = rustls::crypto::ring::default_provider().install_default();
    let cli = image_rewriter::cli::Cli::parse();
    image_rewriter::cli::run(cli)
}
