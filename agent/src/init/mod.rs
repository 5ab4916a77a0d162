//! The agent as PID 1 of the native initramfs (`/init`):
//!
//! 1. mount proc, sys, devtmpfs and /run; load the drivers the hardware asks for
//!    ([`coldplug`]), then the fixed set the image builder listed;
//! 2. bring the network up on the boot NIC ([`nic`], DHCP in [`net`]);
//! 3. run the boot pipeline ([`crate::boot::run`]) with the root `/` and target `/sysroot`;
//! 4. switch root into the module's `/sbin/init`, `/run/ironroot/boot.json` carried across.
//!
//! PID 1 must never exit (the kernel would panic). On any failure it prints why on the
//! console, tells the plane the failed phase when the node is enrolled, and then reboots or
//! powers off as `ironroot.on_failure=` says (reboot by default). Until discovery has made the
//! boot settings, that and `ironroot.debug` come from the kernel command line alone; from then
//! on from the settings, i.e. from any identity source (docs/interfaces/kernel-cmdline.md).

pub mod coldplug;
pub mod net;
pub mod nic;
pub mod sys;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use ironroot_oci::{Limits, RegistryAccess};

use crate::backoff::Backoff;
use crate::boot::settings::OnFailure;
use crate::boot::{self, BootError, BootOptions};
use crate::cmdline;
use crate::external::{self, Links};

/// How long the NIC driver gets to create an interface.
const NIC_WAIT: Duration = Duration::from_secs(20);

/// Largest registry CA bundle read from the initramfs.
const MAX_REGISTRY_CA: u64 = 4 * 1024 * 1024;

/// What `ironroot.on_failure` and `ironroot.debug` say on the kernel command line, read before
/// anything else so that a failure up to and including discovery still knows what to do. An
/// invalid value counts as the default here; discovery then refuses it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Early {
    on_failure: OnFailure,
    debug: bool,
}

fn early_settings() -> Early {
    let cmd = cmdline::read_cmdline(Path::new("/")).ok();
    early_from(cmd.as_ref())
}

fn early_from(cmd: Option<&cmdline::Cmdline>) -> Early {
    let get = |k: &str| cmd.and_then(|c| c.get(k));
    Early {
        on_failure: if get("ironroot.on_failure") == Some("halt") { OnFailure::Halt } else { OnFailure::Reboot },
        debug: get("ironroot.debug") == Some("1"),
    }
}

/// Runs as PID 1. Never returns.
pub fn main() -> ! {
    let started = Instant::now();
    let mut early_phases = BTreeMap::from([("kernel".to_owned(), crate::run_state::boottime_ms())]);
    console("ironroot: initramfs agent starting");
    if let Err(e) = sys::early_mounts() {
        fail_early(&format!("early mounts: {e}"), OnFailure::Reboot);
    }
    let early = early_settings();
    let set_debug = init_logging(early.debug);
    // The cmdline's word until the settings are made, theirs after.
    let mut on_failure = early.on_failure;
    let lap = Instant::now();
    let hardware = load_drivers();
    early_phases.insert("modules".to_owned(), lap.elapsed().as_millis() as u64);
    let wanted = boot_nic(on_failure);
    let runtime = match tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build() {
        Ok(rt) => rt,
        Err(e) => fail_early(&format!("starting the runtime: {e}"), on_failure),
    };
    // A panic must not end PID 1 (the kernel would panic too): it becomes a failed boot.
    let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| runtime.block_on(async {
        let lap = Instant::now();
        let (lease, network) = net::up(NIC_WAIT, wanted.as_ref()).await.map_err(|e| {
            let unclaimed: Vec<String> =
                hardware.unclaimed.iter().filter(|u| u.kind == "nic").map(|u| u.describe()).collect();
            let also = if unclaimed.is_empty() { String::new() } else { format!(" ({})", unclaimed.join("; ")) };
            format!("network: {}{also}", crate::exit::describe(&e))
        })?;
        tracing::info!(interface = %lease.interface, mac = %lease.mac, driver = %network.driver.as_deref().unwrap_or("-"), address = %lease.address, prefix = lease.prefix, router = ?lease.router, because = %network.reason, "network up");
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
            hardware: Some(hardware.clone()),
            network: Some(network),
        };
        let configured = match boot::configure(&opts).await {
            Ok(configured) => configured,
            Err(e) => return Err(failed(e).await),
        };
        on_failure = configured.settings.on_failure;
        if configured.settings.debug != early.debug {
            set_debug(configured.settings.debug);
        }
        match boot::run_configured(&opts, configured).await {
            Ok(record) => Ok(record),
            Err(e) => Err(failed(e).await),
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
            fail_early(&format!("switch root: {err}"), on_failure)
        }
        Err(why) => fail_early(&why, on_failure),
    }
}

/// Loads the drivers the devices ask for and, at the same time (they need nothing of each
/// other), the fixed set; reports what did not load and every NIC or disk controller left
/// without a driver.
fn load_drivers() -> ironroot_contract::run_state::HardwareRecord {
    let fixed = std::thread::spawn(|| sys::load_modules(Path::new("/etc/ironroot/modules.load")));
    let uname = rustix::system::uname();
    let release = uname.release().to_string_lossy().into_owned();
    let hardware = coldplug::run(Path::new("/"), &release);
    tracing::info!(drivers = ?hardware.drivers, rounds = hardware.rounds, "hardware drivers loaded by modalias");
    for f in &hardware.failed {
        tracing::warn!(module = %f.module, error = %f.error, "kernel module not loaded");
    }
    // A NIC without a driver fails the boot: the console says which. A disk controller
    // without one matters only if the store is on it (the store phase then names the device);
    // q35's SATA controller, unused by a virtio node, is one.
    for u in &hardware.unclaimed {
        if u.kind == "nic" {
            console(&format!("ironroot: {}", u.describe()));
        } else {
            tracing::info!("{}", u.describe());
        }
    }
    match fixed.join() {
        Ok(Ok(l)) => {
            tracing::info!(
                loaded = l.loaded.len(),
                already = l.already.len(),
                failed = l.failed.len(),
                "fixed modules"
            );
            for (path, err) in &l.failed {
                tracing::warn!(module = %path, error = %err, "kernel module not loaded");
            }
        }
        Ok(Err(e)) => tracing::warn!(error = %e, "no module list at /etc/ironroot/modules.load"),
        Err(_) => tracing::warn!("loading the fixed modules panicked"),
    }
    hardware
}

/// The NIC the boot named (`ironroot.nic=`, `BOOTIF=`). A BOOTIF the firmware wrote wrong is
/// ignored with a warning; an `ironroot.nic` that is not a MAC fails the boot.
fn boot_nic(on_failure: OnFailure) -> Option<nic::Wanted> {
    let raw = std::fs::read_to_string("/proc/cmdline").unwrap_or_default();
    let cmd = cmdline::read_cmdline(Path::new("/")).ok();
    match nic::wanted(&raw, cmd.as_ref().and_then(|c| c.get("ironroot.nic"))) {
        Ok(w) => w,
        Err(e @ nic::NicError::BootIf(_)) => {
            tracing::warn!(error = %e, "BOOTIF ignored");
            None
        }
        Err(e) => fail_early(&e.to_string(), on_failure),
    }
}

/// Prints a failed boot on the console and tells the plane when the node is enrolled; returns
/// the line `fail_early` ends with.
async fn failed(e: BootError) -> String {
    console(&format!("ironroot: BOOT FAILED in phase {}: {}", e.phase, crate::exit::describe(&*e.source)));
    let told = e.report().await;
    format!(
        "phase {} (exit {}){}",
        e.phase,
        e.exit.code(),
        if told { "; reported to the plane" } else { "; not reported (no plane identity yet)" }
    )
}

/// Registries are reached over TLS (the guest's host is not loopback); the image builder puts
/// the registry's CA at /etc/ironroot/registry-ca.pem when it is not a public one.
fn registry_access() -> RegistryAccess {
    let ca_pem = match external::read_if_present(Path::new(REGISTRY_CA), MAX_REGISTRY_CA, Links::Follow) {
        Ok(pem) => pem.into_iter().collect(),
        Err(e) => {
            tracing::warn!(error = %crate::exit::describe(&e), "registry CA not used");
            Vec::new()
        }
    };
    RegistryAccess { ca_pem, ..RegistryAccess::default() }
}

const REGISTRY_CA: &str = "/etc/ironroot/registry-ca.pem";

/// Prints why on the console, then reboots or powers off. Never returns.
fn fail_early(why: &str, on_failure: OnFailure) -> ! {
    console(&format!("ironroot: boot failed: {why}"));
    let halt = on_failure == OnFailure::Halt;
    console(if halt { "ironroot: powering off (ironroot.on_failure=halt)" } else { "ironroot: rebooting" });
    sys::reboot(halt)
}

fn console(line: &str) {
    eprintln!("{line}");
}

/// Sets up logging at INFO, or DEBUG with `debug`; returns how to change that level later, when
/// the settings (from any identity source) say otherwise.
fn init_logging(debug: bool) -> impl Fn(bool) {
    let filter = |debug| tracing_subscriber::EnvFilter::new(if debug { "debug" } else { "info" });
    // A serial console shows escape codes as noise: plain text.
    let builder = tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .with_env_filter(filter(debug))
        .with_filter_reloading();
    let handle = builder.reload_handle();
    if let Err(e) = builder.try_init() {
        console(&format!("ironroot: logging not set up: {e}"));
    }
    move |debug| {
        if let Err(e) = handle.reload(filter(debug)) {
            console(&format!("ironroot: log level not changed: {e}"));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cmdline_decides_until_discovery_and_an_invalid_value_counts_as_the_default() {
        let early = |line: &[u8]| early_from(cmdline::parse_cmdline(line).ok().as_ref());
        let halt = Early { on_failure: OnFailure::Halt, debug: true };
        let default = Early { on_failure: OnFailure::Reboot, debug: false };
        assert_eq!(early(b"ironroot.on_failure=halt ironroot.debug=1"), halt);
        assert_eq!(early(b"quiet"), default);
        assert_eq!(early(b"ironroot.on_failure=explode ironroot.debug=yes"), default);
        assert_eq!(early(b"ironroot.on_failure=halt ironroot.nope=1"), default, "a line that does not parse");
        assert_eq!(early_from(None), default);
    }
}
