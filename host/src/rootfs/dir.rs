//! `dir:PATH`: a directory tree, packed as it is on disk.
//!
//! The walk is sorted by name (bytes), each directory before its contents,
//! so the output depends on the tree alone. Kept: numeric owners, modes
//! (setuid, setgid, sticky), mtimes (seconds), xattrs of every namespace the
//! process can read (`user.*`, `security.capability`, ...), symlinks, hard
//! links (the first path in walk order carries the content), character and
//! block devices, fifos. Sockets are left out (tar cannot hold them), and
//! like `tar --one-file-system` the walk does not descend into other mounted
//! filesystems (a chroot's `/proc`, `/sys`, `/dev`): their mount points are
//! kept as empty directories.

use std::collections::HashMap;
use std::ffi::OsStr;
use std::fs::{self, File, Metadata};
use std::io::{self, Read};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use tracing::warn;

use super::output::{Kind, Meta, TarWriter};

/// Packs the tree at `root` into `out`, leaving out the file whose
/// (device, inode) is `exclude` (the output itself, when it is written
/// inside the tree).
pub(crate) fn pack<W: io::Write>(
    root: &Path,
    out: &mut TarWriter<W>,
    exclude: Option<(u64, u64)>,
) -> Result<()> {
    let md =
        fs::metadata(root).with_context(|| format!("dir:{}: cannot read it", root.display()))?;
    if !md.is_dir() {
        bail!("dir:{}: it is not a directory", root.display());
    }
    let mut walk = Walk {
        root_dev: md.dev(),
        exclude,
        links: HashMap::new(),
        out,
    };
    let mut rel = Vec::new();
    walk.dir(root.to_path_buf(), &mut rel, &md)
}

struct Walk<'a, W: io::Write> {
    root_dev: u64,
    exclude: Option<(u64, u64)>,
    /// (dev, ino) of files with several links → first path written.
    links: HashMap<(u64, u64), Vec<u8>>,
    out: &'a mut TarWriter<W>,
}

impl<W: io::Write> Walk<'_, W> {
    fn dir(&mut self, path: PathBuf, rel: &mut Vec<u8>, md: &Metadata) -> Result<()> {
        let meta = meta_of(&path, md)?;
        self.out
            .append(rel, Kind::Dir, &meta, None)
            .with_context(|| format!("cannot write '{}'", path.display()))?;
        if md.dev() != self.root_dev {
            warn!(
                "'{}' is another filesystem's mount point: packing it as an empty directory",
                path.display()
            );
            return Ok(());
        }
        let mut names: Vec<_> = fs::read_dir(&path)
            .with_context(|| format!("cannot list '{}'", path.display()))?
            .map(|e| e.map(|e| e.file_name()))
            .collect::<io::Result<_>>()
            .with_context(|| format!("cannot list '{}'", path.display()))?;
        names.sort_by(|a, b| a.as_bytes().cmp(b.as_bytes()));
        for name in names {
            let child = path.join(&name);
            let len = rel.len();
            if len > 0 {
                rel.push(b'/');
            }
            rel.extend_from_slice(name.as_bytes());
            self.entry(child, rel)?;
            rel.truncate(len);
        }
        Ok(())
    }

    fn entry(&mut self, path: PathBuf, rel: &mut Vec<u8>) -> Result<()> {
        let md = match fs::symlink_metadata(&path) {
            Ok(md) => md,
            // Removed since the directory was listed.
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                warn!("'{}' vanished while the tree was read", path.display());
                return Ok(());
            }
            Err(e) => return Err(e).with_context(|| format!("cannot read '{}'", path.display())),
        };
        if self.exclude == Some((md.dev(), md.ino())) {
            return Ok(());
        }
        let ft = md.file_type();
        if ft.is_dir() {
            return self.dir(path, rel, &md);
        }
        if ft.is_socket() {
            warn!("leaving out the socket '{}'", path.display());
            return Ok(());
        }
        let meta = meta_of(&path, &md)?;
        let failed = || format!("cannot pack '{}'", path.display());
        if md.nlink() > 1 {
            let key = (md.dev(), md.ino());
            if let Some(target) = self.links.get(&key) {
                return self
                    .out
                    .append(rel, Kind::HardLink { target }, &meta, None)
                    .with_context(failed);
            }
            self.links.insert(key, rel.clone());
        }
        if ft.is_file() {
            let mut f = File::options()
                .read(true)
                .custom_flags(libc::O_NOFOLLOW)
                .open(&path)
                .with_context(failed)?;
            let size = md.len();
            self.out
                .append(
                    rel,
                    Kind::File { size },
                    &meta,
                    Some(&mut f as &mut dyn Read),
                )
                .with_context(failed)
        } else if ft.is_symlink() {
            let target = fs::read_link(&path).with_context(failed)?;
            self.out
                .append(
                    rel,
                    Kind::Symlink {
                        target: target.as_os_str().as_bytes(),
                    },
                    &meta,
                    None,
                )
                .with_context(failed)
        } else if ft.is_char_device() || ft.is_block_device() {
            let rdev = md.rdev();
            let (major, minor) = (libc::major(rdev), libc::minor(rdev));
            let kind = if ft.is_char_device() {
                Kind::Char { major, minor }
            } else {
                Kind::Block { major, minor }
            };
            self.out.append(rel, kind, &meta, None).with_context(failed)
        } else if ft.is_fifo() {
            self.out
                .append(rel, Kind::Fifo, &meta, None)
                .with_context(failed)
        } else {
            warn!("leaving out '{}' of an unknown file type", path.display());
            Ok(())
        }
    }
}

fn meta_of(path: &Path, md: &Metadata) -> Result<Meta> {
    Ok(Meta {
        mode: md.mode() & 0o7777,
        uid: md.uid(),
        gid: md.gid(),
        mtime: md.mtime(),
        xattrs: xattrs_of(path)?,
    })
}

/// The xattrs of `path` (not following a symlink), sorted by name.
fn xattrs_of(path: &Path) -> Result<Vec<(Vec<u8>, Vec<u8>)>> {
    let names = match xattr::list(path) {
        Ok(n) => n,
        Err(e) if unsupported(&e) => return Ok(Vec::new()),
        Err(e) => {
            return Err(e)
                .with_context(|| format!("cannot list the xattrs of '{}'", path.display()))
        }
    };
    let mut out = Vec::new();
    for name in names {
        match xattr::get(path, &name) {
            Ok(Some(v)) => out.push((name.as_bytes().to_vec(), v)),
            Ok(None) => {}
            Err(e) if unsupported(&e) => {}
            Err(e) => {
                return Err(e).with_context(|| {
                    format!(
                        "cannot read the xattr {:?} of '{}'",
                        OsStr::new(&name),
                        path.display()
                    )
                })
            }
        }
    }
    out.sort();
    Ok(out)
}

fn unsupported(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::ENOTSUP) | Some(libc::ENODATA))
}
