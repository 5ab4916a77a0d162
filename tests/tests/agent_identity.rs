//! Identity discovery through the real `ironroot-agent identity` binary against fixture roots:
//! every source (cmdline, fw_cfg through its by_name symlink, SMBIOS fields and type 11 OEM
//! strings, a metadata endpoint on loopback, the local file, sysfs MAC) with provenance and
//! disagreement, and every hostile input the issue lists — each a clear error or the documented
//! precedence, never a panic and never an unbounded read.

#![allow(clippy::unwrap_used, clippy::expect_used, reason = "tests stop loudly on a failed setup step")]

use std::os::unix::fs::symlink;
use std::path::Path;
use std::process::Command;

use ironroot_tests::cli::{Run, binary_named};
use ironroot_tests::http::{Server, respond};

fn write(root: &Path, rel: &str, bytes: &[u8]) {
    let p = root.join(rel);
    std::fs::create_dir_all(p.parent().unwrap()).unwrap();
    std::fs::write(p, bytes).unwrap();
}

fn identity(root: &Path) -> Run {
    Command::new(binary_named("ironroot-agent"))
        .args(["identity", "--json", "--root"])
        .arg(root)
        .output()
        .expect("ironroot-agent identity")
        .into()
}

/// fw_cfg as the guest kernel shows it: by_name/... is a symlink into by_key/N.
fn fw_cfg(root: &Path, bytes: &[u8]) {
    write(root, "sys/firmware/qemu_fw_cfg/by_key/40/raw", bytes);
    let by_name = root.join("sys/firmware/qemu_fw_cfg/by_name/opt/ironroot");
    std::fs::create_dir_all(&by_name).unwrap();
    symlink("../../../by_key/40", by_name.join("identity")).unwrap();
}

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
fn hostile_fw_cfg_blobs_are_clear_errors_and_bounded() {
    let ok = b"ironroot.node=n1\n";
    // 16 MiB: refused after reading one byte past the 64 KiB cap.
    refused(ok, |r| fw_cfg(r, &vec![b'{'; 16 << 20]), "over 65536 bytes");
    let deep = format!("{}{}", "[".repeat(10_000), "]".repeat(10_000));
    refused(ok, |r| fw_cfg(r, deep.as_bytes()), "is not a JSON object of string values");
    let deep_value = format!("{{\"node\":{}{}}}", "{\"a\":".repeat(10_000), "}".repeat(10_000));
    refused(ok, |r| fw_cfg(r, deep_value.as_bytes()), "is not a JSON object of string values");
    refused(ok, |r| fw_cfg(r, b"{\"node\":\"\xff\"}"), "not UTF-8");
    refused(ok, |r| fw_cfg(r, br#"{"nodename":"x"}"#), "key \"nodename\" is not an identity key");
    refused(ok, |r| fw_cfg(r, br#"{"node":"a","node":"b"}"#), "appears twice");
}

#[test]
fn junk_smbios_is_ignored_with_a_note_but_a_bad_ironroot_oem_string_is_an_error() {
    let root = tempfile::tempdir().unwrap();
    let r = root.path();
    write(r, "proc/cmdline", b"ironroot.node=n1");
    write(r, "sys/class/dmi/id/product_uuid", b"00000000-0000-0000-0000-000000000000");
    write(r, "sys/class/dmi/id/product_serial", b"\x01\x02binary\xff");
    write(r, "sys/firmware/dmi/entries/11-0/raw", &[11, 200, 0, 0, 9, 1, 2, 3]);
    write(r, "sys/firmware/dmi/entries/11-1/raw", &vec![0xAB; 1 << 20]);
    let out: serde_json::Value = serde_json::from_str(&identity(r).ok()).unwrap();
    assert_eq!(out["values"].as_object().unwrap().len(), 1, "only the cmdline's node: {out}");
    assert_eq!(out["notes"].as_array().unwrap().len(), 4, "uuid, serial and both entries noted: {out}");

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

#[test]
fn a_hostile_metadata_endpoint_is_a_clear_bounded_error() {
    let huge = Server::start(|_, conn| respond(conn, "200 OK", "application/json", &vec![b' '; 1 << 20]));
    refused(format!("ironroot.metadata=http://{}/id", huge.addr()).as_bytes(), |_| {}, "over 65536 bytes");
    let missing = Server::start(|_, conn| respond(conn, "404 Not Found", "text/plain", b"no"));
    refused(format!("ironroot.metadata=http://{}/id", missing.addr()).as_bytes(), |_| {}, "answered HTTP 404");
    let silent = Server::start(|_, _conn| std::thread::sleep(std::time::Duration::from_secs(8)));
    refused(format!("ironroot.metadata=http://{}/id", silent.addr()).as_bytes(), |_| {}, "did not answer within 5s");
    refused(b"ironroot.metadata=file:///etc/passwd", |_| {}, "is not an http:// or https:// URL");
}
