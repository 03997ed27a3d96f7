//! The HTTP layer of the Instance API v1: URLs under
//! `/instance/v1/zones/{zone}`, the `X-Auth-Token` header, JSON bodies, typed
//! error bodies ([`ApiError`]), pagination ([`Client::list_all`]) and retries.
//!
//! # Retries
//!
//! Scaleway's SDK never retries and its rate limit answers a bare 429 (no
//! body, no `Retry-After`), so this client backs off itself: exponential
//! delays from [`RetryPolicy::initial_backoff`] up to
//! [`RetryPolicy::max_backoff`], each drawn at random between half and all of
//! the step ("equal jitter"), for at most [`RetryPolicy::max_attempts`] tries.
//!
//! A failure is one of three kinds:
//! - *not processed*: a 429, or a connection that could not be established.
//!   The API did nothing, so any request may be sent again.
//! - *outcome unknown*: a 5xx, a timeout, or a connection lost after the
//!   request went out. The API may or may not have acted.
//! - *final*: any other 4xx (a typed [`ApiError`]); never retried.
//!
//! Idempotent requests (GET, PATCH with absolute values, DELETE) are retried
//! on both of the first two kinds; a DELETE that meets 404 on a retry counts as
//! done, since the lost first try must have deleted the resource.
//!
//! Non-idempotent POSTs (creations and server actions) are retried directly
//! only when *not processed*. After an *unknown outcome*,
//! [`Client::post_checked`] first asks a caller-supplied check whether the
//! request took effect (for a creation: list by the unique name that was
//! sent; for an action: read the server's state) and sends again only when it
//! did not. Actions whose effect cannot be seen (reboot, backup) are not sent
//! again: the caller gets the error.

use std::future::Future;
use std::time::Duration;

use reqwest::header::{HeaderMap, HeaderValue, CONTENT_TYPE};
use reqwest::{Method, StatusCode};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use tracing::{debug, info, warn};

use super::config::{Config, SecretKey};

/// How often and how patiently to retry.
#[derive(Clone, Debug)]
pub struct RetryPolicy {
    /// Tries per request, the first included (at least 1).
    pub max_attempts: u32,
    /// The delay step before the first retry; doubled for each further one.
    pub initial_backoff: Duration,
    /// The largest delay step.
    pub max_backoff: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            max_attempts: 6,
            initial_backoff: Duration::from_millis(500),
            max_backoff: Duration::from_secs(30),
        }
    }
}

impl RetryPolicy {
    /// The delay before retry number `retry` (1 for the first retry): the
    /// exponential step, jittered into `[step/2, step]`.
    pub fn backoff(&self, retry: u32) -> Duration {
        let exponent = retry.saturating_sub(1).min(20);
        let step = self
            .initial_backoff
            .saturating_mul(1u32 << exponent)
            .min(self.max_backoff);
        let half = step / 2;
        let jitter_nanos = half.as_nanos() as u64;
        if jitter_nanos == 0 {
            return step;
        }
        half + Duration::from_nanos(random_u64() % (jitter_nanos + 1))
    }
}

fn random_u64() -> u64 {
    let mut bytes = [0u8; 8];
    if getrandom::fill(&mut bytes).is_err() {
        // Jitter only spreads retries out; the clock is random enough then.
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .subsec_nanos();
        return u64::from(nanos);
    }
    u64::from_le_bytes(bytes)
}

/// Tunables of a [`Client`]; the defaults suit the real API, tests shrink them.
#[derive(Clone, Debug)]
pub struct ClientOptions {
    pub retry: RetryPolicy,
    /// Timeout of one HTTP exchange, body included.
    pub request_timeout: Duration,
    pub connect_timeout: Duration,
    /// Delay between two reads of a resource in the `wait_for_*` helpers.
    pub poll_interval: Duration,
    /// Items per page in [`Client::list_all`] (the API allows at most 100).
    pub per_page: u32,
}

impl Default for ClientOptions {
    fn default() -> Self {
        ClientOptions {
            retry: RetryPolicy::default(),
            request_timeout: Duration::from_secs(60),
            connect_timeout: Duration::from_secs(15),
            poll_interval: Duration::from_secs(5),
            per_page: 100,
        }
    }
}

/// A typed error body from the API (`{type, message, …}`), with the HTTP
/// status and the request it answered.
#[derive(Clone, Debug, Default, Deserialize)]
pub struct ApiError {
    #[serde(skip)]
    pub status: u16,
    /// The request as `METHOD /path`.
    #[serde(skip)]
    pub request: String,
    /// `not_found`, `invalid_arguments`, `transient_state`, … ("http_error"
    /// when the body was not the API's JSON, "too_many_requests" for a bare 429).
    #[serde(rename = "type", default)]
    pub kind: String,
    #[serde(default)]
    pub message: String,
    pub details: Option<serde_json::Value>,
    pub resource: Option<String>,
    pub resource_id: Option<String>,
    pub current_state: Option<String>,
    pub help_message: Option<String>,
    pub precondition: Option<String>,
    /// The legacy API's per-field messages.
    pub fields: Option<serde_json::Value>,
}

impl ApiError {
    /// Whether the resource does not exist (404 / `not_found`).
    pub fn is_not_found(&self) -> bool {
        self.status == 404 || self.kind == "not_found" || self.kind == "unknown_resource"
    }

    fn from_body(status: StatusCode, request: String, body: &[u8]) -> ApiError {
        let parsed = serde_json::from_slice::<ApiError>(body)
            .ok()
            .filter(|e| !e.kind.is_empty() || !e.message.is_empty());
        let mut error = parsed.unwrap_or_else(|| {
            let text = String::from_utf8_lossy(body);
            let text = text.trim();
            let (kind, message) = if status == StatusCode::TOO_MANY_REQUESTS {
                ("too_many_requests", "rate limited".to_string())
            } else {
                let reason = status.canonical_reason().unwrap_or("error");
                let excerpt: String = text.chars().take(200).collect();
                let message = if excerpt.is_empty() {
                    reason.to_string()
                } else {
                    format!("{reason}: {excerpt}")
                };
                ("http_error", message)
            };
            ApiError {
                kind: kind.to_string(),
                message,
                ..ApiError::default()
            }
        });
        error.status = status.as_u16();
        error.request = request;
        error
    }
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "scaleway: {}:", self.kind)?;
        if let Some(resource) = &self.resource {
            write!(f, " {resource}")?;
        }
        if let Some(id) = &self.resource_id {
            write!(f, " {id}")?;
        }
        if self.resource.is_some() || self.resource_id.is_some() {
            f.write_str(":")?;
        }
        write!(f, " {}", self.message)?;
        if let Some(state) = &self.current_state {
            write!(f, "; current state: {state}")?;
        }
        if let Some(precondition) = &self.precondition {
            write!(f, "; precondition: {precondition}")?;
        }
        if let Some(help) = &self.help_message {
            write!(f, "; {help}")?;
        }
        for extra in [&self.details, &self.fields].into_iter().flatten() {
            if !extra.is_null() {
                write!(f, "; details: {extra}")?;
            }
        }
        write!(f, " (HTTP {} on {})", self.status, self.request)
    }
}

impl std::error::Error for ApiError {}

/// Everything a call can fail with. None of these carry the secret key.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Boxed: an error body is large and errors travel in every `Result`.
    #[error(transparent)]
    Api(Box<ApiError>),
    #[error("scaleway: {request}: {source}")]
    Transport {
        request: String,
        #[source]
        source: reqwest::Error,
    },
    #[error("scaleway: {request}: unexpected response body: {source}")]
    Decode {
        request: String,
        #[source]
        source: serde_json::Error,
    },
    #[error("scaleway: cannot set up the HTTP client: {0}")]
    Setup(String),
    #[error(
        "scaleway: {what} did not become {wanted} within {timeout:?} (last state: {last_state})"
    )]
    WaitTimeout {
        what: String,
        wanted: String,
        last_state: String,
        timeout: Duration,
    },
    #[error("scaleway: {what} is in state {state} while waiting for {wanted}{reason}")]
    BadState {
        what: String,
        state: String,
        wanted: String,
        /// `": <reason>"` when the API gave one, else empty.
        reason: String,
    },
    #[error("scaleway: {request}: the outcome is unknown and cannot be checked, so it was not sent again: {source}")]
    OutcomeUnknown {
        request: String,
        #[source]
        source: Box<Error>,
    },
    #[error("scaleway: {0}")]
    Ambiguous(String),
}

impl From<ApiError> for Error {
    fn from(error: ApiError) -> Self {
        Error::Api(Box::new(error))
    }
}

impl Error {
    /// The API's error body, when this is one.
    pub fn api_error(&self) -> Option<&ApiError> {
        match self {
            Error::Api(e) => Some(e),
            _ => None,
        }
    }

    /// Whether this is the API saying the resource does not exist.
    pub fn is_not_found(&self) -> bool {
        matches!(self, Error::Api(e) if e.is_not_found())
    }
}

/// A failed try, by what it tells about the request's effect.
#[derive(Debug)]
pub(crate) enum Failure {
    /// The API did not process the request (429, no connection): send again.
    NotProcessed(Error),
    /// The API may have processed it (5xx, timeout, connection lost).
    Unknown(Error),
    /// A definite refusal (4xx).
    Final(Error),
}

impl Failure {
    fn into_error(self) -> Error {
        match self {
            Failure::NotProcessed(e) | Failure::Unknown(e) | Failure::Final(e) => e,
        }
    }
}

/// A request body.
#[derive(Clone, Debug)]
pub(crate) enum Body {
    Empty,
    Json(Vec<u8>),
    Text(String),
}

/// A successful reply, body read in full.
#[derive(Debug)]
pub(crate) struct Reply {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: bytes::Bytes,
}

/// A client of the Instance API v1 in one zone.
#[derive(Clone, Debug)]
pub struct Client {
    http: reqwest::Client,
    api_url: String,
    zone: String,
    project_id: String,
    secret_key: SecretKey,
    options: ClientOptions,
    /// The API product and version every path is under: `instance/v1`, or
    /// `block/v1` for [`Client::block`].
    product: &'static str,
}

impl Client {
    /// A client for the configured endpoint, zone and project, default options.
    pub fn new(config: &Config) -> Result<Client, Error> {
        Client::with_options(config, ClientOptions::default())
    }

    /// A client with explicit tunables.
    pub fn with_options(config: &Config, options: ClientOptions) -> Result<Client, Error> {
        let http = reqwest::Client::builder()
            .user_agent(concat!("imgforge/", env!("CARGO_PKG_VERSION")))
            .timeout(options.request_timeout)
            .connect_timeout(options.connect_timeout)
            .build()
            .map_err(|e| Error::Setup(e.to_string()))?;
        Ok(Client {
            http,
            api_url: config.api_url.trim_end_matches('/').to_string(),
            zone: config.default_zone.clone(),
            project_id: config.default_project_id.clone(),
            secret_key: config.secret_key.clone(),
            options,
            product: "instance/v1",
        })
    }

    /// The same client in another zone.
    pub fn in_zone(&self, zone: &str) -> Client {
        Client {
            zone: zone.to_string(),
            ..self.clone()
        }
    }

    /// The same client for the Block API (`/block/v1/zones/{zone}`): SBS
    /// volumes and snapshots, QCOW2 imports (reference §3, §7).
    pub fn block(&self) -> Client {
        Client {
            product: "block/v1",
            ..self.clone()
        }
    }

    /// The same client for the Marketplace API (`/marketplace/v2`, not
    /// zoned): the local images a label stands for (reference §2.1).
    pub fn marketplace(&self) -> Client {
        Client {
            product: "marketplace/v2",
            ..self.clone()
        }
    }

    pub fn zone(&self) -> &str {
        &self.zone
    }

    pub fn project_id(&self) -> &str {
        &self.project_id
    }

    pub fn options(&self) -> &ClientOptions {
        &self.options
    }

    /// `/instance/v1/zones/{zone}{path}` (or `/block/v1/…`) for a
    /// zone-relative `path` such as `/servers`.
    pub fn zone_path(&self, path: &str) -> String {
        if self.product == "marketplace/v2" {
            // Zones are a query parameter there.
            return format!("/{}{}", self.product, path);
        }
        format!("/{}/zones/{}{}", self.product, self.zone, path)
    }

    /// GET a JSON resource (retried).
    pub async fn get_json<T: DeserializeOwned>(
        &self,
        path: &str,
        query: &[(&str, String)],
    ) -> Result<T, Error> {
        let reply = self
            .send_with_retries(Method::GET, path, query, &Body::Empty, true)
            .await
            .map_err(Failure::into_error)?;
        decode(&request_line(&Method::GET, &self.zone_path(path)), &reply)
    }

    /// GET a `text/plain` resource (retried).
    pub async fn get_text(&self, path: &str) -> Result<String, Error> {
        let reply = self
            .send_with_retries(Method::GET, path, &[], &Body::Empty, true)
            .await
            .map_err(Failure::into_error)?;
        Ok(String::from_utf8_lossy(&reply.body).into_owned())
    }

    /// PATCH with a JSON body and decode the reply (retried: PATCHes here set
    /// absolute values, so sending one twice changes nothing).
    pub async fn patch_json<B: Serialize, T: DeserializeOwned>(
        &self,
        path: &str,
        body: &B,
    ) -> Result<T, Error> {
        let body = json_body(&Method::PATCH, &self.zone_path(path), body)?;
        let reply = self
            .send_with_retries(Method::PATCH, path, &[], &body, true)
            .await
            .map_err(Failure::into_error)?;
        decode(&request_line(&Method::PATCH, &self.zone_path(path)), &reply)
    }

    /// PATCH with a `text/plain` body, expecting no content (retried).
    pub async fn patch_text(&self, path: &str, text: &str) -> Result<(), Error> {
        let body = Body::Text(text.to_string());
        self.send_with_retries(Method::PATCH, path, &[], &body, true)
            .await
            .map_err(Failure::into_error)?;
        Ok(())
    }

    /// DELETE (retried). A 404 on a retry means an earlier try deleted it, so
    /// it counts as success; a 404 on the first try is returned.
    pub async fn delete(&self, path: &str) -> Result<(), Error> {
        let mut first = true;
        let mut attempt = 1;
        loop {
            match self
                .send_once(&Method::DELETE, path, &[], &Body::Empty)
                .await
            {
                Ok(_) => return Ok(()),
                Err(Failure::Final(e)) if !first && e.is_not_found() => {
                    debug!(path = %self.zone_path(path), "already deleted by an earlier try");
                    return Ok(());
                }
                Err(Failure::Final(e)) => return Err(e),
                Err(Failure::NotProcessed(e)) | Err(Failure::Unknown(e)) => {
                    if attempt >= self.options.retry.max_attempts {
                        return Err(e);
                    }
                    // A NotProcessed try deleted nothing, but the one before
                    // it may have: any try after the first may meet 404.
                    first = false;
                    self.pause_before_retry(attempt, &e).await;
                    attempt += 1;
                }
            }
        }
    }

    /// POST a non-idempotent request (a creation or an action) without ever
    /// sending it twice blindly. Not-processed failures are retried; after an
    /// unknown outcome, `already_done` is asked whether the request took
    /// effect: `Some(result)` ends the call with that result, `None` sends
    /// again, an error ends the call with that error.
    pub async fn post_checked<B, T, F, Fut>(
        &self,
        path: &str,
        body: &B,
        already_done: F,
    ) -> Result<T, Error>
    where
        B: Serialize,
        T: DeserializeOwned,
        F: Fn() -> Fut,
        Fut: Future<Output = Result<Option<T>, Error>>,
    {
        let request = request_line(&Method::POST, &self.zone_path(path));
        let body = json_body(&Method::POST, &self.zone_path(path), body)?;
        let mut checks = 0;
        loop {
            match self
                .send_with_retries(Method::POST, path, &[], &body, false)
                .await
            {
                Ok(reply) => return decode(&request, &reply),
                Err(Failure::Unknown(error)) => {
                    checks += 1;
                    warn!(%request, %error, "outcome unknown; checking whether the request took effect");
                    // Give the API time to finish what it may have started.
                    tokio::time::sleep(self.options.retry.backoff(checks)).await;
                    if let Some(found) = already_done().await? {
                        info!(%request, "the request had taken effect; not sending it again");
                        return Ok(found);
                    }
                    if checks >= self.options.retry.max_attempts {
                        return Err(error);
                    }
                    info!(%request, "the request had not taken effect; sending it again");
                }
                Err(Failure::NotProcessed(e)) | Err(Failure::Final(e)) => return Err(e),
            }
        }
    }

    /// Every item of a paginated list: pages of [`ClientOptions::per_page`]
    /// (≤ 100) until `total_count` items (or an empty or short page) came in.
    pub async fn list_all<T: DeserializeOwned>(
        &self,
        path: &str,
        query: &[(&str, String)],
        items_key: &str,
    ) -> Result<Vec<T>, Error> {
        let per_page = self.options.per_page.clamp(1, 100);
        let request = request_line(&Method::GET, &self.zone_path(path));
        let mut items: Vec<T> = Vec::new();
        for page in 1u32.. {
            let mut page_query: Vec<(&str, String)> = query.to_vec();
            page_query.push(("page", page.to_string()));
            // The Block and Marketplace APIs name it `page_size` (sdk-js
            // block v1, marketplace v2).
            let size_key = if self.product != "instance/v1" {
                "page_size"
            } else {
                "per_page"
            };
            page_query.push((size_key, per_page.to_string()));
            let reply = self
                .send_with_retries(Method::GET, path, &page_query, &Body::Empty, true)
                .await
                .map_err(Failure::into_error)?;
            let mut body: serde_json::Value = decode(&request, &reply)?;
            let total = body
                .get("total_count")
                .and_then(|v| v.as_u64())
                .or_else(|| {
                    reply
                        .headers
                        .get("x-total-count")
                        .and_then(|v| v.to_str().ok())
                        .and_then(|v| v.parse().ok())
                });
            let page_items = match body.get_mut(items_key).map(serde_json::Value::take) {
                None | Some(serde_json::Value::Null) => Vec::new(),
                Some(value) => {
                    serde_json::from_value::<Vec<T>>(value).map_err(|source| Error::Decode {
                        request: request.clone(),
                        source,
                    })?
                }
            };
            let count = page_items.len();
            items.extend(page_items);
            let done = match total {
                Some(total) => items.len() as u64 >= total || count == 0,
                None => count < per_page as usize,
            };
            if done {
                break;
            }
        }
        Ok(items)
    }

    /// Sends until success, a final failure, or the try budget is spent.
    /// Unknown outcomes are retried only when `idempotent`.
    pub(crate) async fn send_with_retries(
        &self,
        method: Method,
        path: &str,
        query: &[(&str, String)],
        body: &Body,
        idempotent: bool,
    ) -> Result<Reply, Failure> {
        let mut attempt = 1;
        loop {
            let failure = match self.send_once(&method, path, query, body).await {
                Ok(reply) => return Ok(reply),
                Err(failure) => failure,
            };
            let retry = match &failure {
                Failure::NotProcessed(_) => true,
                Failure::Unknown(_) => idempotent,
                Failure::Final(_) => false,
            };
            if !retry || attempt >= self.options.retry.max_attempts {
                return Err(failure);
            }
            let error = match &failure {
                Failure::NotProcessed(e) | Failure::Unknown(e) | Failure::Final(e) => e,
            };
            self.pause_before_retry(attempt, error).await;
            attempt += 1;
        }
    }

    async fn pause_before_retry(&self, attempt: u32, error: &Error) {
        let delay = self.options.retry.backoff(attempt);
        warn!(%error, attempt, ?delay, "scaleway request failed; retrying");
        tokio::time::sleep(delay).await;
    }

    /// One HTTP exchange, classified.
    async fn send_once(
        &self,
        method: &Method,
        path: &str,
        query: &[(&str, String)],
        body: &Body,
    ) -> Result<Reply, Failure> {
        let full_path = self.zone_path(path);
        let request = request_line(method, &full_path);
        let url = format!("{}{}", self.api_url, full_path);
        let mut token = HeaderValue::from_str(self.secret_key.expose()).map_err(|_| {
            Failure::Final(Error::Setup(
                "the secret key holds characters not allowed in an HTTP header".to_string(),
            ))
        })?;
        token.set_sensitive(true);
        let mut builder = self
            .http
            .request(method.clone(), &url)
            .header("X-Auth-Token", token);
        if !query.is_empty() {
            builder = builder.query(query);
        }
        builder = match body {
            Body::Empty => builder,
            Body::Json(bytes) => builder
                .header(CONTENT_TYPE, "application/json")
                .body(bytes.clone()),
            Body::Text(text) => builder
                .header(CONTENT_TYPE, "text/plain")
                .body(text.clone()),
        };
        let transport = |source: reqwest::Error| Error::Transport {
            request: request.clone(),
            source,
        };
        let response = match builder.send().await {
            Ok(response) => response,
            Err(e) if e.is_connect() => return Err(Failure::NotProcessed(transport(e))),
            Err(e) => return Err(Failure::Unknown(transport(e))),
        };
        let status = response.status();
        let headers = response.headers().clone();
        debug!(%request, status = status.as_u16(), "scaleway response");
        let body = match response.bytes().await {
            Ok(body) => body,
            // The status line came back but the rest was lost: for an error
            // status that is still an answer; for a success it is unknown.
            Err(e) if status.is_success() => return Err(Failure::Unknown(transport(e))),
            Err(_) => bytes::Bytes::new(),
        };
        if status.is_success() {
            return Ok(Reply {
                status,
                headers,
                body,
            });
        }
        let error = Error::from(ApiError::from_body(status, request, &body));
        if status == StatusCode::TOO_MANY_REQUESTS {
            Err(Failure::NotProcessed(error))
        } else if status.is_server_error() {
            Err(Failure::Unknown(error))
        } else {
            Err(Failure::Final(error))
        }
    }
}

fn request_line(method: &Method, path: &str) -> String {
    format!("{method} {path}")
}

fn json_body<B: Serialize>(method: &Method, path: &str, body: &B) -> Result<Body, Error> {
    serde_json::to_vec(body)
        .map(Body::Json)
        .map_err(|source| Error::Decode {
            request: request_line(method, path),
            source,
        })
}

fn decode<T: DeserializeOwned>(request: &str, reply: &Reply) -> Result<T, Error> {
    let bytes: &[u8] = if reply.body.is_empty() || reply.status == StatusCode::NO_CONTENT {
        b"null"
    } else {
        &reply.body
    };
    serde_json::from_slice(bytes).map_err(|source| Error::Decode {
        request: request.to_string(),
        source,
    })
}
