//! The output side shared by every source: a POSIX pax tar writer over an
//! optional compressor, with the sha256 and size of the bytes that reach the
//! file computed as they are written (the file is never read back).
//!
//! The file is written under a hidden temporary name in the destination's
//! directory and renamed into place only once it is complete and synced, so a
//! failed or interrupted build never leaves a partial FILE behind: on error
//! the temporary file is removed when [`Output`] is dropped.
//!
//! Tar conventions of the output (what the agent's extractor and GNU tar
//! expect of a root filesystem):
//! - names are `./`, `./etc/`, `./etc/passwd`: relative, with the root first;
//! - owners are numeric only (empty user and group names), so that no
//!   extractor maps them through its own `/etc/passwd`;
//! - xattrs travel as `SCHILY.xattr.NAME` pax records (binary-safe: records
//!   are length-prefixed), long names as ustar prefix/name or pax `path`;
//! - mtimes are whole seconds.

use formats::pax::write_record;
use std::fs::File;
use std::io::{self, BufWriter, Read, Write};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde::Serialize;
use sha2::{Digest, Sha256};

/// Compression of the output tarball, chosen by the file name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Compression {
    None,
    Gzip,
    Zstd,
    Xz,
}

impl Compression {
    /// The compression that `path`'s name asks for: `.tar`, `.tar.gz`
    /// (`.tgz`), `.tar.zst` (`.tzst`) or `.tar.xz` (`.txz`).
    pub fn from_path(path: &Path) -> Result<Compression> {
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().to_ascii_lowercase())
            .unwrap_or_default();
        let table: [(&str, Compression); 7] = [
            (".tar", Compression::None),
            (".tar.gz", Compression::Gzip),
            (".tgz", Compression::Gzip),
            (".tar.zst", Compression::Zstd),
            (".tzst", Compression::Zstd),
            (".tar.xz", Compression::Xz),
            (".txz", Compression::Xz),
        ];
        for (suffix, c) in table {
            if name.len() > suffix.len() && name.ends_with(suffix) {
                return Ok(c);
            }
        }
        bail!(
            "cannot tell the output format from '{}': its name must end in .tar, .tar.gz, .tar.zst or .tar.xz",
            path.display()
        )
    }

    pub fn name(self) -> &'static str {
        match self {
            Compression::None => "none",
            Compression::Gzip => "gzip",
            Compression::Zstd => "zstd",
            Compression::Xz => "xz",
        }
    }
}

/// Compression settings.
#[derive(Debug, Clone, Copy, Default)]
pub struct OutputOptions {
    /// gzip 1-9 (default 6), zstd 1-22 (default 3), xz 0-9 (default 6).
    pub level: Option<u32>,
    /// Compression threads for zstd and xz; default: every core.
    pub threads: Option<u32>,
}

/// What was written: printed by `imgforge rootfs` (`--json` prints these
/// five fields).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Report {
    pub path: PathBuf,
    /// Lowercase hex sha256 of the file's bytes.
    pub sha256: String,
    /// Size of the file in bytes.
    pub size: u64,
    pub compression: Compression,
    /// Tar entries (directories, files, links, nodes; not pax headers).
    pub entries: u64,
}

/// Owner, permissions, mtime and xattrs of one tar entry.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Meta {
    /// Permission bits, setuid/setgid/sticky included (`0o7777` mask).
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    /// Seconds since the epoch.
    pub mtime: i64,
    /// Extended attributes, name (e.g. `user.x`, `security.capability`) to
    /// value, in a stable order.
    pub xattrs: Vec<(Vec<u8>, Vec<u8>)>,
}

impl Meta {
    /// A directory made up because an entry needs it as a parent.
    pub fn implicit_dir() -> Meta {
        Meta {
            mode: 0o755,
            ..Meta::default()
        }
    }
}

/// Kinds of tar entries the writer emits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind<'a> {
    Dir,
    /// A regular file with `size` bytes of content.
    File {
        size: u64,
    },
    Symlink {
        target: &'a [u8],
    },
    /// A hard link to the earlier entry at this root-relative path.
    HardLink {
        target: &'a [u8],
    },
    Char {
        major: u32,
        minor: u32,
    },
    Block {
        major: u32,
        minor: u32,
    },
    Fifo,
}

const BLOCK: usize = 512;
const COPY_CHUNK: usize = 256 * 1024;

/// Writes tar entries (POSIX pax format) to `W`.
pub struct TarWriter<W: Write> {
    w: W,
    entries: u64,
    buf: Vec<u8>,
}

impl<W: Write> TarWriter<W> {
    pub fn new(w: W) -> Self {
        TarWriter {
            w,
            entries: 0,
            buf: Vec::new(),
        }
    }

    /// Entries written so far.
    pub fn entries(&self) -> u64 {
        self.entries
    }

    /// Writes one entry. `path` is relative to the root, without a leading
    /// `./` or trailing `/` (empty for the root directory); `content` must
    /// yield the `size` bytes of a regular file.
    pub fn append(
        &mut self,
        path: &[u8],
        kind: Kind<'_>,
        meta: &Meta,
        content: Option<&mut dyn Read>,
    ) -> io::Result<()> {
        let name = tar_name(path, kind == Kind::Dir);
        let (flag, size, link, dev): (u8, u64, Vec<u8>, Option<(u32, u32)>) = match kind {
            Kind::Dir => (b'5', 0, Vec::new(), None),
            Kind::File { size } => (b'0', size, Vec::new(), None),
            Kind::Symlink { target } => (b'2', 0, target.to_vec(), None),
            Kind::HardLink { target } => (b'1', 0, tar_name(target, false), None),
            Kind::Char { major, minor } => (b'3', 0, Vec::new(), Some((major, minor))),
            Kind::Block { major, minor } => (b'4', 0, Vec::new(), Some((major, minor))),
            Kind::Fifo => (b'6', 0, Vec::new(), None),
        };
        self.header(flag, &name, &link, meta, size, dev)?;
        if let Kind::File { size } = kind {
            let content =
                content.ok_or_else(|| io::Error::other("a regular file without content"))?;
            self.copy(content, size, &name)?;
        }
        self.entries += 1;
        Ok(())
    }

    /// Writes the end-of-archive marker and returns the inner writer.
    pub fn finish(mut self) -> io::Result<W> {
        self.w.write_all(&[0u8; 2 * BLOCK])?;
        Ok(self.w)
    }

    fn copy(&mut self, content: &mut dyn Read, size: u64, name: &[u8]) -> io::Result<()> {
        if self.buf.len() < COPY_CHUNK {
            self.buf.resize(COPY_CHUNK, 0);
        }
        let mut left = size;
        while left > 0 {
            let want = left.min(COPY_CHUNK as u64) as usize;
            let n = match content.read(&mut self.buf[..want]) {
                Ok(0) => {
                    return Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        format!(
                            "{}: the content ended {} bytes short of its size {} (did the file change while it was read?)",
                            String::from_utf8_lossy(name),
                            left,
                            size
                        ),
                    ))
                }
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            };
            self.w.write_all(&self.buf[..n])?;
            left -= n as u64;
        }
        let pad = padding(size);
        if pad > 0 {
            self.w.write_all(&[0u8; BLOCK][..pad])?;
        }
        Ok(())
    }

    fn header(
        &mut self,
        flag: u8,
        name: &[u8],
        link: &[u8],
        meta: &Meta,
        size: u64,
        dev: Option<(u32, u32)>,
    ) -> io::Result<()> {
        let mut pax = Vec::new();
        let mut h = [0u8; BLOCK];

        match split_ustar_name(name) {
            Some((prefix, rest)) => {
                h[345..345 + prefix.len()].copy_from_slice(prefix);
                h[..rest.len()].copy_from_slice(rest);
            }
            None => {
                write_record(&mut pax, b"path", name);
                let cut = name.len().min(100);
                h[..cut].copy_from_slice(&name[..cut]);
            }
        }
        if link.len() > 100 {
            write_record(&mut pax, b"linkpath", link);
            h[157..257].copy_from_slice(&link[..100]);
        } else {
            h[157..157 + link.len()].copy_from_slice(link);
        }
        octal(&mut h[100..108], u64::from(meta.mode & 0o7777));
        for (field, key, value) in [
            (108..116, &b"uid"[..], meta.uid),
            (116..124, &b"gid"[..], meta.gid),
        ] {
            if u64::from(value) <= 0o7777777 {
                octal(&mut h[field], u64::from(value));
            } else {
                write_record(&mut pax, key, value.to_string().as_bytes());
                octal(&mut h[field], 0);
            }
        }
        if size <= 0o77777777777 {
            octal(&mut h[124..136], size);
        } else {
            write_record(&mut pax, b"size", size.to_string().as_bytes());
            octal(&mut h[124..136], 0);
        }
        if (0..=0o77777777777).contains(&meta.mtime) {
            octal(&mut h[136..148], meta.mtime as u64);
        } else {
            write_record(&mut pax, b"mtime", meta.mtime.to_string().as_bytes());
            octal(&mut h[136..148], 0);
        }
        h[156] = flag;
        h[257..263].copy_from_slice(b"ustar\0");
        h[263..265].copy_from_slice(b"00");
        if let Some((major, minor)) = dev {
            if u64::from(major) > 0o7777777 || u64::from(minor) > 0o7777777 {
                return Err(io::Error::other(format!(
                    "{}: device number {major}:{minor} does not fit a tar header",
                    String::from_utf8_lossy(name)
                )));
            }
            octal(&mut h[329..337], u64::from(major));
            octal(&mut h[337..345], u64::from(minor));
        }
        for (key, value) in &meta.xattrs {
            let mut k = b"SCHILY.xattr.".to_vec();
            k.extend_from_slice(key);
            write_record(&mut pax, &k, value);
        }

        if !pax.is_empty() {
            let mut x = [0u8; BLOCK];
            // A stable name (no pid, unlike GNU tar's), so output is
            // reproducible.
            let base = name
                .strip_suffix(b"/")
                .unwrap_or(name)
                .rsplit(|&b| b == b'/')
                .next()
                .unwrap_or(b"");
            let mut xname = b"./PaxHeaders/".to_vec();
            xname.extend_from_slice(&base[..base.len().min(100 - xname.len())]);
            x[..xname.len()].copy_from_slice(&xname);
            octal(&mut x[100..108], 0o644);
            octal(&mut x[108..116], 0);
            octal(&mut x[116..124], 0);
            octal(&mut x[124..136], pax.len() as u64);
            octal(&mut x[136..148], meta.mtime.clamp(0, 0o77777777777) as u64);
            x[156] = b'x';
            x[257..263].copy_from_slice(b"ustar\0");
            x[263..265].copy_from_slice(b"00");
            checksum(&mut x);
            self.w.write_all(&x)?;
            self.w.write_all(&pax)?;
            let pad = padding(pax.len() as u64);
            if pad > 0 {
                self.w.write_all(&[0u8; BLOCK][..pad])?;
            }
        }
        checksum(&mut h);
        self.w.write_all(&h)
    }
}

/// `./` + path (+ `/` for a directory); `./` for the root.
fn tar_name(path: &[u8], dir: bool) -> Vec<u8> {
    let mut name = Vec::with_capacity(path.len() + 3);
    name.extend_from_slice(b"./");
    if !path.is_empty() {
        name.extend_from_slice(path);
        if dir {
            name.push(b'/');
        }
    }
    name
}

/// Splits a name into the ustar prefix (at most 155 bytes) and name (at most
/// 100 bytes) fields at a `/`, if it does not fit the name field alone.
fn split_ustar_name(name: &[u8]) -> Option<(&[u8], &[u8])> {
    if name.len() <= 100 {
        return Some((&[], name));
    }
    if name.len() > 256 {
        return None;
    }
    // The leftmost slash that leaves at most 100 bytes after it.
    let min = name.len() - 101;
    (min..name.len().min(156))
        .find(|&i| name[i] == b'/' && i + 1 < name.len() && i > 0)
        .map(|i| (&name[..i], &name[i + 1..]))
}

fn padding(size: u64) -> usize {
    ((BLOCK as u64 - size % BLOCK as u64) % BLOCK as u64) as usize
}

/// Zero-padded octal with a terminating NUL, filling `field`.
fn octal(field: &mut [u8], value: u64) {
    let digits = field.len() - 1;
    let s = format!("{value:0digits$o}");
    field[..digits].copy_from_slice(&s.as_bytes()[s.len() - digits..]);
    field[digits] = 0;
}

fn checksum(h: &mut [u8; BLOCK]) {
    h[148..156].fill(b' ');
    let sum: u32 = h.iter().map(|&b| u32::from(b)).sum();
    let s = format!("{sum:06o}\0 ");
    h[148..156].copy_from_slice(s.as_bytes());
}

// ---------------------------------------------------------------------------
// Compression and the file.

/// Hashes and counts what passes through to `inner`.
pub struct HashWriter<W> {
    inner: W,
    hasher: Sha256,
    bytes: u64,
}

impl<W: Write> Write for HashWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hasher.update(&buf[..n]);
        self.bytes += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// The compressor in front of the file.
pub enum Encoder<W: Write> {
    Plain(W),
    Gzip(flate2::write::GzEncoder<W>),
    Zstd(zstd::stream::write::Encoder<'static, W>),
    Xz(liblzma::write::XzEncoder<W>),
}

impl<W: Write> Encoder<W> {
    fn new(w: W, c: Compression, opts: &OutputOptions) -> Result<Self> {
        let threads = opts
            .threads
            .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get() as u32));
        Ok(match c {
            Compression::None => Encoder::Plain(w),
            Compression::Gzip => {
                let level = opts.level.unwrap_or(6);
                if !(1..=9).contains(&level) {
                    bail!("gzip compression levels are 1 to 9, not {level}");
                }
                Encoder::Gzip(flate2::write::GzEncoder::new(
                    w,
                    flate2::Compression::new(level),
                ))
            }
            Compression::Zstd => {
                let level = opts.level.unwrap_or(3);
                if !(1..=22).contains(&level) {
                    bail!("zstd compression levels are 1 to 22, not {level}");
                }
                let mut e = zstd::stream::write::Encoder::new(w, level as i32)
                    .context("cannot start the zstd compressor")?;
                e.include_checksum(true)?;
                // Workers compress while this thread reads and writes.
                e.multithread(threads.max(1))
                    .context("cannot start zstd's worker threads")?;
                Encoder::Zstd(e)
            }
            Compression::Xz => {
                let level = opts.level.unwrap_or(6);
                if level > 9 {
                    bail!("xz compression levels are 0 to 9, not {level}");
                }
                let stream = liblzma::stream::MtStreamBuilder::new()
                    .preset(level)
                    .check(liblzma::stream::Check::Crc64)
                    .threads(threads.max(1))
                    .encoder()
                    .context("cannot start the xz compressor")?;
                Encoder::Xz(liblzma::write::XzEncoder::new_stream(w, stream))
            }
        })
    }

    fn finish(self) -> io::Result<W> {
        match self {
            Encoder::Plain(w) => Ok(w),
            Encoder::Gzip(e) => e.finish(),
            Encoder::Zstd(e) => e.finish(),
            Encoder::Xz(e) => e.finish(),
        }
    }
}

impl<W: Write> Write for Encoder<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Encoder::Plain(w) => w.write(buf),
            Encoder::Gzip(e) => e.write(buf),
            Encoder::Zstd(e) => e.write(buf),
            Encoder::Xz(e) => e.write(buf),
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        match self {
            Encoder::Plain(w) => w.flush(),
            Encoder::Gzip(e) => e.flush(),
            Encoder::Zstd(e) => e.flush(),
            Encoder::Xz(e) => e.flush(),
        }
    }
}

pub type Sink = Encoder<HashWriter<BufWriter<File>>>;

/// The output tarball being written. Dropping it without [`Output::finish`]
/// removes the temporary file.
pub struct Output {
    path: PathBuf,
    dir: PathBuf,
    compression: Compression,
    temp: tempfile::NamedTempFile,
    tar: TarWriter<Sink>,
}

impl Output {
    /// Starts writing `path` (compression from its name).
    pub fn create(path: &Path, opts: &OutputOptions) -> Result<Output> {
        let compression = Compression::from_path(path)?;
        let name = path
            .file_name()
            .with_context(|| format!("'{}' does not name a file", path.display()))?;
        let dir = match path.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        };
        if !dir.is_dir() {
            bail!("the output directory '{}' does not exist", dir.display());
        }
        if path.is_dir() {
            bail!("the output '{}' is a directory", path.display());
        }
        let temp = tempfile::Builder::new()
            .prefix(&format!(".{}.", name.to_string_lossy()))
            .suffix(".imgforge-partial")
            .permissions(std::os::unix::fs::PermissionsExt::from_mode(0o644))
            .tempfile_in(&dir)
            .with_context(|| format!("cannot create a file in '{}'", dir.display()))?;
        register_partial(temp.path());
        let file = temp.as_file().try_clone()?;
        let sink = HashWriter {
            inner: BufWriter::with_capacity(1 << 20, file),
            hasher: Sha256::new(),
            bytes: 0,
        };
        let encoder = Encoder::new(sink, compression, opts)?;
        Ok(Output {
            path: path.to_path_buf(),
            dir,
            compression,
            temp,
            tar: TarWriter::new(encoder),
        })
    }

    /// (device, inode) of the file being written.
    pub fn temp_id(&self) -> (u64, u64) {
        use std::os::unix::fs::MetadataExt;
        match self.temp.as_file().metadata() {
            Ok(m) => (m.dev(), m.ino()),
            Err(_) => (u64::MAX, u64::MAX),
        }
    }

    /// The directory of the output file (where temporary files go).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn tar(&mut self) -> &mut TarWriter<Sink> {
        &mut self.tar
    }

    /// Ends the archive, syncs the file and renames it into place.
    pub fn finish(self) -> Result<Report> {
        let Output {
            path,
            dir,
            compression,
            temp,
            tar,
        } = self;
        let entries = tar.entries();
        let write_err = || format!("cannot write '{}'", path.display());
        let encoder = tar.finish().with_context(write_err)?;
        let mut sink = encoder.finish().with_context(write_err)?;
        sink.flush().with_context(write_err)?;
        let HashWriter {
            inner,
            hasher,
            bytes,
        } = sink;
        let file = inner
            .into_inner()
            .map_err(|e| e.into_error())
            .with_context(write_err)?;
        file.sync_all().with_context(write_err)?;
        drop(file);
        temp.persist(&path)
            .map_err(|e| e.error)
            .with_context(|| format!("cannot rename the finished file to '{}'", path.display()))?;
        if let Ok(d) = File::open(&dir) {
            let _ = d.sync_all();
        }
        Ok(Report {
            path,
            sha256: hex::encode(hasher.finalize()),
            size: bytes,
            compression,
            entries,
        })
    }
}

fn register_partial(path: &Path) {
    crate::interrupt::register_partial(path);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_names_split_into_prefix_and_name() {
        let name = format!("./{}/{}", "d".repeat(120), "f".repeat(90));
        let (prefix, rest) = split_ustar_name(name.as_bytes()).unwrap();
        assert!(prefix.len() <= 155 && rest.len() <= 100);
        assert_eq!([prefix, b"/", rest].concat(), name.as_bytes());
        let long = format!("./{}", "x".repeat(300));
        assert!(split_ustar_name(long.as_bytes()).is_none());
        let unsplittable = format!("./{}", "y".repeat(150));
        assert!(split_ustar_name(unsplittable.as_bytes()).is_none());
    }

    #[test]
    fn compression_from_name() {
        let c = |n: &str| Compression::from_path(Path::new(n));
        assert_eq!(c("a/rootfs.tar").unwrap(), Compression::None);
        assert_eq!(c("rootfs.tar.gz").unwrap(), Compression::Gzip);
        assert_eq!(c("rootfs.TAR.ZST").unwrap(), Compression::Zstd);
        assert_eq!(c("rootfs.tar.xz").unwrap(), Compression::Xz);
        let e = c("rootfs.tar.bz2").unwrap_err().to_string();
        assert!(e.contains(".tar.zst"), "{e}");
        assert!(c(".tar").is_err());
    }
}
