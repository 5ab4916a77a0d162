//! What `ironroot-build` leaves behind and says when a command fails for real: a module build
//! that runs out of space or is interrupted leaves `--out` as it was and no staging directory
//! (tmpfs in a private mount namespace, signals to the real process); push, sign and kernel
//! fetch report unreachable registries and archives and refused credentials as transport
//! failures (exit 13, docs/interfaces/exit-codes.md).

#![allow(clippy::unwrap_used, clippy::expect_used, reason = "tests stop loudly on a failed setup step")]

use std::collections::BTreeMap;
use std::io::Read as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use ironroot_tests::cli::{Run, binary, build_cmd};
use ironroot_tests::registry::{Auth, TestRegistry};
use ironroot_tests::tools::require_root;
use ironroot_tests::tree::generate_bulk;
use sha2::{Digest as _, Sha256};

fn s(p: &Path) -> String {
    p.to_string_lossy().into_owned()
}

fn build_args<'a>(from: &'a str, out: &'a str, name: &'a str) -> Vec<&'a str> {
    vec!["module", "build", "--from", from, "--name", name, "--version", "1", "--serial", "1", "--out", out]
}

/// Every path under `dir` (relative) with the SHA-256 of each file's content.
fn snapshot(dir: &Path) -> BTreeMap<String, String> {
    fn walk(root: &Path, dir: &Path, out: &mut BTreeMap<String, String>) {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            let rel = s(path.strip_prefix(root).unwrap());
            if path.is_dir() {
                out.insert(rel, "dir".into());
                walk(root, &path, out);
            } else {
                out.insert(rel, hex(&Sha256::digest(std::fs::read(&path).unwrap())));
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(dir, dir, &mut out);
    out
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Staging directories of builds into `parent/NAME` (`.NAME.build-*`).
fn staging_dirs(parent: &Path, name: &str) -> Vec<String> {
    std::fs::read_dir(parent)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(&format!(".{name}.")))
        .collect()
}

/// A module build that fills its filesystem: in a private mount namespace, a 4 MiB tmpfs
/// holds a small module's layout; a 12 MiB module built into that layout, and one built into
/// a new directory beside it, both fail with ENOSPC. Afterwards the tmpfs holds exactly what
/// it held before: the first layout, byte for byte, and nothing else.
#[test]
fn a_build_out_of_space_leaves_out_as_it_was() {
    require_root();
    let tmp = tempfile::tempdir().unwrap();
    let (small, big) = (tmp.path().join("small"), tmp.path().join("big"));
    generate_bulk(&small, 100 << 10);
    generate_bulk(&big, 12 << 20);
    let fs = tmp.path().join("fs");
    std::fs::create_dir(&fs).unwrap();
    let report = tmp.path().join("report");
    std::fs::create_dir(&report).unwrap();
    // One screen of glue: the tmpfs exists only inside the namespace, so the listings are
    // taken there (by this test binary's own snapshot, in JSON) and left in `report`.
    let script = r#"
        set -e
        mount -t tmpfs -o size=4m tmpfs "$FS"
        "$BIN" module build --from "$SMALL" --name small --version 1 --serial 1 --out "$FS/layout" >/dev/null
        find "$FS" | sort >"$REPORT/names-before"
        (cd "$FS" && find . -type f -exec sha256sum {} + | sort) >"$REPORT/sums-before"
        set +e
        "$BIN" module build --from "$BIG" --name big --version 1 --serial 1 --out "$FS/layout" \
            --pack-size 2097152 2>"$REPORT/err-existing"
        echo $? >"$REPORT/rc-existing"
        "$BIN" module build --from "$BIG" --name big --version 1 --serial 1 --out "$FS/fresh" \
            --pack-size 2097152 2>"$REPORT/err-fresh"
        echo $? >"$REPORT/rc-fresh"
        find "$FS" | sort >"$REPORT/names-after"
        (cd "$FS" && find . -type f -exec sha256sum {} + | sort) >"$REPORT/sums-after"
    "#;
    let out = Command::new("unshare")
        .args(["--mount", "--propagation", "private", "sh", "-c", script])
        .env("FS", &fs)
        .env("BIN", binary())
        .env("SMALL", &small)
        .env("BIG", &big)
        .env("REPORT", &report)
        .output()
        .expect("unshare");
    assert!(out.status.success(), "namespace script failed: {}", String::from_utf8_lossy(&out.stderr));
    let read = |name: &str| std::fs::read_to_string(report.join(name)).unwrap();
    for case in ["existing", "fresh"] {
        assert_eq!(read(&format!("rc-{case}")).trim(), "1", "{case}: {}", read(&format!("err-{case}")));
        let err = read(&format!("err-{case}"));
        assert!(err.contains("No space left on device"), "{case}: {err}");
    }
    assert_eq!(read("names-after"), read("names-before"), "the filesystem holds something new");
    assert_eq!(read("sums-after"), read("sums-before"), "the earlier layout changed");
    assert!(read("names-before").contains("/layout/index.json"), "{}", read("names-before"));
}

/// Starts `ironroot-build module build` from a tar archive that is a fifo, and returns once
/// GNU tar has opened it: the build is then waiting in its source, with its staging directory
/// made and its signal handler installed. The returned writer keeps tar waiting.
fn start_blocked_build(tmp: &Path, out: &Path) -> (Child, std::fs::File) {
    let fifo = tmp.join("source.tar");
    let st = Command::new("mkfifo").arg(&fifo).status().expect("mkfifo");
    assert!(st.success());
    let scratch = tmp.join("scratch");
    std::fs::create_dir_all(&scratch).unwrap();
    let mut child = Command::new(binary())
        .args(build_args(&s(&fifo), &s(out), "blocked"))
        // tar's scratch directory: inside this test's temp dir, whatever happens to the build.
        .env("TMPDIR", &scratch)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("starting ironroot-build");
    let (tx, rx) = std::sync::mpsc::channel();
    let path = fifo.clone();
    std::thread::spawn(move || {
        let _unused_if_the_test_ended = tx.send(std::fs::OpenOptions::new().write(true).open(path));
    });
    loop {
        if let Ok(writer) = rx.recv_timeout(Duration::from_millis(50)) {
            return (child, writer.expect("opening the fifo"));
        }
        if let Some(status) = child.try_wait().unwrap() {
            // Release the opener thread before failing.
            let _reader = std::fs::File::open(&fifo);
            let mut err = String::new();
            child.stderr.take().unwrap().read_to_string(&mut err).unwrap();
            panic!("the build ended ({status}) before reading its source: {err}");
        }
    }
}

fn finish(mut child: Child) -> Run {
    let status = child.wait().unwrap();
    let mut run = Run { code: status.code().unwrap_or(-1), stdout: String::new(), stderr: String::new() };
    child.stdout.take().unwrap().read_to_string(&mut run.stdout).unwrap();
    child.stderr.take().unwrap().read_to_string(&mut run.stderr).unwrap();
    run
}

#[test]
fn an_interrupted_build_removes_its_staging_directory() {
    require_root();
    let tmp = tempfile::tempdir().unwrap();
    let tree = tmp.path().join("tree");
    generate_bulk(&tree, 100 << 10);
    let parent = tmp.path().join("out");
    let out = parent.join("layout");
    build_cmd(&build_args(&s(&tree), &s(&out), "first")).ok();
    let before = snapshot(&out);

    // SIGINT: the build removes its staging directory and says so.
    let (child, writer) = start_blocked_build(tmp.path(), &out);
    assert_eq!(staging_dirs(&parent, "layout").len(), 1, "{:?}", staging_dirs(&parent, "layout"));
    rustix::process::kill_process(rustix::process::Pid::from_child(&child), rustix::process::Signal::INT).unwrap();
    let run = finish(child);
    drop(writer);
    run.refused(130, "module build interrupted");
    assert_eq!(staging_dirs(&parent, "layout"), Vec::<String>::new());
    assert_eq!(snapshot(&out), before);
}

#[test]
fn a_killed_builds_leftovers_are_removed_by_the_next_build() {
    require_root();
    let tmp = tempfile::tempdir().unwrap();
    let tree = tmp.path().join("tree");
    generate_bulk(&tree, 100 << 10);
    let parent = tmp.path().join("out");
    let out = parent.join("layout");
    build_cmd(&build_args(&s(&tree), &s(&out), "first")).ok();
    let before = snapshot(&out);

    // SIGKILL: nothing runs in the build, its staging directory stays.
    let (mut child, writer) = start_blocked_build(tmp.path(), &out);
    let left = staging_dirs(&parent, "layout");
    assert_eq!(left.len(), 1, "{left:?}");
    std::fs::write(parent.join(&left[0]).join("blob-of-a-dead-build"), vec![7u8; 1 << 20]).unwrap();
    child.kill().unwrap();
    let status = child.wait().unwrap();
    assert_eq!(status.code(), None, "{status}");
    drop(writer);
    assert_eq!(staging_dirs(&parent, "layout"), left);
    assert_eq!(snapshot(&out), before);

    // The next build into the same --out finds its lock free and removes it.
    build_cmd(&build_args(&s(&tree), &s(&out), "second")).ok();
    assert_eq!(staging_dirs(&parent, "layout"), Vec::<String>::new());
}

#[test]
fn a_directory_that_is_not_a_layout_is_never_written_into() {
    let tmp = tempfile::tempdir().unwrap();
    let tree = tmp.path().join("tree");
    generate_bulk(&tree, 10 << 10);
    let home = tmp.path().join("home");
    std::fs::create_dir(&home).unwrap();
    std::fs::write(home.join("notes"), b"mine").unwrap();
    build_cmd(&build_args(&s(&tree), &s(&home), "m")).refused(1, "is not an OCI layout");
    assert_eq!(snapshot(&home).into_keys().collect::<Vec<_>>(), ["notes"]);
    assert_eq!(staging_dirs(tmp.path(), "home"), Vec::<String>::new());
}

/// A module that declares a unit its tree lacks, or a role that does not exist, is never
/// built: a node must not meet either when it attaches the module.
#[test]
fn a_missing_unit_or_an_unknown_role_is_refused_before_anything_is_written() {
    let tmp = tempfile::tempdir().unwrap();
    let tree = tmp.path().join("tree");
    generate_bulk(&tree, 10 << 10);
    let out = tmp.path().join("layout");
    let (tree_s, out_s) = (s(&tree), s(&out));
    let mut args = build_args(&tree_s, &out_s, "m");
    args.extend(["--role", "opt", "--unit", "web.service"]);
    build_cmd(&args)
        .refused(1, "unit web.service is declared but usr/lib/systemd/system/web.service is not in the tree");
    let mut args = build_args(&tree_s, &out_s, "m");
    args.extend(["--role", "sidecar"]);
    build_cmd(&args).refused(2, "sidecar");
    assert!(!out.exists(), "nothing written");
    assert_eq!(staging_dirs(tmp.path(), "layout"), Vec::<String>::new());
}

/// A loopback port nothing listens on (bound by the kernel's choice, then closed).
fn closed_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// A built layout, a key pair, and the pinned digest of the module.
struct Module {
    tmp: tempfile::TempDir,
    layout: PathBuf,
    key: PathBuf,
    digest: String,
}

fn module() -> Module {
    let tmp = tempfile::tempdir().unwrap();
    let tree = tmp.path().join("tree");
    generate_bulk(&tree, 10 << 10);
    let layout = tmp.path().join("layout");
    let printed = build_cmd(&build_args(&s(&tree), &s(&layout), "m")).ok();
    let digest = printed.rsplit('@').next().unwrap().to_owned();
    let keys = tmp.path().join("keys");
    build_cmd(&["keys", "generate", "--out", &s(&keys)]).ok();
    Module { key: keys.join("ironroot.key"), tmp, layout, digest }
}

#[test]
fn push_and_sign_to_an_unreachable_registry_are_transport_failures() {
    let m = module();
    let host = format!("127.0.0.1:{}", closed_port());
    build_cmd(&["module", "push", &s(&m.layout), &format!("{host}/m/x:1")]).refused(13, &host);
    build_cmd(&["module", "sign", &format!("{host}/m/x@{}", m.digest), "--key", &s(&m.key)]).refused(13, &host);
    let json = build_cmd(&["module", "push", &s(&m.layout), &format!("{host}/m/x:1"), "--output", "json"]);
    let v: serde_json::Value = serde_json::from_str(json.stdout.trim()).expect("json");
    assert_eq!(v["kind"], "transport", "{v}");
}

#[test]
fn refused_registry_credentials_are_transport_failures() {
    let reg = TestRegistry::start_with(Auth::TlsBasic("builder", "s3cret"));
    let ca = reg.ca_pem.clone().expect("ca");
    let m = module();
    let repo = format!("{}/m/auth", reg.host());
    let run = |args: &[&str], password: &str| -> Run {
        Command::new(binary())
            .args(args)
            .args(["--registry-ca", &s(&ca), "--registry-user", "builder"])
            .env("IRONROOT_REGISTRY_PASSWORD", password)
            .output()
            .expect("run")
            .into()
    };
    let push = run(&["module", "push", &s(&m.layout), &format!("{repo}:1")], "wrong");
    assert_eq!(push.code, 13, "{}", push.stderr);
    assert!(push.stderr.contains("401 Unauthorized"), "{}", push.stderr);
    let pinned = run(&["module", "push", &s(&m.layout), &format!("{repo}:1")], "s3cret").ok();
    let sign = run(&["module", "sign", &pinned, "--key", &s(&m.key)], "wrong");
    assert_eq!(sign.code, 13, "{}", sign.stderr);
    assert!(sign.stderr.contains("401"), "{}", sign.stderr);
    // The password is never an argument.
    let argv = build_cmd(&["module", "push", &s(&m.layout), &format!("{repo}:1"), "--registry-password", "s3cret"]);
    assert_eq!(argv.code, 2, "{}", argv.stderr);
}

#[test]
fn signing_what_is_not_a_module_is_a_policy_refusal() {
    let m = module();
    let manifest: serde_json::Value = serde_json::from_slice(
        &std::fs::read(m.layout.join("blobs/sha256").join(m.digest.trim_start_matches("sha256:"))).unwrap(),
    )
    .unwrap();
    let config = manifest["config"]["digest"].as_str().unwrap().to_owned();
    build_cmd(&["module", "sign", &format!("oci:{}@{config}", m.layout.display()), "--key", &s(&m.key)])
        .refused(12, "is not an ironroot module");
    build_cmd(&["module", "sign", &format!("oci:{}:1", m.layout.display()), "--key", &s(&m.key)])
        .refused(1, "sign needs REF@sha256");
    drop(m.tmp);
}

#[test]
fn kernel_fetch_from_an_unreachable_archive_is_a_transport_failure() {
    let tmp = tempfile::tempdir().unwrap();
    let mirror = format!("http://127.0.0.1:{}/debian", closed_port());
    let out = tmp.path().join("kernel");
    build_cmd(&["kernel", "fetch", "--mirror", &mirror, "--apt-dir", &s(&tmp.path().join("apt")), "--out", &s(&out)])
        .refused(13, "could not fetch from the archive");
    assert!(!out.exists());
}
