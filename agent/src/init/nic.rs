//! Which NIC the boot runs DHCP on. The one the firmware booted from, when it says
//! (`BOOTIF=01-aa-bb-cc-dd-ee-ff` from PXELINUX or iPXE; `ironroot.nic=aa:bb:cc:dd:ee:ff` from
//! the operator), is tried first; then every other NIC in slot order (the sysfs path of its
//! device, so the order does not depend on which driver probed first). A NIC without link
//! after its wait is passed over. Pure: [`super::net`] lists the NICs and does the DHCP.

use ironroot_contract::run_state::NicAttempt;

/// An Ethernet interface as the kernel has it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Nic {
    pub index: u32,
    pub name: String,
    /// `aa:bb:cc:dd:ee:ff`, lower case.
    pub mac: String,
    pub driver: Option<String>,
    /// The device's sysfs path (PCI slot order); the name when it has none.
    pub slot: String,
}

/// The NIC asked for and who asked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Wanted {
    pub mac: String,
    /// `BOOTIF=01-…` or `ironroot.nic=…` as given.
    pub source: String,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NicError {
    #[error("BOOTIF={0:?} is not 01- and six hex bytes separated by '-' (the PXELINUX form)")]
    BootIf(String),
    #[error("ironroot.nic={0:?} is not a MAC address (aa:bb:cc:dd:ee:ff)")]
    Nic(String),
}

/// The wanted NIC from the kernel command line: `ironroot.nic` wins over `BOOTIF`.
pub fn wanted(proc_cmdline: &str, ironroot_nic: Option<&str>) -> Result<Option<Wanted>, NicError> {
    if let Some(value) = ironroot_nic {
        let mac = mac(value, ':').ok_or_else(|| NicError::Nic(value.to_owned()))?;
        return Ok(Some(Wanted { mac, source: format!("ironroot.nic={value}") }));
    }
    let Some(value) = proc_cmdline.split_whitespace().filter_map(|w| w.strip_prefix("BOOTIF=")).next_back() else {
        return Ok(None);
    };
    let bad = || NicError::BootIf(value.chars().take(64).collect());
    // The hardware type (01: Ethernet), then the address.
    let rest = value.strip_prefix("01-").ok_or_else(bad)?;
    let mac = mac(rest, '-').ok_or_else(bad)?;
    Ok(Some(Wanted { mac, source: format!("BOOTIF={value}") }))
}

/// Six hex bytes separated by `sep`, as `aa:bb:…` in lower case.
fn mac(text: &str, sep: char) -> Option<String> {
    let parts: Vec<&str> = text.split(sep).collect();
    let ok = parts.len() == 6 && parts.iter().all(|p| p.len() == 2 && p.bytes().all(|b| b.is_ascii_hexdigit()));
    ok.then(|| parts.join(":").to_ascii_lowercase())
}

/// The order to try `nics` in, and the reason the first is first.
pub fn order(nics: &[Nic], wanted: Option<&Wanted>) -> (Vec<Nic>, String) {
    let mut sorted = nics.to_vec();
    sorted.sort_by(|a, b| a.slot.cmp(&b.slot).then(a.name.cmp(&b.name)));
    let Some(w) = wanted else {
        return (sorted, "the first NIC in slot order with link that answered DHCP".to_owned());
    };
    match sorted.iter().position(|n| n.mac == w.mac) {
        Some(i) => {
            let nic = sorted.remove(i);
            sorted.insert(0, nic);
            (sorted, format!("{} (the NIC the boot named)", w.source))
        }
        None => (
            sorted,
            format!("{} names no NIC here; the first NIC in slot order with link that answered DHCP", w.source),
        ),
    }
}

/// The record of a NIC that was not tried (an earlier one got the lease).
pub fn not_tried(nic: &Nic) -> NicAttempt {
    NicAttempt {
        interface: nic.name.clone(),
        mac: nic.mac.clone(),
        driver: nic.driver.clone(),
        carrier: false,
        outcome: "not tried".to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nic(name: &str, mac: &str, slot: &str) -> Nic {
        Nic { index: 0, name: name.into(), mac: mac.into(), driver: None, slot: slot.into() }
    }

    #[test]
    fn bootif_and_ironroot_nic_name_the_boot_nic() {
        let w = wanted("console=ttyS0 BOOTIF=01-52-54-00-12-34-57 quiet", None).unwrap().unwrap();
        assert_eq!(w.mac, "52:54:00:12:34:57");
        assert_eq!(w.source, "BOOTIF=01-52-54-00-12-34-57");
        let w = wanted("BOOTIF=01-52-54-00-12-34-57", Some("52:54:00:AA:BB:CC")).unwrap().unwrap();
        assert_eq!((w.mac.as_str(), w.source.as_str()), ("52:54:00:aa:bb:cc", "ironroot.nic=52:54:00:AA:BB:CC"));
        assert_eq!(wanted("console=ttyS0", None), Ok(None));
        for bad in ["BOOTIF=52-54-00-12-34-57", "BOOTIF=01-52-54-00-12-34", "BOOTIF=01-zz-54-00-12-34-57"] {
            assert!(matches!(wanted(bad, None), Err(NicError::BootIf(_))), "{bad}");
        }
        assert_eq!(wanted("", Some("52-54-00-12-34-57")), Err(NicError::Nic("52-54-00-12-34-57".into())));
    }

    #[test]
    fn the_named_nic_goes_first_and_the_rest_in_slot_order() {
        let nics = [
            nic("eth0", "52:54:00:12:34:57", "/sys/devices/pci0000:00/0000:00:03.0"),
            nic("eth1", "52:54:00:12:34:56", "/sys/devices/pci0000:00/0000:00:02.0"),
            nic("eth2", "52:54:00:12:34:58", "/sys/devices/pci0000:00/0000:00:04.0"),
        ];
        let names = |v: &[Nic]| v.iter().map(|n| n.name.clone()).collect::<Vec<_>>();
        let (o, why) = order(&nics, None);
        assert_eq!(names(&o), ["eth1", "eth0", "eth2"]);
        assert!(why.starts_with("the first NIC in slot order"), "{why}");
        let w = Wanted { mac: "52:54:00:12:34:58".into(), source: "BOOTIF=01-52-54-00-12-34-58".into() };
        let (o, why) = order(&nics, Some(&w));
        assert_eq!(names(&o), ["eth2", "eth1", "eth0"]);
        assert_eq!(why, "BOOTIF=01-52-54-00-12-34-58 (the NIC the boot named)");
        let w = Wanted { mac: "52:54:00:00:00:01".into(), source: "ironroot.nic=52:54:00:00:00:01".into() };
        let (o, why) = order(&nics, Some(&w));
        assert_eq!(names(&o), ["eth1", "eth0", "eth2"]);
        assert!(why.starts_with("ironroot.nic=52:54:00:00:00:01 names no NIC here"), "{why}");
    }
}
