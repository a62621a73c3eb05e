//! Network device facts the agent needs: a device's index and IPv4
//! addresses, its MTU, and which device has an address.

use std::{
    ffi::{CStr, CString},
    io,
    net::Ipv4Addr,
    os::fd::{AsRawFd as _, FromRawFd as _},
};

/// The interface index of `device` (in this network namespace).
pub fn ifindex(device: &str) -> io::Result<u32> {
    let name = CString::new(device).map_err(io::Error::other)?;
    // SAFETY: `name` is a valid NUL-terminated string for the call.
    match unsafe { libc::if_nametoindex(name.as_ptr()) } {
        0 => Err(io::Error::new(
            io::ErrorKind::NotFound,
            format!("no device {device}"),
        )),
        index => Ok(index),
    }
}

/// The MTU of `device` (in this network namespace).
pub fn mtu(device: &str) -> io::Result<u32> {
    let name = CString::new(device).map_err(io::Error::other)?;
    if name.as_bytes_with_nul().len() > libc::IFNAMSIZ {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{device}: not a device name"),
        ));
    }
    // SAFETY: an all-zero ifreq is a valid value of the plain C struct.
    let mut request: libc::ifreq = unsafe { std::mem::zeroed() };
    for (to, from) in request.ifr_name.iter_mut().zip(name.as_bytes_with_nul()) {
        *to = *from as libc::c_char;
    }
    // SAFETY: socket(2) with constant arguments; the descriptor is owned
    // below.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` is a fresh descriptor nothing else owns.
    let socket = unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) };
    // SAFETY: SIOCGIFMTU reads the name from and writes the MTU into the
    // ifreq we own, which outlives the call.
    if unsafe { libc::ioctl(socket.as_raw_fd(), libc::SIOCGIFMTU, &mut request) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: SIOCGIFMTU succeeded, so the union holds the MTU.
    let mtu = unsafe { request.ifr_ifru.ifru_mtu };
    u32::try_from(mtu).map_err(io::Error::other)
}

/// IPv4 addresses assigned to `device` (in this network namespace).
pub fn ipv4_addresses(device: &str) -> io::Result<Vec<Ipv4Addr>> {
    Ok(assignments()?
        .into_iter()
        .filter(|(name, _)| name == device)
        .map(|(_, address)| address)
        .collect())
}

/// The device that has `address` (in this network namespace), if any.
pub fn holding(address: Ipv4Addr) -> io::Result<Option<String>> {
    Ok(assignments()?
        .into_iter()
        .find(|(_, assigned)| *assigned == address)
        .map(|(name, _)| name))
}

/// Every IPv4 address of this network namespace, with its device.
fn assignments() -> io::Result<Vec<(String, Ipv4Addr)>> {
    let mut head: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs writes a list head we free below with freeifaddrs.
    if unsafe { libc::getifaddrs(&mut head) } != 0 {
        return Err(io::Error::last_os_error());
    }
    let mut out = Vec::new();
    let mut cursor = head;
    while !cursor.is_null() {
        // SAFETY: `cursor` is a node of the list getifaddrs returned, not
        // yet freed.
        let ifa = unsafe { &*cursor };
        if !ifa.ifa_addr.is_null() {
            // SAFETY: ifa_addr is non-null and points at a sockaddr whose
            // family says how to read it.
            let family = i32::from(unsafe { (*ifa.ifa_addr).sa_family });
            if family == libc::AF_INET {
                // SAFETY: AF_INET addresses are sockaddr_in; the name is
                // a NUL-terminated string of the same node.
                let (sin, name) = unsafe {
                    (
                        &*(ifa.ifa_addr as *const libc::sockaddr_in),
                        CStr::from_ptr(ifa.ifa_name),
                    )
                };
                out.push((
                    name.to_string_lossy().into_owned(),
                    Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr)),
                ));
            }
        }
        cursor = ifa.ifa_next;
    }
    // SAFETY: `head` came from getifaddrs and is freed exactly once.
    unsafe { libc::freeifaddrs(head) };
    Ok(out)
}

#[cfg(test)]
mod tests {
    #[test]
    fn loopback_is_index_1_and_missing_devices_are_errors() {
        assert_eq!(super::ifindex("lo").unwrap(), 1);
        assert!(super::ifindex("no-such-dev0").is_err());
        assert_eq!(super::mtu("lo").unwrap(), 65536);
        assert!(super::mtu("no-such-dev0").is_err());
    }

    #[test]
    fn loopback_has_127_0_0_1() {
        let addresses = super::ipv4_addresses("lo").unwrap();
        assert!(
            addresses.contains(&std::net::Ipv4Addr::LOCALHOST),
            "{addresses:?}"
        );
        assert_eq!(
            super::holding(std::net::Ipv4Addr::LOCALHOST)
                .unwrap()
                .as_deref(),
            Some("lo")
        );
    }
}
