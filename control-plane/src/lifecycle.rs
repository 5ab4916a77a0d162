//! Node lifecycle: the states a node moves through and which moves are allowed. Pure: the
//! caller loads the current state, asks [`check`], and records the move and a journal entry.

use std::fmt;
use std::str::FromStr;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum NodeState {
    NoInstance,
    Provisioning,
    Bootstrapping,
    Running,
    Draining,
    Terminated,
    /// Missed heartbeats for a few intervals.
    Suspect,
    /// Missed heartbeats for much longer.
    Silent,
    /// Failed vetting; kept away from work until an operator acts.
    Quarantined,
}

use NodeState::*;

const NAMES: [(NodeState, &str); 9] = [
    (NoInstance, "no_instance"),
    (Provisioning, "provisioning"),
    (Bootstrapping, "bootstrapping"),
    (Running, "running"),
    (Draining, "draining"),
    (Terminated, "terminated"),
    (Suspect, "suspect"),
    (Silent, "silent"),
    (Quarantined, "quarantined"),
];

impl fmt::Display for NodeState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let name = NAMES.iter().find(|(s, _)| s == self).map_or("?", |(_, n)| n);
        f.write_str(name)
    }
}

impl FromStr for NodeState {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        NAMES.iter().find(|(_, n)| *n == s).map(|(st, _)| *st).ok_or_else(|| format!("unknown node state {s:?}"))
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("node is {from}; {to} is not reachable from there ({reason})")]
pub struct TransitionError {
    pub from: NodeState,
    pub to: NodeState,
    pub reason: &'static str,
}

/// Whether `from → to` is allowed. Staying put is always allowed (and records nothing).
pub fn check(from: NodeState, to: NodeState) -> Result<(), TransitionError> {
    let ok = from == to
        || match (from, to) {
            (NoInstance, Provisioning) => true,
            (Provisioning, Bootstrapping) => true,
            // A (re)booting node handshakes from any live state.
            (Running | Suspect | Silent | Draining, Bootstrapping) => true,
            (Bootstrapping | Suspect | Silent, Running) => true,
            (Running | Suspect, Draining) => true,
            (Draining, Running) => true,
            (Running, Suspect) | (Suspect, Silent) => true,
            (Bootstrapping | Running | Suspect | Silent | Draining, Quarantined) => true,
            (_, Terminated) => from != NoInstance,
            // Re-provisioning by an operator.
            (Terminated | Quarantined | Silent, Provisioning) => true,
            _ => false,
        };
    if ok {
        return Ok(());
    }
    let reason = match (from, to) {
        (Terminated, _) => "a terminated node must be re-provisioned first",
        (Quarantined, _) => "a quarantined node needs an operator",
        (NoInstance, _) => "the node has not enrolled",
        (_, Suspect | Silent) => "only the heartbeat sweep marks nodes silent",
        _ => "not a lifecycle step",
    };
    Err(TransitionError { from, to, reason })
}

/// Whether a node in this state counts as active (a second enrollment is refused).
pub fn is_active(s: NodeState) -> bool {
    !matches!(s, NoInstance | Terminated)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        for (s, n) in NAMES {
            assert_eq!(s.to_string(), n);
            assert_eq!(n.parse::<NodeState>().unwrap(), s);
        }
        assert!("zombie".parse::<NodeState>().is_err());
    }

    #[test]
    fn table() {
        let allowed = [
            (NoInstance, Provisioning),
            (Provisioning, Bootstrapping),
            (Bootstrapping, Running),
            (Running, Draining),
            (Draining, Terminated),
            (Running, Suspect),
            (Suspect, Silent),
            (Silent, Running),
            (Suspect, Running),
            (Running, Bootstrapping),
            (Running, Quarantined),
            (Terminated, Provisioning),
        ];
        for (a, b) in allowed {
            assert!(check(a, b).is_ok(), "{a} -> {b}");
        }
        let refused = [
            (NoInstance, Running),
            (Terminated, Running),
            (Quarantined, Running),
            (Bootstrapping, Suspect),
            (Provisioning, Running),
            (Draining, Suspect),
        ];
        for (a, b) in refused {
            let e = check(a, b).unwrap_err();
            assert_eq!((e.from, e.to), (a, b));
            assert!(!e.reason.is_empty());
        }
    }
}
