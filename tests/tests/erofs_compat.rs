//! The EROFS image ironroot builds is byte-identical to `mkcomposefs --min-version=1` (the C
//! reference) on the same tree, its composefs digest is the one the C tool prints, and the
//! objects our packs carry are exactly the objects the C tool puts in its digest store.

#![allow(clippy::unwrap_used, clippy::expect_used, reason = "tests stop loudly on a failed setup step")]

use std::collections::BTreeSet;
use std::path::Path;
use std::process::Command;

use ironroot_contract::manifest::ModuleManifest;
use ironroot_contract::pack::PackReader;
use ironroot_contract::verity_digest;
use ironroot_oci::layout::Layout;
use ironroot_tests::cli::build_cmd;
use ironroot_tests::tools::tool;
use ironroot_tests::tree::{TreeOptions, generate};

fn mkcomposefs(tree: &Path, image: &Path, store: &Path) -> String {
    let out = Command::new(tool("mkcomposefs"))
        .arg("--min-version=1")
        .arg(format!("--digest-store={}", store.display()))
        .arg("--print-digest")
        .arg(tree)
        .arg(image)
        .output()
        .expect("running mkcomposefs");
    assert!(out.status.success(), "mkcomposefs: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

fn build_module(tree: &Path, out: &Path, hardlinks: &str) -> (Vec<u8>, ModuleManifest, Layout) {
    let out_s = out.to_string_lossy();
    build_cmd(&[
        "module",
        "build",
        "--from",
        &tree.to_string_lossy(),
        "--name",
        "compat",
        "--version",
        "1",
        "--serial",
        "1",
        "--out",
        &out_s,
        "--mtime",
        "source",
        "--hardlinks",
        hardlinks,
    ])
    .ok();
    let layout = Layout::open(out).expect("layout");
    let desc = layout.resolve("1").expect("index").expect("tag");
    let manifest = ModuleManifest::parse(&std::fs::read(layout.blob_path(&desc.digest)).expect("manifest"))
        .expect("module manifest");
    let image = std::fs::read(layout.blob_path(&manifest.image.digest)).expect("image");
    (image, manifest, layout)
}

fn store_objects(store: &Path) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for dir in std::fs::read_dir(store).expect("store") {
        let dir = dir.expect("entry").path();
        let prefix = dir.file_name().expect("name").to_string_lossy().into_owned();
        for f in std::fs::read_dir(&dir).expect("subdir") {
            out.insert(format!("{prefix}{}", f.expect("entry").file_name().to_string_lossy()));
        }
    }
    out
}

fn pack_objects(layout: &Layout, manifest: &ModuleManifest) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for pack in &manifest.packs {
        let file = std::fs::File::open(layout.blob_path(&pack.descriptor.digest)).expect("pack");
        let mut r = PackReader::new(std::io::BufReader::new(file));
        while let Some(mut o) = r.next_object().expect("pack entry") {
            out.insert(o.digest().to_string());
            std::io::copy(&mut o, &mut std::io::sink()).expect("object");
        }
        r.check_totals(pack.objects, pack.object_bytes).expect("totals");
    }
    out
}

fn compare(hardlinks_in_tree: bool, mode: &str) {
    let tmp = tempfile::tempdir().expect("tmp");
    let tree = tmp.path().join("tree");
    generate(&tree, &TreeOptions { hardlinks: hardlinks_in_tree, devices: true });
    let c_image = tmp.path().join("c.img");
    let c_store = tmp.path().join("c-store");
    let c_digest = mkcomposefs(&tree, &c_image, &c_store);
    let (ours, manifest, layout) = build_module(&tree, &tmp.path().join("layout"), mode);
    let theirs = std::fs::read(&c_image).expect("C image");
    assert_eq!(ours.len(), theirs.len(), "image sizes differ");
    if let Some(i) = ours.iter().zip(&theirs).position(|(a, b)| a != b) {
        panic!("images differ first at byte {i} (of {})", ours.len());
    }
    assert_eq!(verity_digest(&ours).to_string(), c_digest, "composefs digest differs from mkcomposefs --print-digest");
    assert_eq!(
        pack_objects(&layout, &manifest),
        store_objects(&c_store),
        "pack objects differ from the C digest store"
    );
}

#[test]
fn image_is_byte_identical_to_mkcomposefs() {
    compare(false, "keep");
}

/// The C tool gives every name its own inode (it loses hard links). With `--hardlinks break`
/// we do the same and match it byte for byte on a tree that has hard links.
#[test]
fn with_hardlinks_broken_the_image_still_matches() {
    compare(true, "break");
}
