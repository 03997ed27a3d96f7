//! Reading tar streams: a small streaming tar reader and decompression by
//! magic bytes.
//!
//! The reader is this crate's own rather than the `tar` crate's because pax
//! records must be read by their length prefix: `tar` 0.4 splits them at
//! newlines, which mangles binary xattr values such as file capabilities
//! holding a 0x0a byte (see initrd-agent/src/extract.rs). It understands
//! ustar (with the prefix field), GNU long names and links, pax extended
//! headers (path, linkpath, size, uid, gid, mtime, `SCHILY.xattr.*`), and
//! base-256 numbers; it refuses GNU sparse files.

use std::io::{self, BufRead, Read, Seek, SeekFrom};

use anyhow::{anyhow, bail, Context, Result};
use formats::{Compression, SNIFF_LEN};

use super::output::Meta;

const BLOCK: usize = 512;
/// Largest pax header or GNU long name accepted.
const EXT_LIMIT: u64 = 16 << 20;

/// Kind of a tar entry as read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EntryKind {
    Dir,
    File,
    Symlink,
    HardLink,
    Char(u32, u32),
    Block(u32, u32),
    Fifo,
}

/// One tar entry's header, extensions applied.
#[derive(Debug, Clone)]
pub struct Entry {
    /// The name as stored (may start with `./` or `/`).
    pub path: Vec<u8>,
    /// Symlink target or hard-link target name.
    pub link: Vec<u8>,
    pub kind: EntryKind,
    pub meta: Meta,
    /// Bytes of content (regular files; 0 for other kinds).
    pub size: u64,
    /// Offset of the content in the stream.
    pub data_offset: u64,
}

/// A streaming tar reader.
pub struct TarReader<R> {
    r: R,
    pos: u64,
    /// Content of the current entry not yet read.
    remaining: u64,
    /// Padding after the current entry's content.
    pad: u64,
    done: bool,
    entries: u64,
}

impl<R: Read> TarReader<R> {
    pub fn new(r: R) -> Self {
        TarReader {
            r,
            pos: 0,
            remaining: 0,
            pad: 0,
            done: false,
            entries: 0,
        }
    }

    pub fn into_inner(self) -> R {
        self.r
    }

    /// The next entry, or `None` at the end-of-archive marker. Skips what is
    /// left of the previous entry's content.
    pub fn next_entry(&mut self) -> Result<Option<Entry>> {
        if self.done {
            return Ok(None);
        }
        self.skip_rest()?;
        let mut pax: Vec<(Vec<u8>, Vec<u8>)> = Vec::new();
        let mut long_name: Option<Vec<u8>> = None;
        let mut long_link: Option<Vec<u8>> = None;
        loop {
            let at = self.pos;
            let mut h = [0u8; BLOCK];
            let got = self.read_full(&mut h)?;
            if got == 0 {
                if self.entries == 0 && at == 0 {
                    bail!("it is empty");
                }
                bail!("it is truncated: it ends at byte {at} without an end-of-archive marker");
            }
            if got < BLOCK {
                bail!("it is truncated: it ends inside the tar header at byte {at}");
            }
            if h.iter().all(|&b| b == 0) {
                self.done = true;
                return Ok(None);
            }
            if !checksum_ok(&h) {
                if at == 0 {
                    bail!("it is not a tar archive ({})", formats::describe_start(&h));
                }
                bail!("it is corrupt: the tar header at byte {at} has a bad checksum");
            }
            let flag = h[156];
            let size = number(&h[124..136])
                .with_context(|| format!("bad size in the tar header at byte {at}"))?;
            match flag {
                b'x' | b'g' | b'L' | b'K' => {
                    if size > EXT_LIMIT {
                        bail!("the extension header at byte {at} is too large ({size} bytes)");
                    }
                    let mut data = vec![0u8; size as usize];
                    if self.read_full(&mut data)? < data.len() {
                        bail!("it is truncated inside the extension header at byte {at}");
                    }
                    self.discard(pad_of(size))?;
                    match flag {
                        b'x' => {
                            pax.extend(formats::pax::parse_records(&data).with_context(|| {
                                format!("the pax header at byte {at} is malformed")
                            })?);
                        }
                        // Global pax headers (rare in root filesystems) are
                        // not applied.
                        b'g' => {}
                        b'L' => long_name = Some(trim_nul(&data).to_vec()),
                        _ => long_link = Some(trim_nul(&data).to_vec()),
                    }
                    continue;
                }
                b'S' => bail!(
                    "the tar entry '{}' is a GNU sparse file, which is not supported",
                    String::from_utf8_lossy(&field_name(&h))
                ),
                _ => {}
            }
            if pax.iter().any(|(k, _)| k.starts_with(b"GNU.sparse.")) {
                bail!(
                    "the tar entry '{}' is a pax sparse file, which is not supported",
                    String::from_utf8_lossy(&field_name(&h))
                );
            }
            let find = |key: &[u8]| {
                pax.iter()
                    .rev()
                    .find(|(k, _)| k == key)
                    .map(|(_, v)| v.as_slice())
            };
            let pax_num = |key: &[u8]| -> Result<Option<u64>> {
                find(key)
                    .map(|v| {
                        std::str::from_utf8(v)
                            .ok()
                            .and_then(|s| s.trim().parse::<u64>().ok())
                            .ok_or_else(|| {
                                anyhow!(
                                    "the pax record '{}' is not a number",
                                    String::from_utf8_lossy(key)
                                )
                            })
                    })
                    .transpose()
            };
            let path = match (find(b"path"), long_name.take()) {
                (Some(p), _) => p.to_vec(),
                (None, Some(p)) => p,
                (None, None) => field_name(&h),
            };
            let link = match (find(b"linkpath"), long_link.take()) {
                (Some(p), _) => p.to_vec(),
                (None, Some(p)) => p,
                (None, None) => trim_nul(&h[157..257]).to_vec(),
            };
            let size = pax_num(b"size")?.unwrap_or(size);
            let uid = match pax_num(b"uid")? {
                Some(v) => v,
                None => number(&h[108..116]).context("bad uid field")?,
            };
            let gid = match pax_num(b"gid")? {
                Some(v) => v,
                None => number(&h[116..124]).context("bad gid field")?,
            };
            let mtime = match find(b"mtime").and_then(parse_pax_time) {
                Some(t) => t,
                None => number_signed(&h[136..148]).context("bad mtime field")?,
            };
            let mode = number(&h[100..108]).context("bad mode field")? as u32 & 0o7777;
            let xattrs = pax
                .iter()
                .filter_map(|(k, v)| {
                    Some((
                        k.strip_prefix(formats::pax::XATTR_PREFIX)?.to_vec(),
                        v.clone(),
                    ))
                })
                .collect();
            let name = || String::from_utf8_lossy(&path).into_owned();
            let dev = || -> Result<(u32, u32)> {
                let major = number(&h[329..337]).context("bad device major")?;
                let minor = number(&h[337..345]).context("bad device minor")?;
                Ok((
                    u32::try_from(major)
                        .map_err(|_| anyhow!("device major {major} is out of range"))?,
                    u32::try_from(minor)
                        .map_err(|_| anyhow!("device minor {minor} is out of range"))?,
                ))
            };
            let kind = match flag {
                b'0' | 0 | b'7' if path.ends_with(b"/") => EntryKind::Dir,
                b'0' | 0 | b'7' => EntryKind::File,
                b'1' => EntryKind::HardLink,
                b'2' => EntryKind::Symlink,
                b'3' => {
                    let (a, b) = dev().with_context(|| format!("tar entry '{}'", name()))?;
                    EntryKind::Char(a, b)
                }
                b'4' => {
                    let (a, b) = dev().with_context(|| format!("tar entry '{}'", name()))?;
                    EntryKind::Block(a, b)
                }
                b'5' => EntryKind::Dir,
                b'6' => EntryKind::Fifo,
                other => {
                    // Volume labels, multi-volume continuations and unknown
                    // types carry nothing a root filesystem needs.
                    tracing::warn!(
                        "skipping tar entry '{}' of unsupported type {:?}",
                        name(),
                        other as char
                    );
                    self.remaining = size;
                    self.pad = pad_of(size);
                    self.skip_rest()?;
                    continue;
                }
            };
            // Like Go's archive/tar (and so Docker and containerd): only
            // regular files carry content; other types' size fields are
            // ignored.
            let size = if kind == EntryKind::File { size } else { 0 };
            self.remaining = size;
            self.pad = pad_of(size);
            self.entries += 1;
            let uid = u32::try_from(uid)
                .map_err(|_| anyhow!("tar entry '{}': uid {uid} is out of range", name()))?;
            let gid = u32::try_from(gid)
                .map_err(|_| anyhow!("tar entry '{}': gid {gid} is out of range", name()))?;
            return Ok(Some(Entry {
                path,
                link,
                kind,
                meta: Meta {
                    mode,
                    uid,
                    gid,
                    mtime,
                    xattrs,
                },
                size,
                data_offset: self.pos,
            }));
        }
    }

    /// Reads the current entry's content (at most what is left of it).
    pub fn read_data(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.remaining == 0 {
            return Ok(0);
        }
        let want = buf
            .len()
            .min(self.remaining.min(usize::MAX as u64) as usize);
        let n = loop {
            match self.r.read(&mut buf[..want]) {
                Ok(n) => break n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
        };
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the tar stream is truncated inside a file's content",
            ));
        }
        self.remaining -= n as u64;
        self.pos += n as u64;
        Ok(n)
    }

    /// A reader over the current entry's content.
    pub fn data(&mut self) -> Data<'_, R> {
        Data { tar: self }
    }

    fn skip_rest(&mut self) -> Result<()> {
        let n = self.remaining + self.pad;
        self.remaining = 0;
        self.pad = 0;
        self.discard(n)
    }

    fn discard(&mut self, n: u64) -> Result<()> {
        if n == 0 {
            return Ok(());
        }
        let copied = io::copy(&mut (&mut self.r).take(n), &mut io::sink())
            .context("cannot read the tar stream")?;
        self.pos += copied;
        if copied < n {
            bail!(
                "it is truncated: it ends inside an entry's content at byte {}",
                self.pos
            );
        }
        Ok(())
    }

    /// Reads until `buf` is full or the stream ends; returns the bytes read.
    fn read_full(&mut self, buf: &mut [u8]) -> Result<usize> {
        let mut got = 0;
        while got < buf.len() {
            match self.r.read(&mut buf[got..]) {
                Ok(0) => break,
                Ok(n) => got += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(anyhow::Error::new(e).context("cannot read the tar stream")),
            }
        }
        self.pos += got as u64;
        Ok(got)
    }
}

impl<R: Read + Seek> TarReader<R> {
    /// The next entry, seeking over content instead of reading it (for
    /// indexing an uncompressed archive on disk).
    pub fn next_entry_seeking(&mut self) -> Result<Option<Entry>> {
        let n = self.remaining + self.pad;
        if n > 0 && !self.done {
            self.r
                .seek(SeekFrom::Current(n as i64))
                .context("cannot seek in the archive")?;
            self.pos += n;
            self.remaining = 0;
            self.pad = 0;
        }
        self.next_entry()
    }
}

/// The content of the current entry.
/// The content of a [`TarReader`]'s current entry, as a reader.
pub struct Data<'a, R> {
    tar: &'a mut TarReader<R>,
}

impl<R: Read> Read for Data<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.tar.read_data(buf)
    }
}

fn pad_of(size: u64) -> u64 {
    (BLOCK as u64 - size % BLOCK as u64) % BLOCK as u64
}

fn trim_nul(b: &[u8]) -> &[u8] {
    match b.iter().position(|&c| c == 0) {
        Some(i) => &b[..i],
        None => b,
    }
}

/// The name from the header fields (with the ustar prefix).
fn field_name(h: &[u8; BLOCK]) -> Vec<u8> {
    let name = trim_nul(&h[..100]);
    // POSIX ustar ("ustar\0"), not old GNU ("ustar  \0"), has a prefix.
    if &h[257..263] == b"ustar\0" {
        let prefix = trim_nul(&h[345..500]);
        if !prefix.is_empty() {
            let mut p = prefix.to_vec();
            p.push(b'/');
            p.extend_from_slice(name);
            return p;
        }
    }
    name.to_vec()
}

fn checksum_ok(h: &[u8; BLOCK]) -> bool {
    let Ok(stored) = number(&h[148..156]) else {
        return false;
    };
    let mut unsigned: u64 = 0;
    let mut signed: i64 = 0;
    for (i, &b) in h.iter().enumerate() {
        let b = if (148..156).contains(&i) { b' ' } else { b };
        unsigned += u64::from(b);
        signed += i64::from(b as i8);
    }
    stored == unsigned || stored as i64 == signed
}

/// An octal (space/NUL padded) or base-256 number field.
fn number(field: &[u8]) -> Result<u64> {
    if field.first().is_some_and(|&b| b & 0x80 != 0) {
        if field[0] & 0x40 != 0 {
            bail!("negative number");
        }
        let mut v: u64 = u64::from(field[0] & 0x3f);
        for &b in &field[1..] {
            v = v
                .checked_mul(256)
                .and_then(|v| v.checked_add(u64::from(b)))
                .context("number out of range")?;
        }
        return Ok(v);
    }
    let s = std::str::from_utf8(field).map_err(|_| anyhow!("not octal"))?;
    let s = s.trim_matches(|c: char| c == ' ' || c == '\0');
    if s.is_empty() {
        return Ok(0);
    }
    u64::from_str_radix(s, 8).map_err(|_| anyhow!("'{s}' is not octal"))
}

fn number_signed(field: &[u8]) -> Result<i64> {
    if field.first().is_some_and(|&b| b & 0xc0 == 0xc0) {
        // Negative base-256: two's complement.
        let mut v: i64 = -1;
        for &b in field {
            v = (v << 8) | i64::from(b);
        }
        return Ok(v);
    }
    let v = number(field)?;
    i64::try_from(v).map_err(|_| anyhow!("number out of range"))
}

/// A pax time, to whole seconds (rounded down, as a tar mtime field holds).
fn parse_pax_time(value: &[u8]) -> Option<i64> {
    formats::pax::parse_time(value).map(|(secs, _)| secs)
}

// ---------------------------------------------------------------------------
// Decompression by magic bytes.

/// The compression of an input stream, refusing what no decoder here reads.
pub fn sniff_compression(start: &[u8]) -> Result<Compression> {
    match Compression::sniff(start) {
        Compression::Bzip2 => {
            bail!("it is bzip2-compressed, which is not supported: decompress it first (bunzip2)")
        }
        c => Ok(c),
    }
}

/// A buffered stream whose first bytes were read ahead to sniff them.
pub type Peeked<R> = io::Chain<io::Cursor<Vec<u8>>, R>;

/// A decompressing reader over a buffered stream, chosen by magic bytes.
pub enum Decoder<R: BufRead> {
    Plain(Peeked<R>),
    Gzip(flate2::bufread::MultiGzDecoder<Peeked<R>>),
    Zstd(zstd::stream::read::Decoder<'static, Peeked<R>>),
    Xz(liblzma::bufread::XzDecoder<Peeked<R>>),
}

impl<R: BufRead> Decoder<R> {
    /// Reads `r`'s first bytes and wraps it in the right decompressor.
    pub fn sniff(mut r: R) -> Result<Decoder<R>> {
        let mut start = Vec::with_capacity(8);
        while start.len() < SNIFF_LEN {
            let buf = r.fill_buf().context("cannot read the stream")?;
            if buf.is_empty() {
                break;
            }
            let n = buf.len().min(SNIFF_LEN - start.len());
            start.extend_from_slice(&buf[..n]);
            r.consume(n);
        }
        let kind = sniff_compression(&start)?;
        let r = io::Cursor::new(start).chain(r);
        Ok(match kind {
            Compression::None | Compression::Bzip2 => Decoder::Plain(r),
            Compression::Gzip => Decoder::Gzip(flate2::bufread::MultiGzDecoder::new(r)),
            Compression::Zstd => Decoder::Zstd(
                zstd::stream::read::Decoder::with_buffer(r)
                    .context("cannot start the zstd decompressor")?,
            ),
            Compression::Xz => Decoder::Xz(liblzma::bufread::XzDecoder::new_multi_decoder(r)),
        })
    }

    /// The underlying stream (what the decompressor has not consumed).
    pub fn into_inner(self) -> R {
        match self {
            Decoder::Plain(r) => r.into_inner().1,
            Decoder::Gzip(d) => d.into_inner().into_inner().1,
            Decoder::Zstd(d) => d.finish().into_inner().1,
            Decoder::Xz(d) => d.into_inner().into_inner().1,
        }
    }
}

impl<R: BufRead> Read for Decoder<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Decoder::Plain(r) => r.read(buf),
            Decoder::Gzip(d) => d.read(buf),
            Decoder::Zstd(d) => d.read(buf),
            Decoder::Xz(d) => d.read(buf),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rootfs::output::{Kind, TarWriter};

    #[test]
    fn reads_back_what_the_writer_writes() {
        let mut w = TarWriter::new(Vec::new());
        let long = "d".repeat(150) + "/" + &"f".repeat(150);
        let cap = vec![1u8, 0x0a, 0, 2, b'=', b'\n'];
        let meta = Meta {
            mode: 0o4755,
            uid: 3_000_000,
            gid: 7,
            mtime: 1_700_000_000,
            xattrs: vec![(b"security.capability".to_vec(), cap.clone())],
        };
        w.append(b"", Kind::Dir, &Meta::implicit_dir(), None)
            .unwrap();
        w.append(
            long.as_bytes(),
            Kind::File { size: 3 },
            &meta,
            Some(&mut &b"abc"[..]),
        )
        .unwrap();
        w.append(
            b"dev/null",
            Kind::Char { major: 1, minor: 3 },
            &Meta::default(),
            None,
        )
        .unwrap();
        let buf = w.finish().unwrap();

        let mut r = TarReader::new(&buf[..]);
        let root = r.next_entry().unwrap().unwrap();
        assert_eq!(root.path, b"./");
        assert_eq!(root.kind, EntryKind::Dir);
        let f = r.next_entry().unwrap().unwrap();
        assert_eq!(f.path, format!("./{long}").as_bytes());
        assert_eq!(f.meta, meta);
        let mut content = Vec::new();
        r.data().read_to_end(&mut content).unwrap();
        assert_eq!(content, b"abc");
        let d = r.next_entry().unwrap().unwrap();
        assert_eq!(d.kind, EntryKind::Char(1, 3));
        assert!(r.next_entry().unwrap().is_none());
    }

    #[test]
    fn refuses_non_tar_and_truncated_streams() {
        let e = TarReader::new(&[0x1f, 0x8b, 8, 0, 0, 0][..])
            .next_entry()
            .unwrap_err();
        assert!(format!("{e:#}").contains("truncated") || format!("{e:#}").contains("not a tar"));
        let junk = vec![b'x'; 1024];
        let e = TarReader::new(&junk[..]).next_entry().unwrap_err();
        assert!(format!("{e:#}").contains("not a tar archive"), "{e:#}");
        let e = TarReader::new(&[][..]).next_entry().unwrap_err();
        assert!(format!("{e:#}").contains("empty"), "{e:#}");
    }

    #[test]
    fn pax_times_round_down() {
        assert_eq!(parse_pax_time(b"12.5"), Some(12));
        assert_eq!(parse_pax_time(b"-12.5"), Some(-13));
        assert_eq!(parse_pax_time(b"-12"), Some(-12));
        assert_eq!(parse_pax_time(b"x"), None);
    }
}
