//! The boot pipeline, run once in the initramfs. So far: [`cmdline`], the `ironroot.*` kernel
//! command line keys (docs/interfaces/kernel-cmdline.md).

pub mod cmdline;
