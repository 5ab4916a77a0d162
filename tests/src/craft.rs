//! Building tampered modules that are nonetheless validly signed, so each test reaches the
//! check it targets: rewrite a layer or the manifest in a layout, then sign the result.

use std::path::Path;

use ironroot_contract::manifest::{Descriptor, ImageManifest};
use ironroot_contract::{OciDigest, SimpleSigningPayload, media};
use ironroot_oci::layout::Layout;
use ironroot_oci::source::AnySource;
use ironroot_oci::{RegistryAccess, Target};

/// The manifest tagged `tag` in the layout at `dir`.
pub fn load(dir: &Path, tag: &str) -> (Layout, ImageManifest) {
    let layout = Layout::open(dir).expect("open layout");
    let desc = layout.resolve(tag).expect("index").expect("tag present");
    let bytes = std::fs::read(layout.blob_path(&desc.digest)).expect("manifest blob");
    (layout, ImageManifest::parse(&bytes).expect("manifest parses"))
}

/// Writes `manifest` into the layout under `tag`; returns its digest.
pub fn store(layout: &Layout, tag: &str, manifest: &ImageManifest) -> OciDigest {
    let bytes = manifest.to_bytes();
    let digest = layout.write_blob(&bytes).expect("write manifest");
    layout.set_tag(tag, Descriptor::new(media::OCI_MANIFEST, digest, bytes.len() as u64)).expect("tag");
    digest
}

/// Replaces layer `index` with `bytes` (descriptor digest and size follow the new bytes).
pub fn replace_layer(layout: &Layout, manifest: &mut ImageManifest, index: usize, bytes: &[u8]) {
    let digest = layout.write_blob(bytes).expect("write layer");
    manifest.layers[index].digest = digest;
    manifest.layers[index].size = bytes.len() as u64;
}

/// One raw ustar entry: a header with `name`, type `flag`, `linkname`, then `data` padded.
pub fn raw_entry(name: &[u8], flag: u8, linkname: &[u8], data: &[u8]) -> Vec<u8> {
    let mut h = [0u8; 512];
    h[..name.len()].copy_from_slice(name);
    h[100..108].copy_from_slice(b"0000444\0");
    h[108..116].copy_from_slice(b"0000000\0");
    h[116..124].copy_from_slice(b"0000000\0");
    h[124..136].copy_from_slice(format!("{:011o}\0", data.len()).as_bytes());
    h[136..148].copy_from_slice(b"00000000000\0");
    h[156] = flag;
    h[157..157 + linkname.len()].copy_from_slice(linkname);
    h[257..263].copy_from_slice(b"ustar\0");
    h[263..265].copy_from_slice(b"00");
    h[148..156].copy_from_slice(b"        ");
    let sum: u32 = h.iter().map(|&b| u32::from(b)).sum();
    h[148..156].copy_from_slice(format!("{sum:06o}\0 ").as_bytes());
    let mut out = h.to_vec();
    out.extend_from_slice(data);
    out.resize(out.len().div_ceil(512) * 512, 0);
    out
}

/// Signs `digest` at `target` with the PKCS#8 key at `key`, with a module-style payload.
pub fn sign_digest(target: &Target, digest: OciDigest, key: &Path) -> String {
    let key = ironroot_build::keys::load_signing_key(key).expect("signing key");
    let access = RegistryAccess::default();
    let payload = SimpleSigningPayload::for_module(&target.repository(), digest, "crafted", "1", 1).to_bytes();
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    rt.block_on(async {
        let src = AnySource::open(target, &access).expect("open source");
        ironroot_build::module::sign::attach_signature(target, &src, &access, digest, &payload, &key)
            .await
            .expect("sign")
    });
    format!("{}@{digest}", target.repository())
}
