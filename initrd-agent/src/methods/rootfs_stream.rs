//! The part both rootfs methods share: stream `rootfs_url` through the
//! decompressor into the tar extractor on the mounted root filesystem, with
//! progress reports and the digest checked at the end.

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tracing::info;

use super::context::BuildContext;
use crate::fetch::{self, FetchOptions};
use crate::stage::{StageContext, StageError};
use contract::{Stage, StateDetail};

/// What came over the network.
pub struct Streamed {
    pub fetched_bytes: u64,
}

pub fn stream_rootfs(ctx: &BuildContext, root: &Path) -> Result<Streamed, StageError> {
    let url = ctx
        .params
        .required("rootfs_url", "this build method")
        .stage(Stage::Params)?
        .to_string();
    let options = FetchOptions {
        expected_sha256: ctx
            .params
            .get("rootfs_sha256")
            .filter(|s| !s.is_empty())
            .map(str::to_string),
        ..FetchOptions::default()
    };
    let mut download = fetch::open(ctx.runtime.clone(), &url, options)
        .with_context(|| format!("fetch rootfs_url {url}"))
        .stage(Stage::Fetch)?;
    let progress = download.progress();
    let done = Arc::new(AtomicBool::new(false));
    let reporter = spawn_progress_reporter(ctx, progress.clone(), done.clone());

    let extracted = (|| {
        let (compression, reader) =
            fetch::decompress(&mut download).context("read the rootfs stream")?;
        info!(
            "extracting rootfs_url {url} ({compression}) onto {}",
            root.display()
        );
        crate::extract::extract(reader, root)
    })();
    done.store(true, Ordering::Relaxed);
    reporter.abort();
    let summary = match extracted {
        Ok(s) => s,
        // A broken download surfaces as a read error inside the extractor;
        // name the stage after the cause.
        Err(e) => {
            let stage = if download_failed(&e) {
                Stage::Fetch
            } else {
                Stage::Extract
            };
            return Err(e)
                .with_context(|| format!("rootfs_url {url}"))
                .stage(stage);
        }
    };
    let fetched = download
        .finish()
        .with_context(|| format!("rootfs_url {url}"))
        .stage(Stage::Fetch)?;
    info!(
        "rootfs: {} bytes fetched (sha256 {}), {} entries extracted",
        fetched.bytes,
        fetched.sha256.as_deref().unwrap_or("not checked"),
        summary.entries
    );
    ctx.report(Stage::Extract, 100);
    Ok(Streamed {
        fetched_bytes: fetched.bytes,
    })
}

/// True when the error chain holds a download error rather than an
/// extraction one.
pub(super) fn download_failed(e: &anyhow::Error) -> bool {
    e.chain()
        .any(|c| c.downcast_ref::<fetch::FetchError>().is_some())
}

pub(super) fn spawn_progress_reporter(
    ctx: &BuildContext,
    progress: fetch::Progress,
    done: Arc<AtomicBool>,
) -> tokio::task::JoinHandle<()> {
    let md = ctx.metadata.clone();
    ctx.runtime.spawn(async move {
        let mut last_percent = None;
        while !done.load(Ordering::Relaxed) {
            tokio::time::sleep(Duration::from_secs(3)).await;
            let read = progress.bytes_read();
            let percent = progress
                .total()
                .filter(|t| *t > 0)
                .map(|t| (read * 100 / t).min(100) as u8);
            info!(
                "fetch: {} MiB{}",
                read >> 20,
                percent.map(|p| format!(" ({p}%)")).unwrap_or_default()
            );
            if let (Some(md), Some(p)) = (&md, percent) {
                if last_percent != Some(p) {
                    md.report_state(&StateDetail::Building {
                        stage: Stage::Fetch,
                        percent: p,
                    })
                    .await;
                    last_percent = Some(p);
                }
            }
        }
    })
}
