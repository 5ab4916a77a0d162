use super::*;

const DEP: &str = "kernel/fs/erofs/erofs.ko.xz: kernel/lib/libcrc32c.ko.xz\n\
    kernel/lib/libcrc32c.ko.xz:\n\
    kernel/drivers/net/virtio_net.ko.xz: kernel/drivers/net/net_failover.ko.xz kernel/net/core/failover.ko.xz\n\
    kernel/drivers/net/net_failover.ko.xz: kernel/net/core/failover.ko.xz\n\
    kernel/net/core/failover.ko.xz:\n\
    kernel/drivers/char/hw_random/virtio-rng.ko.xz:\n";

#[test]
fn dependencies_come_first_and_once() {
    let index = ModuleIndex::parse(DEP, "kernel/fs/ext4/ext4.ko\n").unwrap();
    let (order, builtin) = index.closure(&["virtio_net", "erofs", "virtio-rng", "ext4", "virtio_net"]).unwrap();
    assert_eq!(
        order,
        [
            "kernel/net/core/failover.ko.xz",
            "kernel/drivers/net/net_failover.ko.xz",
            "kernel/drivers/net/virtio_net.ko.xz",
            "kernel/lib/libcrc32c.ko.xz",
            "kernel/fs/erofs/erofs.ko.xz",
            "kernel/drivers/char/hw_random/virtio-rng.ko.xz",
        ]
    );
    assert_eq!(builtin, ["ext4"]);
    assert!(index.has("virtio-rng") && index.has("ext4") && !index.has("e1000e"));
    assert_eq!(
        index.entry("erofs"),
        Some(("kernel/fs/erofs/erofs.ko.xz", &["kernel/lib/libcrc32c.ko.xz".to_owned()][..]))
    );
}

#[test]
fn waves_put_each_module_after_everything_it_needs() {
    let index = ModuleIndex::parse(DEP, "").unwrap();
    let (order, _) = index.closure(&["virtio_net", "erofs", "virtio-rng"]).unwrap();
    let waves = index.waves(&order);
    assert_eq!(
        waves,
        [
            vec![
                "kernel/net/core/failover.ko.xz",
                "kernel/lib/libcrc32c.ko.xz",
                "kernel/drivers/char/hw_random/virtio-rng.ko.xz"
            ],
            vec!["kernel/drivers/net/net_failover.ko.xz", "kernel/fs/erofs/erofs.ko.xz"],
            vec!["kernel/drivers/net/virtio_net.ko.xz"],
        ]
    );
    assert_eq!(waves.concat().len(), order.len(), "every module once");
}

#[test]
fn unknown_modules_and_broken_lines_are_named() {
    let index = ModuleIndex::parse(DEP, "").unwrap();
    assert_eq!(index.closure(&["nope"]), Err(KmodError::Unknown("nope".into())));
    assert!(matches!(ModuleIndex::parse("no colon here", ""), Err(KmodError::Malformed { line: 1, .. })));
    assert!(matches!(Aliases::parse("alias x\n"), Err(KmodError::MalformedAlias { line: 1, .. })));
    assert!(matches!(Aliases::parse("# c\n\nblacklist foo\n"), Err(KmodError::MalformedAlias { line: 3, .. })));
}

#[test]
fn globs_match_as_fnmatch_does() {
    let yes = [
        ("pci:v00008086d000010D3sv*sd*bc*sc*i*", "pci:v00008086d000010D3sv00008086sd00000000bc02sc00i00"),
        ("virtio:d00000001v*", "virtio:d00000001v00001AF4"),
        ("a?c", "abc"),
        ("*", ""),
        ("a*b*c", "aXbYbZc"),
        ("[abc]x", "bx"),
        ("[a-f]1", "e1"),
        ("[!a-f]1", "z1"),
        ("[^a]", "b"),
        ("[]]", "]"),
        ("a[b", "a[b"),
        ("**", "anything"),
    ];
    for (p, t) in yes {
        assert!(glob(p.as_bytes(), t.as_bytes()), "{p} should match {t}");
    }
    let no = [
        ("pci:v00008086d000010D3sv*", "pci:v00008086d000010D4sv0"),
        ("a?c", "ac"),
        ("abc", "abcd"),
        ("[a-f]1", "z1"),
        ("[!a-f]1", "a1"),
        ("a*b", "aXbY"),
        ("", "x"),
    ];
    for (p, t) in no {
        assert!(!glob(p.as_bytes(), t.as_bytes()), "{p} should not match {t}");
    }
}

#[test]
fn a_modalias_resolves_to_every_module_that_claims_it_once() {
    let aliases = Aliases::parse(
        "# Aliases extracted from modules themselves.\n\
         alias pci:v00008086d000010D3sv*sd*bc*sc*i* e1000e\n\
         alias pci:v*d*sv*sd*bc02sc00i* generic-net\n\
         alias pci:v00008086d000010D3sv00008086sd*bc*sc*i* e1000e\n\
         alias virtio:d00000001v* virtio_net\n",
    )
    .unwrap();
    let nic = "pci:v00008086d000010D3sv00008086sd00000000bc02sc00i00";
    assert_eq!(aliases.matching(nic), ["e1000e", "generic_net"]);
    assert_eq!(aliases.matching("virtio:d00000001v00001AF4"), ["virtio_net"]);
    assert!(aliases.matching("acpi:PNP0A08:").is_empty());
    let only = aliases.filtered(|_, m| m == "virtio_net");
    assert_eq!(only.render(), "alias virtio:d00000001v* virtio_net\n");
    assert_eq!(Aliases::parse(&only.render()).unwrap(), only, "render parses back");
}
