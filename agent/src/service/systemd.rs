//! systemd, driven over D-Bus on the system bus (`zbus`), never by running `systemctl`: reload,
//! start/stop/restart a unit and wait for its job, read a unit's state, soft-reboot and reboot.
//! No fake stands in for it: the jobs that use it run in the QEMU tier, where systemd is PID 1.

use futures_util::StreamExt as _;
use zbus::zvariant::OwnedObjectPath;

#[zbus::proxy(
    interface = "org.freedesktop.systemd1.Manager",
    default_service = "org.freedesktop.systemd1",
    default_path = "/org/freedesktop/systemd1"
)]
trait Manager {
    fn start_unit(&self, name: &str, mode: &str) -> zbus::Result<OwnedObjectPath>;
    fn stop_unit(&self, name: &str, mode: &str) -> zbus::Result<OwnedObjectPath>;
    fn restart_unit(&self, name: &str, mode: &str) -> zbus::Result<OwnedObjectPath>;
    fn load_unit(&self, name: &str) -> zbus::Result<OwnedObjectPath>;
    fn start_transient_unit(
        &self,
        name: &str,
        mode: &str,
        properties: &[(&str, zbus::zvariant::Value<'_>)],
        aux: &[(&str, Vec<(&str, zbus::zvariant::Value<'_>)>)],
    ) -> zbus::Result<OwnedObjectPath>;
    /// Replies once the reload finished.
    fn reload(&self) -> zbus::Result<()>;
    fn subscribe(&self) -> zbus::Result<()>;
    #[zbus(signal)]
    fn job_removed(&self, id: u32, job: OwnedObjectPath, unit: String, result: String) -> zbus::Result<()>;
}

#[zbus::proxy(interface = "org.freedesktop.systemd1.Unit", default_service = "org.freedesktop.systemd1")]
trait Unit {
    #[zbus(property(emits_changed_signal = "false"))]
    fn active_state(&self) -> zbus::Result<String>;
    #[zbus(property(emits_changed_signal = "false"))]
    fn sub_state(&self) -> zbus::Result<String>;
    #[zbus(property(emits_changed_signal = "false"))]
    fn active_enter_timestamp_monotonic(&self) -> zbus::Result<u64>;
}

/// Longest wait for a start, stop or restart job to end.
const JOB_WAIT: std::time::Duration = std::time::Duration::from_secs(300);

/// What to do with a unit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UnitOp {
    Start,
    Stop,
    Restart,
}

/// Leaving this userspace.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PowerOp {
    /// Restart userspace into `/run/nextroot` when it holds an OS, else into the same root
    /// (systemd ≥ 254); the kernel keeps running.
    SoftReboot,
    Reboot,
}

/// A unit's state as systemd reports it (`ActiveState`/`SubState`, and
/// `ActiveEnterTimestampMonotonic`: CLOCK_MONOTONIC µs of its last entry into `active`, 0 when
/// it never was).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnitState {
    pub active: String,
    pub sub: String,
    pub active_since_us: u64,
}

impl UnitState {
    pub fn is_active(&self) -> bool {
        self.active == "active"
    }

    /// How long the unit has been `active` by systemd's clock at `now_us` (CLOCK_MONOTONIC µs,
    /// the clock systemd stamps with; it runs on across a soft reboot); `None` when it is not
    /// active or systemd gave no time.
    pub fn active_for(&self, now_us: u64) -> Option<std::time::Duration> {
        (self.is_active() && self.active_since_us > 0)
            .then(|| std::time::Duration::from_micros(now_us.saturating_sub(self.active_since_us)))
    }

    /// Whether the unit will not become active without someone acting.
    pub fn is_failed(&self) -> bool {
        matches!(self.active.as_str(), "failed" | "inactive")
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SystemdError {
    #[error("connecting to the system bus")]
    Connect(#[source] zbus::Error),
    #[error("systemd: {op} {unit}")]
    Call { op: &'static str, unit: String, source: zbus::Error },
    #[error("systemd: the {op} job of {unit} ended {result}")]
    Job { op: &'static str, unit: String, result: String },
}

/// systemd on the system bus.
#[derive(Debug, Clone)]
pub struct Systemd {
    conn: zbus::Connection,
}

impl Systemd {
    pub async fn connect() -> Result<Self, SystemdError> {
        let conn = zbus::Connection::system().await.map_err(SystemdError::Connect)?;
        // Job and unit signals for this connection, once (a second Subscribe is refused with
        // AlreadySubscribed).
        let manager = ManagerProxy::new(&conn).await.map_err(SystemdError::Connect)?;
        manager.subscribe().await.map_err(SystemdError::Connect)?;
        Ok(Self { conn })
    }

    async fn manager(&self) -> Result<ManagerProxy<'_>, SystemdError> {
        ManagerProxy::builder(&self.conn)
            .cache_properties(zbus::proxy::CacheProperties::No)
            .build()
            .await
            .map_err(SystemdError::Connect)
    }
}

impl Systemd {
    /// `daemon-reload`; returns when it finished.
    pub async fn reload(&self) -> Result<(), SystemdError> {
        let call = |source| SystemdError::Call { op: "reload", unit: String::new(), source };
        self.manager().await?.reload().await.map_err(call)
    }

    /// Starts, stops or restarts `unit` and waits for its job to finish.
    pub async fn apply(&self, unit: &str, op: UnitOp) -> Result<(), SystemdError> {
        let name = match op {
            UnitOp::Start => "start",
            UnitOp::Stop => "stop",
            UnitOp::Restart => "restart",
        };
        let call = |source| SystemdError::Call { op: name, unit: unit.to_owned(), source };
        let manager = self.manager().await?;
        // Listen before asking, so the job's end cannot be missed.
        let mut removed = manager.receive_job_removed().await.map_err(call)?;
        let job = match op {
            UnitOp::Start => manager.start_unit(unit, "replace").await,
            UnitOp::Stop => manager.stop_unit(unit, "replace").await,
            UnitOp::Restart => manager.restart_unit(unit, "replace").await,
        }
        .map_err(call)?;
        let ended = async {
            while let Some(signal) = removed.next().await {
                let Ok(args) = signal.args() else { continue };
                if *args.job() == job {
                    return args.result().clone();
                }
            }
            "unknown (the bus closed)".to_owned()
        };
        // systemd ends a start job at the unit's own timeout; one set to infinity must not
        // hold a transaction forever.
        let result = tokio::time::timeout(JOB_WAIT, ended)
            .await
            .unwrap_or_else(|_| format!("unfinished after {} s (still queued in systemd)", JOB_WAIT.as_secs()));
        match result.as_str() {
            "done" => Ok(()),
            _ => Err(SystemdError::Job { op: name, unit: unit.to_owned(), result }),
        }
    }

    pub async fn state(&self, unit: &str) -> Result<UnitState, SystemdError> {
        let call = |source| SystemdError::Call { op: "read the state of", unit: unit.to_owned(), source };
        let path = self.manager().await?.load_unit(unit).await.map_err(call)?;
        let proxy = UnitProxy::builder(&self.conn)
            .path(path)
            .map_err(call)?
            .cache_properties(zbus::proxy::CacheProperties::No)
            .build()
            .await
            .map_err(call)?;
        Ok(UnitState {
            active: proxy.active_state().await.map_err(call)?,
            sub: proxy.sub_state().await.map_err(call)?,
            active_since_us: proxy.active_enter_timestamp_monotonic().await.map_err(call)?,
        })
    }

    /// Asks systemd to start `unit`, without waiting for the job.
    pub async fn request_start(&self, unit: &str) -> Result<(), SystemdError> {
        let call = |source| SystemdError::Call { op: "start", unit: unit.to_owned(), source };
        self.manager().await?.start_unit(unit, "replace").await.map_err(call)?;
        Ok(())
    }

    /// Starts `argv` (`argv[0]` the executable's path) as the transient service `unit` that
    /// survives a soft reboot, which systemd removes once it ended, failed or not.
    pub async fn start_survivor(&self, unit: &str, description: &str, argv: &[String]) -> Result<(), SystemdError> {
        use zbus::zvariant::Value;
        let call = |source| SystemdError::Call { op: "start", unit: unit.to_owned(), source };
        let path = argv.first().cloned().unwrap_or_default();
        let exec = vec![(path, argv.to_vec(), false)];
        let names = |n: &[&str]| Value::from(n.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>());
        // systemd-soft-reboot.service(8)'s surviving service (systemd >= 255): spared the final
        // SIGTERM/SIGKILL, none of the default dependencies (they would stop it with
        // shutdown.target), left alone by an isolate, gone with a real reboot. Its own output
        // also on the console, where an operator watching a node's trial reads it.
        let properties = [
            ("Description", Value::from(description)),
            ("ExecStart", Value::from(exec)),
            ("CollectMode", Value::from("inactive-or-failed")),
            ("SurviveFinalKillSignal", Value::from(true)),
            ("DefaultDependencies", Value::from(false)),
            ("IgnoreOnIsolate", Value::from(true)),
            (
                "Conflicts",
                names(&[
                    "reboot.target",
                    "kexec.target",
                    "poweroff.target",
                    "halt.target",
                    "rescue.target",
                    "emergency.target",
                ]),
            ),
            ("Before", names(&["shutdown.target", "rescue.target", "emergency.target"])),
            ("StandardOutput", Value::from("journal+console")),
            ("StandardError", Value::from("journal+console")),
        ];
        self.manager().await?.start_transient_unit(unit, "fail", &properties, &[]).await.map_err(call)?;
        Ok(())
    }

    /// Begins a soft reboot or reboot (an orderly shutdown of this userspace).
    pub async fn power(&self, op: PowerOp) -> Result<(), SystemdError> {
        // The targets `systemctl soft-reboot` / `reboot` start: services stop in order.
        let target = match op {
            PowerOp::SoftReboot => "soft-reboot.target",
            PowerOp::Reboot => "reboot.target",
        };
        let call = |source| SystemdError::Call { op: "start", unit: target.to_owned(), source };
        self.manager().await?.start_unit(target, "replace-irreversibly").await.map_err(call)?;
        Ok(())
    }
}
