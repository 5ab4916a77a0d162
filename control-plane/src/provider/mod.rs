//! The machine provider: nodes on demand for labs and tests (`serve --provider`). `qemu` boots a
//! QEMU (TCG) VM from the image bundle for each provisioned node, with its identity over fw_cfg;
//! `recorder` does everything but start the process and journals the command it would have run;
//! `disabled` (the default) refuses provisioning. The three differ only in that last step, so
//! they are one [`ProviderKind`] and no trait.
//!
//! Owns: what a provisioning request may ask for, the machine's directory under
//! `STATE/machines/NAME/` (identity document 0600, console log, QEMU's stderr, disk), the command
//! line (`qemu`), the processes (`machines`), the plane records (`records`) and the operator
//! routes (`api`). Enrollment of the booted node is the ordinary enrollment path, with the
//! provisioned token.

mod api;
pub mod machines;
pub mod qemu;
mod records;

use std::net::SocketAddr;
use std::ops::RangeInclusive;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context as _, bail};
pub use api::router;
pub use records::ProvisionedNode;

use self::machines::Machines;
use self::qemu::{DiskBus, GUEST_HOST, Launch, NicModel, Tools};
use crate::store::Refusal;

/// The journal's actor for what the provider does by itself (exits, relaunches).
const ACTOR: &str = "plane:provider";

/// Memory a machine may have, MiB: below 512 the kernel, the initramfs and a zram store holding
/// the base module do not fit; above 16 GiB is more than a TCG lab guest can use.
pub const MEMORY_MIB: RangeInclusive<u32> = 512..=16_384;
/// qemu/boot.sh's default.
pub const DEFAULT_MEMORY_MIB: u32 = 2048;
/// A machine's disk (sparse): an ext4 store below 1 GiB cannot hold the base module; 1 TiB caps
/// what a typo can claim.
const DISK_BYTES: RangeInclusive<u64> = (1 << 30)..=(1 << 40);

/// What `serve --provider` chose.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ProviderKind {
    /// Provisioning is refused.
    Disabled,
    /// Provisioning creates the node and token and journals the QEMU command, without running it.
    Recorder,
    /// Provisioning boots a QEMU (TCG) VM from the bundle.
    Qemu,
}

/// The `serve` flags of the provider.
#[derive(Debug, Clone)]
pub struct ProviderConfig {
    pub kind: ProviderKind,
    pub bundle: PathBuf,
    /// `qemu-system-x86_64` or a path.
    pub qemu: PathBuf,
    /// Registry ports on the host loopback the machines reach (beside the plane's).
    pub forwards: Vec<u16>,
    pub lifetime: Duration,
}

/// What a provisioned machine boots with, fixed when the plane starts.
#[derive(Debug)]
struct Setup {
    bundle: PathBuf,
    tools: Tools,
    /// `STATE/machines`.
    dir: PathBuf,
    /// The plane's port first, then the registries'.
    forwards: Vec<u16>,
    lifetime: Duration,
    /// How the guest names the plane: `https://10.0.2.100:PORT`.
    plane_url: String,
    plane_ca: String,
}

#[derive(Debug)]
pub struct Provider {
    kind: ProviderKind,
    setup: Option<Setup>,
    pub machines: Machines,
}

impl Provider {
    /// Checks the configuration against the host: the bundle, QEMU 10 and the tools for `qemu`
    /// (found leniently for `recorder`, which runs nothing), a plane the guest can reach on the
    /// host loopback.
    pub fn open(config: &ProviderConfig, state: &Path, plane: SocketAddr, plane_ca: &str) -> anyhow::Result<Self> {
        let machines = Machines::default();
        if config.kind == ProviderKind::Disabled {
            return Ok(Self { kind: config.kind, setup: None, machines });
        }
        if !(plane.ip().is_loopback() || plane.ip().is_unspecified()) {
            bail!("--provider: the machines reach the plane on 127.0.0.1, so --listen must be a loopback address");
        }
        qemu::check_bundle(&config.bundle)?;
        let dir = std::path::absolute(state.join("machines")).context("--state")?;
        qemu::check_path("--state", &dir)?;
        let tools = match config.kind {
            ProviderKind::Qemu => qemu::find_tools(&config.qemu)?,
            _ => Tools {
                qemu: config.qemu.clone(),
                nc: "nc".into(),
                timeout: "timeout".into(),
                ovmf: Some(qemu::OVMF.into()),
            },
        };
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let bundle = std::path::absolute(&config.bundle).context("--bundle")?;
        let mut forwards = vec![plane.port()];
        forwards.extend(config.forwards.iter().filter(|&&p| p != plane.port()));
        let setup = Setup {
            bundle,
            tools,
            dir,
            forwards,
            lifetime: config.lifetime,
            plane_url: format!("https://{GUEST_HOST}:{}", plane.port()),
            plane_ca: plane_ca.to_owned(),
        };
        Ok(Self { kind: config.kind, setup: Some(setup), machines })
    }

    pub fn kind(&self) -> ProviderKind {
        self.kind
    }

    fn setup(&self) -> Result<&Setup, Refusal> {
        self.setup.as_ref().ok_or_else(|| {
            Refusal::new(
                409,
                "provider_disabled",
                "this plane provisions no machines (serve --provider disabled); start it with --provider qemu or recorder",
            )
        })
    }

    /// `STATE/machines/NAME/console.log`, if this plane ever provisioned `name`.
    pub fn console_log(&self, name: &str) -> Option<PathBuf> {
        let path = self.setup.as_ref()?.dir.join(name).join("console.log");
        path.is_file().then_some(path)
    }
}

/// A provisioning request, checked.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct MachineRequest {
    pub name: String,
    pub template: Option<String>,
    pub memory_mib: u32,
    pub disk_bytes: Option<u64>,
    #[serde(flatten)]
    pub hardware: Hardware,
}

/// The hardware a provisioned machine emulates.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Hardware {
    /// One to [`MAX_NICS`] NICs (default one virtio).
    #[serde(default)]
    pub nics: Vec<NicModel>,
    /// The disk's bus (only with a disk).
    #[serde(default)]
    pub disk_bus: Option<DiskBus>,
    /// UEFI firmware (OVMF) instead of SeaBIOS.
    #[serde(default)]
    pub uefi: bool,
}

/// Most NICs a machine gets.
pub const MAX_NICS: usize = 4;

fn bad(message: String) -> Refusal {
    Refusal::new(400, "bad_machine", message)
}

impl MachineRequest {
    /// Checks a request's fields; nothing is created for a refused one.
    pub fn check(
        name: &str,
        template: Option<String>,
        memory_mib: Option<u32>,
        disk: Option<&str>,
        hardware: Hardware,
    ) -> Result<Self, Refusal> {
        let b = name.as_bytes();
        let name_ok = (1..=63).contains(&b.len())
            && b[0].is_ascii_alphanumeric()
            && b.iter().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-');
        if !name_ok {
            return Err(bad(format!(
                "name {name:?} must be 1-63 characters of a-z, 0-9 and '-', not starting with '-'"
            )));
        }
        let memory_mib = memory_mib.unwrap_or(DEFAULT_MEMORY_MIB);
        if !MEMORY_MIB.contains(&memory_mib) {
            return Err(bad(format!(
                "memory {memory_mib} MiB is outside {}-{} MiB",
                MEMORY_MIB.start(),
                MEMORY_MIB.end()
            )));
        }
        let disk_bytes = disk.map(parse_disk_size).transpose()?;
        let mut hardware = hardware;
        if hardware.nics.is_empty() {
            hardware.nics.push(NicModel::Virtio);
        }
        if hardware.nics.len() > MAX_NICS {
            return Err(bad(format!("{} NICs asked for; a machine has at most {MAX_NICS}", hardware.nics.len())));
        }
        if let Some(bus) = hardware.disk_bus
            && disk_bytes.is_none()
        {
            return Err(bad(format!("a disk bus ({bus:?}) without a disk: give the disk's size too")));
        }
        Ok(Self { name: name.to_owned(), template, memory_mib, disk_bytes, hardware })
    }
}

/// `8G`, `512M`, `1T` (MiB, GiB, TiB), within 1 GiB to 1 TiB.
pub fn parse_disk_size(s: &str) -> Result<u64, Refusal> {
    let refused = || bad(format!("disk size {s:?} must be a whole number of M, G or T between 1G and 1T, like 8G"));
    let (num, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit()).ok_or_else(refused)?);
    let shift = match unit {
        "M" => 20,
        "G" => 30,
        "T" => 40,
        _ => return Err(refused()),
    };
    let n: u64 = num.parse().map_err(|_| refused())?;
    n.checked_mul(1 << shift).filter(|b| DISK_BYTES.contains(b)).ok_or_else(refused)
}

/// The machine's directory made afresh: the identity document (0600: it holds the token), an
/// empty console log, the sparse disk (0600). Returns the launch.
fn prepare(setup: &Setup, req: &MachineRequest, token: &str) -> anyhow::Result<Launch> {
    let dir = setup.dir.join(&req.name);
    if dir.exists() {
        std::fs::remove_dir_all(&dir).with_context(|| format!("removing the old {}", dir.display()))?;
    }
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let doc =
        serde_json::json!({"plane": setup.plane_url, "token": token, "node": req.name, "plane_ca": setup.plane_ca});
    let identity = dir.join("identity.json");
    crate::ca::write_secret(&identity, &doc.to_string(), 0o600)?;
    let console = dir.join("console.log");
    std::fs::write(&console, b"").with_context(|| format!("creating {}", console.display()))?;
    let disk = match req.disk_bytes {
        Some(bytes) => {
            use std::os::unix::fs::OpenOptionsExt as _;
            // 0600: a disk-backed node keeps its key and certificate on it.
            let path = dir.join("disk.img");
            let file = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&path)
                .with_context(|| format!("creating {}", path.display()))?;
            file.set_len(bytes).with_context(|| format!("sizing {}", path.display()))?;
            Some(path)
        }
        None => None,
    };
    if req.hardware.uefi && setup.tools.ovmf.is_none() {
        anyhow::bail!("UEFI asked for, but this host has no {} (apt-get install ovmf)", qemu::OVMF);
    }
    let cmdline_path = setup.bundle.join("cmdline");
    let cmdline =
        std::fs::read_to_string(&cmdline_path).with_context(|| format!("reading {}", cmdline_path.display()))?;
    Ok(Launch {
        bundle: setup.bundle.clone(),
        cmdline,
        memory_mib: req.memory_mib,
        disk,
        disk_bus: req.hardware.disk_bus.unwrap_or_default(),
        nics: req.hardware.nics.clone(),
        uefi: req.hardware.uefi,
        identity,
        console,
        forwards: setup.forwards.clone(),
        lifetime: setup.lifetime,
    })
}

/// Removes what [`prepare`] wrote but the console log (the token goes with the identity).
fn clean(setup: &Setup, name: &str) {
    for file in ["identity.json", "disk.img"] {
        let path = setup.dir.join(name).join(file);
        if let Err(e) = std::fs::remove_file(&path)
            && e.kind() != std::io::ErrorKind::NotFound
        {
            tracing::warn!(path = %path.display(), error = %e, "removing a machine's file");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_are_checked_before_anything_is_created() {
        let hw = Hardware::default;
        let ok = MachineRequest::check("lab-1", None, Some(1024), Some("8G"), hw()).unwrap();
        assert_eq!((ok.memory_mib, ok.disk_bytes), (1024, Some(8 << 30)));
        assert_eq!(ok.hardware.nics, [NicModel::Virtio], "one virtio NIC by default");
        assert_eq!(MachineRequest::check("n", None, None, None, hw()).unwrap().memory_mib, DEFAULT_MEMORY_MIB);
        let five = Hardware { nics: vec![NicModel::Igb; 5], ..hw() };
        let r = MachineRequest::check("n", None, None, None, five).unwrap_err();
        assert!(r.message.contains("5 NICs asked for"), "{}", r.message);
        let bus_only = Hardware { disk_bus: Some(DiskBus::Nvme), ..hw() };
        let r = MachineRequest::check("n", None, None, None, bus_only).unwrap_err();
        assert!(r.message.contains("a disk bus (Nvme) without a disk"), "{}", r.message);
        let refused: &[(&str, Option<u32>, Option<&str>, &str)] = &[
            ("", None, None, "name"),
            ("-a", None, None, "name"),
            ("Upper", None, None, "name"),
            ("a/b", None, None, "name"),
            ("n", Some(100), None, "memory"),
            ("n", Some(1 << 20), None, "memory"),
            ("n", None, Some("12X"), "disk"),
            ("n", None, Some("G"), "disk"),
            ("n", None, Some("512M"), "disk"),
            ("n", None, Some("2T"), "disk"),
            ("n", None, Some("99999999999999999999G"), "disk"),
        ];
        for (name, memory, disk, needle) in refused {
            let r = MachineRequest::check(name, None, *memory, *disk, hw()).unwrap_err();
            assert_eq!((r.status, r.code), (400, "bad_machine"), "{name:?} {memory:?} {disk:?}");
            assert!(r.message.contains(needle), "{}", r.message);
        }
        assert_eq!(parse_disk_size("1024M").unwrap(), 1 << 30);
        assert_eq!(parse_disk_size("1T").unwrap(), 1 << 40);
    }
}
