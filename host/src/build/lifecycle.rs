//! The effects of `imgforge build`: serve the input, create the build
//! server, follow it to the done line, snapshot the volume into an image,
//! and remove whatever the build created when it fails or is interrupted.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use contract::{DoneLine, StateDetail};
use tracing::{info, warn};

use super::plan::{self, InputSource};
use super::{BuildArgs, BuildReport, Strategy};
use crate::done_signal;
use crate::provider::{Boot, Provider, ServerSpec, ServerState, VolumeSpec, BUILD_SERVER_PREFIX};
use crate::serve::ArtifactServer;

/// How long the done line may lag behind the agent's last state.
const DONE_LINE_GRACE: Duration = Duration::from_secs(20);
/// A helper server's own root volume (SI bytes, as Scaleway counts).
const HELPER_ROOT_SIZE: u64 = 10_000_000_000;

/// The servers this build created, for the interrupt handler, and whether
/// it began creating anything at all.
#[derive(Clone, Default)]
pub(super) struct Created {
    servers: Arc<Mutex<Vec<String>>>,
    began: Arc<std::sync::atomic::AtomicBool>,
}

impl Created {
    /// Called before the first resource is created.
    fn begin(&self) {
        self.began.store(true, std::sync::atomic::Ordering::SeqCst);
    }
    fn began(&self) -> bool {
        self.began.load(std::sync::atomic::Ordering::SeqCst)
    }
    fn add(&self, id: &str) {
        self.servers.lock().unwrap().push(id.to_owned());
    }
    fn remove(&self, id: &str) {
        self.servers.lock().unwrap().retain(|s| s != id);
    }
    fn all(&self) -> Vec<String> {
        self.servers.lock().unwrap().clone()
    }
}

/// Deletes the build's servers (with their volumes), then anything else
/// tagged with its id (a server whose creation was interrupted, a snapshot
/// that never became an image).
pub(super) async fn remove_build(provider: &dyn Provider, created: &Created, build_id: &str) {
    if !created.began() {
        return;
    }
    delete_servers(provider, &created.all()).await;
    match provider.cleanup_builds(Some(build_id), false).await {
        Ok(removed) => {
            for line in removed {
                info!("removed {line}");
            }
        }
        Err(e) => warn!(
            "cleanup of build {build_id}: {e:#} (retry with `imgforge cleanup --build-id {build_id}`)"
        ),
    }
}

async fn delete_servers(provider: &dyn Provider, ids: &[String]) {
    for id in ids {
        if let Err(e) = provider.stop_server(id).await {
            warn!("stop server {id}: {e:#}");
        }
        match provider.delete_server(id, true).await {
            Ok(()) => info!("deleted build server {id} and its volumes"),
            Err(e) => warn!(
                "delete server {id}: {e:#} (remove it with `imgforge server rm --force {id}`)"
            ),
        }
    }
}

pub(super) async fn build(
    args: &BuildArgs,
    provider: Arc<dyn Provider>,
    created: &Created,
    build_id: &str,
) -> Result<BuildReport> {
    let started = Instant::now();
    let plan = plan::plan(args, provider.name(), provider.capabilities())?;
    for key in &plan.unknown_params {
        warn!(
            "--param {key}=...: initrd-agent knows no parameter {key:?}; it is passed on as a tag"
        );
    }
    let images = provider.list_images().await.context("list the images")?;
    if let Some(existing) = images.iter().find(|i| i.name == args.name) {
        bail!(
            "an image named {:?} exists already ({}): delete it (imgforge image rm {}) or choose another --name",
            args.name,
            existing.id,
            existing.id
        );
    }
    let work = tempfile::tempdir().context("create a temporary directory")?;

    // The input, and how the server reaches it: through the provider's
    // forwards (local), or at --public-url as given.
    let artifacts = ArtifactServer::start(args.listen, args.public_url.clone()).await?;
    let reach = |url: &str| -> Result<String> {
        match args.public_url {
            Some(_) => Ok(url.to_string()),
            None => provider.guest_url(url),
        }
    };
    let mut host_services = Vec::new();
    if args.public_url.is_none() {
        host_services.push(artifacts.addr());
    }
    let input = match &plan.input {
        InputSource::Rootfs(source) => build_rootfs(source, args, work.path()).await?,
        InputSource::File(path) => InputSource::File(path.clone()),
        InputSource::Url(url) => InputSource::Url(url.clone()),
    };
    let mut readiness = None;
    let tags = match input {
        InputSource::Url(url) => {
            let guest = provider.guest_url(&url)?;
            if let Ok(parsed) = url::Url::parse(&url) {
                if let Ok(addrs) = parsed.socket_addrs(|| None) {
                    host_services.extend(addrs.into_iter().filter(|a| a.is_ipv4()).take(1));
                }
            }
            plan.tags(args.method, build_id, &guest, None)
        }
        InputSource::File(path) => {
            if plan.input_kind == contract::method::Input::Rootfs {
                readiness = Some(warn_about_readiness(&path).await?);
            }
            let served = artifacts.add_file(&path).await?;
            plan.tags(
                args.method,
                build_id,
                &reach(&served.url)?,
                Some(&served.sha256),
            )
        }
        InputSource::Rootfs(_) => unreachable!("the rootfs source was built above"),
    };

    let BuildServer {
        boot,
        volumes,
        cloud_init,
    } = match plan.strategy {
        Strategy::Helper => {
            let agent = crate::bootscript::find_agent()?;
            let served = artifacts.add_file(&agent).await?;
            helper_server(args, &reach(&served.url)?, &served.sha256, build_id)
        }
        // An import's build is a bootscript build on the local provider.
        Strategy::Bootscript | Strategy::Import => {
            bootscript_server(args, provider.capabilities().local_bootscripts, work.path()).await?
        }
    };
    // The agent writes the last volume: the only one of a bootscript
    // server, the second of a helper.
    let target_slot = volumes.len() - 1;

    let spec = ServerSpec {
        name: format!("{BUILD_SERVER_PREFIX}{build_id}-{}", args.name),
        boot: Some(boot),
        volumes,
        tags,
        exposed_ports: vec![plan.done_port],
        host_services,
        memory_mib: Some(args.memory),
        cloud_init,
        ssh_public_keys: vec![],
    };
    created.begin();
    let server = provider.create_server(&spec).await?;
    created.add(&server.id);
    info!("created build server {} ({})", server.name, server.id);
    let server = provider.start_server(&server.id).await?;
    let done_addr = *server
        .endpoints
        .get(&plan.done_port)
        .context("the provider gave no address for the done-signal port")?;

    let done = wait_for_done(provider.as_ref(), &server.id, done_addr, args).await?;
    if !done.is_success() {
        bail!(
            "the build failed{}: {}{}",
            done.stage
                .map(|s| format!(" in stage {s}"))
                .unwrap_or_default(),
            done.message,
            console_tail(provider.as_ref(), &server.id).await
        );
    }
    info!(
        "agent: {} ({} bytes in {:.1} s)",
        done.message,
        done.bytes.unwrap_or(0),
        done.duration_s.unwrap_or(0.0)
    );
    artifacts.shutdown().await;

    provider.stop_server(&server.id).await?;
    let volume = server
        .volumes
        .get(target_slot)
        .with_context(|| format!("the build server has no volume {target_slot}"))?;
    info!("snapshotting volume {target_slot} ({volume})");
    let snapshot = provider.create_snapshot(volume, &args.name).await?;
    let image = match provider
        .create_image(&args.name, &snapshot.id, args.arch.image_name())
        .await
    {
        Ok(image) => image,
        Err(e) => {
            if let Err(cleanup) = provider.delete_snapshot(&snapshot.id).await {
                warn!("delete snapshot {}: {cleanup:#}", snapshot.id);
            }
            return Err(e);
        }
    };
    provider.delete_server(&server.id, true).await?;
    created.remove(&server.id);
    Ok(BuildReport {
        image_id: image.id,
        name: image.name,
        snapshot_id: snapshot.id,
        provider: provider.name().into(),
        method: args.method.to_string(),
        strategy: plan.strategy.as_str().into(),
        build_id: build_id.into(),
        seconds: (started.elapsed().as_secs_f64() * 10.0).round() / 10.0,
        done,
        readiness,
    })
}

/// How the build server boots, its volumes (the agent writes the last),
/// and its cloud-init script.
struct BuildServer {
    boot: Boot,
    volumes: Vec<VolumeSpec>,
    cloud_init: Option<String>,
}

/// A stock image with a second, blank volume; cloud-init fetches the agent
/// from `agent_url` and runs it against that volume.
fn helper_server(
    args: &BuildArgs,
    agent_url: &str,
    agent_sha256: &str,
    build_id: &str,
) -> BuildServer {
    BuildServer {
        boot: Boot::Local,
        volumes: vec![
            VolumeSpec::Blank {
                size: HELPER_ROOT_SIZE,
            },
            VolumeSpec::Blank { size: args.size },
        ],
        cloud_init: Some(crate::helper_script::cloud_init(
            agent_url,
            agent_sha256,
            &args.helper_volume,
            build_id,
        )),
    }
}

/// The image-creation bootscript with one blank volume: the provider's
/// bootscript id (remote), or the bootscript built here (local).
async fn bootscript_server(
    args: &BuildArgs,
    local_bootscripts: bool,
    work: &Path,
) -> Result<BuildServer> {
    let boot = if local_bootscripts {
        let dir = image_creation_bootscript(args, work).await?;
        Boot::Bootscript(dir.to_string_lossy().into_owned())
    } else {
        Boot::Bootscript(
            args.bootscript_id
                .clone()
                .context("--bootscript-id is needed")?,
        )
    };
    Ok(BuildServer {
        boot,
        volumes: vec![VolumeSpec::Blank { size: args.size }],
        cloud_init: None,
    })
}

/// The image-creation bootscript's directory: `--bootscript-dir`, or built
/// into `work` from the repository's bootscript and this imgforge's agent.
async fn image_creation_bootscript(args: &BuildArgs, work: &Path) -> Result<PathBuf> {
    let dir = match &args.bootscript_dir {
        Some(dir) => dir.clone(),
        None => {
            let dir = work.join("bootscript");
            let script = crate::bootscript::load("image-creation-x86_64")?;
            let agent = crate::bootscript::find_agent()?;
            info!("building the image-creation bootscript");
            tokio::task::spawn_blocking({
                let dir = dir.clone();
                move || {
                    crate::bootscript::build(
                        &script,
                        crate::bootscript::KernelChoice::FromBootscript,
                        &agent,
                        &dir,
                    )
                }
            })
            .await??;
            dir
        }
    };
    std::fs::canonicalize(&dir).with_context(|| format!("bootscript directory {}", dir.display()))
}

/// Builds an `imgforge rootfs` source into a tarball in `work`.
async fn build_rootfs(
    source: &crate::rootfs::Source,
    args: &BuildArgs,
    work: &Path,
) -> Result<InputSource> {
    let source = source.clone();
    let output = work.join("rootfs.tar.zst");
    let opts = crate::rootfs::Options {
        arch: Some(args.arch.debian_name().to_string()),
        debian: crate::rootfs::DebianOptions {
            profile: args.profile,
            include: args.include.clone(),
            mirror: None,
            hostname: args.hostname.clone(),
        },
        ..Default::default()
    };
    info!("building the rootfs from {source}");
    let report = tokio::task::spawn_blocking({
        let output = output.clone();
        move || crate::rootfs::build(&source, &output, &opts)
    })
    .await?
    .with_context(|| {
        format!(
            "cannot build the rootfs from {}",
            args.rootfs.as_deref().unwrap_or_default()
        )
    })?;
    info!(
        "rootfs: {} entries, {} MiB",
        report.entries,
        report.size >> 20
    );
    Ok(InputSource::File(output))
}

/// Checks a local rootfs tarball for what a server needs and warns about each finding: the
/// build goes on (a minimal image is a choice), but the user learns it before a build server is
/// spent on it.
async fn warn_about_readiness(rootfs: &Path) -> Result<crate::readiness::Readiness> {
    let path = rootfs.to_path_buf();
    let view = tokio::task::spawn_blocking(move || crate::readiness::TarView::read(&path))
        .await?
        .context("check the rootfs for what a server needs")?;
    let readiness = crate::readiness::assess(&view);
    for line in crate::readiness::render(&readiness.findings) {
        tracing::warn!("rootfs: {line}");
    }
    Ok(readiness)
}

/// Follows the server until the agent's done line arrives: progress from
/// `state_detail`, an early end when the server stops or the agent reports
/// a failure, the boot and build timeouts.
async fn wait_for_done(
    provider: &dyn Provider,
    server: &str,
    done_addr: std::net::SocketAddr,
    args: &BuildArgs,
) -> Result<DoneLine> {
    let started = Instant::now();
    let progress = Progress::new();
    let mut last_detail = String::new();
    let mut ended_since: Option<Instant> = None;
    loop {
        let s = provider.get_server(server).await?;
        if s.state_detail != last_detail {
            last_detail = s.state_detail.clone();
            progress.show(started.elapsed(), &last_detail);
        }
        if s.state == ServerState::Stopped {
            bail!(
                "the build server stopped before the build ended (last state: {last_detail:?}){}",
                console_tail(provider, server).await
            );
        }
        match done_signal::probe(done_addr, Duration::from_secs(1)).await {
            Ok(line) => {
                progress.finish();
                return Ok(line);
            }
            Err(e) => tracing::trace!("done signal: {e:#}"),
        }
        // The agent's last state (`done`, `failed: ...`) comes with the
        // done line. If the line does not follow, the state alone ends the
        // build: a failure with signal_failure=0 sends no line, and a done
        // port the host cannot reach (a security group) never answers.
        let state: StateDetail = last_detail.parse().unwrap_or_else(|e| match e {});
        if state.is_end() {
            let since = *ended_since.get_or_insert_with(Instant::now);
            if since.elapsed() > DONE_LINE_GRACE {
                progress.finish();
                if state == StateDetail::Done {
                    bail!(
                        "the agent reported \"done\", but no done line came from {done_addr} \
                         within {} s: let TCP port {} in to the build server (its security \
                         group or firewall)",
                        DONE_LINE_GRACE.as_secs(),
                        done_addr.port()
                    );
                }
                bail!("the agent reported {last_detail:?} and sent no done line");
            }
        }
        let elapsed = started.elapsed();
        if last_detail.is_empty() && elapsed > Duration::from_secs(args.boot_timeout) {
            bail!(
                "the build server reported nothing within {} s (--boot-timeout){}",
                args.boot_timeout,
                console_tail(provider, server).await
            );
        }
        if elapsed > Duration::from_secs(args.timeout) {
            bail!(
                "the build did not end within {} s (--timeout); last state: {last_detail:?}",
                args.timeout
            );
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// "\nconsole tail:\n" and the server's last console lines, for an error
/// message; nothing when the provider keeps no console (Scaleway).
async fn console_tail(provider: &dyn Provider, server: &str) -> String {
    match provider.console_tail(server, 20).await {
        Ok(Some(tail)) if !tail.trim().is_empty() => format!("\nconsole tail:\n{tail}"),
        _ => String::new(),
    }
}

/// The agent's stages: a spinner on a terminal, log lines otherwise.
struct Progress {
    bar: Option<indicatif::ProgressBar>,
}

impl Progress {
    fn new() -> Self {
        let bar = std::io::stderr().is_terminal().then(|| {
            let bar = indicatif::ProgressBar::new_spinner();
            bar.set_style(
                indicatif::ProgressStyle::with_template("{spinner} [{elapsed}] {msg}")
                    .expect("valid template"),
            );
            bar.enable_steady_tick(Duration::from_millis(200));
            bar.set_message("booting the build server");
            bar
        });
        Progress { bar }
    }

    fn show(&self, elapsed: Duration, detail: &str) {
        match &self.bar {
            Some(bar) => bar.set_message(detail.to_owned()),
            None => info!("[{:>6.1}s] server: {detail}", elapsed.as_secs_f64()),
        }
    }

    fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
    }
}
