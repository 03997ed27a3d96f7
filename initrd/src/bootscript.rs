//! Bootscripts: the TOML files (e.g. `bootscripts/image-creation-x86_64.toml`)
//! that describe which kernel a build server boots and what goes into its
//! initrd.
//!
//! Parsing is strict (`deny_unknown_fields`): a misspelt key in a bootscript
//! would otherwise be silently ignored and produce an initrd that lacks
//! something, which is only noticed when a build server fails to boot.

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use serde::Deserialize;

/// A parsed bootscript.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Bootscript {
    /// Human-readable name of the bootscript.
    pub title: String,
    /// Architecture of the build server, e.g. `x86_64`.
    pub arch: String,
    /// Kernel command line every build server gets; build parameters are
    /// appended by the caller.
    pub bootcmdargs: String,
    /// Where the kernel (and its modules) come from.
    pub kernel: KernelSource,
    /// What goes into the initrd.
    pub initrd: InitrdContents,
}

/// Where the kernel comes from.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KernelSource {
    /// Name of a Debian package holding the kernel and its modules, e.g.
    /// `linux-image-cloud-amd64` (a metapackage the caller resolves).
    #[serde(default)]
    pub debian_package: Option<String>,
}

/// What goes into the initrd.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InitrdContents {
    /// How the cpio archive is compressed.
    pub compression: Compression,
    /// Kernel module names; their dependencies are added automatically.
    #[serde(default)]
    pub modules: Vec<String>,
    /// Names of host executables (looked up on the host, see
    /// [`crate::builder::find_tool`]) copied with their shared libraries.
    #[serde(default)]
    pub tools: Vec<String>,
    /// Host files copied to the same path (skipped with a warning when absent).
    #[serde(default)]
    pub files: Vec<PathBuf>,
    /// GRUB modules of the EFI image the initrd carries for root
    /// filesystems without GRUB of their own (built with grub-mkimage by the
    /// host); empty: no image.
    #[serde(default)]
    pub grub_efi_modules: Vec<String>,
}

/// Compression of the initrd.
///
/// Only what the kernel decompresses *and* we can produce deterministically
/// with pure-Rust crates is offered; other names are rejected when the
/// bootscript is parsed rather than when the initrd is built.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Deserialize)]
#[serde(try_from = "String")]
pub enum Compression {
    /// gzip at best compression (every kernel config decompresses it).
    #[default]
    Gzip,
    /// A plain cpio archive.
    None,
}

impl Compression {
    /// The name used in bootscripts.
    pub fn as_str(self) -> &'static str {
        match self {
            Compression::Gzip => "gzip",
            Compression::None => "none",
        }
    }
}

impl fmt::Display for Compression {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An unsupported `compression` value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("initrd compression `{0}` is not supported; use \"gzip\" or \"none\"")]
pub struct UnsupportedCompression(pub String);

impl FromStr for Compression {
    type Err = UnsupportedCompression;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "gzip" => Ok(Compression::Gzip),
            "none" => Ok(Compression::None),
            other => Err(UnsupportedCompression(other.to_owned())),
        }
    }
}

impl TryFrom<String> for Compression {
    type Error = UnsupportedCompression;

    fn try_from(s: String) -> Result<Self, Self::Error> {
        s.parse()
    }
}

/// Errors loading a bootscript.
#[derive(Debug, thiserror::Error)]
pub enum BootscriptError {
    /// The file could not be read.
    #[error("cannot read bootscript {path}: {source}; check that the file exists and is readable")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The file is not a valid bootscript. The TOML error carries line and
    /// column, and names unknown keys or unsupported values.
    #[error("invalid bootscript {origin}: {source}")]
    Parse {
        /// The file name, or `<string>` when parsed from memory.
        origin: String,
        #[source]
        source: toml::de::Error,
    },
}

impl Bootscript {
    /// Reads and parses a bootscript file.
    pub fn load(path: impl AsRef<Path>) -> Result<Self, BootscriptError> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).map_err(|source| BootscriptError::Read {
            path: path.to_owned(),
            source,
        })?;
        toml::from_str(&text).map_err(|source| BootscriptError::Parse {
            origin: path.display().to_string(),
            source,
        })
    }

    /// Parses a bootscript held in memory.
    #[allow(clippy::should_implement_trait)] // also provided as `FromStr` below
    pub fn from_str(text: &str) -> Result<Self, BootscriptError> {
        toml::from_str(text).map_err(|source| BootscriptError::Parse {
            origin: "<string>".to_owned(),
            source,
        })
    }
}

impl FromStr for Bootscript {
    type Err = BootscriptError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Bootscript::from_str(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = r#"
        title = "t"
        arch = "x86_64"
        bootcmdargs = "console=ttyS0"
        [kernel]
        debian_package = "linux-image-cloud-amd64"
        [initrd]
        compression = "none"
    "#;

    #[test]
    fn parses_the_repository_bootscript() {
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../bootscripts/image-creation-x86_64.toml"
        );
        let b = Bootscript::load(path).unwrap();
        assert_eq!(b.arch, "x86_64");
        assert_eq!(
            b.kernel.debian_package.as_deref(),
            Some("linux-image-cloud-amd64")
        );
        assert_eq!(b.initrd.compression, Compression::Gzip);
        assert_eq!(
            b.initrd.modules,
            [
                "virtio_pci",
                "virtio_blk",
                "virtio_net",
                "fat",
                "vfat",
                "nls_cp437",
                "nls_ascii"
            ]
        );
        assert_eq!(b.initrd.tools, ["mke2fs", "e2fsck", "resize2fs"]);
        assert_eq!(b.initrd.files, [PathBuf::from("/etc/mke2fs.conf")]);
    }

    #[test]
    fn lists_default_to_empty() {
        let b = Bootscript::from_str(MINIMAL).unwrap();
        assert_eq!(b.initrd.compression, Compression::None);
        assert!(b.initrd.modules.is_empty() && b.initrd.tools.is_empty());
        assert!(b.initrd.files.is_empty());
    }

    #[test]
    fn rejects_unsupported_compression() {
        let text = MINIMAL.replace("\"none\"", "\"zstd\"");
        let msg = Bootscript::from_str(&text).unwrap_err().to_string();
        assert!(msg.contains("`zstd` is not supported"), "{msg}");
        assert!(msg.contains("\"gzip\""), "{msg}");
    }

    #[test]
    fn rejects_unknown_fields() {
        let text = MINIMAL.replace("[initrd]", "[initrd]\nmodule = [\"x\"]");
        let msg = Bootscript::from_str(&text).unwrap_err().to_string();
        assert!(msg.contains("unknown field `module`"), "{msg}");
    }

    #[test]
    fn missing_file_names_the_path() {
        let msg = Bootscript::load("/nonexistent/boot.toml")
            .unwrap_err()
            .to_string();
        assert!(msg.contains("/nonexistent/boot.toml"), "{msg}");
    }
}
