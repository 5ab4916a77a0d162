//! The system calls PID 1 needs: early mounts, module loading, reaping, switch-root, and the
//! final reboot or halt. Each is small and effectful; the order lives in `init::main`.

use std::io;
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};

use rustix::fs::{Mode, OFlags};
use rustix::mount::{MountFlags, mount, mount_move};
use rustix::process::{WaitOptions, chdir, chroot};
use rustix::system::RebootCommand;

/// `MODULE_INIT_COMPRESSED_FILE`: the kernel decompresses `.ko.xz` itself (MODULE_DECOMPRESS).
const MODULE_INIT_COMPRESSED_FILE: i32 = 4;

/// proc, sys, devtmpfs and a tmpfs /run — what the pipeline and the real root expect.
pub fn early_mounts() -> io::Result<()> {
    let nosuid = MountFlags::NOSUID | MountFlags::NODEV | MountFlags::NOEXEC;
    let mounts: [(&str, &str, MountFlags, Option<&std::ffi::CStr>); 4] = [
        ("proc", "/proc", nosuid, None),
        ("sysfs", "/sys", nosuid, None),
        ("devtmpfs", "/dev", MountFlags::NOSUID, Some(c"mode=0755")),
        ("tmpfs", "/run", MountFlags::NOSUID | MountFlags::NODEV, Some(c"mode=0755")),
    ];
    for (fstype, target, flags, data) in mounts {
        std::fs::create_dir_all(target)?;
        mount(fstype, target, fstype, flags, data)
            .map_err(|e| io::Error::new(e.kind(), format!("mounting {fstype} on {target}: {e}")))?;
    }
    Ok(())
}

/// What loading the initramfs's module list did.
#[derive(Debug, Default)]
pub struct Loaded {
    pub loaded: Vec<String>,
    pub already: Vec<String>,
    pub failed: Vec<(String, String)>,
}

/// Loads every module listed in `list` (see [`waves`]), a wave at a time.
pub fn load_modules(list: &Path) -> io::Result<Loaded> {
    let text = std::fs::read_to_string(list)?;
    let waves: Vec<Vec<PathBuf>> =
        waves(&text).into_iter().map(|w| w.into_iter().map(PathBuf::from).collect()).collect();
    Ok(load_waves(&waves))
}

/// Loads `waves` in order, the modules of a wave in parallel (their init functions probe
/// devices; TCG guests have two vCPUs to spare). A module already loaded counts as `already`.
pub fn load_waves(waves: &[Vec<PathBuf>]) -> Loaded {
    let mut out = Loaded::default();
    for wave in waves {
        let results: Vec<_> = std::thread::scope(|s| {
            let threads: Vec<_> = wave.iter().map(|path| s.spawn(move || load_one(path))).collect();
            threads.into_iter().map(|t| t.join().unwrap_or(Err(rustix::io::Errno::INTR))).collect()
        });
        for (path, result) in wave.iter().zip(results) {
            let path = path.display().to_string();
            match result {
                Ok(()) => out.loaded.push(path),
                Err(rustix::io::Errno::EXIST) => out.already.push(path),
                Err(e) => out.failed.push((path, e.to_string())),
            }
        }
    }
    out
}

/// modules.load: one wave per line, its module paths separated by spaces. A wave's modules
/// need only modules of earlier waves, so they load in parallel; a list with one module per
/// line loads one at a time.
fn waves(text: &str) -> Vec<Vec<&str>> {
    text.lines().map(|line| line.split_whitespace().collect::<Vec<_>>()).filter(|wave| !wave.is_empty()).collect()
}

fn load_one(path: &Path) -> rustix::io::Result<()> {
    let fd = rustix::fs::open(path, OFlags::RDONLY | OFlags::CLOEXEC, Mode::empty())?;
    // Distribution modules are compressed (the kernel decompresses them); a kernel built
    // from source may ship them plain, which the compressed flag would refuse.
    let compressed = path.extension().is_some_and(|e| e == "xz" || e == "gz" || e == "zst");
    rustix::system::finit_module(&fd, c"", if compressed { MODULE_INIT_COMPRESSED_FILE } else { 0 })
}

/// Reaps every exited child without blocking (orphans are re-parented to PID 1).
pub fn reap() -> usize {
    let mut n = 0;
    while let Ok(Some(_)) = rustix::process::wait(WaitOptions::NOHANG) {
        n += 1;
    }
    n
}

/// Moves /dev, /proc, /sys and /run into `new_root`, frees the initramfs, makes `new_root` the
/// root and executes `init` there. Returns only on failure.
pub fn switch_root(new_root: &Path, init: &str) -> io::Error {
    match prepare_switch(new_root, init) {
        Ok(()) => std::process::Command::new(init).exec(),
        Err(e) => e,
    }
}

fn prepare_switch(new_root: &Path, init: &str) -> io::Result<()> {
    let init_path = new_root.join(init.trim_start_matches('/'));
    if std::fs::symlink_metadata(&init_path).is_err() {
        return Err(io::Error::new(io::ErrorKind::NotFound, format!("{} does not exist", init_path.display())));
    }
    let root_dev = std::fs::symlink_metadata("/")?;
    // /persist (a disk-backed store: node key, certificate, objects, the overlay's upper) only
    // when the boot mounted it; boot.json names paths under it.
    let persist = std::fs::symlink_metadata("/persist")
        .is_ok_and(|m| std::os::unix::fs::MetadataExt::dev(&m) != std::os::unix::fs::MetadataExt::dev(&root_dev));
    let moved: &[&str] =
        if persist { &["dev", "proc", "sys", "run", "persist"] } else { &["dev", "proc", "sys", "run"] };
    for dir in moved {
        let target = new_root.join(dir);
        std::fs::create_dir_all(&target)?;
        mount_move(format!("/{dir}").as_str(), &target)
            .map_err(|e| io::Error::new(e.kind(), format!("moving /{dir} to {}: {e}", target.display())))?;
    }
    free_initramfs(Path::new("/"), std::os::unix::fs::MetadataExt::dev(&root_dev));
    chdir(new_root)?;
    mount_move(".", "/").map_err(|e| io::Error::new(e.kind(), format!("moving {} to /: {e}", new_root.display())))?;
    chroot(".")?;
    chdir("/")?;
    Ok(())
}

/// Deletes the initramfs's files (it lives in RAM) without crossing into other filesystems.
fn free_initramfs(dir: &Path, dev: u64) {
    use std::os::unix::fs::MetadataExt as _;
    let Ok(entries) = std::fs::read_dir(dir) else { return };
    for entry in entries.filter_map(Result::ok) {
        let path = entry.path();
        let Ok(meta) = std::fs::symlink_metadata(&path) else { continue };
        if meta.dev() != dev {
            continue;
        }
        if meta.is_dir() {
            free_initramfs(&path, dev);
            let _ = std::fs::remove_dir(&path);
        } else {
            let _ = std::fs::remove_file(&path);
        }
    }
}

/// Reboots, or halts, after syncing. Never returns; if the kernel refuses, waits forever
/// (PID 1 must not exit).
pub fn reboot(halt: bool) -> ! {
    rustix::fs::sync();
    let cmd = if halt { RebootCommand::PowerOff } else { RebootCommand::Restart };
    if let Err(e) = rustix::system::reboot(cmd) {
        eprintln!("ironroot: reboot({cmd:?}) failed: {e}; waiting");
    }
    loop {
        reap();
        std::thread::sleep(std::time::Duration::from_secs(60));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_module_list_is_one_wave_per_line() {
        let text = "/a.ko.xz /b.ko.xz\n/c.ko.xz\n\n  /d.ko  /e.ko.zst \n";
        assert_eq!(waves(text), [vec!["/a.ko.xz", "/b.ko.xz"], vec!["/c.ko.xz"], vec!["/d.ko", "/e.ko.zst"]]);
        assert!(waves("").is_empty());
        assert_eq!(waves("/x.ko.xz\n/y.ko.xz"), [vec!["/x.ko.xz"], vec!["/y.ko.xz"]], "one per line: in order");
    }
}
