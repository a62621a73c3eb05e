//! Network device facts the agent needs: a device's index and IPv4
//! addresses.

use std::{
    ffi::{CStr, CString},
    io,
    net::Ipv4Addr,
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

/// IPv4 addresses assigned to `device` (in this network namespace).
pub fn ipv4_addresses(device: &str) -> io::Result<Vec<Ipv4Addr>> {
    let mut head: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs writes a list head we free below with freeifaddrs.
    if unsafe { libc::getifaddrs(&mut head) } != 0 {
        return Err(io::Error::last_os_error());
    }
    let mut out = Vec::new();
    let mut cursor = head;
    while !cursor.is_null() {
        // SAFETY: `cursor` is a node of the list getifaddrs returned, not
        // yet freed; its name is a NUL-terminated string.
        let ifa = unsafe { &*cursor };
        // SAFETY: as above.
        let name = unsafe { CStr::from_ptr(ifa.ifa_name) };
        if name.to_bytes() == device.as_bytes() && !ifa.ifa_addr.is_null() {
            // SAFETY: ifa_addr is non-null and points at a sockaddr whose
            // family says how to read it.
            let family = i32::from(unsafe { (*ifa.ifa_addr).sa_family });
            if family == libc::AF_INET {
                // SAFETY: AF_INET addresses are sockaddr_in.
                let sin = unsafe { &*(ifa.ifa_addr as *const libc::sockaddr_in) };
                out.push(Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr)));
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
    }

    #[test]
    fn loopback_has_127_0_0_1() {
        let addresses = super::ipv4_addresses("lo").unwrap();
        assert!(
            addresses.contains(&std::net::Ipv4Addr::LOCALHOST),
            "{addresses:?}"
        );
    }
}
