//! A live module's systemd units: linked from its tree (`<mount point>/usr/lib/systemd/system/
//! NAME`) into `/run/systemd/system`, so the link follows the mount through an update and goes
//! away with `/run`. Links are replaced by rename, never left half-written.

use std::path::{Path, PathBuf};

use crate::service::rollout::ModuleInfo;

/// Where a module's unit file is in its mounted tree.
pub fn unit_file(root: &Path, module: &ModuleInfo, unit: &str) -> Option<PathBuf> {
    let mount = module.mount_point.as_deref()?;
    Some(root.join(mount.trim_start_matches('/')).join("usr/lib/systemd/system").join(unit))
}

/// Links every unit of `module` into `units_dir`; a unit the module does not carry is an error
/// naming it (checked before any link changes).
pub fn link(root: &Path, units_dir: &Path, module: &ModuleInfo) -> Result<(), String> {
    let mut files = Vec::new();
    for unit in &module.units {
        let file = unit_file(root, module, unit).ok_or_else(|| format!("{} has no mount point", module.name))?;
        if !file.is_file() {
            return Err(format!("unit {unit} is not in module {} ({} is missing)", module.name, file.display()));
        }
        files.push((unit, file));
    }
    std::fs::create_dir_all(units_dir).map_err(|e| format!("creating {}: {e}", units_dir.display()))?;
    for (unit, file) in files {
        let link = units_dir.join(unit);
        let partial = units_dir.join(format!(".{unit}.ironroot-partial"));
        let _ = std::fs::remove_file(&partial);
        std::os::unix::fs::symlink(&file, &partial).map_err(|e| format!("linking {}: {e}", link.display()))?;
        std::fs::rename(&partial, &link).map_err(|e| format!("linking {}: {e}", link.display()))?;
    }
    Ok(())
}

/// Removes the links of `units` that point into `module`'s tree (a link someone else made is
/// left alone).
pub fn unlink(root: &Path, units_dir: &Path, module: &ModuleInfo, units: &[String]) -> Result<(), String> {
    for unit in units {
        let link = units_dir.join(unit);
        let ours = std::fs::read_link(&link).ok().is_some_and(|t| Some(t) == unit_file(root, module, unit));
        if ours {
            std::fs::remove_file(&link).map_err(|e| format!("unlinking {}: {e}", link.display()))?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use ironroot_contract::config::MountRole;

    fn module(dir: &Path) -> ModuleInfo {
        ModuleInfo {
            name: "hello".into(),
            reference: "r/hello@sha256:00".into(),
            digest: format!("sha256:{}", "00".repeat(32)).parse().unwrap(),
            composefs: "00".repeat(32).parse().unwrap(),
            version: "1".into(),
            serial: 1,
            role: MountRole::Opt,
            mount_point: Some(format!("{}/opt/hello", dir.display())),
            units: vec!["hello.service".into(), "hello-web.service".into()],
            health: None,
        }
    }

    #[test]
    fn units_are_linked_only_when_the_module_carries_all_of_them() {
        let dir = tempfile::tempdir().unwrap();
        let (root, units_dir) = (Path::new("/"), dir.path().join("units"));
        let m = module(dir.path());
        let tree = dir.path().join("opt/hello/usr/lib/systemd/system");
        std::fs::create_dir_all(&tree).unwrap();
        std::fs::write(tree.join("hello.service"), "[Service]\n").unwrap();
        let err = link(root, &units_dir, &m).unwrap_err();
        assert!(err.contains("unit hello-web.service is not in module hello"), "{err}");
        assert!(!units_dir.join("hello.service").exists(), "nothing linked");
        std::fs::write(tree.join("hello-web.service"), "[Service]\n").unwrap();
        link(root, &units_dir, &m).unwrap();
        link(root, &units_dir, &m).unwrap();
        assert_eq!(std::fs::read_link(units_dir.join("hello.service")).unwrap(), tree.join("hello.service"));
        std::os::unix::fs::symlink("/elsewhere", units_dir.join("other.service")).unwrap();
        unlink(root, &units_dir, &m, &["hello.service".into(), "other.service".into()]).unwrap();
        assert!(std::fs::symlink_metadata(units_dir.join("hello.service")).is_err());
        assert!(std::fs::symlink_metadata(units_dir.join("other.service")).is_ok(), "not ours: kept");
    }
}
