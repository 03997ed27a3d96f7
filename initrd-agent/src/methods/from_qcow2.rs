//! `from-qcow2`: a disk image streamed onto the volume in one pass.
//!
//! `disk_img_url` is a qcow2 (v2 or v3), or a raw image, plain or
//! compressed (gzip, zstd, xz); the format is told by magic bytes. A raw
//! image flows through the decompressor straight onto the volume. A qcow2
//! image needs its tables first: header, L1 and L2 tables are read with
//! `Range` requests (small, random access), then one GET streams the file
//! from its start and every data cluster is written at its guest offset as
//! it passes (see the `qcow2` crate). Memory is one cluster plus the map
//! of allocated clusters, whatever the image's size.
//!
//! After writing: a GPT on the volume gets its backup header moved to the
//! end and its last partition grown to fill the volume; with `grow_fs=1`
//! that partition's ext4 filesystem is grown too (e2fsck, resize2fs).

use std::io::{BufRead, Read};
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;

use anyhow::{bail, Context};
use tracing::{info, warn};

use super::context::{BuildContext, MethodOutcome};
use super::download;
use crate::disk::{self, GrownGpt, Volume};
use crate::fetch;
use crate::read_ahead::ReadAhead;
use crate::stage::{StageContext, StageError};
use contract::method::Input;
use contract::{LayoutEntry, Method, Stage};

nix::ioctl_write_ptr_bad!(blk_zeroout, 0x127f, [u64; 2]);

/// The download runs at most this many buffers of this size ahead of the
/// writes: enough to keep the network busy while the disk catches up.
const READ_AHEAD_CHUNK: usize = 1 << 20;
const READ_AHEAD_DEPTH: usize = 4;

/// Checks the parameters and the volume, streams the image onto it, grows
/// its GPT (and with `grow_fs=1` the last filesystem), then describes the
/// layout. Blocking.
pub fn run(ctx: &BuildContext) -> Result<MethodOutcome, StageError> {
    let (url, mut volume) = ctx.input_and_volume(Method::FromQcow2)?;

    ctx.report(Stage::Fetch, 0);
    let (image, reporter) = download::open(ctx, Input::DiskImage, &url)?;
    // The download is received on its own thread while this one writes.
    let mut stream = ReadAhead::new(image, READ_AHEAD_CHUNK, READ_AHEAD_DEPTH)
        .context("start the download thread")
        .stage(Stage::Fetch)?;
    let written = (|| {
        let head = stream.fill_buf().context("read the image's first bytes")?;
        if head.starts_with(&qcow2::MAGIC) {
            write_qcow2(ctx, &url, &mut stream, &mut volume)
        } else {
            write_raw(&mut stream, &mut volume)
        }
    })();
    // Reporting ends with the transfer (or with any way out before).
    drop(reporter);
    // Bytes of the image (its virtual size for qcow2).
    let image_bytes =
        written.map_err(|e| download::failed(e, Input::DiskImage, &url, Stage::Write))?;
    // The digest covers every byte of the file: checked before the volume
    // is declared good.
    let fetched = stream
        .into_inner()
        .finish()
        .with_context(|| format!("disk_img_url {url}"))
        .stage(Stage::Fetch)?;
    volume.flush().stage(Stage::Write)?;
    info!(
        "disk image: {} bytes fetched (sha256 {}), {} bytes written to {}",
        fetched.bytes,
        fetched.sha256.as_deref().unwrap_or("not checked"),
        image_bytes,
        volume.path.display()
    );

    ctx.report(Stage::Grow, 0);
    let gpt = disk::grow_gpt(&mut volume).stage(Stage::Grow)?;
    let grow_fs = ctx.params.get("grow_fs").is_some_and(|v| v == "1");
    if let (true, Some(gpt)) = (grow_fs, &gpt) {
        grow_last_filesystem(gpt).stage(Stage::Grow)?;
    }
    volume.flush().stage(Stage::Finish)?;
    ctx.report(Stage::Finish, 100);
    let layout = match &gpt {
        Some(gpt) => gpt
            .partitions
            .iter()
            .map(|p| LayoutEntry {
                device: p.device.display().to_string(),
                role: if p.is_esp() { "esp" } else { "partition" }.into(),
                number: Some(p.number),
                partuuid: Some(p.partuuid.to_string()),
                start_bytes: p.start,
                size_bytes: p.size,
                fs: None,
                uuid: None,
            })
            .collect(),
        None => vec![LayoutEntry {
            device: volume.path.display().to_string(),
            role: "image".into(),
            number: None,
            partuuid: None,
            start_bytes: 0,
            size_bytes: image_bytes,
            fs: None,
            uuid: None,
        }],
    };
    Ok(MethodOutcome {
        bytes: fetched.bytes,
        layout,
    })
}

/// A raw image, plain or compressed, copied onto the volume from offset 0.
/// Returns the image's size.
fn write_raw(stream: impl Read, volume: &mut Volume) -> anyhow::Result<u64> {
    let (compression, mut reader) = fetch::decompress(stream).context("read the disk image")?;
    info!(
        "writing a raw image ({compression}) onto {}",
        volume.path.display()
    );
    let mut sink = VolumeSink::new(volume);
    // Whole 1 MiB pieces (decompressors return less per read): large,
    // block-aligned writes, and zero detection sees whole blocks.
    let mut buf = Vec::with_capacity(1 << 20);
    let mut offset = 0u64;
    loop {
        buf.clear();
        reader
            .by_ref()
            .take(1 << 20)
            .read_to_end(&mut buf)
            .context("read the disk image")?;
        if buf.is_empty() {
            return Ok(offset);
        }
        sink.write_at(offset, &buf)?;
        offset += buf.len() as u64;
    }
}

/// A qcow2 image: tables by `Range`, then data clusters from `stream`
/// (which is at offset 0 of the file). Returns the virtual size.
fn write_qcow2(
    ctx: &BuildContext,
    url: &str,
    stream: impl BufRead,
    volume: &mut Volume,
) -> anyhow::Result<u64> {
    let mut tables = RangeTables(
        fetch::RangeReader::open(ctx.runtime.clone(), url).context("read the qcow2 tables")?,
    );
    let file_len = tables.0.len();
    let layout = qcow2::Layout::read(&mut tables, file_len, volume.size)?;
    if layout.header().is_dirty() {
        warn!("the qcow2 image is marked dirty (its refcounts may be stale; they are not used)");
    }
    info!(
        "writing a qcow2 v{} image onto {}: virtual size {} MiB, {} KiB clusters, {} MiB of data, \
         {} MiB of zeros",
        layout.header().version,
        volume.path.display(),
        layout.virtual_size() >> 20,
        layout.cluster_size() >> 10,
        layout.data_bytes() >> 20,
        layout.zero_bytes() >> 20
    );
    let mut sink = VolumeSink::new(volume);
    let stats = qcow2::copy_data(&layout, stream, 0, &mut sink)?;
    info!(
        "qcow2: {} bytes read, {} written, {} zeroed",
        stats.bytes_read, stats.bytes_written, stats.bytes_zeroed
    );
    Ok(layout.virtual_size())
}

/// The qcow2 reader's random access, as HTTP `Range` requests.
struct RangeTables(fetch::RangeReader);

impl qcow2::ReadAt for RangeTables {
    fn read_exact_at(&mut self, offset: u64, buf: &mut [u8]) -> std::io::Result<()> {
        self.0
            .read_exact_at(offset, buf)
            .map_err(|e| std::io::Error::other(format!("{e:#}")))
    }
}

/// Writes at volume offsets, refusing anything beyond the volume's end.
struct VolumeSink<'a> {
    volume: &'a Volume,
}

impl<'a> VolumeSink<'a> {
    fn new(volume: &'a Volume) -> Self {
        VolumeSink { volume }
    }

    fn check_fits(&self, offset: u64, len: u64) -> anyhow::Result<()> {
        if offset
            .checked_add(len)
            .is_none_or(|end| end > self.volume.size)
        {
            bail!(
                "the disk image is larger than the volume {} ({} bytes): use a larger volume",
                self.volume.path.display(),
                self.volume.size
            );
        }
        Ok(())
    }

    /// Writes `data` at `offset`, except its all-zero 4 KiB blocks, which
    /// are zeroed instead (as `qemu-img convert` does): a thin-provisioned
    /// volume, a sparse file and the snapshot made from them then do not
    /// store them, and fewer bytes go to the disk.
    fn write_at(&mut self, offset: u64, data: &[u8]) -> anyhow::Result<()> {
        self.check_fits(offset, data.len() as u64)?;
        for run in zero_block_runs(offset, data) {
            let at = offset + run.range.start as u64;
            let piece = &data[run.range];
            if run.zero {
                self.zero(at, piece.len() as u64)?;
            } else {
                self.volume.file.write_all_at(piece, at).with_context(|| {
                    format!("write {} at offset {at}", self.volume.path.display())
                })?;
            }
        }
        Ok(())
    }

    /// Zeroes a range: BLKZEROOUT on a block device (the device may do it
    /// without moving the bytes), a punched hole in a file (no data written
    /// or allocated), plain zero writes where neither works.
    fn zero(&mut self, offset: u64, len: u64) -> anyhow::Result<()> {
        self.check_fits(offset, len)?;
        if self.volume.is_block_device && offset.is_multiple_of(512) && len.is_multiple_of(512) {
            let range = [offset, len];
            // SAFETY: BLKZEROOUT reads two u64 (start, length) from the pointer.
            unsafe { blk_zeroout(self.volume.file.as_raw_fd(), &range) }
                .with_context(|| format!("zero {len} bytes at {offset}"))?;
            return Ok(());
        }
        if !self.volume.is_block_device {
            let punched = nix::fcntl::fallocate(
                self.volume.file.as_raw_fd(),
                nix::fcntl::FallocateFlags::FALLOC_FL_PUNCH_HOLE
                    | nix::fcntl::FallocateFlags::FALLOC_FL_KEEP_SIZE,
                offset as i64,
                len as i64,
            );
            if punched.is_ok() {
                return Ok(());
            }
        }
        let zeros = vec![0u8; (len.min(1 << 20)) as usize];
        let mut done = 0u64;
        while done < len {
            let n = (len - done).min(zeros.len() as u64) as usize;
            self.volume
                .file
                .write_all_at(&zeros[..n], offset + done)
                .with_context(|| format!("zero {len} bytes at {offset}"))?;
            done += n as u64;
        }
        Ok(())
    }
}

/// Zero detection works on blocks of this size, aligned on the volume: the
/// default of `qemu-img convert -S`, and the page and filesystem block size.
const ZERO_BLOCK: usize = 4096;

/// A stretch of a write: all-zero whole blocks, or anything else.
#[derive(Debug, PartialEq, Eq)]
struct Run {
    range: std::ops::Range<usize>,
    zero: bool,
}

/// Splits `data`, bound for volume offset `offset`, into alternating runs of
/// data and of whole aligned [`ZERO_BLOCK`]s that hold only zeros. A partial
/// block at either end counts as data.
fn zero_block_runs(offset: u64, data: &[u8]) -> Vec<Run> {
    let mut runs: Vec<Run> = Vec::new();
    let mut start = 0;
    while start < data.len() {
        let block_end = (offset + start as u64).next_multiple_of(ZERO_BLOCK as u64) - offset;
        let mut end = (block_end as usize).min(data.len());
        if end == start {
            end = (start + ZERO_BLOCK).min(data.len());
        }
        let block = &data[start..end];
        let zero = block.len() == ZERO_BLOCK && is_all_zero(block);
        match runs.last_mut() {
            Some(last) if last.zero == zero => last.range.end = end,
            _ => runs.push(Run {
                range: start..end,
                zero,
            }),
        }
        start = end;
    }
    runs
}

fn is_all_zero(block: &[u8]) -> bool {
    // Data blocks almost always differ from zero in their first bytes; the
    // fold over the rest has no early exit, so it compiles to wide ORs.
    let (head, rest) = block.split_at(block.len().min(16));
    head.iter().all(|&b| b == 0) && rest.iter().fold(0u8, |acc, &b| acc | b) == 0
}

impl qcow2::Sink for VolumeSink<'_> {
    fn write_at(&mut self, guest_offset: u64, data: &[u8]) -> std::io::Result<()> {
        VolumeSink::write_at(self, guest_offset, data)
            .map_err(|e| std::io::Error::other(format!("{e:#}")))
    }

    fn zero(&mut self, guest_offset: u64, len: u64) -> std::io::Result<()> {
        VolumeSink::zero(self, guest_offset, len)
            .map_err(|e| std::io::Error::other(format!("{e:#}")))
    }
}

/// `grow_fs=1`: e2fsck then resize2fs on the partition that was grown, when
/// it holds ext2/3/4.
fn grow_last_filesystem(gpt: &GrownGpt) -> anyhow::Result<()> {
    let Some((number, _)) = gpt.grown else {
        info!("grow_fs=1: no partition was grown");
        return Ok(());
    };
    let part = gpt
        .partitions
        .iter()
        .find(|p| p.number == number)
        .context("the grown partition vanished")?;
    let device = part.device.display().to_string();
    // e2fsck exits 1 when it fixed something, which is fine before a resize.
    let check = std::process::Command::new(crate::fs::find_tool("e2fsck")?)
        .args(["-fy", &device])
        .output()
        .context("run e2fsck")?;
    match check.status.code() {
        Some(0 | 1) => {}
        Some(8) if String::from_utf8_lossy(&check.stderr).contains("Bad magic number") => {
            bail!("grow_fs=1: partition {number} ({device}) does not hold an ext2/3/4 filesystem")
        }
        _ => bail!(
            "e2fsck {device} failed ({}): {}",
            check.status,
            String::from_utf8_lossy(&check.stderr).trim()
        ),
    }
    let resize = std::process::Command::new(crate::fs::find_tool("resize2fs")?)
        .arg(&device)
        .output()
        .context("run resize2fs")?;
    if !resize.status.success() {
        bail!(
            "resize2fs {device} failed ({}): {}",
            resize.status,
            String::from_utf8_lossy(&resize.stderr).trim()
        );
    }
    info!("grew the filesystem on {device} to {} MiB", part.size >> 20);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn runs(offset: u64, data: &[u8]) -> Vec<(usize, usize, bool)> {
        zero_block_runs(offset, data)
            .into_iter()
            .map(|r| (r.range.start, r.range.end, r.zero))
            .collect()
    }

    #[test]
    fn zero_blocks_are_found_on_aligned_whole_blocks_only() {
        let b = ZERO_BLOCK;
        // data, zero, zero, data (one non-zero byte at the block's end), zero
        let mut data = vec![0u8; 5 * b];
        data[10] = 1;
        data[4 * b - 1] = 7;
        assert_eq!(
            runs(0, &data),
            vec![
                (0, b, false),
                (b, 3 * b, true),
                (3 * b, 4 * b, false),
                (4 * b, 5 * b, true)
            ]
        );
        // Not aligned on the volume: partial blocks at both ends are data,
        // whole aligned blocks between them still count.
        let zeros = vec![0u8; 3 * b];
        assert_eq!(
            runs(100, &zeros),
            vec![
                (0, b - 100, false),
                (b - 100, 3 * b - 100, true),
                (3 * b - 100, 3 * b, false)
            ]
        );
        // Shorter than a block: data, even if zero.
        assert_eq!(runs(0, &[0u8; 512]), vec![(0, 512, false)]);
        assert_eq!(runs(0, &[]), vec![]);
        // Every byte position of a block is looked at.
        for at in [0, 15, 16, 17, b / 2, b - 1] {
            let mut block = vec![0u8; b];
            block[at] = 0x80;
            assert_eq!(
                runs(0, &block),
                vec![(0, b, false)],
                "non-zero byte at {at}"
            );
        }
    }
}
