//! `imgforge image push IMAGE --provider scaleway`: a local image to a
//! Scaleway image through Object Storage (no build server, no public
//! address). The local image is exported as a QCOW2 Scaleway accepts
//! (zlib or plain clusters, no backing file, at least 1 GB), checked, and
//! handed to [`scaleway::push`](crate::provider::scaleway::push), which
//! uploads, imports and creates the image.
//!
//! Whatever stops a push (an error, Ctrl-C, SIGTERM), its upload is
//! aborted and its object, snapshot and temporary QCOW2 are removed.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use std::io::IsTerminal;

use crate::object_storage::ObjectStore;
use crate::provider::find_image;
use crate::provider::local::LocalProvider;
use crate::provider::scaleway::push::{
    self as scw_push, PushEvent, PushOptions, PushReport, PushRequest, Pushed, MIN_IMPORT_SIZE,
};
use crate::provider::scaleway::Client;
use crate::resources::{ProviderArgs, ProviderName};

/// How `image push` (and `build --strategy import`) uploads.
#[derive(clap::Args, Debug, Clone)]
pub struct PushArgs {
    /// Keep the uploaded QCOW2 in the bucket after the import.
    #[arg(long)]
    pub keep_object: bool,
    /// Upload parts of at least this size (5M minimum; grown so that an
    /// upload never needs more than Scaleway's 1000 parts).
    #[arg(long, default_value = "64M", value_parser = crate::size::parse_size, value_name = "SIZE")]
    pub part_size: u64,
    /// Parts uploaded at once.
    #[arg(long, default_value_t = 4, value_name = "N")]
    pub parallel_parts: usize,
    /// Upload plain clusters instead of zlib-compressed ones (faster to
    /// prepare, slower to send).
    #[arg(long)]
    pub no_compress: bool,
}

impl PushArgs {
    /// Refuses what would fail only after the export (minutes in).
    pub fn check(&self) -> Result<()> {
        let min = crate::object_storage::parts::SCALEWAY.min_part;
        if self.part_size < min {
            bail!(
                "--part-size {}: Object Storage takes parts of 5M or more",
                crate::size::format_size(self.part_size)
            );
        }
        if self.parallel_parts == 0 {
            bail!("--parallel-parts 0: at least one part must be in flight");
        }
        Ok(())
    }
}

/// `imgforge image push`.
pub fn run_push(image: &str, args: &PushArgs, provider: &ProviderArgs, json: bool) -> Result<()> {
    if provider.provider != ProviderName::Scaleway {
        bail!(
            "image push sends a local image to a cloud: add --provider scaleway (the image is \
             read from the local provider)"
        );
    }
    args.check()?;
    let local = provider.open_local()?;
    let (client, store) = open_scaleway(provider)?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("start the async runtime")?;
    let build_id = crate::build::new_build_id();
    let pushed = Pushed::default();
    undo_on_interrupt(&client, &store, &pushed);
    let result = rt.block_on(push_local_image(
        &local, image, &client, &store, &build_id, args, &pushed, json,
    ));
    let report = match result {
        Ok(report) => report,
        Err(error) => {
            rt.block_on(scw_push::undo(&client, &store, &pushed));
            return Err(error);
        }
    };
    print_report(&report, json)
}

/// The Scaleway API client and Object Storage of the configured account.
pub fn open_scaleway(provider: &ProviderArgs) -> Result<(Client, ObjectStore)> {
    let config = crate::provider::scaleway::Config::load()
        .context("read the Scaleway configuration (as the scw CLI does)")?;
    let store = provider.open_object_storage(&config)?;
    let client = Client::new(&config).context("set up the Scaleway API client")?;
    Ok((client, store))
}

/// On SIGINT/SIGTERM: abort the upload, remove the object and snapshot and
/// the temporary QCOW2, then exit 130.
pub fn undo_on_interrupt(client: &Client, store: &ObjectStore, pushed: &Pushed) {
    let (client, store, pushed) = (client.clone(), store.clone(), pushed.clone());
    crate::interrupt::on_interrupt_async("removing what the push created", move || async move {
        for line in scw_push::undo(&client, &store, &pushed).await {
            eprintln!("imgforge: removed {line}");
        }
    });
}

/// Exports the local image `image` (id or name) and pushes it. The caller
/// runs [`scw_push::undo`] if this fails.
#[allow(clippy::too_many_arguments)]
pub async fn push_local_image(
    local: &LocalProvider,
    image: &str,
    client: &Client,
    store: &ObjectStore,
    build_id: &str,
    args: &PushArgs,
    pushed: &Pushed,
    json: bool,
) -> Result<PushReport> {
    let image = find_image(local, image).await?;
    let arch: crate::arch::Arch = image
        .arch
        .parse()
        .map_err(|e: String| anyhow::anyhow!("image {}: {e}", image.name))?;
    let export = TempExport::new(local, &image.id)?;
    tracing::info!(image = %image.name, "exporting the image as QCOW2 for the import");
    local
        .export_for_import(&image.id, &export.path, !args.no_compress, MIN_IMPORT_SIZE)
        .await
        .with_context(|| format!("export image {} as QCOW2", image.name))?;
    let facts = scw_push::check_importable_file(&export.path)?;
    let request = PushRequest {
        qcow2: export.path.clone(),
        virtual_size: facts.virtual_size,
        name: image.name.clone(),
        arch: arch.image_name().to_string(),
        build_id: build_id.to_string(),
        keep_object: args.keep_object,
    };
    let mut options = PushOptions::default();
    options.upload.part_size = args.part_size;
    options.upload.parallel = args.parallel_parts;
    let display = ProgressDisplay::new(json);
    let progress = display.callback();
    let result = scw_push::push(client, store, &request, &options, pushed, progress).await;
    display.finish();
    result
}

/// The temporary QCOW2 of a push, in the local store (same filesystem as
/// the snapshots, which are as large); removed when dropped.
struct TempExport {
    path: PathBuf,
}

impl TempExport {
    fn new(local: &LocalProvider, image_id: &str) -> Result<TempExport> {
        let dir = local.home().join("tmp");
        std::fs::create_dir_all(&dir).with_context(|| format!("create {}", dir.display()))?;
        let path = dir.join(format!("push-{image_id}-{}.qcow2", std::process::id()));
        crate::interrupt::register_partial(&path);
        Ok(TempExport { path })
    }
}

impl Drop for TempExport {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

fn print_report(report: &PushReport, json: bool) -> Result<()> {
    if json {
        println!("{}", serde_json::to_string_pretty(report)?);
    } else {
        println!(
            "image {} ({}, {}) imported from {} in {} parts; snapshot {}{}",
            report.name,
            report.image_id,
            report.arch,
            crate::size::format_size(report.upload.bytes),
            report.upload.parts,
            report.snapshot_id,
            if report.object_kept {
                format!("; object kept at s3://{}/{}", report.bucket, report.key)
            } else {
                String::new()
            }
        );
    }
    Ok(())
}

/// Upload and import progress: a bar on a terminal, else a log line per
/// phase and per tenth of the upload.
struct ProgressDisplay {
    bar: Option<indicatif::ProgressBar>,
}

impl ProgressDisplay {
    fn new(json: bool) -> ProgressDisplay {
        let bar = (!json && std::io::stderr().is_terminal()).then(|| {
            let bar = indicatif::ProgressBar::new(0);
            bar.set_style(
                indicatif::ProgressStyle::with_template(
                    "{spinner} [{elapsed}] {msg} {bytes}/{total_bytes} ({bytes_per_sec})",
                )
                .expect("progress template"),
            );
            bar.enable_steady_tick(Duration::from_millis(200));
            bar
        });
        ProgressDisplay { bar }
    }

    fn callback(&self) -> Arc<dyn Fn(PushEvent) + Send + Sync> {
        let bar = self.bar.clone();
        let last_tenth = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let last_status = Arc::new(std::sync::Mutex::new(String::new()));
        Arc::new(move |event| match (&bar, event) {
            (Some(bar), PushEvent::Uploading { sent, total }) => {
                bar.set_length(total);
                bar.set_position(sent);
                bar.set_message("uploading");
            }
            (None, PushEvent::Uploading { sent, total }) => {
                let tenth = (sent * 10).checked_div(total).unwrap_or(10);
                if tenth > last_tenth.swap(tenth, std::sync::atomic::Ordering::Relaxed) {
                    tracing::info!("uploaded {}% ({sent} of {total} bytes)", tenth * 10);
                }
            }
            (bar, PushEvent::Uploaded(report)) => {
                let line = format!(
                    "uploaded {} bytes in {} parts of {} bytes in {:.1} s ({} retried)",
                    report.bytes, report.parts, report.part_size, report.seconds, report.retries
                );
                match bar {
                    Some(bar) => bar.println(line),
                    None => tracing::info!("{line}"),
                }
            }
            (bar, PushEvent::Importing { snapshot, status }) => {
                let mut last = last_status.lock().unwrap_or_else(|e| e.into_inner());
                if *last != status {
                    let line = format!("import into Block snapshot {snapshot}: {status}");
                    match bar {
                        Some(bar) => bar.set_message(line),
                        None => tracing::info!("{line}"),
                    }
                    *last = status;
                }
            }
            (bar, PushEvent::CreatingImage { snapshot }) => {
                let line = format!("creating the image from snapshot {snapshot}");
                match bar {
                    Some(bar) => bar.set_message(line),
                    None => tracing::info!("{line}"),
                }
            }
        })
    }

    fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
    }
}
