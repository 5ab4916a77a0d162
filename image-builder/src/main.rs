//! `ironroot-build`: parse arguments, set up logging, run. Everything else is in the library.

use std::process::ExitCode;

use clap::Parser as _;

fn main() -> ExitCode {
    let cli = ironroot_build::cli::Cli::parse();
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_env("IRONROOT_LOG").unwrap_or_else(|_| "warn".into()))
        .init();
    ironroot_build::cli::run(cli).into()
}
