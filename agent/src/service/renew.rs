//! Certificate renewal, carried out: a new Ed25519 key, a CSR, `POST /v1/nodes/{id}/renew`
//! with the current certificate, the answer checked as enrollment checks it (the plane CA, our
//! node id, our new key, valid now), a client built from the new pair, and only then the files
//! replaced (each by rename). The old key is kept as `node.key.previous` until both files are
//! in place, so a crash between the two renames is repaired at the next start.

use std::path::{Path, PathBuf};

use ironroot_contract::run_state::BootRecord;
use ironroot_contract::wire::RenewRequest;
use x509_parser::prelude::*;

use crate::external::{self, Links};
use crate::identity::enroll::check_certificate;
use crate::plane::PlaneClient;
use crate::run_state::write_private;

const MAX_FILE: u64 = 64 * 1024;

fn read(p: &Path) -> Result<String, String> {
    let bytes = external::read(p, MAX_FILE, Links::Refuse).map_err(|e| crate::exit::describe(&e))?;
    String::from_utf8(bytes).map_err(|_| format!("{} is not UTF-8 PEM", p.display()))
}

fn previous(key: &Path) -> PathBuf {
    let mut name = key.as_os_str().to_owned();
    name.push(".previous");
    PathBuf::from(name)
}

fn now() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs() as i64)
}

/// The certificate's notBefore and notAfter (seconds since the epoch).
pub fn validity(cert_pem: &str) -> Option<(i64, i64)> {
    let pem = x509_parser::pem::Pem::iter_from_buffer(cert_pem.as_bytes()).next()?.ok()?;
    let (_, cert) = X509Certificate::from_der(&pem.contents).ok()?;
    Some((cert.validity().not_before.timestamp(), cert.validity().not_after.timestamp()))
}

/// Whether `key_pem` is the key of `cert_pem`.
fn matches(cert_pem: &str, key_pem: &str) -> bool {
    let Ok(key) = rcgen::KeyPair::from_pem(key_pem) else { return false };
    let Some(Ok(pem)) = x509_parser::pem::Pem::iter_from_buffer(cert_pem.as_bytes()).next() else { return false };
    X509Certificate::from_der(&pem.contents)
        .is_ok_and(|(_, c)| c.public_key().subject_public_key.data.as_ref() == key.public_key_raw())
}

/// After a crash mid-swap (new key, old certificate), puts the previous key back.
pub fn repair(record: &BootRecord) {
    repair_files(&record.certificate, &record.key);
}

fn repair_files(certificate: &Path, key_path: &Path) {
    let prev = previous(key_path);
    let (Ok(cert), Ok(key)) = (read(certificate), read(key_path)) else { return };
    if !matches(&cert, &key) && read(&prev).is_ok_and(|old| matches(&cert, &old)) {
        tracing::warn!("a renewal was interrupted between its renames: the previous key is put back");
        let _ = std::fs::rename(&prev, key_path);
    } else if prev.exists() {
        let _ = std::fs::remove_file(&prev);
    }
}

/// Renews the node certificate; returns a client with the new identity and its notAfter.
pub async fn renew(record: &BootRecord, client: &PlaneClient) -> Result<(PlaneClient, u64), String> {
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519).map_err(|e| format!("new key: {e}"))?;
    let csr = rcgen::CertificateParams::new(Vec::<String>::new())
        .and_then(|p| p.serialize_request(&key))
        .and_then(|r| r.pem())
        .map_err(|e| format!("CSR: {e}"))?;
    let answer = client.renew(&record.node_id, &RenewRequest { csr }).await.map_err(|e| crate::exit::describe(&e))?;
    let ca = read(&record.plane_ca)?;
    let not_after = check_certificate(&answer.certificate, &ca, record.node_id.as_str(), key.public_key_raw(), now())
        .map_err(|e| format!("the renewed certificate is refused: {e}"))?;
    let key_pem = key.serialize_pem();
    let renewed = PlaneClient::with_identity(&record.plane, &ca, &answer.certificate, &key_pem)
        .map_err(|e| format!("the renewed identity is not usable: {}", crate::exit::describe(&e)))?;
    let prev = previous(&record.key);
    let _ = std::fs::remove_file(&prev);
    std::fs::hard_link(&record.key, &prev).map_err(|e| format!("keeping the previous key: {e}"))?;
    write_private(&record.key, key_pem.as_bytes()).map_err(|e| format!("writing {}: {e}", record.key.display()))?;
    write_private(&record.certificate, answer.certificate.as_bytes())
        .map_err(|e| format!("writing {}: {e}", record.certificate.display()))?;
    let _ = std::fs::remove_file(&prev);
    tracing::info!(not_after, "certificate renewed");
    Ok((renewed, u64::try_from(not_after).unwrap_or(0)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pair() -> (String, String) {
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519).unwrap();
        let cert = rcgen::CertificateParams::new(vec!["n-1".to_owned()]).unwrap().self_signed(&key).unwrap();
        (key.serialize_pem(), cert.pem())
    }

    /// Writes the node's files: `key`, the certificate `cert`, and `previous` if any.
    fn files(dir: &Path, key: &str, cert: &str, prev: Option<&str>) -> (PathBuf, PathBuf) {
        let (k, c) = (dir.join("node.key"), dir.join("node.crt"));
        std::fs::write(&k, key).unwrap();
        std::fs::write(&c, cert).unwrap();
        let _ = std::fs::remove_file(previous(&k));
        if let Some(p) = prev {
            std::fs::write(previous(&k), p).unwrap();
        }
        (k, c)
    }

    #[test]
    fn a_swap_cut_between_its_renames_gets_the_previous_key_back_and_anything_else_is_left() {
        let dir = tempfile::tempdir().unwrap();
        let ((old_key, old_cert), (new_key, new_cert)) = (pair(), pair());
        // The new key is in place, the certificate still the old one: the old key goes back.
        let (k, c) = files(dir.path(), &new_key, &old_cert, Some(&old_key));
        repair_files(&c, &k);
        assert_eq!(std::fs::read_to_string(&k).unwrap(), old_key);
        assert!(!previous(&k).exists());
        // Both renames done: the leftover previous key goes, the new pair stays.
        let (k, c) = files(dir.path(), &new_key, &new_cert, Some(&old_key));
        repair_files(&c, &k);
        assert_eq!(std::fs::read_to_string(&k).unwrap(), new_key);
        assert!(!previous(&k).exists());
        // A mismatch the previous key does not explain is not "repaired" with it.
        let (_, other_cert) = pair();
        let (k, c) = files(dir.path(), &new_key, &other_cert, Some(&old_key));
        repair_files(&c, &k);
        assert_eq!(std::fs::read_to_string(&k).unwrap(), new_key, "the key is not swapped for one that does not fit");
        // Nothing interrupted: nothing changes.
        let (k, c) = files(dir.path(), &old_key, &old_cert, None);
        repair_files(&c, &k);
        assert_eq!(std::fs::read_to_string(&k).unwrap(), old_key);
    }
}
