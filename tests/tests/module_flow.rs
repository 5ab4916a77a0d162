//! The module lifecycle against real peers: reproducible builds, push/sign/verify through a
//! real registry (plain, TLS + htpasswd, bearer token), offline through OCI layouts, and
//! signature interoperability with the real cosign CLI in both directions for both key types.

#![allow(clippy::unwrap_used, clippy::expect_used, reason = "tests stop loudly on a failed setup step")]

use std::path::Path;
use std::process::Command;
use std::sync::Arc;

use ironroot_tests::cli::build_cmd;
use ironroot_tests::http::{TokenIssuer, token_server};
use ironroot_tests::registry::{Auth, TestRegistry};
use ironroot_tests::tools::tool;
use ironroot_tests::tree::{TreeOptions, generate};

fn s(p: &Path) -> String {
    p.to_string_lossy().into_owned()
}

fn build(tree: &Path, out: &Path, extra: &[&str]) -> String {
    let mut args = vec![
        "module",
        "build",
        "--from",
        &*Box::leak(s(tree).into_boxed_str()),
        "--name",
        "base",
        "--version",
        "1.0",
        "--serial",
        "5",
        "--out",
    ];
    let out = s(out);
    args.push(&out);
    args.extend_from_slice(extra);
    let printed = build_cmd(&args).ok();
    printed.rsplit('@').next().expect("digest").to_owned()
}

/// A module built from a generated tree (no hard links, no devices) into a layout, and a key pair.
struct Built {
    tmp: tempfile::TempDir,
    layout: std::path::PathBuf,
    keys: std::path::PathBuf,
    digest: String,
}

impl Built {
    fn new(algorithm: &str) -> Self {
        let tmp = tempfile::tempdir().expect("tmp");
        let tree = tmp.path().join("tree");
        generate(&tree, &TreeOptions { hardlinks: false, devices: false });
        let layout = tmp.path().join("layout");
        let digest = build(&tree, &layout, &[]);
        let keys = tmp.path().join("keys");
        build_cmd(&["keys", "generate", "--out", &s(&keys), "--algorithm", algorithm]).ok();
        Self { tmp, layout, keys, digest }
    }
}

fn cosign(args: &[&str]) -> std::process::Output {
    Command::new(tool("cosign"))
        .args(args)
        .env("COSIGN_PASSWORD", "")
        .env("SIGSTORE_NO_CACHE", "1")
        .env("TUF_ROOT", std::env::temp_dir().join("ironroot-cosign-tuf"))
        .output()
        .expect("running cosign")
}

#[test]
fn builds_are_reproducible_from_dirs_and_tars() {
    let tmp = tempfile::tempdir().expect("tmp");
    let tree = tmp.path().join("tree");
    generate(&tree, &TreeOptions { hardlinks: true, devices: true });
    let a = build(&tree, &tmp.path().join("a"), &[]);
    let b = build(&tree, &tmp.path().join("b"), &[]);
    assert_eq!(a, b, "two builds of one tree differ");

    // A copy made at another time, in another order, has other mtimes and inode numbers.
    let copy = tmp.path().join("copy");
    let st = Command::new("cp").args(["-a", "--no-preserve=timestamps"]).arg(&tree).arg(&copy).status().expect("cp");
    assert!(st.success());
    assert_eq!(build(&copy, &tmp.path().join("c"), &[]), a, "mtimes or inode order leaked into the build");

    // The same tree as a tar archive.
    let tar = tmp.path().join("tree.tar");
    let st = Command::new("tar")
        .args(["--xattrs", "--xattrs-include=*", "-C"])
        .arg(&tree)
        .args(["-cf"])
        .arg(&tar)
        .arg(".")
        .status()
        .expect("tar");
    assert!(st.success());
    assert_eq!(build(&tar, &tmp.path().join("d"), &[]), a, "tar input differs from directory input");

    // Knobs change the result, as documented.
    assert_ne!(build(&tree, &tmp.path().join("e"), &["--mtime", "86400"]), a);
    assert_ne!(build(&tree, &tmp.path().join("f"), &["--owner", "0:0"]), a);
}

#[test]
fn push_sign_verify_through_a_registry_and_cosign_both_ways() {
    let reg = TestRegistry::start();
    let tmp = tempfile::tempdir().expect("tmp");
    let tree = tmp.path().join("tree");
    generate(&tree, &TreeOptions { hardlinks: true, devices: false });
    let layout = tmp.path().join("layout");
    build(&tree, &layout, &[]);

    for alg in ["ed25519", "p256"] {
        let keys = tmp.path().join(format!("keys-{alg}"));
        build_cmd(&["keys", "generate", "--out", &s(&keys), "--algorithm", alg]).ok();
        let mode = std::fs::metadata(keys.join("ironroot.key")).expect("key").permissions();
        assert_eq!(std::os::unix::fs::PermissionsExt::mode(&mode) & 0o777, 0o600);
        let (key, public) = (s(&keys.join("ironroot.key")), s(&keys.join("ironroot.pub")));

        // ironroot signs, cosign verifies.
        let repo = format!("{}/ironroot/ours-{alg}", reg.host());
        let pinned = build_cmd(&["module", "push", &s(&layout), &format!("{repo}:1.0")]).ok();
        assert!(pinned.starts_with(&format!("{repo}@sha256:")), "{pinned}");
        build_cmd(&["module", "sign", &pinned, "--key", &key]).ok();
        let out = cosign(&["verify", "--key", &public, "--insecure-ignore-tlog", "--allow-http-registry", &pinned]);
        assert!(out.status.success(), "cosign rejected our {alg} signature: {}", String::from_utf8_lossy(&out.stderr));
        let verified =
            build_cmd(&["module", "verify", &format!("{repo}:1.0"), "--trust", &public, "--output", "json"]).ok();
        let v: serde_json::Value = serde_json::from_str(&verified).expect("json");
        assert_eq!(v["serial"], 5);
        assert_eq!(v["reference"], pinned);

        // cosign signs, ironroot verifies. Ed25519: our own key imported into cosign's format.
        // P-256: cosign 2.5's import-key-pair refuses every ECDSA key ("unsupported public key
        // type", also for keys openssl writes), so cosign generates its own P-256 pair.
        let repo2 = format!("{}/ironroot/theirs-{alg}", reg.host());
        let pinned2 = build_cmd(&["module", "push", &s(&layout), &format!("{repo2}:1.0")]).ok();
        let prefix = s(&tmp.path().join(format!("cosign-{alg}")));
        let out = if alg == "ed25519" {
            cosign(&["import-key-pair", "--key", &key, "--output-key-prefix", &prefix])
        } else {
            cosign(&["generate-key-pair", "--output-key-prefix", &prefix])
        };
        assert!(out.status.success(), "cosign key pair ({alg}): {}", String::from_utf8_lossy(&out.stderr));
        let out = cosign(&[
            "sign",
            "--key",
            &format!("{prefix}.key"),
            "--tlog-upload=false",
            "--allow-http-registry",
            "-y",
            &pinned2,
        ]);
        assert!(out.status.success(), "cosign sign ({alg}): {}", String::from_utf8_lossy(&out.stderr));
        build_cmd(&["module", "verify", &pinned2, "--trust", &format!("{prefix}.pub")]).ok();
        if alg == "ed25519" {
            // The imported key is ours: our public key verifies cosign's signature too.
            build_cmd(&["module", "verify", &pinned2, "--trust", &public]).ok();
        }
        let public = format!("{prefix}.pub");

        // Signing again with another key keeps cosign's signature: both keys verify.
        let other = tmp.path().join(format!("other-{alg}"));
        build_cmd(&["keys", "generate", "--out", &s(&other), "--algorithm", alg]).ok();
        build_cmd(&["module", "sign", &pinned2, "--key", &s(&other.join("ironroot.key"))]).ok();
        build_cmd(&["module", "verify", &pinned2, "--trust", &public]).ok();
        build_cmd(&["module", "verify", &pinned2, "--trust", &s(&other.join("ironroot.pub"))]).ok();
    }
}

#[test]
fn offline_through_oci_layouts() {
    let built = Built::new("ed25519");
    let (tmp, layout, keys) = (&built.tmp, built.layout.clone(), built.keys.clone());
    let digest = built.digest.clone();
    let pinned = format!("oci:{}@{digest}", layout.display());
    build_cmd(&["module", "sign", &pinned, "--key", &s(&keys.join("ironroot.key"))]).ok();
    build_cmd(&[
        "module",
        "verify",
        &format!("oci:{}:1.0", layout.display()),
        "--trust",
        &s(&keys.join("ironroot.pub")),
    ])
    .ok();

    // Copy to a second layout: the signature travels with the module.
    let copy = tmp.path().join("copy");
    let out = build_cmd(&["module", "push", &s(&layout), &format!("oci:{}:stable", copy.display())]).ok();
    assert!(out.ends_with(&digest), "{out}");
    build_cmd(&[
        "module",
        "verify",
        &format!("oci:{}:stable", copy.display()),
        "--trust",
        &s(&keys.join("ironroot.pub")),
    ])
    .ok();

    // And from a signed layout to a registry, offline-signed content verifies online.
    let reg = TestRegistry::start();
    let repo = format!("{}/ironroot/offline", reg.host());
    build_cmd(&["module", "push", &s(&layout), &format!("{repo}:1.0")]).ok();
    build_cmd(&["module", "verify", &format!("{repo}:1.0"), "--trust", &s(&keys.join("ironroot.pub"))]).ok();
}

#[test]
fn tls_with_a_custom_ca_and_basic_auth() {
    let reg = TestRegistry::start_with(Auth::TlsBasic("builder", "s3cret"));
    let ca = reg.ca_pem.clone().expect("ca");
    let built = Built::new("p256");
    let (layout, keys) = (built.layout.clone(), built.keys.clone());
    let repo = format!("{}/ironroot/tls", reg.host());
    let run = |args: &[&str], password: &str| -> ironroot_tests::cli::Run {
        Command::new(ironroot_tests::cli::binary())
            .args(args)
            .args(["--registry-ca", &s(&ca), "--registry-user", "builder"])
            .env("IRONROOT_REGISTRY_PASSWORD", password)
            .output()
            .expect("run")
            .into()
    };
    let pinned = run(&["module", "push", &s(&layout), &format!("{repo}:1.0")], "s3cret").ok();
    run(&["module", "sign", &pinned, "--key", &s(&keys.join("ironroot.key"))], "s3cret").ok();
    run(&["module", "verify", &pinned, "--trust", &s(&keys.join("ironroot.pub"))], "s3cret").ok();
    // Wrong password: a clear authentication failure, classed as transport.
    let bad = run(&["module", "verify", &pinned, "--trust", &s(&keys.join("ironroot.pub"))], "wrong");
    assert_eq!(bad.code, 13, "{}", bad.stderr);
    assert!(bad.stderr.contains("401"), "{}", bad.stderr);
    assert_eq!(reg.get_status("/v2/", None), 401, "the registry itself refuses anonymous reads");
    // Without the CA the registry's certificate is not trusted. The right password goes along:
    // with certificate checks off this would succeed, so only the TLS check can refuse it.
    let untrusted = Command::new(ironroot_tests::cli::binary())
        .args(["module", "verify", &pinned, "--trust", &s(&keys.join("ironroot.pub")), "--registry-tls"])
        .args(["--registry-user", "builder"])
        .env("IRONROOT_REGISTRY_PASSWORD", "s3cret")
        .output()
        .expect("run");
    let untrusted = ironroot_tests::cli::Run::from(untrusted);
    untrusted.refused(13, "invalid peer certificate: UnknownIssuer");
}

#[test]
fn bearer_token_auth() {
    let issuer = Arc::new(TokenIssuer::generate());
    let tokens = token_server("builder", "tok-pass", Arc::clone(&issuer));
    let realm = format!("http://{}/token", tokens.addr());
    let reg = TestRegistry::start_with(Auth::Token { realm: &realm, issuer: &issuer });
    let built = Built::new("ed25519");
    let (layout, keys) = (built.layout.clone(), built.keys.clone());
    let repo = format!("{}/ironroot/token", reg.host());
    let run = |args: &[&str], password: &str| -> ironroot_tests::cli::Run {
        Command::new(ironroot_tests::cli::binary())
            .args(args)
            .args(["--registry-user", "builder"])
            .env("IRONROOT_REGISTRY_PASSWORD", password)
            .output()
            .expect("run")
            .into()
    };
    let trust = s(&keys.join("ironroot.pub"));
    let pinned = run(&["module", "push", &s(&layout), &format!("{repo}:1.0")], "tok-pass").ok();
    run(&["module", "sign", &pinned, "--key", &s(&keys.join("ironroot.key"))], "tok-pass").ok();
    let before = reg.settled_log().len();
    run(&["module", "verify", &pinned, "--trust", &trust], "tok-pass").ok();
    let scopes: Vec<_> = tokens.requests().into_iter().filter(|r| r.contains("scope=repository")).collect();
    assert!(scopes.iter().any(|r| r.contains("pull")), "the verifier never asked the token endpoint: {scopes:?}");
    // The registry's token auth checked the verifier's tokens (signature by the issuer's key,
    // issuer, audience, expiry, scope) and authorized its reads: the token the endpoint issued
    // is what it saw, as nothing else here holds that key yet.
    let during = reg.settled_log()[before..].to_owned();
    let authorized = |kind: &str| {
        during
            .lines()
            .any(|l| l.contains("msg=\"authorized request\"") && l.contains(&format!("/v2/ironroot/token/{kind}/")))
    };
    assert!(authorized("manifests") && authorized("blobs"), "no read authorized by the issued token:\n{during}");

    // What the registry refuses: no token, a token it cannot parse, one signed by a key it does
    // not trust, one for another repository. The issuer's token for this repository passes.
    let tags = "/v2/ironroot/token/tags/list";
    let pull = |repo: &str| vec![format!("repository:ironroot/{repo}:pull")];
    let bearer = |token: String| format!("Bearer {token}");
    assert_eq!(reg.get_status(tags, None), 401);
    assert_eq!(reg.get_status(tags, Some("Bearer not-a-token")), 401);
    let forged = TokenIssuer::generate().issue("builder", &pull("token"));
    assert_eq!(reg.get_status(tags, Some(&bearer(forged))), 401, "a token from an untrusted key");
    assert_eq!(reg.get_status(tags, Some(&bearer(issuer.issue("builder", &pull("other"))))), 401, "another scope");
    assert_eq!(reg.get_status(tags, Some(&bearer(issuer.issue("builder", &pull("token"))))), 200);

    // The verifier does not get by without the endpoint's token: a wrong password gets none,
    // and a registry that trusts another issuer refuses the tokens this endpoint hands out.
    let refused = run(&["module", "verify", &pinned, "--trust", &trust], "wrong");
    assert_eq!(refused.code, 13, "{}", refused.stderr);
    let stranger = TokenIssuer::generate();
    let other = TestRegistry::start_with(Auth::Token { realm: &realm, issuer: &stranger });
    let elsewhere = pinned.replacen(&reg.host(), &other.host(), 1);
    let refused = run(&["module", "verify", &elsewhere, "--trust", &trust], "tok-pass");
    assert_eq!(refused.code, 13, "{}", refused.stderr);
    assert!(refused.stderr.contains("401"), "{}", refused.stderr);
}

#[test]
fn a_warm_store_fetches_no_packs() {
    let reg = TestRegistry::start();
    let built = Built::new("ed25519");
    let (tmp, layout, keys) = (&built.tmp, built.layout.clone(), built.keys.clone());
    let repo = format!("{}/ironroot/warm", reg.host());
    let pinned = build_cmd(&["module", "push", &s(&layout), &format!("{repo}:1.0")]).ok();
    build_cmd(&["module", "sign", &pinned, "--key", &s(&keys.join("ironroot.key"))]).ok();
    let store = s(&tmp.path().join("store"));
    let verify = || -> serde_json::Value {
        let out = build_cmd(&[
            "module",
            "verify",
            &pinned,
            "--trust",
            &s(&keys.join("ironroot.pub")),
            "--store",
            &store,
            "--output",
            "json",
        ])
        .ok();
        serde_json::from_str(&out).expect("json")
    };
    let cold = verify();
    assert!(cold["downloaded_bytes"].as_u64().unwrap_or(0) > 0);
    let before = reg.settled_log().len();
    let warm = verify();
    assert_eq!(warm["downloaded_bytes"], 0, "{warm}");
    // The registry's own record: the second run read manifests and the signature, no blobs
    // beyond the small signature payload and config.
    let manifest = ironroot_contract::manifest::ModuleManifest::parse(
        &std::fs::read(layout.join("blobs/sha256").join(pinned.rsplit(':').next().expect("hex"))).expect("manifest"),
    )
    .expect("module");
    let during = reg.settled_log()[before..].to_owned();
    assert!(during.contains("GET /v2/ironroot/warm/manifests/"), "the warm verify's requests are not in:\n{during}");
    for layer in &manifest.manifest.layers {
        assert!(
            !during.contains(&format!("blobs/{}", layer.digest)),
            "warm verify fetched {}:\n{during}",
            layer.digest
        );
    }
}
