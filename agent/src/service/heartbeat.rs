//! The heartbeat machine: one handshake (`ready`) once the node's live modules are attached, then
//! a heartbeat every interval, jittered ±10 % so a fleet does not beat in step, and retried
//! sooner after a failure (5 s, doubling up to the interval). Never more than one exchange in
//! flight.

use std::time::Duration;

use super::node::{Action, Now};

/// A small deterministic generator for jitter: seeded by the shell, so the core stays pure
/// and tests are repeatable.
#[derive(Debug, Clone)]
pub struct Jitter(u64);

impl Jitter {
    pub fn new(seed: u64) -> Self {
        Self(seed | 1)
    }

    /// A number in [-1, 1].
    pub fn sample(&mut self) -> f64 {
        // xorshift64*
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        let x = self.0.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 11;
        (x as f64 / (1u64 << 53) as f64) * 2.0 - 1.0
    }
}

#[derive(Debug, Clone)]
pub struct Beat {
    pub interval: Duration,
    pub failures: u32,
    handshaken: bool,
    in_flight: bool,
    next_at: Duration,
    jitter: Jitter,
}

impl Beat {
    pub fn new(interval: Duration, jitter: Jitter) -> Self {
        Beat { interval, failures: 0, handshaken: false, in_flight: false, next_at: Duration::ZERO, jitter }
    }

    pub fn handshaken(&self) -> bool {
        self.handshaken
    }

    pub fn next_wake(&self) -> Option<Duration> {
        (!self.in_flight).then_some(self.next_at)
    }

    /// The delay after an exchange that went `ok` (or not).
    pub fn delay(&mut self, ok: bool) -> Duration {
        if ok {
            self.failures = 0;
            let spread = self.interval.as_secs_f64() * 0.1 * self.jitter.sample();
            Duration::from_secs_f64((self.interval.as_secs_f64() + spread).max(0.1))
        } else {
            self.failures = self.failures.saturating_add(1);
            let backoff = Duration::from_secs(5).saturating_mul(1 << self.failures.min(6).saturating_sub(1));
            backoff.min(self.interval)
        }
    }

    pub fn on_reported(&mut self, handshake: bool, ok: bool, now: Now) {
        self.in_flight = false;
        if handshake && ok {
            self.handshaken = true;
        }
        self.next_at = now.mono + self.delay(ok);
    }

    /// Asks for the next exchange when it is due; the handshake waits for `ready` (the live
    /// modules attached, or given up on).
    pub fn due(&mut self, now: Now, ready: bool, last_reconcile: Option<String>, out: &mut Vec<Action>) {
        if self.in_flight || now.mono < self.next_at || (!self.handshaken && !ready) {
            return;
        }
        self.in_flight = true;
        out.push(Action::Report { handshake: !self.handshaken, last_reconcile });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(s: u64) -> Now {
        Now { mono: Duration::from_secs(s), wall: 1000 + s }
    }

    #[test]
    fn handshake_waits_for_ready_then_beats_every_interval_and_backs_off() {
        let mut b = Beat::new(Duration::from_secs(30), Jitter::new(7));
        let mut out = Vec::new();
        b.due(at(0), false, None, &mut out);
        assert!(out.is_empty(), "no handshake before the live modules are attached");
        b.due(at(0), true, None, &mut out);
        assert_eq!(out, [Action::Report { handshake: true, last_reconcile: None }]);
        out.clear();
        b.due(at(1), true, None, &mut out);
        assert!(out.is_empty(), "one exchange in flight at a time");
        b.on_reported(true, true, at(1));
        assert!(b.handshaken());
        let next = b.next_wake().unwrap();
        assert!(next >= Duration::from_secs(28) && next <= Duration::from_secs(34), "{next:?}: 30 s ±10 %");
        b.due(Now { mono: next, wall: 0 }, true, Some("ok".into()), &mut out);
        assert_eq!(out, [Action::Report { handshake: false, last_reconcile: Some("ok".into()) }]);
        let delays: Vec<u64> = (0..5).map(|_| b.delay(false).as_secs()).collect();
        assert_eq!(delays, [5, 10, 20, 30, 30], "doubling, capped at the interval");
        b.on_reported(false, false, at(100));
        assert!(!b.handshaken() || b.failures > 0);
    }

    /// The states a beat can be in, each reached through the machine's own events.
    #[derive(Debug, Clone, Copy)]
    enum State {
        Fresh,
        HandshakeInFlight,
        HandshakeBackingOff,
        Beating,
        BeatInFlight,
        BeatBackingOff,
    }

    #[derive(Debug, Clone, Copy)]
    enum Event {
        /// The timer, before the next exchange is due (1 s after the state was reached).
        EarlyTick,
        /// The timer well past anything due, the live modules attached (or not).
        Tick { ready: bool },
        /// An exchange answered (`handshake`: it was the handshake), or failed.
        Answered { handshake: bool, ok: bool },
    }

    /// `state`, reached by 100 s.
    fn reach(state: State) -> Beat {
        let mut b = Beat::new(Duration::from_secs(30), Jitter::new(3));
        let mut out = Vec::new();
        let mut due = |b: &mut Beat, t| b.due(at(t), true, None, &mut out);
        match state {
            State::Fresh => {}
            State::HandshakeInFlight => due(&mut b, 100),
            State::HandshakeBackingOff => {
                due(&mut b, 100);
                b.on_reported(true, false, at(100)); // again at 105
            }
            State::Beating => {
                due(&mut b, 100);
                b.on_reported(true, true, at(100)); // next at 127..133
            }
            State::BeatInFlight => {
                due(&mut b, 0);
                b.on_reported(true, true, at(0));
                due(&mut b, 100);
            }
            State::BeatBackingOff => {
                due(&mut b, 0);
                b.on_reported(true, true, at(0));
                due(&mut b, 50);
                b.on_reported(false, false, at(100)); // again at 105
            }
        }
        b
    }

    #[test]
    fn every_event_in_every_state() {
        use Event::*;
        use State::*;
        let hs = |handshake| Action::Report { handshake, last_reconcile: None };
        // (state, event, reports asked for, handshaken after, an exchange in flight after)
        let table: &[(State, Event, &[Action], bool, bool)] = &[
            (Fresh, EarlyTick, &[hs(true)], false, true),
            (Fresh, Tick { ready: true }, &[hs(true)], false, true),
            (Fresh, Tick { ready: false }, &[], false, false),
            (Fresh, Answered { handshake: true, ok: true }, &[], true, false),
            (Fresh, Answered { handshake: true, ok: false }, &[], false, false),
            (HandshakeInFlight, EarlyTick, &[], false, true),
            (HandshakeInFlight, Tick { ready: true }, &[], false, true),
            (HandshakeInFlight, Tick { ready: false }, &[], false, true),
            (HandshakeInFlight, Answered { handshake: true, ok: true }, &[], true, false),
            (HandshakeInFlight, Answered { handshake: true, ok: false }, &[], false, false),
            (HandshakeBackingOff, EarlyTick, &[], false, false),
            (HandshakeBackingOff, Tick { ready: true }, &[hs(true)], false, true),
            (HandshakeBackingOff, Tick { ready: false }, &[], false, false),
            (HandshakeBackingOff, Answered { handshake: true, ok: true }, &[], true, false),
            (Beating, EarlyTick, &[], true, false),
            (Beating, Tick { ready: true }, &[hs(false)], true, true),
            // Once handshaken, heartbeats go on whatever the live modules do.
            (Beating, Tick { ready: false }, &[hs(false)], true, true),
            (Beating, Answered { handshake: false, ok: false }, &[], true, false),
            (BeatInFlight, EarlyTick, &[], true, true),
            (BeatInFlight, Tick { ready: true }, &[], true, true),
            (BeatInFlight, Tick { ready: false }, &[], true, true),
            (BeatInFlight, Answered { handshake: false, ok: true }, &[], true, false),
            // A failed heartbeat does not undo the handshake.
            (BeatInFlight, Answered { handshake: false, ok: false }, &[], true, false),
            (BeatBackingOff, EarlyTick, &[], true, false),
            (BeatBackingOff, Tick { ready: true }, &[hs(false)], true, true),
            (BeatBackingOff, Tick { ready: false }, &[hs(false)], true, true),
            (BeatBackingOff, Answered { handshake: false, ok: true }, &[], true, false),
        ];
        for (state, event, want, handshaken, in_flight) in table {
            let mut b = reach(*state);
            let mut out = Vec::new();
            match *event {
                EarlyTick => b.due(at(101), true, None, &mut out),
                Tick { ready } => b.due(at(10_000), ready, None, &mut out),
                Answered { handshake, ok } => b.on_reported(handshake, ok, at(101)),
            }
            let what = format!("{state:?} on {event:?}");
            assert_eq!(out, *want, "{what}");
            assert_eq!(b.handshaken(), *handshaken, "{what}: handshaken");
            assert_eq!(b.next_wake().is_none(), *in_flight, "{what}: in flight");
        }
    }

    #[test]
    fn after_an_answer_the_next_exchange_waits_its_delay() {
        for (ok, least, most) in [(true, 27, 33), (false, 5, 5)] {
            let mut b = reach(State::BeatInFlight);
            b.on_reported(false, ok, at(200));
            let wait = b.next_wake().unwrap() - Duration::from_secs(200);
            assert!(wait >= Duration::from_secs(least) && wait <= Duration::from_secs(most), "{ok}: {wait:?}");
        }
    }

    #[test]
    fn jitter_stays_within_bounds() {
        let mut j = Jitter::new(42);
        let xs: Vec<f64> = (0..1000).map(|_| j.sample()).collect();
        assert!(xs.iter().all(|x| (-1.0..=1.0).contains(x)));
        assert!(xs.iter().any(|x| *x > 0.5) && xs.iter().any(|x| *x < -0.5), "spread over the range");
    }
}
