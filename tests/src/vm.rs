//! Tier 3: QEMU (TCG) boots the artifacts `just image` built (target/image: the kernel, the
//! release agent, the signed base module) against a real plane and a TLS registry on the host
//! loopback. The guest reaches only those two ports (slirp restrict=on): booted by qemu/boot.sh
//! --forward, or by the plane's QEMU provider (`node provision`, the same command line shape).
//!
//! Each lab writes its own initramfs (same builder, same agent) that trusts the lab's signing
//! key and the lab registry's CA, and republishes the base module signed by that key, so tests
//! never touch target/image.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

pub use crate::vm_process::Vm;

use crate::cli::build_cmd;
use crate::plane::TestPlane;
use crate::registry::{Auth, TestRegistry};

fn s(p: &Path) -> String {
    p.to_string_lossy().into_owned()
}

/// The workspace root (tests/ is one level down).
pub fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("workspace").to_path_buf()
}

/// How the guest learns who it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IdentityVia {
    /// A JSON document over fw_cfg (`opt/ironroot/identity`).
    FwCfg,
    /// SMBIOS: type 1 UUID and serial, type 11 `io.ironroot.*` strings (q35).
    Smbios,
}

#[derive(Debug)]
pub struct VmLab {
    pub registry: TestRegistry,
    pub plane: TestPlane,
    pub work: tempfile::TempDir,
    /// vmlinuz, initrd.img, cmdline, boot.ipxe for this lab.
    pub bundle: PathBuf,
    /// The base module as the guest names it (`10.0.2.100:PORT/ironroot/base@sha256:…`).
    pub guest_reference: String,
    pub digest: String,
}

impl VmLab {
    pub fn start() -> Self {
        Self::start_with(&[])
    }

    /// [`VmLab::start`] with more `ironroot-plane serve` flags (`--cert-ttl 90s`).
    pub fn start_with(plane_flags: &[&str]) -> Self {
        Self::start_on("target/kernel", plane_flags)
    }

    /// A lab whose bundle boots the kernel `kernel fetch` put in `kernel_dir` (under the
    /// workspace): `target/kernel` (cloud) or `target/kernel-generic`.
    pub fn start_on(kernel_dir: &str, plane_flags: &[&str]) -> Self {
        crate::tools::require_root();
        let kernel = workspace().join(kernel_dir);
        let image = workspace().join("target/image");
        let agent = workspace().join("target/release/ironroot-agent");
        for needed in [kernel.join("vmlinuz"), image.join("base/index.json"), agent.clone()] {
            assert!(needed.exists(), "{} is missing: run `just image` first (`just test` does)", needed.display());
        }
        let registry = TestRegistry::start_with(Auth::Tls);
        let work = tempfile::Builder::new().prefix("ironroot-vm-").tempdir().expect("vm lab dir");
        for keys in ["keys", "other-keys"] {
            build_cmd(&["keys", "generate", "--out", &s(&work.path().join(keys))]).ok();
        }
        let ca = registry.ca_pem.clone().expect("TLS registry CA");

        let bundle = work.path().join("bundle");
        std::fs::create_dir_all(&bundle).expect("bundle dir");
        std::fs::copy(kernel.join("vmlinuz"), bundle.join("vmlinuz")).expect("vmlinuz");
        let cmdline = std::fs::read_to_string(image.join("cmdline")).expect("cmdline");
        std::fs::write(bundle.join("cmdline"), format!("{} ironroot.heartbeat=3\n", cmdline.trim())).expect("cmdline");
        std::fs::copy(image.join("boot.ipxe"), bundle.join("boot.ipxe")).expect("boot.ipxe");
        build_cmd(&[
            "initramfs",
            "--agent",
            &s(&agent),
            "--kernel",
            &s(&kernel),
            "--trust",
            &s(&work.path().join("keys/ironroot.pub")),
            "--registry-ca",
            &s(&ca),
            "--out",
            &s(&bundle.join("initrd.img")),
        ])
        .ok();
        std::fs::write(work.path().join("kernel-dir"), s(&kernel)).expect("kernel-dir");
        // The plane boots nodes itself from this bundle (`node provision`); machines it started
        // are powered off when the lab ends (VmLab's drop), and by their lifetime at the latest.
        let port = registry.host().rsplit(':').next().expect("registry port").to_owned();
        let bundle_s = s(&bundle);
        let mut flags = vec![
            "--name",
            "10.0.2.100",
            "--heartbeat-interval",
            "5s",
            "--provider",
            "qemu",
            "--bundle",
            &bundle_s,
            "--machine-forward",
            &port,
            "--machine-lifetime",
            "20m",
        ];
        flags.extend_from_slice(plane_flags);
        let plane = TestPlane::start(&flags);

        let mut lab = Self { registry, plane, work, bundle, guest_reference: String::new(), digest: String::new() };
        let (guest, digest) = lab.publish(&image.join("base"), "keys", "base");
        lab.guest_reference = guest;
        lab.digest = digest;
        lab
    }

    /// Another bundle beside the lab's, `bundle-NAME`: the same kernel, command line and
    /// boot.ipxe, an initramfs built with `initramfs_args` too (`--modules-from FILE`).
    pub fn variant(&self, name: &str, initramfs_args: &[&str]) -> PathBuf {
        let dir = self.work.path().join(format!("bundle-{name}"));
        std::fs::create_dir_all(&dir).expect("variant dir");
        for f in ["vmlinuz", "cmdline", "boot.ipxe"] {
            std::fs::copy(self.bundle.join(f), dir.join(f)).expect("bundle file");
        }
        let kernel = std::fs::read_to_string(self.work.path().join("kernel-dir")).expect("kernel-dir");
        let agent = s(&workspace().join("target/release/ironroot-agent"));
        let ca = s(&self.registry.ca_pem.clone().expect("TLS registry CA"));
        let (trust, out) = (s(&self.work.path().join("keys/ironroot.pub")), s(&dir.join("initrd.img")));
        let mut args = vec!["initramfs", "--agent", &agent, "--kernel", &kernel, "--trust", &trust];
        args.extend(["--registry-ca", &ca, "--out", &out]);
        args.extend_from_slice(initramfs_args);
        build_cmd(&args).ok();
        dir
    }

    /// Serves `bundle`'s files over HTTP on 127.0.0.1 (for `qemu/boot.sh --pxe-url`); returns
    /// the server (its requests, e.g. `GET /vmlinuz`) and its port.
    pub fn serve_bundle(bundle: &Path) -> (crate::http::Server, u16) {
        let dir = bundle.to_path_buf();
        let server = crate::http::Server::start(move |req, conn| {
            let name = req.path.trim_start_matches('/');
            let file = ["boot.ipxe", "vmlinuz", "initrd.img"].contains(&name).then(|| std::fs::read(dir.join(name)));
            match file {
                Some(Ok(body)) => crate::http::respond(conn, "200 OK", "application/octet-stream", &body),
                _ => crate::http::respond(conn, "404 Not Found", "text/plain", b"not found\n"),
            }
        });
        let port = server.addr().rsplit(':').next().and_then(|p| p.parse().ok()).expect("server port");
        (server, port)
    }

    /// Copies `layout`, signs its module with `keys_dir`'s key, pushes it as repository `repo`;
    /// returns the guest's reference and the digest.
    pub fn publish(&self, layout: &Path, keys_dir: &str, repo: &str) -> (String, String) {
        let built = layout.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        let copy = self.work.path().join(format!("layout-{repo}-{keys_dir}-{built}"));
        let out = Command::new("cp").arg("-a").arg(layout).arg(&copy).status().expect("cp");
        assert!(out.success(), "copying {}", layout.display());
        let index: serde_json::Value =
            serde_json::from_slice(&std::fs::read(copy.join("index.json")).expect("index.json")).expect("index json");
        let digest = index["manifests"][0]["digest"].as_str().expect("manifest digest").to_owned();
        let local = format!("oci:{}@{digest}", copy.display());
        let key = self.work.path().join(keys_dir).join("ironroot.key");
        build_cmd(&["module", "sign", &local, "--key", &s(&key)]).ok();
        let ca = s(self.registry.ca_pem.as_ref().expect("CA"));
        let host = self.registry.host();
        build_cmd(&["module", "push", "--registry-ca", &ca, &local, &format!("{host}/ironroot/{repo}:1")]).ok();
        let port = host.rsplit(':').next().expect("port");
        (format!("10.0.2.100:{port}/ironroot/{repo}@{digest}"), digest)
    }

    /// Template `name` with the module `guest_reference` (floor serial 1) and a token for `node`.
    pub fn token(&self, node: &str, template: &str, guest_reference: &str) -> String {
        self.token_for(node, template, &[guest_reference])
    }

    /// Template `name` with `guest_references` (floor serial 1 each) and a token for `node`.
    pub fn token_for(&self, node: &str, template: &str, guest_references: &[&str]) -> String {
        let mut args = vec!["template".to_owned(), "create".to_owned(), template.to_owned()];
        for reference in guest_references {
            args.extend(["--module".to_owned(), format!("{reference},serial=1")]);
        }
        self.plane.op(&args.iter().map(String::as_str).collect::<Vec<_>>()).ok();
        self.plane.op(&["token", "create", "--node", node, "--template", template]).ok().trim().to_owned()
    }

    /// Builds `tree` into an extension module (`usr` role, serial 1), signs it with the lab
    /// key and pushes it as repository `name`; returns the guest's reference and the digest.
    pub fn extension(&self, tree: &Path, name: &str) -> (String, String) {
        let layout = self.work.path().join(format!("built-{name}"));
        let args = ["module", "build", "--from", &s(tree), "--name", name, "--version", "1", "--serial", "1"];
        build_cmd(&[&args[..], &["--role", "usr", "--out", &s(&layout)]].concat()).ok();
        self.publish(&layout, "keys", name)
    }

    fn plane_port(&self) -> String {
        self.plane.addr().rsplit(':').next().expect("plane port").to_owned()
    }

    /// Starts QEMU for `node` with identity given `via`; `pxe` boots through the NIC's iPXE.
    pub fn boot(&self, node: &str, token: &str, via: IdentityVia, pxe: bool) -> Vm {
        self.boot_with(node, token, via, pxe, &[])
    }

    /// [`VmLab::boot`] with more qemu/boot.sh options (`--disk FILE`, `--append STR`); each
    /// boot gets its own console log and QEMU stderr file.
    pub fn boot_with(&self, node: &str, token: &str, via: IdentityVia, pxe: bool, extra: &[&str]) -> Vm {
        self.boot_bundle(&self.bundle, node, token, (via, &[]), pxe, extra)
    }

    /// [`VmLab::boot_with`] from another bundle ([`VmLab::variant`]), with more keys in the
    /// fw_cfg identity document (`("store", "disk:/dev/nvme0n1")`: a PXE boot has no --append).
    pub fn boot_bundle(
        &self,
        bundle: &Path,
        node: &str,
        token: &str,
        (via, doc_extra): (IdentityVia, &[(&str, &str)]),
        pxe: bool,
        extra: &[&str],
    ) -> Vm {
        let plane = format!("https://10.0.2.100:{}", self.plane_port());
        let ca_path = self.plane.dir().join("ca.pem");
        let mut args: Vec<String> = vec!["--timeout".into(), "900".into()];
        args.extend(["--forward".into(), self.plane_port()]);
        args.extend(["--forward".into(), self.registry.host().rsplit(':').next().unwrap_or("").to_owned()]);
        let mut arg = |a: &[&str]| args.extend(a.iter().map(|&x| x.to_owned()));
        match via {
            IdentityVia::FwCfg => {
                let mut doc = serde_json::json!({
                    "plane": plane, "token": token, "node": node,
                    "plane_ca": std::fs::read_to_string(&ca_path).expect("plane CA"),
                });
                for (k, v) in doc_extra {
                    doc[*k] = serde_json::json!(v);
                }
                let path = self.work.path().join(format!("identity-{node}.json"));
                std::fs::write(&path, doc.to_string()).expect("identity doc");
                arg(&["--identity", &s(&path)]);
            }
            IdentityVia::Smbios => {
                // A PEM CA does not fit a type 11 string comfortably: fw_cfg carries only
                // the CA, SMBIOS everything else.
                let doc = serde_json::json!({"plane_ca": std::fs::read_to_string(&ca_path).expect("plane CA")});
                let path = self.work.path().join(format!("identity-{node}.json"));
                std::fs::write(&path, doc.to_string()).expect("identity doc");
                arg(&["--identity", &s(&path)]);
                arg(&["--smbios", &format!("plane={plane}"), "--smbios", &format!("token={token}")]);
                arg(&["--smbios", &format!("node={node}"), "--serial", &format!("SN-{node}")]);
                arg(&["--uuid", "5c3f1e0a-8d2b-4c1e-9f3a-0123456789ab"]);
            }
        }
        if pxe {
            arg(&["--pxe"]);
        }
        arg(extra);
        args.push(s(bundle));
        Vm::spawn(self.work.path(), node, args)
    }

    /// `ironroot-plane node provision NODE --template TEMPLATE` after creating the template with
    /// `guest_references` (floor serial 1 each): the plane boots the node's QEMU itself.
    pub fn provision(&self, node: &str, template: &str, guest_references: &[&str]) {
        self.provision_with(node, template, guest_references, &[]);
    }

    /// [`VmLab::provision`] with more `node provision` flags (`--nic igb --disk 2G`).
    pub fn provision_with(&self, node: &str, template: &str, guest_references: &[&str], flags: &[&str]) {
        let mut args = vec!["template", "create", template];
        let modules: Vec<String> = guest_references.iter().map(|r| format!("{r},serial=1")).collect();
        for m in &modules {
            args.extend(["--module", m.as_str()]);
        }
        self.plane.op(&args).ok();
        self.plane.op(&[&["node", "provision", node, "--template", template][..], flags].concat()).ok();
    }

    /// The plane's view of a provisioned `node` once `done` holds for it, or a panic with its
    /// console (`node console`) and the provider's journal records.
    pub fn wait_for_provisioned(
        &self,
        node: &str,
        timeout: Duration,
        done: impl Fn(&serde_json::Value) -> bool,
    ) -> serde_json::Value {
        let deadline = Instant::now() + timeout;
        loop {
            let (shown, view) = self.view_if(node, &done);
            if let Some(view) = view {
                return view;
            }
            let exited = self.plane.journal("provider.exited");
            assert!(
                exited.is_empty() && Instant::now() < deadline,
                "{node}: not there within {timeout:?}; plane: {shown}\nmachine ended: {exited:?}\nconsole tail:\n{}",
                tail(&self.plane.op(&["node", "console", node]).stdout, 40)
            );
            std::thread::sleep(Duration::from_secs(2));
        }
    }

    /// What `node show NODE --json` printed, and the view when it parsed and `done` holds.
    fn view_if(&self, node: &str, done: &impl Fn(&serde_json::Value) -> bool) -> (String, Option<serde_json::Value>) {
        let run = self.plane.op(&["node", "show", node, "--json"]);
        let view = (run.code == 0)
            .then(|| serde_json::from_str::<serde_json::Value>(&run.stdout).ok())
            .flatten()
            .filter(|v| done(v));
        (run.stdout, view)
    }

    /// The plane's view of `node` once `done` holds for it, or a panic with the console tail.
    pub fn wait_for(
        &self,
        vm: &mut Vm,
        node: &str,
        timeout: Duration,
        done: impl Fn(&serde_json::Value) -> bool,
    ) -> serde_json::Value {
        let deadline = Instant::now() + timeout;
        loop {
            let (shown, view) = self.view_if(node, &done);
            if let Some(view) = view {
                return view;
            }
            let exited = vm.child.try_wait().ok().flatten();
            if exited.is_some_and(|status| vm.emulator_crashed(status)) {
                vm.relaunch();
                continue;
            }
            assert!(
                exited.is_none() && Instant::now() < deadline,
                "{node}: not there within {timeout:?} (VM exited: {exited:?}); plane: {}\nconsole tail:\n{}\nQEMU stderr:\n{}",
                shown,
                vm.console_tail(40),
                vm.stderr_tail(20)
            );
            std::thread::sleep(Duration::from_secs(2));
        }
    }
}

impl Drop for VmLab {
    fn drop(&mut self) {
        // SIGTERM: the plane powers off the machines it started before it exits.
        self.plane.stop();
    }
}

/// The last `n` lines of `text`.
pub fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}
