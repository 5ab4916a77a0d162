//! Signing and trust keys. Exactly two algorithms exist here: Ed25519 (pure, over the payload
//! bytes) and ECDSA P-256 with SHA-256 (ASN.1 DER signatures), the two cosign 2.x produces and
//! verifies with `--key`. Any other key is refused by name, never guessed at.
//!
//! Private keys are PKCS#8 PEM, public keys PKIX (SubjectPublicKeyInfo) PEM. Keys are written
//! in the form `openssl genpkey` writes, byte for byte: Ed25519 as PKCS#8 v1 (RFC 8410
//! `OneAsymmetricKey` version 0, no public key), P-256 as PKCS#8 v1 holding a SEC1 `ECPrivateKey`
//! with the public key and without curve parameters (they are in the algorithm identifier).
//! OpenSSL 3.0 and python-cryptography refuse the v2 form (with the public key) for Ed25519;
//! reading accepts both, so keys written by earlier versions keep working.

use ed25519_dalek::pkcs8::{DecodePrivateKey, EncodePrivateKey};
use p256::pkcs8::{DecodePublicKey, EncodePublicKey};
use sha2::{Digest as _, Sha256};
use spki::der::Decode;
use spki::{ObjectIdentifier, SubjectPublicKeyInfoRef};

const OID_ED25519: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.3.101.112");
const OID_EC_PUBLIC_KEY: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.10045.2.1");
const OID_P256: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.10045.3.1.7");

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyAlgorithm {
    Ed25519,
    P256,
}

impl std::str::FromStr for KeyAlgorithm {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "ed25519" => Ok(Self::Ed25519),
            "p256" | "ecdsa-p256" => Ok(Self::P256),
            _ => Err(format!("key algorithm {s:?} is not ed25519 or p256")),
        }
    }
}

impl std::fmt::Display for KeyAlgorithm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Ed25519 => "ed25519",
            Self::P256 => "ecdsa-p256",
        })
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum KeyError {
    #[error("key is not PEM: {0}")]
    Pem(String),
    #[error("PEM block is {found:?}, expected {expected:?}")]
    Label { found: String, expected: &'static str },
    #[error("key type {0} is not accepted (only Ed25519 and ECDSA P-256)")]
    Unsupported(String),
    #[error("key does not decode: {0}")]
    Decode(String),
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum VerifyError {
    #[error("signature is malformed for {alg}: {reason}")]
    Malformed { alg: KeyAlgorithm, reason: String },
    #[error("signature does not verify with {alg} key {key_id}")]
    Mismatch { alg: KeyAlgorithm, key_id: String },
}

fn pem_der(pem: &str, expected: &'static str) -> Result<Vec<u8>, KeyError> {
    let (label, der) = spki::der::pem::decode_vec(pem.trim().as_bytes()).map_err(|e| KeyError::Pem(e.to_string()))?;
    if label != expected {
        return Err(KeyError::Label { found: label.to_owned(), expected });
    }
    Ok(der)
}

#[derive(Clone)]
enum PublicKey {
    Ed25519(ed25519_dalek::VerifyingKey),
    P256(p256::ecdsa::VerifyingKey),
}

/// A public key a verifier trusts. Its id is the first 16 hex characters of SHA-256 over the
/// PKIX DER, so logs and errors can say which key matched without printing the key.
#[derive(Clone)]
pub struct TrustedKey {
    key: PublicKey,
    id: String,
}

impl std::fmt::Debug for TrustedKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "TrustedKey({} {})", self.algorithm(), self.id)
    }
}

impl TrustedKey {
    /// Parses a PKIX `PUBLIC KEY` PEM block.
    pub fn parse_pem(pem: &str) -> Result<Self, KeyError> {
        Self::from_der(&pem_der(pem, "PUBLIC KEY")?)
    }

    pub fn from_der(der: &[u8]) -> Result<Self, KeyError> {
        let spki = SubjectPublicKeyInfoRef::from_der(der).map_err(|e| KeyError::Decode(e.to_string()))?;
        let key = match spki.algorithm.oid {
            OID_ED25519 => PublicKey::Ed25519(
                ed25519_dalek::VerifyingKey::from_public_key_der(der).map_err(|e| KeyError::Decode(e.to_string()))?,
            ),
            OID_EC_PUBLIC_KEY => {
                let curve = spki.algorithm.parameters_oid().map_err(|e| KeyError::Decode(e.to_string()))?;
                if curve != OID_P256 {
                    return Err(KeyError::Unsupported(format!("EC curve {curve}")));
                }
                PublicKey::P256(
                    p256::ecdsa::VerifyingKey::from_public_key_der(der).map_err(|e| KeyError::Decode(e.to_string()))?,
                )
            }
            other => return Err(KeyError::Unsupported(algorithm_name(other))),
        };
        Ok(Self { key, id: hex::encode(&Sha256::digest(der)[..8]) })
    }

    pub fn algorithm(&self) -> KeyAlgorithm {
        match self.key {
            PublicKey::Ed25519(_) => KeyAlgorithm::Ed25519,
            PublicKey::P256(_) => KeyAlgorithm::P256,
        }
    }

    pub fn id(&self) -> &str {
        &self.id
    }

    /// The key as a PKIX `PUBLIC KEY` PEM block (what [`TrustedKey::parse_pem`] reads).
    pub fn to_pem(&self) -> Result<String, KeyError> {
        let r = match &self.key {
            PublicKey::Ed25519(k) => k.to_public_key_pem(spki::der::pem::LineEnding::LF),
            PublicKey::P256(k) => k.to_public_key_pem(spki::der::pem::LineEnding::LF),
        };
        r.map_err(|e| KeyError::Decode(e.to_string()))
    }

    /// Verifies `signature` over `message`: pure Ed25519 (strict), or ECDSA P-256 over SHA-256
    /// of the message with a DER signature.
    pub fn verify(&self, message: &[u8], signature: &[u8]) -> Result<(), VerifyError> {
        use ed25519_dalek::Verifier as _;
        let alg = self.algorithm();
        let malformed = |reason: String| VerifyError::Malformed { alg, reason };
        let mismatch = || VerifyError::Mismatch { alg, key_id: self.id.clone() };
        match &self.key {
            PublicKey::Ed25519(k) => {
                let sig = ed25519_dalek::Signature::from_slice(signature)
                    .map_err(|_| malformed(format!("{} bytes, expected 64", signature.len())))?;
                k.verify_strict(message, &sig).map_err(|_| mismatch())
            }
            PublicKey::P256(k) => {
                let sig = p256::ecdsa::Signature::from_der(signature)
                    .map_err(|_| malformed("not an ASN.1 DER ECDSA signature".into()))?;
                k.verify(message, &sig).map_err(|_| mismatch())
            }
        }
    }
}

fn algorithm_name(oid: ObjectIdentifier) -> String {
    match oid.to_string().as_str() {
        "1.2.840.113549.1.1.1" => "RSA".into(),
        "1.3.101.113" => "Ed448".into(),
        other => format!("OID {other}"),
    }
}

/// A private signing key (builder side only; never shipped to nodes).
pub enum SigningKey {
    Ed25519(ed25519_dalek::SigningKey),
    P256(p256::ecdsa::SigningKey),
}

impl std::fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SigningKey({})", self.algorithm())
    }
}

impl SigningKey {
    pub fn generate(alg: KeyAlgorithm) -> Self {
        let mut rng = rand_core::OsRng;
        match alg {
            KeyAlgorithm::Ed25519 => Self::Ed25519(ed25519_dalek::SigningKey::generate(&mut rng)),
            KeyAlgorithm::P256 => Self::P256(p256::ecdsa::SigningKey::random(&mut rng)),
        }
    }

    /// Parses a PKCS#8 `PRIVATE KEY` PEM block (unencrypted).
    pub fn parse_pem(pem: &str) -> Result<Self, KeyError> {
        let der = pem_der(pem, "PRIVATE KEY")?;
        let info = p256::pkcs8::PrivateKeyInfo::from_der(&der).map_err(|e| KeyError::Decode(e.to_string()))?;
        match info.algorithm.oid {
            OID_ED25519 => ed25519_dalek::SigningKey::from_pkcs8_der(&der)
                .map(Self::Ed25519)
                .map_err(|e| KeyError::Decode(e.to_string())),
            OID_EC_PUBLIC_KEY => {
                let curve = info.algorithm.parameters_oid().map_err(|e| KeyError::Decode(e.to_string()))?;
                if curve != OID_P256 {
                    return Err(KeyError::Unsupported(format!("EC curve {curve}")));
                }
                p256::ecdsa::SigningKey::from_pkcs8_der(&der)
                    .map(Self::P256)
                    .map_err(|e| KeyError::Decode(e.to_string()))
            }
            other => Err(KeyError::Unsupported(algorithm_name(other))),
        }
    }

    pub fn algorithm(&self) -> KeyAlgorithm {
        match self {
            Self::Ed25519(_) => KeyAlgorithm::Ed25519,
            Self::P256(_) => KeyAlgorithm::P256,
        }
    }

    /// The key as a PKCS#8 `PRIVATE KEY` PEM block, in openssl's form (see the module doc).
    pub fn to_pkcs8_pem(&self) -> Result<String, KeyError> {
        let doc = match self {
            // v1: ed25519-dalek's own encoding is v2 (with the public key), which OpenSSL 3.0
            // refuses.
            Self::Ed25519(k) => {
                ed25519_dalek::pkcs8::KeypairBytes { secret_key: k.to_bytes(), public_key: None }.to_pkcs8_der()
            }
            Self::P256(k) => k.to_pkcs8_der(),
        }
        .map_err(|e| KeyError::Decode(e.to_string()))?;
        doc.to_pem("PRIVATE KEY", spki::der::pem::LineEnding::LF)
            .map(|s| s.to_string())
            .map_err(|e| KeyError::Decode(e.to_string()))
    }

    pub fn public_pem(&self) -> Result<String, KeyError> {
        let r = match self {
            Self::Ed25519(k) => k.verifying_key().to_public_key_pem(spki::der::pem::LineEnding::LF),
            Self::P256(k) => k.verifying_key().to_public_key_pem(spki::der::pem::LineEnding::LF),
        };
        r.map_err(|e| KeyError::Decode(e.to_string()))
    }

    pub fn trusted_key(&self) -> Result<TrustedKey, KeyError> {
        TrustedKey::parse_pem(&self.public_pem()?)
    }

    /// Signs `message` the way cosign does for this key type.
    pub fn sign(&self, message: &[u8]) -> Vec<u8> {
        use ed25519_dalek::Signer as _;
        match self {
            Self::Ed25519(k) => k.sign(message).to_bytes().to_vec(),
            Self::P256(k) => {
                let sig: p256::ecdsa::Signature = k.sign(message);
                sig.to_der().as_bytes().to_vec()
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_algorithms_sign_verify_and_round_trip_pem() {
        for alg in [KeyAlgorithm::Ed25519, KeyAlgorithm::P256] {
            let key = SigningKey::generate(alg);
            let again = SigningKey::parse_pem(&key.to_pkcs8_pem().unwrap()).unwrap();
            let trusted = again.trusted_key().unwrap();
            assert_eq!(trusted.algorithm(), alg);
            let sig = key.sign(b"payload");
            trusted.verify(b"payload", &sig).unwrap();
            assert!(matches!(trusted.verify(b"payloaD", &sig), Err(VerifyError::Mismatch { .. })));
        }
    }

    #[test]
    fn a_key_of_the_other_type_is_a_mismatch_or_malformed() {
        let ed = SigningKey::generate(KeyAlgorithm::Ed25519);
        let p = SigningKey::generate(KeyAlgorithm::P256).trusted_key().unwrap();
        let err = p.verify(b"m", &ed.sign(b"m")).unwrap_err();
        assert!(matches!(err, VerifyError::Malformed { .. }), "{err}");
    }

    /// Written by `openssl genpkey -algorithm ed25519` (OpenSSL 3.0).
    const OPENSSL_ED25519: &str = "-----BEGIN PRIVATE KEY-----
MC4CAQAwBQYDK2VwBCIEIPwjFbzNMiVSqtwOOLA6IbvKdpoTml5V1gi2u2UuyCHr
-----END PRIVATE KEY-----
";
    const OPENSSL_ED25519_PUB: &str = "-----BEGIN PUBLIC KEY-----
MCowBQYDK2VwAyEAo6LB18CEhmA47sEiJmAdX5eOBRk9+UcoLRSGCbN/HnA=
-----END PUBLIC KEY-----
";
    /// Written by `openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256`.
    const OPENSSL_P256: &str = "-----BEGIN PRIVATE KEY-----
MIGHAgEAMBMGByqGSM49AgEGCCqGSM49AwEHBG0wawIBAQQg+9m4iky2/CSTzVCz
8g2LooesAvMM5fVAJDUsAorq/1ehRANCAARyFgtHDkrGNiQkeAEm/HCgin9GSRM6
YWfRw9GnPKljn2k+RrfPcDfKGXfdRkK8he6yPSNj0ki0UgtR6HUxAMuM
-----END PRIVATE KEY-----
";
    const OPENSSL_P256_PUB: &str = "-----BEGIN PUBLIC KEY-----
MFkwEwYHKoZIzj0CAQYIKoZIzj0DAQcDQgAEchYLRw5KxjYkJHgBJvxwoIp/RkkT
OmFn0cPRpzypY59pPka3z3A3yhl33UZCvIXusj0jY9JItFILUeh1MQDLjA==
-----END PUBLIC KEY-----
";

    #[test]
    fn keys_are_written_exactly_as_openssl_writes_them() {
        for (private, public) in [(OPENSSL_ED25519, OPENSSL_ED25519_PUB), (OPENSSL_P256, OPENSSL_P256_PUB)] {
            let key = SigningKey::parse_pem(private).unwrap();
            assert_eq!(key.to_pkcs8_pem().unwrap(), private, "{}", key.algorithm());
            assert_eq!(key.public_pem().unwrap(), public, "{}", key.algorithm());
        }
    }

    #[test]
    fn ed25519_is_pkcs8_v1_without_the_public_key() {
        let key = SigningKey::generate(KeyAlgorithm::Ed25519);
        let der = pem_der(&key.to_pkcs8_pem().unwrap(), "PRIVATE KEY").unwrap();
        // SEQUENCE { INTEGER 0, SEQUENCE { OID 1.3.101.112 }, OCTET STRING { OCTET STRING (32) } }
        let prefix = hex::decode("302e020100300506032b657004220420").unwrap();
        assert_eq!(der.len(), prefix.len() + 32);
        assert_eq!(der[..prefix.len()], prefix[..]);
    }

    #[test]
    fn ed25519_pkcs8_v2_with_the_public_key_still_reads() {
        let key = SigningKey::parse_pem(OPENSSL_ED25519).unwrap();
        let SigningKey::Ed25519(k) = &key else { unreachable!() };
        let v2 = k.to_pkcs8_der().unwrap();
        assert_eq!(v2.as_bytes()[4], 1, "ed25519-dalek's own encoding is expected to be v2");
        let pem = v2.to_pem("PRIVATE KEY", spki::der::pem::LineEnding::LF).unwrap();
        let again = SigningKey::parse_pem(&pem).unwrap();
        assert_eq!(again.public_pem().unwrap(), OPENSSL_ED25519_PUB);
        assert_eq!(again.to_pkcs8_pem().unwrap(), OPENSSL_ED25519, "re-written as v1");

        // A v2 key whose public key is not the private key's is refused.
        let other = SigningKey::generate(KeyAlgorithm::Ed25519);
        let SigningKey::Ed25519(o) = &other else { unreachable!() };
        let mut forged = v2.as_bytes().to_vec();
        let n = forged.len();
        forged[n - 32..].copy_from_slice(o.verifying_key().as_bytes());
        let pem = spki::der::pem::encode_string("PRIVATE KEY", spki::der::pem::LineEnding::LF, &forged).unwrap();
        assert!(matches!(SigningKey::parse_pem(&pem), Err(KeyError::Decode(_))));
    }

    #[test]
    fn refuses_other_pem_labels_and_garbage() {
        let key = SigningKey::generate(KeyAlgorithm::Ed25519);
        let err = TrustedKey::parse_pem(&key.to_pkcs8_pem().unwrap()).unwrap_err();
        assert!(matches!(err, KeyError::Label { .. }), "{err}");
        assert!(TrustedKey::parse_pem("not a key").is_err());
    }
}
