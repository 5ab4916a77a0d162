//! ironroot-agent: runs first in the initramfs (discover → enroll → fetch → verify → mount →
//! hand off), then as a systemd service. So far: the kernel command line contract of `boot`.

pub mod boot;
