//! The agent's run state under `/run/ironroot` (docs/interfaces/run-state.md), for both
//! lifetimes: `boot.json` written by the initramfs agent and read by the service, files the
//! agent writes for itself (0600 from creation, replaced by rename), and the boot clock the
//! timings are measured on.

use std::path::{Path, PathBuf};

use ironroot_contract::run_state::{BOOT_JSON, BootRecord};

/// Milliseconds since the kernel started (CLOCK_BOOTTIME: includes suspend, never jumps).
pub fn boottime_ms() -> u64 {
    let t = rustix::time::clock_gettime(rustix::time::ClockId::Boottime);
    (t.tv_sec as u64) * 1000 + (t.tv_nsec as u64) / 1_000_000
}

/// Writes `record` to `run_dir/boot.json` (0600, atomically).
pub fn write(run_dir: &Path, record: &BootRecord) -> std::io::Result<PathBuf> {
    std::fs::create_dir_all(run_dir)?;
    let path = run_dir.join(BOOT_JSON);
    write_private(&path, &serde_json::to_vec_pretty(record).map_err(std::io::Error::other)?)?;
    Ok(path)
}

/// Writes `bytes` to `path` with mode 0600 from the start, through `NAME.partial` beside it and
/// a rename (boot.json, the node key and certificate, the plane CA).
pub(crate) fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write as _;
    use std::os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _};
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let partial = path.with_file_name(format!("{name}.partial"));
    let mut f = std::fs::OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(&partial)?;
    // A leftover partial file keeps its old mode through `truncate`; make sure it is 0600.
    f.set_permissions(std::fs::Permissions::from_mode(0o600))?;
    f.write_all(bytes)?;
    f.sync_all()?;
    std::fs::rename(&partial, path)
}
