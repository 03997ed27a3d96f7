//! The data pass: one forward read of the file, guest bytes out to a sink.

use std::io::{self, BufRead};

use crate::error::{Error, Result};
use crate::header::Compression;
use crate::layout::{Extent, Layout};

/// Plain data goes to the sink in pieces of at most this many bytes, and at
/// most what the stream's buffer holds: contiguous clusters make one write
/// whatever the cluster size.
pub const DATA_CHUNK: u64 = 1024 * 1024;

/// Where [`copy_data`] puts the guest disk.
///
/// Calls come in file order, not guest order, and each guest byte below the
/// virtual size is covered by exactly one call. Nothing is read back.
pub trait Sink {
    /// Writes `data` at `guest_offset`.
    fn write_at(&mut self, guest_offset: u64, data: &[u8]) -> io::Result<()>;

    /// Makes `guest_offset..guest_offset + len` read as zeros. The sink
    /// decides how: `BLKZEROOUT` or discard on a block device, nothing on a
    /// fresh sparse file, or writing zeros.
    fn zero(&mut self, guest_offset: u64, len: u64) -> io::Result<()>;
}

impl<S: Sink + ?Sized> Sink for &mut S {
    fn write_at(&mut self, guest_offset: u64, data: &[u8]) -> io::Result<()> {
        (**self).write_at(guest_offset, data)
    }

    fn zero(&mut self, guest_offset: u64, len: u64) -> io::Result<()> {
        (**self).zero(guest_offset, len)
    }
}

/// What [`copy_data`] did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct CopyStats {
    /// Bytes consumed from the stream, including those skipped (metadata,
    /// unused clusters); the stream is never read past the last byte needed.
    pub bytes_read: u64,
    /// Guest bytes written with [`Sink::write_at`].
    pub bytes_written: u64,
    /// Guest bytes passed to [`Sink::zero`].
    pub bytes_zeroed: u64,
}

/// Copies the guest disk described by `layout` to `sink`, reading `stream`
/// once, forward only.
///
/// `stream` yields the image file from offset `stream_offset` on; it must
/// start at or before [`Layout::first_data_offset`] (a whole file starts at
/// 0). Bytes between the extents are read and discarded, never seeked over,
/// and nothing is read after [`Layout::data_end_offset`]. First every zero
/// range goes to [`Sink::zero`], then every data cluster to
/// [`Sink::write_at`] in file order; compressed clusters are decompressed
/// to exactly one cluster (or fail with [`Error::BadCompressedCluster`]).
///
/// Memory: plain data goes from the stream's own buffer to the sink without
/// a copy, in pieces no larger than that buffer (so give the stream a large
/// one, 1 MiB for example); a compressed cluster is gathered into a buffer
/// of its bound (at most twice the cluster size), then inflated into one
/// cluster, plus the decoder's state (zstd: at most an 8 MiB window).
pub fn copy_data<R: BufRead, S: Sink + ?Sized>(
    layout: &Layout,
    stream: R,
    stream_offset: u64,
    sink: &mut S,
) -> Result<CopyStats> {
    if let Some(first_data_offset) = layout.first_data_offset() {
        if stream_offset > first_data_offset {
            return Err(Error::StreamStartsTooLate {
                stream_offset,
                first_data_offset,
            });
        }
    }
    let mut stats = CopyStats::default();
    for extent in layout.zero_extents() {
        if let Extent::Zero { guest_offset, len } = *extent {
            sink.zero(guest_offset, len)
                .map_err(|source| Error::Write {
                    guest_offset,
                    len,
                    source,
                })?;
            stats.bytes_zeroed += len;
        }
    }

    let mut window = Window::new(stream, stream_offset);
    let mut decompressor = Decompressor::default();
    let mut cluster = Vec::new();

    for extent in layout.host_extents() {
        match *extent {
            Extent::Data {
                guest_offset,
                host_offset,
                len,
            } => {
                window.pass_through(host_offset, len, |file_offset, bytes| {
                    let at = guest_offset + (file_offset - host_offset);
                    sink.write_at(at, bytes).map_err(|source| Error::Write {
                        guest_offset: at,
                        len: bytes.len() as u64,
                        source,
                    })
                })?;
                stats.bytes_written += len;
            }
            Extent::Compressed {
                guest_offset,
                host_offset,
                compressed_len,
                len,
                compression,
            } => {
                let compressed = window.get(host_offset, u64::from(compressed_len))?;
                cluster.resize(layout.cluster_size() as usize, 0);
                decompressor
                    .decompress(compression, compressed, &mut cluster)
                    .map_err(|detail| Error::BadCompressedCluster {
                        guest_offset,
                        host_offset,
                        detail,
                    })?;
                let bytes = cluster.get(..len as usize).unwrap_or_default();
                sink.write_at(guest_offset, bytes)
                    .map_err(|source| Error::Write {
                        guest_offset,
                        len: u64::from(len),
                        source,
                    })?;
                stats.bytes_written += u64::from(len);
            }
            Extent::Zero { .. } => {}
        }
    }
    stats.bytes_read = window.end() - stream_offset;
    Ok(stats)
}

/// The bytes `start..start + buf.len()` of the file, read from a forward-only stream.
struct Window<R> {
    stream: R,
    /// File offset of `buf[0]`; the stream is at `start + buf.len()`.
    start: u64,
    buf: Vec<u8>,
}

impl<R: BufRead> Window<R> {
    fn new(stream: R, stream_offset: u64) -> Window<R> {
        Window {
            stream,
            start: stream_offset,
            buf: Vec::new(),
        }
    }

    /// File offset the stream is at.
    fn end(&self) -> u64 {
        self.start + self.buf.len() as u64
    }

    /// Moves the window's start to `offset`, dropping what comes before it
    /// and skipping forward in the stream as needed.
    fn seek_forward(&mut self, offset: u64) -> Result<()> {
        if offset < self.start {
            // The layout orders and checks extents so that this cannot happen.
            return Err(Error::corrupt(format!(
                "file offset {offset} is needed after the stream moved past it to {}",
                self.start
            )));
        }
        let end = self.end();
        if offset >= end {
            self.buf.clear();
            self.start = end;
            self.skip(offset - end)?;
        } else {
            self.buf.drain(..(offset - self.start) as usize);
        }
        self.start = offset;
        Ok(())
    }

    /// The file bytes `offset..offset + len`, gathered in the window.
    fn get(&mut self, offset: u64, len: u64) -> Result<&[u8]> {
        self.seek_forward(offset)?;
        let have = self.buf.len();
        let len = len as usize;
        if have < len {
            self.buf.resize(len, 0);
            let read_at = self.start + have as u64;
            let tail = self.buf.get_mut(have..).unwrap_or_default();
            if let Err(error) = self.stream.read_exact(tail) {
                self.buf.truncate(have);
                return Err(stream_error(error, read_at, offset + len as u64));
            }
        }
        Ok(self.buf.get(..len).unwrap_or_default())
    }

    /// Hands the file bytes `offset..offset + len` to `out` in pieces, each
    /// with its file offset, straight from the stream's buffer (what the
    /// window already holds first), and moves past them.
    fn pass_through(
        &mut self,
        offset: u64,
        len: u64,
        mut out: impl FnMut(u64, &[u8]) -> Result<()>,
    ) -> Result<()> {
        self.seek_forward(offset)?;
        let stop = offset + len;
        let held = (self.buf.len() as u64).min(len) as usize;
        if held > 0 {
            out(offset, self.buf.get(..held).unwrap_or_default())?;
            self.buf.drain(..held);
            self.start = offset + held as u64;
        }
        // Either the window held it all, or it is empty now.
        self.stream_until(stop, out)
    }

    /// Reads and discards `len` bytes (the window is empty).
    fn skip(&mut self, len: u64) -> Result<()> {
        self.stream_until(self.start + len, |_, _| Ok(()))
    }

    /// Hands the stream's bytes from `start` (the window is empty) up to
    /// `stop` to `out`, piece by piece from the stream's own buffer.
    fn stream_until(
        &mut self,
        stop: u64,
        mut out: impl FnMut(u64, &[u8]) -> Result<()>,
    ) -> Result<()> {
        while self.start < stop {
            let available = match self.stream.fill_buf() {
                Ok(bytes) => bytes,
                Err(error) if error.kind() == io::ErrorKind::Interrupted => continue,
                Err(error) => return Err(stream_error(error, self.start, stop)),
            };
            if available.is_empty() {
                return Err(Error::DataStreamEnded {
                    offset: self.start,
                    needed: stop,
                });
            }
            let n = (stop - self.start)
                .min(DATA_CHUNK)
                .min(available.len() as u64) as usize;
            out(self.start, available.get(..n).unwrap_or_default())?;
            self.stream.consume(n);
            self.start += n as u64;
        }
        Ok(())
    }
}

fn stream_error(error: io::Error, offset: u64, needed: u64) -> Error {
    if error.kind() == io::ErrorKind::UnexpectedEof {
        Error::DataStreamEnded { offset, needed }
    } else {
        Error::ReadData {
            offset,
            source: error,
        }
    }
}

/// Largest zstd window accepted: 8 MiB. A zstd frame names its window size,
/// and the decoder allocates it; libzstd's own default limit is 128 MiB,
/// which a crafted image could make the agent allocate. One cluster (2 MiB
/// at most) never needs more than a 2 MiB window; QEMU's frames use less.
const ZSTD_WINDOW_LOG_MAX: u32 = 23;

/// Reusable decoder state, created on first use.
#[derive(Default)]
struct Decompressor {
    zlib: Option<flate2::Decompress>,
    zstd: Option<zstd::stream::raw::Decoder<'static>>,
}

impl Decompressor {
    /// Fills `cluster` exactly from `compressed`; more input than needed is
    /// fine (the compressed length is only an upper bound), less output is not.
    fn decompress(
        &mut self,
        compression: Compression,
        compressed: &[u8],
        cluster: &mut [u8],
    ) -> Result<(), String> {
        match compression {
            Compression::Zlib => self.inflate(compressed, cluster),
            Compression::Zstd => self.unzstd(compressed, cluster),
        }
    }

    /// Raw deflate, as QEMU writes it (`deflateInit2` with window bits -12).
    fn inflate(&mut self, compressed: &[u8], cluster: &mut [u8]) -> Result<(), String> {
        use flate2::{Decompress, FlushDecompress, Status};
        let inflater = self.zlib.get_or_insert_with(|| Decompress::new(false));
        inflater.reset(false);
        loop {
            let consumed = inflater.total_in() as usize;
            let produced = inflater.total_out() as usize;
            if produced >= cluster.len() {
                return Ok(());
            }
            let input = compressed.get(consumed..).unwrap_or_default();
            let output = cluster.get_mut(produced..).unwrap_or_default();
            let status = inflater
                .decompress(input, output, FlushDecompress::Finish)
                .map_err(|error| format!("deflate data is invalid: {error}"))?;
            let progressed = inflater.total_in() as usize != consumed
                || inflater.total_out() as usize != produced;
            if status == Status::StreamEnd || !progressed {
                let produced = inflater.total_out();
                if produced as usize == cluster.len() {
                    return Ok(());
                }
                return Err(format!(
                    "it inflates to {produced} bytes, a cluster is {} bytes",
                    cluster.len()
                ));
            }
        }
    }

    /// Zstandard, as QEMU reads it: one or more frames that fill the cluster
    /// and end exactly there.
    fn unzstd(&mut self, compressed: &[u8], cluster: &mut [u8]) -> Result<(), String> {
        use zstd::stream::raw::{DParameter, Decoder, InBuffer, Operation, OutBuffer};
        let decoder = match &mut self.zstd {
            Some(decoder) => decoder,
            None => {
                let mut decoder = Decoder::new()
                    .map_err(|error| format!("cannot create a zstd decoder: {error}"))?;
                decoder
                    .set_parameter(DParameter::WindowLogMax(ZSTD_WINDOW_LOG_MAX))
                    .map_err(|error| format!("cannot limit the zstd window: {error}"))?;
                self.zstd.insert(decoder)
            }
        };
        decoder
            .reinit()
            .map_err(|error| format!("cannot reset the zstd decoder: {error}"))?;
        let cluster_len = cluster.len();
        let mut input = InBuffer::around(compressed);
        let mut output = OutBuffer::around(cluster);
        let mut frame_remaining = 0;
        while output.pos() < cluster_len {
            let (consumed, produced) = (input.pos(), output.pos());
            frame_remaining = decoder
                .run(&mut input, &mut output)
                .map_err(|error| format!("zstd data is invalid: {error}"))?;
            if input.pos() == consumed && output.pos() == produced {
                return Err(format!(
                    "it decompresses to {produced} bytes, a cluster is {cluster_len} bytes"
                ));
            }
        }
        if frame_remaining != 0 {
            return Err(format!(
                "it decompresses to more than a cluster ({cluster_len} bytes)"
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A frame that asks for a 128 MiB window is refused, not allocated.
    #[test]
    fn zstd_window_is_capped() {
        use zstd::stream::raw::{CParameter, Encoder, InBuffer, Operation, OutBuffer};
        let cluster = vec![0x61u8; 4096];
        let mut encoder = Encoder::new(3).unwrap();
        encoder.set_parameter(CParameter::WindowLog(27)).unwrap();
        let mut frame = vec![0u8; 8192];
        let mut output = OutBuffer::around(&mut frame[..]);
        let mut input = InBuffer::around(&cluster);
        encoder.run(&mut input, &mut output).unwrap();
        while encoder.finish(&mut output, true).unwrap() != 0 {}
        let len = output.pos();
        let frame = &frame[..len];

        let mut out = vec![0u8; 4096];
        let err = Decompressor::default()
            .decompress(Compression::Zstd, frame, &mut out)
            .unwrap_err();
        assert!(err.contains("zstd data is invalid"), "{err}");

        // The same cluster with a small window decodes.
        let small = zstd::bulk::compress(&cluster, 3).unwrap();
        Decompressor::default()
            .decompress(Compression::Zstd, &small, &mut out)
            .unwrap();
        assert_eq!(out, cluster);
    }
}
