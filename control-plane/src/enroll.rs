//! Bootstrap tokens, enrollment, renewal, revocation and re-provisioning, and who may call a
//! node endpoint. Tokens are random, stored only as SHA-256, single-use and short-lived, and
//! may be bound to an expected identity. Enrollment issues a certificate whose only identity is
//! the node id from the enrollment record.

use ironroot_contract::wire::{EnrollRequest, EnrollResponse, Identity, NodeAuditRecord};
use rusqlite::{OptionalExtension as _, params};
use sha2::{Digest as _, Sha256};

use crate::audit;
use crate::ca::Peer;
use crate::lifecycle::{self, NodeState};
use crate::store::{Refusal, Store, now, secs};

/// Identity fields longer than this are refused (names, MACs and UUIDs are far shorter).
const MAX_IDENTITY_FIELD: usize = 256;
/// Longest a bootstrap token may live: it is a secret that enrolls a machine.
pub const MAX_TOKEN_TTL: std::time::Duration = std::time::Duration::from_secs(30 * 86_400);
/// Node-submitted journal records are kept under this prefix, apart from the plane's own kinds.
pub const NODE_RECORD_PREFIX: &str = "node-journal.";

fn token_hash(token: &str) -> String {
    hex::encode(Sha256::digest(token.as_bytes()))
}

#[derive(Debug, Clone, Default)]
pub struct TokenBinding {
    pub node_name: Option<String>,
    pub mac: Option<String>,
    pub smbios_uuid: Option<String>,
    /// The template the enrolled node starts on, so its first boot already has modules.
    pub template: Option<String>,
}

fn check_identity(id: &Identity) -> Result<(), Refusal> {
    for (field, v) in [("name", &id.name), ("mac", &id.mac), ("smbios_uuid", &id.smbios_uuid), ("serial", &id.serial)] {
        if let Some(v) = v
            && (v.len() > MAX_IDENTITY_FIELD || v.chars().any(char::is_control))
        {
            return Err(Refusal::new(
                400,
                "bad_identity",
                format!("identity {field} is too long or has control characters"),
            ));
        }
    }
    Ok(())
}

fn same(a: &str, b: &str) -> bool {
    a.eq_ignore_ascii_case(b)
}

impl Store {
    /// Creates a bootstrap token; returns the token (shown once, stored hashed).
    pub fn create_token(
        &self,
        ttl: Option<std::time::Duration>,
        bind: &TokenBinding,
        actor: &str,
    ) -> Result<String, Refusal> {
        let ttl = ttl.unwrap_or(self.settings.token_ttl);
        if ttl.is_zero() || ttl > MAX_TOKEN_TTL {
            return Err(Refusal::new(
                400,
                "bad_ttl",
                format!("token TTL must be 1 s to {} days", MAX_TOKEN_TTL.as_secs() / 86_400),
            ));
        }
        for (field, v) in [("node", &bind.node_name), ("mac", &bind.mac), ("smbios_uuid", &bind.smbios_uuid)] {
            if let Some(v) = v
                && (v.is_empty() || v.len() > MAX_IDENTITY_FIELD || v.chars().any(char::is_control))
            {
                return Err(Refusal::new(
                    400,
                    "bad_identity",
                    format!("token {field} is empty, too long or has control characters"),
                ));
            }
        }
        let token = format!("irt_{}", hex::encode(rand::random::<[u8; 24]>()));
        let conn = self.conn();
        let tx = conn.unchecked_transaction()?;
        let t = now();
        let expires =
            t.checked_add(secs(ttl)).ok_or_else(|| Refusal::new(400, "bad_ttl", "token TTL overflows the clock"))?;
        if let Some(template) = &bind.template {
            let known: Option<String> =
                tx.query_row("SELECT name FROM templates WHERE name = ?1", [template], |r| r.get(0)).optional()?;
            if known.is_none() {
                return Err(Refusal::new(404, "unknown_template", format!("no template {template:?}")));
            }
        }
        tx.execute(
            "INSERT INTO tokens (hash, created_at, expires_at, node_name, bound_mac, bound_uuid, template) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
            params![token_hash(&token), t, expires, bind.node_name, bind.mac, bind.smbios_uuid, bind.template],
        )?;
        let data = serde_json::json!({"ttl_s": ttl.as_secs(), "node": bind.node_name, "mac": bind.mac, "smbios_uuid": bind.smbios_uuid, "template": bind.template});
        audit::append(&tx, t, actor, "token.create", &token_hash(&token)[..16], &data)?;
        tx.commit()?;
        Ok(token)
    }

    /// `POST /v1/enroll`. On refusal the caller journals it (`journal_refusal`).
    pub fn enroll(&self, req: &EnrollRequest, remote: &str) -> Result<EnrollResponse, Refusal> {
        check_identity(&req.identity)?;
        let conn = self.conn();
        let tx = conn.unchecked_transaction()?;
        let t = now();
        let hash = token_hash(&req.token);
        type Row = (i64, Option<i64>, Option<String>, Option<String>, Option<String>, Option<String>);
        let row: Option<Row> = tx
            .query_row(
                "SELECT expires_at, used_at, node_name, bound_mac, bound_uuid, template FROM tokens WHERE hash = ?1",
                [&hash],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?, r.get(5)?)),
            )
            .optional()?;
        let Some((expires_at, used_at, bound_name, bound_mac, bound_uuid, template)) = row else {
            return Err(Refusal::new(401, "token_unknown", "bootstrap token is not known"));
        };
        if used_at.is_some() {
            return Err(Refusal::new(401, "token_used", "bootstrap token was already used"));
        }
        if expires_at <= t {
            return Err(Refusal::new(401, "token_expired", "bootstrap token has expired"));
        }
        for (field, bound, claimed) in [
            ("name", &bound_name, &req.identity.name),
            ("mac", &bound_mac, &req.identity.mac),
            ("smbios_uuid", &bound_uuid, &req.identity.smbios_uuid),
        ] {
            if let Some(bound) = bound
                && !claimed.as_deref().is_some_and(|c| same(c, bound))
            {
                return Err(Refusal::new(403, "identity_mismatch", format!("token is bound to another {field}")));
            }
        }
        let name = bound_name.or_else(|| req.identity.name.clone());
        let existing: Option<(String, String, i64)> = match &name {
            Some(n) => tx
                .query_row(
                    "SELECT id, state, may_reenroll FROM nodes WHERE name = ?1 ORDER BY created_at DESC LIMIT 1",
                    [n],
                    |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
                )
                .optional()?,
            None => None,
        };
        let node_id = match &existing {
            Some((id, state, may)) => {
                let state: NodeState = state.parse().map_err(|e: String| Refusal::new(500, "internal", e))?;
                if lifecycle::is_active(state) && state != NodeState::Provisioning && *may == 0 {
                    return Err(Refusal::new(
                        409,
                        "already_enrolled",
                        format!("node {id} ({state}) is active; re-provision it first"),
                    ));
                }
                id.clone()
            }
            None => format!("n-{}", hex::encode(rand::random::<[u8; 8]>())),
        };
        let issued = self.ca.issue_node(&node_id, &req.csr, self.settings.cert_ttl).map_err(|e| {
            tracing::error!(error = %e, "issuing a node certificate");
            Refusal::new(500, "internal", "the plane could not issue a certificate")
        })?;
        let (chain, serial, not_after) = issued.map_err(|e| Refusal::new(400, "bad_csr", e.to_string()))?;
        // Single use, even under concurrent enrollments: only one UPDATE can see used_at NULL.
        if tx.execute("UPDATE tokens SET used_at = ?1 WHERE hash = ?2 AND used_at IS NULL", params![t, hash])? != 1 {
            return Err(Refusal::new(401, "token_used", "bootstrap token was already used"));
        }
        let actor = format!("node:{node_id}");
        if existing.is_none() {
            tx.execute(
                "INSERT INTO nodes (id, name, mac, smbios_uuid, serial, state, created_at) VALUES (?1, ?2, ?3, ?4, ?5, 'no_instance', ?6)",
                params![node_id, name, req.identity.mac, req.identity.smbios_uuid, req.identity.serial, t],
            )?;
            Self::transition(&tx, &node_id, NodeState::Provisioning, &actor, "enrollment")?;
        } else {
            tx.execute("UPDATE certs SET revoked = 1 WHERE node_id = ?1", [&node_id])?;
            tx.execute("UPDATE nodes SET may_reenroll = 0, revoked = 0 WHERE id = ?1", [&node_id])?;
            Self::transition(&tx, &node_id, NodeState::Provisioning, &actor, "re-enrollment")?;
        }
        Self::transition(&tx, &node_id, NodeState::Bootstrapping, &actor, "enrolled")?;
        if let Some(template) = &template {
            crate::rollout::join(&tx, &node_id, template)?;
        }
        tx.execute(
            "INSERT INTO certs (serial, node_id, not_after) VALUES (?1, ?2, ?3)",
            params![serial, node_id, not_after as i64],
        )?;
        let data = serde_json::json!({"remote": remote, "identity": req.identity, "certificate_serial": serial, "token": &hash[..16]});
        audit::append(&tx, t, &actor, "enroll.accepted", &node_id, &data)?;
        tx.commit()?;
        Ok(EnrollResponse { node_id: crate::store::wire_id(&node_id)?, certificate: chain })
    }

    /// Whether `peer` may act on node `path_id`: a node certificate for exactly that node,
    /// issued by us, not revoked, for a node that is not revoked.
    pub fn authorize_node(&self, peer: Option<&Peer>, path_id: &str) -> Result<(), Refusal> {
        let (id, serial) = match peer {
            Some(Peer::Node { id, serial }) => (id, serial),
            Some(Peer::Operator { .. }) => {
                return Err(Refusal::new(
                    403,
                    "wrong_certificate_kind",
                    "an operator certificate cannot act as a node",
                ));
            }
            None => {
                return Err(Refusal::new(401, "no_client_certificate", "a node client certificate is required"));
            }
        };
        if id != path_id {
            return Err(Refusal::new(403, "wrong_node", format!("certificate is for node {id}, not {path_id}")));
        }
        let conn = self.conn();
        let row: Option<(i64, i64)> = conn
            .query_row(
                "SELECT c.revoked, n.revoked FROM certs c JOIN nodes n ON n.id = c.node_id WHERE c.serial = ?1 AND c.node_id = ?2",
                params![serial, id],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .optional()?;
        match row {
            None => Err(Refusal::new(403, "unknown_certificate", "certificate was not issued for this node")),
            Some((c, n)) if c != 0 || n != 0 => Err(Refusal::new(403, "revoked", "certificate has been revoked")),
            Some(_) => Ok(()),
        }
    }

    /// `POST /v1/nodes/{id}/renew`: a new certificate for the node's new key (the caller has
    /// already been authorized with its current certificate).
    pub fn renew(&self, node_id: &str, csr: &str) -> Result<String, Refusal> {
        let issued = self.ca.issue_node(node_id, csr, self.settings.cert_ttl).map_err(|e| {
            tracing::error!(error = %e, "issuing a node certificate");
            Refusal::new(500, "internal", "the plane could not issue a certificate")
        })?;
        let (chain, serial, not_after) = issued.map_err(|e| Refusal::new(400, "bad_csr", e.to_string()))?;
        let conn = self.conn();
        let tx = conn.unchecked_transaction()?;
        tx.execute(
            "INSERT INTO certs (serial, node_id, not_after) VALUES (?1, ?2, ?3)",
            params![serial, node_id, not_after as i64],
        )?;
        audit::append(
            &tx,
            now(),
            &format!("node:{node_id}"),
            "cert.renew",
            node_id,
            &serde_json::json!({"serial": serial}),
        )?;
        tx.commit()?;
        Ok(chain)
    }

    /// Revokes every certificate of a node at once and terminates it.
    pub fn revoke(&self, node_id: &str, actor: &str) -> Result<(), Refusal> {
        let conn = self.conn();
        let tx = conn.unchecked_transaction()?;
        Self::node_state(&tx, node_id)?;
        tx.execute("UPDATE nodes SET revoked = 1 WHERE id = ?1", [node_id])?;
        let n = tx.execute("UPDATE certs SET revoked = 1 WHERE node_id = ?1", [node_id])?;
        audit::append(&tx, now(), actor, "node.revoke", node_id, &serde_json::json!({"certificates": n}))?;
        Self::transition(&tx, node_id, NodeState::Terminated, actor, "revoked")?;
        tx.commit()?;
        Ok(())
    }

    /// Lets a node enroll again (with a new token): old certificates stop working.
    pub fn reprovision(&self, node_id: &str, actor: &str) -> Result<(), Refusal> {
        let conn = self.conn();
        let tx = conn.unchecked_transaction()?;
        let state = Self::node_state(&tx, node_id)?;
        tx.execute("UPDATE nodes SET may_reenroll = 1 WHERE id = ?1", [node_id])?;
        tx.execute("UPDATE certs SET revoked = 1 WHERE node_id = ?1", [node_id])?;
        audit::append(&tx, now(), actor, "node.reprovision", node_id, &serde_json::json!({"was": state.to_string()}))?;
        tx.commit()?;
        Ok(())
    }

    /// Appends a node's audit records to the journal (kind `node-journal.<kind>`: a node's own
    /// record never looks like one of the plane's), skipping sequence numbers already seen.
    /// Every record is checked before any is written (a `receipt` record must carry a receipt,
    /// which is also kept in the receipts table). Returns how many were new.
    pub fn node_audit(&self, node_id: &str, records: &[NodeAuditRecord]) -> Result<usize, Refusal> {
        let mut receipts = Vec::with_capacity(records.len());
        for r in records {
            r.validate().map_err(|e| Refusal::new(400, "bad_audit", e.to_string()))?;
            receipts.push(crate::receipts::parse(r)?);
        }
        let conn = self.conn();
        let tx = conn.unchecked_transaction()?;
        let mut added = 0;
        for (r, receipt) in records.iter().zip(&receipts) {
            let seq =
                i64::try_from(r.seq).map_err(|_| Refusal::new(400, "bad_audit", "sequence number out of range"))?;
            if tx.execute(
                "INSERT OR IGNORE INTO node_audit_seen (node_id, seq) VALUES (?1, ?2)",
                params![node_id, seq],
            )? == 1
            {
                let data = serde_json::json!({"seq": r.seq, "node_time": r.time, "data": r.data});
                let kind = format!("{NODE_RECORD_PREFIX}{}", r.kind);
                audit::append(&tx, now(), &format!("node:{node_id}"), &kind, node_id, &data)?;
                if let Some(receipt) = receipt {
                    crate::receipts::keep(&tx, node_id, seq, receipt)?;
                }
                added += 1;
            }
        }
        tx.commit()?;
        Ok(added)
    }
}
