//! `imgforge inspect DISK`: what is inside a raw disk image — its partition
//! table, the files on its EFI System Partition and the facts of its root
//! filesystem (os-release, hostname, kernels, fstab).
//!
//! Everything is read straight from the image file, in user space: no loop
//! device, no mount, no root privileges, and the image is opened read-only.
//! The GPT comes from the `gpt` crate, FAT from `fatfs` and ext2/3/4 from
//! `ext4-view`; each filesystem sees the image through a [`ByteRange`]
//! limited to its partition, so a damaged filesystem cannot make the
//! inspection read outside it. An unpartitioned disk (a filesystem on the
//! whole disk, as `unpartitioned-from-rootfs` makes) is reported as one
//! whole-disk filesystem. A qcow2 image is read through the `qcow2` crate
//! (the agent's reader): its guest disk is laid out in a sparse temporary
//! file first, which costs its data bytes on disk. Other container formats
//! (VMDK, VHD(X), VDI) and compressed images are recognised by their magic
//! bytes and refused with the command that turns them into raw images.

use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde::Serialize;
use tracing::debug;

#[derive(clap::Args, Debug, Clone)]
pub struct InspectArgs {
    /// A raw or qcow2 disk image file (convert other formats with
    /// `qemu-img convert -O raw` first), or a rootfs tarball (FILE.tar[.gz|.zst|.xz]:
    /// only what a server from it would have and lack).
    pub disk: PathBuf,
    /// List at most this many files of each FAT filesystem (the ESP).
    #[arg(long, default_value_t = 1000)]
    pub max_files: usize,
}

/// What `imgforge inspect` found in a disk image.
#[derive(Serialize, Debug, Clone)]
pub struct Report {
    /// The image file as given on the command line.
    pub path: String,
    /// `raw`, or `qcow2` (read through the qcow2 reader).
    pub format: &'static str,
    /// The disk's size (for qcow2, its virtual size).
    pub disk_size_bytes: u64,
    pub partition_table: PartitionTableKind,
    /// Logical sector size the partition table was read with (512 or 4096);
    /// 512 for an unpartitioned disk.
    pub sector_size: u64,
    /// The GPT disk GUID (lowercase, as `blkid` prints it).
    pub disk_guid: Option<String>,
    /// Used partition entries, by partition number.
    pub partitions: Vec<PartitionReport>,
    /// The filesystem on the whole disk, when there is no partition table.
    pub whole_disk: Option<FilesystemReport>,
    /// Things that did not stop the inspection but deserve a look (an
    /// invalid backup GPT header, a partition beyond the end of the image,
    /// an unreadable file).
    pub warnings: Vec<String>,
}

#[derive(Serialize, Debug, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum PartitionTableKind {
    Gpt,
    None,
}

#[derive(Serialize, Debug, Clone)]
pub struct PartitionReport {
    /// The partition number (`/dev/vda15` is number 15).
    pub number: u32,
    /// The GPT partition name (may be empty).
    pub name: String,
    /// A readable name of the type GUID ("EFI System", "Linux filesystem"),
    /// when it is a well-known one.
    pub type_name: Option<String>,
    pub type_guid: String,
    /// The unique partition GUID (`PARTUUID=` in fstab and on the kernel
    /// command line).
    pub partuuid: String,
    pub first_lba: u64,
    pub last_lba: u64,
    pub start_bytes: u64,
    pub size_bytes: u64,
    pub filesystem: FilesystemReport,
}

/// A filesystem found by its superblock magic, and what could be read of it.
#[derive(Serialize, Debug, Clone)]
pub struct FilesystemReport {
    pub kind: FilesystemKind,
    /// Contents of a FAT filesystem.
    pub fat: Option<FatReport>,
    /// Contents of an ext2/3/4 filesystem.
    pub ext4: Option<Ext4Report>,
    /// Why the contents could not be read, when the magic matched but the
    /// filesystem did not open.
    pub error: Option<String>,
}

#[derive(Serialize, Debug, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum FilesystemKind {
    Vfat,
    Ext4,
    Ext3,
    Ext2,
    Swap,
    Unknown,
}

impl FilesystemKind {
    /// The name `blkid` gives the filesystem type (as in the JSON report).
    pub fn as_str(self) -> &'static str {
        match self {
            FilesystemKind::Vfat => "vfat",
            FilesystemKind::Ext4 => "ext4",
            FilesystemKind::Ext3 => "ext3",
            FilesystemKind::Ext2 => "ext2",
            FilesystemKind::Swap => "swap",
            FilesystemKind::Unknown => "unknown",
        }
    }
}

#[derive(Serialize, Debug, Clone)]
pub struct FatReport {
    /// "FAT12", "FAT16" or "FAT32".
    pub fat_type: String,
    pub label: Option<String>,
    /// The volume serial number as `blkid` prints it (`UUID=XXXX-XXXX` in
    /// fstab).
    pub volume_id: String,
    /// Regular files, depth first, with `/`-separated paths relative to
    /// the filesystem root.
    pub files: Vec<FileEntry>,
    /// True when the listing stopped at `--max-files`.
    pub files_truncated: bool,
}

#[derive(Serialize, Debug, Clone, PartialEq, Eq)]
pub struct FileEntry {
    pub path: String,
    pub size_bytes: u64,
}

#[derive(Serialize, Debug, Clone)]
pub struct Ext4Report {
    pub label: Option<String>,
    pub uuid: String,
    pub block_size: u64,
    pub block_count: u64,
    /// /etc/os-release, or /usr/lib/os-release when /etc has none.
    pub os_release: Option<OsRelease>,
    /// First line of /etc/hostname.
    pub hostname: Option<String>,
    /// `vmlinuz-*` names in /boot, sorted.
    pub kernels: Vec<String>,
    /// `initrd.img-*` names in /boot, sorted.
    pub initrds: Vec<String>,
    /// The entries of /etc/fstab (comments and blank lines left out).
    pub fstab: Option<Vec<String>>,
    /// What a server from this root filesystem would have and lack (a
    /// filesystem with /etc only).
    pub server: Option<crate::readiness::Readiness>,
}

#[derive(Serialize, Debug, Clone, Default, PartialEq, Eq)]
pub struct OsRelease {
    pub pretty_name: Option<String>,
    pub id: Option<String>,
    pub version_id: Option<String>,
}

pub fn run_inspect(args: InspectArgs, json: bool) -> Result<()> {
    let text = if is_tarball(&args.disk) {
        let view = crate::readiness::TarView::read(&args.disk)?;
        let server = crate::readiness::assess(&view);
        if json {
            serde_json::to_string_pretty(&serde_json::json!({
                "path": args.disk.display().to_string(),
                "format": "tar",
                "server": server,
            }))? + "\n"
        } else {
            let mut out = format!("{}: a root filesystem tarball\n", args.disk.display());
            render_readiness(&mut out, &server);
            out
        }
    } else {
        let report = inspect_disk(&args.disk, args.max_files)?;
        if json {
            serde_json::to_string_pretty(&report)? + "\n"
        } else {
            render_text(&report)
        }
    };
    // `imgforge inspect DISK | head` is fine: a closed pipe is not an error.
    match io::stdout().lock().write_all(text.as_bytes()) {
        Err(e) if e.kind() == io::ErrorKind::BrokenPipe => Ok(()),
        result => result.context("write the report to stdout"),
    }
}

/// A root filesystem tarball, by its name (`imgforge rootfs` writes these).
fn is_tarball(path: &Path) -> bool {
    let name = path.file_name().unwrap_or_default().to_string_lossy();
    [".tar", ".tar.gz", ".tgz", ".tar.zst", ".tar.xz"]
        .iter()
        .any(|suffix| name.ends_with(suffix))
}

/// Reads the partition table and filesystems of the raw disk image at
/// `path`, listing at most `max_files` files per FAT filesystem.
pub fn inspect_disk(path: &Path, max_files: usize) -> Result<Report> {
    let shown = path.display();
    let metadata =
        std::fs::metadata(path).with_context(|| format!("{shown}: cannot read the disk image"))?;
    if metadata.is_dir() {
        bail!("{shown} is a directory, not a disk image file");
    }
    let image = File::open(path).with_context(|| format!("open {shown}"))?;
    // Block devices report a zero length in their metadata; seek instead.
    let disk_size = (&image)
        .seek(SeekFrom::End(0))
        .with_context(|| format!("{shown}: find the size"))?;
    if disk_size == 0 {
        bail!("{shown} is empty: there is no disk image to inspect");
    }
    let mut head = vec![0u8; disk_size.min(8192) as usize];
    image
        .read_exact_at(&mut head, 0)
        .with_context(|| format!("{shown}: read the first sectors"))?;
    if head.starts_with(&qcow2::MAGIC) {
        // Read through the same qcow2 reader as the agent: the guest disk is
        // laid out in a sparse temporary file (its data bytes, no more).
        let flat = flatten_qcow2(path).with_context(|| format!("{shown}: read the qcow2 image"))?;
        let mut report = inspect_disk(flat.path(), max_files)?;
        report.path = shown.to_string();
        report.format = "qcow2";
        return Ok(report);
    }
    if let Some(format) = container_format(&head) {
        bail!(
            "{shown} is a {format} image, not a raw disk image; convert it first: \
             qemu-img convert -O raw {shown} {}",
            raw_name_for(path).display()
        );
    }

    let mut report = Report {
        path: shown.to_string(),
        format: "raw",
        disk_size_bytes: disk_size,
        partition_table: PartitionTableKind::None,
        sector_size: 512,
        disk_guid: None,
        partitions: Vec::new(),
        whole_disk: None,
        warnings: Vec::new(),
    };

    if let Some(sector_size) = gpt_sector_size(&head) {
        debug!(sector_size, "{shown}: GPT found");
        read_gpt(&image, sector_size, max_files, &mut report)
            .with_context(|| format!("{shown}: read the GPT partition table"))?;
    } else {
        let whole_disk = ByteRange::new(&image, 0, disk_size);
        let kind = detect_filesystem(&whole_disk);
        if kind != FilesystemKind::Unknown {
            debug!(?kind, "{shown}: filesystem on the whole disk");
            report.whole_disk = Some(read_filesystem(whole_disk, kind, max_files, &mut |w| {
                report.warnings.push(format!("whole disk: {w}"));
            }));
        } else if let Some(table) = mbr_partition_table(&head) {
            bail!(
                "{shown} has {table}; imgforge inspect reads GPT disks and unpartitioned \
                 filesystems only (imgforge builds GPT disks; `sgdisk -g` converts MBR to GPT)"
            );
        } else if head.iter().all(|&b| b == 0) {
            bail!(
                "{shown} holds only zeros in its first {} bytes: a blank disk, with no partition \
                 table and no filesystem to inspect",
                head.len()
            );
        } else {
            bail!(
                "{shown} is not a disk image that imgforge can read: it has no GPT partition \
                 table and no known filesystem (vfat, ext2/3/4, swap) at its start. If it is \
                 compressed or in another format, make a raw image first \
                 (e.g. qemu-img convert -O raw {shown} {})",
                raw_name_for(path).display()
            );
        }
    }
    for w in &report.warnings {
        debug!("warning: {w}");
    }
    Ok(report)
}

/// The guest disk of the qcow2 image at `path`, in a sparse temporary file
/// (zero ranges are holes of the fresh file).
fn flatten_qcow2(path: &Path) -> Result<tempfile::NamedTempFile> {
    struct SparseFile<'a>(&'a File);
    impl qcow2::Sink for SparseFile<'_> {
        fn write_at(&mut self, guest_offset: u64, data: &[u8]) -> std::io::Result<()> {
            self.0.write_all_at(data, guest_offset)
        }
        fn zero(&mut self, _guest_offset: u64, _len: u64) -> std::io::Result<()> {
            Ok(())
        }
    }
    let mut file = File::open(path)?;
    let file_len = file.metadata()?.len();
    let layout = qcow2::Layout::read(&mut file, file_len, u64::MAX)?;
    let flat = tempfile::NamedTempFile::new().context("create a temporary file")?;
    flat.as_file().set_len(layout.virtual_size())?;
    let start = layout.first_data_offset().unwrap_or(0);
    let mut stream = std::io::BufReader::with_capacity(1 << 20, File::open(path)?);
    stream.seek(SeekFrom::Start(start))?;
    qcow2::copy_data(&layout, stream, start, &mut SparseFile(flat.as_file()))?;
    Ok(flat)
}

/// `disk.qcow2` -> `disk.raw` (`disk.raw` -> `disk.raw.raw`), for the
/// conversion hint in errors.
fn raw_name_for(path: &Path) -> PathBuf {
    let renamed = path.with_extension("raw");
    if renamed == path {
        PathBuf::from(format!("{}.raw", path.display()))
    } else {
        renamed
    }
}

/// Names the container or compression format whose magic bytes start
/// `head`, if any.
fn container_format(head: &[u8]) -> Option<&'static str> {
    const MAGICS: &[(usize, &[u8], &str)] = &[
        (0, &qcow2::MAGIC, "qcow2"),
        (0, b"KDMV", "VMDK"),
        (0, b"# Disk DescriptorFile", "VMDK (descriptor)"),
        (0, b"vhdxfile", "VHDX"),
        (0, b"conectix", "VHD"),
        (0x40, b"\x7f\x10\xda\xbe", "VirtualBox VDI"),
    ];
    let image = MAGICS
        .iter()
        .find(|(offset, magic, _)| head.get(*offset..offset + magic.len()) == Some(*magic))
        .map(|(_, _, name)| *name);
    image.or(match formats::Compression::sniff(head) {
        formats::Compression::Gzip => Some("gzip-compressed"),
        formats::Compression::Zstd => Some("zstd-compressed"),
        formats::Compression::Xz => Some("xz-compressed"),
        formats::Compression::Bzip2 => Some("bzip2-compressed"),
        formats::Compression::None => None,
    })
}

/// The logical sector size whose LBA 1 holds a GPT header signature.
fn gpt_sector_size(head: &[u8]) -> Option<u64> {
    [512u64, 4096]
        .into_iter()
        .find(|&size| head.get(size as usize..size as usize + 8) == Some(b"EFI PART".as_slice()))
}

/// Describes a DOS (MBR) partition table in `head`, if it has one with at
/// least one partition.
fn mbr_partition_table(head: &[u8]) -> Option<&'static str> {
    if head.get(510..512) != Some(&[0x55, 0xaa]) {
        return None;
    }
    let types: Vec<u8> = (0..4).map(|i| head[446 + 16 * i + 4]).collect();
    if types.contains(&0xee) {
        Some("a protective MBR but no GPT header at LBA 1 (a damaged GPT? `sgdisk -v` tells)")
    } else if types.iter().any(|&t| t != 0) {
        Some("an MBR (DOS) partition table")
    } else {
        None
    }
}

fn read_gpt(image: &File, sector_size: u64, max_files: usize, report: &mut Report) -> Result<()> {
    // The gpt crate asserts (panics) on entry sizes other than 128.
    let entry_size = read_u32_at(image, sector_size + 84)?;
    if entry_size != 128 {
        bail!(
            "the GPT header gives partition entries of {entry_size} bytes; only 128 is supported"
        );
    }
    let block_size = if sector_size == 4096 {
        gpt::disk::LogicalBlockSize::Lb4096
    } else {
        gpt::disk::LogicalBlockSize::Lb512
    };
    let device = image
        .try_clone()
        .context("duplicate the image file handle")?;
    let disk = gpt::GptConfig::new()
        .writable(false)
        .logical_block_size(block_size)
        .open_from_device(device)?;
    report.partition_table = PartitionTableKind::Gpt;
    report.sector_size = sector_size;
    report.disk_guid = Some(disk.guid().to_string());
    if let Err(e) = disk.primary_header() {
        report.warnings.push(format!(
            "the primary GPT header is invalid ({e}); the backup was used"
        ));
    }
    if let Err(e) = disk.backup_header() {
        // The gpt crate looks for the backup header on the image's last LBA.
        let last_lba = report.disk_size_bytes / sector_size - 1;
        let expected_lba = disk.primary_header().ok().map(|h| h.backup_lba);
        report.warnings.push(match expected_lba {
            Some(lba) if lba < last_lba => format!(
                "the backup GPT header is at LBA {lba}, not at the image's last LBA {last_lba}: \
                 the image was grown after partitioning (`sgdisk -e` moves the header to the end)"
            ),
            Some(lba) if lba > last_lba => format!(
                "the GPT puts its backup header at LBA {lba}, beyond the image's last LBA \
                 {last_lba}: the image is truncated"
            ),
            _ => format!("the backup GPT header is invalid ({e})"),
        });
    }
    for (&number, partition) in disk.partitions() {
        if !partition.is_used() {
            continue;
        }
        let start_bytes = partition.bytes_start(block_size)?;
        let size_bytes = partition.bytes_len(block_size)?;
        let type_guid = partition.part_type_guid.guid;
        debug!(number, start_bytes, size_bytes, %type_guid, "partition");
        let end = start_bytes.saturating_add(size_bytes);
        if end > report.disk_size_bytes {
            report.warnings.push(format!(
                "partition {number} ends at byte {end}, beyond the end of the image \
                 ({} bytes): the image is truncated",
                report.disk_size_bytes
            ));
        }
        let readable_end = end.min(report.disk_size_bytes);
        let range = ByteRange::new(
            image,
            start_bytes.min(readable_end),
            readable_end.saturating_sub(start_bytes),
        );
        let kind = detect_filesystem(&range);
        let warnings = &mut report.warnings;
        let filesystem = read_filesystem(range, kind, max_files, &mut |w| {
            warnings.push(format!("partition {number}: {w}"));
        });
        report.partitions.push(PartitionReport {
            number,
            name: partition.name.clone(),
            type_name: partition_type_name(&type_guid.to_string()).map(str::to_string),
            type_guid: type_guid.to_string(),
            partuuid: partition.part_guid.to_string(),
            first_lba: partition.first_lba,
            last_lba: partition.last_lba,
            start_bytes,
            size_bytes,
            filesystem,
        });
    }
    Ok(())
}

fn read_u32_at(image: &File, offset: u64) -> Result<u32> {
    let mut bytes = [0u8; 4];
    image
        .read_exact_at(&mut bytes, offset)
        .with_context(|| format!("read 4 bytes at {offset}"))?;
    Ok(u32::from_le_bytes(bytes))
}

/// Names of the partition types imgforge and common distributions use, as
/// `sgdisk -L` spells them.
fn partition_type_name(type_guid: &str) -> Option<&'static str> {
    const NAMES: &[(&str, &str)] = &[
        ("c12a7328-f81f-11d2-ba4b-00a0c93ec93b", "EFI System"),
        (
            "21686148-6449-6e6f-744e-656564454649",
            "BIOS boot partition",
        ),
        ("0fc63daf-8483-4772-8e79-3d69d8477de4", "Linux filesystem"),
        (
            "4f68bce3-e8cd-4db1-96e7-fbcaf984b709",
            "Linux x86-64 root (/)",
        ),
        (
            "b921b045-1df0-41c3-af44-4c6f280d3fae",
            "Linux ARM64 root (/)",
        ),
        ("44479540-f297-41b2-9af7-d131d5f0458a", "Linux x86 root (/)"),
        (
            "bc13c2ff-59e6-4262-a352-b275fd6f7172",
            "Linux extended boot",
        ),
        ("0657fd6d-a4ab-43c4-84e5-0933c84b4f4f", "Linux swap"),
        ("e6d6d379-f507-44c2-a23c-238f2a3df928", "Linux LVM"),
        ("a19d880f-05fc-4d3b-a006-743f0f84911e", "Linux RAID"),
        ("933ac7e1-2eb4-4f13-b844-0e14e2aef915", "Linux /home"),
        (
            "ebd0a0a2-b9e5-4433-87c0-68b6b72699c7",
            "Microsoft basic data",
        ),
    ];
    NAMES
        .iter()
        .find(|(guid, _)| *guid == type_guid)
        .map(|(_, name)| *name)
}

/// Recognises a filesystem by its superblock magic.
fn detect_filesystem(range: &ByteRange<'_>) -> FilesystemKind {
    let mut ext_superblock = [0u8; 0x68];
    if range.read_exact_at(&mut ext_superblock, 1024).is_ok()
        && ext_superblock[0x38..0x3a] == [0x53, 0xef]
    {
        let compat = u32_le(&ext_superblock, 0x5c);
        let incompat = u32_le(&ext_superblock, 0x60);
        const INCOMPAT_EXTENTS: u32 = 0x40;
        const INCOMPAT_64BIT: u32 = 0x80;
        const INCOMPAT_FLEX_BG: u32 = 0x200;
        const COMPAT_HAS_JOURNAL: u32 = 0x4;
        return if incompat & (INCOMPAT_EXTENTS | INCOMPAT_64BIT | INCOMPAT_FLEX_BG) != 0 {
            FilesystemKind::Ext4
        } else if compat & COMPAT_HAS_JOURNAL != 0 {
            FilesystemKind::Ext3
        } else {
            FilesystemKind::Ext2
        };
    }
    let mut boot_sector = [0u8; 512];
    if range.read_exact_at(&mut boot_sector, 0).is_ok()
        && boot_sector[510..512] == [0x55, 0xaa]
        && (boot_sector[0x36..0x39] == *b"FAT" || boot_sector[0x52..0x57] == *b"FAT32")
    {
        return FilesystemKind::Vfat;
    }
    let mut swap_magic = [0u8; 10];
    if range.read_exact_at(&mut swap_magic, 4096 - 10).is_ok()
        && (swap_magic == *b"SWAPSPACE2" || swap_magic == *b"SWAP-SPACE")
    {
        return FilesystemKind::Swap;
    }
    FilesystemKind::Unknown
}

fn u32_le(bytes: &[u8], offset: usize) -> u32 {
    u32::from_le_bytes(bytes[offset..offset + 4].try_into().expect("4 bytes"))
}

/// Reads the contents of a filesystem of `kind` in `range`; a filesystem
/// that does not open is reported with its error, not failed.
fn read_filesystem(
    range: ByteRange<'_>,
    kind: FilesystemKind,
    max_files: usize,
    warn: &mut dyn FnMut(String),
) -> FilesystemReport {
    let mut report = FilesystemReport {
        kind,
        fat: None,
        ext4: None,
        error: None,
    };
    let result = match kind {
        FilesystemKind::Vfat => read_fat(range, max_files).map(|fat| report.fat = Some(fat)),
        FilesystemKind::Ext4 | FilesystemKind::Ext3 | FilesystemKind::Ext2 => {
            read_ext4(range, warn).map(|ext4| report.ext4 = Some(ext4))
        }
        FilesystemKind::Swap | FilesystemKind::Unknown => Ok(()),
    };
    if let Err(e) = result {
        warn(format!(
            "cannot read the {} filesystem: {e:#}",
            kind.as_str()
        ));
        report.error = Some(format!("{e:#}"));
    }
    report
}

fn read_fat(range: ByteRange<'_>, max_files: usize) -> Result<FatReport> {
    let fs = fatfs::FileSystem::new(range, fatfs::FsOptions::new())
        .context("open the FAT filesystem")?;
    let fat_type = match fs.fat_type() {
        fatfs::FatType::Fat12 => "FAT12",
        fatfs::FatType::Fat16 => "FAT16",
        fatfs::FatType::Fat32 => "FAT32",
    };
    // mkfs.fat writes the label both in the boot sector and as a root
    // directory entry; the entry is what tools that relabel update.
    let label = fs
        .read_volume_label_from_root_dir()
        .context("read the volume label")?
        .or_else(|| Some(fs.volume_label()))
        .filter(|l| !l.is_empty() && l != "NO NAME");
    let volume_id = fs.volume_id();
    let mut files = Vec::new();
    let mut truncated = false;
    list_fat_dir(&fs.root_dir(), "", 0, max_files, &mut files, &mut truncated)?;
    Ok(FatReport {
        fat_type: fat_type.to_string(),
        label,
        volume_id: format!("{:04X}-{:04X}", volume_id >> 16, volume_id & 0xffff),
        files,
        files_truncated: truncated,
    })
}

/// Deeper than this, a FAT directory tree is taken to be looping.
const MAX_FAT_DEPTH: usize = 32;

fn list_fat_dir<T: fatfs::ReadWriteSeek>(
    dir: &fatfs::Dir<'_, T>,
    prefix: &str,
    depth: usize,
    max_files: usize,
    files: &mut Vec<FileEntry>,
    truncated: &mut bool,
) -> Result<()> {
    if depth > MAX_FAT_DEPTH {
        bail!("directories nested deeper than {MAX_FAT_DEPTH} at {prefix}: a loop?");
    }
    for entry in dir.iter() {
        let entry = entry.with_context(|| format!("read the directory /{prefix}"))?;
        let name = entry.file_name();
        if name == "." || name == ".." {
            continue;
        }
        let path = format!("{prefix}{name}");
        if entry.is_dir() {
            list_fat_dir(
                &entry.to_dir(),
                &format!("{path}/"),
                depth + 1,
                max_files,
                files,
                truncated,
            )?;
        } else if files.len() >= max_files {
            *truncated = true;
        } else {
            files.push(FileEntry {
                path,
                size_bytes: entry.len(),
            });
        }
        if *truncated {
            break;
        }
    }
    Ok(())
}

fn read_ext4(range: ByteRange<'_>, warn: &mut dyn FnMut(String)) -> Result<Ext4Report> {
    let mut superblock = [0u8; 0x160];
    range
        .read_exact_at(&mut superblock, 1024)
        .context("read the superblock")?;
    let log_block_size = u32_le(&superblock, 0x18);
    let block_size = 1024u64.checked_shl(log_block_size).unwrap_or(0);
    let incompat = u32_le(&superblock, 0x60);
    let blocks_high = if incompat & 0x80 != 0 {
        u64::from(u32_le(&superblock, 0x150))
    } else {
        0
    };
    let block_count = blocks_high << 32 | u64::from(u32_le(&superblock, 0x4));

    let fs =
        ext4_view::Ext4::load(Box::new(range.into_owned()?)).context("open the ext4 filesystem")?;
    let label = fs.label().display().to_string();
    let mut read_text = |path: &str| -> Option<String> {
        match fs.read(path) {
            Ok(bytes) => Some(String::from_utf8_lossy(&bytes).into_owned()),
            Err(ext4_view::Ext4Error::NotFound) => None,
            Err(e) => {
                warn(format!("{path}: {e}"));
                None
            }
        }
    };
    let os_release = read_text("/etc/os-release")
        .or_else(|| read_text("/usr/lib/os-release"))
        .map(|text| parse_os_release(&text));
    let hostname = read_text("/etc/hostname")
        .and_then(|text| text.lines().next().map(|line| line.trim().to_string()))
        .filter(|name| !name.is_empty());
    let fstab = read_text("/etc/fstab").map(|text| {
        text.lines()
            .map(str::trim)
            .filter(|line| !line.is_empty() && !line.starts_with('#'))
            .map(str::to_string)
            .collect()
    });
    let boot_names = match fs.read_dir("/boot") {
        Ok(entries) => {
            let mut names = Vec::new();
            for entry in entries {
                match entry {
                    Ok(entry) => names.push(entry.file_name().display().to_string()),
                    Err(e) => {
                        warn(format!("/boot: {e}"));
                        break;
                    }
                }
            }
            names.sort();
            names
        }
        Err(ext4_view::Ext4Error::NotFound) => Vec::new(),
        Err(e) => {
            warn(format!("/boot: {e}"));
            Vec::new()
        }
    };
    let named = |prefix: &str| -> Vec<String> {
        boot_names
            .iter()
            .filter(|name| name.starts_with(prefix))
            .cloned()
            .collect()
    };
    let server =
        matches!(fs.exists("/etc"), Ok(true)).then(|| crate::readiness::assess(&Ext4View(&fs)));
    Ok(Ext4Report {
        server,
        label: Some(label).filter(|l| !l.is_empty()),
        uuid: fs.uuid().to_string(),
        block_size,
        block_count,
        os_release,
        hostname,
        kernels: named("vmlinuz-"),
        initrds: named("initrd.img-"),
        fstab,
    })
}

/// An ext4 filesystem as the readiness checks see it.
struct Ext4View<'a>(&'a ext4_view::Ext4);

impl crate::readiness::RootView for Ext4View<'_> {
    fn exists(&self, path: &str) -> bool {
        self.0.symlink_metadata(path).is_ok()
    }

    fn read(&self, path: &str) -> Option<Vec<u8>> {
        match self.0.metadata(path) {
            Ok(m) if m.len() <= 1 << 20 => self.0.read(path).ok(),
            _ => None,
        }
    }

    fn list(&self, path: &str) -> Vec<String> {
        match self.0.read_dir(path) {
            Ok(entries) => entries
                .flatten()
                .map(|e| e.file_name().display().to_string())
                .filter(|n| n != "." && n != "..")
                .collect(),
            Err(_) => Vec::new(),
        }
    }
}

/// Parses the os-release(5) keys the report shows.
fn parse_os_release(text: &str) -> OsRelease {
    let mut release = OsRelease::default();
    for line in text.lines() {
        let Some((key, value)) = line.trim().split_once('=') else {
            continue;
        };
        let value = unquote(value.trim());
        match key {
            "PRETTY_NAME" => release.pretty_name = Some(value),
            "ID" => release.id = Some(value),
            "VERSION_ID" => release.version_id = Some(value),
            _ => {}
        }
    }
    release
}

/// Removes shell-style quotes and backslash escapes from an os-release value.
fn unquote(value: &str) -> String {
    let inner = match value.as_bytes() {
        [b'"', .., b'"'] | [b'\'', .., b'\''] if value.len() >= 2 => &value[1..value.len() - 1],
        _ => value,
    };
    let mut out = String::with_capacity(inner.len());
    let mut chars = inner.chars();
    while let Some(c) = chars.next() {
        if c == '\\' {
            if let Some(escaped) = chars.next() {
                out.push(escaped);
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// A window onto `len` bytes of the image starting at `start`: what a
/// filesystem reader sees as its whole device. Reads are positional
/// (`pread`), writes are refused: inspection never changes the image.
struct ByteRange<'a> {
    image: ImageHandle<'a>,
    start: u64,
    len: u64,
    /// Position for the `Read`/`Seek` interface (fatfs).
    position: u64,
}

enum ImageHandle<'a> {
    Borrowed(&'a File),
    Owned(File),
}

impl ByteRange<'_> {
    fn new(image: &File, start: u64, len: u64) -> ByteRange<'_> {
        ByteRange {
            image: ImageHandle::Borrowed(image),
            start,
            len,
            position: 0,
        }
    }

    /// The same window with its own file handle, for readers that must be
    /// `'static` (ext4-view takes a `Box<dyn Ext4Read>`).
    fn into_owned(self) -> Result<ByteRange<'static>> {
        let file = match self.image {
            ImageHandle::Borrowed(file) => file
                .try_clone()
                .context("duplicate the image file handle")?,
            ImageHandle::Owned(file) => file,
        };
        Ok(ByteRange {
            image: ImageHandle::Owned(file),
            start: self.start,
            len: self.len,
            position: self.position,
        })
    }

    fn file(&self) -> &File {
        match &self.image {
            ImageHandle::Borrowed(file) => file,
            ImageHandle::Owned(file) => file,
        }
    }

    /// Fills `buf` from `offset` within the range; fails when that would
    /// read past the range's end.
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let end = offset.checked_add(buf.len() as u64);
        if end.is_none_or(|end| end > self.len) {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!(
                    "read of {} bytes at {offset} goes past the end of the {}-byte range",
                    buf.len(),
                    self.len
                ),
            ));
        }
        self.file().read_exact_at(buf, self.start + offset)
    }
}

impl Read for ByteRange<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let remaining = self.len.saturating_sub(self.position);
        let count = (buf.len() as u64).min(remaining) as usize;
        if count == 0 {
            return Ok(0);
        }
        let read = self
            .file()
            .read_at(&mut buf[..count], self.start + self.position)?;
        self.position += read as u64;
        Ok(read)
    }
}

impl Seek for ByteRange<'_> {
    fn seek(&mut self, to: SeekFrom) -> io::Result<u64> {
        let target = match to {
            SeekFrom::Start(offset) => Some(offset),
            SeekFrom::Current(delta) => self.position.checked_add_signed(delta),
            SeekFrom::End(delta) => self.len.checked_add_signed(delta),
        };
        match target {
            Some(position) => {
                self.position = position;
                Ok(position)
            }
            None => Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "seek before the start of the range",
            )),
        }
    }
}

/// fatfs wants a read-write device even to read; every write fails.
impl Write for ByteRange<'_> {
    fn write(&mut self, _buf: &[u8]) -> io::Result<usize> {
        Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            "imgforge inspect opens disk images read-only",
        ))
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl ext4_view::Ext4Read for ByteRange<'static> {
    fn read(
        &mut self,
        start_byte: u64,
        dst: &mut [u8],
    ) -> std::result::Result<(), Box<dyn std::error::Error + Send + Sync + 'static>> {
        Ok(self.read_exact_at(dst, start_byte)?)
    }
}

/// The readable form of a report.
pub fn render_text(report: &Report) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    let table = match report.partition_table {
        PartitionTableKind::Gpt => format!(
            "GPT, disk GUID {}, {}-byte sectors",
            report.disk_guid.as_deref().unwrap_or("?"),
            report.sector_size
        ),
        PartitionTableKind::None => "no partition table".to_string(),
    };
    let _ = writeln!(
        out,
        "{}: {}{} ({} bytes), {table}",
        report.path,
        if report.format == "raw" {
            ""
        } else {
            "qcow2, virtual size "
        },
        crate::size::format_size(report.disk_size_bytes),
        report.disk_size_bytes
    );
    for partition in &report.partitions {
        let _ = writeln!(
            out,
            "\npartition {} \"{}\": {} ({}), partuuid {}",
            partition.number,
            partition.name,
            partition.type_name.as_deref().unwrap_or("unknown type"),
            partition.type_guid,
            partition.partuuid
        );
        let _ = writeln!(
            out,
            "  LBA {}-{}, start {} bytes, size {} ({} bytes)",
            partition.first_lba,
            partition.last_lba,
            partition.start_bytes,
            crate::size::format_size(partition.size_bytes),
            partition.size_bytes
        );
        render_filesystem(&mut out, &partition.filesystem);
    }
    if let Some(filesystem) = &report.whole_disk {
        let _ = writeln!(out, "\nwhole disk:");
        render_filesystem(&mut out, filesystem);
    }
    if !report.warnings.is_empty() {
        let _ = writeln!(out, "\nwarnings:");
        for w in &report.warnings {
            let _ = writeln!(out, "  {w}");
        }
    }
    out
}

/// The readiness lines of a root filesystem (disk or tarball).
fn render_readiness(out: &mut String, server: &crate::readiness::Readiness) {
    use std::fmt::Write as _;
    let _ = writeln!(out, "  as a server: {}", server.present.join("; "));
    if server.is_ready() {
        let _ = writeln!(out, "  nothing missing for a cloud server");
    }
    for line in crate::readiness::render(&server.findings) {
        let _ = writeln!(out, "  {line}");
    }
}

fn render_filesystem(out: &mut String, filesystem: &FilesystemReport) {
    use std::fmt::Write as _;
    let _ = writeln!(out, "  filesystem: {}", filesystem.kind.as_str());
    if let Some(error) = &filesystem.error {
        let _ = writeln!(out, "  cannot read it: {error}");
    }
    if let Some(fat) = &filesystem.fat {
        let _ = writeln!(
            out,
            "  {}, label {}, volume id {}",
            fat.fat_type,
            fat.label.as_deref().unwrap_or("(none)"),
            fat.volume_id
        );
        for file in &fat.files {
            let _ = writeln!(out, "    {} {}", file.path, file.size_bytes);
        }
        if fat.files_truncated {
            let _ = writeln!(out, "    ... (more files; see --max-files)");
        }
    }
    if let Some(ext4) = &filesystem.ext4 {
        let _ = writeln!(
            out,
            "  label {}, uuid {}, {} blocks of {} bytes",
            ext4.label.as_deref().unwrap_or("(none)"),
            ext4.uuid,
            ext4.block_count,
            ext4.block_size
        );
        if let Some(release) = &ext4.os_release {
            let _ = writeln!(
                out,
                "  os-release: {} (ID {}, VERSION_ID {})",
                release.pretty_name.as_deref().unwrap_or("?"),
                release.id.as_deref().unwrap_or("?"),
                release.version_id.as_deref().unwrap_or("?")
            );
        }
        if let Some(hostname) = &ext4.hostname {
            let _ = writeln!(out, "  hostname: {hostname}");
        }
        let list = |names: &[String]| {
            if names.is_empty() {
                "(none)".to_string()
            } else {
                names.join(" ")
            }
        };
        let _ = writeln!(out, "  kernels: {}", list(&ext4.kernels));
        let _ = writeln!(out, "  initrds: {}", list(&ext4.initrds));
        if let Some(server) = &ext4.server {
            render_readiness(out, server);
        }
        match &ext4.fstab {
            Some(lines) if lines.is_empty() => {
                let _ = writeln!(out, "  fstab: (no entries)");
            }
            Some(lines) => {
                let _ = writeln!(out, "  fstab:");
                for line in lines {
                    let _ = writeln!(out, "    {line}");
                }
            }
            None => {
                let _ = writeln!(out, "  fstab: (none)");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn os_release_values_lose_their_quotes() {
        let text = "PRETTY_NAME=\"Debian GNU/Linux 12 (bookworm)\"\nNAME=\"Debian GNU/Linux\"\n\
                    VERSION_ID='12'\nID=debian\n# comment\n";
        assert_eq!(
            parse_os_release(text),
            OsRelease {
                pretty_name: Some("Debian GNU/Linux 12 (bookworm)".into()),
                id: Some("debian".into()),
                version_id: Some("12".into()),
            }
        );
        assert_eq!(unquote(r#""say \"hi\"""#), r#"say "hi""#);
    }

    #[test]
    fn container_formats_are_named() {
        assert_eq!(container_format(b"QFI\xfb\0\0\0\x03"), Some("qcow2"));
        assert_eq!(container_format(b"\x1f\x8b\x08"), Some("gzip-compressed"));
        assert_eq!(container_format(&[0u8; 512]), None);
    }

    #[test]
    fn sizes_read_like_people_write_them() {
        assert_eq!(crate::size::format_size(512), "512 bytes");
        assert_eq!(crate::size::format_size(100 << 20), "100 MiB");
        assert_eq!(crate::size::format_size(3 << 29), "1.5 GiB");
    }
}
