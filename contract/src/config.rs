//! The module config blob: what a module is, which serial it carries (rollback protection), and
//! the composefs digest that ties the signed manifest to the kernel-enforced image.

use serde::{Deserialize, Serialize};

use crate::digest::VerityDigest;

/// The only config schema this build understands; anything else is refused, not guessed at.
pub const CONFIG_SCHEMA_VERSION: u32 = 1;

/// Where a module is mounted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MountRole {
    /// The root filesystem (`/sbin/init` lives here).
    Root,
    /// An extension layered over `/usr`.
    Usr,
    /// An extension layered over `/opt`.
    Opt,
}

impl std::str::FromStr for MountRole {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "root" => Ok(Self::Root),
            "usr" => Ok(Self::Usr),
            "opt" => Ok(Self::Opt),
            _ => Err(format!("mount role {s:?} is not one of root, usr, opt")),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ModuleConfig {
    pub schema_version: u32,
    pub name: String,
    pub version: String,
    /// Monotonic per module name; an agent refuses a serial below the highest it accepted.
    pub serial: u64,
    /// fs-verity digest of layer 0 (the EROFS image).
    pub composefs_digest: VerityDigest,
    /// Distinct objects the image references, and their total size in bytes.
    pub objects: u64,
    pub object_bytes: u64,
    pub role: MountRole,
    /// systemd units to restart when this module is updated in place.
    #[serde(default)]
    pub restart_units: Vec<String>,
    /// RFC 3339 UTC creation time; fixed by the builder for reproducible output.
    pub created: String,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    #[error("module config is not valid JSON for schema {CONFIG_SCHEMA_VERSION}: {0}")]
    Json(String),
    #[error("module config schema {0} is not supported (this build reads {CONFIG_SCHEMA_VERSION})")]
    Schema(u32),
    #[error("module config field {field}: {reason}")]
    Field { field: &'static str, reason: String },
}

/// Module names: lowercase, digits, `.`, `_`, `-`; 1–64 characters, starting alphanumeric.
pub fn validate_name(name: &str) -> Result<(), ConfigError> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name.bytes().next().is_some_and(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
        && name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(ConfigError::Field {
            field: "name",
            reason: format!("{name:?} must be 1-64 of [a-z0-9._-], starting with [a-z0-9]"),
        })
    }
}

/// Versions: 1–128 printable ASCII characters without spaces.
pub fn validate_version(version: &str) -> Result<(), ConfigError> {
    if !version.is_empty() && version.len() <= 128 && version.bytes().all(|b| b.is_ascii_graphic()) {
        Ok(())
    } else {
        Err(ConfigError::Field {
            field: "version",
            reason: format!("{version:?} must be 1-128 printable ASCII characters"),
        })
    }
}

fn validate_unit(unit: &str) -> Result<(), ConfigError> {
    let suffixes = [".service", ".socket", ".target", ".timer", ".mount", ".path"];
    let ok = unit.len() <= 256
        && suffixes.iter().any(|s| unit.len() > s.len() && unit.ends_with(s))
        && unit.bytes().all(|b| b.is_ascii_alphanumeric() || b":-_.@\\".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(ConfigError::Field { field: "restartUnits", reason: format!("{unit:?} is not a unit name") })
    }
}

fn validate_created(created: &str) -> Result<(), ConfigError> {
    let b = created.as_bytes();
    let digits = |r: std::ops::Range<usize>| r.into_iter().all(|i| b[i].is_ascii_digit());
    let ok = b.len() == 20
        && digits(0..4)
        && b[4] == b'-'
        && digits(5..7)
        && b[7] == b'-'
        && digits(8..10)
        && b[10] == b'T'
        && digits(11..13)
        && b[13] == b':'
        && digits(14..16)
        && b[16] == b':'
        && digits(17..19)
        && b[19] == b'Z';
    if ok {
        Ok(())
    } else {
        Err(ConfigError::Field { field: "created", reason: format!("{created:?} is not YYYY-MM-DDTHH:MM:SSZ") })
    }
}

impl ModuleConfig {
    /// Checks every field; a config that passes is one the agent can act on.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.schema_version != CONFIG_SCHEMA_VERSION {
            return Err(ConfigError::Schema(self.schema_version));
        }
        validate_name(&self.name)?;
        validate_version(&self.version)?;
        validate_created(&self.created)?;
        self.restart_units.iter().try_for_each(|u| validate_unit(u))?;
        if self.objects > 0 && self.object_bytes == 0 {
            return Err(ConfigError::Field {
                field: "objectBytes",
                reason: "objects are listed but their size is zero".into(),
            });
        }
        Ok(())
    }

    /// Parses and validates a config blob.
    pub fn parse(bytes: &[u8]) -> Result<Self, ConfigError> {
        let config: Self = serde_json::from_slice(bytes).map_err(|e| ConfigError::Json(e.to_string()))?;
        config.validate()?;
        Ok(config)
    }

    /// The canonical bytes of this config (field order fixed by the struct; no whitespace).
    pub fn to_bytes(&self) -> Vec<u8> {
        serde_json::to_vec(self).unwrap_or_default()
    }
}

/// Formats seconds since the epoch as RFC 3339 UTC (`1970-01-01T00:00:00Z`).
pub fn format_epoch(secs: u64) -> String {
    let days = secs / 86_400;
    let rem = secs % 86_400;
    // Civil-from-days (Howard Hinnant's algorithm), valid for every u64 day count we can meet.
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!("{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z", rem / 3600, rem % 3600 / 60, rem % 60)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> ModuleConfig {
        ModuleConfig {
            schema_version: 1,
            name: "base".into(),
            version: "1.0".into(),
            serial: 3,
            composefs_digest: VerityDigest::new([7; 32]),
            objects: 2,
            object_bytes: 100,
            role: MountRole::Root,
            restart_units: vec!["ironroot-agent.service".into()],
            created: format_epoch(0),
        }
    }

    #[test]
    fn round_trips_and_refuses_unknown_fields() {
        let c = sample();
        assert_eq!(ModuleConfig::parse(&c.to_bytes()).unwrap(), c);
        let mut v: serde_json::Value = serde_json::from_slice(&c.to_bytes()).unwrap();
        v["extra"] = 1.into();
        let err = ModuleConfig::parse(v.to_string().as_bytes()).unwrap_err();
        assert!(err.to_string().contains("unknown field `extra`"), "{err}");
    }

    #[test]
    fn refuses_bad_fields_by_name() {
        type Case = (fn(&mut ModuleConfig), &'static str);
        let cases: Vec<Case> = vec![
            (|c| c.name = "../etc".into(), "name"),
            (|c| c.name = "Base".into(), "name"),
            (|c| c.version = "1 0".into(), "version"),
            (|c| c.created = "yesterday".into(), "created"),
            (|c| c.restart_units = vec!["../x".into()], "restartUnits"),
            (|c| c.schema_version = 2, "schema 2"),
        ];
        for (mutate, needle) in cases {
            let mut c = sample();
            mutate(&mut c);
            let err = c.validate().unwrap_err().to_string();
            assert!(err.contains(needle), "{err} should name {needle}");
        }
    }

    #[test]
    fn epoch_formatting() {
        assert_eq!(format_epoch(0), "1970-01-01T00:00:00Z");
        assert_eq!(format_epoch(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(format_epoch(1_767_225_599), "2025-12-31T23:59:59Z");
    }
}
