//! Extracts the rootfs tarball onto the freshly made root filesystem.
//!
//! The tarball comes straight off the network through a decompressor, so
//! entries are written as they are read and nothing is held whole in memory.
//! The `tar` crate parses the stream (GNU long names, PAX records, sparse
//! files) and creates and fills regular files. Everything else a faithful
//! copy of a root filesystem needs, and that `tar::Archive::unpack` does not
//! do, is done here:
//! - paths that would land outside the root are refused, not skipped or
//!   stripped, and symlinks are never followed while extracting;
//! - device nodes and fifos (the crate would write them as empty files);
//! - numeric owners, full modes, mtimes and xattrs on every kind of entry,
//!   with directories' metadata applied last (creating their entries changes
//!   their mtimes);
//! - PAX records re-read by their length prefix when the crate cannot parse
//!   them (tar 0.4 splits records at newlines, which mangles binary values
//!   such as capabilities holding a 0x0a byte);
//! - errors that say what went wrong: a truncated download, a stream that is
//!   not a tar, a volume too small.

use std::borrow::Cow;
use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::error::Error as StdError;
use std::ffi::{OsStr, OsString};
use std::fs::{self, File, OpenOptions, Permissions};
use std::io::{self, Read};
use std::os::fd::AsRawFd;
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::rc::Rc;

use anyhow::{anyhow, bail, Context, Result};
use nix::sys::stat::{futimens, makedev, mknod, utimensat, Mode, SFlag, UtimensatFlags};
use nix::sys::time::TimeSpec;
use tar::{Archive, Entry, EntryType, Header};
use tracing::{debug, info, warn};
use xattr::FileExt as _;

/// What [`extract`] wrote.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ExtractSummary {
    /// Entries extracted (directories, files, links, nodes).
    pub entries: u64,
    /// Regular files among them.
    pub files: u64,
    /// Regular-file payload written, in bytes.
    pub bytes: u64,
}

const BLOCK: usize = 512;
const DEBUG_EVERY: u64 = 10_000;
/// Most bytes of extension headers (PAX, GNU long names) kept per entry for
/// re-reading PAX records; real ones are a few KiB.
const CAPTURE_LIMIT: usize = 1 << 20;
/// Entry types this module knows (others are extracted as regular files).
const KNOWN_TYPES: &[u8] = b"01234567xgLKSDV";

/// Extracts the tar stream `reader` into the directory `root`, preserving
/// owners, modes, times, links, device nodes and xattrs.
///
/// Reads `reader` to its end, past the end-of-archive marker, so that a
/// decompressor or digest wrapped around the download sees all of it.
pub fn extract(reader: impl Read, root: &Path) -> Result<ExtractSummary> {
    let stream = Rc::new(StreamState::default());
    let mut archive = Archive::new(TrackedReader {
        inner: reader,
        state: Rc::clone(&stream),
    });
    // Owners, modes, times and xattrs are applied here, the same way for every
    // kind of entry and from PAX records read correctly.
    archive.set_preserve_ownerships(false);
    archive.set_preserve_permissions(false);
    archive.set_preserve_mtime(false);
    archive.set_unpack_xattrs(false);
    archive.set_overwrite(true);

    let mut ex = Extractor {
        root,
        dirs: HashMap::new(),
        summary: ExtractSummary::default(),
    };
    let mut last: Option<String> = None;
    let entries = archive
        .entries()
        .context("cannot read the rootfs tarball")?;
    for entry in entries {
        let mut entry = entry.map_err(|e| stream_error(e, &stream, last.as_deref()))?;
        let blocks = stream.take_capture(entry.raw_header_position());
        let data_start = stream.pos.get();
        // Where the next entry's extension headers start: past this entry's
        // data as stored (a sparse file's stored size, not its real one).
        let stored = if entry.header().entry_type().is_gnu_sparse() {
            entry.header().entry_size().unwrap_or(0)
        } else {
            entry.size()
        };
        stream
            .capture_from(data_start.saturating_add(stored.div_ceil(BLOCK as u64) * BLOCK as u64));

        let tar_name = lossy(&entry.path_bytes());
        let info = entry_info(&mut entry, blocks.as_deref())
            .map_err(|e| entry_error(e, &stream, &tar_name, ex.summary.bytes))?;
        let name = lossy(&info.path);
        let result = ex.entry(&mut entry, info, &name);
        result.map_err(|e| {
            let partial = stream.pos.get().saturating_sub(data_start);
            entry_error(e, &stream, &name, ex.summary.bytes + partial)
        })?;
        last = Some(name);
    }

    if stream.eof.get() {
        return Err(match last {
            Some(name) => anyhow!(
                "the rootfs tarball is truncated (it ends after tar entry '{name}', without the end-of-archive marker)"
            ),
            None => anyhow!("the rootfs tarball is truncated (it is empty)"),
        });
    }
    if ex.summary.entries == 0 {
        bail!("the rootfs tarball holds no entries");
    }
    ex.finish().map_err(|e| {
        if is_volume_full(&e) {
            volume_full(ex.summary.bytes, None)
        } else {
            e
        }
    })?;
    let mut rest = archive.into_inner();
    io::copy(&mut rest, &mut io::sink()).map_err(|e| {
        reader_failure(&stream, "after its end-of-archive marker")
            .unwrap_or_else(|| anyhow!(e).context("cannot read the end of the rootfs tarball"))
    })?;

    let s = ex.summary;
    info!(
        "rootfs extracted: {} entries, {} regular files, {} bytes",
        s.entries, s.files, s.bytes
    );
    Ok(s)
}

/// A tar entry that would escape the root filesystem.
#[derive(Debug, thiserror::Error)]
#[error("refusing tar entry '{entry}': {reason}")]
struct Refused {
    entry: String,
    reason: String,
}

fn refused(entry: &str, reason: impl Into<String>) -> anyhow::Error {
    Refused {
        entry: entry.to_string(),
        reason: reason.into(),
    }
    .into()
}

fn lossy(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

// ---------------------------------------------------------------------------
// The stream: position, end of file, reader errors, raw extension headers.

/// What the extractor learns about the stream beneath the tar parser, which
/// reports all of it as plain I/O errors.
#[derive(Default)]
struct StreamState {
    pos: Cell<u64>,
    /// The reader hit its end; inside the archive that means truncation.
    eof: Cell<bool>,
    /// The reader's own error (network, decompressor), kept whole so that
    /// callers can tell a failed download from a bad archive.
    reader_error: RefCell<Option<io::Error>>,
    /// Stream offset from which bytes are kept: the start of the next
    /// entry's extension headers.
    capture_from: Cell<u64>,
    captured: RefCell<Vec<u8>>,
    capture_lost: Cell<bool>,
}

impl StreamState {
    fn capture_from(&self, offset: u64) {
        self.captured.borrow_mut().clear();
        self.capture_lost.set(offset < self.pos.get());
        self.capture_from.set(offset);
    }

    /// The raw extension headers and header of the entry whose header is at
    /// `header_pos`, if they were all kept.
    fn take_capture(&self, header_pos: u64) -> Option<Vec<u8>> {
        let mut captured = std::mem::take(&mut *self.captured.borrow_mut());
        let start = self.capture_from.get();
        if self.capture_lost.replace(false) || header_pos < start {
            return None;
        }
        let len = usize::try_from(header_pos - start)
            .ok()?
            .checked_add(BLOCK)?;
        if captured.len() < len {
            return None;
        }
        captured.truncate(len);
        Some(captured)
    }
}

struct TrackedReader<R> {
    inner: R,
    state: Rc<StreamState>,
}

impl<R: Read> Read for TrackedReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let st = &self.state;
        let n = loop {
            match self.inner.read(buf) {
                Ok(n) => break n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    let stand_in = io::Error::new(e.kind(), e.to_string());
                    st.reader_error.borrow_mut().get_or_insert(e);
                    return Err(stand_in);
                }
            }
        };
        if n == 0 && !buf.is_empty() {
            st.eof.set(true);
        }
        let start = st.pos.get();
        let end = start + n as u64;
        let from = st.capture_from.get();
        if end > from && !st.capture_lost.get() {
            let skip = usize::try_from(from.saturating_sub(start)).unwrap_or(n);
            let mut captured = st.captured.borrow_mut();
            if captured.len() + (n - skip) > CAPTURE_LIMIT {
                captured.clear();
                st.capture_lost.set(true);
            } else {
                captured.extend_from_slice(&buf[skip..n]);
            }
        }
        st.pos.set(end);
        Ok(n)
    }
}

// ---------------------------------------------------------------------------
// Errors.

/// An error from the tar parser between entries.
fn stream_error(err: io::Error, stream: &StreamState, last: Option<&str>) -> anyhow::Error {
    let place = match last {
        Some(name) => format!("after tar entry '{name}'"),
        None => "at its start".to_string(),
    };
    if let Some(e) = reader_failure(stream, &place) {
        return e;
    }
    let eof = stream.eof.get() || err.kind() == io::ErrorKind::UnexpectedEof;
    if last.is_none() {
        let captured = stream.captured.borrow();
        if stream.pos.get() == 0 && eof {
            return anyhow!("the rootfs tarball is truncated (it is empty)");
        }
        if !formats::is_ustar(&captured) {
            return anyhow!(
                "the rootfs is not a tar archive ({})",
                formats::describe_start(&captured)
            );
        }
    }
    if eof {
        return anyhow!("the rootfs tarball is truncated (it ends {place})");
    }
    anyhow!("the rootfs tarball is corrupt {place}: {err}")
}

/// An error while extracting one entry.
fn entry_error(
    err: anyhow::Error,
    stream: &StreamState,
    name: &str,
    written: u64,
) -> anyhow::Error {
    if err.is::<Refused>() {
        return err;
    }
    if is_volume_full(&err) {
        return volume_full(written, Some(name));
    }
    if let Some(e) = reader_failure(stream, &format!("inside tar entry '{name}'")) {
        return e;
    }
    if stream.eof.get() {
        return anyhow!("the rootfs tarball is truncated (it ends inside tar entry '{name}')");
    }
    err.context(format!("cannot extract tar entry '{name}'"))
}

fn volume_full(written: u64, name: Option<&str>) -> anyhow::Error {
    let at = name
        .map(|n| format!(", at tar entry '{n}'"))
        .unwrap_or_default();
    anyhow!(
        "the volume is full: the rootfs does not fit ({written} bytes written so far{at}); build with a larger volume size"
    )
}

/// The reader's own error, if it failed, with the original error (say a
/// download error) in the chain.
fn reader_failure(stream: &StreamState, place: &str) -> Option<anyhow::Error> {
    let original = stream.reader_error.borrow_mut().take()?;
    let truncated = original.kind() == io::ErrorKind::UnexpectedEof;
    // Kept as is: a download error sits in its payload's source chain.
    let source = anyhow::Error::from(original);
    Some(if truncated {
        source.context(format!(
            "the rootfs tarball is truncated (the stream broke off {place})"
        ))
    } else {
        source.context(format!("cannot read the rootfs tarball {place}"))
    })
}

/// ENOSPC anywhere in the chain, including inside `io::Error`s that wrap
/// other errors (as the tar crate's do).
fn is_volume_full(err: &anyhow::Error) -> bool {
    fn walk(mut cur: Option<&(dyn StdError + 'static)>) -> bool {
        while let Some(e) = cur {
            if let Some(io) = e.downcast_ref::<io::Error>() {
                if io.kind() == io::ErrorKind::StorageFull
                    || io.raw_os_error() == Some(libc::ENOSPC)
                {
                    return true;
                }
                if let Some(inner) = io.get_ref() {
                    if walk(Some(inner as &(dyn StdError + 'static))) {
                        return true;
                    }
                }
            }
            cur = e.source();
        }
        false
    }
    walk(Some(&**err as &(dyn StdError + 'static)))
}

// ---------------------------------------------------------------------------
// Entry metadata.

/// What one entry asks for, with PAX records applied.
struct EntryInfo {
    path: Vec<u8>,
    link: Option<Vec<u8>>,
    meta: Meta,
}

/// Owner, mode, mtime and xattrs of one inode.
struct Meta {
    uid: u32,
    gid: u32,
    mode: u32,
    mtime: TimeSpec,
    xattrs: Vec<(OsString, Vec<u8>)>,
}

type Records = Vec<(Vec<u8>, Vec<u8>)>;

fn entry_info<R: Read>(entry: &mut Entry<'_, R>, blocks: Option<&[u8]>) -> Result<EntryInfo> {
    let tar_records = match entry.pax_extensions()? {
        None => Some(Vec::new()),
        Some(exts) => exts
            .map(|r| r.map(|e| (e.key_bytes().to_vec(), e.value_bytes().to_vec())))
            .collect::<io::Result<Records>>()
            .ok(),
    };
    let header = entry.header();
    let (records, path, link, uid, gid) = match tar_records {
        Some(records) => {
            let path = entry.path_bytes().into_owned();
            let link = entry.link_name_bytes().map(Cow::into_owned);
            (records, path, link, header.uid()?, header.gid()?)
        }
        None => {
            // The crate could not parse the PAX records: a value holds a
            // newline. Read them by their length prefix from the raw bytes and
            // take path, link, owner from them rather than from the crate.
            let raw = blocks
                .and_then(RawExtensions::parse)
                .context("its PAX header cannot be parsed")?;
            let records =
                formats::pax::parse_records(raw.pax.context("its PAX header cannot be parsed")?)
                    .context("its PAX header cannot be parsed")?;
            let find = |key: &[u8]| {
                records
                    .iter()
                    .find(|(k, _)| k == key)
                    .map(|(_, v)| v.as_slice())
            };
            let number = |key: &[u8], default: u64| -> Result<u64> {
                find(key).map_or(Ok(default), |v| {
                    std::str::from_utf8(v)
                        .ok()
                        .and_then(|s| s.parse().ok())
                        .with_context(|| format!("its PAX record '{}' is not a number", lossy(key)))
                })
            };
            let size = number(b"size", raw.header.entry_size()?)?;
            if !header.entry_type().is_gnu_sparse() && size != entry.size() {
                bail!("its PAX header is ambiguous: the tar parser read a different size from it");
            }
            // GNU long names are not PAX records: the crate read those right.
            let path = if raw.long_name {
                entry.path_bytes().into_owned()
            } else {
                find(b"path").map_or_else(|| raw.header.path_bytes().into_owned(), <[u8]>::to_vec)
            };
            let link = if raw.long_link {
                entry.link_name_bytes().map(Cow::into_owned)
            } else {
                find(b"linkpath")
                    .map(<[u8]>::to_vec)
                    .or_else(|| raw.header.link_name_bytes().map(Cow::into_owned))
            };
            let uid = number(b"uid", raw.header.uid()?)?;
            let gid = number(b"gid", raw.header.gid()?)?;
            (records, path, link, uid, gid)
        }
    };
    let mtime = records
        .iter()
        .find(|(k, _)| k == b"mtime")
        .and_then(|(_, v)| parse_pax_time(v));
    let mtime = match mtime {
        Some(t) => t,
        None => TimeSpec::new(header.mtime()? as i64, 0),
    };
    let xattrs = records
        .into_iter()
        .filter_map(|(k, v)| {
            let name = k.strip_prefix(formats::pax::XATTR_PREFIX)?;
            Some((OsString::from_vec(name.to_vec()), v))
        })
        .collect();
    let meta = Meta {
        uid: u32::try_from(uid).map_err(|_| anyhow!("its uid {uid} is out of range"))?,
        gid: u32::try_from(gid).map_err(|_| anyhow!("its gid {gid} is out of range"))?,
        mode: header.mode()? & 0o7777,
        mtime,
        xattrs,
    };
    Ok(EntryInfo { path, link, meta })
}

/// The extension headers before an entry, as stored in the stream.
struct RawExtensions<'a> {
    header: &'a Header,
    pax: Option<&'a [u8]>,
    long_name: bool,
    long_link: bool,
}

impl<'a> RawExtensions<'a> {
    /// `blocks`: the extension headers with their data, then the entry's own
    /// header.
    fn parse(blocks: &'a [u8]) -> Option<Self> {
        let header_at = blocks.len().checked_sub(BLOCK)?;
        let mut ext = RawExtensions {
            header: Header::from_byte_slice(&blocks[header_at..]),
            pax: None,
            long_name: false,
            long_link: false,
        };
        let mut at = 0;
        while at < header_at {
            let h = Header::from_byte_slice(blocks.get(at..at + BLOCK)?);
            let size = usize::try_from(h.entry_size().ok()?).ok()?;
            let data = blocks.get(at + BLOCK..(at + BLOCK).checked_add(size)?)?;
            match h.entry_type() {
                EntryType::XHeader => ext.pax = Some(data),
                EntryType::GNULongName => ext.long_name = true,
                EntryType::GNULongLink => ext.long_link = true,
                _ => return None,
            }
            at += BLOCK + size.div_ceil(BLOCK) * BLOCK;
        }
        (at == header_at).then_some(ext)
    }
}

/// A PAX time as a timespec (see [`formats::pax::parse_time`]).
fn parse_pax_time(value: &[u8]) -> Option<TimeSpec> {
    let (secs, nanos) = formats::pax::parse_time(value)?;
    Some(TimeSpec::new(secs, i64::from(nanos)))
}

// ---------------------------------------------------------------------------
// Writing entries.

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Dir,
    File,
    Symlink,
    HardLink,
    Node(SFlag),
    Skip,
}

impl Kind {
    fn of(t: EntryType, path: &[u8]) -> Kind {
        match t {
            EntryType::Directory => Kind::Dir,
            // Old tars mark directories by a trailing slash alone.
            EntryType::Regular | EntryType::Continuous if path.ends_with(b"/") => Kind::Dir,
            EntryType::Regular | EntryType::Continuous | EntryType::GNUSparse => Kind::File,
            EntryType::Symlink => Kind::Symlink,
            EntryType::Link => Kind::HardLink,
            EntryType::Char => Kind::Node(SFlag::S_IFCHR),
            EntryType::Block => Kind::Node(SFlag::S_IFBLK),
            EntryType::Fifo => Kind::Node(SFlag::S_IFIFO),
            EntryType::XGlobalHeader
            | EntryType::XHeader
            | EntryType::GNULongName
            | EntryType::GNULongLink => Kind::Skip,
            other => match other.as_byte() {
                b'D' => Kind::Dir,  // GNU dumpdir
                b'V' => Kind::Skip, // GNU volume label
                // As GNU tar does: unknown types are extracted as files.
                _ => Kind::File,
            },
        }
    }
}

/// The path under the root that tar path bytes name, or `None` if they are
/// absolute or hold a `..` component. Empty for the root itself.
fn relative(bytes: &[u8]) -> Option<PathBuf> {
    if bytes.starts_with(b"/") {
        return None;
    }
    let mut rel = PathBuf::new();
    for part in bytes.split(|&b| b == b'/') {
        match part {
            b"" | b"." => {}
            b".." => return None,
            part => rel.push(OsStr::from_bytes(part)),
        }
    }
    Some(rel)
}

struct Extractor<'r> {
    root: &'r Path,
    /// Directories' metadata, applied at the end, deepest first: creating
    /// entries inside a directory changes its mtime.
    dirs: HashMap<PathBuf, Meta>,
    summary: ExtractSummary,
}

impl Extractor<'_> {
    fn entry<R: Read>(
        &mut self,
        entry: &mut Entry<'_, R>,
        info: EntryInfo,
        name: &str,
    ) -> Result<()> {
        let kind = Kind::of(entry.header().entry_type(), &info.path);
        if kind == Kind::Skip {
            debug!(
                "skipping tar entry '{name}' of type {:?}",
                entry.header().entry_type()
            );
            return Ok(());
        }
        let type_byte = entry.header().entry_type().as_byte();
        if !KNOWN_TYPES.contains(&type_byte) {
            warn!(
                "tar entry '{name}' has the unknown type {:?}; extracting it as a regular file",
                type_byte as char
            );
        }
        let rel = relative(&info.path)
            .ok_or_else(|| refused(name, "it would be written outside the root filesystem"))?;
        if rel.as_os_str().is_empty() && kind != Kind::Dir {
            return Err(refused(name, "it would replace the root directory"));
        }
        self.check_parents(&rel, true, |link| {
            refused(
                name,
                format!(
                    "it would be written through the symbolic link '{}', which could lead outside the root filesystem",
                    link.display()
                ),
            )
        })?;
        let dst = self.root.join(&rel);
        let meta = info.meta;
        match kind {
            Kind::Dir => self.directory(rel, &dst, meta)?,
            Kind::File => {
                self.make_room(&rel, &dst)?;
                let tar::Unpacked::File(file) = entry.unpack(&dst)? else {
                    bail!("the tar crate did not write it as a regular file");
                };
                apply_to_file(&file, &meta)?;
                self.summary.files += 1;
                self.summary.bytes += entry.size();
            }
            Kind::Symlink => {
                let target = info
                    .link
                    .filter(|t| !t.is_empty())
                    .context("the symbolic link has no target")?;
                self.make_room(&rel, &dst)?;
                std::os::unix::fs::symlink(OsStr::from_bytes(&target), &dst)
                    .context("cannot create the symbolic link")?;
                std::os::unix::fs::lchown(&dst, Some(meta.uid), Some(meta.gid))
                    .context("cannot set the symbolic link's owner")?;
                for (key, value) in &meta.xattrs {
                    // The kernel refuses user.* xattrs on symlinks; GNU tar warns too.
                    if let Err(e) = xattr::set(&dst, key, value) {
                        warn!("tar entry '{name}': cannot set xattr {key:?} on the symbolic link: {e}");
                    }
                }
                set_times_nofollow(&dst, meta.mtime)?;
            }
            Kind::HardLink => self.hard_link(&rel, &dst, info.link, name)?,
            Kind::Node(sflag) => {
                let dev = if sflag == SFlag::S_IFIFO {
                    0
                } else {
                    let h = entry.header();
                    let major = h
                        .device_major()?
                        .context("the device entry has no major number")?;
                    let minor = h
                        .device_minor()?
                        .context("the device entry has no minor number")?;
                    makedev(major.into(), minor.into())
                };
                self.make_room(&rel, &dst)?;
                mknod(&dst, sflag, Mode::from_bits_truncate(0o600), dev)
                    .map_err(io::Error::from)
                    .context("cannot create the node")?;
                std::os::unix::fs::lchown(&dst, Some(meta.uid), Some(meta.gid))
                    .context("cannot set the owner")?;
                // After chown, which clears setuid/setgid; the path is the node
                // just made, not a symlink.
                fs::set_permissions(&dst, Permissions::from_mode(meta.mode))
                    .context("cannot set the mode")?;
                for (key, value) in &meta.xattrs {
                    xattr::set(&dst, key, value)
                        .with_context(|| format!("cannot set xattr {key:?}"))?;
                }
                set_times_nofollow(&dst, meta.mtime)?;
            }
            Kind::Skip => unreachable!("skipped above"),
        }
        self.summary.entries += 1;
        if self.summary.entries.is_multiple_of(DEBUG_EVERY) {
            debug!(
                "extracting the rootfs: {} entries, {} bytes so far",
                self.summary.entries, self.summary.bytes
            );
        }
        Ok(())
    }

    /// Walks the parents of `rel` from the root, refusing symlinks (checked
    /// on disk: an earlier entry may have made one) and creating missing
    /// directories if `create`.
    fn check_parents(
        &self,
        rel: &Path,
        create: bool,
        through_symlink: impl Fn(&Path) -> anyhow::Error,
    ) -> Result<()> {
        let Some(parent) = rel.parent() else {
            return Ok(());
        };
        let mut path = self.root.to_path_buf();
        let mut shown = PathBuf::new();
        for part in parent.components() {
            path.push(part);
            shown.push(part);
            match fs::symlink_metadata(&path) {
                Ok(m) if m.is_dir() => {}
                Ok(m) if m.file_type().is_symlink() => return Err(through_symlink(&shown)),
                Ok(_) => bail!("'{}' is not a directory", shown.display()),
                Err(e) if e.kind() == io::ErrorKind::NotFound && create => fs::create_dir(&path)
                    .with_context(|| format!("cannot create directory '{}'", shown.display()))?,
                Err(e) if e.kind() == io::ErrorKind::NotFound => {
                    bail!("'{}' does not exist", shown.display())
                }
                Err(e) => {
                    return Err(e).with_context(|| format!("cannot examine '{}'", shown.display()))
                }
            }
        }
        Ok(())
    }

    /// Removes whatever is at `dst` (never following a symlink there), as GNU
    /// tar does before writing a non-directory.
    fn make_room(&mut self, rel: &Path, dst: &Path) -> Result<()> {
        match fs::symlink_metadata(dst) {
            Ok(m) if m.is_dir() => {
                fs::remove_dir(dst).context("cannot replace the existing directory")?;
                self.dirs.remove(rel);
            }
            Ok(_) => fs::remove_file(dst).context("cannot replace the existing file")?,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e).context("cannot examine the existing file"),
        }
        Ok(())
    }

    fn directory(&mut self, rel: PathBuf, dst: &Path, meta: Meta) -> Result<()> {
        if !rel.as_os_str().is_empty() {
            match fs::symlink_metadata(dst) {
                Ok(m) if m.is_dir() => {}
                Ok(_) => {
                    fs::remove_file(dst).context("cannot replace the existing file")?;
                    fs::create_dir(dst).context("cannot create the directory")?;
                }
                Err(e) if e.kind() == io::ErrorKind::NotFound => {
                    fs::create_dir(dst).context("cannot create the directory")?;
                }
                Err(e) => return Err(e).context("cannot examine the existing file"),
            }
        }
        self.dirs.insert(rel, meta);
        Ok(())
    }

    fn hard_link(
        &mut self,
        rel: &Path,
        dst: &Path,
        target: Option<Vec<u8>>,
        name: &str,
    ) -> Result<()> {
        let target = target
            .filter(|t| !t.is_empty())
            .context("the hard link has no target")?;
        let shown = lossy(&target);
        let target_rel = relative(&target).ok_or_else(|| {
            refused(
                name,
                format!("its hard link target '{shown}' is outside the root filesystem"),
            )
        })?;
        if target_rel.as_os_str().is_empty() {
            bail!("its hard link target '{shown}' is the root directory");
        }
        self.check_parents(&target_rel, false, |link| {
            refused(
                name,
                format!(
                    "its hard link target '{shown}' goes through the symbolic link '{}', which could lead outside the root filesystem",
                    link.display()
                ),
            )
        })?;
        let src = self.root.join(&target_rel);
        let src_meta = fs::symlink_metadata(&src)
            .with_context(|| format!("its hard link target '{shown}' does not exist"))?;
        if src_meta.is_dir() {
            bail!("its hard link target '{shown}' is a directory");
        }
        if target_rel == rel {
            return Ok(());
        }
        if let Ok(m) = fs::symlink_metadata(dst) {
            if m.dev() == src_meta.dev() && m.ino() == src_meta.ino() {
                return Ok(());
            }
        }
        self.make_room(rel, dst)?;
        // linkat without AT_SYMLINK_FOLLOW: a symlink target is linked itself.
        fs::hard_link(&src, dst).context("cannot create the hard link")
    }

    fn finish(&mut self) -> Result<()> {
        let mut dirs: Vec<(PathBuf, Meta)> = self.dirs.drain().collect();
        dirs.sort_by_key(|(rel, _)| std::cmp::Reverse(rel.components().count()));
        for (rel, meta) in dirs {
            let path = self.root.join(&rel);
            let shown = if rel.as_os_str().is_empty() {
                ".".to_string()
            } else {
                rel.display().to_string()
            };
            // O_NOFOLLOW: entries are checked as they come, this is the last
            // guard against writing metadata through a symlink.
            let dir = OpenOptions::new()
                .read(true)
                .custom_flags(libc::O_DIRECTORY | libc::O_NOFOLLOW)
                .open(&path)
                .with_context(|| format!("cannot open directory '{shown}'"))?;
            apply_to_file(&dir, &meta).with_context(|| format!("directory '{shown}'"))?;
        }
        Ok(())
    }
}

/// Owner, then mode (chown clears setuid/setgid), then xattrs (chown clears
/// security.capability), then mtime.
fn apply_to_file(file: &File, meta: &Meta) -> Result<()> {
    std::os::unix::fs::fchown(file, Some(meta.uid), Some(meta.gid))
        .with_context(|| format!("cannot set the owner to {}:{}", meta.uid, meta.gid))?;
    file.set_permissions(Permissions::from_mode(meta.mode))
        .with_context(|| format!("cannot set the mode to {:o}", meta.mode))?;
    for (key, value) in &meta.xattrs {
        file.set_xattr(key, value)
            .with_context(|| format!("cannot set xattr {key:?}"))?;
    }
    futimens(file.as_raw_fd(), &meta.mtime, &meta.mtime)
        .map_err(io::Error::from)
        .context("cannot set the mtime")
}

fn set_times_nofollow(path: &Path, mtime: TimeSpec) -> Result<()> {
    utimensat(None, path, &mtime, &mtime, UtimensatFlags::NoFollowSymlink)
        .map_err(io::Error::from)
        .context("cannot set the mtime")
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::FileTypeExt;

    use tar::{Builder, EntryType, Header};

    use super::*;

    /// cap_net_raw+ep, a v2 capability.
    const CAP_NET_RAW: [u8; 20] = [
        1, 0, 0, 2, 0, 0x20, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
    ];
    /// cap_dac_override,cap_fowner+ep: holds 0x0a, which the tar crate cannot
    /// parse in a PAX record.
    const CAP_NEWLINE: [u8; 20] = [
        1, 0, 0, 2, 0x0a, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
    ];

    fn is_root() -> bool {
        let root = nix::unistd::geteuid().is_root();
        if !root {
            eprintln!("skipped: needs root (chown, mknod, security.* xattrs, mount)");
        }
        root
    }

    fn header(kind: EntryType, mode: u32, uid: u64, gid: u64, mtime: u64) -> Header {
        let mut h = Header::new_gnu();
        h.set_entry_type(kind);
        h.set_mode(mode);
        h.set_uid(uid);
        h.set_gid(gid);
        h.set_mtime(mtime);
        h.set_size(0);
        h
    }

    /// One PAX record, `<length> <key>=<value>\n`.
    fn pax_record(key: &str, value: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        formats::pax::write_record(&mut out, key.as_bytes(), value);
        out
    }

    struct Tar(Builder<Vec<u8>>);

    impl Tar {
        fn new() -> Self {
            Tar(Builder::new(Vec::new()))
        }
        fn dir(&mut self, path: &str, mode: u32, uid: u64, gid: u64, mtime: u64) {
            let mut h = header(EntryType::Directory, mode, uid, gid, mtime);
            self.0.append_data(&mut h, path, io::empty()).unwrap();
        }
        fn file(&mut self, path: &str, mode: u32, uid: u64, gid: u64, mtime: u64, data: &[u8]) {
            let mut h = header(EntryType::Regular, mode, uid, gid, mtime);
            h.set_size(data.len() as u64);
            self.0.append_data(&mut h, path, data).unwrap();
        }
        fn symlink(&mut self, path: &str, target: &str, uid: u64, gid: u64, mtime: u64) {
            let mut h = header(EntryType::Symlink, 0o777, uid, gid, mtime);
            self.0.append_link(&mut h, path, target).unwrap();
        }
        fn hardlink(&mut self, path: &str, target: &str) {
            let mut h = header(EntryType::Link, 0o644, 0, 0, 1_600_000_000);
            self.0.append_link(&mut h, path, target).unwrap();
        }
        #[allow(clippy::too_many_arguments)]
        fn node(
            &mut self,
            path: &str,
            kind: EntryType,
            major: u32,
            minor: u32,
            mode: u32,
            gid: u64,
            mtime: u64,
        ) {
            let mut h = header(kind, mode, 0, gid, mtime);
            h.set_device_major(major).unwrap();
            h.set_device_minor(minor).unwrap();
            self.0.append_data(&mut h, path, io::empty()).unwrap();
        }
        /// A PAX extended header for the next entry.
        fn pax(&mut self, records: &[(&str, &[u8])]) {
            let data: Vec<u8> = records.iter().flat_map(|(k, v)| pax_record(k, v)).collect();
            let mut h = Header::new_ustar();
            h.set_entry_type(EntryType::XHeader);
            h.set_path("PaxHeaders/entry").unwrap();
            h.set_mode(0o644);
            h.set_size(data.len() as u64);
            h.set_cksum();
            self.0.append(&h, &data[..]).unwrap();
        }
        /// An entry whose name and link name go into the header unchecked.
        fn raw(&mut self, kind: EntryType, name: &[u8], link: &[u8], data: &[u8]) {
            let mut h = header(kind, 0o644, 0, 0, 1_600_000_000);
            h.set_size(data.len() as u64);
            let old = h.as_old_mut();
            old.name[..name.len()].copy_from_slice(name);
            old.linkname[..link.len()].copy_from_slice(link);
            h.set_cksum();
            self.0.append(&h, data).unwrap();
        }
        /// The archive without its end-of-archive marker.
        fn unfinished(self) -> Vec<u8> {
            let len = self.0.get_ref().len();
            let mut v = self.bytes();
            v.truncate(len);
            v
        }
        fn bytes(self) -> Vec<u8> {
            self.0.into_inner().unwrap()
        }
    }

    fn lstat(root: &Path, rel: &str) -> fs::Metadata {
        fs::symlink_metadata(root.join(rel)).unwrap_or_else(|e| panic!("{rel}: {e}"))
    }

    #[track_caller]
    fn assert_inode(root: &Path, rel: &str, ifmt: u32, mode: u32, uid: u32, gid: u32, mtime: i64) {
        let m = lstat(root, rel);
        assert_eq!(m.mode() & libc::S_IFMT, ifmt, "{rel}: file type");
        if ifmt != libc::S_IFLNK {
            assert_eq!(m.mode() & 0o7777, mode, "{rel}: mode {:o}", m.mode());
        }
        assert_eq!((m.uid(), m.gid()), (uid, gid), "{rel}: owner");
        assert_eq!(m.mtime(), mtime, "{rel}: mtime");
    }

    fn xattr_of(root: &Path, rel: &str, name: &str) -> Option<Vec<u8>> {
        xattr::get(root.join(rel), name).unwrap()
    }

    #[test]
    fn extracts_every_kind_of_entry() {
        if !is_root() {
            return;
        }
        let long_gnu = format!("long/{}", "g".repeat(195));
        let long_pax = format!("long/{}", "p".repeat(195));
        let long_target = format!("/opt/{}", "t".repeat(150));
        let long_pax_target = format!("../{}", "q".repeat(200));
        let smuggle = [b"x\n".as_slice(), &pax_record("path", b"../evil")].concat();

        let mut t = Tar::new();
        t.raw(EntryType::Directory, b"./", b"", b"");
        // Out of order: a file before its directories, whose entries come later.
        t.file(
            "opt/app/bin/tool",
            0o750,
            1234,
            5678,
            1_600_000_100,
            b"tool",
        );
        t.dir("private", 0o700, 0, 0, 1_500_000_001);
        t.dir("tmp", 0o1777, 0, 0, 1_500_000_002);
        t.dir("usr", 0o755, 0, 0, 1_500_000_003);
        t.dir("usr/bin", 0o755, 0, 0, 1_500_000_004);
        t.file("usr/bin/su", 0o4755, 0, 0, 1_600_000_001, b"su");
        t.file("usr/bin/sgid", 0o2755, 1234, 5678, 1_600_000_002, b"sgid");
        t.file(
            "usr/bin/suid-user",
            0o4750,
            1234,
            5678,
            1_600_000_003,
            b"suid",
        );
        t.file("usr/bin/a", 0o644, 0, 0, 1_600_000_004, b"shared");
        t.hardlink("usr/bin/b", "usr/bin/a");
        t.symlink("usr/bin/rel", "a", 1234, 5678, 1_600_000_005);
        t.symlink(
            "usr/bin/abs",
            "/usr/bin/imgforge-not-here",
            1234,
            5678,
            1_600_000_006,
        );
        t.symlink("usr/bin/long-target", &long_target, 0, 0, 1_600_000_007);
        t.pax(&[("linkpath", long_pax_target.as_bytes())]);
        t.symlink("usr/bin/pax-target", "short", 0, 0, 1_600_000_008);
        t.node("dev/null", EntryType::Char, 1, 3, 0o666, 0, 1_600_000_009);
        t.node("dev/loop0", EntryType::Block, 7, 0, 0o660, 6, 1_600_000_010);
        t.node(
            "run/initctl",
            EntryType::Fifo,
            0,
            0,
            0o600,
            0,
            1_600_000_011,
        );
        t.pax(&[
            ("SCHILY.xattr.security.capability", &CAP_NET_RAW),
            ("SCHILY.xattr.user.test", b"hello"),
        ]);
        t.file("usr/bin/ping", 0o755, 0, 0, 1_600_000_012, b"ping");
        t.pax(&[
            ("SCHILY.xattr.security.capability", &CAP_NEWLINE),
            ("SCHILY.xattr.user.smuggle", &smuggle),
            ("mtime", b"1600000013.5"),
        ]);
        t.file("usr/bin/nl-cap", 0o755, 0, 0, 1, b"nl-cap");
        t.file(&long_gnu, 0o644, 0, 0, 1_600_000_014, b"gnu long name");
        t.pax(&[("path", long_pax.as_bytes())]);
        t.file("pax-short", 0o644, 0, 0, 1_600_000_015, b"pax long name");
        t.pax(&[
            ("mtime", b"1500000005.25"),
            ("SCHILY.xattr.user.dir", b"on a dir"),
        ]);
        t.dir("opt/app", 0o750, 1234, 5678, 1);
        t.dir("opt", 0o711, 0, 0, 1_500_000_006);
        t.dir("opt/app/bin", 0o755, 1234, 5678, 1_500_000_007);
        let tarball = t.bytes();

        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        let summary = extract(&tarball[..], root).unwrap();
        assert_eq!(summary.entries, 25);
        assert_eq!(summary.files, 9);
        assert_eq!(summary.bytes, 56);

        use libc::{S_IFBLK, S_IFCHR, S_IFDIR, S_IFIFO, S_IFLNK, S_IFREG};
        assert_inode(root, ".", S_IFDIR, 0o644, 0, 0, 1_600_000_000);
        assert_inode(root, "private", S_IFDIR, 0o700, 0, 0, 1_500_000_001);
        assert_inode(root, "tmp", S_IFDIR, 0o1777, 0, 0, 1_500_000_002);
        assert_inode(root, "usr", S_IFDIR, 0o755, 0, 0, 1_500_000_003);
        assert_inode(root, "usr/bin", S_IFDIR, 0o755, 0, 0, 1_500_000_004);
        assert_inode(root, "usr/bin/su", S_IFREG, 0o4755, 0, 0, 1_600_000_001);
        assert_inode(
            root,
            "usr/bin/sgid",
            S_IFREG,
            0o2755,
            1234,
            5678,
            1_600_000_002,
        );
        assert_inode(
            root,
            "usr/bin/suid-user",
            S_IFREG,
            0o4750,
            1234,
            5678,
            1_600_000_003,
        );
        assert_eq!(fs::read(root.join("usr/bin/su")).unwrap(), b"su");

        // Hard links: one inode.
        let (a, b) = (lstat(root, "usr/bin/a"), lstat(root, "usr/bin/b"));
        assert_eq!((a.dev(), a.ino()), (b.dev(), b.ino()));
        assert_eq!(a.nlink(), 2);
        assert_eq!(fs::read(root.join("usr/bin/b")).unwrap(), b"shared");

        // Symlinks: created as they are, with their own owner and mtime.
        assert_inode(root, "usr/bin/rel", S_IFLNK, 0, 1234, 5678, 1_600_000_005);
        assert_eq!(
            fs::read_link(root.join("usr/bin/rel")).unwrap(),
            Path::new("a")
        );
        assert_inode(root, "usr/bin/abs", S_IFLNK, 0, 1234, 5678, 1_600_000_006);
        assert_eq!(
            fs::read_link(root.join("usr/bin/abs")).unwrap(),
            Path::new("/usr/bin/imgforge-not-here")
        );
        assert!(!Path::new("/usr/bin/imgforge-not-here").exists());
        assert_eq!(
            fs::read_link(root.join("usr/bin/long-target")).unwrap(),
            Path::new(&long_target)
        );
        assert_eq!(
            fs::read_link(root.join("usr/bin/pax-target")).unwrap(),
            Path::new(&long_pax_target)
        );

        // Nodes.
        assert_inode(root, "dev/null", S_IFCHR, 0o666, 0, 0, 1_600_000_009);
        assert_eq!(lstat(root, "dev/null").rdev(), makedev(1, 3));
        assert_inode(root, "dev/loop0", S_IFBLK, 0o660, 0, 6, 1_600_000_010);
        assert_eq!(lstat(root, "dev/loop0").rdev(), makedev(7, 0));
        assert_inode(root, "run/initctl", S_IFIFO, 0o600, 0, 0, 1_600_000_011);
        assert!(lstat(root, "run/initctl").file_type().is_fifo());

        // Xattrs, including values the tar crate cannot parse.
        assert_inode(root, "usr/bin/ping", S_IFREG, 0o755, 0, 0, 1_600_000_012);
        assert_eq!(
            xattr_of(root, "usr/bin/ping", "security.capability").as_deref(),
            Some(&CAP_NET_RAW[..])
        );
        assert_eq!(
            xattr_of(root, "usr/bin/ping", "user.test").as_deref(),
            Some(&b"hello"[..])
        );
        assert_eq!(
            xattr_of(root, "usr/bin/nl-cap", "security.capability").as_deref(),
            Some(&CAP_NEWLINE[..])
        );
        assert_eq!(
            xattr_of(root, "usr/bin/nl-cap", "user.smuggle"),
            Some(smuggle.clone())
        );
        assert_eq!(lstat(root, "usr/bin/nl-cap").mtime_nsec(), 500_000_000);
        assert_inode(root, "usr/bin/nl-cap", S_IFREG, 0o755, 0, 0, 1_600_000_013);
        assert!(!dir.path().join("../evil").exists());

        // Long names.
        assert_eq!(fs::read(root.join(&long_gnu)).unwrap(), b"gnu long name");
        assert_eq!(fs::read(root.join(&long_pax)).unwrap(), b"pax long name");
        assert!(!root.join("pax-short").exists());

        // Directories listed after their contents get their metadata at the end.
        assert_inode(root, "opt", S_IFDIR, 0o711, 0, 0, 1_500_000_006);
        assert_inode(root, "opt/app", S_IFDIR, 0o750, 1234, 5678, 1_500_000_005);
        assert_eq!(lstat(root, "opt/app").mtime_nsec(), 250_000_000);
        assert_eq!(
            xattr_of(root, "opt/app", "user.dir").as_deref(),
            Some(&b"on a dir"[..])
        );
        assert_inode(
            root,
            "opt/app/bin",
            S_IFDIR,
            0o755,
            1234,
            5678,
            1_500_000_007,
        );
        assert_inode(
            root,
            "opt/app/bin/tool",
            S_IFREG,
            0o750,
            1234,
            5678,
            1_600_000_100,
        );
    }

    /// A root inside a scratch directory that also holds a canary file, to
    /// see that nothing lands outside the root.
    struct Sandbox {
        dir: tempfile::TempDir,
    }

    impl Sandbox {
        fn new() -> Self {
            let dir = tempfile::tempdir().unwrap();
            fs::create_dir(dir.path().join("root")).unwrap();
            fs::write(dir.path().join("canary"), b"canary").unwrap();
            Sandbox { dir }
        }
        fn outer(&self) -> &Path {
            self.dir.path()
        }
        fn root(&self) -> PathBuf {
            self.outer().join("root")
        }
        #[track_caller]
        fn assert_outside_untouched(&self) {
            let mut names: Vec<_> = fs::read_dir(self.outer())
                .unwrap()
                .map(|e| e.unwrap().file_name())
                .collect();
            names.sort();
            assert_eq!(names, ["canary", "root"]);
            let canary = self.outer().join("canary");
            assert_eq!(fs::read(&canary).unwrap(), b"canary");
            assert_eq!(lstat(self.outer(), "canary").nlink(), 1);
        }
    }

    #[test]
    fn refuses_entries_outside_the_root() {
        if !is_root() {
            return;
        }
        type Case = (&'static str, Box<dyn Fn(&mut Tar, &Path)>);
        let cases: Vec<Case> = vec![
            (
                "../etc/x",
                Box::new(|t, _| t.raw(EntryType::Regular, b"../etc/x", b"", b"x")),
            ),
            (
                "/abs",
                Box::new(|t, _| t.raw(EntryType::Regular, b"/abs", b"", b"x")),
            ),
            (
                "a/../../x",
                Box::new(|t, _| t.raw(EntryType::Regular, b"a/../../x", b"", b"x")),
            ),
            (
                "../canary",
                Box::new(|t, _| t.raw(EntryType::Directory, b"../canary", b"", b"")),
            ),
            (
                "evil/canary",
                Box::new(|t, outer| {
                    t.symlink("evil", outer.to_str().unwrap(), 0, 0, 1);
                    t.file("evil/canary", 0o644, 0, 0, 1, b"pwned");
                }),
            ),
            (
                "evil/imgforge-extract-test",
                Box::new(|t, _| {
                    t.symlink("evil", "/etc", 0, 0, 1);
                    t.file("evil/imgforge-extract-test", 0o644, 0, 0, 1, b"pwned");
                }),
            ),
            (
                "evil/sub",
                Box::new(|t, outer| {
                    t.symlink("evil", outer.to_str().unwrap(), 0, 0, 1);
                    t.dir("evil/sub", 0o755, 0, 0, 1);
                }),
            ),
            (
                "evil/x/canary",
                Box::new(|t, outer| {
                    // root/evil -> ../.. is the scratch directory's parent.
                    t.symlink("evil", "../..", 0, 0, 1);
                    let name = outer.file_name().unwrap().to_str().unwrap();
                    t.file(&format!("evil/{name}/canary"), 0o644, 0, 0, 1, b"pwned");
                }),
            ),
            (
                "h",
                Box::new(|t, _| t.raw(EntryType::Link, b"h", b"/etc/passwd", b"")),
            ),
            (
                "h",
                Box::new(|t, _| t.raw(EntryType::Link, b"h", b"../canary", b"")),
            ),
            (
                "h",
                Box::new(|t, outer| {
                    t.symlink("evil", outer.to_str().unwrap(), 0, 0, 1);
                    t.hardlink("h", "evil/canary");
                }),
            ),
        ];
        for (name, build) in cases {
            let sandbox = Sandbox::new();
            let mut t = Tar::new();
            build(&mut t, sandbox.outer());
            t.file("after", 0o644, 0, 0, 1, b"never reached");
            let err = extract(&t.bytes()[..], &sandbox.root()).unwrap_err();
            let msg = format!("{err:#}");
            let expected = if name == "evil/x/canary" {
                let outer = sandbox.outer().file_name().unwrap().to_str().unwrap();
                format!("refusing tar entry 'evil/{outer}/canary': ")
            } else {
                format!("refusing tar entry '{name}': ")
            };
            assert!(msg.starts_with(&expected), "{name}: {msg}");
            assert!(msg.contains("outside the root filesystem"), "{name}: {msg}");
            sandbox.assert_outside_untouched();
            assert!(
                !sandbox.root().join("after").exists(),
                "{name}: went on after refusing"
            );
            assert!(!sandbox.root().join("abs").exists());
            assert!(!sandbox.root().join("h").exists());
        }
        assert!(!Path::new("/etc/imgforge-extract-test").exists());
    }

    #[test]
    fn absolute_symlinks_are_created_not_followed() {
        if !is_root() {
            return;
        }
        let sandbox = Sandbox::new();
        let canary = sandbox.outer().join("canary");
        let mut t = Tar::new();
        t.symlink("etc/link", canary.to_str().unwrap(), 0, 0, 1);
        // A later regular file replaces the symlink instead of writing through it.
        t.symlink("etc/over", canary.to_str().unwrap(), 0, 0, 1);
        t.file("etc/over", 0o600, 0, 0, 1, b"replaced");
        extract(&t.bytes()[..], &sandbox.root()).unwrap();
        let root = sandbox.root();
        assert_eq!(fs::read_link(root.join("etc/link")).unwrap(), canary);
        assert!(lstat(&root, "etc/over").is_file());
        assert_eq!(fs::read(root.join("etc/over")).unwrap(), b"replaced");
        sandbox.assert_outside_untouched();
    }

    #[test]
    fn a_later_duplicate_replaces_the_earlier_entry() {
        if !is_root() {
            return;
        }
        let mut t = Tar::new();
        t.file("etc/conf", 0o644, 0, 0, 1_600_000_000, b"old contents");
        t.file("etc/conf", 0o600, 1234, 5678, 1_600_000_001, b"new");
        t.dir("d", 0o700, 0, 0, 1_500_000_000);
        t.file("d/x", 0o644, 0, 0, 1, b"x");
        t.dir("d", 0o755, 1234, 0, 1_500_000_001);
        t.file("a", 0o644, 0, 0, 1, b"1");
        t.hardlink("b", "a");
        t.file("a", 0o644, 0, 0, 1, b"2");
        t.file("s", 0o644, 0, 0, 1, b"file");
        t.symlink("s", "target", 0, 0, 1);
        t.file("f", 0o644, 0, 0, 1, b"file");
        t.dir("f", 0o755, 0, 0, 1);
        t.dir("e", 0o755, 0, 0, 1);
        t.file("e", 0o644, 0, 0, 1, b"was an empty dir");
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        extract(&t.bytes()[..], root).unwrap();

        assert_eq!(fs::read(root.join("etc/conf")).unwrap(), b"new");
        assert_inode(
            root,
            "etc/conf",
            libc::S_IFREG,
            0o600,
            1234,
            5678,
            1_600_000_001,
        );
        assert_inode(root, "d", libc::S_IFDIR, 0o755, 1234, 0, 1_500_000_001);
        assert!(root.join("d/x").exists());
        assert_eq!(fs::read(root.join("a")).unwrap(), b"2");
        assert_eq!(fs::read(root.join("b")).unwrap(), b"1");
        assert_eq!(lstat(root, "a").nlink(), 1);
        assert_eq!(fs::read_link(root.join("s")).unwrap(), Path::new("target"));
        assert!(lstat(root, "f").is_dir());
        assert_eq!(fs::read(root.join("e")).unwrap(), b"was an empty dir");
    }

    fn big_tarball() -> Vec<u8> {
        let mut t = Tar::new();
        t.file("small", 0o644, 0, 0, 1, b"small");
        t.file("big", 0o644, 0, 0, 1, &vec![7u8; 64 * 1024]);
        t.bytes()
    }

    #[track_caller]
    fn assert_truncated(input: &[u8]) {
        let dir = tempfile::tempdir().unwrap();
        let err = extract(input, dir.path()).unwrap_err();
        assert!(
            err.to_string()
                .starts_with("the rootfs tarball is truncated ("),
            "{err:#}"
        );
    }

    #[test]
    fn reports_a_truncated_archive() {
        let full = big_tarball();
        // Inside the big file's data, inside a header, at the very start.
        assert_truncated(&full[..3 * 512 + 10_000]);
        assert_truncated(&full[..2 * 512 + 100]);
        // A first header cut short, recognisable by its magic.
        assert_truncated(&full[..300]);
        assert_truncated(&[]);
        // Whole entries but no end-of-archive marker.
        let mut t = Tar::new();
        t.file("only", 0o644, 0, 0, 1, b"data");
        assert_truncated(&t.unfinished());

        let dir = tempfile::tempdir().unwrap();
        let err = extract(&full[..3 * 512 + 10_000], dir.path()).unwrap_err();
        assert!(
            err.to_string().contains("inside tar entry 'big'"),
            "{err:#}"
        );
    }

    /// A reader that fails after `ok` bytes, as a broken download or
    /// decompressor does.
    struct Failing<'a> {
        data: &'a [u8],
        ok: usize,
        error: fn() -> io::Error,
    }

    impl Read for Failing<'_> {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            if self.ok == 0 {
                return Err((self.error)());
            }
            let n = buf.len().min(self.ok).min(self.data.len());
            buf[..n].copy_from_slice(&self.data[..n]);
            self.data = &self.data[n..];
            self.ok -= n;
            Ok(n)
        }
    }

    #[derive(Debug, thiserror::Error)]
    #[error("connection reset by the test")]
    struct DownloadError;

    #[test]
    fn keeps_the_readers_own_error() {
        let full = big_tarball();
        let dir = tempfile::tempdir().unwrap();
        let reader = Failing {
            data: &full,
            ok: 3 * 512 + 5000,
            error: || io::Error::new(io::ErrorKind::ConnectionReset, DownloadError),
        };
        let err = extract(reader, dir.path()).unwrap_err();
        assert!(
            err.to_string()
                .starts_with("cannot read the rootfs tarball inside tar entry 'big'"),
            "{err:#}"
        );
        let payload = err
            .chain()
            .find_map(|e| e.downcast_ref::<io::Error>()?.get_ref());
        assert!(payload.is_some_and(|p| p.is::<DownloadError>()), "{err:#}");

        let reader = Failing {
            data: &full,
            ok: 512 + 3,
            error: || io::Error::new(io::ErrorKind::UnexpectedEof, "stream ended early"),
        };
        let err = extract(reader, dir.path()).unwrap_err();
        assert!(
            err.to_string()
                .starts_with("the rootfs tarball is truncated ("),
            "{err:#}"
        );
    }

    #[test]
    fn reports_a_stream_that_is_not_a_tar() {
        let mut x = 0x2545_f491_4f6c_dd1du64;
        let noise: Vec<u8> = (0..4096)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect();
        let dir = tempfile::tempdir().unwrap();
        for (input, hint) in [
            (&noise[..], "not a tar header"),
            (&noise[..100], "not a tar header"),
            (&[0x1f, 0x8b, 8, 0, 0, 0, 0, 0, 0, 3][..], "gzip"),
        ] {
            let err = extract(input, dir.path()).unwrap_err().to_string();
            assert!(
                err.starts_with("the rootfs is not a tar archive ("),
                "{err}"
            );
            assert!(err.contains(hint), "{err}");
        }
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 0);
    }

    /// Unmounts on drop, so that a failing test leaves no mount behind.
    struct Mounted(PathBuf);

    impl Drop for Mounted {
        fn drop(&mut self) {
            let _ = nix::mount::umount2(&self.0, nix::mount::MntFlags::MNT_DETACH);
        }
    }

    #[test]
    fn reports_a_full_volume() {
        if !is_root() {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let mnt = Mounted(dir.path().join("mnt"));
        fs::create_dir(&mnt.0).unwrap();
        nix::mount::mount(
            Some("tmpfs"),
            &mnt.0,
            Some("tmpfs"),
            nix::mount::MsFlags::empty(),
            Some("size=1m"),
        )
        .unwrap();
        let mut t = Tar::new();
        for i in 0..3 {
            t.file(&format!("blob{i}"), 0o644, 0, 0, 1, &vec![1u8; 512 * 1024]);
        }
        let err = extract(&t.bytes()[..], &mnt.0).unwrap_err().to_string();
        assert!(
            err.starts_with("the volume is full: the rootfs does not fit ("),
            "{err}"
        );
        assert!(err.contains("bytes written so far"), "{err}");
        assert!(err.ends_with("; build with a larger volume size"), "{err}");
    }

    #[test]
    fn pax_times_keep_nanoseconds() {
        let t = parse_pax_time(b"-1.25").unwrap();
        assert_eq!((t.tv_sec(), t.tv_nsec()), (-2, 750_000_000));
        let t = parse_pax_time(b"1600000000.123456789123").unwrap();
        assert_eq!((t.tv_sec(), t.tv_nsec()), (1_600_000_000, 123_456_789));
    }
}
