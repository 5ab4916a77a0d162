//! `ironroot-agent serve`: the service under systemd (first version; the runtime loop of
//! reconcile, drain, vetting and exec comes later).
//!
//! Reads `/run/ironroot/boot.json`, handshakes with `phase=ready` and the boot timings, then
//! heartbeats every interval (jittered ±10 %). systemd is told `READY=1` after the handshake,
//! `STATUS=` after every exchange, and `WATCHDOG=1` from the loop at half the watchdog period,
//! so a hung agent is restarted. What to do next is decided by [`Beat`], a pure schedule; the
//! loop only performs it.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use ironroot_spec::wire::NodeReport;
use sd_notify::NotifyState;

use crate::boot::handoff::{BOOT_JSON, BootRecord, RUN_STATE_SCHEMA};
use crate::plane::{PlaneClient, PlaneError};

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("reading {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("{path} is not a boot record this agent understands: {reason}")]
    Record { path: PathBuf, reason: String },
    #[error("the plane client: {0}")]
    Client(#[source] PlaneError),
    #[error("installing the SIGTERM handler: {0}")]
    Signal(#[source] std::io::Error),
}

#[derive(Debug, Clone)]
pub struct ServeOptions {
    pub run_dir: PathBuf,
    pub interval: Duration,
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

pub fn read_record(run_dir: &Path) -> Result<BootRecord, ServeError> {
    let path = run_dir.join(BOOT_JSON);
    let bytes = std::fs::read(&path).map_err(|source| ServeError::Read { path: path.clone(), source })?;
    let record: BootRecord =
        serde_json::from_slice(&bytes).map_err(|e| ServeError::Record { path: path.clone(), reason: e.to_string() })?;
    if record.schema != RUN_STATE_SCHEMA {
        return Err(ServeError::Record { path, reason: format!("schema {} (want {RUN_STATE_SCHEMA})", record.schema) });
    }
    Ok(record)
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
        phase: "ready".to_owned(),
        phase_timings_ms: timings(
            &record.phases_ms,
            record.written_at_boottime_ms,
            crate::boot::handoff::boottime_ms(),
        ),
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
    let read = |p: &Path| std::fs::read_to_string(p).map_err(|source| ServeError::Read { path: p.to_owned(), source });
    let ca = read(&record.plane_ca)?;
    let cert = read(&record.certificate)?;
    let key = read(&record.key)?;
    PlaneClient::with_identity(&record.plane, &ca, &cert, &key).map_err(ServeError::Client)
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
    let client = client(&record)?;
    let report = report(&record);
    let mut watchdog = tokio::time::interval(watchdog_period().unwrap_or(Duration::from_secs(3600)));
    let mut beat = Beat::new(opts.interval);
    let mut next = tokio::time::Instant::now();
    let mut term =
        tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).map_err(ServeError::Signal)?;
    tracing::info!(node = %record.node_id, plane = %record.plane, "serving");
    loop {
        tokio::select! {
            _ = term.recv() => break,
            _ = tokio::signal::ctrl_c() => break,
            _ = watchdog.tick() => notify(&[NotifyState::Watchdog]),
            _ = tokio::time::sleep_until(next) => {
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

/// `ironroot.heartbeat=SECONDS` from the kernel command line, if set and valid.
pub fn cmdline_interval() -> Option<u64> {
    let cmdline = crate::boot::cmdline::read_cmdline(Path::new("/")).ok()?;
    let value = cmdline.get("ironroot.heartbeat")?;
    match value.parse::<u64>() {
        Ok(s) if (1..=3600).contains(&s) => Some(s),
        _ => {
            tracing::warn!(value, "ironroot.heartbeat is not 1..=3600 seconds; using the default");
            None
        }
    }
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
            "certificate_not_after": 1, "reused_certificate": false, "generation": 1,
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
        std::fs::write(dir.path().join(BOOT_JSON), doc.to_string()).unwrap();
        assert!(matches!(read_record(dir.path()), Err(ServeError::Record { .. })));
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
