//! Where every guest byte comes from: the L1 and L2 tables turned into a
//! list of extents ordered for one forward pass over the file.

use crate::error::{Error, Result};
use crate::header::{read_metadata, Compression, Header};
use crate::read_at::ReadAt;

/// L1 and L2 entries: bits 9-55 hold a cluster-aligned file offset.
const TABLE_OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
/// L2 entry bit 62: the cluster is compressed.
const L2_COMPRESSED: u64 = 1 << 62;
/// L2 entry bit 0 (v3): the cluster reads as zeros.
const L2_ZERO: u64 = 1;
/// Compressed clusters are addressed in 512-byte sectors.
const SECTOR_SIZE: u64 = 512;
/// QEMU's limit on the active L1 table (`QCOW_MAX_L1_SIZE`, 32 MiB).
pub const MAX_L1_ENTRIES: u64 = 32 * 1024 * 1024 / 8;
/// L1 entries read per call: 512 KiB.
const L1_CHUNK_ENTRIES: u64 = 64 * 1024;
/// L2 tables close to each other are read together, up to this many bytes
/// per call (or one table, if clusters are larger).
const L2_COALESCE_BYTES: u64 = 1024 * 1024;
/// L2 tables at most this far apart count as close: reading the bytes in
/// between costs less than another request (a request costs about latency
/// times bandwidth: 125 KB at 1 ms and 1 Gbit/s). qemu-img puts each L2
/// table just before the data clusters it maps, so only with 512-byte
/// clusters (32 KiB of data per table) are tables this close.
const L2_COALESCE_GAP: u64 = 64 * 1024;

/// A run of guest bytes and where its contents come from.
///
/// 32 bytes each. Offsets and lengths are in bytes; guest ranges never extend
/// past the virtual size (the last cluster of a disk whose size is not a
/// multiple of the cluster size is cut short).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Extent {
    /// Uncompressed clusters, contiguous both in the guest and in the file:
    /// guest `guest_offset..+len` holds file `host_offset..+len`.
    Data {
        guest_offset: u64,
        host_offset: u64,
        len: u64,
    },
    /// One compressed cluster: the compressed bytes start at `host_offset`
    /// and take at most `compressed_len` bytes (the L2 entry counts 512-byte
    /// sectors, so this bound may include the start of the next compressed
    /// cluster; it is cut at the end of the file). They decompress to one
    /// cluster, of which the first `len` bytes are the guest's.
    Compressed {
        guest_offset: u64,
        host_offset: u64,
        compressed_len: u32,
        len: u32,
        compression: Compression,
    },
    /// Guest bytes that read as zeros: clusters with the zero flag, and
    /// unallocated clusters (which read as zeros since there is no backing file).
    Zero { guest_offset: u64, len: u64 },
}

impl Extent {
    /// First guest byte.
    pub fn guest_offset(&self) -> u64 {
        match *self {
            Extent::Data { guest_offset, .. }
            | Extent::Compressed { guest_offset, .. }
            | Extent::Zero { guest_offset, .. } => guest_offset,
        }
    }

    /// Number of guest bytes.
    pub fn guest_len(&self) -> u64 {
        match *self {
            Extent::Data { len, .. } | Extent::Zero { len, .. } => len,
            Extent::Compressed { len, .. } => u64::from(len),
        }
    }

    /// File bytes the extent needs, as `(offset, len)`; `None` for zeros.
    pub fn host_range(&self) -> Option<(u64, u64)> {
        match *self {
            Extent::Data {
                host_offset, len, ..
            } => Some((host_offset, len)),
            Extent::Compressed {
                host_offset,
                compressed_len,
                ..
            } => Some((host_offset, u64::from(compressed_len))),
            Extent::Zero { .. } => None,
        }
    }
}

/// Where every guest byte of an image comes from, ready for
/// [`copy_data`](crate::copy_data).
///
/// The extents cover the guest disk `0..virtual_size` exactly once. They are
/// ordered as the copy uses them: first the [`Extent::Zero`] ranges in guest
/// order (they need no file data), then the extents with file data in file
/// order (by host offset, then guest offset).
#[derive(Debug, Clone)]
pub struct Layout {
    header: Header,
    extents: Vec<Extent>,
    /// Index of the first extent with file data.
    first_host_extent: usize,
    /// End of the last file byte any extent needs.
    data_end_offset: u64,
}

impl Layout {
    /// Reads the header, the L1 table and every L2 table of the
    /// `file_len`-byte image `source`, for a target of `volume_size` bytes.
    ///
    /// Refuses images whose virtual size exceeds `volume_size`
    /// ([`Error::TooLarge`]) and everything [`Header::check_supported`]
    /// refuses. Reads only metadata, never guest data.
    pub fn read<R: ReadAt + ?Sized>(
        source: &mut R,
        file_len: u64,
        volume_size: u64,
    ) -> Result<Layout> {
        let header = Header::read(source, file_len)?;
        Layout::from_header(header, source, file_len, volume_size)
    }

    /// [`Layout::read`] for a header read already (the same `source` and `file_len`).
    pub fn from_header<R: ReadAt + ?Sized>(
        header: Header,
        source: &mut R,
        file_len: u64,
        volume_size: u64,
    ) -> Result<Layout> {
        header.check_supported()?;
        if header.virtual_size > volume_size {
            return Err(Error::TooLarge {
                virtual_size: header.virtual_size,
                volume_size,
            });
        }
        let mut builder = Builder::new(&header, file_len)?;
        let l2_tables = builder.read_l1(source)?;
        builder.read_l2_tables(source, l2_tables)?;
        builder.finish(header)
    }

    /// The header the layout was read from.
    pub fn header(&self) -> &Header {
        &self.header
    }

    /// Size of the guest disk in bytes.
    pub fn virtual_size(&self) -> u64 {
        self.header.virtual_size
    }

    /// Size of a cluster in bytes.
    pub fn cluster_size(&self) -> u64 {
        self.header.cluster_size()
    }

    /// All extents: zero ranges in guest order, then the extents with file
    /// data in file order.
    pub fn extents(&self) -> &[Extent] {
        &self.extents
    }

    /// The [`Extent::Zero`] ranges, in guest order.
    pub fn zero_extents(&self) -> &[Extent] {
        self.extents
            .get(..self.first_host_extent)
            .unwrap_or_default()
    }

    /// The [`Extent::Data`] and [`Extent::Compressed`] extents, in file order.
    pub fn host_extents(&self) -> &[Extent] {
        self.extents
            .get(self.first_host_extent..)
            .unwrap_or_default()
    }

    /// File offset of the first byte [`copy_data`](crate::copy_data) needs,
    /// where a stream (an HTTP `Range` request) can start; `None` if the
    /// image holds no data at all.
    pub fn first_data_offset(&self) -> Option<u64> {
        self.host_extents()
            .first()
            .and_then(Extent::host_range)
            .map(|(offset, _)| offset)
    }

    /// File offset just past the last byte [`copy_data`](crate::copy_data)
    /// needs; `None` if the image holds no data at all.
    pub fn data_end_offset(&self) -> Option<u64> {
        (!self.host_extents().is_empty()).then_some(self.data_end_offset)
    }

    /// Guest bytes that come from file data (plain or compressed clusters).
    pub fn data_bytes(&self) -> u64 {
        self.host_extents().iter().map(Extent::guest_len).sum()
    }

    /// Guest bytes that read as zeros.
    pub fn zero_bytes(&self) -> u64 {
        self.zero_extents().iter().map(Extent::guest_len).sum()
    }
}

/// An allocated L2 table: where it is and which part of the guest it maps.
#[derive(Debug, Clone, Copy)]
struct L2Table {
    host_offset: u64,
    l1_index: u64,
    /// Entries that map guest bytes below the virtual size.
    entries: u64,
}

/// Collects extents while the tables are read.
struct Builder {
    version: u32,
    compression: Compression,
    cluster_bits: u32,
    cluster_size: u64,
    virtual_size: u64,
    file_len: u64,
    l1_table_offset: u64,
    l2_entries: u64,
    /// Guest clusters, the last one possibly cut short by the virtual size.
    guest_clusters: u64,
    /// L1 entries that map guest bytes below the virtual size.
    l1_entries: u64,
    zeros: Vec<Extent>,
    host: Vec<Extent>,
}

impl Builder {
    fn new(header: &Header, file_len: u64) -> Result<Builder> {
        let cluster_size = header.cluster_size();
        let l2_entries = cluster_size / 8;
        let guest_clusters = header.virtual_size.div_ceil(cluster_size);
        let l1_entries = guest_clusters.div_ceil(l2_entries);
        if l1_entries > MAX_L1_ENTRIES {
            return Err(Error::corrupt(format!(
                "a virtual size of {} bytes with {cluster_size}-byte clusters needs {l1_entries} L1 entries, more than QEMU's limit of {MAX_L1_ENTRIES}",
                header.virtual_size
            )));
        }
        if u64::from(header.l1_size) < l1_entries {
            return Err(Error::corrupt(format!(
                "the L1 table has {} entries, a virtual size of {} bytes needs {l1_entries}",
                header.l1_size, header.virtual_size
            )));
        }
        if l1_entries > 0 {
            check_in_file(
                "L1 table",
                header.l1_table_offset,
                l1_entries * 8,
                cluster_size,
                file_len,
            )?;
        }
        Ok(Builder {
            version: header.version,
            compression: header.compression,
            cluster_bits: header.cluster_bits,
            cluster_size,
            virtual_size: header.virtual_size,
            file_len,
            l1_table_offset: header.l1_table_offset,
            l2_entries,
            guest_clusters,
            l1_entries,
            zeros: Vec::new(),
            host: Vec::new(),
        })
    }

    /// Reads the L1 table in chunks; returns the allocated L2 tables and
    /// records the guest ranges of unallocated ones as zeros.
    fn read_l1<R: ReadAt + ?Sized>(&mut self, source: &mut R) -> Result<Vec<L2Table>> {
        let mut tables = Vec::new();
        let mut chunk = Vec::new();
        let mut first = 0;
        while first < self.l1_entries {
            let count = (self.l1_entries - first).min(L1_CHUNK_ENTRIES);
            chunk.resize(count as usize * 8, 0);
            let offset = self.l1_table_offset + first * 8;
            read_metadata(source, "L1 table", offset, &mut chunk)?;
            for (i, entry) in chunk.chunks_exact(8).enumerate() {
                let entry = u64::from_be_bytes(entry.try_into().unwrap_or_default());
                let l1_index = first + i as u64;
                let l2_offset = entry & TABLE_OFFSET_MASK;
                let first_cluster = l1_index * self.l2_entries;
                let entries = (self.guest_clusters - first_cluster).min(self.l2_entries);
                if l2_offset == 0 {
                    self.push_zero(first_cluster, entries);
                    continue;
                }
                check_in_file(
                    "L2 table",
                    l2_offset,
                    entries * 8,
                    self.cluster_size,
                    self.file_len,
                )?;
                tables.push(L2Table {
                    host_offset: l2_offset,
                    l1_index,
                    entries,
                });
            }
            first += count;
        }
        Ok(tables)
    }

    /// Reads the L2 tables in file order, close ones in one call.
    fn read_l2_tables<R: ReadAt + ?Sized>(
        &mut self,
        source: &mut R,
        mut tables: Vec<L2Table>,
    ) -> Result<()> {
        tables.sort_unstable_by_key(|table| table.host_offset);
        // Two L1 entries sharing an L2 table would let a small file describe
        // an arbitrarily large guest; QEMU never writes that.
        if let Some(pair) = tables
            .windows(2)
            .find(|pair| pair[0].host_offset == pair[1].host_offset)
        {
            return Err(Error::corrupt(format!(
                "L1 entries {} and {} both point to the L2 table at offset {}",
                pair[0].l1_index, pair[1].l1_index, pair[0].host_offset
            )));
        }
        let max_group_bytes = L2_COALESCE_BYTES.max(self.cluster_size);
        let mut buf = Vec::new();
        let mut rest = tables.as_slice();
        while let Some(first) = rest.first() {
            let mut count = 1;
            while let (Some(previous), Some(next)) = (rest.get(count - 1), rest.get(count)) {
                // Distinct cluster-aligned tables do not overlap.
                let gap = next
                    .host_offset
                    .saturating_sub(previous.host_offset + previous.entries * 8);
                let group_end = next.host_offset + next.entries * 8;
                if gap > L2_COALESCE_GAP || group_end - first.host_offset > max_group_bytes {
                    break;
                }
                count += 1;
            }
            let (group, after) = rest.split_at(count);
            rest = after;
            let Some(last) = group.last() else { break };
            let group_len = last.host_offset + last.entries * 8 - first.host_offset;
            buf.resize(group_len as usize, 0);
            read_metadata(source, "L2 table", first.host_offset, &mut buf)?;
            for table in group {
                let start = (table.host_offset - first.host_offset) as usize;
                let bytes = buf
                    .get(start..start + table.entries as usize * 8)
                    .ok_or_else(|| Error::corrupt("an L2 table read came back short"))?;
                self.parse_l2_table(table, bytes)?;
            }
        }
        Ok(())
    }

    fn parse_l2_table(&mut self, table: &L2Table, bytes: &[u8]) -> Result<()> {
        let first_cluster = table.l1_index * self.l2_entries;
        for (i, entry) in bytes.chunks_exact(8).enumerate() {
            let entry = u64::from_be_bytes(entry.try_into().unwrap_or_default());
            let cluster = first_cluster + i as u64;
            let guest_offset = cluster << self.cluster_bits;
            let len = (self.virtual_size - guest_offset).min(self.cluster_size);
            if entry & L2_COMPRESSED != 0 {
                self.push_compressed(guest_offset, len, entry)?;
            } else if entry & L2_ZERO != 0 {
                if self.version < 3 {
                    return Err(Error::corrupt(format!(
                        "the L2 entry for guest offset {guest_offset} has the zero flag, which version 2 images do not have"
                    )));
                }
                self.push_zero(cluster, 1);
            } else {
                let host_offset = entry & TABLE_OFFSET_MASK;
                if host_offset == 0 {
                    self.push_zero(cluster, 1);
                } else {
                    check_in_file(
                        "data cluster",
                        host_offset,
                        len,
                        self.cluster_size,
                        self.file_len,
                    )?;
                    self.push_data(guest_offset, host_offset, len);
                }
            }
        }
        Ok(())
    }

    fn push_compressed(&mut self, guest_offset: u64, len: u64, entry: u64) -> Result<()> {
        // Bits 0..x-1: byte offset; bits x..61: additional sectors, where
        // x = 62 - (cluster_bits - 8).
        let offset_bits = 62 - (self.cluster_bits - 8);
        let host_offset = entry & ((1u64 << offset_bits) - 1);
        let sector_mask = (1u64 << (self.cluster_bits - 8)) - 1;
        let sectors = ((entry >> offset_bits) & sector_mask) + 1;
        // At most 2^(cluster_bits - 8) sectors: twice the cluster size, <= 4 MiB.
        let upper_bound = sectors * SECTOR_SIZE - (host_offset % SECTOR_SIZE);
        if host_offset >= self.file_len {
            return Err(Error::OutsideFile {
                what: "compressed cluster",
                offset: host_offset,
                len: upper_bound,
                file_len: self.file_len,
            });
        }
        // QEMU allocates compressed clusters to the byte, so the sector count
        // of the last one can reach past the end of the file.
        let compressed_len = upper_bound.min(self.file_len - host_offset);
        self.host.push(Extent::Compressed {
            guest_offset,
            host_offset,
            compressed_len: compressed_len as u32,
            len: len as u32,
            compression: self.compression,
        });
        Ok(())
    }

    fn push_data(&mut self, guest_offset: u64, host_offset: u64, len: u64) {
        if let Some(Extent::Data {
            guest_offset: last_guest,
            host_offset: last_host,
            len: last_len,
        }) = self.host.last_mut()
        {
            if *last_guest + *last_len == guest_offset && *last_host + *last_len == host_offset {
                *last_len += len;
                return;
            }
        }
        self.host.push(Extent::Data {
            guest_offset,
            host_offset,
            len,
        });
    }

    /// Records `clusters` clusters from `first_cluster` as zeros.
    fn push_zero(&mut self, first_cluster: u64, clusters: u64) {
        let guest_offset = first_cluster << self.cluster_bits;
        let len = (clusters << self.cluster_bits).min(self.virtual_size - guest_offset);
        if let Some(Extent::Zero {
            guest_offset: last_guest,
            len: last_len,
        }) = self.zeros.last_mut()
        {
            if *last_guest + *last_len == guest_offset {
                *last_len += len;
                return;
            }
        }
        self.zeros.push(Extent::Zero { guest_offset, len });
    }

    fn finish(self, header: Header) -> Result<Layout> {
        let Builder {
            mut zeros,
            mut host,
            ..
        } = self;

        zeros.sort_unstable_by_key(Extent::guest_offset);
        zeros.dedup_by(|next, prev| match (prev, &*next) {
            (
                Extent::Zero {
                    guest_offset: prev_guest,
                    len: prev_len,
                },
                Extent::Zero { guest_offset, len },
            ) if *prev_guest + *prev_len == *guest_offset => {
                *prev_len += len;
                true
            }
            _ => false,
        });

        host.sort_unstable_by_key(|extent| {
            let host_offset = extent.host_range().map_or(0, |(offset, _)| offset);
            (host_offset, extent.guest_offset())
        });
        host.dedup_by(|next, prev| match (prev, &*next) {
            (
                Extent::Data {
                    guest_offset: prev_guest,
                    host_offset: prev_host,
                    len: prev_len,
                },
                Extent::Data {
                    guest_offset,
                    host_offset,
                    len,
                },
            ) if *prev_guest + *prev_len == *guest_offset
                && *prev_host + *prev_len == *host_offset =>
            {
                *prev_len += len;
                true
            }
            _ => false,
        });

        // One forward pass needs each extent to start at or after the end of
        // the previous one. Only a compressed cluster may reach into the
        // next extent: its length is a sector-rounded upper bound.
        for pair in host.windows(2) {
            let (Some((prev_offset, prev_len)), Some((next_offset, _))) =
                (pair[0].host_range(), pair[1].host_range())
            else {
                continue;
            };
            let prev_is_compressed = matches!(pair[0], Extent::Compressed { .. });
            if next_offset < prev_offset + prev_len && !prev_is_compressed {
                return Err(Error::corrupt(format!(
                    "guest offsets {} and {} both use file offset {next_offset}",
                    pair[0].guest_offset(),
                    pair[1].guest_offset()
                )));
            }
        }
        let data_end_offset = host
            .iter()
            .filter_map(Extent::host_range)
            .map(|(offset, len)| offset + len)
            .max()
            .unwrap_or(0);

        let first_host_extent = zeros.len();
        let mut extents = zeros;
        extents.extend(host);
        Ok(Layout {
            header,
            extents,
            first_host_extent,
            data_end_offset,
        })
    }
}

/// Checks that `offset..offset + len` is aligned to `alignment` and inside the file.
fn check_in_file(
    what: &'static str,
    offset: u64,
    len: u64,
    alignment: u64,
    file_len: u64,
) -> Result<()> {
    if !offset.is_multiple_of(alignment) {
        return Err(Error::Misaligned {
            what,
            offset,
            alignment,
        });
    }
    match offset.checked_add(len) {
        Some(end) if end <= file_len => Ok(()),
        _ => Err(Error::OutsideFile {
            what,
            offset,
            len,
            file_len,
        }),
    }
}
