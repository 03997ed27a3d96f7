//! The architectures imgforge knows, under each name the tools use for
//! them (Scaleway's `x86_64`/`arm64`, Debian's and OCI's `amd64`/`arm64`,
//! the kernel's `aarch64`). `--arch` options parse into [`Arch`], so an
//! unknown name is refused with the list instead of being recorded.

use std::fmt;
use std::str::FromStr;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Arch {
    X86_64,
    Arm64,
}

impl Arch {
    /// Every name accepted, for messages and `--help`.
    pub const NAMES: &'static str = "x86_64 (amd64), arm64 (aarch64)";

    /// The name an image records (Scaleway's `arch`).
    pub fn image_name(self) -> &'static str {
        match self {
            Arch::X86_64 => "x86_64",
            Arch::Arm64 => "arm64",
        }
    }

    /// Debian's and OCI's name (`amd64`, `arm64`).
    pub fn debian_name(self) -> &'static str {
        match self {
            Arch::X86_64 => "amd64",
            Arch::Arm64 => "arm64",
        }
    }
}

impl fmt::Display for Arch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.image_name())
    }
}

impl FromStr for Arch {
    type Err = String;

    fn from_str(s: &str) -> Result<Arch, String> {
        match s {
            "x86_64" | "amd64" | "x86-64" => Ok(Arch::X86_64),
            "arm64" | "aarch64" => Ok(Arch::Arm64),
            other => Err(format!(
                "architecture {other:?} is not one imgforge builds: {}",
                Arch::NAMES
            )),
        }
    }
}

/// clap's parser for `--arch`.
pub fn parse(s: &str) -> Result<Arch, String> {
    s.parse()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_map_and_unknown_ones_are_refused_with_the_list() {
        assert_eq!("amd64".parse(), Ok(Arch::X86_64));
        assert_eq!("x86_64".parse(), Ok(Arch::X86_64));
        assert_eq!("aarch64".parse(), Ok(Arch::Arm64));
        assert_eq!(Arch::Arm64.image_name(), "arm64");
        assert_eq!(Arch::X86_64.debian_name(), "amd64");
        let e = "sparc".parse::<Arch>().unwrap_err();
        assert!(e.contains("\"sparc\"") && e.contains(Arch::NAMES), "{e}");
    }
}
