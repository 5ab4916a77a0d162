//! What the discovered strings mean: validated, typed boot settings. Paths in values are inside
//! the boot root (the initramfs); `plane_ca` and `trust` may also be inline PEM (fw_cfg,
//! metadata). Nothing here has a `Default`: a setting is either given, or has a documented
//! default in docs/interfaces/kernel-cmdline.md.

use std::path::Path;
use std::time::Duration;

use ironroot_contract::TrustedKey;
use ironroot_contract::wire::Identity;

use ironroot_contract::run_state::{DEFAULT_HEARTBEAT, HEARTBEAT_SECONDS};

use crate::external;
use crate::identity::discover::Discovered;
pub use crate::store::{StoreKind, VerityPolicy};

/// What to do when the boot fails.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnFailure {
    Reboot,
    Halt,
}

#[derive(Debug, Clone)]
pub struct BootSettings {
    /// `https://host:port`.
    pub plane: String,
    pub token: Option<String>,
    pub plane_ca_pem: String,
    pub trust: Vec<TrustedKey>,
    pub store: StoreKind,
    pub on_failure: OnFailure,
    pub verity: VerityPolicy,
    /// A module pinned by digest to boot when the plane assigns none.
    pub module: Option<String>,
    pub debug: bool,
    /// Between the service's heartbeats; carried to it in boot.json.
    pub heartbeat: Duration,
    /// What the node tells the plane about itself at enrollment.
    pub identity: Identity,
}

#[derive(Debug, thiserror::Error)]
pub enum SettingsError {
    #[error("no {0} from any identity source")]
    Missing(&'static str),
    #[error("{key} {value:?}: {reason}")]
    Invalid { key: &'static str, value: String, reason: String },
    #[error("{key}")]
    File { key: &'static str, source: external::ReadError },
}

fn invalid(key: &'static str, value: &str, reason: impl Into<String>) -> SettingsError {
    SettingsError::Invalid { key, value: value.chars().take(80).collect(), reason: reason.into() }
}

/// Reads an inline PEM value as is, or a path inside `root`.
fn pem_value(root: &Path, key: &'static str, value: &str) -> Result<String, SettingsError> {
    if value.starts_with("-----BEGIN ") {
        return Ok(value.to_owned());
    }
    let path = root.join(value.trim_start_matches('/'));
    let bytes =
        crate::identity::discover::read_value_file(&path).map_err(|source| SettingsError::File { key, source })?;
    String::from_utf8(bytes).map_err(|_| invalid(key, value, "is not UTF-8 PEM"))
}

/// Every PEM public key in `pem` (one or more blocks).
fn trust_keys(pem: &str) -> Result<Vec<TrustedKey>, String> {
    let mut keys = Vec::new();
    let mut rest = pem;
    while let Some(start) = rest.find("-----BEGIN ") {
        let end_marker = rest[start..].find("-----END ").ok_or("a PEM block has no END line")?;
        let tail = &rest[start + end_marker..];
        let close = tail[9..].find("-----").ok_or("a PEM END line is cut")? + 9 + 5;
        let block = &rest[start..start + end_marker + close];
        keys.push(TrustedKey::parse_pem(block).map_err(|e| e.to_string())?);
        rest = &rest[start + end_marker + close..];
    }
    if keys.is_empty() {
        return Err("holds no PEM public key".into());
    }
    Ok(keys)
}

/// Validates the discovered values into settings; `root` resolves file values.
pub fn settings(found: &Discovered, root: &Path) -> Result<BootSettings, SettingsError> {
    let plane = found.get("plane").ok_or(SettingsError::Missing("plane"))?;
    let host = plane.strip_prefix("https://").ok_or_else(|| invalid("plane", plane, "is not an https:// URL"))?;
    if host.is_empty() || host.trim_end_matches('/').contains('/') {
        return Err(invalid("plane", plane, "must be https://HOST:PORT with no path"));
    }
    let plane_ca_pem = pem_value(root, "plane_ca", found.get("plane_ca").ok_or(SettingsError::Missing("plane_ca"))?)?;
    if !plane_ca_pem.contains("-----BEGIN CERTIFICATE-----") {
        return Err(invalid("plane_ca", found.get("plane_ca").unwrap_or(""), "holds no PEM certificate"));
    }
    let trust_value = found.get("trust").ok_or(SettingsError::Missing("trust"))?;
    let mut trust = Vec::new();
    if trust_value.starts_with("-----BEGIN ") {
        trust = trust_keys(trust_value).map_err(|e| invalid("trust", trust_value, e))?;
    } else {
        for path in trust_value.split(',') {
            let pem = pem_value(root, "trust", path)?;
            trust.extend(trust_keys(&pem).map_err(|e| invalid("trust", path, e))?);
        }
    }
    let store = match found.get("store").unwrap_or("zram") {
        "zram" => StoreKind::Zram,
        "tmpfs-insecure" => StoreKind::TmpfsInsecure,
        v => match v.split_once(':') {
            Some(("disk", dev)) if dev.starts_with("/dev/") => StoreKind::Disk(dev.into()),
            Some(("dir", dir)) if dir.starts_with('/') => StoreKind::Dir(dir.into()),
            _ => return Err(invalid("store", v, "is not zram, disk:/dev/…, dir:/… or tmpfs-insecure")),
        },
    };
    let on_failure = match found.get("on_failure").unwrap_or("reboot") {
        "reboot" => OnFailure::Reboot,
        "halt" => OnFailure::Halt,
        v => return Err(invalid("on_failure", v, "is not reboot or halt")),
    };
    let verity = match found.get("verity").unwrap_or("require") {
        "require" => VerityPolicy::Require,
        "optional" => VerityPolicy::Optional,
        v => return Err(invalid("verity", v, "is not require or optional")),
    };
    let module = found.get("module").map(str::to_owned);
    if let Some(m) = &module
        && !m.contains("@sha256:")
    {
        return Err(invalid("module", m, "must be pinned by digest (REF@sha256:…)"));
    }
    let debug = match found.get("debug").unwrap_or("0") {
        "1" => true,
        "0" => false,
        v => return Err(invalid("debug", v, "is not 0 or 1")),
    };
    let heartbeat = match found.get("heartbeat") {
        None => DEFAULT_HEARTBEAT,
        Some(v) => match v.parse::<u64>() {
            Ok(secs) if HEARTBEAT_SECONDS.contains(&secs) => Duration::from_secs(secs),
            _ => return Err(invalid("heartbeat", v, "is not 1..=3600 seconds")),
        },
    };
    let identity = Identity {
        name: found.get("node").map(str::to_owned),
        mac: found.get("mac").map(str::to_owned),
        smbios_uuid: found.get("smbios_uuid").map(str::to_owned),
        serial: found.get("serial").map(str::to_owned),
    };
    Ok(BootSettings {
        plane: plane.trim_end_matches('/').to_owned(),
        token: found.get("token").map(str::to_owned),
        plane_ca_pem,
        trust,
        store,
        on_failure,
        verity,
        module,
        debug,
        heartbeat,
        identity,
    })
}

#[cfg(test)]
mod tests {
    use ironroot_contract::{KeyAlgorithm, SigningKey};

    use super::*;
    use crate::identity::discover::Source;

    const CA: &str = "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n";

    fn found(pairs: &[(&str, &str)]) -> Discovered {
        let mut d = Discovered::default();
        for (k, v) in pairs {
            d.offer(k, (*v).to_owned(), Source::Cmdline);
        }
        d
    }

    #[test]
    fn settings_validate_with_documented_defaults() {
        let root = tempfile::tempdir().unwrap();
        let pem = |alg| SigningKey::generate(alg).public_pem().unwrap();
        let (ed, p256) = (pem(KeyAlgorithm::Ed25519), pem(KeyAlgorithm::P256));
        std::fs::write(root.path().join("a.pub"), &ed).unwrap();
        std::fs::write(root.path().join("b.pub"), &p256).unwrap();
        let base = [("plane", "https://10.0.2.2:8443/"), ("plane_ca", CA), ("trust", "/a.pub,/b.pub")];
        let s = settings(&found(&base), root.path()).unwrap();
        assert_eq!(s.plane, "https://10.0.2.2:8443");
        assert_eq!(s.trust.len(), 2);
        assert_eq!(
            (s.store, s.verity, s.on_failure, s.debug, s.heartbeat),
            (StoreKind::Zram, VerityPolicy::Require, OnFailure::Reboot, false, Duration::from_secs(30))
        );
        let inline = settings(&found(&[base[0], base[1], ("trust", &format!("{ed}{p256}"))]), root.path()).unwrap();
        assert_eq!(inline.trust.len(), 2, "several inline PEM keys");

        let bad: &[(&[(&str, &str)], &str)] = &[
            (&[base[1], base[2]], "no plane"),
            (&[("plane", "http://x:1"), base[1], base[2]], "is not an https:// URL"),
            (&[("plane", "https://x:1/api"), base[1], base[2]], "no path"),
            (&[base[0], base[2]], "no plane_ca"),
            (&[base[0], ("plane_ca", "/missing.pem"), base[2]], "does not exist"),
            (&[base[0], base[1], ("trust", "/missing.pub")], "does not exist"),
            (&[base[0], base[1], ("trust", CA)], "trust"),
            (&[base[0], base[1], base[2], ("store", "nvme")], "is not zram"),
            (&[base[0], base[1], base[2], ("store", "disk:sda")], "is not zram"),
            (&[base[0], base[1], base[2], ("verity", "off")], "is not require or optional"),
            (&[base[0], base[1], base[2], ("on_failure", "panic")], "is not reboot or halt"),
            (&[base[0], base[1], base[2], ("module", "reg/x:latest")], "pinned by digest"),
            (&[base[0], base[1], base[2], ("debug", "true")], "is not 0 or 1"),
            (&[base[0], base[1], base[2], ("heartbeat", "0")], "heartbeat \"0\": is not 1..=3600 seconds"),
            (&[base[0], base[1], base[2], ("heartbeat", "3601")], "is not 1..=3600 seconds"),
            (&[base[0], base[1], base[2], ("heartbeat", "1m")], "is not 1..=3600 seconds"),
        ];
        for (pairs, needle) in bad {
            let err = crate::exit::describe(&settings(&found(pairs), root.path()).unwrap_err());
            assert!(err.contains(needle), "{needle:?} not in {err:?}");
        }
    }

    #[test]
    fn on_failure_debug_and_heartbeat_count_from_every_source() {
        let root = tempfile::tempdir().unwrap();
        let trust = SigningKey::generate(KeyAlgorithm::Ed25519).public_pem().unwrap();
        for source in [Source::Cmdline, Source::FwCfg, Source::Smbios, Source::Metadata, Source::File] {
            let mut d = found(&[("plane", "https://10.0.2.2:8443"), ("plane_ca", CA), ("trust", &trust)]);
            for (k, v) in [("on_failure", "halt"), ("debug", "1"), ("heartbeat", "3600")] {
                d.offer(k, v.to_owned(), source);
            }
            let s = settings(&d, root.path()).unwrap();
            assert_eq!((s.on_failure, s.debug, s.heartbeat), (OnFailure::Halt, true, Duration::from_secs(3600)));
        }
    }
}
