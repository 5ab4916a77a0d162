//! The `ironroot-plane` command line: `serve`, and the operator commands that talk to a
//! running plane over mTLS. Exit codes: [`crate::exit::Exit`].

mod args;
mod catalog;
mod operator;

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{Context as _, bail};

pub use args::{Cli, Command, ServeArgs, parse_duration};

use crate::admission::ConnectionLimits;
use crate::client::{ClientConfig, OperatorClient};
use crate::connection::Deadlines;
use crate::exit::{Exit, exit_for};
use crate::provider::{ProviderConfig, ProviderKind};
use crate::server::ServerOptions;
use crate::store::Settings;

pub fn run(cli: Cli) -> ExitCode {
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: starting runtime: {e}");
            return ExitCode::from(Exit::Failure.code());
        }
    };
    match runtime.block_on(dispatch(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(exit_for(&e).code())
        }
    }
}

/// The serve flags as settings, each checked against the others.
fn settings(args: &ServeArgs) -> anyhow::Result<(Settings, ServerOptions)> {
    let settings = Settings {
        token_ttl: args.token_ttl,
        cert_ttl: args.cert_ttl,
        heartbeat_interval: args.heartbeat_interval,
        suspect_after: args.suspect_after,
        silent_after: args.silent_after,
        rollout_grace: args.rollout_grace.unwrap_or_else(|| Settings::rollout_grace_for(args.heartbeat_interval)),
        task_lease: args.task_lease,
        enroll_burst: args.enroll_burst,
        enroll_per_second: args.enroll_rate,
    };
    if settings.token_ttl.is_zero() || settings.token_ttl > crate::enroll::MAX_TOKEN_TTL {
        bail!("--token-ttl must be 1 s to 30 days");
    }
    if settings.cert_ttl < std::time::Duration::from_secs(60) || settings.cert_ttl > crate::ca::MAX_NODE_CERT_TTL {
        bail!("--cert-ttl must be 60 s to {} days", crate::ca::MAX_NODE_CERT_TTL.as_secs() / 86_400);
    }
    if settings.heartbeat_interval.is_zero() || settings.task_lease.is_zero() {
        bail!("--heartbeat-interval and --task-lease must be above zero");
    }
    if !(args.enroll_rate.is_finite() && args.enroll_rate >= 0.0) {
        bail!("--enroll-rate must be a number of attempts per second, 0 or more");
    }
    if args.idle_timeout <= args.heartbeat_interval {
        bail!("--idle-timeout must be above --heartbeat-interval (nodes keep their connection between heartbeats)");
    }
    if args.handshake_timeout.is_zero() || args.header_timeout.is_zero() || args.checkpoint_interval.is_zero() {
        bail!("--handshake-timeout, --header-timeout and --checkpoint-interval must be above zero");
    }
    if args.max_anonymous == 0 || args.max_anonymous_per_address == 0 {
        bail!("--max-anonymous and --max-anonymous-per-address must be at least 1 (enrollment needs them)");
    }
    if args.machine_lifetime.is_zero() {
        bail!("--machine-lifetime must be above zero");
    }
    let publisher = publisher(args)?;
    let mut names = vec!["127.0.0.1".to_owned(), "localhost".to_owned()];
    names.extend(args.names.iter().cloned());
    // The machines name the plane by the address they reach it at.
    let guest = crate::provider::qemu::GUEST_HOST.to_owned();
    if args.provider != ProviderKind::Disabled && !names.contains(&guest) {
        names.push(guest);
    }
    let options = ServerOptions {
        names,
        limits: ConnectionLimits {
            max_anonymous: args.max_anonymous,
            max_anonymous_per_address: args.max_anonymous_per_address,
        },
        deadlines: Deadlines {
            handshake: args.handshake_timeout,
            header: args.header_timeout,
            idle: args.idle_timeout,
        },
        checkpoint_interval: args.checkpoint_interval,
        publisher,
        provider: ProviderConfig {
            kind: args.provider,
            bundle: args.bundle.clone(),
            qemu: args.qemu.clone(),
            forwards: args.machine_forwards.clone(),
            lifetime: args.machine_lifetime,
        },
    };
    Ok((settings, options))
}

/// Where the registry password comes from (never argv: it is world-readable).
const PASSWORD_VAR: &str = "IRONROOT_REGISTRY_PASSWORD";

/// `--trust`, `--registry-ca` and `--registry-user` as the publisher's keys and registry access.
fn publisher(args: &ServeArgs) -> anyhow::Result<crate::publish::Publisher> {
    let mut trust = Vec::new();
    for path in &args.trust {
        let pem = std::fs::read_to_string(path).with_context(|| format!("--trust: reading {}", path.display()))?;
        trust.push(
            ironroot_contract::TrustedKey::parse_pem(&pem).with_context(|| format!("--trust {}", path.display()))?,
        );
    }
    let mut access = ironroot_oci::RegistryAccess::default();
    if let Some(path) = &args.registry_ca {
        let pem = std::fs::read(path).with_context(|| format!("--registry-ca: reading {}", path.display()))?;
        reqwest::Certificate::from_pem_bundle(&pem).with_context(|| format!("--registry-ca {}", path.display()))?;
        access.ca_pem.push(pem);
    }
    if let Some(user) = &args.registry_user {
        let password = std::env::var(PASSWORD_VAR).with_context(|| format!("--registry-user needs ${PASSWORD_VAR}"))?;
        access.credentials = ironroot_oci::Credentials::Basic { user: user.clone(), password };
    }
    Ok(crate::publish::Publisher::new(trust, access).with_aliases(args.registry_aliases.iter().cloned()))
}

async fn serve(state: PathBuf, args: ServeArgs) -> anyhow::Result<()> {
    let (settings, options) = settings(&args)?;
    crate::server::raise_descriptor_limit();
    // Bound first: the machine provider gives its guests the port.
    let listener =
        tokio::net::TcpListener::bind(&args.listen).await.with_context(|| format!("listening on {}", args.listen))?;
    let addr = listener.local_addr().context("local address")?;
    let (plane, tls) = crate::server::open_state(&state, settings, &options, addr)?;
    crate::ca::write_secret(&crate::server::StateDir(state.clone()).address(), &format!("{addr}\n"), 0o644)?;
    tracing::info!(%addr, state = %state.display(), "plane listening");
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("installing the SIGTERM handler")?;
    let shutdown = async move {
        tokio::select! {
            _ = term.recv() => {}
            _ = tokio::signal::ctrl_c() => {}
        }
        tracing::info!("shutting down");
    };
    crate::server::serve(Arc::new(plane), tls, listener, options.checkpoint_interval, shutdown).await
}

async fn dispatch(cli: Cli) -> anyhow::Result<()> {
    if let Command::Serve(args) = cli.command {
        let state = cli.target.state.context("serve needs --state DIR")?;
        return serve(state, *args).await;
    }
    let t = cli.target;
    let client =
        OperatorClient::connect(&ClientConfig { state: t.state, plane: t.plane, cert: t.cert, key: t.key, ca: t.ca })?;
    operator::run(&client, cli.command).await
}

#[cfg(test)]
mod tests {
    use clap::Parser as _;

    use super::*;

    fn serve_args(extra: &[&str]) -> ServeArgs {
        let mut argv = vec!["ironroot-plane", "serve"];
        argv.extend(extra);
        match Cli::try_parse_from(argv).unwrap().command {
            Command::Serve(a) => *a,
            _ => unreachable!("parsed serve"),
        }
    }

    #[test]
    fn serve_flags_are_checked_against_each_other() {
        assert!(settings(&serve_args(&[])).is_ok(), "the defaults are consistent");
        let bad: &[(&[&str], &str)] = &[
            (&["--token-ttl", "31d"], "--token-ttl"),
            (&["--token-ttl", "0"], "--token-ttl"),
            (&["--cert-ttl", "30s"], "--cert-ttl"),
            (&["--idle-timeout", "30s"], "--idle-timeout"),
            (&["--heartbeat-interval", "200s"], "--idle-timeout"),
            (&["--max-anonymous", "0"], "--max-anonymous"),
            (&["--checkpoint-interval", "0"], "--checkpoint-interval"),
            (&["--enroll-rate", "NaN"], "--enroll-rate"),
            (&["--machine-lifetime", "0"], "--machine-lifetime"),
        ];
        for (flags, needle) in bad {
            let err = settings(&serve_args(flags)).unwrap_err().to_string();
            assert!(err.contains(needle), "{flags:?}: {err}");
        }
        assert!(parse_duration("18446744073709551615d").unwrap_err().contains("too long"));
        assert_eq!(parse_duration("2m"), Ok(std::time::Duration::from_secs(120)));
    }
}
