//! Registry-supplied JSON: image and module manifests, module configs, signature payloads.
#![no_main]

use ironroot_contract::manifest::{ImageManifest, ModuleManifest};
use ironroot_contract::{ModuleConfig, SimpleSigningPayload};

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    if let Ok(m) = ImageManifest::parse(data) {
        // Whatever parsed must serialise again.
        assert!(serde_json::to_vec(&m).is_ok());
    }
    let _module = ModuleManifest::parse(data);
    if let Ok(c) = ModuleConfig::parse(data) {
        assert!(!c.name.is_empty());
    }
    let _payload = SimpleSigningPayload::parse(data);
});
