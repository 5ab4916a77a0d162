//! Staging, attaching, restoring and detaching live modules: the mount swap
//! ([`crate::root::extension`]) and the units that go with it ([`super::units`]), in the order
//! that keeps a module whole — a new version is mounted before its units are linked and
//! restarted; a removed one's units are stopped before it is unmounted.

use super::Runner;
use super::units;
use crate::root::extension::{self, source_name};
use crate::service::rollout::ModuleInfo;
use crate::service::systemd::UnitOp;

/// Lets go of `module`'s EROFS layer (its version is no longer live).
pub fn release_layer(run_dir: &std::path::Path, module: &ModuleInfo) {
    extension::release_layer(run_dir, &module.digest);
}

fn mount_point(m: &ModuleInfo) -> Result<&str, String> {
    m.mount_point.as_deref().ok_or_else(|| format!("{} is not a live module", m.name))
}

impl Runner {
    fn is_live(&self, m: &ModuleInfo) -> bool {
        let Ok(point) = mount_point(m) else { return false };
        let path = self.root.join(point.trim_start_matches('/'));
        extension::live_source(&path).is_some_and(|s| s == source_name(&m.name, &m.composefs))
    }

    /// Mounts `to` detached: nothing is visible until the attach.
    pub(super) async fn stage(&self, txn: &str, to: &ModuleInfo) -> Result<(), String> {
        mount_point(to)?;
        if self.is_live(to) {
            return Ok(());
        }
        let v = self.verified(to).await?;
        let store = self.store()?;
        let prepared = tokio::task::block_in_place(|| extension::prepare(&v, store, &self.run_dir))
            .map_err(|e| crate::exit::describe(&e))?;
        self.staged.lock().unwrap_or_else(|e| e.into_inner()).insert(txn.to_owned(), prepared);
        Ok(())
    }

    /// Swaps `to` in (or finds it already live), links its units, reloads systemd and starts
    /// them — restarts them when this is an update. Returns the units it (re)started.
    pub(super) async fn attach(
        &self,
        txn: &str,
        to: &ModuleInfo,
        from: Option<&ModuleInfo>,
    ) -> Result<Vec<String>, String> {
        let point = mount_point(to)?;
        let staged = self.staged.lock().unwrap_or_else(|e| e.into_inner()).remove(txn);
        let already = self.is_live(to);
        if !already {
            let prepared = staged.ok_or("the staged mount is gone (the agent restarted?)")?;
            tokio::task::block_in_place(|| extension::attach(prepared, &self.root, point))
                .map_err(|e| crate::exit::describe(&e))?;
        }
        self.put_units(to, from, !already || from.is_some()).await
    }

    /// Links `to`'s units (dropping `from`'s that `to` no longer has, stopped first), reloads
    /// and (re)starts them.
    async fn put_units(
        &self,
        to: &ModuleInfo,
        from: Option<&ModuleInfo>,
        restart: bool,
    ) -> Result<Vec<String>, String> {
        let systemd = self.systemd().await.map_err(|e| crate::exit::describe(&e))?;
        if let Some(from) = from {
            let gone: Vec<String> = from.units.iter().filter(|u| !to.units.contains(u)).cloned().collect();
            for unit in &gone {
                systemd.apply(unit, UnitOp::Stop).await.map_err(|e| crate::exit::describe(&e))?;
            }
            units::unlink(&self.root, &self.units_dir, from, &gone)?;
        }
        units::link(&self.root, &self.units_dir, to)?;
        systemd.reload().await.map_err(|e| crate::exit::describe(&e))?;
        let op = if restart { UnitOp::Restart } else { UnitOp::Start };
        for unit in &to.units {
            systemd.apply(unit, op).await.map_err(|e| crate::exit::describe(&e))?;
        }
        Ok(to.units.clone())
    }

    /// Makes `from` the live version again (units restarted), or removes `to` when there was
    /// no version before it.
    pub(super) async fn restore(&self, txn: &str, to: &ModuleInfo, from: Option<&ModuleInfo>) -> Result<(), String> {
        self.staged.lock().unwrap_or_else(|e| e.into_inner()).remove(txn);
        let Some(from) = from else {
            if self.is_live(to) {
                self.detach(to).await?;
            }
            return Ok(());
        };
        if !self.is_live(from) {
            self.stage(txn, from).await?;
            let prepared = self.staged.lock().unwrap_or_else(|e| e.into_inner()).remove(txn);
            if let Some(prepared) = prepared {
                let point = mount_point(from)?;
                tokio::task::block_in_place(|| extension::attach(prepared, &self.root, point))
                    .map_err(|e| crate::exit::describe(&e))?;
            }
        }
        self.put_units(from, Some(to), true).await?;
        if to.digest != from.digest {
            release_layer(&self.run_dir, to);
        }
        Ok(())
    }

    /// Stops `module`'s units, unlinks them and unmounts it. A mount still in use is reported
    /// and the units started again: the module stays whole.
    pub(super) async fn detach(&self, module: &ModuleInfo) -> Result<Vec<String>, String> {
        let point = mount_point(module)?;
        let systemd = self.systemd().await.map_err(|e| crate::exit::describe(&e))?;
        for unit in &module.units {
            systemd.apply(unit, UnitOp::Stop).await.map_err(|e| crate::exit::describe(&e))?;
        }
        if let Err(e) = tokio::task::block_in_place(|| extension::detach(&self.root, point)) {
            for unit in &module.units {
                let _ = systemd.apply(unit, UnitOp::Start).await;
            }
            return Err(crate::exit::describe(&e));
        }
        units::unlink(&self.root, &self.units_dir, module, &module.units)?;
        systemd.reload().await.map_err(|e| crate::exit::describe(&e))?;
        release_layer(&self.run_dir, module);
        Ok(module.units.clone())
    }
}
