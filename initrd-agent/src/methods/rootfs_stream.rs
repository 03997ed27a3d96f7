//! The part both rootfs methods share: stream `rootfs_url` through the
//! decompressor into the tar extractor on the mounted root filesystem, with
//! progress reports and the digest checked at the end.

use std::path::Path;

use anyhow::Context;
use tracing::info;

use super::context::BuildContext;
use super::download;
use crate::fetch;
use crate::stage::{StageContext, StageError};
use contract::method::Input;
use contract::Stage;

/// What came over the network.
pub struct Streamed {
    pub fetched_bytes: u64,
}

/// Streams `url` (`rootfs_url`) onto the filesystem mounted at `root`.
pub fn stream_rootfs(ctx: &BuildContext, url: &str, root: &Path) -> Result<Streamed, StageError> {
    let (mut tarball, reporter) = download::open(ctx, Input::Rootfs, url)?;

    let extracted = (|| {
        let (compression, reader) =
            fetch::decompress(&mut tarball).context("read the rootfs stream")?;
        info!(
            "extracting rootfs_url {url} ({compression}) onto {}",
            root.display()
        );
        crate::extract::extract(reader, root)
    })();
    // Reporting ends with the transfer (or with any way out before).
    drop(reporter);
    let summary = extracted.map_err(|e| download::failed(e, Input::Rootfs, url, Stage::Extract))?;
    let fetched = tarball
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
