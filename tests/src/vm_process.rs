//! One QEMU process of the QEMU tier: qemu/boot.sh started with a console log and a stderr
//! file of its own, relaunched once when the emulator itself died before our init ran, and
//! stopped (by its PID, our own child) when dropped.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::vm::workspace;

fn s(p: &Path) -> String {
    p.to_string_lossy().into_owned()
}

/// The line PID 1 of our initramfs prints first: before it, nothing of ours has run.
const AGENT_STARTED: &str = "ironroot: initramfs agent starting";

#[derive(Debug)]
pub struct Vm {
    pub(crate) child: Child,
    pub log: PathBuf,
    /// QEMU's (and qemu/boot.sh's) stderr.
    pub stderr: PathBuf,
    work: PathBuf,
    node: String,
    args: Vec<String>,
    relaunched: bool,
}

/// A path under `dir` named `stem[-N].ext` that does not exist yet.
fn fresh(dir: &Path, stem: &str, ext: &str) -> PathBuf {
    let mut path = dir.join(format!("{stem}.{ext}"));
    for n in 2.. {
        if !path.exists() {
            break;
        }
        path = dir.join(format!("{stem}-{n}.{ext}"));
    }
    path
}

impl Vm {
    /// Runs qemu/boot.sh with `args` (everything but `--log`), console and stderr in `work`.
    pub(crate) fn spawn(work: &Path, node: &str, args: Vec<String>) -> Vm {
        let log = fresh(work, &format!("console-{node}"), "log");
        let stderr = fresh(work, &format!("qemu-{node}"), "err");
        let child = Command::new(workspace().join("qemu/boot.sh"))
            .args(["--log", &s(&log)])
            .args(&args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&stderr).expect("QEMU stderr file"))
            .spawn()
            .expect("starting qemu/boot.sh");
        Vm { child, log, stderr, work: work.to_path_buf(), node: node.to_owned(), args, relaunched: false }
    }

    /// QEMU itself died by a signal (an emulator fault: TCG has aborted a handful of times in
    /// CI while the guest kernel was still probing PCI) before our initramfs printed a line.
    /// Nothing of ours ran, so nothing is hidden by booting again — once.
    pub(crate) fn emulator_crashed(&self, status: std::process::ExitStatus) -> bool {
        use std::os::unix::process::ExitStatusExt as _;
        status.signal().is_some() && !self.relaunched && !self.console().contains(AGENT_STARTED)
    }

    pub(crate) fn relaunch(&mut self) {
        eprintln!(
            "{}: QEMU died before the guest ran our init ({:?}); booting again once\nQEMU stderr:\n{}\nconsole tail:\n{}",
            self.node,
            self.child.try_wait(),
            self.stderr_tail(20),
            self.console_tail(10)
        );
        let mut next = Vm::spawn(&self.work, &self.node, std::mem::take(&mut self.args));
        next.relaunched = true;
        *self = next;
    }

    pub fn stderr_tail(&self, n: usize) -> String {
        let text = String::from_utf8_lossy(&std::fs::read(&self.stderr).unwrap_or_default()).into_owned();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(n)..].join("\n")
    }

    pub fn console(&self) -> String {
        String::from_utf8_lossy(&std::fs::read(&self.log).unwrap_or_default()).into_owned()
    }

    pub fn console_tail(&self, n: usize) -> String {
        let text = self.console();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(n)..].join("\n")
    }

    /// Waits for QEMU to exit by itself (a refused boot reboots, and -no-reboot ends QEMU).
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<i32> {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                return status.code();
            }
            std::thread::sleep(Duration::from_millis(500));
        }
        None
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        // Our own child (qemu/boot.sh execs timeout, which forwards SIGTERM to QEMU; SIGKILL
        // would orphan QEMU), unless it already ended.
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = Command::new("kill").arg(self.child.id().to_string()).stderr(Stdio::null()).status();
        }
        let _ = self.child.wait();
    }
}
