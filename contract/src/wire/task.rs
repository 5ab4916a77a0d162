//! Tasks: what an operator asks a node to do, leased by the node's long-poll and answered with a
//! typed result. A node meets kinds it does not know (a newer plane) and parameters it cannot
//! read; both parse, as [`TaskSpec::Unsupported`] and [`TaskSpec::Invalid`], so the node
//! answers them with a result instead of failing to read its task at all.

use serde::de::Error as _;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use super::node::TaskId;

/// What a task asks. On the wire, an object tagged by `kind`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TaskSpec {
    /// Reconcile the node's modules with its desired state now.
    ModuleUpdate,
    /// A full reboot (kernel and initramfs again: the node netboots).
    Reboot,
    /// Restart userspace into the current or staged root (systemd soft-reboot).
    SoftReboot,
    /// Run a command (argv, no shell).
    Exec {
        argv: Vec<String>,
    },
    Drain,
    Vet,
    /// A kind this side does not know: answered `unsupported`.
    Unsupported {
        kind: String,
    },
    /// A known kind whose parameters do not parse: answered `failed` with the reason.
    Invalid {
        kind: String,
        reason: String,
    },
}

/// The kinds this contract knows, as they appear on the wire.
pub const KINDS: &[&str] = &["module-update", "reboot", "soft-reboot", "exec", "drain", "vet"];

#[derive(Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case", deny_unknown_fields)]
enum Known {
    // Empty struct variants, not unit ones: serde refuses unknown fields only in the former.
    ModuleUpdate {},
    Reboot {},
    SoftReboot {},
    Exec { argv: Vec<String> },
    Drain {},
    Vet {},
}

impl TaskSpec {
    /// The kind on the wire.
    pub fn kind(&self) -> &str {
        match self {
            Self::ModuleUpdate => "module-update",
            Self::Reboot => "reboot",
            Self::SoftReboot => "soft-reboot",
            Self::Exec { .. } => "exec",
            Self::Drain => "drain",
            Self::Vet => "vet",
            Self::Unsupported { kind } | Self::Invalid { kind, .. } => kind,
        }
    }

    /// Whether this is a task the plane may queue (a known kind with parameters that parse).
    pub fn is_known(&self) -> bool {
        !matches!(self, Self::Unsupported { .. } | Self::Invalid { .. })
    }
}

impl Serialize for TaskSpec {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let known = match self {
            Self::ModuleUpdate => Known::ModuleUpdate {},
            Self::Reboot => Known::Reboot {},
            Self::SoftReboot => Known::SoftReboot {},
            Self::Exec { argv } => Known::Exec { argv: argv.clone() },
            Self::Drain => Known::Drain {},
            Self::Vet => Known::Vet {},
            Self::Unsupported { kind } | Self::Invalid { kind, .. } => {
                return serde_json::json!({ "kind": kind }).serialize(s);
            }
        };
        known.serialize(s)
    }
}

impl<'de> Deserialize<'de> for TaskSpec {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let value = serde_json::Value::deserialize(d)?;
        let kind = match value.get("kind") {
            Some(serde_json::Value::String(k)) => k.clone(),
            _ => return Err(D::Error::custom("a task is an object with a string `kind`")),
        };
        if !KINDS.contains(&kind.as_str()) {
            return Ok(Self::Unsupported { kind: kind.chars().take(64).collect() });
        }
        Ok(match serde_json::from_value::<Known>(value) {
            Ok(Known::ModuleUpdate {}) => Self::ModuleUpdate,
            Ok(Known::Reboot {}) => Self::Reboot,
            Ok(Known::SoftReboot {}) => Self::SoftReboot,
            Ok(Known::Exec { argv }) => Self::Exec { argv },
            Ok(Known::Drain {}) => Self::Drain,
            Ok(Known::Vet {}) => Self::Vet,
            Err(e) => Self::Invalid { kind, reason: e.to_string() },
        })
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Task {
    pub id: TaskId,
    pub spec: TaskSpec,
    /// Lease expiry, seconds since the epoch; an unfinished task is redelivered after it.
    pub lease_until: u64,
    /// The task must be finished (or given up) by this time, seconds since the epoch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deadline: Option<u64>,
}

/// How a task ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum TaskOutcome {
    Succeeded,
    Failed,
    /// The node does not know the kind, or cannot do it here.
    Unsupported,
    /// Its deadline passed first.
    TimedOut,
    /// An operator cancelled it.
    Cancelled,
}

impl std::fmt::Display for TaskOutcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Succeeded => "succeeded",
            Self::Failed => "failed",
            Self::Unsupported => "unsupported",
            Self::TimedOut => "timed-out",
            Self::Cancelled => "cancelled",
        })
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TaskResult {
    pub outcome: TaskOutcome,
    /// A command's exit status, where there was one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exit_code: Option<i32>,
    #[serde(default)]
    pub output: String,
    /// Why it failed, was unsupported or timed out.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

impl TaskResult {
    pub fn new(outcome: TaskOutcome, reason: impl Into<Option<String>>) -> Self {
        Self { outcome, exit_code: None, output: String::new(), reason: reason.into() }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> TaskSpec {
        serde_json::from_str(s).unwrap()
    }

    #[test]
    fn known_kinds_round_trip_and_the_rest_is_kept_as_unsupported_or_invalid() {
        for spec in [
            TaskSpec::ModuleUpdate,
            TaskSpec::Reboot,
            TaskSpec::SoftReboot,
            TaskSpec::Exec { argv: vec!["/usr/bin/uname".into(), "-r".into()] },
            TaskSpec::Drain,
            TaskSpec::Vet,
        ] {
            let json = serde_json::to_string(&spec).unwrap();
            assert_eq!(parse(&json), spec, "{json}");
            assert!(json.contains(&format!("\"kind\":\"{}\"", spec.kind())), "{json}");
            assert!(spec.is_known());
        }
        assert_eq!(parse(r#"{"kind":"defrag","disk":"sda"}"#), TaskSpec::Unsupported { kind: "defrag".into() });
        let invalid = parse(r#"{"kind":"exec","argv":"uname -r"}"#);
        assert!(matches!(&invalid, TaskSpec::Invalid { kind, .. } if kind == "exec"), "{invalid:?}");
        assert!(matches!(parse(r#"{"kind":"reboot","now":true}"#), TaskSpec::Invalid { .. }), "unknown fields");
        assert!(!invalid.is_known());
        for bad in [r#"{"argv":[]}"#, r#"{"kind":7}"#, "[]"] {
            assert!(serde_json::from_str::<TaskSpec>(bad).is_err(), "{bad}");
        }
        let task: Task = serde_json::from_str(r#"{"id":"t-1","spec":{"kind":"later-kind"},"lease_until":5}"#).unwrap();
        assert_eq!(task.spec.kind(), "later-kind");
    }

    #[test]
    fn results_are_typed() {
        let r: TaskResult = serde_json::from_str(r#"{"outcome":"timed-out","reason":"deadline"}"#).unwrap();
        assert_eq!((r.outcome, r.exit_code), (TaskOutcome::TimedOut, None));
        assert!(serde_json::from_str::<TaskResult>(r#"{"exit_code":0}"#).is_err(), "an outcome is required");
        assert!(serde_json::from_str::<TaskResult>(r#"{"outcome":"maybe"}"#).is_err());
    }
}
