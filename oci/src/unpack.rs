//! A pack's way into the object store: the download task streams the blob (caps, declared
//! size, deadline) into a bounded pipe, and a blocking thread reads the pack from it, hashing
//! the blob and every object in one pass and staging the objects; they enter the store only
//! when the whole pack checked.

use std::io::{self, Read};

use bytes::Bytes;
use ironroot_contract::OciDigest;
use ironroot_contract::manifest::PackDescriptor;
use ironroot_contract::pack::{PackError, PackReader};

use crate::download::{AsyncSink, DownloadError, Limits, stream_blob};
use crate::source::ModuleSource;
use crate::store::ObjectStore;

/// Chunks handed from the download task to the unpacking thread; bounded, so memory is too.
/// Chunks from a registry are up to ~400 KiB (hyper's adaptive reads), so this holds a few
/// MiB per pack in flight: enough to keep both threads busy, small enough for the RSS target.
const PACK_PIPE_DEPTH: usize = 8;

struct ChannelSink {
    tx: tokio::sync::mpsc::Sender<Bytes>,
    digest: OciDigest,
}

impl AsyncSink for ChannelSink {
    async fn accept(&mut self, chunk: Bytes) -> Result<(), DownloadError> {
        // A closed channel means the unpacker stopped on an error: stop downloading now.
        self.tx.send(chunk).await.map_err(|_| DownloadError::SinkClosed { digest: self.digest })
    }

    /// The unpacking thread's pack reader hashes the blob ([`unpack`]).
    fn checks_digest(&self) -> bool {
        true
    }
}

/// The unpacking thread's end of a pack download.
struct ChannelReader {
    rx: tokio::sync::mpsc::Receiver<Bytes>,
    current: Bytes,
}

impl Read for ChannelReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        while self.current.is_empty() {
            match self.rx.blocking_recv() {
                Some(chunk) => self.current = chunk,
                None => return Ok(0),
            }
        }
        let n = buf.len().min(self.current.len());
        buf[..n].copy_from_slice(&self.current.split_to(n));
        Ok(n)
    }
}

/// Result of unpacking one pack.
#[derive(Debug, Clone, Copy, Default)]
pub struct PackStats {
    pub downloaded: u64,
    pub objects: u64,
    pub new_objects: u64,
}

/// Streams pack `pack` straight into `store`: the download task enforces size and deadline
/// while a blocking thread reads the pack, computing the blob's SHA-256 and every object's
/// fs-verity digest in one interleaved pass (on a sealed store the kernel measures the objects
/// instead), and stages the objects. Both hashes run on that
/// thread, so packs fetched in parallel hash in parallel (the task polling the downloads
/// would otherwise hash every pack's bytes alone).
/// Staged objects enter the store only when both the pack digest and every object checked.
pub async fn fetch_pack<S: ModuleSource>(
    src: &S,
    pack: &PackDescriptor,
    store: &ObjectStore,
    limits: &Limits,
) -> Result<PackStats, DownloadError> {
    let digest = pack.descriptor.digest;
    let staging = store.stage(&digest.hex()[..16]).map_err(|source| DownloadError::Io {
        op: "staging in",
        path: store.root().to_owned(),
        source,
    })?;
    let (tx, rx) = tokio::sync::mpsc::channel::<Bytes>(PACK_PIPE_DEPTH);
    let (objects, bytes) = (pack.objects, pack.object_bytes);
    let store_for_thread = store.clone();
    let unpacker = tokio::task::spawn_blocking(move || {
        let mut staging = staging;
        let reader = ChannelReader { rx, current: Bytes::new() };
        let result = unpack(reader, &store_for_thread, &mut staging, objects, bytes);
        (staging, result)
    });
    let downloaded = stream_blob(src, &pack.descriptor, limits, ChannelSink { tx, digest }).await;
    let (staging, unpacked) = unpacker.await.map_err(|e| DownloadError::Io {
        op: "unpacking",
        path: store.root().to_owned(),
        source: io::Error::other(e),
    })?;
    let outcome = match (downloaded, unpacked) {
        (Ok(n), Ok((count, found))) if found == digest => Ok((n, count)),
        (Ok(_), Ok((_, found))) => Err(DownloadError::Digest { digest, found }),
        // Both sides may fail on one corruption, in either order; report deterministically:
        // the transfer's own failure if it had one, else the unpacker's, which names the entry.
        (Err(e), _) if e.is_transfer_failure() => Err(e),
        (_, Err(e)) => Err(DownloadError::Pack { digest, source: e }),
        (Err(e), Ok(_)) => Err(e),
    };
    match outcome {
        Ok((downloaded, objects)) => {
            let new_objects = store.commit(staging).map_err(|source| DownloadError::Io {
                op: "committing into",
                path: store.root().to_owned(),
                source,
            })? as u64;
            Ok(PackStats { downloaded, objects, new_objects })
        }
        Err(e) => {
            store.discard(staging);
            Err(e)
        }
    }
}

/// Reads pack `input` into `staging`; the object count and the SHA-256 of every byte read
/// (the whole blob: a pack reader that returns its end has read to the end of its input).
fn unpack(
    input: impl Read,
    store: &ObjectStore,
    staging: &mut crate::store::Staging,
    objects: u64,
    bytes: u64,
) -> Result<(u64, OciDigest), PackError> {
    let input = io::BufReader::with_capacity(256 * 1024, input);
    // A sealed store has the kernel compute each object's fs-verity digest as it seals the
    // staged file; the reader then skips computing the same tree (and checks the rest).
    let kernel_checks = store.sealed() && staging.keeps_bytes();
    let reader = if kernel_checks { PackReader::kernel_checked(input) } else { PackReader::new(input) };
    let mut reader = reader.with_blob_digest();
    if kernel_checks {
        staging.mark_sealed();
    }
    let mut buf = vec![0u8; 256 * 1024];
    while let Some(mut obj) = reader.next_object()? {
        let d = obj.digest();
        if store.contains(&d) {
            // Already in the store (sealed, or hashed when it entered); these bytes are only
            // skipped, and a sealed store's reader does not hash them.
            copy_large(&mut obj, &mut io::sink(), &mut buf)?;
            continue;
        }
        if staging.keeps_bytes() {
            let path = staging.partial_path(&d);
            let mut file = std::fs::File::create(&path)?;
            copy_large(&mut obj, &mut file, &mut buf)?;
            drop(file);
            if kernel_checks {
                let found = crate::store::seal_and_measure(&path)?;
                if found != d {
                    return Err(PackError::DigestMismatch { name: d, found });
                }
            }
        } else {
            copy_large(&mut obj, &mut io::sink(), &mut buf)?;
        }
        staging.accept(d)?;
    }
    reader.check_totals(objects, bytes)?;
    let digest = reader.blob_digest().ok_or(PackError::NoEndMarker)?;
    Ok((reader.totals().0, digest))
}

/// Copies through a caller-owned buffer, filling it before each write: network chunks are
/// small, and one write per chunk would cost a syscall every few KiB.
fn copy_large(r: &mut impl Read, w: &mut impl io::Write, buf: &mut [u8]) -> io::Result<u64> {
    let mut total = 0;
    loop {
        let mut filled = 0;
        while filled < buf.len() {
            match r.read(&mut buf[filled..]) {
                Ok(0) => break,
                Ok(n) => filled += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        if filled == 0 {
            return Ok(total);
        }
        w.write_all(&buf[..filled])?;
        total += filled as u64;
    }
}
