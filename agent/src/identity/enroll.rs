//! Enrollment (the boot's phase 2): an Ed25519 key made on the node, a PKCS#10 CSR, and `POST /v1/enroll` with
//! the bootstrap token over server-authenticated TLS. The returned certificate is checked before
//! it is kept: signed by the plane CA we were given, valid now, naming exactly our node in its
//! URI SAN, carrying our public key. Key and certificate are stored 0600 in the state directory;
//! a later boot with a still-valid certificate there reuses it and never re-enrolls.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use ironroot_contract::wire::EnrollRequest;
use serde::{Deserialize, Serialize};
use x509_parser::pem::Pem;
use x509_parser::prelude::*;

use ironroot_contract::wire::{Identity, NodeId};

use crate::backoff::Backoff;
use crate::external::{self, Links};
use crate::plane::{PlaneClient, PlaneError, node_uri};
use crate::run_state::write_private;

/// A certificate with less than this left is renewed by enrolling again (needs a token).
const MIN_REMAINING: Duration = Duration::from_secs(10 * 60);

pub const KEY_FILE: &str = "node.key";
pub const CERT_FILE: &str = "node.crt";
pub const ENROLLMENT_FILE: &str = "enrollment.json";
/// Largest kept key, certificate chain or enrollment record read back (each is a few KiB).
const MAX_KEPT: u64 = 64 * 1024;

/// A node identity the plane issued and this node checked.
#[derive(Debug, Clone)]
pub struct EnrolledIdentity {
    pub node_id: NodeId,
    pub cert_path: PathBuf,
    pub key_path: PathBuf,
    /// Seconds since the epoch.
    pub not_after: i64,
    /// True when a certificate from an earlier boot was reused.
    pub reused: bool,
    pub client: PlaneClient,
}

#[derive(Debug, Serialize, Deserialize)]
struct Enrollment {
    node_id: NodeId,
    plane: String,
}

#[derive(Debug, thiserror::Error)]
pub enum EnrollError {
    #[error("no valid certificate in {dir} and no bootstrap token to enroll with")]
    NoToken { dir: PathBuf },
    #[error("generating the node key: {0}")]
    Key(String),
    #[error("enrollment")]
    Plane(#[from] PlaneError),
    #[error("the certificate the plane returned is refused: {0}")]
    Certificate(String),
    #[error("{op} {path}")]
    Io { op: &'static str, path: PathBuf, source: std::io::Error },
}

impl EnrollError {
    pub fn transient(&self) -> bool {
        matches!(self, Self::Plane(e) if e.transient())
    }
}

/// Which plane to enroll with, and what to tell it.
#[derive(Debug, Clone, Copy)]
pub struct EnrollWith<'a> {
    /// `https://host:port`.
    pub plane: &'a str,
    pub plane_ca_pem: &'a str,
    pub token: Option<&'a str>,
    pub identity: &'a Identity,
}

fn now() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs() as i64)
}

/// Reuses a still-valid identity from `state`, or enrolls with the token.
pub async fn enroll(
    settings: &EnrollWith<'_>,
    state: &Path,
    backoff: &Backoff,
) -> Result<EnrolledIdentity, EnrollError> {
    let io = |op, path: &Path| {
        let path = path.to_owned();
        move |source| EnrollError::Io { op, path, source }
    };
    std::fs::create_dir_all(state).map_err(io("creating", state))?;
    let (key_path, cert_path, record_path) = (state.join(KEY_FILE), state.join(CERT_FILE), state.join(ENROLLMENT_FILE));
    if let Some(identity) = reuse(settings, &key_path, &cert_path, &record_path) {
        return Ok(identity);
    }
    let token = settings.token.ok_or_else(|| EnrollError::NoToken { dir: state.to_owned() })?;
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519).map_err(|e| EnrollError::Key(e.to_string()))?;
    let csr = rcgen::CertificateParams::new(Vec::<String>::new())
        .and_then(|p| p.serialize_request(&key))
        .and_then(|r| r.pem())
        .map_err(|e| EnrollError::Key(e.to_string()))?;
    let anonymous = PlaneClient::anonymous(settings.plane, settings.plane_ca_pem)?;
    let req = EnrollRequest { token: token.to_owned(), csr, identity: settings.identity.clone() };
    let resp = backoff.run("enrollment", PlaneError::transient, || anonymous.enroll(&req)).await?;
    let not_after =
        check_certificate(&resp.certificate, settings.plane_ca_pem, resp.node_id.as_str(), key.public_key_raw(), now())
            .map_err(EnrollError::Certificate)?;
    let key_pem = key.serialize_pem();
    write_private(&key_path, key_pem.as_bytes()).map_err(io("writing", &key_path))?;
    write_private(&cert_path, resp.certificate.as_bytes()).map_err(io("writing", &cert_path))?;
    let record = Enrollment { node_id: resp.node_id.clone(), plane: settings.plane.to_owned() };
    let record_json = serde_json::to_vec_pretty(&record).unwrap_or_default();
    write_private(&record_path, &record_json).map_err(io("writing", &record_path))?;
    tracing::info!(node.id = %resp.node_id, "enrolled");
    let client = PlaneClient::with_identity(settings.plane, settings.plane_ca_pem, &resp.certificate, &key_pem)?;
    Ok(EnrolledIdentity { node_id: resp.node_id, cert_path, key_path, not_after, reused: false, client })
}

/// The identity kept from an earlier boot, if it still checks out against today's settings.
/// Nothing kept (a first boot) is silent; anything kept but unusable is logged, and the node
/// enrolls again.
fn reuse(settings: &EnrollWith<'_>, key_path: &Path, cert_path: &Path, record_path: &Path) -> Option<EnrolledIdentity> {
    // Files this agent wrote and replaces by rename: a symlink among them is not ours.
    let kept = |path: &Path| match external::read_if_present(path, MAX_KEPT, Links::Refuse) {
        Ok(Some(bytes)) => String::from_utf8(bytes).map(Some).map_err(|_| format!("{} is not UTF-8", path.display())),
        Ok(None) => Ok(None),
        Err(e) => Err(crate::exit::describe(&e)),
    };
    let read = [record_path, key_path, cert_path].map(kept);
    let [record, key_pem, cert_pem] = match read {
        [Ok(Some(record)), Ok(Some(key)), Ok(Some(cert))] => [record, key, cert],
        [Ok(None), ..] => return None,
        read => {
            let reason = read.into_iter().find_map(|r| r.err()).unwrap_or_else(|| "incomplete".to_owned());
            tracing::warn!(%reason, "kept identity is not usable; enrolling again");
            return None;
        }
    };
    let record: Enrollment = match serde_json::from_str(&record) {
        Ok(r) => r,
        Err(e) => {
            tracing::warn!(path = %record_path.display(), error = %e, "kept enrollment record is not usable; enrolling again");
            return None;
        }
    };
    if record.plane != settings.plane {
        tracing::info!(old = %record.plane, new = %settings.plane, "kept identity is for another plane; enrolling again");
        return None;
    }
    let key = rcgen::KeyPair::from_pem(&key_pem).ok()?;
    let remaining_from = now() + MIN_REMAINING.as_secs() as i64;
    match check_certificate(
        &cert_pem,
        settings.plane_ca_pem,
        record.node_id.as_str(),
        key.public_key_raw(),
        remaining_from,
    ) {
        Ok(not_after) => {
            let client = PlaneClient::with_identity(settings.plane, settings.plane_ca_pem, &cert_pem, &key_pem).ok()?;
            tracing::info!(node.id = %record.node_id, "reusing the certificate from an earlier boot");
            Some(EnrolledIdentity {
                node_id: record.node_id,
                cert_path: cert_path.to_owned(),
                key_path: key_path.to_owned(),
                not_after,
                reused: true,
                client,
            })
        }
        Err(reason) => {
            tracing::info!(%reason, "kept certificate is not usable; enrolling again");
            None
        }
    }
}

/// Checks the leaf of `chain_pem` against `ca_pem` as of `at`; returns its notAfter.
pub fn check_certificate(
    chain_pem: &str,
    ca_pem: &str,
    node_id: &str,
    public_key: &[u8],
    at: i64,
) -> Result<i64, String> {
    let leaf_pem = first_pem(chain_pem.as_bytes()).ok_or("no PEM certificate in the answer")?;
    let ca_pem = first_pem(ca_pem.as_bytes()).ok_or("the plane CA holds no PEM certificate")?;
    let (_, leaf) = X509Certificate::from_der(&leaf_pem.contents).map_err(|e| format!("not a certificate: {e}"))?;
    let (_, ca) = X509Certificate::from_der(&ca_pem.contents).map_err(|e| format!("plane CA: {e}"))?;
    if leaf.issuer() != ca.subject() {
        return Err(format!("issuer {} is not the plane CA {}", leaf.issuer(), ca.subject()));
    }
    leaf.verify_signature(Some(ca.public_key())).map_err(|e| format!("not signed by the plane CA: {e}"))?;
    let (from, until) = (leaf.validity().not_before.timestamp(), leaf.validity().not_after.timestamp());
    if at < from || at > until {
        return Err(format!("valid from {from} until {until}, not at {at}"));
    }
    let want = node_uri(node_id);
    let uris: Vec<&str> = leaf
        .subject_alternative_name()
        .ok()
        .flatten()
        .map(|san| {
            san.value
                .general_names
                .iter()
                .filter_map(|n| if let GeneralName::URI(u) = n { Some(*u) } else { None })
                .collect()
        })
        .unwrap_or_default();
    if uris != [want.as_str()] {
        return Err(format!("URI SANs {uris:?} are not exactly [{want}]"));
    }
    if leaf.public_key().subject_public_key.data.as_ref() != public_key {
        return Err("its public key is not this node's".into());
    }
    Ok(until)
}

fn first_pem(bytes: &[u8]) -> Option<Pem> {
    Pem::iter_from_buffer(bytes).next()?.ok()
}

#[cfg(test)]
mod tests {
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, PKCS_ED25519, SanType};

    use super::*;

    struct Ca {
        pem: String,
        issuer: Issuer<'static, KeyPair>,
    }

    fn ca(name: &str) -> Ca {
        let key = KeyPair::generate_for(&PKCS_ED25519).unwrap();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.distinguished_name.push(DnType::CommonName, name);
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        let pem = params.self_signed(&key).unwrap().pem();
        Ca { pem, issuer: Issuer::new(params, key) }
    }

    fn leaf(ca: &Ca, key: &KeyPair, uris: &[&str], valid: std::ops::Range<i64>) -> String {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.subject_alt_names = uris.iter().map(|u| SanType::URI((*u).try_into().unwrap())).collect();
        params.not_before = ::time::OffsetDateTime::from_unix_timestamp(valid.start).unwrap();
        params.not_after = ::time::OffsetDateTime::from_unix_timestamp(valid.end).unwrap();
        format!("{}{}", params.signed_by(key, &ca.issuer).unwrap().pem(), ca.pem)
    }

    #[test]
    fn the_returned_certificate_is_checked_before_it_is_kept() {
        let (plane, rogue) = (ca("plane"), ca("rogue"));
        let ours = KeyPair::generate_for(&PKCS_ED25519).unwrap();
        let theirs = KeyPair::generate_for(&PKCS_ED25519).unwrap();
        let t = now();
        let day = t - 10..t + 86_400;
        let uri = "urn:ironroot:node:n1";
        let check = |chain: &str| check_certificate(chain, &plane.pem, "n1", ours.public_key_raw(), t);

        assert_eq!(check(&leaf(&plane, &ours, &[uri], day.clone())), Ok(t + 86_400));
        let cases = [
            (leaf(&rogue, &ours, &[uri], day.clone()), "is not the plane CA"),
            (leaf(&plane, &ours, &[uri], t - 100..t - 10), "not at"),
            (leaf(&plane, &ours, &[uri], t + 100..t + 200), "not at"),
            (leaf(&plane, &ours, &["urn:ironroot:node:n2"], day.clone()), "are not exactly"),
            (leaf(&plane, &ours, &[uri, "urn:ironroot:operator:x"], day.clone()), "are not exactly"),
            (leaf(&plane, &theirs, &[uri], day.clone()), "public key is not this node's"),
            ("not pem".to_owned(), "no PEM certificate"),
        ];
        for (chain, needle) in cases {
            let err = check(&chain).unwrap_err();
            assert!(err.contains(needle), "{needle:?} not in {err:?}");
        }
    }
}
