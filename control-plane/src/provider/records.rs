//! What provisioning writes to the plane's database: the node (created in `provisioning`, or a
//! terminated node of the same name brought back), its single-use bootstrap token, and the
//! journal records of what the provider ran or would run (`provider.start`, `provider.stop`,
//! `provider.exited`, `provider.failed`). The node and its token are one transaction: a refused
//! provisioning leaves neither.

use rusqlite::{OptionalExtension as _, params};
use sha2::{Digest as _, Sha256};

use crate::audit;
use crate::lifecycle::NodeState;
use crate::store::{Refusal, Store, now, secs};

/// A provisioned node: its id and the bootstrap token its machine enrolls with (shown once).
#[derive(Debug)]
pub struct ProvisionedNode {
    pub id: String,
    pub token: String,
}

impl Store {
    /// Creates node `name` in `provisioning` and a single-use bootstrap token bound to the name
    /// (and `template`, which its enrollment assigns). A terminated node of that name is brought
    /// back (same id); any other node of that name is refused (409 `node_exists`).
    pub(crate) fn provision_node(
        &self,
        name: &str,
        template: Option<&str>,
        shape: &serde_json::Value,
        actor: &str,
    ) -> Result<ProvisionedNode, Refusal> {
        let conn = self.conn();
        let tx = conn.unchecked_transaction()?;
        if let Some(template) = template {
            let known: Option<String> =
                tx.query_row("SELECT name FROM templates WHERE name = ?1", [template], |r| r.get(0)).optional()?;
            if known.is_none() {
                return Err(Refusal::new(400, "unknown_template", format!("no template {template:?}")));
            }
        }
        let t = now();
        let existing: Option<(String, String)> = tx
            .query_row("SELECT id, state FROM nodes WHERE name = ?1 ORDER BY created_at DESC LIMIT 1", [name], |r| {
                Ok((r.get(0)?, r.get(1)?))
            })
            .optional()?;
        let id = match existing {
            Some((id, state)) if state == NodeState::Terminated.to_string() => {
                Self::transition(&tx, &id, NodeState::Provisioning, actor, "provisioned again")?;
                id
            }
            Some((id, state)) => {
                return Err(Refusal::new(
                    409,
                    "node_exists",
                    format!("node {name:?} ({id}) is {state}; terminate it first"),
                ));
            }
            None => {
                let id = format!("n-{}", hex::encode(rand::random::<[u8; 8]>()));
                tx.execute(
                    "INSERT INTO nodes (id, name, state, created_at) VALUES (?1, ?2, 'no_instance', ?3)",
                    params![id, name, t],
                )?;
                Self::transition(&tx, &id, NodeState::Provisioning, actor, "provisioned")?;
                id
            }
        };
        // The same form as `token create`: random, stored only as its SHA-256, single use.
        let token = format!("irt_{}", hex::encode(rand::random::<[u8; 24]>()));
        let hash = hex::encode(Sha256::digest(token.as_bytes()));
        let ttl = self.settings.token_ttl;
        let expires = t.saturating_add(secs(ttl));
        tx.execute(
            "INSERT INTO tokens (hash, created_at, expires_at, node_name, template) VALUES (?1, ?2, ?3, ?4, ?5)",
            params![hash, t, expires, name, template],
        )?;
        let data = serde_json::json!({"ttl_s": ttl.as_secs(), "node": name, "template": template, "for": "provision"});
        audit::append(&tx, t, actor, "token.create", &hash[..16], &data)?;
        let data = serde_json::json!({"name": name, "template": template, "machine": shape});
        audit::append(&tx, t, actor, "node.provision", &id, &data)?;
        tx.commit()?;
        Ok(ProvisionedNode { id, token })
    }

    /// Journals what the provider did (or, recording, would have done) to node `subject`.
    pub(crate) fn journal_provider(
        &self,
        actor: &str,
        kind: &str,
        subject: &str,
        data: &serde_json::Value,
    ) -> Result<(), Refusal> {
        let conn = self.conn();
        let tx = conn.unchecked_transaction()?;
        audit::append(&tx, now(), actor, kind, subject, data)?;
        tx.commit()?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::Settings;

    fn store(dir: &std::path::Path) -> Store {
        let ca = crate::ca::Authority::open_or_create(dir).unwrap();
        Store::open(&dir.join("plane.db"), ca, Settings::standard()).unwrap()
    }

    #[test]
    fn a_name_is_provisioned_once_until_it_is_terminated() {
        let dir = tempfile::tempdir().unwrap();
        let s = store(dir.path());
        let shape = serde_json::json!({});
        let first = s.provision_node("n1", None, &shape, "operator:admin").unwrap();
        assert_eq!(s.node("n1").unwrap().state, "provisioning");
        let again = s.provision_node("n1", None, &shape, "operator:admin").unwrap_err();
        assert_eq!((again.status, again.code), (409, "node_exists"));
        let unknown = s.provision_node("n2", Some("nope"), &shape, "operator:admin").unwrap_err();
        assert_eq!((unknown.status, unknown.code), (400, "unknown_template"));
        assert!(s.node("n2").is_err(), "a refused provisioning creates nothing");

        s.revoke(&first.id, "operator:admin").unwrap();
        let back = s.provision_node("n1", None, &shape, "operator:admin").unwrap();
        assert_eq!(back.id, first.id, "a terminated node comes back as itself");
        assert_ne!(back.token, first.token);
        assert_eq!(s.node("n1").unwrap().state, "provisioning");
    }
}
