//! A deterministic cpio `newc` archive builder (the format the kernel unpacks
//! as an initramfs).
//!
//! Entries are collected in memory and written sorted by path, so the output
//! depends only on *what* was added, never on the order of the calls. Every
//! entry is owned by 0:0, carries the same caller-chosen mtime, and gets an
//! inode number from its position in the output. Together this makes two
//! builds from the same inputs byte-identical, which lets callers cache and
//! compare initrds by hash.
//!
//! Headers are produced by the `cpio` crate's [`NewcBuilder`], which can
//! express everything needed here, including device numbers (`rdev`).
//!
//! Paths are stored relative, without a leading `/` or `./` (`init`,
//! `dev/console`), which is how the kernel and `cpio -i` expect them.

use std::collections::BTreeMap;
use std::io::{self, Write};
use std::path::{Component, Path, PathBuf};

use ::cpio::newc::ModeFileType;
use ::cpio::NewcBuilder;

/// Mode of the parent directories created implicitly.
const IMPLICIT_DIR_MODE: u32 = 0o755;

/// Errors building or writing an archive.
#[derive(Debug, thiserror::Error)]
pub enum CpioError {
    /// The archive path cannot be stored.
    #[error("invalid archive path {path:?}: {reason}")]
    InvalidPath { path: PathBuf, reason: &'static str },
    /// Two entries were added under the same path.
    #[error(
        "archive path `{path}` was added twice ({existing} and {new}); add each path only once"
    )]
    Duplicate {
        path: String,
        existing: &'static str,
        new: &'static str,
    },
    /// An entry would be placed under something that is not a directory.
    #[error(
        "cannot add `{path}`: its parent `{parent}` is a {kind} in the archive, not a directory"
    )]
    ParentNotDirectory {
        path: String,
        parent: String,
        kind: &'static str,
    },
    /// A field does not fit the 32-bit newc header.
    #[error("`{path}`: {what} {value} does not fit the 32-bit cpio newc header")]
    TooLarge {
        path: String,
        what: &'static str,
        value: u64,
    },
    /// A file added by host path could not be read when writing.
    #[error("cannot read {host_path} (for archive path `{path}`): {source}")]
    ReadHost {
        path: String,
        host_path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// Writing the archive failed.
    #[error("writing the cpio archive failed: {0}")]
    Write(#[from] io::Error),
}

/// Where a regular file's contents come from.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Contents {
    Bytes(Vec<u8>),
    /// Read when the archive is written, following symlinks, so callers can
    /// store a symlinked library's real contents under the link's name.
    Host(PathBuf),
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Kind {
    /// `explicit` is false for parents created implicitly, so that a later
    /// explicit `add_dir` may set their mode.
    Dir {
        explicit: bool,
    },
    File(Contents),
    Symlink(String),
    CharDevice {
        major: u32,
        minor: u32,
    },
}

impl Kind {
    fn describe(&self) -> &'static str {
        match self {
            Kind::Dir { .. } => "directory",
            Kind::File(_) => "file",
            Kind::Symlink(_) => "symlink",
            Kind::CharDevice { .. } => "character device",
        }
    }

    fn file_type(&self) -> ModeFileType {
        match self {
            Kind::Dir { .. } => ModeFileType::Directory,
            Kind::File(_) => ModeFileType::Regular,
            Kind::Symlink(_) => ModeFileType::Symlink,
            Kind::CharDevice { .. } => ModeFileType::Char,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Entry {
    /// Permission bits only (including setuid/setgid/sticky).
    mode: u32,
    kind: Kind,
}

/// An in-memory description of a newc archive; see the module docs.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Archive {
    mtime: u32,
    /// Keyed by the stored path. Byte order puts every directory before its
    /// contents (a prefix sorts first), which the kernel requires.
    entries: BTreeMap<String, Entry>,
}

impl Archive {
    /// An empty archive whose entries have mtime 0.
    pub fn new() -> Self {
        Self::default()
    }

    /// An empty archive whose entries all have the given mtime (seconds since
    /// the epoch). Fails after 2106, which newc cannot represent.
    pub fn with_mtime(mtime: u64) -> Result<Self, CpioError> {
        let mtime = u32::try_from(mtime).map_err(|_| CpioError::TooLarge {
            path: String::new(),
            what: "mtime",
            value: mtime,
        })?;
        Ok(Archive {
            mtime,
            entries: BTreeMap::new(),
        })
    }

    /// Number of entries (including implicit directories, excluding the
    /// trailer).
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether nothing was added.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The stored paths, in output order.
    pub fn paths(&self) -> impl Iterator<Item = &str> {
        self.entries.keys().map(String::as_str)
    }

    /// Whether `path` (absolute or relative) is in the archive.
    pub fn contains(&self, path: impl AsRef<Path>) -> bool {
        normalize(path.as_ref())
            .map(|p| self.entries.contains_key(&p))
            .unwrap_or(false)
    }

    /// Adds a directory. Adding a directory that was created implicitly as a
    /// parent sets its mode; adding it twice explicitly is an error only if
    /// the modes differ.
    pub fn add_dir(&mut self, path: impl AsRef<Path>, mode: u32) -> Result<(), CpioError> {
        let name = normalize(path.as_ref())?;
        let mode = mode & 0o7777;
        if let Some(existing) = self.entries.get_mut(&name) {
            match existing.kind {
                Kind::Dir { explicit: false } => {
                    *existing = Entry {
                        mode,
                        kind: Kind::Dir { explicit: true },
                    };
                    return Ok(());
                }
                Kind::Dir { explicit: true } if existing.mode == mode => return Ok(()),
                _ => {
                    return Err(CpioError::Duplicate {
                        path: name,
                        existing: existing.kind.describe(),
                        new: "directory",
                    })
                }
            }
        }
        self.insert(name, mode, Kind::Dir { explicit: true })
    }

    /// Adds a regular file with the given contents.
    pub fn add_file(
        &mut self,
        path: impl AsRef<Path>,
        mode: u32,
        contents: Vec<u8>,
    ) -> Result<(), CpioError> {
        let name = normalize(path.as_ref())?;
        check_u32(&name, "file size", contents.len() as u64)?;
        self.insert(name, mode, Kind::File(Contents::Bytes(contents)))
    }

    /// Adds a regular file whose contents are read from `host_path` when the
    /// archive is written (symlinks are followed).
    pub fn add_host_file(
        &mut self,
        path: impl AsRef<Path>,
        mode: u32,
        host_path: impl Into<PathBuf>,
    ) -> Result<(), CpioError> {
        let name = normalize(path.as_ref())?;
        self.insert(name, mode, Kind::File(Contents::Host(host_path.into())))
    }

    /// Adds a symbolic link pointing to `target` (stored verbatim).
    pub fn add_symlink(
        &mut self,
        path: impl AsRef<Path>,
        target: impl Into<String>,
    ) -> Result<(), CpioError> {
        let name = normalize(path.as_ref())?;
        let target = target.into();
        if target.is_empty() {
            return Err(CpioError::InvalidPath {
                path: PathBuf::from(name),
                reason: "symlink target is empty",
            });
        }
        self.insert(name, 0o777, Kind::Symlink(target))
    }

    /// Adds a character device node, e.g. `dev/console` 5:1.
    pub fn add_char_device(
        &mut self,
        path: impl AsRef<Path>,
        mode: u32,
        major: u32,
        minor: u32,
    ) -> Result<(), CpioError> {
        let name = normalize(path.as_ref())?;
        self.insert(name, mode, Kind::CharDevice { major, minor })
    }

    fn insert(&mut self, name: String, mode: u32, kind: Kind) -> Result<(), CpioError> {
        if let Some(existing) = self.entries.get(&name) {
            return Err(CpioError::Duplicate {
                path: name,
                existing: existing.kind.describe(),
                new: kind.describe(),
            });
        }
        // Check every ancestor before changing anything, so a failed call
        // leaves the archive as it was.
        let parents: Vec<&str> = name.match_indices('/').map(|(i, _)| &name[..i]).collect();
        for parent in &parents {
            if let Some(e) = self.entries.get(*parent) {
                if !matches!(e.kind, Kind::Dir { .. }) {
                    return Err(CpioError::ParentNotDirectory {
                        path: name.clone(),
                        parent: (*parent).to_owned(),
                        kind: e.kind.describe(),
                    });
                }
            }
        }
        for parent in parents {
            self.entries
                .entry(parent.to_owned())
                .or_insert_with(|| Entry {
                    mode: IMPLICIT_DIR_MODE,
                    kind: Kind::Dir { explicit: false },
                });
        }
        self.entries.insert(
            name,
            Entry {
                mode: mode & 0o7777,
                kind,
            },
        );
        Ok(())
    }

    /// Writes the archive, including the `TRAILER!!!` entry.
    pub fn write(&self, mut out: impl Write) -> Result<(), CpioError> {
        for (index, (name, entry)) in self.entries.iter().enumerate() {
            // Inode 0 is avoided: some tools treat it as "no inode".
            let ino = check_u32(name, "inode number", index as u64 + 1)?;
            let host_data;
            let data: &[u8] = match &entry.kind {
                Kind::File(Contents::Bytes(b)) => b,
                Kind::File(Contents::Host(p)) => {
                    host_data = std::fs::read(p).map_err(|source| CpioError::ReadHost {
                        path: name.clone(),
                        host_path: p.clone(),
                        source,
                    })?;
                    &host_data
                }
                Kind::Symlink(target) => target.as_bytes(),
                Kind::Dir { .. } | Kind::CharDevice { .. } => &[],
            };
            let size = check_u32(name, "file size", data.len() as u64)?;
            let (rdev_major, rdev_minor) = match entry.kind {
                Kind::CharDevice { major, minor } => (major, minor),
                _ => (0, 0),
            };
            // nlink 1 for non-directories matters: the kernel's initramfs
            // unpacker treats regular files with nlink >= 2 as hard-link
            // candidates and matches them by inode number.
            let nlink = if matches!(entry.kind, Kind::Dir { .. }) {
                2
            } else {
                1
            };
            let mut writer = NewcBuilder::new(name)
                .ino(ino)
                .mode(entry.mode)
                .set_mode_file_type(entry.kind.file_type())
                .uid(0)
                .gid(0)
                .nlink(nlink)
                .mtime(self.mtime)
                .rdev_major(rdev_major)
                .rdev_minor(rdev_minor)
                .write(&mut out, size);
            writer.write_all(data)?;
            writer.finish()?;
        }
        ::cpio::newc::trailer(&mut out)?;
        out.flush()?;
        Ok(())
    }

    /// Writes the archive into a new vector.
    pub fn to_vec(&self) -> Result<Vec<u8>, CpioError> {
        let mut out = Vec::new();
        self.write(&mut out)?;
        Ok(out)
    }
}

fn check_u32(path: &str, what: &'static str, value: u64) -> Result<u32, CpioError> {
    u32::try_from(value).map_err(|_| CpioError::TooLarge {
        path: path.to_owned(),
        what,
        value,
    })
}

/// Turns `/dev/console`, `dev/console` or `./dev//console` into
/// `dev/console`; rejects `..`, empty paths and non-UTF-8 names.
fn normalize(path: &Path) -> Result<String, CpioError> {
    let invalid = |reason| CpioError::InvalidPath {
        path: path.to_owned(),
        reason,
    };
    let mut parts = Vec::new();
    for component in path.components() {
        match component {
            Component::RootDir | Component::CurDir => {}
            Component::Normal(part) => parts.push(
                part.to_str()
                    .ok_or_else(|| invalid("the name is not valid UTF-8"))?,
            ),
            Component::ParentDir => return Err(invalid("`..` is not allowed")),
            Component::Prefix(_) => return Err(invalid("path prefixes are not allowed")),
        }
    }
    if parts.is_empty() {
        return Err(invalid("the path names no entry"));
    }
    Ok(parts.join("/"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Command;

    fn sample(reverse: bool) -> Archive {
        let mut calls: Vec<fn(&mut Archive)> = vec![
            |a| a.add_dir("/tmp", 0o1777).unwrap(),
            |a| {
                a.add_file("init", 0o755, b"#!/bin/sh\necho hi\n".to_vec())
                    .unwrap();
            },
            |a| a.add_symlink("bin/sh", "busybox").unwrap(),
            |a| a.add_char_device("/dev/console", 0o600, 5, 1).unwrap(),
            |a| a.add_file("etc/odd", 0o640, b"abc".to_vec()).unwrap(),
        ];
        if reverse {
            calls.reverse();
        }
        let mut a = Archive::with_mtime(1_700_000_000).unwrap();
        for c in calls {
            c(&mut a);
        }
        a
    }

    #[test]
    fn deterministic_regardless_of_insertion_order() {
        let a = sample(false).to_vec().unwrap();
        let b = sample(true).to_vec().unwrap();
        assert_eq!(a, b);
        assert_eq!(
            sample(false).paths().collect::<Vec<_>>(),
            [
                "bin",
                "bin/sh",
                "dev",
                "dev/console",
                "etc",
                "etc/odd",
                "init",
                "tmp"
            ]
        );
    }

    #[test]
    fn normalizes_paths_and_rejects_bad_ones() {
        assert_eq!(normalize(Path::new("/a//b/./c")).unwrap(), "a/b/c");
        assert!(matches!(
            normalize(Path::new("a/../b")),
            Err(CpioError::InvalidPath { .. })
        ));
        assert!(normalize(Path::new("/")).is_err());
    }

    #[test]
    fn conflicting_entries_are_errors() {
        let mut a = Archive::new();
        a.add_file("etc/x", 0o644, vec![]).unwrap();
        assert!(matches!(
            a.add_file("/etc/x", 0o644, vec![]),
            Err(CpioError::Duplicate { .. })
        ));
        let err = a.add_file("etc/x/y", 0o644, vec![]).unwrap_err();
        assert!(matches!(err, CpioError::ParentNotDirectory { .. }), "{err}");
        assert!(!a.contains("etc/x/y"));
        // An implicit parent takes the mode of a later explicit add_dir.
        a.add_dir("etc", 0o700).unwrap();
        a.add_dir("etc", 0o700).unwrap();
        assert!(a.add_dir("etc", 0o755).is_err());
        assert!(a.add_dir("etc/x", 0o755).is_err());
    }

    #[test]
    fn headers_carry_owner_mtime_inode_and_rdev() {
        let bytes = sample(false).to_vec().unwrap();
        let mut rest: &[u8] = &bytes;
        let mut seen = Vec::new();
        loop {
            let reader = ::cpio::NewcReader::new(rest).unwrap();
            let e = reader.entry().clone();
            if e.is_trailer() {
                break;
            }
            assert_eq!((e.uid(), e.gid()), (0, 0));
            assert_eq!(e.mtime(), 1_700_000_000);
            seen.push((
                e.name().to_owned(),
                e.ino(),
                e.mode(),
                e.rdev_major(),
                e.rdev_minor(),
            ));
            rest = reader.finish().unwrap();
        }
        assert_eq!(seen[0], ("bin".to_owned(), 1, 0o040755, 0, 0));
        assert_eq!(seen[3], ("dev/console".to_owned(), 4, 0o020600, 5, 1));
        assert_eq!(seen[7], ("tmp".to_owned(), 8, 0o041777, 0, 0));
    }

    fn cpio_tool_available() -> bool {
        Command::new("cpio").arg("--version").output().is_ok()
    }

    fn run_cpio(args: &[&str], input: &[u8], dir: &Path) -> String {
        use std::process::Stdio;
        let mut child = Command::new("cpio")
            .args(args)
            .env("LC_ALL", "C")
            .current_dir(dir)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        child.stdin.take().unwrap().write_all(input).unwrap();
        let out = child.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "cpio {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        // `-t` lists on stdout; `-v` during extraction lists on stderr.
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr)
    }

    #[test]
    fn real_cpio_tool_lists_and_extracts() {
        use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
        if !cpio_tool_available() {
            crate::test_support::skip_for_missing_tool(
                "the `cpio` tool is not installed (apt-get install cpio)",
            );
            return;
        }
        let bytes = sample(false).to_vec().unwrap();
        let scratch = tempfile::tempdir().unwrap();

        let listing = run_cpio(&["-itv"], &bytes, scratch.path());
        let lines: Vec<&str> = listing.lines().filter(|l| !l.contains("block")).collect();
        // The name is the last field once a symlink's ` -> target` is cut
        // (field positions vary: device lines have `5,   1` for a size).
        let names: Vec<&str> = lines
            .iter()
            .map(|l| {
                let l = l.split(" -> ").next().unwrap();
                l.split_whitespace().last().unwrap()
            })
            .collect();
        assert_eq!(
            names,
            [
                "bin",
                "bin/sh",
                "dev",
                "dev/console",
                "etc",
                "etc/odd",
                "init",
                "tmp"
            ],
            "{listing}"
        );
        let line = |name: &str| *lines.iter().find(|l| l.contains(name)).unwrap();
        assert!(line("dev/console").starts_with("crw-------"), "{listing}");
        assert!(line("dev/console").contains(" 5,   1 "), "{listing}");
        assert!(line("bin/sh").starts_with("lrwxrwxrwx"), "{listing}");
        assert!(line("bin/sh").ends_with("bin/sh -> busybox"), "{listing}");
        assert!(line("init").starts_with("-rwxr-xr-x"), "{listing}");
        assert!(line("tmp").starts_with("drwxrwxrwt"), "{listing}");
        assert!(line("init").contains(" root     root "), "{listing}");

        let is_root = Command::new("id")
            .arg("-u")
            .output()
            .map(|o| o.stdout.starts_with(b"0"))
            .unwrap_or(false);
        if !is_root {
            eprintln!("skipping extraction: device nodes can only be created as root");
            return;
        }
        let dest = tempfile::tempdir().unwrap();
        run_cpio(&["-idmv", "--no-absolute-filenames"], &bytes, dest.path());
        let root = dest.path();
        assert_eq!(
            std::fs::read(root.join("init")).unwrap(),
            b"#!/bin/sh\necho hi\n"
        );
        let init = std::fs::metadata(root.join("init")).unwrap();
        assert_eq!(init.permissions().mode() & 0o7777, 0o755);
        assert_eq!(init.mtime(), 1_700_000_000);
        assert_eq!(std::fs::read(root.join("etc/odd")).unwrap(), b"abc");
        assert_eq!(
            std::fs::metadata(root.join("etc/odd")).unwrap().mode() & 0o7777,
            0o640
        );
        assert_eq!(
            std::fs::read_link(root.join("bin/sh")).unwrap(),
            Path::new("busybox")
        );
        let console = std::fs::symlink_metadata(root.join("dev/console")).unwrap();
        assert!(console.file_type().is_char_device());
        assert_eq!(console.rdev(), libc_makedev(5, 1));
        assert_eq!(console.mode() & 0o7777, 0o600);
        assert_eq!(
            std::fs::metadata(root.join("tmp")).unwrap().mode() & 0o7777,
            0o1777
        );
    }

    /// glibc's `makedev` for small numbers, to compare `st_rdev`.
    fn libc_makedev(major: u64, minor: u64) -> u64 {
        ((major & 0xfff) << 8) | (minor & 0xff) | ((minor & !0xff) << 12) | ((major & !0xfff) << 32)
    }
}
