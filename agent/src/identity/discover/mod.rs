//! Phase 1, discover: who this node is and how it should boot, gathered from every identity
//! source in precedence order — kernel cmdline, QEMU fw_cfg, SMBIOS, the cloud metadata endpoint
//! (only when an earlier source names one), a local file — plus the first network interface's
//! MAC. Every value keeps the source it came from; where sources disagree the first one wins and
//! the disagreement is recorded. Reading and parsing are bounded everywhere; hostile input is an
//! error naming the source, never a panic. Every file is read through [`crate::external`]: a
//! FIFO, directory, device or socket at an identity path is an error naming it, never a wait.
//!
//! What the values mean (URLs, key files, store kinds) is `boot::settings`'s business.

mod doc;
mod metadata;
mod smbios;

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

use serde::Serialize;

pub use doc::{DocError, parse_identity_doc};
pub use smbios::parse_oem_strings;

use crate::cmdline::{self, Cmdline};
use crate::external::{self, Links};

/// Where a value came from, in precedence order (earlier wins).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Source {
    Cmdline,
    FwCfg,
    Smbios,
    Metadata,
    File,
    /// The network interfaces in sysfs (only the MAC comes from here).
    Sysfs,
}

impl fmt::Display for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Cmdline => "cmdline",
            Self::FwCfg => "fw_cfg",
            Self::Smbios => "smbios",
            Self::Metadata => "metadata",
            Self::File => "file",
            Self::Sysfs => "sysfs",
        })
    }
}

/// One value and where it came from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Sourced {
    pub value: String,
    pub source: Source,
}

/// Two sources that gave one key different values; `chosen` won by precedence.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Conflict {
    pub key: String,
    pub chosen: Sourced,
    pub other: Sourced,
}

/// Everything discovered, by key (`plane`, `token`, `node`, `smbios_uuid`, `mac`, …).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Discovered {
    pub values: BTreeMap<String, Sourced>,
    pub conflicts: Vec<Conflict>,
    /// Values a source offered that were ignored, and why (placeholder SMBIOS serials, …).
    pub notes: Vec<String>,
}

impl Discovered {
    pub fn get(&self, key: &str) -> Option<&str> {
        self.values.get(key).map(|s| s.value.as_str())
    }

    /// Adds `value` for `key` from `source`: kept if first, else compared.
    pub fn offer(&mut self, key: &str, value: String, source: Source) {
        let offered = Sourced { value, source };
        match self.values.get(key) {
            None => {
                self.values.insert(key.to_owned(), offered);
            }
            Some(chosen) if chosen.value != offered.value => {
                tracing::warn!(key, chosen = %chosen.source, other = %offered.source, "identity sources disagree");
                self.conflicts.push(Conflict { key: key.to_owned(), chosen: chosen.clone(), other: offered });
            }
            Some(_) => {}
        }
    }
}

/// Largest file a value points at (a PEM key or certificate), as large as an identity document.
pub const MAX_VALUE_FILE: u64 = doc::MAX_DOC;

/// Reads a file a value points at (a PEM key or certificate), capped.
pub fn read_value_file(path: &Path) -> Result<Vec<u8>, external::ReadError> {
    external::read(path, MAX_VALUE_FILE, Links::Follow)
}

/// Where discovery looks: every path is under `root`, so tests point it at a fixture tree.
#[derive(Debug, Clone)]
pub struct DiscoverOptions {
    pub root: PathBuf,
    /// The local identity file, relative to `root`.
    pub file: PathBuf,
    /// Deadline for the metadata endpoint.
    pub metadata_deadline: std::time::Duration,
}

impl DiscoverOptions {
    pub fn new(root: &Path) -> Self {
        Self {
            root: root.to_owned(),
            file: PathBuf::from(LOCAL_FILE),
            metadata_deadline: std::time::Duration::from_secs(5),
        }
    }
}

/// QEMU fw_cfg: `-fw_cfg name=opt/ironroot/identity,file=id.json` shows up in the guest here
/// (the `by_name` entries are symlinks into `by_key/`, so links are followed), holding an identity
/// document. Read at most one byte past the cap, so a 16 MiB blob costs 64 KiB.
pub const FW_CFG_IDENTITY: &str = "sys/firmware/qemu_fw_cfg/by_name/opt/ironroot/identity/raw";

/// The local identity file baked into the initramfs (or dropped by provisioning).
pub const LOCAL_FILE: &str = "etc/ironroot/identity.json";

#[derive(Debug, thiserror::Error)]
pub enum DiscoverError {
    #[error(transparent)]
    Cmdline(#[from] cmdline::ReadError),
    #[error("identity source {what}")]
    Read { what: Source, source: external::ReadError },
    #[error("fw_cfg {path}")]
    FwCfg { path: PathBuf, source: DocError },
    #[error("SMBIOS {path}")]
    Smbios { path: PathBuf, source: smbios::SmbiosError },
    #[error("metadata endpoint {url}")]
    Metadata { url: String, source: metadata::MetadataError },
    #[error("identity file {path}")]
    File { path: PathBuf, source: DocError },
}

/// Runs every source in precedence order.
pub async fn discover(opts: &DiscoverOptions) -> Result<Discovered, DiscoverError> {
    let mut found = Discovered::default();
    let line = cmdline::read_cmdline(&opts.root)?;
    offer_cmdline(&mut found, &line);

    let fw = opts.root.join(FW_CFG_IDENTITY);
    if let Some(doc) = read_doc(&fw, Source::FwCfg)? {
        let doc = doc::parse_identity_doc(&doc).map_err(|source| DiscoverError::FwCfg { path: fw.clone(), source })?;
        offer_doc(&mut found, doc, Source::FwCfg);
    }

    smbios::read(&opts.root, &mut found)?;

    if let Some(url) = found.get("metadata").map(str::to_owned) {
        let doc = metadata::fetch(&url, opts.metadata_deadline)
            .await
            .map_err(|source| DiscoverError::Metadata { url: url.clone(), source })?;
        offer_doc(&mut found, doc, Source::Metadata);
    }

    let file = opts.root.join(&opts.file);
    if let Some(doc) = read_doc(&file, Source::File)? {
        let doc = doc::parse_identity_doc(&doc).map_err(|source| DiscoverError::File { path: file.clone(), source })?;
        offer_doc(&mut found, doc, Source::File);
    }

    if let Some(mac) = first_mac(&opts.root)? {
        found.offer("mac", mac, Source::Sysfs);
    }
    Ok(found)
}

/// An identity document's bytes from `path`, if there is one.
fn read_doc(path: &Path, what: Source) -> Result<Option<Vec<u8>>, DiscoverError> {
    external::read_if_present(path, doc::MAX_DOC, Links::Follow).map_err(|source| DiscoverError::Read { what, source })
}

fn offer_cmdline(found: &mut Discovered, line: &Cmdline) {
    for key in line.keys() {
        if let Some(value) = line.get(key) {
            found.offer(key.trim_start_matches("ironroot."), value.to_owned(), Source::Cmdline);
        }
    }
}

fn offer_doc(found: &mut Discovered, doc: BTreeMap<String, String>, source: Source) {
    for (key, value) in doc {
        found.offer(&key, value, source);
    }
}

/// MAC of the first interface (by name) backed by a device; loopback and virtual ones have none.
/// An address file that cannot be read skips the interface, but one that is not a regular file
/// is an error, as at every identity path.
fn first_mac(root: &Path) -> Result<Option<String>, DiscoverError> {
    let dir = root.join("sys/class/net");
    let Ok(entries) = std::fs::read_dir(&dir) else { return Ok(None) };
    let mut names: Vec<String> = entries.filter_map(|e| e.ok()?.file_name().into_string().ok()).collect();
    names.sort();
    for name in names {
        let iface = dir.join(&name);
        if !iface.join("device").exists() {
            continue;
        }
        let mac = match external::read(&iface.join("address"), 64, Links::Follow) {
            Ok(mac) => mac,
            Err(source @ external::ReadError::NotRegular { .. }) => {
                return Err(DiscoverError::Read { what: Source::Sysfs, source });
            }
            Err(_) => continue,
        };
        let Ok(mac) = String::from_utf8(mac) else { continue };
        let mac = mac.trim().to_ascii_lowercase();
        let valid = mac.len() == 17 && mac.split(':').all(|b| b.len() == 2 && b.bytes().all(|c| c.is_ascii_hexdigit()));
        if valid && mac != "00:00:00:00:00:00" {
            return Ok(Some(mac));
        }
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_source_wins_and_disagreement_is_recorded() {
        let mut d = Discovered::default();
        d.offer("node", "a".into(), Source::Cmdline);
        d.offer("node", "a".into(), Source::FwCfg);
        d.offer("node", "b".into(), Source::Smbios);
        assert_eq!(d.get("node"), Some("a"));
        assert_eq!(d.conflicts.len(), 1);
        assert_eq!(d.conflicts[0].other, Sourced { value: "b".into(), source: Source::Smbios });
    }
}
