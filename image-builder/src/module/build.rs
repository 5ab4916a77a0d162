//! `module build`: source tree → composefs EROFS image (format V1, byte-compatible with
//! `mkcomposefs --min-version=1`) + object packs + config + manifest, written into an OCI image
//! layout and tagged with the module version. Same tree and arguments, same manifest digest.
//! Everything is written into a [`Staging`] directory beside `--out` and moved there only
//! when complete, so a failed or interrupted build leaves `--out` as it was.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{self, BufWriter, Write};
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::PathBuf;
use std::sync::Mutex;

use anyhow::{Context as _, bail};
use composefs::erofs::format::FormatVersion;
use composefs::erofs::writer::{ValidatedFileSystem, mkfs_erofs_versioned};
use ironroot_contract::config::{self, CONFIG_SCHEMA_VERSION, HealthCheck, format_epoch};
use ironroot_contract::manifest::{Descriptor, ImageManifest};
use ironroot_contract::pack::PackWriter;
use ironroot_contract::{ModuleConfig, MountRole, OciDigest, VerityDigest, media, verity_digest};
use ironroot_oci::layout::{Layout, partial_path};
use serde::Serialize;
use sha2::{Digest as _, Sha256};

use super::staging::Staging;
use super::tree::{self, MtimePolicy, Normalise, ObjectSource, SourceTree};
use crate::progress::Progress;

#[derive(Debug, Clone)]
pub struct BuildArgs {
    pub from: PathBuf,
    pub name: String,
    pub version: String,
    pub serial: u64,
    pub role: MountRole,
    pub restart_units: Vec<String>,
    /// Role ext: where nodes mount it.
    pub mount_point: Option<String>,
    /// Units the module ships (in `usr/lib/systemd/system/` of its tree).
    pub units: Vec<String>,
    pub health: Option<HealthCheck>,
    pub out: PathBuf,
    pub normalise: Normalise,
    /// Packs are filled up to this many object bytes (an object larger than this gets its own).
    pub pack_size: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct BuildOutput {
    pub digest: OciDigest,
    pub tag: String,
    pub composefs_digest: VerityDigest,
    pub image_bytes: u64,
    pub objects: u64,
    pub object_bytes: u64,
    pub packs: usize,
}

/// Builds the module into `staging` and moves it to `args.out` (whose [`Staging`] it must be).
pub fn build(args: &BuildArgs, staging: Staging, progress: &Progress) -> anyhow::Result<BuildOutput> {
    config::validate_name(&args.name)?;
    config::validate_version(&args.version)?;
    let source = SourceTree::open(&args.from)?;
    check_units(source.root(), &args.units)?;
    progress.phase("scanning tree and hashing objects");
    let fs = tree::scan(source.root(), &args.normalise)?;
    let objects = tree::external_objects(&fs, source.root())?;
    progress.phase("writing EROFS image");
    let validated = ValidatedFileSystem::new(fs).context("source tree is not a valid composefs tree")?;
    let image = mkfs_erofs_versioned(&validated, FormatVersion::V1);
    drop(validated);
    let composefs_digest = verity_digest(&image);

    let layout = Layout::create(staging.path())?;
    let image_digest = layout.write_blob(&image)?;
    let object_bytes: u64 = objects.values().map(|o| o.size).sum();
    progress.bytes("writing object packs", object_bytes);
    let packs = write_packs(&layout, &objects, args.pack_size, progress)?;
    drop(source);

    let created = match args.normalise.mtime {
        MtimePolicy::Fixed(t) => format_epoch(u64::try_from(t).unwrap_or(0)),
        MtimePolicy::Source => {
            format_epoch(std::env::var("SOURCE_DATE_EPOCH").ok().and_then(|v| v.parse().ok()).unwrap_or(0))
        }
    };
    let config = ModuleConfig {
        schema_version: CONFIG_SCHEMA_VERSION,
        name: args.name.clone(),
        version: args.version.clone(),
        serial: args.serial,
        composefs_digest,
        objects: objects.len() as u64,
        object_bytes,
        role: args.role,
        restart_units: args.restart_units.clone(),
        created: created.clone(),
        mount_point: args.mount_point.clone(),
        units: args.units.clone(),
        health: args.health.clone(),
    };
    config.validate()?;
    let config_bytes = config.to_bytes();
    let config_digest = layout.write_blob(&config_bytes)?;

    let mut layers = vec![Descriptor::new(media::EROFS_IMAGE, image_digest, image.len() as u64)];
    layers.extend(packs.iter().cloned());
    let manifest = ImageManifest {
        schema_version: 2,
        media_type: Some(media::OCI_MANIFEST.into()),
        artifact_type: Some(media::MODULE_ARTIFACT_TYPE.into()),
        config: Descriptor::new(media::MODULE_CONFIG, config_digest, config_bytes.len() as u64),
        layers,
        subject: None,
        annotations: BTreeMap::from([
            (media::ANNOTATION_CREATED.to_owned(), created),
            (media::ANNOTATION_TITLE.to_owned(), args.name.clone()),
            (media::ANNOTATION_VERSION.to_owned(), args.version.clone()),
        ]),
    };
    let manifest_bytes = manifest.to_bytes();
    let digest = layout.write_blob(&manifest_bytes)?;
    let mut desc = Descriptor::new(media::OCI_MANIFEST, digest, manifest_bytes.len() as u64);
    desc.artifact_type = Some(media::MODULE_ARTIFACT_TYPE.into());
    layout.set_tag(&args.version, desc.clone())?;
    let blobs: Vec<OciDigest> =
        [digest, config_digest].into_iter().chain(manifest.layers.iter().map(|l| l.digest)).collect();
    staging.finish(&args.version, desc, &blobs)?;
    progress.finish();
    Ok(BuildOutput {
        digest,
        tag: args.version.clone(),
        composefs_digest,
        image_bytes: image.len() as u64,
        objects: objects.len() as u64,
        object_bytes,
        packs: packs.len(),
    })
}

/// Every declared unit is a file (or a link) in the tree's `usr/lib/systemd/system/`: a node
/// must not find a module's unit missing when it attaches it.
fn check_units(root: &std::path::Path, units: &[String]) -> anyhow::Result<()> {
    for unit in units {
        let path = root.join("usr/lib/systemd/system").join(unit);
        match std::fs::symlink_metadata(&path) {
            Ok(m) if m.is_file() || m.is_symlink() => {}
            Ok(_) => bail!("unit {unit}: usr/lib/systemd/system/{unit} in the tree is not a file"),
            Err(_) => bail!("unit {unit} is declared but usr/lib/systemd/system/{unit} is not in the tree"),
        }
    }
    Ok(())
}

/// Splits objects (ascending digest) into packs of about `pack_size` bytes and writes them in
/// parallel, one pack per worker at a time.
fn write_packs(
    layout: &Layout,
    objects: &BTreeMap<VerityDigest, ObjectSource>,
    pack_size: u64,
    progress: &Progress,
) -> anyhow::Result<Vec<Descriptor>> {
    let mut groups: Vec<Vec<(&VerityDigest, &ObjectSource)>> = Vec::new();
    let mut filled = 0u64;
    for (d, o) in objects {
        let start_new = groups.last().is_none_or(|g| !g.is_empty() && filled + o.size > pack_size);
        if start_new {
            groups.push(Vec::new());
            filled = 0;
        }
        if let Some(g) = groups.last_mut() {
            g.push((d, o));
        }
        filled += o.size;
    }
    let workers = std::thread::available_parallelism().map_or(2, |n| n.get()).min(groups.len().max(1));
    let next = Mutex::new(0usize);
    let results: Mutex<Vec<Option<anyhow::Result<Descriptor>>>> = Mutex::new((0..groups.len()).map(|_| None).collect());
    std::thread::scope(|scope| {
        for _ in 0..workers {
            scope.spawn(|| {
                loop {
                    let i = {
                        let Ok(mut n) = next.lock() else { return };
                        let i = *n;
                        *n += 1;
                        i
                    };
                    let Some(group) = groups.get(i) else { return };
                    let r = write_pack(layout, i, group, progress);
                    if let Ok(mut res) = results.lock() {
                        res[i] = Some(r);
                    }
                }
            });
        }
    });
    let results = results.into_inner().map_err(|_| anyhow::anyhow!("a pack writer panicked"))?;
    results.into_iter().map(|r| r.unwrap_or_else(|| bail!("a pack writer stopped early"))).collect()
}

struct HashingWriter<W: Write> {
    inner: W,
    hasher: Sha256,
    len: u64,
}

impl<W: Write> Write for HashingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hasher.update(&buf[..n]);
        self.len += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

fn write_pack(
    layout: &Layout,
    index: usize,
    group: &[(&VerityDigest, &ObjectSource)],
    progress: &Progress,
) -> anyhow::Result<Descriptor> {
    let tmp = partial_path(&layout.dir().join(format!("blobs/sha256/pack-{index}")));
    let file = File::create(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
    // BufWriter outermost: io::copy then moves 1 MiB at a time and the hash sees large chunks.
    let mut pack = PackWriter::new(BufWriter::with_capacity(
        1 << 20,
        HashingWriter { inner: file, hasher: Sha256::new(), len: 0 },
    ));
    for (digest, obj) in group {
        let mut src = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(rustix::fs::OFlags::NOFOLLOW.bits() as i32)
            .open(&obj.path)
            .with_context(|| format!("opening {}", obj.path.display()))?;
        let len = src.metadata().with_context(|| format!("reading {}", obj.path.display()))?.len();
        if len != obj.size {
            bail!("{} changed during the build ({} bytes, was {})", obj.path.display(), len, obj.size);
        }
        pack.add(**digest, obj.size, &mut src).with_context(|| format!("packing {}", obj.path.display()))?;
        progress.advance(obj.size);
    }
    let (w, objects, bytes) = pack.finish().with_context(|| format!("writing {}", tmp.display()))?;
    // No fsync: a torn pack after a crash fails its digest on the next push or verify, and a
    // build is cheap to repeat; syncing hundreds of MiB would double the build time.
    let w = w.into_inner().map_err(|e| e.into_error()).with_context(|| format!("writing {}", tmp.display()))?;
    let digest = OciDigest::new(w.hasher.finalize().into());
    std::fs::rename(&tmp, layout.blob_path(&digest)).with_context(|| format!("renaming {}", tmp.display()))?;
    let mut desc = Descriptor::new(media::OBJECT_PACK, digest, w.len);
    desc.annotations.insert(media::ANNOTATION_PACK_OBJECTS.into(), objects.to_string());
    desc.annotations.insert(media::ANNOTATION_PACK_BYTES.into(), bytes.to_string());
    Ok(desc)
}
