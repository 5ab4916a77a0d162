//! Tier 3: the image `just image` built, booted in QEMU (TCG) against the real plane and a TLS
//! registry on the host loopback. Assertions read the plane's records, then the console.

#![allow(clippy::unwrap_used, clippy::expect_used, reason = "tests stop loudly on a failed setup step")]

use std::time::Duration;

use ironroot_tests::vm::{IdentityVia, VmLab, tail};
use sha2::Digest as _;

const BOOT: Duration = Duration::from_secs(600);

fn running_with_heartbeats(view: &serde_json::Value) -> bool {
    view["state"] == "running" && view["phase"] == "ready" && view["heartbeats"].as_i64().unwrap_or(0) >= 2
}

/// The plane's QEMU provider boots the node (`node provision`: direct boot, identity over
/// fw_cfg, the guest reaching only the plane and the registry) and powers it off by its PID.
#[test]
fn a_node_the_plane_provisions_boots_direct_with_fw_cfg_identity_reaches_running_and_is_terminated() {
    let lab = VmLab::start();
    lab.provision("vm-direct", "base", &[&lab.guest_reference]);
    let view = lab.wait_for_provisioned("vm-direct", BOOT, running_with_heartbeats);

    // The plane's records: the module it assigned, the store, the boot timings, the journal.
    assert_eq!(view["module_digests"], serde_json::json!([lab.digest]), "{view}");
    assert_eq!(view["store"], "zram+verity", "{view}");
    for phase in ["discover", "store", "enroll", "fetch", "verify", "mount"] {
        assert!(view["phase_timings_ms"][phase].is_u64(), "no {phase} timing: {view}");
    }
    let handshakes = lab.plane.journal("node.handshake");
    assert!(handshakes.iter().any(|r| r.to_string().contains(r#"\"phase\":\"ready\""#)), "{handshakes:?}");
    let console = lab.plane.op(&["node", "console", "vm-direct"]).ok();
    // Plane and name are only in the fw_cfg document (no cmdline keys, no SMBIOS strings).
    let discovered = "identity discovered plane=https://10.0.2.100:";
    assert!(console.contains(discovered), "console:\n{}", tail(&console, 40));
    assert!(console.contains(r#"name: Some("vm-direct")"#), "console:\n{}", tail(&console, 40));
    assert!(console.contains("switching root"), "console:\n{}", tail(&console, 40));

    let out = lab.plane.op(&["node", "terminate", "vm-direct"]).ok();
    assert!(out.contains("powered off"), "{out}");
    let view = lab.wait_for_provisioned("vm-direct", Duration::from_secs(5), |v| v["state"] == "terminated");
    assert_eq!(view["revoked"], true, "{view}");
    assert!(lab.plane.journal("provider.exited").is_empty(), "the machine did not end by itself");
}

/// PXE under SeaBIOS with the boot files over HTTP: DHCP names `http://…/boot.ipxe`, and the
/// script's relative names resolve against it (the UEFI PXE of tests/tests/vm_hardware.rs takes
/// the same script over TFTP).
#[test]
fn a_node_boots_over_pxe_with_smbios_identity_and_reaches_running() {
    let lab = VmLab::start();
    let token = lab.token("vm-pxe", "base", &lab.guest_reference);
    let (http, port) = VmLab::serve_bundle(&lab.bundle);
    let url = format!("http://10.0.2.100:{port}/boot.ipxe");
    let port = port.to_string();
    let extra = ["--pxe-url", url.as_str(), "--forward", port.as_str()];
    let mut vm = lab.boot_with("vm-pxe", &token, IdentityVia::Smbios, false, &extra);
    let view = lab.wait_for(&mut vm, "vm-pxe", BOOT, running_with_heartbeats);
    assert_eq!(view["module_digests"], serde_json::json!([lab.digest]), "{view}");
    let console = vm.console();
    // No -kernel was given; the command line is the one boot.ipxe (over HTTP) passed.
    assert!(console.contains("bootmethod=ipxe"), "not a PXE boot:\n{}", vm.console_tail(40));
    let fetched = http.requests();
    for file in ["GET /boot.ipxe", "GET /vmlinuz", "GET /initrd.img"] {
        assert!(fetched.iter().any(|r| r == file), "{file} not over HTTP: {fetched:?}");
    }
    // Plane, token and name came from SMBIOS type 11; the CA from fw_cfg.
    assert!(console.contains("smbios_uuid: Some(\"5c3f1e0a-8d2b-4c1e-9f3a-0123456789ab\")"), "{}", vm.console_tail(40));
}

/// The `downloaded=` bytes of every "module verified" line on the console; such a line without
/// a readable count fails the test rather than dropping out of the list.
fn downloaded(console: &str) -> Vec<u64> {
    console
        .lines()
        .filter(|l| l.contains("module verified"))
        .map(|l| {
            let count = l.split("downloaded=").nth(1).and_then(|r| r.split_whitespace().next());
            count.and_then(|n| n.parse().ok()).unwrap_or_else(|| panic!("no downloaded= count in: {l}"))
        })
        .collect()
}

#[test]
fn a_disk_backed_node_keeps_its_identity_and_objects_and_boots_warm_without_downloading() {
    let lab = VmLab::start();
    let token = lab.token("vm-disk", "base", &lab.guest_reference);
    let disk = lab.work.path().join("persist.img");
    std::fs::File::create(&disk).unwrap().set_len(4 << 30).unwrap();
    let disk = disk.to_string_lossy().into_owned();
    let extra = ["--disk", disk.as_str(), "--append", "ironroot.store=disk:/dev/vda"];

    let mut vm = lab.boot_with("vm-disk", &token, IdentityVia::FwCfg, false, &extra);
    let cold = lab.wait_for(&mut vm, "vm-disk", BOOT, running_with_heartbeats);
    assert_eq!(cold["store"], "disk+verity", "{cold}");
    let console = vm.console();
    assert!(console.contains("blank disk; formatting ext4 with verity"), "{}", vm.console_tail(40));
    // One module (base), verified once, with its packs downloaded.
    let cold_downloads = downloaded(&console);
    assert!(
        matches!(cold_downloads[..], [n] if n > 100 << 20),
        "the cold boot downloads the base module once: {cold_downloads:?}\n{}",
        vm.console_tail(40)
    );
    drop(vm);

    // Same disk, same identity document (its token is spent): the node comes back as itself.
    let mut vm = lab.boot_with("vm-disk", &token, IdentityVia::FwCfg, false, &extra);
    let warm =
        lab.wait_for(&mut vm, "vm-disk", BOOT, |v| v["boot_id"] != cold["boot_id"] && running_with_heartbeats(v));
    assert_eq!(warm["id"], cold["id"], "same node id");
    assert_eq!(warm["module_digests"], serde_json::json!([lab.digest]), "{warm}");
    assert_eq!(warm["store"], "disk+verity", "{warm}");
    let console = vm.console();
    assert!(console.contains("reusing the certificate from an earlier boot"), "{}", vm.console_tail(40));
    assert_eq!(downloaded(&console), [0], "the warm boot downloads nothing: {}", vm.console_tail(40));
    assert!(!console.contains("formatting"), "the disk is not formatted again: {}", vm.console_tail(40));
    for phase in ["kernel", "modules", "network", "verify", "root"] {
        assert!(warm["phase_timings_ms"][phase].is_u64(), "no {phase} timing: {warm}");
    }
}

/// A refused boot: no root is mounted, the console says why, the plane records the phase.
fn refused(lab: &VmLab, node: &str, reference: &str, console_says: &str) {
    let token = lab.token(node, node, reference);
    let mut vm = lab.boot(node, &token, IdentityVia::FwCfg, false);
    let view = lab.wait_for(&mut vm, node, BOOT, |v| v["phase"] == "failed:verify");
    assert!(view["last_error"].as_str().is_some_and(|e| e.contains(console_says)), "{view}");
    // on_failure=reboot and -no-reboot: QEMU ends by itself.
    assert!(vm.wait_exit(Duration::from_secs(120)).is_some(), "VM still running:\n{}", vm.console_tail(20));
    let console = vm.console();
    assert!(console.contains("BOOT FAILED in phase verify"), "{}", vm.console_tail(40));
    assert!(console.contains(console_says), "{}", vm.console_tail(40));
    assert!(!console.contains("switching root"), "{}", vm.console_tail(40));
}

#[test]
fn a_module_signed_by_an_untrusted_key_is_refused() {
    let lab = VmLab::start();
    let image = ironroot_tests::vm::workspace().join("target/image/base");
    let (untrusted, _) = lab.publish(&image, "other-keys", "untrusted");
    refused(&lab, "vm-untrusted", &untrusted, "signature");
}

#[test]
fn a_module_whose_object_bytes_changed_after_signing_is_refused() {
    let lab = VmLab::start();
    let image = ironroot_tests::vm::workspace().join("target/image/base");
    let (reference, _) = lab.publish(&image, "keys", "changed");
    // Flip bytes in the middle of the first pack blob, behind the registry's back.
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(lab.registry.blob_file(reference.rsplit('@').next().unwrap())).unwrap())
            .unwrap();
    let pack = &manifest["layers"][first_pack(&manifest)];
    let path = lab.registry.blob_file(pack["digest"].as_str().unwrap());
    let mut bytes = std::fs::read(&path).unwrap();
    let mid = bytes.len() / 2;
    for b in &mut bytes[mid..mid + 64] {
        *b ^= 0xff;
    }
    std::fs::write(&path, bytes).unwrap();
    refused(&lab, "vm-changed", &reference, "digest");
}

/// The index of a module manifest's first object-pack layer.
fn first_pack(manifest: &serde_json::Value) -> usize {
    let layers = manifest["layers"].as_array().unwrap();
    layers.iter().position(|l| l["mediaType"].as_str().unwrap().contains("objects")).unwrap()
}

/// The `TAG key=value` line for `key` on the console, once a probe printed it.
fn tagged_line(console: &str, tag: &str, key: &str) -> Option<String> {
    let prefix = format!("{tag} {key}=");
    console.lines().find_map(|l| l.split_once(&prefix).map(|(_, v)| v.trim().to_owned()))
}

/// The `VERITY-PROBE key=value` line for `key` on the console, once the probe printed it.
fn probe_line(console: &str, key: &str) -> Option<String> {
    tagged_line(console, "VERITY-PROBE", key)
}

/// A second oneshot in the probe module: what the agent will rely on in the booted root to
/// apply root updates, asked the way the agent will ask it — systemd's manager over the system
/// bus (its Version property, whether it has SoftReboot, systemd >= 254) and the bus daemon
/// itself. busctl talks to the bus only (never systemd's private socket), so an answer means
/// the bus is up. `ROOT-PROBE key=value` lines on the console.
const ROOT_PROBE_SH: &str = r#"#!/bin/sh
set -u
say() { echo "ROOT-PROBE $*"; }
manager="org.freedesktop.systemd1 /org/freedesktop/systemd1 org.freedesktop.systemd1.Manager"
if version=$(busctl --system get-property $manager Version 2>&1); then
    say "version=$version"
else
    say "error=$version"
    exit 1
fi
busctl --system introspect $manager | grep -q '^\.SoftReboot ' && say "softreboot=yes" || say "softreboot=no"
say "dbus=$(systemctl is-active dbus.service)"
"#;

const ROOT_PROBE_UNIT: &str = "\
# Test module only (tests/tests/vm_boot.rs): systemd's version and the system bus, over the bus.
[Unit]
Description=ironroot test: systemd and the system bus as the agent sees them
After=ironroot-agent.service

[Service]
Type=oneshot
ExecStart=/bin/sh /usr/lib/ironroot-test/root-probe.sh
StandardOutput=journal+console
StandardError=journal+console

[Install]
WantedBy=multi-user.target
";

/// The major version in busctl's rendering of the Version property (`s "257.13-1~deb13u1"`).
fn systemd_major(property: &str) -> Option<u32> {
    let version = property.strip_prefix("s \"")?.trim_end_matches('"');
    version.split(['.', '-', '~']).next()?.parse().ok()
}

/// Adds the root probe (script, unit, enablement) to a module tree.
fn add_root_probe(tree: &std::path::Path) {
    let dir = tree.join("usr/lib/ironroot-test");
    let units = tree.join("usr/lib/systemd/system");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::create_dir_all(units.join("multi-user.target.wants")).unwrap();
    std::fs::write(dir.join("root-probe.sh"), ROOT_PROBE_SH).unwrap();
    std::fs::write(units.join("ironroot-root-probe.service"), ROOT_PROBE_UNIT).unwrap();
    std::os::unix::fs::symlink(
        "../ironroot-root-probe.service",
        units.join("multi-user.target.wants/ironroot-root-probe.service"),
    )
    .unwrap();
}

#[test]
fn busctl_versions_read_as_their_major() {
    assert_eq!(systemd_major(r#"s "257.13-1~deb13u1""#), Some(257));
    assert_eq!(systemd_major(r#"s "252.39-1~deb12u1""#), Some(252));
    assert_eq!(systemd_major(r#"s "258""#), Some(258));
    assert_eq!(systemd_major("Failed to connect to bus"), None);
}

#[test]
fn a_store_object_corrupted_after_verification_cannot_be_read_while_the_rest_of_the_root_works() {
    let lab = VmLab::start();
    // A second module: a 1 MiB + 1 byte canary (the only object of that size) and a oneshot unit
    // that corrupts the canary's object on the store's block device, then reads it again.
    // The same module carries the root probe (systemd and the system bus; this boot is the
    // cheapest place for it).
    let fixtures = ironroot_tests::vm::workspace().join("tests/fixtures/verity-probe");
    let tree = lab.work.path().join("verity-probe");
    let dir = tree.join("usr/lib/ironroot-test");
    let units = tree.join("usr/lib/systemd/system");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::create_dir_all(units.join("multi-user.target.wants")).unwrap();
    std::fs::copy(fixtures.join("verity-probe.sh"), dir.join("verity-probe.sh")).unwrap();
    std::fs::copy(fixtures.join("verity-probe.service"), units.join("ironroot-verity-probe.service")).unwrap();
    std::os::unix::fs::symlink(
        "../ironroot-verity-probe.service",
        units.join("multi-user.target.wants/ironroot-verity-probe.service"),
    )
    .unwrap();
    let mut state = 0x9e37_79b9_7f4a_7c15_u64;
    let canary: Vec<u8> = (0..(1 << 20) + 1)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state as u8
        })
        .collect();
    std::fs::write(dir.join("canary.bin"), &canary).unwrap();
    add_root_probe(&tree);
    let (probe, probe_digest) = lab.extension(&tree, "verity-probe");

    let token = lab.token_for("vm-verity", "verity", &[&lab.guest_reference, &probe]);
    let mut vm = lab.boot("vm-verity", &token, IdentityVia::FwCfg, false);
    let view = lab.wait_for(&mut vm, "vm-verity", BOOT, |v| v["state"] == "running");
    assert_eq!(view["store"], "zram+verity", "{view}");
    let mut digests = view["module_digests"].as_array().unwrap().clone();
    digests.sort_by_key(|d| d.to_string());
    let mut expected = vec![serde_json::json!(lab.digest), serde_json::json!(probe_digest)];
    expected.sort_by_key(|d| d.to_string());
    assert_eq!(digests, expected, "{view}");

    // The probes run once the agent service started; wait for both verdicts on the console.
    let deadline = std::time::Instant::now() + Duration::from_secs(300);
    let console = loop {
        let console = vm.console();
        let verity = probe_line(&console, "kernel").is_some() || probe_line(&console, "error").is_some();
        let root = tagged_line(&console, "ROOT-PROBE", "dbus").is_some()
            || tagged_line(&console, "ROOT-PROBE", "error").is_some();
        if verity && root {
            break console;
        }
        assert!(std::time::Instant::now() < deadline, "no probe verdict:\n{}", vm.console_tail(60));
        std::thread::sleep(Duration::from_secs(2));
    };
    eprintln!("{}", console.lines().filter(|l| l.contains("-PROBE ")).collect::<Vec<_>>().join("\n"));
    // The booted root: systemd >= 254 (SoftReboot, for root updates) answering on the system bus.
    let root = |key| tagged_line(&console, "ROOT-PROBE", key);
    assert_eq!(root("error"), None, "{}", vm.console_tail(60));
    let version = root("version").unwrap();
    assert!(systemd_major(&version).is_some_and(|major| major >= 254), "systemd {version} has no SoftReboot");
    assert_eq!(root("softreboot").as_deref(), Some("yes"), "{}", vm.console_tail(60));
    assert_eq!(root("dbus").as_deref(), Some("active"), "{}", vm.console_tail(60));
    assert_eq!(probe_line(&console, "error"), None, "{}", vm.console_tail(60));
    let before = probe_line(&console, "before").unwrap();
    let expected_sum: String = sha2::Sha256::digest(&canary).iter().map(|b| format!("{b:02x}")).collect();
    assert_eq!(before, expected_sum, "the canary read fine before the corruption");
    assert_eq!(probe_line(&console, "canary").as_deref(), Some("Input/output error"), "{}", vm.console_tail(60));
    assert_eq!(probe_line(&console, "others").as_deref(), Some("ok"), "{}", vm.console_tail(60));
    let kernel = probe_line(&console, "kernel").unwrap();
    assert!(kernel.contains("verity") && kernel.to_lowercase().contains("corrupt"), "kernel said: {kernel}");

    // The node keeps running: the agent on the same root still heartbeats to the plane.
    let beats = lab.plane.op(&["node", "show", "vm-verity", "--json"]).ok();
    let beats = serde_json::from_str::<serde_json::Value>(&beats).unwrap()["heartbeats"].as_i64().unwrap();
    lab.wait_for(&mut vm, "vm-verity", Duration::from_secs(120), |v| {
        v["state"] == "running" && v["heartbeats"].as_i64().unwrap_or(0) >= beats + 2
    });
}

/// A copy of the base module's layout in which one object's bytes differ from its name while
/// every digest above it (pack blob, manifest) is recomputed: only the object's own fs-verity
/// digest can tell. The caller signs it (validly) with the lab key.
fn with_a_changed_object(lab: &VmLab) -> std::path::PathBuf {
    let dir = lab.work.path().join("changed-object");
    let image = ironroot_tests::vm::workspace().join("target/image/base");
    assert!(std::process::Command::new("cp").arg("-a").arg(&image).arg(&dir).status().unwrap().success());
    let blob = |digest: &str| dir.join("blobs/sha256").join(digest.trim_start_matches("sha256:"));
    let write_blob = |bytes: &[u8]| {
        let hex: String = sha2::Sha256::digest(bytes).iter().map(|b| format!("{b:02x}")).collect();
        std::fs::write(dir.join("blobs/sha256").join(&hex), bytes).unwrap();
        format!("sha256:{hex}")
    };
    let mut index: serde_json::Value = serde_json::from_slice(&std::fs::read(dir.join("index.json")).unwrap()).unwrap();
    let mut manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(blob(index["manifests"][0]["digest"].as_str().unwrap())).unwrap())
            .unwrap();
    let at = first_pack(&manifest);
    let layer = &mut manifest["layers"][at];
    let mut pack = std::fs::read(blob(layer["digest"].as_str().unwrap())).unwrap();
    // Walk the ustar entries to the first object with bytes; change its first byte.
    let mut at = 0;
    loop {
        let size = u64::from_str_radix(std::str::from_utf8(&pack[at + 124..at + 135]).unwrap(), 8).unwrap() as usize;
        if size > 0 {
            pack[at + 512] ^= 0xff;
            break;
        }
        at += 512;
    }
    layer["digest"] = write_blob(&pack).into();
    let manifest_bytes = serde_json::to_vec(&manifest).unwrap();
    index["manifests"][0]["digest"] = write_blob(&manifest_bytes).into();
    index["manifests"][0]["size"] = manifest_bytes.len().into();
    std::fs::write(dir.join("index.json"), serde_json::to_vec(&index).unwrap()).unwrap();
    dir
}

#[test]
fn a_validly_signed_module_whose_object_differs_from_its_name_is_refused_by_the_kernel_measurement() {
    let lab = VmLab::start();
    let layout = with_a_changed_object(&lab);
    let (reference, _) = lab.publish(&layout, "keys", "changed-object");
    // The guest's store is sealed: the kernel measures each staged object (the agent does not
    // hash it a second time) and the mismatch is refused before anything is mounted.
    refused(&lab, "vm-changed-object", &reference, "content has fs-verity digest");
}
