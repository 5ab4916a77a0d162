//! A reproducible `newc` cpio writer (the format the kernel unpacks into its rootfs).
//!
//! Entries are kept in a sorted map and written in path order with owner 0:0, the same mtime
//! for every entry and inode numbers counted from 1, so the same inputs give the same bytes.
//! Parent directories are added implicitly; a path may be added only once.

use std::collections::BTreeMap;
use std::io::{self, Write};

use thiserror::Error;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Entry {
    Dir { mode: u32 },
    File { mode: u32, data: Vec<u8> },
    Symlink { target: String },
    CharDev { mode: u32, major: u32, minor: u32 },
}

#[derive(Debug, Error, PartialEq, Eq)]
pub enum CpioError {
    #[error("{0:?} is added twice to the initramfs")]
    Duplicate(String),
    #[error("{0:?} is not a valid initramfs path (relative, no '..', no empty parts)")]
    BadPath(String),
    #[error("{path:?} is {size} bytes; newc entries are capped at 4 GiB")]
    TooLarge { path: String, size: usize },
}

#[derive(Debug, Default)]
pub struct Archive {
    entries: BTreeMap<String, Entry>,
    mtime: u32,
}

impl Archive {
    pub fn new(mtime: u32) -> Self {
        Archive { entries: BTreeMap::new(), mtime }
    }

    /// Adds an entry at `path` (written without a leading '/'), creating parents as 0755 dirs.
    pub fn add(&mut self, path: &str, entry: Entry) -> Result<(), CpioError> {
        let path = normalise(path)?;
        let mut parent = String::new();
        for part in path.split('/').take(path.split('/').count() - 1) {
            if !parent.is_empty() {
                parent.push('/');
            }
            parent.push_str(part);
            self.entries.entry(parent.clone()).or_insert(Entry::Dir { mode: 0o755 });
        }
        match self.entries.get(&path) {
            // A directory created implicitly may be declared explicitly later (its mode wins).
            Some(Entry::Dir { .. }) if matches!(entry, Entry::Dir { .. }) => {}
            Some(_) => return Err(CpioError::Duplicate(path)),
            None => {}
        }
        if let Entry::File { data, .. } = &entry
            && u32::try_from(data.len()).is_err()
        {
            return Err(CpioError::TooLarge { path, size: data.len() });
        }
        self.entries.insert(path, entry);
        Ok(())
    }

    pub fn contains(&self, path: &str) -> bool {
        normalise(path).is_ok_and(|p| self.entries.contains_key(&p))
    }

    /// The contents of the file at `path`, if there is one.
    pub fn file(&self, path: &str) -> Option<&[u8]> {
        match self.entries.get(&normalise(path).ok()?)? {
            Entry::File { data, .. } => Some(data),
            _ => None,
        }
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Writes the archive, trailer included.
    pub fn write(&self, out: &mut impl Write) -> io::Result<u64> {
        let mut w = Counting { inner: out, written: 0 };
        for (ino, (path, entry)) in (1u32..).zip(&self.entries) {
            let (mode, data, rdev): (u32, &[u8], (u32, u32)) = match entry {
                Entry::Dir { mode } => (0o040000 | mode, &[], (0, 0)),
                Entry::File { mode, data } => (0o100000 | mode, data, (0, 0)),
                Entry::Symlink { target } => (0o120777, target.as_bytes(), (0, 0)),
                Entry::CharDev { mode, major, minor } => (0o020000 | mode, &[], (*major, *minor)),
            };
            let nlink = if matches!(entry, Entry::Dir { .. }) { 2 } else { 1 };
            header(&mut w, ino, mode, nlink, self.mtime, data.len(), rdev, path)?;
            w.write_all(data)?;
            pad(&mut w)?;
        }
        header(&mut w, 0, 0, 1, 0, 0, (0, 0), "TRAILER!!!")?;
        Ok(w.written)
    }
}

fn normalise(path: &str) -> Result<String, CpioError> {
    let trimmed = path.trim_start_matches('/');
    let ok = !trimmed.is_empty()
        && trimmed.split('/').all(|p| !p.is_empty() && p != "." && p != "..")
        && !trimmed.contains('\0');
    if ok { Ok(trimmed.to_owned()) } else { Err(CpioError::BadPath(path.to_owned())) }
}

#[allow(clippy::too_many_arguments, reason = "one newc header, field by field")]
fn header(
    w: &mut Counting<'_, impl Write>,
    ino: u32,
    mode: u32,
    nlink: u32,
    mtime: u32,
    size: usize,
    rdev: (u32, u32),
    name: &str,
) -> io::Result<()> {
    let namesize = name.len() + 1;
    write!(
        w,
        "070701{ino:08x}{mode:08x}{:08x}{:08x}{nlink:08x}{mtime:08x}{size:08x}{:08x}{:08x}{:08x}{:08x}{namesize:08x}{:08x}",
        0, 0, 0, 0, rdev.0, rdev.1, 0
    )?;
    w.write_all(name.as_bytes())?;
    w.write_all(&[0])?;
    pad(w)
}

fn pad(w: &mut Counting<'_, impl Write>) -> io::Result<()> {
    let n = (4 - (w.written % 4) as usize) % 4;
    w.write_all(&[0; 3][..n])
}

struct Counting<'a, W> {
    inner: &'a mut W,
    written: u64,
}

impl<W: Write> Write for Counting<'_, W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.written += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parents_are_implicit_and_duplicates_refused() {
        let mut a = Archive::new(0);
        a.add("/lib/modules/x.ko", Entry::File { mode: 0o644, data: vec![1, 2, 3] }).unwrap();
        assert!(a.contains("lib") && a.contains("lib/modules"));
        assert_eq!(a.len(), 3);
        a.add("lib", Entry::Dir { mode: 0o700 }).unwrap();
        assert_eq!(
            a.add("lib/modules/x.ko", Entry::Symlink { target: "y".into() }),
            Err(CpioError::Duplicate("lib/modules/x.ko".into()))
        );
        for bad in ["", "/", "a/../b", "a//b", "./a"] {
            assert!(matches!(a.add(bad, Entry::Dir { mode: 0o755 }), Err(CpioError::BadPath(_))), "{bad}");
        }
    }

    #[test]
    fn the_bytes_are_newc_and_depend_only_on_the_contents() {
        let build = |order: &[&str]| {
            let mut a = Archive::new(7);
            for p in order {
                a.add(p, Entry::File { mode: 0o755, data: p.as_bytes().to_vec() }).unwrap();
            }
            a.add("dev/console", Entry::CharDev { mode: 0o600, major: 5, minor: 1 }).unwrap();
            let mut out = Vec::new();
            let n = a.write(&mut out).unwrap();
            assert_eq!(n as usize, out.len());
            out
        };
        let one = build(&["init", "etc/b", "etc/a"]);
        assert_eq!(one, build(&["etc/a", "init", "etc/b"]));
        assert_eq!(one.len() % 4, 0);
        assert!(one.starts_with(b"070701"));
        // The first entry is "dev" (sorted), a directory with inode 1.
        assert_eq!(&one[6..14], b"00000001");
        assert_eq!(&one[14..22], b"000041ed");
        let text = String::from_utf8_lossy(&one);
        assert!(text.contains("TRAILER!!!"));
        // dev/console: rdev 5:1 in the header fields rdevmajor/rdevminor.
        let at = text.find("dev/console").unwrap() - 110;
        assert_eq!(&text[at + 78..at + 94], "0000000500000001");
    }
}
