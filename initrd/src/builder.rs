//! Assembles the build server's initrd from the agent, kernel modules, host
//! tools and host files.
//!
//! Layout (all owned by 0:0, all with the spec's mtime):
//!
//! | path                              | what                                   |
//! |-----------------------------------|----------------------------------------|
//! | `init`                            | the agent (PID 1), 0755                |
//! | `dev proc sys run root etc mnt`   | empty directories, 0755                |
//! | `tmp`                             | 1777                                   |
//! | `dev/console`                     | char device 5:1, 0600 (the kernel opens it for PID 1's stdio before `init` runs, so it must exist in the archive) |
//! | `lib/modules/<name>.ko`           | each module, flat, 0644                |
//! | `lib/modules/load-order`          | `<name>.ko` per line, dependencies first; the agent loads them in this order |
//! | tool host paths                   | each tool, 0755                        |
//! | library paths                     | each tool's libraries at the path ld.so opens, contents of the real file, 0755 |
//! | extra file host paths             | 0644                                   |
//!
//! The result is byte-identical for identical inputs: the archive is sorted
//! (see [`crate::cpio`]) and the gzip header carries mtime 0 and no name.

use std::collections::BTreeSet;
use std::io::Write;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use crate::bootscript::Compression;
use crate::cpio::{Archive, CpioError};
use crate::elf::{library_closure, ElfError};
use crate::modules::{ModuleError, ModuleIndex};

/// Directories the host searches for bootscript tool names, in order.
pub const TOOL_DIRS: [&str; 6] = [
    "/usr/local/sbin",
    "/usr/local/bin",
    "/usr/sbin",
    "/usr/bin",
    "/sbin",
    "/bin",
];

/// Everything an initrd is built from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InitrdSpec {
    /// The agent executable, stored as `init`.
    pub agent: PathBuf,
    /// The kernel's module tree, e.g. `.../lib/modules/<version>`. Not read
    /// when `modules` is empty.
    pub modules_dir: PathBuf,
    /// Module names to load; dependencies are added.
    pub modules: Vec<String>,
    /// Absolute host paths of executables to copy with their libraries.
    pub tools: Vec<PathBuf>,
    /// Host files copied to the same path; missing ones are skipped with a
    /// warning.
    pub files: Vec<PathBuf>,
    /// Files made by the caller (e.g. a GRUB EFI image built for this
    /// initrd), stored at their archive path.
    pub generated: Vec<GeneratedFile>,
    /// Compression of the archive.
    pub compression: Compression,
    /// mtime of every entry (seconds since the epoch; 0 is fine).
    pub mtime: u64,
}

/// A file the caller made, with its place in the archive.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GeneratedFile {
    /// Path inside the initrd, e.g. `usr/lib/imgforge/grub/BOOTX64.EFI`.
    pub path: String,
    pub contents: Vec<u8>,
    pub mode: u32,
}

/// A built initrd.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Initrd {
    /// The (compressed) archive, ready to pass to the kernel.
    pub bytes: Vec<u8>,
    /// Module names in the order the agent loads them.
    pub module_load_order: Vec<String>,
    /// Number of archive entries (directories included, trailer excluded).
    pub entries: usize,
}

impl Initrd {
    /// SHA-256 of [`Initrd::bytes`], lowercase hex.
    pub fn sha256_hex(&self) -> String {
        sha256_hex(&self.bytes)
    }
}

/// SHA-256 of `bytes`, lowercase hex.
pub fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// Errors building an initrd.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    /// The agent executable is missing.
    #[error("agent executable {path} is not a readable file ({reason}); build initrd-agent first")]
    Agent { path: PathBuf, reason: String },
    /// A tool was given by a relative path.
    #[error("tool path {0} is not absolute; give the host path (see find_tool)")]
    ToolNotAbsolute(PathBuf),
    /// A tool does not exist.
    #[error("tool {0} does not exist on this host; install the package that provides it")]
    ToolMissing(PathBuf),
    /// A tool name is not found in [`TOOL_DIRS`].
    #[error("tool `{name}` was not found in {}; install the package that provides it or give an absolute path", .searched.join(", "))]
    ToolNotFound { name: String, searched: Vec<String> },
    /// An extra file exists but is not a regular file.
    #[error("extra file {0} is not a regular file; only files can be listed in `files`")]
    NotAFile(PathBuf),
    /// Module resolution failed.
    #[error(transparent)]
    Modules(#[from] ModuleError),
    /// Library resolution failed.
    #[error(transparent)]
    Libraries(#[from] ElfError),
    /// The archive could not be assembled.
    #[error(transparent)]
    Archive(#[from] CpioError),
    /// Compression failed.
    #[error("compressing the initrd failed: {0}")]
    Compress(#[source] std::io::Error),
}

/// Finds a bootscript tool name (e.g. `mke2fs`) in [`TOOL_DIRS`]; a name
/// containing `/` is returned as is.
pub fn find_tool(name: &str) -> Result<PathBuf, BuildError> {
    if name.contains('/') {
        return Ok(PathBuf::from(name));
    }
    TOOL_DIRS
        .iter()
        .map(|dir| Path::new(dir).join(name))
        .find(|p| p.is_file())
        .ok_or_else(|| BuildError::ToolNotFound {
            name: name.to_owned(),
            searched: TOOL_DIRS.iter().map(|d| (*d).to_owned()).collect(),
        })
}

/// Builds the initrd described by `spec`.
pub fn build(spec: &InitrdSpec) -> Result<Initrd, BuildError> {
    let mut archive = Archive::with_mtime(spec.mtime)?;

    // Checked up front: the archive reads host files only when written,
    // which would turn a missing agent into a less obvious error.
    match std::fs::metadata(&spec.agent) {
        Ok(m) if m.is_file() => {}
        Ok(_) => {
            return Err(BuildError::Agent {
                path: spec.agent.clone(),
                reason: "not a regular file".into(),
            })
        }
        Err(e) => {
            return Err(BuildError::Agent {
                path: spec.agent.clone(),
                reason: e.to_string(),
            })
        }
    }
    archive.add_host_file("init", 0o755, &spec.agent)?;
    for dir in ["dev", "proc", "sys", "run", "root", "etc", "mnt"] {
        archive.add_dir(dir, 0o755)?;
    }
    archive.add_dir("tmp", 0o1777)?;
    archive.add_char_device("dev/console", 0o600, 5, 1)?;

    let module_load_order = add_modules(&mut archive, spec)?;
    add_tools(&mut archive, &spec.tools)?;
    add_files(&mut archive, &spec.files)?;
    for g in &spec.generated {
        archive.add_file(&g.path, g.mode, g.contents.clone())?;
    }

    let cpio = archive.to_vec()?;
    let bytes = match spec.compression {
        Compression::None => cpio,
        Compression::Gzip => gzip(&cpio).map_err(BuildError::Compress)?,
    };
    tracing::info!(
        entries = archive.len(),
        bytes = bytes.len(),
        modules = module_load_order.len(),
        "built initrd"
    );
    Ok(Initrd {
        bytes,
        module_load_order,
        entries: archive.len(),
    })
}

fn add_modules(archive: &mut Archive, spec: &InitrdSpec) -> Result<Vec<String>, BuildError> {
    if spec.modules.is_empty() {
        return Ok(Vec::new());
    }
    let index = ModuleIndex::scan(&spec.modules_dir)?;
    let order = index.load_order(&spec.modules)?;
    let mut list = String::new();
    for module in &order {
        let file = format!("{}.ko", module.name());
        archive.add_host_file(Path::new("lib/modules").join(&file), 0o644, module.path())?;
        list.push_str(&file);
        list.push('\n');
    }
    archive.add_file("lib/modules/load-order", 0o644, list.into_bytes())?;
    Ok(order.iter().map(|m| m.name().to_owned()).collect())
}

fn add_tools(archive: &mut Archive, tools: &[PathBuf]) -> Result<(), BuildError> {
    // A tool listed twice is harmless; dedupe instead of failing on it.
    let tools: Vec<PathBuf> = tools
        .iter()
        .cloned()
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect();
    for tool in &tools {
        if !tool.is_absolute() {
            return Err(BuildError::ToolNotAbsolute(tool.clone()));
        }
        if !tool.is_file() {
            return Err(BuildError::ToolMissing(tool.clone()));
        }
        archive.add_host_file(tool, 0o755, tool)?;
    }
    for lib in library_closure(&tools)? {
        // A tool may itself be a library path of another tool (rare); the
        // copy already in the archive is the same file.
        if archive.contains(&lib.path) {
            continue;
        }
        archive.add_host_file(&lib.path, 0o755, &lib.real_path)?;
    }
    Ok(())
}

fn add_files(archive: &mut Archive, files: &[PathBuf]) -> Result<(), BuildError> {
    for file in files.iter().collect::<BTreeSet<_>>() {
        match std::fs::metadata(file) {
            Ok(m) if m.is_file() => archive.add_host_file(file, 0o644, file)?,
            Ok(_) => return Err(BuildError::NotAFile(file.clone())),
            Err(e) => tracing::warn!(
                file = %file.display(),
                error = %e,
                "extra initrd file is not available on this host; skipping it"
            ),
        }
    }
    Ok(())
}

/// gzip at best compression with a fixed header (mtime 0, no file name), so
/// equal archives compress to equal bytes.
fn gzip(data: &[u8]) -> std::io::Result<Vec<u8>> {
    let mut encoder = flate2::GzBuilder::new()
        .mtime(0)
        .write(Vec::new(), flate2::Compression::best());
    encoder.write_all(data)?;
    encoder.finish()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_support::write_fake_modules;
    use std::io::Read;
    use std::process::{Command, Stdio};

    fn spec(root: &Path) -> InitrdSpec {
        let agent = root.join("agent");
        std::fs::write(&agent, b"\x7fELF pretend agent").unwrap();
        let modules_dir = root.join("lib/modules/6.1.0-test");
        write_fake_modules(
            &modules_dir,
            &[
                (
                    "kernel/drivers/virtio/virtio_pci.ko",
                    "virtio_pci",
                    &["virtio", "virtio_ring"],
                ),
                (
                    "kernel/drivers/virtio/virtio.ko",
                    "virtio",
                    &["virtio_ring"],
                ),
                ("kernel/drivers/virtio/virtio_ring.ko", "virtio_ring", &[]),
                ("kernel/fs/fat/vfat.ko", "vfat", &["fat"]),
                ("kernel/fs/fat/fat.ko", "fat", &[]),
                ("kernel/unused.ko", "unused", &[]),
            ],
        );
        InitrdSpec {
            agent,
            modules_dir,
            modules: vec!["vfat".into(), "virtio_pci".into()],
            tools: vec![PathBuf::from("/usr/sbin/mke2fs")],
            files: vec![
                PathBuf::from("/etc/mke2fs.conf"),
                PathBuf::from("/nonexistent/imgforge-test.conf"),
            ],
            generated: vec![GeneratedFile {
                path: "usr/lib/imgforge/grub/BOOTX64.EFI".into(),
                contents: b"MZ-generated".to_vec(),
                mode: 0o644,
            }],
            compression: Compression::Gzip,
            mtime: 0,
        }
    }

    fn list_with_cpio_tool(archive: &[u8]) -> Option<Vec<String>> {
        let mut child = Command::new("cpio")
            .arg("-it")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .ok()?;
        child.stdin.take().unwrap().write_all(archive).unwrap();
        let out = child.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        Some(
            String::from_utf8(out.stdout)
                .unwrap()
                .lines()
                .map(str::to_owned)
                .collect(),
        )
    }

    #[test]
    fn builds_a_complete_deterministic_initrd() {
        if !Path::new("/usr/sbin/mke2fs").exists() {
            crate::test_support::skip_for_missing_tool(
                "/usr/sbin/mke2fs is not installed (apt-get install e2fsprogs)",
            );
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let spec = spec(dir.path());
        let initrd = build(&spec).unwrap();
        assert_eq!(
            initrd.module_load_order,
            ["fat", "vfat", "virtio_ring", "virtio", "virtio_pci"]
        );

        let mut cpio = Vec::new();
        flate2::read::GzDecoder::new(initrd.bytes.as_slice())
            .read_to_end(&mut cpio)
            .unwrap();
        let Some(names) = list_with_cpio_tool(&cpio) else {
            crate::test_support::skip_for_missing_tool(
                "the `cpio` tool is not installed (apt-get install cpio)",
            );
            return;
        };
        assert_eq!(names.len(), initrd.entries, "{names:?}");
        for expected in [
            "init",
            "dev/console",
            "tmp",
            "mnt",
            "lib/modules/load-order",
            "lib/modules/fat.ko",
            "lib/modules/virtio_pci.ko",
            "usr/sbin/mke2fs",
            "lib64/ld-linux-x86-64.so.2",
            "lib/x86_64-linux-gnu/libext2fs.so.2",
            "lib/x86_64-linux-gnu/libc.so.6",
            "usr/lib/imgforge/grub/BOOTX64.EFI",
        ] {
            assert!(
                names.iter().any(|n| n == expected),
                "{expected} missing: {names:?}"
            );
        }
        assert!(!names.iter().any(|n| n.contains("unused")), "{names:?}");
        assert!(
            !names.iter().any(|n| n.contains("imgforge-test.conf")),
            "{names:?}"
        );
        assert_eq!(
            names.iter().any(|n| n == "etc/mke2fs.conf"),
            Path::new("/etc/mke2fs.conf").is_file()
        );

        // Contents: the load-order file, the agent, a library's real bytes.
        let entry = |wanted: &str| -> Vec<u8> {
            let mut rest: &[u8] = &cpio;
            loop {
                let mut reader = ::cpio::NewcReader::new(rest).unwrap();
                assert!(!reader.entry().is_trailer(), "{wanted} not in archive");
                if reader.entry().name() == wanted {
                    let mut data = Vec::new();
                    reader.read_to_end(&mut data).unwrap();
                    return data;
                }
                rest = reader.finish().unwrap();
            }
        };
        assert_eq!(
            String::from_utf8(entry("lib/modules/load-order")).unwrap(),
            "fat.ko\nvfat.ko\nvirtio_ring.ko\nvirtio.ko\nvirtio_pci.ko\n"
        );
        assert_eq!(entry("init"), b"\x7fELF pretend agent");
        assert_eq!(entry("usr/lib/imgforge/grub/BOOTX64.EFI"), b"MZ-generated");
        assert_eq!(
            entry("lib/x86_64-linux-gnu/libext2fs.so.2"),
            std::fs::read("/usr/lib/x86_64-linux-gnu/libext2fs.so.2").unwrap()
        );

        // Same inputs, same bytes.
        let again = build(&spec).unwrap();
        assert_eq!(again.bytes, initrd.bytes);
        assert_eq!(again.sha256_hex(), initrd.sha256_hex());
        assert_eq!(initrd.sha256_hex().len(), 64);
    }

    #[test]
    fn uncompressed_without_modules_or_tools() {
        let dir = tempfile::tempdir().unwrap();
        let mut spec = spec(dir.path());
        spec.modules.clear();
        spec.tools.clear();
        spec.files.clear();
        spec.generated.clear();
        spec.modules_dir = dir.path().join("does-not-exist");
        spec.compression = Compression::None;
        let initrd = build(&spec).unwrap();
        assert!(initrd.bytes.starts_with(b"070701"));
        assert!(initrd.module_load_order.is_empty());
        // init + 8 directories + dev/console.
        assert_eq!(initrd.entries, 10);
    }

    #[test]
    fn missing_agent_and_bad_tools_are_reported() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = spec(dir.path());
        s.agent = dir.path().join("no-agent");
        let err = build(&s).unwrap_err();
        assert!(matches!(err, BuildError::Agent { .. }), "{err}");
        assert!(err.to_string().contains("no-agent"), "{err}");

        let mut s = spec(dir.path());
        s.tools = vec![PathBuf::from("mke2fs")];
        assert!(matches!(build(&s), Err(BuildError::ToolNotAbsolute(_))));
        s.tools = vec![PathBuf::from("/nonexistent/tool")];
        assert!(matches!(build(&s), Err(BuildError::ToolMissing(_))));

        let mut s = spec(dir.path());
        s.modules = vec!["nope".into()];
        let err = build(&s).unwrap_err();
        assert!(
            matches!(err, BuildError::Modules(ModuleError::Missing { .. })),
            "{err}"
        );
    }

    #[test]
    fn find_tool_searches_standard_dirs() {
        assert!(find_tool("sh").unwrap().is_absolute());
        let err = find_tool("imgforge-no-such-tool").unwrap_err();
        assert!(err.to_string().contains("/usr/sbin"), "{err}");
    }
}
