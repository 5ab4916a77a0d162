//! What the plane reads from a registry before a module may enter a channel or a template: the
//! reference resolved to a manifest digest (bounded reads; `serve --registry-ca` trusted), a
//! signature over that digest by one of the plane's trust keys (`serve --trust`), and the
//! module's signed config for its name, version, serial and role. Nothing else is downloaded:
//! nodes verify the image and packs themselves. Module references as operators type them
//! (`REPO:CHANNEL`, `REPO@sha256:…[,serial=N]`) are parsed here too.

use ironroot_contract::config::MountRole;
use ironroot_contract::{OciDigest, TrustedKey};
use ironroot_oci::Target;
use ironroot_oci::registry::Registry;
use ironroot_oci::source::RegistrySource;
use ironroot_oci::verify::{FailureKind, VerifyError, verify_signed_config};
use ironroot_oci::{Limits, RegistryAccess, VerifyOptions};
use serde::Serialize;

use crate::store::Refusal;

/// Trust keys and registry access for verifying modules before they are published.
#[derive(Clone)]
pub struct Publisher {
    trust: Vec<TrustedKey>,
    access: RegistryAccess,
    limits: Limits,
    /// Registry name → the address the plane reads it at (`serve --registry-alias`).
    aliases: std::collections::BTreeMap<String, String>,
}

impl std::fmt::Debug for Publisher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let keys: Vec<&str> = self.trust.iter().map(TrustedKey::id).collect();
        write!(f, "Publisher(trust {keys:?}, {} registry CAs)", self.access.ca_pem.len())
    }
}

/// A module whose signature and config the plane checked.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Published {
    /// `registry/repository`.
    pub repo: String,
    pub digest: OciDigest,
    pub name: String,
    pub version: String,
    pub serial: u64,
    pub role: MountRole,
}

/// What a module reference names: the position of a channel, or one manifest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ModuleRef {
    Channel {
        repo: String,
        channel: String,
    },
    /// `serial`: the `,serial=N` an operator typed (a floor when the plane verifies, the
    /// served serial when it cannot).
    Digest {
        repo: String,
        digest: OciDigest,
        serial: Option<u64>,
    },
}

fn bad(code: &'static str, message: String) -> Refusal {
    Refusal::new(400, code, message)
}

/// Checks `repo` is `registry[:port]/repository` as a registry reference spells it (no tag, no
/// digest, no OCI layout), and returns (registry, repository).
pub fn split_repo(repo: &str) -> Result<(String, String), Refusal> {
    let refused = || bad("bad_module", format!("{repo:?} is not a registry repository like REGISTRY/PATH"));
    if repo.starts_with("oci:") || repo.contains('@') || !repo.contains('/') || repo.len() > 255 {
        return Err(refused());
    }
    match Target::parse(&format!("{repo}:x")) {
        Ok(Target::Registry(r)) if format!("{}/{}", r.registry(), r.repository()) == repo => {
            Ok((r.registry().to_owned(), r.repository().to_owned()))
        }
        _ => Err(refused()),
    }
}

/// Channel names: `[a-z0-9][a-z0-9._-]{0,63}`.
pub fn check_channel(channel: &str) -> Result<(), Refusal> {
    let b = channel.as_bytes();
    let ok = (1..=64).contains(&b.len())
        && (b[0].is_ascii_lowercase() || b[0].is_ascii_digit())
        && b.iter().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, b'.' | b'_' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(bad("bad_channel", format!("channel {channel:?} must be 1-64 characters of a-z, 0-9, '.', '_', '-'")))
    }
}

/// Where in a repository: a tag (resolved once, by the plane) or a manifest digest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum At {
    Tag(String),
    Digest(OciDigest),
}

impl At {
    /// `TAG` (the OCI tag grammar) or `sha256:…`.
    pub fn parse(s: &str) -> Result<Self, Refusal> {
        if s.starts_with("sha256:") {
            return s
                .parse()
                .map(Self::Digest)
                .map_err(|e: ironroot_contract::DigestError| bad("bad_module", e.to_string()));
        }
        let b = s.as_bytes();
        let ok = (1..=128).contains(&b.len())
            && (b[0].is_ascii_alphanumeric() || b[0] == b'_')
            && b.iter().all(|c| c.is_ascii_alphanumeric() || matches!(c, b'.' | b'_' | b'-'));
        if ok {
            Ok(Self::Tag(s.to_owned()))
        } else {
            Err(bad("bad_module", format!("{s:?} is neither a tag nor sha256:…")))
        }
    }

    /// `repo:tag` or `repo@digest`.
    pub fn show(&self, repo: &str) -> String {
        match self {
            Self::Tag(t) => format!("{repo}:{t}"),
            Self::Digest(d) => format!("{repo}@{d}"),
        }
    }
}

/// Parses `REPO:CHANNEL` or `REPO@sha256:…[,serial=N]`.
pub fn parse_module_ref(arg: &str) -> Result<ModuleRef, Refusal> {
    let (reference, serial) = match arg.split_once(",serial=") {
        Some((r, s)) => {
            (r, Some(s.parse::<u64>().map_err(|_| bad("bad_module", format!("serial in {arg:?} is not a number")))?))
        }
        None => (arg, None),
    };
    if let Some((repo, digest)) = reference.split_once('@') {
        split_repo(repo)?;
        let digest = digest.parse().map_err(|e: ironroot_contract::DigestError| bad("bad_module", e.to_string()))?;
        return Ok(ModuleRef::Digest { repo: repo.to_owned(), digest, serial });
    }
    // The channel is what follows the last ':' after the last '/' (a port comes before it).
    let slash = reference.rfind('/').map_or(0, |i| i + 1);
    let Some(colon) = reference[slash..].rfind(':').map(|i| slash + i) else {
        return Err(bad("bad_module", format!("{reference:?} names neither a channel (REPO:CHANNEL) nor a digest")));
    };
    if serial.is_some() {
        return Err(bad("bad_module", format!("{arg:?}: serial=N goes with a digest pin, not a channel")));
    }
    let (repo, channel) = (&reference[..colon], &reference[colon + 1..]);
    split_repo(repo)?;
    check_channel(channel)?;
    Ok(ModuleRef::Channel { repo: repo.to_owned(), channel: channel.to_owned() })
}

/// An error and its causes on one line (the registry's and the verifier's messages keep their
/// sources apart).
fn chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut next = e.source();
    while let Some(s) = next {
        out.push_str(": ");
        out.push_str(&s.to_string());
        next = s.source();
    }
    out
}

impl Publisher {
    pub fn new(trust: Vec<TrustedKey>, access: RegistryAccess) -> Self {
        Self { trust, access, limits: Limits::standard(), aliases: Default::default() }
    }

    /// Reads of registry NAME go to its address instead (`serve --registry-alias NAME=ADDR`).
    pub fn with_aliases(mut self, aliases: impl IntoIterator<Item = (String, String)>) -> Self {
        self.aliases.extend(aliases);
        self
    }

    /// Whether the plane has keys to verify modules with.
    pub fn verifies(&self) -> bool {
        !self.trust.is_empty()
    }

    /// Resolves `repo` at a tag or digest and verifies its signature and config.
    pub async fn verify(&self, repo: &str, at: &At) -> Result<Published, Refusal> {
        let shown = at.show(repo);
        if !self.verifies() {
            return Err(Refusal::new(
                409,
                "no_trust",
                format!("the plane has no trust keys (serve --trust KEY.pub), so it cannot verify {shown}"),
            ));
        }
        let (name, repository) = split_repo(repo)?;
        let (host, shown) = match self.aliases.get(&name) {
            Some(addr) => (addr.clone(), format!("{shown} (read at {addr})")),
            None => (name, shown),
        };
        let registry = Registry::open(&host, &self.access)
            .map_err(|e| Refusal::new(502, "registry", format!("opening the registry of {shown}: {}", chain(&e))))?;
        let src = RegistrySource { registry, host, repository };
        let opts = VerifyOptions { trust: self.trust.clone(), min_serial: None, limits: self.limits.clone() };
        let (tag, digest) = match at {
            At::Tag(t) => (Some(t.as_str()), None),
            At::Digest(d) => (None, Some(*d)),
        };
        let signed = verify_signed_config(&src, tag, digest, &opts).await.map_err(|e| refusal(&shown, &e))?;
        let config = signed.config();
        Ok(Published {
            repo: repo.to_owned(),
            digest: signed.digest(),
            name: config.name.clone(),
            version: config.version.clone(),
            serial: config.serial,
            role: config.role,
        })
    }
}

fn refusal(shown: &str, e: &VerifyError) -> Refusal {
    let why = chain(e);
    match (e, e.kind()) {
        (VerifyError::NotFound(_), _) => {
            Refusal::new(404, "unknown_reference", format!("{shown}: no such tag or manifest in the registry"))
        }
        (_, FailureKind::Signature) => Refusal::new(400, "bad_signature", format!("{shown}: {why}")),
        (_, FailureKind::Content | FailureKind::Policy) => Refusal::new(400, "bad_module", format!("{shown}: {why}")),
        (_, FailureKind::Transport | FailureKind::Local) => Refusal::new(502, "registry", format!("{shown}: {why}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn module_references() {
        let d = OciDigest::of(b"m");
        assert_eq!(
            parse_module_ref("127.0.0.1:5000/ironroot/web:stable").unwrap(),
            ModuleRef::Channel { repo: "127.0.0.1:5000/ironroot/web".into(), channel: "stable".into() }
        );
        assert_eq!(
            parse_module_ref(&format!("127.0.0.1:5000/ironroot/web@{d},serial=4")).unwrap(),
            ModuleRef::Digest { repo: "127.0.0.1:5000/ironroot/web".into(), digest: d, serial: Some(4) }
        );
        for bad in [
            "127.0.0.1:5000/ironroot/web",
            "web:stable",
            "oci:/tmp/lay:stable",
            "127.0.0.1:5000/ironroot/web:Stable",
            "127.0.0.1:5000/ironroot/web:stable,serial=3",
            "127.0.0.1:5000/ironroot/web@sha256:abc",
            "127.0.0.1:5000/Iron/web:stable",
        ] {
            assert!(parse_module_ref(bad).is_err(), "{bad}");
        }
        assert_eq!(At::parse("v1.2_x").unwrap(), At::Tag("v1.2_x".into()));
        assert_eq!(At::parse(&d.to_string()).unwrap(), At::Digest(d));
        assert!(At::parse("-x").is_err() && At::parse("a/b").is_err());
    }
}
