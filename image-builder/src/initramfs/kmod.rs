//! Kernel modules for the initramfs: the requested names, their dependencies from
//! `modules.dep` (which `depmod -b` wrote), in an order where every module comes after what it
//! needs. Names compare the way modprobe compares them (`-` and `_` are the same); a module the
//! kernel has built in (`modules.builtin`) needs no file.

use std::collections::{BTreeMap, BTreeSet};

use thiserror::Error;

#[derive(Debug, Error, PartialEq, Eq)]
pub enum KmodError {
    #[error("modules.dep line {line}: {text:?} is not 'path: deps'")]
    Malformed { line: usize, text: String },
    #[error("kernel module {0:?} is neither in modules.dep nor built in")]
    Unknown(String),
}

/// Parsed `modules.dep` + `modules.builtin`.
#[derive(Debug, Default)]
pub struct ModuleIndex {
    /// name → (path relative to lib/modules/REL, dependency paths)
    by_name: BTreeMap<String, (String, Vec<String>)>,
    by_path: BTreeMap<String, Vec<String>>,
    builtin: BTreeSet<String>,
}

/// `kernel/fs/erofs/erofs.ko.xz` → `erofs`; `virtio-rng` → `virtio_rng`.
pub fn module_name(path_or_name: &str) -> String {
    let base = path_or_name.rsplit('/').next().unwrap_or(path_or_name);
    let stem = base.split(".ko").next().unwrap_or(base);
    stem.replace('-', "_")
}

impl ModuleIndex {
    pub fn parse(dep: &str, builtin: &str) -> Result<Self, KmodError> {
        let mut index = ModuleIndex::default();
        for (n, line) in dep.lines().enumerate() {
            if line.trim().is_empty() {
                continue;
            }
            let (path, deps) =
                line.split_once(':').ok_or_else(|| KmodError::Malformed { line: n + 1, text: line.to_owned() })?;
            let deps: Vec<String> = deps.split_whitespace().map(str::to_owned).collect();
            index.by_name.insert(module_name(path), (path.to_owned(), deps.clone()));
            index.by_path.insert(path.to_owned(), deps);
        }
        index.builtin = builtin.lines().filter(|l| !l.trim().is_empty()).map(module_name).collect();
        Ok(index)
    }

    /// The files to load for `names`, dependencies first, each once. Built-in names are
    /// returned separately (nothing to load).
    pub fn closure(&self, names: &[&str]) -> Result<(Vec<String>, Vec<String>), KmodError> {
        let mut order = Vec::new();
        let mut seen = BTreeSet::new();
        let mut builtin = Vec::new();
        for name in names {
            let name = module_name(name);
            if let Some((path, _)) = self.by_name.get(&name) {
                self.visit(path, &mut seen, &mut order);
            } else if self.builtin.contains(&name) {
                builtin.push(name);
            } else {
                return Err(KmodError::Unknown(name));
            }
        }
        Ok((order, builtin))
    }

    /// `order` (from [`ModuleIndex::closure`]) in waves: a module's wave is one past the
    /// latest wave of what it needs, so each wave's modules can load at the same time.
    pub fn waves(&self, order: &[String]) -> Vec<Vec<String>> {
        let mut wave_of: BTreeMap<&str, usize> = BTreeMap::new();
        let mut waves: Vec<Vec<String>> = Vec::new();
        for path in order {
            let deps = self.by_path.get(path).into_iter().flatten();
            let wave = deps.filter_map(|d| wave_of.get(d.as_str())).map(|w| w + 1).max().unwrap_or(0);
            wave_of.insert(path, wave);
            if waves.len() <= wave {
                waves.resize_with(wave + 1, Vec::new);
            }
            waves[wave].push(path.clone());
        }
        waves
    }

    fn visit(&self, path: &str, seen: &mut BTreeSet<String>, order: &mut Vec<String>) {
        if !seen.insert(path.to_owned()) {
            return;
        }
        // modules.dep lists the full transitive set; visiting each keeps the order right
        // even when a dependency's own line is what orders it.
        for dep in self.by_path.get(path).into_iter().flatten() {
            self.visit(dep, seen, order);
        }
        order.push(path.to_owned());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DEP: &str = "kernel/fs/erofs/erofs.ko.xz: kernel/lib/libcrc32c.ko.xz\n\
        kernel/lib/libcrc32c.ko.xz:\n\
        kernel/drivers/net/virtio_net.ko.xz: kernel/drivers/net/net_failover.ko.xz kernel/net/core/failover.ko.xz\n\
        kernel/drivers/net/net_failover.ko.xz: kernel/net/core/failover.ko.xz\n\
        kernel/net/core/failover.ko.xz:\n\
        kernel/drivers/char/hw_random/virtio-rng.ko.xz:\n";

    #[test]
    fn dependencies_come_first_and_once() {
        let index = ModuleIndex::parse(DEP, "kernel/fs/ext4/ext4.ko\n").unwrap();
        let (order, builtin) = index.closure(&["virtio_net", "erofs", "virtio-rng", "ext4", "virtio_net"]).unwrap();
        assert_eq!(
            order,
            [
                "kernel/net/core/failover.ko.xz",
                "kernel/drivers/net/net_failover.ko.xz",
                "kernel/drivers/net/virtio_net.ko.xz",
                "kernel/lib/libcrc32c.ko.xz",
                "kernel/fs/erofs/erofs.ko.xz",
                "kernel/drivers/char/hw_random/virtio-rng.ko.xz",
            ]
        );
        assert_eq!(builtin, ["ext4"]);
    }

    #[test]
    fn waves_put_each_module_after_everything_it_needs() {
        let index = ModuleIndex::parse(DEP, "").unwrap();
        let (order, _) = index.closure(&["virtio_net", "erofs", "virtio-rng"]).unwrap();
        let waves = index.waves(&order);
        assert_eq!(
            waves,
            [
                vec![
                    "kernel/net/core/failover.ko.xz",
                    "kernel/lib/libcrc32c.ko.xz",
                    "kernel/drivers/char/hw_random/virtio-rng.ko.xz"
                ],
                vec!["kernel/drivers/net/net_failover.ko.xz", "kernel/fs/erofs/erofs.ko.xz"],
                vec!["kernel/drivers/net/virtio_net.ko.xz"],
            ]
        );
        assert_eq!(waves.concat().len(), order.len(), "every module once");
    }

    #[test]
    fn unknown_modules_and_broken_lines_are_named() {
        let index = ModuleIndex::parse(DEP, "").unwrap();
        assert_eq!(index.closure(&["nope"]), Err(KmodError::Unknown("nope".into())));
        assert!(matches!(ModuleIndex::parse("no colon here", ""), Err(KmodError::Malformed { line: 1, .. })));
    }
}
