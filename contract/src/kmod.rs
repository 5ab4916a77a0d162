//! Kernel modules as the image builder writes them into the initramfs and the initramfs agent
//! loads them: `modules.dep` (what each module needs, `depmod`'s format), `modules.alias` (the
//! device patterns each module drives, `alias PATTERN MODULE` lines as in `depmod`'s file) and
//! the waves both derive from them. Names compare the way modprobe compares them (`-` and `_`
//! are the same); a module the kernel has built in needs no file.
//!
//! Pure: the builder reads the kernel package's files, the agent the initramfs's, and both
//! hand the text here.

use std::collections::{BTreeMap, BTreeSet};

use thiserror::Error;

#[derive(Debug, Error, PartialEq, Eq)]
pub enum KmodError {
    #[error("modules.dep line {line}: {text:?} is not 'path: deps'")]
    Malformed { line: usize, text: String },
    #[error("modules.alias line {line}: {text:?} is not 'alias PATTERN MODULE'")]
    MalformedAlias { line: usize, text: String },
    #[error("kernel module {0:?} is neither in modules.dep nor built in")]
    Unknown(String),
}

/// `kernel/fs/erofs/erofs.ko.xz` → `erofs`; `virtio-rng` → `virtio_rng`.
pub fn module_name(path_or_name: &str) -> String {
    let base = path_or_name.rsplit('/').next().unwrap_or(path_or_name);
    let stem = base.split(".ko").next().unwrap_or(base);
    stem.replace('-', "_")
}

/// Parsed `modules.dep` + `modules.builtin`.
#[derive(Debug, Default)]
pub struct ModuleIndex {
    /// name → (path relative to lib/modules/REL, dependency paths)
    by_name: BTreeMap<String, (String, Vec<String>)>,
    by_path: BTreeMap<String, Vec<String>>,
    builtin: BTreeSet<String>,
}

impl ModuleIndex {
    pub fn parse(dep: &str, builtin: &str) -> Result<Self, KmodError> {
        let mut index = ModuleIndex::default();
        for (n, line) in dep.lines().enumerate() {
            if line.trim().is_empty() {
                continue;
            }
            let (path, deps) =
                line.split_once(':').ok_or_else(|| KmodError::Malformed { line: n + 1, text: line.to_owned() })?;
            let deps: Vec<String> = deps.split_whitespace().map(str::to_owned).collect();
            index.by_name.insert(module_name(path), (path.to_owned(), deps.clone()));
            index.by_path.insert(path.to_owned(), deps);
        }
        index.builtin = builtin.lines().filter(|l| !l.trim().is_empty()).map(module_name).collect();
        Ok(index)
    }

    /// Whether the kernel has `name`, as a file or built in.
    pub fn has(&self, name: &str) -> bool {
        let name = module_name(name);
        self.by_name.contains_key(&name) || self.builtin.contains(&name)
    }

    /// The module's file (relative to lib/modules/REL) and the files it needs.
    pub fn entry(&self, name: &str) -> Option<(&str, &[String])> {
        self.by_name.get(&module_name(name)).map(|(path, deps)| (path.as_str(), deps.as_slice()))
    }

    /// Every module with a file: (name, path).
    pub fn modules(&self) -> impl Iterator<Item = (&str, &str)> {
        self.by_name.iter().map(|(name, (path, _))| (name.as_str(), path.as_str()))
    }

    /// The files to load for `names`, dependencies first, each once. Built-in names are
    /// returned separately (nothing to load).
    pub fn closure(&self, names: &[&str]) -> Result<(Vec<String>, Vec<String>), KmodError> {
        let mut order = Vec::new();
        let mut seen = BTreeSet::new();
        let mut builtin = Vec::new();
        for name in names {
            let name = module_name(name);
            if let Some((path, _)) = self.by_name.get(&name) {
                self.visit(path, &mut seen, &mut order);
            } else if self.builtin.contains(&name) {
                builtin.push(name);
            } else {
                return Err(KmodError::Unknown(name));
            }
        }
        Ok((order, builtin))
    }

    /// `order` (from [`ModuleIndex::closure`]) in waves: a module's wave is one past the
    /// latest wave of what it needs, so each wave's modules can load at the same time.
    pub fn waves(&self, order: &[String]) -> Vec<Vec<String>> {
        let mut wave_of: BTreeMap<&str, usize> = BTreeMap::new();
        let mut waves: Vec<Vec<String>> = Vec::new();
        for path in order {
            let deps = self.by_path.get(path).into_iter().flatten();
            let wave = deps.filter_map(|d| wave_of.get(d.as_str())).map(|w| w + 1).max().unwrap_or(0);
            wave_of.insert(path, wave);
            if waves.len() <= wave {
                waves.resize_with(wave + 1, Vec::new);
            }
            waves[wave].push(path.clone());
        }
        waves
    }

    fn visit(&self, path: &str, seen: &mut BTreeSet<String>, order: &mut Vec<String>) {
        if !seen.insert(path.to_owned()) {
            return;
        }
        // modules.dep lists the full transitive set; visiting each keeps the order right
        // even when a dependency's own line is what orders it.
        for dep in self.by_path.get(path).into_iter().flatten() {
            self.visit(dep, seen, order);
        }
        order.push(path.to_owned());
    }
}

/// Parsed `modules.alias`: which module drives a device, by its `modalias`.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Aliases {
    /// (pattern, module name), in file order.
    entries: Vec<(String, String)>,
}

impl Aliases {
    pub fn parse(text: &str) -> Result<Self, KmodError> {
        let mut entries = Vec::new();
        for (n, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let bad = || KmodError::MalformedAlias { line: n + 1, text: line.to_owned() };
            let mut words = line.split_whitespace();
            match (words.next(), words.next(), words.next(), words.next()) {
                (Some("alias"), Some(pattern), Some(module), None) => {
                    entries.push((pattern.to_owned(), module_name(module)));
                }
                _ => return Err(bad()),
            }
        }
        Ok(Self { entries })
    }

    /// The lines of `modules.alias` for these entries.
    pub fn render(&self) -> String {
        self.entries.iter().map(|(p, m)| format!("alias {p} {m}\n")).collect()
    }

    /// Only the entries whose module `keep` accepts.
    pub fn filtered(&self, keep: impl Fn(&str, &str) -> bool) -> Self {
        Self { entries: self.entries.iter().filter(|(p, m)| keep(p, m)).cloned().collect() }
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Every module one of whose patterns matches `modalias`, each once, in file order (as
    /// `modprobe` resolves an alias to all of them).
    pub fn matching(&self, modalias: &str) -> Vec<&str> {
        let mut found: Vec<&str> = Vec::new();
        for (pattern, module) in &self.entries {
            if !found.contains(&module.as_str()) && glob(pattern.as_bytes(), modalias.as_bytes()) {
                found.push(module);
            }
        }
        found
    }
}

/// fnmatch(3) without flags, as kmod matches aliases: `*`, `?` and `[…]` (with ranges and
/// `!`/`^` negation); everything else literal.
pub fn glob(pattern: &[u8], text: &[u8]) -> bool {
    let (mut p, mut t) = (0, 0);
    // Where the last `*` was and the text position it has absorbed up to.
    let mut star: Option<(usize, usize)> = None;
    while t < text.len() {
        let step = match pattern.get(p) {
            Some(b'*') => {
                star = Some((p, t));
                p += 1;
                continue;
            }
            Some(b'?') => Some(p + 1),
            Some(b'[') if closed(pattern, p) => class(pattern, p, text[t]),
            Some(&c) => (c == text[t]).then_some(p + 1),
            None => None,
        };
        match (step, star) {
            (Some(next), _) => {
                p = next;
                t += 1;
            }
            (None, Some((sp, st))) => {
                star = Some((sp, st + 1));
                p = sp + 1;
                t = st + 1;
            }
            (None, None) => return false,
        }
    }
    pattern[p.min(pattern.len())..].iter().all(|&c| c == b'*')
}

/// Whether the `[` at `pattern[at]` has its `]` (one right after `[`, `[!` or `[^` is a member);
/// a `[` without one is a literal.
fn closed(pattern: &[u8], at: usize) -> bool {
    let mut i = at + 1;
    if matches!(pattern.get(i), Some(b'!' | b'^')) {
        i += 1;
    }
    pattern.get(i + 1..).is_some_and(|rest| rest.contains(&b']'))
}

/// Matches `c` against the (closed) bracket expression at `pattern[at]`; the position after it
/// when it matches.
fn class(pattern: &[u8], at: usize, c: u8) -> Option<usize> {
    let mut i = at + 1;
    let negate = matches!(pattern.get(i), Some(b'!' | b'^'));
    if negate {
        i += 1;
    }
    let start = i;
    let mut hit = false;
    loop {
        let &first = pattern.get(i)?;
        if first == b']' && i > start {
            break;
        }
        if pattern.get(i + 1) == Some(&b'-') && pattern.get(i + 2).is_some_and(|&e| e != b']') {
            hit |= (first..=pattern[i + 2]).contains(&c);
            i += 3;
        } else {
            hit |= first == c;
            i += 1;
        }
    }
    (hit != negate).then_some(i + 1)
}

#[cfg(test)]
#[path = "kmod_tests.rs"]
mod tests;
