//! What routing and the kernel WireGuard backend share about netlink errors.

pub const EPERM: i32 = 1;
pub const ENOENT: i32 = 2;
pub const ESRCH: i32 = 3;
pub const EEXIST: i32 = 17;
pub const ENODEV: i32 = 19;
pub const EOPNOTSUPP: i32 = 95;
pub const EADDRNOTAVAIL: i32 = 99;

/// The errno of a request the kernel refused.
pub fn errno(error: &rtnetlink::Error) -> Option<i32> {
    match error {
        rtnetlink::Error::NetlinkError(message) => Some(message.raw_code().abs()),
        _ => None,
    }
}
