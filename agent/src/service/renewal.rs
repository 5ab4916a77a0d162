//! The certificate renewal machine: renew at a jittered 60–75 % of the certificate's lifetime,
//! with a new key (the shell makes it, has the plane sign it, checks the answer and swaps the
//! files atomically, so no heartbeat is missed). A failed renewal is retried with backoff until
//! the certificate expires; an expired certificate cannot be renewed (the plane only renews for
//! a valid one) and the node needs re-provisioning, which it says in its status.

use std::time::Duration;

use super::node::{Action, Now};

fn backoff(failures: u32) -> Duration {
    Duration::from_secs(10).saturating_mul(1 << failures.min(6)).min(Duration::from_secs(600))
}

#[derive(Debug)]
pub struct Renewal {
    not_before: u64,
    not_after: u64,
    /// Where in the lifetime to renew, in [0.60, 0.75].
    fraction: f64,
    in_flight: bool,
    retry_at: Option<u64>,
    failures: u32,
    expired_said: bool,
}

impl Renewal {
    /// A certificate valid from `not_before` to `not_after` (seconds since the epoch); `jitter`
    /// in [-1, 1] picks the point between 60 % and 75 % of the lifetime.
    pub fn new(not_before: u64, not_after: u64, jitter: f64) -> Self {
        let fraction = 0.675 + 0.075 * jitter.clamp(-1.0, 1.0);
        Self { not_before, not_after, fraction, in_flight: false, retry_at: None, failures: 0, expired_said: false }
    }

    /// When (seconds since the epoch) this certificate is renewed.
    pub fn renew_at(&self) -> u64 {
        let life = self.not_after.saturating_sub(self.not_before) as f64;
        self.not_before + (life * self.fraction) as u64
    }

    pub fn next_wake(&self) -> Option<Duration> {
        // Wall-clock deadlines: the shell's tick at least every heartbeat covers them.
        None
    }

    pub fn on_renewed(&mut self, result: Result<u64, String>, now: Now, out: &mut Vec<Action>) {
        self.in_flight = false;
        match result {
            Ok(not_after) => {
                let jitter = self.fraction;
                *self = Self::new(now.wall, not_after, 0.0);
                self.fraction = jitter;
                out.push(Action::Record {
                    kind: "cert.renewed".into(),
                    data: serde_json::json!({"not_after": not_after}),
                });
            }
            Err(why) => {
                self.failures = self.failures.saturating_add(1);
                self.retry_at = Some(now.wall + backoff(self.failures).as_secs());
                out.push(Action::Status(format!(
                    "certificate renewal failed: {}",
                    why.chars().take(200).collect::<String>()
                )));
            }
        }
    }

    pub fn due(&mut self, now: Now, out: &mut Vec<Action>) {
        if now.wall >= self.not_after {
            if !self.expired_said {
                self.expired_said = true;
                out.push(Action::Status(format!(
                    "the node certificate expired at {}; the node must be re-provisioned (a new token)",
                    self.not_after
                )));
                out.push(Action::Record {
                    kind: "cert.expired".into(),
                    data: serde_json::json!({"not_after": self.not_after}),
                });
            }
            return;
        }
        if self.in_flight || now.wall < self.renew_at() || self.retry_at.is_some_and(|t| now.wall < t) {
            return;
        }
        self.in_flight = true;
        self.retry_at = None;
        out.push(Action::Renew);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(wall: u64) -> Now {
        Now { mono: Duration::from_secs(wall), wall }
    }

    #[test]
    fn renews_between_60_and_75_percent_with_retries_until_expiry() {
        for j in [-1.0, 0.0, 1.0] {
            let r = Renewal::new(1000, 1090, j);
            assert!((1054..=1068).contains(&r.renew_at()), "{j}: {}", r.renew_at());
        }
        let mut r = Renewal::new(1000, 1090, -1.0);
        let mut out = Vec::new();
        r.due(at(1050), &mut out);
        assert!(out.is_empty(), "too early");
        r.due(at(1054), &mut out);
        assert_eq!(out, [Action::Renew]);
        out.clear();
        r.due(at(1055), &mut out);
        assert!(out.is_empty(), "one renewal in flight");
        r.on_renewed(Err("plane unreachable".into()), at(1056), &mut out);
        out.clear();
        r.due(at(1060), &mut out);
        assert!(out.is_empty(), "backing off");
        r.due(at(1080), &mut out);
        assert_eq!(out, [Action::Renew]);
        out.clear();
        r.on_renewed(Ok(1170), at(1081), &mut out);
        assert!(matches!(&out[0], Action::Record { kind, .. } if kind == "cert.renewed"));
        assert!((1081..1170).contains(&r.renew_at()));
        out.clear();
        r.due(at(1170), &mut out);
        assert!(matches!(&out[0], Action::Status(s) if s.contains("re-provisioned")), "{out:?}");
        out.clear();
        r.due(at(1171), &mut out);
        assert!(out.is_empty(), "said once");
    }

    #[derive(Debug, Clone, Copy)]
    enum State {
        /// Valid 1000..2000 s, renewed at 1675 s (jitter 0).
        Early,
        /// A renewal asked for at 1700 s.
        InFlight,
        /// That renewal failed at 1700 s; again at 1720 s.
        RetryWait,
        /// Expiry seen (and said) at 2000 s.
        Expired,
    }

    #[derive(Debug, Clone, Copy)]
    enum Event {
        Tick(u64),
        Renewed,
        Failed,
    }

    fn reach(state: State) -> Renewal {
        let mut r = Renewal::new(1000, 2000, 0.0);
        let mut out = Vec::new();
        match state {
            State::Early => {}
            State::InFlight => r.due(at(1700), &mut out),
            State::RetryWait => {
                r.due(at(1700), &mut out);
                r.on_renewed(Err("plane away".into()), at(1700), &mut out);
            }
            State::Expired => r.due(at(2000), &mut out),
        }
        r
    }

    /// What the actions are, by kind: `renew`, `status`, or the record's kind.
    fn kinds(out: &[Action]) -> Vec<String> {
        out.iter()
            .map(|a| match a {
                Action::Renew => "renew".to_owned(),
                Action::Status(_) => "status".to_owned(),
                Action::Record { kind, .. } => kind.clone(),
                other => format!("{other:?}"),
            })
            .collect()
    }

    #[test]
    fn every_event_in_every_state() {
        use Event::*;
        use State::*;
        const EXPIRED: &[&str] = &["status", "cert.expired"];
        let table: &[(State, Event, &[&str])] = &[
            (Early, Tick(1100), &[]),
            (Early, Tick(1710), &["renew"]),
            (Early, Tick(1800), &["renew"]),
            (Early, Tick(2500), EXPIRED),
            (Early, Renewed, &["cert.renewed"]),
            (Early, Failed, &["status"]),
            (InFlight, Tick(1100), &[]),
            (InFlight, Tick(1710), &[]),
            (InFlight, Tick(1800), &[]),
            (InFlight, Tick(2500), EXPIRED),
            (InFlight, Renewed, &["cert.renewed"]),
            (InFlight, Failed, &["status"]),
            (RetryWait, Tick(1100), &[]),
            (RetryWait, Tick(1710), &[]),
            (RetryWait, Tick(1800), &["renew"]),
            (RetryWait, Tick(2500), EXPIRED),
            (RetryWait, Renewed, &["cert.renewed"]),
            (RetryWait, Failed, &["status"]),
            // A clock set back before the expiry: the certificate is valid again to the node
            // (the plane, whose clock decides, refuses or renews it).
            (Expired, Tick(1100), &[]),
            (Expired, Tick(1710), &["renew"]),
            (Expired, Tick(2500), &[]),
            (Expired, Renewed, &["cert.renewed"]),
            (Expired, Failed, &["status"]),
        ];
        for (state, event, want) in table {
            let mut r = reach(*state);
            let mut out = Vec::new();
            match *event {
                Tick(t) => r.due(at(t), &mut out),
                Renewed => r.on_renewed(Ok(5000), at(1750), &mut out),
                Failed => r.on_renewed(Err("refused".into()), at(1750), &mut out),
            }
            assert_eq!(kinds(&out), *want, "{state:?} on {event:?}");
            if matches!(event, Renewed) {
                // The new certificate's own point, at the same fraction of its lifetime.
                assert_eq!(r.renew_at(), 1750 + (3250.0 * 0.675) as u64, "{state:?}");
                let mut next = Vec::new();
                r.due(at(2500), &mut next);
                assert!(next.is_empty(), "{state:?}: renewed, nothing due: {next:?}");
            }
        }
    }
}
