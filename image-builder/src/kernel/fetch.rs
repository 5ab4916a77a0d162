//! `ironroot-build kernel fetch`: the node kernel, Debian's `linux-image-cloud-amd64` (flavour
//! `cloud`, the default: virtual hardware) or `linux-image-amd64` (`generic`: bare metal), from
//! trixie (the suite the base module is debootstrapped from; any suite can be asked for),
//! resolved through the metapackage to the versioned image package. Both flavours must carry
//! every option of `kernel-configs/required`.
//!
//! apt does the downloading and the signature checks (the archive keyring), with a private
//! source list and list state under the cache directory, so the system's apt configuration is
//! never touched. The result is `OUT/vmlinuz`, `OUT/config`, `OUT/modules/lib/modules/REL`
//! (with `modules.dep` from `depmod -b`, which the .deb does not carry) and `OUT/kernel.json`.
//! The package keeps its modules in `lib/modules` (bookworm) or `usr/lib/modules` (trixie,
//! merged /usr); OUT has one layout either way.
//! OUT is replaced as a whole, only after everything, including the config check, succeeded.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context as _, bail};
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

use crate::exit::Exit;
use crate::kernel::check;

/// apt could not get what it asked the archive for; every other failure of `fetch` is local.
#[derive(Debug, thiserror::Error)]
pub enum ArchiveError {
    #[error("{what} could not fetch from the archive: {detail}")]
    Unreachable { what: String, detail: String },
    #[error("{what}: the archive's signature does not verify: {detail}")]
    Signature { what: String, detail: String },
}

impl ArchiveError {
    pub fn exit(&self) -> Exit {
        match self {
            Self::Unreachable { .. } => Exit::Transport,
            Self::Signature { .. } => Exit::Signature,
        }
    }
}

/// The Debian kernel flavours a node runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Flavour {
    /// Virtual hardware only (virtio, the clouds' NICs); the smaller kernel and initramfs.
    Cloud,
    /// The distribution's full kernel: physical NICs, NVMe, SATA, SAS, UEFI platforms.
    Generic,
}

impl Flavour {
    pub fn metapackage(self) -> &'static str {
        match self {
            Self::Cloud => "linux-image-cloud-amd64",
            Self::Generic => "linux-image-amd64",
        }
    }
}

#[derive(Debug, Clone)]
pub struct FetchArgs {
    pub suite: String,
    pub package: String,
    pub out: PathBuf,
    /// Private apt state (lists, downloaded .debs).
    pub apt_dir: PathBuf,
    /// Archive base address; default: the first non-security mirror in /etc/apt.
    pub mirror: Option<String>,
}

/// What `OUT/kernel.json` records.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct KernelInfo {
    /// The suite it was resolved in (a kernel.json without one is not reused).
    pub suite: String,
    /// The metapackage and the version of it that was resolved.
    pub metapackage: String,
    pub metapackage_version: String,
    /// The versioned image package, e.g. linux-image-6.12.117+deb13-cloud-amd64.
    pub package: String,
    pub version: String,
    /// `uname -r` of the kernel.
    pub release: String,
    pub deb_sha256: String,
    pub vmlinuz_sha256: String,
    /// Set when this run reused OUT instead of downloading (not stored).
    #[serde(skip)]
    pub cached: bool,
}

/// Fetches (or finds already fetched) the kernel.
pub fn fetch(args: &FetchArgs) -> anyhow::Result<KernelInfo> {
    let apt = Apt::prepare(&args.apt_dir, &args.suite, args.mirror.as_deref())?;
    let meta = apt.download(&args.package)?;
    let meta_version = deb_field(&meta, "Version")?;
    let depends = deb_field(&meta, "Depends")?;
    let image = image_dependency(&depends)
        .with_context(|| format!("{} {meta_version} depends on no linux-image package ({depends})", args.package))?;

    if let Some(info) = existing(&args.out)?
        && info.suite == args.suite
        && info.package == image
        && info.metapackage_version == meta_version
    {
        return Ok(KernelInfo { cached: true, ..info });
    }

    let deb = apt.download(&image)?;
    let version = deb_field(&deb, "Version")?;
    let parent = args.out.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(parent).with_context(|| format!("creating {}", parent.display()))?;
    let staging = tempfile::Builder::new()
        .prefix(".kernel-")
        .tempdir_in(parent)
        .with_context(|| format!("creating a staging directory in {}", parent.display()))?;
    let unpacked = staging.path().join("deb");
    run(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&unpacked), "dpkg-deb -x")?;

    let packaged = packaged_modules(&unpacked)?;
    let release = single_release(&packaged)?;
    let built = staging.path().join("out");
    let modules = built.join("modules/lib/modules");
    std::fs::create_dir_all(&modules)?;
    let vmlinuz = built.join("vmlinuz");
    copy(&unpacked.join(format!("boot/vmlinuz-{release}")), &vmlinuz)?;
    copy(&unpacked.join(format!("boot/config-{release}")), &built.join("config"))?;
    std::fs::rename(packaged.join(&release), modules.join(&release)).context("moving the kernel modules into place")?;
    run(Command::new("depmod").arg("-b").arg(built.join("modules")).arg(&release), "depmod -b")?;

    let config = std::fs::read_to_string(built.join("config")).context("reading the kernel config")?;
    let required = check::parse_required(check::REQUIRED).map_err(anyhow::Error::msg)?;
    let missing = check::check(&required, &check::parse_config(&config));
    if !missing.is_empty() {
        let names: Vec<_> = missing.iter().map(|m| format!("{} (found {})", m.option, m.found)).collect();
        bail!("{image} {version} lacks required kernel options: {}", names.join(", "));
    }

    let info = KernelInfo {
        suite: args.suite.clone(),
        metapackage: args.package.clone(),
        metapackage_version: meta_version,
        package: image,
        version,
        release,
        deb_sha256: sha256_file(&deb)?,
        vmlinuz_sha256: sha256_file(&vmlinuz)?,
        cached: false,
    };
    std::fs::write(built.join("kernel.json"), serde_json::to_vec_pretty(&info)?)?;
    if args.out.exists() {
        std::fs::remove_dir_all(&args.out).with_context(|| format!("removing the old {}", args.out.display()))?;
    }
    std::fs::rename(&built, &args.out).with_context(|| format!("moving the kernel to {}", args.out.display()))?;
    Ok(info)
}

fn existing(out: &Path) -> anyhow::Result<Option<KernelInfo>> {
    let path = out.join("kernel.json");
    match std::fs::read(&path) {
        Ok(bytes) => Ok(serde_json::from_slice(&bytes).ok()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
    }
}

/// The `linux-image-*` package among a Depends field's alternatives.
pub fn image_dependency(depends: &str) -> Option<String> {
    depends
        .split([',', '|'])
        .map(|d| d.trim().split([' ', '(']).next().unwrap_or(""))
        .find(|name| name.strip_prefix("linux-image-").is_some_and(|v| v.starts_with(|c: char| c.is_ascii_digit())))
        .map(str::to_owned)
}

/// Where the unpacked package keeps its modules: `usr/lib/modules` (merged /usr, trixie on)
/// or `lib/modules` (bookworm); a package with both is refused rather than half-copied.
fn packaged_modules(unpacked: &Path) -> anyhow::Result<PathBuf> {
    let found: Vec<PathBuf> =
        ["usr/lib/modules", "lib/modules"].iter().map(|d| unpacked.join(d)).filter(|d| d.is_dir()).collect();
    match found.as_slice() {
        [one] => Ok(one.clone()),
        [] => bail!("the package has neither usr/lib/modules nor lib/modules"),
        _ => bail!("the package has both usr/lib/modules and lib/modules"),
    }
}

fn single_release(modules: &Path) -> anyhow::Result<String> {
    let entries: Vec<String> = std::fs::read_dir(modules)
        .with_context(|| format!("the package has no {}", modules.display()))?
        .filter_map(|e| e.ok().map(|e| e.file_name().to_string_lossy().into_owned()))
        .collect();
    match entries.as_slice() {
        [one] => Ok(one.clone()),
        other => bail!("expected one kernel release in the package, found {other:?}"),
    }
}

fn copy(from: &Path, to: &Path) -> anyhow::Result<()> {
    std::fs::copy(from, to).with_context(|| format!("copying {} (not in the package?)", from.display()))?;
    Ok(())
}

fn sha256_file(path: &Path) -> anyhow::Result<String> {
    let mut f = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let mut h = Sha256::new();
    std::io::copy(&mut f, &mut h)?;
    Ok(hex::encode(h.finalize()))
}

fn deb_field(deb: &Path, field: &str) -> anyhow::Result<String> {
    let out = run(Command::new("dpkg-deb").arg("-f").arg(deb).arg(field), "dpkg-deb -f")?;
    let value = out.trim().to_owned();
    if value.is_empty() {
        bail!("{} has no {field} field", deb.display());
    }
    Ok(value)
}

/// Runs a command, returning stdout; a failure names the command and carries its stderr.
fn run(cmd: &mut Command, what: &str) -> anyhow::Result<String> {
    let out = cmd.output().with_context(|| format!("running {what} (is it installed?)"))?;
    if !out.status.success() {
        bail!("{what} failed ({}): {}", out.status, String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// apt with a private source list and state: one suite, the system's keyring.
struct Apt {
    opts: Vec<String>,
    debs: PathBuf,
}

impl Apt {
    fn prepare(dir: &Path, suite: &str, mirror: Option<&str>) -> anyhow::Result<Self> {
        let mirror = match mirror {
            Some(m) => m.to_owned(),
            None => system_mirror()?,
        };
        let debs = dir.join("debs");
        for d in [dir.join("lists/partial"), debs.clone()] {
            std::fs::create_dir_all(&d).with_context(|| format!("creating {}", d.display()))?;
        }
        let list = dir.join("sources.list");
        std::fs::write(
            &list,
            format!("deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] {mirror} {suite} main\n"),
        )?;
        let opts = vec![
            format!("Dir::Etc::SourceList={}", list.display()),
            "Dir::Etc::SourceParts=/dev/null".to_owned(),
            format!("Dir::State::Lists={}", dir.join("lists").display()),
            "Dir::State::Status=/dev/null".to_owned(),
            format!("Dir::Cache={}", dir.join("cache").display()),
            "APT::Get::List-Cleanup=0".to_owned(),
            "APT::Sandbox::User=root".to_owned(),
            // An index that cannot be fetched is an error, not a warning over stale lists.
            "APT::Update::Error-Mode=any".to_owned(),
        ];
        let apt = Apt { opts, debs };
        apt.run(apt.command().args(["update", "-qq"]), &format!("apt-get update ({suite})"))?;
        Ok(apt)
    }

    fn command(&self) -> Command {
        let mut cmd = Command::new("apt-get");
        for o in &self.opts {
            cmd.arg("-o").arg(o);
        }
        // Its messages are read below to tell a network failure from the rest.
        cmd.env("LC_ALL", "C");
        cmd
    }

    /// Runs apt-get; a failure to fetch from the archive is an [`ArchiveError`].
    fn run(&self, cmd: &mut Command, what: &str) -> anyhow::Result<()> {
        let out = cmd.output().with_context(|| format!("running {what} (is it installed?)"))?;
        if out.status.success() {
            return Ok(());
        }
        let detail = String::from_utf8_lossy(&out.stderr).trim().to_owned();
        let has = |needles: &[&str]| needles.iter().any(|n| detail.contains(n));
        let signature = has(&["GPG error", "is not signed", "NO_PUBKEY", "BADSIG", "EXPKEYSIG"]);
        let unreachable = has(&["Failed to fetch", "Could not connect", "Could not resolve", "Temporary failure"]);
        let what = what.to_owned();
        if signature {
            return Err(ArchiveError::Signature { what, detail }.into());
        }
        if unreachable {
            return Err(ArchiveError::Unreachable { what, detail }.into());
        }
        bail!("{what} failed ({}): {detail}", out.status)
    }

    /// Downloads the candidate of `package` and returns the .deb's path (older downloads of
    /// the same package are removed first, so exactly one file can match).
    fn download(&self, package: &str) -> anyhow::Result<PathBuf> {
        for old in self.list_debs(package)? {
            std::fs::remove_file(&old).with_context(|| format!("removing {}", old.display()))?;
        }
        let what = format!("apt-get download {package}");
        self.run(self.command().current_dir(&self.debs).args(["download", "-qq", package]), &what)?;
        match self.list_debs(package)?.as_slice() {
            [one] => Ok(one.clone()),
            other => bail!("{what} left {} matching files in {}", other.len(), self.debs.display()),
        }
    }

    fn list_debs(&self, package: &str) -> anyhow::Result<Vec<PathBuf>> {
        let prefix = format!("{package}_");
        Ok(std::fs::read_dir(&self.debs)?
            .filter_map(Result::ok)
            .map(|e| e.path())
            .filter(|p| p.file_name().is_some_and(|n| n.to_string_lossy().starts_with(&prefix)))
            .collect())
    }
}

/// The system's Debian mirror, read from its apt configuration (no host is named in our code).
fn system_mirror() -> anyhow::Result<String> {
    let mut candidates = Vec::new();
    if let Ok(dir) = std::fs::read_dir("/etc/apt/sources.list.d") {
        for entry in dir.filter_map(Result::ok) {
            if entry.path().extension().is_some_and(|e| e == "sources") {
                let text = std::fs::read_to_string(entry.path()).unwrap_or_default();
                candidates.extend(text.lines().filter_map(|l| l.strip_prefix("URIs:")).map(|u| u.trim().to_owned()));
            }
        }
    }
    if let Ok(text) = std::fs::read_to_string("/etc/apt/sources.list") {
        candidates.extend(text.lines().filter_map(|l| {
            let mut words = l.split_whitespace().filter(|w| !w.starts_with('['));
            (words.next() == Some("deb")).then(|| words.next().map(str::to_owned)).flatten()
        }));
    }
    candidates.into_iter().find(|u| !u.contains("security")).context("no Debian mirror in /etc/apt (pass --mirror)")
}

#[cfg(test)]
mod tests {
    use super::{image_dependency, packaged_modules};

    #[test]
    fn the_versioned_image_is_found_among_alternatives() {
        assert_eq!(
            image_dependency("linux-image-6.12.117+deb13-cloud-amd64 (= 6.12.117-1)").as_deref(),
            Some("linux-image-6.12.117+deb13-cloud-amd64")
        );
        assert_eq!(
            image_dependency("linux-image-6.12.95+deb12-cloud-amd64 (= 6.12.95-1~bpo12+1)").as_deref(),
            Some("linux-image-6.12.95+deb12-cloud-amd64")
        );
        assert_eq!(
            image_dependency("firmware-x | linux-image-6.1.0-31-cloud-amd64-unsigned, foo").as_deref(),
            Some("linux-image-6.1.0-31-cloud-amd64-unsigned")
        );
        assert_eq!(image_dependency("linux-image-cloud-amd64, initramfs-tools"), None);
    }

    #[test]
    fn modules_are_found_in_either_layout_and_an_ambiguous_package_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        assert!(packaged_modules(root).is_err(), "no modules at all");
        std::fs::create_dir_all(root.join("usr/lib/modules/6.12.117+deb13-cloud-amd64")).unwrap();
        assert_eq!(packaged_modules(root).unwrap(), root.join("usr/lib/modules"));
        std::fs::create_dir_all(root.join("lib/modules/6.12.95+deb12-cloud-amd64")).unwrap();
        assert!(packaged_modules(root).is_err(), "both layouts");
        std::fs::remove_dir_all(root.join("usr")).unwrap();
        assert_eq!(packaged_modules(root).unwrap(), root.join("lib/modules"));
    }
}
