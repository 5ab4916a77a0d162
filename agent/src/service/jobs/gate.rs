//! The health gate after an attach: every unit of the module `active` and staying so for a
//! settle time (by systemd's activation time of each unit), then the module's own probe (`--health-cmd` run with the gate's remaining
//! deadline, or `--health-http PORT/PATH` answered 2xx on 127.0.0.1), all within the module's
//! deadline (60 s unless it declares one). A unit that fails, or a probe that hangs past the
//! deadline, ends the gate at once with the reason.

use std::time::Duration;

use ironroot_contract::config::{DEFAULT_HEALTH_DEADLINE_S, HealthCheck};
use ironroot_contract::wire::Health;
use tokio::time::Instant;

use super::Runner;
use crate::service::rollout::ModuleInfo;
use crate::service::systemd::UnitState;

/// How long every unit must stay `active` before the gate trusts it.
const SETTLE: Duration = Duration::from_secs(5);
const POLL: Duration = Duration::from_millis(500);
/// Largest probe output kept for the receipt.
const MAX_PROBE_OUTPUT: usize = 512;

impl Runner {
    pub(super) async fn gate(&self, module: &ModuleInfo) -> Health {
        let deadline_s = module.health.as_ref().map_or(DEFAULT_HEALTH_DEADLINE_S, |h| h.deadline_s);
        let deadline = Instant::now() + Duration::from_secs(deadline_s);
        let units = match self.settle(&module.units, deadline).await {
            Ok(units) => units,
            Err(units) => return Health { healthy: false, units, probe: None },
        };
        let probe = match &module.health {
            Some(check) => Some(probe(check, deadline).await),
            None => None,
        };
        let healthy = probe.as_ref().is_none_or(Result::is_ok);
        Health { healthy, units, probe: probe.map(|p| p.unwrap_or_else(|e| e)) }
    }

    /// The gate of a root on trial: every unit of its modules (`units`) active and settled
    /// before `deadline`.
    pub(super) async fn gate_units(&self, units: &[String], deadline: Instant) -> Health {
        match self.settle(units, deadline).await {
            Ok(units) => Health { healthy: true, units, probe: None },
            Err(units) => Health { healthy: false, units, probe: None },
        }
    }

    /// Waits until every unit has been active for [`SETTLE`] by systemd's own clock (a unit
    /// that came up with the root before the agent counts from then, not from the first look);
    /// `Err` with the states when one fails or the deadline passes first.
    async fn settle(
        &self,
        units: &[String],
        deadline: Instant,
    ) -> Result<Vec<(String, String)>, Vec<(String, String)>> {
        if units.is_empty() {
            return Ok(Vec::new());
        }
        let systemd = match self.systemd().await {
            Ok(s) => s,
            Err(e) => return Err(vec![("systemd".into(), crate::exit::describe(&e))]),
        };
        // Only for a unit systemd gives no activation time: since this gate saw all active.
        let mut seen_active: Option<Instant> = None;
        loop {
            let mut states = Vec::new();
            for unit in units {
                let state = systemd.state(unit).await.unwrap_or_else(|e| UnitState {
                    active: "unknown".into(),
                    sub: crate::exit::describe(&e),
                    active_since_us: 0,
                });
                states.push((unit.clone(), state));
            }
            let now = Instant::now();
            let view = || states.iter().map(|(u, s)| (u.clone(), s.active.clone())).collect::<Vec<_>>();
            if states.iter().all(|(_, s)| s.is_active()) {
                let seen = now.duration_since(*seen_active.get_or_insert(now));
                if settled(states.iter().map(|(_, s)| s), super::monotonic_us(), seen) {
                    return Ok(view());
                }
            } else {
                seen_active = None;
                // Once started, a unit that is failed (or went inactive) will not come back.
                if states.iter().any(|(_, s)| s.active == "failed") {
                    return Err(view());
                }
            }
            if now >= deadline {
                let mut v = view();
                for (_, s) in v.iter_mut() {
                    *s = if s == "active" {
                        "active (not settled before the deadline)".into()
                    } else {
                        format!("{s} at the deadline")
                    };
                }
                return Err(v);
            }
            tokio::time::sleep(POLL.min(deadline.saturating_duration_since(now))).await;
        }
    }
}

/// Whether every unit (all active) has been so for [`SETTLE`]: by its activation time where
/// systemd gave one, else for `seen`, how long this gate has seen them all active.
fn settled<'a>(states: impl Iterator<Item = &'a UnitState>, now_us: u64, seen: Duration) -> bool {
    states.map(|s| s.active_for(now_us).unwrap_or(seen)).all(|age| age >= SETTLE)
}

fn clip(s: &str) -> String {
    let s = s.trim();
    let mut end = s.len().min(MAX_PROBE_OUTPUT);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s[..end].to_owned()
}

/// Runs the module's probe before `deadline`: `Ok(what)` or `Err(why)`.
async fn probe(check: &HealthCheck, deadline: Instant) -> Result<String, String> {
    let mut said = Vec::new();
    if !check.command.is_empty() {
        said.push(command_probe(&check.command, deadline).await?);
    }
    if check.http.is_some() {
        said.push(http_probe(check, deadline).await?);
    }
    Ok(if said.is_empty() { "no probe".into() } else { said.join("; ") })
}

/// Runs the probe command in a process group of its own, so that a probe that hangs is killed
/// at the deadline with everything it started (a shell script's `sleep`, say), not only its
/// first process.
async fn command_probe(command: &[String], deadline: Instant) -> Result<String, String> {
    if let Some((program, args)) = command.split_first() {
        use std::process::Stdio;
        let mut cmd = tokio::process::Command::new(program);
        cmd.args(args).stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
        cmd.kill_on_drop(true).process_group(0);
        let shown = command.join(" ");
        let child = match cmd.spawn() {
            Ok(c) => c,
            Err(e) => return Err(format!("{shown} could not run: {e}")),
        };
        let group = child.id().and_then(|id| rustix::process::Pid::from_raw(id as i32));
        return match tokio::time::timeout_at(deadline, child.wait_with_output()).await {
            Err(_) => {
                if let Some(group) = group {
                    // Gone already is fine: the group is empty.
                    let _ = rustix::process::kill_process_group(group, rustix::process::Signal::KILL);
                }
                Err(format!("{shown} did not finish before the deadline (killed)"))
            }
            Ok(Err(e)) => Err(format!("{shown} could not run: {e}")),
            Ok(Ok(out)) if out.status.success() => Ok(format!("{shown}: exit 0")),
            Ok(Ok(out)) => Err(format!("{shown}: {} {}", out.status, clip(&String::from_utf8_lossy(&out.stderr)))),
        };
    }
    Ok(String::new())
}

async fn http_probe(check: &HealthCheck, deadline: Instant) -> Result<String, String> {
    if let Some(http) = &check.http {
        let url = format!("http://127.0.0.1:{}{}", http.port, http.path);
        let client = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .no_proxy()
            .build()
            .map_err(|e| e.to_string())?;
        let answer = tokio::time::timeout_at(deadline, client.get(&url).send()).await;
        return match answer {
            Err(_) => Err(format!("GET {url} did not answer before the deadline")),
            Ok(Err(e)) => Err(format!("GET {url}: {}", e.without_url())),
            Ok(Ok(r)) if r.status().is_success() => Ok(format!("GET {url}: {}", r.status())),
            Ok(Ok(r)) => Err(format!("GET {url}: {}", r.status())),
        };
    }
    Ok("no probe".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(command: &[&str], deadline_s: u64) -> HealthCheck {
        HealthCheck { command: command.iter().map(|s| s.to_string()).collect(), http: None, deadline_s }
    }

    #[test]
    fn units_settle_by_systemds_activation_time_else_by_what_the_gate_saw() {
        let unit = |active: &str, since_us| UnitState {
            active: active.into(),
            sub: "running".into(),
            active_since_us: since_us,
        };
        let now = 100_000_000;
        let five = SETTLE.as_micros() as u64;
        // Active since before the gate looked: settled at the first look.
        assert!(settled([unit("active", now - five)].iter(), now, Duration::ZERO));
        // Just (re)started: not settled, however long the gate has been polling...
        assert!(!settled([unit("active", now - 1)].iter(), now, SETTLE * 3));
        // ...and one fresh unit holds the others.
        assert!(!settled([unit("active", now - five * 10), unit("active", now - five + 1)].iter(), now, SETTLE));
        // No activation time from systemd: the gate's own view.
        assert!(!settled([unit("active", 0)].iter(), now, SETTLE - Duration::from_millis(1)));
        assert!(settled([unit("active", 0)].iter(), now, SETTLE));
        // A timestamp ahead of the clock is not an age.
        assert!(!settled([unit("active", now + five)].iter(), now, SETTLE * 3));
    }

    #[tokio::test]
    async fn a_probe_command_passes_fails_or_is_killed_at_the_deadline() {
        let soon = || Instant::now() + Duration::from_secs(5);
        assert!(probe(&check(&["/bin/true"], 5), soon()).await.is_ok());
        let err = probe(&check(&["/bin/sh", "-c", "echo broken >&2; exit 3"], 5), soon()).await.unwrap_err();
        assert!(err.contains("exit status: 3") && err.contains("broken"), "{err}");
        let started = std::time::Instant::now();
        let err =
            probe(&check(&["/bin/sleep", "60"], 1), Instant::now() + Duration::from_millis(300)).await.unwrap_err();
        assert!(err.contains("did not finish before the deadline"), "{err}");
        assert!(started.elapsed() < Duration::from_secs(30), "a hung probe does not hold the gate");
        let err = probe(&check(&["/nonexistent/probe"], 5), soon()).await.unwrap_err();
        assert!(err.contains("could not run"), "{err}");
    }

    /// A probe script whose child hangs: at the deadline the whole group goes, not only the
    /// shell (the child would otherwise hold the probe's pipes and live on).
    #[tokio::test]
    async fn a_hung_probe_is_killed_with_everything_it_started() {
        let dir = tempfile::tempdir().unwrap();
        let pid_file = dir.path().join("child.pid");
        let script = format!("sleep 600 & echo $! > {}; wait", pid_file.display());
        let err = probe(&check(&["/bin/sh", "-c", &script], 1), Instant::now() + Duration::from_millis(500))
            .await
            .unwrap_err();
        assert!(err.contains("did not finish before the deadline"), "{err}");
        let child: i32 = std::fs::read_to_string(&pid_file).unwrap().trim().parse().unwrap();
        let gone = (0..50).any(|_| {
            std::thread::sleep(Duration::from_millis(100));
            // A zombie until its parent is reaped counts as gone: its state is Z.
            std::fs::read_to_string(format!("/proc/{child}/stat"))
                .map_or(true, |st| st.rsplit(')').next().is_some_and(|f| f.trim_start().starts_with('Z')))
        });
        assert!(gone, "the probe's sleep {child} outlived the deadline");
    }

    #[tokio::test]
    async fn an_http_probe_wants_a_2xx_from_loopback() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        tokio::spawn(async move {
            use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
            while let Ok((mut s, _)) = listener.accept().await {
                let mut buf = [0u8; 1024];
                let n = s.read(&mut buf).await.unwrap_or(0);
                let ok = String::from_utf8_lossy(&buf[..n]).starts_with("GET /healthz ");
                let status = if ok { "200 OK" } else { "503 Service Unavailable" };
                let _ = s.write_all(format!("HTTP/1.1 {status}\r\ncontent-length: 0\r\n\r\n").as_bytes()).await;
            }
        });
        let http = |path: &str| HealthCheck {
            command: vec![],
            http: Some(ironroot_contract::config::HttpProbe { port, path: path.into() }),
            deadline_s: 5,
        };
        let soon = Instant::now() + Duration::from_secs(5);
        assert!(probe(&http("/healthz"), soon).await.unwrap().contains("200"));
        assert!(probe(&http("/other"), soon).await.unwrap_err().contains("503"));
    }
}
