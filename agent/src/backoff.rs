//! Jittered exponential backoff for the phases that talk to the network (enroll, fetch).
//! Bounded: after `attempts` tries the last error stands. Errors that cannot get better by
//! waiting (a refused token, a bad signature) are not retried at all.

use std::time::Duration;

use rand::Rng as _;

#[derive(Debug, Clone, Copy)]
pub struct Backoff {
    pub attempts: u32,
    pub first: Duration,
    pub max: Duration,
}

impl Backoff {
    /// The boot default: 8 tries over roughly two minutes.
    pub const BOOT: Self = Self { attempts: 8, first: Duration::from_millis(500), max: Duration::from_secs(30) };

    /// The wait before try `n` (n ≥ 1): `first · 2^(n-1)` capped at `max`, then a uniformly
    /// random share between 50 % and 100 % of it, so a rack of nodes does not retry in step.
    pub fn delay(&self, n: u32) -> Duration {
        let full = self.first.saturating_mul(1 << n.saturating_sub(1).min(20)).min(self.max);
        full.mul_f64(rand::rng().random_range(0.5..=1.0))
    }

    /// Runs `op` until it succeeds, fails permanently (`transient` says no) or tries run out.
    pub async fn run<T, E, F, Fut>(&self, what: &str, transient: impl Fn(&E) -> bool, mut op: F) -> Result<T, E>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, E>>,
        E: std::error::Error,
    {
        let mut n = 1;
        loop {
            match op().await {
                Ok(v) => return Ok(v),
                Err(e) if transient(&e) && n < self.attempts => {
                    let wait = self.delay(n);
                    tracing::warn!(error = %crate::exit::describe(&e), attempt = n, of = self.attempts, ?wait, "{what} failed; retrying");
                    tokio::time::sleep(wait).await;
                    n += 1;
                }
                Err(e) => return Err(e),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_grow_are_capped_and_jittered() {
        let b = Backoff { attempts: 10, first: Duration::from_millis(100), max: Duration::from_secs(1) };
        for n in 1..=10 {
            let full = Duration::from_millis(100 * (1 << (n - 1))).min(Duration::from_secs(1));
            let d = b.delay(n);
            assert!(d >= full / 2 && d <= full, "try {n}: {d:?} vs {full:?}");
        }
    }

    #[tokio::test]
    async fn permanent_errors_stop_at_once_and_transient_ones_are_bounded() {
        use std::io::{Error, ErrorKind};
        let b = Backoff { attempts: 3, first: Duration::from_millis(1), max: Duration::from_millis(2) };
        let transient = |e: &Error| e.kind() == ErrorKind::TimedOut;
        for (kind, want_calls) in [(ErrorKind::PermissionDenied, 1), (ErrorKind::TimedOut, 3)] {
            let mut calls = 0;
            let r: Result<(), Error> = b
                .run("x", transient, || {
                    calls += 1;
                    async move { Err(Error::from(kind)) }
                })
                .await;
            assert_eq!((r.unwrap_err().kind(), calls), (kind, want_calls));
        }
    }
}
