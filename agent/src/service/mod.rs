//! `ironroot-agent serve`: the service under systemd (first version; the runtime loop of
//! reconcile, drain, vetting and exec comes later).
//!
//! Reads `/run/ironroot/boot.json`, handshakes with `phase=ready` and the boot timings, then
//! heartbeats every interval (jittered ±10 %). systemd is told `READY=1` after the handshake,
//! `STATUS=` after every exchange, and `WATCHDOG=1` from the loop at half the watchdog period,
//! so a hung agent is restarted. What to do next is decided by [`Beat`], a pure schedule; the
//! loop only performs it.
//!
//! What restarting cannot fix ends the service with its own exit code ([`ServeError::exit`]),
//! which the unit's `RestartPreventExitStatus=` names: a boot record that cannot be read or
//! used, a node identity that cannot be read, is refused or expired.

pub mod heartbeat;
pub mod journal;
pub mod node;
pub mod renewal;
pub mod rollout;
pub mod spool;
pub mod systemd;
pub mod tasks;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use ironroot_contract::wire::NodeReport;
use sd_notify::NotifyState;

use crate::exit::Exit;
use crate::external::{self, Links, ReadError};
use crate::plane::{PlaneClient, PlaneError};
use ironroot_contract::run_state::{BOOT_JSON, BootRecord, DEFAULT_HEARTBEAT, HEARTBEAT_SECONDS, RUN_STATE_SCHEMA};

/// Largest boot.json read: identity values with their conflicts (inline PEM up to 16 KiB
/// each) and the module list stay well below it.
const MAX_BOOT_RECORD: u64 = 1024 * 1024;
/// Largest node key, certificate chain or plane CA read (each is a few KiB).
const MAX_IDENTITY_FILE: u64 = 64 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("reading the boot record")]
    Read(#[source] ReadError),
    #[error("{path} is not a boot record this agent understands")]
    Json { path: PathBuf, source: serde_json::Error },
    #[error("{path} has schema {found} (this agent reads {RUN_STATE_SCHEMA})")]
    Schema { path: PathBuf, found: u64 },
    #[error("{path}: heartbeat_s {value} is not 1..=3600 seconds")]
    Heartbeat { path: PathBuf, value: u64 },
    #[error("ironroot.heartbeat {value:?} on the kernel command line is not 1..=3600 seconds")]
    CmdlineHeartbeat { value: String },
    #[error("reading the node identity")]
    IdentityFile(#[source] ReadError),
    #[error("{0} is not UTF-8 PEM")]
    NotPem(PathBuf),
    #[error("the node identity is not usable")]
    Identity(#[source] PlaneError),
    #[error("the node certificate expired at {not_after} (seconds since the epoch)")]
    Expired { not_after: i64 },
    #[error("installing the SIGTERM handler")]
    Signal(#[source] std::io::Error),
}

impl ServeError {
    /// The exit code: what restarting cannot fix has its own (docs/interfaces/exit-codes.md).
    pub fn exit(&self) -> Exit {
        match self {
            Self::Read(_) | Self::Json { .. } | Self::Schema { .. } | Self::Heartbeat { .. } => Exit::BootRecord,
            Self::CmdlineHeartbeat { .. } => Exit::BootRecord,
            Self::IdentityFile(_) | Self::NotPem(_) | Self::Identity(_) | Self::Expired { .. } => Exit::NodeIdentity,
            Self::Signal(_) => Exit::Failure,
        }
    }
}

#[derive(Debug, Clone)]
pub struct ServeOptions {
    pub run_dir: PathBuf,
    /// `--interval`: wins over the boot record's heartbeat.
    pub interval: Option<Duration>,
}

/// The heartbeat schedule: when the next exchange is due, given how the last ones went.
/// A failed exchange is retried sooner (5 s, doubling up to the interval).
#[derive(Debug, Clone, PartialEq)]
pub struct Beat {
    pub interval: Duration,
    pub failures: u32,
    pub handshaken: bool,
}

impl Beat {
    pub fn new(interval: Duration) -> Self {
        Beat { interval, failures: 0, handshaken: false }
    }

    /// Records an exchange's outcome and returns the delay before the next one; `jitter` in
    /// [-1, 1] spreads nodes by up to ±10 % of the interval.
    pub fn after(&mut self, ok: bool, jitter: f64) -> Duration {
        if ok {
            self.failures = 0;
            self.handshaken = true;
            let spread = self.interval.as_secs_f64() * 0.1 * jitter.clamp(-1.0, 1.0);
            Duration::from_secs_f64((self.interval.as_secs_f64() + spread).max(0.1))
        } else {
            self.failures = self.failures.saturating_add(1);
            let backoff = Duration::from_secs(5).saturating_mul(1 << self.failures.min(6).saturating_sub(1));
            backoff.min(self.interval)
        }
    }
}

/// Reads `run_dir/boot.json`: its schema first, so a record of another schema is named as such
/// even when its fields differ.
pub fn read_record(run_dir: &Path) -> Result<BootRecord, ServeError> {
    #[derive(serde::Deserialize)]
    struct Schema {
        schema: u64,
    }
    let path = run_dir.join(BOOT_JSON);
    // The initramfs agent wrote it by rename: a symlink there is not its doing.
    let bytes = external::read(&path, MAX_BOOT_RECORD, Links::Refuse).map_err(ServeError::Read)?;
    let json = |source| ServeError::Json { path: path.clone(), source };
    let Schema { schema } = serde_json::from_slice(&bytes).map_err(json)?;
    if schema != u64::from(RUN_STATE_SCHEMA) {
        return Err(ServeError::Schema { path, found: schema });
    }
    serde_json::from_slice(&bytes).map_err(json)
}

/// Seconds between heartbeats: `--interval` when given, else the boot record's. A record from an
/// older initramfs agent carries none: then `ironroot.heartbeat` from the kernel command line
/// (`cmdline`), as those agents' services read it, else the default. An invalid value is an
/// error, never a fallback.
pub fn interval(
    explicit: Option<Duration>,
    record: &BootRecord,
    path: &Path,
    cmdline: impl FnOnce() -> Option<String>,
) -> Result<Duration, ServeError> {
    if let Some(interval) = explicit {
        return Ok(interval);
    }
    match record.heartbeat_s {
        Some(secs) if HEARTBEAT_SECONDS.contains(&secs) => Ok(Duration::from_secs(secs)),
        Some(value) => Err(ServeError::Heartbeat { path: path.to_owned(), value }),
        None => match cmdline() {
            None => Ok(DEFAULT_HEARTBEAT),
            Some(value) => match value.parse::<u64>() {
                Ok(secs) if HEARTBEAT_SECONDS.contains(&secs) => Ok(Duration::from_secs(secs)),
                _ => Err(ServeError::CmdlineHeartbeat { value }),
            },
        },
    }
}

/// `ironroot.heartbeat` from `/proc/cmdline`, for boot records of older agents. A command line
/// that does not parse gives none: the boot that wrote the record read the same line.
fn cmdline_heartbeat() -> Option<String> {
    match crate::cmdline::read_cmdline(Path::new("/")) {
        Ok(line) => line.get("ironroot.heartbeat").map(str::to_owned),
        Err(e) => {
            tracing::warn!(error = %crate::exit::describe(&e), "kernel command line unreadable; default heartbeat");
            None
        }
    }
}

fn now() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs() as i64)
}

/// An expired certificate is refused by the plane on every exchange, and only a new boot
/// enrolls again: the service stops instead of retrying.
fn check_expiry(record: &BootRecord, now: i64) -> Result<(), ServeError> {
    if now >= record.certificate_not_after {
        return Err(ServeError::Expired { not_after: record.certificate_not_after });
    }
    Ok(())
}

/// The report this boot sends: `ready`, its timings, its modules and store.
pub fn report(record: &BootRecord) -> NodeReport {
    let store = if record.store.verity {
        format!("{}+verity", record.store.kind)
    } else if record.store.kind.ends_with("insecure") {
        record.store.kind.clone()
    } else {
        format!("{}-insecure", record.store.kind)
    };
    NodeReport {
        boot_id: record.boot_id.clone(),
        agent_version: env!("CARGO_PKG_VERSION").to_owned(),
        phase: ironroot_contract::wire::ReportPhase::Ready,
        phase_timings_ms: timings(&record.phases_ms, record.written_at_boottime_ms, crate::run_state::boottime_ms()),
        module_digests: record.modules.iter().map(|m| m.digest).collect(),
        last_reconcile: None,
        probe_summary: None,
        store: Some(store),
        error: None,
    }
}

/// The boot's phase timings plus `root`: from hand-off (`written`, CLOCK_BOOTTIME ms) to now,
/// i.e. the switch-root and systemd's start of the root up to this service.
fn timings(phases: &BTreeMap<String, u64>, written: Option<u64>, now: u64) -> BTreeMap<String, u64> {
    let mut phases = phases.clone();
    if let Some(written) = written {
        phases.insert("root".to_owned(), now.saturating_sub(written));
    }
    phases
}

fn client(record: &BootRecord) -> Result<PlaneClient, ServeError> {
    // Written by the initramfs agent (0600, by rename); a symlink there is not its doing.
    let read = |p: &Path| {
        let bytes = external::read(p, MAX_IDENTITY_FILE, Links::Refuse).map_err(ServeError::IdentityFile)?;
        String::from_utf8(bytes).map_err(|_| ServeError::NotPem(p.to_owned()))
    };
    let ca = read(&record.plane_ca)?;
    let cert = read(&record.certificate)?;
    let key = read(&record.key)?;
    PlaneClient::with_identity(&record.plane, &ca, &cert, &key).map_err(ServeError::Identity)
}

fn notify(states: &[NotifyState<'_>]) {
    // Outside systemd (no NOTIFY_SOCKET) this does nothing.
    if let Err(e) = sd_notify::notify(states) {
        tracing::debug!(error = %e, "sd_notify");
    }
}

/// Runs until SIGTERM or SIGINT.
pub async fn serve(opts: &ServeOptions) -> Result<(), ServeError> {
    let record = read_record(&opts.run_dir)?;
    let interval = interval(opts.interval, &record, &opts.run_dir.join(BOOT_JSON), cmdline_heartbeat)?;
    check_expiry(&record, now())?;
    let client = client(&record)?;
    let report = report(&record);
    let mut watchdog = tokio::time::interval(watchdog_period().unwrap_or(Duration::from_secs(3600)));
    let mut beat = Beat::new(interval);
    let mut next = tokio::time::Instant::now();
    let mut term =
        tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).map_err(ServeError::Signal)?;
    tracing::info!(node = %record.node_id, plane = %record.plane, interval_s = interval.as_secs(), "serving");
    loop {
        tokio::select! {
            _ = term.recv() => break,
            _ = tokio::signal::ctrl_c() => break,
            _ = watchdog.tick() => notify(&[NotifyState::Watchdog]),
            _ = tokio::time::sleep_until(next) => {
                check_expiry(&record, now())?;
                let first = !beat.handshaken;
                let result = if first {
                    client.handshake(&record.node_id, &report).await
                } else {
                    client.heartbeat(&record.node_id, &report).await
                };
                let ok = result.is_ok();
                match &result {
                    Ok(r) => {
                        if first {
                            tracing::info!(state = %r.state, "handshake: ready");
                            notify(&[NotifyState::Ready]);
                        }
                        let status = format!("node {} {}; generation {}", record.node_id, r.state, r.generation);
                        notify(&[NotifyState::Status(&status)]);
                    }
                    Err(e) => {
                        let why = crate::exit::describe(e);
                        tracing::warn!(error = %why, failures = beat.failures + 1, "plane exchange failed");
                        notify(&[NotifyState::Status(&format!("plane unreachable: {why}"))]);
                    }
                }
                next = tokio::time::Instant::now() + beat.after(ok, rand::random::<f64>() * 2.0 - 1.0);
            }
        }
    }
    notify(&[NotifyState::Stopping]);
    tracing::info!("stopping");
    Ok(())
}

/// Half the watchdog period systemd asked for (`WATCHDOG_USEC`), if it asked.
fn watchdog_period() -> Option<Duration> {
    let usec: u64 = std::env::var("WATCHDOG_USEC").ok()?.parse().ok()?;
    (usec > 0).then(|| Duration::from_micros(usec / 2))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_schedule_spreads_beats_and_backs_off_after_failures() {
        let mut b = Beat::new(Duration::from_secs(30));
        assert_eq!(b.after(true, 0.0), Duration::from_secs(30));
        assert!(b.handshaken);
        assert_eq!(b.after(true, 1.0), Duration::from_secs(33));
        assert_eq!(b.after(true, -5.0), Duration::from_secs(27), "jitter is clamped");
        let delays: Vec<_> = (0..5).map(|_| b.after(false, 0.0).as_secs()).collect();
        assert_eq!(delays, [5, 10, 20, 30, 30], "doubling, capped at the interval");
        assert_eq!(b.after(true, 0.0), Duration::from_secs(30));
        assert_eq!(b.failures, 0);
    }

    fn sample() -> serde_json::Value {
        serde_json::json!({
            "schema": RUN_STATE_SCHEMA, "agent_version": "0.1.0", "boot_id": "b-1",
            "identity": {"values": {}, "conflicts": [], "notes": []},
            "node_id": "n-1", "plane": "https://10.0.2.100:4443", "plane_ca": "/run/ironroot/plane-ca.pem",
            "certificate": "/run/ironroot/node.crt", "key": "/run/ironroot/node.key",
            "certificate_not_after": 1_000_000, "reused_certificate": false, "generation": 1,
            "store": {"kind": "zram", "path": "/run/ironroot/store", "verity": true, "persistent": false,
                      "insecure": false, "device": "/dev/zram1"},
            "modules": [], "root": {"target": "/sysroot", "verity": true, "layers": [], "upper": "/run/u"},
            "phases_ms": {"verify": 3},
        })
    }

    #[test]
    fn a_boot_record_from_a_newer_initramfs_agent_is_read_and_another_schema_refused() {
        let dir = tempfile::tempdir().unwrap();
        let mut doc = sample();
        doc["written_by_a_newer_agent"] = serde_json::json!({"anything": 1});
        doc["store"]["also_new"] = serde_json::json!(true);
        std::fs::write(dir.path().join(BOOT_JSON), doc.to_string()).unwrap();
        let record = read_record(dir.path()).unwrap();
        assert_eq!(record.written_at_boottime_ms, None, "absent in older records");
        assert_eq!(report(&record).store.as_deref(), Some("zram+verity"));

        doc["schema"] = serde_json::json!(RUN_STATE_SCHEMA + 1);
        doc["node_id"] = serde_json::json!({"changed": "meaning"});
        std::fs::write(dir.path().join(BOOT_JSON), doc.to_string()).unwrap();
        let err = read_record(dir.path()).unwrap_err();
        assert!(matches!(err, ServeError::Schema { found: 2, .. }), "the schema is named first: {err}");
        assert_eq!(err.exit(), Exit::BootRecord);
    }

    #[test]
    fn the_heartbeat_comes_from_the_flag_then_the_record_and_an_invalid_one_is_an_error() {
        let mut record: BootRecord = serde_json::from_value(sample()).unwrap();
        let path = Path::new("/run/ironroot/boot.json");
        let secs = Duration::from_secs;
        let unused = || -> Option<String> { panic!("the kernel command line is read only for older records") };
        record.heartbeat_s = Some(7);
        assert_eq!(interval(None, &record, path, unused).unwrap(), secs(7));
        assert_eq!(interval(Some(secs(2)), &record, path, unused).unwrap(), secs(2), "--interval wins");
        for bad in [0, 3601] {
            record.heartbeat_s = Some(bad);
            let err = interval(None, &record, path, unused).unwrap_err();
            assert_eq!(err.to_string(), format!("/run/ironroot/boot.json: heartbeat_s {bad} is not 1..=3600 seconds"));
            assert_eq!(err.exit(), Exit::BootRecord);
        }

        // A record of an older agent: the kernel command line, as its service read it.
        record.heartbeat_s = None;
        assert_eq!(interval(None, &record, path, || None).unwrap(), DEFAULT_HEARTBEAT);
        assert_eq!(interval(None, &record, path, || Some("3".into())).unwrap(), secs(3));
        let err = interval(None, &record, path, || Some("3s".into())).unwrap_err();
        assert!(matches!(err, ServeError::CmdlineHeartbeat { .. }), "{err}");
    }

    #[test]
    fn an_expired_certificate_stops_the_service_for_good() {
        let record: BootRecord = serde_json::from_value(sample()).unwrap();
        assert!(check_expiry(&record, 0).is_ok());
        let err = check_expiry(&record, record.certificate_not_after).unwrap_err();
        assert_eq!(err.exit(), Exit::NodeIdentity);
    }

    #[test]
    fn the_ready_report_adds_the_time_from_hand_off_to_the_service() {
        let phases = BTreeMap::from([("kernel".to_owned(), 2900), ("verify".to_owned(), 15_000)]);
        let with = timings(&phases, Some(40_000), 47_500);
        assert_eq!(with["root"], 7_500);
        assert_eq!(with["verify"], 15_000);
        assert_eq!(timings(&phases, None, 47_500), phases, "an older boot.json: no root timing");
        assert_eq!(timings(&phases, Some(50_000), 47_500)["root"], 0, "clock oddities do not wrap");
    }
}
