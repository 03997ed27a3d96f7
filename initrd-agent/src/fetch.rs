//! Streaming download of rootfs tarballs and disk images.
//!
//! The original tool staged the whole tarball in a tmpfs, so a build server
//! needed more RAM than the rootfs. Here the bytes flow from the network
//! through a decompressor straight into the consumer (tar extraction, the
//! disk writer) with at most one network chunk buffered. The consumers are
//! synchronous, so [`Download`] is a blocking [`Read`] that drives the async
//! HTTP client from a `spawn_blocking` thread.
//!
//! A long download over a flaky network must not start over: when the
//! connection drops or stalls, it resumes with a `Range` request at the
//! byte it got to. The SHA-256 is computed on the fly over the raw bytes
//! and checked by [`Download::finish`].

pub use formats::Compression;
use std::fmt;
use std::io::{self, Read};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use reqwest::header::{HeaderValue, CONTENT_RANGE, ETAG, IF_RANGE, LAST_MODIFIED, RANGE};
use reqwest::StatusCode;
use sha2::{Digest, Sha256};
use tokio::runtime::Handle;
use tracing::{debug, info, warn};

/// How many times the first request is tried: a server that is still
/// starting answers connection refused or 5xx for a moment.
const CONNECT_ATTEMPTS: u32 = 3;
const MAX_BACKOFF: Duration = Duration::from_secs(8);

/// How a download is checked and how hard it tries.
#[derive(Clone, Debug)]
pub struct FetchOptions {
    /// Expected SHA-256 of the raw bytes, 64 hex digits (any case).
    pub expected_sha256: Option<String>,
    /// How many times a dropped or stalled connection is resumed.
    pub max_resumes: u32,
    /// No byte for this long counts as a dropped connection.
    pub stall_timeout: Duration,
    /// First wait before a retry; doubles each time, capped at 8 s.
    pub initial_backoff: Duration,
}

impl Default for FetchOptions {
    fn default() -> Self {
        FetchOptions {
            expected_sha256: None,
            max_resumes: 5,
            stall_timeout: Duration::from_secs(30),
            initial_backoff: Duration::from_millis(500),
        }
    }
}

/// A download failure, in words a user can act on. Errors of a [`Download`]
/// carry one of these in their chain (for `read`, inside the `io::Error`:
/// see [`FetchError::from_io`]), which tells a broken download apart from
/// an error of the consumer.
#[derive(Clone, Debug, thiserror::Error)]
pub enum FetchError {
    #[error("{url} is not a usable URL: {reason}")]
    BadUrl { url: String, reason: String },
    #[error("the expected sha256 '{value}' is not 64 hexadecimal digits")]
    BadDigest { value: String },
    #[error("{url} answered {status}")]
    Status { url: String, status: String },
    #[error("cannot connect to {url}: {cause}")]
    Connect { url: String, cause: String },
    #[error("the request to {url} failed: {cause}")]
    Request { url: String, cause: String },
    #[error(
        "the connection to {url} dropped {drops} times; gave up after {progress} (last: {cause})"
    )]
    GaveUp {
        url: String,
        drops: u32,
        progress: String,
        cause: String,
    },
    #[error(
        "the connection to {url} dropped after {progress} and the download cannot resume: {reason}; \
         it is not restarted from byte 0 because the bytes already received have been consumed"
    )]
    NoResume {
        url: String,
        progress: String,
        reason: String,
    },
    #[error("{url} sent {got} bytes but announced {total}")]
    Length { url: String, got: u64, total: u64 },
    #[error("sha256 mismatch for {url}: expected {expected}, got {actual}")]
    Digest {
        url: String,
        expected: String,
        actual: String,
    },
}

impl FetchError {
    /// The download error inside an `io::Error` returned by
    /// [`Download::read`] (directly or through [`decompress`]).
    pub fn from_io(e: &io::Error) -> Option<&FetchError> {
        e.get_ref()?.downcast_ref::<DownloadFailed>().map(|d| &d.0)
    }

    fn into_io(self) -> io::Error {
        io::Error::other(DownloadFailed(self))
    }
}

/// The payload of the `io::Error`s a [`Download`] returns. `io::Error`
/// hides its payload from `source()` and shows only the payload's own
/// source, so the [`FetchError`] sits one level down: that way
/// `anyhow::Error::chain` reaches it, and `{:#}` prints it after this
/// short label.
#[derive(Debug)]
struct DownloadFailed(FetchError);

impl fmt::Display for DownloadFailed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("download failed")
    }
}

impl std::error::Error for DownloadFailed {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&self.0)
    }
}

/// What [`Download::finish`] verified.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FetchSummary {
    /// Raw (compressed) bytes received.
    pub bytes: u64,
    /// Their SHA-256, lowercase hex, when an expected digest was given (and
    /// matched). Hashing is skipped otherwise: on a build server without
    /// SHA instructions it costs as much CPU as the whole extraction.
    pub sha256: Option<String>,
}

/// A cheap handle on a download's progress, for state reports from another
/// task while the download is read on a blocking thread.
#[derive(Clone, Debug)]
pub struct Progress(Arc<ProgressInner>);

#[derive(Debug)]
struct ProgressInner {
    read: AtomicU64,
    /// `u64::MAX` while unknown.
    total: AtomicU64,
}

impl Progress {
    /// Nothing read yet, size unknown.
    pub fn new() -> Progress {
        Progress(Arc::new(ProgressInner {
            read: AtomicU64::new(0),
            total: AtomicU64::new(u64::MAX),
        }))
    }

    /// Raw bytes received so far.
    pub fn bytes_read(&self) -> u64 {
        self.0.read.load(Ordering::Relaxed)
    }

    /// The announced size (Content-Length), when there was one.
    pub fn total(&self) -> Option<u64> {
        Some(self.0.total.load(Ordering::Relaxed)).filter(|t| *t != u64::MAX)
    }
}

/// Runs `future` to completion on `handle` with a time limit. The timer is
/// created inside the runtime, so this works from any thread that is not
/// one of the runtime's own workers.
fn block_on_timeout<F: std::future::Future>(
    handle: &Handle,
    limit: Duration,
    future: F,
) -> Result<F::Output, tokio::time::error::Elapsed> {
    handle.block_on(async move { tokio::time::timeout(limit, future).await })
}

/// An HTTP(S) download read as a blocking stream.
///
/// `read` calls `Handle::block_on`, so it must run outside the runtime's
/// worker threads (in `spawn_blocking` or a plain thread) of a
/// multi-threaded runtime (whose own threads drive the I/O and timers).
pub struct Download {
    handle: Handle,
    client: reqwest::Client,
    url: String,
    opts: FetchOptions,
    /// Lowercase hex.
    expected: Option<String>,
    response: Option<reqwest::Response>,
    chunk: Bytes,
    pos: usize,
    received: u64,
    total: Option<u64>,
    /// `If-Range` for resumes: a strong ETag, else Last-Modified.
    validator: Option<HeaderValue>,
    /// Only when there is a digest to check.
    hasher: Option<Sha256>,
    drops: u32,
    backoff: Duration,
    /// Set once the download failed for good: every later call repeats it.
    failed: Option<FetchError>,
    eof: bool,
    progress: Progress,
}

/// Sends the first GET and returns the download ready to be read. Fails
/// fast on what a retry cannot fix (a bad URL or digest, a 4xx); retries
/// connection errors and 5xx/429 a few times.
///
/// Blocking: call it where `read` is called (see [`Download`]).
pub fn open(handle: Handle, url: &str, opts: FetchOptions) -> anyhow::Result<Download> {
    let expected = match opts.expected_sha256.as_deref().map(str::trim) {
        None | Some("") => None,
        Some(v) if v.len() == 64 && v.bytes().all(|b| b.is_ascii_hexdigit()) => {
            Some(v.to_ascii_lowercase())
        }
        Some(v) => return Err(FetchError::BadDigest { value: v.into() }.into()),
    };
    let parsed = match reqwest::Url::parse(url) {
        Ok(u) if matches!(u.scheme(), "http" | "https") => u,
        Ok(u) => {
            return Err(FetchError::BadUrl {
                url: url.into(),
                reason: format!("scheme {} is not supported (http or https)", u.scheme()),
            }
            .into())
        }
        Err(e) => {
            return Err(FetchError::BadUrl {
                url: url.into(),
                reason: e.to_string(),
            }
            .into())
        }
    };
    let client = http_client(url)?;

    let mut backoff = opts.initial_backoff;
    let mut attempt = 1;
    let response = loop {
        let sent = block_on_timeout(&handle, opts.stall_timeout, client.get(url).send());
        let retryable = match sent {
            Ok(Ok(resp)) if resp.status().is_success() => break resp,
            Ok(Ok(resp)) => {
                let error = FetchError::Status {
                    url: url.into(),
                    status: resp.status().to_string(),
                };
                if !retryable_status(resp.status()) {
                    return Err(error.into());
                }
                error
            }
            Ok(Err(e)) => {
                let cause = error_cause(&e);
                if e.is_connect() {
                    FetchError::Connect {
                        url: url.into(),
                        cause,
                    }
                } else if e.is_redirect() || e.is_builder() {
                    return Err(FetchError::Request {
                        url: url.into(),
                        cause,
                    }
                    .into());
                } else {
                    FetchError::Request {
                        url: url.into(),
                        cause,
                    }
                }
            }
            Err(_) => FetchError::Request {
                url: url.into(),
                cause: format!("no answer within {:?}", opts.stall_timeout),
            },
        };
        if attempt >= CONNECT_ATTEMPTS {
            return Err(retryable.into());
        }
        warn!("{retryable} (attempt {attempt}/{CONNECT_ATTEMPTS}); retrying in {backoff:?}");
        std::thread::sleep(backoff);
        backoff = (backoff * 2).min(MAX_BACKOFF);
        attempt += 1;
    };

    let total = response.content_length();
    let progress = Progress::new();
    if let Some(t) = total {
        progress.0.total.store(t, Ordering::Relaxed);
    }
    let validator = validator_of(&response);
    let redirected = if *response.url() != parsed {
        format!(" (redirected to {})", response.url())
    } else {
        String::new()
    };
    match total {
        Some(t) => info!("fetching {url}{redirected}: {t} bytes"),
        None => info!("fetching {url}{redirected}: size unknown"),
    }
    let hasher = expected.as_ref().map(|_| Sha256::new());
    Ok(Download {
        handle,
        client,
        url: url.to_string(),
        expected,
        response: Some(response),
        chunk: Bytes::new(),
        pos: 0,
        received: 0,
        total,
        validator,
        hasher,
        drops: 0,
        backoff: opts.initial_backoff,
        opts,
        failed: None,
        eof: false,
        progress,
    })
}

/// Random access to the bytes at a URL with `Range` requests: the
/// metadata of a qcow2 image (header, L1 and L2 tables) is read this way
/// before its data is streamed in one pass.
pub struct RangeReader {
    handle: Handle,
    client: reqwest::Client,
    url: String,
    len: u64,
}

impl RangeReader {
    /// Asks for the first byte to learn the length, and whether the server
    /// honours `Range` at all. Blocking, like [`Download`].
    pub fn open(handle: Handle, url: &str) -> anyhow::Result<RangeReader> {
        let client = http_client(url)?;
        let mut reader = RangeReader {
            handle,
            client,
            url: url.to_owned(),
            len: 0,
        };
        let (_, total) = reader.get_range(0, 1)?;
        reader.len = total;
        Ok(reader)
    }

    /// The length of the file at the URL.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Fills `buf` with the bytes at `offset`.
    pub fn read_exact_at(&mut self, offset: u64, buf: &mut [u8]) -> anyhow::Result<()> {
        if buf.is_empty() {
            return Ok(());
        }
        let (bytes, _) = self.get_range(offset, buf.len() as u64)?;
        if bytes.len() != buf.len() {
            return Err(FetchError::Length {
                url: self.url.clone(),
                got: bytes.len() as u64,
                total: buf.len() as u64,
            }
            .into());
        }
        buf.copy_from_slice(&bytes);
        Ok(())
    }

    /// One `Range: bytes=offset-(offset+len-1)` request, retried a few times
    /// on connection errors and 5xx; returns the body and the file's length
    /// from `Content-Range`.
    fn get_range(&self, offset: u64, len: u64) -> anyhow::Result<(Bytes, u64)> {
        let range = format!("bytes={offset}-{}", offset + len - 1);
        let mut backoff = Duration::from_millis(500);
        let mut attempt = 1;
        loop {
            let sent = block_on_timeout(&self.handle, Duration::from_secs(30), async {
                let resp = self
                    .client
                    .get(&self.url)
                    .header(RANGE, &range)
                    .send()
                    .await?;
                let status = resp.status();
                let content_range = resp.headers().get(CONTENT_RANGE).cloned();
                let body = resp.bytes().await?;
                Ok::<_, reqwest::Error>((status, content_range, body))
            });
            let cause = match sent {
                Ok(Ok((StatusCode::PARTIAL_CONTENT, content_range, body))) => {
                    let total = content_range
                        .as_ref()
                        .and_then(|v| v.to_str().ok())
                        .and_then(|v| v.rsplit('/').next())
                        .and_then(|t| t.parse::<u64>().ok());
                    let Some(total) = total else {
                        return Err(FetchError::Request {
                            url: self.url.clone(),
                            cause: format!(
                                "206 without a usable Content-Range ({content_range:?})"
                            ),
                        }
                        .into());
                    };
                    return Ok((body, total));
                }
                Ok(Ok((status, _, _))) if status.is_success() => {
                    return Err(FetchError::Request {
                        url: self.url.clone(),
                        cause: format!(
                            "the server answered {status} to a Range request: reading a qcow2 \
                             image needs a server that supports Range (or give a raw image)"
                        ),
                    }
                    .into())
                }
                Ok(Ok((status, _, _))) if !retryable_status(status) => {
                    return Err(FetchError::Status {
                        url: self.url.clone(),
                        status: status.to_string(),
                    }
                    .into())
                }
                Ok(Ok((status, _, _))) => status.to_string(),
                Ok(Err(e)) => error_cause(&e),
                Err(_) => "no answer within 30 s".into(),
            };
            if attempt >= CONNECT_ATTEMPTS {
                return Err(FetchError::Request {
                    url: self.url.clone(),
                    cause: format!("range {range}: {cause}"),
                }
                .into());
            }
            warn!(
                "range {range} of {}: {cause}; retrying in {backoff:?}",
                self.url
            );
            std::thread::sleep(backoff);
            backoff = (backoff * 2).min(MAX_BACKOFF);
            attempt += 1;
        }
    }
}

/// The agent's HTTP client (rustls with the webpki roots, redirects
/// followed, a connect timeout).
fn http_client(url: &str) -> Result<reqwest::Client, FetchError> {
    reqwest::Client::builder()
        .connect_timeout(Duration::from_secs(10))
        .user_agent(concat!("imgforge-initrd-agent/", env!("CARGO_PKG_VERSION")))
        .build()
        .map_err(|e| FetchError::Request {
            url: url.into(),
            cause: error_cause(&e),
        })
}

/// What a failed (re)connection means for the download.
enum Attempt {
    /// Worth another try (counts as a drop).
    Retry(String),
    Fatal(FetchError),
}

impl Download {
    /// A handle on the bytes received so far and the announced size.
    pub fn progress(&self) -> Progress {
        self.progress.clone()
    }

    /// Reads what the consumer left (a tar reader stops at the
    /// end-of-archive blocks, before the padding), then checks the length
    /// against Content-Length and the digest against `expected_sha256`.
    pub fn finish(mut self) -> anyhow::Result<FetchSummary> {
        if let Some(e) = self.failed.take() {
            return Err(e.into());
        }
        while !self.eof {
            self.pos = self.chunk.len();
            match self.next_chunk() {
                Ok(Some(chunk)) => self.chunk = chunk,
                Ok(None) => self.eof = true,
                Err(e) => return Err(e.into()),
            }
        }
        if let Some(total) = self.total {
            if self.received != total {
                return Err(FetchError::Length {
                    url: self.url,
                    got: self.received,
                    total,
                }
                .into());
            }
        }
        let mut sha256 = None;
        if let (Some(expected), Some(hasher)) = (self.expected, self.hasher) {
            let actual = hex::encode(hasher.finalize());
            if expected != actual {
                return Err(FetchError::Digest {
                    url: self.url,
                    expected,
                    actual,
                }
                .into());
            }
            debug!("sha256 of {} verified", self.url);
            sha256 = Some(actual);
        }
        Ok(FetchSummary {
            bytes: self.received,
            sha256,
        })
    }

    /// "N of M bytes" for messages.
    fn describe_progress(&self) -> String {
        match self.total {
            Some(t) => format!("{} of {t} bytes", self.received),
            None => format!("{} bytes (size unknown)", self.received),
        }
    }

    /// The next chunk of the body, resuming as needed; `None` at the end.
    fn next_chunk(&mut self) -> Result<Option<Bytes>, FetchError> {
        loop {
            if self.response.is_none() {
                match self.reconnect() {
                    Ok(resp) => self.response = Some(resp),
                    Err(Attempt::Retry(cause)) => {
                        self.dropped(cause)?;
                        continue;
                    }
                    Err(Attempt::Fatal(e)) => return Err(e),
                }
            }
            let resp = self.response.as_mut().expect("connected above");
            let next = block_on_timeout(&self.handle, self.opts.stall_timeout, resp.chunk());
            let cause = match next {
                Ok(Ok(Some(chunk))) => {
                    if chunk.is_empty() {
                        continue;
                    }
                    if let Some(h) = self.hasher.as_mut() {
                        h.update(&chunk);
                    }
                    self.received += chunk.len() as u64;
                    self.progress.0.read.store(self.received, Ordering::Relaxed);
                    self.backoff = self.opts.initial_backoff;
                    return Ok(Some(chunk));
                }
                Ok(Ok(None)) => match self.total {
                    // A close-delimited body that ended short.
                    Some(t) if self.received < t => "the body ended early".to_string(),
                    _ => {
                        self.response = None;
                        return Ok(None);
                    }
                },
                Ok(Err(e)) => error_cause(&e),
                Err(_) => format!("no data for {:?}", self.opts.stall_timeout),
            };
            self.response = None;
            if self.total == Some(self.received) {
                // Everything arrived; only the end of the response was lost.
                return Ok(None);
            }
            self.dropped(cause)?;
        }
    }

    /// Counts a drop; gives up past `max_resumes`, else waits the backoff.
    fn dropped(&mut self, cause: String) -> Result<(), FetchError> {
        self.drops += 1;
        if self.drops > self.opts.max_resumes {
            return Err(FetchError::GaveUp {
                url: self.url.clone(),
                drops: self.drops,
                progress: self.describe_progress(),
                cause,
            });
        }
        warn!(
            "the connection to {} dropped after {} ({cause}); resuming in {:?} ({}/{})",
            self.url,
            self.describe_progress(),
            self.backoff,
            self.drops,
            self.opts.max_resumes
        );
        std::thread::sleep(self.backoff);
        self.backoff = (self.backoff * 2).min(MAX_BACKOFF);
        Ok(())
    }

    /// Asks for the rest of the body from `received` on. Only a 206 that
    /// starts exactly there will do: a 200 would repeat bytes the consumer
    /// already has.
    fn reconnect(&mut self) -> Result<reqwest::Response, Attempt> {
        let offset = self.received;
        let mut request = self.client.get(&self.url);
        if offset > 0 {
            request = request.header(RANGE, format!("bytes={offset}-"));
            if let Some(v) = &self.validator {
                request = request.header(IF_RANGE, v.clone());
            }
        }
        let sent = block_on_timeout(&self.handle, self.opts.stall_timeout, request.send());
        let resp = match sent {
            Ok(Ok(resp)) => resp,
            Ok(Err(e)) if e.is_redirect() || e.is_builder() => {
                return Err(Attempt::Fatal(FetchError::Request {
                    url: self.url.clone(),
                    cause: error_cause(&e),
                }))
            }
            Ok(Err(e)) => return Err(Attempt::Retry(error_cause(&e))),
            Err(_) => {
                return Err(Attempt::Retry(format!(
                    "no answer within {:?}",
                    self.opts.stall_timeout
                )))
            }
        };
        let status = resp.status();
        let no_resume = |reason: String| {
            Attempt::Fatal(FetchError::NoResume {
                url: self.url.clone(),
                progress: self.describe_progress(),
                reason,
            })
        };
        match status {
            StatusCode::OK if offset == 0 => {
                // Nothing consumed yet: a fresh start is fine.
                self.total = resp.content_length();
                self.progress
                    .0
                    .total
                    .store(self.total.unwrap_or(u64::MAX), Ordering::Relaxed);
                self.validator = validator_of(&resp);
                Ok(resp)
            }
            StatusCode::PARTIAL_CONTENT => {
                let header = resp
                    .headers()
                    .get(CONTENT_RANGE)
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("");
                match parse_content_range(header) {
                    Some((start, size)) if start == offset => match (size, self.total) {
                        (Some(s), Some(t)) if s != t => Err(no_resume(format!(
                            "the file changed size from {t} to {s} bytes"
                        ))),
                        _ => Ok(resp),
                    },
                    _ => Err(no_resume(format!(
                        "asked for bytes={offset}-, it answered Content-Range '{header}'"
                    ))),
                }
            }
            StatusCode::OK => Err(no_resume(format!(
                "asked for bytes={offset}-, it answered {status}: the server does not support \
                 ranges, or the file changed since the download began"
            ))),
            StatusCode::RANGE_NOT_SATISFIABLE => Err(no_resume(format!(
                "asked for bytes={offset}-, it answered {status}: the file shrank or changed"
            ))),
            s if retryable_status(s) => Err(Attempt::Retry(format!("answered {s}"))),
            s => Err(Attempt::Fatal(FetchError::Status {
                url: self.url.clone(),
                status: s.to_string(),
            })),
        }
    }
}

impl Read for Download {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        loop {
            if self.pos < self.chunk.len() {
                let n = buf.len().min(self.chunk.len() - self.pos);
                buf[..n].copy_from_slice(&self.chunk[self.pos..self.pos + n]);
                self.pos += n;
                return Ok(n);
            }
            if let Some(e) = &self.failed {
                return Err(e.clone().into_io());
            }
            if self.eof {
                return Ok(0);
            }
            match self.next_chunk() {
                Ok(Some(chunk)) => {
                    self.chunk = chunk;
                    self.pos = 0;
                }
                Ok(None) => {
                    self.chunk = Bytes::new();
                    self.pos = 0;
                    self.eof = true;
                }
                Err(e) => {
                    self.failed = Some(e.clone());
                    return Err(e.into_io());
                }
            }
        }
    }
}

/// Connection trouble and overload are worth a retry; other statuses are
/// final.
fn retryable_status(s: StatusCode) -> bool {
    s.is_server_error() || s == StatusCode::TOO_MANY_REQUESTS
}

/// The validator for `If-Range`: a strong ETag (a weak one never matches
/// there), else Last-Modified.
fn validator_of(resp: &reqwest::Response) -> Option<HeaderValue> {
    let etag = resp
        .headers()
        .get(ETAG)
        .filter(|v| !v.as_bytes().starts_with(b"W/"));
    etag.or_else(|| resp.headers().get(LAST_MODIFIED)).cloned()
}

/// `bytes <start>-<end>/<size|*>` → (start, size).
fn parse_content_range(v: &str) -> Option<(u64, Option<u64>)> {
    let rest = v.trim().strip_prefix("bytes ")?;
    let (range, size) = rest.split_once('/')?;
    let (start, _end) = range.split_once('-')?;
    let size = match size.trim() {
        "*" => None,
        s => Some(s.parse().ok()?),
    };
    Some((start.trim().parse().ok()?, size))
}

/// The causes under a reqwest error, without its "error sending request for
/// url (…)" top (the caller names the URL) and hyper's "client error (…)"
/// wrappers: e.g. "tcp connect error: Connection refused (os error 111)".
fn error_cause(e: &reqwest::Error) -> String {
    let mut parts = Vec::new();
    let mut cur = std::error::Error::source(e);
    while let Some(c) = cur {
        let s = c.to_string();
        if !s.starts_with("client error (") && !parts.contains(&s) {
            parts.push(s);
        }
        cur = c.source();
    }
    if parts.is_empty() {
        e.to_string()
    } else {
        parts.join(": ")
    }
}

/// Wraps `reader` in the decompressor its first bytes call for (gzip,
/// zstd, xz; anything else passes through for the consumer to judge).
/// The peeked bytes are chained back in front, so nothing is lost.
///
/// Multi-member gzip and multi-stream xz (parallel compressors write those)
/// decode whole. Errors of the decompressor read "corrupt <format> stream:
/// …"; errors of a [`Download`] underneath pass through unchanged.
pub fn decompress<'a>(reader: impl Read + 'a) -> anyhow::Result<(Compression, Box<dyn Read + 'a>)> {
    let mut reader = reader;
    let mut magic = [0u8; formats::SNIFF_LEN];
    let mut n = 0;
    while n < magic.len() {
        match reader.read(&mut magic[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e.into()),
        }
    }
    let compression = Compression::sniff(&magic[..n]);
    let whole = io::Cursor::new(magic[..n].to_vec()).chain(reader);
    let decoder: Box<dyn Read + 'a> = match compression {
        // bzip2 passes through too: the tar reader names it when it fails.
        Compression::None | Compression::Bzip2 => return Ok((compression, Box::new(whole))),
        Compression::Gzip => Box::new(flate2::read::MultiGzDecoder::new(whole)),
        Compression::Zstd => {
            let mut d = zstd::stream::read::Decoder::new(whole)?;
            // Accept frames made with --long (windows up to 2 GiB): the
            // user chose that; the default limit would call them corrupt.
            d.window_log_max(31)?;
            Box::new(d)
        }
        Compression::Xz => Box::new(liblzma::read::XzDecoder::new_multi_decoder(whole)),
    };
    Ok((
        compression,
        Box::new(Labelled {
            inner: decoder,
            compression,
        }),
    ))
}

/// Names the format in the decompressor's own errors.
struct Labelled<R> {
    inner: R,
    compression: Compression,
}

impl<R: Read> Read for Labelled<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.inner.read(buf).map_err(|e| {
            if FetchError::from_io(&e).is_some() || e.kind() == io::ErrorKind::Interrupted {
                e
            } else {
                io::Error::new(
                    e.kind(),
                    format!("corrupt {} stream: {e}", self.compression),
                )
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::time::Instant;
    use test_support::http_fixture::HttpFixture;

    /// Short waits so that the whole module stays fast.
    fn opts() -> FetchOptions {
        FetchOptions {
            initial_backoff: Duration::from_millis(10),
            stall_timeout: Duration::from_secs(5),
            ..FetchOptions::default()
        }
    }

    /// Incompressible bytes, different per seed.
    fn noise(len: usize, seed: u64) -> Arc<Vec<u8>> {
        let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
        let data = (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                (x >> 24) as u8
            })
            .collect();
        Arc::new(data)
    }

    /// Something compressible, like a tarball of text files.
    fn text(len: usize) -> Vec<u8> {
        let mut out = Vec::with_capacity(len);
        let mut i = 0u64;
        while out.len() < len {
            out.extend_from_slice(
                format!("line {i}: the quick brown fox {}\n", i * 7919 % 1000).as_bytes(),
            );
            i += 1;
        }
        out.truncate(len);
        out
    }

    fn sha(data: &[u8]) -> String {
        hex::encode(Sha256::digest(data))
    }

    fn serve(files: Vec<(&str, Arc<Vec<u8>>)>) -> HttpFixture {
        HttpFixture::start(
            files
                .into_iter()
                .map(|(p, d)| (p.to_string(), d.into()))
                .collect(),
        )
        .unwrap()
    }

    /// Runs `f` on a blocking thread, as the build methods do; a hang (a
    /// stall never detected) fails the test instead of blocking the run.
    async fn blocking<T: Send + 'static>(f: impl FnOnce(Handle) -> T + Send + 'static) -> T {
        let handle = Handle::current();
        let task = tokio::task::spawn_blocking(move || f(handle));
        tokio::time::timeout(Duration::from_secs(15), task)
            .await
            .expect("the download hung")
            .unwrap()
    }

    /// Opens, reads to the end, finishes.
    fn fetch_all(
        handle: Handle,
        url: &str,
        opts: FetchOptions,
    ) -> anyhow::Result<(Vec<u8>, FetchSummary)> {
        let mut d = open(handle, url, opts)?;
        let mut out = Vec::new();
        d.read_to_end(&mut out)?;
        Ok((out, d.finish()?))
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn downloads_byte_identical_and_checks_the_digest() {
        let data = noise(5 << 20, 1);
        let fx = serve(vec![("/rootfs.tar", data.clone())]);
        let url = fx.url("/rootfs.tar");
        let digest = sha(&data);

        let (u, d) = (url.clone(), digest.to_uppercase());
        let (out, summary, progress) = blocking(move |h| {
            let mut dl = open(
                h,
                &u,
                FetchOptions {
                    expected_sha256: Some(d),
                    ..opts()
                },
            )
            .unwrap();
            let progress = dl.progress();
            let mut out = Vec::new();
            dl.read_to_end(&mut out).unwrap();
            (out, dl.finish().unwrap(), progress)
        })
        .await;
        assert!(out == *data, "body differs");
        assert_eq!(
            summary,
            FetchSummary {
                bytes: data.len() as u64,
                sha256: Some(digest.clone())
            }
        );
        assert_eq!(progress.bytes_read(), data.len() as u64);
        assert_eq!(progress.total(), Some(data.len() as u64));

        let wrong = sha(b"something else");
        let (u, w) = (url.clone(), wrong.clone());
        let err = blocking(move |h| {
            fetch_all(
                h,
                &u,
                FetchOptions {
                    expected_sha256: Some(w),
                    ..opts()
                },
            )
        })
        .await
        .unwrap_err();
        let msg = format!("{err:#}");
        assert!(msg.contains(&format!("sha256 mismatch for {url}")), "{msg}");
        assert!(
            msg.contains(&format!("expected {wrong}, got {digest}")),
            "{msg}"
        );

        let u = url.clone();
        let err = blocking(move |h| {
            open(
                h,
                &u,
                FetchOptions {
                    expected_sha256: Some("abc123".into()),
                    ..opts()
                },
            )
            .err()
        })
        .await
        .expect("a short digest is refused");
        assert!(
            err.to_string()
                .contains("'abc123' is not 64 hexadecimal digits"),
            "{err}"
        );
        // Refused before any request.
        assert_eq!(fx.request_count(), 2);
    }

    /// The from-qcow2 method reads its download on a plain thread (see
    /// `read_ahead`), which has no runtime context of its own.
    #[tokio::test(flavor = "multi_thread")]
    async fn reads_from_a_thread_outside_the_runtime() {
        let data = noise(3 << 20, 2);
        let fx = serve(vec![("/disk.raw", data.clone())]);
        let url = fx.url("/disk.raw");
        let digest = sha(&data);
        let d = digest.clone();
        let (out, summary) = blocking(move |h| {
            std::thread::spawn(move || {
                let opts = FetchOptions {
                    expected_sha256: Some(d),
                    ..opts()
                };
                fetch_all(h, &url, opts)
            })
            .join()
            .unwrap()
        })
        .await
        .unwrap();
        assert!(out == *data, "body differs");
        assert_eq!(summary.sha256, Some(digest));
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn decompresses_gzip_zstd_xz_and_passes_plain_through() {
        let original = text(3 << 20);
        let gz = {
            // Two members, as pigz and concatenated files make.
            let half = original.len() / 2;
            let mut out = Vec::new();
            for part in [&original[..half], &original[half..]] {
                let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
                e.write_all(part).unwrap();
                out.extend(e.finish().unwrap());
            }
            out
        };
        let zst = zstd::encode_all(&original[..], 3).unwrap();
        let xz = {
            let mut out = Vec::new();
            liblzma::read::XzEncoder::new(&original[..], 1)
                .read_to_end(&mut out)
                .unwrap();
            out
        };
        assert!(gz.len() < original.len() / 2 && zst.len() < original.len() / 2);
        let fx = serve(vec![
            ("/r.tar.gz", Arc::new(gz.clone())),
            ("/r.tar.zst", Arc::new(zst)),
            ("/r.tar.xz", Arc::new(xz)),
            ("/r.tar", Arc::new(original.clone())),
        ]);
        for (path, want) in [
            ("/r.tar.gz", Compression::Gzip),
            ("/r.tar.zst", Compression::Zstd),
            ("/r.tar.xz", Compression::Xz),
            ("/r.tar", Compression::None),
        ] {
            let url = fx.url(path);
            let (compression, out, summary) = blocking(move |h| {
                let mut dl = open(h, &url, opts()).unwrap();
                let (compression, mut reader) = decompress(&mut dl).unwrap();
                let mut out = Vec::new();
                reader.read_to_end(&mut out).unwrap();
                drop(reader);
                (compression, out, dl.finish().unwrap())
            })
            .await;
            assert_eq!(compression, want, "{path}");
            assert!(out == original, "{path}: decompressed bytes differ");
            // No expected digest: nothing is hashed.
            assert_eq!(summary.sha256, None, "{path}");
        }
    }

    #[test]
    fn corrupt_streams_name_their_format() {
        let original = text(1 << 20);
        let mut gz = {
            let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
            e.write_all(&original).unwrap();
            e.finish().unwrap()
        };
        let mut zst = zstd::encode_all(&original[..], 3).unwrap();
        let mut xz = Vec::new();
        liblzma::read::XzEncoder::new(&original[..], 1)
            .read_to_end(&mut xz)
            .unwrap();
        for data in [&mut gz, &mut zst, &mut xz] {
            let mid = data.len() / 2;
            for b in &mut data[mid..mid + 64] {
                *b ^= 0x5a;
            }
        }
        for (data, name) in [(gz, "gzip"), (zst, "zstd"), (xz, "xz")] {
            let (_, mut reader) = decompress(io::Cursor::new(data)).unwrap();
            let err = io::copy(&mut reader, &mut io::sink()).expect_err(name);
            assert!(
                err.to_string()
                    .starts_with(&format!("corrupt {name} stream: ")),
                "{err}"
            );
        }
        // Garbage after a valid magic.
        let mut bad = vec![0x28, 0xb5, 0x2f, 0xfd];
        bad.extend_from_slice(&[0xff; 64]);
        let (c, mut reader) = decompress(&bad[..]).unwrap();
        assert_eq!(c, Compression::Zstd);
        let err = io::copy(&mut reader, &mut io::sink()).unwrap_err();
        assert!(err.to_string().contains("corrupt zstd stream"), "{err}");
        // Short and empty inputs pass through whole.
        for input in [&b""[..], b"\x1f", b"hello"] {
            let (c, mut reader) = decompress(input).unwrap();
            assert_eq!(c, Compression::None);
            let mut out = Vec::new();
            reader.read_to_end(&mut out).unwrap();
            assert_eq!(out, input);
        }
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn resumes_after_cuts_with_ranges() {
        let data = noise(3 << 20, 2);
        let fx = serve(vec![("/disk.img", data.clone())]);
        fx.cut_after(1_000_000, 2);
        let url = fx.url("/disk.img");
        let (out, summary) = blocking(move |h| fetch_all(h, &url, opts()).unwrap()).await;
        assert!(out == *data, "body differs after resumes");
        assert_eq!(summary.bytes, data.len() as u64);
        let log = fx.requests();
        let ranges: Vec<_> = log.iter().map(|r| r.range.as_deref()).collect();
        assert_eq!(
            ranges,
            [None, Some("bytes=1000000-"), Some("bytes=2000000-")]
        );
        // Resumes are pinned to the same version of the file.
        assert!(
            log[1]
                .if_range
                .as_deref()
                .is_some_and(|v| v.starts_with('"')),
            "{log:?}"
        );
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn gives_up_after_max_resumes() {
        let data = noise(2 << 20, 3);
        let fx = serve(vec![("/disk.img", data.clone())]);
        fx.cut_after(300_000, 10);
        let url = fx.url("/disk.img");
        let (err, consumed) = blocking(move |h| {
            let mut dl = open(
                h,
                &url,
                FetchOptions {
                    max_resumes: 2,
                    ..opts()
                },
            )
            .unwrap();
            let mut out = Vec::new();
            let err = dl.read_to_end(&mut out).unwrap_err();
            // A second read repeats the failure rather than inventing an end.
            assert!(dl.read(&mut [0; 16]).is_err());
            let finished = dl.finish().unwrap_err();
            assert!(
                finished.to_string().contains("dropped 3 times"),
                "{finished}"
            );
            (anyhow::Error::from(err), out.len())
        })
        .await;
        let msg = format!("{err:#}");
        assert!(
            msg.contains("dropped 3 times; gave up after 900000 of 2097152 bytes"),
            "{msg}"
        );
        assert!(
            err.chain()
                .any(|c| c.downcast_ref::<FetchError>().is_some()),
            "{msg}"
        );
        assert_eq!(consumed, 900_000);
        assert_eq!(fx.request_count(), 3);
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn resumes_after_a_stall() {
        let data = noise(2 << 20, 4);
        let fx = serve(vec![("/rootfs.tar", data.clone())]);
        fx.stall_after(500_000, 1);
        let url = fx.url("/rootfs.tar");
        let started = Instant::now();
        let (out, _) = blocking(move |h| {
            fetch_all(
                h,
                &url,
                FetchOptions {
                    stall_timeout: Duration::from_millis(300),
                    ..opts()
                },
            )
            .unwrap()
        })
        .await;
        assert!(out == *data, "body differs after a stall");
        assert!(started.elapsed() >= Duration::from_millis(300));
        let ranges: Vec<_> = fx.requests().into_iter().map(|r| r.range).collect();
        assert_eq!(ranges, [None, Some("bytes=500000-".to_string())]);
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn no_range_support_fails_clearly_instead_of_restarting() {
        let data = noise(2 << 20, 5);
        let fx = serve(vec![("/rootfs.tar", data.clone())]);
        fx.no_ranges();
        fx.cut_after(500_000, 1);
        let url = fx.url("/rootfs.tar");
        let (err, out) = blocking(move |h| {
            let mut dl = open(h, &url, opts()).unwrap();
            let mut out = Vec::new();
            let err = dl.read_to_end(&mut out).unwrap_err();
            (err, out)
        })
        .await;
        let msg = FetchError::from_io(&err)
            .expect("a download error")
            .to_string();
        assert!(
            msg.contains("dropped after 500000 of 2097152 bytes"),
            "{msg}"
        );
        assert!(
            msg.contains("200 OK") && msg.contains("does not support ranges"),
            "{msg}"
        );
        // The consumer got exactly the prefix, never the start again.
        assert!(out[..] == data[..500_000]);
        assert_eq!(fx.request_count(), 2);
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn a_changed_file_fails_clearly() {
        let fx = serve(vec![("/rootfs.tar", noise(1 << 20, 6))]);
        fx.cut_after(100_000, 1);
        let url = fx.url("/rootfs.tar");
        let fx = Arc::new(fx);
        let fx2 = fx.clone();
        let err = blocking(move |h| {
            let mut dl = open(h, &url, opts()).unwrap();
            let mut buf = vec![0; 50_000];
            dl.read_exact(&mut buf).unwrap();
            // Replaced while being downloaded: If-Range no longer matches.
            fx2.set_file("/rootfs.tar", noise(1 << 20, 7));
            io::copy(&mut dl, &mut io::sink()).unwrap_err()
        })
        .await;
        assert!(err.to_string().contains("download failed"), "{err}");
        let msg = FetchError::from_io(&err).unwrap().to_string();
        assert!(msg.contains("the file changed"), "{msg}");
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn http_errors_fail_fast_and_name_the_url() {
        let fx = serve(vec![]);
        let url = fx.url("/missing.tar.gz");
        let started = Instant::now();
        let u = url.clone();
        let err = blocking(move |h| open(h, &u, FetchOptions::default()).err())
            .await
            .unwrap();
        assert!(started.elapsed() < Duration::from_secs(2));
        assert_eq!(err.to_string(), format!("{url} answered 404 Not Found"));
        assert_eq!(fx.request_count(), 1, "a 4xx is final");

        fx.status(503);
        let u = url.clone();
        let err = blocking(move |h| open(h, &u, opts()).err()).await.unwrap();
        assert_eq!(
            err.to_string(),
            format!("{url} answered 503 Service Unavailable")
        );
        assert_eq!(
            fx.request_count(),
            1 + CONNECT_ATTEMPTS as usize,
            "5xx is retried"
        );
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn connection_refused_names_the_url() {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let url = format!("http://127.0.0.1:{port}/rootfs.tar");
        let u = url.clone();
        let err = blocking(move |h| open(h, &u, opts()).err()).await.unwrap();
        let msg = format!("{err:#}");
        assert!(
            msg.starts_with(&format!("cannot connect to {url}: ")),
            "{msg}"
        );
        assert!(msg.to_lowercase().contains("refused"), "{msg}");
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn follows_redirects() {
        let data = noise(100_000, 8);
        let fx = serve(vec![("/images/v2/rootfs.tar", data.clone())]);
        fx.redirect("/latest/rootfs.tar", "/images/v2/rootfs.tar");
        let url = fx.url("/latest/rootfs.tar");
        let (out, _) = blocking(move |h| fetch_all(h, &url, opts()).unwrap()).await;
        assert!(out == *data);
        let paths: Vec<_> = fx.requests().into_iter().map(|r| r.path).collect();
        assert_eq!(paths, ["/latest/rootfs.tar", "/images/v2/rootfs.tar"]);
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn finish_drains_what_the_consumer_left() {
        let data = noise(3 << 20, 9);
        let fx = serve(vec![("/rootfs.tar", data.clone())]);
        let url = fx.url("/rootfs.tar");
        let digest = sha(&data);
        let d = digest.clone();
        let summary = blocking(move |h| {
            let mut dl = open(
                h,
                &url,
                FetchOptions {
                    expected_sha256: Some(d),
                    ..opts()
                },
            )
            .unwrap();
            let mut head = [0u8; 10_000];
            dl.read_exact(&mut head).unwrap();
            dl.finish().unwrap()
        })
        .await;
        assert_eq!(
            summary,
            FetchSummary {
                bytes: data.len() as u64,
                sha256: Some(digest)
            }
        );
    }
}
