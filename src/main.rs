use std::process::ExitCode;

use clap::Parser as _;

// Measured under load: ~8% less CPU per review than glibc's malloc.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    // mimalloc's arenas are 2 MiB-aligned: on a node with transparent huge
    // pages "always" each touched arena page became a huge page, and RSS
    // went from 15 to 27 MiB under load. Best effort: a kernel without the
    // prctl only costs memory.
    #[cfg(target_os = "linux")]
    let _ = rustix::thread::disable_transparent_huge_pages(true);
    // One process-wide TLS provider: ring (no aws-lc-rs build needed).
    let _ = rustls::crypto::ring::default_provider().install_default();
    let cli = image_rewriter::cli::Cli::parse();
    image_rewriter::cli::run(cli)
}
