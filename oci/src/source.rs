//! Reading a module from wherever it is. Two real implementations: a registry over HTTP(S) and
//! an OCI layout directory. The verify pipeline is written once against [`ModuleSource`].

use std::io;
use std::pin::Pin;

use bytes::Bytes;
use futures_util::{Stream, StreamExt as _, TryStreamExt as _};
use ironroot_contract::OciDigest;

use crate::layout::{Layout, LayoutError};
use crate::registry::{Registry, RegistryError};

pub type ByteStream = Pin<Box<dyn Stream<Item = io::Result<Bytes>> + Send>>;

/// A blob being read, with the length the server declared (if it did).
pub struct BlobStream {
    pub declared_len: Option<u64>,
    pub stream: ByteStream,
}

impl std::fmt::Debug for BlobStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "BlobStream(declared {:?})", self.declared_len)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error(transparent)]
    Registry(#[from] RegistryError),
    #[error(transparent)]
    Layout(#[from] LayoutError),
    #[error("manifest {reference} is {size} bytes, over the {cap}-byte cap")]
    TooLarge { reference: String, size: u64, cap: u64 },
    #[error("{op} {path}")]
    Local { op: &'static str, path: std::path::PathBuf, source: io::Error },
}

/// What the verifier needs from a place that holds modules.
pub trait ModuleSource {
    /// Human-readable name for messages (`host/repo` or `oci:DIR`).
    fn describe(&self) -> String;

    /// The manifest at a tag or digest, at most `cap` bytes; `None` if there is none.
    fn manifest(&self, reference: &str, cap: u64) -> impl Future<Output = Result<Option<Vec<u8>>, SourceError>>;

    /// An open stream of the blob `digest`.
    fn blob(&self, digest: &OciDigest) -> impl Future<Output = Result<BlobStream, SourceError>>;
}

/// One repository of a registry.
#[derive(Debug)]
pub struct RegistrySource {
    pub registry: Registry,
    pub host: String,
    pub repository: String,
}

const ACCEPT_MANIFESTS: &[&str] = &[
    ironroot_contract::media::OCI_MANIFEST,
    ironroot_contract::media::OCI_INDEX,
    ironroot_contract::media::DOCKER_MANIFEST,
    ironroot_contract::media::DOCKER_MANIFEST_LIST,
];

impl ModuleSource for RegistrySource {
    fn describe(&self) -> String {
        format!("{}/{}", self.host, self.repository)
    }

    async fn manifest(&self, reference: &str, cap: u64) -> Result<Option<Vec<u8>>, SourceError> {
        Ok(self.registry.get_manifest(&self.repository, reference, ACCEPT_MANIFESTS, cap).await?.map(|(b, _)| b))
    }

    async fn blob(&self, digest: &OciDigest) -> Result<BlobStream, SourceError> {
        let resp = self.registry.get_blob(&self.repository, digest).await?;
        let declared_len = resp.content_length();
        let stream = resp.bytes_stream().map_err(io::Error::other).boxed();
        Ok(BlobStream { declared_len, stream })
    }
}

impl ModuleSource for Layout {
    fn describe(&self) -> String {
        format!("oci:{}", self.dir().display())
    }

    async fn manifest(&self, reference: &str, cap: u64) -> Result<Option<Vec<u8>>, SourceError> {
        let digest = match reference.parse::<OciDigest>() {
            Ok(d) => d,
            Err(_) => match self.resolve(reference)? {
                Some(desc) => {
                    if desc.size > cap {
                        return Err(SourceError::TooLarge { reference: reference.into(), size: desc.size, cap });
                    }
                    desc.digest
                }
                None => return Ok(None),
            },
        };
        let path = self.blob_path(&digest);
        let meta = match std::fs::metadata(&path) {
            Ok(m) => m,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(source) => {
                return Err(LayoutError::Io { op: "reading", path, source }.into());
            }
        };
        if meta.len() > cap {
            return Err(SourceError::TooLarge { reference: reference.into(), size: meta.len(), cap });
        }
        std::fs::read(&path).map(Some).map_err(|source| LayoutError::Io { op: "reading", path, source }.into())
    }

    async fn blob(&self, digest: &OciDigest) -> Result<BlobStream, SourceError> {
        let path = self.blob_path(digest);
        let file = tokio::fs::File::open(&path).await.map_err(|source| LayoutError::Io {
            op: "opening",
            path: path.clone(),
            source,
        })?;
        let declared_len = file.metadata().await.ok().map(|m| m.len());
        let stream = file_chunks(file, 256 * 1024).boxed();
        Ok(BlobStream { declared_len, stream })
    }
}

/// A file as a stream of chunks of at most `chunk` bytes.
pub(crate) fn file_chunks(
    file: tokio::fs::File,
    chunk: usize,
) -> impl Stream<Item = io::Result<Bytes>> + Send + 'static {
    futures_util::stream::unfold(Some(file), move |state| async move {
        use tokio::io::AsyncReadExt as _;
        let mut file = state?;
        let mut buf = vec![0u8; chunk];
        match file.read(&mut buf).await {
            Ok(0) => None,
            Ok(n) => {
                buf.truncate(n);
                Some((Ok(Bytes::from(buf)), Some(file)))
            }
            Err(e) => Some((Err(e), None)),
        }
    })
}

/// Whichever source a [`crate::Target`] names.
#[derive(Debug)]
pub enum AnySource {
    Registry(Box<RegistrySource>),
    Layout(Layout),
}

impl AnySource {
    /// Opens the place `target` names (no network I/O yet).
    pub fn open(target: &crate::Target, access: &crate::RegistryAccess) -> Result<Self, SourceError> {
        Ok(match target {
            crate::Target::Registry(r) => Self::Registry(Box::new(RegistrySource {
                registry: Registry::open(r.registry(), access)?,
                host: r.registry().to_owned(),
                repository: r.repository().to_owned(),
            })),
            crate::Target::Layout { dir, .. } => Self::Layout(Layout::open(dir)?),
        })
    }
}

impl ModuleSource for AnySource {
    fn describe(&self) -> String {
        match self {
            Self::Registry(r) => r.describe(),
            Self::Layout(l) => l.describe(),
        }
    }

    async fn manifest(&self, reference: &str, cap: u64) -> Result<Option<Vec<u8>>, SourceError> {
        match self {
            Self::Registry(r) => r.manifest(reference, cap).await,
            Self::Layout(l) => l.manifest(reference, cap).await,
        }
    }

    async fn blob(&self, digest: &OciDigest) -> Result<BlobStream, SourceError> {
        match self {
            Self::Registry(r) => r.blob(digest).await,
            Self::Layout(l) => l.blob(digest).await,
        }
    }
}
