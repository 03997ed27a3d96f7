//! `imgforge build`: the whole image build as one command (the original
//! `create_image_live_from_rootfs.sh`).
//!
//! 1. resolve the input: an `imgforge rootfs` source is built to a tarball,
//!    a local file is used as is, an http(s) URL is handed to the agent;
//! 2. serve local files (and, for a helper, `initrd-agent`) with the
//!    artifact server: on loopback for the local provider, on `--listen`
//!    and announced as `--public-url` for a remote one;
//! 3. create a build server tagged with the build id and the agent's
//!    parameters, by one of two strategies:
//!    - `bootscript`: the image-creation bootscript (kernel + initrd with
//!      the agent as PID 1) and one blank volume of `--size`; the local
//!      provider's way, and Scaleway's before bootscripts were removed;
//!    - `helper`: a stock image with a second, blank volume of `--size`,
//!      whose cloud-init script fetches the agent and runs it against that
//!      volume (see [`crate::helper_script`]); Scaleway's way today;
//! 4. follow the agent's `state_detail` as progress and poll its done
//!    signal; a failure line ends the build at once, with the agent's
//!    message and the end of the console;
//! 5. stop the server, snapshot the written volume, create the image,
//!    delete the server with its volumes.
//!
//! Whatever happens (an error, Ctrl-C, SIGTERM), every server, volume and
//! unused snapshot the build created is deleted before imgforge exits: the
//! servers it knows of, then whatever else carries its build id
//! ([`Provider::cleanup_builds`]).

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde::Serialize;
use tracing::{info, warn};

use crate::done_signal::{self, DoneLine};
use crate::provider::{
    Boot, Provider, ServerSpec, ServerState, VolumeSpec, BUILD_SERVER_PREFIX, BUILD_TAG_PREFIX,
};
use crate::resources::ProviderArgs;
use crate::serve::ArtifactServer;
use crate::size::parse_size;

/// The agent's done-signal port in the image-creation initrd (the
/// original's default).
const DONE_PORT: u16 = 22;
/// The done-signal port of a helper server: a stock image runs sshd on 22.
const HELPER_DONE_PORT: u16 = 8022;
/// How long the done line may lag behind the agent's last state.
const DONE_LINE_GRACE: Duration = Duration::from_secs(20);
/// A helper server's own root volume (SI bytes, as Scaleway counts).
const HELPER_ROOT_SIZE: u64 = 10_000_000_000;

#[derive(clap::Args, Debug, Clone)]
pub struct BuildArgs {
    /// The build method the agent runs.
    #[arg(long, value_enum, default_value = "from-rootfs")]
    pub method: Method,
    /// The root filesystem: an `imgforge rootfs` source (dir:, tar:, oci:,
    /// docker-archive:, docker:, podman:, debian:SUITE), a local tarball, or
    /// an http(s) URL the build server downloads itself.
    #[arg(long)]
    pub rootfs: Option<String>,
    /// A disk image (from-qcow2): a local file or an http(s) URL.
    #[arg(long, conflicts_with = "rootfs")]
    pub disk_image: Option<String>,
    /// The image's name.
    #[arg(long)]
    pub name: String,
    /// The volume's size (4G, 512M...).
    #[arg(long, default_value = "4G", value_parser = parse_size)]
    pub size: u64,
    #[arg(long, default_value = "x86_64")]
    pub arch: String,
    /// More agent parameters as server tags (efi_size=200M, grow_fs=1,
    /// INITRD_VERBOSE=1...); repeatable.
    #[arg(long = "param", value_name = "KEY=VALUE")]
    pub params: Vec<String>,
    /// Use this `imgforge initrd -o DIR` output instead of building the
    /// image-creation bootscript.
    #[arg(long, value_name = "DIR")]
    pub bootscript_dir: Option<PathBuf>,
    /// debian: sources: the image's /etc/hostname.
    #[arg(long, default_value = "debian")]
    pub hostname: String,
    /// debian: sources: what the image is for: `cloud` (SSH, cloud-init,
    /// DHCP, guest agent, growing root) or `minimal` (a console login).
    #[arg(long, value_enum, default_value = "cloud")]
    pub profile: crate::rootfs::Profile,
    /// debian: sources: more packages (comma-separated).
    #[arg(long, value_delimiter = ',', value_name = "PKG,...")]
    pub include: Vec<String>,
    /// Give up if the server has not reported booting after this many
    /// seconds.
    #[arg(long, default_value_t = 600)]
    pub boot_timeout: u64,
    /// Give up if the build has not ended after this many seconds.
    #[arg(long, default_value_t = 3600)]
    pub timeout: u64,
    /// Build server memory in MiB.
    #[arg(long, default_value_t = 1024)]
    pub memory: u32,
    /// How the build server writes the image: `bootscript` boots the
    /// image-creation initrd (the local provider's way); `helper` boots a
    /// stock image whose cloud-init runs initrd-agent against a second volume
    /// (Scaleway's default, since Scaleway removed bootscripts in 2023).
    #[arg(long, value_enum)]
    pub strategy: Option<Strategy>,
    /// Scaleway with `--strategy bootscript`: the id of the image-creation
    /// bootscript (only endpoints that still offer bootscripts have one).
    #[arg(long, value_name = "ID")]
    pub bootscript_id: Option<String>,
    /// `--strategy helper`: the helper server's device for the second
    /// volume, which the image is written to.
    #[arg(long, default_value = "/dev/vdb", value_name = "DEVICE")]
    pub helper_volume: String,
    /// Where the artifact server (the rootfs, disk image or agent for the
    /// build server) listens. Loopback by default; a remote build server
    /// needs an address it can reach, e.g. 0.0.0.0:8080.
    #[arg(long, default_value = "127.0.0.1:0", value_name = "ADDR")]
    pub listen: std::net::SocketAddr,
    /// The artifact server's base URL as build servers reach it (e.g.
    /// http://203.0.113.7:8080), when that is not the listening address
    /// (NAT, a port forward, a wildcard --listen). Required with a remote
    /// provider.
    #[arg(long, value_name = "URL")]
    pub public_url: Option<String>,
    #[command(flatten)]
    pub provider: ProviderArgs,
}

#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum Strategy {
    Bootscript,
    Helper,
}

#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum Method {
    FromRootfs,
    UnpartitionedFromRootfs,
    FromQcow2,
}

impl Method {
    fn name(self) -> &'static str {
        match self {
            Method::FromRootfs => "from-rootfs",
            Method::UnpartitionedFromRootfs => "unpartitioned-from-rootfs",
            Method::FromQcow2 => "from-qcow2",
        }
    }
}

/// What `imgforge build` prints (`--json`).
#[derive(Debug, Serialize)]
pub struct BuildReport {
    pub image_id: String,
    pub name: String,
    pub snapshot_id: String,
    pub provider: String,
    pub method: String,
    pub strategy: String,
    pub build_id: String,
    pub seconds: f64,
    pub done: DoneLine,
    /// What a server from the image would lack (a local rootfs only; see
    /// `readiness.rs`).
    pub readiness: Option<crate::readiness::Readiness>,
}

/// The servers this build created, for the interrupt handler, and whether
/// it began creating anything at all.
#[derive(Clone, Default)]
struct Created {
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

pub fn run_build(args: BuildArgs, json: bool) -> Result<()> {
    let provider: Arc<dyn Provider> = Arc::from(args.provider.open()?);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("start the async runtime")?;
    let build_id = new_build_id();
    let created = Created::default();
    {
        let provider = provider.clone();
        let created = created.clone();
        let build_id = build_id.clone();
        crate::interrupt::on_interrupt(move || {
            eprintln!("imgforge: interrupted; removing what the build created");
            crate::interrupt::remove_partials();
            let Ok(rt) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            else {
                return;
            };
            rt.block_on(remove_build(provider.as_ref(), &created, &build_id));
        });
    }
    let result = rt.block_on(build(&args, provider.clone(), &created, &build_id));
    if result.is_err() {
        // Nothing the failed build created stays behind.
        rt.block_on(remove_build(provider.as_ref(), &created, &build_id));
    }
    let report = result?;
    if json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        println!(
            "image {} ({}) built in {:.0} s",
            report.name, report.image_id, report.seconds
        );
    }
    Ok(())
}

/// 8 random hex digits.
pub fn new_build_id() -> String {
    let mut bytes = [0u8; 4];
    if getrandom::fill(&mut bytes).is_err() {
        bytes = std::process::id().to_le_bytes();
    }
    hex::encode(bytes)
}

/// Deletes the build's servers (with their volumes), then anything else
/// tagged with its id (a server whose creation was interrupted, a snapshot
/// that never became an image).
async fn remove_build(provider: &dyn Provider, created: &Created, build_id: &str) {
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

async fn build(
    args: &BuildArgs,
    provider: Arc<dyn Provider>,
    created: &Created,
    build_id: &str,
) -> Result<BuildReport> {
    let started = Instant::now();
    let strategy = match (args.strategy, provider.name()) {
        (Some(s), _) => s,
        (None, "local") => Strategy::Bootscript,
        (None, _) => Strategy::Helper,
    };
    if strategy == Strategy::Helper && provider.name() == "local" {
        bail!(
            "the local provider builds with --strategy bootscript: it has no stock images or \
             cloud-init for a helper server"
        );
    }
    let remote = provider.name() != "local";
    if !remote && args.public_url.is_some() {
        bail!(
            "--public-url is for remote providers: the local provider's servers reach the \
             artifact server through their own forwards"
        );
    }
    if remote && strategy == Strategy::Bootscript && args.bootscript_id.is_none() {
        bail!(
            "--strategy bootscript on {} needs --bootscript-id (the image-creation \
             bootscript's id). Scaleway removed bootscripts on 2023-05-15: use --strategy helper \
             unless your endpoint still offers them",
            provider.name()
        );
    }
    // What the agent downloads: the rootfs, or the disk image (from-qcow2),
    // under the parameter names of the original.
    let (input, url_key, sha_key) = match (args.method, &args.rootfs, &args.disk_image) {
        (Method::FromQcow2, None, Some(image)) => {
            (image.as_str(), "disk_img_url", "disk_img_sha256")
        }
        (Method::FromQcow2, _, None) => {
            bail!("--method from-qcow2 writes a disk image: give --disk-image FILE|URL")
        }
        (_, Some(rootfs), None) => (rootfs.as_str(), "rootfs_url", "rootfs_sha256"),
        (_, _, Some(_)) => bail!("--disk-image goes with --method from-qcow2"),
        (_, None, None) => bail!("give --rootfs (or --disk-image with --method from-qcow2)"),
    };
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
    let mut tags = vec![
        format!("{BUILD_TAG_PREFIX}{build_id}"),
        format!("build_method={}", args.method.name()),
    ];
    let mut host_services = Vec::new();
    if args.public_url.is_none() {
        host_services.push(artifacts.addr());
    }
    let resolved = if args.method == Method::FromQcow2 {
        resolve_disk_image(input)?
    } else {
        resolve_rootfs(input, args, work.path()).await?
    };
    let mut readiness = None;
    match resolved {
        Input::Url(url) => {
            let guest = provider.guest_url(&url)?;
            if let Ok(parsed) = url::Url::parse(&url) {
                if let Ok(addrs) = parsed.socket_addrs(|| None) {
                    host_services.extend(addrs.into_iter().filter(|a| a.is_ipv4()).take(1));
                }
            }
            tags.push(format!("{url_key}={guest}"));
        }
        Input::File(path) => {
            if args.method != Method::FromQcow2 {
                readiness = Some(warn_about_readiness(&path).await?);
            }
            let served = artifacts.add_file(&path).await?;
            tags.push(format!("{url_key}={}", reach(&served.url)?));
            tags.push(format!("{sha_key}={}", served.sha256));
        }
    }
    let mut done_port = match strategy {
        Strategy::Bootscript => DONE_PORT,
        Strategy::Helper => HELPER_DONE_PORT,
    };
    for param in &args.params {
        let Some((key, value)) = param.split_once('=') else {
            bail!("--param {param:?}: expected KEY=VALUE");
        };
        if key == "signal_build_done_port" {
            done_port = value
                .parse()
                .with_context(|| format!("--param {param:?}: not a port number"))?;
        }
    }
    tags.push(format!("signal_build_done_port={done_port}"));
    tags.extend(
        args.params
            .iter()
            .filter(|p| !p.starts_with("signal_build_done_port="))
            .cloned(),
    );

    let BuildServer {
        boot,
        volumes,
        cloud_init,
    } = match strategy {
        Strategy::Helper => {
            let agent = crate::bootscript::find_agent()?;
            let served = artifacts.add_file(&agent).await?;
            helper_server(args, &reach(&served.url)?, &served.sha256, build_id)
        }
        Strategy::Bootscript => bootscript_server(args, remote, work.path()).await?,
    };
    // The agent writes the last volume: the only one of a bootscript
    // server, the second of a helper.
    let target_slot = volumes.len() - 1;

    let spec = ServerSpec {
        name: format!("{BUILD_SERVER_PREFIX}{build_id}-{}", args.name),
        boot: Some(boot),
        volumes,
        tags,
        exposed_ports: vec![done_port],
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
        .get(&done_port)
        .context("the provider gave no address for the done-signal port")?;

    let done = wait_for_done(provider.as_ref(), &server.id, done_addr, args).await?;
    if !done.is_success() {
        bail!(
            "the build failed{}: {}{}",
            done.stage
                .as_deref()
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
        .create_image(&args.name, &snapshot.id, &args.arch)
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
        method: args.method.name().into(),
        strategy: match strategy {
            Strategy::Bootscript => "bootscript",
            Strategy::Helper => "helper",
        }
        .into(),
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
async fn bootscript_server(args: &BuildArgs, remote: bool, work: &Path) -> Result<BuildServer> {
    let boot = if remote {
        Boot::Bootscript(
            args.bootscript_id
                .clone()
                .context("--bootscript-id is needed")?,
        )
    } else {
        let dir = image_creation_bootscript(args, work).await?;
        Boot::Bootscript(dir.to_string_lossy().into_owned())
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

/// What the agent downloads: a URL it fetches itself, or a local file served to it.
enum Input {
    Url(String),
    File(PathBuf),
}

/// A disk image: a URL, or a local file served as is.
fn resolve_disk_image(image: &str) -> Result<Input> {
    if image.starts_with("http://") || image.starts_with("https://") {
        return Ok(Input::Url(image.to_owned()));
    }
    if !Path::new(image).is_file() {
        bail!(
            "--disk-image {image}: no such file; give a qcow2 or raw image file, or an http(s) URL"
        );
    }
    Ok(Input::File(image.into()))
}

/// A URL stays a URL; a `SCHEME:` source is built into `work`; anything
/// else must be a local file.
async fn resolve_rootfs(rootfs: &str, args: &BuildArgs, work: &Path) -> Result<Input> {
    if rootfs.starts_with("http://") || rootfs.starts_with("https://") {
        return Ok(Input::Url(rootfs.to_owned()));
    }
    let path = Path::new(rootfs);
    if path.is_file() {
        return Ok(Input::File(path.to_path_buf()));
    }
    if !rootfs.contains(':') {
        bail!(
            "--rootfs {rootfs}: no such file; give a tarball, an http(s) URL or a source ({})",
            crate::rootfs::SCHEMES
        );
    }
    let source: crate::rootfs::Source = rootfs.parse()?;
    let output = work.join("rootfs.tar.zst");
    let opts = crate::rootfs::Options {
        arch: Some(args.arch.clone()),
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
    .with_context(|| format!("cannot build the rootfs from {rootfs}"))?;
    info!(
        "rootfs: {} entries, {} MiB",
        report.entries,
        report.size >> 20
    );
    Ok(Input::File(output))
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
        if last_detail == "done" || last_detail.starts_with("failed") {
            let since = *ended_since.get_or_insert_with(Instant::now);
            if since.elapsed() > DONE_LINE_GRACE {
                progress.finish();
                if last_detail == "done" {
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
