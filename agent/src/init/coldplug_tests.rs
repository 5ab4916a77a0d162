use super::*;

const E1000E: &str = "pci:v00008086d000010D3sv00008086sd00000000bc02sc00i00";
const VIRTIO_NET_PCI: &str = "pci:v00001AF4d00001000sv00001AF4sd00000001bc02sc00i00";

fn device(sys: &Path, bus: &str, name: &str, modalias: &str, files: &[(&str, &str)], driver: Option<&str>) {
    let dir = sys.join("bus").join(bus).join("devices").join(name);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("modalias"), format!("{modalias}\n")).unwrap();
    for (f, v) in files {
        std::fs::write(dir.join(f), format!("{v}\n")).unwrap();
    }
    if let Some(d) = driver {
        let target = sys.join("bus").join(bus).join("drivers").join(d);
        std::fs::create_dir_all(&target).unwrap();
        std::os::unix::fs::symlink(&target, dir.join("driver")).unwrap();
    }
}

#[test]
fn devices_are_read_with_their_kind_and_driver() {
    let dir = tempfile::tempdir().unwrap();
    let sys = dir.path();
    device(sys, "pci", "0000:00:03.0", E1000E, &[("class", "0x020000")], None);
    device(sys, "pci", "0000:00:02.0", VIRTIO_NET_PCI, &[("class", "0x020000")], Some("virtio-pci"));
    device(sys, "pci", "0000:00:1f.2", "pci:v00008086d00002922sv*", &[("class", "0x010601")], None);
    device(sys, "virtio", "virtio0", "virtio:d00000001v00001AF4", &[("device", "0x0001")], None);
    device(sys, "platform", "serial8250", "platform:serial8250", &[], Some("serial8250"));
    // A device without a modalias is not listed.
    std::fs::create_dir_all(sys.join("bus/cpu/devices/cpu0")).unwrap();
    let found = scan(sys);
    let summary: Vec<(&str, &str, Option<&str>)> =
        found.iter().map(|d| (d.id.as_str(), d.kind, d.driver.as_deref())).collect();
    assert_eq!(
        summary,
        [
            ("pci 0000:00:02.0", "nic", Some("virtio-pci")),
            ("pci 0000:00:03.0", "nic", None),
            ("pci 0000:00:1f.2", "storage", None),
            ("platform serial8250", "other", Some("serial8250")),
            ("virtio virtio0", "nic", None),
        ]
    );
    assert_eq!(found[1].modalias, E1000E);
}

#[test]
fn only_unbound_devices_ask_for_drivers_each_once_and_not_again() {
    let aliases = Aliases::parse(
        "alias pci:v00001AF4d*sv*sd*bc*sc*i* virtio_pci\n\
         alias virtio:d00000001v* virtio_net\n\
         alias pci:v00008086d000010D3sv*sd*bc*sc*i* e1000e\n",
    )
    .unwrap();
    let dev = |id: &str, modalias: &str, driver: Option<&str>| Device {
        id: id.into(),
        modalias: modalias.into(),
        kind: "nic",
        driver: driver.map(str::to_owned),
    };
    let devices = [
        dev("pci a", VIRTIO_NET_PCI, None),
        dev("pci b", VIRTIO_NET_PCI, None),
        dev("virtio virtio0", "virtio:d00000001v00001AF4", None),
        dev("pci c", E1000E, Some("e1000e")),
    ];
    let mut tried = BTreeSet::new();
    assert_eq!(wanted(&devices, &aliases, &tried), ["virtio_pci", "virtio_net"]);
    tried.insert("virtio_pci".to_owned());
    assert_eq!(wanted(&devices, &aliases, &tried), ["virtio_net"], "a module tried once is not tried again");
}

#[test]
fn an_unclaimed_nic_names_the_driver_the_initramfs_lacks() {
    let absent = Aliases::parse("alias pci:v00008086d000010D3sv*sd*bc*sc*i* e1000e\n").unwrap();
    let dev = |id: &str, modalias: &str, kind: &'static str, driver: Option<&str>| Device {
        id: id.into(),
        modalias: modalias.into(),
        kind,
        driver: driver.map(str::to_owned),
    };
    let devices = [
        dev("pci 0000:00:03.0", E1000E, "nic", None),
        dev("pci 0000:00:04.0", "pci:v000015B3d00001017sv*", "nic", None),
        dev("pci 0000:00:02.0", VIRTIO_NET_PCI, "nic", Some("virtio-pci")),
        dev("platform x", "platform:x", "other", None),
    ];
    let found = unclaimed(&devices, &absent);
    assert_eq!(found.len(), 2, "{found:?}");
    assert_eq!(found[0].missing_driver.as_deref(), Some("e1000e"));
    let line = found[0].describe();
    assert!(line.contains("nic pci 0000:00:03.0") && line.contains(E1000E), "{line}");
    assert!(line.contains("the kernel's e1000e is not in this initramfs"), "{line}");
    assert_eq!(found[1].missing_driver, None);
    assert!(found[1].describe().contains("no module of this initramfs or of the kernel's NIC and disk drivers"));
}

#[test]
fn pci_classes_and_virtio_ids_say_what_a_device_is() {
    assert_eq!(kind_of("pci", Some("0x020000"), None), "nic");
    assert_eq!(kind_of("pci", Some("0x010802"), None), "storage");
    assert_eq!(kind_of("pci", Some("0x030000"), None), "other");
    assert_eq!(kind_of("pci", None, None), "other");
    assert_eq!(kind_of("virtio", None, Some("0x0001")), "nic");
    assert_eq!(kind_of("virtio", None, Some("0x0008")), "storage");
    assert_eq!(kind_of("virtio", None, Some("0x0004")), "other");
    assert_eq!(kind_of("usb", Some("0x020000"), None), "other");
}
