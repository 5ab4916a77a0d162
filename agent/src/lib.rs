//! ironroot-agent: runs first in the initramfs (discover → enroll → fetch → verify → mount →
//! hand off, in [`boot`]), then as a systemd service.
//!
//! - [`boot`]: the pipeline, one module per phase;
//! - [`plane`]: the agent's side of the plane API;
//! - [`cli`]: `boot`, `pull`, `identity`;
//! - [`exit`]: exit codes.

pub mod boot;
pub mod cli;
pub mod exit;
pub mod plane;
