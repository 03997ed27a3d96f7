//! What can go wrong, in words a user can act on.

use std::io;

/// `Result` with this crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Why an image cannot be read (or copied).
///
/// The first group refuses images this reader does not handle on purpose and
/// says how to convert them; the second names damage; the last group wraps
/// I/O failures of the caller's source, stream or sink with the offset at
/// which they happened.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The file does not start with the qcow2 magic `QFI\xfb`.
    #[error("not a qcow2 image: it starts with {found:02x?}, a qcow2 image starts with 51 46 49 fb (\"QFI\\xfb\")")]
    NotQcow2 { found: [u8; 4] },

    /// The file is shorter than the header it announces.
    #[error("the qcow2 header is cut short: the file has {file_len} bytes, the header needs {needed}; the file is truncated")]
    TruncatedHeader { file_len: u64, needed: u64 },

    /// Neither version 2 nor version 3.
    #[error("qcow2 version {0} is not supported (only 2 and 3 are); convert the image with `qemu-img convert -O qcow2`")]
    UnsupportedVersion(u32),

    /// `cluster_bits` outside 9..=21 (512 B to 2 MiB), the range QEMU accepts.
    #[error("qcow2 cluster_bits is {0}, outside 9..=21 (512 B to 2 MiB): the header is damaged")]
    InvalidClusterBits(u32),

    /// A v3 `compression_type` other than 0 (zlib) or 1 (zstd).
    #[error("qcow2 compression type {0} is unknown (0 = zlib, 1 = zstd); convert the image with `qemu-img convert -O qcow2`")]
    UnknownCompressionType(u8),

    /// The image is an overlay: its unallocated clusters live in another file.
    #[error("qcow2 has a backing file {name:?}; flatten it first with `qemu-img convert -O qcow2 IMAGE FLAT.qcow2`")]
    BackingFile { name: String },

    /// AES (`crypt_method` 1) or LUKS (2) encryption.
    #[error("qcow2 image is encrypted ({}); decrypt it first with `qemu-img convert -O qcow2` and its key (see --object secret in qemu-img(1))", crypt_method_name(*method))]
    Encrypted { method: u32 },

    /// Incompatible feature bit 2: guest data lives in another file.
    #[error("qcow2 image keeps its data in an external data file; make it self-contained first with `qemu-img convert -O qcow2`")]
    ExternalDataFile,

    /// Incompatible feature bit 4: 128-bit L2 entries with subclusters.
    #[error("qcow2 image uses extended L2 entries (subclusters), which this reader does not support; convert it with `qemu-img convert -O qcow2` (without extended_l2=on)")]
    ExtendedL2,

    /// Incompatible feature bits this reader does not know.
    #[error("qcow2 image uses unknown incompatible features (bits {}); convert it with `qemu-img convert -O qcow2` from the QEMU that wrote it", bit_list(*bits))]
    UnknownIncompatibleFeatures { bits: u64 },

    /// Incompatible feature bit 1: QEMU found the image inconsistent.
    #[error("qcow2 image is marked corrupt by QEMU; repair it with `qemu-img check -r all` first")]
    MarkedCorrupt,

    /// The guest disk does not fit on the target volume.
    #[error("qcow2 virtual size is {virtual_size} bytes, larger than the volume ({volume_size} bytes); use a volume of at least {virtual_size} bytes")]
    TooLarge { virtual_size: u64, volume_size: u64 },

    /// A table or cluster the metadata points to is (partly) past the end of the file.
    #[error("qcow2 {what} at offset {offset} ({len} bytes) lies outside the file ({file_len} bytes): the image is truncated or damaged")]
    OutsideFile {
        what: &'static str,
        offset: u64,
        len: u64,
        file_len: u64,
    },

    /// A table or cluster offset that is not aligned to a cluster.
    #[error("qcow2 {what} offset {offset} is not a multiple of {alignment}: the image is damaged")]
    Misaligned {
        what: &'static str,
        offset: u64,
        alignment: u64,
    },

    /// Inconsistent metadata not covered by a more specific variant.
    #[error("qcow2 image is damaged: {detail}; check it with `qemu-img check`")]
    Corrupt { detail: String },

    /// A compressed cluster that does not decompress to exactly one cluster.
    #[error("qcow2 compressed cluster for guest offset {guest_offset} (host offset {host_offset}) is damaged: {detail}")]
    BadCompressedCluster {
        guest_offset: u64,
        host_offset: u64,
        detail: String,
    },

    /// The caller's [`ReadAt`](crate::ReadAt) failed while reading metadata.
    #[error("reading the qcow2 {what} at offset {offset} failed: {source}")]
    ReadMetadata {
        what: &'static str,
        offset: u64,
        #[source]
        source: io::Error,
    },

    /// The data stream given to [`copy_data`](crate::copy_data) failed.
    #[error("reading the qcow2 data stream at offset {offset} failed: {source}")]
    ReadData {
        offset: u64,
        #[source]
        source: io::Error,
    },

    /// The data stream ended before the last byte the layout needs.
    #[error("the qcow2 data stream ended at offset {offset}, before offset {needed} that the image needs: the download was cut short or the file is truncated")]
    DataStreamEnded { offset: u64, needed: u64 },

    /// The data stream starts after the first cluster it must deliver.
    #[error("the qcow2 data stream starts at offset {stream_offset}, after the first data at offset {first_data_offset}; start it at Layout::first_data_offset() or earlier")]
    StreamStartsTooLate {
        stream_offset: u64,
        first_data_offset: u64,
    },

    /// The caller's [`Sink`](crate::Sink) failed.
    #[error("writing guest offset {guest_offset} ({len} bytes) to the target failed: {source}")]
    Write {
        guest_offset: u64,
        len: u64,
        #[source]
        source: io::Error,
    },
}

impl Error {
    pub(crate) fn corrupt(detail: impl Into<String>) -> Error {
        Error::Corrupt {
            detail: detail.into(),
        }
    }
}

fn crypt_method_name(method: u32) -> String {
    match method {
        1 => "AES, crypt_method 1".to_string(),
        2 => "LUKS, crypt_method 2".to_string(),
        other => format!("unknown crypt_method {other}"),
    }
}

/// "5, 7 and 63".
fn bit_list(bits: u64) -> String {
    let numbers: Vec<String> = (0..64)
        .filter(|bit| bits & (1u64 << bit) != 0)
        .map(|bit| bit.to_string())
        .collect();
    match numbers.split_last() {
        None => "none".to_string(),
        Some((last, [])) => last.clone(),
        Some((last, rest)) => format!("{} and {last}", rest.join(", ")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_feature_bits_are_named() {
        let message = Error::UnknownIncompatibleFeatures {
            bits: (1 << 5) | (1 << 7) | (1 << 63),
        }
        .to_string();
        assert!(message.contains("bits 5, 7 and 63"), "{message}");
        assert_eq!(bit_list(1 << 9), "9");
    }
}
