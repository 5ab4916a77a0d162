//! Who gets in, and what unauthenticated traffic may cost the plane: caps on connections that
//! presented no client certificate (per address and in total), token buckets per key, and the
//! accounting that keeps refusals of unauthenticated callers from flooding the journal (each
//! address is journaled at a bounded rate; what was not journaled is counted and named in the
//! next record).
//!
//! Authenticated connections are not capped here: every one of them holds a certificate the
//! plane issued, and the fan-in benchmark holds 10,000 of them from one address.

use std::collections::HashMap;
use std::hash::Hash;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::Instant;

/// Keys a limiter remembers before it forgets them all (bounded memory; forgetting only ever
/// lets more through).
const MAX_KEYS: usize = 100_000;

/// A token bucket per key (an address, a node): a burst, then `per_second`.
#[derive(Debug)]
pub struct RateLimiter<K = IpAddr> {
    buckets: Mutex<HashMap<K, Bucket>>,
    burst: f64,
    per_second: f64,
}

#[derive(Debug)]
struct Bucket {
    tokens: f64,
    last: Instant,
    /// Requests refused since the last one allowed.
    refused: u64,
}

/// A limiter's answer: allowed, with how many were refused since the previous allowed one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admit {
    Yes { refused_before: u64 },
    No,
}

impl<K: Eq + Hash + Clone> RateLimiter<K> {
    pub fn new(burst: u32, per_second: f64) -> Self {
        Self { buckets: Mutex::default(), burst: f64::from(burst.max(1)), per_second: per_second.max(0.0) }
    }

    pub fn admit(&self, key: &K) -> Admit {
        let mut buckets = self.buckets.lock().unwrap_or_else(|p| p.into_inner());
        if buckets.len() >= MAX_KEYS && !buckets.contains_key(key) {
            buckets.clear();
        }
        let now = Instant::now();
        let b = buckets.entry(key.clone()).or_insert(Bucket { tokens: self.burst, last: now, refused: 0 });
        let refill = now.duration_since(b.last).as_secs_f64() * self.per_second;
        b.tokens = (b.tokens + refill).min(self.burst);
        b.last = now;
        if b.tokens >= 1.0 {
            b.tokens -= 1.0;
            Admit::Yes { refused_before: std::mem::take(&mut b.refused) }
        } else {
            b.refused = b.refused.saturating_add(1);
            Admit::No
        }
    }

    pub fn allow(&self, key: &K) -> bool {
        matches!(self.admit(key), Admit::Yes { .. })
    }
}

/// Limits on connections without a client certificate (a connection counts from accept until
/// its TLS handshake shows a certificate the plane issued).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnectionLimits {
    pub max_anonymous: usize,
    pub max_anonymous_per_address: usize,
}

#[derive(Debug, Default)]
struct Counts {
    total: usize,
    per_address: HashMap<IpAddr, usize>,
}

/// The live count of anonymous connections.
#[derive(Debug)]
pub struct ConnectionCaps {
    limits: ConnectionLimits,
    counts: Arc<Mutex<Counts>>,
}

/// Why a connection was not admitted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CapExceeded {
    Total(usize),
    PerAddress(usize),
}

impl std::fmt::Display for CapExceeded {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Total(n) => write!(f, "{n} connections without a client certificate are open (the cap)"),
            Self::PerAddress(n) => {
                write!(f, "{n} connections without a client certificate are open from this address (the cap)")
            }
        }
    }
}

/// One anonymous connection's place in the count; given back on drop or when the connection
/// authenticates.
#[derive(Debug)]
pub struct AnonymousSlot {
    ip: IpAddr,
    counts: Arc<Mutex<Counts>>,
}

impl ConnectionCaps {
    pub fn new(limits: ConnectionLimits) -> Self {
        Self { limits, counts: Arc::default() }
    }

    /// Takes a slot for a new connection from `ip`, or says which cap it would exceed.
    pub fn admit(&self, ip: IpAddr) -> Result<AnonymousSlot, CapExceeded> {
        let mut c = self.counts.lock().unwrap_or_else(|p| p.into_inner());
        if c.total >= self.limits.max_anonymous {
            return Err(CapExceeded::Total(c.total));
        }
        let here = c.per_address.get(&ip).copied().unwrap_or(0);
        if here >= self.limits.max_anonymous_per_address {
            return Err(CapExceeded::PerAddress(here));
        }
        c.total += 1;
        c.per_address.insert(ip, here + 1);
        Ok(AnonymousSlot { ip, counts: Arc::clone(&self.counts) })
    }

    /// Anonymous connections open now (total, from `ip`).
    pub fn open(&self, ip: IpAddr) -> (usize, usize) {
        let c = self.counts.lock().unwrap_or_else(|p| p.into_inner());
        (c.total, c.per_address.get(&ip).copied().unwrap_or(0))
    }
}

impl Drop for AnonymousSlot {
    fn drop(&mut self) {
        let mut c = self.counts.lock().unwrap_or_else(|p| p.into_inner());
        c.total = c.total.saturating_sub(1);
        if let Some(n) = c.per_address.get_mut(&self.ip) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                c.per_address.remove(&self.ip);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bucket_allows_its_burst_then_counts_what_it_refused() {
        let l: RateLimiter<&str> = RateLimiter::new(2, 0.0);
        assert_eq!(l.admit(&"a"), Admit::Yes { refused_before: 0 });
        assert_eq!(l.admit(&"a"), Admit::Yes { refused_before: 0 });
        assert_eq!(l.admit(&"a"), Admit::No);
        assert_eq!(l.admit(&"a"), Admit::No);
        assert!(l.allow(&"b"), "keys are independent");
        let refill: RateLimiter<&str> = RateLimiter::new(1, 1e9);
        assert!(refill.allow(&"a"));
        assert_eq!(refill.admit(&"a"), Admit::Yes { refused_before: 0 }, "refilled at once");
    }

    #[test]
    fn refused_counts_reach_the_next_admitted_request() {
        let l: RateLimiter<&str> = RateLimiter::new(1, 0.0);
        assert!(l.allow(&"a"));
        for _ in 0..5 {
            assert_eq!(l.admit(&"a"), Admit::No);
        }
        // Refill by hand: a bucket that refills is what lets the count through.
        l.buckets.lock().unwrap().get_mut(&"a").unwrap().tokens = 1.0;
        assert_eq!(l.admit(&"a"), Admit::Yes { refused_before: 5 });
    }

    #[test]
    fn caps_hold_per_address_and_in_total_and_slots_come_back() {
        let caps = ConnectionCaps::new(ConnectionLimits { max_anonymous: 3, max_anonymous_per_address: 2 });
        let (a, b): (IpAddr, IpAddr) = ("127.0.0.1".parse().unwrap(), "127.0.0.2".parse().unwrap());
        let s1 = caps.admit(a).unwrap();
        let _s2 = caps.admit(a).unwrap();
        assert_eq!(caps.admit(a).unwrap_err(), CapExceeded::PerAddress(2));
        let _s3 = caps.admit(b).unwrap();
        assert_eq!(caps.admit(b).unwrap_err(), CapExceeded::Total(3));
        drop(s1);
        assert_eq!(caps.open(a), (2, 1));
        assert!(caps.admit(a).is_ok(), "a returned slot is free again");
        assert_eq!(caps.open(a), (2, 1), "the admitted slot was dropped at once");
    }
}
