//! `ironroot-agent`: parse arguments, set up logging, run. Everything else is in the library.

use std::process::ExitCode;

use clap::Parser as _;

fn main() -> ExitCode {
    // The kernel runs /init as PID 1: the initramfs flavour, which never returns.
    if std::process::id() == 1 {
        ironroot_agent::init::main();
    }
    let cli = ironroot_agent::cli::Cli::parse();
    // Logs go to stderr: readable on a serial console, captured by journald under systemd.
    let builder = tracing_subscriber::fmt().with_writer(std::io::stderr);
    match std::env::var("IRONROOT_LOG") {
        Ok(filter) => builder.with_env_filter(tracing_subscriber::EnvFilter::new(filter)).init(),
        Err(_) => builder.with_max_level(tracing::Level::INFO).init(),
    }
    ExitCode::from(ironroot_agent::cli::run(cli).code())
}
