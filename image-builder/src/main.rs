//! `ironroot-build`: parse arguments, set up logging, run. Everything else is in the library.

use std::process::ExitCode;

use clap::Parser as _;

fn main() -> ExitCode {
    let cli = ironroot_build::cli::Cli::parse();
    // An EnvFilter compiles regexes at start-up; build one only when asked for.
    let builder = tracing_subscriber::fmt().with_writer(std::io::stderr);
    match std::env::var("IRONROOT_LOG") {
        Ok(filter) => builder.with_env_filter(tracing_subscriber::EnvFilter::new(filter)).init(),
        Err(_) => builder.with_max_level(tracing::Level::WARN).init(),
    }
    ironroot_build::cli::run(cli).into()
}
