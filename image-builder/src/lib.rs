//! ironroot-build: the image toolchain. Today: signing keys and modules (build a composefs
//! image and its object packs into an OCI layout, push, sign cosign-compatibly, verify).
//!
//! - [`kernel`]: checking a kernel config against the options a node needs, fetching the default kernel;
//! - [`initramfs`]: the native initramfs (a reproducible newc cpio with the agent as /init);
//! - [`keys`]: key pair generation and loading;
//! - [`module`]: build (source tree → EROFS image + packs + config + manifest), push, sign, verify;
//! - [`progress`]: progress on a terminal, silence otherwise;
//! - [`cli`]: the command line and its exit codes.

pub mod cli;
pub mod exit;
pub mod initramfs;
pub mod kernel;
pub mod keys;
pub mod module;
pub mod progress;

/// The per-user cache (`$XDG_CACHE_HOME/ironroot`, else `~/.cache/ironroot`): apt state, the
/// debootstrap cache. Everything there can be deleted; it is rebuilt on demand.
pub fn cache_dir() -> std::path::PathBuf {
    let base = std::env::var_os("XDG_CACHE_HOME").map(std::path::PathBuf::from).unwrap_or_else(|| {
        std::env::var_os("HOME").map(std::path::PathBuf::from).unwrap_or_else(|| "/root".into()).join(".cache")
    });
    base.join("ironroot")
}
