use std::process::ExitCode;

// Why mimalloc, and what it costs in memory: see Cargo.toml.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    // Where transparent huge pages are "always", each touched 2 MiB of
    // mimalloc's arenas became a huge page (peak RSS 15 -> 27 MiB). The
    // image sets MIMALLOC_ALLOW_THP=0, with which mimalloc disables them
    // itself before its first mapping; this covers a binary run without
    // it, for what is touched from here on (19.5 MiB). Best effort: a kernel
    // without the prctl only costs memory.
    #[cfg(target_os = "linux")]
    let _ = rustix::thread::disable_transparent_huge_pages(true);
    // One process-wide TLS provider: ring (no aws-lc-rs build needed).
    let _ = rustls::crypto::ring::default_provider().install_default();
    let cli = image_rewriter::cli::Cli::from_process();
    image_rewriter::cli::run(cli)
}
