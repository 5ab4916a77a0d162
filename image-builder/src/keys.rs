//! `keys generate`: a signing key pair as `DIR/ironroot.key` (PKCS#8 PEM, mode 0600) and
//! `DIR/ironroot.pub` (PKIX PEM) — formats cosign reads (`cosign import-key-pair`,
//! `cosign verify --key`). Existing keys are never overwritten.

use std::fs;
use std::io::Write as _;
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::{Path, PathBuf};

use anyhow::{Context as _, bail};
use ironroot_contract::{KeyAlgorithm, SigningKey, TrustedKey};

pub const PRIVATE_KEY_FILE: &str = "ironroot.key";
pub const PUBLIC_KEY_FILE: &str = "ironroot.pub";

/// Generates a key pair into `dir`; returns the two paths.
pub fn generate(dir: &Path, alg: KeyAlgorithm) -> anyhow::Result<(PathBuf, PathBuf)> {
    fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let (key_path, pub_path) = (dir.join(PRIVATE_KEY_FILE), dir.join(PUBLIC_KEY_FILE));
    for p in [&key_path, &pub_path] {
        if p.exists() {
            bail!("{} already exists; refusing to overwrite a key", p.display());
        }
    }
    let key = SigningKey::generate(alg);
    let write = |path: &Path, mode: u32, text: &str| -> anyhow::Result<()> {
        let mut f = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(path)
            .with_context(|| format!("creating {}", path.display()))?;
        f.write_all(text.as_bytes()).with_context(|| format!("writing {}", path.display()))?;
        f.sync_all().with_context(|| format!("syncing {}", path.display()))
    };
    write(&key_path, 0o600, &key.to_pkcs8_pem()?)?;
    write(&pub_path, 0o644, &key.public_pem()?)?;
    Ok((key_path, pub_path))
}

pub fn load_signing_key(path: &Path) -> anyhow::Result<SigningKey> {
    let pem = fs::read_to_string(path).with_context(|| format!("reading signing key {}", path.display()))?;
    SigningKey::parse_pem(&pem).with_context(|| format!("signing key {}", path.display()))
}

pub fn load_trusted_key(path: &Path) -> anyhow::Result<TrustedKey> {
    let pem = fs::read_to_string(path).with_context(|| format!("reading trusted key {}", path.display()))?;
    TrustedKey::parse_pem(&pem).with_context(|| format!("trusted key {}", path.display()))
}
