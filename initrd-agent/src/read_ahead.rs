//! A reader that reads ahead on its own thread.
//!
//! A download read with blocking calls alternates: receive a chunk, then
//! write it to the volume, then receive again. [`ReadAhead`] moves the
//! receiving onto a thread that keeps up to `depth` buffers filled while the
//! caller writes, so network (or decompression) and disk work overlap on
//! separate cores. Memory is bounded: `depth` buffers of `chunk` bytes, plus
//! the one being consumed.

use std::io::{self, BufRead, Read};
use std::sync::mpsc::{self, Receiver, SyncSender};
use std::thread::JoinHandle;

/// What the reading thread hands over: a filled buffer (empty at the end of
/// the stream), or the error that stopped it.
type Filled = io::Result<Vec<u8>>;

pub struct ReadAhead<R> {
    filled: Receiver<Filled>,
    /// Consumed buffers go back to the reading thread for reuse.
    recycle: SyncSender<Vec<u8>>,
    current: Vec<u8>,
    pos: usize,
    /// Set at the end of the stream or after an error; later reads repeat it.
    finished: Option<io::Result<()>>,
    thread: Option<JoinHandle<R>>,
}

impl<R: Read + Send + 'static> ReadAhead<R> {
    /// Starts reading `inner` on a new thread, `chunk` bytes per buffer, at
    /// most `depth` buffers ahead of the caller.
    pub fn new(inner: R, chunk: usize, depth: usize) -> io::Result<ReadAhead<R>> {
        assert!(
            chunk > 0 && depth > 0,
            "ReadAhead needs a chunk and a depth"
        );
        let (filled_tx, filled) = mpsc::sync_channel(depth);
        let (recycle, recycle_rx) = mpsc::sync_channel(depth + 1);
        let thread = std::thread::Builder::new()
            .name("read-ahead".into())
            .spawn(move || fill_loop(inner, chunk, depth, &filled_tx, &recycle_rx))?;
        Ok(ReadAhead {
            filled,
            recycle,
            current: Vec::new(),
            pos: 0,
            finished: None,
            thread: Some(thread),
        })
    }

    /// Stops the reading thread and returns the inner reader. Call it after
    /// the stream was read to its end (otherwise it waits for the thread's
    /// current read to return).
    pub fn into_inner(mut self) -> R {
        let thread = self.thread.take().expect("the thread is taken only here");
        // Closing both channels wakes the thread wherever it waits.
        drop(self);
        match thread.join() {
            Ok(inner) => inner,
            Err(panic) => std::panic::resume_unwind(panic),
        }
    }
}

/// The reading thread: fills buffers until the end, an error, or until the
/// consumer goes away. Returns the reader so that the consumer can finish it
/// (a download's digest check).
fn fill_loop<R: Read>(
    mut inner: R,
    chunk: usize,
    depth: usize,
    filled: &SyncSender<Filled>,
    recycle: &Receiver<Vec<u8>>,
) -> R {
    let mut allocated = 0;
    loop {
        // Allocate up to depth + 1 buffers (depth queued, one being
        // filled), then reuse the ones the consumer gives back.
        let mut buf = match recycle.try_recv() {
            Ok(buf) => buf,
            Err(_) if allocated <= depth => {
                allocated += 1;
                Vec::with_capacity(chunk)
            }
            Err(_) => match recycle.recv() {
                Ok(buf) => buf,
                Err(_) => return inner,
            },
        };
        buf.clear();
        // `take` + `read_to_end` reads into the spare capacity without
        // zeroing it first, and keeps what it read before an error.
        match inner.by_ref().take(chunk as u64).read_to_end(&mut buf) {
            Ok(_) => {
                let end = buf.is_empty();
                if filled.send(Ok(buf)).is_err() || end {
                    return inner;
                }
            }
            Err(e) => {
                if !buf.is_empty() && filled.send(Ok(buf)).is_err() {
                    return inner;
                }
                let _ = filled.send(Err(e));
                return inner;
            }
        }
    }
}

impl<R> ReadAhead<R> {
    /// The next buffer from the thread, once the current one is used up.
    fn refill(&mut self) -> io::Result<()> {
        while self.pos == self.current.len() {
            if let Some(finished) = &self.finished {
                return match finished {
                    Ok(()) => Ok(()),
                    Err(e) => Err(io::Error::new(e.kind(), e.to_string())),
                };
            }
            let next = self.filled.recv().unwrap_or_else(|_| {
                Err(io::Error::other(
                    "the read-ahead thread stopped unexpectedly",
                ))
            });
            match next {
                Ok(buf) if buf.is_empty() => self.finished = Some(Ok(())),
                Ok(buf) => {
                    let used = std::mem::replace(&mut self.current, buf);
                    self.pos = 0;
                    // The thread may have stopped already; the buffer is then just dropped.
                    let _ = self.recycle.try_send(used);
                }
                Err(e) => {
                    let repeat = io::Error::new(e.kind(), e.to_string());
                    self.finished = Some(Err(repeat));
                    return Err(e);
                }
            }
        }
        Ok(())
    }
}

impl<R> Read for ReadAhead<R> {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        let available = self.fill_buf()?;
        let n = available.len().min(out.len());
        out[..n].copy_from_slice(&available[..n]);
        self.consume(n);
        Ok(n)
    }
}

impl<R> BufRead for ReadAhead<R> {
    fn fill_buf(&mut self) -> io::Result<&[u8]> {
        self.refill()?;
        Ok(&self.current[self.pos..])
    }

    fn consume(&mut self, amount: usize) {
        self.pos = (self.pos + amount).min(self.current.len());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Yields `data` in reads of at most `step` bytes, then `error` if set.
    struct Dribble {
        data: Vec<u8>,
        pos: usize,
        step: usize,
        error: Option<io::ErrorKind>,
    }

    impl Read for Dribble {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            if self.pos == self.data.len() {
                return match self.error {
                    Some(kind) => Err(io::Error::new(kind, "the source broke")),
                    None => Ok(0),
                };
            }
            let n = buf.len().min(self.step).min(self.data.len() - self.pos);
            buf[..n].copy_from_slice(&self.data[self.pos..self.pos + n]);
            self.pos += n;
            Ok(n)
        }
    }

    fn pattern(len: usize) -> Vec<u8> {
        (0..len).map(|i| (i * 7 + i / 251) as u8).collect()
    }

    #[test]
    fn yields_every_byte_in_order_and_returns_the_reader() {
        let data = pattern(1_000_003);
        let source = Dribble {
            data: data.clone(),
            pos: 0,
            step: 4099,
            error: None,
        };
        let mut ahead = ReadAhead::new(source, 65_536, 3).unwrap();
        let mut out = Vec::new();
        ahead.read_to_end(&mut out).unwrap();
        assert_eq!(out.len(), data.len());
        assert!(out == data, "bytes differ");
        // The end repeats, and the reader comes back fully consumed.
        assert_eq!(ahead.read(&mut [0u8; 16]).unwrap(), 0);
        let inner = ahead.into_inner();
        assert_eq!(inner.pos, data.len());
    }

    #[test]
    fn an_error_arrives_after_the_bytes_before_it_and_repeats() {
        let data = pattern(300_000);
        let source = Dribble {
            data: data.clone(),
            pos: 0,
            step: 100_000,
            error: Some(io::ErrorKind::ConnectionReset),
        };
        let mut ahead = ReadAhead::new(source, 65_536, 2).unwrap();
        let mut out = Vec::new();
        let err = ahead.read_to_end(&mut out).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::ConnectionReset);
        assert!(err.to_string().contains("the source broke"), "{err}");
        // Everything before the error was delivered (read_to_end keeps it).
        assert!(
            out == data,
            "{} of {} bytes before the error",
            out.len(),
            data.len()
        );
        let again = ahead.read(&mut [0u8; 16]).unwrap_err();
        assert_eq!(again.kind(), io::ErrorKind::ConnectionReset);
    }

    #[test]
    fn stays_within_depth_buffers_ahead() {
        // An endless source: the thread must stop after filling what the
        // channels hold, not read forever.
        struct Endless(std::sync::Arc<std::sync::atomic::AtomicU64>);
        impl Read for Endless {
            fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
                buf.fill(1);
                self.0
                    .fetch_add(buf.len() as u64, std::sync::atomic::Ordering::SeqCst);
                Ok(buf.len())
            }
        }
        let counter = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
        let ahead = ReadAhead::new(Endless(counter.clone()), 1000, 4).unwrap();
        std::thread::sleep(std::time::Duration::from_millis(200));
        let read = counter.load(std::sync::atomic::Ordering::SeqCst);
        // depth queued + one being filled.
        assert!(read <= 5 * 1000, "read {read} bytes ahead");
        assert!(read >= 4 * 1000, "read only {read} bytes ahead");
        drop(ahead);
    }
}
