//! Rendering a template: its entries (each following a channel or pinned by digest) become the
//! module list a node is served, every module pinned by digest. Pure: the same entries and
//! channel positions give the same modules in the same order, so a rendering is byte-identical
//! JSON (the golden file in control-plane/tests/golden pins the format). What a template's
//! rendering is, and which nodes are served which rendering, is `rollout`'s.

use std::collections::BTreeMap;

use ironroot_contract::OciDigest;
use ironroot_contract::wire::{DesiredModule, DesiredState, Intent};

/// Where an entry's digest comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Pin {
    /// The entry follows `channel` of its repository; `digest` and `serial` are where the
    /// channel stands now.
    Channel { channel: String, digest: OciDigest, serial: u64 },
    /// The entry is pinned to one manifest.
    Digest { digest: OciDigest, serial: u64 },
}

impl Pin {
    pub fn digest(&self) -> OciDigest {
        match self {
            Self::Channel { digest, .. } | Self::Digest { digest, .. } => *digest,
        }
    }

    pub fn serial(&self) -> u64 {
        match self {
            Self::Channel { serial, .. } | Self::Digest { serial, .. } => *serial,
        }
    }
}

/// One module of a template, with its pin resolved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// The module name (from its signed config, or the repository's last component for an
    /// unverified pin).
    pub module: String,
    /// `registry/repository`.
    pub repo: String,
    pub pin: Pin,
}

/// The modules a node of this template is served: one per module name, sorted by name, each
/// as `repo@digest` with the serial it carries (the node's rollback floor).
pub fn render(entries: &[Entry]) -> Vec<DesiredModule> {
    let by_name: BTreeMap<&str, &Entry> = entries.iter().map(|e| (e.module.as_str(), e)).collect();
    by_name
        .into_values()
        .map(|e| DesiredModule {
            name: e.module.clone(),
            reference: format!("{}@{}", e.repo, e.pin.digest()),
            digest: e.pin.digest(),
            serial: e.pin.serial(),
        })
        .collect()
}

/// A rendering as stored and compared: the module list's JSON (struct field order, no
/// whitespace), and its digests sorted (what a node must report to have converged).
pub fn encode(modules: &[DesiredModule]) -> (String, String) {
    let mut digests: Vec<String> = modules.iter().map(|m| m.digest.to_string()).collect();
    digests.sort();
    digests.dedup();
    (
        serde_json::to_string(modules).unwrap_or_else(|_| "[]".to_owned()),
        serde_json::to_string(&digests).unwrap_or_else(|_| "[]".to_owned()),
    )
}

/// The desired state a node is served: `modules` (a stored rendering) for `template`, at the
/// node's `generation`, with the intents its lifecycle state implies.
pub fn desired(generation: u64, template: Option<String>, modules: Vec<DesiredModule>, draining: bool) -> DesiredState {
    let intents = if draining { vec![Intent::Drain] } else { Vec::new() };
    DesiredState { generation, template, modules, intents, trial_deadline_s: None }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn digest(b: &[u8]) -> OciDigest {
        OciDigest::of(b)
    }

    #[test]
    fn renders_sorted_by_name_pinned_by_digest_whatever_the_entry_order() {
        let a = Entry {
            module: "web".into(),
            repo: "reg/ironroot/web".into(),
            pin: Pin::Channel { channel: "stable".into(), digest: digest(b"w"), serial: 3 },
        };
        let b = Entry {
            module: "base".into(),
            repo: "reg/ironroot/base".into(),
            pin: Pin::Digest { digest: digest(b"b"), serial: 9 },
        };
        let one = render(&[a.clone(), b.clone()]);
        let two = render(&[b, a]);
        assert_eq!(one, two);
        assert_eq!(one.iter().map(|m| m.name.as_str()).collect::<Vec<_>>(), ["base", "web"]);
        assert_eq!(one[1].reference, format!("reg/ironroot/web@{}", digest(b"w")));
        assert_eq!((one[0].serial, one[1].serial), (9, 3));
        let (json, digests) = encode(&one);
        assert_eq!(encode(&two).0, json);
        let mut sorted = vec![digest(b"w").to_string(), digest(b"b").to_string()];
        sorted.sort();
        assert_eq!(digests, serde_json::to_string(&sorted).unwrap());
    }
}
