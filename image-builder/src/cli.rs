//! The command line. Results go to stdout (plain or JSON); progress and errors go to stderr.
//! Exit codes are [`Exit`].

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context as _;
use clap::{Args, Parser, Subcommand, ValueEnum};
use composefs::fs::HardlinkBehavior;
use ironroot_oci::verify::VerifyOptions;
use ironroot_oci::{Credentials, Limits, RegistryAccess, Target};
use ironroot_spec::{KeyAlgorithm, MountRole};
use serde::Serialize;

use crate::exit::Exit;
use crate::module::build::{BuildArgs, build};
use crate::module::tree::{self, Normalise};
use crate::module::verify::VerifyCommandError;
use crate::progress::Progress;

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
    Verity { files: Vec<PathBuf> },
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
    agent: PathBuf,
    /// The output of `kernel fetch`.
    #[arg(long, default_value = "target/kernel")]
    kernel: PathBuf,
    /// Kernel modules to include (with their dependencies) [default: what a node needs].
    #[arg(long, value_delimiter = ',')]
    modules: Vec<String>,
    /// Trusted module-signing public keys (PEM), repeatable.
    #[arg(long, required = true)]
    trust: Vec<PathBuf>,
    /// The plane's CA certificate, embedded as /etc/ironroot/plane-ca.pem.
    #[arg(long)]
    plane_ca: Option<PathBuf>,
    /// The CA (PEM) of a registry with a private certificate.
    #[arg(long)]
    registry_ca: Option<PathBuf>,
    /// A further program, HOST_PATH=IMAGE_PATH (mke2fs is always included).
    #[arg(long, value_parser = parse_binary)]
    binary: Vec<(PathBuf, String)>,
    /// A busybox binary for a break-glass shell.
    #[arg(long)]
    busybox: Option<PathBuf>,
    #[arg(long, value_enum, default_value_t = crate::initramfs::Compression::None)]
    compression: crate::initramfs::Compression,
    /// Where the agent's shared libraries are looked up.
    #[arg(long, default_value = "/")]
    sysroot: PathBuf,
    /// The mtime of every entry (seconds since the epoch).
    #[arg(long, env = "SOURCE_DATE_EPOCH", default_value_t = 0)]
    mtime: u32,
    #[arg(long)]
    out: PathBuf,
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
        #[arg(long, default_value = "target/kernel")]
        out: PathBuf,
        #[arg(long, default_value = "bookworm-backports")]
        suite: String,
        #[arg(long, default_value = "linux-image-cloud-amd64")]
        package: String,
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
        #[arg(long)]
        out: PathBuf,
        #[arg(long, default_value = "ed25519", value_parser = parse_alg)]
        algorithm: KeyAlgorithm,
    },
}

fn parse_alg(s: &str) -> Result<KeyAlgorithm, String> {
    s.parse()
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
        #[arg(long)]
        from: PathBuf,
        #[arg(long)]
        name: String,
        #[arg(long)]
        version: String,
        /// Monotonic per module name; nodes refuse to go below a serial they accepted.
        #[arg(long)]
        serial: u64,
        #[arg(long)]
        out: PathBuf,
        #[arg(long, default_value = "root", value_parser = parse_role)]
        role: MountRole,
        /// systemd unit to restart when this module is updated in place (repeatable).
        #[arg(long = "restart-unit")]
        restart_units: Vec<String>,
        /// Every inode's mtime: seconds since the epoch, or `source` to keep the tree's.
        /// Default: $SOURCE_DATE_EPOCH, else 0.
        #[arg(long)]
        mtime: Option<String>,
        /// Force every owner to UID:GID, or `keep`.
        #[arg(long, default_value = "keep")]
        owner: String,
        #[arg(long, value_enum, default_value_t = Hardlinks::Keep)]
        hardlinks: Hardlinks,
        /// Object bytes per pack (packs are written and fetched in parallel; 64 MiB keeps two
        /// cores evenly busy without making thousands of blobs).
        #[arg(long, default_value_t = 64 << 20)]
        pack_size: u64,
    },
    /// Copy a module (and its signatures) from an OCI layout to a registry or layout; prints REF@DIGEST.
    Push {
        layout: String,
        reference: String,
        #[command(flatten)]
        registry: RegistryOpts,
    },
    /// Sign REF@DIGEST with a PKCS#8 key; keeps signatures already there.
    Sign {
        reference: String,
        #[arg(long)]
        key: PathBuf,
        #[command(flatten)]
        registry: RegistryOpts,
    },
    /// Verify the whole trust chain of a module; exit 0 and its digest, or non-zero and why.
    Verify {
        reference: String,
        /// Trusted public key (PKIX PEM); repeatable.
        #[arg(long = "trust", required = true)]
        trust: Vec<PathBuf>,
        #[arg(long)]
        min_serial: Option<u64>,
        /// Install the verified image and objects here (default: check them, keep nothing).
        #[arg(long)]
        store: Option<PathBuf>,
        #[arg(long, default_value_t = Limits::standard().max_manifest)]
        max_manifest_size: u64,
        /// Total seconds allowed per manifest request.
        #[arg(long, default_value_t = Limits::standard().manifest_deadline.as_secs())]
        manifest_deadline: u64,
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
    ca: Vec<PathBuf>,
    /// User name for registry basic or token auth; the password comes from $IRONROOT_REGISTRY_PASSWORD.
    #[arg(long = "registry-user")]
    user: Option<String>,
    #[arg(long = "registry-password", env = "IRONROOT_REGISTRY_PASSWORD", hide_env_values = true, hide = true)]
    password: Option<String>,
    /// A bearer token to send as is.
    #[arg(long = "registry-token", env = "IRONROOT_REGISTRY_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// Use TLS even for a loopback registry.
    #[arg(long = "registry-tls")]
    tls: bool,
}

impl RegistryOpts {
    fn access(&self) -> anyhow::Result<RegistryAccess> {
        let ca_pem = self
            .ca
            .iter()
            .map(|p| std::fs::read(p).with_context(|| format!("reading registry CA {}", p.display())))
            .collect::<anyhow::Result<_>>()?;
        let credentials = match (&self.token, &self.user) {
            (Some(t), _) => Credentials::Bearer(t.clone()),
            (None, Some(u)) => {
                Credentials::Basic { user: u.clone(), password: self.password.clone().unwrap_or_default() }
            }
            (None, None) => Credentials::Anonymous,
        };
        Ok(RegistryAccess { ca_pem, credentials, force_tls: self.tls })
    }
}

fn parse_binary(s: &str) -> Result<(PathBuf, String), String> {
    match s.split_once('=') {
        Some((host, image)) if !host.is_empty() && image.starts_with('/') => Ok((host.into(), image.to_owned())),
        _ => Err(format!("{s:?} is not HOST_PATH=/IMAGE_PATH")),
    }
}

fn emit<T: Serialize>(output: Output, value: &T, plain: impl FnOnce(&T) -> String) {
    match output {
        Output::Json => println!("{}", serde_json::to_string(value).unwrap_or_default()),
        Output::Plain => println!("{}", plain(value)),
    }
}

fn report(output: Output, kind: &str, err: &anyhow::Error) {
    eprintln!("error: {err:#}");
    if output == Output::Json {
        println!("{}", serde_json::json!({"error": format!("{err:#}"), "kind": kind}));
    }
}

/// Runs one command and returns its exit code.
pub fn run(cli: Cli) -> Exit {
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: starting runtime: {e}");
            return Exit::Failure;
        }
    };
    let output = cli.output;
    let progress = Progress::new(output == Output::Plain);
    match runtime.block_on(dispatch(cli.command, output, &progress)) {
        Ok(()) => Exit::Ok,
        Err(err) => {
            progress.finish();
            let exit = match err.downcast_ref::<VerifyCommandError>() {
                Some(VerifyCommandError::Verify(_, v)) => Exit::from(v.kind()),
                _ => Exit::Failure,
            };
            report(output, &format!("{exit:?}").to_lowercase(), &err);
            exit
        }
    }
}

async fn dispatch(command: Command, output: Output, progress: &Progress) -> anyhow::Result<()> {
    match command {
        Command::Keys(KeysCommand::Generate { out, algorithm }) => {
            let (key, public) = crate::keys::generate(&out, algorithm)?;
            let v = serde_json::json!({"private_key": key, "public_key": public, "algorithm": algorithm.to_string()});
            emit(output, &v, |_| format!("{}\n{}", key.display(), public.display()));
        }
        Command::Module(ModuleCommand::Build {
            from,
            name,
            version,
            serial,
            out,
            role,
            restart_units,
            mtime,
            owner,
            hardlinks,
            pack_size,
        }) => {
            let normalise = Normalise {
                mtime: tree::parse_mtime(mtime.as_deref())?,
                owner: tree::parse_owner(&owner)?,
                hardlinks: match hardlinks {
                    Hardlinks::Keep => HardlinkBehavior::Tracked,
                    Hardlinks::Break => HardlinkBehavior::Break,
                },
            };
            let args = BuildArgs {
                from,
                name,
                version,
                serial,
                role,
                restart_units,
                out: out.clone(),
                normalise,
                pack_size: pack_size.max(1),
            };
            let built = tokio::task::block_in_place(|| build(&args, progress))?;
            emit(output, &built, |b| format!("oci:{}:{}@{}", out.display(), b.tag, b.digest));
        }
        Command::Kernel(KernelCommand::Check { config, required }) => {
            use crate::kernel::check;
            let read = |p: &PathBuf| std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()));
            let list = match &required {
                Some(p) => read(p)?,
                None => check::REQUIRED.to_owned(),
            };
            let required = check::parse_required(&list).map_err(anyhow::Error::msg)?;
            let missing = check::check(&required, &check::parse_config(&read(&config)?));
            emit(output, &serde_json::json!({"config": config, "missing": missing}), |_| {
                missing
                    .iter()
                    .map(|m| format!("missing {} (want {}, found {})\n", m.option, m.want, m.found))
                    .collect::<String>()
                    + &format!("{}: {} of {} required options missing", config.display(), missing.len(), required.len())
            });
            if !missing.is_empty() {
                anyhow::bail!("{} lacks {} required kernel options", config.display(), missing.len());
            }
        }
        Command::Kernel(KernelCommand::Fetch { out, suite, package, mirror, apt_dir }) => {
            let apt_dir = apt_dir.unwrap_or_else(|| crate::cache_dir().join(format!("apt-{suite}")));
            let args = crate::kernel::fetch::FetchArgs { suite, package, out: out.clone(), apt_dir, mirror };
            progress.phase(&format!("fetching {} from {}", args.package, args.suite));
            let info = tokio::task::block_in_place(|| crate::kernel::fetch::fetch(&args))?;
            progress.finish();
            emit(output, &info, |i| {
                let how = if i.cached { "already current" } else { "fetched" };
                format!("{} {} ({}) {how} in {}", i.package, i.version, i.release, out.display())
            });
        }
        Command::Initramfs(o) => {
            let modules = if o.modules.is_empty() {
                crate::initramfs::DEFAULT_MODULES.iter().map(|m| (*m).to_owned()).collect()
            } else {
                o.modules
            };
            let args = crate::initramfs::InitramfsArgs {
                agent: o.agent,
                kernel: o.kernel,
                modules,
                trust: o.trust,
                plane_ca: o.plane_ca,
                registry_ca: o.registry_ca,
                binaries: o.binary,
                busybox: o.busybox,
                compression: o.compression,
                sysroot: o.sysroot,
                mtime: o.mtime,
                out: o.out,
            };
            let built = crate::initramfs::build(&args)?;
            emit(output, &built, |b| {
                format!(
                    "{} {} bytes ({} uncompressed), {} entries, {} modules for {}",
                    b.path.display(),
                    b.bytes,
                    b.uncompressed_bytes,
                    b.entries,
                    b.modules.len(),
                    b.release
                )
            });
        }
        Command::Verity { files } => {
            for file in files {
                let f = std::fs::File::open(&file).with_context(|| format!("opening {}", file.display()))?;
                let digest = ironroot_spec::verity::verity_digest_of(f)
                    .with_context(|| format!("reading {}", file.display()))?;
                emit(output, &serde_json::json!({"file": file, "verity": digest.to_string()}), |_| {
                    format!("{digest}  {}", file.display())
                });
            }
        }
        Command::Module(ModuleCommand::Push { layout, reference, registry }) => {
            let pushed = crate::module::push::push(&layout, &reference, &registry.access()?, progress).await?;
            emit(output, &pushed, |p| p.reference.clone());
        }
        Command::Module(ModuleCommand::Sign { reference, key, registry }) => {
            let key = crate::keys::load_signing_key(&key)?;
            let target = Target::parse(&reference)?;
            let signed = crate::module::sign::sign(&target, &key, &registry.access()?).await?;
            emit(output, &signed, |s| {
                format!("{} {}", s.signature_tag, if s.added { "signed" } else { "already signed by this key" })
            });
        }
        Command::Module(ModuleCommand::Verify {
            reference,
            trust,
            min_serial,
            store,
            max_manifest_size,
            manifest_deadline,
            max_blob_size,
            blob_deadline,
            parallel,
            registry,
        }) => {
            let trust = trust.iter().map(|p| crate::keys::load_trusted_key(p)).collect::<anyhow::Result<_>>()?;
            let limits = Limits {
                max_manifest: max_manifest_size,
                manifest_deadline: Duration::from_secs(manifest_deadline),
                max_blob: max_blob_size,
                blob_deadline: blob_deadline.map(Duration::from_secs),
                parallel: parallel.max(1),
                ..Limits::standard()
            };
            let opts = VerifyOptions { trust, min_serial, limits };
            let target = Target::parse(&reference)?;
            progress.phase(&format!("verifying {target}"));
            let verified = crate::module::verify::verify(&target, store, &opts, &registry.access()?).await?;
            progress.finish();
            emit(output, &verified, |v| {
                format!("{}\n{} {} serial {} verified by key {}", v.reference, v.name, v.version, v.serial, v.key_id)
            });
        }
    }
    Ok(())
}
