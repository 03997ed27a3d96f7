//! The artifact server: serves chosen files over HTTP under unguessable URLs.
//!
//! The original image tools served the rootfs with a bare `python -m
//! http.server` on a public port: the whole directory, listable, to anyone.
//! [`ArtifactServer`] serves only the files it was given, each under
//! `/<token>/<file name>` where the token is 128 bits from the OS random
//! generator (32 lowercase hex digits). `imgforge serve` ([`run_serve`]) runs
//! it from the command line; `imgforge build` embeds it.
//!
//! # What a request gets
//!
//! * The request path is never resolved against the filesystem. It must be
//!   exactly `/<token>/<name>`: two non-empty segments, the token compared as
//!   is, the name percent-decoded (strictly: a malformed escape is a miss) and
//!   compared byte for byte with the file's name. Anything else is `404`:
//!   `/`, `/<token>/`, `/../x`, `/<token>/../x`, `%2e%2e%2f`, `//`, a valid
//!   token with another name, a trailing slash. There is no listing.
//! * `GET` and `HEAD` only; another method on a served file is `405`.
//! * Headers: `Content-Length`, `Accept-Ranges: bytes`, a strong `ETag`
//!   (`"<sha256 hex>"`), `Last-Modified` (the mtime at [`ArtifactServer::add_file`]),
//!   `Content-Type: application/octet-stream`.
//! * `Range` (RFC 9110 §14), single ranges only:
//!   - `bytes=a-b`, `bytes=a-`, `bytes=-n` → `206` with `Content-Range`; an end
//!     past the last byte is clamped; a suffix longer than the file selects the
//!     whole file (still `206`).
//!   - a range that starts at or past the end, `bytes=-0`, any range of an
//!     empty file, and a range whose last position is before its first
//!     (`bytes=5-2`, invalid per §14.1.1) → `416` with `Content-Range: bytes */SIZE`.
//!   - **multiple ranges** (`bytes=0-1,5-6`) → the Range header is ignored and
//!     the whole file is sent with `200` (no `multipart/byteranges`; §14.2
//!     allows a server to ignore Range, and our clients — the agent's resume,
//!     curl, reqwest — only ask for single ranges).
//!   - a Range header that does not parse, or another unit → ignored, `200`.
//!   - `If-Range` with the current ETag (strong comparison) or exactly the
//!     `Last-Modified` date → the range is honoured; anything else (another
//!     ETag, a weak ETag, another date) → full `200`.
//! * The file must still be the one that was added: same size, mtime, device
//!   and inode. The server re-opens the path for every request and checks
//!   that before answering (a mismatch is `409 Conflict`, logged), and checks
//!   the open file again after every chunk while streaming (a mismatch aborts
//!   the connection: the client sees a short body against the
//!   `Content-Length` it was promised, never bytes that disagree with the
//!   advertised sha256 without notice).
//!
//! # How bytes are sent
//!
//! Each response body is read by one blocking thread (`spawn_blocking`) in
//! 256 KiB chunks into a bounded channel (4 chunks of read-ahead), which
//! hyper writes to the socket with vectored writes and no extra copy. We do
//! not use `sendfile(2)`: hyper owns the socket and its HTTP framing, and
//! handing the raw socket to sendfile would mean writing HTTP/1.1 ourselves;
//! the per-chunk identity check also needs the data to pass through us. The
//! file is in the page cache in practice, so the cost is one memcpy per byte,
//! which the `serve_throughput` benchmark measures against `curl file://`:
//! far above what a build server's network takes.
//!
//! # Lifetime
//!
//! [`ArtifactServer::shutdown`] and `Drop` stop accepting and drop every
//! connection, in-flight responses included (the accept task owns the
//! connection tasks in a `JoinSet`).

use std::collections::HashMap;
use std::convert::Infallible;
use std::fmt::Write as _;
use std::fs::File;
use std::io::{self, IsTerminal as _, Read as _, Seek as _, SeekFrom};
use std::net::SocketAddr;
use std::os::unix::fs::MetadataExt as _;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime};

use anyhow::{bail, Context as _};
use bytes::Bytes;
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper::header::{self, HeaderMap, HeaderValue};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use serde::Serialize;
use sha2::{Digest as _, Sha256};
use tokio::net::TcpListener;
use tokio::sync::{mpsc, oneshot};
use tokio::task::{JoinHandle, JoinSet};

/// Size of one read from the file (and of one body frame).
pub const CHUNK_SIZE: usize = 256 * 1024;
/// Chunks read ahead of the socket, per response.
const READ_AHEAD: usize = 4;
/// Bytes of randomness in a URL token.
const TOKEN_BYTES: usize = 16;
/// How long a client may take to send its request headers.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(30);
/// Interval of the plain progress log lines of `imgforge serve`.
const LOG_EVERY: Duration = Duration::from_secs(5);

/// Arguments of `imgforge serve`.
#[derive(Debug, Clone, clap::Args)]
pub struct ServeArgs {
    /// Files to serve; each gets its own unguessable URL.
    #[arg(required = true)]
    pub files: Vec<PathBuf>,
    /// Address to listen on. The default is loopback only; use e.g.
    /// 0.0.0.0:8080 for a remote build server.
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:0")]
    pub listen: SocketAddr,
    /// Base of the printed URLs (e.g. http://203.0.113.7:8080), when clients
    /// reach this host by another address than the listening one (NAT, port
    /// forward, a wildcard listen address).
    #[arg(long, value_name = "URL")]
    pub public_url: Option<String>,
}

/// A file being served, as printed by `imgforge serve`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ServedFile {
    /// The full URL, `<public base>/<token>/<percent-encoded name>`.
    pub url: String,
    /// The file on this machine.
    #[serde(rename = "path")]
    pub local_path: PathBuf,
    /// The file name part of the URL (lossily decoded when not UTF-8).
    pub name: String,
    /// Bytes.
    pub size: u64,
    /// Hex digest of the file's bytes, computed once when it was added.
    pub sha256: String,
}

/// Counters of an [`ArtifactServer`], see [`ArtifactServer::stats`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct ServeStats {
    /// Body bytes handed to the connections (HEAD and error bodies excluded).
    pub bytes_served: u64,
    /// `GET`/`HEAD` requests for a served file (whatever the outcome).
    pub requests: u64,
    /// Requests answered 404 or 405.
    pub rejected: u64,
    /// Response bodies being streamed right now.
    pub in_flight: u64,
}

/// A cheap, cloneable view of a server's counters, for progress displays.
#[derive(Clone)]
pub struct StatsHandle(Arc<Shared>);

impl StatsHandle {
    pub fn get(&self) -> ServeStats {
        self.0.stats()
    }
}

/// Identity of a file's content as far as metadata tells: a change of any
/// of these means the bytes may no longer match the sha256 we advertise.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Identity {
    size: u64,
    mtime: SystemTime,
    dev: u64,
    ino: u64,
}

impl Identity {
    fn of(meta: &std::fs::Metadata) -> io::Result<Identity> {
        Ok(Identity {
            size: meta.len(),
            mtime: meta.modified()?,
            dev: meta.dev(),
            ino: meta.ino(),
        })
    }
}

struct Entry {
    file: ServedFile,
    name_bytes: Vec<u8>,
    identity: Identity,
    etag: HeaderValue,
    last_modified: HeaderValue,
    /// Whole seconds since the epoch, for If-Range dates.
    mtime_secs: u64,
    bytes_served: AtomicU64,
    requests: AtomicU64,
}

struct Shared {
    files: RwLock<HashMap<String, Arc<Entry>>>,
    bytes_served: AtomicU64,
    requests: AtomicU64,
    rejected: AtomicU64,
    in_flight: AtomicU64,
}

impl Shared {
    fn stats(&self) -> ServeStats {
        ServeStats {
            bytes_served: self.bytes_served.load(Ordering::Relaxed),
            requests: self.requests.load(Ordering::Relaxed),
            rejected: self.rejected.load(Ordering::Relaxed),
            in_flight: self.in_flight.load(Ordering::Relaxed),
        }
    }
}

/// An HTTP server for a set of files, each at an unguessable URL.
///
/// Dropping it stops it (connections included); [`ArtifactServer::shutdown`]
/// does the same and waits until it has stopped.
pub struct ArtifactServer {
    addr: SocketAddr,
    public_base: String,
    shared: Arc<Shared>,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<()>>,
}

impl ArtifactServer {
    /// Binds `listen` (port 0 picks a free port) and starts serving (nothing
    /// yet: see [`ArtifactServer::add_file`]).
    ///
    /// `public_base` is the scheme, host, port and optional path prefix that
    /// clients use to reach this server (`http://203.0.113.7:8080`); the
    /// default is `http://<bound address>`.
    pub async fn start(
        listen: SocketAddr,
        public_base: Option<String>,
    ) -> anyhow::Result<ArtifactServer> {
        let listener = TcpListener::bind(listen)
            .await
            .with_context(|| format!("cannot listen on {listen}"))?;
        let addr = listener.local_addr()?;
        let public_base = match public_base {
            Some(base) => {
                let base = base.trim_end_matches('/').to_string();
                if !(base.starts_with("http://") || base.starts_with("https://"))
                    || base.contains(['?', '#', ' '])
                {
                    bail!("public URL {base:?}: expected http://HOST[:PORT][/PREFIX]");
                }
                base
            }
            None => {
                if addr.ip().is_unspecified() {
                    tracing::warn!(
                        "listening on {addr} (all interfaces): the URLs name {}, \
                         which clients cannot reach; pass a public URL (--public-url)",
                        addr.ip()
                    );
                }
                format!("http://{addr}")
            }
        };
        if !addr.ip().is_loopback() {
            tracing::warn!(
                "listening on {addr}: other machines can download the files \
                 from anyone who knows their URLs"
            );
        }
        let shared = Arc::new(Shared {
            files: RwLock::new(HashMap::new()),
            bytes_served: AtomicU64::new(0),
            requests: AtomicU64::new(0),
            rejected: AtomicU64::new(0),
            in_flight: AtomicU64::new(0),
        });
        let (stop_tx, stop_rx) = oneshot::channel();
        let task = tokio::spawn(accept_loop(listener, shared.clone(), stop_rx));
        tracing::debug!("artifact server listening on {addr}");
        Ok(ArtifactServer {
            addr,
            public_base,
            shared,
            stop: Some(stop_tx),
            task: Some(task),
        })
    }

    /// Adds a regular file: computes its sha256 (streamed, on a blocking
    /// thread) and gives it a fresh random URL. Adding the same path twice
    /// gives two URLs.
    pub async fn add_file(&self, path: impl AsRef<Path>) -> anyhow::Result<ServedFile> {
        let path = path.as_ref().to_path_buf();
        let name_os = path
            .file_name()
            .with_context(|| format!("{}: not a file name", path.display()))?
            .to_owned();
        let name_bytes = name_os.as_encoded_bytes().to_vec();
        let hash_path = path.clone();
        let (identity, sha256) = tokio::task::spawn_blocking(move || hash_file(&hash_path))
            .await
            .context("hashing task")??;
        let token = new_token()?;
        let url = format!(
            "{}/{}/{}",
            self.public_base,
            token,
            percent_encode(&name_bytes)
        );
        let mtime_secs = identity
            .mtime
            .duration_since(SystemTime::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let file = ServedFile {
            url,
            local_path: path,
            name: name_os.to_string_lossy().into_owned(),
            size: identity.size,
            sha256,
        };
        let entry = Entry {
            etag: HeaderValue::from_str(&format!("\"{}\"", file.sha256))?,
            last_modified: HeaderValue::from_str(&httpdate::fmt_http_date(identity.mtime))?,
            mtime_secs,
            name_bytes,
            identity,
            bytes_served: AtomicU64::new(0),
            requests: AtomicU64::new(0),
            file: file.clone(),
        };
        self.shared
            .files
            .write()
            .expect("file map lock")
            .insert(token, Arc::new(entry));
        tracing::debug!(
            "serving {} ({} bytes)",
            file.local_path.display(),
            file.size
        );
        Ok(file)
    }

    /// The bound address (with the actual port when 0 was asked).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The base of the URLs, without a trailing slash.
    pub fn public_base(&self) -> &str {
        &self.public_base
    }

    /// Body bytes handed to connections so far, all files together.
    pub fn bytes_served(&self) -> u64 {
        self.shared.bytes_served.load(Ordering::Relaxed)
    }

    /// Body bytes of one file handed to connections so far (0 for a file
    /// this server does not serve).
    pub fn file_bytes_served(&self, file: &ServedFile) -> u64 {
        self.entry_of(file)
            .map(|e| e.bytes_served.load(Ordering::Relaxed))
            .unwrap_or(0)
    }

    /// Requests (`GET`/`HEAD`) for one file so far.
    pub fn file_requests(&self, file: &ServedFile) -> u64 {
        self.entry_of(file)
            .map(|e| e.requests.load(Ordering::Relaxed))
            .unwrap_or(0)
    }

    /// All counters at once.
    pub fn stats(&self) -> ServeStats {
        self.shared.stats()
    }

    /// A handle on the counters that outlives borrows of the server (for a
    /// progress task).
    pub fn stats_handle(&self) -> StatsHandle {
        StatsHandle(self.shared.clone())
    }

    /// Stops accepting, drops every connection (in-flight responses are cut)
    /// and waits for the server task to end.
    pub async fn shutdown(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
    }

    fn entry_of(&self, file: &ServedFile) -> Option<Arc<Entry>> {
        let rest = file.url.strip_prefix(&self.public_base)?;
        let (token, _) = rest.strip_prefix('/')?.split_once('/')?;
        let entry = self
            .shared
            .files
            .read()
            .expect("file map lock")
            .get(token)?
            .clone();
        (entry.file.url == file.url).then_some(entry)
    }
}

impl Drop for ArtifactServer {
    fn drop(&mut self) {
        if let Some(task) = self.task.take() {
            // Dropping the accept future drops its JoinSet, which aborts
            // every connection task.
            task.abort();
        }
    }
}

/// Text that `imgforge serve` prints on start: one line per file,
/// `URL  SIZE  SHA256` (two spaces between columns), or with `json` a
/// pretty-printed array of [`ServedFile`] objects (`url`, `path`, `name`,
/// `size`, `sha256`). Ends with a newline.
pub fn format_listing(files: &[ServedFile], json: bool) -> String {
    if json {
        let mut s = serde_json::to_string_pretty(files).expect("ServedFile serialises");
        s.push('\n');
        s
    } else {
        let mut s = String::new();
        for f in files {
            let _ = writeln!(s, "{}  {}  {}", f.url, f.size, f.sha256);
        }
        s
    }
}

/// The final line of `imgforge serve`.
pub fn format_summary(stats: &ServeStats) -> String {
    let mut s = format!(
        "served {} bytes to {} requests",
        stats.bytes_served, stats.requests
    );
    if stats.rejected > 0 {
        let _ = write!(s, " ({} rejected)", stats.rejected);
    }
    s
}

/// `imgforge serve FILE... [--listen ADDR] [--public-url URL]`: prints the
/// URLs (see [`format_listing`]) on stdout, shows progress on stderr, and
/// serves until Ctrl-C or SIGTERM; then prints [`format_summary`] on stderr
/// and returns `Ok` (exit status 0).
///
/// Builds its own tokio runtime: call it from `main`, not from async code
/// (there, use [`ArtifactServer`] directly).
pub fn run_serve(args: ServeArgs, json: bool) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("tokio runtime")?;
    let result = rt.block_on(serve_until_signal(args, json));
    // Readers of dropped responses end on their own once their channel is
    // closed; do not let a slow disk hold the exit.
    rt.shutdown_timeout(Duration::from_secs(2));
    let stats = result?;
    eprintln!("{}", format_summary(&stats));
    Ok(())
}

async fn serve_until_signal(args: ServeArgs, json: bool) -> anyhow::Result<ServeStats> {
    let server = ArtifactServer::start(args.listen, args.public_url).await?;
    let mut files = Vec::with_capacity(args.files.len());
    for path in &args.files {
        tracing::info!("hashing {}", path.display());
        files.push(
            server
                .add_file(path)
                .await
                .with_context(|| format!("cannot serve {}", path.display()))?,
        );
    }
    {
        use std::io::Write as _;
        let mut out = std::io::stdout().lock();
        out.write_all(format_listing(&files, json).as_bytes())?;
        out.flush()?;
    }
    tracing::info!(
        "serving {} file(s) on {}; Ctrl-C to stop",
        files.len(),
        server.addr()
    );
    let progress = Progress::start(server.stats_handle());
    wait_for_signal().await?;
    progress.finish();
    tracing::info!("stopping");
    let stats_handle = server.stats_handle();
    server.shutdown().await;
    Ok(stats_handle.get())
}

async fn wait_for_signal() -> anyhow::Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).context("SIGTERM handler")?;
    tokio::select! {
        r = tokio::signal::ctrl_c() => r.context("Ctrl-C handler")?,
        _ = term.recv() => {}
    }
    Ok(())
}

/// Bytes served, as an indicatif spinner on a terminal, or as a `tracing`
/// line every few seconds (when something changed) otherwise.
struct Progress {
    task: JoinHandle<()>,
    bar: Option<indicatif::ProgressBar>,
}

impl Progress {
    fn start(stats: StatsHandle) -> Progress {
        if std::io::stderr().is_terminal() {
            let bar = indicatif::ProgressBar::with_draw_target(
                None,
                indicatif::ProgressDrawTarget::stderr(),
            );
            bar.set_style(
                indicatif::ProgressStyle::with_template(
                    "{spinner} served {bytes} ({bytes_per_sec}) {msg}",
                )
                .expect("progress template"),
            );
            let b = bar.clone();
            let task = tokio::spawn(async move {
                let mut tick = tokio::time::interval(Duration::from_millis(200));
                loop {
                    tick.tick().await;
                    let s = stats.get();
                    b.set_position(s.bytes_served);
                    b.set_message(format!(
                        "to {} requests, {} in progress",
                        s.requests, s.in_flight
                    ));
                    b.tick();
                }
            });
            Progress {
                task,
                bar: Some(bar),
            }
        } else {
            let task = tokio::spawn(async move {
                let mut last = ServeStats::default();
                let mut tick = tokio::time::interval(LOG_EVERY);
                tick.tick().await;
                loop {
                    tick.tick().await;
                    let s = stats.get();
                    if s != last {
                        tracing::info!(
                            "served {} bytes to {} requests, {} in progress",
                            s.bytes_served,
                            s.requests,
                            s.in_flight
                        );
                        last = s;
                    }
                }
            });
            Progress { task, bar: None }
        }
    }

    fn finish(self) {
        self.task.abort();
        if let Some(bar) = self.bar {
            bar.finish_and_clear();
        }
    }
}

fn new_token() -> anyhow::Result<String> {
    let mut bytes = [0u8; TOKEN_BYTES];
    getrandom::fill(&mut bytes).map_err(|e| anyhow::anyhow!("OS random generator: {e}"))?;
    Ok(hex::encode(bytes))
}

/// Streams the file through sha256; fails if it is not a regular file or
/// changed while being read.
fn hash_file(path: &Path) -> anyhow::Result<(Identity, String)> {
    let mut file = File::open(path).with_context(|| format!("open {}", path.display()))?;
    let meta = file.metadata()?;
    if !meta.is_file() {
        bail!("{}: not a regular file", path.display());
    }
    let before = Identity::of(&meta)?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; CHUNK_SIZE];
    let mut total = 0u64;
    loop {
        let n = match file.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e).with_context(|| format!("read {}", path.display())),
        };
        hasher.update(&buf[..n]);
        total += n as u64;
    }
    let after = Identity::of(&file.metadata()?)?;
    if before != after || total != before.size {
        bail!("{}: changed while it was being hashed", path.display());
    }
    Ok((before, hex::encode(hasher.finalize())))
}

/// Percent-encodes everything but RFC 3986 unreserved characters.
fn percent_encode(bytes: &[u8]) -> String {
    let mut s = String::with_capacity(bytes.len());
    for &b in bytes {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            s.push(b as char);
        } else {
            let _ = write!(s, "%{b:02X}");
        }
    }
    s
}

/// Strict percent-decoding: `None` for a `%` not followed by two hex digits.
fn percent_decode(s: &str) -> Option<Vec<u8>> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hi = (*b.get(i + 1)? as char).to_digit(16)?;
            let lo = (*b.get(i + 2)? as char).to_digit(16)?;
            out.push((hi * 16 + lo) as u8);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    Some(out)
}

/// `/<token>/<name>` → (token, decoded name); `None` for any other shape.
fn parse_target(path: &str) -> Option<(&str, Vec<u8>)> {
    let (token, name) = path.strip_prefix('/')?.split_once('/')?;
    if token.is_empty() || name.is_empty() || name.contains('/') {
        return None;
    }
    Some((token, percent_decode(name)?))
}

/// One `byte-range-spec` of a Range header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ByteRange {
    /// `first-[last]`
    From(u64, Option<u64>),
    /// `-suffix`
    Suffix(u64),
}

/// What a Range header asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum RangeRequest {
    /// No header, a header we ignore (other unit, malformed), or several
    /// ranges: send the whole file.
    Whole,
    /// One range.
    One(ByteRange),
    /// A well-formed but invalid range (`last < first`): 416.
    Invalid,
}

/// Decimal digits only (no sign, no spaces); saturates on overflow.
fn parse_pos(s: &str) -> Option<u64> {
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    Some(s.parse::<u64>().unwrap_or(u64::MAX))
}

fn parse_range(value: &str) -> RangeRequest {
    let Some((unit, set)) = value.trim().split_once('=') else {
        return RangeRequest::Whole;
    };
    if !unit.trim().eq_ignore_ascii_case("bytes") || set.contains(',') {
        return RangeRequest::Whole;
    }
    let Some((first, last)) = set.trim().split_once('-') else {
        return RangeRequest::Whole;
    };
    let (first, last) = (first.trim(), last.trim());
    if first.is_empty() {
        return match parse_pos(last) {
            Some(n) => RangeRequest::One(ByteRange::Suffix(n)),
            None => RangeRequest::Whole,
        };
    }
    let Some(first) = parse_pos(first) else {
        return RangeRequest::Whole;
    };
    if last.is_empty() {
        return RangeRequest::One(ByteRange::From(first, None));
    }
    match parse_pos(last) {
        Some(last) if last < first => RangeRequest::Invalid,
        Some(last) => RangeRequest::One(ByteRange::From(first, Some(last))),
        None => RangeRequest::Whole,
    }
}

/// The inclusive byte interval of `range` in a file of `size` bytes, or
/// `None` when it is unsatisfiable.
fn resolve_range(range: ByteRange, size: u64) -> Option<(u64, u64)> {
    if size == 0 {
        return None;
    }
    match range {
        ByteRange::From(first, _) if first >= size => None,
        ByteRange::From(first, last) => Some((first, last.unwrap_or(u64::MAX).min(size - 1))),
        ByteRange::Suffix(0) => None,
        ByteRange::Suffix(n) => Some((size.saturating_sub(n), size - 1)),
    }
}

/// Whether an `If-Range` value still designates the file (RFC 9110 §13.1.5):
/// a strong match of the ETag, or exactly the Last-Modified date.
fn if_range_matches(value: &str, entry: &Entry) -> bool {
    let value = value.trim();
    if value.starts_with("W/") {
        return false;
    }
    if value.starts_with('"') {
        return value.as_bytes() == entry.etag.as_bytes();
    }
    match httpdate::parse_http_date(value) {
        Ok(t) => t
            .duration_since(SystemTime::UNIX_EPOCH)
            .is_ok_and(|d| d.as_secs() == entry.mtime_secs),
        Err(_) => false,
    }
}

/// What to send for a served file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Plan {
    Full,
    Partial(u64, u64),
    Unsatisfiable,
}

fn plan(headers: &HeaderMap, entry: &Entry) -> Plan {
    let Some(range) = headers.get(header::RANGE).and_then(|v| v.to_str().ok()) else {
        return Plan::Full;
    };
    if let Some(if_range) = headers.get(header::IF_RANGE) {
        let ok = if_range.to_str().is_ok_and(|v| if_range_matches(v, entry));
        if !ok {
            return Plan::Full;
        }
    }
    match parse_range(range) {
        RangeRequest::Whole => Plan::Full,
        RangeRequest::Invalid => Plan::Unsatisfiable,
        RangeRequest::One(r) => match resolve_range(r, entry.identity.size) {
            Some((a, b)) => Plan::Partial(a, b),
            None => Plan::Unsatisfiable,
        },
    }
}

/// Response body: empty, a small fixed text, or a file range read by a
/// blocking thread.
struct ServeBody {
    kind: BodyKind,
}

enum BodyKind {
    Fixed(Option<Bytes>),
    Stream(FileStream),
}

struct FileStream {
    rx: mpsc::Receiver<io::Result<Bytes>>,
    remaining: u64,
    entry: Arc<Entry>,
    shared: Arc<Shared>,
}

impl Drop for FileStream {
    fn drop(&mut self) {
        self.shared.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

impl ServeBody {
    fn empty() -> ServeBody {
        ServeBody {
            kind: BodyKind::Fixed(None),
        }
    }

    fn text(s: &'static str) -> ServeBody {
        ServeBody {
            kind: BodyKind::Fixed(Some(Bytes::from_static(s.as_bytes()))),
        }
    }
}

impl Body for ServeBody {
    type Data = Bytes;
    type Error = io::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, io::Error>>> {
        match &mut self.get_mut().kind {
            BodyKind::Fixed(b) => Poll::Ready(b.take().map(|b| Ok(Frame::data(b)))),
            BodyKind::Stream(s) => {
                if s.remaining == 0 {
                    return Poll::Ready(None);
                }
                match s.rx.poll_recv(cx) {
                    Poll::Pending => Poll::Pending,
                    Poll::Ready(Some(Ok(chunk))) => {
                        let n = chunk.len() as u64;
                        s.remaining = s.remaining.saturating_sub(n);
                        s.shared.bytes_served.fetch_add(n, Ordering::Relaxed);
                        s.entry.bytes_served.fetch_add(n, Ordering::Relaxed);
                        Poll::Ready(Some(Ok(Frame::data(chunk))))
                    }
                    Poll::Ready(Some(Err(e))) => Poll::Ready(Some(Err(e))),
                    Poll::Ready(None) => Poll::Ready(Some(Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "file reader ended early",
                    )))),
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.kind {
            BodyKind::Fixed(b) => b.is_none(),
            BodyKind::Stream(s) => s.remaining == 0,
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.kind {
            BodyKind::Fixed(b) => SizeHint::with_exact(b.as_ref().map_or(0, |b| b.len() as u64)),
            BodyKind::Stream(s) => SizeHint::with_exact(s.remaining),
        }
    }
}

async fn accept_loop(listener: TcpListener, shared: Arc<Shared>, mut stop: oneshot::Receiver<()>) {
    let mut conns = JoinSet::new();
    loop {
        tokio::select! {
            _ = &mut stop => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    let _ = stream.set_nodelay(true);
                    conns.spawn(serve_connection(stream, peer, shared.clone()));
                }
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning.
                    tracing::warn!("accept: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            },
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
        }
    }
    conns.abort_all();
    while conns.join_next().await.is_some() {}
}

async fn serve_connection(stream: tokio::net::TcpStream, peer: SocketAddr, shared: Arc<Shared>) {
    let service = hyper::service::service_fn(move |req| {
        let shared = shared.clone();
        async move { Ok::<_, Infallible>(handle(&shared, req, peer).await) }
    });
    let result = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT)
        .serve_connection(TokioIo::new(stream), service)
        .await;
    if let Err(e) = result {
        tracing::debug!("connection from {peer}: {e}");
    }
}

fn simple(status: StatusCode, body: &'static str) -> Response<ServeBody> {
    let mut resp = Response::new(ServeBody::text(body));
    *resp.status_mut() = status;
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    h.insert(header::CONTENT_LENGTH, HeaderValue::from(body.len()));
    resp
}

async fn handle(
    shared: &Arc<Shared>,
    req: Request<Incoming>,
    peer: SocketAddr,
) -> Response<ServeBody> {
    let entry = parse_target(req.uri().path()).and_then(|(token, name)| {
        let files = shared.files.read().expect("file map lock");
        files.get(token).filter(|e| e.name_bytes == name).cloned()
    });
    let Some(entry) = entry else {
        shared.rejected.fetch_add(1, Ordering::Relaxed);
        tracing::debug!("404 {} {:?} from {peer}", req.method(), req.uri().path());
        return simple(StatusCode::NOT_FOUND, "not found\n");
    };
    let head = match *req.method() {
        Method::GET => false,
        Method::HEAD => true,
        _ => {
            shared.rejected.fetch_add(1, Ordering::Relaxed);
            let mut resp = simple(StatusCode::METHOD_NOT_ALLOWED, "method not allowed\n");
            resp.headers_mut()
                .insert(header::ALLOW, HeaderValue::from_static("GET, HEAD"));
            return resp;
        }
    };
    shared.requests.fetch_add(1, Ordering::Relaxed);
    entry.requests.fetch_add(1, Ordering::Relaxed);

    let opened = {
        let entry = entry.clone();
        tokio::task::spawn_blocking(move || open_checked(&entry)).await
    };
    let file = match opened {
        Ok(Ok(file)) => file,
        Ok(Err(OpenError::Changed(why))) => {
            tracing::error!(
                "refusing to serve {}: {why} since it was added (sha256 {} no longer \
                 describes it); add it again",
                entry.file.local_path.display(),
                entry.file.sha256
            );
            return simple(
                StatusCode::CONFLICT,
                "the file changed on the server since it was published\n",
            );
        }
        Ok(Err(OpenError::Io(e))) => {
            tracing::error!("cannot serve {}: {e}", entry.file.local_path.display());
            return simple(StatusCode::INTERNAL_SERVER_ERROR, "cannot read the file\n");
        }
        Err(e) => {
            tracing::error!("cannot serve {}: {e}", entry.file.local_path.display());
            return simple(StatusCode::INTERNAL_SERVER_ERROR, "cannot read the file\n");
        }
    };

    let size = entry.identity.size;
    let (status, start, len) = match plan(req.headers(), &entry) {
        Plan::Full => (StatusCode::OK, 0, size),
        Plan::Partial(a, b) => (StatusCode::PARTIAL_CONTENT, a, b - a + 1),
        Plan::Unsatisfiable => {
            let mut resp = Response::new(ServeBody::empty());
            *resp.status_mut() = StatusCode::RANGE_NOT_SATISFIABLE;
            let h = resp.headers_mut();
            h.insert(header::CONTENT_LENGTH, HeaderValue::from(0));
            h.insert(
                header::CONTENT_RANGE,
                HeaderValue::from_str(&format!("bytes */{size}")).expect("ascii"),
            );
            h.insert(header::ACCEPT_RANGES, HeaderValue::from_static("bytes"));
            h.insert(header::ETAG, entry.etag.clone());
            return resp;
        }
    };
    tracing::debug!(
        "{status} {} {} [{start}, +{len}) to {peer}",
        req.method(),
        entry.file.name
    );

    let body = if head || len == 0 {
        ServeBody::empty()
    } else {
        shared.in_flight.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = mpsc::channel(READ_AHEAD);
        let reader_entry = entry.clone();
        tokio::task::spawn_blocking(move || read_range(file, &reader_entry, start, len, tx));
        ServeBody {
            kind: BodyKind::Stream(FileStream {
                rx,
                remaining: len,
                entry: entry.clone(),
                shared: shared.clone(),
            }),
        }
    };
    let mut resp = Response::new(body);
    *resp.status_mut() = status;
    let h = resp.headers_mut();
    h.insert(header::CONTENT_LENGTH, HeaderValue::from(len));
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/octet-stream"),
    );
    h.insert(header::ACCEPT_RANGES, HeaderValue::from_static("bytes"));
    h.insert(header::ETAG, entry.etag.clone());
    h.insert(header::LAST_MODIFIED, entry.last_modified.clone());
    if status == StatusCode::PARTIAL_CONTENT {
        let end = start + len - 1;
        h.insert(
            header::CONTENT_RANGE,
            HeaderValue::from_str(&format!("bytes {start}-{end}/{size}")).expect("ascii"),
        );
    }
    resp
}

enum OpenError {
    Changed(&'static str),
    Io(io::Error),
}

/// Opens the served path and checks it is still the file that was added.
fn open_checked(entry: &Entry) -> Result<File, OpenError> {
    let file = match File::open(&entry.file.local_path) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            return Err(OpenError::Changed("it was removed"))
        }
        Err(e) => return Err(OpenError::Io(e)),
    };
    let meta = file.metadata().map_err(OpenError::Io)?;
    let now = Identity::of(&meta).map_err(OpenError::Io)?;
    match change_of(&entry.identity, &now) {
        Some(why) => Err(OpenError::Changed(why)),
        None => Ok(file),
    }
}

fn change_of(then: &Identity, now: &Identity) -> Option<&'static str> {
    if then.dev != now.dev || then.ino != now.ino {
        Some("it was replaced by another file")
    } else if then.size != now.size {
        Some("its size changed")
    } else if then.mtime != now.mtime {
        Some("its modification time changed")
    } else {
        None
    }
}

/// Reads `[start, start+len)` in [`CHUNK_SIZE`] chunks into `tx`, checking
/// after each read that the file has not changed. Runs on a blocking thread;
/// ends early when the receiver is gone (client disconnected).
fn read_range(
    mut file: File,
    entry: &Entry,
    start: u64,
    len: u64,
    tx: mpsc::Sender<io::Result<Bytes>>,
) {
    let fail = |tx: &mpsc::Sender<io::Result<Bytes>>, e: io::Error| {
        tracing::error!(
            "aborting a download of {}: {e}",
            entry.file.local_path.display()
        );
        let _ = tx.blocking_send(Err(e));
    };
    if let Err(e) = file.seek(SeekFrom::Start(start)) {
        return fail(&tx, e);
    }
    let mut remaining = len;
    while remaining > 0 {
        let want = remaining.min(CHUNK_SIZE as u64) as usize;
        let mut buf = Vec::with_capacity(want);
        match (&mut file).take(want as u64).read_to_end(&mut buf) {
            Ok(n) if n == want => {}
            Ok(_) => {
                return fail(
                    &tx,
                    io::Error::new(io::ErrorKind::UnexpectedEof, "the file got shorter"),
                )
            }
            Err(e) => return fail(&tx, e),
        }
        let changed = file
            .metadata()
            .and_then(|m| Identity::of(&m))
            .map(|now| change_of(&entry.identity, &now));
        match changed {
            Ok(None) => {}
            Ok(Some(why)) => return fail(&tx, io::Error::other(format!("{why} while serving it"))),
            Err(e) => return fail(&tx, e),
        }
        remaining -= want as u64;
        if tx.blocking_send(Ok(Bytes::from(buf))).is_err() {
            return; // the response was dropped
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets() {
        assert_eq!(parse_target("/abc/x.tar"), Some(("abc", b"x.tar".to_vec())));
        assert_eq!(parse_target("/abc/a%20b"), Some(("abc", b"a b".to_vec())));
        assert_eq!(
            parse_target("/abc/%2e%2e%2fetc"),
            Some(("abc", b"../etc".to_vec()))
        );
        for bad in [
            "", "/", "//", "/abc", "/abc/", "//abc/x", "/abc//x", "/abc/x/", "/abc/x/y",
            "/abc/%zz", "/abc/%2", "abc/x",
        ] {
            assert_eq!(parse_target(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn percent_round_trip() {
        let name = b"rootfs v1+x%?#\xff.tar.zst";
        let enc = percent_encode(name);
        assert_eq!(enc, "rootfs%20v1%2Bx%25%3F%23%FF.tar.zst");
        assert_eq!(percent_decode(&enc).unwrap(), name);
    }

    #[test]
    fn ranges() {
        use ByteRange::*;
        use RangeRequest::*;
        assert_eq!(parse_range("bytes=0-0"), One(From(0, Some(0))));
        assert_eq!(parse_range("bytes=5-"), One(From(5, None)));
        assert_eq!(parse_range("bytes=-7"), One(Suffix(7)));
        assert_eq!(parse_range("Bytes = 1 - 2"), One(From(1, Some(2))));
        assert_eq!(parse_range("bytes=5-2"), Invalid);
        assert_eq!(parse_range("bytes=0-1,4-5"), Whole);
        assert_eq!(parse_range("items=0-1"), Whole);
        assert_eq!(parse_range("bytes=a-b"), Whole);
        assert_eq!(parse_range("bytes=+1-2"), Whole);
        assert_eq!(parse_range("bytes=-"), Whole);
        assert_eq!(parse_range("bytes"), Whole);
        assert_eq!(
            parse_range("bytes=99999999999999999999999-"),
            One(From(u64::MAX, None))
        );

        assert_eq!(resolve_range(From(0, Some(0)), 10), Some((0, 0)));
        assert_eq!(resolve_range(From(3, Some(100)), 10), Some((3, 9)));
        assert_eq!(resolve_range(From(9, None), 10), Some((9, 9)));
        assert_eq!(resolve_range(From(10, None), 10), None);
        assert_eq!(resolve_range(Suffix(1), 10), Some((9, 9)));
        assert_eq!(resolve_range(Suffix(20), 10), Some((0, 9)));
        assert_eq!(resolve_range(Suffix(0), 10), None);
        assert_eq!(resolve_range(From(0, None), 0), None);
        assert_eq!(resolve_range(Suffix(5), 0), None);
    }

    #[test]
    fn tokens_are_long_and_distinct() {
        let a = new_token().unwrap();
        let b = new_token().unwrap();
        assert_eq!(a.len(), 32);
        assert!(a.bytes().all(|c| c.is_ascii_hexdigit()));
        assert_ne!(a, b);
    }
}
