//! `imgforge build --provider scaleway --strategy import` (Scaleway's
//! default): the build runs here on the local provider, then the image is
//! pushed (`imgforge image push`: QCOW2 to Object Storage, Block import,
//! image). No build server in the cloud and no public address.
//!
//! The local image is an intermediate: it is removed once the push
//! succeeded, and kept when the push fails, so that the push can be retried
//! without building again.

use std::sync::Arc;

use anyhow::{Context, Result};
use tracing::{info, warn};

use super::{lifecycle, BuildArgs, BuildReport, Strategy};
use crate::provider::scaleway::push::{self as scw_push, PushReport, Pushed};
use crate::provider::Provider;
use crate::push::PushArgs;

/// What `build --strategy import` prints (`--json`): the local build's
/// report, with the Scaleway image's ids, and the push's.
#[derive(Debug, serde::Serialize)]
pub struct ImportReport {
    #[serde(flatten)]
    pub build: BuildReport,
    pub push: PushReport,
}

pub fn run_import_build(args: BuildArgs, json: bool) -> Result<()> {
    let push_args = PushArgs {
        keep_object: args.keep_object,
        part_size: args.part_size,
        parallel_parts: args.parallel_parts,
        no_compress: false,
    };
    push_args.check()?;
    let local = Arc::new(args.provider.open_local()?);
    let (client, store) = crate::push::open_scaleway(&args.provider)?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("start the async runtime")?;
    let build_id = super::new_build_id();
    let created = lifecycle::Created::default();
    let pushed = Pushed::default();
    {
        let local = local.clone();
        let (created, build_id) = (created.clone(), build_id.clone());
        let (client, store, pushed) = (client.clone(), store.clone(), pushed.clone());
        crate::interrupt::on_interrupt_async(
            "removing what the build and the push created",
            move || async move {
                lifecycle::remove_build(local.as_ref(), &created, &build_id).await;
                for line in scw_push::undo(&client, &store, &pushed).await {
                    eprintln!("imgforge: removed {line}");
                }
            },
        );
    }
    let mut local_args = args.clone();
    local_args.strategy = Some(Strategy::Bootscript);
    let local_dyn: Arc<dyn Provider> = local.clone();
    let built = rt.block_on(lifecycle::build(
        &local_args,
        local_dyn,
        &created,
        &build_id,
    ));
    let mut built = match built {
        Ok(built) => built,
        Err(e) => {
            rt.block_on(lifecycle::remove_build(local.as_ref(), &created, &build_id));
            return Err(e);
        }
    };
    info!(image = %built.image_id, "built locally; pushing to Scaleway");
    let pushed_result = rt.block_on(crate::push::push_local_image(
        local.as_ref(),
        &built.image_id,
        &client,
        &store,
        &build_id,
        &push_args,
        &pushed,
        json,
    ));
    let push = match pushed_result {
        Ok(push) => push,
        Err(e) => {
            rt.block_on(scw_push::undo(&client, &store, &pushed));
            return Err(e.context(format!(
                "the image was built but not pushed; the local image {} ({}) is kept: retry \
                 with `imgforge image push {} --provider scaleway`",
                built.name, built.image_id, built.image_id
            )));
        }
    };
    // The local copy was the means, not the product.
    rt.block_on(async {
        if let Err(e) = local.delete_image(&built.image_id).await {
            warn!("delete the local image {}: {e:#}", built.image_id);
        }
        if let Err(e) = local.delete_snapshot(&built.snapshot_id).await {
            warn!("delete the local snapshot {}: {e:#}", built.snapshot_id);
        }
    });
    built.image_id = push.image_id.clone();
    built.snapshot_id = push.snapshot_id.clone();
    built.provider = "scaleway".into();
    built.strategy = Strategy::Import.as_str().into();
    let report = ImportReport { build: built, push };
    if json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        println!(
            "image {} ({}) built in {:.0} s and imported into Scaleway ({} bytes uploaded in {} parts)",
            report.build.name,
            report.build.image_id,
            report.build.seconds,
            report.push.upload.bytes,
            report.push.upload.parts
        );
    }
    Ok(())
}
