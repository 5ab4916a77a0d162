//! The real-peer test tier: helpers that start and stop the real things ironroot talks to.
//!
//! - [`tools`]: finds cosign, mkcomposefs, docker-registry, openssl (installed by `just deps`);
//! - [`registry`]: a distribution registry per test on 127.0.0.1, plain, TLS + htpasswd, or
//!   token auth, killed on drop;
//! - [`http`]: tiny loopback HTTP servers we control (a token endpoint and the issuer whose
//!   signed tokens a token registry checks, a hostile blob server);
//! - [`tree`]: a generated tree holding everything a root filesystem has;
//! - [`cli`]: running the `ironroot-build` binary;
//! - [`runtime`]: modules, roots, receipts and the journal as the runtime scenarios use them;
//! - [`vm`]: QEMU boots of the `just image` artifacts against the plane and a TLS registry;
//! - [`craft`]: rewriting modules in a layout to build tampered (but validly signed) variants.
//!
//! A test that lacks a tool or root fails with the instruction to fix it; it never passes silently.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "test support: a failed setup step should stop the test loudly"
)]

pub mod cli;
pub mod craft;
pub mod http;
pub mod lab;
pub mod plane;
pub mod registry;
pub mod runtime;
pub mod tools;
pub mod tree;
pub mod vm;
pub mod vm_process;
