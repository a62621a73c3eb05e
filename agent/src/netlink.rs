//! A minimal netlink client: one socket, request/response with acks and
//! multipart dumps, and type-length-value attributes. It carries the two
//! families the proxy modes need beyond rtnetlink, conntrack
//! (`NETLINK_NETFILTER`) and IPVS (generic netlink); their messages are
//! a few nested attributes each, which the `netlink-packet-*` crates
//! would wrap in far more code than they save.

use std::{
    io,
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
};

const NLMSG_HDRLEN: usize = 16;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
pub const NLM_F_REQUEST: u16 = 0x1;
pub const NLM_F_ACK: u16 = 0x4;
pub const NLM_F_DUMP: u16 = 0x300;
/// Flags of "new" requests: replace an existing object, fail if one
/// exists, create one if none does.
pub const NLM_F_REPLACE: u16 = 0x100;
pub const NLM_F_EXCL: u16 = 0x200;
pub const NLM_F_CREATE: u16 = 0x400;
/// Attribute type bit marking a nested attribute.
const NLA_F_NESTED: u16 = 0x8000;
const NLA_TYPE_MASK: u16 = 0x3fff;

#[derive(Debug, thiserror::Error)]
pub enum NetlinkError {
    #[error("netlink socket: {0}")]
    Io(#[from] io::Error),
    /// The kernel refused the request with this errno.
    #[error("kernel refused the request: {0}")]
    Refused(io::Error),
    #[error("malformed netlink reply: {0}")]
    Malformed(&'static str),
}

impl NetlinkError {
    /// The errno the kernel refused with, if that is what happened.
    pub fn errno(&self) -> Option<i32> {
        match self {
            NetlinkError::Refused(e) => e.raw_os_error(),
            _ => None,
        }
    }
}

/// One reply message: its type and payload (after the netlink header).
#[derive(Debug)]
pub struct Reply {
    pub kind: u16,
    pub payload: Vec<u8>,
}

#[derive(Debug)]
pub struct Socket {
    fd: OwnedFd,
    seq: u32,
}

impl Socket {
    /// Opens a socket of netlink family `protocol` (`NETLINK_NETFILTER`,
    /// `NETLINK_GENERIC`, ...) in the caller's network namespace.
    pub fn open(protocol: libc::c_int) -> Result<Self, NetlinkError> {
        // SAFETY: plain socket(2); the descriptor is owned right after.
        let raw = unsafe {
            libc::socket(
                libc::AF_NETLINK,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                protocol,
            )
        };
        if raw < 0 {
            return Err(io::Error::last_os_error().into());
        }
        // SAFETY: `raw` is a fresh descriptor nobody else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        // SAFETY: sockaddr_nl is plain data; all-zero is "kernel picks the
        // port id".
        let mut address: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
        address.nl_family = libc::AF_NETLINK as libc::sa_family_t;
        // SAFETY: bind(2) with a valid sockaddr_nl and its size.
        let bound = unsafe {
            libc::bind(
                fd.as_raw_fd(),
                (&raw const address).cast(),
                size_of::<libc::sockaddr_nl>() as libc::socklen_t,
            )
        };
        if bound != 0 {
            return Err(io::Error::last_os_error().into());
        }
        Ok(Self { fd, seq: 0 })
    }

    /// Sends one request and collects its replies: for a dump
    /// (`NLM_F_DUMP`) every message up to the end marker, otherwise the
    /// messages before the ack (`NLM_F_ACK` is added).
    pub fn request(
        &mut self,
        kind: u16,
        flags: u16,
        payload: &[u8],
    ) -> Result<Vec<Reply>, NetlinkError> {
        self.seq = self.seq.wrapping_add(1);
        let dump = flags & NLM_F_DUMP == NLM_F_DUMP;
        let flags = NLM_F_REQUEST | flags | if dump { 0 } else { NLM_F_ACK };
        let mut message = Vec::with_capacity(NLMSG_HDRLEN + payload.len());
        message.extend_from_slice(&((NLMSG_HDRLEN + payload.len()) as u32).to_ne_bytes());
        message.extend_from_slice(&kind.to_ne_bytes());
        message.extend_from_slice(&flags.to_ne_bytes());
        message.extend_from_slice(&self.seq.to_ne_bytes());
        message.extend_from_slice(&0u32.to_ne_bytes());
        message.extend_from_slice(payload);
        // SAFETY: send(2) from a buffer we own, with its length.
        let sent = unsafe {
            libc::send(
                self.fd.as_raw_fd(),
                message.as_ptr().cast(),
                message.len(),
                0,
            )
        };
        if sent < 0 {
            return Err(io::Error::last_os_error().into());
        }

        let mut replies = Vec::new();
        // Dumps arrive in chunks of up to a page or two; 64 KiB holds any.
        let mut buffer = vec![0u8; 64 * 1024];
        loop {
            // SAFETY: recv(2) into a buffer we own, with its length.
            let received = unsafe {
                libc::recv(
                    self.fd.as_raw_fd(),
                    buffer.as_mut_ptr().cast(),
                    buffer.len(),
                    0,
                )
            };
            if received < 0 {
                let error = io::Error::last_os_error();
                if error.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(error.into());
            }
            let mut rest = &buffer[..received as usize];
            while rest.len() >= NLMSG_HDRLEN {
                let length = u32::from_ne_bytes(rest[0..4].try_into().expect("4 bytes")) as usize;
                if length < NLMSG_HDRLEN || length > rest.len() {
                    return Err(NetlinkError::Malformed("message length"));
                }
                let kind = u16::from_ne_bytes([rest[4], rest[5]]);
                let seq = u32::from_ne_bytes(rest[8..12].try_into().expect("4 bytes"));
                let body = &rest[NLMSG_HDRLEN..length];
                rest = &rest[align(length).min(rest.len())..];
                if seq != self.seq {
                    continue;
                }
                match kind {
                    // A dump that failed part-way ends with an errno.
                    NLMSG_DONE => match body.get(0..4) {
                        Some(code) if i32::from_ne_bytes(code.try_into().expect("4 bytes")) < 0 => {
                            let errno = -i32::from_ne_bytes(code.try_into().expect("4 bytes"));
                            return Err(NetlinkError::Refused(io::Error::from_raw_os_error(errno)));
                        }
                        _ => return Ok(replies),
                    },
                    NLMSG_ERROR => {
                        let errno = body
                            .get(0..4)
                            .map(|b| i32::from_ne_bytes(b.try_into().expect("4 bytes")))
                            .ok_or(NetlinkError::Malformed("error message"))?;
                        if errno != 0 {
                            return Err(NetlinkError::Refused(io::Error::from_raw_os_error(
                                -errno,
                            )));
                        }
                        if !dump {
                            return Ok(replies);
                        }
                    }
                    _ => replies.push(Reply {
                        kind,
                        payload: body.to_vec(),
                    }),
                }
            }
        }
    }
}

/// Netlink pads every message and attribute to 4 bytes.
const fn align(length: usize) -> usize {
    (length + 3) & !3
}

/// Builds a run of attributes.
#[derive(Debug, Default)]
pub struct Attrs {
    bytes: Vec<u8>,
}

impl Attrs {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn put(&mut self, kind: u16, value: &[u8]) -> &mut Self {
        self.bytes
            .extend_from_slice(&((4 + value.len()) as u16).to_ne_bytes());
        self.bytes.extend_from_slice(&kind.to_ne_bytes());
        self.bytes.extend_from_slice(value);
        self.bytes.resize(align(self.bytes.len()), 0);
        self
    }

    pub fn put_u16(&mut self, kind: u16, value: u16) -> &mut Self {
        self.put(kind, &value.to_ne_bytes())
    }

    pub fn put_u32(&mut self, kind: u16, value: u32) -> &mut Self {
        self.put(kind, &value.to_ne_bytes())
    }

    /// A NUL-terminated string, as the kernel's NLA_NUL_STRING wants.
    pub fn put_str(&mut self, kind: u16, value: &str) -> &mut Self {
        let mut bytes = value.as_bytes().to_vec();
        bytes.push(0);
        self.put(kind, &bytes)
    }

    pub fn nested(&mut self, kind: u16, inner: impl FnOnce(&mut Attrs)) -> &mut Self {
        let mut attrs = Attrs::new();
        inner(&mut attrs);
        self.put(kind | NLA_F_NESTED, &attrs.bytes)
    }

    pub fn into_bytes(self) -> Vec<u8> {
        self.bytes
    }
}

/// Iterates over a run of attributes: (type without flag bits, value).
/// A truncated attribute ends the run.
pub fn attrs(mut bytes: &[u8]) -> impl Iterator<Item = (u16, &[u8])> {
    std::iter::from_fn(move || {
        if bytes.len() < 4 {
            return None;
        }
        let length = usize::from(u16::from_ne_bytes([bytes[0], bytes[1]]));
        let kind = u16::from_ne_bytes([bytes[2], bytes[3]]) & NLA_TYPE_MASK;
        if length < 4 || length > bytes.len() {
            return None;
        }
        let value = &bytes[4..length];
        bytes = &bytes[align(length).min(bytes.len())..];
        Some((kind, value))
    })
}

/// The value of the first attribute of type `kind`.
pub fn find(bytes: &[u8], kind: u16) -> Option<&[u8]> {
    attrs(bytes).find(|(k, _)| *k == kind).map(|(_, v)| v)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn attributes_round_trip_with_padding_and_nesting() {
        let mut built = Attrs::new();
        built
            .put(1, &[7])
            .nested(2, |inner| {
                inner.put_u16(1, 0xbeef).put_str(2, "ip_vs");
            })
            .put_u32(3, 42);
        let bytes = built.into_bytes();
        assert_eq!(bytes.len() % 4, 0);
        let all: Vec<_> = attrs(&bytes).map(|(k, _)| k).collect();
        assert_eq!(all, [1, 2, 3], "the nested flag is masked off");
        assert_eq!(find(&bytes, 1), Some(&[7][..]));
        let inner = find(&bytes, 2).unwrap();
        assert_eq!(find(inner, 1), Some(&0xbeefu16.to_ne_bytes()[..]));
        assert_eq!(find(inner, 2), Some(&b"ip_vs\0"[..]));
        assert_eq!(find(&bytes, 3), Some(&42u32.to_ne_bytes()[..]));
        // A truncated run stops instead of reading past the end.
        assert_eq!(attrs(&bytes[..bytes.len() - 2]).count(), 2);
    }
}
