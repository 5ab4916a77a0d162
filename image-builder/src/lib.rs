//! ironroot-build: the image toolchain. Today: signing keys and modules (build a composefs
//! image and its object packs into an OCI layout, push, sign cosign-compatibly, verify).
//!
//! - [`kernel`]: checking a kernel config against the options a node needs;
//! - [`keys`]: key pair generation and loading;
//! - [`module`]: build (source tree → EROFS image + packs + config + manifest), push, sign, verify;
//! - [`progress`]: progress on a terminal, silence otherwise;
//! - [`cli`]: the command line and its exit codes.

pub mod cli;
pub mod exit;
pub mod kernel;
pub mod keys;
pub mod module;
pub mod progress;
