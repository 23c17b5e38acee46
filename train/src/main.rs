//! `cargo run --release -p train -- [options]`: trains a ternary CNN on CIFAR-10 (`--model`).
//! The last line printed is a JSON summary.

use anyhow::Result;
use clap::Parser;

fn main() {
    let args = train::cli::Args::parse();
    if let Err(e) = run(args) {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

fn run(args: train::cli::Args) -> Result<()> {
    let mut trainer = train::trainer::Trainer::new(args)?;
    let summary = trainer.run()?;
    println!("{}", serde_json::to_string(&summary)?);
    Ok(())
}

/// jemalloc, keeping the pages it frees: a CPU training step allocates and frees feature maps of
/// tens to hundreds of MB, which the system allocator maps fresh each time, so the kernel zeroed
/// every page again on every step. The process keeps its peak heap until it exits.
#[cfg(not(target_env = "msvc"))]
#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// jemalloc's options, read once when it starts: no decay of freed pages back to the system, and
/// transparent huge pages for its memory (as the system allocator gets for large mappings).
#[cfg(not(target_env = "msvc"))]
#[allow(non_upper_case_globals)]
#[export_name = "_rjem_malloc_conf"]
pub static malloc_conf: &[u8] = b"dirty_decay_ms:-1,muzzy_decay_ms:-1,thp:always\0";
