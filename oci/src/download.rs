//! Every byte fetched goes through here: a blob over its cap is refused before it is requested,
//! a server that declares or sends a different size is cut off, each blob has a total deadline
//! (a server trickling a byte every few seconds does not hold us), memory stays at one chunk,
//! and data lands in `.partial` files renamed only after the digest checks.

use std::io::{self, Write as _};
use std::path::{Path, PathBuf};
use std::time::Duration;

use bytes::Bytes;
use futures_util::StreamExt as _;
use ironroot_contract::OciDigest;
use ironroot_contract::manifest::Descriptor;
use ironroot_contract::pack::PackError;
use sha2::{Digest as _, Sha256};
use tokio::time::Instant;

use crate::layout::partial_path;
use crate::source::{ModuleSource, SourceError};

/// Caps and deadlines for one verification or fetch.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Largest manifest (module or signature) read.
    pub max_manifest: u64,
    /// Total time for one manifest request, authentication included.
    pub manifest_deadline: Duration,
    /// Largest blob fetched; a descriptor declaring more is refused before download.
    pub max_blob: u64,
    /// A fixed total deadline per blob; when `None`, `base_deadline + size / min_rate`.
    pub blob_deadline: Option<Duration>,
    pub base_deadline: Duration,
    /// Slowest transfer rate (bytes/s) the derived deadline allows for.
    pub min_rate: u64,
    /// Blobs fetched at once. Each pack in flight has its own thread hashing and unpacking it,
    /// so this is also how many cores a pull can use.
    pub parallel: usize,
}

impl Limits {
    /// The defaults: 4 MiB and 30 s per manifest; 16 GiB per blob, 60 s + 1 s per MiB; three
    /// blobs at once (containerd's default too: one more than the two cores of a small node,
    /// so a pack waiting on the network does not leave a core idle).
    pub fn standard() -> Self {
        Self {
            max_manifest: 4 << 20,
            manifest_deadline: Duration::from_secs(30),
            max_blob: 16 << 30,
            blob_deadline: None,
            base_deadline: Duration::from_secs(60),
            min_rate: 1 << 20,
            parallel: 3,
        }
    }

    pub fn deadline_for(&self, size: u64) -> Duration {
        self.blob_deadline.unwrap_or_else(|| self.base_deadline + Duration::from_secs(size / self.min_rate.max(1)))
    }
}

#[derive(Debug, thiserror::Error)]
pub enum DownloadError {
    #[error("reading manifest {place}")]
    Manifest { place: String, source: SourceError },
    #[error("manifest {place}: deadline of {deadline:?} passed")]
    ManifestDeadline { place: String, deadline: Duration },
    #[error("blob {digest} declares {size} bytes, over the {cap}-byte cap (not downloaded)")]
    OverCap { digest: OciDigest, size: u64, cap: u64 },
    #[error("blob {digest}: server declares {served} bytes, the descriptor {declared}")]
    DeclaredSize { digest: OciDigest, declared: u64, served: u64 },
    #[error("blob {digest}: server sent more than the declared {declared} bytes")]
    Oversize { digest: OciDigest, declared: u64 },
    #[error("blob {digest}: stream ended after {got} of {declared} bytes")]
    Short { digest: OciDigest, declared: u64, got: u64 },
    #[error("blob {digest}: content has digest {found}")]
    Digest { digest: OciDigest, found: OciDigest },
    #[error("blob {digest}: deadline of {deadline:?} passed after {got} of {declared} bytes")]
    Deadline { digest: OciDigest, deadline: Duration, got: u64, declared: u64 },
    #[error("fetching blob {digest}")]
    Source { digest: OciDigest, source: SourceError },
    #[error("reading blob {digest}")]
    Stream { digest: OciDigest, source: io::Error },
    #[error("{op} {path}")]
    Io { op: &'static str, path: PathBuf, source: io::Error },
    #[error("pack {digest}")]
    Pack { digest: OciDigest, source: PackError },
    #[error("blob {digest}: the consumer stopped reading")]
    SinkClosed { digest: OciDigest },
}

/// Streams blob `desc` through `sink`, enforcing cap, declared size, deadline and digest.
/// Returns the number of bytes streamed (equal to `desc.size` on success).
pub(crate) async fn stream_blob<S, F>(
    src: &S,
    desc: &Descriptor,
    limits: &Limits,
    mut sink: F,
) -> Result<u64, DownloadError>
where
    S: ModuleSource,
    F: AsyncSink,
{
    let digest = desc.digest;
    if desc.size > limits.max_blob {
        return Err(DownloadError::OverCap { digest, size: desc.size, cap: limits.max_blob });
    }
    let deadline = limits.deadline_for(desc.size);
    let until = Instant::now() + deadline;
    let late = |got| DownloadError::Deadline { digest, deadline, got, declared: desc.size };
    let blob = tokio::time::timeout_at(until, src.blob(&digest))
        .await
        .map_err(|_| late(0))?
        .map_err(|source| DownloadError::Source { digest, source })?;
    if let Some(served) = blob.declared_len
        && served != desc.size
    {
        return Err(DownloadError::DeclaredSize { digest, declared: desc.size, served });
    }
    let mut stream = blob.stream;
    let mut hasher = (!sink.checks_digest()).then(Sha256::new);
    let mut got = 0u64;
    loop {
        let next = tokio::time::timeout_at(until, stream.next()).await.map_err(|_| late(got))?;
        let Some(chunk) = next else { break };
        let chunk = chunk.map_err(|source| DownloadError::Stream { digest, source })?;
        got += chunk.len() as u64;
        if got > desc.size {
            return Err(DownloadError::Oversize { digest, declared: desc.size });
        }
        if let Some(hasher) = &mut hasher {
            hasher.update(&chunk);
        }
        sink.accept(chunk).await?;
    }
    if got < desc.size {
        return Err(DownloadError::Short { digest, declared: desc.size, got });
    }
    if let Some(hasher) = hasher {
        let found = OciDigest::new(hasher.finalize().into());
        if found != digest {
            return Err(DownloadError::Digest { digest, found });
        }
    }
    Ok(got)
}

impl DownloadError {
    /// A failure of the transfer itself (size, time, network, disk), as opposed to bad content.
    pub(crate) fn is_transfer_failure(&self) -> bool {
        !matches!(self, Self::Digest { .. } | Self::Pack { .. } | Self::SinkClosed { .. })
    }
}

/// The manifest at `reference` (tag or digest) in `src`, capped and deadline-bound; `None`
/// when there is none.
pub async fn fetch_manifest<S: ModuleSource>(
    src: &S,
    reference: &str,
    limits: &Limits,
) -> Result<Option<Vec<u8>>, DownloadError> {
    let place = || format!("{}:{reference}", src.describe());
    tokio::time::timeout(limits.manifest_deadline, src.manifest(reference, limits.max_manifest))
        .await
        .map_err(|_| DownloadError::ManifestDeadline { place: place(), deadline: limits.manifest_deadline })?
        .map_err(|source| DownloadError::Manifest { place: place(), source })
}

/// Where streamed chunks go.
pub(crate) trait AsyncSink {
    fn accept(&mut self, chunk: Bytes) -> impl Future<Output = Result<(), DownloadError>>;

    /// Whether the consumer hashes every byte and compares the blob digest itself (so
    /// [`stream_blob`] does not hash them a second time).
    fn checks_digest(&self) -> bool {
        false
    }
}

struct MemorySink(Vec<u8>);

impl AsyncSink for MemorySink {
    async fn accept(&mut self, chunk: Bytes) -> Result<(), DownloadError> {
        self.0.extend_from_slice(&chunk);
        Ok(())
    }
}

struct FileSink {
    file: std::fs::File,
    path: PathBuf,
}

impl AsyncSink for FileSink {
    async fn accept(&mut self, chunk: Bytes) -> Result<(), DownloadError> {
        let path = &self.path;
        self.file.write_all(&chunk).map_err(|source| DownloadError::Io { op: "writing", path: path.clone(), source })
    }
}

/// Fetches a small blob (config, signature payload) into memory; `cap` bounds it.
pub async fn fetch_small<S: ModuleSource>(
    src: &S,
    desc: &Descriptor,
    cap: u64,
    limits: &Limits,
) -> Result<Vec<u8>, DownloadError> {
    let capped = Limits { max_blob: cap.min(limits.max_blob), ..limits.clone() };
    let mut sink = MemorySink(Vec::with_capacity(usize::try_from(desc.size.min(cap)).unwrap_or(0)));
    stream_blob(src, desc, &capped, &mut sink).await?;
    Ok(sink.0)
}

impl<T: AsyncSink> AsyncSink for &mut T {
    fn accept(&mut self, chunk: Bytes) -> impl Future<Output = Result<(), DownloadError>> {
        (**self).accept(chunk)
    }

    fn checks_digest(&self) -> bool {
        (**self).checks_digest()
    }
}

/// Fetches blob `desc` to `path` (through `path.partial`). A file already at `path` is taken as
/// verified (it was only ever renamed there after its digest checked) and not fetched again.
/// Returns the bytes downloaded.
pub async fn fetch_to_file<S: ModuleSource>(
    src: &S,
    desc: &Descriptor,
    path: &Path,
    limits: &Limits,
) -> Result<u64, DownloadError> {
    if std::fs::metadata(path).is_ok_and(|m| m.len() == desc.size) {
        return Ok(0);
    }
    let partial = partial_path(path);
    let file = std::fs::File::create(&partial).map_err(|source| DownloadError::Io {
        op: "creating",
        path: partial.clone(),
        source,
    })?;
    let mut sink = FileSink { file, path: partial.clone() };
    let result = stream_blob(src, desc, limits, &mut sink).await;
    let result = result.and_then(|n| {
        sink.file.sync_all().map_err(|source| DownloadError::Io { op: "syncing", path: partial.clone(), source })?;
        std::fs::rename(&partial, path).map_err(|source| DownloadError::Io {
            op: "renaming",
            path: partial.clone(),
            source,
        })?;
        Ok(n)
    });
    if result.is_err() {
        // The partial file holds unverified bytes; it must not survive the failure.
        if let Err(e) = std::fs::remove_file(&partial) {
            tracing::warn!(path = %partial.display(), error = %e, "could not remove partial download");
        }
    }
    result
}
