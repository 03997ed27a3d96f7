//! The target volume: size and sector size, the GPT layout of the original
//! image-creation initrd, and the partition device nodes.
//!
//! Layout (compatible with images the original produced): protective MBR;
//! partition 15 = EFI system partition at 1 MiB (`efi_size`, name
//! `efisystem`), partition 1 = root (Linux filesystem, name `root`) filling
//! the rest, both 1 MiB aligned, with fresh random GUIDs.

use std::fs::{File, OpenOptions};
use std::io::{Seek, SeekFrom, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use gpt::disk::LogicalBlockSize;
use gpt::mbr::ProtectiveMBR;
use gpt::partition_types;
use tracing::{info, warn};
use uuid::Uuid;

pub const ESP_NUMBER: u32 = 15;
pub const ROOT_NUMBER: u32 = 1;
const ALIGN_BYTES: u64 = 1 << 20;

nix::ioctl_read!(blk_getsize64, 0x12, 114, u64);
nix::ioctl_none!(blk_rrpart, 0x12, 95);
nix::ioctl_read_bad!(blk_sszget, 0x1268, libc::c_int);

/// An opened target volume.
pub struct Volume {
    pub path: PathBuf,
    pub file: File,
    pub size: u64,
    pub sector_size: u64,
    /// A block device (the kernel must re-read its table) or a plain file.
    pub is_block_device: bool,
}

impl Volume {
    /// Opens `path` for writing; a missing or unusable volume is an error
    /// the user can act on.
    pub fn open(path: &Path) -> Result<Volume> {
        let meta = std::fs::metadata(path).with_context(|| {
            format!(
                "volume {} does not exist: attach a blank volume to the build server or set \
                 the `volume` parameter (block devices here: {})",
                path.display(),
                list_block_devices().join(", ")
            )
        })?;
        let is_block_device = meta.file_type().is_block_device();
        if !is_block_device && !meta.is_file() {
            bail!(
                "volume {} is neither a block device nor a file",
                path.display()
            );
        }
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .with_context(|| format!("open volume {} for writing", path.display()))?;
        let (size, sector_size) = if is_block_device {
            let mut size = 0u64;
            let mut ssz: libc::c_int = 0;
            // SAFETY: BLKGETSIZE64 writes one u64 into `size`.
            unsafe { blk_getsize64(file.as_raw_fd(), &mut size) }
                .with_context(|| format!("read the size of {}", path.display()))?;
            // SAFETY: BLKSSZGET writes one c_int into `ssz`.
            unsafe { blk_sszget(file.as_raw_fd(), &mut ssz) }
                .with_context(|| format!("read the sector size of {}", path.display()))?;
            (size, ssz as u64)
        } else {
            (file.seek(SeekFrom::End(0))?, 512)
        };
        file.seek(SeekFrom::Start(0))?;
        if size == 0 {
            bail!("volume {} is empty (0 bytes)", path.display());
        }
        Ok(Volume {
            path: path.to_path_buf(),
            file,
            size,
            sector_size,
            is_block_device,
        })
    }

    /// Writes everything out to the device.
    pub fn flush(&self) -> Result<()> {
        self.file.sync_all().context("flush the volume")
    }

    /// Zeroes the first and last MiB: old partition tables (the backup GPT
    /// sits at the end) and filesystem signatures must not survive on a
    /// reused volume.
    pub fn wipe_signatures(&mut self) -> Result<()> {
        let zeros = vec![0u8; ALIGN_BYTES.min(self.size) as usize];
        self.file.seek(SeekFrom::Start(0))?;
        self.file.write_all(&zeros)?;
        self.file
            .seek(SeekFrom::Start(self.size - zeros.len() as u64))?;
        self.file.write_all(&zeros)?;
        self.flush()?;
        Ok(())
    }

    /// The device node of partition `number` (`/dev/vda1`, `/dev/nvme0n1p1`).
    pub fn partition_path(&self, number: u32) -> PathBuf {
        let base = self.path.to_string_lossy();
        let sep = if base.ends_with(|c: char| c.is_ascii_digit()) {
            "p"
        } else {
            ""
        };
        PathBuf::from(format!("{base}{sep}{number}"))
    }
}

/// One partition as written.
#[derive(Clone, Debug)]
pub struct PartitionInfo {
    pub number: u32,
    pub device: PathBuf,
    pub partuuid: Uuid,
    pub start: u64,
    pub size: u64,
}

/// The two partitions of the layout.
#[derive(Clone, Debug)]
pub struct Partitioned {
    pub esp: PartitionInfo,
    pub root: PartitionInfo,
}

/// Writes the GPT layout onto the volume.
pub fn partition(volume: &mut Volume, efi_size: u64) -> Result<Partitioned> {
    let ss = volume.sector_size;
    let lb = logical_block_size(ss)?;
    let efi_size = efi_size.div_ceil(ALIGN_BYTES) * ALIGN_BYTES;
    // 1 MiB before the ESP, the table copies at the end, and room for a root
    // filesystem worth having.
    let minimum = ALIGN_BYTES + efi_size + 64 * ALIGN_BYTES;
    if volume.size < minimum {
        bail!(
            "volume {} is {} MiB; the layout needs at least {} MiB (ESP of {} MiB plus a root \
             filesystem): use a larger volume or a smaller efi_size",
            volume.path.display(),
            volume.size >> 20,
            minimum >> 20,
            efi_size >> 20
        );
    }
    volume.wipe_signatures()?;

    let total_lba = volume.size / ss;
    let mbr = ProtectiveMBR::with_lb_size(u32::try_from(total_lba - 1).unwrap_or(u32::MAX));
    mbr.overwrite_lba0(&mut volume.file)
        .context("write the protective MBR")?;
    let device = volume
        .file
        .try_clone()
        .context("duplicate the volume handle")?;
    let mut disk = gpt::GptConfig::new()
        .writable(true)
        .logical_block_size(lb)
        .create_from_device(device, None)
        .context("create the GPT")?;

    let align = ALIGN_BYTES / ss;
    let esp_first = align;
    let esp_len = efi_size / ss;
    let root_first = (esp_first + esp_len).div_ceil(align) * align;
    let last_usable = disk.header().last_usable;
    if root_first >= last_usable {
        bail!("no room for the root partition after the ESP");
    }
    let root_len = last_usable - root_first + 1;
    disk.add_partition_at(
        "efisystem",
        ESP_NUMBER,
        esp_first,
        esp_len,
        partition_types::EFI,
        0,
    )
    .context("add the EFI system partition")?;
    disk.add_partition_at(
        "root",
        ROOT_NUMBER,
        root_first,
        root_len,
        partition_types::LINUX_FS,
        0,
    )
    .context("add the root partition")?;
    let info = |n: u32| -> Result<PartitionInfo> {
        let p = disk.partitions().get(&n).context("partition vanished")?;
        Ok(PartitionInfo {
            number: n,
            device: volume.partition_path(n),
            partuuid: p.part_guid,
            start: p.first_lba * ss,
            size: (p.last_lba - p.first_lba + 1) * ss,
        })
    };
    let layout = Partitioned {
        esp: info(ESP_NUMBER)?,
        root: info(ROOT_NUMBER)?,
    };
    let esp_entry = disk.partitions()[&ESP_NUMBER].clone();
    let mut device = disk.write().context("write the GPT")?;
    // The crate writes the used entries packed at the start of the entry
    // array, in id order (root in slot 1, the ESP in slot 2); the layout
    // needs the ESP in slot 15.
    move_entry(&mut device, lb, &esp_entry, 1, ESP_NUMBER as u64 - 1)
        .context("place the ESP in slot 15")?;
    device.sync_all().context("flush the GPT")?;
    info!(
        "partitioned {}: ESP {} MiB at {} MiB, root {} MiB",
        volume.path.display(),
        layout.esp.size >> 20,
        layout.esp.start >> 20,
        layout.root.size >> 20
    );
    if volume.is_block_device {
        reread_partition_table(volume)?;
        for p in [&layout.esp, &layout.root] {
            wait_for_node(&p.device, Duration::from_secs(10))?;
        }
    }
    Ok(layout)
}

/// Moves a partition entry from slot index `from` to `to` in both entry
/// arrays and rewrites both headers (which recomputes their CRCs from the
/// arrays on disk).
fn move_entry(
    device: &mut File,
    lb: LogicalBlockSize,
    entry: &gpt::partition::Partition,
    from: u64,
    to: u64,
) -> Result<()> {
    let mut primary = gpt::header::read_header_from_arbitrary_device(device, lb)?;
    // The backup header mirrors the primary, with its entry array right
    // after the last usable LBA (where the crate put it).
    let mut backup = gpt::header::read_header_from_arbitrary_device(device, lb)?;
    backup.current_lba = primary.backup_lba;
    backup.backup_lba = primary.current_lba;
    backup.part_start = primary.last_usable + 1;
    for header in [&primary, &backup] {
        gpt::partition::Partition::write_zero_entries_to_device(
            device,
            from,
            1,
            header.part_start,
            lb,
            header.part_size,
        )?;
        entry.write_to_device(device, to, header.part_start, lb, header.part_size)?;
    }
    backup.write_backup(device, lb)?;
    primary.write_primary(device, lb)?;
    Ok(())
}

/// Asks the kernel to re-read the table (BLKRRPART). Right after our own
/// writes the device can be briefly busy, so retry a few times.
fn reread_partition_table(volume: &Volume) -> Result<()> {
    let mut last = None;
    for _ in 0..10 {
        // SAFETY: BLKRRPART takes no argument.
        match unsafe { blk_rrpart(volume.file.as_raw_fd()) } {
            Ok(_) => return Ok(()),
            Err(e) => {
                last = Some(e);
                std::thread::sleep(Duration::from_millis(200));
            }
        }
    }
    Err(last.unwrap()).with_context(|| {
        format!(
            "the kernel did not re-read the partition table of {} (is it in use?)",
            volume.path.display()
        )
    })
}

/// devtmpfs creates partition nodes asynchronously after the re-read.
pub fn wait_for_node(path: &Path, timeout: Duration) -> Result<()> {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if std::fs::metadata(path).is_ok_and(|m| m.file_type().is_block_device()) {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    warn!("{} did not appear", path.display());
    bail!(
        "partition device {} did not appear within {timeout:?}",
        path.display()
    )
}

/// A partition of a GPT found on the volume (after a disk image was
/// written onto it).
#[derive(Clone, Debug)]
pub struct FoundPartition {
    pub number: u32,
    pub device: PathBuf,
    pub partuuid: Uuid,
    pub type_guid: Uuid,
    pub start: u64,
    pub size: u64,
}

impl FoundPartition {
    pub fn is_esp(&self) -> bool {
        self.type_guid == partition_types::EFI.guid
    }
}

/// What [`grow_gpt`] found and did.
#[derive(Clone, Debug)]
pub struct GrownGpt {
    pub partitions: Vec<FoundPartition>,
    /// The partition that now ends at the end of the volume, with its size
    /// before growing.
    pub grown: Option<(u32, u64)>,
}

/// When the volume starts with a GPT (a disk image written onto a volume
/// larger than the image): moves the backup header and entry array to the
/// end of the volume and grows the partition that ends last to the new last
/// usable sector, keeping every entry in its slot. `Ok(None)` when there is
/// no GPT. The kernel re-reads the table.
pub fn grow_gpt(volume: &mut Volume) -> Result<Option<GrownGpt>> {
    let ss = volume.sector_size;
    let lb = logical_block_size(ss)?;
    let mut primary = match gpt::header::read_header_from_arbitrary_device(&mut volume.file, lb) {
        Ok(h) => h,
        Err(e) => {
            info!("no GPT on {} ({e}): nothing to grow", volume.path.display());
            return Ok(None);
        }
    };
    if primary.part_size != 128 || primary.num_parts == 0 || primary.num_parts > 4096 {
        bail!(
            "the image's GPT has {} entries of {} bytes; only 128-byte entries (at most 4096) \
             are supported",
            primary.num_parts,
            primary.part_size
        );
    }
    let entries = gpt::partition::file_read_partitions(&mut volume.file, &primary, lb)
        .context("read the image's GPT entries")?;
    let total_lba = volume.size / ss;
    let array_bytes = u64::from(primary.num_parts) * u64::from(primary.part_size);
    let array_sectors = array_bytes.div_ceil(ss);
    let new_backup_lba = total_lba - 1;
    let new_last_usable = new_backup_lba
        .checked_sub(array_sectors + 1)
        .context("the volume is too small for a GPT")?;
    if primary.backup_lba > new_backup_lba || primary.last_usable > new_last_usable {
        bail!(
            "the image's GPT describes a disk of {} bytes, larger than the volume ({} bytes)",
            (primary.backup_lba + 1) * ss,
            volume.size
        );
    }
    let last = entries
        .iter()
        .filter(|(_, p)| p.is_used())
        .max_by_key(|(_, p)| p.last_lba)
        .map(|(slot, p)| (*slot, p.clone()));
    let mut grown = None;
    if let Some((slot, mut part)) = last {
        if part.last_lba < new_last_usable {
            grown = Some((slot, (part.last_lba - part.first_lba + 1) * ss));
            part.last_lba = new_last_usable;
            part.write_to_device(
                &mut volume.file,
                u64::from(slot - 1),
                primary.part_start,
                lb,
                primary.part_size,
            )
            .context("write the grown partition entry")?;
        }
    }
    let old_backup_lba = primary.backup_lba;
    primary.last_usable = new_last_usable;
    primary.backup_lba = new_backup_lba;
    // The backup entry array is a copy of the primary one, right before the
    // backup header.
    let mut array = vec![0u8; array_bytes as usize];
    volume.file.seek(SeekFrom::Start(primary.part_start * ss))?;
    std::io::Read::read_exact(&mut volume.file, &mut array)?;
    volume
        .file
        .seek(SeekFrom::Start((new_last_usable + 1) * ss))?;
    volume.file.write_all(&array)?;
    let mut backup = primary.clone();
    backup.current_lba = new_backup_lba;
    backup.backup_lba = primary.current_lba;
    backup.part_start = new_last_usable + 1;
    backup
        .write_backup(&mut volume.file, lb)
        .context("write the backup GPT header")?;
    primary
        .write_primary(&mut volume.file, lb)
        .context("write the primary GPT header")?;
    if old_backup_lba != new_backup_lba {
        // The old backup header now lies inside the grown partition; a
        // stray "EFI PART" there would only confuse tools.
        volume.file.seek(SeekFrom::Start(old_backup_lba * ss))?;
        volume.file.write_all(&vec![0u8; ss as usize])?;
    }
    fix_protective_mbr(volume)?;
    volume.file.sync_all().context("flush the GPT")?;

    let entries = gpt::partition::file_read_partitions(&mut volume.file, &primary, lb)
        .context("read back the GPT entries")?;
    let partitions: Vec<FoundPartition> = entries
        .iter()
        .filter(|(_, p)| p.is_used())
        .map(|(slot, p)| FoundPartition {
            number: *slot,
            device: volume.partition_path(*slot),
            partuuid: p.part_guid,
            type_guid: p.part_type_guid.guid,
            start: p.first_lba * ss,
            size: (p.last_lba - p.first_lba + 1) * ss,
        })
        .collect();
    if let Some((slot, before)) = grown {
        info!(
            "grew partition {slot} from {} MiB to the end of {} ({} MiB)",
            before >> 20,
            volume.path.display(),
            partitions
                .iter()
                .find(|p| p.number == slot)
                .map_or(0, |p| p.size >> 20)
        );
    }
    if volume.is_block_device {
        reread_partition_table(volume)?;
        for p in &partitions {
            wait_for_node(&p.device, Duration::from_secs(10))?;
        }
    }
    Ok(Some(GrownGpt { partitions, grown }))
}

/// The protective MBR's 0xEE entry covers the whole disk (at most what 32
/// bits can say); boot code and other bytes are left alone.
fn fix_protective_mbr(volume: &mut Volume) -> Result<()> {
    let mut mbr = [0u8; 512];
    volume.file.seek(SeekFrom::Start(0))?;
    std::io::Read::read_exact(&mut volume.file, &mut mbr)?;
    if mbr[510..512] != [0x55, 0xAA] || mbr[446 + 4] != 0xEE {
        return Ok(());
    }
    let sectors = u32::try_from(volume.size / volume.sector_size - 1).unwrap_or(u32::MAX);
    mbr[446 + 12..446 + 16].copy_from_slice(&sectors.to_le_bytes());
    volume.file.seek(SeekFrom::Start(0))?;
    volume.file.write_all(&mbr)?;
    Ok(())
}

fn logical_block_size(sector_size: u64) -> Result<LogicalBlockSize> {
    match sector_size {
        512 => Ok(LogicalBlockSize::Lb512),
        4096 => Ok(LogicalBlockSize::Lb4096),
        other => bail!("sector size {other} is not supported (512 or 4096)"),
    }
}

/// Block devices the kernel knows, for error messages.
pub fn list_block_devices() -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir("/sys/block")
        .map(|d| {
            d.flatten()
                .map(|e| format!("/dev/{}", e.file_name().to_string_lossy()))
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    if v.is_empty() {
        v.push("none".into());
    }
    v
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Command;

    fn assert_sgdisk_clean(path: &Path) {
        let verify = Command::new("sgdisk").arg("-v").arg(path).output().unwrap();
        let out = String::from_utf8_lossy(&verify.stdout);
        assert!(out.contains("No problems found"), "{out}");
    }

    #[test]
    fn layout_is_valid_and_compatible_with_the_original() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("disk.img");
        let f = File::create(&path).unwrap();
        f.set_len(512 << 20).unwrap();
        // Leftovers of a previous image must not survive.
        std::fs::write(&path, b"stale").ok();
        f.set_len(512 << 20).unwrap();
        let mut vol = Volume::open(&path).unwrap();
        let p = partition(&mut vol, 100 << 20).unwrap();
        assert_eq!(p.esp.start, 1 << 20);
        assert_eq!(p.esp.size, 100 << 20);
        assert_eq!(p.root.start % (1 << 20), 0);
        assert_ne!(p.esp.partuuid, p.root.partuuid);

        // sgdisk is the independent judge.
        assert_sgdisk_clean(&path);
        let info = |n: &str| {
            String::from_utf8_lossy(
                &Command::new("sgdisk")
                    .args(["-i", n])
                    .arg(&path)
                    .output()
                    .unwrap()
                    .stdout,
            )
            .into_owned()
        };
        let esp = info("15");
        assert!(
            esp.contains("C12A7328-F81F-11D2-BA4B-00A0C93EC93B"),
            "{esp}"
        );
        assert!(esp.contains("'efisystem'"), "{esp}");
        assert!(
            esp.to_lowercase().contains(&p.esp.partuuid.to_string()),
            "{esp}"
        );
        // Exactly two entries, in slots 1 and 15 (the crate alone would pack
        // the ESP into slot 2).
        assert!(info("2").contains("does not exist"), "{}", info("2"));
        let root = info("1");
        assert!(
            root.contains("0FC63DAF-8483-4772-8E79-3D69D8477DE4"),
            "{root}"
        );
        assert!(root.contains("'root'"), "{root}");
        // Root fills the disk up to the backup table.
        let last_sector: u64 = ((512u64 << 20) / 512) - 34;
        assert!(
            root.contains(&format!("Last sector: {last_sector} ")),
            "{root}"
        );
    }

    #[test]
    fn too_small_a_volume_is_refused_with_sizes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("small.img");
        File::create(&path).unwrap().set_len(100 << 20).unwrap();
        let mut vol = Volume::open(&path).unwrap();
        let err = partition(&mut vol, 100 << 20).unwrap_err().to_string();
        assert!(
            err.contains("100 MiB") && err.contains("larger volume"),
            "{err}"
        );
    }

    #[test]
    fn a_missing_volume_names_itself() {
        let err = Volume::open(Path::new("/dev/does-not-exist"))
            .err()
            .unwrap()
            .to_string();
        assert!(
            err.contains("/dev/does-not-exist") && err.contains("volume"),
            "{err}"
        );
    }

    #[test]
    fn partition_node_names() {
        let mk = |p: &str| Volume {
            path: p.into(),
            file: File::open("/dev/null").unwrap(),
            size: 0,
            sector_size: 512,
            is_block_device: true,
        };
        assert_eq!(
            mk("/dev/vda").partition_path(15),
            PathBuf::from("/dev/vda15")
        );
        assert_eq!(
            mk("/dev/nvme0n1").partition_path(1),
            PathBuf::from("/dev/nvme0n1p1")
        );
    }

    /// A 64 MiB image (sgdisk: ESP in slot 15, root in slot 1) written onto
    /// a 160 MiB volume: after growing, sgdisk finds no problem, the root
    /// ends at the last usable sector and the ESP keeps its slot and size.
    #[test]
    fn grow_gpt_moves_the_backup_and_grows_the_last_partition() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("disk.img");
        File::create(&path).unwrap().set_len(64 << 20).unwrap();
        let made = Command::new("sgdisk")
            .args([
                "-n",
                "15:2048:+16M",
                "-t",
                "15:EF00",
                "-n",
                "1:0:0",
                "-t",
                "1:8300",
            ])
            .arg(&path)
            .output()
            .unwrap();
        assert!(made.status.success(), "{made:?}");
        File::options()
            .write(true)
            .open(&path)
            .unwrap()
            .set_len(160 << 20)
            .unwrap();
        let mut vol = Volume::open(&path).unwrap();
        let grown = grow_gpt(&mut vol).unwrap().expect("a GPT");
        let (slot, before) = grown.grown.unwrap();
        assert_eq!(slot, 1);
        assert!(before < 48 << 20, "{before}");
        let root = grown.partitions.iter().find(|p| p.number == 1).unwrap();
        let esp = grown.partitions.iter().find(|p| p.number == 15).unwrap();
        assert!(esp.is_esp() && !root.is_esp());
        assert_eq!(esp.size, 16 << 20);
        // Last usable LBA of a 160 MiB disk with 128 entries: total - 34.
        assert_eq!((root.start + root.size) / 512, (160 << 20) / 512 - 33);

        assert_sgdisk_clean(&path);
        // No GPT at all: nothing to do.
        let blank = dir.path().join("blank.img");
        File::create(&blank).unwrap().set_len(8 << 20).unwrap();
        assert!(grow_gpt(&mut Volume::open(&blank).unwrap())
            .unwrap()
            .is_none());
    }
}
