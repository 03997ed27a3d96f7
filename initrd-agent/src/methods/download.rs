//! The download of a method's input (the rootfs tarball, the disk image):
//! opened with its expected digest, its progress logged and reported while
//! it is read, and a failure while it is read blamed on the download or on
//! what the method does with the bytes.
//!
//! Progress: every 3 s the log gets `fetch: N MiB (P%)` and the metadata
//! server `building: fetch P` (when P changed), from a task on the runtime
//! that lives as long as its [`ProgressReporter`]: dropping it, on whatever
//! path the method leaves by (the end of the transfer, an early `?`, a
//! panic), stops the task.

use std::future::Future;
use std::time::Duration;

use anyhow::Context;
use tokio::runtime::Handle;
use tokio::task::JoinHandle;
use tracing::info;

use super::context::BuildContext;
use crate::fetch::{self, Download, FetchOptions, Progress};
use crate::metadata::MetadataClient;
use crate::stage::{StageContext, StageError};
use contract::method::Input;
use contract::{Stage, StateDetail};

/// Opens `url`, the method's `input`, checked against the input's sha256
/// parameter when that is set, and starts reporting its progress (until the
/// reporter is dropped).
pub fn open(
    ctx: &BuildContext,
    input: Input,
    url: &str,
) -> Result<(Download, ProgressReporter), StageError> {
    let options = FetchOptions {
        expected_sha256: ctx
            .params
            .get(input.sha256_key())
            .filter(|s| !s.is_empty())
            .map(str::to_string),
        ..FetchOptions::default()
    };
    let download = fetch::open(ctx.runtime.clone(), url, options)
        .with_context(|| format!("fetch {} {url}", input.url_key()))
        .stage(Stage::Fetch)?;
    let reporter = ProgressReporter::start(ctx, download.progress());
    Ok((download, reporter))
}

/// An error while the input was read and used: a broken download surfaces
/// as a read error inside the extractor or the writer, so the stage is
/// named after the cause, `Fetch` when the chain holds a download error,
/// else `otherwise`.
pub fn failed(error: anyhow::Error, input: Input, url: &str, otherwise: Stage) -> StageError {
    let stage = if error
        .chain()
        .any(|c| c.downcast_ref::<fetch::FetchError>().is_some())
    {
        Stage::Fetch
    } else {
        otherwise
    };
    StageError {
        stage,
        error: error.context(format!("{} {url}", input.url_key())),
    }
}

/// How often progress is logged and reported.
const INTERVAL: Duration = Duration::from_secs(3);

/// The running reporter; dropping it stops it.
#[must_use = "the reporter stops when this is dropped"]
pub struct ProgressReporter {
    task: JoinHandle<()>,
}

impl ProgressReporter {
    /// Starts reporting `progress` on the build's runtime, to its log and
    /// its metadata server.
    fn start(ctx: &BuildContext, progress: Progress) -> ProgressReporter {
        let reporting = report_every(INTERVAL, progress, ctx.metadata.clone());
        ProgressReporter::spawn(&ctx.runtime, reporting)
    }

    fn spawn(
        runtime: &Handle,
        reporting: impl Future<Output = ()> + Send + 'static,
    ) -> ProgressReporter {
        ProgressReporter {
            task: runtime.spawn(reporting),
        }
    }
}

impl Drop for ProgressReporter {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Logs and reports `progress` every `interval`, until aborted.
async fn report_every(interval: Duration, progress: Progress, md: Option<MetadataClient>) {
    let mut last_percent = None;
    loop {
        tokio::time::sleep(interval).await;
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
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    /// The reporter's loop, holding `alive` while it runs: the count of
    /// `alive` drops back to 1 once the task is gone.
    fn reporter(runtime: &Handle, alive: &Arc<()>) -> ProgressReporter {
        let held = alive.clone();
        ProgressReporter::spawn(runtime, async move {
            let _held = held;
            report_every(Duration::from_millis(5), Progress::new(), None).await;
        })
    }

    fn wait_until_stopped(alive: &Arc<()>) {
        for _ in 0..200 {
            if Arc::strong_count(alive) == 1 {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        panic!("the reporter task still runs after its guard was dropped");
    }

    #[test]
    fn the_reporter_stops_on_an_early_return_and_on_a_panic() {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let alive = Arc::new(());

        // A method that fails between starting the reporter and the end of
        // its transfer.
        let method = |fail: bool| -> anyhow::Result<()> {
            let _reporter = reporter(runtime.handle(), &alive);
            std::thread::sleep(Duration::from_millis(30));
            assert_eq!(Arc::strong_count(&alive), 2, "the reporter's task holds it");
            anyhow::ensure!(!fail, "the download thread did not start");
            Ok(())
        };
        assert!(method(true).is_err());
        wait_until_stopped(&alive);

        let panicked = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            let _reporter = reporter(runtime.handle(), &alive);
            panic!("a bug in the extractor");
        }));
        assert!(panicked.is_err());
        wait_until_stopped(&alive);
    }
}
