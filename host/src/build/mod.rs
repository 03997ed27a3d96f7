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

//!
//! The module's parts: [`plan`] decides (pure, unit-tested), `lifecycle`
//! creates, follows and removes the build server.

mod import;
mod lifecycle;
pub mod plan;

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context, Result};
use contract::{DoneLine, Method};
use serde::Serialize;

use crate::provider::Provider;
use crate::resources::ProviderArgs;

#[derive(clap::Args, Debug, Clone)]
pub struct BuildArgs {
    /// The build method the agent runs.
    #[arg(long, default_value = "from-rootfs", value_parser = method_parser())]
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
    #[arg(long, default_value = "4G", value_parser = crate::size::parse_size)]
    pub size: u64,
    /// The image's architecture: x86_64 (amd64) or arm64 (aarch64).
    #[arg(long, default_value = "x86_64", value_parser = crate::arch::parse)]
    pub arch: crate::arch::Arch,
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
    /// How the image is made: `bootscript` boots the image-creation initrd
    /// (the local provider's way); `import` (Scaleway's default) builds it
    /// here with the local provider, then uploads the QCOW2 to Object
    /// Storage and imports it (`imgforge image push`); `helper` boots a
    /// Scaleway stock image whose cloud-init runs initrd-agent against a
    /// second volume (the build runs in Scaleway's network; needs
    /// --public-url).
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
    /// `--strategy import`: keep the uploaded QCOW2 in the bucket.
    #[arg(long)]
    pub keep_object: bool,
    /// `--strategy import`: upload parts of at least this size (grown so
    /// that an upload never needs more than Scaleway's 1000 parts).
    #[arg(long, default_value = "64M", value_parser = crate::size::parse_size, value_name = "SIZE")]
    pub part_size: u64,
    /// `--strategy import`: parts uploaded at once.
    #[arg(long, default_value_t = 4, value_name = "N")]
    pub parallel_parts: usize,
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
    Import,
}

impl Strategy {
    pub fn as_str(self) -> &'static str {
        match self {
            Strategy::Bootscript => "bootscript",
            Strategy::Helper => "helper",
            Strategy::Import => "import",
        }
    }
}

/// `--method`: the contract's names, listed in `--help`.
fn method_parser() -> impl clap::builder::TypedValueParser<Value = Method> {
    use clap::builder::TypedValueParser;
    clap::builder::PossibleValuesParser::new(Method::NAMES)
        .map(|name| name.parse::<Method>().expect("a name from Method::NAMES"))
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

pub fn run_build(args: BuildArgs, json: bool) -> Result<()> {
    let provider: Arc<dyn Provider> = Arc::from(args.provider.open()?);
    if plan::strategy(args.strategy, provider.name(), provider.capabilities())? == Strategy::Import
    {
        return import::run_import_build(args, json);
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("start the async runtime")?;
    let build_id = new_build_id();
    let created = lifecycle::Created::default();
    {
        let provider = provider.clone();
        let created = created.clone();
        let build_id = build_id.clone();
        crate::interrupt::on_interrupt_async(
            "removing what the build created",
            move || async move {
                lifecycle::remove_build(provider.as_ref(), &created, &build_id).await;
            },
        );
    }
    let result = rt.block_on(lifecycle::build(
        &args,
        provider.clone(),
        &created,
        &build_id,
    ));
    if result.is_err() {
        // Nothing the failed build created stays behind.
        rt.block_on(lifecycle::remove_build(
            provider.as_ref(),
            &created,
            &build_id,
        ));
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
