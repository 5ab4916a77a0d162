//! The command line's arguments (clap derive).

use std::path::PathBuf;

use anyhow::Context as _;
use clap::{Args, Parser, Subcommand, ValueEnum};
use ironroot_contract::config::{DEFAULT_HEALTH_DEADLINE_S, HealthCheck, HttpProbe};
use ironroot_contract::{KeyAlgorithm, MountRole};
use ironroot_oci::{Credentials, Limits, RegistryAccess};

#[derive(Debug, Parser)]
#[command(name = "ironroot-build", version, about = "Build, push, sign and verify ironroot modules")]
pub struct Cli {
    /// Result format on stdout.
    #[arg(long, value_enum, default_value_t = Output::Plain, global = true)]
    pub output: Output,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Output {
    Plain,
    Json,
}

#[derive(Debug, Subcommand)]
#[allow(clippy::large_enum_variant, reason = "parsed once per process; boxing buys nothing")]
pub enum Command {
    /// Signing keys.
    #[command(subcommand)]
    Keys(KeysCommand),
    /// Modules: build, push, sign, verify.
    #[command(subcommand)]
    Module(ModuleCommand),
    /// Print the fs-verity digest (the object-store name) of each file.
    Verity {
        /// Files to digest.
        files: Vec<PathBuf>,
    },
    /// Kernels: check a configuration against the options a node needs; fetch the default one.
    #[command(subcommand)]
    Kernel(KernelCommand),
    /// Write the native initramfs: the agent as /init, its libraries, kernel modules, trust roots.
    Initramfs(InitramfsOpts),
}

#[derive(Debug, Args)]
pub struct InitramfsOpts {
    /// The agent binary (becomes /init).
    #[arg(long)]
    pub(super) agent: PathBuf,
    /// The output of `kernel fetch`.
    #[arg(long, default_value = "target/kernel")]
    pub(super) kernel: PathBuf,
    /// The fixed set: modules loaded on every boot, after the hardware's (with their
    /// dependencies) [default: the root's and the store's filesystems, dmi_sysfs].
    #[arg(long, value_delimiter = ',')]
    pub(super) modules: Vec<String>,
    /// More hardware drivers, loaded when a device's modalias asks for them (comma-separated;
    /// each must be in the kernel).
    #[arg(long, value_delimiter = ',')]
    pub(super) modules_add: Vec<String>,
    /// The hardware drivers, one name per line, instead of the kernel flavour's default (cloud:
    /// virtio; generic: server NICs, NVMe, SATA, SAS and virtio).
    #[arg(long, value_name = "FILE")]
    pub(super) modules_from: Option<PathBuf>,
    /// Trusted module-signing public keys (PEM), repeatable.
    #[arg(long, required = true)]
    pub(super) trust: Vec<PathBuf>,
    /// The plane's CA certificate, embedded as /etc/ironroot/plane-ca.pem.
    #[arg(long)]
    pub(super) plane_ca: Option<PathBuf>,
    /// The CA (PEM) of a registry with a private certificate.
    #[arg(long)]
    pub(super) registry_ca: Option<PathBuf>,
    /// A further program, HOST_PATH=IMAGE_PATH (mke2fs is always included).
    #[arg(long, value_parser = parse_binary)]
    pub(super) binary: Vec<(PathBuf, String)>,
    /// A busybox binary for a break-glass shell.
    #[arg(long)]
    pub(super) busybox: Option<PathBuf>,
    /// Compress the cpio archive (gzip pays off when netbooting).
    #[arg(long, value_enum, default_value_t = crate::initramfs::Compression::None)]
    pub(super) compression: crate::initramfs::Compression,
    /// Where the agent's shared libraries are looked up.
    #[arg(long, default_value = "/")]
    pub(super) sysroot: PathBuf,
    /// The mtime of every entry (seconds since the epoch).
    #[arg(long, env = "SOURCE_DATE_EPOCH", default_value_t = 0)]
    pub(super) mtime: u32,
    /// The initramfs file to write.
    #[arg(long)]
    pub(super) out: PathBuf,
}

#[derive(Debug, Subcommand)]
pub enum KernelCommand {
    /// Report every required option CONFIG lacks (exit 1 when any is missing).
    Check {
        /// A kernel `.config` (e.g. /boot/config-6.12.…).
        config: PathBuf,
        /// The required list [default: the one built in, kernel-configs/required].
        #[arg(long)]
        required: Option<PathBuf>,
    },
    /// Fetch the default node kernel (a Debian package, resolved through its metapackage) into
    /// OUT: vmlinuz, config, modules/ (with modules.dep), kernel.json. Reuses OUT when current.
    Fetch {
        /// The directory to write (replaced as a whole, only when everything succeeded).
        #[arg(long, default_value = "target/kernel")]
        out: PathBuf,
        /// The Debian suite to take the kernel from (the base module's suite by default).
        #[arg(long, default_value = "trixie")]
        suite: String,
        /// Which Debian kernel: `cloud` (linux-image-cloud-amd64: virtual hardware, small) or
        /// `generic` (linux-image-amd64: bare-metal NICs and disks).
        #[arg(long, value_enum, default_value_t = crate::kernel::fetch::Flavour::Cloud)]
        flavour: crate::kernel::fetch::Flavour,
        /// The metapackage that names the kernel's versioned image package [default: the
        /// flavour's].
        #[arg(long)]
        package: Option<String>,
        /// Debian archive address [default: the system's own mirror, from /etc/apt].
        #[arg(long)]
        mirror: Option<String>,
        /// Private apt state [default: ~/.cache/ironroot/apt-SUITE].
        #[arg(long)]
        apt_dir: Option<PathBuf>,
    },
}

#[derive(Debug, Subcommand)]
pub enum KeysCommand {
    /// Generate DIR/ironroot.key (PKCS#8 PEM, 0600) and DIR/ironroot.pub (PKIX PEM).
    Generate {
        /// The directory DIR (created; existing keys are never overwritten).
        #[arg(long)]
        out: PathBuf,
        /// `ed25519` or `p256` (ECDSA P-256 with SHA-256).
        #[arg(long, default_value = "ed25519", value_parser = parse_alg)]
        algorithm: KeyAlgorithm,
    },
}

fn parse_alg(s: &str) -> Result<KeyAlgorithm, String> {
    s.parse()
}

/// What a live module (`opt`, `ext`) declares: where it mounts, its units, its health check.
#[derive(Debug, Args)]
pub struct LiveOpts {
    /// Role ext: where nodes mount the module (an absolute path, e.g. /srv/app).
    #[arg(long = "mount")]
    pub mount: Option<String>,
    /// A systemd unit the module ships in usr/lib/systemd/system (repeatable). Roles opt and
    /// ext: linked, started when attached, restarted when updated; root and usr: a unit the
    /// root enables that must be active for a root update to pass its trial.
    #[arg(long = "unit")]
    pub units: Vec<String>,
    /// Health probe: an absolute command and its arguments, split on spaces (no shell); it must
    /// exit 0 once the units are active.
    #[arg(long = "health-cmd")]
    pub health_cmd: Option<String>,
    /// Health probe over HTTP on the node's 127.0.0.1: PORT/PATH, answered 2xx.
    #[arg(long = "health-http")]
    pub health_http: Option<String>,
    /// Seconds the health gate may take [default: 60].
    #[arg(long = "health-deadline")]
    pub health_deadline: Option<u64>,
}

impl LiveOpts {
    /// The health check these flags declare, if any.
    pub fn health(&self) -> anyhow::Result<Option<HealthCheck>> {
        if self.health_cmd.is_none() && self.health_http.is_none() && self.health_deadline.is_none() {
            return Ok(None);
        }
        let command =
            self.health_cmd.as_deref().map(|c| c.split_whitespace().map(str::to_owned).collect()).unwrap_or_default();
        let http = match &self.health_http {
            None => None,
            Some(v) => {
                let (port, path) =
                    v.split_once('/').with_context(|| format!("--health-http {v:?} is not PORT/PATH"))?;
                let port = port.parse().with_context(|| format!("--health-http {v:?}: the port is not a number"))?;
                Some(HttpProbe { port, path: format!("/{path}") })
            }
        };
        Ok(Some(HealthCheck { command, http, deadline_s: self.health_deadline.unwrap_or(DEFAULT_HEALTH_DEADLINE_S) }))
    }
}

fn parse_role(s: &str) -> Result<MountRole, String> {
    s.parse()
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum Hardlinks {
    /// Keep hard links as shared inodes.
    Keep,
    /// Give every name its own inode, as `mkcomposefs` does.
    Break,
}

#[derive(Debug, Subcommand)]
pub enum ModuleCommand {
    /// Build a module from a directory or a tar archive into an OCI layout.
    Build {
        /// The source: a directory, or a tar archive (unpacked with GNU tar).
        #[arg(long)]
        from: PathBuf,
        /// The module's name (nodes keep one serial floor per name).
        #[arg(long)]
        name: String,
        /// The module's version; also its tag in the layout.
        #[arg(long)]
        version: String,
        /// Monotonic per module name; nodes refuse to go below a serial they accepted.
        #[arg(long)]
        serial: u64,
        /// The OCI layout to write: created, or an existing layout the module is added to.
        /// Built beside it and moved in only when complete.
        #[arg(long)]
        out: PathBuf,
        /// Where nodes mount the module: `root`, `usr` (both layered into the root at boot),
        /// `opt` (live at /opt/NAME) or `ext` (live at --mount).
        #[arg(long, default_value = "root", value_parser = parse_role)]
        role: MountRole,
        /// systemd unit to restart when this module is updated in place (repeatable).
        #[arg(long = "restart-unit")]
        restart_units: Vec<String>,
        #[command(flatten)]
        live: LiveOpts,
        /// Every inode's mtime: seconds since the epoch, or `source` to keep the tree's.
        /// Default: $SOURCE_DATE_EPOCH, else 0.
        #[arg(long)]
        mtime: Option<String>,
        /// Force every owner to UID:GID, or `keep`.
        #[arg(long, default_value = "keep")]
        owner: String,
        /// What hard links in the tree become.
        #[arg(long, value_enum, default_value_t = Hardlinks::Keep)]
        hardlinks: Hardlinks,
        /// Object bytes per pack (packs are written and fetched in parallel; 64 MiB keeps two
        /// cores evenly busy without making thousands of blobs).
        #[arg(long, default_value_t = 64 << 20)]
        pack_size: u64,
    },
    /// Copy a module (and its signatures) from an OCI layout to a registry or layout; prints REF@DIGEST.
    Push {
        /// The source layout: DIR, or oci:DIR:TAG when it holds several modules.
        layout: String,
        /// The destination: REGISTRY/REPOSITORY[:TAG], or oci:DIR[:TAG].
        reference: String,
        #[command(flatten)]
        registry: RegistryOpts,
    },
    /// Sign REF@DIGEST with a PKCS#8 key; keeps signatures already there.
    Sign {
        /// The module to sign, pinned by digest: REPOSITORY@sha256:… or oci:DIR@sha256:….
        reference: String,
        /// The private key (PKCS#8 PEM, Ed25519 or P-256).
        #[arg(long)]
        key: PathBuf,
        #[command(flatten)]
        registry: RegistryOpts,
    },
    /// Verify the whole trust chain of a module; exit 0 and its digest, or non-zero and why.
    Verify {
        /// The module: REPOSITORY[:TAG|@sha256:…] or oci:DIR[:TAG|@sha256:…].
        reference: String,
        /// Trusted public key (PKIX PEM); repeatable.
        #[arg(long = "trust", required = true)]
        trust: Vec<PathBuf>,
        /// Refuse a module whose serial is below this (rollback protection).
        #[arg(long)]
        min_serial: Option<u64>,
        /// Install the verified image and objects here (default: check them, keep nothing).
        #[arg(long)]
        store: Option<PathBuf>,
        /// Largest manifest read, in bytes.
        #[arg(long, default_value_t = Limits::standard().max_manifest)]
        max_manifest_size: u64,
        /// Total seconds allowed per manifest request.
        #[arg(long, default_value_t = Limits::standard().manifest_deadline.as_secs())]
        manifest_deadline: u64,
        /// Largest blob fetched, in bytes; a larger one is refused before it is downloaded.
        #[arg(long, default_value_t = Limits::standard().max_blob)]
        max_blob_size: u64,
        /// Total seconds allowed per blob (default: 60 s + 1 s per MiB declared).
        #[arg(long)]
        blob_deadline: Option<u64>,
        /// Blobs fetched at once.
        #[arg(long, default_value_t = Limits::standard().parallel)]
        parallel: usize,
        #[command(flatten)]
        registry: RegistryOpts,
    },
}

#[derive(Debug, Args)]
pub struct RegistryOpts {
    /// Extra CA certificate(s) for registry TLS (PEM); implies TLS for loopback registries too.
    #[arg(long = "registry-ca")]
    pub(super) ca: Vec<PathBuf>,
    /// User name for registry basic or token auth; the password comes from $IRONROOT_REGISTRY_PASSWORD
    /// (never from the command line, which every local user can read).
    #[arg(long = "registry-user")]
    pub(super) user: Option<String>,
    /// Use TLS even for a loopback registry.
    #[arg(long = "registry-tls")]
    pub(super) tls: bool,
}

impl RegistryOpts {
    pub(super) fn access(&self) -> anyhow::Result<RegistryAccess> {
        let ca_pem = self
            .ca
            .iter()
            .map(|p| std::fs::read(p).with_context(|| format!("reading registry CA {}", p.display())))
            .collect::<anyhow::Result<_>>()?;
        // A bearer token comes from the environment only, like the password: argv is visible to
        // every local user.
        let token = std::env::var(TOKEN_VAR).ok().filter(|t| !t.is_empty());
        let credentials = match (token, &self.user) {
            (Some(t), _) => Credentials::Bearer(t),
            (None, Some(u)) => Credentials::Basic { user: u.clone(), password: registry_password()? },
            (None, None) => Credentials::Anonymous,
        };
        Ok(RegistryAccess { ca_pem, credentials, force_tls: self.tls })
    }
}

/// The registry password, from the environment only.
fn registry_password() -> anyhow::Result<String> {
    match std::env::var(PASSWORD_VAR) {
        Ok(p) => Ok(p),
        Err(std::env::VarError::NotPresent) => Ok(String::new()),
        Err(std::env::VarError::NotUnicode(_)) => anyhow::bail!("${PASSWORD_VAR} is not UTF-8"),
    }
}

const PASSWORD_VAR: &str = "IRONROOT_REGISTRY_PASSWORD";
/// A bearer token sent as is (instead of basic or token auth).
const TOKEN_VAR: &str = "IRONROOT_REGISTRY_TOKEN";

fn parse_binary(s: &str) -> Result<(PathBuf, String), String> {
    match s.split_once('=') {
        Some((host, image)) if !host.is_empty() && image.starts_with('/') => Ok((host.into(), image.to_owned())),
        _ => Err(format!("{s:?} is not HOST_PATH=/IMAGE_PATH")),
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser as _;

    use super::Cli;

    #[test]
    fn a_secret_is_never_an_argument() {
        for flag in ["--registry-password", "--registry-token"] {
            let err =
                Cli::try_parse_from(["ironroot-build", "module", "push", "layout", "127.0.0.1:5000/a", flag, "s"])
                    .unwrap_err();
            assert_eq!(err.kind(), clap::error::ErrorKind::UnknownArgument, "{flag}");
        }
    }
}
