//! The plane's machine provider (`serve --provider`) against real peers: the `ironroot-plane`
//! binary on 127.0.0.1:0, its operator CLI, enrollment over real TLS with the token it made, and
//! the QEMU `just deps` installs (its version check, our command line's options, its exit
//! journaled). Booting a real node this way is `just demo`'s check (it needs `just image` and
//! minutes of TCG; the VM tier's boots go through qemu/boot.sh, the same command line shape).

#![allow(clippy::unwrap_used, clippy::expect_used, reason = "tests stop loudly on a failed setup step")]

use std::os::unix::fs::PermissionsExt as _;
use std::path::Path;
use std::time::{Duration, Instant};

use ironroot_tests::plane::{NodeKey, TestPlane, call, enroll, enroll_raw};
use serde_json::{Value, json};

/// A bundle with the three files a direct boot reads (the recorder runs nothing; QEMU refuses
/// the empty kernel once it has parsed every option).
fn bundle(dir: &Path) -> String {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(dir.join("vmlinuz"), b"").unwrap();
    std::fs::write(dir.join("initrd.img"), b"").unwrap();
    std::fs::write(dir.join("cmdline"), "console=ttyS0 panic=-1 oops=panic ironroot.trust=/etc/ironroot/trust.pem\n")
        .unwrap();
    dir.to_string_lossy().into_owned()
}

/// A plane with `--provider KIND` over a fake bundle, forwarding registry port 5999, and a
/// template `base`.
fn plane(kind: &str, work: &Path) -> TestPlane {
    let bundle = bundle(&work.join("bundle"));
    let p = TestPlane::start(&["--provider", kind, "--bundle", &bundle, "--machine-forward", "5999"]);
    let digest = format!("sha256:{}", "ab".repeat(32));
    p.op(&["template", "create", "base", "--module", &format!("10.0.2.100:5999/ironroot/base@{digest},serial=1")]).ok();
    p
}

/// Every journal record, oldest first.
async fn journal(p: &TestPlane) -> Vec<Value> {
    let (status, records) = call(&p.operator_client(), p, "GET", "/v1/operator/audit?limit=10000", None).await;
    assert_eq!(status, 200, "{records}");
    records.as_array().unwrap().clone()
}

fn of_kind<'a>(records: &'a [Value], kind: &str) -> Vec<&'a Value> {
    records.iter().filter(|r| r["kind"] == kind).collect()
}

fn show(p: &TestPlane, node: &str) -> Value {
    serde_json::from_str(&p.op(&["node", "show", node, "--json"]).ok()).unwrap()
}

fn after<'a>(argv: &'a [Value], flag: &str) -> Vec<&'a str> {
    argv.windows(2).filter(|w| w[0] == flag).filter_map(|w| w[1].as_str()).collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn the_recorder_journals_the_exact_qemu_command_and_makes_a_single_use_token() {
    let work = tempfile::tempdir().unwrap();
    let p = plane("recorder", work.path());
    let port = p.addr().rsplit(':').next().unwrap().to_owned();
    let out = p.op(&["node", "provision", "rec-1", "--template", "base", "--memory", "1536", "--disk", "2G"]).ok();
    assert!(out.contains("recorded"), "{out}");
    let node = show(&p, "rec-1");
    assert_eq!((node["state"].as_str(), node["revoked"].as_bool()), (Some("provisioning"), Some(false)), "{node}");
    let id = node["id"].as_str().unwrap().to_owned();

    let records = journal(&p).await;
    let started = of_kind(&records, "provider.start");
    assert_eq!(started.len(), 1, "{records:#?}");
    assert_eq!((started[0]["subject"].as_str(), &started[0]["data"]["recorded"]), (Some(id.as_str()), &json!(true)));
    let argv = started[0]["data"]["argv"].as_array().unwrap();
    let dir = p.dir().join("machines/rec-1");
    let d = |f: &str| dir.join(f).to_string_lossy().into_owned();
    assert_eq!(argv[..4], [json!("timeout"), json!("--kill-after=10s"), json!("28800s"), json!("qemu-system-x86_64")]);
    assert_eq!(after(argv, "-accel"), ["tcg"]);
    assert_eq!(after(argv, "-m"), ["1536"]);
    assert!(argv.contains(&json!("-no-reboot")), "{argv:?}");
    assert_eq!(after(argv, "-fw_cfg"), [format!("name=opt/ironroot/identity,file={}", d("identity.json"))]);
    assert_eq!(after(argv, "-serial"), [format!("file:{}", d("console.log"))]);
    assert_eq!(after(argv, "-drive"), [format!("file={},if=virtio,format=raw", d("disk.img"))]);
    assert_eq!(
        after(argv, "-append"),
        ["console=ttyS0 panic=-1 oops=panic ironroot.trust=/etc/ironroot/trust.pem ironroot.store=disk:/dev/vda"]
    );
    // slirp with restrict=on: the guest reaches the plane and the registry, nothing else.
    let fwd = |p: &str| format!("guestfwd=tcp:10.0.2.100:{p}-cmd:nc 127.0.0.1 {p}");
    assert_eq!(after(argv, "-netdev"), [format!("user,id=n0,restrict=on,{},{}", fwd(&port), fwd("5999"))]);
    let disk = std::fs::metadata(dir.join("disk.img")).unwrap();
    assert_eq!((disk.len(), disk.permissions().mode() & 0o777), (2 << 30, 0o600), "a node's key lives on its disk");

    // The identity document: the plane as the guest reaches it, its CA, the token (0600; never in argv).
    let identity_file = dir.join("identity.json");
    assert_eq!(std::fs::metadata(&identity_file).unwrap().permissions().mode() & 0o777, 0o600);
    let identity: Value = serde_json::from_slice(&std::fs::read(&identity_file).unwrap()).unwrap();
    assert_eq!(identity["plane"], format!("https://10.0.2.100:{port}"));
    assert_eq!(identity["node"], "rec-1");
    assert_eq!(identity["plane_ca"], std::fs::read_to_string(p.dir().join("ca.pem")).unwrap());
    let token = identity["token"].as_str().unwrap();
    assert!(!argv.iter().any(|a| a.as_str().is_some_and(|a| a.contains(token))), "the token is not in argv");
    assert_eq!(of_kind(&records, "token.create").len(), 1);

    // The token enrolls this node once (it is bound to the name and starts it on `base`).
    let enroll = json!({"token": token, "csr": NodeKey::ed25519().csr(&[]), "identity": {"name": "rec-1"}});
    let (status, body) = enroll_raw(&p, &enroll).await;
    assert_eq!((status, body["node_id"].as_str()), (200, Some(id.as_str())), "{body}");
    let (status, body) = enroll_raw(&p, &enroll).await;
    assert_eq!((status, body["error"].as_str()), (401, Some("token_used")), "{body}");
    let node = show(&p, "rec-1");
    assert_eq!((node["state"].as_str(), node["template"].as_str()), (Some("bootstrapping"), Some("base")));
    assert_eq!(p.op(&["node", "console", "rec-1"]).ok(), "", "the recorder's console stays empty");

    // Terminate: the recorded machine is forgotten, the node revoked, the token's file gone.
    let out = p.op(&["node", "terminate", "rec-1"]).ok();
    assert!(out.contains("recorded machine forgotten; revoked"), "{out}");
    let node = show(&p, "rec-1");
    assert_eq!((node["state"].as_str(), node["revoked"].as_bool()), (Some("terminated"), Some(true)));
    assert!(!identity_file.exists() && !dir.join("disk.img").exists());
    let records = journal(&p).await;
    let stopped = of_kind(&records, "provider.stop");
    assert_eq!((stopped.len(), &stopped[0]["data"]["ended"]["how"]), (1, &json!("recorded")), "{records:#?}");

    // The name can be provisioned again: the same node, a new token.
    p.op(&["node", "provision", "rec-1", "--template", "base"]).ok();
    let node = show(&p, "rec-1");
    assert_eq!((node["id"].as_str(), node["state"].as_str()), (Some(id.as_str()), Some("provisioning")));
    let again: Value = serde_json::from_slice(&std::fs::read(&identity_file).unwrap()).unwrap();
    assert_ne!(again["token"].as_str(), Some(token));
}

#[test]
fn a_disabled_provider_refuses_provisioning_with_a_clear_error() {
    let p = TestPlane::start(&[]);
    let run = p.op(&["node", "provision", "n1"]);
    run.refused(3, "provider_disabled");
    assert!(run.stderr.contains("--provider qemu"), "the error says how to enable it: {}", run.stderr);
    assert_eq!(p.op(&["node", "list", "--json"]).ok(), "[]");
    assert_eq!(p.journal("refused.provision").len(), 1, "the refusal is journaled");
    p.op(&["node", "console", "n1"]).refused(3, "unknown_node");
}

/// The hardware asked for (NICs in slot order, the disk's bus, UEFI) is the command line the
/// recorder journals, and the store names the disk where that bus puts it.
#[tokio::test(flavor = "multi_thread")]
async fn the_hardware_asked_for_is_the_machine_s_command_line() {
    let work = tempfile::tempdir().unwrap();
    let p = plane("recorder", work.path());
    let flags = ["--nic", "igb", "--nic", "e1000e", "--disk", "2G", "--disk-bus", "nvme", "--uefi"];
    p.op(&[&["node", "provision", "hw-1", "--template", "base"][..], &flags].concat()).ok();
    let records = journal(&p).await;
    let started = of_kind(&records, "provider.start");
    let argv = started[0]["data"]["argv"].as_array().unwrap();
    assert_eq!(after(argv, "-bios"), ["/usr/share/ovmf/OVMF.fd"]);
    let devices = after(argv, "-device");
    assert_eq!(
        devices,
        [
            "virtio-rng-pci",
            "igb,netdev=n0,mac=52:54:00:12:34:56",
            "e1000e,netdev=n1,mac=52:54:00:12:34:57",
            "nvme,drive=d0,serial=ironroot0"
        ]
    );
    assert_eq!(after(argv, "-netdev").len(), 2, "a slirp network per NIC: {argv:?}");
    assert!(after(argv, "-append")[0].ends_with(" ironroot.store=disk:/dev/nvme0n1"), "{argv:?}");
    let node = show(&p, "hw-1");
    assert_eq!(node["state"], "provisioning", "{node}");
    // The CLI refuses a bus without a disk before asking the plane.
    let out = p.op(&["node", "provision", "hw-2", "--disk-bus", "ahci"]);
    assert_ne!(out.code, 0, "{out:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_requests_are_refused_and_create_nothing() {
    let work = tempfile::tempdir().unwrap();
    let p = plane("recorder", work.path());
    p.op(&["node", "provision", "dup-1", "--template", "base"]).ok();
    enroll(&p, "dup-2", &NodeKey::ed25519()).await; // a node without a machine of this plane's
    let before = journal(&p).await.len();

    let op = p.operator_client();
    let cases = [
        (json!({"name": "n2", "template": "nope"}), 400, "unknown_template"),
        (json!({"name": "n2", "memory_mib": 100}), 400, "bad_machine"),
        (json!({"name": "n2", "memory_mib": 99_999}), 400, "bad_machine"),
        (json!({"name": "n2", "disk": "12X"}), 400, "bad_machine"),
        (json!({"name": "n2", "disk": "0G"}), 400, "bad_machine"),
        (json!({"name": "N_2"}), 400, "bad_machine"),
        (json!({"name": "n2", "cpus": 4}), 400, "bad_json"),
        (json!({"name": "n2", "nics": ["virtio", "igb", "igb", "e1000e", "virtio"]}), 400, "bad_machine"),
        (json!({"name": "n2", "nics": ["rtl8139"]}), 400, "bad_json"),
        (json!({"name": "n2", "disk_bus": "nvme"}), 400, "bad_machine"),
        // A name in use is a conflict with what exists, not a malformed request.
        (json!({"name": "dup-1"}), 409, "machine_exists"),
        (json!({"name": "dup-2"}), 409, "node_exists"),
    ];
    for (body, status, code) in cases {
        let (s, answer) = call(&op, &p, "POST", "/v1/operator/nodes", Some(body.clone())).await;
        assert_eq!((s, answer["error"].as_str()), (status, Some(code)), "{body}: {answer}");
    }
    // The CLI says the same, with the refusal exit code.
    p.op(&["node", "provision", "n2", "--memory", "100"]).refused(3, "memory 100 MiB is outside 512-16384 MiB");
    p.op(&["node", "provision", "n2", "--disk", "12X"]).refused(3, "disk size \"12X\"");
    p.op(&["node", "provision", "n2", "--template", "nope"]).refused(3, "no template \"nope\"");
    p.op(&["node", "provision", "dup-1"]).refused(3, "`node terminate dup-1` first");
    p.op(&["node", "provision", "dup-2"]).refused(3, "is bootstrapping; terminate it first");

    let nodes: Value = serde_json::from_str(&p.op(&["node", "list", "--json"]).ok()).unwrap();
    assert_eq!(nodes.as_array().unwrap().len(), 2, "{nodes}");
    let records = journal(&p).await;
    let new = &records[before..];
    assert!(new.iter().all(|r| r["kind"].as_str().unwrap().starts_with("refused.")), "only refusals: {new:#?}");
    assert!(!p.dir().join("machines/n2").exists());
    let machines: Vec<_> =
        std::fs::read_dir(p.dir().join("machines")).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(machines, ["dup-1"]);
}

#[tokio::test(flavor = "multi_thread")]
async fn the_qemu_provider_runs_our_command_line_and_journals_the_machine_s_end() {
    ironroot_tests::tools::tool("qemu-system-x86_64");
    let work = tempfile::tempdir().unwrap();
    let p = plane("qemu", work.path());
    let out = p.op(&["node", "provision", "q-1", "--template", "base", "--memory", "512", "--disk", "1G"]).ok();
    assert!(out.contains("QEMU under pid"), "{out}");
    // QEMU parses every option (netdev with its forwards, drive, serial file) and then refuses
    // the empty kernel: the machine ends by itself and the plane journals how.
    let deadline = Instant::now() + Duration::from_secs(60);
    let exited = loop {
        let records = journal(&p).await;
        if let Some(r) = of_kind(&records, "provider.exited").first() {
            break (*r).clone();
        }
        assert!(Instant::now() < deadline, "no provider.exited record: {records:#?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(exited["data"]["status"], "exit 1", "{exited}");
    let stderr = std::fs::read_to_string(p.dir().join("machines/q-1/qemu.err")).unwrap();
    assert!(stderr.contains("vmlinuz"), "QEMU got as far as the kernel: {stderr}");
    assert!(!p.dir().join("machines/q-1/identity.json").exists(), "the token goes with the machine");
    let started = journal(&p).await;
    let argv = &of_kind(&started, "provider.start")[0]["data"]["argv"];
    assert!(argv[0].as_str().unwrap().starts_with('/'), "the tools are resolved: {argv}");

    let out = p.op(&["node", "terminate", "q-1"]).ok();
    assert!(out.contains("no machine running; revoked"), "{out}");
    assert_eq!(show(&p, "q-1")["state"], "terminated");
}

#[test]
fn a_qemu_provider_without_its_bundle_does_not_start() {
    let state = tempfile::tempdir().unwrap();
    let out = std::process::Command::new(ironroot_tests::cli::binary_named("ironroot-plane"))
        .args(["serve", "--listen", "127.0.0.1:0", "--provider", "qemu", "--bundle", "/nonexistent/image", "--state"])
        .arg(state.path())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("vmlinuz is missing (run `just image`)"), "{stderr}");
}
