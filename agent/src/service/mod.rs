//! `ironroot-agent serve`: the node runtime under systemd. A pure core ([`node::Node`], made
//! of small machines: heartbeat, rollout, tasks, renewal, spool) decides; the shell
//! ([`shell`]) carries out what it decides — plane calls, the node journal, jobs that verify,
//! mount and health-gate modules, systemd over D-Bus — and feeds back what happened.
//!
//! systemd is told `READY=1` after the handshake (which waits until the live modules of this
//! boot are attached), `STATUS=` after every exchange, and `WATCHDOG=1` from the loop at half
//! the watchdog period, so a hung agent is restarted. A `kill -9` at any point is resumed from
//! the node journal (see [`replay`]).
//!
//! What restarting cannot fix ends the service with its own exit code ([`ServeError::exit`]),
//! which the unit's `RestartPreventExitStatus=` names: a boot record that cannot be read or
//! used, a node identity that cannot be read, is refused or expired.

pub mod guard;
pub mod heartbeat;
pub mod jobs;
pub mod journal;
pub mod node;
pub mod renew;
pub mod renewal;
pub mod replay;
pub mod rollout;
pub mod shell;
pub mod spool;
pub mod systemd;
pub mod tasks;
pub mod usage;

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
    #[error(
        "the node certificate expired at {not_after} (seconds since the epoch) without being renewed; a restart \
         does not help: re-provision the node (`ironroot-plane node reprovision NODE`) and boot it with a new token"
    )]
    Expired { not_after: i64 },
    #[error("installing the SIGTERM handler")]
    Signal(#[source] std::io::Error),
    #[error("the node journal")]
    Journal(#[source] journal::JournalError),
}

impl ServeError {
    /// The exit code: what restarting cannot fix has its own (docs/interfaces/exit-codes.md).
    pub fn exit(&self) -> Exit {
        match self {
            Self::Read(_) | Self::Json { .. } | Self::Schema { .. } | Self::Heartbeat { .. } => Exit::BootRecord,
            Self::CmdlineHeartbeat { .. } => Exit::BootRecord,
            Self::IdentityFile(_) | Self::NotPem(_) | Self::Identity(_) | Self::Expired { .. } => Exit::NodeIdentity,
            Self::Signal(_) | Self::Journal(_) => Exit::Failure,
        }
    }
}

#[derive(Debug, Clone)]
pub struct ServeOptions {
    pub run_dir: PathBuf,
    /// `--interval`: wins over the boot record's heartbeat.
    pub interval: Option<Duration>,
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
fn check_expiry(not_after: i64, now: i64) -> Result<(), ServeError> {
    if now >= not_after {
        return Err(ServeError::Expired { not_after });
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
        agent_version: agent_version().to_owned(),
        phase: ironroot_contract::wire::ReportPhase::Ready,
        phase_timings_ms: timings(&record.phases_ms, record.written_at_boottime_ms, crate::run_state::boottime_ms()),
        module_digests: record.modules.iter().map(|m| m.digest).collect(),
        last_reconcile: None,
        probe_summary: None,
        store: Some(store),
        error: None,
        agent: None,
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

pub(crate) fn notify(states: &[NotifyState<'_>]) {
    // Outside systemd (no NOTIFY_SOCKET) this does nothing.
    if let Err(e) = sd_notify::notify(states) {
        tracing::debug!(error = %e, "sd_notify");
    }
}

/// Bytes the node journal may hold (records the plane has not received are never dropped).
pub(crate) const JOURNAL_LIMIT: u64 = 16 * 1024 * 1024;

/// Where the node journal lives: beside the store on a persistent one, else under `/run`.
pub(crate) fn journal_dir(record: &BootRecord, run_dir: &Path) -> PathBuf {
    match record.store.path.parent() {
        Some(state) if record.store.persistent => state.join("journal"),
        _ => run_dir.join("journal"),
    }
}

/// The keys and registry access the boot used, for verifying updates the same way.
fn verification(record: &BootRecord) -> (Vec<ironroot_contract::TrustedKey>, ironroot_oci::RegistryAccess) {
    let read = |p: &Path| external::read(p, MAX_IDENTITY_FILE, Links::Refuse).ok();
    let trust = record
        .trust
        .as_deref()
        .and_then(read)
        .map(|pem| {
            let text = String::from_utf8_lossy(&pem).into_owned();
            text.split_inclusive("-----END PUBLIC KEY-----")
                .filter(|b| b.contains("-----BEGIN"))
                .filter_map(|b| ironroot_contract::TrustedKey::parse_pem(b.trim()).ok())
                .collect()
        })
        .unwrap_or_default();
    let ca_pem = record.registry_ca.as_deref().and_then(read).into_iter().collect();
    (trust, ironroot_oci::RegistryAccess { ca_pem, ..Default::default() })
}

/// The jobs' runner for this boot: the store (mounted again after a soft reboot when it is a
/// zram device), and the keys and registry access the boot verified with.
pub(crate) fn runner(record: &BootRecord, run_dir: &Path) -> jobs::Runner {
    match crate::store::remount(&record.store) {
        Ok(true) => {
            tracing::info!(path = %record.store.path.display(), "the object store mounted again (after a soft reboot)")
        }
        Ok(false) => {}
        Err(e) => tracing::error!(error = %crate::exit::describe(&e), "mounting the object store again"),
    }
    let store = crate::store::reopen(&record.store, run_dir).map_err(|e| crate::exit::describe(&e));
    let (trust, access) = verification(record);
    let policy = crate::modules::FetchPolicy {
        access,
        limits: ironroot_oci::Limits::standard(),
        backoff: crate::backoff::Backoff::BOOT,
    };
    jobs::Runner::new(run_dir.to_owned(), store, trust, policy)
}

/// Runs until SIGTERM or SIGINT.
pub async fn serve(opts: &ServeOptions) -> Result<(), ServeError> {
    // This service's start, on its own clock (the shell's) and on the kernel's monotonic one (a
    // root update's `reboot` part ends here).
    let started = (tokio::time::Instant::now(), jobs::monotonic_us());
    // A root staged for a soft reboot: this is it (its record becomes boot.json), or the soft
    // reboot did not happen.
    let promotion = jobs::nextroot::promote(&opts.run_dir, Path::new("/"));
    let record = read_record(&opts.run_dir)?;
    let interval = interval(opts.interval, &record, &opts.run_dir.join(BOOT_JSON), cmdline_heartbeat)?;
    renew::repair(&record);
    // The certificate file's own validity (a renewal moved it past boot.json's), else the
    // record's; an expired one ends the service before anything else is read.
    let (not_before, not_after) = external::read(&record.certificate, MAX_IDENTITY_FILE, Links::Refuse)
        .ok()
        .and_then(|cert| renew::validity(&String::from_utf8_lossy(&cert)))
        .unwrap_or((now() - 1, record.certificate_not_after));
    check_expiry(not_after, now())?;
    let client = client(&record)?;

    let dir = journal_dir(&record, &opts.run_dir);
    let first = SystemTime::now().duration_since(UNIX_EPOCH).map_or(1, |d| d.as_micros() as u64);
    let journal = journal::Journal::open(&dir, JOURNAL_LIMIT, first).map_err(ServeError::Journal)?;
    let finished = replay::finished_tasks(journal.replay());
    let open = replay::open_txn(journal.replay());
    let (running, attach) = replay::startup(&record, &opts.run_dir);

    let runner = runner(&record, &opts.run_dir);

    let mut first_actions = Vec::new();
    let version = agent_version();
    let mut journal = journal;
    if let Some(open) = &open {
        // The open transaction's records stay through compaction until its receipt.
        let planned = journal
            .replay()
            .iter()
            .find(|r| r.kind == "txn" && r.data["txn"] == open.id.as_str() && r.data["step"] == "planned");
        journal.pin(planned.map(|r| r.seq));
    }
    let refused = replay::refused(journal.replay());
    let boot: String = record.boot_id.chars().filter(char::is_ascii_alphanumeric).take(8).collect();
    let run_tag = format!("{boot}-{:x}", now());
    let trial = trial(&record, &opts.run_dir, promotion, journal.replay(), started.1);
    let rollout = rollout::Rollout::new(
        running,
        attach,
        record.generation,
        open,
        refused,
        &run_tag,
        version,
        trial,
        &mut first_actions,
    );
    let mut jitter = heartbeat::Jitter::new(rand::random());
    let renewal = renewal::Renewal::new(not_before.max(0) as u64, not_after as u64, jitter.sample());
    let beat = heartbeat::Beat::new(interval, jitter);
    let spool = spool::Spool::new(journal.head(), journal.delivered_upto());
    let node = node::Node::new(beat, rollout, tasks::Tasks::new(finished), renewal, spool);
    tracing::info!(node = %record.node_id, plane = %record.plane, interval_s = interval.as_secs(), journal = %dir.display(), "serving");
    let report = report(&record);
    let shell = shell::Shell::new(
        record,
        opts.run_dir.clone(),
        client,
        journal,
        node,
        runner,
        report,
        not_after as u64,
        started.0,
    );
    shell.run(first_actions).await
}

/// The trial this service starts in: a root entered by soft reboot that has not passed its
/// gate (its record says so, whether this service just promoted it or restarted during the
/// trial), or a staged root that was not entered. `started_us`: this service's start
/// (CLOCK_MONOTONIC, µs); when it entered the root, the soft reboot took from staging to then.
fn trial(
    record: &BootRecord,
    run_dir: &Path,
    promotion: Option<jobs::nextroot::Promotion>,
    journal: &[journal::Record],
    started_us: u64,
) -> Option<rollout::Trial> {
    use jobs::nextroot::Promotion;
    let entered = matches!(promotion, Some(Promotion::Entered));
    let previous: Option<BootRecord> =
        external::read(&run_dir.join(ironroot_contract::run_state::BOOT_PREV_JSON), MAX_BOOT_RECORD, Links::Refuse)
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok());
    let before = previous.as_ref().map(replay::running).unwrap_or_default();
    let now_running = replay::running(record);
    let changed = replay::changed;
    match promotion {
        // Going back did not happen (this service stopped after staging it): still on trial,
        // past its deadline — the gate fails again and the root before is staged again.
        Some(Promotion::NotEntered(t, staged)) if !t.rollback => {
            // Staged from this root, which still runs.
            Some(rollout::Trial {
                txn: t.txn,
                started: t.started,
                deadline: t.started,
                changed: changed(&staged, &now_running),
                not_entered: Some("the soft reboot into the staged root did not happen".into()),
                passed: false,
                steps_ms: t.steps_ms,
            })
        }
        _ => {
            let t = record.trial.clone().filter(|t| !t.rollback)?;
            let passed = journal
                .iter()
                .any(|r| r.kind == "txn" && r.data["txn"] == t.txn.as_str() && r.data["step"] == "healthy");
            let mut steps_ms = t.steps_ms;
            // The kernel's monotonic clock ran on through the soft reboot. A service started
            // again during the trial (kill -9, say) did not see the reboot: its parts are only
            // its own from its start.
            if entered && t.staged_mono_us > 0 {
                steps_ms.insert("reboot".to_owned(), started_us.saturating_sub(t.staged_mono_us) / 1000);
            }
            Some(rollout::Trial {
                steps_ms,
                deadline: t.started.saturating_add(t.deadline_s),
                changed: changed(&now_running, &before),
                not_entered: None,
                passed,
                txn: t.txn,
                started: t.started,
            })
        }
    }
}

/// This agent as it reports itself: its version and, as build metadata, the first 12 hex digits
/// of its executable's SHA-256 (`0.1.0+exe.3f2a…`), so which build heartbeats (after a root
/// update carrying a new agent, say) is read from the plane, not assumed.
pub fn agent_version() -> &'static str {
    static VERSION: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    VERSION.get_or_init(|| {
        let version = env!("CARGO_PKG_VERSION");
        match exe_digest() {
            Ok(hex) => format!("{version}+exe.{}", &hex[..12]),
            Err(e) => {
                tracing::warn!(error = %e, "reading the agent's own executable");
                version.to_owned()
            }
        }
    })
}

fn exe_digest() -> std::io::Result<String> {
    use sha2::Digest as _;
    let mut file = std::fs::File::open("/proc/self/exe")?;
    let mut hasher = sha2::Sha256::new();
    std::io::copy(&mut file, &mut hasher)?;
    Ok(hex::encode(hasher.finalize()))
}

/// Half the watchdog period systemd asked for (`WATCHDOG_USEC`), if it asked.
pub(crate) fn watchdog_period() -> Option<Duration> {
    let usec: u64 = std::env::var("WATCHDOG_USEC").ok()?.parse().ok()?;
    (usec > 0).then(|| Duration::from_micros(usec / 2))
}

#[cfg(test)]
mod tests {
    use super::*;

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
        assert!(check_expiry(record.certificate_not_after, 0).is_ok());
        let err = check_expiry(record.certificate_not_after, record.certificate_not_after).unwrap_err();
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
