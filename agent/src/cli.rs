//! Command line: `boot` (the pipeline), `serve` (the service), `guard` (a trial root's guard), `pull` (fetch + verify one module into a store) and
//! `identity` (what discovery finds, with provenance). Exit codes: [`Exit`]. Every subcommand and
//! argument has a one-line description in `--help`.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use ironroot_contract::TrustedKey;
use ironroot_oci::source::AnySource;
use ironroot_oci::store::ObjectStore;
use ironroot_oci::verify::verify_module;
use ironroot_oci::{Limits, RegistryAccess, Target, VerifyOptions};

use crate::backoff::Backoff;
use crate::boot::{self, BootOptions};
use crate::exit::Exit;
use crate::external::{self, Links};
use crate::identity::discover;

/// Largest trust key file `pull` reads (a PEM public key is a few hundred bytes).
const MAX_TRUST_FILE: u64 = 64 * 1024;
/// Largest registry CA file read: a whole system bundle is ~200 KiB.
const MAX_CA_FILE: u64 = 4 * 1024 * 1024;

#[derive(Debug, Parser)]
#[command(name = "ironroot-agent", version, about = "ironroot node agent", args_override_self = true)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the boot pipeline: discover, enroll, fetch, verify, mount the composefs root.
    Boot {
        /// Root under which proc/, sys/, etc/, run/ and persist/ are found.
        #[arg(long, default_value = "/")]
        root: PathBuf,
        /// Where the composefs root is mounted [default: ROOT/sysroot].
        #[arg(long)]
        target: Option<PathBuf>,
        /// Where real sysfs and device nodes are (zram, disks).
        #[arg(long, default_value = "/")]
        devices: PathBuf,
        /// The mkfs.ext4 that formats zram and blank disks.
        #[arg(long, default_value = "mkfs.ext4")]
        mkfs_ext4: PathBuf,
        /// Tries for each network step (enroll, desired state, module download).
        #[arg(long, default_value_t = Backoff::BOOT.attempts)]
        retries: u32,
        /// First retry delay in milliseconds (doubling, jittered, capped at 30 s).
        #[arg(long, default_value_t = Backoff::BOOT.first.as_millis() as u64)]
        retry_first_ms: u64,
        #[command(flatten)]
        registry: RegistryArgs,
    },
    /// Fetch and verify one module into an object store.
    Pull {
        /// `host/repo@sha256:…`, `host/repo:tag` or `oci:DIR[:TAG|@DIGEST]`.
        reference: String,
        /// Trusted public key (PKIX PEM); repeat for several.
        #[arg(long, required = true)]
        trust: Vec<PathBuf>,
        /// Object store directory (created if missing).
        #[arg(long)]
        store: PathBuf,
        /// Refuse a module whose serial is below this.
        #[arg(long)]
        min_serial: Option<u64>,
        /// Packs fetched and unpacked at once.
        #[arg(long, default_value_t = Limits::standard().parallel)]
        parallel: usize,
        #[command(flatten)]
        registry: RegistryArgs,
        /// Print the module record as JSON instead of a summary line.
        #[arg(long)]
        json: bool,
    },
    /// The service under systemd: handshake `ready`, heartbeats, sd-notify.
    Serve {
        /// Where boot.json (and the node identity it points to) is.
        #[arg(long, default_value = "/run/ironroot")]
        run_dir: PathBuf,
        /// Seconds between heartbeats (1-3600), jittered by ±10 % [default: the boot record's,
        /// i.e. `ironroot.heartbeat` from any identity source, else 30].
        #[arg(long, value_parser = clap::value_parser!(u64).range(1..=3600))]
        interval: Option<u64>,
    },
    /// Guard a root entered on trial from outside it: go back to the root before when the
    /// trial is still open past its deadline (started by `serve` before a soft reboot).
    Guard {
        /// Where boot.json and the staged root's record (boot.next.json) are.
        #[arg(long, default_value = "/run/ironroot")]
        run_dir: PathBuf,
        /// The root transaction whose trial is guarded.
        #[arg(long)]
        txn: String,
        /// Seconds past the trial's deadline left to the trial root's own agent.
        #[arg(long, default_value_t = crate::service::guard::GRACE_S)]
        grace: u64,
    },
    /// Show the identity discovery finds, with where each value came from.
    Identity {
        /// Root under which proc/, sys/ and etc/ are found.
        #[arg(long, default_value = "/")]
        root: PathBuf,
        /// Print JSON (the `identity` object of boot.json) instead of a table.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, clap::Args)]
pub struct RegistryArgs {
    /// Extra CA certificate (PEM) for registries; implies TLS.
    #[arg(long = "registry-ca")]
    ca: Vec<PathBuf>,
}

impl RegistryArgs {
    fn access(&self) -> anyhow::Result<RegistryAccess> {
        let ca_pem = self
            .ca
            .iter()
            .map(|p| external::read(p, MAX_CA_FILE, Links::Follow).context("registry CA"))
            .collect::<anyhow::Result<_>>()?;
        Ok(RegistryAccess { ca_pem, ..RegistryAccess::default() })
    }
}

pub fn run(cli: Cli) -> Exit {
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: starting the runtime: {e}");
            return Exit::Failure;
        }
    };
    runtime.block_on(dispatch(cli.command))
}

fn fail(err: &dyn std::error::Error) {
    eprintln!("error: {}", crate::exit::describe(err));
}

async fn dispatch(command: Command) -> Exit {
    match command {
        Command::Boot { root, target, devices, mkfs_ext4, retries, retry_first_ms, registry } => {
            let access = match registry.access() {
                Ok(a) => a,
                Err(e) => {
                    eprintln!("error: {e:#}");
                    return Exit::Usage;
                }
            };
            let opts = BootOptions {
                target: target.unwrap_or_else(|| root.join("sysroot")),
                root,
                devices,
                mkfs_ext4,
                backoff: Backoff {
                    attempts: retries.max(1),
                    first: Duration::from_millis(retry_first_ms),
                    ..Backoff::BOOT
                },
                limits: Limits::standard(),
                access,
                early_phases_ms: std::collections::BTreeMap::new(),
                hardware: None,
                network: None,
            };
            match boot::run(&opts).await {
                Ok(record) => {
                    println!("{}", serde_json::to_string(&record).unwrap_or_default());
                    Exit::Ok
                }
                Err(e) => {
                    fail(&e);
                    e.report().await;
                    e.exit
                }
            }
        }
        Command::Serve { run_dir, interval } => {
            let opts = crate::service::ServeOptions { run_dir, interval: interval.map(Duration::from_secs) };
            match crate::service::serve(&opts).await {
                Ok(()) => Exit::Ok,
                Err(e) => {
                    fail(&e);
                    e.exit()
                }
            }
        }
        Command::Guard { run_dir, txn, grace } => {
            match crate::service::guard::guard(&crate::service::guard::GuardOptions { run_dir, txn, grace }).await {
                Ok(()) => Exit::Ok,
                Err(e) => {
                    fail(&e);
                    Exit::Failure
                }
            }
        }
        Command::Pull { reference, trust, store, min_serial, parallel, registry, json } => {
            let limits = Limits { parallel: parallel.max(1), ..Limits::standard() };
            match pull(&reference, &trust, &store, min_serial, limits, &registry, json).await {
                Ok(()) => Exit::Ok,
                Err((exit, e)) => {
                    eprintln!("error: {e:#}");
                    exit
                }
            }
        }
        Command::Identity { root, json } => match discover::discover(&discover::DiscoverOptions::new(&root)).await {
            Ok(found) => {
                let record = boot::handoff::identity_record(&found);
                if json {
                    println!("{}", serde_json::to_string_pretty(&record).unwrap_or_default());
                } else {
                    for (key, v) in &record.values {
                        println!("{key:<12} {:<40} ({})", v.value, v.source);
                    }
                    for c in &record.conflicts {
                        println!(
                            "conflict: {} is {:?} from {} but {:?} from {}",
                            c.key, c.chosen.value, c.chosen.source, c.other.value, c.other.source
                        );
                    }
                    for n in &record.notes {
                        println!("note: {n}");
                    }
                }
                Exit::Ok
            }
            Err(e) => {
                fail(&e);
                Exit::Discover
            }
        },
    }
}

async fn pull(
    reference: &str,
    trust: &[PathBuf],
    store: &std::path::Path,
    min_serial: Option<u64>,
    limits: Limits,
    registry: &RegistryArgs,
    json: bool,
) -> Result<(), (Exit, anyhow::Error)> {
    let usage = |e: anyhow::Error| (Exit::Failure, e);
    let keys = trust
        .iter()
        .map(|p| {
            let pem = external::read(p, MAX_TRUST_FILE, Links::Follow).context("trust key")?;
            let pem = String::from_utf8(pem).with_context(|| format!("trust key {} is not UTF-8 PEM", p.display()))?;
            TrustedKey::parse_pem(&pem).with_context(|| format!("trust key {}", p.display()))
        })
        .collect::<anyhow::Result<Vec<_>>>()
        .map_err(usage)?;
    let target = Target::parse(reference).map_err(|e| usage(e.into()))?;
    let source = AnySource::open(&target, &registry.access().map_err(usage)?).map_err(|e| usage(e.into()))?;
    let objects =
        ObjectStore::open(store).with_context(|| format!("opening store {}", store.display())).map_err(usage)?;
    let opts = VerifyOptions { trust: keys, min_serial, limits };
    let started = std::time::Instant::now();
    let v = verify_module(&source, target.tag(), target.digest(), &objects, &opts).await.map_err(|e| {
        let exit = Exit::from(e.kind());
        (exit, anyhow::Error::new(e).context(format!("pulling {reference}")))
    })?;
    let record = crate::modules::record(&v, Some(reference));
    if json {
        println!("{}", serde_json::to_string(&record).unwrap_or_default());
    } else {
        println!(
            "verified {} {} serial {} ({}), {} bytes downloaded, {} new objects, {:.1} s",
            record.name,
            record.version,
            record.serial,
            record.digest,
            record.downloaded_bytes,
            record.new_objects,
            started.elapsed().as_secs_f64()
        );
    }
    Ok(())
}
