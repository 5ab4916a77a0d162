//! Digest types. An OCI descriptor digest (`sha256:<hex>` over a blob's bytes) and an fs-verity
//! digest (the Merkle-tree root the kernel measures) are both 32-byte SHA-256 values, and mixing
//! them up would break the trust chain silently, so each is its own type with its own text form.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use sha2::{Digest as _, Sha256};

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DigestError {
    #[error("digest {0:?} is not of the form sha256:<64 lowercase hex>")]
    BadOci(String),
    #[error("fs-verity digest {0:?} is not 64 lowercase hex characters")]
    BadVerity(String),
}

fn parse_hex32(s: &str) -> Option<[u8; 32]> {
    if s.len() != 64 || !s.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)) {
        return None;
    }
    let mut out = [0u8; 32];
    hex::decode_to_slice(s, &mut out).ok()?;
    Some(out)
}

/// The digest of an OCI blob or manifest: SHA-256 over its exact bytes, written `sha256:<hex>`.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct OciDigest([u8; 32]);

impl OciDigest {
    pub fn new(bytes: [u8; 32]) -> Self {
        Self(bytes)
    }

    /// The digest of `data`.
    pub fn of(data: &[u8]) -> Self {
        Self(Sha256::digest(data).into())
    }

    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// The 64 hex characters without the algorithm prefix (blob file names, `.sig` tags).
    pub fn hex(&self) -> String {
        hex::encode(self.0)
    }

    /// The cosign signature tag for the manifest with this digest: `sha256-<hex>.sig`.
    pub fn signature_tag(&self) -> String {
        format!("sha256-{}.sig", self.hex())
    }
}

impl FromStr for OciDigest {
    type Err = DigestError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        s.strip_prefix("sha256:")
            .and_then(parse_hex32)
            .map(Self)
            .ok_or_else(|| DigestError::BadOci(s.chars().take(100).collect()))
    }
}

impl fmt::Display for OciDigest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "sha256:{}", hex::encode(self.0))
    }
}

impl fmt::Debug for OciDigest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// An fs-verity digest (SHA-256, 4 KiB blocks, no salt): the name of an object in the store and
/// the composefs digest of an EROFS image. Written as 64 lowercase hex characters, as
/// `mkcomposefs --print-digest` and the overlay `metacopy` xattr do.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct VerityDigest([u8; 32]);

impl VerityDigest {
    pub fn new(bytes: [u8; 32]) -> Self {
        Self(bytes)
    }

    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    pub fn hex(&self) -> String {
        hex::encode(self.0)
    }

    /// The object's path inside a flat digest store: `ab/cdef…` (the layout of
    /// `mkcomposefs --digest-store` and of overlayfs `redirect` xattrs in composefs images).
    pub fn object_path(&self) -> String {
        let h = self.hex();
        format!("{}/{}", &h[..2], &h[2..])
    }

    /// Parses the name of a pack entry or a store file (64 lowercase hex characters).
    pub fn parse_name(s: &str) -> Result<Self, DigestError> {
        s.parse()
    }
}

impl FromStr for VerityDigest {
    type Err = DigestError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        parse_hex32(s).map(Self).ok_or_else(|| DigestError::BadVerity(s.chars().take(100).collect()))
    }
}

impl fmt::Display for VerityDigest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex::encode(self.0))
    }
}

impl fmt::Debug for VerityDigest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "verity:{}", hex::encode(self.0))
    }
}

macro_rules! serde_via_str {
    ($t:ty) => {
        impl Serialize for $t {
            fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.collect_str(self)
            }
        }
        impl<'de> Deserialize<'de> for $t {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
                s.parse().map_err(serde::de::Error::custom)
            }
        }
    };
}
serde_via_str!(OciDigest);
serde_via_str!(VerityDigest);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn oci_digest_round_trips_and_rejects_bad_forms() {
        let d = OciDigest::of(b"hello");
        let text = d.to_string();
        assert_eq!(text, "sha256:2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824");
        assert_eq!(text.parse::<OciDigest>().unwrap(), d);
        for bad in [
            "2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824",
            "sha512:2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824",
            "sha256:2CF24DBA5FB0A30E26E83B2AC5B9E29E1B161E5C1FA7425E73043362938B9824",
            "sha256:2cf2",
            "sha256:../../../../etc/passwd",
        ] {
            assert!(bad.parse::<OciDigest>().is_err(), "{bad} accepted");
        }
    }

    #[test]
    fn verity_digest_has_no_prefix_and_a_store_path() {
        let hex = "ab".repeat(32);
        let d: VerityDigest = hex.parse().unwrap();
        assert_eq!(d.to_string(), hex);
        assert_eq!(d.object_path(), format!("ab/{}", "ab".repeat(31)));
        assert!(format!("sha256:{hex}").parse::<VerityDigest>().is_err());
        assert!("../etc".parse::<VerityDigest>().is_err());
    }

    #[test]
    fn the_two_kinds_do_not_deserialize_as_each_other() {
        let oci = serde_json::to_string(&OciDigest::of(b"x")).unwrap();
        assert!(serde_json::from_str::<VerityDigest>(&oci).is_err());
        let verity = serde_json::to_string(&VerityDigest::new([1; 32])).unwrap();
        assert!(serde_json::from_str::<OciDigest>(&verity).is_err());
    }
}
