//! One file as one S3 multipart upload.
//!
//! Each part is a stream over its byte range of the file (memory stays at a
//! few read buffers per part in flight, whatever the part size), sent with
//! its length, and retried on transient failures. Parts go `parallel` at a
//! time. On any failure the upload is aborted, so no part stays billed;
//! `started` hands the upload id to the caller first, so that an interrupt
//! (which skips this code) can abort it too.

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use futures_util::{StreamExt, TryStreamExt};
use tokio::io::{AsyncReadExt, AsyncSeekExt};
use tracing::{info, warn};

use super::parts::{Limits, PartPlan};
use super::{ObjectStore, S3Error};

/// How an upload is cut and sent.
#[derive(Clone, Debug)]
pub struct UploadOptions {
    /// Parts are at least this long (the plan grows them to stay within the
    /// part count).
    pub part_size: u64,
    pub limits: Limits,
    /// Parts in flight at once.
    pub parallel: usize,
    /// Tries per part (and per request of the upload's start and end).
    pub attempts: u32,
    /// The pause after the first failed try; it doubles after each.
    pub backoff: Duration,
}

impl Default for UploadOptions {
    fn default() -> Self {
        UploadOptions {
            part_size: super::parts::DEFAULT_PART_SIZE,
            limits: super::parts::SCALEWAY,
            parallel: 4,
            attempts: 5,
            backoff: Duration::from_secs(1),
        }
    }
}

/// What an upload did.
#[derive(Clone, Debug, serde::Serialize)]
pub struct UploadReport {
    pub bytes: u64,
    pub parts: u64,
    pub part_size: u64,
    /// Part tries that failed and were sent again.
    pub retries: u64,
    /// The whole upload: start, parts, completion, check.
    pub seconds: f64,
    /// Sending the parts only (the client's throughput; completion is the
    /// service assembling the object).
    pub parts_seconds: f64,
}

/// Bytes sent so far (of parts not yet failed), for progress.
pub type Progress = Arc<dyn Fn(u64) + Send + Sync>;

/// Uploads `path` as `key`. `started` gets the upload id as soon as the
/// upload exists.
pub async fn upload_file(
    store: &ObjectStore,
    key: &str,
    path: &Path,
    options: &UploadOptions,
    started: impl FnOnce(&str),
    progress: Progress,
) -> Result<UploadReport> {
    let size = tokio::fs::metadata(path)
        .await
        .with_context(|| format!("read {}", path.display()))?
        .len();
    let plan = PartPlan::new(size, options.part_size, options.limits)?;
    let began = Instant::now();
    let upload_id = retrying(options, "start the upload", || store.create_upload(key)).await?;
    started(&upload_id);
    info!(
        key,
        upload_id,
        parts = plan.count,
        part_size = plan.part_size,
        "multipart upload started"
    );
    let sent = Arc::new(AtomicU64::new(0));
    let retries = Arc::new(AtomicU64::new(0));
    let mut parts_seconds = 0.0;
    let result = async {
        let etags: Vec<(u64, String)> = futures_util::stream::iter(1..=plan.count)
            .map(|number| {
                let sent = sent.clone();
                let retries = retries.clone();
                let progress = progress.clone();
                let upload_id = upload_id.as_str();
                async move {
                    let etag = send_part(
                        store, key, upload_id, path, &plan, number, options, &sent, &retries,
                        &progress,
                    )
                    .await?;
                    Ok::<_, anyhow::Error>((number, etag))
                }
            })
            .buffer_unordered(options.parallel.max(1))
            .try_collect()
            .await?;
        parts_seconds = began.elapsed().as_secs_f64();
        let mut etags = etags;
        etags.sort_unstable_by_key(|(number, _)| *number);
        let etags: Vec<String> = etags.into_iter().map(|(_, etag)| etag).collect();
        retrying(options, "complete the upload", || {
            store.complete_upload(key, &upload_id, &etags)
        })
        .await?;
        // What the service stored must be the file, byte count at least.
        let stored = store.head_object(key).await?;
        if stored != Some(size) {
            anyhow::bail!(
                "{} holds {stored:?} bytes after the upload, not {size}",
                store.describe(key)
            );
        }
        Ok(())
    }
    .await;
    if let Err(error) = result {
        if let Err(abort) = store.abort_upload(key, &upload_id).await {
            warn!(%abort, upload_id, "could not abort the failed upload; `imgforge cleanup` removes it");
        }
        // A completed upload is an object: it goes too.
        if let Err(delete) = store.delete_object(key).await {
            warn!(%delete, key, "could not delete the object of the failed upload");
        }
        return Err(error.context(format!(
            "upload {} to {}",
            path.display(),
            store.describe(key)
        )));
    }
    Ok(UploadReport {
        bytes: size,
        parts: plan.count,
        part_size: plan.part_size,
        retries: retries.load(Ordering::Relaxed),
        seconds: began.elapsed().as_secs_f64(),
        parts_seconds,
    })
}

/// One part, retried; its ETag.
#[allow(clippy::too_many_arguments)]
async fn send_part(
    store: &ObjectStore,
    key: &str,
    upload_id: &str,
    path: &Path,
    plan: &PartPlan,
    number: u64,
    options: &UploadOptions,
    sent: &Arc<AtomicU64>,
    retries: &AtomicU64,
    progress: &Progress,
) -> Result<String> {
    let range = plan.range(number);
    let len = range.end - range.start;
    let part = u16::try_from(number).context("part number above 65535")?;
    let mut attempt = 1;
    loop {
        let mut file = tokio::fs::File::open(path)
            .await
            .with_context(|| format!("open {}", path.display()))?;
        file.seek(std::io::SeekFrom::Start(range.start)).await?;
        // Counts what this try streamed, to take it back if the try fails.
        let this_try = Arc::new(AtomicU64::new(0));
        let body = {
            let sent = sent.clone();
            let this_try = this_try.clone();
            let progress = progress.clone();
            tokio_util::io::ReaderStream::with_capacity(file.take(len), 256 << 10).inspect_ok(
                move |chunk| {
                    let n = chunk.len() as u64;
                    this_try.fetch_add(n, Ordering::Relaxed);
                    progress(sent.fetch_add(n, Ordering::Relaxed) + n);
                },
            )
        };
        match store
            .upload_part(key, upload_id, part, reqwest::Body::wrap_stream(body), len)
            .await
        {
            Ok(etag) => return Ok(etag),
            Err(error) => {
                let streamed = this_try.load(Ordering::Relaxed);
                progress(sent.fetch_sub(streamed, Ordering::Relaxed) - streamed);
                if !error.is_transient() || attempt >= options.attempts {
                    return Err(anyhow::Error::new(error)
                        .context(format!("part {number} of {} (try {attempt})", plan.count)));
                }
                let pause = options.backoff * 2u32.saturating_pow(attempt - 1);
                warn!(%error, part = number, attempt, ?pause, "part upload failed; sending it again");
                retries.fetch_add(1, Ordering::Relaxed);
                tokio::time::sleep(pause).await;
                attempt += 1;
            }
        }
    }
}

/// Runs `request` until it succeeds, fails for good, or the tries are spent.
async fn retrying<T, F, Fut>(options: &UploadOptions, what: &str, request: F) -> Result<T>
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = Result<T, S3Error>>,
{
    let mut attempt = 1;
    loop {
        match request().await {
            Ok(value) => return Ok(value),
            Err(error) if error.is_transient() && attempt < options.attempts => {
                let pause = options.backoff * 2u32.saturating_pow(attempt - 1);
                warn!(%error, attempt, ?pause, "{what}: failed; trying again");
                tokio::time::sleep(pause).await;
                attempt += 1;
            }
            Err(error) => return Err(anyhow::Error::new(error).context(what.to_string())),
        }
    }
}
