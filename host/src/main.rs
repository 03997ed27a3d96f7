//! imgforge: builds server images from a root filesystem.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::{bail, Result};
use clap::{Parser, Subcommand};
use host::bootscript::{self, KernelChoice};

#[derive(Parser)]
#[command(
    name = "imgforge",
    version,
    about = "Builds bootable server images from a root filesystem"
)]
struct Cli {
    /// Print results as JSON (for scripts).
    #[arg(long, global = true)]
    json: bool,
    /// More log lines.
    #[arg(short, long, global = true)]
    verbose: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Build the kernel, initrd and bootscript.json of a bootscript.
    Initrd {
        /// A built-in bootscript name or a path to a .toml definition.
        #[arg(long, default_value = "image-creation-x86_64")]
        bootscript: String,
        /// Output directory.
        #[arg(short, long, default_value = ".")]
        output: PathBuf,
        /// Use this kernel image instead of the bootscript's package.
        #[arg(long, requires = "modules")]
        kernel: Option<PathBuf>,
        /// The kernel's module tree (lib/modules/VERSION), with --kernel.
        #[arg(long, requires = "kernel")]
        modules: Option<PathBuf>,
        /// The static initrd-agent to use as /init.
        #[arg(long, env = "IMGFORGE_AGENT")]
        agent: Option<PathBuf>,
    },
    /// Build a rootfs tarball from a directory, a tar, an OCI layout, a
    /// docker-archive, a container engine's image or a Debian suite.
    Rootfs(host::rootfs::RootfsArgs),
    /// Print a Dockerfile with the FROM line for an architecture.
    Dockerfile(host::rootfs::DockerfileArgs),
    /// Boot a disk image under UEFI (OVMF) and wait for a console line.
    Boot(host::boot::BootArgs),
    /// Serve files over HTTP under unguessable URLs (for build servers).
    Serve(host::serve::ServeArgs),
    /// Build an image: rootfs, build server, snapshot, image.
    Build(host::build::BuildArgs),
    /// Servers of a provider: create, list, get, start, stop, rm...
    Server {
        #[command(flatten)]
        provider: host::resources::ProviderArgs,
        #[command(subcommand)]
        command: host::resources::ServerCommand,
    },
    /// Snapshots of volumes.
    Snapshot {
        #[command(flatten)]
        provider: host::resources::ProviderArgs,
        #[command(subcommand)]
        command: host::resources::SnapshotCommand,
    },
    /// Images: create, list, get, rm, export.
    Image {
        #[command(flatten)]
        provider: host::resources::ProviderArgs,
        #[command(subcommand)]
        command: host::resources::ImageCommand,
    },
    /// Remove what interrupted builds left behind (servers, volumes and
    /// unused snapshots tagged with a build id; never images).
    Cleanup(host::resources::CleanupArgs),
    /// Serve one metadata connection on stdin/stdout (QEMU runs this per
    /// guest connection to a local server's metadata address).
    #[command(hide = true)]
    LocalMetadata(host::provider::local::metadata::LocalMetadataArgs),
    /// Print a disk image's partition table, ESP files and root filesystem
    /// facts (reads the file; no mounting, no root).
    Inspect(host::inspect::InspectArgs),
    /// Relay stdin/stdout to a TCP address (QEMU's guestfwd runs this per
    /// guest connection).
    #[command(hide = true)]
    GuestfwdBridge { target: SocketAddr },
}

fn main() {
    let cli = Cli::parse();
    if let Command::GuestfwdBridge { target } = cli.command {
        // libslirp hands this process the guest connection as stdin, stdout
        // *and* stderr: any log line would reach the guest. Report through
        // the exit code only, and exit as soon as the relay ends (that is
        // what closes the guest's connection).
        let code = match guestfwd_bridge(target) {
            Ok(()) => 0,
            Err(_) => 1,
        };
        std::process::exit(code);
    }
    if let Command::LocalMetadata(args) = cli.command {
        // Same rule as the bridge: stderr is the guest's connection.
        let code = match local_metadata(args) {
            Ok(()) => 0,
            Err(_) => 1,
        };
        std::process::exit(code);
    }
    init_logging(cli.verbose);
    if let Err(e) = run(cli) {
        if host::interrupt::interrupted() {
            // The interrupt's cleanup is running and exits with 130.
            loop {
                std::thread::park();
            }
        }
        eprintln!("imgforge: error: {e:#}");
        std::process::exit(1);
    }
}

fn init_logging(verbose: bool) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| {
        tracing_subscriber::EnvFilter::new(if verbose { "debug" } else { "info" })
    });
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        .init();
}

fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Initrd {
            bootscript: name,
            output,
            kernel,
            modules,
            agent,
        } => {
            let script = bootscript::load(&name)?;
            let agent = match agent {
                Some(a) => a,
                None => bootscript::find_agent()?,
            };
            let kernel = match (kernel, modules) {
                (Some(vmlinuz), Some(modules)) => KernelChoice::Files { vmlinuz, modules },
                (None, None) => KernelChoice::FromBootscript,
                _ => bail!("--kernel and --modules go together"),
            };
            let info = bootscript::build(&script, kernel, &agent, &output)?;
            if cli.json {
                println!("{}", serde_json::to_string_pretty(&info)?);
            } else {
                println!("{}: {}", info.title, output.display());
                println!("  kernel  {} sha256 {}", info.kernel, info.kernel_sha256);
                println!("  initrd  {} sha256 {}", info.initrd, info.initrd_sha256);
                println!("  args    {}", info.bootcmdargs);
                println!("  modules {}", info.modules.join(" "));
            }
            Ok(())
        }
        Command::Rootfs(args) => host::rootfs::run_rootfs(args, cli.json),
        Command::Dockerfile(args) => host::rootfs::run_dockerfile(args, cli.json),
        Command::Boot(args) => host::boot::run_boot(args, cli.json),
        Command::Serve(args) => host::serve::run_serve(args, cli.json),
        Command::Build(args) => host::build::run_build(args, cli.json),
        Command::Server { provider, command } => {
            host::resources::run_server(command, &provider, cli.json)
        }
        Command::Snapshot { provider, command } => {
            host::resources::run_snapshot(command, &provider, cli.json)
        }
        Command::Image { provider, command } => {
            host::resources::run_image(command, &provider, cli.json)
        }
        Command::Inspect(args) => host::inspect::run_inspect(args, cli.json),
        Command::Cleanup(args) => host::resources::run_cleanup(args, cli.json),
        Command::GuestfwdBridge { .. } | Command::LocalMetadata(_) => {
            unreachable!("handled before logging starts")
        }
    }
}

fn guestfwd_bridge(target: SocketAddr) -> Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(host::provider::local::guestfwd::bridge_stdio_to(target))
}

fn local_metadata(args: host::provider::local::metadata::LocalMetadataArgs) -> Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(host::provider::local::metadata::serve_stdio(args))
}
