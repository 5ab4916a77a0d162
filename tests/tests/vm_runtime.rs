//! Tier 3, the node runtime: one node booted from what `just image` built, then live module
//! transactions on it while it runs (no reboot) — attach an `opt` module whose unit starts,
//! update it (units restarted, receipt), an update whose health check fails is rolled back by
//! itself with the reason, a `kill -9` of the agent mid-update leaves the old version whole,
//! detach; an `ext` module at its own mount point gated by an HTTP probe, and an update whose
//! probe answers 503 rolled back; then root updates by soft reboot on the same node, the `ext`
//! module attached again in each new root — a new root committed after its
//! trial, a root whose unit fails rolled back by the node itself, and a root whose agent never
//! starts left by the trial guard at its deadline. Assertions read the plane's receipts, node
//! view and rollout status.

#![allow(clippy::unwrap_used, clippy::expect_used, reason = "tests stop loudly on a failed setup step")]

use std::path::Path;
use std::time::Duration;

use ironroot_tests::runtime::{
    CHANGE, build, nth_receipt, nth_receipt_of, receipts, receipts_of, root_tree, root_version, said_after,
};
use ironroot_tests::vm::{IdentityVia, Vm, VmLab};

const BOOT: Duration = Duration::from_secs(600);

/// Health checks the `hello` versions ship.
const PASSES: &str = "#!/bin/sh\nexit 0\n";
const FAILS: &str = "#!/bin/sh\necho 'not today' >&2\nexit 1\n";
/// `kill -9` of the agent in the middle of its health gate (the unit restarts it).
const KILLS_THE_AGENT: &str = "#!/bin/sh\nfor p in /proc/[0-9]*; do\n    \
    [ \"$(cat $p/comm 2>/dev/null)\" = ironroot-agent ] && kill -9 \"${p#/proc/}\"\ndone\nsleep 60\n";

/// The template's trial deadline (seconds): root 2's trial passes well within it in TCG, and the
/// guard of root 4 acts 60 s after it.
const TRIAL_DEADLINE_S: u64 = 150;

/// The `hello` module's tree at `version`: a service that says its version on the console and
/// keeps running, and the health check `check`.
fn hello_tree(dir: &Path, version: &str, check: &str) -> std::path::PathBuf {
    let tree = dir.join(format!("hello-{version}"));
    let units = tree.join("usr/lib/systemd/system");
    std::fs::create_dir_all(&units).unwrap();
    std::fs::create_dir_all(tree.join("bin")).unwrap();
    let unit = "[Unit]\nDescription=ironroot test: a live module's service\n\n[Service]\n\
                ExecStart=/opt/hello/bin/hello\nStandardOutput=journal+console\n";
    std::fs::write(units.join("hello.service"), unit).unwrap();
    let hello = format!("#!/bin/sh\necho \"HELLO version={version}\"\nexec sleep infinity\n");
    for (name, body) in [("hello", hello.as_str()), ("check", check)] {
        let path = tree.join("bin").join(name);
        std::fs::write(&path, body).unwrap();
        std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    }
    tree
}

/// The `web` module's tree at `version`: an `ext` module mounted at /srv/web whose service
/// (ironroot-test-http) answers HTTP on 127.0.0.1:8080 with `status`.
fn web_tree(dir: &Path, version: &str, status: u16) -> std::path::PathBuf {
    let tree = dir.join(format!("web-{version}"));
    let units = tree.join("usr/lib/systemd/system");
    std::fs::create_dir_all(&units).unwrap();
    std::fs::create_dir_all(tree.join("bin")).unwrap();
    let unit = format!(
        "[Unit]\nDescription=ironroot test: an ext module's HTTP service\n\n[Service]\n\
         ExecStart=/srv/web/bin/web 8080 {version} {status}\nStandardOutput=journal+console\n"
    );
    std::fs::write(units.join("web.service"), unit).unwrap();
    std::fs::copy(ironroot_tests::cli::binary_named("ironroot-test-http"), tree.join("bin/web")).unwrap();
    tree
}

/// Builds, signs and pushes `web` at `version`/`serial` (role `ext`, its own mount point, an
/// HTTP health probe); the guest's reference.
fn web(lab: &VmLab, version: &str, serial: u64, status: u16) -> String {
    let tree = web_tree(lab.work.path(), version, status);
    let flags = [
        "--role",
        "ext",
        "--mount",
        "/srv/web",
        "--unit",
        "web.service",
        "--health-http",
        "8080/healthz",
        "--health-deadline",
        "30",
    ];
    let layout = build(lab, &tree, "web", version, serial, &flags);
    lab.publish(&layout, "keys", "web").0
}

/// Builds, signs and pushes `hello` at `version`/`serial`; the guest's reference.
fn hello(lab: &VmLab, version: &str, serial: u64, check: &str) -> String {
    let tree = hello_tree(lab.work.path(), version, check);
    let flags =
        ["--role", "opt", "--unit", "hello.service", "--health-cmd", "/opt/hello/bin/check", "--health-deadline", "30"];
    let layout = build(lab, &tree, "hello", version, serial, &flags);
    // One repository for every version: the plane names a module by its repository.
    lab.publish(&layout, "keys", "hello").0
}

#[test]
fn live_modules_attach_update_roll_back_and_detach_without_a_reboot() {
    let lab = VmLab::start();
    let node = "vm-live";
    // A trial deadline short enough for the guard scenario (a root whose agent never starts).
    let base = format!("{},serial=1", lab.guest_reference);
    let deadline = TRIAL_DEADLINE_S.to_string();
    lab.plane.op(&["template", "create", "base", "--module", &base, "--trial-deadline", &deadline]).ok();
    let token = lab.plane.op(&["token", "create", "--node", node, "--template", "base"]).ok().trim().to_owned();
    let mut vm = lab.boot(node, &token, IdentityVia::FwCfg, false);
    let booted = lab.wait_for(&mut vm, node, BOOT, |v| v["state"] == "running" && v["phase"] == "ready");

    // Attach: the unit the module ships starts from /opt/hello.
    let v1 = hello(&lab, "1", 1, PASSES);
    lab.plane.op(&["template", "add", "base", "--module", &format!("{v1},serial=1")]).ok();
    let r = nth_receipt(&lab, &vm, node, 1);
    assert_eq!((r["module"].as_str(), r["outcome"].as_str()), (Some("hello"), Some("committed")), "{r}");
    assert!(r["from"].is_null(), "a first attach: {r}");
    assert_eq!(r["units"], serde_json::json!(["hello.service"]), "{r}");
    assert_eq!(r["health"]["healthy"], true, "{r}");
    assert!(vm.console().contains("HELLO version=1"), "{}", vm.console_tail(40));

    // Update: mounted beside, swapped in, the unit restarted.
    let v2 = hello(&lab, "2", 2, PASSES);
    lab.plane.op(&["template", "add", "base", "--module", &format!("{v2},serial=2")]).ok();
    let r = nth_receipt(&lab, &vm, node, 2);
    assert_eq!(r["outcome"], "committed", "{r}");
    assert_eq!((r["from"]["serial"].as_u64(), r["to"]["serial"].as_u64()), (Some(1), Some(2)), "{r}");
    assert!(vm.console().contains("HELLO version=2"), "{}", vm.console_tail(40));

    // An update whose health check fails comes back to version 2 by itself, saying why.
    let v3 = hello(&lab, "3", 3, FAILS);
    lab.plane.op(&["template", "add", "base", "--module", &format!("{v3},serial=3")]).ok();
    let r = nth_receipt(&lab, &vm, node, 3);
    assert_eq!(r["outcome"], "rolled-back", "{r}");
    let reason = r["reason"].as_str().unwrap_or_default();
    assert!(reason.contains("check") && reason.contains("not today"), "{r}");
    let after = lab.wait_for(&mut vm, node, CHANGE, |v| v["heartbeats"].as_i64() > booted["heartbeats"].as_i64());
    said_after(&vm, "HELLO version=2", "HELLO version=3");
    assert_eq!(after["state"], "running", "{after}");

    // kill -9 of the agent in the middle of an update: systemd restarts it, it reads the open
    // transaction back from its journal and rolls it back — version 2, whole — and does not try
    // version 4 again on every restart.
    let v4 = hello(&lab, "4", 4, KILLS_THE_AGENT);
    lab.plane.op(&["template", "add", "base", "--module", &format!("{v4},serial=4")]).ok();
    let r = nth_receipt(&lab, &vm, node, 4);
    assert_eq!(r["outcome"], "rolled-back", "{r}");
    assert!(r["reason"].as_str().unwrap_or_default().contains("the agent stopped during the change"), "{r}");
    said_after(&vm, "HELLO version=2", "HELLO version=4");
    std::thread::sleep(Duration::from_secs(30));
    assert_eq!(receipts(&lab, node).len(), 4, "version 4 is not tried again");

    // Detach: the unit stops first, then the mount goes.
    lab.plane.op(&["template", "remove", "base", "hello"]).ok();
    let r = nth_receipt(&lab, &vm, node, 5);
    assert_eq!((r["outcome"].as_str(), r["to"].is_null()), (Some("committed"), true), "{r}");
    assert_eq!(r["from"]["serial"], 2, "{r}");
    assert!(!vm.console().contains("Kernel panic"), "{}", vm.console_tail(40));

    // An `ext` module at its declared mount point (its unit runs /srv/web/bin/web), gated by
    // an HTTP probe the service answers; an update whose service answers 503 goes back.
    let web1 = web(&lab, "1", 1, 200);
    lab.plane.op(&["template", "add", "base", "--module", &format!("{web1},serial=1")]).ok();
    let r = nth_receipt(&lab, &vm, node, 6);
    assert_eq!(
        (r["module"].as_str(), r["role"].as_str(), r["outcome"].as_str()),
        (Some("web"), Some("ext"), Some("committed")),
        "{r}"
    );
    assert_eq!(r["health"]["healthy"], true, "{r}");
    assert!(
        r["health"]["probe"].as_str().unwrap_or_default().contains("GET http://127.0.0.1:8080/healthz: 200"),
        "{r}"
    );
    assert!(vm.console().contains("WEB version=1 listening"), "{}", vm.console_tail(40));
    let web2 = web(&lab, "2", 2, 503);
    lab.plane.op(&["template", "add", "base", "--module", &format!("{web2},serial=2")]).ok();
    let r = nth_receipt(&lab, &vm, node, 7);
    assert_eq!((r["module"].as_str(), r["outcome"].as_str()), (Some("web"), Some("rolled-back")), "{r}");
    assert!(r["reason"].as_str().unwrap_or_default().contains("healthz: 503"), "{r}");
    said_after(&vm, "WEB version=1 listening", "WEB version=2 listening");
    // Pinned back to version 1, which the node runs (no change, no receipt): a moved generation
    // would otherwise try version 2 again. The plane wants the serial's drop said.
    let pin = format!("{web1},serial=1");
    lab.plane.op(&["template", "add", "base", "--module", &pin]).refused(3, "a rollback needs --allow-rollback");
    lab.plane.op(&["template", "add", "base", "--module", &pin, "--allow-rollback"]).ok();

    // The root updates with `web` live: it is attached again in each new root, before its gate.
    root_updates_by_soft_reboot(&lab, &mut vm, node);
}

/// Root updates on the running node: a new root entered by soft reboot passes its trial
/// (its own unit active) and is committed; a root whose unit fails is rolled back by the node
/// itself, soft-rebooting into the root before it, and not tried again. The live `web` module is
/// attached again (a receipt of its own) in each root its agent starts in.
fn root_updates_by_soft_reboot(lab: &VmLab, vm: &mut Vm, node: &str) {
    let tree = root_tree(lab, "root-tree");
    // A self-update: root 2 carries another build of the agent (bytes appended to the ELF file
    // change its digest, not what it does); the agent reports its executable's digest.
    let agent = tree.join("usr/bin/ironroot-agent");
    let mut bytes = std::fs::read(&agent).unwrap();
    bytes.extend_from_slice(b"\nironroot test: the agent of root 2\n");
    std::fs::write(&agent, &bytes).unwrap();
    let sum = std::process::Command::new("sha256sum").arg(&agent).output().unwrap();
    let new_agent = format!("0.1.0+exe.{}", &String::from_utf8_lossy(&sum.stdout)[..12]);
    let before = lab.plane.op(&["node", "show", node, "--json"]).stdout;
    let before: serde_json::Value = serde_json::from_str(&before).unwrap();
    assert_ne!(before["agent_version"], new_agent.as_str(), "{before}");
    let webs = vm.console().matches("WEB version=1 listening").count();
    let web_receipts = receipts_of(lab, node, "web").len();

    let v2 = root_version(lab, &tree, 2, false);
    lab.plane.op(&["template", "add", "base", "--module", &format!("{v2},serial=2")]).ok();
    let r = nth_receipt_of(lab, vm, node, "base", 1);
    assert_eq!((r["module"].as_str(), r["outcome"].as_str()), (Some("base"), Some("committed")), "{r}");
    assert_eq!((r["from"]["serial"].as_u64(), r["to"]["serial"].as_u64()), (Some(1), Some(2)), "{r}");
    assert!(r["units"].as_array().unwrap().iter().any(|u| u == "root-hello.service"), "{r}");
    assert!(r["units"].as_array().unwrap().iter().any(|u| u == "web.service"), "the live module gated too: {r}");
    let webs_now = vm.console().matches("WEB version=1 listening").count();
    assert!(webs_now > webs, "web started again in the new root: {}", vm.console_tail(60));
    let again = &receipts_of(lab, node, "web")[web_receipts..];
    assert!(
        again.iter().any(|w| w["outcome"] == "committed" && w["to"]["serial"] == 1),
        "web attached again in root 2, before its gate: {again:?}"
    );
    // Every part of the change, across the soft reboot: those before it carried in the new
    // root's record, the reboot itself on the kernel's monotonic clock.
    let parts: Vec<&str> =
        r["steps_ms"].as_object().map(|m| m.keys().map(String::as_str).collect()).unwrap_or_default();
    assert_eq!(parts, ["attach", "commit", "gate", "reboot", "stage", "verify"], "{r}");
    let reboot = r["steps_ms"]["reboot"].as_u64().unwrap_or_default();
    assert!((100..300_000).contains(&reboot), "a soft reboot takes more than nothing and less than its deadline: {r}");
    let console = vm.console();
    assert!(console.contains("ROOT version=2"), "the new root ran its own unit: {}", vm.console_tail(60));
    assert!(!console.contains("Kernel panic"), "{}", vm.console_tail(40));
    let v2_digest = v2.rsplit('@').next().unwrap().to_owned();
    let view = lab.wait_for(vm, node, CHANGE, |v| {
        v["phase"] == "ready" && v["module_digests"].as_array().is_some_and(|d| d.iter().any(|x| x == &*v2_digest))
    });
    assert_eq!(view["state"], "running", "{view}");
    assert_eq!(view["agent_version"], new_agent.as_str(), "the new root's agent heartbeats: {view}");
    assert!(r["reason"].is_null(), "committed whole (serial floor raised): {r}");
    assert_eq!(r["agent_version"], new_agent.as_str(), "{r}");

    // A root whose own unit fails: the trial fails, the node goes back to root 2 by itself.
    let v3 = root_version(lab, &tree, 3, true);
    lab.plane.op(&["template", "add", "base", "--module", &format!("{v3},serial=3")]).ok();
    let r = nth_receipt_of(lab, vm, node, "base", 2);
    assert_eq!((r["module"].as_str(), r["outcome"].as_str()), (Some("base"), Some("rolled-back")), "{r}");
    assert!(r["reason"].as_str().unwrap_or_default().contains("root-hello.service is failed"), "{r}");
    said_after(vm, "ROOT version=2", "ROOT version=3");
    let beats = lab.plane.op(&["node", "show", node, "--json"]).stdout;
    let beats = serde_json::from_str::<serde_json::Value>(&beats).unwrap()["heartbeats"].as_i64();
    let back = lab.wait_for(vm, node, CHANGE, |v| v["heartbeats"].as_i64() > beats);
    assert_eq!((back["state"].as_str(), back["phase"].as_str()), (Some("running"), Some("ready")), "{back}");
    std::thread::sleep(Duration::from_secs(30));
    assert_eq!(receipts_of(lab, node, "base").len(), 2, "root 3 is not tried again");
    assert!(!vm.console().contains("Kernel panic"), "{}", vm.console_tail(40));

    a_root_whose_agent_never_starts_is_left_by_its_guard(lab, vm, node, &tree, 3, &new_agent, &v2_digest);
}

/// Root 4's agent exits at once, so nothing in it ends the trial: the guard the agent of root 2
/// started before the soft reboot (a transient unit in survivors.slice) goes back to root 2
/// at the deadline plus its grace, and the receipt it journaled reaches the plane through root
/// 2's agent, halting the rollout. `nth`: that receipt is the node's nth of `base`.
fn a_root_whose_agent_never_starts_is_left_by_its_guard(
    lab: &VmLab,
    vm: &mut Vm,
    node: &str,
    tree: &Path,
    nth: usize,
    root2_agent: &str,
    root2: &str,
) {
    use std::os::unix::fs::PermissionsExt as _;
    let agent = tree.join("usr/bin/ironroot-agent");
    std::fs::write(&agent, "#!/bin/sh\necho 'ironroot test: the agent of root 4 exits' >&2\nexit 1\n").unwrap();
    std::fs::set_permissions(&agent, std::fs::Permissions::from_mode(0o755)).unwrap();
    let v4 = root_version(lab, tree, 4, false);
    lab.plane.op(&["template", "add", "base", "--module", &format!("{v4},serial=4")]).ok();
    let r = nth_receipt_of(lab, vm, node, "base", nth);
    assert_eq!((r["module"].as_str(), r["outcome"].as_str()), (Some("base"), Some("rolled-back")), "{r}");
    assert_eq!((r["from"]["serial"].as_u64(), r["to"]["serial"].as_u64()), (Some(2), Some(4)), "{r}");
    let reason = r["reason"].as_str().unwrap_or_default();
    assert!(reason.contains("its guard stopped ironroot-agent.service"), "{r}");
    assert!(reason.contains("it never started"), "the record of root 4 was never promoted: {r}");
    assert_eq!(r["agent_version"], root2_agent, "written by root 2's agent, the guard: {r}");
    assert_eq!(r["health"]["units"][0][0], "ironroot-agent.service", "{r}");
    let took = r["finished"].as_u64().unwrap() - r["started"].as_u64().unwrap();
    assert!(took >= TRIAL_DEADLINE_S + 60, "not before the deadline and the grace: {took} s: {r}");
    let console = vm.console();
    assert!(
        console.rfind("ROOT version=4") < console.rfind("ROOT version=2"),
        "back in root 2: {}",
        vm.console_tail(60)
    );

    // Root 2's agent heartbeats again, and the plane halted the rollout on the receipt.
    // (The plane's view of root 2 from before root 4 is still there: wait for a live one.)
    let back = lab.wait_for(vm, node, CHANGE, |v| {
        v["state"] == "running"
            && v["phase"] == "ready"
            && v["agent_version"] == root2_agent
            && v["module_digests"].as_array().is_some_and(|d| d.iter().any(|x| x == root2))
    });
    assert_eq!(back["state"], "running", "{back}");
    let status = lab.plane.op(&["rollout", "status", "base", "--json"]).stdout;
    let status: serde_json::Value = serde_json::from_str(&status).unwrap();
    assert_eq!(status["halted"]["node"], back["id"], "{status}");
    assert!(status["halted"]["reason"].as_str().unwrap_or_default().contains("rolled-back"), "{status}");
    assert!(!vm.console().contains("Kernel panic"), "{}", vm.console_tail(40));
}
