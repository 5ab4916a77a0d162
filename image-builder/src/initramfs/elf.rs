//! The shared libraries a binary needs: its ELF interpreter (`PT_INTERP`) and the transitive
//! closure of its `DT_NEEDED` entries, resolved in the library directories of a sysroot the way
//! the dynamic loader would find them on a Debian amd64 system.

use std::collections::{BTreeMap, VecDeque};
use std::path::{Path, PathBuf};

use object::Endianness;
use object::elf::{DT_NEEDED, FileHeader64};
use object::read::elf::{Dyn as _, FileHeader as _, ProgramHeader as _};
use thiserror::Error;

/// Where the loader looks, in order (Debian multiarch first).
pub const LIBRARY_DIRS: &[&str] =
    &["lib/x86_64-linux-gnu", "usr/lib/x86_64-linux-gnu", "lib64", "usr/lib64", "lib", "usr/lib"];

#[derive(Debug, Error)]
pub enum ElfError {
    #[error("reading {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("{path} is not a 64-bit little-endian ELF file: {reason}")]
    Parse { path: PathBuf, reason: String },
    #[error("{needed}, which {by} needs, is in none of {dirs:?} under {sysroot}")]
    NotFound { needed: String, by: PathBuf, sysroot: PathBuf, dirs: &'static [&'static str] },
}

/// Path inside the image (absolute, as the loader will look it up) → file on the host.
pub type Libraries = BTreeMap<String, PathBuf>;

/// The interpreter and every library `binary` needs, transitively.
pub fn needed_closure(binary: &Path, sysroot: &Path) -> Result<Libraries, ElfError> {
    let mut found = Libraries::new();
    let mut queue = VecDeque::from([binary.to_path_buf()]);
    while let Some(file) = queue.pop_front() {
        let info = read(&file)?;
        if let Some(interp) = info.interpreter {
            let host = sysroot.join(interp.trim_start_matches('/'));
            if !found.contains_key(&interp) {
                found.insert(interp.clone(), host);
            }
        }
        for needed in info.needed {
            if found.keys().any(|k| k.rsplit('/').next() == Some(needed.as_str())) {
                continue;
            }
            let (image_path, host) = LIBRARY_DIRS
                .iter()
                .map(|dir| (format!("/{dir}/{needed}"), sysroot.join(dir).join(&needed)))
                .find(|(_, host)| host.exists())
                .ok_or_else(|| ElfError::NotFound {
                    needed: needed.clone(),
                    by: file.clone(),
                    sysroot: sysroot.to_path_buf(),
                    dirs: LIBRARY_DIRS,
                })?;
            queue.push_back(host.clone());
            found.insert(image_path, host);
        }
    }
    Ok(found)
}

#[derive(Debug, Default)]
struct ElfInfo {
    interpreter: Option<String>,
    needed: Vec<String>,
}

fn read(path: &Path) -> Result<ElfInfo, ElfError> {
    let data = std::fs::read(path).map_err(|source| ElfError::Read { path: path.to_path_buf(), source })?;
    let bad = |reason: String| ElfError::Parse { path: path.to_path_buf(), reason };
    let header = FileHeader64::<Endianness>::parse(&*data).map_err(|e| bad(e.to_string()))?;
    let endian = header.endian().map_err(|e| bad(e.to_string()))?;
    if endian != Endianness::Little {
        return Err(bad("big-endian".into()));
    }
    let mut info = ElfInfo::default();
    for phdr in header.program_headers(endian, &*data).map_err(|e| bad(e.to_string()))? {
        if let Some(interp) = phdr.interpreter(endian, &*data).map_err(|e| bad(e.to_string()))? {
            info.interpreter = Some(String::from_utf8_lossy(interp).into_owned());
        }
    }
    let sections = header.sections(endian, &*data).map_err(|e| bad(e.to_string()))?;
    if let Some((dynamic, link)) = sections.dynamic(endian, &*data).map_err(|e| bad(e.to_string()))? {
        let strings = sections.strings(endian, &*data, link).map_err(|e| bad(e.to_string()))?;
        for d in dynamic {
            if d.d_tag(endian) == u64::from(DT_NEEDED) {
                let offset = u32::try_from(d.d_val(endian)).map_err(|_| bad("DT_NEEDED offset".into()))?;
                let name = strings.get(offset).map_err(|()| bad(format!("DT_NEEDED name at {offset}")))?;
                info.needed.push(String::from_utf8_lossy(name).into_owned());
            }
        }
    }
    Ok(info)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_dynamic_binary_needs_the_loader_and_libc() {
        let libs = needed_closure(Path::new("/bin/ls"), Path::new("/")).unwrap();
        assert!(libs.contains_key("/lib64/ld-linux-x86-64.so.2"), "{libs:?}");
        assert!(libs.keys().any(|k| k.ends_with("/libc.so.6")), "{libs:?}");
        // libselinux is ls's own need; libpcre2 is only libselinux's — the closure is transitive.
        assert!(libs.keys().any(|k| k.contains("libpcre2-8.so")), "{libs:?}");
    }

    #[test]
    fn a_missing_library_and_a_non_elf_file_are_named() {
        let err = needed_closure(Path::new("/bin/ls"), Path::new("/nonexistent")).unwrap_err();
        assert!(err.to_string().contains("/nonexistent"), "{err}");
        let dir = tempfile::tempdir().unwrap();
        let text = dir.path().join("script");
        std::fs::write(&text, "#!/bin/sh\n").unwrap();
        let err = needed_closure(&text, Path::new("/")).unwrap_err();
        assert!(matches!(err, ElfError::Parse { .. }), "{err}");
    }
}
