//! initrd-agent: writes a server image onto a volume and signals the result.
//!
//! As PID 1 of the image-creation initrd it takes its parameters from the
//! metadata server's tags and the kernel command line; as an ordinary command
//! (`initrd-agent run`, for helper servers and tests) from its arguments.

mod agent;
mod bootloader;
mod disk;
mod extract;
mod fetch;
mod fs;
mod log;
mod metadata;
mod methods;
mod net;
mod params;
mod pid1;
mod read_ahead;
mod report;
mod shell;
mod signal;
mod stage;

use clap::{Parser, Subcommand};

/// mimalloc instead of musl's allocator, which hands every large block back
/// to the kernel when it is freed: each network buffer then comes back as
/// fresh pages to fault in and zero (writing a plain 1.1 GiB qcow2 image:
/// system time 1.54 s with musl's allocator, 0.76 s with mimalloc).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// `mi_option_arena_eager_commit` in mimalloc 3's `mi_option_t`.
const MI_OPTION_ARENA_EAGER_COMMIT: libmimalloc_sys::mi_option_t = 4;

/// mimalloc commits its first arena whole on Linux; the agent's memory is
/// then tens of MiB it never uses. Committing on demand keeps the resident
/// size to what is used, at no measurable cost.
fn tune_allocator() {
    // SAFETY: sets a global option before the allocations it affects; the
    // option is an int and 0 a valid value.
    unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_ARENA_EAGER_COMMIT, 0) };
}
use tracing::{error, info};

use contract::params::{BUILD_METHOD, METADATA_IP, NO_SIGNAL_STATE, VOLUME};
use contract::Stage;

use crate::params::{Cmdline, Params, Source};
use crate::report::{finish, Delivery, Listen};
use crate::stage::StageContext;

#[derive(Parser)]
#[command(
    name = "initrd-agent",
    version,
    about = "Builds a server image onto a volume"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run one build as an ordinary command (no PID-1 duties, no network
    /// setup). Prints the done line on stdout and exits 0 on success.
    Run {
        /// Target block device (the `volume` parameter).
        #[arg(long)]
        volume: Option<String>,
        /// Build method (the `build_method` parameter).
        #[arg(long)]
        method: Option<String>,
        /// Any other parameter, as on the kernel command line.
        #[arg(long = "param", value_name = "KEY=VALUE")]
        params: Vec<String>,
        /// Also read server tags from the metadata server (METADATA_IP or
        /// 169.254.42.42); tags win over --param, --volume/--method win over
        /// both.
        #[arg(long)]
        metadata: bool,
        /// After the build, serve the done line on signal_build_done_port
        /// until stopped (what a helper server's host waits for).
        #[arg(long)]
        serve: bool,
        /// With --serve: listen on this address only (default: every
        /// address, as the host comes in over the network).
        #[arg(long, requires = "serve", value_name = "IP")]
        serve_address: Option<std::net::IpAddr>,
        #[arg(short, long)]
        verbose: bool,
    },
}

fn main() {
    tune_allocator();
    if std::process::id() == 1 {
        pid1::main();
    }
    let cli = Cli::parse();
    match cli.command {
        Command::Run {
            volume,
            method,
            params,
            metadata,
            serve,
            serve_address,
            verbose,
        } => {
            log::init(verbose);
            let listen = match (serve, serve_address) {
                (false, _) => Listen::Nowhere,
                (true, None) => Listen::EveryAddress,
                (true, Some(ip)) => Listen::Address(ip),
            };
            std::process::exit(run_command(volume, method, params, metadata, listen));
        }
    }
}

fn run_command(
    volume: Option<String>,
    method: Option<String>,
    pairs: Vec<String>,
    use_metadata: bool,
    listen: Listen,
) -> i32 {
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("initrd-agent: cannot start the async runtime: {e}");
            return 70;
        }
    };
    let delivery = Delivery::command(listen);
    runtime.block_on(async move {
        let cmdline = match Cmdline::from_pairs(pairs.iter().map(String::as_str)) {
            Ok(c) => c,
            Err(e) => {
                error!("{e:#}");
                return 2;
            }
        };
        let mut tags = None;
        let mut client = None;
        if use_metadata {
            let ip = cmdline.get(METADATA_IP).unwrap_or(metadata::DEFAULT_IP);
            let fetched = match metadata::MetadataClient::new(ip, !cmdline.flag(NO_SIGNAL_STATE)) {
                Ok(md) => md.conf().await.map(|conf| (md, conf)),
                Err(e) => Err(e),
            };
            match fetched {
                Ok((md, conf)) => {
                    tags = Some(conf.tags);
                    client = Some(md);
                }
                // Served on the port the command line gives (no tags).
                Err(e) => {
                    let failed = Err(e).stage(Stage::Metadata);
                    return finish(failed, None, &cmdline, None, &delivery).await;
                }
            }
        }
        let mut params = Params::resolve(tags.as_deref(), &cmdline);
        if let Some(v) = &volume {
            params.set(VOLUME, v, Source::Cmdline);
        }
        if let Some(m) = &method {
            params.set(BUILD_METHOD, m, Source::Cmdline);
        }
        info!("parameters resolved: {}", params.describe().join(" "));
        let result = agent::build(&params, client.as_ref()).await;
        finish(result, Some(&params), &cmdline, client.as_ref(), &delivery).await
    })
}
