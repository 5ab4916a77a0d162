use super::*;

const REL: &str = "6.12.0-test";

/// A kernel as `kernel fetch` leaves it, with fake (plain ELF) modules.
fn kernel(metapackage: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("modules/lib/modules").join(REL);
    let modules = [
        ("kernel/drivers/net/virtio_net.ko", "kernel/net/core/failover.ko"),
        ("kernel/net/core/failover.ko", ""),
        ("kernel/drivers/virtio/virtio_pci.ko", ""),
        ("kernel/drivers/net/ethernet/intel/e1000e/e1000e.ko", ""),
        ("kernel/drivers/net/ethernet/intel/igb/igb.ko", ""),
        ("kernel/drivers/gpu/drm/bochs.ko", ""),
        ("kernel/fs/erofs/erofs.ko", "kernel/lib/libcrc32c.ko"),
        ("kernel/fs/overlayfs/overlay.ko", ""),
        ("kernel/lib/libcrc32c.ko", ""),
        ("kernel/crypto/crc32c_generic.ko", ""),
    ];
    let mut dep = String::new();
    for (path, deps) in modules {
        std::fs::create_dir_all(base.join(path).parent().unwrap()).unwrap();
        std::fs::write(base.join(path), b"\x7fELF module").unwrap();
        dep.push_str(&format!("{path}: {deps}\n"));
    }
    std::fs::write(base.join("modules.dep"), dep).unwrap();
    std::fs::write(base.join("modules.builtin"), "kernel/fs/ext4/ext4.ko\n").unwrap();
    std::fs::write(base.join("modules.softdep"), "# Soft dependencies\nsoftdep libcrc32c pre: crc32c\n").unwrap();
    std::fs::write(base.join("modules.builtin.modinfo"), b"ext4.softdep=pre: crypto-crc32c\0ext4.license=GPL\0")
        .unwrap();
    std::fs::write(
        base.join("modules.alias"),
        "# Aliases extracted from modules themselves.\n\
         alias virtio:d00000001v* virtio_net\n\
         alias pci:v00001AF4d*sv*sd*bc*sc*i* virtio_pci\n\
         alias pci:v00008086d000010D3sv*sd*bc*sc*i* e1000e\n\
         alias pci:v00008086d000010C9sv*sd*bc*sc*i* igb\n\
         alias pci:v00001234d00001111sv*sd*bc03sc*i* bochs\n\
         alias fs-erofs erofs\n\
         alias crypto-crc32c crc32c_generic\n\
         alias crc32c crc32c_generic\n",
    )
    .unwrap();
    std::fs::write(dir.path().join("kernel.json"), format!(r#"{{"metapackage": "{metapackage}"}}"#)).unwrap();
    dir
}

fn text(archive: &Archive, path: &str) -> String {
    String::from_utf8(archive.file(path).unwrap_or_else(|| panic!("no {path}")).to_vec()).unwrap()
}

#[test]
fn the_cloud_flavour_carries_virtio_and_names_the_left_out_nic_drivers() {
    let k = kernel("linux-image-cloud-amd64");
    let mut a = Archive::new(0);
    let fixed = vec!["erofs".to_owned(), "overlay".to_owned(), "ext4".to_owned()];
    let got = add(&mut a, k.path(), &fixed, &Hardware::Default { add: vec![] }).unwrap();
    assert_eq!(got.flavour, "cloud");
    assert_eq!(got.hardware, ["virtio_pci", "virtio_net"]);
    assert_eq!(got.skipped, ["virtio_blk", "virtio_rng", "qemu_fw_cfg"], "defaults this kernel lacks");
    // crc32c_generic: libcrc32c's softdep and the built-in ext4's.
    assert_eq!(
        got.modules,
        ["crc32c_generic", "erofs", "failover", "libcrc32c", "overlay", "virtio_net", "virtio_pci"]
    );
    assert_eq!(got.builtin, ["ext4"]);
    let dir = format!("lib/modules/{REL}");
    assert!(a.contains(&format!("{dir}/kernel/drivers/net/virtio_net.ko")));
    assert!(!a.contains(&format!("{dir}/kernel/drivers/net/ethernet/intel/e1000e/e1000e.ko")));
    assert_eq!(
        text(&a, &format!("{dir}/modules.alias")),
        "alias virtio:d00000001v* virtio_net\nalias pci:v00001AF4d*sv*sd*bc*sc*i* virtio_pci\nalias fs-erofs erofs\n\
         alias crypto-crc32c crc32c_generic\nalias crc32c crc32c_generic\n"
    );
    // Only NIC and disk drivers' PCI patterns: bochs (a GPU) is not named.
    assert_eq!(
        text(&a, &format!("{dir}/modules.alias.absent")),
        "alias pci:v00008086d000010D3sv*sd*bc*sc*i* e1000e\nalias pci:v00008086d000010C9sv*sd*bc*sc*i* igb\n"
    );
    let dep = text(&a, &format!("{dir}/modules.dep"));
    assert!(dep.contains("kernel/drivers/net/virtio_net.ko: kernel/net/core/failover.ko\n"), "{dep}");
    assert!(!dep.contains("e1000e"), "{dep}");
    assert!(dep.contains("kernel/lib/libcrc32c.ko: kernel/crypto/crc32c_generic.ko\n"), "softdep as a dep: {dep}");
    assert_eq!(
        text(&a, "etc/ironroot/modules.load"),
        format!(
            "/{dir}/kernel/crypto/crc32c_generic.ko /{dir}/kernel/fs/overlayfs/overlay.ko\n\
             /{dir}/kernel/lib/libcrc32c.ko\n/{dir}/kernel/fs/erofs/erofs.ko\n"
        )
    );
}

#[test]
fn the_generic_flavour_and_explicit_lists_choose_the_hardware_and_a_missing_name_is_an_error() {
    let k = kernel("linux-image-amd64");
    let mut a = Archive::new(0);
    let got = add(&mut a, k.path(), &[], &Hardware::Default { add: vec![] }).unwrap();
    assert_eq!(got.flavour, "generic");
    assert_eq!(got.hardware, ["virtio_pci", "virtio_net", "e1000e", "igb"]);
    assert!(got.skipped.contains(&"mlx5_core".to_owned()), "{:?}", got.skipped);
    assert!(text(&a, &format!("lib/modules/{REL}/modules.alias.absent")).is_empty());

    let mut a = Archive::new(0);
    let listed = Hardware::Listed { names: vec!["virtio_net".into()], add: vec!["igb".into()] };
    let got = add(&mut a, k.path(), &[], &listed).unwrap();
    assert_eq!(got.hardware, ["virtio_net", "igb"]);
    assert!(got.skipped.is_empty());
    assert!(text(&a, &format!("lib/modules/{REL}/modules.alias.absent")).contains(" e1000e\n"));

    for hw in [
        Hardware::Default { add: vec!["mlx5_core".into()] },
        Hardware::Listed { names: vec!["nope".into()], add: vec![] },
    ] {
        let e = add(&mut Archive::new(0), k.path(), &[], &hw).unwrap_err().to_string();
        assert!(e.contains("is neither in 6.12.0-test's modules.dep nor built in"), "{e}");
    }
}

#[test]
fn a_module_list_file_is_names_with_comments() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("list");
    std::fs::write(&path, "# NICs\ne1000e\n  igb  # the 82576\n\nnvme\n").unwrap();
    assert_eq!(read_list(&path).unwrap(), ["e1000e", "igb", "nvme"]);
    std::fs::write(&path, "e1000e igb\n").unwrap();
    let e = read_list(&path).unwrap_err().to_string();
    assert!(e.contains("\"e1000e igb\" is not a module name"), "{e}");
}
