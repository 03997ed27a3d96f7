//! `imgforge rootfs SOURCE -o FILE`: a root filesystem tarball from any
//! common source, and `imgforge dockerfile`.
//!
//! | source | module |
//! |---|---|
//! | `dir:PATH` | `dir.rs`: a directory tree, walked sorted |
//! | `tar:PATH` | `tar.rs`: a tarball (plain, gzip, zstd, xz), re-packed |
//! | `oci:PATH[:TAG]` | `oci.rs`: an OCI image layout, layers applied natively |
//! | `docker-archive:PATH[:TAG]` | `docker_archive.rs`: `docker save` output, same |
//! | `docker:IMAGE`, `podman:IMAGE` | `engine.rs`: `create` + `export` through the engine |
//! | `debian:SUITE` | `debian.rs`: mmdebstrap, with a kernel and GRUB; `unshare.rs`: what a non-root user needs for it |
//!
//! Every source ends in `output.rs`: one tar writer (sorted, numeric owners,
//! xattrs as pax records), compressed as FILE's name says (`.tar`,
//! `.tar.gz`, `.tar.zst` with multi-threaded zstd, `.tar.xz`), hashed while
//! written, and renamed into place only when complete. Image layers and
//! tarballs go through `tree.rs`, the layer-application engine.

mod debian;
mod dir;
mod docker_archive;
mod dockerfile;
mod engine;
mod oci;
mod output;
mod tar;
mod tarstream;
mod tree;
mod unshare;

use std::fmt;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use anyhow::{bail, Context, Result};
use tracing::info;

pub use debian::{default_packages, DebianOptions, Profile, CLOUD_PACKAGES, GRUB_SERIAL_CFG};
pub use dockerfile::{select as select_dockerfile, Selected};
pub use engine::{Engine, EngineKind};
pub use oci::normalise_arch;
pub use output::{Compression, OutputOptions, Report};
pub use tarstream::{Decoder, TarReader};

/// The source schemes, for messages and help.
pub const SCHEMES: &str =
    "dir:PATH, tar:PATH, oci:PATH[:TAG], docker-archive:PATH[:TAG], docker:IMAGE, podman:IMAGE, debian:SUITE";

/// Where a root filesystem comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    /// A directory tree.
    Dir(PathBuf),
    /// A tarball, plain or compressed; `-` is standard input.
    Tar(PathBuf),
    /// An OCI image layout, with an optional tag (`ref.name` annotation).
    Oci { path: PathBuf, tag: Option<String> },
    /// `docker save` / `podman save` output (a tar or its directory).
    DockerArchive { path: PathBuf, tag: Option<String> },
    /// An image, through Docker.
    Docker(String),
    /// An image, through Podman.
    Podman(String),
    /// A Debian suite, through mmdebstrap.
    Debian(String),
}

impl FromStr for Source {
    type Err = anyhow::Error;

    /// Parses `SCHEME:REST`. For `oci:` and `docker-archive:`, a trailing
    /// `:TAG` is split off when the whole does not exist but the part before
    /// the last colon does.
    fn from_str(s: &str) -> Result<Source> {
        let Some((scheme, rest)) = s.split_once(':') else {
            bail!("'{s}' is not a rootfs source: it has no SCHEME: prefix (use one of {SCHEMES})");
        };
        if rest.is_empty() {
            bail!("'{s}': the {scheme}: source needs a value (use one of {SCHEMES})");
        }
        Ok(match scheme {
            "dir" => Source::Dir(rest.into()),
            "tar" => Source::Tar(rest.into()),
            "oci" => {
                let (path, tag) = oci::split_path_tag(rest);
                Source::Oci { path, tag }
            }
            "docker-archive" => {
                let (path, tag) = oci::split_path_tag(rest);
                Source::DockerArchive { path, tag }
            }
            "docker" => Source::Docker(rest.into()),
            "podman" => Source::Podman(rest.into()),
            "debian" => Source::Debian(rest.into()),
            other => bail!("unknown rootfs source scheme '{other}' in '{s}': use one of {SCHEMES}"),
        })
    }
}

impl fmt::Display for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let tagged =
            |f: &mut fmt::Formatter<'_>, scheme: &str, path: &Path, tag: &Option<String>| {
                write!(f, "{scheme}:{}", path.display())?;
                match tag {
                    Some(t) => write!(f, ":{t}"),
                    None => Ok(()),
                }
            };
        match self {
            Source::Dir(p) => write!(f, "dir:{}", p.display()),
            Source::Tar(p) => write!(f, "tar:{}", p.display()),
            Source::Oci { path, tag } => tagged(f, "oci", path, tag),
            Source::DockerArchive { path, tag } => tagged(f, "docker-archive", path, tag),
            Source::Docker(i) => write!(f, "docker:{i}"),
            Source::Podman(i) => write!(f, "podman:{i}"),
            Source::Debian(s) => write!(f, "debian:{s}"),
        }
    }
}

/// How to build.
#[derive(Debug, Clone, Default)]
pub struct Options {
    /// Architecture to select (images) or build (debian); default amd64.
    /// x86_64 and aarch64 are accepted for amd64 and arm64.
    pub arch: Option<String>,
    pub output: OutputOptions,
    pub debian: DebianOptions,
}

impl Options {
    fn arch(&self) -> String {
        normalise_arch(self.arch.as_deref().unwrap_or("amd64"))
    }
}

/// Builds the root filesystem tarball `output` from `source`.
pub fn build(source: &Source, output: &Path, opts: &Options) -> Result<Report> {
    match source {
        Source::Docker(image) => {
            export_image(&Engine::new(EngineKind::Docker), image, output, opts)
        }
        Source::Podman(image) => {
            export_image(&Engine::new(EngineKind::Podman), image, output, opts)
        }
        _ => write_with(output, opts, |out| fill(source, out, opts)),
    }
}

/// `docker:IMAGE` / `podman:IMAGE` through a given engine client.
pub fn export_image(engine: &Engine, image: &str, output: &Path, opts: &Options) -> Result<Report> {
    write_with(output, opts, |out| {
        engine.export(image, &opts.arch(), opts.arch.is_some(), out)
    })
}

fn write_with(
    output: &Path,
    opts: &Options,
    f: impl FnOnce(&mut output::Output) -> Result<()>,
) -> Result<Report> {
    let mut out = output::Output::create(output, &opts.output)?;
    f(&mut out)?;
    let report = out.finish()?;
    info!(
        "{}: {} entries, {} bytes ({}), sha256 {}",
        report.path.display(),
        report.entries,
        report.size,
        report.compression.name(),
        report.sha256
    );
    Ok(report)
}

fn fill(source: &Source, out: &mut output::Output, opts: &Options) -> Result<()> {
    let arch = opts.arch();
    match source {
        Source::Dir(path) => {
            if !path.exists() {
                bail!(
                    "dir:{}: '{}' does not exist",
                    path.display(),
                    path.display()
                );
            }
            let exclude = out.temp_id();
            dir::pack(path, out.tar(), Some(exclude))
        }
        Source::Tar(path) => tar::repack(path, out),
        Source::Oci { path, tag } => {
            let layers = oci::layers(path, tag.as_deref(), &arch)?;
            tree::apply_layers(layers, out)
        }
        Source::DockerArchive { path, tag } => {
            let layers = docker_archive::layers(path, tag.as_deref(), &arch, out.dir())?;
            tree::apply_layers(layers, out)
        }
        Source::Debian(suite) => {
            let debian_arch = match arch.as_str() {
                "arm" => "armhf",
                "386" => "i386",
                a => a,
            };
            debian::build(suite, debian_arch, &opts.debian, out)
        }
        Source::Docker(_) | Source::Podman(_) => unreachable!("handled by build"),
    }
}

// ---------------------------------------------------------------------------
// The commands.

/// `imgforge rootfs`.
#[derive(clap::Args, Debug, Clone)]
pub struct RootfsArgs {
    /// Where the root filesystem comes from: dir:PATH, tar:PATH (plain,
    /// gzip, zstd or xz; tar:- for stdin), oci:PATH[:TAG],
    /// docker-archive:PATH[:TAG], docker:IMAGE, podman:IMAGE or
    /// debian:SUITE.
    pub source: String,
    /// The tarball to write: FILE.tar, FILE.tar.gz, FILE.tar.zst
    /// (multi-threaded zstd) or FILE.tar.xz.
    #[arg(short, long, value_name = "FILE")]
    pub output: PathBuf,
    /// Architecture to select from multi-arch images, or to build for
    /// debian: (amd64, arm64; x86_64 and aarch64 are accepted) [default: amd64]
    #[arg(long)]
    pub arch: Option<String>,
    /// debian: what the image is for: `cloud` (SSH, cloud-init, DHCP, guest
    /// agent, growing root) or `minimal` (boots to a console login).
    #[arg(long, value_enum, default_value = "cloud")]
    pub profile: Profile,
    /// debian: more packages (comma-separated; repeatable).
    #[arg(long, value_delimiter = ',', value_name = "PKG,...")]
    pub include: Vec<String>,
    /// debian: the Debian mirror to use instead of apt's default.
    #[arg(long, value_name = "URL")]
    pub mirror: Option<String>,
    /// debian: the image's /etc/hostname.
    #[arg(long, default_value = "debian")]
    pub hostname: String,
    /// Compression level (gzip 1-9, zstd 1-22, xz 0-9).
    #[arg(long)]
    pub level: Option<u32>,
    /// Compression threads for zstd and xz [default: all cores].
    #[arg(long)]
    pub threads: Option<u32>,
}

/// Runs `imgforge rootfs`: prints the file's path, sha256, size,
/// compression and entry count (`--json`: an object with those keys).
pub fn run_rootfs(args: RootfsArgs, json: bool) -> Result<()> {
    let source: Source = args.source.parse()?;
    let opts = Options {
        arch: args.arch,
        output: OutputOptions {
            level: args.level,
            threads: args.threads,
        },
        debian: DebianOptions {
            profile: args.profile,
            include: args.include,
            mirror: args.mirror,
            hostname: args.hostname,
        },
    };
    // An interrupted build leaves no partial output. Child processes
    // (mmdebstrap, podman) get the terminal's SIGINT themselves.
    crate::interrupt::on_interrupt(|| {
        let removed = crate::interrupt::remove_partials();
        eprintln!("imgforge: interrupted; removed {removed} partial output file(s)");
    });
    let report = build(&source, &args.output, &opts)
        .with_context(|| format!("cannot build the rootfs from {source}"))?;
    if json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        println!("{}", report.path.display());
        println!("  sha256      {}", report.sha256);
        println!("  size        {} bytes", report.size);
        println!("  compression {}", report.compression.name());
        println!("  entries     {}", report.entries);
    }
    Ok(())
}

/// `imgforge dockerfile`.
#[derive(clap::Args, Debug, Clone)]
pub struct DockerfileArgs {
    /// The architecture to select FROM lines for (amd64, arm64, armv7l, ...).
    #[arg(long, default_value = "amd64")]
    pub arch: String,
    /// The Dockerfile (- for stdin).
    #[arg(
        short = 'f',
        long = "file",
        default_value = "Dockerfile",
        value_name = "FILE"
    )]
    pub file: PathBuf,
    /// Write the result to this file instead of stdout.
    #[arg(short, long, value_name = "FILE")]
    pub output: Option<PathBuf>,
}

/// Runs `imgforge dockerfile`: prints the Dockerfile with its FROM lines
/// chosen for `--arch` (`--json`: `{"arch","from","dockerfile"}`).
pub fn run_dockerfile(args: DockerfileArgs, json: bool) -> Result<()> {
    let text = if args.file.as_os_str() == "-" {
        let mut s = String::new();
        std::io::stdin()
            .read_to_string(&mut s)
            .context("cannot read the Dockerfile from stdin")?;
        s
    } else {
        std::fs::read_to_string(&args.file)
            .with_context(|| format!("cannot read '{}'", args.file.display()))?
    };
    let selected = dockerfile::select(&text, &args.arch)
        .with_context(|| format!("{}", args.file.display()))?;
    if let Some(path) = &args.output {
        std::fs::write(path, &selected.dockerfile)
            .with_context(|| format!("cannot write '{}'", path.display()))?;
    }
    if json {
        println!("{}", serde_json::to_string_pretty(&selected)?);
    } else if args.output.is_none() {
        print!("{}", selected.dockerfile);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    enum Cli {
        Rootfs(RootfsArgs),
        Dockerfile(DockerfileArgs),
    }

    #[test]
    fn the_arguments_parse_as_subcommands() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
        let Cli::Rootfs(a) = Cli::parse_from([
            "x",
            "rootfs",
            "debian:bookworm",
            "-o",
            "r.tar.zst",
            "--include",
            "vim,curl",
            "--include",
            "jq",
            "--arch",
            "x86_64",
        ]) else {
            panic!()
        };
        assert_eq!(a.include, ["vim", "curl", "jq"]);
        assert_eq!(a.hostname, "debian");
        assert_eq!(a.arch.as_deref(), Some("x86_64"));
        let Cli::Dockerfile(d) = Cli::parse_from(["x", "dockerfile", "--arch", "arm64", "-f", "D"])
        else {
            panic!()
        };
        assert_eq!((d.arch.as_str(), d.file.to_str()), ("arm64", Some("D")));
    }

    #[test]
    fn sources_parse_and_unknown_schemes_list_the_valid_ones() {
        assert_eq!(
            "dir:/x".parse::<Source>().unwrap(),
            Source::Dir("/x".into())
        );
        assert_eq!(
            "podman:alpine:3".parse::<Source>().unwrap(),
            Source::Podman("alpine:3".into())
        );
        assert_eq!(
            "oci:/nonexistent/x".parse::<Source>().unwrap(),
            Source::Oci {
                path: "/nonexistent/x".into(),
                tag: None
            }
        );
        assert_eq!(
            "oci:/tmp:latest".parse::<Source>().unwrap(),
            Source::Oci {
                path: "/tmp".into(),
                tag: Some("latest".into())
            }
        );
        for bad in ["ftp:x", "rootfs.tar", "dir:"] {
            let e = bad.parse::<Source>().unwrap_err().to_string();
            assert!(e.contains("docker-archive:PATH"), "{e}");
        }
    }
}
