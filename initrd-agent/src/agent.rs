//! The agent's run, shared by the initrd (PID 1's worker) and the `run`
//! command: resolve parameters, dispatch the build method, report the
//! result. Every error travels up to here as a value with its stage and is
//! turned into the done line in one place ([`crate::report::finish`]).

use std::time::Instant;

use anyhow::{Context, Result};
use tracing::{error, info};

use contract::params::{
    BUILD_METHOD, INITRD_PRE_SHELL, METADATA_IP, NO_METADATA, NO_SIGNAL_STATE, POST_BUILD_SHELL,
};
use contract::{DoneLine, Method, Stage, StateDetail};

use crate::metadata::{self, MetadataClient};
use crate::methods::{self, BuildContext};
use crate::net::{self, IpConfig};
use crate::params::{Cmdline, Params};
use crate::report::{finish, Delivery};
use crate::shell;
use crate::signal;
use crate::stage::{StageContext, StageError};

/// The worker's whole life in the initrd. Never returns while the done
/// signal is being served; returns an exit code only on a fatal setup error.
pub fn run_initrd(cmdline: Cmdline) -> i32 {
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            error!("cannot start the async runtime: {e}");
            return 70;
        }
    };
    runtime.block_on(initrd_main(cmdline))
}

async fn initrd_main(cmdline: Cmdline) -> i32 {
    let mut metadata = None;
    let mut params = None;
    let result = initrd_build(&cmdline, &mut metadata, &mut params).await;
    finish(
        result,
        params.as_ref(),
        &cmdline,
        metadata.as_ref(),
        &Delivery::INITRD,
    )
    .await
}

/// The initrd's steps up to the build's result: metadata client, network,
/// parameters, the build. `metadata` and `params` are filled in as far as
/// the steps got, for [`finish`].
async fn initrd_build(
    cmdline: &Cmdline,
    metadata: &mut Option<MetadataClient>,
    resolved: &mut Option<Params>,
) -> Result<DoneLine, StageError> {
    if cmdline.flag(NO_METADATA) {
        info!("NO_METADATA is set: parameters come from the kernel command line alone");
    } else {
        let ip = cmdline.get(METADATA_IP).unwrap_or(metadata::DEFAULT_IP);
        let client = MetadataClient::new(ip, !cmdline.flag(NO_SIGNAL_STATE));
        *metadata = Some(client.stage(Stage::Metadata)?);
    }

    let ip_config = IpConfig::parse(cmdline.get("ip")).stage(Stage::Network)?;
    let interfaces = tokio::task::spawn_blocking(move || net::configure(&ip_config))
        .await
        .context("network setup panicked")
        .and_then(|r| r)
        .stage(Stage::Network)?;
    for i in &interfaces {
        info!(
            "network up: {} {}/{} gateway {:?}",
            i.device, i.address, i.prefix, i.gateway
        );
    }

    let tags = match metadata.as_ref() {
        None => None,
        Some(md) => {
            md.report_state(&StateDetail::KernelStarted).await;
            let conf = match md.conf().await {
                Err(e) if interfaces.is_empty() => {
                    Err(e.context("no network interface got an address"))
                }
                other => other,
            }
            .stage(Stage::Metadata)?;
            info!(
                "metadata: server {} '{}' with {} tag(s)",
                conf.id,
                conf.name,
                conf.tags.len()
            );
            md.report_state(&StateDetail::Booted).await;
            Some(conf.tags)
        }
    };

    let params = resolved.insert(Params::resolve(tags.as_deref(), cmdline));
    info!("parameters resolved: {}", params.describe().join(" "));
    if let Some(md) = metadata.as_mut() {
        md.set_report_state(!params.flag(NO_SIGNAL_STATE));
    }
    if params.flag(INITRD_PRE_SHELL) {
        tokio::task::spawn_blocking(|| shell::debug_shell(INITRD_PRE_SHELL))
            .await
            .ok();
    }
    if let Ok(common) = params.common() {
        // PID 1 signals on this port if the worker dies from here on.
        std::fs::write(signal::PORT_FILE, common.signal_port.to_string()).ok();
    }
    let result = build(params, metadata.as_ref()).await;
    if params.flag(POST_BUILD_SHELL) {
        tokio::task::spawn_blocking(|| shell::debug_shell(POST_BUILD_SHELL))
            .await
            .ok();
    }
    result
}

/// Parses the common parameters and runs the build method on a blocking
/// thread. A panic in the build is caught here (the thread's join reports
/// it) and turned into a failure like any other error.
pub async fn build(
    params: &Params,
    metadata: Option<&MetadataClient>,
) -> Result<DoneLine, StageError> {
    let started = Instant::now();
    let common = params.common().stage(Stage::Params)?;
    let method: Method = params
        .required(BUILD_METHOD, "every build")
        .and_then(|m| Ok(m.parse()?))
        .stage(Stage::Params)?;
    info!("build method {method} on {}", common.volume.display());
    let ctx = BuildContext {
        params: params.clone(),
        common,
        runtime: tokio::runtime::Handle::current(),
        metadata: metadata.cloned(),
    };
    ctx.report(Stage::Params, 0);
    let outcome = match tokio::task::spawn_blocking(move || methods::run(method, &ctx)).await {
        Ok(r) => r?,
        Err(join) if join.is_panic() => {
            let payload = join.into_panic();
            let what = payload
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| payload.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "unknown panic".into());
            return Err(anyhow::anyhow!(
                "initrd-agent panicked: {what} (a bug; the console log has the details)"
            ))
            .stage(Stage::Agent);
        }
        Err(join) => return Err(anyhow::anyhow!("build task ended: {join}")).stage(Stage::Agent),
    };
    info!(
        "build finished in {:.1} s; agent peak memory {} KiB",
        started.elapsed().as_secs_f64(),
        peak_rss_kib().map_or_else(|| "unknown".into(), |k| k.to_string())
    );
    Ok(DoneLine::success(
        method,
        started.elapsed().as_secs_f64(),
        outcome.bytes,
        outcome.layout,
    ))
}

/// The process's peak resident set size (VmHWM), for the log: the agent
/// streams, so this stays flat whatever the rootfs size.
fn peak_rss_kib() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}
