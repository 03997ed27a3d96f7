//! The qcow2 header (versions 2 and 3).
//!
//! Every field is big-endian. Offsets, from the qcow2 specification
//! (`docs/interop/qcow2.txt` in QEMU):
//!
//! | bytes  | field                        | used here                          |
//! |--------|------------------------------|------------------------------------|
//! | 0-3    | magic `QFI\xfb`              | checked                            |
//! | 4-7    | version (2 or 3)             | checked                            |
//! | 8-15   | backing_file_offset          | refused if not 0                   |
//! | 16-19  | backing_file_size            | for the error message              |
//! | 20-23  | cluster_bits                 | 9..=21                             |
//! | 24-31  | size (virtual, bytes)        | yes                                |
//! | 32-35  | crypt_method                 | refused if not 0                   |
//! | 36-39  | l1_size (entries)            | yes                                |
//! | 40-47  | l1_table_offset              | yes                                |
//! | 48-71  | refcount table, snapshots    | ignored: reading needs neither     |
//! | 72-79  | v3: incompatible_features    | checked bit by bit                 |
//! | 80-87  | v3: compatible_features      | ignored (safe by definition)       |
//! | 88-95  | v3: autoclear_features       | ignored (safe by definition)       |
//! | 96-99  | v3: refcount_order           | ignored                            |
//! | 100-103| v3: header_length            | >= 104, multiple of 8              |
//! | 104    | v3: compression_type         | if header_length > 104             |
//!
//! Header extensions (backing format, feature names, bitmaps, LUKS header,
//! external data file name) follow the header; reading the data needs none of
//! them, because everything they could change is also announced in a field
//! above (`crypt_method` 2 for LUKS, incompatible bit 2 for an external data
//! file).

use crate::error::{Error, Result};
use crate::read_at::ReadAt;

/// The first four bytes of every qcow2 file.
pub const MAGIC: [u8; 4] = *b"QFI\xfb";

/// Incompatible feature bit 0: the image was not closed cleanly. Refcounts
/// may be stale; the L1 and L2 tables, the only metadata reading needs, are
/// not affected, so such an image is read (see [`Header::is_dirty`]).
pub const INCOMPAT_DIRTY: u64 = 1 << 0;
/// Incompatible feature bit 1: QEMU found the image inconsistent. Refused.
pub const INCOMPAT_CORRUPT: u64 = 1 << 1;
/// Incompatible feature bit 2: guest data lives in an external file. Refused.
pub const INCOMPAT_EXTERNAL_DATA_FILE: u64 = 1 << 2;
/// Incompatible feature bit 3: `compression_type` is not zlib.
pub const INCOMPAT_COMPRESSION_TYPE: u64 = 1 << 3;
/// Incompatible feature bit 4: extended L2 entries (subclusters). Refused.
pub const INCOMPAT_EXTENDED_L2: u64 = 1 << 4;
const INCOMPAT_KNOWN: u64 = INCOMPAT_DIRTY
    | INCOMPAT_CORRUPT
    | INCOMPAT_EXTERNAL_DATA_FILE
    | INCOMPAT_COMPRESSION_TYPE
    | INCOMPAT_EXTENDED_L2;

/// Smallest and largest `cluster_bits` QEMU accepts: 512 B to 2 MiB clusters.
pub const CLUSTER_BITS: std::ops::RangeInclusive<u32> = 9..=21;

const V2_HEADER_LEN: u64 = 72;
const V3_MIN_HEADER_LEN: u64 = 104;
/// v3 header up to and including `compression_type` and its padding.
const LONGEST_HEADER_READ: u64 = 112;
/// The specification caps backing file names at 1023 bytes.
const MAX_BACKING_FILE_NAME: u32 = 1023;

/// How compressed clusters are compressed (one method per image).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Compression {
    /// Raw deflate (no zlib header), `compression_type` 0: every v2 image and
    /// the v3 default.
    Zlib,
    /// Zstandard frames, `compression_type` 1.
    Zstd,
}

/// The header fields of a qcow2 image, parsed and checked for consistency
/// but not yet for support: an image with a backing file or encryption still
/// has a `Header` (the host CLI can show it), while
/// [`Layout::read`](crate::Layout::read) refuses it.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Header {
    /// 2 or 3.
    pub version: u32,
    /// log2 of the cluster size, in [`CLUSTER_BITS`].
    pub cluster_bits: u32,
    /// Size of the guest disk in bytes.
    pub virtual_size: u64,
    /// Name of the backing file, if any (lossily decoded as UTF-8; a name
    /// that cannot be read is described in brackets instead).
    pub backing_file: Option<String>,
    /// 0 = none, 1 = AES, 2 = LUKS.
    pub crypt_method: u32,
    /// Entries in the active L1 table (may exceed what the virtual size needs).
    pub l1_size: u32,
    /// File offset of the active L1 table.
    pub l1_table_offset: u64,
    /// Internal snapshots (ignored: the active L1 table is what is read).
    pub nb_snapshots: u32,
    /// v3 incompatible feature bits (0 for v2), see the `INCOMPAT_*` constants.
    pub incompatible_features: u64,
    /// v3 compatible feature bits (0 for v2); none affects reading.
    pub compatible_features: u64,
    /// v3 autoclear feature bits (0 for v2); none affects reading.
    pub autoclear_features: u64,
    /// Length of the header in bytes (72 for v2).
    pub header_length: u32,
    /// Compression method of compressed clusters.
    pub compression: Compression,
}

impl Header {
    /// Reads and checks the header of the `file_len`-byte file `source`.
    ///
    /// Fails if the bytes are not a well-formed qcow2 header; succeeds for
    /// well-formed headers of images that [`Header::check_supported`] refuses.
    pub fn read<R: ReadAt + ?Sized>(source: &mut R, file_len: u64) -> Result<Header> {
        let mut bytes = [0u8; LONGEST_HEADER_READ as usize];
        let available = file_len.min(LONGEST_HEADER_READ) as usize;
        let bytes = &mut bytes[..available];
        read_metadata(source, "header", 0, bytes)?;
        let bytes = &*bytes;

        let magic: [u8; 4] = match bytes.get(0..4).and_then(|m| m.try_into().ok()) {
            Some(magic) => magic,
            None => {
                return Err(Error::TruncatedHeader {
                    file_len,
                    needed: V2_HEADER_LEN,
                })
            }
        };
        if magic != MAGIC {
            return Err(Error::NotQcow2 { found: magic });
        }
        let field_u32 = |at: usize| -> Result<u32> {
            bytes
                .get(at..at + 4)
                .and_then(|b| b.try_into().ok())
                .map(u32::from_be_bytes)
                .ok_or(Error::TruncatedHeader {
                    file_len,
                    needed: V2_HEADER_LEN,
                })
        };
        let field_u64 = |at: usize| -> Result<u64> {
            bytes
                .get(at..at + 8)
                .and_then(|b| b.try_into().ok())
                .map(u64::from_be_bytes)
                .ok_or(Error::TruncatedHeader {
                    file_len,
                    needed: V2_HEADER_LEN,
                })
        };

        let version = field_u32(4)?;
        if version != 2 && version != 3 {
            return Err(Error::UnsupportedVersion(version));
        }
        let needed = if version == 2 {
            V2_HEADER_LEN
        } else {
            V3_MIN_HEADER_LEN
        };
        if file_len < needed {
            return Err(Error::TruncatedHeader { file_len, needed });
        }

        let backing_file_offset = field_u64(8)?;
        let backing_file_size = field_u32(16)?;
        let cluster_bits = field_u32(20)?;
        if !CLUSTER_BITS.contains(&cluster_bits) {
            return Err(Error::InvalidClusterBits(cluster_bits));
        }
        let virtual_size = field_u64(24)?;
        let crypt_method = field_u32(32)?;
        let l1_size = field_u32(36)?;
        let l1_table_offset = field_u64(40)?;
        let nb_snapshots = field_u32(60)?;

        let (incompatible_features, compatible_features, autoclear_features, header_length) =
            if version == 2 {
                (0, 0, 0, V2_HEADER_LEN as u32)
            } else {
                (
                    field_u64(72)?,
                    field_u64(80)?,
                    field_u64(88)?,
                    field_u32(100)?,
                )
            };
        if version == 3 {
            if u64::from(header_length) < V3_MIN_HEADER_LEN || !header_length.is_multiple_of(8) {
                return Err(Error::corrupt(format!(
                    "the v3 header_length is {header_length}, it must be a multiple of 8 and at least {V3_MIN_HEADER_LEN}"
                )));
            }
            if u64::from(header_length) > file_len {
                return Err(Error::TruncatedHeader {
                    file_len,
                    needed: u64::from(header_length),
                });
            }
        }

        let compression_type = if u64::from(header_length) > V3_MIN_HEADER_LEN {
            // header_length is a multiple of 8 and > 104, hence >= 112 and
            // within the file: byte 104 was read.
            *bytes.get(104).ok_or(Error::TruncatedHeader {
                file_len,
                needed: LONGEST_HEADER_READ,
            })?
        } else {
            0
        };
        let compression = match compression_type {
            0 => Compression::Zlib,
            1 => Compression::Zstd,
            other => return Err(Error::UnknownCompressionType(other)),
        };
        // QEMU insists that bit 3 is set exactly when the type is not zlib,
        // so that an older QEMU refuses an image it would misread.
        let compression_bit = incompatible_features & INCOMPAT_COMPRESSION_TYPE != 0;
        if compression_bit != (compression != Compression::Zlib) {
            return Err(Error::corrupt(format!(
                "compression_type is {compression_type} but the compression type feature bit is {}",
                if compression_bit { "set" } else { "clear" }
            )));
        }

        let backing_file = (backing_file_offset != 0).then(|| {
            read_backing_file_name(source, file_len, backing_file_offset, backing_file_size)
        });

        Ok(Header {
            version,
            cluster_bits,
            virtual_size,
            backing_file,
            crypt_method,
            l1_size,
            l1_table_offset,
            nb_snapshots,
            incompatible_features,
            compatible_features,
            autoclear_features,
            header_length,
            compression,
        })
    }

    /// Size of a cluster in bytes (512 B to 2 MiB).
    pub fn cluster_size(&self) -> u64 {
        1u64 << self.cluster_bits
    }

    /// The image was not closed cleanly (incompatible bit 0).
    ///
    /// Such an image is read anyway: the flag says that *refcounts* may be
    /// stale (QEMU's lazy refcounts), and reading uses none. Callers may
    /// want to log a warning, since an unclean shutdown can also mean that the
    /// guest's last writes are missing.
    pub fn is_dirty(&self) -> bool {
        self.incompatible_features & INCOMPAT_DIRTY != 0
    }

    /// Refuses what this reader does not handle, with what to do about it:
    /// a corrupt mark, a backing file, encryption, an external data file,
    /// extended L2 entries, and unknown incompatible features.
    pub fn check_supported(&self) -> Result<()> {
        let incompatible = self.incompatible_features;
        if incompatible & INCOMPAT_CORRUPT != 0 {
            return Err(Error::MarkedCorrupt);
        }
        if let Some(name) = &self.backing_file {
            return Err(Error::BackingFile { name: name.clone() });
        }
        if self.crypt_method != 0 {
            return Err(Error::Encrypted {
                method: self.crypt_method,
            });
        }
        if incompatible & INCOMPAT_EXTERNAL_DATA_FILE != 0 {
            return Err(Error::ExternalDataFile);
        }
        if incompatible & INCOMPAT_EXTENDED_L2 != 0 {
            return Err(Error::ExtendedL2);
        }
        let unknown = incompatible & !INCOMPAT_KNOWN;
        if unknown != 0 {
            return Err(Error::UnknownIncompatibleFeatures { bits: unknown });
        }
        Ok(())
    }
}

/// The name, for messages only: never fails, never allocates more than the
/// specification's 1023 bytes.
fn read_backing_file_name<R: ReadAt + ?Sized>(
    source: &mut R,
    file_len: u64,
    offset: u64,
    size: u32,
) -> String {
    if size == 0 || size > MAX_BACKING_FILE_NAME {
        return format!("<name of {size} bytes at offset {offset}>");
    }
    let in_file = offset
        .checked_add(u64::from(size))
        .is_some_and(|end| end <= file_len);
    if !in_file {
        return format!("<name at offset {offset}, outside the file>");
    }
    let mut name = vec![0u8; size as usize];
    match source.read_exact_at(offset, &mut name) {
        Ok(()) => String::from_utf8_lossy(&name).into_owned(),
        Err(error) => format!("<name at offset {offset}: {error}>"),
    }
}

/// `source.read_exact_at` with the failure described.
pub(crate) fn read_metadata<R: ReadAt + ?Sized>(
    source: &mut R,
    what: &'static str,
    offset: u64,
    buf: &mut [u8],
) -> Result<()> {
    source
        .read_exact_at(offset, buf)
        .map_err(|source| Error::ReadMetadata {
            what,
            offset,
            source,
        })
}
