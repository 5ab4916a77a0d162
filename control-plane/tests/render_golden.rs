//! The rendering format, pinned: a template's rendered desired state is byte-identical for the
//! same inputs, whatever order its entries come in. The golden file is also read by the
//! real-peer test (tests/tests/plane_channels.rs), which fills the placeholders with the digests
//! of modules it built and compares what the running plane renders.

#![allow(clippy::unwrap_used, clippy::expect_used, reason = "tests stop loudly on a failed setup step")]

use ironroot_contract::OciDigest;
use ironroot_plane::render::{Entry, Pin, desired, render};

/// The golden rendering with `{{REGISTRY}}`, `{{BASE}}` and `{{WEB}}` filled in.
fn golden(registry: &str, base: &str, web: &str) -> String {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/golden/render.json");
    let text = std::fs::read_to_string(path).expect("golden rendering");
    text.trim_end().replace("{{REGISTRY}}", registry).replace("{{BASE}}", base).replace("{{WEB}}", web)
}

#[test]
fn a_rendering_is_byte_identical_to_the_golden_file_whatever_the_entry_order() {
    let (base, web) = (OciDigest::of(b"base"), OciDigest::of(b"web"));
    let registry = "127.0.0.1:5000";
    let entries = [
        Entry {
            module: "web".into(),
            repo: format!("{registry}/ironroot/web"),
            pin: Pin::Digest { digest: web, serial: 3 },
        },
        Entry {
            module: "base".into(),
            repo: format!("{registry}/ironroot/base"),
            pin: Pin::Channel { channel: "stable".into(), digest: base, serial: 2 },
        },
    ];
    let expected = golden(registry, &base.to_string(), &web.to_string());
    let reversed: Vec<Entry> = entries.iter().rev().cloned().collect();
    for order in [&entries[..], &reversed[..]] {
        let state = desired(0, Some("role".into()), render(order), false);
        assert_eq!(serde_json::to_string(&state).unwrap(), expected);
    }
}
