//! Object Storage through the S3 API: the operations a QCOW2 push needs
//! (bucket check, multipart upload, abort, listing what a killed push left,
//! delete), against any S3 endpoint (Scaleway's `https://s3.{region}.scw.cloud`,
//! or a test server on loopback). Path-style URLs, SigV4.
//!
//! * [`parts`]: the part plan (pure): part size and count within the
//!   service's limits whatever the file size;
//! * [`upload`]: one file as a multipart upload, parts streamed from the
//!   file, each retried, the upload aborted on failure.
//!
//! Why `rusty-s3`: it signs S3 requests (SigV4, presigned URLs) and leaves
//! the I/O to us. A custom endpoint and region are plain values; every
//! multipart step is its own action, so the part size is ours (Scaleway
//! allows 1000 parts, not AWS's 10,000) and each part's body is a stream
//! over a slice of the file that reqwest (already our HTTP client, rustls)
//! sends without holding it in memory; retries are ours too, per part. The
//! AWS SDK does all of this, but brings its own HTTP and TLS stacks and its
//! default request checksums, which S3-compatible services have refused;
//! `rust-s3` and `object_store` take a part as an in-memory buffer (a
//! 1 TB image needs 1 GB parts). rusty-s3 has no ListMultipartUploads, the
//! one call that finds the uploads a killed process left: `BareAction`
//! adds it on the crate's own signer.

pub mod parts;
pub mod upload;

use std::time::Duration;

use reqwest::StatusCode;
use rusty_s3::actions::S3Action;
use rusty_s3::{Bucket, Credentials, Map, Method, UrlStyle};
use serde::Deserialize;
use url::Url;

/// How long a presigned request stays valid: long enough for the slowest
/// part on a slow uplink (a 5 GB part at 20 Mbit/s takes about 35 minutes).
const SIGNED_FOR: Duration = Duration::from_secs(6 * 3600);

/// Where objects go and with which keys.
#[derive(Clone, Debug)]
pub struct Location {
    /// `https://s3.fr-par.scw.cloud`, or a test server.
    pub endpoint: Url,
    pub region: String,
    pub bucket: String,
}

/// An S3 request that failed, with the service's code and message.
#[derive(Debug, thiserror::Error)]
pub enum S3Error {
    #[error("{request}: {status} {code}: {message}")]
    Service {
        request: String,
        status: StatusCode,
        code: String,
        message: String,
    },
    #[error("{request}: {source}")]
    Transport {
        request: String,
        #[source]
        source: reqwest::Error,
    },
    #[error("{request}: unexpected reply: {detail}")]
    Reply { request: String, detail: String },
}

impl S3Error {
    /// Worth sending again: the service was busy or failed, or the
    /// connection broke.
    pub fn is_transient(&self) -> bool {
        match self {
            S3Error::Service { status, .. } => {
                status.is_server_error() || *status == StatusCode::TOO_MANY_REQUESTS
            }
            S3Error::Transport { .. } => true,
            S3Error::Reply { .. } => false,
        }
    }

    fn is_not_found(&self) -> bool {
        matches!(self, S3Error::Service { status, .. } if *status == StatusCode::NOT_FOUND)
    }

    fn is_no_such_bucket(&self) -> bool {
        matches!(self, S3Error::Service { code, .. } if code == "NoSuchBucket")
    }
}

/// A multipart upload that was started and neither completed nor aborted.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PendingUpload {
    pub key: String,
    pub upload_id: String,
}

/// One bucket of one S3 service, with credentials.
#[derive(Clone)]
pub struct ObjectStore {
    bucket: Bucket,
    credentials: Credentials,
    http: reqwest::Client,
    location: Location,
}

impl std::fmt::Debug for ObjectStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the secret.
        f.debug_struct("ObjectStore")
            .field("location", &self.location)
            .finish_non_exhaustive()
    }
}

impl ObjectStore {
    pub fn new(location: Location, access_key: &str, secret_key: &str) -> anyhow::Result<Self> {
        let bucket = Bucket::new(
            location.endpoint.clone(),
            UrlStyle::Path,
            location.bucket.clone(),
            location.region.clone(),
        )
        .map_err(|e| {
            anyhow::anyhow!(
                "Object Storage endpoint {} with bucket {:?}: {e}",
                location.endpoint,
                location.bucket
            )
        })?;
        let http = reqwest::Client::builder()
            .user_agent(concat!("imgforge/", env!("CARGO_PKG_VERSION")))
            .connect_timeout(Duration::from_secs(30))
            // A part streams for minutes: no overall timeout, but a stalled
            // connection must not hang the push.
            .read_timeout(Duration::from_secs(300))
            .build()?;
        Ok(ObjectStore {
            bucket,
            credentials: Credentials::new(access_key, secret_key),
            http,
            location,
        })
    }

    pub fn location(&self) -> &Location {
        &self.location
    }

    /// `s3://bucket/key`, for messages.
    pub fn describe(&self, key: &str) -> String {
        format!("s3://{}/{key}", self.location.bucket)
    }

    /// Creates the bucket unless it exists (ours or not: a bucket someone
    /// else owns fails the first upload with the service's message).
    pub async fn ensure_bucket(&self) -> Result<(), S3Error> {
        let request = format!("HEAD bucket {}", self.location.bucket);
        let url = self
            .bucket
            .head_bucket(Some(&self.credentials))
            .sign(SIGNED_FOR);
        let reply = self.send(&request, self.http.head(url)).await;
        match reply {
            Ok(_) => return Ok(()),
            Err(e) if e.is_not_found() => {}
            Err(e) => return Err(e),
        }
        let request = format!("PUT bucket {}", self.location.bucket);
        let url = self
            .bucket
            .create_bucket(&self.credentials)
            .sign(SIGNED_FOR);
        // S3 wants a length even for an empty body.
        match self
            .send(
                &request,
                self.http
                    .put(url)
                    .header(reqwest::header::CONTENT_LENGTH, 0),
            )
            .await
        {
            Ok(_) => Ok(()),
            // Created meanwhile by another push.
            Err(S3Error::Service { code, .. }) if code == "BucketAlreadyOwnedByYou" => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// The object's size, or `None` if there is no such object.
    pub async fn head_object(&self, key: &str) -> Result<Option<u64>, S3Error> {
        let request = format!("HEAD {}", self.describe(key));
        let url = self
            .bucket
            .head_object(Some(&self.credentials), key)
            .sign(SIGNED_FOR);
        match self.send(&request, self.http.head(url)).await {
            // The header itself: reqwest's content_length() is the body's
            // length, which a HEAD reply does not have.
            Ok(response) => Ok(response
                .headers()
                .get(reqwest::header::CONTENT_LENGTH)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse().ok())),
            Err(e) if e.is_not_found() => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Deletes the object; one that is already gone counts as deleted.
    pub async fn delete_object(&self, key: &str) -> Result<(), S3Error> {
        let request = format!("DELETE {}", self.describe(key));
        let url = self
            .bucket
            .delete_object(Some(&self.credentials), key)
            .sign(SIGNED_FOR);
        match self.send(&request, self.http.delete(url)).await {
            Ok(_) => Ok(()),
            Err(e) if e.is_not_found() => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// The keys under `prefix`.
    pub async fn list_objects(&self, prefix: &str) -> Result<Vec<String>, S3Error> {
        let request = format!("GET s3://{}?prefix={prefix}", self.location.bucket);
        let mut keys = Vec::new();
        let mut token: Option<String> = None;
        loop {
            let mut action = self.bucket.list_objects_v2(Some(&self.credentials));
            action.with_prefix(prefix);
            if let Some(token) = &token {
                action.with_continuation_token(token.as_str());
            }
            let url = action.sign(SIGNED_FOR);
            let response = match self.send(&request, self.http.get(url)).await {
                // A bucket that does not exist holds nothing.
                Err(e) if e.is_no_such_bucket() => return Ok(keys),
                other => other?,
            };
            let body = response.text().await.map_err(|source| S3Error::Transport {
                request: request.clone(),
                source,
            })?;
            let page = rusty_s3::actions::ListObjectsV2::parse_response(&body).map_err(|e| {
                S3Error::Reply {
                    request: request.clone(),
                    detail: e.to_string(),
                }
            })?;
            keys.extend(page.contents.into_iter().map(|c| c.key));
            match page.next_continuation_token {
                Some(next) if !next.is_empty() => token = Some(next),
                _ => break,
            }
        }
        Ok(keys)
    }

    /// The multipart uploads under `prefix` that were neither completed nor
    /// aborted (what a killed push leaves; billed until aborted).
    pub async fn list_uploads(&self, prefix: &str) -> Result<Vec<PendingUpload>, S3Error> {
        let request = format!("GET s3://{}?uploads&prefix={prefix}", self.location.bucket);
        let mut uploads = Vec::new();
        let mut markers: Option<(String, String)> = None;
        loop {
            let mut action = BareAction::list_uploads(&self.bucket, &self.credentials);
            action.query.insert("prefix", prefix.to_string());
            if let Some((key, id)) = &markers {
                action.query.insert("key-marker", key.clone());
                action.query.insert("upload-id-marker", id.clone());
            }
            let url = action.sign(SIGNED_FOR);
            let response = match self.send(&request, self.http.get(url)).await {
                Err(e) if e.is_no_such_bucket() => return Ok(uploads),
                other => other?,
            };
            let body = response.text().await.map_err(|source| S3Error::Transport {
                request: request.clone(),
                source,
            })?;
            let page: ListUploadsResult =
                quick_xml::de::from_str(&body).map_err(|e| S3Error::Reply {
                    request: request.clone(),
                    detail: format!("{e}: {body}"),
                })?;
            uploads.extend(page.uploads.into_iter().map(|u| PendingUpload {
                key: u.key,
                upload_id: u.upload_id,
            }));
            match (
                page.is_truncated,
                page.next_key_marker,
                page.next_upload_id_marker,
            ) {
                (true, Some(key), Some(id)) => markers = Some((key, id)),
                _ => break,
            }
        }
        Ok(uploads)
    }

    /// Aborts a multipart upload, which frees its parts; one that is already
    /// gone counts as aborted.
    pub async fn abort_upload(&self, key: &str, upload_id: &str) -> Result<(), S3Error> {
        let request = format!("DELETE {} (upload {upload_id})", self.describe(key));
        let url = self
            .bucket
            .abort_multipart_upload(Some(&self.credentials), key, upload_id)
            .sign(SIGNED_FOR);
        match self.send(&request, self.http.delete(url)).await {
            Ok(_) => Ok(()),
            Err(e) if e.is_not_found() => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Starts a multipart upload; its id.
    pub async fn create_upload(&self, key: &str) -> Result<String, S3Error> {
        let request = format!("POST {}?uploads", self.describe(key));
        let url = BareAction::create_upload(&self.bucket, &self.credentials, key).sign(SIGNED_FOR);
        let body = self
            .send(
                &request,
                self.http
                    .post(url)
                    .header(reqwest::header::CONTENT_LENGTH, 0),
            )
            .await?
            .text()
            .await;
        let body = body.map_err(|source| S3Error::Transport {
            request: request.clone(),
            source,
        })?;
        let created =
            rusty_s3::actions::CreateMultipartUpload::parse_response(&body).map_err(|e| {
                S3Error::Reply {
                    request: request.clone(),
                    detail: format!("{e}: {body}"),
                }
            })?;
        Ok(created.upload_id().to_string())
    }

    /// Sends one part (`number` from 1) of `len` bytes; its ETag.
    pub async fn upload_part(
        &self,
        key: &str,
        upload_id: &str,
        number: u16,
        body: reqwest::Body,
        len: u64,
    ) -> Result<String, S3Error> {
        let request = format!("PUT {} part {number}", self.describe(key));
        let url = self
            .bucket
            .upload_part(Some(&self.credentials), key, number, upload_id)
            .sign(SIGNED_FOR);
        // S3 wants the length up front (no chunked encoding for a part).
        let builder = self
            .http
            .put(url)
            .header(reqwest::header::CONTENT_LENGTH, len)
            .body(body);
        let response = self.send(&request, builder).await?;
        response
            .headers()
            .get(reqwest::header::ETAG)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
            .ok_or_else(|| S3Error::Reply {
                request,
                detail: "no ETag header".to_string(),
            })
    }

    /// Completes a multipart upload from its parts' ETags, in part order.
    pub async fn complete_upload(
        &self,
        key: &str,
        upload_id: &str,
        etags: &[String],
    ) -> Result<(), S3Error> {
        let request = format!("POST {}?uploadId (complete)", self.describe(key));
        let action = self.bucket.complete_multipart_upload(
            Some(&self.credentials),
            key,
            upload_id,
            etags.iter().map(String::as_str),
        );
        let url = action.sign(SIGNED_FOR);
        let body = self
            .send(&request, self.http.post(url).body(action.body()))
            .await?
            .text()
            .await
            .map_err(|source| S3Error::Transport {
                request: request.clone(),
                source,
            })?;
        // S3 may answer 200 and put the error in the body.
        if let Ok(error) = quick_xml::de::from_str::<ErrorBody>(&body) {
            return Err(S3Error::Service {
                request,
                status: StatusCode::OK,
                code: error.code,
                message: error.message,
            });
        }
        Ok(())
    }

    /// Sends one request; a non-2xx reply becomes [`S3Error::Service`] with
    /// the XML error's code and message.
    async fn send(
        &self,
        request: &str,
        builder: reqwest::RequestBuilder,
    ) -> Result<reqwest::Response, S3Error> {
        let response = builder.send().await.map_err(|source| S3Error::Transport {
            request: request.to_string(),
            source,
        })?;
        let status = response.status();
        if status.is_success() {
            return Ok(response);
        }
        let body = response.text().await.unwrap_or_default();
        let (code, message) = match quick_xml::de::from_str::<ErrorBody>(&body) {
            Ok(error) => (error.code, error.message),
            Err(_) => (
                status
                    .canonical_reason()
                    .unwrap_or("error")
                    .replace(' ', ""),
                body.chars().take(200).collect(),
            ),
        };
        Err(S3Error::Service {
            request: request.to_string(),
            status,
            code,
            message,
        })
    }
}

/// `<Error><Code>…</Code><Message>…</Message></Error>`.
#[derive(Deserialize)]
struct ErrorBody {
    #[serde(rename = "Code")]
    code: String,
    #[serde(rename = "Message", default)]
    message: String,
}

/// A request rusty-s3 has no action for, or spells in a way some S3
/// services refuse, signed with the crate's own signer: ListMultipartUploads
/// (`GET /{bucket}?uploads`) and CreateMultipartUpload as the S3 API
/// documents it (`POST /{key}?uploads`; rusty-s3 sends `uploads=1`, which
/// moto's server answers with a 500).
struct BareAction<'a> {
    method: Method,
    url: Url,
    credentials: &'a Credentials,
    region: &'a str,
    query: Map<'a>,
    headers: Map<'a>,
}

impl<'a> BareAction<'a> {
    /// `GET /{bucket}?uploads`.
    fn list_uploads(bucket: &'a Bucket, credentials: &'a Credentials) -> Self {
        Self::new(Method::Get, bucket.base_url().clone(), bucket, credentials)
    }

    /// `POST /{bucket}/{key}?uploads`.
    fn create_upload(bucket: &'a Bucket, credentials: &'a Credentials, key: &str) -> Self {
        Self::new(Method::Post, bucket.object_url(key), bucket, credentials)
    }

    fn new(method: Method, url: Url, bucket: &'a Bucket, credentials: &'a Credentials) -> Self {
        let mut query = Map::new();
        query.insert("uploads", "");
        BareAction {
            method,
            url,
            credentials,
            region: bucket.region(),
            query,
            headers: Map::new(),
        }
    }

    fn sign(&self, expires_in: Duration) -> Url {
        self.sign_with_time(expires_in, &jiff::Timestamp::now())
    }

    fn sign_with_time(&self, expires_in: Duration, time: &jiff::Timestamp) -> Url {
        // The signer takes the query sorted by name.
        let mut query: Vec<(&str, &str)> = self.query.iter().collect();
        query.sort_unstable();
        rusty_s3::signing::sign(
            time,
            self.method,
            self.url.clone(),
            self.credentials.key(),
            self.credentials.secret(),
            self.credentials.token(),
            self.region,
            expires_in.as_secs(),
            query.into_iter(),
            self.headers.iter(),
        )
    }
}

#[derive(Deserialize)]
struct ListUploadsResult {
    #[serde(rename = "Upload", default)]
    uploads: Vec<UploadEntry>,
    #[serde(rename = "IsTruncated", default)]
    is_truncated: bool,
    #[serde(rename = "NextKeyMarker")]
    next_key_marker: Option<String>,
    #[serde(rename = "NextUploadIdMarker")]
    next_upload_id_marker: Option<String>,
}

#[derive(Deserialize)]
struct UploadEntry {
    #[serde(rename = "Key")]
    key: String,
    #[serde(rename = "UploadId")]
    upload_id: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn list_uploads_replies_parse() {
        let body = r#"<?xml version="1.0" encoding="UTF-8"?>
<ListMultipartUploadsResult xmlns="http://s3.amazonaws.com/doc/2006-03-01/">
  <Bucket>b</Bucket><KeyMarker></KeyMarker><UploadIdMarker></UploadIdMarker>
  <NextKeyMarker>imgforge/2/x.qcow2</NextKeyMarker><NextUploadIdMarker>u2</NextUploadIdMarker>
  <MaxUploads>1000</MaxUploads><IsTruncated>true</IsTruncated>
  <Upload><Key>imgforge/1/x.qcow2</Key><UploadId>u1</UploadId><Initiated>2026-12-07T00:00:00Z</Initiated></Upload>
  <Upload><Key>imgforge/2/x.qcow2</Key><UploadId>u2</UploadId></Upload>
</ListMultipartUploadsResult>"#;
        let page: ListUploadsResult = quick_xml::de::from_str(body).unwrap();
        assert_eq!(page.uploads.len(), 2);
        assert_eq!(page.uploads[1].upload_id, "u2");
        assert!(page.is_truncated);
        assert_eq!(page.next_key_marker.as_deref(), Some("imgforge/2/x.qcow2"));
        let empty: ListUploadsResult = quick_xml::de::from_str(
            "<ListMultipartUploadsResult><IsTruncated>false</IsTruncated></ListMultipartUploadsResult>",
        )
        .unwrap();
        assert!(empty.uploads.is_empty());
    }

    #[test]
    fn error_bodies_parse_and_transience_is_by_status() {
        let e: ErrorBody = quick_xml::de::from_str(
            "<Error><Code>NoSuchUpload</Code><Message>gone</Message><RequestId>1</RequestId></Error>",
        )
        .unwrap();
        assert_eq!(
            (e.code.as_str(), e.message.as_str()),
            ("NoSuchUpload", "gone")
        );
        let service = |status: u16| S3Error::Service {
            request: String::new(),
            status: StatusCode::from_u16(status).unwrap(),
            code: String::new(),
            message: String::new(),
        };
        assert!(service(500).is_transient());
        assert!(service(503).is_transient());
        assert!(service(429).is_transient());
        assert!(!service(403).is_transient());
        assert!(!service(404).is_transient());
    }

    #[test]
    fn list_uploads_is_signed_for_the_bucket_with_a_sorted_query() {
        let bucket = Bucket::new(
            "http://127.0.0.1:9000".parse().unwrap(),
            UrlStyle::Path,
            "images",
            "fr-par",
        )
        .unwrap();
        let credentials = Credentials::new("SCWKEY", "secret");
        let mut action = BareAction::list_uploads(&bucket, &credentials);
        action.query.insert("prefix", "imgforge/ab/");
        let url = action.sign_with_time(SIGNED_FOR, &jiff::Timestamp::UNIX_EPOCH);
        assert_eq!(url.path(), "/images/");
        let names: Vec<String> = url.query_pairs().map(|(k, _)| k.into_owned()).collect();
        assert!(names.contains(&"uploads".to_string()), "{url}");
        assert!(names.contains(&"X-Amz-Signature".to_string()), "{url}");
        assert!(url.as_str().contains("fr-par%2Fs3%2Faws4_request"), "{url}");
    }
}
