//! Where a module lives: `oci:DIR[:TAG|@sha256:…]` for an OCI image layout directory, anything
//! else a registry reference (`host[:port]/repo[:tag][@sha256:…]`).

use std::path::PathBuf;

use ironroot_contract::OciDigest;
use oci_client::Reference;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    Registry(Reference),
    Layout { dir: PathBuf, tag: Option<String>, digest: Option<OciDigest> },
}

#[derive(Debug, thiserror::Error)]
pub enum ReferenceError {
    #[error("reference {0:?} does not parse: {1}")]
    Registry(String, String),
    #[error("reference {0:?}: {1}")]
    Digest(String, ironroot_contract::DigestError),
    #[error("reference {0:?} names no directory")]
    NoDir(String),
}

impl Target {
    pub fn parse(s: &str) -> Result<Self, ReferenceError> {
        if let Some(rest) = s.strip_prefix("oci:") {
            let (rest, digest) = match rest.rsplit_once('@') {
                Some((r, d)) => (r, Some(d.parse().map_err(|e| ReferenceError::Digest(s.into(), e))?)),
                None => (rest, None),
            };
            // A tag is whatever follows the last ':' after the last '/'.
            let slash = rest.rfind('/').map_or(0, |i| i + 1);
            let (dir, tag) = match rest[slash..].rfind(':') {
                Some(i) => (&rest[..slash + i], Some(rest[slash + i + 1..].to_owned())),
                None => (rest, None),
            };
            if dir.is_empty() {
                return Err(ReferenceError::NoDir(s.into()));
            }
            return Ok(Self::Layout { dir: dir.into(), tag, digest });
        }
        let r: Reference =
            s.parse().map_err(|e: oci_client::ParseError| ReferenceError::Registry(s.into(), e.to_string()))?;
        if let Some(d) = r.digest() {
            d.parse::<OciDigest>().map_err(|e| ReferenceError::Digest(s.into(), e))?;
        }
        Ok(Self::Registry(r))
    }

    /// The digest the reference pins, if any.
    pub fn digest(&self) -> Option<OciDigest> {
        match self {
            Self::Registry(r) => r.digest().and_then(|d| d.parse().ok()),
            Self::Layout { digest, .. } => *digest,
        }
    }

    /// The tag, if the reference has one and no digest overrides it.
    pub fn tag(&self) -> Option<&str> {
        match self {
            Self::Registry(r) => r.tag(),
            Self::Layout { tag, .. } => tag.as_deref(),
        }
    }

    /// The same place pinned to `digest` (tag dropped).
    pub fn with_digest(&self, digest: OciDigest) -> Self {
        match self {
            Self::Registry(r) => Self::Registry(Reference::with_digest(
                r.registry().to_owned(),
                r.repository().to_owned(),
                digest.to_string(),
            )),
            Self::Layout { dir, .. } => Self::Layout { dir: dir.clone(), tag: None, digest: Some(digest) },
        }
    }

    /// `registry/repository` (what cosign puts in `docker-reference`), or the layout directory.
    pub fn repository(&self) -> String {
        match self {
            Self::Registry(r) => format!("{}/{}", r.registry(), r.repository()),
            Self::Layout { dir, .. } => format!("oci:{}", dir.display()),
        }
    }
}

impl std::fmt::Display for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Registry(r) => {
                write!(f, "{}/{}", r.registry(), r.repository())?;
                if let Some(d) = r.digest() {
                    write!(f, "@{d}")
                } else if let Some(t) = r.tag() {
                    write!(f, ":{t}")
                } else {
                    Ok(())
                }
            }
            Self::Layout { dir, tag, digest } => {
                write!(f, "oci:{}", dir.display())?;
                if let Some(d) = digest {
                    write!(f, "@{d}")
                } else if let Some(t) = tag {
                    write!(f, ":{t}")
                } else {
                    Ok(())
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layouts_and_registries() {
        let d = OciDigest::of(b"x");
        assert_eq!(
            Target::parse("oci:/tmp/a:b/lay:v1").unwrap(),
            Target::Layout { dir: "/tmp/a:b/lay".into(), tag: Some("v1".into()), digest: None }
        );
        assert_eq!(
            Target::parse(&format!("oci:rel/dir@{d}")).unwrap(),
            Target::Layout { dir: "rel/dir".into(), tag: None, digest: Some(d) }
        );
        let r = Target::parse("127.0.0.1:5000/ironroot/base:1.0").unwrap();
        assert_eq!(r.tag(), Some("1.0"));
        assert_eq!(r.repository(), "127.0.0.1:5000/ironroot/base");
        assert_eq!(r.with_digest(d).to_string(), format!("127.0.0.1:5000/ironroot/base@{d}"));
        assert!(Target::parse("127.0.0.1:5000/x@sha256:abc").is_err());
        assert!(Target::parse("oci::tag").is_err());
    }
}
