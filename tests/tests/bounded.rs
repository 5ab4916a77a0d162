//! Bounded resources against hostile servers: a blob that never ends and one that arrives a
//! byte every two seconds. Each verification ends by itself with an error naming the cause,
//! and the verifier's peak memory stays far below the bytes it streamed.

#![allow(clippy::unwrap_used, clippy::expect_used, reason = "tests stop loudly on a failed setup step")]

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use ironroot_contract::manifest::ModuleManifest;
use ironroot_tests::cli::{Run, binary, build_cmd};
use ironroot_tests::http::{Misbehaviour, hostile_registry};
use ironroot_tests::tree::generate_bulk;

/// The test gives up on a verification that has not ended by itself after this long.
const GUARD: Duration = Duration::from_secs(120);

fn s(p: &Path) -> String {
    p.to_string_lossy().into_owned()
}

/// A signed module of about `bytes` in one pack, in a layout; returns (layout, pack digest, pack size, key).
fn signed_module(tmp: &Path, bytes: u64) -> (std::path::PathBuf, String, u64, String) {
    let tree = tmp.join("tree");
    generate_bulk(&tree, bytes);
    let layout = tmp.join("layout");
    let out = build_cmd(&[
        "module",
        "build",
        "--from",
        &s(&tree),
        "--name",
        "big",
        "--version",
        "1",
        "--serial",
        "1",
        "--out",
        &s(&layout),
        "--pack-size",
        &(bytes * 2).to_string(),
    ])
    .ok();
    let digest = out.rsplit('@').next().expect("digest").to_owned();
    build_cmd(&["keys", "generate", "--out", &s(&tmp.join("keys"))]).ok();
    build_cmd(&[
        "module",
        "sign",
        &format!("oci:{}@{digest}", layout.display()),
        "--key",
        &s(&tmp.join("keys/ironroot.key")),
    ])
    .ok();
    let manifest =
        std::fs::read(layout.join("blobs/sha256").join(digest.trim_start_matches("sha256:"))).expect("manifest");
    let m = ModuleManifest::parse(&manifest).expect("module");
    assert_eq!(m.packs.len(), 1);
    let pack = &m.packs[0].descriptor;
    (layout, pack.digest.to_string(), pack.size, s(&tmp.join("keys/ironroot.pub")))
}

/// Runs `ironroot-build ARGS`, sampling its peak RSS (VmHWM) until it exits. Panics unless
/// at least one sample was read: a peak of zero would pass any ceiling.
fn run_measured(args: &[&str]) -> (Run, u64, Duration) {
    let start = Instant::now();
    let mut child =
        Command::new(binary()).args(args).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().expect("spawn");
    let status_path = format!("/proc/{}/status", child.id());
    let (mut peak_kib, mut samples) = (0u64, 0usize);
    loop {
        // An exiting child's status has no VmHWM any more (its memory is gone): not a sample.
        if let Ok(status) = std::fs::read_to_string(&status_path)
            && let Some(hwm) = status.lines().find_map(|l| l.strip_prefix("VmHWM:"))
        {
            let kib: u64 = hwm.trim().strip_suffix("kB").and_then(|k| k.trim().parse().ok()).expect("VmHWM in kB");
            peak_kib = peak_kib.max(kib);
            samples += 1;
        }
        if child.try_wait().expect("wait").is_some() {
            break;
        }
        if start.elapsed() > GUARD {
            // Ends exactly the child this test started.
            child.kill().expect("kill");
            panic!("verification did not end by itself within {GUARD:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(samples > 0 && peak_kib > 0, "no memory sample of the running verifier ({samples} samples)");
    let out = child.wait_with_output().expect("output");
    (out.into(), peak_kib * 1024, start.elapsed())
}

#[test]
fn an_endless_blob_is_cut_off_at_its_declared_size() {
    let tmp = tempfile::tempdir().expect("tmp");
    let (layout, pack, size, public) = signed_module(tmp.path(), 160 << 20);
    let server = hostile_registry(layout, pack.clone(), Misbehaviour::Endless);
    let reference = format!("{}/ironroot/big:1", server.addr());
    let (run, peak, _) = run_measured(&["module", "verify", &reference, "--trust", &public]);
    run.refused(11, &format!("blob {pack}: server sent more than the declared {size} bytes"));
    eprintln!("peak RSS {} MiB while streaming {} MiB", peak >> 20, size >> 20);
    assert!(peak < 96 << 20, "peak RSS {} MiB while streaming {} MiB", peak >> 20, size >> 20);
}

#[test]
fn a_trickling_blob_hits_its_deadline() {
    let tmp = tempfile::tempdir().expect("tmp");
    let (layout, pack, size, public) = signed_module(tmp.path(), 1 << 20);
    let server = hostile_registry(layout, pack.clone(), Misbehaviour::Trickle);
    let reference = format!("{}/ironroot/big:1", server.addr());
    let (run, peak, elapsed) =
        run_measured(&["module", "verify", &reference, "--trust", &public, "--blob-deadline", "5"]);
    run.refused(13, &format!("blob {pack}: deadline of 5s passed after"));
    assert!(run.stderr.contains(&format!("of {size} bytes")), "{}", run.stderr);
    // The deadline, not the server, ended it: the server would take weeks at this rate.
    assert!(elapsed < Duration::from_secs(60), "took {elapsed:?}");
    assert!(peak < 96 << 20, "peak RSS {} MiB", peak >> 20);
}

#[test]
fn a_trickling_manifest_hits_its_deadline() {
    let tmp = tempfile::tempdir().expect("tmp");
    let (layout, _, _, public) = signed_module(tmp.path(), 1 << 20);
    let server = hostile_registry(layout, "1".into(), Misbehaviour::Trickle);
    let reference = format!("{}/ironroot/big:1", server.addr());
    let (run, _, elapsed) =
        run_measured(&["module", "verify", &reference, "--trust", &public, "--manifest-deadline", "4"]);
    run.refused(13, &format!("manifest {}/ironroot/big:1: deadline of 4s passed", server.addr()));
    assert!(elapsed < Duration::from_secs(60), "took {elapsed:?}");
}
