//! Reads qcow2 disk images in one sequential pass over their data.
//!
//! # What
//!
//! A qcow2 reader with a narrow interface, for two users: the initrd agent,
//! which streams a qcow2 image from an HTTP URL onto a block device, and the
//! host CLI, which inspects qcow2 files. It reads; it never writes an image.
//!
//! ```no_run
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! use std::fs::File;
//! let mut file = File::open("disk.qcow2")?;
//! let file_len = file.metadata()?.len();
//! let volume_size = 10 << 30;
//! // 1. Metadata, by random access.
//! let layout = qcow2::Layout::read(&mut file, file_len, volume_size)?;
//! // 2. Data, in one forward pass from the first data cluster.
//! let start = layout.first_data_offset().unwrap_or(0);
//! let mut stream = std::io::BufReader::new(File::open("disk.qcow2")?);
//! std::io::Seek::seek(&mut stream, std::io::SeekFrom::Start(start))?;
//! # struct Target; impl qcow2::Sink for Target {
//! #   fn write_at(&mut self, _: u64, _: &[u8]) -> std::io::Result<()> { Ok(()) }
//! #   fn zero(&mut self, _: u64, _: u64) -> std::io::Result<()> { Ok(()) } }
//! # let mut target = Target;
//! let stats = qcow2::copy_data(&layout, stream, start, &mut target)?;
//! # let _ = stats; Ok(()) }
//! ```
//!
//! # Why one pass
//!
//! A qcow2 file maps guest clusters to file clusters through two levels of
//! tables (L1, then L2). Reading it guest offset by guest offset, as QEMU
//! does, jumps around the file; over HTTP that is one request per jump, and
//! staging the whole file first costs its size in RAM or disk. But the
//! metadata is small (8 bytes per cluster, 1/8192 of the data with 64 KiB
//! clusters), so the reader splits the work:
//!
//! 1. [`Layout::read`] reads the header, the L1 table and every L2 table
//!    with random access through [`ReadAt`] (`pread` on a file, HTTP `Range`
//!    requests remotely; L2 tables less than 64 KiB apart are read in one
//!    call of at most 1 MiB). It turns them into a [`Layout`]: the guest
//!    ranges that read as zeros, and the guest ranges backed by file data,
//!    sorted by *file* offset.
//! 2. [`copy_data`] then reads the file once, front to back, from
//!    [`Layout::first_data_offset`] to [`Layout::data_end_offset`] (one
//!    HTTP GET), writes each cluster at its guest offset through a [`Sink`],
//!    decompresses compressed clusters, and skips what lies between by
//!    reading and discarding, never by seeking back. Zero ranges go to
//!    [`Sink::zero`] so a block device can use `BLKZEROOUT`.
//!
//! The sink sees guest offsets in file order, which is random access on the
//! target; a block device or a file handles that well, and nothing is ever
//! read back.
//!
//! # Memory
//!
//! No data is buffered beyond the current piece. [`Layout`] holds one
//! 32-byte [`Extent`] per run: data clusters contiguous in both the guest
//! and the file, or zero clusters contiguous in the guest. At worst that is
//! one per cluster (a fully fragmented or compressed image: 32 bytes per
//! cluster, 0.05 % of the data with 64 KiB clusters), plus up to as much
//! again while it is built (vector growth, the final concatenation). Every
//! allocation is bounded by metadata actually present in the file (the L1
//! table is read in 512 KiB chunks, L2 tables in groups of at most 1 MiB or
//! one table, two L1 entries may not share an L2 table, and each L2 entry
//! yields at most one extent) and by the virtual size, never by a header
//! field alone. [`copy_data`] passes plain data from the stream's own
//! buffer to the sink; it holds one buffer for a compressed cluster's bound
//! (up to twice a cluster), one cluster for decompression, and the zstd
//! decoder's window, which a frame may not ask to be larger than 8 MiB
//! (libzstd would allow 128 MiB).
//!
//! # What is refused, and what is accepted
//!
//! Refused with an [`Error`] that says what to do: backing files (flatten
//! with `qemu-img convert`), encryption (AES or LUKS), external data files,
//! extended L2 entries (subclusters), unknown incompatible features, images
//! QEMU marked corrupt, a virtual size larger than the target volume, and
//! any metadata that is inconsistent: tables or clusters outside the file
//! or misaligned, an L1 table too small for the virtual size, clusters used
//! twice, compressed clusters that do not decompress to exactly one
//! cluster. The reader never panics on malformed input: all arithmetic on
//! file-supplied values is bounded or checked (see `fuzz/`).
//!
//! Accepted: versions 2 and 3, clusters of 512 B to 2 MiB, zlib and zstd
//! compression, internal snapshots (only the active L1 table is read), and
//! *dirty* images (incompatible bit 0): the flag means refcounts may be
//! stale, and reading uses no refcounts; [`Header::is_dirty`] lets the
//! caller warn. Reserved bits in L1/L2 entries are ignored, as QEMU does,
//! and so are L1 entries past the virtual size (QEMU keeps a larger L1
//! table after shrinking an image). Header extensions are not read: what
//! they could change is also announced in the header (`crypt_method` 2 for
//! LUKS, incompatible bit 2 for an external data file).

mod copy;
mod error;
mod header;
mod layout;
mod read_at;

pub use copy::{copy_data, CopyStats, Sink, DATA_CHUNK};
pub use error::{Error, Result};
pub use header::{
    Compression, Header, CLUSTER_BITS, INCOMPAT_COMPRESSION_TYPE, INCOMPAT_CORRUPT, INCOMPAT_DIRTY,
    INCOMPAT_EXTENDED_L2, INCOMPAT_EXTERNAL_DATA_FILE, MAGIC,
};
pub use layout::{Extent, Layout, MAX_L1_ENTRIES};
pub use read_at::ReadAt;
