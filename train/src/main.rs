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
