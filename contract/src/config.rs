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
    /// An extension mounted live at `/opt/<name>` (its tree is that directory's content).
    Opt,
    /// An extension mounted live at its declared `mountPoint`.
    Ext,
}

impl MountRole {
    /// Whether modules of this role are attached and updated while the node runs (each its own
    /// mount), rather than layered into the root at boot.
    pub fn is_live(self) -> bool {
        matches!(self, Self::Opt | Self::Ext)
    }
}

impl std::fmt::Display for MountRole {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Root => "root",
            Self::Usr => "usr",
            Self::Opt => "opt",
            Self::Ext => "ext",
        })
    }
}

impl std::str::FromStr for MountRole {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "root" => Ok(Self::Root),
            "usr" => Ok(Self::Usr),
            "opt" => Ok(Self::Opt),
            "ext" => Ok(Self::Ext),
            _ => Err(format!("mount role {s:?} is not one of root, usr, opt, ext")),
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
    // Fields below are absent from modules that do not use them, so those keep their bytes.
    /// Role `ext`: where the module is mounted (absolute, normalized).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mount_point: Option<String>,
    /// systemd units the module ships (`usr/lib/systemd/system/NAME` in its tree). Live roles:
    /// linked into `/run/systemd/system` and started when it is attached, restarted on update.
    /// Root and `usr`: units its root enables, which must be active for a root entered by soft
    /// reboot to pass its trial.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub units: Vec<String>,
    /// Live roles: the module's own health probe, on top of its units being active.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health: Option<HealthCheck>,
}

/// How a module says it is healthy after an attach or update.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct HealthCheck {
    /// A command (absolute path, no shell) that must exit 0.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub command: Vec<String>,
    /// An HTTP GET on 127.0.0.1 that must answer 2xx.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http: Option<HttpProbe>,
    /// Seconds the whole gate may take (units reaching `active`, settling, the probe).
    pub deadline_s: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpProbe {
    pub port: u16,
    pub path: String,
}

/// Health deadline when a module declares none (docs/interfaces/module-artifact.md).
pub const DEFAULT_HEALTH_DEADLINE_S: u64 = 60;

/// Directories an `ext` module may not be mounted on or under: the OS's own trees, kernel
/// interfaces, and ironroot's state.
const FORBIDDEN_MOUNTS: &[&str] = &[
    "/usr",
    "/etc",
    "/proc",
    "/sys",
    "/dev",
    "/run",
    "/boot",
    "/persist",
    "/sbin",
    "/bin",
    "/lib",
    "/var/lib/ironroot",
    // `opt` modules' own tree: an ext module there would shadow or sit on one of them.
    "/opt",
];

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
    if ok { Ok(()) } else { Err(ConfigError::Field { field: "units", reason: format!("{unit:?} is not a unit name") }) }
}

/// An `ext` mount point: absolute, normalized (no `.`, `..`, empty or trailing components),
/// at most 256 bytes of `A-Z a-z 0-9 . _ - /`, not `/` and not on or under the OS's own trees.
pub fn validate_mount_point(path: &str) -> Result<(), ConfigError> {
    let bad = |reason: &str| ConfigError::Field { field: "mountPoint", reason: format!("{path:?} {reason}") };
    if path.len() > 256 || !path.starts_with('/') || path == "/" {
        return Err(bad("must be an absolute path other than / (at most 256 bytes)"));
    }
    if !path.bytes().all(|b| b.is_ascii_alphanumeric() || b"._-/".contains(&b)) {
        return Err(bad("may hold only A-Z a-z 0-9 . _ - /"));
    }
    if path[1..].split('/').any(|c| c.is_empty() || c == "." || c == "..") {
        return Err(bad("is not normalized"));
    }
    if let Some(f) = FORBIDDEN_MOUNTS.iter().find(|f| path == **f || path.starts_with(&format!("{f}/"))) {
        return Err(bad(&format!("is on or under {f}, which ironroot does not mount extensions over")));
    }
    Ok(())
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
    /// Where a live module is mounted: `/opt/<name>` for `opt`, the declared point for `ext`.
    pub fn mount_point(&self) -> Option<String> {
        match self.role {
            MountRole::Opt => Some(format!("/opt/{}", self.name)),
            MountRole::Ext => self.mount_point.clone(),
            MountRole::Root | MountRole::Usr => None,
        }
    }

    /// Checks every field; a config that passes is one the agent can act on.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.schema_version != CONFIG_SCHEMA_VERSION {
            return Err(ConfigError::Schema(self.schema_version));
        }
        validate_name(&self.name)?;
        validate_version(&self.version)?;
        validate_created(&self.created)?;
        self.restart_units.iter().try_for_each(|u| validate_unit(u))?;
        self.units.iter().try_for_each(|u| validate_unit(u))?;
        let field = |field: &'static str, reason: &str| ConfigError::Field { field, reason: reason.to_owned() };
        match (self.role, &self.mount_point) {
            (MountRole::Ext, Some(m)) => validate_mount_point(m)?,
            (MountRole::Ext, None) => return Err(field("mountPoint", "role ext needs a mount point")),
            (_, Some(_)) => return Err(field("mountPoint", "only role ext declares a mount point")),
            (_, None) => {}
        }
        if !self.role.is_live() && self.health.is_some() {
            return Err(field(
                "health",
                "only live roles (opt, ext) ship a health check (a root is gated on its units)",
            ));
        }
        if let Some(h) = &self.health {
            if h.deadline_s == 0 || h.deadline_s > 3600 {
                return Err(field("health", "deadlineS must be 1 to 3600 seconds"));
            }
            if let Some(c) = h.command.first()
                && !c.starts_with('/')
            {
                return Err(field("health", "the command must be an absolute path (no shell, no PATH)"));
            }
            if h.command.iter().any(|a| a.len() > 4096 || a.contains('\0')) || h.command.len() > 64 {
                return Err(field("health", "the command has over 64 arguments, one over 4 KiB, or a NUL"));
            }
            if let Some(p) = &h.http
                && (p.port == 0
                    || !p.path.starts_with('/')
                    || p.path.len() > 1024
                    || p.path.chars().any(char::is_control))
            {
                return Err(field("health", "the HTTP probe needs a port and an absolute path"));
            }
        }
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
            mount_point: None,
            units: Vec::new(),
            health: None,
        }
    }

    #[test]
    fn fields_a_module_does_not_use_keep_its_bytes() {
        let bytes = String::from_utf8(sample().to_bytes()).unwrap();
        for absent in ["mountPoint", "units\"", "health"] {
            assert!(!bytes.contains(absent), "{absent} in {bytes}");
        }
    }

    #[test]
    fn live_roles_declare_where_they_mount_and_how_they_are_healthy() {
        let mut c = sample();
        c.role = MountRole::Ext;
        c.restart_units.clear();
        c.mount_point = Some("/srv/app".into());
        c.units = vec!["app.service".into()];
        c.health = Some(HealthCheck {
            command: vec!["/srv/app/bin/check".into()],
            http: Some(HttpProbe { port: 8080, path: "/healthz".into() }),
            deadline_s: 30,
        });
        assert_eq!(ModuleConfig::parse(&c.to_bytes()).unwrap(), c);
        assert_eq!(c.mount_point().as_deref(), Some("/srv/app"));
        c.role = MountRole::Opt;
        c.mount_point = None;
        assert_eq!(c.mount_point().as_deref(), Some("/opt/base"));
        for bad in ["srv", "/", "/srv/../etc", "/srv//a", "/srv/a/", "/usr/local", "/run/x", "/srv/a b", "/etc"] {
            assert!(validate_mount_point(bad).is_err(), "{bad}");
        }
        type Case = (fn(&mut ModuleConfig), &'static str);
        let cases: Vec<Case> = vec![
            (|c| c.role = MountRole::Ext, "role ext needs a mount point"),
            (|c| c.mount_point = Some("/srv/x".into()), "only role ext"),
            (|c| c.role = MountRole::Root, "only live roles (opt, ext) ship a health check"),
            (|c| c.health.as_mut().unwrap().deadline_s = 0, "deadlineS"),
            (|c| c.health.as_mut().unwrap().command = vec!["check".into()], "absolute path"),
            (|c| c.units = vec!["app".into()], "not a unit name"),
        ];
        for (mutate, needle) in cases {
            let mut m = c.clone();
            mutate(&mut m);
            let err = m.validate().unwrap_err().to_string();
            assert!(err.contains(needle), "{err} should say {needle}");
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
            (|c| c.restart_units = vec!["../x".into()], "not a unit name"),
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
