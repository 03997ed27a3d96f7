//! `imgforge inspect DISK` on real disk images made without root: a GPT
//! with an ESP (sgdisk, mkfs.fat, mtools) and an ext4 root filled from a
//! directory (`mke2fs -d`), a whole-disk ext4, and inputs that are not raw
//! disk images. The binary runs as a user would run it and its `--json`
//! output is checked.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::{json, Value};

const DISK_GUID: &str = "6c1f0a52-7d2e-4b8a-9d61-3f4e5a6b7c8d";
const ROOT_PARTUUID: &str = "1a2b3c4d-5e6f-4a7b-8c9d-0e1f2a3b4c5d";
const ESP_PARTUUID: &str = "aabbccdd-eeff-4011-8233-445566778899";
const ROOT_FS_UUID: &str = "0d9c8b7a-6f5e-4d3c-8b2a-190817263544";
const OS_RELEASE: &str = "PRETTY_NAME=\"Debian GNU/Linux 12 (bookworm)\"\n\
                          NAME=\"Debian GNU/Linux\"\n\
                          VERSION_ID=\"12\"\n\
                          VERSION=\"12 (bookworm)\"\n\
                          VERSION_CODENAME=bookworm\n\
                          ID=debian\n";
const BOOTLOADER_SIZE: usize = 1_234_567;
const GRUB_CFG: &str = "search --fs-uuid --set=root 1234-5678\n";

/// Finds a tool in PATH or in the sbin directories (sgdisk, mkfs.fat and
/// mke2fs live there and a user's PATH may lack them).
fn tool(name: &str) -> PathBuf {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin".into(), "/sbin".into()])
        .map(|dir| dir.join(name))
        .find(|candidate| candidate.is_file())
        .unwrap_or_else(|| {
            panic!("{name} is not installed; scripts/setup.sh installs it (gdisk, dosfstools, mtools, e2fsprogs, qemu-utils)")
        })
}

fn run(program: &str, args: &[&str]) -> String {
    let output = Command::new(tool(program))
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("run {program}: {e}"));
    assert!(
        output.status.success(),
        "{program} {args:?} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

fn str_of(path: &Path) -> &str {
    path.to_str().expect("UTF-8 temporary path")
}

/// Writes a file of `size` bytes with a recognisable pattern.
fn write_pattern(path: &Path, size: usize) {
    let bytes: Vec<u8> = (0..size).map(|i| (i % 251) as u8).collect();
    fs::write(path, bytes).unwrap();
}

/// A root filesystem tree like a Debian image's: /etc/os-release is a
/// symlink to ../usr/lib/os-release, as on Debian.
fn debian_like_tree(dir: &Path) {
    for sub in ["etc", "boot", "usr/lib"] {
        fs::create_dir_all(dir.join(sub)).unwrap();
    }
    fs::write(dir.join("usr/lib/os-release"), OS_RELEASE).unwrap();
    std::os::unix::fs::symlink("../usr/lib/os-release", dir.join("etc/os-release")).unwrap();
    fs::write(dir.join("etc/hostname"), "imgforge-test\n").unwrap();
    fs::write(
        dir.join("etc/fstab"),
        "# /etc/fstab: static file system information.\n\n\
         PARTUUID=1a2b3c4d-5e6f-4a7b-8c9d-0e1f2a3b4c5d / ext4 defaults 0 1\n\
         UUID=1234-5678 /boot/efi vfat umask=0077 0 1\n",
    )
    .unwrap();
    fs::write(dir.join("boot/vmlinuz-6.1.0-x"), "kernel").unwrap();
    fs::write(dir.join("boot/initrd.img-6.1.0-x"), "initrd").unwrap();
    fs::write(dir.join("boot/config-6.1.0-x"), "CONFIG_EXT4_FS=y\n").unwrap();
}

/// A 128 MiB GPT disk like the from-rootfs method makes: partition 15 the
/// ESP (FAT32, 64 MiB at 1 MiB) with EFI/BOOT/BOOTX64.EFI and
/// EFI/debian/grub.cfg, partition 1 an ext4 root filling the rest.
fn gpt_disk(dir: &Path) -> PathBuf {
    let disk = dir.join("disk.img");
    run("truncate", &["-s", "128M", str_of(&disk)]);
    run(
        "sgdisk",
        &[
            &format!("--disk-guid={DISK_GUID}"),
            "--new=15:1MiB:+64MiB",
            "--typecode=15:EF00",
            "--change-name=15:ESP",
            &format!("--partition-guid=15:{ESP_PARTUUID}"),
            "--new=1:0:0",
            "--typecode=1:8300",
            "--change-name=1:root",
            &format!("--partition-guid=1:{ROOT_PARTUUID}"),
            str_of(&disk),
        ],
    );

    let esp = dir.join("esp.img");
    run("truncate", &["-s", "64M", str_of(&esp)]);
    run(
        "mkfs.fat",
        &["-F", "32", "-n", "ESP", "-i", "12345678", str_of(&esp)],
    );
    let bootloader = dir.join("BOOTX64.EFI");
    write_pattern(&bootloader, BOOTLOADER_SIZE);
    let grub_cfg = dir.join("grub.cfg");
    fs::write(&grub_cfg, GRUB_CFG).unwrap();
    let esp_image = format!("{}", esp.display());
    run(
        "mmd",
        &["-i", &esp_image, "::EFI", "::EFI/BOOT", "::EFI/debian"],
    );
    run(
        "mcopy",
        &[
            "-i",
            &esp_image,
            str_of(&bootloader),
            "::EFI/BOOT/BOOTX64.EFI",
        ],
    );
    run(
        "mcopy",
        &["-i", &esp_image, str_of(&grub_cfg), "::EFI/debian/grub.cfg"],
    );
    run(
        "dd",
        &[
            &format!("if={}", esp.display()),
            &format!("of={}", disk.display()),
            "bs=1M",
            "seek=1",
            "conv=notrunc",
            "status=none",
        ],
    );

    let info = run("sgdisk", &["--info=1", str_of(&disk)]);
    let sector = |label: &str| -> u64 {
        info.lines()
            .find_map(|line| line.strip_prefix(label))
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("no '{label}' in sgdisk --info: {info}"))
    };
    let (first, last) = (sector("First sector: "), sector("Last sector: "));
    let tree = dir.join("rootfs");
    debian_like_tree(&tree);
    run(
        "mke2fs",
        &[
            "-q",
            "-t",
            "ext4",
            "-L",
            "root",
            "-U",
            ROOT_FS_UUID,
            "-d",
            str_of(&tree),
            "-E",
            &format!("offset={}", first * 512),
            str_of(&disk),
            &format!("{}k", (last + 1 - first) * 512 / 1024),
        ],
    );
    disk
}

fn imgforge(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_imgforge"))
        .args(args)
        .output()
        .expect("run imgforge")
}

fn inspect_json(args: &[&str]) -> Value {
    let output = imgforge(&[&["--json", "inspect"], args].concat());
    assert!(
        output.status.success(),
        "imgforge inspect {args:?} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_slice(&output.stdout).expect("inspect --json prints JSON")
}

/// The error text of an inspection that must fail.
fn inspect_error(disk: &Path) -> String {
    let output = imgforge(&["inspect", str_of(disk)]);
    assert!(
        !output.status.success(),
        "imgforge inspect {} succeeded: {}",
        disk.display(),
        String::from_utf8_lossy(&output.stdout)
    );
    assert!(
        output.stdout.is_empty(),
        "a failed inspection prints no report"
    );
    String::from_utf8_lossy(&output.stderr).into_owned()
}

fn partition(report: &Value, number: u64) -> &Value {
    report["partitions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["number"] == number)
        .unwrap_or_else(|| panic!("no partition {number} in {report:#}"))
}

#[test]
fn gpt_disk_shows_partitions_esp_files_and_root_facts() {
    let dir = tempfile::tempdir().unwrap();
    let disk = gpt_disk(dir.path());
    // Inspection needs no write access and changes nothing.
    let before = fs::read(&disk).unwrap();
    let mut permissions = fs::metadata(&disk).unwrap().permissions();
    permissions.set_readonly(true);
    fs::set_permissions(&disk, permissions).unwrap();
    let report = inspect_json(&[str_of(&disk)]);
    assert!(
        fs::read(&disk).unwrap() == before,
        "inspect changed the image"
    );

    assert_eq!(report["partition_table"], "gpt");
    assert_eq!(report["disk_size_bytes"], 128u64 << 20);
    assert_eq!(report["sector_size"], 512);
    assert_eq!(report["disk_guid"], DISK_GUID);
    assert_eq!(report["whole_disk"], Value::Null);
    assert_eq!(report["warnings"], json!([]));
    let numbers: Vec<&Value> = report["partitions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| &p["number"])
        .collect();
    assert_eq!(numbers, [1, 15]);

    let esp = partition(&report, 15);
    assert_eq!(esp["name"], "ESP");
    assert_eq!(esp["type_name"], "EFI System");
    assert_eq!(esp["type_guid"], "c12a7328-f81f-11d2-ba4b-00a0c93ec93b");
    assert_eq!(esp["partuuid"], ESP_PARTUUID);
    assert_eq!(esp["first_lba"], 2048);
    assert_eq!(esp["last_lba"], 2048 + 131072 - 1);
    assert_eq!(esp["start_bytes"], 1u64 << 20);
    assert_eq!(esp["size_bytes"], 64u64 << 20);
    let fs = &esp["filesystem"];
    assert_eq!(fs["kind"], "vfat", "{fs:#}");
    assert_eq!(fs["error"], Value::Null);
    assert_eq!(fs["fat"]["fat_type"], "FAT32");
    assert_eq!(fs["fat"]["label"], "ESP");
    assert_eq!(fs["fat"]["volume_id"], "1234-5678");
    assert_eq!(
        fs["fat"]["files"],
        json!([
            {"path": "EFI/BOOT/BOOTX64.EFI", "size_bytes": BOOTLOADER_SIZE},
            {"path": "EFI/debian/grub.cfg", "size_bytes": GRUB_CFG.len()},
        ])
    );
    assert_eq!(fs["fat"]["files_truncated"], false);

    let root = partition(&report, 1);
    assert_eq!(root["name"], "root");
    assert_eq!(root["type_name"], "Linux filesystem");
    assert_eq!(root["partuuid"], ROOT_PARTUUID);
    assert_eq!(root["start_bytes"], 65u64 << 20);
    let fs = &root["filesystem"];
    assert_eq!(fs["kind"], "ext4", "{fs:#}");
    let ext4 = &fs["ext4"];
    assert_eq!(ext4["label"], "root");
    assert_eq!(ext4["uuid"], ROOT_FS_UUID);
    assert_eq!(
        ext4["block_size"].as_u64().unwrap() * ext4["block_count"].as_u64().unwrap(),
        root["size_bytes"].as_u64().unwrap() / 1024 * 1024,
        "the filesystem fills its partition"
    );
    assert_eq!(
        ext4["os_release"],
        json!({
            "pretty_name": "Debian GNU/Linux 12 (bookworm)",
            "id": "debian",
            "version_id": "12",
        }),
        "read through the /etc/os-release symlink"
    );
    assert_eq!(ext4["hostname"], "imgforge-test");
    assert_eq!(ext4["kernels"], json!(["vmlinuz-6.1.0-x"]));
    assert_eq!(ext4["initrds"], json!(["initrd.img-6.1.0-x"]));
    assert_eq!(
        ext4["fstab"],
        json!([
            "PARTUUID=1a2b3c4d-5e6f-4a7b-8c9d-0e1f2a3b4c5d / ext4 defaults 0 1",
            "UUID=1234-5678 /boot/efi vfat umask=0077 0 1",
        ])
    );
}

#[test]
fn text_report_reads_like_the_json() {
    let dir = tempfile::tempdir().unwrap();
    let disk = gpt_disk(dir.path());
    let output = imgforge(&["inspect", str_of(&disk)]);
    assert!(output.status.success());
    let text = String::from_utf8(output.stdout).unwrap();
    for expected in [
        &format!("GPT, disk GUID {DISK_GUID}"),
        "partition 15 \"ESP\": EFI System",
        "    EFI/BOOT/BOOTX64.EFI 1234567\n",
        "partition 1 \"root\": Linux filesystem",
        "os-release: Debian GNU/Linux 12 (bookworm) (ID debian, VERSION_ID 12)",
        "hostname: imgforge-test",
        "kernels: vmlinuz-6.1.0-x\n",
        "initrds: initrd.img-6.1.0-x\n",
    ] {
        assert!(text.contains(expected), "no {expected:?} in:\n{text}");
    }
}

#[test]
fn esp_listing_stops_at_max_files() {
    let dir = tempfile::tempdir().unwrap();
    let disk = gpt_disk(dir.path());
    let report = inspect_json(&[str_of(&disk), "--max-files", "1"]);
    let fat = &partition(&report, 15)["filesystem"]["fat"];
    assert_eq!(
        fat["files"],
        json!([{"path": "EFI/BOOT/BOOTX64.EFI", "size_bytes": BOOTLOADER_SIZE}])
    );
    assert_eq!(fat["files_truncated"], true);
}

#[test]
fn grown_and_truncated_images_are_reported_not_refused() {
    let dir = tempfile::tempdir().unwrap();
    let disk = gpt_disk(dir.path());

    let grown = dir.path().join("grown.img");
    fs::copy(&disk, &grown).unwrap();
    run("truncate", &["-s", "256M", str_of(&grown)]);
    let report = inspect_json(&[str_of(&grown)]);
    let warnings = report["warnings"].to_string();
    assert!(
        warnings.contains("grown") && warnings.contains("sgdisk -e"),
        "{warnings}"
    );
    assert_eq!(
        partition(&report, 1)["filesystem"]["ext4"]["hostname"],
        "imgforge-test"
    );

    // Cut inside the root partition: what is left still reads.
    let truncated = dir.path().join("truncated.img");
    fs::copy(&disk, &truncated).unwrap();
    run("truncate", &["-s", "100M", str_of(&truncated)]);
    let report = inspect_json(&[str_of(&truncated)]);
    let warnings = report["warnings"].to_string();
    assert!(warnings.contains("partition 1 ends at byte"), "{warnings}");
    assert!(warnings.contains("truncated"), "{warnings}");
    assert_eq!(
        partition(&report, 15)["filesystem"]["fat"]["files"][0]["path"],
        "EFI/BOOT/BOOTX64.EFI"
    );
}

#[test]
fn unpartitioned_ext4_is_one_whole_disk_filesystem() {
    let dir = tempfile::tempdir().unwrap();
    let tree = dir.path().join("rootfs");
    debian_like_tree(&tree);
    let disk = dir.path().join("unpartitioned.img");
    run(
        "mke2fs",
        &[
            "-q",
            "-t",
            "ext4",
            "-L",
            "rootfs",
            "-d",
            str_of(&tree),
            str_of(&disk),
            "32M",
        ],
    );
    let report = inspect_json(&[str_of(&disk)]);
    assert_eq!(report["partition_table"], "none");
    assert_eq!(report["disk_guid"], Value::Null);
    assert_eq!(report["partitions"], json!([]));
    let whole = &report["whole_disk"];
    assert_eq!(whole["kind"], "ext4", "{report:#}");
    assert_eq!(whole["ext4"]["label"], "rootfs");
    assert_eq!(
        whole["ext4"]["os_release"]["pretty_name"],
        "Debian GNU/Linux 12 (bookworm)"
    );
    assert_eq!(whole["ext4"]["kernels"], json!(["vmlinuz-6.1.0-x"]));
}

#[test]
fn missing_files_in_the_root_are_absent_not_errors() {
    let dir = tempfile::tempdir().unwrap();
    let tree = dir.path().join("empty");
    fs::create_dir(&tree).unwrap();
    let disk = dir.path().join("bare.img");
    run(
        "mke2fs",
        &["-q", "-t", "ext4", "-d", str_of(&tree), str_of(&disk), "8M"],
    );
    let report = inspect_json(&[str_of(&disk)]);
    let ext4 = &report["whole_disk"]["ext4"];
    assert_eq!(ext4["label"], Value::Null);
    assert_eq!(ext4["os_release"], Value::Null);
    assert_eq!(ext4["hostname"], Value::Null);
    assert_eq!(ext4["fstab"], Value::Null);
    assert_eq!(ext4["kernels"], json!([]));
    assert_eq!(ext4["initrds"], json!([]));
    assert_eq!(report["warnings"], json!([]));
}

#[test]
fn inputs_that_are_not_raw_disk_images_get_clear_errors() {
    let dir = tempfile::tempdir().unwrap();

    let missing = dir.path().join("missing.img");
    let e = inspect_error(&missing);
    assert!(
        e.contains("missing.img") && e.contains("No such file"),
        "{e}"
    );

    let e = inspect_error(dir.path());
    assert!(e.contains("is a directory, not a disk image file"), "{e}");

    let empty = dir.path().join("empty.img");
    fs::write(&empty, b"").unwrap();
    let e = inspect_error(&empty);
    assert!(e.contains("empty.img is empty"), "{e}");

    let garbage = dir.path().join("garbage.img");
    let bytes: Vec<u8> = (0u32..1 << 20)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    fs::write(&garbage, bytes).unwrap();
    let e = inspect_error(&garbage);
    assert!(
        e.contains("garbage.img is not a disk image that imgforge can read"),
        "{e}"
    );
    assert!(e.contains("qemu-img convert -O raw"), "{e}");

    let blank = dir.path().join("blank.raw");
    run("truncate", &["-s", "1M", str_of(&blank)]);
    let e = inspect_error(&blank);
    assert!(e.contains("blank.raw holds only zeros"), "{e}");

    let qcow2 = dir.path().join("disk.qcow2");
    run(
        "qemu-img",
        &["create", "-q", "-f", "qcow2", str_of(&qcow2), "1G"],
    );
    // Read through the qcow2 reader: a blank 1 GiB disk.
    let e = inspect_error(&qcow2);
    assert!(e.contains("holds only zeros"), "{e}");

    let vmdk = dir.path().join("disk.vmdk");
    run(
        "qemu-img",
        &["create", "-q", "-f", "vmdk", str_of(&vmdk), "1G"],
    );
    let e = inspect_error(&vmdk);
    assert!(e.contains("disk.vmdk is a VMDK image"), "{e}");
    assert!(e.contains("qemu-img convert -O raw"), "{e}");
}

/// A qcow2 image (zstd-compressed clusters) of the GPT disk reads exactly
/// as the raw disk: the host uses the agent's qcow2 reader.
#[test]
fn qcow2_images_are_read_through_the_qcow2_reader() {
    let dir = tempfile::tempdir().unwrap();
    let raw = gpt_disk(dir.path());
    let qcow2 = dir.path().join("disk.qcow2");
    run(
        "qemu-img",
        &[
            "convert",
            "-c",
            "-O",
            "qcow2",
            "-o",
            "compression_type=zstd",
            str_of(&raw),
            str_of(&qcow2),
        ],
    );
    let mut from_raw = inspect_json(&[str_of(&raw)]);
    let mut from_qcow2 = inspect_json(&[str_of(&qcow2)]);
    assert_eq!(from_raw["format"], "raw");
    assert_eq!(from_qcow2["format"], "qcow2");
    for report in [&mut from_raw, &mut from_qcow2] {
        report["path"] = Value::Null;
        report["format"] = Value::Null;
    }
    assert_eq!(from_raw, from_qcow2);
}
