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

    #[derive(Debug, Clone, Copy)]
    enum State {
        /// Everything journaled was delivered.
        Idle,
        /// Records 4 and 5 wait.
        Pending,
        /// A batch after 3 is out.
        InFlight,
        /// That batch failed at 100 s; again at 104 s.
        BackingOff,
    }

    #[derive(Debug, Clone, Copy)]
    enum Event {
        /// The timer at 101 s, and at 10,000 s.
        EarlyTick,
        LateTick,
        /// Record 9 journaled.
        Journaled,
        /// The plane acknowledged up to 5 (everything), or 4, or the delivery failed.
        DeliveredAll,
        DeliveredSome,
        Failed,
    }

    fn reach(state: State) -> Spool {
        let (head, mut out) = (if matches!(state, State::Idle) { 3 } else { 5 }, Vec::new());
        let mut s = Spool::new(head, 3);
        if matches!(state, State::InFlight | State::BackingOff) {
            s.due(at(100), &mut out);
        }
        if matches!(state, State::BackingOff) {
            s.on_delivered(Err("plane away".into()), at(100));
        }
        s
    }

    #[test]
    fn every_event_in_every_state() {
        use Event::*;
        use State::*;
        let after = |after| vec![Action::Deliver { after }];
        let none = Vec::new;
        // (state, event, what the event asks for, what a tick long after then asks for)
        let table = [
            (Idle, EarlyTick, none(), none()),
            (Idle, LateTick, none(), none()),
            (Idle, Journaled, none(), after(3)),
            (Idle, DeliveredAll, none(), none()),
            (Idle, DeliveredSome, none(), none()),
            (Idle, Failed, none(), none()),
            (Pending, EarlyTick, after(3), none()),
            (Pending, LateTick, after(3), none()),
            (Pending, Journaled, none(), after(3)),
            (Pending, DeliveredAll, none(), none()),
            (Pending, DeliveredSome, none(), after(4)),
            (Pending, Failed, none(), after(3)),
            (InFlight, EarlyTick, none(), none()),
            (InFlight, LateTick, none(), none()),
            (InFlight, Journaled, none(), none()),
            (InFlight, DeliveredAll, none(), none()),
            (InFlight, DeliveredSome, none(), after(4)),
            (InFlight, Failed, none(), after(3)),
            (BackingOff, EarlyTick, none(), after(3)),
            (BackingOff, LateTick, after(3), none()),
            (BackingOff, Journaled, none(), after(3)),
            (BackingOff, DeliveredAll, none(), none()),
            (BackingOff, DeliveredSome, none(), after(4)),
            (BackingOff, Failed, none(), after(3)),
        ];
        for (state, event, want, then) in table {
            let mut s = reach(state);
            let mut out = Vec::new();
            match event {
                EarlyTick => s.due(at(101), &mut out),
                LateTick => s.due(at(10_000), &mut out),
                Journaled => s.on_journaled(9),
                DeliveredAll => s.on_delivered(Ok(5), at(101)),
                DeliveredSome => s.on_delivered(Ok(4), at(101)),
                Failed => s.on_delivered(Err("refused".into()), at(101)),
            }
            assert_eq!(out, want, "{state:?} on {event:?}");
            out.clear();
            s.due(at(10_000), &mut out);
            assert_eq!(out, then, "{state:?} on {event:?}, then a tick");
        }
    }

    #[test]
    fn backoff_doubles_to_a_minute_and_an_acknowledgement_never_goes_back() {
        let waits: Vec<u64> = (1..=7).map(|f| backoff(f).as_secs()).collect();
        assert_eq!(waits, [4, 8, 16, 32, 60, 60, 60]);
        let mut s = reach(State::InFlight);
        s.on_delivered(Ok(5), at(101));
        s.on_delivered(Ok(2), at(102));
        let mut out = Vec::new();
        s.due(at(103), &mut out);
        assert!(out.is_empty(), "an older acknowledgement does not resend: {out:?}");
    }
}
