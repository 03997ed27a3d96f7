//! A Scaleway-format instance metadata server for one server.
//!
//! The local QEMU provider runs one of these per build VM and forwards the
//! guest's `169.254.42.42:80` to it (see [`super::guestfwd`]); end-to-end tests
//! use it directly. It implements the subset of the metadata API that the
//! build agent and the usual in-guest tools rely on (reference: scaleway-api.md
//! §4):
//!
//! | Endpoint | Behaviour |
//! |---|---|
//! | GET `/conf` | shell `KEY=VALUE` text, see [`conf_text`] |
//! | GET `/conf?format=json` | the [`ServerMetadata`] as JSON |
//! | PATCH `/state` | body `{"state_detail": "..."}`; recorded, 200 |
//! | GET `/user_data` | `{"user_data":[keys]}` with `?format=json`, else text |
//! | GET/PATCH/DELETE `/user_data/{key}` | raw bytes, `text/plain`; 404 when absent |
//!
//! The server binds to `127.0.0.1` on an ephemeral port, never to a wildcard
//! address: it has no authentication at all.
//!
//! **Privileged source port.** The real service only answers `user_data` (and
//! `vendor_data`) requests whose TCP source port is below 1024, as a proof that
//! the caller is root. Behind QEMU's slirp `guestfwd` the guest's source port
//! is lost (the host side sees a fresh connection from the bridge process), so
//! that rule cannot be honoured here and is deliberately not enforced.

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use anyhow::Context as _;
use axum::body::Bytes;
use axum::extract::{Path, Query, Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, patch};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use tokio::sync::{oneshot, watch};
use tokio::task::JoinHandle;

/// How long [`MetadataServer::shutdown`] waits for in-flight connections
/// before aborting the server task.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// One entry of [`ServerMetadata::volumes`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeMetadata {
    pub id: String,
    pub name: String,
    /// `l_ssd`, `b_ssd`, `sbs_volume`, ...
    pub volume_type: String,
    /// Bytes.
    pub size: u64,
}

/// `location` object of the metadata.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LocationMetadata {
    pub zone_id: String,
}

/// One entry of [`ServerMetadata::ssh_public_keys`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SshPublicKey {
    pub key: String,
    pub fingerprint: String,
}

/// What `GET /conf?format=json` returns (field list: scaleway-api.md §4).
///
/// Fields we have no meaningful value for locally (`public_ip`, `ipv6`,
/// `bootscript`) are `Option<Value>` and serialise as `null` by default.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ServerMetadata {
    pub id: String,
    pub name: String,
    pub hostname: String,
    pub commercial_type: String,
    pub project: String,
    pub organization: String,
    pub arch: String,
    pub zone: String,
    pub tags: Vec<String>,
    pub state_detail: String,
    /// Keyed by slot index as a string (`"0"`, `"1"`, ...), as the real service.
    pub volumes: BTreeMap<String, VolumeMetadata>,
    pub public_ip: Option<Value>,
    pub private_ip: Option<String>,
    pub ipv6: Option<Value>,
    pub location: LocationMetadata,
    pub ssh_public_keys: Vec<SshPublicKey>,
    pub timezone: String,
    pub bootscript: Option<Value>,
    pub mac_address: String,
    pub state: String,
    pub private_nics: Vec<Value>,
}

impl ServerMetadata {
    /// Plausible defaults for a local build VM named `name`: hostname = name,
    /// `DEV1-S`, `x86_64`, zone `fr-par-1`, state `running`, no tags, no
    /// volumes, all-zero project/organization ids.
    pub fn new(id: impl Into<String>, name: impl Into<String>) -> Self {
        let name = name.into();
        let zone = "fr-par-1".to_owned();
        Self {
            id: id.into(),
            hostname: name.clone(),
            name,
            commercial_type: "DEV1-S".into(),
            project: "00000000-0000-0000-0000-000000000000".into(),
            organization: "00000000-0000-0000-0000-000000000000".into(),
            arch: "x86_64".into(),
            location: LocationMetadata {
                zone_id: zone.clone(),
            },
            zone,
            state_detail: "booting kernel".into(),
            timezone: "UTC".into(),
            state: "running".into(),
            ..Self::default()
        }
    }
}

/// Per-endpoint request counters (all requests, whatever their answer).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RequestCounts {
    /// `/conf` and `/conf?format=json`, including those answered 429.
    pub conf: u64,
    /// `/state`.
    pub state: u64,
    /// `/user_data` and `/user_data/{key}`.
    pub user_data: u64,
    /// Answers 429 given because of [`MetadataServer::inject_too_many_requests`].
    pub too_many_requests: u64,
}

/// Mutable state shared between the handlers and the [`MetadataServer`] handle.
#[derive(Debug)]
struct Inner {
    meta: ServerMetadata,
    user_data: BTreeMap<String, Vec<u8>>,
    pending_429: u32,
    counts: RequestCounts,
}

#[derive(Debug)]
struct Shared {
    inner: Mutex<Inner>,
    /// Every `PATCH /state` value, in order. The watch channel is both the
    /// store and the notification mechanism.
    states: watch::Sender<Vec<String>>,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A handler that panicked mid-update cannot leave `Inner` in a state
        // that is worse than "partially updated"; keep serving.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Which endpoint a request went to (for [`MetadataStore::record_request`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    Conf,
    State,
    UserData,
}

/// Where a metadata server's answers come from and where its writes go:
/// memory for [`MetadataServer`], the local provider's server record for
/// the per-connection server that QEMU spawns (see
/// `provider::local::metadata`).
pub trait MetadataStore: Send + Sync + 'static {
    /// Called once per request, before it is answered.
    fn record_request(&self, _endpoint: Endpoint) {}
    /// The metadata to serve, or `None` to answer `429 Too Many Requests`.
    fn conf(&self) -> anyhow::Result<Option<ServerMetadata>>;
    fn set_state_detail(&self, detail: &str) -> anyhow::Result<()>;
    fn user_data_keys(&self) -> anyhow::Result<Vec<String>>;
    fn user_data(&self, key: &str) -> anyhow::Result<Option<Vec<u8>>>;
    fn set_user_data(&self, key: &str, value: Vec<u8>) -> anyhow::Result<()>;
    /// Whether the key existed.
    fn delete_user_data(&self, key: &str) -> anyhow::Result<bool>;
}

impl MetadataStore for Shared {
    fn record_request(&self, endpoint: Endpoint) {
        let mut inner = self.lock();
        match endpoint {
            Endpoint::Conf => inner.counts.conf += 1,
            Endpoint::State => inner.counts.state += 1,
            Endpoint::UserData => inner.counts.user_data += 1,
        }
    }

    fn conf(&self) -> anyhow::Result<Option<ServerMetadata>> {
        let mut inner = self.lock();
        if inner.pending_429 > 0 {
            inner.pending_429 -= 1;
            inner.counts.too_many_requests += 1;
            return Ok(None);
        }
        Ok(Some(inner.meta.clone()))
    }

    fn set_state_detail(&self, detail: &str) -> anyhow::Result<()> {
        self.lock().meta.state_detail = detail.to_owned();
        self.states
            .send_modify(|states| states.push(detail.to_owned()));
        Ok(())
    }

    fn user_data_keys(&self) -> anyhow::Result<Vec<String>> {
        Ok(self.lock().user_data.keys().cloned().collect())
    }

    fn user_data(&self, key: &str) -> anyhow::Result<Option<Vec<u8>>> {
        Ok(self.lock().user_data.get(key).cloned())
    }

    fn set_user_data(&self, key: &str, value: Vec<u8>) -> anyhow::Result<()> {
        self.lock().user_data.insert(key.to_owned(), value);
        Ok(())
    }

    fn delete_user_data(&self, key: &str) -> anyhow::Result<bool> {
        Ok(self.lock().user_data.remove(key).is_some())
    }
}

type AppState = Arc<dyn MetadataStore>;

/// A running metadata server. Dropping it triggers a graceful shutdown in the
/// background; [`MetadataServer::shutdown`] waits for it.
#[derive(Debug)]
pub struct MetadataServer {
    addr: SocketAddr,
    shared: Arc<Shared>,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<()>>,
}

impl MetadataServer {
    /// Bind `127.0.0.1:0` and start serving `meta`.
    ///
    /// Must be called from within a Tokio runtime (the server is spawned onto
    /// it); outside one it returns an error instead of panicking.
    pub fn start(meta: ServerMetadata) -> anyhow::Result<MetadataServer> {
        let rt = tokio::runtime::Handle::try_current()
            .context("MetadataServer::start must be called inside a Tokio runtime")?;
        let std_listener = std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
            .context("binding the metadata server to 127.0.0.1")?;
        std_listener
            .set_nonblocking(true)
            .context("setting the metadata listener non-blocking")?;
        let addr = std_listener.local_addr()?;
        let listener = {
            let _guard = rt.enter();
            tokio::net::TcpListener::from_std(std_listener)
                .context("registering the metadata listener with Tokio")?
        };

        let (states, _) = watch::channel(Vec::new());
        let shared = Arc::new(Shared {
            inner: Mutex::new(Inner {
                meta,
                user_data: BTreeMap::new(),
                pending_429: 0,
                counts: RequestCounts::default(),
            }),
            states,
        });

        let app = router(shared.clone() as AppState);
        let (stop, stopped) = oneshot::channel::<()>();
        let task = rt.spawn(async move {
            let serve = axum::serve(listener, app).with_graceful_shutdown(async move {
                // Either an explicit stop or the handle being dropped.
                let _ = stopped.await;
            });
            if let Err(e) = serve.await {
                tracing::warn!(%addr, error = %e, "metadata server stopped with an error");
            }
            tracing::debug!(%addr, "metadata server stopped");
        });
        tracing::debug!(%addr, "metadata server listening");

        Ok(MetadataServer {
            addr,
            shared,
            stop: Some(stop),
            task: Some(task),
        })
    }

    /// The bound address (always `127.0.0.1:<ephemeral>`).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Every `state_detail` received by `PATCH /state`, in order.
    pub fn state_details(&self) -> Vec<String> {
        self.shared.states.borrow().clone()
    }

    /// A receiver that sees the whole `state_detail` history each time a new
    /// value arrives, e.g. `rx.wait_for(|s| s.iter().any(|d| d == "booted"))`.
    pub fn subscribe(&self) -> watch::Receiver<Vec<String>> {
        self.shared.states.subscribe()
    }

    /// Wait until some `PATCH /state` has carried exactly `detail` (returns at
    /// once if one already has), or fail after `timeout`.
    pub async fn wait_for_state_detail(
        &self,
        detail: &str,
        timeout: Duration,
    ) -> anyhow::Result<()> {
        let mut rx = self.subscribe();
        let wait = rx.wait_for(|states| states.iter().any(|s| s == detail));
        let outcome = tokio::time::timeout(timeout, wait)
            .await
            .map(|r| r.map(drop));
        match outcome {
            Ok(Ok(())) => Ok(()),
            // The sender lives in `self.shared`, so it cannot be dropped here.
            Ok(Err(_)) => anyhow::bail!("metadata server state channel closed"),
            Err(_) => anyhow::bail!(
                "no state_detail {detail:?} within {timeout:?} (got {:?})",
                self.state_details()
            ),
        }
    }

    /// A snapshot of the metadata currently served.
    pub fn metadata(&self) -> ServerMetadata {
        self.shared.lock().meta.clone()
    }

    /// Change the metadata served from now on.
    pub fn update_metadata(&self, f: impl FnOnce(&mut ServerMetadata)) {
        f(&mut self.shared.lock().meta);
    }

    /// Replace the server's tags.
    pub fn set_tags<I, S>(&self, tags: I)
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        let tags = tags.into_iter().map(Into::into).collect();
        self.shared.lock().meta.tags = tags;
    }

    /// Set (or replace) one user-data value.
    pub fn set_user_data(&self, key: impl Into<String>, value: impl Into<Vec<u8>>) {
        self.shared
            .lock()
            .user_data
            .insert(key.into(), value.into());
    }

    /// One user-data value, e.g. one the guest stored with `PATCH`.
    pub fn user_data(&self, key: &str) -> Option<Vec<u8>> {
        self.shared.lock().user_data.get(key).cloned()
    }

    /// Make the next `n` requests to `/conf` (either format) answer
    /// `429 Too Many Requests` with no body and no `Retry-After`, as the real
    /// service sometimes does. Adds to any injection still pending.
    pub fn inject_too_many_requests(&self, n: u32) {
        let mut inner = self.shared.lock();
        inner.pending_429 = inner.pending_429.saturating_add(n);
    }

    /// Request counters so far.
    pub fn requests(&self) -> RequestCounts {
        self.shared.lock().counts
    }

    /// Stop accepting connections, let in-flight requests finish (at most
    /// a few seconds), and wait for the server task to end.
    pub async fn shutdown(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(mut task) = self.task.take() {
            if tokio::time::timeout(SHUTDOWN_GRACE, &mut task)
                .await
                .is_err()
            {
                tracing::warn!(addr = %self.addr, "metadata server did not stop in time; aborting");
                task.abort();
            }
        }
    }
}

impl Drop for MetadataServer {
    fn drop(&mut self) {
        // Graceful shutdown in the background; the task ends by itself.
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

/// The metadata API over `store`, for any transport: a TCP listener
/// ([`MetadataServer`]) or one connection on stdin/stdout ([`serve_stdio`]).
pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/conf", get(get_conf))
        .route("/state", patch(patch_state))
        .route("/user_data", get(list_user_data))
        .route(
            "/user_data/{key}",
            get(get_user_data)
                .patch(patch_user_data)
                .delete(delete_user_data),
        )
        .layer(middleware::from_fn(log_request))
        .with_state(state)
}

async fn log_request(req: Request, next: Next) -> Response {
    let method = req.method().clone();
    let uri = req.uri().clone();
    let resp = next.run(req).await;
    tracing::debug!(%method, %uri, status = resp.status().as_u16(), "metadata request");
    resp
}

fn internal_error(e: anyhow::Error) -> Response {
    error_response(
        StatusCode::INTERNAL_SERVER_ERROR,
        "internal",
        format!("{e:#}"),
    )
}

#[derive(Debug, Deserialize)]
struct FormatQuery {
    format: Option<String>,
}

impl FormatQuery {
    fn is_json(&self) -> bool {
        self.format.as_deref() == Some("json")
    }
}

fn text_response(status: StatusCode, body: impl Into<axum::body::Body>) -> Response {
    (
        status,
        [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
        body.into(),
    )
        .into_response()
}

fn error_response(status: StatusCode, kind: &str, message: impl Into<String>) -> Response {
    (
        status,
        Json(json!({ "type": kind, "message": message.into() })),
    )
        .into_response()
}

async fn get_conf(State(store): State<AppState>, Query(q): Query<FormatQuery>) -> Response {
    store.record_request(Endpoint::Conf);
    let meta = match store.conf() {
        Ok(Some(meta)) => meta,
        // No body, no Retry-After: like the real service.
        Ok(None) => return StatusCode::TOO_MANY_REQUESTS.into_response(),
        Err(e) => return internal_error(e),
    };
    let value = match serde_json::to_value(&meta) {
        Ok(v) => v,
        Err(e) => return internal_error(e.into()),
    };
    if q.is_json() {
        Json(value).into_response()
    } else {
        text_response(StatusCode::OK, conf_text(&value))
    }
}

#[derive(Debug, Deserialize)]
struct StateBody {
    state_detail: String,
}

async fn patch_state(State(store): State<AppState>, body: Bytes) -> Response {
    store.record_request(Endpoint::State);
    // Parse regardless of Content-Type: shell tools do not always set it.
    let parsed: StateBody = match serde_json::from_slice(&body) {
        Ok(b) => b,
        Err(e) => {
            return error_response(
                StatusCode::BAD_REQUEST,
                "invalid_request_error",
                format!("invalid state body: {e}"),
            )
        }
    };
    tracing::debug!(state_detail = %parsed.state_detail, "server state_detail updated");
    if let Err(e) = store.set_state_detail(&parsed.state_detail) {
        return internal_error(e);
    }
    (
        StatusCode::OK,
        Json(json!({ "state_detail": parsed.state_detail })),
    )
        .into_response()
}

async fn list_user_data(State(store): State<AppState>, Query(q): Query<FormatQuery>) -> Response {
    store.record_request(Endpoint::UserData);
    let keys = match store.user_data_keys() {
        Ok(keys) => keys,
        Err(e) => return internal_error(e),
    };
    let value = json!({ "user_data": keys });
    if q.is_json() {
        Json(value).into_response()
    } else {
        // The text form of this listing is undocumented; use the /conf
        // format (`USER_DATA=<n>`, `USER_DATA_<i>=<key>`).
        text_response(StatusCode::OK, conf_text(&value))
    }
}

fn not_found(key: &str) -> Response {
    error_response(
        StatusCode::NOT_FOUND,
        "not_found",
        format!("user data key {key:?} not found"),
    )
}

async fn get_user_data(State(store): State<AppState>, Path(key): Path<String>) -> Response {
    store.record_request(Endpoint::UserData);
    match store.user_data(&key) {
        Ok(Some(v)) => text_response(StatusCode::OK, v),
        Ok(None) => not_found(&key),
        Err(e) => internal_error(e),
    }
}

async fn patch_user_data(
    State(store): State<AppState>,
    Path(key): Path<String>,
    body: Bytes,
) -> Response {
    store.record_request(Endpoint::UserData);
    match store.set_user_data(&key, body.to_vec()) {
        Ok(()) => StatusCode::NO_CONTENT.into_response(),
        Err(e) => internal_error(e),
    }
}

async fn delete_user_data(State(store): State<AppState>, Path(key): Path<String>) -> Response {
    store.record_request(Endpoint::UserData);
    match store.delete_user_data(&key) {
        Ok(true) => StatusCode::NO_CONTENT.into_response(),
        Ok(false) => not_found(&key),
        Err(e) => internal_error(e),
    }
}

/// Render metadata JSON in the `/conf` shell `KEY=VALUE` text format.
///
/// - Keys are upper-cased and nested keys are joined with `_`
///   (`location.zone_id` → `LOCATION_ZONE_ID`); characters other than ASCII
///   letters, digits and `_` in a key become `_`.
/// - Strings that are empty or made only of `[A-Za-z0-9-_./:=@%+,]` are written
///   bare; anything else is single-quoted, with `'` written as `'\''`.
/// - Booleans are `True`/`False`, numbers are written as-is, `null` as an empty
///   value (`KEY=`).
/// - A list is `KEY=<count>` followed by `KEY_0`…`KEY_{n-1}`.
/// - An object is `KEY=<space-separated upper-cased subkeys>` (unquoted, as the
///   real service: `PUBLIC_IP=DYNAMIC ID ADDRESS`, `VOLUMES=0 1`) followed by
///   each `KEY_SUB=…`.
///
/// Object keys are emitted in sorted order. The top-level value should be an
/// object; its own key listing is not printed. Lines end with `\n`.
pub fn conf_text(value: &Value) -> String {
    let mut out = String::new();
    match value {
        Value::Object(map) => {
            for (k, v) in sorted(map) {
                emit(&mut out, &conf_key(k), v);
            }
        }
        other => emit(&mut out, "VALUE", other),
    }
    out
}

fn sorted(map: &serde_json::Map<String, Value>) -> Vec<(&String, &Value)> {
    let mut entries: Vec<_> = map.iter().collect();
    entries.sort_by(|a, b| a.0.cmp(b.0));
    entries
}

fn conf_key(k: &str) -> String {
    k.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_uppercase()
            } else {
                '_'
            }
        })
        .collect()
}

fn emit(out: &mut String, key: &str, value: &Value) {
    out.push_str(key);
    out.push('=');
    match value {
        Value::Null => out.push('\n'),
        Value::Bool(b) => {
            out.push_str(if *b { "True" } else { "False" });
            out.push('\n');
        }
        Value::Number(n) => {
            out.push_str(&n.to_string());
            out.push('\n');
        }
        Value::String(s) => {
            out.push_str(&shell_quote(s));
            out.push('\n');
        }
        Value::Array(items) => {
            out.push_str(&items.len().to_string());
            out.push('\n');
            for (i, item) in items.iter().enumerate() {
                emit(out, &format!("{key}_{i}"), item);
            }
        }
        Value::Object(map) => {
            let entries = sorted(map);
            let subkeys: Vec<String> = entries.iter().map(|(k, _)| conf_key(k)).collect();
            out.push_str(&subkeys.join(" "));
            out.push('\n');
            for ((_, v), sub) in entries.iter().zip(&subkeys) {
                emit(out, &format!("{key}_{sub}"), v);
            }
        }
    }
}

fn shell_quote(s: &str) -> String {
    let safe = s
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || "-_./:=@%+,".contains(c));
    if safe {
        s.to_owned()
    } else {
        format!("'{}'", s.replace('\'', r"'\''"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> ServerMetadata {
        let mut m = ServerMetadata::new("11111111-2222-3333-4444-555555555555", "build-vm");
        m.tags = vec!["imgforge=build".into(), "two words".into()];
        m.private_ip = Some("169.254.0.15".into());
        m.mac_address = "de:00:00:00:00:01".into();
        m.volumes.insert(
            "0".into(),
            VolumeMetadata {
                id: "vol-0".into(),
                name: "root volume".into(),
                volume_type: "sbs_volume".into(),
                size: 10_000_000_000,
            },
        );
        m.ssh_public_keys.push(SshPublicKey {
            key: "ssh-ed25519 AAAA user@host".into(),
            fingerprint: "256 SHA256:abc user@host (ssh-ed25519)".into(),
        });
        m
    }

    fn lines(text: &str) -> Vec<&str> {
        text.lines().collect()
    }

    // ---- conf_text (pure) ----

    #[test]
    fn conf_text_scalars_and_quoting() {
        let v = json!({
            "id": "abc-123",
            "name": "has space",
            "quote": "it's",
            "tilde": "~root",
            "flag": true,
            "off": false,
            "size": 42,
            "nothing": null,
            "empty": "",
            "tag": "a=b",
        });
        let text = conf_text(&v);
        let l = lines(&text);
        assert!(l.contains(&"ID=abc-123"), "{text}");
        assert!(l.contains(&"NAME='has space'"), "{text}");
        assert!(l.contains(&r"QUOTE='it'\''s'"), "{text}");
        assert!(l.contains(&"TILDE='~root'"), "{text}");
        assert!(l.contains(&"FLAG=True"), "{text}");
        assert!(l.contains(&"OFF=False"), "{text}");
        assert!(l.contains(&"SIZE=42"), "{text}");
        assert!(l.contains(&"NOTHING="), "{text}");
        assert!(l.contains(&"EMPTY="), "{text}");
        assert!(l.contains(&"TAG=a=b"), "{text}");
        assert!(text.ends_with('\n'));
    }

    #[test]
    fn conf_text_lists_and_objects() {
        let v = json!({
            "tags": ["a=b", "x"],
            "public_ip": {"id": "ip-1", "address": "1.2.3.4", "dynamic": false},
            "volumes": {"0": {"id": "v0", "size": 5}, "1": {"id": "v1", "size": 6}},
            "ssh_public_keys": [{"key": "ssh-rsa AAA c", "fingerprint": "fp"}],
            "location": {"zone_id": "fr-par-1"},
            "private_nics": [],
        });
        let text = conf_text(&v);
        let expected = "\
LOCATION=ZONE_ID
LOCATION_ZONE_ID=fr-par-1
PRIVATE_NICS=0
PUBLIC_IP=ADDRESS DYNAMIC ID
PUBLIC_IP_ADDRESS=1.2.3.4
PUBLIC_IP_DYNAMIC=False
PUBLIC_IP_ID=ip-1
SSH_PUBLIC_KEYS=1
SSH_PUBLIC_KEYS_0=FINGERPRINT KEY
SSH_PUBLIC_KEYS_0_FINGERPRINT=fp
SSH_PUBLIC_KEYS_0_KEY='ssh-rsa AAA c'
TAGS=2
TAGS_0=a=b
TAGS_1=x
VOLUMES=0 1
VOLUMES_0=ID SIZE
VOLUMES_0_ID=v0
VOLUMES_0_SIZE=5
VOLUMES_1=ID SIZE
VOLUMES_1_ID=v1
VOLUMES_1_SIZE=6
";
        assert_eq!(text, expected);
    }

    #[test]
    fn conf_text_sanitises_keys() {
        let text = conf_text(&json!({"weird-key.x": 1}));
        assert_eq!(text, "WEIRD_KEY_X=1\n");
    }

    #[test]
    fn conf_text_is_shell_sourceable_for_scalars() {
        // Quoted values must round-trip through a real shell.
        let v = json!({"a": "two words", "b": "it's $HOME `x` \"q\"", "c": "a=b"});
        let script = format!("{}printf '%s\\n' \"$A\" \"$B\" \"$C\"", conf_text(&v));
        let out = std::process::Command::new("sh")
            .arg("-c")
            .arg(&script)
            .output()
            .expect("run sh");
        assert!(out.status.success(), "{out:?}");
        assert_eq!(
            String::from_utf8(out.stdout).unwrap(),
            "two words\nit's $HOME `x` \"q\"\na=b\n"
        );
    }

    #[test]
    fn server_metadata_json_has_documented_fields() {
        let v = serde_json::to_value(sample()).unwrap();
        for field in [
            "id",
            "name",
            "hostname",
            "commercial_type",
            "project",
            "organization",
            "arch",
            "zone",
            "tags",
            "state_detail",
            "volumes",
            "public_ip",
            "private_ip",
            "ipv6",
            "location",
            "ssh_public_keys",
            "timezone",
            "bootscript",
            "mac_address",
            "state",
            "private_nics",
        ] {
            assert!(v.get(field).is_some(), "missing {field}");
        }
        assert!(v["public_ip"].is_null());
        assert_eq!(v["location"]["zone_id"], "fr-par-1");
        assert_eq!(v["volumes"]["0"]["size"], 10_000_000_000u64);
        let back: ServerMetadata = serde_json::from_value(v).unwrap();
        assert_eq!(back, sample());
    }

    // ---- HTTP ----

    fn url(s: &MetadataServer, path: &str) -> String {
        format!("http://{}{}", s.addr(), path)
    }

    #[tokio::test]
    async fn binds_loopback_only() {
        let s = MetadataServer::start(sample()).unwrap();
        assert_eq!(s.addr().ip(), Ipv4Addr::LOCALHOST);
        assert_ne!(s.addr().port(), 0);
        s.shutdown().await;
    }

    #[test]
    fn start_outside_runtime_is_an_error() {
        let err = MetadataServer::start(sample()).unwrap_err();
        assert!(err.to_string().contains("Tokio runtime"), "{err:#}");
    }

    #[tokio::test]
    async fn conf_json() {
        let s = MetadataServer::start(sample()).unwrap();
        let resp = reqwest::get(url(&s, "/conf?format=json")).await.unwrap();
        assert_eq!(resp.status(), 200);
        assert!(resp.headers()[header::CONTENT_TYPE]
            .to_str()
            .unwrap()
            .starts_with("application/json"));
        let got: ServerMetadata = resp.json().await.unwrap();
        assert_eq!(got, sample());
        assert_eq!(got.tags, vec!["imgforge=build", "two words"]);

        s.set_tags(["only"]);
        let got: ServerMetadata = reqwest::get(url(&s, "/conf?format=json"))
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_eq!(got.tags, vec!["only"]);
        assert_eq!(s.requests().conf, 2);
        s.shutdown().await;
    }

    #[tokio::test]
    async fn conf_text_endpoint() {
        let s = MetadataServer::start(sample()).unwrap();
        let resp = reqwest::get(url(&s, "/conf")).await.unwrap();
        assert_eq!(resp.status(), 200);
        assert!(resp.headers()[header::CONTENT_TYPE]
            .to_str()
            .unwrap()
            .starts_with("text/plain"));
        let text = resp.text().await.unwrap();
        let l = lines(&text);
        for want in [
            "ID=11111111-2222-3333-4444-555555555555",
            "NAME=build-vm",
            "HOSTNAME=build-vm",
            "COMMERCIAL_TYPE=DEV1-S",
            "TAGS=2",
            "TAGS_0=imgforge=build",
            "TAGS_1='two words'",
            "STATE_DETAIL='booting kernel'",
            "PRIVATE_IP=169.254.0.15",
            "PUBLIC_IP=",
            "LOCATION_ZONE_ID=fr-par-1",
            "VOLUMES=0",
            "VOLUMES_0=ID NAME SIZE VOLUME_TYPE",
            "VOLUMES_0_NAME='root volume'",
            "VOLUMES_0_SIZE=10000000000",
            "VOLUMES_0_VOLUME_TYPE=sbs_volume",
            "SSH_PUBLIC_KEYS=1",
            "SSH_PUBLIC_KEYS_0_KEY='ssh-ed25519 AAAA user@host'",
            "TIMEZONE=UTC",
            "PRIVATE_NICS=0",
        ] {
            assert!(l.contains(&want), "missing line {want:?} in:\n{text}");
        }
        s.shutdown().await;
    }

    #[tokio::test]
    async fn patch_state_records_in_order() {
        let s = MetadataServer::start(sample()).unwrap();
        let mut rx = s.subscribe();
        let client = reqwest::Client::new();
        for detail in ["kernel-started", "booted"] {
            let resp = client
                .patch(url(&s, "/state"))
                .header(header::CONTENT_TYPE, "application/json")
                .body(json!({ "state_detail": detail }).to_string())
                .send()
                .await
                .unwrap();
            assert_eq!(resp.status(), 200);
        }
        assert_eq!(s.state_details(), vec!["kernel-started", "booted"]);
        // The watch receiver saw the change.
        assert!(rx.has_changed().unwrap());
        assert_eq!(rx.borrow_and_update().len(), 2);
        // ... and the served metadata follows.
        assert_eq!(s.metadata().state_detail, "booted");
        let text = reqwest::get(url(&s, "/conf"))
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        assert!(lines(&text).contains(&"STATE_DETAIL=booted"), "{text}");
        s.shutdown().await;
    }

    #[tokio::test]
    async fn patch_state_without_content_type_is_accepted() {
        let s = MetadataServer::start(sample()).unwrap();
        let resp = reqwest::Client::new()
            .patch(url(&s, "/state"))
            .body(r#"{"state_detail":"booted"}"#)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
        assert_eq!(s.state_details(), vec!["booted"]);
        s.shutdown().await;
    }

    #[tokio::test]
    async fn patch_state_bad_json_is_400() {
        let s = MetadataServer::start(sample()).unwrap();
        let client = reqwest::Client::new();
        for body in ["not json", r#"{"other": 1}"#] {
            let resp = client
                .patch(url(&s, "/state"))
                .body(body)
                .send()
                .await
                .unwrap();
            assert_eq!(resp.status(), 400, "body {body:?}");
            let err: Value = resp.json().await.unwrap();
            assert!(err["message"].as_str().unwrap().contains("invalid"));
        }
        assert!(s.state_details().is_empty());
        assert_eq!(s.metadata().state_detail, "booting kernel");
        s.shutdown().await;
    }

    #[tokio::test]
    async fn wait_for_state_detail_sees_later_patch() {
        let s = MetadataServer::start(sample()).unwrap();
        let target = url(&s, "/state");
        let patcher = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(50)).await;
            reqwest::Client::new()
                .patch(target)
                .body(r#"{"state_detail":"booted"}"#)
                .send()
                .await
                .unwrap()
                .status()
        });
        s.wait_for_state_detail("booted", Duration::from_secs(10))
            .await
            .unwrap();
        assert_eq!(patcher.await.unwrap(), 200);
        let err = s
            .wait_for_state_detail("never", Duration::from_millis(50))
            .await
            .unwrap_err();
        assert!(err.to_string().contains("never"), "{err:#}");
        s.shutdown().await;
    }

    #[tokio::test]
    async fn too_many_requests_then_success() {
        let s = MetadataServer::start(sample()).unwrap();
        s.inject_too_many_requests(2);
        for path in ["/conf", "/conf?format=json"] {
            let resp = reqwest::get(url(&s, path)).await.unwrap();
            assert_eq!(resp.status(), 429);
            assert!(resp.headers().get(header::RETRY_AFTER).is_none());
            assert!(resp.bytes().await.unwrap().is_empty());
        }
        // Only /conf is affected.
        let resp = reqwest::get(url(&s, "/user_data?format=json"))
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
        let resp = reqwest::get(url(&s, "/conf?format=json")).await.unwrap();
        assert_eq!(resp.status(), 200);
        let got: ServerMetadata = resp.json().await.unwrap();
        assert_eq!(got.id, sample().id);
        let counts = s.requests();
        assert_eq!(counts.conf, 3);
        assert_eq!(counts.too_many_requests, 2);
        assert_eq!(counts.user_data, 1);
        s.shutdown().await;
    }

    #[tokio::test]
    async fn user_data_round_trip() {
        let s = MetadataServer::start(sample()).unwrap();
        s.set_user_data("cloud-init", b"#cloud-config\n".to_vec());
        let client = reqwest::Client::new();

        let list: Value = reqwest::get(url(&s, "/user_data?format=json"))
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_eq!(list, json!({"user_data": ["cloud-init"]}));

        let resp = reqwest::get(url(&s, "/user_data/cloud-init"))
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
        assert!(resp.headers()[header::CONTENT_TYPE]
            .to_str()
            .unwrap()
            .starts_with("text/plain"));
        assert_eq!(&resp.bytes().await.unwrap()[..], b"#cloud-config\n");

        // Guest-side PATCH, read back over HTTP and through the handle.
        let payload: &[u8] = b"binary\0\xffok";
        let resp = client
            .patch(url(&s, "/user_data/result"))
            .header(header::CONTENT_TYPE, "text/plain")
            .body(payload)
            .send()
            .await
            .unwrap();
        assert!(resp.status().is_success(), "{}", resp.status());
        assert_eq!(s.user_data("result").as_deref(), Some(payload));
        let got = reqwest::get(url(&s, "/user_data/result"))
            .await
            .unwrap()
            .bytes()
            .await
            .unwrap();
        assert_eq!(&got[..], payload);

        let list: Value = reqwest::get(url(&s, "/user_data?format=json"))
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_eq!(list, json!({"user_data": ["cloud-init", "result"]}));

        // Text listing.
        let text = reqwest::get(url(&s, "/user_data"))
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        assert_eq!(
            text,
            "USER_DATA=2\nUSER_DATA_0=cloud-init\nUSER_DATA_1=result\n"
        );

        // DELETE, then 404 on GET and on a second DELETE.
        let resp = client
            .delete(url(&s, "/user_data/result"))
            .send()
            .await
            .unwrap();
        assert!(resp.status().is_success(), "{}", resp.status());
        assert_eq!(s.user_data("result"), None);
        let resp = reqwest::get(url(&s, "/user_data/result")).await.unwrap();
        assert_eq!(resp.status(), 404);
        let resp = client
            .delete(url(&s, "/user_data/result"))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 404);
        s.shutdown().await;
    }

    #[tokio::test]
    async fn user_data_missing_key_is_404() {
        let s = MetadataServer::start(sample()).unwrap();
        let resp = reqwest::get(url(&s, "/user_data/nope")).await.unwrap();
        assert_eq!(resp.status(), 404);
        let err: Value = resp.json().await.unwrap();
        assert_eq!(err["type"], "not_found");
        s.shutdown().await;
    }

    #[tokio::test]
    async fn shutdown_and_drop_stop_listening() {
        let s = MetadataServer::start(sample()).unwrap();
        let addr = s.addr();
        assert!(tokio::net::TcpStream::connect(addr).await.is_ok());
        s.shutdown().await;
        assert!(tokio::net::TcpStream::connect(addr).await.is_err());

        let s = MetadataServer::start(sample()).unwrap();
        let addr = s.addr();
        drop(s);
        // Drop only signals; the task stops shortly after.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        loop {
            if tokio::net::TcpStream::connect(addr).await.is_err() {
                break;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "still listening after drop"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}
