//! The cosign "simple signing" envelope: the payload that names the signed manifest digest, and
//! the check that a signature layer verifies under one of the trusted keys and names the digest
//! being verified. The payload's `optional` object carries the module name, version and serial.

use base64::Engine as _;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::digest::OciDigest;
use crate::keys::{TrustedKey, VerifyError};
use crate::media;

/// Largest payload a verifier reads; real payloads are a few hundred bytes.
pub const MAX_PAYLOAD_SIZE: u64 = 64 * 1024;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SimpleSigningPayload {
    pub critical: Critical,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub optional: Option<Map<String, Value>>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Critical {
    pub identity: Identity,
    pub image: Image,
    #[serde(rename = "type")]
    pub kind: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Identity {
    #[serde(rename = "docker-reference")]
    pub docker_reference: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Image {
    #[serde(rename = "docker-manifest-digest")]
    pub docker_manifest_digest: String,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SignatureError {
    #[error("no signature found for {0}")]
    Missing(OciDigest),
    #[error("signature payload is malformed: {0}")]
    Payload(String),
    #[error("signature layer has no {annotation} annotation", annotation = media::COSIGN_SIGNATURE_ANNOTATION)]
    NoAnnotation,
    #[error("signature annotation is not base64")]
    Base64,
    #[error("signature is for {signed}, not for {expected} (copied from other content)")]
    WrongDigest { signed: String, expected: OciDigest },
    #[error("signed payload field {field} says {signed:?} but the module config says {actual:?}")]
    Disagrees { field: &'static str, signed: String, actual: String },
    #[error("no signature verifies with the trusted keys: {0}")]
    Untrusted(String),
}

/// What a verified payload says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SignedPayload {
    pub manifest_digest: OciDigest,
    pub docker_reference: String,
    pub name: Option<String>,
    pub version: Option<String>,
    pub serial: Option<u64>,
    /// Id of the trusted key that verified it.
    pub key_id: String,
}

impl SimpleSigningPayload {
    /// The payload for `digest` pushed under `repository` (no tag or digest), with the module's
    /// name, version and serial in `optional`.
    pub fn for_module(repository: &str, digest: OciDigest, name: &str, version: &str, serial: u64) -> Self {
        let mut optional = Map::new();
        optional.insert(media::PAYLOAD_NAME.into(), name.into());
        optional.insert(media::PAYLOAD_VERSION.into(), version.into());
        optional.insert(media::PAYLOAD_SERIAL.into(), serial.into());
        Self {
            critical: Critical {
                identity: Identity { docker_reference: repository.to_owned() },
                image: Image { docker_manifest_digest: digest.to_string() },
                kind: media::COSIGN_SIGNATURE_TYPE.to_owned(),
            },
            optional: Some(optional),
        }
    }

    pub fn to_bytes(&self) -> Vec<u8> {
        serde_json::to_vec(self).unwrap_or_default()
    }

    pub fn parse(bytes: &[u8]) -> Result<Self, SignatureError> {
        if bytes.len() as u64 > MAX_PAYLOAD_SIZE {
            return Err(SignatureError::Payload(format!(
                "{} bytes is over the {MAX_PAYLOAD_SIZE}-byte cap",
                bytes.len()
            )));
        }
        let p: Self = serde_json::from_slice(bytes).map_err(|e| SignatureError::Payload(e.to_string()))?;
        if p.critical.kind != media::COSIGN_SIGNATURE_TYPE {
            return Err(SignatureError::Payload(format!("critical.type is {:?}", p.critical.kind)));
        }
        Ok(p)
    }

    fn optional_str(&self, key: &str) -> Option<String> {
        match self.optional.as_ref()?.get(key)? {
            Value::String(s) => Some(s.clone()),
            Value::Number(n) => Some(n.to_string()),
            _ => None,
        }
    }
}

/// Verifies one signature layer: `signature_b64` (the annotation) over `payload` under any of
/// `keys`, and that the payload names `expected`. Returns what the payload says.
pub fn verify_signature(
    payload: &[u8],
    signature_b64: &str,
    keys: &[TrustedKey],
    expected: OciDigest,
) -> Result<SignedPayload, SignatureError> {
    let signature =
        base64::engine::general_purpose::STANDARD.decode(signature_b64.trim()).map_err(|_| SignatureError::Base64)?;
    let mut reasons = Vec::new();
    let mut key_id = None;
    for key in keys {
        match key.verify(payload, &signature) {
            Ok(()) => {
                key_id = Some(key.id().to_owned());
                break;
            }
            Err(e @ (VerifyError::Malformed { .. } | VerifyError::Mismatch { .. })) => reasons.push(e.to_string()),
        }
    }
    let Some(key_id) = key_id else {
        return Err(SignatureError::Untrusted(if keys.is_empty() {
            "no trusted keys given".into()
        } else {
            reasons.join("; ")
        }));
    };
    let p = SimpleSigningPayload::parse(payload)?;
    if p.critical.image.docker_manifest_digest != expected.to_string() {
        return Err(SignatureError::WrongDigest {
            signed: p.critical.image.docker_manifest_digest.chars().take(80).collect(),
            expected,
        });
    }
    let serial = match p.optional_str(media::PAYLOAD_SERIAL) {
        Some(s) => Some(
            s.parse::<u64>()
                .map_err(|_| SignatureError::Payload(format!("{} is {s:?}, not a number", media::PAYLOAD_SERIAL)))?,
        ),
        None => None,
    };
    Ok(SignedPayload {
        manifest_digest: expected,
        docker_reference: p.critical.identity.docker_reference.clone(),
        name: p.optional_str(media::PAYLOAD_NAME),
        version: p.optional_str(media::PAYLOAD_VERSION),
        serial,
        key_id,
    })
}

impl SignedPayload {
    /// Checks the signed name, version and serial (when present) against the module config.
    pub fn check_agrees(&self, name: &str, version: &str, serial: u64) -> Result<(), SignatureError> {
        let pairs = [
            ("name", self.name.clone(), name.to_owned()),
            ("version", self.version.clone(), version.to_owned()),
            ("serial", self.serial.map(|s| s.to_string()), serial.to_string()),
        ];
        for (field, signed, actual) in pairs {
            if let Some(signed) = signed
                && signed != actual
            {
                return Err(SignatureError::Disagrees { field, signed, actual });
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::{KeyAlgorithm, SigningKey};
    use base64::engine::general_purpose::STANDARD;

    #[test]
    fn verifies_and_reports_the_payload() {
        let key = SigningKey::generate(KeyAlgorithm::P256);
        let digest = OciDigest::of(b"manifest");
        let payload = SimpleSigningPayload::for_module("reg/ironroot/base", digest, "base", "1.0", 7).to_bytes();
        let sig = STANDARD.encode(key.sign(&payload));
        let got = verify_signature(&payload, &sig, &[key.trusted_key().unwrap()], digest).unwrap();
        assert_eq!(got.serial, Some(7));
        assert_eq!(got.name.as_deref(), Some("base"));
        got.check_agrees("base", "1.0", 7).unwrap();
        assert!(matches!(got.check_agrees("base", "1.0", 6), Err(SignatureError::Disagrees { field: "serial", .. })));
    }

    #[test]
    fn tamper_cases_name_their_failure() {
        let key = SigningKey::generate(KeyAlgorithm::Ed25519);
        let keys = [key.trusted_key().unwrap()];
        let digest = OciDigest::of(b"manifest");
        let payload = SimpleSigningPayload::for_module("r", digest, "base", "1", 1).to_bytes();
        let mut sig = key.sign(&payload);

        let other = OciDigest::of(b"other");
        let copied = verify_signature(&payload, &STANDARD.encode(&sig), &keys, other).unwrap_err();
        assert!(matches!(copied, SignatureError::WrongDigest { .. }), "{copied}");

        let mut edited = payload.clone();
        edited[10] ^= 1;
        let err = verify_signature(&edited, &STANDARD.encode(&sig), &keys, digest).unwrap_err();
        assert!(matches!(err, SignatureError::Untrusted(_)), "{err}");

        sig[3] ^= 0x40;
        let err = verify_signature(&payload, &STANDARD.encode(&sig), &keys, digest).unwrap_err();
        assert!(err.to_string().contains("does not verify"), "{err}");

        assert_eq!(verify_signature(&payload, "%%%", &keys, digest).unwrap_err(), SignatureError::Base64);
    }
}
