//! The QEMU tier's node-runtime scenarios share these: modules built from trees and published
//! in the lab registry, roots made from `just image`'s root.tar with a unit of their own, and
//! the plane's receipts, tasks and journal as the scenarios read them.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::cli::build_cmd;
use crate::vm::{Vm, VmLab, workspace};

/// How long a change (fetch, verify, swap or soft reboot, health gate) may take in TCG.
pub const CHANGE: Duration = Duration::from_secs(300);

/// `ironroot-build module build` of `tree` as `name` `version`/`serial` with `flags`; the layout.
pub fn build(lab: &VmLab, tree: &Path, name: &str, version: &str, serial: u64, flags: &[&str]) -> PathBuf {
    let layout = lab.work.path().join(format!("built-{name}-{version}"));
    let (tree_s, layout_s, serial_s) =
        (tree.to_string_lossy().into_owned(), layout.to_string_lossy().into_owned(), serial.to_string());
    let mut args =
        vec!["module", "build", "--from", &tree_s, "--name", name, "--version", version, "--serial", &serial_s];
    args.extend_from_slice(flags);
    args.extend_from_slice(&["--out", &layout_s]);
    build_cmd(&args).ok();
    layout
}

/// The node root `just image` built (target/image/root.tar), extracted under the lab as `name`.
pub fn root_tree(lab: &VmLab, name: &str) -> PathBuf {
    let tree = lab.work.path().join(name);
    std::fs::create_dir_all(&tree).unwrap();
    let tar = workspace().join("target/image/root.tar");
    let status = std::process::Command::new("tar")
        .args(["--numeric-owner", "--xattrs", "-xf"])
        .arg(&tar)
        .arg("-C")
        .arg(&tree)
        .status()
        .unwrap();
    assert!(status.success(), "extracting {}", tar.display());
    tree
}

/// A root unit that says `line` on the console and stays active, or fails when `fails`.
pub fn root_unit(tree: &Path, line: &str, fails: bool) {
    let units = tree.join("usr/lib/systemd/system");
    let exec = if fails { format!("/bin/sh -c 'echo {line}; exit 1'") } else { format!("/bin/echo {line}") };
    let unit = format!(
        "[Unit]\nDescription=ironroot test: a root's own service\n\n[Service]\nType=oneshot\n\
         RemainAfterExit=yes\nExecStart={exec}\nStandardOutput=journal+console\n\n\
         [Install]\nWantedBy=multi-user.target\n"
    );
    std::fs::write(units.join("root-hello.service"), unit).unwrap();
    let wants = tree.join("etc/systemd/system/multi-user.target.wants");
    std::fs::create_dir_all(&wants).unwrap();
    let link = wants.join("root-hello.service");
    let _ = std::fs::remove_file(&link);
    std::os::unix::fs::symlink("/usr/lib/systemd/system/root-hello.service", link).unwrap();
}

/// Builds the root `tree` with `root_unit` saying `ROOT version=SERIAL` as base `serial`;
/// pushes and signs it in the base repository. The guest's reference.
pub fn root_version(lab: &VmLab, tree: &Path, serial: u64, fails: bool) -> String {
    root_unit(tree, &format!("ROOT version={serial}"), fails);
    let layout = build(lab, tree, "base", &format!("root-{serial}"), serial, &["--unit", "root-hello.service"]);
    lab.publish(&layout, "keys", "base").0
}

/// Waits until the console's last `later` comes after its last `earlier` (a unit's start shows
/// there a moment after the receipt that restarted it).
pub fn said_after(vm: &Vm, later: &str, earlier: &str) {
    let deadline = Instant::now() + CHANGE;
    loop {
        let console = vm.console();
        if console.rfind(later) > console.rfind(earlier) {
            return;
        }
        assert!(Instant::now() < deadline, "{later:?} not said after {earlier:?}: {}", vm.console_tail(60));
        std::thread::sleep(Duration::from_secs(1));
    }
}

/// The node's receipts as the plane keeps them, oldest first.
pub fn receipts(lab: &VmLab, node: &str) -> Vec<serde_json::Value> {
    let run = lab.plane.op(&["node", "receipts", node, "--json"]);
    serde_json::from_str::<serde_json::Value>(&run.stdout).ok().and_then(|v| v.as_array().cloned()).unwrap_or_default()
}

/// Waits for the `n`th receipt of the node; returns it.
pub fn nth_receipt(lab: &VmLab, vm: &Vm, node: &str, n: usize) -> serde_json::Value {
    nth_receipt_where(vm, n, "", || receipts(lab, node))
}

/// The `n`th (from 1) of the node's receipts for `module`, waiting up to [`CHANGE`] for it:
/// other modules' receipts may come between (a live module attached again in a new root).
pub fn nth_receipt_of(lab: &VmLab, vm: &Vm, node: &str, module: &str, n: usize) -> serde_json::Value {
    nth_receipt_where(vm, n, &format!(" of {module}"), || receipts_of(lab, node, module))
}

/// Polls `list` until it holds `n` receipts (`what` says which, in the failure); the `n`th.
fn nth_receipt_where(vm: &Vm, n: usize, what: &str, list: impl Fn() -> Vec<serde_json::Value>) -> serde_json::Value {
    let deadline = Instant::now() + CHANGE;
    loop {
        let all = list();
        if all.len() >= n {
            return all[n - 1].clone();
        }
        assert!(
            Instant::now() < deadline,
            "no receipt #{n}{what} within {CHANGE:?}: {all:?}\nconsole tail:\n{}",
            vm.console_tail(60)
        );
        std::thread::sleep(Duration::from_secs(2));
    }
}

/// The node's receipts for `module`, oldest first.
pub fn receipts_of(lab: &VmLab, node: &str, module: &str) -> Vec<serde_json::Value> {
    receipts(lab, node).into_iter().filter(|r| r["module"] == module).collect()
}

/// The plane's view of `node` now.
pub fn view(lab: &VmLab, node: &str) -> serde_json::Value {
    serde_json::from_str(&lab.plane.op(&["node", "show", node, "--json"]).ok()).unwrap()
}

/// The task `id` of `node` as `task list` shows it.
pub fn task(lab: &VmLab, node: &str, id: &str) -> serde_json::Value {
    let all: serde_json::Value = serde_json::from_str(&lab.plane.op(&["task", "list", node]).ok()).unwrap();
    all.as_array().and_then(|a| a.iter().find(|t| t["id"] == id).cloned()).unwrap_or_default()
}

/// One journal record as `audit list` prints it: sequence, actor, kind, subject, data.
#[derive(Debug, Clone)]
pub struct Entry {
    pub seq: u64,
    pub actor: String,
    pub kind: String,
    pub subject: String,
    pub data: serde_json::Value,
}

/// The plane's whole journal, oldest first.
pub fn journal(lab: &VmLab) -> Vec<Entry> {
    let listed = lab.plane.op(&["audit", "list"]).ok();
    listed
        .lines()
        .map(|line| {
            let mut f = line.split_whitespace();
            let mut next = || f.next().unwrap_or_default().to_owned();
            let (seq, _time, actor, kind, subject) = (next(), next(), next(), next(), next());
            // Subjects never hold a brace; the data is the JSON from the first one.
            let rest = line.find('{').map_or("null", |at| &line[at..]);
            Entry {
                seq: seq.parse().unwrap(),
                actor,
                kind,
                subject,
                data: serde_json::from_str(rest.trim()).unwrap_or(serde_json::Value::Null),
            }
        })
        .collect()
}
