//! ironroot-agent: runs first in the initramfs (discover → enroll → fetch → verify → mount →
//! hand off, in [`boot`]), then as a systemd service ([`service`]).
//!
//! Capabilities both lifetimes use, named for their domain:
//! - [`identity`]: who this node is (discovery with provenance) and its plane identity
//!   (enrollment, the certificate);
//! - [`modules`]: verifying assigned modules into the store, serial floors;
//! - [`root`]: mounting composefs roots and layers;
//! - [`store`]: the object store (zram, disk, dir, tmpfs);
//! - [`plane`]: the agent's side of the plane API;
//! - [`run_state`]: `/run/ironroot` (boot.json, private files, the boot clock);
//! - [`external`]: bounded, non-blocking reads of files the agent does not control;
//! - [`cmdline`], [`backoff`].
//!
//! Lifetimes, which only orchestrate and never import each other:
//! - [`boot`] + [`init`]: the initramfs pipeline and PID 1 of the native initramfs;
//! - [`service`]: the runtime under systemd.
//!
//! [`cli`] (`boot`, `serve`, `pull`, `identity`) and [`exit`] (exit codes) sit beside them.

pub mod backoff;
pub mod boot;
pub mod cli;
pub mod cmdline;
pub mod exit;
pub mod external;
pub mod identity;
pub mod init;
pub mod modules;
pub mod plane;
pub mod root;
pub mod run_state;
pub mod service;
pub mod store;
