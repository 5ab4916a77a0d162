//! Modules: build one from a tree, push it, sign it, verify it.

pub mod build;
pub mod dest;
pub mod push;
pub mod sign;
pub mod staging;
pub mod tree;
pub mod verify;
