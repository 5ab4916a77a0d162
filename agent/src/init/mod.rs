//! The agent as PID 1 of the native initramfs (`/init`):
//!
//! 1. mount proc, sys, devtmpfs and /run; load the kernel modules the image builder listed;
//! 2. bring the network up (DHCP, [`net`]);
//! 3. run the boot pipeline ([`crate::boot::run`]) with the root `/` and target `/sysroot`;
//! 4. switch root into the module's `/sbin/init`, `/run/ironroot/boot.json` carried across.
//!
//! PID 1 must never exit (the kernel would panic). On any failure it prints why on the
//! console, tells the plane the failed phase when the node is enrolled, and then reboots or
//! powers off as `ironroot.on_failure=` says (reboot by default).

pub mod net;
pub mod sys;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use ironroot_oci::{Limits, RegistryAccess};

use crate::boot::{self, BootOptions, cmdline, retry::Backoff};

/// How long the NIC driver gets to create an interface.
const NIC_WAIT: Duration = Duration::from_secs(20);

/// What `ironroot.on_failure` and `ironroot.debug` say, read straight from the cmdline so a
/// failure in discovery still knows what to do.
#[derive(Debug, Clone, Copy)]
struct Early {
    halt: bool,
    debug: bool,
}

fn early_settings() -> Early {
    let cmd = cmdline::read_cmdline(Path::new("/")).ok();
    let get = |k: &str| cmd.as_ref().and_then(|c| c.get(k).map(str::to_owned));
    Early {
        halt: get("ironroot.on_failure").as_deref() == Some("halt"),
        debug: get("ironroot.debug").as_deref() == Some("1"),
    }
}

/// Runs as PID 1. Never returns.
pub fn main() -> ! {
    let started = Instant::now();
    let mut early_phases = BTreeMap::from([("kernel".to_owned(), crate::boot::handoff::boottime_ms())]);
    console("ironroot: initramfs agent starting");
    if let Err(e) = sys::early_mounts() {
        fail_early(&format!("early mounts: {e}"), false);
    }
    let early = early_settings();
    init_logging(early.debug);
    let lap = Instant::now();
    match sys::load_modules(Path::new("/etc/ironroot/modules.load")) {
        Ok(l) => {
            tracing::info!(
                loaded = l.loaded.len(),
                already = l.already.len(),
                failed = l.failed.len(),
                "kernel modules"
            );
            for (path, err) in &l.failed {
                tracing::warn!(module = %path, error = %err, "kernel module not loaded");
            }
        }
        Err(e) => tracing::warn!(error = %e, "no module list at /etc/ironroot/modules.load"),
    }
    early_phases.insert("modules".to_owned(), lap.elapsed().as_millis() as u64);
    let runtime = match tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build() {
        Ok(rt) => rt,
        Err(e) => fail_early(&format!("starting the runtime: {e}"), early.halt),
    };
    // A panic must not end PID 1 (the kernel would panic too): it becomes a failed boot.
    let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| runtime.block_on(async {
        let lap = Instant::now();
        let lease = net::up(NIC_WAIT).await.map_err(|e| format!("network: {}", crate::exit::describe(&e)))?;
        tracing::info!(interface = %lease.interface, address = %lease.address, prefix = lease.prefix, router = ?lease.router, "network up");
        early_phases.insert("network".to_owned(), lap.elapsed().as_millis() as u64);
        let opts = BootOptions {
            root: PathBuf::from("/"),
            devices: PathBuf::from("/"),
            target: PathBuf::from("/sysroot"),
            mkfs_ext4: PathBuf::from("/sbin/mkfs.ext4"),
            backoff: Backoff::BOOT,
            limits: Limits::standard(),
            access: registry_access(),
            early_phases_ms: early_phases.clone(),
        };
        match boot::run(&opts).await {
            Ok(record) => Ok(record),
            Err(e) => {
                console(&format!("ironroot: BOOT FAILED in phase {}: {}", e.phase, crate::exit::describe(&*e.source)));
                let told = e.report().await;
                Err(format!(
                    "phase {} (exit {}){}",
                    e.phase,
                    e.exit.code(),
                    if told { "; reported to the plane" } else { "; not reported (no plane identity yet)" }
                ))
            }
        }
    })))
    .unwrap_or_else(|panic| {
        let what = panic
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| panic.downcast_ref::<&str>().map(|s| (*s).to_owned()))
            .unwrap_or_default();
        Err(format!("the agent panicked: {what}"))
    });
    match outcome {
        Ok(record) => {
            console(&format!(
                "ironroot: root verified and mounted ({} module(s), store {}), {} ms in the initramfs; switching root",
                record.modules.len(),
                record.store.kind,
                started.elapsed().as_millis()
            ));
            drop(runtime);
            sys::reap();
            let err = sys::switch_root(Path::new("/sysroot"), "/sbin/init");
            fail_early(&format!("switch root: {err}"), early.halt)
        }
        Err(why) => fail_early(&why, early.halt),
    }
}

/// Registries are reached over TLS (the guest's host is not loopback); the image builder puts
/// the registry's CA at /etc/ironroot/registry-ca.pem when it is not a public one.
fn registry_access() -> RegistryAccess {
    let ca_pem = std::fs::read(REGISTRY_CA).map(|pem| vec![pem]).unwrap_or_default();
    RegistryAccess { ca_pem, ..RegistryAccess::default() }
}

const REGISTRY_CA: &str = "/etc/ironroot/registry-ca.pem";

/// Prints why on the console, then reboots or powers off. Never returns.
fn fail_early(why: &str, halt: bool) -> ! {
    console(&format!("ironroot: boot failed: {why}"));
    console(if halt { "ironroot: powering off (ironroot.on_failure=halt)" } else { "ironroot: rebooting" });
    sys::reboot(halt)
}

fn console(line: &str) {
    eprintln!("{line}");
}

fn init_logging(debug: bool) {
    let level = if debug { tracing::Level::DEBUG } else { tracing::Level::INFO };
    // A serial console shows escape codes as noise: plain text.
    let _ = tracing_subscriber::fmt().with_writer(std::io::stderr).with_ansi(false).with_max_level(level).try_init();
}
