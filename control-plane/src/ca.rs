//! The plane's certificate authority: created on first start in the state directory (or given),
//! it issues the server certificate, operator certificates and node client certificates.
//!
//! Node certificates carry only what the enrollment record allows: the SAN URI
//! `urn:ironroot:node:<id>`, client-auth EKU, a short validity. A CSR contributes its public key
//! and nothing else — every name, extension and role it asks for is ignored.

use std::path::{Path, PathBuf};
use std::time::Duration;

use ironroot_contract::wire::{NODE_URI_PREFIX, OPERATOR_URI_PREFIX};
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, PublicKeyData, SanType, SerialNumber, SignatureAlgorithm,
};
use x509_parser::prelude::{FromDer, X509Certificate};

/// Backdating covers clock skew between the plane and freshly booted nodes: 5 minutes, or a
/// tenth of a short lifetime (nodes renew at 60–75 % of notBefore→notAfter, so a backdate
/// that dwarfs the lifetime would have them renew at once).
const BACKDATE: Duration = Duration::from_secs(300);
/// The CA and server certificates live long; they are replaced by re-creating the state dir.
const CA_VALIDITY: Duration = Duration::from_secs(10 * 365 * 86_400);
const OPERATOR_VALIDITY: Duration = Duration::from_secs(365 * 86_400);
/// Longest a node certificate may be issued for: nodes renew, and a stolen one should expire.
pub const MAX_NODE_CERT_TTL: Duration = Duration::from_secs(365 * 86_400);

#[derive(Debug, thiserror::Error)]
pub enum CaError {
    #[error("{op} {path}")]
    Io { op: &'static str, path: PathBuf, source: std::io::Error },
    #[error("certificate material in {path} is not usable: {reason}")]
    Material { path: PathBuf, reason: String },
    #[error("issuing a certificate: {0}")]
    Issue(String),
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CsrError {
    #[error("CSR is not PEM-encoded PKCS#10")]
    NotPem,
    #[error("CSR does not parse as PKCS#10")]
    Malformed,
    #[error("CSR self-signature does not verify")]
    BadSignature,
    #[error("CSR key type {0} is not accepted (only Ed25519 and ECDSA P-256)")]
    KeyType(String),
}

/// What a peer certificate says about who is calling.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Peer {
    Node { id: String, serial: String },
    Operator { name: String },
}

/// A CSR's public key, the only thing taken from a CSR.
struct CsrKey {
    raw: Vec<u8>,
    alg: &'static SignatureAlgorithm,
}

impl PublicKeyData for CsrKey {
    fn der_bytes(&self) -> &[u8] {
        &self.raw
    }
    fn algorithm(&self) -> &'static SignatureAlgorithm {
        self.alg
    }
}

/// Parses a PEM CSR, checks its self-signature and key type, and returns its public key.
fn csr_key(pem: &str) -> Result<CsrKey, CsrError> {
    let der =
        rustls_pki_types::CertificateSigningRequestDer::from_pem_slice(pem.as_bytes()).map_err(|_| CsrError::NotPem)?;
    let (_, csr) = x509_parser::certification_request::X509CertificationRequest::from_der(der.as_ref())
        .map_err(|_| CsrError::Malformed)?;
    csr.verify_signature().map_err(|_| CsrError::BadSignature)?;
    let spki = &csr.certification_request_info.subject_pki;
    let oid = spki.algorithm.algorithm.to_id_string();
    let alg = match oid.as_str() {
        "1.3.101.112" => &rcgen::PKCS_ED25519,
        "1.2.840.10045.2.1" => {
            let curve = spki.algorithm.parameters.as_ref().and_then(|p| p.as_oid().ok()).map(|o| o.to_id_string());
            if curve.as_deref() != Some("1.2.840.10045.3.1.7") {
                return Err(CsrError::KeyType(format!("EC curve {}", curve.unwrap_or_default())));
            }
            &rcgen::PKCS_ECDSA_P256_SHA256
        }
        "1.2.840.113549.1.1.1" => return Err(CsrError::KeyType("RSA".into())),
        other => return Err(CsrError::KeyType(other.to_owned())),
    };
    Ok(CsrKey { raw: spki.subject_public_key.data.to_vec(), alg })
}

use rustls_pki_types::pem::PemObject as _;

/// The CA: its certificate (PEM, as written to `ca.pem`) and signing key.
pub struct Authority {
    cert_pem: String,
    issuer: Issuer<'static, KeyPair>,
}

impl std::fmt::Debug for Authority {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Authority")
    }
}

fn read(path: &Path) -> Result<String, CaError> {
    std::fs::read_to_string(path).map_err(|source| CaError::Io { op: "reading", path: path.to_owned(), source })
}

/// Writes `text` to `path` with `mode`, through a `.partial` file and a rename.
pub fn write_secret(path: &Path, text: &str, mode: u32) -> Result<(), CaError> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let partial = path.with_extension("partial");
    let io = |op, source| CaError::Io { op, path: path.to_owned(), source };
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(&partial)
        .map_err(|e| io("creating", e))?;
    f.write_all(text.as_bytes()).map_err(|e| io("writing", e))?;
    f.sync_all().map_err(|e| io("syncing", e))?;
    std::fs::rename(&partial, path).map_err(|e| io("renaming", e))
}

fn validity(params: &mut CertificateParams, lifetime: Duration) {
    let now = time_now();
    params.not_before = now - BACKDATE.min(lifetime / 10);
    params.not_after = now + lifetime;
}

fn time_now() -> time::OffsetDateTime {
    time::OffsetDateTime::now_utc()
}

/// 16 random bytes whose first byte is 0x40..=0x7f: positive, and with no leading zero byte
/// for DER's minimal encoding to drop (which would change the serial a peer presents).
fn random_serial() -> SerialNumber {
    let mut bytes: [u8; 16] = rand::random();
    bytes[0] = (bytes[0] & 0x3f) | 0x40;
    SerialNumber::from_slice(&bytes)
}

/// A serial number in one canonical text form: hex without leading zero bytes.
pub fn serial_hex(bytes: &[u8]) -> String {
    let first = bytes.iter().position(|&b| b != 0).unwrap_or(bytes.len().saturating_sub(1));
    hex::encode(&bytes[first..])
}

fn issue_error(e: rcgen::Error) -> CaError {
    CaError::Issue(e.to_string())
}

impl Authority {
    /// Loads `DIR/ca.pem` + `DIR/ca.key`, or creates them (P-256) when neither exists.
    pub fn open_or_create(dir: &Path) -> Result<Self, CaError> {
        let (cert_path, key_path) = (dir.join("ca.pem"), dir.join("ca.key"));
        if cert_path.exists() || key_path.exists() {
            let cert_pem = read(&cert_path)?;
            let key = KeyPair::from_pem(&read(&key_path)?)
                .map_err(|e| CaError::Material { path: key_path.clone(), reason: e.to_string() })?;
            let issuer = Issuer::from_ca_cert_pem(&cert_pem, key)
                .map_err(|e| CaError::Material { path: cert_path.clone(), reason: e.to_string() })?;
            return Ok(Self { cert_pem, issuer });
        }
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(issue_error)?;
        let mut params = CertificateParams::new(Vec::<String>::new()).map_err(issue_error)?;
        params.distinguished_name = DistinguishedName::new();
        params.distinguished_name.push(DnType::CommonName, "ironroot plane CA");
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages =
            vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
        params.serial_number = Some(random_serial());
        validity(&mut params, CA_VALIDITY);
        let cert = params.self_signed(&key).map_err(issue_error)?;
        write_secret(&key_path, &key.serialize_pem(), 0o600)?;
        write_secret(&cert_path, &cert.pem(), 0o644)?;
        Ok(Self { cert_pem: cert.pem(), issuer: Issuer::new(params, key) })
    }

    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    fn leaf(
        &self,
        sans: Vec<SanType>,
        cn: &str,
        eku: ExtendedKeyUsagePurpose,
        lifetime: Duration,
    ) -> Result<CertificateParams, CaError> {
        let mut params = CertificateParams::new(Vec::<String>::new()).map_err(issue_error)?;
        params.distinguished_name = DistinguishedName::new();
        params.distinguished_name.push(DnType::CommonName, cn);
        params.subject_alt_names = sans;
        params.extended_key_usages = vec![eku];
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.is_ca = IsCa::ExplicitNoCa;
        params.serial_number = Some(random_serial());
        params.use_authority_key_identifier_extension = true;
        validity(&mut params, lifetime);
        Ok(params)
    }

    /// A server certificate for `names` (DNS names or IP addresses) with a fresh key.
    pub fn issue_server(&self, names: &[String]) -> Result<(String, String), CaError> {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(issue_error)?;
        let sans = names
            .iter()
            .map(|n| match n.parse::<std::net::IpAddr>() {
                Ok(ip) => Ok(SanType::IpAddress(ip)),
                Err(_) => n.clone().try_into().map(SanType::DnsName).map_err(issue_error),
            })
            .collect::<Result<_, _>>()?;
        let params = self.leaf(sans, "ironroot plane", ExtendedKeyUsagePurpose::ServerAuth, CA_VALIDITY)?;
        let cert = params.signed_by(&key, &self.issuer).map_err(issue_error)?;
        Ok((cert.pem(), key.serialize_pem()))
    }

    /// An operator certificate (client auth, SAN `urn:ironroot:operator:<name>`) with a fresh key.
    pub fn issue_operator(&self, name: &str) -> Result<(String, String), CaError> {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(issue_error)?;
        let uri = format!("{OPERATOR_URI_PREFIX}{name}").try_into().map_err(issue_error)?;
        let params =
            self.leaf(vec![SanType::URI(uri)], name, ExtendedKeyUsagePurpose::ClientAuth, OPERATOR_VALIDITY)?;
        let cert = params.signed_by(&key, &self.issuer).map_err(issue_error)?;
        Ok((cert.pem(), key.serialize_pem()))
    }

    /// A node certificate for the CSR's key: SAN `urn:ironroot:node:<id>` only. Returns the
    /// chain (node cert + CA cert, PEM), the serial (hex) and the expiry (seconds since epoch).
    pub fn issue_node(
        &self,
        node_id: &str,
        csr_pem: &str,
        lifetime: Duration,
    ) -> Result<Result<(String, String, u64), CsrError>, CaError> {
        let key = match csr_key(csr_pem) {
            Ok(k) => k,
            Err(e) => return Ok(Err(e)),
        };
        let uri = format!("{NODE_URI_PREFIX}{node_id}").try_into().map_err(issue_error)?;
        let params = self.leaf(vec![SanType::URI(uri)], node_id, ExtendedKeyUsagePurpose::ClientAuth, lifetime)?;
        let serial = params.serial_number.as_ref().map(|s| serial_hex(&s.to_bytes())).unwrap_or_default();
        let not_after = params.not_after.unix_timestamp().max(0) as u64;
        let cert = params.signed_by(&key, &self.issuer).map_err(issue_error)?;
        Ok(Ok((format!("{}{}", cert.pem(), self.cert_pem), serial, not_after)))
    }
}

/// Who a verified client certificate (DER) names, from its SAN URI; `None` for anything else.
pub fn peer_of(der: &[u8]) -> Option<Peer> {
    let (_, cert) = X509Certificate::from_der(der).ok()?;
    let serial = serial_hex(cert.raw_serial());
    let san = cert.subject_alternative_name().ok()??;
    let mut found = None;
    for name in &san.value.general_names {
        if let x509_parser::extensions::GeneralName::URI(uri) = name {
            let peer = if let Some(id) = uri.strip_prefix(NODE_URI_PREFIX) {
                Peer::Node { id: id.to_owned(), serial: serial.clone() }
            } else if let Some(name) = uri.strip_prefix(OPERATOR_URI_PREFIX) {
                Peer::Operator { name: name.to_owned() }
            } else {
                continue;
            };
            if found.is_some() {
                return None; // two identities in one certificate: trust neither
            }
            found = Some(peer);
        }
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn serials_have_one_canonical_form() {
        assert_eq!(serial_hex(&[0, 0, 0x12, 0x34]), "1234");
        assert_eq!(serial_hex(&[0x12, 0x00]), "1200");
        assert_eq!(serial_hex(&[0]), "00");
        for _ in 0..1000 {
            let s = random_serial().to_bytes();
            assert!((0x40..=0x7f).contains(&s[0]));
        }
    }

    #[test]
    fn issued_node_certificates_name_the_serial_that_was_recorded() {
        let dir = tempfile::tempdir().unwrap();
        let ca = Authority::open_or_create(dir.path()).unwrap();
        let key = KeyPair::generate_for(&rcgen::PKCS_ED25519).unwrap();
        let csr = CertificateParams::new(vec!["evil.example".to_owned()])
            .unwrap()
            .serialize_request(&key)
            .unwrap()
            .pem()
            .unwrap();
        for _ in 0..300 {
            let (chain, serial, _) = ca.issue_node("n-1", &csr, Duration::from_secs(60)).unwrap().unwrap();
            let der = rustls_pki_types::CertificateDer::pem_slice_iter(chain.as_bytes()).next().unwrap().unwrap();
            assert_eq!(peer_of(&der), Some(Peer::Node { id: "n-1".into(), serial }));
        }
    }
}
