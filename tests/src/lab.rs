//! A node's world on loopback for the agent's boot pipeline: the real registry and reference
//! plane, a signed module built from a generated tree and pushed, a template naming it, and
//! fixture boot roots (`proc/cmdline`, `etc/ironroot/…`, `persist/`) the real agent boots from
//! inside a private mount namespace. The namespace lives as long as a waiting shell, whose
//! `/proc/PID/root` lets the test read the mounted root back.

use std::io::{BufRead as _, BufReader, Write as _};
use std::os::unix::fs::{MetadataExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};

use crate::cli::{binary_named, build_cmd};
use crate::plane::TestPlane;
use crate::registry::TestRegistry;
use crate::tree::{TreeOptions, generate};

fn s(p: &Path) -> String {
    p.to_string_lossy().into_owned()
}

/// Registry + plane + one signed module in the registry, assigned by template `base`.
pub struct Lab {
    pub registry: TestRegistry,
    pub plane: TestPlane,
    pub work: tempfile::TempDir,
    pub tree: PathBuf,
    /// `127.0.0.1:PORT/ironroot/base@sha256:…` of the module built at start.
    pub reference: String,
}

impl std::fmt::Debug for Lab {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Lab({})", self.reference)
    }
}

impl Lab {
    pub fn start() -> Self {
        crate::tools::require_root();
        let registry = TestRegistry::start();
        let plane = TestPlane::start(&[]);
        let work = tempfile::Builder::new().prefix("ironroot-lab-").tempdir().expect("lab dir");
        let tree = work.path().join("tree");
        generate(&tree, &TreeOptions { hardlinks: true, devices: false });
        build_cmd(&["keys", "generate", "--out", &s(&work.path().join("keys"))]).ok();
        build_cmd(&["keys", "generate", "--out", &s(&work.path().join("other-keys"))]).ok();
        let mut lab = Self { registry, plane, work, tree, reference: String::new() };
        lab.reference = lab.publish(&lab.tree.clone(), "base", 5, "keys");
        lab.assign(&lab.reference.clone(), 5);
        lab
    }

    pub fn key(&self, dir: &str, file: &str) -> PathBuf {
        self.work.path().join(dir).join(file)
    }

    /// Builds `tree` as module `name` with `serial`, signs it with the key in `keys_dir`, pushes
    /// it; returns its pinned registry reference.
    pub fn publish(&self, tree: &Path, name: &str, serial: u64, keys_dir: &str) -> String {
        self.publish_as(tree, name, serial, keys_dir, "root")
    }

    /// [`Lab::publish`] with a mount role (`root`, `usr`, `opt`).
    pub fn publish_as(&self, tree: &Path, name: &str, serial: u64, keys_dir: &str, role: &str) -> String {
        let layout = self.work.path().join(format!("layout-{name}-{serial}-{keys_dir}"));
        let (tree, version, serial_s, out) = (s(tree), format!("1.{serial}"), serial.to_string(), s(&layout));
        let args = ["module", "build", "--from", &tree, "--name", name, "--version", &version];
        let printed = build_cmd(&[&args[..], &["--serial", &serial_s, "--role", role, "--out", &out]].concat()).ok();
        let digest = printed.rsplit('@').next().expect("digest").to_owned();
        let local = format!("oci:{}@{digest}", layout.display());
        build_cmd(&["module", "sign", &local, "--key", &s(&self.key(keys_dir, "ironroot.key"))]).ok();
        let repo = format!("{}/ironroot/{name}", self.registry.host());
        build_cmd(&["module", "push", &local, &format!("{repo}:{serial}")]).ok();
        format!("{repo}@{digest}")
    }

    /// Points template `base` at `reference` with plane floor `serial`.
    pub fn assign(&self, reference: &str, serial: u64) {
        self.plane.op(&["template", "create", "base", "--module", &format!("{reference},serial={serial}")]).ok();
    }

    pub fn token(&self, node: &str) -> String {
        self.plane.op(&["token", "create", "--node", node, "--template", "base"]).ok()
    }

    /// A boot root whose kernel command line carries `cmdline` plus the lab's plane, CA and
    /// trust key (paths inside the root).
    pub fn node_root(&self, cmdline: &str) -> NodeRoot {
        let dir = tempfile::Builder::new().prefix("ironroot-node-").tempdir().expect("node root");
        let etc = dir.path().join("etc/ironroot");
        std::fs::create_dir_all(&etc).expect("etc");
        std::fs::create_dir_all(dir.path().join("proc")).expect("proc");
        std::fs::create_dir_all(dir.path().join("persist")).expect("persist");
        std::fs::copy(self.plane.dir().join("ca.pem"), etc.join("plane-ca.pem")).expect("ca");
        std::fs::copy(self.key("keys", "ironroot.pub"), etc.join("trust.pem")).expect("trust");
        let line = format!(
            "console=ttyS0 ironroot.plane={} ironroot.plane_ca=/etc/ironroot/plane-ca.pem \
             ironroot.trust=/etc/ironroot/trust.pem ironroot.verity=optional {cmdline}\n",
            self.plane.url("")
        );
        std::fs::write(dir.path().join("proc/cmdline"), line).expect("cmdline");
        NodeRoot { dir }
    }
}

#[derive(Debug)]
pub struct NodeRoot {
    pub dir: tempfile::TempDir,
}

impl NodeRoot {
    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Rewrites the command line (keeps nothing of the old one).
    pub fn set_cmdline(&self, line: &str) {
        std::fs::write(self.path().join("proc/cmdline"), line).expect("cmdline");
    }

    /// Runs `ironroot-agent boot` in a private mount namespace that stays alive until the
    /// returned [`Booted`] is dropped.
    pub fn boot(&self, extra: &[&str]) -> Booted {
        let root = self.path();
        let agent = binary_named("ironroot-agent");
        let script = format!(
            "{} boot --root {} --retries 3 --retry-first-ms 50 {} >{r}/boot.out 2>{r}/boot.err; echo $? >{r}/boot.code; echo done; read _",
            agent.display(),
            root.display(),
            extra.join(" "),
            r = root.display()
        );
        let mut child = Command::new("unshare")
            .args(["--mount", "--propagation", "private", "sh", "-c", &script])
            .env("IRONROOT_LOG", "info")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("unshare");
        let mut line = String::new();
        BufReader::new(child.stdout.take().expect("stdout")).read_line(&mut line).expect("boot finished");
        let read = |f: &str| std::fs::read_to_string(root.join(f)).unwrap_or_default();
        let code = read("boot.code").trim().parse().unwrap_or(-1);
        let stdin = child.stdin.take();
        Booted { code, stdout: read("boot.out"), stderr: read("boot.err"), child, stdin, root: root.to_owned() }
    }
}

/// A finished boot whose mount namespace is still alive.
pub struct Booted {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
    child: Child,
    stdin: Option<ChildStdin>,
    root: PathBuf,
}

impl std::fmt::Debug for Booted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Booted(exit {})", self.code)
    }
}

impl Booted {
    /// Asserts success and returns boot.json as the agent printed it.
    pub fn record(&self) -> serde_json::Value {
        assert_eq!(self.code, 0, "boot failed:\n{}", self.stderr);
        serde_json::from_str(self.stdout.trim()).expect("boot record on stdout")
    }

    /// `path` (absolute, inside the boot root) as the namespace sees it.
    pub fn inside(&self, path: &Path) -> PathBuf {
        let rel = path.strip_prefix("/").unwrap_or(path);
        PathBuf::from(format!("/proc/{}/root", self.child.id())).join(rel)
    }

    /// The boot root's `sysroot` as the namespace sees it.
    pub fn sysroot(&self) -> PathBuf {
        self.inside(&self.root.join("sysroot"))
    }

    /// Mount points under the boot root in the namespace. Panics when the namespace's mount
    /// table cannot be read or lists no `/` (the namespace is gone): "nothing mounted" must
    /// come from a table that was read.
    pub fn mounts(&self) -> Vec<String> {
        let path = format!("/proc/{}/mountinfo", self.child.id());
        let table = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("reading {path}: {e}"));
        let points: Vec<&str> = table.lines().filter_map(|l| l.split(' ').nth(4)).collect();
        assert!(points.contains(&"/"), "{path} lists no root mount; is the namespace gone?\n{table}");
        let root = s(&self.root);
        points.into_iter().filter(|m| m.starts_with(&root)).map(str::to_owned).collect()
    }
}

impl Drop for Booted {
    fn drop(&mut self) {
        if let Some(mut stdin) = self.stdin.take() {
            let _closed = stdin.write_all(b"\n"); // the shell may have gone already
        }
        let _reaped = self.child.wait(); // the namespace (and its mounts) goes with the shell
    }
}

/// Compares `mounted` with `source`: every entry's type, mode, owner, size, bytes and link
/// target. Returns the number of entries compared.
pub fn compare_trees(source: &Path, mounted: &Path) -> usize {
    let mut n = 0;
    let mut stack = vec![PathBuf::new()];
    while let Some(rel) = stack.pop() {
        let (a, b) = (source.join(&rel), mounted.join(&rel));
        let (ma, mb) = (
            std::fs::symlink_metadata(&a).expect("source entry"),
            std::fs::symlink_metadata(&b)
                .unwrap_or_else(|e| panic!("{} missing in the mounted root: {e}", rel.display())),
        );
        let what = rel.display();
        assert_eq!(ma.file_type(), mb.file_type(), "{what}: type");
        assert_eq!(ma.permissions().mode(), mb.permissions().mode(), "{what}: mode");
        assert_eq!((ma.uid(), ma.gid()), (mb.uid(), mb.gid()), "{what}: owner");
        if ma.is_file() {
            assert_eq!(ma.len(), mb.len(), "{what}: size");
            assert!(
                std::fs::read(&a).expect("read") == std::fs::read(&b).expect("read through the mount"),
                "{what}: bytes"
            );
        } else if ma.file_type().is_symlink() {
            assert_eq!(std::fs::read_link(&a).expect("link"), std::fs::read_link(&b).expect("link"), "{what}: target");
        } else if ma.is_dir() {
            let mut names: Vec<_> =
                std::fs::read_dir(&a).expect("dir").map(|e| e.expect("entry").file_name()).collect();
            let mut other: Vec<_> =
                std::fs::read_dir(&b).expect("dir").map(|e| e.expect("entry").file_name()).collect();
            names.sort();
            other.sort();
            assert_eq!(names, other, "{what}: entries");
            stack.extend(names.into_iter().map(|name| rel.join(name)));
        }
        n += 1;
    }
    n
}

/// Every regular file under `dir`, recursively.
pub fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_owned()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            match e.file_type() {
                Ok(t) if t.is_dir() => stack.push(e.path()),
                Ok(t) if t.is_file() => out.push(e.path()),
                _ => {}
            }
        }
    }
    out
}

/// Objects in the store at `dir`: its regular files outside `images/` and `evidence/`.
pub fn objects_in(dir: &Path) -> usize {
    let kept = |p: &PathBuf| !p.strip_prefix(dir).is_ok_and(|r| r.starts_with("images") || r.starts_with("evidence"));
    files_under(dir).iter().filter(|p| kept(p)).count()
}
