//! Locating the external tools the tests drive. `just deps` (scripts/deps.sh) installs them;
//! a missing tool is a test failure that says so.

use std::path::PathBuf;

fn tools_dir() -> PathBuf {
    if let Ok(d) = std::env::var("IRONROOT_TOOLS") {
        return PathBuf::from(d).join("bin");
    }
    let cache = std::env::var("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|_| PathBuf::from(std::env::var("HOME").unwrap_or_else(|_| "/root".into())).join(".cache"));
    cache.join("ironroot/tools/bin")
}

/// The path of `name`: from the project's tool cache, else from PATH. Panics with the fix.
pub fn tool(name: &str) -> PathBuf {
    let cached = tools_dir().join(name);
    if cached.exists() {
        return cached;
    }
    for dir in std::env::var("PATH").unwrap_or_default().split(':') {
        let p = PathBuf::from(dir).join(name);
        if p.is_file() {
            return p;
        }
    }
    panic!("{name} is not installed: run `just deps` (scripts/deps.sh) first");
}

/// Panics unless running as root (mounts, device nodes, trusted xattrs, ownership).
pub fn require_root() {
    assert!(
        rustix::process::geteuid().is_root(),
        "this test needs root (device nodes, ownership, trusted.* xattrs): run it as root"
    );
}
