//! A generated tree exercising everything a root filesystem has: small (inline) and large
//! (external) files at the 64-byte and 4 KiB boundaries, empty files, duplicate content,
//! symlinks (relative, absolute, dangling), hard links, nested and empty directories, xattrs
//! (user.* and trusted.*), setuid/setgid/sticky and odd modes, other owners, long and non-ASCII
//! names, a fifo and device nodes. Every inode gets a distinct fixed mtime.

use std::fs;
use std::os::unix::fs::{PermissionsExt as _, symlink};
use std::path::Path;

use rustix::fs::{AtFlags, CWD, FileType, Mode, Timespec, Timestamps};

#[derive(Debug)]
pub struct TreeOptions {
    pub hardlinks: bool,
    pub devices: bool,
}

fn content(seed: usize, len: usize) -> Vec<u8> {
    let mut x = seed as u64 ^ 0x9e37_79b9_7f4a_7c15;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

fn write(path: &Path, data: &[u8], mode: u32) {
    fs::write(path, data).unwrap_or_else(|e| panic!("writing {}: {e}", path.display()));
    fs::set_permissions(path, fs::Permissions::from_mode(mode)).expect("chmod");
}

/// Builds the tree under `root` (which must not exist yet). Needs root for devices, owners and
/// trusted.* xattrs.
pub fn generate(root: &Path, opts: &TreeOptions) {
    crate::tools::require_root();
    fs::create_dir_all(root.join("usr/bin")).expect("mkdir");
    fs::create_dir_all(root.join("usr/lib/deep/er/still/deeper")).expect("mkdir");
    fs::create_dir_all(root.join("etc/empty.d")).expect("mkdir");
    fs::create_dir_all(root.join("var/tmp")).expect("mkdir");
    fs::create_dir_all(root.join("dev")).expect("mkdir");

    write(&root.join("etc/empty"), b"", 0o644);
    write(&root.join("etc/one"), b"1", 0o644);
    write(&root.join("etc/inline-64"), &content(1, 64), 0o644);
    write(&root.join("etc/external-65"), &content(2, 65), 0o644);
    write(&root.join("usr/lib/block-4096"), &content(3, 4096), 0o644);
    write(&root.join("usr/lib/block-4097"), &content(4, 4097), 0o644);
    write(&root.join("usr/lib/deep/er/still/deeper/large"), &content(5, 3 << 20), 0o644);
    write(&root.join("usr/lib/dup-a"), &content(6, 10_000), 0o644);
    write(&root.join("usr/lib/dup-b"), &content(6, 10_000), 0o644);
    write(&root.join("usr/bin/setuid"), &content(7, 5000), 0o4755);
    write(&root.join("usr/bin/setgid"), &content(8, 100), 0o2711);
    write(&root.join("etc/secret"), &content(9, 300), 0o600);
    write(&root.join("etc/nothing"), &content(10, 10), 0o000);
    fs::set_permissions(root.join("var/tmp"), fs::Permissions::from_mode(0o1777)).expect("sticky");

    let long = "l".repeat(255);
    write(&root.join("etc").join(&long), &content(11, 70), 0o644);
    write(&root.join("etc/übergrößen-ファイル ✓"), &content(12, 200), 0o644);
    write(&root.join("etc/name with spaces"), b"spaces", 0o644);

    symlink("../lib/dup-a", root.join("usr/bin/rel-link")).expect("symlink");
    symlink("/etc/one", root.join("usr/bin/abs-link")).expect("symlink");
    symlink("does/not/exist", root.join("usr/bin/dangling")).expect("symlink");
    symlink("x".repeat(1000), root.join("usr/bin/long-target")).expect("symlink");

    if opts.hardlinks {
        fs::hard_link(root.join("usr/lib/block-4097"), root.join("usr/bin/hardlink-to-4097")).expect("hardlink");
        fs::hard_link(root.join("etc/one"), root.join("etc/hardlink-to-one")).expect("hardlink");
    }

    rustix::fs::setxattr(root.join("etc/one").as_path(), "user.ironroot", b"value", rustix::fs::XattrFlags::empty())
        .expect("user xattr");
    rustix::fs::setxattr(
        root.join("usr/lib/block-4097").as_path(),
        "trusted.ironroot.test",
        b"\x00\x01binary",
        rustix::fs::XattrFlags::empty(),
    )
    .expect("trusted xattr");
    rustix::fs::setxattr(
        root.join("usr/lib").as_path(),
        "user.dir",
        b"on a directory",
        rustix::fs::XattrFlags::empty(),
    )
    .expect("dir xattr");

    rustix::fs::chown(
        root.join("etc/secret").as_path(),
        Some(rustix::fs::Uid::from_raw(1000)),
        Some(rustix::fs::Gid::from_raw(1000)),
    )
    .expect("chown");
    rustix::fs::chown(
        root.join("var/tmp").as_path(),
        Some(rustix::fs::Uid::from_raw(0)),
        Some(rustix::fs::Gid::from_raw(3)),
    )
    .expect("chown");

    if opts.devices {
        rustix::fs::mknodat(CWD, root.join("dev/fifo").as_path(), FileType::Fifo, Mode::from_raw_mode(0o644), 0)
            .expect("mkfifo");
        rustix::fs::mknodat(
            CWD,
            root.join("dev/null").as_path(),
            FileType::CharacterDevice,
            Mode::from_raw_mode(0o666),
            rustix::fs::makedev(1, 3),
        )
        .expect("mknod c");
        rustix::fs::mknodat(
            CWD,
            root.join("dev/loop0").as_path(),
            FileType::BlockDevice,
            Mode::from_raw_mode(0o660),
            rustix::fs::makedev(7, 0),
        )
        .expect("mknod b");
    }
    let mut n = 0;
    set_mtimes(root, &mut n);
}

/// Distinct mtimes, children before their directory (creating a child changes the parent's).
fn set_mtimes(dir: &Path, n: &mut i64) {
    let mut entries: Vec<_> = fs::read_dir(dir).expect("read_dir").map(|e| e.expect("entry").path()).collect();
    entries.sort();
    for p in entries {
        let meta = fs::symlink_metadata(&p).expect("lstat");
        if meta.is_dir() {
            set_mtimes(&p, n);
        }
        touch(&p, n);
    }
    touch(dir, n);
}

fn touch(p: &Path, n: &mut i64) {
    *n += 1;
    let t = Timespec { tv_sec: 1_700_000_000 + *n * 3600, tv_nsec: 0 };
    rustix::fs::utimensat(CWD, p, &Timestamps { last_access: t, last_modification: t }, AtFlags::SYMLINK_NOFOLLOW)
        .expect("utimensat");
}

/// A tree of about `total` bytes in files of varied sizes (benchmarks and large-module tests).
pub fn generate_bulk(root: &Path, total: u64) {
    let mut written = 0u64;
    let mut i = 0usize;
    while written < total {
        let dir = root.join(format!("d{:03}", i / 64));
        fs::create_dir_all(&dir).expect("mkdir");
        let len = match i % 8 {
            0 => 40,
            1 => 3000,
            2 => 20_000,
            3 => 150_000,
            4 => 1 << 20,
            5 => 4 << 20,
            6 => 700,
            _ => 65_537,
        };
        fs::write(dir.join(format!("f{i:06}")), content(i, len)).expect("write");
        written += len as u64;
        i += 1;
    }
}
