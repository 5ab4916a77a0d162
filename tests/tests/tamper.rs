//! The tamper matrix: every way a module can be wrong is refused by `module verify` with the
//! documented exit code and a message that names the failure. Tampered variants are built in
//! an OCI layout (re-signed where the case needs a valid signature to reach its check), pushed
//! to a real registry, and verified from there.

#![allow(clippy::unwrap_used, clippy::expect_used, reason = "tests stop loudly on a failed setup step")]

use std::path::{Path, PathBuf};

use base64::Engine as _;
use ironroot_contract::manifest::{Descriptor, ImageManifest};
use ironroot_contract::pack::PackWriter;
use ironroot_contract::{OciDigest, VerityDigest, media, verity_digest};
use ironroot_oci::Target;
use ironroot_tests::cli::{Run, build_cmd};
use ironroot_tests::craft;
use ironroot_tests::registry::TestRegistry;

const SIGNATURE: i32 = 10;
const CONTENT: i32 = 11;
const POLICY: i32 = 12;

struct Fixture {
    reg: TestRegistry,
    tmp: tempfile::TempDir,
    layout: PathBuf,
    digest: OciDigest,
}

fn s(p: &Path) -> String {
    p.to_string_lossy().into_owned()
}

impl Fixture {
    /// A small module built into a layout, with an Ed25519 key pair; not yet signed.
    fn new() -> Self {
        let reg = TestRegistry::start();
        let tmp = tempfile::tempdir().expect("tmp");
        let tree = tmp.path().join("tree");
        std::fs::create_dir_all(tree.join("etc")).expect("mkdir");
        for i in 0..5u8 {
            std::fs::write(tree.join(format!("etc/file{i}")), vec![b'a' + i; 1000 * (i as usize + 1)]).expect("write");
        }
        std::fs::write(tree.join("etc/small"), b"tiny").expect("write");
        let layout = tmp.path().join("layout");
        let out = build_cmd(&[
            "module",
            "build",
            "--from",
            &s(&tree),
            "--name",
            "base",
            "--version",
            "1",
            "--serial",
            "7",
            "--out",
            &s(&layout),
        ])
        .ok();
        let digest = out.rsplit('@').next().expect("digest").parse().expect("digest parses");
        for (dir, alg) in [("keys", "ed25519"), ("other", "ed25519"), ("p256", "p256")] {
            build_cmd(&["keys", "generate", "--out", &s(&tmp.path().join(dir)), "--algorithm", alg]).ok();
        }
        Self { reg, tmp, layout, digest }
    }

    fn key(&self, dir: &str) -> PathBuf {
        self.tmp.path().join(dir).join("ironroot.key")
    }

    fn public(&self, dir: &str) -> String {
        s(&self.tmp.path().join(dir).join("ironroot.pub"))
    }

    fn layout_target(&self) -> Target {
        Target::Layout { dir: self.layout.clone(), tag: None, digest: None }
    }

    /// Signs `digest` in the layout with key `dir` (a module payload naming that digest).
    fn sign(&self, digest: OciDigest, dir: &str) {
        build_cmd(&["module", "sign", &format!("oci:{}@{digest}", self.layout.display()), "--key", &s(&self.key(dir))])
            .ok();
    }

    /// Signs arbitrary content (a crafted manifest or index) in the layout.
    fn sign_raw(&self, digest: OciDigest) {
        craft::sign_digest(&self.layout_target(), digest, &self.key("keys"));
    }

    /// Pushes layout tag `tag` (and its signature) to the registry; returns `REPO:tag`.
    fn push(&self, tag: &str) -> String {
        let repo = format!("{}/ironroot/tamper", self.reg.host());
        build_cmd(&["module", "push", &format!("oci:{}:{tag}", self.layout.display()), &format!("{repo}:{tag}")]).ok();
        format!("{repo}:{tag}")
    }

    fn verify(&self, reference: &str, extra: &[&str]) -> Run {
        let public = self.public("keys");
        let mut args = vec!["module", "verify", reference, "--trust", &public];
        args.extend_from_slice(extra);
        build_cmd(&args)
    }

    fn manifest(&self) -> ImageManifest {
        craft::load(&self.layout, "1").1
    }

    fn sig_manifest(&self, digest: OciDigest) -> ImageManifest {
        craft::load(&self.layout, &digest.signature_tag()).1
    }

    fn store_sig(&self, digest: OciDigest, m: &ImageManifest) {
        let layout = ironroot_oci::layout::Layout::open(&self.layout).expect("layout");
        craft::store(&layout, &digest.signature_tag(), m);
    }

    /// Changes the bytes of blob `digest` on the registry's disk, behind the registry's back.
    fn edit_blob(&self, digest: OciDigest, edit: impl FnOnce(&mut Vec<u8>)) {
        let file = self.reg.blob_file(&digest.to_string());
        let mut bytes = std::fs::read(&file).expect("registry blob");
        edit(&mut bytes);
        std::fs::write(&file, bytes).expect("corrupt");
    }

    /// Replaces the first pack with `pack`, makes its annotations and the config's totals say
    /// `objects`/`bytes` (so the pack reader is what judges it), stores the manifest under tag
    /// "1", signs it and pushes; returns the registry reference.
    fn with_pack(&self, pack: &[u8], objects: u64, bytes: u64) -> String {
        let layout = ironroot_oci::layout::Layout::open(&self.layout).expect("layout");
        let mut m = self.manifest();
        m.layers.truncate(2);
        craft::replace_layer(&layout, &mut m, 1, pack);
        m.layers[1].annotations.insert(media::ANNOTATION_PACK_OBJECTS.into(), objects.to_string());
        m.layers[1].annotations.insert(media::ANNOTATION_PACK_BYTES.into(), bytes.to_string());
        let config_path = layout.blob_path(&m.config.digest);
        let mut config: serde_json::Value =
            serde_json::from_slice(&std::fs::read(config_path).expect("config")).expect("json");
        config["objects"] = objects.into();
        config["objectBytes"] = bytes.into();
        let config_bytes = serde_json::to_vec(&config).expect("json");
        m.config.digest = layout.write_blob(&config_bytes).expect("config");
        m.config.size = config_bytes.len() as u64;
        let digest = craft::store(&layout, "1", &m);
        self.sign(digest, "keys");
        self.push("1")
    }
}

#[test]
fn an_untampered_module_verifies() {
    let f = Fixture::new();
    f.sign(f.digest, "keys");
    f.verify(&f.push("1"), &[]).ok();
}

#[test]
fn flipped_signature_byte() {
    let f = Fixture::new();
    f.sign(f.digest, "keys");
    let mut sig = f.sig_manifest(f.digest);
    let ann = sig.layers[0].annotations.get_mut(media::COSIGN_SIGNATURE_ANNOTATION).expect("annotation");
    let mut raw = base64::engine::general_purpose::STANDARD.decode(&*ann).expect("base64");
    raw[10] ^= 0x01;
    *ann = base64::engine::general_purpose::STANDARD.encode(raw);
    f.store_sig(f.digest, &sig);
    f.verify(&f.push("1"), &[]).refused(SIGNATURE, "does not verify");
}

#[test]
fn edited_payload() {
    let f = Fixture::new();
    f.sign(f.digest, "keys");
    let layout = ironroot_oci::layout::Layout::open(&f.layout).expect("layout");
    let mut sig = f.sig_manifest(f.digest);
    let payload = std::fs::read(layout.blob_path(&sig.layers[0].digest)).expect("payload");
    let edited = String::from_utf8(payload)
        .expect("utf8")
        .replace("\"io.ironroot.module.serial\":7", "\"io.ironroot.module.serial\":9");
    craft::replace_layer(&layout, &mut sig, 0, edited.as_bytes());
    f.store_sig(f.digest, &sig);
    f.verify(&f.push("1"), &[]).refused(SIGNATURE, "does not verify");
}

#[test]
fn signature_copied_onto_other_content() {
    let f = Fixture::new();
    f.sign(f.digest, "keys");
    let layout = ironroot_oci::layout::Layout::open(&f.layout).expect("layout");
    let mut other = f.manifest();
    other.annotations.insert("org.example.note".into(), "other content".into());
    let other_digest = craft::store(&layout, "other", &other);
    f.store_sig(other_digest, &f.sig_manifest(f.digest));
    f.verify(&f.push("other"), &[]).refused(SIGNATURE, "copied from other content");
}

#[test]
fn missing_signature() {
    let f = Fixture::new();
    f.verify(&f.push("1"), &[]).refused(SIGNATURE, "no signature found");
}

#[test]
fn wrong_key() {
    let f = Fixture::new();
    f.sign(f.digest, "other");
    f.verify(&f.push("1"), &[]).refused(SIGNATURE, "does not verify with ed25519 key");
}

#[test]
fn wrong_key_type() {
    let f = Fixture::new();
    // A P-256 signature checked against an Ed25519 trust key.
    f.sign(f.digest, "p256");
    let reference = f.push("1");
    f.verify(&reference, &[]).refused(SIGNATURE, "malformed for ed25519");
    // A trust key of a type that is never accepted.
    let rsa = f.tmp.path().join("rsa.pub");
    let key = f.tmp.path().join("rsa.key");
    let ok = std::process::Command::new(ironroot_tests::tools::tool("openssl"))
        .args(["genpkey", "-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048", "-out"])
        .arg(&key)
        .stderr(std::process::Stdio::null())
        .status()
        .expect("openssl")
        .success()
        && std::process::Command::new(ironroot_tests::tools::tool("openssl"))
            .args(["pkey", "-pubout", "-in"])
            .arg(&key)
            .arg("-out")
            .arg(&rsa)
            .status()
            .expect("openssl")
            .success();
    assert!(ok, "openssl could not make an RSA key");
    build_cmd(&["module", "verify", &reference, "--trust", &s(&rsa)]).refused(1, "key type RSA is not accepted");
}

#[test]
fn layer_corrupted_on_the_registry_disk() {
    let f = Fixture::new();
    f.sign(f.digest, "keys");
    let reference = f.push("1");
    let pack = f.manifest().layers[1].digest;
    f.edit_blob(pack, |bytes| bytes[600] ^= 0xff);
    let store = f.tmp.path().join("store");
    f.verify(&reference, &["--store", &s(&store)]).refused(CONTENT, &format!("pack {pack}: pack entry "));
    assert_eq!(objects_in(&store), 0, "objects from a refused pack entered the store");

    let image = f.manifest().layers[0].digest;
    f.edit_blob(image, |bytes| bytes[1100] ^= 0xff);
    f.verify(&reference, &[]).refused(CONTENT, &format!("blob {image}: content has digest"));
}

#[test]
fn pack_bytes_the_pack_reader_does_not_judge_are_caught_by_the_blob_digest() {
    let f = Fixture::new();
    f.sign(f.digest, "keys");
    let reference = f.push("1");
    let pack = f.manifest().layers[1].digest;
    // The first entry's mtime, with its header checksum made right again: a well-formed pack
    // with the same objects, but not the blob that was signed.
    f.edit_blob(pack, |bytes| {
        bytes[136..148].copy_from_slice(b"00000000001\0");
        bytes[148..156].copy_from_slice(b"        ");
        let sum: u32 = bytes[..512].iter().map(|&b| u32::from(b)).sum();
        bytes[148..156].copy_from_slice(format!("{sum:06o}\0 ").as_bytes());
    });
    let store = f.tmp.path().join("store");
    f.verify(&reference, &["--store", &s(&store)]).refused(CONTENT, &format!("blob {pack}: content has digest"));
    assert_eq!(objects_in(&store), 0, "objects from a refused pack entered the store");
}

/// Object files in a store, staging directories included.
fn objects_in(store: &Path) -> usize {
    fn walk(p: &Path) -> usize {
        std::fs::read_dir(p).map_or(0, |rd| {
            rd.map(|e| e.expect("entry").path())
                .map(|p| {
                    if p.is_dir() {
                        walk(&p)
                    } else {
                        usize::from(p.parent().and_then(|d| d.file_name()) != Some("images".as_ref()))
                    }
                })
                .sum()
        })
    }
    walk(store)
}

#[test]
fn object_whose_bytes_do_not_match_its_name() {
    let f = Fixture::new();
    let liar = verity_digest(b"what the name promises");
    let mut w = PackWriter::new(Vec::new());
    let data = b"what the pack delivers instead";
    w.add(liar, data.len() as u64, &mut &data[..]).expect("pack");
    let (pack, n, bytes) = w.finish().expect("pack");
    let store = f.tmp.path().join("store");
    let reference = f.with_pack(&pack, n, bytes);
    f.verify(&reference, &["--store", &s(&store)])
        .refused(CONTENT, &format!("pack entry {liar}: content has fs-verity digest"));
    assert_eq!(objects_in(&store), 0, "an object from a refused pack entered the store");
}

#[test]
fn every_bad_pack_entry_kind() {
    let f = Fixture::new();
    let good = b"an honest object of some length";
    let d = verity_digest(good);
    let name = d.hex();
    let end = vec![0u8; 1024];
    let entry = |n: &[u8], flag: u8, link: &[u8], data: &[u8]| craft::raw_entry(n, flag, link, data);
    let cases: Vec<(&str, Vec<u8>, String)> = vec![
        (
            "symlink",
            [entry(name.as_bytes(), b'2', b"/etc/shadow", b""), end.clone()].concat(),
            format!("pack entry {name:?} is a symbolic link"),
        ),
        (
            "hardlink",
            [entry(name.as_bytes(), b'1', b"other", b""), end.clone()].concat(),
            format!("pack entry {name:?} is a hard link"),
        ),
        ("char device", [entry(name.as_bytes(), b'3', b"", b""), end.clone()].concat(), "is a character device".into()),
        ("block device", [entry(name.as_bytes(), b'4', b"", b""), end.clone()].concat(), "is a block device".into()),
        ("directory", [entry(name.as_bytes(), b'5', b"", b""), end.clone()].concat(), "is a directory".into()),
        ("fifo", [entry(name.as_bytes(), b'6', b"", b""), end.clone()].concat(), "is a fifo".into()),
        (
            "slash",
            [entry(b"/", b'0', b"", good), end.clone()].concat(),
            "pack entry \"/\" is not named by an fs-verity digest".into(),
        ),
        (
            "dotdot",
            [entry(b"../../etc/passwd", b'0', b"", good), end.clone()].concat(),
            "\"../../etc/passwd\" is not named by an fs-verity digest".into(),
        ),
        (
            "duplicate",
            [entry(name.as_bytes(), b'0', b"", good), entry(name.as_bytes(), b'0', b"", good), end.clone()].concat(),
            format!("pack entry {name} appears twice"),
        ),
        (
            "size disagrees",
            {
                let mut e = entry(name.as_bytes(), b'0', b"", good);
                e.truncate(512 + 10);
                e
            },
            format!("pack entry {name} is truncated"),
        ),
        (
            "trailing garbage",
            [entry(name.as_bytes(), b'0', b"", good), end.clone(), b"garbage".to_vec()].concat(),
            "trailing garbage".into(),
        ),
    ];
    for (label, pack, needle) in cases {
        let run = f.verify(&f.with_pack(&pack, 1, good.len() as u64), &[]);
        assert_eq!(run.code, CONTENT, "{label}: {}", run.stderr);
        assert!(run.stderr.contains(&needle), "{label}: expected {needle:?} in {}", run.stderr);
    }
}

#[test]
fn declared_size_differs_from_actual() {
    let f = Fixture::new();
    let layout = ironroot_oci::layout::Layout::open(&f.layout).expect("layout");
    let mut m = f.manifest();
    m.layers[1].size += 1;
    let digest = craft::store(&layout, "1", &m);
    f.sign(digest, "keys");
    let declared = m.layers[1].size;
    // From the layout (the registry may refuse such a manifest; the verifier must too).
    let run = f.verify(&format!("oci:{}:1", f.layout.display()), &[]);
    run.refused(CONTENT, &format!("server declares {} bytes, the descriptor {declared}", declared - 1));
}

#[test]
fn declared_size_over_the_cap_is_refused_before_download() {
    let f = Fixture::new();
    f.sign(f.digest, "keys");
    let reference = f.push("1");
    let m = f.manifest();
    let (image, pack) = (&m.layers[0], &m.layers[1]);
    assert!(pack.size > image.size, "fixture: the pack must be the largest blob");
    let cap = image.size.to_string();
    let before = f.reg.settled_log().len();
    f.verify(&reference, &["--max-blob-size", &cap]).refused(
        POLICY,
        &format!("blob {} declares {} bytes, over the {cap}-byte cap (not downloaded)", pack.digest, pack.size),
    );
    let during = f.reg.settled_log()[before..].to_owned();
    assert!(
        during.contains(&format!("GET /v2/ironroot/tamper/manifests/{}", f.digest.signature_tag())),
        "registry access log not captured:\n{during}"
    );
    assert!(
        !during.contains(&format!("GET /v2/ironroot/tamper/blobs/{}", pack.digest)),
        "the over-cap blob was requested:\n{during}"
    );
}

#[test]
fn descriptor_with_urls() {
    let f = Fixture::new();
    let layout = ironroot_oci::layout::Layout::open(&f.layout).expect("layout");
    let mut m = f.manifest();
    m.layers[1].urls = Some(vec!["http://127.0.0.1:1/elsewhere".into()]);
    let digest = craft::store(&layout, "1", &m);
    f.sign_raw(digest);
    let run = f.verify(&format!("oci:{}:1", f.layout.display()), &[]);
    run.refused(POLICY, &format!("descriptor {} carries urls", m.layers[1].digest));
}

#[test]
fn image_index() {
    let f = Fixture::new();
    let layout = ironroot_oci::layout::Layout::open(&f.layout).expect("layout");
    let manifest_bytes = std::fs::read(layout.blob_path(&f.digest)).expect("manifest");
    let index = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": media::OCI_INDEX,
        "manifests": [Descriptor::new(media::OCI_MANIFEST, f.digest, manifest_bytes.len() as u64)],
    })
    .to_string();
    let digest = layout.write_blob(index.as_bytes()).expect("index");
    layout.set_tag("idx", Descriptor::new(media::OCI_INDEX, digest, index.len() as u64)).expect("tag");
    f.sign_raw(digest);
    f.verify(&format!("oci:{}:idx", f.layout.display()), &[]).refused(POLICY, "resolves to an image index");
}

#[test]
fn serial_below_the_floor() {
    let f = Fixture::new();
    f.sign(f.digest, "keys");
    let reference = f.push("1");
    f.verify(&reference, &["--min-serial", "7"]).ok();
    f.verify(&reference, &["--min-serial", "8"])
        .refused(POLICY, "module base serial 7 is below the minimum 8 (rollback refused)");
}

#[test]
fn unknown_object_names_fail_completeness() {
    // A pack that verifies but lacks the objects the image references: the store is incomplete.
    let f = Fixture::new();
    let extra = b"an object no image references";
    let d: VerityDigest = verity_digest(extra);
    let mut w = PackWriter::new(Vec::new());
    w.add(d, extra.len() as u64, &mut &extra[..]).expect("pack");
    let (pack, n, bytes) = w.finish().expect("pack");
    let reference = f.with_pack(&pack, n, bytes);
    f.verify(&reference, &[]).refused(CONTENT, "store lacks 5 objects the image references");
}
