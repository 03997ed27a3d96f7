//! Build methods: how the agent writes the volume, named by the
//! `build_method` parameter.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::ParseError;

/// The build methods of the original image-creation initrd (its `custom`
/// method, which ran a downloaded script, is deliberately not offered).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Method {
    /// A GPT disk: an EFI system partition with GRUB and an ext4 root
    /// filled from a rootfs tarball.
    FromRootfs,
    /// One ext4 filesystem over the whole volume, filled from a rootfs
    /// tarball (no partition table, no bootloader).
    UnpartitionedFromRootfs,
    /// A disk image (qcow2 or raw) written block for block.
    FromQcow2,
}

impl Method {
    pub const ALL: [Method; 3] = [
        Method::FromRootfs,
        Method::UnpartitionedFromRootfs,
        Method::FromQcow2,
    ];

    /// Every name, in [`Method::ALL`]'s order (for CLI help).
    pub const NAMES: [&'static str; 3] = [
        Method::FromRootfs.as_str(),
        Method::UnpartitionedFromRootfs.as_str(),
        Method::FromQcow2.as_str(),
    ];

    pub const fn as_str(self) -> &'static str {
        match self {
            Method::FromRootfs => "from-rootfs",
            Method::UnpartitionedFromRootfs => "unpartitioned-from-rootfs",
            Method::FromQcow2 => "from-qcow2",
        }
    }

    /// What the method downloads: a rootfs tarball, or a disk image.
    pub const fn input(self) -> Input {
        match self {
            Method::FromRootfs | Method::UnpartitionedFromRootfs => Input::Rootfs,
            Method::FromQcow2 => Input::DiskImage,
        }
    }
}

/// What a build method downloads, and the parameters that say from where.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Input {
    Rootfs,
    DiskImage,
}

impl Input {
    /// The parameter holding the URL.
    pub const fn url_key(self) -> &'static str {
        match self {
            Input::Rootfs => crate::params::ROOTFS_URL,
            Input::DiskImage => crate::params::DISK_IMG_URL,
        }
    }

    /// The parameter holding the expected sha256 (hex).
    pub const fn sha256_key(self) -> &'static str {
        match self {
            Input::Rootfs => crate::params::ROOTFS_SHA256,
            Input::DiskImage => crate::params::DISK_IMG_SHA256,
        }
    }
}

impl fmt::Display for Method {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Method {
    type Err = ParseError;

    fn from_str(s: &str) -> Result<Self, ParseError> {
        if let Some(m) = Method::ALL.into_iter().find(|m| m.as_str() == s) {
            return Ok(m);
        }
        let valid = Method::NAMES.join(", ");
        Err(ParseError::new(if s == "custom" {
            format!(
                "build_method 'custom' (run a downloaded script) is not supported; \
                 valid methods: {valid}"
            )
        } else {
            format!("unknown build_method '{s}'; valid methods: {valid}")
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_through_text_and_json() {
        for m in Method::ALL {
            assert_eq!(m.as_str().parse::<Method>().unwrap(), m);
            let json = serde_json::to_string(&m).unwrap();
            assert_eq!(json, format!("\"{m}\""));
            assert_eq!(serde_json::from_str::<Method>(&json).unwrap(), m);
        }
        assert_eq!(Method::NAMES, Method::ALL.map(Method::as_str));
    }

    #[test]
    fn errors_name_the_value_and_list_the_valid_ones() {
        let err = "bogus".parse::<Method>().unwrap_err().to_string();
        assert!(err.contains("'bogus'"), "{err}");
        for name in Method::NAMES {
            assert!(err.contains(name), "{err}");
        }
        let err = "custom".parse::<Method>().unwrap_err().to_string();
        assert!(err.contains("not supported"), "{err}");
    }

    #[test]
    fn each_method_downloads_from_its_own_keys() {
        assert_eq!(Method::FromRootfs.input().url_key(), "rootfs_url");
        assert_eq!(Method::FromQcow2.input().url_key(), "disk_img_url");
        assert_eq!(Method::FromQcow2.input().sha256_key(), "disk_img_sha256");
    }
}
