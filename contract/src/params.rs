//! Build parameters: `KEY=value` pairs the host sets as server tags (or on
//! the kernel command line) and the agent reads. A tag wins over the
//! command line, which wins over the default here.
//!
//! [`ALL`] lists every key the agent knows, with its default and what it
//! does; the constants name them for code on both sides.

/// The build method ([`crate::Method`]'s names).
pub const BUILD_METHOD: &str = "build_method";
/// The rootfs tarball's URL (gzip, zstd, xz or plain tar).
pub const ROOTFS_URL: &str = "rootfs_url";
/// The rootfs tarball's sha256, hex; checked while downloading.
pub const ROOTFS_SHA256: &str = "rootfs_sha256";
/// The disk image's URL (qcow2 or raw), for `from-qcow2`.
pub const DISK_IMG_URL: &str = "disk_img_url";
/// The disk image's sha256, hex.
pub const DISK_IMG_SHA256: &str = "disk_img_sha256";
/// The block device written.
pub const VOLUME: &str = "volume";
/// The EFI system partition's size (`100M`, binary units).
pub const EFI_SIZE: &str = "efi_size";
/// The TCP port of the done line.
pub const SIGNAL_BUILD_DONE_PORT: &str = "signal_build_done_port";
/// `0`: a failed build opens no done port (the host sees `failed: ...` only).
pub const SIGNAL_FAILURE: &str = "signal_failure";
/// `1`: `from-qcow2` grows the last partition and its ext4 to the volume.
pub const GROW_FS: &str = "grow_fs";
pub const INITRD_VERBOSE: &str = "INITRD_VERBOSE";
pub const INITRD_DEBUG: &str = "INITRD_DEBUG";
pub const INITRD_PRE_SHELL: &str = "INITRD_PRE_SHELL";
pub const POST_BUILD_SHELL: &str = "POST_BUILD_SHELL";
pub const NO_SIGNAL_STATE: &str = "NO_SIGNAL_STATE";
/// Command line only: do not read the metadata service.
pub const NO_METADATA: &str = "NO_METADATA";
/// Command line only: the metadata service's `IP` or `IP:port`.
pub const METADATA_IP: &str = "METADATA_IP";

/// The done port in the image-creation initrd (the original's default).
pub const INITRD_DONE_PORT: u16 = 22;
/// The done port of a helper server, whose stock image runs sshd on 22.
pub const HELPER_DONE_PORT: u16 = 8022;
/// The metadata service's address, Scaleway's; the local provider answers
/// at the same address inside its servers.
pub const METADATA_ADDRESS: &str = "169.254.42.42";
/// [`METADATA_ADDRESS`] as an address.
pub const METADATA_IPV4: std::net::Ipv4Addr = std::net::Ipv4Addr::new(169, 254, 42, 42);

/// One parameter the agent knows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Param {
    pub key: &'static str,
    /// The value when neither a tag nor the command line sets it.
    pub default: Option<&'static str>,
    /// Whether a server tag may set it (the metadata service cannot tell
    /// whether or where to ask itself).
    pub from_tags: bool,
    pub doc: &'static str,
}

const fn param(key: &'static str, default: Option<&'static str>, doc: &'static str) -> Param {
    Param {
        key,
        default,
        from_tags: true,
        doc,
    }
}

const INITRD_DONE_PORT_TEXT: &str = "22";

/// Every parameter, in the order the agent logs them.
pub const ALL: &[Param] = &[
    param(
        BUILD_METHOD,
        None,
        "the build method: from-rootfs, unpartitioned-from-rootfs or from-qcow2",
    ),
    param(
        ROOTFS_URL,
        None,
        "the rootfs tarball's URL (gzip, zstd, xz or plain tar)",
    ),
    param(
        ROOTFS_SHA256,
        None,
        "the rootfs tarball's sha256 (hex), checked while downloading",
    ),
    param(
        DISK_IMG_URL,
        None,
        "from-qcow2: the disk image's URL (qcow2 or raw)",
    ),
    param(
        DISK_IMG_SHA256,
        None,
        "from-qcow2: the disk image's sha256 (hex)",
    ),
    param(
        VOLUME,
        Some("/dev/vda"),
        "the block device the image is written to",
    ),
    param(
        EFI_SIZE,
        Some("100M"),
        "from-rootfs: the EFI system partition's size",
    ),
    param(
        SIGNAL_BUILD_DONE_PORT,
        Some(INITRD_DONE_PORT_TEXT),
        "the TCP port the done line is served on",
    ),
    param(
        SIGNAL_FAILURE,
        Some("1"),
        "0: a failed build serves no done line",
    ),
    param(
        GROW_FS,
        Some("0"),
        "from-qcow2, 1: grow the last partition and its ext4 to the volume",
    ),
    param(INITRD_VERBOSE, Some("0"), "1: debug logs on the console"),
    param(
        INITRD_DEBUG,
        Some("0"),
        "1: debug logs on the console (the original's name)",
    ),
    param(
        INITRD_PRE_SHELL,
        Some("0"),
        "1: a shell on the console before the build",
    ),
    param(
        POST_BUILD_SHELL,
        Some("0"),
        "1: a shell on the console after the build",
    ),
    param(
        NO_SIGNAL_STATE,
        Some("0"),
        "1: no state_detail reports to the metadata service",
    ),
    Param {
        key: NO_METADATA,
        default: Some("0"),
        from_tags: false,
        doc: "command line, 1: parameters come from the command line alone",
    },
    Param {
        key: METADATA_IP,
        default: Some(METADATA_ADDRESS),
        from_tags: false,
        doc: "command line: the metadata service's IP or IP:port",
    },
];

/// The parameter named `key`, if the agent knows it.
pub fn find(key: &str) -> Option<&'static Param> {
    ALL.iter().find(|p| p.key == key)
}

/// `key`'s default (`None` when it has none or is unknown).
pub fn default_of(key: &str) -> Option<&'static str> {
    find(key)?.default
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_unique_and_documented() {
        for (i, p) in ALL.iter().enumerate() {
            assert!(!p.doc.is_empty(), "{} has no doc", p.key);
            assert!(
                ALL[i + 1..].iter().all(|q| q.key != p.key),
                "{} twice",
                p.key
            );
            assert_eq!(find(p.key), Some(p));
        }
        assert_eq!(find("no_such_key"), None);
    }

    #[test]
    fn defaults_agree_with_the_constants() {
        assert_eq!(
            default_of(SIGNAL_BUILD_DONE_PORT),
            Some(INITRD_DONE_PORT.to_string().as_str())
        );
        assert_eq!(default_of(METADATA_IP), Some(METADATA_ADDRESS));
        assert_eq!(METADATA_ADDRESS.parse(), Ok(METADATA_IPV4));
        assert_eq!(default_of(ROOTFS_URL), None);
        for m in crate::Method::ALL {
            assert!(find(m.input().url_key()).is_some());
            assert!(find(m.input().sha256_key()).is_some());
        }
        // The done port default must parse as the port it stands for.
        let port: u16 = default_of(SIGNAL_BUILD_DONE_PORT).unwrap().parse().unwrap();
        assert_eq!(port, INITRD_DONE_PORT);
        assert!(!find(NO_METADATA).unwrap().from_tags);
    }
}
