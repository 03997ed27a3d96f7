//! Recognising the formats imgforge and initrd-agent both read, by their
//! bytes, with no I/O: which compression a stream starts with, the PAX
//! records and times of a tar extension header, and what a stream that
//! should have been a tar looks like instead (for an error message).
//!
//! Both programs read rootfs tarballs: the host when it builds and
//! inspects them, the agent when it extracts one onto a volume. Each keeps
//! its own reader (the host's streams and rewrites, the agent's creates
//! files), but what a byte means is decided here, once.

pub mod pax;

/// The compression a stream starts with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Compression {
    Gzip,
    Zstd,
    Xz,
    /// Recognised so that it can be refused by name; neither program
    /// decompresses it.
    Bzip2,
    None,
}

/// How many bytes [`Compression::sniff`] needs to tell every format apart.
pub const SNIFF_LEN: usize = 6;

impl Compression {
    /// Tells the compression from a stream's first bytes (at least
    /// [`SNIFF_LEN`] unless the stream is shorter).
    pub fn sniff(start: &[u8]) -> Compression {
        match start {
            [0x1f, 0x8b, ..] => Compression::Gzip,
            [0x28, 0xb5, 0x2f, 0xfd, ..] => Compression::Zstd,
            [0xfd, b'7', b'z', b'X', b'Z', 0, ..] => Compression::Xz,
            [b'B', b'Z', b'h', ..] => Compression::Bzip2,
            _ => Compression::None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Compression::Gzip => "gzip",
            Compression::Zstd => "zstd",
            Compression::Xz => "xz",
            Compression::Bzip2 => "bzip2",
            Compression::None => "uncompressed",
        }
    }
}

impl std::fmt::Display for Compression {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Whether `block` (a tar header block) carries the ustar magic.
pub fn is_ustar(block: &[u8]) -> bool {
    block.get(257..262) == Some(b"ustar")
}

/// A hint at what a stream is instead of a tar, from its first block:
/// "gzip data; it starts with 1f 8b 08 00 ...".
pub fn describe_start(start: &[u8]) -> String {
    let kind = match (Compression::sniff(start), start) {
        (Compression::None, [b'{', ..] | [b'[', ..]) => "JSON",
        (Compression::None, [b'<', ..]) => "HTML or XML",
        (Compression::None, _) => "its first block is not a tar header",
        (Compression::Gzip, _) => "gzip data",
        (Compression::Zstd, _) => "zstd data",
        (Compression::Xz, _) => "xz data",
        (Compression::Bzip2, _) => "bzip2 data",
    };
    let hex: Vec<String> = start.iter().take(8).map(|b| format!("{b:02x}")).collect();
    format!("{kind}; it starts with {}", hex.join(" "))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn compression_by_magic() {
        let cases: [(&[u8], Compression); 6] = [
            (&[0x1f, 0x8b, 8, 0, 0, 0], Compression::Gzip),
            (&[0x28, 0xb5, 0x2f, 0xfd, 0, 0], Compression::Zstd),
            (b"\xfd7zXZ\0", Compression::Xz),
            (b"BZh91A", Compression::Bzip2),
            (b"\xfd7zXZ", Compression::None), // too short to be xz
            (b"", Compression::None),
        ];
        for (start, expected) in cases {
            assert_eq!(Compression::sniff(start), expected, "{start:02x?}");
        }
    }

    #[test]
    fn describes_what_is_not_a_tar() {
        assert_eq!(
            describe_start(&[0x1f, 0x8b, 8, 0, 0, 0, 0, 0, 0, 3]),
            "gzip data; it starts with 1f 8b 08 00 00 00 00 00"
        );
        assert!(describe_start(b"<!DOCTYPE html>").starts_with("HTML or XML"));
        assert!(describe_start(b"{\"errors\":[]}").starts_with("JSON"));
        assert!(describe_start(b"xyz").starts_with("its first block is not a tar header"));
        let mut block = [0u8; 512];
        assert!(!is_ustar(&block));
        block[257..262].copy_from_slice(b"ustar");
        assert!(is_ustar(&block));
    }
}
