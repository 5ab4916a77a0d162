//! Keys `ironroot-build keys generate` writes, read by the tools people use with them: openssl
//! (3.0, which refuses Ed25519 PKCS#8 v2) and the real cosign CLI (`import-key-pair`).

#![allow(clippy::unwrap_used, clippy::expect_used, reason = "tests stop loudly on a failed setup step")]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use ironroot_contract::TrustedKey;
use ironroot_tests::cli::build_cmd;
use ironroot_tests::registry::TestRegistry;
use ironroot_tests::tools::tool;
use ironroot_tests::tree::generate_bulk;

fn s(p: &Path) -> String {
    p.to_string_lossy().into_owned()
}

/// `keys generate --algorithm ALG` into `dir`; the private and the public key.
fn generate(dir: &Path, alg: &str) -> (PathBuf, PathBuf) {
    build_cmd(&["keys", "generate", "--out", &s(dir), "--algorithm", alg]).ok();
    (dir.join("ironroot.key"), dir.join("ironroot.pub"))
}

fn openssl(args: &[&str]) -> Output {
    Command::new(tool("openssl")).args(args).output().expect("running openssl")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// `cosign import-key-pair` of `key` into `PREFIX.key` / `PREFIX.pub` (empty password).
fn cosign_import(key: &Path, prefix: &Path) -> Output {
    cosign(&["import-key-pair", "--key", &s(key), "--output-key-prefix", &s(prefix)])
}

fn cosign(args: &[&str]) -> Output {
    Command::new(tool("cosign"))
        .args(args)
        .env("COSIGN_PASSWORD", "")
        .env("SIGSTORE_NO_CACHE", "1")
        .env("TUF_ROOT", std::env::temp_dir().join("ironroot-cosign-tuf"))
        .output()
        .expect("running cosign")
}

fn key_id(public_pem: &Path) -> String {
    let pem = std::fs::read_to_string(public_pem).expect("public key");
    TrustedKey::parse_pem(&pem).unwrap_or_else(|e| panic!("{}: {e}", public_pem.display())).id().to_owned()
}

#[test]
fn openssl_reads_generated_keys_of_both_algorithms() {
    let tmp = tempfile::tempdir().unwrap();
    for alg in ["ed25519", "p256"] {
        let (key, public) = generate(&tmp.path().join(alg), alg);
        let out = openssl(&["pkey", "-in", &s(&key), "-noout"]);
        assert!(out.status.success(), "openssl refuses our {alg} key: {}", text(&out.stderr));

        let out = openssl(&["pkey", "-in", &s(&key), "-pubout"]);
        assert!(out.status.success(), "{}", text(&out.stderr));
        assert_eq!(text(&out.stdout), std::fs::read_to_string(&public).unwrap(), "{alg}: openssl's public key");

        // openssl writes the key back in its own form: ours is that form, byte for byte.
        let out = openssl(&["pkey", "-in", &s(&key)]);
        assert!(out.status.success(), "{}", text(&out.stderr));
        assert_eq!(text(&out.stdout), std::fs::read_to_string(&key).unwrap(), "{alg}: openssl's form of our key");
    }
}

#[test]
fn cosign_imports_generated_ed25519_keys_and_signs_for_our_public_key() {
    let tmp = tempfile::tempdir().unwrap();
    let (key, public) = generate(&tmp.path().join("keys"), "ed25519");
    let prefix = tmp.path().join("imported");
    let out = cosign_import(&key, &prefix);
    assert!(out.status.success(), "cosign import-key-pair: {}", text(&out.stderr));
    assert_eq!(key_id(&prefix.with_extension("pub")), key_id(&public), "cosign derived another public key");

    // A module signed by cosign with the imported key verifies with our public key, and one we
    // sign verifies in cosign with the public key it derived.
    let reg = TestRegistry::start();
    let tree = tmp.path().join("tree");
    generate_bulk(&tree, 64 << 10);
    let layout = tmp.path().join("layout");
    build_cmd(&[
        "module",
        "build",
        "--from",
        &s(&tree),
        "--name",
        "k",
        "--version",
        "1",
        "--serial",
        "1",
        "--out",
        &s(&layout),
    ])
    .ok();
    let theirs = build_cmd(&["module", "push", &s(&layout), &format!("{}/keys/theirs:1", reg.host())]).ok();
    let out = cosign(&[
        "sign",
        "--key",
        &s(&prefix.with_extension("key")),
        "--tlog-upload=false",
        "--allow-http-registry",
        "-y",
        &theirs,
    ]);
    assert!(out.status.success(), "cosign sign: {}", text(&out.stderr));
    build_cmd(&["module", "verify", &theirs, "--trust", &s(&public)]).ok();

    let ours = build_cmd(&["module", "push", &s(&layout), &format!("{}/keys/ours:1", reg.host())]).ok();
    build_cmd(&["module", "sign", &ours, "--key", &s(&key)]).ok();
    let cosign_pub = s(&prefix.with_extension("pub"));
    let out = cosign(&["verify", "--key", &cosign_pub, "--insecure-ignore-tlog", "--allow-http-registry", &ours]);
    assert!(out.status.success(), "cosign verify: {}", text(&out.stderr));
}

/// cosign treats a P-256 key of ours exactly as it treats one openssl generated. The cosign
/// `just deps` installs (Debian's 2.5.0, built against golang-github-sigstore-sigstore 1.9.3
/// without its key-policy dependency) refuses every ECDSA and RSA key in `import-key-pair`
/// with "unsupported public key type", whatever the key's form; that refusal is the only one
/// accepted here, since any other (a parse error) would be about our key's form. A cosign that
/// imports openssl's key must import ours, to the same public key.
#[test]
fn cosign_imports_p256_keys_exactly_as_it_imports_openssls() {
    let tmp = tempfile::tempdir().unwrap();
    let (ours, public) = generate(&tmp.path().join("keys"), "p256");
    let theirs = tmp.path().join("openssl.key");
    let out = openssl(&["genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256", "-out", &s(&theirs)]);
    assert!(out.status.success(), "{}", text(&out.stderr));

    let our_import = cosign_import(&ours, &tmp.path().join("ours"));
    let their_import = cosign_import(&theirs, &tmp.path().join("theirs"));
    assert_eq!(
        our_import.status.success(),
        their_import.status.success(),
        "cosign treats our P-256 key unlike openssl's:\nours: {}\nopenssl's: {}",
        text(&our_import.stderr),
        text(&their_import.stderr)
    );
    if our_import.status.success() {
        assert_eq!(key_id(&tmp.path().join("ours.pub")), key_id(&public), "cosign derived another public key");
    } else {
        const REFUSAL: &str = "error validating ecdsa key: unsupported public key type";
        for (whose, out) in [("our", &our_import), ("openssl's", &their_import)] {
            assert!(text(&out.stderr).contains(REFUSAL), "cosign refused {whose} key otherwise: {}", text(&out.stderr));
        }
    }
}
