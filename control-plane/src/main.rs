//! `ironroot-plane`: parse arguments, set up logging, run. Everything else is in the library.

use clap::Parser as _;

fn main() -> std::process::ExitCode {
    let cli = ironroot_plane::cli::Cli::parse();
    let builder = tracing_subscriber::fmt().with_writer(std::io::stderr);
    match std::env::var("IRONROOT_LOG") {
        Ok(filter) => builder.with_env_filter(tracing_subscriber::EnvFilter::new(filter)).init(),
        Err(_) => builder.with_max_level(tracing::Level::INFO).init(),
    }
    ironroot_plane::cli::run(cli)
}
