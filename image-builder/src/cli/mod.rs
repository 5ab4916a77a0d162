//! The command line. Results go to stdout (plain or JSON); progress and errors go to stderr.
//! Exit codes are [`Exit`].

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context as _;
use composefs::fs::HardlinkBehavior;
use ironroot_oci::verify::VerifyOptions;
use ironroot_oci::{Limits, Target};
use serde::Serialize;

use crate::exit::{self, Exit};
use crate::module::build::{BuildArgs, build};
use crate::module::staging::{self, Staging};
use crate::module::tree::{self, Normalise};
use crate::progress::Progress;

mod args;

pub use args::*;

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
    // Commands that talk to registries or archives say which kind of failure it was.
    let classified = matches!(
        cli.command,
        Command::Module(ModuleCommand::Push { .. } | ModuleCommand::Sign { .. } | ModuleCommand::Verify { .. })
            | Command::Kernel(KernelCommand::Fetch { .. })
    );
    match runtime.block_on(dispatch(cli.command, output, &progress)) {
        Ok(()) => Exit::Ok,
        Err(err) => {
            progress.finish();
            let exit = if classified { exit::classify(&err) } else { Exit::Failure };
            report(output, &kind_name(exit), &err);
            exit
        }
    }
}

fn kind_name(exit: Exit) -> String {
    format!("{exit:?}").to_lowercase()
}

/// Until dropped, SIGINT and SIGTERM remove `staging` (while its build may still be writing
/// into it), report the interruption and end the process with [`Exit::Interrupted`].
struct RemoveOnSignal(tokio::task::JoinHandle<()>);

impl RemoveOnSignal {
    fn watch(staging: &Staging, output: Output) -> anyhow::Result<Self> {
        use tokio::signal::unix::{SignalKind, signal};
        let mut int = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
        let mut term = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
        let dir = staging.path().to_owned();
        Ok(Self(tokio::spawn(async move {
            tokio::select! {
                _ = int.recv() => {}
                _ = term.recv() => {}
            }
            let err = match staging::abandon(&dir) {
                Ok(()) => anyhow::anyhow!("module build interrupted"),
                Err(e) => {
                    anyhow::Error::new(e).context(format!("module build interrupted; removing {}", dir.display()))
                }
            };
            report(output, &kind_name(Exit::Interrupted), &err);
            std::process::exit(i32::from(Exit::Interrupted as u8));
        })))
    }
}

impl Drop for RemoveOnSignal {
    fn drop(&mut self) {
        self.0.abort();
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
            live,
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
                health: live.health()?,
                mount_point: live.mount,
                units: live.units,
                out: out.clone(),
                normalise,
                pack_size: pack_size.max(1),
            };
            let staging = Staging::create(&out)?;
            let _watch = RemoveOnSignal::watch(&staging, output)?;
            let built = tokio::task::block_in_place(|| build(&args, staging, progress))?;
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
        Command::Kernel(KernelCommand::Fetch { out, suite, flavour, package, mirror, apt_dir }) => {
            let package = package.unwrap_or_else(|| flavour.metapackage().to_owned());
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
                crate::initramfs::FIXED_MODULES.iter().map(|m| (*m).to_owned()).collect()
            } else {
                o.modules
            };
            let hardware = match &o.modules_from {
                Some(file) => crate::initramfs::Hardware::Listed {
                    names: crate::initramfs::modules::read_list(file)?,
                    add: o.modules_add.clone(),
                },
                None => crate::initramfs::Hardware::Default { add: o.modules_add.clone() },
            };
            let args = crate::initramfs::InitramfsArgs {
                agent: o.agent,
                kernel: o.kernel,
                modules,
                hardware,
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
                    "{} {} bytes ({} uncompressed), {} entries, {} modules for {} ({} kernel; {} drivers by modalias{})",
                    b.path.display(),
                    b.bytes,
                    b.uncompressed_bytes,
                    b.entries,
                    b.modules.len(),
                    b.release,
                    b.flavour,
                    b.hardware.len(),
                    if b.skipped.is_empty() {
                        String::new()
                    } else {
                        format!(", not in this kernel: {}", b.skipped.join(" "))
                    }
                )
            });
        }
        Command::Verity { files } => {
            for file in files {
                let f = std::fs::File::open(&file).with_context(|| format!("opening {}", file.display()))?;
                let digest = ironroot_contract::verity::verity_digest_of(f)
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
