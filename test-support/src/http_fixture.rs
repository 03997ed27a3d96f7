//! A small HTTP/1.1 file server on 127.0.0.1 for tests, with fault
//! injection: cut or stalled bodies, no range support, forced statuses and
//! redirects.
//!
//! It is written directly on tokio's TCP sockets rather than on hyper: a
//! "cut after N bytes" fault must put exactly N body bytes on the wire and
//! then close, which a server framework's own buffering cannot promise.
//! It speaks enough HTTP/1.1 for real clients (reqwest, curl, busybox wget):
//! keep-alive, HEAD, a single `Range` (`a-b`, `a-`, `-n`) with 206 and
//! `Content-Range`, 416 past the end, `If-Range`, ETag and Content-Length.

use std::collections::HashMap;
use std::io::SeekFrom;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::UNIX_EPOCH;

use anyhow::{Context, Result};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncSeekExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::{JoinHandle, JoinSet};

/// What a path serves: bytes in memory, or a file read at request time.
#[derive(Clone, Debug)]
pub enum FileSource {
    Bytes(Arc<Vec<u8>>),
    Path(PathBuf),
}

impl From<Arc<Vec<u8>>> for FileSource {
    fn from(b: Arc<Vec<u8>>) -> Self {
        FileSource::Bytes(b)
    }
}

impl From<Vec<u8>> for FileSource {
    fn from(b: Vec<u8>) -> Self {
        FileSource::Bytes(Arc::new(b))
    }
}

impl From<PathBuf> for FileSource {
    fn from(p: PathBuf) -> Self {
        FileSource::Path(p)
    }
}

/// One request as the server saw it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RequestLog {
    pub method: String,
    pub path: String,
    /// The `Range` header, verbatim.
    pub range: Option<String>,
    /// The `If-Range` header, verbatim.
    pub if_range: Option<String>,
}

#[derive(Default)]
struct Faults {
    /// (body bytes, responses left)
    cut: Option<(u64, u32)>,
    stall: Option<(u64, u32)>,
    no_ranges: bool,
    status: Option<u16>,
    redirects: HashMap<String, String>,
}

/// A served file and, for bytes in memory, its ETag (hashed once).
struct Served {
    source: FileSource,
    etag: Option<String>,
}

impl Served {
    fn new(source: FileSource) -> Served {
        use std::hash::{Hash, Hasher};
        let etag = match &source {
            FileSource::Bytes(b) => {
                let mut h = std::collections::hash_map::DefaultHasher::new();
                b.hash(&mut h);
                Some(format!("\"{:x}-{:016x}\"", b.len(), h.finish()))
            }
            FileSource::Path(_) => None,
        };
        Served { source, etag }
    }
}

struct State {
    files: Mutex<HashMap<String, Served>>,
    faults: Mutex<Faults>,
    log: Mutex<Vec<RequestLog>>,
}

/// The running server. Dropping it stops the server and every open
/// connection (stalled ones included).
pub struct HttpFixture {
    addr: SocketAddr,
    state: Arc<State>,
    task: JoinHandle<()>,
}

impl HttpFixture {
    /// Binds 127.0.0.1:0 and serves `files` (paths like `/rootfs.tar.gz`)
    /// on a background task. Must be called inside a tokio runtime.
    pub fn start(files: Vec<(String, FileSource)>) -> Result<HttpFixture> {
        let listener = std::net::TcpListener::bind("127.0.0.1:0")
            .context("bind the HTTP fixture on 127.0.0.1")?;
        listener.set_nonblocking(true)?;
        let listener = TcpListener::from_std(listener)
            .context("the HTTP fixture must be started inside a tokio runtime")?;
        let addr = listener.local_addr()?;
        let state = Arc::new(State {
            files: Mutex::new(
                files
                    .into_iter()
                    .map(|(path, source)| (path, Served::new(source)))
                    .collect(),
            ),
            faults: Mutex::new(Faults::default()),
            log: Mutex::new(Vec::new()),
        });
        let task = tokio::spawn(accept_loop(listener, state.clone()));
        Ok(HttpFixture { addr, state, task })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://127.0.0.1:<port><path>`.
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    /// Adds or replaces a file (its ETag changes with it).
    pub fn set_file(&self, path: &str, source: impl Into<FileSource>) {
        self.state
            .files
            .lock()
            .unwrap()
            .insert(path.to_string(), Served::new(source.into()));
    }

    /// The next `times` file responses with a body close the connection
    /// after `bytes` body bytes (a FIN: the client sees a short body).
    pub fn cut_after(&self, bytes: u64, times: u32) {
        self.state.faults.lock().unwrap().cut = Some((bytes, times));
    }

    /// The next `times` file responses send `bytes` body bytes and then go
    /// silent with the connection left open.
    pub fn stall_after(&self, bytes: u64, times: u32) {
        self.state.faults.lock().unwrap().stall = Some((bytes, times));
    }

    /// Ignore `Range` from now on: always 200 with the whole file.
    pub fn no_ranges(&self) {
        self.state.faults.lock().unwrap().no_ranges = true;
    }

    /// Answer every request with `code` (and a short text body).
    pub fn status(&self, code: u16) {
        self.state.faults.lock().unwrap().status = Some(code);
    }

    /// Answer `from` with a 302 to `to` (a path or an absolute URL).
    pub fn redirect(&self, from: &str, to: &str) {
        self.state
            .faults
            .lock()
            .unwrap()
            .redirects
            .insert(from.to_string(), to.to_string());
    }

    /// Removes every fault set so far.
    pub fn clear_faults(&self) {
        *self.state.faults.lock().unwrap() = Faults::default();
    }

    /// Every request seen so far, in order.
    pub fn requests(&self) -> Vec<RequestLog> {
        self.state.log.lock().unwrap().clone()
    }

    /// How many requests were seen so far.
    pub fn request_count(&self) -> usize {
        self.state.log.lock().unwrap().len()
    }
}

impl Drop for HttpFixture {
    fn drop(&mut self) {
        // The accept loop owns the connections' JoinSet: aborting it drops
        // the set, which aborts every connection task.
        self.task.abort();
    }
}

async fn accept_loop(listener: TcpListener, state: Arc<State>) {
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    connections.spawn(serve_connection(stream, state.clone()));
                }
                Err(_) => tokio::time::sleep(std::time::Duration::from_millis(10)).await,
            },
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
        }
    }
}

struct Request {
    method: String,
    path: String,
    headers: Vec<(String, String)>,
    keep_alive: bool,
}

impl Request {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// What to do after the head and the first body bytes.
enum Ending {
    Complete,
    Cut(u64),
    Stall(u64),
}

async fn serve_connection(stream: TcpStream, state: Arc<State>) {
    let (read, mut write) = stream.into_split();
    let mut read = BufReader::new(read);
    loop {
        let Ok(Some(request)) = read_request(&mut read).await else {
            return;
        };
        match respond(&mut write, &request, &state).await {
            Ok(true) if request.keep_alive => {}
            _ => return,
        }
    }
}

/// Reads one request head (and discards a body it announces).
async fn read_request<R: tokio::io::AsyncBufRead + Unpin>(
    read: &mut R,
) -> std::io::Result<Option<Request>> {
    let mut line = String::new();
    // Tolerate empty lines before a request (RFC 9112 2.2).
    loop {
        line.clear();
        if read.read_line(&mut line).await? == 0 {
            return Ok(None);
        }
        if !line.trim().is_empty() {
            break;
        }
    }
    let mut parts = line.split_whitespace();
    let (Some(method), Some(target), Some(version)) = (parts.next(), parts.next(), parts.next())
    else {
        return Ok(None);
    };
    let (method, target, version) = (method.to_string(), target.to_string(), version.to_string());
    let mut headers = Vec::new();
    let mut head_size = line.len();
    loop {
        line.clear();
        if read.read_line(&mut line).await? == 0 {
            return Ok(None);
        }
        head_size += line.len();
        if head_size > 64 * 1024 {
            return Ok(None);
        }
        let l = line.trim_end_matches(['\r', '\n']);
        if l.is_empty() {
            break;
        }
        if let Some((k, v)) = l.split_once(':') {
            headers.push((k.trim().to_string(), v.trim().to_string()));
        }
    }
    let connection = headers
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case("connection"))
        .map(|(_, v)| v.to_ascii_lowercase());
    let keep_alive = match connection.as_deref() {
        Some(c) if c.contains("close") => false,
        Some(c) if c.contains("keep-alive") => true,
        _ => version == "HTTP/1.1",
    };
    let body_len: u64 = headers
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case("content-length"))
        .and_then(|(_, v)| v.parse().ok())
        .unwrap_or(0);
    if body_len > 0 {
        tokio::io::copy(&mut read.take(body_len), &mut tokio::io::sink()).await?;
    }
    // An absolute-form target (from a proxy-style client) keeps its path.
    let path = match target.split_once("://") {
        Some((_, rest)) => rest.find('/').map_or("/".into(), |i| rest[i..].to_string()),
        None => target,
    };
    let path = path.split('?').next().unwrap_or("/").to_string();
    Ok(Some(Request {
        method,
        path,
        headers,
        keep_alive,
    }))
}

/// Writes one response; `Ok(true)` when the connection may be reused.
async fn respond<W: tokio::io::AsyncWrite + Unpin>(
    write: &mut W,
    request: &Request,
    state: &State,
) -> std::io::Result<bool> {
    state.log.lock().unwrap().push(RequestLog {
        method: request.method.clone(),
        path: request.path.clone(),
        range: request.header("range").map(str::to_string),
        if_range: request.header("if-range").map(str::to_string),
    });
    let head_only = request.method == "HEAD";
    if request.method != "GET" && !head_only {
        return simple(
            write,
            405,
            "Method Not Allowed",
            &[("Allow", "GET, HEAD")],
            head_only,
        )
        .await;
    }
    let (status, redirect, no_ranges) = {
        let f = state.faults.lock().unwrap();
        (
            f.status,
            f.redirects.get(&request.path).cloned(),
            f.no_ranges,
        )
    };
    if let Some(code) = status {
        return simple(write, code, reason(code), &[], head_only).await;
    }
    if let Some(to) = redirect {
        return simple(write, 302, "Found", &[("Location", &to)], head_only).await;
    }
    let served = state
        .files
        .lock()
        .unwrap()
        .get(&request.path)
        .map(|s| (s.source.clone(), s.etag.clone()));
    let Some((source, etag)) = served else {
        return simple(write, 404, "Not Found", &[], head_only).await;
    };
    let Ok((len, etag, last_modified)) = describe(&source, etag).await else {
        return simple(write, 404, "Not Found", &[], head_only).await;
    };

    // A Range counts only when ranges are on and If-Range (if any) still
    // names this version of the file.
    let range_header = request.header("range").filter(|_| !no_ranges);
    let validator_ok = match request.header("if-range") {
        None => true,
        Some(v) => v == etag || last_modified.as_deref() == Some(v),
    };
    let range = match range_header
        .filter(|_| validator_ok)
        .map(|r| parse_range(r, len))
    {
        None | Some(RangeSpec::Ignore) => None,
        Some(RangeSpec::Unsatisfiable) => {
            let cr = format!("bytes */{len}");
            return simple(
                write,
                416,
                "Range Not Satisfiable",
                &[("Content-Range", &cr)],
                head_only,
            )
            .await;
        }
        Some(RangeSpec::Bytes(a, b)) => Some((a, b)),
    };

    let (code, start, body_len) = match range {
        Some((a, b)) => (206, a, b - a + 1),
        None => (200, 0, len),
    };
    let mut head = format!(
        "HTTP/1.1 {code} {}\r\nContent-Type: application/octet-stream\r\nContent-Length: {body_len}\r\nETag: {etag}\r\n",
        reason(code)
    );
    if !no_ranges {
        head.push_str("Accept-Ranges: bytes\r\n");
    }
    if let Some(lm) = &last_modified {
        head.push_str(&format!("Last-Modified: {lm}\r\n"));
    }
    if let Some((a, b)) = range {
        head.push_str(&format!("Content-Range: bytes {a}-{b}/{len}\r\n"));
    }
    head.push_str(if request.keep_alive {
        "Connection: keep-alive\r\n\r\n"
    } else {
        "Connection: close\r\n\r\n"
    });
    write.write_all(head.as_bytes()).await?;
    if head_only {
        write.flush().await?;
        return Ok(true);
    }

    let ending = {
        let mut f = state.faults.lock().unwrap();
        if let Some((bytes, times)) = f.cut.filter(|(_, t)| *t > 0) {
            f.cut = Some((bytes, times - 1));
            Ending::Cut(bytes)
        } else if let Some((bytes, times)) = f.stall.filter(|(_, t)| *t > 0) {
            f.stall = Some((bytes, times - 1));
            Ending::Stall(bytes)
        } else {
            Ending::Complete
        }
    };
    let send = match ending {
        Ending::Complete => body_len,
        Ending::Cut(n) | Ending::Stall(n) => n.min(body_len),
    };
    write_body(write, &source, start, send).await?;
    write.flush().await?;
    match ending {
        Ending::Cut(_) if send < body_len => Ok(false),
        Ending::Stall(_) if send < body_len => {
            std::future::pending::<()>().await;
            Ok(false)
        }
        _ => Ok(true),
    }
}

async fn simple<W: tokio::io::AsyncWrite + Unpin>(
    write: &mut W,
    code: u16,
    reason: &str,
    extra: &[(&str, &str)],
    head_only: bool,
) -> std::io::Result<bool> {
    let body = format!("{code} {reason}\n");
    let mut head = format!(
        "HTTP/1.1 {code} {reason}\r\nContent-Type: text/plain\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (k, v) in extra {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str("\r\n");
    write.write_all(head.as_bytes()).await?;
    if !head_only {
        write.write_all(body.as_bytes()).await?;
    }
    write.flush().await?;
    Ok(true)
}

/// Length, ETag and (for files on disk) Last-Modified.
async fn describe(
    source: &FileSource,
    etag: Option<String>,
) -> std::io::Result<(u64, String, Option<String>)> {
    match source {
        FileSource::Bytes(b) => Ok((b.len() as u64, etag.unwrap_or_default(), None)),
        FileSource::Path(p) => {
            let m = tokio::fs::metadata(p).await?;
            let mtime = m
                .modified()
                .ok()
                .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
                .unwrap_or_default();
            let etag = format!(
                "\"{:x}-{:x}.{:x}\"",
                m.len(),
                mtime.as_secs(),
                mtime.subsec_nanos()
            );
            Ok((m.len(), etag, Some(http_date(mtime.as_secs()))))
        }
    }
}

async fn write_body<W: tokio::io::AsyncWrite + Unpin>(
    write: &mut W,
    source: &FileSource,
    start: u64,
    len: u64,
) -> std::io::Result<()> {
    const CHUNK: usize = 64 * 1024;
    match source {
        FileSource::Bytes(b) => {
            let body = &b[start as usize..(start + len) as usize];
            for chunk in body.chunks(CHUNK) {
                write.write_all(chunk).await?;
            }
        }
        FileSource::Path(p) => {
            let mut f = tokio::fs::File::open(p).await?;
            f.seek(SeekFrom::Start(start)).await?;
            let mut left = len;
            let mut buf = vec![0u8; CHUNK];
            while left > 0 {
                let want = left.min(CHUNK as u64) as usize;
                let n = f.read(&mut buf[..want]).await?;
                if n == 0 {
                    return Err(std::io::ErrorKind::UnexpectedEof.into());
                }
                write.write_all(&buf[..n]).await?;
                left -= n as u64;
            }
        }
    }
    Ok(())
}

enum RangeSpec {
    /// Not a single byte range we understand: serve the whole file.
    Ignore,
    Unsatisfiable,
    /// Inclusive bounds.
    Bytes(u64, u64),
}

fn parse_range(header: &str, len: u64) -> RangeSpec {
    let Some(spec) = header.trim().strip_prefix("bytes=") else {
        return RangeSpec::Ignore;
    };
    if spec.contains(',') {
        return RangeSpec::Ignore;
    }
    let Some((a, b)) = spec.trim().split_once('-') else {
        return RangeSpec::Ignore;
    };
    let (a, b) = (a.trim(), b.trim());
    if a.is_empty() {
        // Suffix: the last n bytes.
        return match b.parse::<u64>() {
            Ok(0) => RangeSpec::Unsatisfiable,
            Ok(_) if len == 0 => RangeSpec::Unsatisfiable,
            Ok(n) => RangeSpec::Bytes(len.saturating_sub(n), len - 1),
            Err(_) => RangeSpec::Ignore,
        };
    }
    let Ok(first) = a.parse::<u64>() else {
        return RangeSpec::Ignore;
    };
    let last = if b.is_empty() {
        None
    } else {
        match b.parse::<u64>() {
            Ok(l) if l >= first => Some(l),
            _ => return RangeSpec::Ignore,
        }
    };
    if first >= len {
        return RangeSpec::Unsatisfiable;
    }
    RangeSpec::Bytes(first, last.map_or(len - 1, |l| l.min(len - 1)))
}

fn reason(code: u16) -> &'static str {
    match code {
        200 => "OK",
        206 => "Partial Content",
        301 => "Moved Permanently",
        302 => "Found",
        400 => "Bad Request",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        416 => "Range Not Satisfiable",
        429 => "Too Many Requests",
        500 => "Internal Server Error",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        _ => "Status",
    }
}

/// IMF-fixdate (RFC 9110 5.6.7) of a Unix time.
fn http_date(secs: u64) -> String {
    const DAYS: [&str; 7] = ["Thu", "Fri", "Sat", "Sun", "Mon", "Tue", "Wed"];
    const MONTHS: [&str; 12] = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    let days = secs / 86400;
    let rem = secs % 86400;
    // Civil from days (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{}, {:02} {} {} {:02}:{:02}:{:02} GMT",
        DAYS[(days % 7) as usize],
        day,
        MONTHS[(month - 1) as usize],
        year,
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges() {
        assert!(matches!(
            parse_range("bytes=0-9", 100),
            RangeSpec::Bytes(0, 9)
        ));
        assert!(matches!(
            parse_range("bytes=90-", 100),
            RangeSpec::Bytes(90, 99)
        ));
        assert!(matches!(
            parse_range("bytes=90-500", 100),
            RangeSpec::Bytes(90, 99)
        ));
        assert!(matches!(
            parse_range("bytes=-10", 100),
            RangeSpec::Bytes(90, 99)
        ));
        assert!(matches!(
            parse_range("bytes=-500", 100),
            RangeSpec::Bytes(0, 99)
        ));
        assert!(matches!(
            parse_range("bytes=100-", 100),
            RangeSpec::Unsatisfiable
        ));
        assert!(matches!(
            parse_range("bytes=0-1,5-6", 100),
            RangeSpec::Ignore
        ));
        assert!(matches!(parse_range("items=0-1", 100), RangeSpec::Ignore));
    }

    #[test]
    fn dates() {
        assert_eq!(http_date(0), "Thu, 01 Jan 1970 00:00:00 GMT");
        assert_eq!(http_date(784_111_777), "Sun, 06 Nov 1994 08:49:37 GMT");
    }

    #[tokio::test]
    async fn serves_heads_ranges_and_faults() {
        let data: Vec<u8> = (0..1000u32).map(|i| i as u8).collect();
        let fx = HttpFixture::start(vec![("/f".into(), data.clone().into())]).unwrap();
        let mut s = TcpStream::connect(fx.addr()).await.unwrap();
        s.write_all(b"GET /f HTTP/1.1\r\nHost: x\r\nRange: bytes=10-19\r\n\r\nHEAD /f HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .await
            .unwrap();
        let mut out = Vec::new();
        s.read_to_end(&mut out).await.unwrap();
        let text = String::from_utf8_lossy(&out);
        assert!(
            text.starts_with("HTTP/1.1 206 Partial Content\r\n"),
            "{text}"
        );
        assert!(
            text.contains("Content-Range: bytes 10-19/1000\r\n"),
            "{text}"
        );
        assert!(text.contains("\r\n\r\n\n\x0b\x0c\r\x0e\x0f\x10\x11\x12\x13HTTP/1.1 200 OK\r\n"));
        assert!(text.ends_with("Connection: close\r\n\r\n"), "{text}");

        fx.cut_after(100, 1);
        let mut s = TcpStream::connect(fx.addr()).await.unwrap();
        s.write_all(b"GET /f HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        let mut out = Vec::new();
        s.read_to_end(&mut out).await.unwrap();
        let body_at = out.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
        assert_eq!(&out[body_at..], &data[..100]);
        let log = fx.requests();
        assert_eq!(log.len(), 3);
        assert_eq!(log[0].range.as_deref(), Some("bytes=10-19"));
        assert_eq!(log[1].method, "HEAD");
    }
}
