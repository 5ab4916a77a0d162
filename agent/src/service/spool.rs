//! The spool machine: delivers the node journal to the plane in order — whatever was recorded
//! while the plane was away goes as soon as it answers — one batch in flight, backing off while
//! it fails. The journal itself (what is pending, what was acknowledged) is the shell's.

use std::time::Duration;

use super::node::{Action, Now};

fn backoff(failures: u32) -> Duration {
    Duration::from_secs(2).saturating_mul(1 << failures.min(5)).min(Duration::from_secs(60))
}

#[derive(Debug, Default)]
pub struct Spool {
    head: u64,
    delivered: u64,
    in_flight: bool,
    retry_at: Option<Duration>,
    failures: u32,
}

impl Spool {
    /// Starts with records up to `head` journaled and up to `delivered` acknowledged.
    pub fn new(head: u64, delivered: u64) -> Self {
        Self { head, delivered, ..Self::default() }
    }

    pub fn next_wake(&self) -> Option<Duration> {
        self.retry_at
    }

    pub fn on_journaled(&mut self, seq: u64) {
        self.head = self.head.max(seq);
    }

    pub fn on_delivered(&mut self, result: Result<u64, String>, now: Now) {
        self.in_flight = false;
        match result {
            Ok(upto) => {
                self.failures = 0;
                self.delivered = self.delivered.max(upto);
            }
            Err(_) => {
                self.failures = self.failures.saturating_add(1);
                self.retry_at = Some(now.mono + backoff(self.failures));
            }
        }
    }

    pub fn due(&mut self, now: Now, out: &mut Vec<Action>) {
        if self.in_flight || self.delivered >= self.head || self.retry_at.is_some_and(|t| now.mono < t) {
            return;
        }
        self.retry_at = None;
        self.in_flight = true;
        out.push(Action::Deliver { after: self.delivered });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(s: u64) -> Now {
        Now { mono: Duration::from_secs(s), wall: s }
    }

    #[test]
    fn delivers_in_order_one_batch_at_a_time_and_backs_off() {
        let mut s = Spool::new(3, 1);
        let mut out = Vec::new();
        s.due(at(0), &mut out);
        assert_eq!(out, [Action::Deliver { after: 1 }]);
        out.clear();
        s.on_journaled(5);
        s.due(at(0), &mut out);
        assert!(out.is_empty(), "one batch in flight");
        s.on_delivered(Err("plane away".into()), at(1));
        s.due(at(2), &mut out);
        assert!(out.is_empty(), "backing off");
        s.due(at(5), &mut out);
        assert_eq!(out, [Action::Deliver { after: 1 }], "the same records again");
        out.clear();
        s.on_delivered(Ok(5), at(6));
        s.due(at(6), &mut out);
        assert!(out.is_empty(), "everything delivered");
        s.on_journaled(6);
        s.due(at(7), &mut out);
        assert_eq!(out, [Action::Deliver { after: 5 }]);
    }
}
