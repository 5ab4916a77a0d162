//! Files the agent reads but does not control: the kernel command line, identity documents,
//! firmware tables and interface addresses in sysfs, the key files an identity value names,
//! and what the initramfs left under /run for the service (boot.json, node key, certificate).
//! Used by both lifetimes; parsing what was read stays with each caller.
//!
//! No such file may stall or flood the agent. A read looks at what the path is before opening
//! it (a device is never opened: opening some has effects), opens it non-blocking (a FIFO does
//! not wait for a writer), checks again with fstat what it opened (the path may have changed
//! in between), reads only a regular file — sysfs and procfs attributes are regular files — and
//! reads at most one byte past its cap, so an oversized file costs the cap, not its size.

use std::fmt;
use std::fs::{File, Metadata};
use std::io::Read as _;
use std::os::unix::fs::FileTypeExt as _;
use std::path::{Path, PathBuf};

use rustix::fs::{Mode, OFlags};

/// Whether the last component of a path may be a symlink.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Links {
    /// Follow it: fw_cfg's `by_name/` entries, sysfs, files an operator names.
    Follow,
    /// Refuse it: files the agent wrote itself and replaces by rename (boot.json, node key,
    /// certificate, enrollment record), where a link can only be someone else's doing.
    Refuse,
}

/// What a path is when it is not a regular file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FileKind {
    Directory,
    Fifo,
    Socket,
    CharDevice,
    BlockDevice,
    Symlink,
    Unknown,
}

impl FileKind {
    fn of(meta: &Metadata) -> Option<Self> {
        let t = meta.file_type();
        let kind = if t.is_file() {
            return None;
        } else if t.is_dir() {
            Self::Directory
        } else if t.is_fifo() {
            Self::Fifo
        } else if t.is_socket() {
            Self::Socket
        } else if t.is_char_device() {
            Self::CharDevice
        } else if t.is_block_device() {
            Self::BlockDevice
        } else if t.is_symlink() {
            Self::Symlink
        } else {
            Self::Unknown
        };
        Some(kind)
    }
}

impl fmt::Display for FileKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Directory => "directory",
            Self::Fifo => "fifo",
            Self::Socket => "socket",
            Self::CharDevice => "character device",
            Self::BlockDevice => "block device",
            Self::Symlink => "symlink",
            Self::Unknown => "file of unknown type",
        })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    #[error("{path} does not exist")]
    Missing { path: PathBuf },
    #[error("{path} is a {kind}, not a regular file")]
    NotRegular { path: PathBuf, kind: FileKind },
    #[error("opening {path}")]
    Open { path: PathBuf, source: std::io::Error },
    #[error("reading {path}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("{path} is over {cap} bytes (reading stopped there)")]
    TooLarge { path: PathBuf, cap: u64 },
}

/// Reads the regular file at `path`, at most `cap` bytes of it; an error when there is more.
pub fn read(path: &Path, cap: u64, links: Links) -> Result<Vec<u8>, ReadError> {
    let file = open(path, links)?;
    let mut bytes = Vec::new();
    file.take(cap.saturating_add(1))
        .read_to_end(&mut bytes)
        .map_err(|source| ReadError::Read { path: path.to_owned(), source })?;
    if bytes.len() as u64 > cap {
        return Err(ReadError::TooLarge { path: path.to_owned(), cap });
    }
    Ok(bytes)
}

/// [`read`], with `Ok(None)` when nothing is at `path`.
pub fn read_if_present(path: &Path, cap: u64, links: Links) -> Result<Option<Vec<u8>>, ReadError> {
    match read(path, cap, links) {
        Ok(bytes) => Ok(Some(bytes)),
        Err(ReadError::Missing { .. }) => Ok(None),
        Err(e) => Err(e),
    }
}

/// Opens `path` for reading if, and only if, it is a regular file.
fn open(path: &Path, links: Links) -> Result<File, ReadError> {
    let missing_or = |source: std::io::Error| match source.kind() {
        std::io::ErrorKind::NotFound => ReadError::Missing { path: path.to_owned() },
        _ => ReadError::Open { path: path.to_owned(), source },
    };
    let not_regular = |kind| ReadError::NotRegular { path: path.to_owned(), kind };
    let before = match links {
        Links::Follow => std::fs::metadata(path),
        Links::Refuse => std::fs::symlink_metadata(path),
    }
    .map_err(missing_or)?;
    if let Some(kind) = FileKind::of(&before) {
        return Err(not_regular(kind));
    }
    let mut flags = OFlags::RDONLY | OFlags::NONBLOCK | OFlags::NOCTTY | OFlags::CLOEXEC;
    if links == Links::Refuse {
        flags |= OFlags::NOFOLLOW;
    }
    let fd = rustix::fs::open(path, flags, Mode::empty()).map_err(|e| match e {
        // Replaced by a symlink since the look above.
        rustix::io::Errno::LOOP if links == Links::Refuse => not_regular(FileKind::Symlink),
        e => missing_or(e.into()),
    })?;
    let file = File::from(fd);
    let opened = file.metadata().map_err(|source| ReadError::Open { path: path.to_owned(), source })?;
    if let Some(kind) = FileKind::of(&opened) {
        return Err(not_regular(kind));
    }
    Ok(file)
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::symlink;

    use rustix::fs::{CWD, FileType};

    use super::*;

    fn kind(r: Result<Vec<u8>, ReadError>) -> Option<FileKind> {
        match r {
            Err(ReadError::NotRegular { kind, .. }) => Some(kind),
            _ => None,
        }
    }

    #[test]
    fn only_regular_files_are_read_and_only_up_to_the_cap() {
        let dir = tempfile::tempdir().unwrap();
        let p = |name: &str| dir.path().join(name);
        std::fs::write(p("file"), b"12345").unwrap();
        assert_eq!(read(&p("file"), 5, Links::Refuse).unwrap(), b"12345");
        let err = read(&p("file"), 4, Links::Follow).unwrap_err();
        assert!(matches!(err, ReadError::TooLarge { cap: 4, .. }), "{err}");
        assert_eq!(err.to_string(), format!("{} is over 4 bytes (reading stopped there)", p("file").display()));

        assert!(matches!(read(&p("none"), 5, Links::Follow), Err(ReadError::Missing { .. })));
        assert_eq!(read_if_present(&p("none"), 5, Links::Follow).unwrap(), None);

        rustix::fs::mknodat(CWD, p("fifo"), FileType::Fifo, Mode::from_raw_mode(0o600), 0).unwrap();
        let err = read(&p("fifo"), 5, Links::Follow).unwrap_err();
        assert_eq!(err.to_string(), format!("{} is a fifo, not a regular file", p("fifo").display()));
        assert_eq!(kind(read(dir.path(), 5, Links::Follow)), Some(FileKind::Directory));
        assert_eq!(kind(read(Path::new("/dev/null"), 5, Links::Follow)), Some(FileKind::CharDevice));
        drop(std::os::unix::net::UnixListener::bind(p("socket")).unwrap());
        assert_eq!(kind(read(&p("socket"), 5, Links::Follow)), Some(FileKind::Socket));

        symlink("file", p("link")).unwrap();
        assert_eq!(read(&p("link"), 5, Links::Follow).unwrap(), b"12345");
        assert_eq!(kind(read(&p("link"), 5, Links::Refuse)), Some(FileKind::Symlink));
        symlink("/dev/zero", p("zero")).unwrap();
        assert_eq!(kind(read(&p("zero"), 5, Links::Follow)), Some(FileKind::CharDevice));
    }

    #[test]
    fn procfs_files_are_regular_and_read() {
        let cmdline = read(Path::new("/proc/self/cmdline"), 1 << 20, Links::Follow).unwrap();
        assert!(!cmdline.is_empty());
    }
}
