//! SMBIOS: the product UUID and serial from `/sys/class/dmi/id/`, and the type 11 OEM strings
//! `io.ironroot.KEY=VALUE` from `/sys/firmware/dmi/entries/11-*/raw` (QEMU:
//! `-smbios type=11,value=io.ironroot.node=n1`).
//!
//! Precedence for junk (docs/interfaces/kernel-cmdline.md): hardware fields that are
//! placeholders or malformed ("To Be Filled By O.E.M.", an all-zero UUID, binary) are ignored
//! with a note, because firmware is often like that and the operator cannot fix it; a type 11
//! entry whose structure is broken is ignored with a note for the same reason; but an
//! `io.ironroot.*` string — which an operator wrote — with an unknown key, an empty value or
//! bytes that are not UTF-8 is an error, exactly like the kernel command line. A FIFO,
//! directory, device or socket where a field or structure should be is no firmware's doing: an
//! error, as at every identity path.

use std::path::{Path, PathBuf};

use super::{DiscoverError, Discovered, Source};
use crate::cmdline::KEYS;
use crate::external::{self, Links, ReadError};

/// Largest raw SMBIOS structure read (a structure is at most a few KiB).
const MAX_RAW: u64 = 64 * 1024;
/// Largest hardware field read (a UUID is 36 bytes, serials are short).
const MAX_FIELD: u64 = 256;
/// Serial numbers firmware vendors ship instead of a real one.
const PLACEHOLDERS: &[&str] =
    &["", "0", "none", "not specified", "to be filled by o.e.m.", "default string", "system serial number", "n/a"];
/// OEM string prefix that marks our keys.
const OEM_PREFIX: &str = "io.ironroot.";

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SmbiosError {
    #[error("OEM string is not UTF-8")]
    NotUtf8,
    #[error("OEM string {0:?} names no identity key")]
    Unknown(String),
    #[error("OEM string {0:?} has no value")]
    Empty(String),
}

/// Reads the SMBIOS sources under `root` into `found`.
pub fn read(root: &Path, found: &mut Discovered) -> Result<(), DiscoverError> {
    let dmi = root.join("sys/class/dmi/id");
    if let Some(uuid) = field(&dmi.join("product_uuid"), found)? {
        match normalise_uuid(&uuid) {
            Some(u) => found.offer("smbios_uuid", u, Source::Smbios),
            None => found.notes.push(format!("smbios: product_uuid {uuid:?} ignored (placeholder or malformed)")),
        }
    }
    if let Some(serial) = field(&dmi.join("product_serial"), found)? {
        let printable = serial.len() <= 64 && serial.bytes().all(|b| b.is_ascii_graphic() || b == b' ');
        if printable && !PLACEHOLDERS.contains(&serial.to_ascii_lowercase().as_str()) {
            found.offer("serial", serial, Source::Smbios);
        } else {
            found.notes.push(format!("smbios: product_serial {serial:?} ignored (placeholder or malformed)"));
        }
    }
    let entries = root.join("sys/firmware/dmi/entries");
    let mut dirs: Vec<PathBuf> = match std::fs::read_dir(&entries) {
        Ok(rd) => rd
            .filter_map(|e| e.ok())
            .filter(|e| e.file_name().to_string_lossy().starts_with("11-"))
            .map(|e| e.path())
            .collect(),
        Err(_) => Vec::new(),
    };
    dirs.sort();
    for dir in dirs {
        let path = dir.join("raw");
        let Some(raw) = read_or_note(&path, MAX_RAW, found)? else { continue };
        let Some(strings) = parse_oem_strings(&raw) else {
            found.notes.push(format!("smbios: {} ignored: not a well-formed type 11 structure", path.display()));
            continue;
        };
        for s in strings {
            let oem = parse_oem(s).map_err(|source| DiscoverError::Smbios { path: path.clone(), source })?;
            if let Some((key, value)) = oem {
                found.offer(&key, value, Source::Smbios);
            }
        }
    }
    Ok(())
}

/// A hardware field, trimmed; unreadable or oversized fields are noted and skipped.
fn field(path: &Path, found: &mut Discovered) -> Result<Option<String>, DiscoverError> {
    let Some(bytes) = read_or_note(path, MAX_FIELD, found)? else { return Ok(None) };
    match String::from_utf8(bytes) {
        Ok(s) => Ok(Some(s.trim().to_owned())),
        Err(_) => {
            found.notes.push(format!("smbios: {} ignored: not UTF-8", path.display()));
            Ok(None)
        }
    }
}

/// The bytes at `path`: nothing when absent; unreadable or oversized (firmware's doing) is
/// noted and skipped; not a regular file is an error.
fn read_or_note(path: &Path, cap: u64, found: &mut Discovered) -> Result<Option<Vec<u8>>, DiscoverError> {
    match external::read_if_present(path, cap, Links::Follow) {
        Ok(bytes) => Ok(bytes),
        Err(source @ ReadError::NotRegular { .. }) => Err(DiscoverError::Read { what: Source::Smbios, source }),
        Err(e) => {
            found.notes.push(format!("smbios: ignored: {}", crate::exit::describe(&e)));
            Ok(None)
        }
    }
}

fn normalise_uuid(s: &str) -> Option<String> {
    let u = s.to_ascii_lowercase();
    let shape = u.len() == 36
        && u.char_indices().all(|(i, c)| if [8, 13, 18, 23].contains(&i) { c == '-' } else { c.is_ascii_hexdigit() });
    let placeholder =
        u.chars().filter(|c| *c != '-').all(|c| c == '0') || u.chars().filter(|c| *c != '-').all(|c| c == 'f');
    (shape && !placeholder).then_some(u)
}

/// The strings of a raw SMBIOS type 11 structure; `None` when it is not one.
pub fn parse_oem_strings(raw: &[u8]) -> Option<Vec<&[u8]>> {
    let (&kind, &len) = (raw.first()?, raw.get(1)?);
    let count = *raw.get(4)? as usize;
    if kind != 11 || len < 5 {
        return None;
    }
    let mut rest = raw.get(usize::from(len)..)?;
    let mut out = Vec::with_capacity(count);
    for _ in 0..count {
        let end = rest.iter().position(|&b| b == 0)?;
        if end == 0 {
            return None;
        }
        out.push(&rest[..end]);
        rest = &rest[end + 1..];
    }
    Some(out)
}

/// `io.ironroot.KEY=VALUE` → (KEY, VALUE); other strings are someone else's.
fn parse_oem(s: &[u8]) -> Result<Option<(String, String)>, SmbiosError> {
    if !s.starts_with(OEM_PREFIX.as_bytes()) {
        return Ok(None);
    }
    let s = std::str::from_utf8(s).map_err(|_| SmbiosError::NotUtf8)?;
    let (key, value) = s[OEM_PREFIX.len()..].split_once('=').unwrap_or((&s[OEM_PREFIX.len()..], ""));
    if !KEYS.iter().any(|k| k.strip_prefix("ironroot.") == Some(key)) {
        return Err(SmbiosError::Unknown(s.chars().take(64).collect()));
    }
    if value.is_empty() || value.chars().any(char::is_control) {
        return Err(SmbiosError::Empty(key.to_owned()));
    }
    Ok(Some((key.to_owned(), value.to_owned())))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn type11(strings: &[&[u8]]) -> Vec<u8> {
        let mut raw = vec![11, 5, 0, 0, strings.len() as u8];
        for s in strings {
            raw.extend_from_slice(s);
            raw.push(0);
        }
        raw.push(0);
        raw
    }

    #[test]
    fn oem_strings_parse_and_junk_is_refused() {
        let raw = type11(&[b"io.ironroot.node=n1", b"vendor thing"]);
        assert_eq!(parse_oem_strings(&raw).unwrap(), vec![&b"io.ironroot.node=n1"[..], b"vendor thing"]);
        assert_eq!(parse_oem(b"io.ironroot.node=n1").unwrap(), Some(("node".into(), "n1".into())));
        assert_eq!(parse_oem(b"vendor").unwrap(), None);
        assert_eq!(parse_oem(b"io.ironroot.nod=x"), Err(SmbiosError::Unknown("io.ironroot.nod=x".into())));
        assert_eq!(parse_oem(b"io.ironroot.node="), Err(SmbiosError::Empty("node".into())));
        assert_eq!(parse_oem(b"io.ironroot.node=\xff"), Err(SmbiosError::NotUtf8));
        for junk in [&b""[..], &[11, 5, 0, 0, 3, b'a', 0][..], &[1, 5, 0, 0, 0, 0, 0][..], &[11, 200, 0, 0, 1][..]] {
            assert_eq!(parse_oem_strings(junk), None, "{junk:?}");
        }
    }

    #[test]
    fn placeholder_hardware_values_are_ignored() {
        assert_eq!(normalise_uuid("00000000-0000-0000-0000-000000000000"), None);
        assert_eq!(normalise_uuid("FFFFFFFF-FFFF-FFFF-FFFF-FFFFFFFFFFFF"), None);
        assert_eq!(normalise_uuid("not a uuid"), None);
        assert_eq!(
            normalise_uuid("4C4C4544-0042-3510-8052-B4C04F4B4E32").as_deref(),
            Some("4c4c4544-0042-3510-8052-b4c04f4b4e32")
        );
    }
}
