//! ironroot-agent: runs first in the initramfs (discover → enroll → fetch → verify → mount →
//! hand off, in [`boot`]), then as a systemd service.
//!
//! - [`boot`]: the pipeline, one module per phase;
//! - [`init`]: PID 1 of the native initramfs (mounts, modules, DHCP, pipeline, switch-root);
//! - [`serve`]: the service under systemd (handshake `ready`, heartbeats, sd-notify);
//! - [`plane`]: the agent's side of the plane API;
//! - [`external`]: bounded, non-blocking reads of files the agent does not control;
//! - [`cli`]: `boot`, `serve`, `pull`, `identity`;
//! - [`exit`]: exit codes.

pub mod boot;
pub mod cli;
pub mod exit;
pub mod external;
pub mod init;
pub mod plane;
pub mod serve;
