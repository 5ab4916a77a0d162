//! The kernel command line as the agent reads it: only `ironroot.*` keys matter, each at most
//! once, each known. Hostile input (over the x86 2048-byte limit, cut mid-quote, non-UTF-8,
//! duplicated or unknown ironroot keys, empty values, control characters in a value) is a clear
//! error naming the problem, never a panic and never a guess. Other keys (`console=`, `quiet`,
//! …) belong to others and are ignored.

use std::collections::BTreeMap;

use crate::external::{self, Links};

/// The x86 kernel's COMMAND_LINE_SIZE: a longer line was already cut by the kernel.
pub const MAX_CMDLINE: usize = 2048;

/// Every key the agent understands (docs/interfaces/kernel-cmdline.md).
pub const KEYS: &[&str] = &[
    "ironroot.plane",
    "ironroot.token",
    "ironroot.node",
    "ironroot.trust",
    "ironroot.plane_ca",
    "ironroot.store",
    "ironroot.on_failure",
    "ironroot.module",
    "ironroot.debug",
    "ironroot.verity",
    "ironroot.metadata",
    "ironroot.heartbeat",
    "ironroot.nic",
];

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CmdlineError {
    #[error("kernel command line is over the {MAX_CMDLINE}-byte limit (it was cut)")]
    TooLong,
    #[error("kernel command line is not UTF-8 (at byte {0})")]
    NotUtf8(usize),
    #[error("kernel command line ends inside a quoted value")]
    UnterminatedQuote,
    #[error("{0} appears more than once")]
    Duplicate(String),
    #[error("{0} is not an ironroot key (known: {known})", known = KEYS.join(", "))]
    Unknown(String),
    #[error("{0} has an empty value")]
    Empty(String),
    /// A NUL, escape, tab or newline (inside quotes) in a value: no identity value holds one,
    /// and the identity document and SMBIOS refuse them too.
    #[error("{0} holds control characters")]
    Control(String),
}

/// The `ironroot.*` keys, by name.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Cmdline {
    values: BTreeMap<String, String>,
}

impl Cmdline {
    pub fn get(&self, key: &str) -> Option<&str> {
        self.values.get(key).map(String::as_str)
    }

    pub fn keys(&self) -> impl Iterator<Item = &str> {
        self.values.keys().map(String::as_str)
    }
}

/// Splits like the kernel does: whitespace separates parameters, double quotes group spaces
/// into a value and are removed.
fn split(line: &str) -> Result<Vec<String>, CmdlineError> {
    let mut out = Vec::new();
    let (mut cur, mut quoted, mut any) = (String::new(), false, false);
    for c in line.chars() {
        match c {
            '"' => {
                quoted = !quoted;
                any = true;
            }
            c if c.is_whitespace() && !quoted => {
                if any {
                    out.push(std::mem::take(&mut cur));
                    any = false;
                }
            }
            c => {
                cur.push(c);
                any = true;
            }
        }
    }
    if quoted {
        return Err(CmdlineError::UnterminatedQuote);
    }
    if any {
        out.push(cur);
    }
    Ok(out)
}

/// Parses a command line (the bytes of `/proc/cmdline`).
pub fn parse_cmdline(bytes: &[u8]) -> Result<Cmdline, CmdlineError> {
    let line = std::str::from_utf8(bytes).map_err(|e| CmdlineError::NotUtf8(e.valid_up_to()))?;
    let line = line.trim_end_matches(['\n', '\0']);
    if line.len() > MAX_CMDLINE {
        return Err(CmdlineError::TooLong);
    }
    let mut values = BTreeMap::new();
    for param in split(line)? {
        let (key, value) = param.split_once('=').unwrap_or((&param, ""));
        if !key.starts_with("ironroot.") {
            continue;
        }
        if !KEYS.contains(&key) {
            // Escaped: the key is hostile input on its way to a console.
            return Err(CmdlineError::Unknown(key.chars().take(64).flat_map(char::escape_debug).collect()));
        }
        if value.is_empty() {
            return Err(CmdlineError::Empty(key.to_owned()));
        }
        if value.chars().any(char::is_control) {
            return Err(CmdlineError::Control(key.to_owned()));
        }
        if values.insert(key.to_owned(), value.to_owned()).is_some() {
            return Err(CmdlineError::Duplicate(key.to_owned()));
        }
    }
    Ok(Cmdline { values })
}

/// Reads and parses `ROOT/proc/cmdline` (reading at most one byte past the limit and its
/// newline).
pub fn read_cmdline(root: &std::path::Path) -> Result<Cmdline, ReadError> {
    let path = root.join("proc/cmdline");
    let bytes = match external::read(&path, MAX_CMDLINE as u64 + 1, Links::Follow) {
        Ok(bytes) => bytes,
        Err(external::ReadError::TooLarge { .. }) => return Err(ReadError::Parse(CmdlineError::TooLong)),
        Err(e) => return Err(ReadError::Read(e)),
    };
    parse_cmdline(&bytes).map_err(ReadError::Parse)
}

#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    #[error("reading the kernel command line")]
    Read(#[source] external::ReadError),
    #[error(transparent)]
    Parse(CmdlineError),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_ironroot_keys_and_ignores_the_rest() {
        let c = parse_cmdline(
            b"console=ttyS0 quiet ironroot.plane=https://10.0.2.2:8443 ironroot.token=irt_abc ironroot.node=\"rack 1\"\n",
        )
        .unwrap();
        assert_eq!(c.get("ironroot.plane"), Some("https://10.0.2.2:8443"));
        assert_eq!(c.get("ironroot.node"), Some("rack 1"));
        assert_eq!(c.get("console"), None);
        assert_eq!(c.keys().count(), 3);
        assert_eq!(parse_cmdline(b"").unwrap(), Cmdline::default());
        let other = parse_cmdline(b"vendor=a\x01b ironroot.node=n1\0\n").unwrap();
        assert_eq!(other.get("ironroot.node"), Some("n1"), "others' values and the trailing NUL are not ours");
    }

    #[test]
    fn hostile_lines_are_clear_errors() {
        let long = format!("ironroot.node={}", "x".repeat(3000));
        let cases: Vec<(Vec<u8>, CmdlineError)> = vec![
            (long.clone().into_bytes(), CmdlineError::TooLong),
            (b"ironroot.node=\"cut mid".to_vec(), CmdlineError::UnterminatedQuote),
            (b"ironroot.node=a\xff\xfe".to_vec(), CmdlineError::NotUtf8(15)),
            (b"ironroot.node=a ironroot.node=b".to_vec(), CmdlineError::Duplicate("ironroot.node".into())),
            (b"ironroot.nodes=a".to_vec(), CmdlineError::Unknown("ironroot.nodes".into())),
            (b"ironroot.token= quiet".to_vec(), CmdlineError::Empty("ironroot.token".into())),
            (b"ironroot.token".to_vec(), CmdlineError::Empty("ironroot.token".into())),
            (b"ironroot.node=a\0b".to_vec(), CmdlineError::Control("ironroot.node".into())),
            (b"ironroot.node=a\x1b[0m".to_vec(), CmdlineError::Control("ironroot.node".into())),
            (b"ironroot.node=\"a\tb\"".to_vec(), CmdlineError::Control("ironroot.node".into())),
            (b"ironroot.token=x\x7f".to_vec(), CmdlineError::Control("ironroot.token".into())),
            (b"ironroot.no\x1bde=x".to_vec(), CmdlineError::Unknown("ironroot.no\\u{1b}de".into())),
        ];
        for (line, want) in cases {
            assert_eq!(parse_cmdline(&line), Err(want.clone()), "{}", String::from_utf8_lossy(&line));
            assert!(!want.to_string().is_empty());
        }
    }

    #[test]
    fn every_byte_string_parses_or_errors_without_panicking() {
        // A cheap stand-in for the fuzz target: every prefix and every single-byte mutation of a
        // realistic line.
        let base = b"console=ttyS0 ironroot.plane=\"https://p:1\" ironroot.token=irt_x ironroot.node=n1".to_vec();
        for cut in 0..=base.len() {
            let _either = parse_cmdline(&base[..cut]);
        }
        for i in 0..base.len() {
            for b in [0u8, b'"', b' ', b'=', 0xff, b'\n'] {
                let mut m = base.clone();
                m[i] = b;
                let _either = parse_cmdline(&m);
            }
        }
    }
}
