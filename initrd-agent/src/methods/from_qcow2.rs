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

use std::io::{BufRead, BufReader, Read};
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use anyhow::{bail, Context};
use tracing::{info, warn};

use super::rootfs_stream::{download_failed, spawn_progress_reporter};
use super::{BuildContext, BuildMethod, MethodOutcome};
use crate::agent::{StageContext, StageError};
use crate::disk::{self, GrownGpt, Volume};
use crate::fetch::{self, FetchOptions};
use crate::signal::LayoutEntry;

nix::ioctl_write_ptr_bad!(blk_zeroout, 0x127f, [u64; 2]);

/// The qcow2 magic, `QFI\xfb`.
const QCOW2_MAGIC: [u8; 4] = *b"QFI\xfb";

#[derive(Default)]
pub struct FromQcow2 {
    volume: Option<Volume>,
    fetched_bytes: u64,
    /// Bytes of the image (its virtual size for qcow2).
    image_bytes: u64,
}

impl BuildMethod for FromQcow2 {
    fn pre_build(&mut self, ctx: &BuildContext) -> Result<(), StageError> {
        ctx.params
            .required("disk_img_url", "from-qcow2")
            .stage("params")?;
        self.volume = Some(Volume::open(&ctx.common.volume).stage("disk")?);
        Ok(())
    }

    fn build(&mut self, ctx: &BuildContext) -> Result<(), StageError> {
        let volume = self.volume.as_mut().expect("pre_build opened the volume");
        let url = ctx
            .params
            .required("disk_img_url", "from-qcow2")
            .stage("params")?
            .to_string();
        let options = FetchOptions {
            expected_sha256: ctx
                .params
                .get("disk_img_sha256")
                .filter(|s| !s.is_empty())
                .map(str::to_string),
            ..FetchOptions::default()
        };
        ctx.report("fetch", 0);
        let mut download = fetch::open(ctx.runtime.clone(), &url, options)
            .with_context(|| format!("fetch disk_img_url {url}"))
            .stage("fetch")?;
        let progress = download.progress();
        let done = Arc::new(AtomicBool::new(false));
        let reporter = spawn_progress_reporter(ctx, progress, done.clone());
        let written = (|| {
            let mut stream = BufReader::with_capacity(1 << 20, &mut download);
            let head = stream.fill_buf().context("read the image's first bytes")?;
            if head.starts_with(&QCOW2_MAGIC) {
                write_qcow2(ctx, &url, stream, volume)
            } else {
                write_raw(stream, volume)
            }
        })();
        done.store(true, Ordering::Relaxed);
        reporter.abort();
        self.image_bytes = match written {
            Ok(n) => n,
            Err(e) => {
                let stage = if download_failed(&e) {
                    "fetch"
                } else {
                    "write"
                };
                return Err(e)
                    .with_context(|| format!("disk_img_url {url}"))
                    .stage(stage);
            }
        };
        // The digest covers every byte of the file: checked before the
        // volume is declared good.
        let fetched = download
            .finish()
            .with_context(|| format!("disk_img_url {url}"))
            .stage("fetch")?;
        self.fetched_bytes = fetched.bytes;
        volume
            .file
            .sync_all()
            .context("flush the volume")
            .stage("write")?;
        info!(
            "disk image: {} bytes fetched (sha256 {}), {} bytes written to {}",
            fetched.bytes,
            fetched.sha256.as_deref().unwrap_or("not checked"),
            self.image_bytes,
            volume.path.display()
        );
        Ok(())
    }

    fn post_build(&mut self, ctx: &BuildContext) -> Result<MethodOutcome, StageError> {
        let volume = self.volume.as_mut().expect("pre_build opened the volume");
        ctx.report("grow", 0);
        let gpt = disk::grow_gpt(volume).stage("grow")?;
        let grow_fs = ctx.params.get("grow_fs").is_some_and(|v| v == "1");
        if let (true, Some(gpt)) = (grow_fs, &gpt) {
            grow_last_filesystem(gpt).stage("grow")?;
        }
        volume
            .file
            .sync_all()
            .context("flush the volume")
            .stage("finish")?;
        ctx.report("finish", 100);
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
                size_bytes: self.image_bytes,
                fs: None,
                uuid: None,
            }],
        };
        Ok(MethodOutcome {
            bytes: self.fetched_bytes,
            layout,
        })
    }
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
    let mut buf = vec![0u8; 1 << 20];
    let mut offset = 0u64;
    loop {
        let n = match reader.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e).context("read the disk image"),
        };
        sink.write_at(offset, &buf[..n])?;
        offset += n as u64;
    }
    Ok(offset)
}

/// A qcow2 image: tables by `Range`, then data clusters from `stream`
/// (which is at offset 0 of the file). Returns the virtual size.
fn write_qcow2(
    ctx: &BuildContext,
    url: &str,
    stream: impl Read,
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

    fn write_at(&mut self, offset: u64, data: &[u8]) -> anyhow::Result<()> {
        self.check_fits(offset, data.len() as u64)?;
        self.volume
            .file
            .write_all_at(data, offset)
            .with_context(|| format!("write {} at offset {offset}", self.volume.path.display()))
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
