//! Kernels: checking a kernel configuration against the options a node needs
//! (`kernel-configs/required`, built into the binary), and fetching the default one.

pub mod check;
pub mod fetch;
