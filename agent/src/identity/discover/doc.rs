//! The identity document: one flat JSON object of string values, keyed like the kernel command
//! line without its `ironroot.` prefix (`{"plane": "https://…", "token": "irt_…"}`). fw_cfg, the
//! metadata endpoint and the local file all carry it. Bounded (64 KiB, string values only, so
//! nesting is refused at the first level), strict (unknown keys are errors) and never trusted
//! for more than a string per key.

use std::collections::BTreeMap;

use crate::cmdline::KEYS;

/// Largest identity document read from any source.
pub const MAX_DOC: u64 = 64 * 1024;
/// Largest value: inline PEM (a CA certificate or a few public keys) fits easily.
const MAX_PEM_VALUE: usize = 16 * 1024;
/// Largest other value (URLs, tokens, names).
const MAX_VALUE: usize = 1024;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DocError {
    #[error("is over {MAX_DOC} bytes (reading stopped there)")]
    TooLarge,
    #[error("is not UTF-8 (at byte {0})")]
    NotUtf8(usize),
    #[error("is not a JSON object of string values: {0}")]
    Json(String),
    #[error("key {0:?} is not an identity key")]
    Unknown(String),
    #[error("value of {key} is {len} bytes, over {max}")]
    ValueTooLong { key: String, len: usize, max: usize },
    #[error("value of {0} holds control characters")]
    Control(String),
}

/// Parses an identity document.
pub fn parse_identity_doc(bytes: &[u8]) -> Result<BTreeMap<String, String>, DocError> {
    if bytes.len() as u64 > MAX_DOC {
        return Err(DocError::TooLarge);
    }
    let text = std::str::from_utf8(bytes).map_err(|e| DocError::NotUtf8(e.valid_up_to()))?;
    let Flat(doc) = serde_json::from_str(text).map_err(|e| DocError::Json(e.to_string()))?;
    for (key, value) in &doc {
        if !KEYS.iter().any(|k| k.strip_prefix("ironroot.") == Some(key.as_str())) {
            return Err(DocError::Unknown(key.chars().take(64).collect()));
        }
        let pem = value.starts_with("-----BEGIN ");
        let max = if pem { MAX_PEM_VALUE } else { MAX_VALUE };
        if value.len() > max {
            return Err(DocError::ValueTooLong { key: key.clone(), len: value.len(), max });
        }
        if value.chars().any(|c| c.is_control() && !(pem && (c == '\n' || c == '\r'))) {
            return Err(DocError::Control(key.clone()));
        }
    }
    Ok(doc)
}

/// A JSON object of strings whose keys each appear once (serde_json alone keeps the last).
struct Flat(BTreeMap<String, String>);

impl<'de> serde::Deserialize<'de> for Flat {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl<'de> serde::de::Visitor<'de> for Visitor {
            type Value = Flat;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("an object of string values")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<Flat, A::Error> {
                let mut out = BTreeMap::new();
                while let Some((key, value)) = map.next_entry::<String, String>()? {
                    if out.contains_key(&key) {
                        return Err(serde::de::Error::custom(format!("key {key:?} appears twice")));
                    }
                    out.insert(key, value);
                }
                Ok(Flat(out))
            }
        }
        d.deserialize_map(Visitor)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_a_flat_document() {
        let doc = parse_identity_doc(br#"{"plane":"https://10.0.2.2:8443","node":"n1"}"#).unwrap();
        assert_eq!(doc["plane"], "https://10.0.2.2:8443");
        assert_eq!(doc.len(), 2);
    }

    #[test]
    fn hostile_documents_are_clear_errors() {
        let deep = format!("{}{}", "[".repeat(10_000), "]".repeat(10_000));
        let deep_value = format!("{{\"node\":{}{}}}", "[".repeat(10_000), "]".repeat(10_000));
        let long = format!("{{\"node\":\"{}\"}}", "x".repeat(2000));
        type Check = fn(&DocError) -> bool;
        let cases: Vec<(Vec<u8>, Check)> = vec![
            (deep.into_bytes(), |e| matches!(e, DocError::Json(_))),
            (deep_value.into_bytes(), |e| matches!(e, DocError::Json(_))),
            (b"{\"node\":\"a\xff\"}".to_vec(), |e| matches!(e, DocError::NotUtf8(10))),
            (br#"{"nodes":"a"}"#.to_vec(), |e| matches!(e, DocError::Unknown(k) if k == "nodes")),
            (br#"{"node":1}"#.to_vec(), |e| matches!(e, DocError::Json(_))),
            (br#"{"node":"a","node":"b"}"#.to_vec(), |e| matches!(e, DocError::Json(m) if m.contains("twice"))),
            (long.into_bytes(), |e| matches!(e, DocError::ValueTooLong { .. })),
            (br#"{"node":"a\u0000b"}"#.to_vec(), |e| matches!(e, DocError::Control(_))),
            (vec![b' '; (MAX_DOC + 1) as usize], |e| matches!(e, DocError::TooLarge)),
        ];
        for (bytes, ok) in cases {
            let e = parse_identity_doc(&bytes).unwrap_err();
            assert!(ok(&e), "{e}");
        }
    }
}
