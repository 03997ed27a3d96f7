//! A real S3 server on 127.0.0.1 for tests: moto's server mode
//! (`moto_server`, installed by `scripts/setup.sh` into `/opt/imgforge/venv`),
//! and [`S3FaultProxy`], a pass-through in front of it that fails or holds
//! part uploads.
//!
//! moto implements the multipart upload calls (CreateMultipartUpload,
//! UploadPart, CompleteMultipartUpload, AbortMultipartUpload,
//! ListMultipartUploads) and does not check request signatures by default,
//! so a client under test signs with any key, and the helpers here (fixtures
//! and inspection) speak plain unsigned HTTP (with a dummy `Authorization`
//! header, [`UNSIGNED_AUTHORIZATION`]), path style
//! (`{endpoint}/{bucket}/{key}`). Every [`S3Server`] is its own moto process
//! with its own (in-memory) buckets.

use std::io::{Read, Seek, SeekFrom};
use std::net::{Ipv4Addr, SocketAddr};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use axum::body::Body;
use axum::http::{HeaderMap, Request, Response, StatusCode};
use reqwest::Url;
use serde::Deserialize;
use tokio::task::{JoinHandle, JoinSet};

/// Where `scripts/setup.sh` installs moto's server (`scripts/tools.list`).
pub const MOTO_SERVER: &str = "/opt/imgforge/venv/bin/moto_server";

/// The command that installs it (the words of `setup.sh --check`).
pub const MOTO_INSTALL: &str =
    "python3 -m venv /opt/imgforge/venv && /opt/imgforge/venv/bin/pip install 'moto[server]==5.2.6'";

/// The `Authorization` header of the helpers' requests. moto checks no
/// signature, but a request without `Authorization` is anonymous and is
/// refused (403) where the object's ACL is private, e.g. a GetObject; any
/// header makes it the account's own request. A client that reads objects
/// from moto (the fake's snapshot import) sends this one too.
pub const UNSIGNED_AUTHORIZATION: &str = "AWS test:unsigned";

/// How long moto may take to answer its first request.
const START_TIMEOUT: Duration = Duration::from_secs(30);

/// A moto S3 server on `127.0.0.1:<free port>`, killed (its whole process
/// group) when dropped.
pub struct S3Server {
    child: Child,
    port: u16,
    http: reqwest::Client,
    /// Holds moto's log (`moto.log`).
    dir: tempfile::TempDir,
}

impl Drop for S3Server {
    fn drop(&mut self) {
        kill_group(&mut self.child);
    }
}

fn kill_group(child: &mut Child) {
    let pid = child.id() as libc::pid_t;
    // SAFETY: kill(2) with a negative pid signals the process group that
    // `spawn` made with `process_group(0)`: the child's own group, which holds
    // only moto and what it started.
    unsafe {
        libc::kill(-pid, libc::SIGKILL);
    }
    let _ = child.wait();
}

/// Why moto did not start: it exited (perhaps its port was taken: worth
/// another try), or it did not answer in time.
enum StartError {
    Exited(anyhow::Error),
    TimedOut(anyhow::Error),
}
use StartError::{Exited, TimedOut};

/// The program to run: `$IMGFORGE_MOTO_SERVER` or [`MOTO_SERVER`].
fn moto_program() -> Result<PathBuf> {
    let path = std::env::var_os("IMGFORGE_MOTO_SERVER")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(MOTO_SERVER));
    if !path.is_file() {
        bail!(
            "{} is not installed: {MOTO_INSTALL} (or set IMGFORGE_MOTO_SERVER to a moto_server)",
            path.display()
        );
    }
    Ok(path)
}

/// The last `max` bytes of a log file, as text.
fn log_tail(path: &Path, max: u64) -> String {
    let Ok(mut f) = std::fs::File::open(path) else {
        return String::from("(no log)");
    };
    let len = f.metadata().map(|m| m.len()).unwrap_or(0);
    let _ = f.seek(SeekFrom::Start(len.saturating_sub(max)));
    let mut buf = Vec::new();
    let _ = f.read_to_end(&mut buf);
    String::from_utf8_lossy(&buf).into_owned()
}

impl S3Server {
    /// Starts moto on a free loopback port and waits until it answers HTTP
    /// (at most 30 s).
    pub async fn start() -> Result<S3Server> {
        let program = moto_program()?;
        let mut headers = reqwest::header::HeaderMap::new();
        headers.insert(
            reqwest::header::AUTHORIZATION,
            reqwest::header::HeaderValue::from_static(UNSIGNED_AUTHORIZATION),
        );
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(60))
            .default_headers(headers)
            .build()?;
        // The port is free when chosen; another process may take it before
        // moto binds it, which shows as moto exiting early: try again.
        let mut attempt = 0;
        loop {
            attempt += 1;
            let dir = tempfile::Builder::new().prefix("moto-").tempdir()?;
            let log = std::fs::File::create(dir.path().join("moto.log"))?;
            let port = std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?
                .local_addr()?
                .port();
            let child = Command::new(&program)
                .args(["-H", "127.0.0.1", "-p", &port.to_string()])
                .stdin(Stdio::null())
                .stdout(log.try_clone()?)
                .stderr(log)
                .process_group(0)
                .spawn()
                .with_context(|| format!("run {}", program.display()))?;
            // From here on, Drop kills it.
            let mut server = S3Server {
                child,
                port,
                http: http.clone(),
                dir,
            };
            match server.wait_ready().await {
                Ok(()) => return Ok(server),
                Err(Exited(e)) if attempt < 3 => drop(e),
                Err(Exited(e) | TimedOut(e)) => return Err(e),
            }
        }
    }

    async fn wait_ready(&mut self) -> Result<(), StartError> {
        let deadline = Instant::now() + START_TIMEOUT;
        let log = self.log_path();
        loop {
            if let Some(status) = self.child.try_wait().map_err(|e| TimedOut(e.into()))? {
                return Err(Exited(anyhow!(
                    "moto_server exited ({status}) before answering; its log ends:\n{}",
                    log_tail(&log, 2000)
                )));
            }
            let probe = self
                .http
                .get(self.endpoint())
                .timeout(Duration::from_secs(2))
                .send()
                .await;
            if probe.is_ok() {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(TimedOut(anyhow!(
                    "moto_server did not answer on {} within {START_TIMEOUT:?}; its log ends:\n{}",
                    self.endpoint(),
                    log_tail(&log, 2000)
                )));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// `http://127.0.0.1:PORT`, the S3 endpoint (path style).
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// moto's output so far.
    pub fn log_path(&self) -> PathBuf {
        self.dir.path().join("moto.log")
    }

    /// `{endpoint}/{bucket}[/{key}]`, each part percent-encoded (a key's
    /// `/` kept).
    fn url(&self, bucket: &str, key: Option<&str>) -> Url {
        let mut url = Url::parse(&self.endpoint()).expect("a valid endpoint");
        {
            let mut segs = url.path_segments_mut().expect("an http URL");
            segs.clear().push(bucket);
            if let Some(key) = key {
                segs.extend(key.split('/'));
            }
        }
        url
    }

    /// CreateBucket (in moto's default region).
    pub async fn create_bucket(&self, bucket: &str) -> Result<()> {
        let resp = self.http.put(self.url(bucket, None)).send().await?;
        check(resp, &format!("create bucket {bucket}")).await?;
        Ok(())
    }

    /// PutObject.
    pub async fn put_object(&self, bucket: &str, key: &str, body: Vec<u8>) -> Result<()> {
        let resp = self
            .http
            .put(self.url(bucket, Some(key)))
            .body(body)
            .send()
            .await?;
        check(resp, &format!("put {bucket}/{key}")).await?;
        Ok(())
    }

    /// GetObject: the object's bytes, or `None` if there is no such key
    /// (an unknown bucket is an error).
    pub async fn get_object(&self, bucket: &str, key: &str) -> Result<Option<Vec<u8>>> {
        let resp = self.http.get(self.url(bucket, Some(key))).send().await?;
        if resp.status() == StatusCode::NOT_FOUND {
            let body = resp.text().await.unwrap_or_default();
            if body.contains("<Code>NoSuchKey</Code>") {
                return Ok(None);
            }
            bail!("get {bucket}/{key}: 404 {body}");
        }
        let resp = check(resp, &format!("get {bucket}/{key}")).await?;
        Ok(Some(resp.bytes().await?.to_vec()))
    }

    /// ListObjectsV2: every key of the bucket, in S3's (lexicographic) order.
    pub async fn list_objects(&self, bucket: &str) -> Result<Vec<String>> {
        let mut keys = Vec::new();
        let mut token: Option<String> = None;
        loop {
            let mut url = self.url(bucket, None);
            url.query_pairs_mut().append_pair("list-type", "2");
            if let Some(t) = &token {
                url.query_pairs_mut().append_pair("continuation-token", t);
            }
            let resp = check(self.http.get(url).send().await?, "list objects").await?;
            let list: ListBucketResult =
                quick_xml::de::from_str(&resp.text().await?).context("parse ListBucketResult")?;
            keys.extend(list.contents.into_iter().map(|c| c.key));
            match (list.is_truncated, list.next_continuation_token) {
                (true, Some(t)) => token = Some(t),
                _ => return Ok(keys),
            }
        }
    }

    /// ListMultipartUploads: `(key, upload id)` of every upload in progress
    /// (started, neither completed nor aborted).
    pub async fn list_multipart_uploads(&self, bucket: &str) -> Result<Vec<(String, String)>> {
        let mut uploads = Vec::new();
        let mut marker: Option<(String, String)> = None;
        loop {
            let mut url = self.url(bucket, None);
            url.query_pairs_mut().append_key_only("uploads");
            if let Some((key, id)) = &marker {
                url.query_pairs_mut()
                    .append_pair("key-marker", key)
                    .append_pair("upload-id-marker", id);
            }
            let resp = check(self.http.get(url).send().await?, "list multipart uploads").await?;
            let list: ListMultipartUploadsResult = quick_xml::de::from_str(&resp.text().await?)
                .context("parse ListMultipartUploadsResult")?;
            uploads.extend(list.uploads.into_iter().map(|u| (u.key, u.upload_id)));
            match (
                list.is_truncated,
                list.next_key_marker,
                list.next_upload_id_marker,
            ) {
                (true, Some(k), Some(u)) => marker = Some((k, u)),
                _ => return Ok(uploads),
            }
        }
    }
}

/// The response if it is a success, else an error with its status and body.
async fn check(resp: reqwest::Response, what: &str) -> Result<reqwest::Response> {
    if resp.status().is_success() {
        Ok(resp)
    } else {
        let status = resp.status();
        let body = resp.text().await.unwrap_or_default();
        bail!("{what}: {status} {body}")
    }
}

#[derive(Deserialize)]
struct ListBucketResult {
    #[serde(rename = "Contents", default)]
    contents: Vec<Contents>,
    #[serde(rename = "IsTruncated", default)]
    is_truncated: bool,
    #[serde(rename = "NextContinuationToken")]
    next_continuation_token: Option<String>,
}

#[derive(Deserialize)]
struct Contents {
    #[serde(rename = "Key")]
    key: String,
}

#[derive(Deserialize)]
struct ListMultipartUploadsResult {
    #[serde(rename = "Upload", default)]
    uploads: Vec<Upload>,
    #[serde(rename = "IsTruncated", default)]
    is_truncated: bool,
    #[serde(rename = "NextKeyMarker")]
    next_key_marker: Option<String>,
    #[serde(rename = "NextUploadIdMarker")]
    next_upload_id_marker: Option<String>,
}

#[derive(Deserialize)]
struct Upload {
    #[serde(rename = "Key")]
    key: String,
    #[serde(rename = "UploadId")]
    upload_id: String,
}

// ---------------------------------------------------------------------------
// The fault-injecting proxy

/// A pass-through HTTP proxy on `127.0.0.1:<free port>` in front of an S3
/// endpoint (a client uses [`S3FaultProxy::endpoint`] instead of the
/// server's). Every request is forwarded unchanged (method, path and query,
/// headers but `Host` and hop-by-hop ones, body), except UploadPart
/// requests (`PUT` with `partNumber` and `uploadId` query parameters), which
/// it may fail ([`S3FaultProxy::fail_part_uploads`]) or hold
/// ([`S3FaultProxy::hang_after_parts`]). Dropping it closes every
/// connection, held ones included.
pub struct S3FaultProxy {
    addr: SocketAddr,
    state: Arc<Mutex<ProxyState>>,
    task: JoinHandle<()>,
}

#[derive(Default)]
struct ProxyState {
    fail: u32,
    hang_after: Option<u32>,
    forwarded_parts: u32,
    attempts: Vec<u32>,
    failed: u32,
    requests: Vec<(String, String)>,
}

#[derive(Clone)]
struct Proxy {
    upstream: String,
    http: reqwest::Client,
    state: Arc<Mutex<ProxyState>>,
}

impl Drop for S3FaultProxy {
    fn drop(&mut self) {
        // The accept loop owns every connection's task: aborting it drops
        // them all, and held requests with them.
        self.task.abort();
    }
}

/// What the proxy does with one request.
enum Action {
    Fail,
    Hang,
    Forward,
}

impl S3FaultProxy {
    /// Binds `127.0.0.1:0` and forwards to `upstream` (e.g.
    /// [`S3Server::endpoint`]); serves in the current tokio runtime.
    pub async fn start(upstream: &str) -> Result<S3FaultProxy> {
        let upstream = upstream.trim_end_matches('/').to_string();
        Url::parse(&upstream).with_context(|| format!("upstream {upstream:?}"))?;
        let state = Arc::new(Mutex::new(ProxyState::default()));
        let proxy = Proxy {
            upstream,
            http: reqwest::Client::builder()
                .redirect(reqwest::redirect::Policy::none())
                .build()?,
            state: state.clone(),
        };
        let app = axum::Router::new().fallback(move |req: Request<Body>| {
            let proxy = proxy.clone();
            async move { proxy.handle(req).await }
        });
        let listener = tokio::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await?;
        let addr = listener.local_addr()?;
        let task = tokio::spawn(async move {
            let mut connections = JoinSet::new();
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let service = hyper_util::service::TowerToHyperService::new(app.clone());
                connections.spawn(async move {
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                        .await;
                });
                // Reap finished connections as we go.
                while connections.try_join_next().is_some() {}
            }
        });
        Ok(S3FaultProxy { addr, state, task })
    }

    /// `http://127.0.0.1:PORT`, the endpoint a client uses.
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The next `n` UploadPart requests answer 500 with an S3
    /// `InternalError` body, without reaching the server.
    pub fn fail_part_uploads(&self, n: u32) {
        self.state.lock().unwrap().fail += n;
    }

    /// Once `n` UploadPart requests have been forwarded, every further one
    /// is held, never answered, until the proxy is dropped (a failing one of
    /// [`S3FaultProxy::fail_part_uploads`] is not forwarded and does not
    /// count). Other requests (an abort, a list) still pass.
    pub fn hang_after_parts(&self, n: u32) {
        self.state.lock().unwrap().hang_after = Some(n);
    }

    /// The `partNumber` of every UploadPart seen, in order, failed, held or
    /// forwarded.
    pub fn part_upload_attempts(&self) -> Vec<u32> {
        self.state.lock().unwrap().attempts.clone()
    }

    /// How many UploadParts were failed.
    pub fn failed(&self) -> u32 {
        self.state.lock().unwrap().failed
    }

    /// Every request seen, in order: `(method, path and query)`.
    pub fn requests(&self) -> Vec<(String, String)> {
        self.state.lock().unwrap().requests.clone()
    }
}

/// `partNumber` if the request is an UploadPart (`PUT` with `partNumber`
/// and `uploadId`).
fn upload_part_number(req: &Request<Body>) -> Option<u32> {
    if req.method() != axum::http::Method::PUT {
        return None;
    }
    let query = req.uri().query()?;
    let url = Url::parse(&format!("http://x/?{query}")).ok()?;
    let mut part = None;
    let mut upload = false;
    for (k, v) in url.query_pairs() {
        match k.as_ref() {
            "partNumber" => part = v.parse().ok(),
            "uploadId" => upload = true,
            _ => {}
        }
    }
    part.filter(|_| upload)
}

/// Headers a proxy does not pass on (hop-by-hop, or set by the client
/// library for the new connection).
fn passes(name: &str) -> bool {
    ![
        "host",
        "connection",
        "keep-alive",
        "transfer-encoding",
        "te",
        "upgrade",
        "proxy-connection",
        "content-length",
        "expect",
    ]
    .contains(&name)
}

impl Proxy {
    async fn handle(&self, req: Request<Body>) -> Response<Body> {
        let part = upload_part_number(&req);
        let path_and_query = req
            .uri()
            .path_and_query()
            .map_or("/".to_string(), |p| p.to_string());
        let action = {
            let mut st = self.state.lock().unwrap();
            st.requests
                .push((req.method().to_string(), path_and_query.clone()));
            match part {
                None => Action::Forward,
                Some(n) => {
                    st.attempts.push(n);
                    if st.fail > 0 {
                        st.fail -= 1;
                        st.failed += 1;
                        Action::Fail
                    } else if st.hang_after.is_some_and(|h| st.forwarded_parts >= h) {
                        Action::Hang
                    } else {
                        st.forwarded_parts += 1;
                        Action::Forward
                    }
                }
            }
        };
        match action {
            Action::Fail => s3_error(
                StatusCode::INTERNAL_SERVER_ERROR,
                "InternalError",
                "We encountered an internal error. Please try again. (injected by S3FaultProxy)",
            ),
            Action::Hang => std::future::pending().await,
            Action::Forward => match self.forward(req, &path_and_query).await {
                Ok(resp) => resp,
                Err(e) => s3_error(
                    StatusCode::BAD_GATEWAY,
                    "BadGateway",
                    &format!("S3FaultProxy: {e:#}"),
                ),
            },
        }
    }

    async fn forward(&self, req: Request<Body>, path_and_query: &str) -> Result<Response<Body>> {
        let (parts, body) = req.into_parts();
        let body = axum::body::to_bytes(body, usize::MAX).await?;
        let mut headers = HeaderMap::new();
        for (k, v) in &parts.headers {
            if passes(k.as_str()) {
                headers.append(k.clone(), v.clone());
            }
        }
        let is_head = parts.method == axum::http::Method::HEAD;
        let resp = self
            .http
            .request(parts.method, format!("{}{path_and_query}", self.upstream))
            .headers(headers)
            // Explicit even when 0: S3 refuses a bodiless PUT without it
            // (411), and reqwest sends none for an empty body.
            .header(reqwest::header::CONTENT_LENGTH, body.len())
            .body(body)
            .send()
            .await?;
        let mut out = Response::builder().status(resp.status());
        for (k, v) in resp.headers() {
            // A HEAD reply's length is the object's, not its (empty) body's.
            if passes(k.as_str()) || (is_head && k == reqwest::header::CONTENT_LENGTH) {
                out = out.header(k, v);
            }
        }
        let bytes = resp.bytes().await?;
        Ok(out.body(Body::from(bytes))?)
    }
}

fn s3_error(status: StatusCode, code: &str, message: &str) -> Response<Body> {
    let message = message
        .replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;");
    let body = format!(
        "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<Error><Code>{code}</Code><Message>{message}</Message><RequestId>s3-fault-proxy</RequestId></Error>"
    );
    Response::builder()
        .status(status)
        .header("content-type", "application/xml")
        .body(Body::from(body))
        .unwrap()
}
