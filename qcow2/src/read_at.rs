//! Random access to the bytes of a qcow2 file, for its metadata.

use std::io;

/// Reads bytes at an absolute offset of a qcow2 file.
///
/// The reader uses it only for metadata (header, L1 table, L2 tables), never
/// for guest data. A local file implements it with `pread`; a remote image
/// can implement it with HTTP `Range` requests (each call is one request, and
/// the reader coalesces adjacent tables into one call).
pub trait ReadAt {
    /// Fills `buf` with the bytes at `offset..offset + buf.len()`, or fails
    /// (with [`io::ErrorKind::UnexpectedEof`] if the file ends before).
    fn read_exact_at(&mut self, offset: u64, buf: &mut [u8]) -> io::Result<()>;
}

#[cfg(unix)]
impl ReadAt for std::fs::File {
    fn read_exact_at(&mut self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        std::os::unix::fs::FileExt::read_exact_at(self, buf, offset)
    }
}

#[cfg(unix)]
impl ReadAt for &std::fs::File {
    fn read_exact_at(&mut self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        std::os::unix::fs::FileExt::read_exact_at(*self, buf, offset)
    }
}

/// A whole image in memory (tests, fuzzing).
impl ReadAt for [u8] {
    fn read_exact_at(&mut self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        let bytes = usize::try_from(offset)
            .ok()
            .and_then(|start| Some(start..start.checked_add(buf.len())?))
            .and_then(|range| self.get(range))
            .ok_or_else(|| {
                io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    format!(
                        "{} bytes at offset {offset} are past the end ({} bytes)",
                        buf.len(),
                        self.len()
                    ),
                )
            })?;
        buf.copy_from_slice(bytes);
        Ok(())
    }
}

/// A whole image in memory (tests, fuzzing).
impl ReadAt for Vec<u8> {
    fn read_exact_at(&mut self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        self.as_mut_slice().read_exact_at(offset, buf)
    }
}
