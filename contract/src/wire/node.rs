//! What both sides branch on about a node: its id, its lifecycle state on the plane, the phase
//! it reports, and the intents the plane holds for it.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// Longest id the plane issues or accepts (node and task ids are far shorter).
pub const MAX_ID: usize = 64;

/// Whether `s` is an id: 1-64 characters of `A-Z a-z 0-9 . _ -`.
pub fn valid_id(s: &str) -> bool {
    (1..=MAX_ID).contains(&s.len()) && s.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

macro_rules! id_type {
    ($(#[$doc:meta])* $name:ident, $what:literal) => {
        $(#[$doc])*
        #[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
        #[serde(try_from = "String", into = "String")]
        pub struct $name(String);

        impl $name {
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl TryFrom<String> for $name {
            type Error = String;
            fn try_from(s: String) -> Result<Self, String> {
                if valid_id(&s) {
                    Ok(Self(s))
                } else {
                    Err(format!(concat!($what, " {:?} is not 1-64 characters of A-Z a-z 0-9 . _ -"), s.chars().take(80).collect::<String>()))
                }
            }
        }

        impl FromStr for $name {
            type Err = String;
            fn from_str(s: &str) -> Result<Self, String> {
                Self::try_from(s.to_owned())
            }
        }

        impl From<$name> for String {
            fn from(id: $name) -> String {
                id.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }
    };
}

id_type!(
    /// A node's id, issued by the plane at enrollment (`n-…`); the node certificate names it.
    NodeId,
    "node id"
);
id_type!(
    /// A task's id, issued by the plane when the task is queued (`t-…`).
    TaskId,
    "task id"
);

/// A node's lifecycle state on the plane.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
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

const STATE_NAMES: [(NodeState, &str); 9] = [
    (NodeState::NoInstance, "no_instance"),
    (NodeState::Provisioning, "provisioning"),
    (NodeState::Bootstrapping, "bootstrapping"),
    (NodeState::Running, "running"),
    (NodeState::Draining, "draining"),
    (NodeState::Terminated, "terminated"),
    (NodeState::Suspect, "suspect"),
    (NodeState::Silent, "silent"),
    (NodeState::Quarantined, "quarantined"),
];

impl NodeState {
    pub const ALL: [NodeState; 9] = [
        NodeState::NoInstance,
        NodeState::Provisioning,
        NodeState::Bootstrapping,
        NodeState::Running,
        NodeState::Draining,
        NodeState::Terminated,
        NodeState::Suspect,
        NodeState::Silent,
        NodeState::Quarantined,
    ];
}

impl fmt::Display for NodeState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let name = STATE_NAMES.iter().find(|(s, _)| s == self).map_or("?", |(_, n)| n);
        f.write_str(name)
    }
}

impl FromStr for NodeState {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        STATE_NAMES.iter().find(|(_, n)| *n == s).map(|(st, _)| *st).ok_or_else(|| format!("unknown node state {s:?}"))
    }
}

/// A phase of the boot pipeline, in order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum BootPhase {
    /// The initramfs's drivers: a NIC no driver claimed (reported once another NIC enrolled).
    Hardware,
    Discover,
    Enroll,
    Fetch,
    Store,
    Verify,
    Mount,
    HandOff,
}

const PHASE_NAMES: [(BootPhase, &str); 8] = [
    (BootPhase::Hardware, "hardware"),
    (BootPhase::Discover, "discover"),
    (BootPhase::Enroll, "enroll"),
    (BootPhase::Fetch, "fetch"),
    (BootPhase::Store, "store"),
    (BootPhase::Verify, "verify"),
    (BootPhase::Mount, "mount"),
    (BootPhase::HandOff, "hand-off"),
];

impl fmt::Display for BootPhase {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(PHASE_NAMES.iter().find(|(p, _)| p == self).map_or("?", |(_, n)| n))
    }
}

impl FromStr for BootPhase {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        PHASE_NAMES.iter().find(|(_, n)| *n == s).map(|(p, _)| *p).ok_or_else(|| format!("unknown boot phase {s:?}"))
    }
}

/// The phase a node reports: a boot phase while it boots, `ready` once the service runs and its
/// health gate passed, `failed:<phase>` after a failed boot. On the wire, that string.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum ReportPhase {
    Booting(BootPhase),
    Ready,
    Failed(BootPhase),
}

impl fmt::Display for ReportPhase {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Booting(p) => write!(f, "{p}"),
            Self::Ready => f.write_str("ready"),
            Self::Failed(p) => write!(f, "failed:{p}"),
        }
    }
}

impl FromStr for ReportPhase {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "ready" => Ok(Self::Ready),
            _ => match s.strip_prefix("failed:") {
                Some(p) => Ok(Self::Failed(p.parse()?)),
                None => Ok(Self::Booting(s.parse().map_err(|_| format!("unknown phase {s:?}"))?)),
            },
        }
    }
}

impl TryFrom<String> for ReportPhase {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        s.parse()
    }
}

impl From<ReportPhase> for String {
    fn from(p: ReportPhase) -> String {
        p.to_string()
    }
}

/// What the plane wants of a node beyond its modules. A node that does not know an intent keeps
/// it as [`Intent::Other`] and reports it unsupported, never fails on it.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(from = "String", into = "String")]
pub enum Intent {
    Drain,
    Vet,
    Other(String),
}

impl From<String> for Intent {
    fn from(s: String) -> Self {
        match s.as_str() {
            "drain" => Self::Drain,
            "vet" => Self::Vet,
            _ => Self::Other(s),
        }
    }
}

impl From<Intent> for String {
    fn from(i: Intent) -> String {
        match i {
            Intent::Drain => "drain".to_owned(),
            Intent::Vet => "vet".to_owned(),
            Intent::Other(s) => s,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_checked_on_the_way_in() {
        let id: NodeId = serde_json::from_str("\"n-0123abcd\"").unwrap();
        assert_eq!(id.as_str(), "n-0123abcd");
        assert_eq!(serde_json::to_string(&id).unwrap(), "\"n-0123abcd\"");
        for bad in ["\"\"", "\"a/b\"", "\"a b\"", &format!("\"{}\"", "x".repeat(65)), "\"\\u0000\""] {
            assert!(serde_json::from_str::<NodeId>(bad).is_err(), "{bad}");
            assert!(serde_json::from_str::<TaskId>(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn states_and_phases_round_trip_by_name() {
        for s in NodeState::ALL {
            assert_eq!(s.to_string().parse::<NodeState>(), Ok(s));
            assert_eq!(serde_json::to_string(&s).unwrap(), format!("\"{s}\""));
        }
        assert!("zombie".parse::<NodeState>().is_err());
        for (p, _) in PHASE_NAMES {
            for r in [ReportPhase::Booting(p), ReportPhase::Failed(p)] {
                assert_eq!(r.to_string().parse::<ReportPhase>(), Ok(r));
            }
        }
        assert_eq!("failed:hand-off".parse::<ReportPhase>(), Ok(ReportPhase::Failed(BootPhase::HandOff)));
        assert_eq!(serde_json::to_string(&ReportPhase::Ready).unwrap(), "\"ready\"");
        for bad in ["", "Ready", "failed:", "failed:nope", "booting"] {
            assert!(bad.parse::<ReportPhase>().is_err(), "{bad}");
        }
    }

    #[test]
    fn unknown_intents_are_kept_not_refused() {
        let i: Vec<Intent> = serde_json::from_str(r#"["drain","vet","defrag"]"#).unwrap();
        assert_eq!(i, [Intent::Drain, Intent::Vet, Intent::Other("defrag".into())]);
        assert_eq!(serde_json::to_string(&i).unwrap(), r#"["drain","vet","defrag"]"#);
    }
}
