use std::process::ExitCode;

use clap::Parser as _;

fn main() -> ExitCode {
    let cli = image_rewriter::cli::Cli::parse();
    image_rewriter::cli::run(cli)
}
