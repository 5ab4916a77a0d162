//! Node lifecycle: the states a node moves through and which moves are allowed. Pure: the
//! caller loads the current state, asks [`check`], and records the move and a journal entry.

use NodeState::*;
pub use ironroot_contract::wire::NodeState;

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
