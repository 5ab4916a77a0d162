//! The QEMU command line a provisioned machine boots with, built from a [`Launch`] (pure, so the
//! recorder records exactly what the real provider runs), and the host tools it needs: QEMU 10
//! (`just deps` installs it from bookworm-backports; 7.2 randomly crashes 6.12 guests under TCG),
//! `nc` for the guest's forwards and coreutils `timeout` for the hard lifetime.
//!
//! The shape is qemu/boot.sh's direct boot: TCG always (`/dev/kvm` on the build machines is a
//! software backend that crashes stock kernels), `-no-reboot`, the bundle's kernel, initramfs and
//! command line, the identity document over fw_cfg, and slirp with `restrict=on` and one
//! `guestfwd` per forwarded port, so the guest reaches exactly the plane and the registries it
//! was given as 10.0.2.100:PORT on the host loopback and nothing else.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context as _, bail};

/// The address the guest reaches the host's forwarded ports at (slirp `guestfwd`).
pub const GUEST_HOST: &str = "10.0.2.100";

/// The fw_cfg name the agent reads its identity document from.
const FW_CFG_IDENTITY: &str = "opt/ironroot/identity";

/// How long `timeout` waits after its signal before it kills QEMU outright.
const KILL_AFTER: Duration = Duration::from_secs(10);

/// The oldest QEMU the provider starts: 7.2 (bookworm's) crashes 6.12 guests under TCG.
const MIN_QEMU_MAJOR: u32 = 10;

/// Debian's OVMF (package `ovmf`): UEFI firmware with its variables in the image.
pub const OVMF: &str = "/usr/share/ovmf/OVMF.fd";

/// Absolute paths of the host tools a machine's command line names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tools {
    pub qemu: PathBuf,
    pub nc: PathBuf,
    pub timeout: PathBuf,
    /// UEFI firmware, when the host has it.
    pub ovmf: Option<PathBuf>,
}

/// The NICs a machine can have: virtio, and the Intel server NICs QEMU emulates (82574L,
/// 82576), whose drivers only the generic kernel has.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum NicModel {
    Virtio,
    E1000e,
    Igb,
}

impl NicModel {
    fn device(self) -> &'static str {
        match self {
            Self::Virtio => "virtio-net-pci",
            Self::E1000e => "e1000e",
            Self::Igb => "igb",
        }
    }
}

/// The bus of a machine's disk, and the device node the node's store names.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum DiskBus {
    #[default]
    Virtio,
    Nvme,
    /// q35's built-in SATA controller.
    Ahci,
}

impl DiskBus {
    pub fn device_node(self) -> &'static str {
        match self {
            Self::Virtio => "/dev/vda",
            Self::Nvme => "/dev/nvme0n1",
            Self::Ahci => "/dev/sda",
        }
    }
}

/// The MAC of a machine's NIC `i`: QEMU's default prefix, `…:56` for the first as QEMU's own.
pub fn mac(i: usize) -> String {
    format!("52:54:00:12:34:{:02x}", 0x56 + i)
}

/// One machine's boot: everything its command line depends on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Launch {
    /// The bundle `just image` wrote: `vmlinuz`, `initrd.img`, `cmdline`.
    pub bundle: PathBuf,
    /// The bundle's kernel command line (its `cmdline` file, read at provisioning).
    pub cmdline: String,
    pub memory_mib: u32,
    /// A raw disk for `/persist` (`ironroot.store=disk:DEV`), if the machine has one.
    pub disk: Option<PathBuf>,
    pub disk_bus: DiskBus,
    /// At least one; each reaches the forwarded ports.
    pub nics: Vec<NicModel>,
    /// Boot through UEFI firmware (OVMF) instead of SeaBIOS.
    pub uefi: bool,
    /// The identity document (plane, token, node name, plane CA) the guest reads over fw_cfg.
    pub identity: PathBuf,
    /// The serial console log.
    pub console: PathBuf,
    /// Host loopback ports the guest reaches as 10.0.2.100:PORT (the plane's first).
    pub forwards: Vec<u16>,
    /// Hard limit on the machine's life; `timeout` kills QEMU after it.
    pub lifetime: Duration,
}

fn path(p: &Path) -> String {
    p.to_string_lossy().into_owned()
}

impl Launch {
    /// The argv, `timeout` first: `timeout --kill-after=10s LIFETIME qemu-system-x86_64 …`.
    pub fn argv(&self, tools: &Tools) -> Vec<String> {
        let mut append = self.cmdline.trim().to_owned();
        if self.disk.is_some() {
            append.push_str(&format!(" ironroot.store=disk:{}", self.disk_bus.device_node()));
        }
        let mut argv: Vec<String> = vec![
            path(&tools.timeout),
            format!("--kill-after={}s", KILL_AFTER.as_secs()),
            format!("{}s", self.lifetime.as_secs()),
            path(&tools.qemu),
        ];
        let mut arg = |a: &[&str]| argv.extend(a.iter().map(|&s| s.to_owned()));
        arg(&["-accel", "tcg", "-M", "q35", "-cpu", "max", "-smp", "2"]);
        arg(&["-m", &self.memory_mib.to_string(), "-no-reboot", "-display", "none", "-monitor", "none"]);
        arg(&["-serial", &format!("file:{}", path(&self.console)), "-device", "virtio-rng-pci"]);
        if self.uefi
            && let Some(ovmf) = &tools.ovmf
        {
            arg(&["-bios", &path(ovmf)]);
        }
        arg(&["-kernel", &path(&self.bundle.join("vmlinuz")), "-initrd", &path(&self.bundle.join("initrd.img"))]);
        arg(&["-append", &append]);
        for (i, model) in self.nics.iter().enumerate() {
            let mut netdev = format!("user,id=n{i},restrict=on");
            for port in &self.forwards {
                netdev.push_str(&format!(",guestfwd=tcp:{GUEST_HOST}:{port}-cmd:{} 127.0.0.1 {port}", path(&tools.nc)));
            }
            arg(&["-netdev", &netdev, "-device", &format!("{},netdev=n{i},mac={}", model.device(), mac(i))]);
        }
        arg(&["-fw_cfg", &format!("name={FW_CFG_IDENTITY},file={}", path(&self.identity))]);
        if let Some(disk) = &self.disk {
            match self.disk_bus {
                DiskBus::Virtio => arg(&["-drive", &format!("file={},if=virtio,format=raw", path(disk))]),
                DiskBus::Nvme => arg(&[
                    "-drive",
                    &format!("file={},if=none,id=d0,format=raw", path(disk)),
                    "-device",
                    "nvme,drive=d0,serial=ironroot0",
                ]),
                DiskBus::Ahci => arg(&[
                    "-drive",
                    &format!("file={},if=none,id=d0,format=raw", path(disk)),
                    "-device",
                    "ide-hd,drive=d0,bus=ide.0",
                ]),
            }
        }
        argv
    }
}

/// Checks a directory the command line names: QEMU's option syntax splits values at commas.
pub fn check_path(what: &str, p: &Path) -> anyhow::Result<()> {
    if p.to_string_lossy().contains(',') {
        bail!("{what} {} has a comma, which QEMU's options cannot carry", p.display());
    }
    Ok(())
}

/// Checks the bundle has what a direct boot needs.
pub fn check_bundle(bundle: &Path) -> anyhow::Result<()> {
    check_path("--bundle", bundle)?;
    for file in ["vmlinuz", "initrd.img", "cmdline"] {
        if !bundle.join(file).is_file() {
            bail!("--bundle {}: {file} is missing (run `just image`)", bundle.display());
        }
    }
    Ok(())
}

/// `name` as an absolute path: itself if it has a slash, else the first match on $PATH.
fn find(name: &Path) -> anyhow::Result<PathBuf> {
    if name.components().count() > 1 {
        return std::path::absolute(name).with_context(|| format!("resolving {}", name.display()));
    }
    std::env::var_os("PATH")
        .iter()
        .flat_map(std::env::split_paths)
        .map(|dir| dir.join(name))
        .find(|p| p.is_file())
        .with_context(|| format!("{} is not on PATH (run `just deps`)", name.display()))
}

/// The major version from `qemu-system-x86_64 --version`'s first line.
pub fn parse_qemu_major(version: &str) -> Option<u32> {
    let rest = version.lines().next()?.strip_prefix("QEMU emulator version ")?;
    rest.split('.').next()?.parse().ok()
}

/// Finds the tools and checks QEMU's version (`--qemu`: a path or a name on $PATH).
pub fn find_tools(qemu: &Path) -> anyhow::Result<Tools> {
    let ovmf = Path::new(OVMF).is_file().then(|| PathBuf::from(OVMF));
    let tools = Tools { qemu: find(qemu)?, nc: find(Path::new("nc"))?, timeout: find(Path::new("timeout"))?, ovmf };
    let out = std::process::Command::new(&tools.qemu)
        .arg("--version")
        .output()
        .with_context(|| format!("running {} --version", tools.qemu.display()))?;
    let version = String::from_utf8_lossy(&out.stdout);
    match parse_qemu_major(&version) {
        Some(major) if major >= MIN_QEMU_MAJOR => Ok(tools),
        _ => bail!(
            "{} is not QEMU {MIN_QEMU_MAJOR} or later ({:?}); older ones crash 6.12 guests under TCG (run `just deps`)",
            tools.qemu.display(),
            version.lines().next().unwrap_or("")
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn launch(disk: bool) -> Launch {
        Launch {
            bundle: "/img".into(),
            cmdline: "console=ttyS0 panic=-1\n".into(),
            memory_mib: 1536,
            disk: disk.then(|| "/s/vms/n1/disk.img".into()),
            disk_bus: DiskBus::Virtio,
            nics: vec![NicModel::Virtio],
            uefi: false,
            identity: "/s/vms/n1/identity.json".into(),
            console: "/s/vms/n1/console.log".into(),
            forwards: vec![8443, 5000],
            lifetime: Duration::from_secs(3600),
        }
    }

    fn tools() -> Tools {
        Tools {
            qemu: "/usr/bin/qemu-system-x86_64".into(),
            nc: "/usr/bin/nc".into(),
            timeout: "/usr/bin/timeout".into(),
            ovmf: Some("/usr/share/ovmf/OVMF.fd".into()),
        }
    }

    fn after<'a>(argv: &'a [String], flag: &str) -> Vec<&'a str> {
        argv.windows(2).filter(|w| w[0] == flag).map(|w| w[1].as_str()).collect()
    }

    #[test]
    fn the_command_line_is_boot_sh_s_direct_boot() {
        let argv = launch(false).argv(&tools());
        assert_eq!(argv[..4], ["/usr/bin/timeout", "--kill-after=10s", "3600s", "/usr/bin/qemu-system-x86_64"]);
        assert_eq!(after(&argv, "-accel"), ["tcg"]);
        assert_eq!(after(&argv, "-m"), ["1536"]);
        assert!(argv.contains(&"-no-reboot".to_owned()));
        assert_eq!(after(&argv, "-append"), ["console=ttyS0 panic=-1"]);
        assert_eq!(after(&argv, "-fw_cfg"), ["name=opt/ironroot/identity,file=/s/vms/n1/identity.json"]);
        assert_eq!(
            after(&argv, "-netdev"),
            [
                "user,id=n0,restrict=on,guestfwd=tcp:10.0.2.100:8443-cmd:/usr/bin/nc 127.0.0.1 8443,guestfwd=tcp:10.0.2.100:5000-cmd:/usr/bin/nc 127.0.0.1 5000"
            ]
        );
        assert_eq!(after(&argv, "-serial"), ["file:/s/vms/n1/console.log"]);
        assert!(after(&argv, "-drive").is_empty());
        assert_eq!(after(&argv, "-device"), ["virtio-rng-pci", "virtio-net-pci,netdev=n0,mac=52:54:00:12:34:56"]);
        assert!(after(&argv, "-bios").is_empty(), "SeaBIOS unless UEFI is asked for");
    }

    #[test]
    fn the_hardware_asked_for_is_what_qemu_emulates() {
        let mut l = launch(true);
        l.nics = vec![NicModel::Igb, NicModel::E1000e];
        l.disk_bus = DiskBus::Nvme;
        l.uefi = true;
        let argv = l.argv(&tools());
        assert_eq!(after(&argv, "-bios"), ["/usr/share/ovmf/OVMF.fd"]);
        assert_eq!(
            after(&argv, "-device"),
            [
                "virtio-rng-pci",
                "igb,netdev=n0,mac=52:54:00:12:34:56",
                "e1000e,netdev=n1,mac=52:54:00:12:34:57",
                "nvme,drive=d0,serial=ironroot0"
            ]
        );
        let netdevs = after(&argv, "-netdev");
        assert_eq!(netdevs.len(), 2);
        assert!(netdevs.iter().all(|n| n.contains("guestfwd=tcp:10.0.2.100:8443")), "every NIC reaches the plane");
        assert_eq!(after(&argv, "-drive"), ["file=/s/vms/n1/disk.img,if=none,id=d0,format=raw"]);
        assert!(after(&argv, "-append")[0].ends_with(" ironroot.store=disk:/dev/nvme0n1"));
        l.disk_bus = DiskBus::Ahci;
        let argv = l.argv(&tools());
        assert!(argv.contains(&"ide-hd,drive=d0,bus=ide.0".to_owned()));
        assert!(after(&argv, "-append")[0].ends_with(" ironroot.store=disk:/dev/sda"));
    }

    #[test]
    fn a_disk_is_attached_and_named_the_store() {
        let argv = launch(true).argv(&tools());
        assert_eq!(after(&argv, "-drive"), ["file=/s/vms/n1/disk.img,if=virtio,format=raw"]);
        assert_eq!(after(&argv, "-append"), ["console=ttyS0 panic=-1 ironroot.store=disk:/dev/vda"]);
    }

    #[test]
    fn qemu_versions_read_as_their_major() {
        assert_eq!(parse_qemu_major("QEMU emulator version 10.0.2 (Debian 1:10.0.2+ds-2)\nCopyright"), Some(10));
        assert_eq!(parse_qemu_major("QEMU emulator version 7.2.15"), Some(7));
        assert_eq!(parse_qemu_major("qemu 9"), None);
        assert!(check_path("--bundle", Path::new("/a,b")).is_err());
    }
}
