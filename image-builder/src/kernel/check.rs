//! `ironroot-build kernel check CONFIG`: every option in the required list must be set in the
//! kernel's `.config` — `=y` where built-in is required, `=y` or `=m` where a module is enough.
//! Parsing is pure; a missing option is reported by name with what was found instead.

use std::collections::BTreeMap;

/// The list shipped in `kernel-configs/required`.
pub const REQUIRED: &str = include_str!("../../../kernel-configs/required");

/// What a requirement accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Want {
    BuiltIn,
    ModuleOrBuiltIn,
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Missing {
    pub option: String,
    pub want: &'static str,
    /// `y`, `m`, or `not set`.
    pub found: String,
}

/// Parses the required list: `OPTION=y|m` per line, `#` comments.
pub fn parse_required(text: &str) -> Result<Vec<(String, Want)>, String> {
    let mut out = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.split('#').next().unwrap_or("").trim();
        if line.is_empty() {
            continue;
        }
        let (option, value) =
            line.split_once('=').ok_or_else(|| format!("line {}: {line:?} is not OPTION=y|m", n + 1))?;
        let want = match value {
            "y" => Want::BuiltIn,
            "m" => Want::ModuleOrBuiltIn,
            _ => return Err(format!("line {}: {option} must be =y or =m", n + 1)),
        };
        if !option.starts_with("CONFIG_") {
            return Err(format!("line {}: {option} does not start with CONFIG_", n + 1));
        }
        out.push((option.to_owned(), want));
    }
    Ok(out)
}

/// Parses a kernel `.config`: `CONFIG_X=value` lines; `# CONFIG_X is not set` means unset.
pub fn parse_config(text: &str) -> BTreeMap<String, String> {
    text.lines()
        .filter_map(|l| l.split_once('='))
        .filter(|(k, _)| k.starts_with("CONFIG_"))
        .map(|(k, v)| (k.to_owned(), v.trim_matches('"').to_owned()))
        .collect()
}

/// The required options `config` lacks.
pub fn check(required: &[(String, Want)], config: &BTreeMap<String, String>) -> Vec<Missing> {
    required
        .iter()
        .filter_map(|(option, want)| {
            let found = config.get(option).map(String::as_str);
            let ok = match want {
                Want::BuiltIn => found == Some("y"),
                Want::ModuleOrBuiltIn => matches!(found, Some("y" | "m")),
            };
            (!ok).then(|| Missing {
                option: option.clone(),
                want: if *want == Want::BuiltIn { "y" } else { "y or m" },
                found: found.unwrap_or("not set").to_owned(),
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_shipped_list_parses() {
        let req = parse_required(REQUIRED).unwrap();
        assert!(req.iter().any(|(o, w)| o == "CONFIG_FS_VERITY" && *w == Want::BuiltIn));
        assert!(req.len() >= 15);
    }

    #[test]
    fn missing_options_are_named_with_what_was_found() {
        let req = parse_required("CONFIG_A=y\nCONFIG_B=m # module is enough\nCONFIG_C=m\nCONFIG_D=y\n").unwrap();
        let config = parse_config("CONFIG_A=m\nCONFIG_B=y\n# CONFIG_C is not set\nCONFIG_D=y\nCONFIG_E=\"x\"\n");
        let missing = check(&req, &config);
        let names: Vec<_> = missing.iter().map(|m| (m.option.as_str(), m.found.as_str())).collect();
        assert_eq!(names, [("CONFIG_A", "m"), ("CONFIG_C", "not set")]);
        assert!(parse_required("CONFIG_A=n").is_err());
        assert!(parse_required("A=y").is_err());
        assert!(parse_required("junk").is_err());
    }
}
