//! Kernels: checking a kernel configuration against the options a node needs
//! (`kernel-configs/required`, built into the binary).

pub mod check;
