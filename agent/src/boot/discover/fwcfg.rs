//! QEMU fw_cfg: `-fw_cfg name=opt/ironroot/identity,file=identity.json` shows up in the guest as
//! `/sys/firmware/qemu_fw_cfg/by_name/opt/ironroot/identity/raw` (the `by_name` entries are
//! symlinks into `by_key`), holding an identity document. Read at most one byte past the cap,
//! so a 16 MiB blob costs 64 KiB.

use std::collections::BTreeMap;
use std::path::Path;

use super::doc::{self, DocError};

/// The identity entry, relative to the root.
pub const IDENTITY_PATH: &str = "sys/firmware/qemu_fw_cfg/by_name/opt/ironroot/identity/raw";

/// The identity document in fw_cfg, if the VM was given one.
pub fn read(path: &Path) -> Result<Option<BTreeMap<String, String>>, DocError> {
    doc::read_file(path)
}
