//! The agent's boot pipeline against real peers on loopback: the distribution registry, the
//! reference plane over mTLS, real mounts (EROFS + overlayfs) in a private mount namespace.
//! The host kernel has no fs-verity, so these boots run with `ironroot.verity=optional` and the
//! record says `verity: false`; kernel enforcement is tested in the QEMU tier.

#![allow(clippy::unwrap_used, clippy::expect_used, reason = "tests stop loudly on a failed setup step")]

use ironroot_tests::lab::{Lab, compare_trees, files_under, objects_in};

fn blob_gets(log: &str) -> usize {
    log.lines().filter(|l| l.contains("\"GET /v2/") && l.contains("/blobs/")).count()
}

fn registry_requests(log: &str) -> usize {
    log.lines().filter(|l| l.contains("\"GET /v2/") || l.contains("\"HEAD /v2/")).count()
}

fn enrollments(lab: &Lab) -> usize {
    lab.plane.journal("enroll.accepted").len()
}

#[test]
fn full_pipeline_mounts_the_signed_root_and_a_warm_boot_fetches_and_enrolls_nothing() {
    let lab = Lab::start();
    let node =
        lab.node_root(&format!("ironroot.token={} ironroot.node=n1 ironroot.store=dir:/persist", lab.token("n1")));

    let first = node.boot(&[]);
    let record = first.record();
    assert_eq!(record["store"]["kind"], "dir");
    assert_eq!(record["store"]["verity"], false, "the host kernel has no fs-verity");
    assert_eq!(record["store"]["insecure"], true);
    assert_eq!(record["root"]["verity"], false);
    assert!(first.stderr.contains("without fs-verity"), "the boot says it runs without verity:\n{}", first.stderr);
    assert_eq!(record["reused_certificate"], false);
    assert_eq!(record["modules"][0]["serial"], 5);
    assert_eq!(record["identity"]["values"]["node"]["source"], "cmdline");
    assert_eq!(record["identity"]["values"]["token"]["value"], "<redacted>");
    for phase in ["discover", "store", "enroll", "fetch", "verify", "mount"] {
        assert!(record["phases_ms"][phase].is_u64(), "timing for {phase}");
    }
    let on_disk: serde_json::Value =
        serde_json::from_slice(&std::fs::read(node.path().join("run/ironroot/boot.json")).unwrap()).unwrap();
    assert_eq!(on_disk, record, "boot.json is what the agent printed");
    let compared = compare_trees(&lab.tree, &first.sysroot());
    assert!(compared > 20, "compared {compared} entries");
    // The root is writable (upper on tmpfs) and writes do not reach the store.
    std::fs::write(first.sysroot().join("etc/written-at-boot"), b"x").expect("write through the overlay");
    let key_mode = std::fs::metadata(node.path().join("persist/ironroot/node.key")).unwrap();
    assert_eq!(std::os::unix::fs::PermissionsExt::mode(&key_mode.permissions()) & 0o777, 0o600);
    drop(first);

    let log = lab.registry.settled_log();
    let (blobs, requests, enrolled) = (blob_gets(&log), registry_requests(&log), enrollments(&lab));
    assert!(blobs >= 3, "the cold boot fetched config, image and packs ({blobs} blob GETs)");
    assert_eq!(enrolled, 1);

    // Warm boot: same persist directory. The token is spent, so enrolling again would fail.
    let second = node.boot(&[]);
    let warm = second.record();
    assert_eq!(warm["reused_certificate"], true);
    assert_eq!(warm["node_id"], record["node_id"]);
    assert_eq!(warm["modules"][0]["downloaded_bytes"], 0);
    let log = lab.registry.settled_log();
    assert_eq!(registry_requests(&log), requests, "the registry saw no request from the warm boot");
    assert_eq!(enrollments(&lab), enrolled, "the plane recorded no second enrollment");
    // The writable layer lives on /persist/overlay for a disk-backed node: it survived.
    let written = second.sysroot().join("etc/written-at-boot");
    assert_eq!(std::fs::read(&written).expect("kept across boots"), b"x");
    std::fs::remove_file(&written).unwrap();
    compare_trees(&lab.tree, &second.sysroot());
}

#[test]
fn plane_down_at_start_is_retried_a_bounded_number_of_times_then_names_the_phase() {
    let lab = Lab::start();
    let node = lab.node_root("ironroot.token=irt_x ironroot.store=dir:/persist");
    // A port that was free a moment ago: nothing listens there.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    let line = std::fs::read_to_string(node.path().join("proc/cmdline")).unwrap();
    node.set_cmdline(&line.replace(&lab.plane.addr, &closed.to_string()));
    let b = node.boot(&[]);
    assert_eq!(b.code, 21, "enroll exit code:\n{}", b.stderr);
    assert!(b.stderr.contains("boot failed in phase enroll"), "{}", b.stderr);
    assert!(b.stderr.contains("reaching the plane"), "{}", b.stderr);
    assert_eq!(b.stderr.matches("enrollment failed; retrying").count(), 2, "3 tries, 2 waits:\n{}", b.stderr);
    assert!(b.mounts().iter().all(|m| !m.ends_with("sysroot")), "nothing mounted");
}

#[test]
fn a_refused_token_is_not_retried() {
    let lab = Lab::start();
    let node = lab.node_root("ironroot.token=irt_not_a_token ironroot.node=n5 ironroot.store=dir:/persist");
    let b = node.boot(&["--retries", "5"]);
    assert_eq!(b.code, 21, "enroll exit:\n{}", b.stderr);
    assert!(b.stderr.contains("token_unknown"), "{}", b.stderr);
    assert!(!b.stderr.contains("retrying"), "a refusal is final:\n{}", b.stderr);
    assert_eq!(lab.plane.journal("refused.enroll").len(), 1, "the plane saw exactly one attempt");
}

/// Boots `node` and asserts a refusal: exit `code`, message `needle`, no root mounted, no
/// unverified object in the store.
fn assert_refused(node: &ironroot_tests::lab::NodeRoot, code: i32, needle: &str) {
    let b = node.boot(&[]);
    assert_eq!(b.code, code, "expected exit {code}:\n{}", b.stderr);
    assert!(b.stderr.contains(needle), "expected {needle:?} in:\n{}", b.stderr);
    assert!(b.mounts().iter().all(|m| !m.ends_with("sysroot")), "nothing mounted: {:?}", b.mounts());
    let store = node.path().join("persist/ironroot/store");
    assert_eq!(objects_in(&store), 0, "no object entered the store");
    assert!(
        !std::fs::read_dir(&store).unwrap().flatten().any(|e| e.file_name().to_string_lossy().starts_with(".staging"))
    );
}

#[test]
fn registry_serving_wrong_bytes_is_refused_and_nothing_is_mounted() {
    let lab = Lab::start();
    // Corrupt the biggest blob (a pack) in the registry's own storage.
    let storage = lab.registry.dir().join("storage/docker/registry/v2/blobs");
    let mut biggest = (0, std::path::PathBuf::new());
    for e in files_under(&storage) {
        let len = std::fs::metadata(&e).map(|m| m.len()).unwrap_or(0);
        if len > biggest.0 {
            biggest = (len, e);
        }
    }
    let mut bytes = std::fs::read(&biggest.1).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0xff;
    std::fs::write(&biggest.1, bytes).unwrap();
    let node =
        lab.node_root(&format!("ironroot.token={} ironroot.node=n1 ironroot.store=dir:/persist", lab.token("n1")));
    assert_refused(&node, 11, "digest");
}

#[test]
fn a_module_signed_by_an_untrusted_key_is_refused() {
    let lab = Lab::start();
    let other = lab.publish(&lab.tree, "rogue", 9, "other-keys");
    lab.assign(&other, 9);
    let node =
        lab.node_root(&format!("ironroot.token={} ironroot.node=n1 ironroot.store=dir:/persist", lab.token("n1")));
    assert_refused(&node, 10, "signature");
}

#[test]
fn a_rollback_below_the_kept_serial_floor_is_refused() {
    let lab = Lab::start();
    let node =
        lab.node_root(&format!("ironroot.token={} ironroot.node=n1 ironroot.store=dir:/persist", lab.token("n1")));
    drop(node.boot(&[]).record());
    let floors: serde_json::Value =
        serde_json::from_slice(&std::fs::read(node.path().join("persist/ironroot/serials.json")).unwrap()).unwrap();
    assert_eq!(floors["base"], 5);
    // The plane now offers an older (validly signed) build with a matching floor of its own:
    // an operator allowed the rollback there; the node's own floor still refuses it.
    let older_tree = lab.work.path().join("older");
    std::fs::create_dir_all(&older_tree).unwrap();
    std::fs::write(older_tree.join("old"), b"old").unwrap();
    let older = lab.publish(&older_tree, "base", 3, "keys");
    let module = format!("{older},serial=3");
    lab.plane.op(&["template", "create", "base", "--allow-rollback", "--module", &module]).ok();
    let b = node.boot(&[]);
    assert_eq!(b.code, 12, "policy exit:\n{}", b.stderr);
    assert!(b.stderr.contains("rollback refused"), "{}", b.stderr);
    assert!(b.mounts().iter().all(|m| !m.ends_with("sysroot")));
}

#[test]
fn extension_modules_are_further_lower_layers_over_the_root() {
    let lab = Lab::start();
    let ext_tree = lab.work.path().join("ext");
    std::fs::create_dir_all(ext_tree.join("usr/share/ext")).unwrap();
    std::fs::write(ext_tree.join("usr/share/ext/hello"), b"from the extension\n").unwrap();
    std::fs::write(ext_tree.join("usr/share/ext/big"), vec![7u8; 100_000]).unwrap();
    let ext = lab.publish_as(&ext_tree, "tools", 2, "keys", "usr");
    let both = [format!("{},serial=5", lab.reference), format!("{ext},serial=2")];
    lab.plane.op(&["template", "create", "base", "--module", &both[0], "--module", &both[1]]).ok();
    let node =
        lab.node_root(&format!("ironroot.token={} ironroot.node=n6 ironroot.store=dir:/persist", lab.token("n6")));
    let b = node.boot(&[]);
    let record = b.record();
    assert_eq!(record["modules"].as_array().unwrap().len(), 2);
    assert_eq!(record["root"]["layers"].as_array().unwrap().len(), 2);
    let root = b.sysroot();
    assert_eq!(std::fs::read(root.join("usr/share/ext/hello")).unwrap(), b"from the extension\n");
    assert_eq!(std::fs::read(root.join("usr/share/ext/big")).unwrap(), vec![7u8; 100_000]);
    assert!(root.join("usr/bin").is_dir(), "the root module's /usr is still there under the extension");
    assert!(root.join("etc/one").exists());
}

#[test]
fn tmpfs_insecure_store_is_reported_as_insecure() {
    let lab = Lab::start();
    let node =
        lab.node_root(&format!("ironroot.token={} ironroot.node=n2 ironroot.store=tmpfs-insecure", lab.token("n2")));
    let b = node.boot(&[]);
    let record = b.record();
    assert_eq!(record["store"]["kind"], "tmpfs-insecure");
    assert_eq!(record["store"]["insecure"], true);
    assert_eq!(record["store"]["persistent"], false);
    compare_trees(&lab.tree, &b.sysroot());
}

#[test]
fn verity_required_by_default_refuses_a_store_without_it() {
    let lab = Lab::start();
    let node =
        lab.node_root(&format!("ironroot.token={} ironroot.node=n3 ironroot.store=dir:/persist", lab.token("n3")));
    let line = std::fs::read_to_string(node.path().join("proc/cmdline")).unwrap();
    node.set_cmdline(&line.replace("ironroot.verity=optional", ""));
    let b = node.boot(&[]);
    assert_eq!(b.code, 23, "store exit:\n{}", b.stderr);
    assert!(b.stderr.contains("has no fs-verity") && b.stderr.contains("ironroot.verity=require"), "{}", b.stderr);
}

#[test]
fn diskless_zram_store_is_created_formatted_and_used() {
    let lab = Lab::start();
    let node = lab.node_root(&format!("ironroot.token={} ironroot.node=n4 ironroot.store=zram", lab.token("n4")));
    let b = node.boot(&[]);
    let record = b.record();
    let device = record["store"]["device"].as_str().expect("zram device").to_owned();
    assert!(device.starts_with("/dev/zram"), "{device}");
    assert_eq!(record["store"]["kind"], "zram");
    assert!(b.mounts().iter().any(|m| m.ends_with("run/ironroot/store")), "store mounted: {:?}", b.mounts());
    compare_trees(&lab.tree, &b.sysroot());
    drop(b);
    // The namespace and its mounts are gone with the shell; give the device back.
    let id = device.trim_start_matches("/dev/zram");
    let mut removed = false;
    for _ in 0..50 {
        if std::fs::write("/sys/class/zram-control/hot_remove", id).is_ok() {
            removed = true;
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    assert!(removed, "zram{id} could not be removed");
}

#[test]
fn a_failed_mount_phase_leaves_no_partial_root_mounted() {
    let lab = Lab::start();
    let node =
        lab.node_root(&format!("ironroot.token={} ironroot.node=n8 ironroot.store=tmpfs-insecure", lab.token("n8")));
    // The target is a file: the layers mount, then the overlay cannot.
    let target = node.path().join("etc/ironroot/trust.pem");
    let b = node.boot(&["--target", target.to_str().unwrap()]);
    assert_eq!(b.code, 24, "mount exit:\n{}", b.stderr);
    assert!(b.stderr.contains("boot failed in phase mount"), "{}", b.stderr);
    let left: Vec<_> = b.mounts().into_iter().filter(|m| !m.ends_with("run/ironroot/store")).collect();
    assert!(left.is_empty(), "layers and overlay tmpfs detached again: {left:?}");
}

/// A loop device over a sparse file, detached on drop.
struct LoopDisk {
    dev: String,
    _file: tempfile::NamedTempFile,
}

impl LoopDisk {
    fn new(size: u64) -> Self {
        let file = tempfile::NamedTempFile::new().unwrap();
        file.as_file().set_len(size).unwrap();
        let out = std::process::Command::new("losetup").args(["--find", "--show"]).arg(file.path()).output().unwrap();
        assert!(out.status.success(), "losetup: {}", String::from_utf8_lossy(&out.stderr));
        Self { dev: String::from_utf8(out.stdout).unwrap().trim().to_owned(), _file: file }
    }
}

impl Drop for LoopDisk {
    fn drop(&mut self) {
        let _detached = std::process::Command::new("losetup").args(["--detach", &self.dev]).status();
    }
}

#[test]
fn a_blank_persistent_disk_is_formatted_once_and_keeps_the_store_across_boots() {
    let lab = Lab::start();
    let disk = LoopDisk::new(256 << 20);
    let node =
        lab.node_root(&format!("ironroot.token={} ironroot.node=n7 ironroot.store=disk:{}", lab.token("n7"), disk.dev));
    let first = node.boot(&[]);
    let record = first.record();
    assert_eq!((record["store"]["kind"].as_str(), record["store"]["persistent"].as_bool()), (Some("disk"), Some(true)));
    assert!(first.stderr.contains("blank disk; formatting"), "{}", first.stderr);
    assert!(first.mounts().iter().any(|m| m.ends_with("/persist")), "{:?}", first.mounts());
    compare_trees(&lab.tree, &first.sysroot());
    drop(first);
    // Nothing of the store is on the root's own /persist directory: it was on the disk.
    assert_eq!(std::fs::read_dir(node.path().join("persist")).unwrap().count(), 0);

    let requests = registry_requests(&lab.registry.settled_log());
    let second = node.boot(&[]);
    let warm = second.record();
    assert!(!second.stderr.contains("formatting"), "a disk with a filesystem is never formatted:\n{}", second.stderr);
    assert_eq!(warm["reused_certificate"], true);
    assert_eq!(warm["modules"][0]["downloaded_bytes"], 0);
    let log = lab.registry.settled_log();
    assert_eq!(registry_requests(&log), requests, "warm from the disk: no registry request");
}
