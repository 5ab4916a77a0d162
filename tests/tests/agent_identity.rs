//! Identity discovery through the real `ironroot-agent identity` binary against fixture roots:
//! every source (cmdline, fw_cfg through its by_name symlink, SMBIOS fields and type 11 OEM
//! strings, a metadata endpoint on loopback, the local file, sysfs MAC) with provenance and
//! disagreement, and every hostile input the issue lists — each a clear error or the documented
//! precedence, never a panic, never a hang and never an unbounded read. Also the settings any
//! source may carry (`on_failure`, `debug`, `heartbeat`) through `boot`, and the service's reads
//! of what the boot left (boot.json, key, certificate) through `serve`.
//!
//! Every run has a deadline (a hang fails the test instead of stalling the suite), and its reads
//! are measured: `rchar` of /proc/PID/io, taken after the agent exited and before it is reaped,
//! so a bounded-read test fails when the cap is gone, not only when a message changes.

#![allow(clippy::unwrap_used, clippy::expect_used, reason = "tests stop loudly on a failed setup step")]

use std::ffi::OsStr;
use std::os::unix::fs::symlink;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use ironroot_contract::keys::{KeyAlgorithm, SigningKey};
use ironroot_tests::cli::{Run, binary_named};
use ironroot_tests::http::{Server, respond};
use ironroot_tests::lab::Lab;
use rustix::fs::{CWD, FileType, Mode};
use rustix::process::{Pid, WaitId, WaitIdOptions};

/// Far beyond any run here (the slowest waits out a 5 s metadata deadline): a run still going
/// then is hung, and a hang is the failure some of these tests look for.
const DEADLINE: Duration = Duration::from_secs(60);
/// What a refused read may cost beyond its cap and a baseline run of the same root: the error
/// path's own small reads.
const SLACK: u64 = 16 * 1024;
/// The caps (docs/interfaces/kernel-cmdline.md): the cmdline with its newline, identity
/// documents, raw SMBIOS structures.
const CMDLINE_CAP: u64 = 2048 + 1;
const DOC_CAP: u64 = 64 * 1024;
const SMBIOS_CAP: u64 = 64 * 1024;

fn write(root: &Path, rel: &str, bytes: &[u8]) {
    let p = root.join(rel);
    std::fs::create_dir_all(p.parent().unwrap()).unwrap();
    std::fs::write(p, bytes).unwrap();
}

fn mkfifo(root: &Path, rel: &str) {
    let p = root.join(rel);
    std::fs::create_dir_all(p.parent().unwrap()).unwrap();
    rustix::fs::mknodat(CWD, &p, FileType::Fifo, Mode::from_raw_mode(0o600), 0).unwrap();
}

/// A finished `ironroot-agent` run and how many bytes it read through read(2) and friends.
#[derive(Debug)]
struct Finished {
    run: Run,
    read: u64,
}

/// Runs `ironroot-agent ARGS…` to its end within [`DEADLINE`]; a run still going then is killed
/// and fails the test. Its `rchar` is read while it is a zombie (waitid with WNOWAIT), when
/// every thread's reads have been added up and nothing else can add to them.
fn agent(args: &[&OsStr]) -> Finished {
    let out = tempfile::tempdir().unwrap();
    let (stdout, stderr) = (out.path().join("stdout"), out.path().join("stderr"));
    let mut child = Command::new(binary_named("ironroot-agent"))
        .args(args)
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&stdout).unwrap())
        .stderr(std::fs::File::create(&stderr).unwrap())
        .spawn()
        .expect("ironroot-agent");
    let pid = Pid::from_child(&child);
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let exited = rustix::process::waitid(WaitId::Pid(pid), WaitIdOptions::EXITED | WaitIdOptions::NOWAIT);
        let _test_gone = tx.send(exited.is_ok()); // the test may have given up already
    });
    if !matches!(rx.recv_timeout(DEADLINE), Ok(true)) {
        child.kill().unwrap();
        child.wait().unwrap();
        panic!(
            "ironroot-agent {args:?} did not finish within {DEADLINE:?}: it hangs\nstderr: {}",
            std::fs::read_to_string(&stderr).unwrap_or_default()
        );
    }
    let io = std::fs::read_to_string(format!("/proc/{}/io", child.id())).unwrap();
    let read = io.lines().find_map(|l| l.strip_prefix("rchar: ")).expect("rchar in /proc/PID/io").parse().unwrap();
    let status = child.wait().unwrap();
    let run = Run {
        code: status.code().unwrap_or(-1),
        stdout: std::fs::read_to_string(&stdout).unwrap(),
        stderr: std::fs::read_to_string(&stderr).unwrap(),
    };
    Finished { run, read }
}

fn identity_measured(root: &Path) -> Finished {
    agent(&["identity".as_ref(), "--json".as_ref(), "--root".as_ref(), root.as_os_str()])
}

fn identity(root: &Path) -> Run {
    identity_measured(root).run
}

/// Asserts that a run which refused an oversized file read it up to `cap` and no further: the
/// bytes it read beyond a `baseline` run (the same root with that file small or absent) are at
/// least half the cap (the measurement sees the read) and at most the cap plus [`SLACK`].
fn assert_read_up_to_cap(hostile: &Finished, baseline: &Finished, cap: u64) {
    let extra = hostile.read.saturating_sub(baseline.read);
    assert!(
        extra >= cap / 2 && extra <= cap + SLACK,
        "read {extra} bytes more than the baseline ({} vs {}); the cap is {cap}\nstderr: {}",
        hostile.read,
        baseline.read,
        hostile.run.stderr
    );
}

const FW_CFG_RAW: &str = "sys/firmware/qemu_fw_cfg/by_name/opt/ironroot/identity/raw";
const FW_CFG_KEY_RAW: &str = "sys/firmware/qemu_fw_cfg/by_key/40/raw";

/// fw_cfg as the guest kernel shows it: by_name/... is a symlink into by_key/N.
fn fw_cfg_link(root: &Path) {
    let by_name = root.join("sys/firmware/qemu_fw_cfg/by_name/opt/ironroot");
    std::fs::create_dir_all(&by_name).unwrap();
    std::fs::create_dir_all(root.join("sys/firmware/qemu_fw_cfg/by_key/40")).unwrap();
    symlink("../../../by_key/40", by_name.join("identity")).unwrap();
}

fn fw_cfg(root: &Path, bytes: &[u8]) {
    write(root, FW_CFG_KEY_RAW, bytes);
    fw_cfg_link(root);
}

fn identity_file(root: &Path, bytes: &[u8]) {
    write(root, "etc/ironroot/identity.json", bytes);
}

/// Where an identity document is put, by the source name messages give it.
type Put = fn(&Path, &[u8]);
const DOCUMENT_PLACES: [(&str, Put); 2] = [("fw_cfg", fw_cfg), ("file", identity_file)];

fn type11(strings: &[&[u8]]) -> Vec<u8> {
    let mut raw = vec![11, 5, 0x10, 0x00, strings.len() as u8];
    for s in strings {
        raw.extend_from_slice(s);
        raw.push(0);
    }
    raw.push(0);
    raw
}

#[test]
fn every_source_is_read_with_provenance_and_disagreement_is_reported() {
    let metadata = Server::start(|req, conn| {
        assert_eq!(req.path, "/ironroot/identity");
        respond(conn, "200 OK", "application/json", br#"{"store":"tmpfs-insecure","node":"from-metadata"}"#);
    });
    let root = tempfile::tempdir().unwrap();
    let r = root.path();
    write(
        r,
        "proc/cmdline",
        format!("quiet ironroot.node=n1 ironroot.metadata=http://{}/ironroot/identity\n", metadata.addr()).as_bytes(),
    );
    fw_cfg(r, br#"{"plane":"https://10.0.2.2:8443","node":"other-name"}"#);
    write(r, "sys/class/dmi/id/product_uuid", b"4C4C4544-0042-3510-8052-B4C04F4B4E32\n");
    write(r, "sys/class/dmi/id/product_serial", b"To Be Filled By O.E.M.\n");
    write(r, "sys/firmware/dmi/entries/11-0/raw", &type11(&[b"vendor string", b"io.ironroot.token=irt_smbios"]));
    write(r, "etc/ironroot/identity.json", br#"{"on_failure":"halt","plane":"https://10.0.2.2:8443"}"#);
    write(r, "sys/class/net/eth0/address", b"52:54:00:12:34:56\n");
    std::fs::create_dir_all(r.join("sys/class/net/eth0/device")).unwrap();
    write(r, "sys/class/net/lo/address", b"00:00:00:00:00:00\n");

    let out: serde_json::Value = serde_json::from_str(&identity(r).ok()).unwrap();
    let v = &out["values"];
    let pairs = [
        ("node", "n1", "cmdline"),
        ("plane", "https://10.0.2.2:8443", "fw_cfg"),
        ("smbios_uuid", "4c4c4544-0042-3510-8052-b4c04f4b4e32", "smbios"),
        ("token", "<redacted>", "smbios"),
        ("store", "tmpfs-insecure", "metadata"),
        ("on_failure", "halt", "file"),
        ("mac", "52:54:00:12:34:56", "sysfs"),
    ];
    for (key, value, source) in pairs {
        assert_eq!((v[key]["value"].as_str(), v[key]["source"].as_str()), (Some(value), Some(source)), "{key}: {out}");
    }
    assert!(v.get("serial").is_none(), "the placeholder serial is not a value");
    assert!(out["notes"].to_string().contains("To Be Filled By O.E.M."), "{out}");
    let conflicts = out["conflicts"].as_array().unwrap();
    let node: Vec<_> = conflicts.iter().filter(|c| c["key"] == "node").collect();
    assert_eq!(node.len(), 2, "fw_cfg and metadata both disagree with the cmdline: {out}");
    assert_eq!(node[0]["chosen"]["source"], "cmdline");
    assert_eq!(node[0]["other"]["value"], "other-name");
    assert!(!conflicts.iter().any(|c| c["key"] == "plane"), "fw_cfg and the file agree on the plane");
    assert_eq!(metadata.requests().len(), 1);
}

/// Builds a root with `cmdline` and whatever `extra` writes, and expects a discover failure
/// (exit 20) whose message holds `needle`.
fn refused(cmdline: &[u8], extra: impl FnOnce(&Path), needle: &str) {
    let root = tempfile::tempdir().unwrap();
    write(root.path(), "proc/cmdline", cmdline);
    extra(root.path());
    identity(root.path()).refused(20, needle);
}

#[test]
fn hostile_kernel_command_lines_are_clear_errors() {
    let long = format!("ironroot.node={}", "n".repeat(2100));
    refused(long.as_bytes(), |_| {}, "over the 2048-byte limit");
    refused(b"ironroot.node=\"cut mid-val", |_| {}, "ends inside a quoted value");
    refused(b"ironroot.node=a ironroot.node=b", |_| {}, "ironroot.node appears more than once");
    refused(b"ironroot.nod=a", |_| {}, "ironroot.nod is not an ironroot key");
    refused(b"ironroot.node=\xff\xfe", |_| {}, "not UTF-8");
    refused(b"ironroot.token=", |_| {}, "empty value");
}

#[test]
fn control_characters_in_a_kernel_command_line_value_are_refused() {
    let lines: [&[u8]; 5] = [
        b"quiet ironroot.node=a\0b\n",
        b"ironroot.token=irt_\x1b[2Jx",
        b"ironroot.node=\"rack\t1\"",
        b"ironroot.node=\"two\nlines\"",
        b"ironroot.node=a\x7f",
    ];
    for line in lines {
        refused(line, |_| {}, "ironroot.");
        refused(line, |_| {}, "holds control characters");
    }
    // Someone else's parameter may hold what it likes.
    let root = tempfile::tempdir().unwrap();
    write(root.path(), "proc/cmdline", b"other=a\x01b ironroot.node=n1\n");
    identity(root.path()).ok();
}

#[test]
fn a_kernel_command_line_over_the_limit_is_read_only_up_to_the_limit() {
    let baseline = tempfile::tempdir().unwrap();
    write(baseline.path(), "proc/cmdline", b"ironroot.node=n1\n");
    let baseline = identity_measured(baseline.path());
    baseline.run.ok();

    let hostile = tempfile::tempdir().unwrap();
    write(hostile.path(), "proc/cmdline", format!("ironroot.node={}\n", "n".repeat(16 << 20)).as_bytes());
    let hostile = identity_measured(hostile.path());
    hostile.run.refused(20, "over the 2048-byte limit");
    assert_read_up_to_cap(&hostile, &baseline, CMDLINE_CAP);
}

#[test]
fn hostile_fw_cfg_blobs_are_clear_errors() {
    let ok = b"ironroot.node=n1\n";
    let deep = format!("{}{}", "[".repeat(10_000), "]".repeat(10_000));
    refused(ok, |r| fw_cfg(r, deep.as_bytes()), "is not a JSON object of string values");
    let deep_value = format!("{{\"node\":{}{}}}", "{\"a\":".repeat(10_000), "}".repeat(10_000));
    refused(ok, |r| fw_cfg(r, deep_value.as_bytes()), "is not a JSON object of string values");
    refused(ok, |r| fw_cfg(r, b"{\"node\":\"\xff\"}"), "not UTF-8");
    refused(ok, |r| fw_cfg(r, br#"{"nodename":"x"}"#), "key \"nodename\" is not an identity key");
    refused(ok, |r| fw_cfg(r, br#"{"node":"a","node":"b"}"#), "appears twice");
    refused(ok, |r| fw_cfg(r, br#"{"node":"a\u0000b"}"#), "value of node holds control characters");
}

/// 16 MiB at fw_cfg or in the identity file: refused after reading one byte past the 64 KiB cap.
#[test]
fn oversized_identity_documents_are_read_only_up_to_the_cap() {
    for (name, put) in DOCUMENT_PLACES {
        let baseline = tempfile::tempdir().unwrap();
        write(baseline.path(), "proc/cmdline", b"ironroot.node=n1\n");
        put(baseline.path(), br#"{"node":"n1"}"#);
        let baseline = identity_measured(baseline.path());
        baseline.run.ok();

        let hostile = tempfile::tempdir().unwrap();
        write(hostile.path(), "proc/cmdline", b"ironroot.node=n1\n");
        put(hostile.path(), &vec![b'{'; 16 << 20]);
        let hostile = identity_measured(hostile.path());
        hostile.run.refused(20, "over 65536 bytes");
        assert!(hostile.run.stderr.contains(name), "{name}: {}", hostile.run.stderr);
        assert_read_up_to_cap(&hostile, &baseline, DOC_CAP);
    }
}

#[test]
fn junk_smbios_is_ignored_with_a_note_but_a_bad_ironroot_oem_string_is_an_error() {
    let root = tempfile::tempdir().unwrap();
    let r = root.path();
    write(r, "proc/cmdline", b"ironroot.node=n1");
    write(r, "sys/class/dmi/id/product_uuid", b"00000000-0000-0000-0000-000000000000");
    write(r, "sys/class/dmi/id/product_serial", b"\x01\x02binary\xff");
    write(r, "sys/firmware/dmi/entries/11-0/raw", &[11, 200, 0, 0, 9, 1, 2, 3]);
    write(r, "sys/firmware/dmi/entries/11-1/raw", &vec![0xAB; 16 << 20]);
    let with_big = identity_measured(r);
    let out: serde_json::Value = serde_json::from_str(&with_big.run.ok()).unwrap();
    assert_eq!(out["values"].as_object().unwrap().len(), 1, "only the cmdline's node: {out}");
    assert_eq!(out["notes"].as_array().unwrap().len(), 4, "uuid, serial and both entries noted: {out}");
    // The 16 MiB entry cost one byte past the 64 KiB cap.
    std::fs::remove_file(r.join("sys/firmware/dmi/entries/11-1/raw")).unwrap();
    let without = identity_measured(r);
    without.run.ok();
    assert_read_up_to_cap(&with_big, &without, SMBIOS_CAP);

    refused(
        b"ironroot.node=n1",
        |r| write(r, "sys/firmware/dmi/entries/11-0/raw", &type11(&[b"io.ironroot.nodes=x"])),
        "names no identity key",
    );
    refused(
        b"ironroot.node=n1",
        |r| write(r, "sys/firmware/dmi/entries/11-0/raw", &type11(&[b"io.ironroot.node=\xff"])),
        "not UTF-8",
    );
}

/// A root with `cmdline` whose file at `rel` is made by `make`; sysfs MAC and fw_cfg get the
/// directories and links around it that make discovery read it.
fn root_with(cmdline: &[u8], rel: &str, make: impl FnOnce(&Path, &str)) -> tempfile::TempDir {
    let root = tempfile::tempdir().unwrap();
    let r = root.path();
    if rel != "proc/cmdline" {
        write(r, "proc/cmdline", cmdline);
    }
    if rel == FW_CFG_KEY_RAW {
        fw_cfg_link(r);
    }
    std::fs::create_dir_all(r.join("sys/class/net/eth0/device")).unwrap();
    make(r, rel);
    root
}

/// Identity paths as (where the file is made, what discovery opens and names).
const IDENTITY_PATHS: [(&str, &str); 7] = [
    ("proc/cmdline", "proc/cmdline"),
    (FW_CFG_KEY_RAW, FW_CFG_RAW),
    ("etc/ironroot/identity.json", "etc/ironroot/identity.json"),
    ("sys/class/dmi/id/product_uuid", "sys/class/dmi/id/product_uuid"),
    ("sys/class/dmi/id/product_serial", "sys/class/dmi/id/product_serial"),
    ("sys/firmware/dmi/entries/11-0/raw", "sys/firmware/dmi/entries/11-0/raw"),
    ("sys/class/net/eth0/address", "sys/class/net/eth0/address"),
];

/// Opening a FIFO for reading waits for a writer, forever here: discovery must refuse it
/// without waiting, naming it.
#[test]
fn a_fifo_at_any_identity_path_is_refused_at_once_by_name() {
    for (made, opened) in IDENTITY_PATHS {
        let root = root_with(b"ironroot.node=n1\n", made, mkfifo);
        let shown = root.path().join(opened);
        identity(root.path()).refused(20, &format!("{} is a fifo, not a regular file", shown.display()));
    }
}

#[test]
fn a_directory_device_or_socket_at_an_identity_path_is_refused_by_name() {
    ironroot_tests::tools::require_root();
    type Make = fn(&Path, &str);
    let kinds: [(&str, Make); 4] = [
        ("directory", |r, rel| std::fs::create_dir_all(r.join(rel)).unwrap()),
        // /dev/zero read whole would never end; the cap would stop it, the type check first.
        ("character device", |r, rel| {
            std::fs::create_dir_all(r.join(rel).parent().unwrap()).unwrap();
            symlink("/dev/zero", r.join(rel)).unwrap();
        }),
        ("character device", |r, rel| {
            std::fs::create_dir_all(r.join(rel).parent().unwrap()).unwrap();
            let zero = rustix::fs::makedev(1, 5);
            rustix::fs::mknodat(CWD, r.join(rel), FileType::CharacterDevice, Mode::from_raw_mode(0o600), zero).unwrap();
        }),
        ("socket", |r, rel| {
            std::fs::create_dir_all(r.join(rel).parent().unwrap()).unwrap();
            // Bound, then closed: the socket file stays.
            drop(std::os::unix::net::UnixListener::bind(r.join(rel)).unwrap());
        }),
    ];
    for (made, opened) in IDENTITY_PATHS {
        for (kind, make) in kinds {
            let root = root_with(b"ironroot.node=n1\n", made, make);
            let shown = root.path().join(opened);
            identity(root.path()).refused(20, &format!("{} is a {kind}, not a regular file", shown.display()));
        }
    }
}

#[test]
fn a_hostile_metadata_endpoint_is_a_clear_bounded_error() {
    // No Content-Length: only the reader's own count can stop it. The server counts what it
    // managed to send before the agent hung up.
    const OFFERED: u64 = 1 << 30;
    let (sent_tx, sent_rx) = mpsc::channel();
    let sent_tx = std::sync::Mutex::new(sent_tx);
    let endless = Server::start(move |_, conn| {
        use std::io::Write as _;
        let head = "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nConnection: close\r\n\r\n";
        let mut sent = 0u64;
        if conn.write_all(head.as_bytes()).is_ok() {
            let chunk = vec![b' '; 64 * 1024];
            while sent < OFFERED && conn.write_all(&chunk).is_ok() {
                sent += chunk.len() as u64;
            }
        }
        let _test_gone = sent_tx.lock().unwrap().send(sent); // the test may have failed already
    });
    refused(format!("ironroot.metadata=http://{}/id", endless.addr()).as_bytes(), |_| {}, "over 65536 bytes");
    let sent = sent_rx.recv_timeout(DEADLINE).expect("the server finished sending");
    // What the agent did not read stayed in socket buffers (a few MiB on loopback at most).
    assert!(sent < 64 << 20, "the server sent {sent} bytes of {OFFERED} before the agent hung up");

    let huge = Server::start(|_, conn| respond(conn, "200 OK", "application/json", &vec![b' '; 1 << 20]));
    refused(format!("ironroot.metadata=http://{}/id", huge.addr()).as_bytes(), |_| {}, "over 65536 bytes");
    let missing = Server::start(|_, conn| respond(conn, "404 Not Found", "text/plain", b"no"));
    refused(format!("ironroot.metadata=http://{}/id", missing.addr()).as_bytes(), |_| {}, "answered HTTP 404");
    let silent = Server::start(|_, _conn| std::thread::sleep(std::time::Duration::from_secs(8)));
    refused(format!("ironroot.metadata=http://{}/id", silent.addr()).as_bytes(), |_| {}, "did not answer within 5s");
    refused(b"ironroot.metadata=file:///etc/passwd", |_| {}, "is not an http:// or https:// URL");
}

/// A boot root whose settings validate — plane, CA, trust key, a `dir:` store that mounts
/// nothing — and that has no token, so a boot that gets past discovery stops at enrollment
/// (exit 21) without touching the network.
fn settings_root(cmdline_extra: &str) -> tempfile::TempDir {
    let root = tempfile::tempdir().unwrap();
    let r = root.path();
    let line = format!(
        "console=ttyS0 ironroot.plane=https://127.0.0.1:1 ironroot.plane_ca=/etc/ironroot/ca.pem \
         ironroot.trust=/etc/ironroot/trust.pem ironroot.store=dir:/persist ironroot.verity=optional {cmdline_extra}\n"
    );
    write(r, "proc/cmdline", line.as_bytes());
    write(r, "etc/ironroot/ca.pem", b"-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n");
    let trust = SigningKey::generate(KeyAlgorithm::Ed25519).public_pem().unwrap();
    write(r, "etc/ironroot/trust.pem", trust.as_bytes());
    std::fs::create_dir_all(r.join("persist")).unwrap();
    root
}

fn boot(root: &Path) -> Run {
    agent(&["boot".as_ref(), "--root".as_ref(), root.as_os_str(), "--retries".as_ref(), "1".as_ref()]).run
}

#[test]
fn on_failure_debug_and_heartbeat_from_any_source_are_validated_in_discover() {
    for (name, put) in DOCUMENT_PLACES {
        let root = settings_root("");
        put(root.path(), br#"{"on_failure":"halt","debug":"1","heartbeat":"3600"}"#);
        boot(root.path()).refused(21, "no bootstrap token");

        let bad: [(&[u8], &str); 6] = [
            (br#"{"heartbeat":"0"}"#, r#"heartbeat "0": is not 1..=3600 seconds"#),
            (br#"{"heartbeat":"3601"}"#, r#"heartbeat "3601": is not 1..=3600 seconds"#),
            (br#"{"heartbeat":"30s"}"#, r#"heartbeat "30s": is not 1..=3600 seconds"#),
            (br#"{"heartbeat":"-5"}"#, r#"heartbeat "-5": is not 1..=3600 seconds"#),
            (br#"{"on_failure":"explode"}"#, r#"on_failure "explode": is not reboot or halt"#),
            (br#"{"debug":"yes"}"#, r#"debug "yes": is not 0 or 1"#),
        ];
        for (doc, needle) in bad {
            let root = settings_root("");
            put(root.path(), doc);
            let run = boot(root.path());
            assert!(run.stderr.contains("boot failed in phase discover"), "{name}: {}", run.stderr);
            run.refused(20, needle);
        }
    }
    boot(settings_root("ironroot.heartbeat=0").path()).refused(20, r#"heartbeat "0": is not 1..=3600 seconds"#);
}

#[test]
fn a_heartbeat_from_the_identity_file_reaches_the_service_through_boot_json() {
    let lab = Lab::start();
    let node =
        lab.node_root(&format!("ironroot.token={} ironroot.node=hb1 ironroot.store=dir:/persist", lab.token("hb1")));
    write(node.path(), "etc/ironroot/identity.json", br#"{"heartbeat":"7","on_failure":"halt","debug":"1"}"#);
    let booted = node.boot(&[]);
    let record = booted.record();
    assert_eq!(record["heartbeat_s"], 7, "{record}");
    assert_eq!(record["identity"]["values"]["heartbeat"]["source"], "file");
}

/// A run directory holding boot.json as `serve` reads it, pointing at key, certificate and CA
/// files beside it (made by the caller when a test needs them).
fn run_dir(edit: impl FnOnce(&mut serde_json::Value)) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let mut record = serde_json::json!({
        "schema": 1, "agent_version": "0.1.0", "boot_id": "b-1",
        "identity": {"values": {}, "conflicts": [], "notes": []},
        "node_id": "n-1", "plane": "https://127.0.0.1:1", "plane_ca": d.join("plane-ca.pem"),
        "certificate": d.join("node.crt"), "key": d.join("node.key"),
        "certificate_not_after": 4_000_000_000u64, "reused_certificate": false, "generation": 1,
        "store": {"kind": "dir", "path": d.join("store"), "verity": false, "persistent": true,
                  "insecure": true, "device": null},
        "modules": [], "root": {"target": "/sysroot", "verity": false, "layers": [], "upper": "/run/u"},
        "phases_ms": {}, "heartbeat_s": 30,
    });
    edit(&mut record);
    std::fs::write(d.join("boot.json"), record.to_string()).unwrap();
    dir
}

fn serve(dir: &Path) -> Run {
    agent(&["serve".as_ref(), "--run-dir".as_ref(), dir.as_os_str()]).run
}

/// Exit codes restarting cannot fix (docs/interfaces/exit-codes.md, the unit's
/// RestartPreventExitStatus=).
const BOOT_RECORD: i32 = 30;
const NODE_IDENTITY: i32 = 31;

#[test]
fn the_service_refuses_an_unusable_boot_record_with_its_own_exit_code() {
    let fifo = run_dir(|_| {});
    std::fs::remove_file(fifo.path().join("boot.json")).unwrap();
    mkfifo(fifo.path(), "boot.json");
    serve(fifo.path()).refused(BOOT_RECORD, "boot.json is a fifo, not a regular file");

    let link = run_dir(|_| {});
    std::fs::rename(link.path().join("boot.json"), link.path().join("elsewhere.json")).unwrap();
    symlink("elsewhere.json", link.path().join("boot.json")).unwrap();
    serve(link.path()).refused(BOOT_RECORD, "boot.json is a symlink, not a regular file");

    let huge = tempfile::tempdir().unwrap();
    write(huge.path(), "boot.json", &vec![b' '; 16 << 20]);
    serve(huge.path()).refused(BOOT_RECORD, "over 1048576 bytes");

    serve(run_dir(|r| r["schema"] = 99.into()).path()).refused(BOOT_RECORD, "schema 99");
    serve(run_dir(|r| r["node_id"] = 5.into()).path()).refused(BOOT_RECORD, "is not a boot record");
    for bad in [0, 3601] {
        serve(run_dir(|r| r["heartbeat_s"] = bad.into()).path())
            .refused(BOOT_RECORD, &format!("heartbeat_s {bad} is not 1..=3600 seconds"));
    }
}

#[test]
fn the_service_refuses_an_unusable_node_identity_with_its_own_exit_code() {
    serve(run_dir(|r| r["certificate_not_after"] = 1.into()).path()).refused(NODE_IDENTITY, "expired");
    // Nothing beside the record: the CA is read first.
    serve(run_dir(|_| {}).path()).refused(NODE_IDENTITY, "plane-ca.pem does not exist");
    let fifo = run_dir(|_| {});
    write(fifo.path(), "plane-ca.pem", b"-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n");
    write(fifo.path(), "node.crt", b"-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n");
    mkfifo(fifo.path(), "node.key");
    serve(fifo.path()).refused(NODE_IDENTITY, "node.key is a fifo, not a regular file");
    std::fs::remove_file(fifo.path().join("node.key")).unwrap();
    write(fifo.path(), "node.key", b"not a key");
    serve(fifo.path()).refused(NODE_IDENTITY, "node identity");
}
