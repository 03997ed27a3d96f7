//! The pure half of `imgforge build`: from the arguments and what the
//! provider can do, decide the strategy, what the agent downloads, and the
//! parameters it gets. No I/O but looking at whether a local path is a
//! file; every refusal of bad arguments happens here, before anything is
//! created.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use contract::method::Input;
use contract::params::{self, BUILD_METHOD, HELPER_DONE_PORT, INITRD_DONE_PORT};
use contract::Method;

use super::{BuildArgs, Strategy};
use crate::provider::{Capabilities, BUILD_TAG_PREFIX};

/// What the build will do, decided before anything is created.
#[derive(Debug, PartialEq)]
pub struct Plan {
    pub strategy: Strategy,
    /// What the agent downloads.
    pub input: InputSource,
    /// The agent's parameter names for the input's URL and sha256.
    pub input_kind: Input,
    /// The TCP port the agent serves its done line on.
    pub done_port: u16,
    /// `--param`s other than the done port, as given.
    pub extra_params: Vec<String>,
    /// Keys of `--param`s the agent does not know (a typo, most likely).
    pub unknown_params: Vec<String>,
}

/// Where the agent's input comes from.
#[derive(Debug, PartialEq)]
pub enum InputSource {
    /// A URL the build server downloads itself.
    Url(String),
    /// A local file, served by the artifact server.
    File(PathBuf),
    /// An `imgforge rootfs` source, built into a tarball first.
    Rootfs(crate::rootfs::Source),
}

/// The strategy: the one asked for if the provider can do it, else the
/// provider's own (local: bootscript; Scaleway: import).
pub fn strategy(
    requested: Option<Strategy>,
    provider: &str,
    caps: Capabilities,
) -> Result<Strategy> {
    let strategy = match requested {
        Some(s) => s,
        None if caps.local_bootscripts => Strategy::Bootscript,
        None if caps.imports_qcow2 => Strategy::Import,
        None => Strategy::Helper,
    };
    if strategy == Strategy::Import && !caps.imports_qcow2 {
        bail!(
            "--strategy import builds here and uploads the image to a cloud: the {provider}              provider builds its images here already (use --strategy bootscript, or              --provider scaleway)"
        );
    }
    Ok(strategy)
}

/// Decides the build for a provider named `provider` that can do `caps`.
pub fn plan(args: &BuildArgs, provider: &str, caps: Capabilities) -> Result<Plan> {
    // Until the build server, initrd and agent exist for it, another
    // architecture would be an x86_64 disk recorded as something else.
    if args.arch != crate::arch::Arch::X86_64 {
        bail!(
            "--arch {}: imgforge builds x86_64 images only for now (arm64 build servers, initrd \
             and agent are not implemented yet); nothing was created",
            args.arch
        );
    }
    let strategy = strategy(args.strategy, provider, caps)?;
    if strategy == Strategy::Helper && !caps.helper_servers {
        bail!(
            "the {provider} provider builds with --strategy bootscript: it has no stock images \
             or cloud-init for a helper server"
        );
    }
    if caps.forwards_to_host && args.public_url.is_some() {
        bail!(
            "--public-url is for remote providers: the {provider} provider's servers reach the \
             artifact server through their own forwards"
        );
    }
    if strategy == Strategy::Bootscript && !caps.local_bootscripts && args.bootscript_id.is_none() {
        bail!(
            "--strategy bootscript on {provider} needs --bootscript-id (the image-creation \
             bootscript's id). Scaleway removed bootscripts on 2023-05-15: use --strategy helper \
             unless your endpoint still offers them"
        );
    }
    let input_kind = args.method.input();
    let input = match (input_kind, &args.rootfs, &args.disk_image) {
        (Input::DiskImage, None, Some(image)) => disk_image_source(image)?,
        (Input::DiskImage, Some(_), Some(_)) => {
            bail!("--disk-image and --rootfs exclude each other: from-qcow2 writes the disk image")
        }
        (Input::DiskImage, _, None) => {
            bail!("--method from-qcow2 writes a disk image: give --disk-image FILE|URL")
        }
        (Input::Rootfs, Some(rootfs), None) => rootfs_source(rootfs)?,
        (Input::Rootfs, _, Some(_)) => bail!("--disk-image goes with --method from-qcow2"),
        (Input::Rootfs, None, None) => {
            bail!("give --rootfs (or --disk-image with --method from-qcow2)")
        }
    };
    let mut done_port = match strategy {
        // An import builds on the local provider, with the initrd.
        Strategy::Bootscript | Strategy::Import => INITRD_DONE_PORT,
        Strategy::Helper => HELPER_DONE_PORT,
    };
    let mut extra_params = Vec::new();
    let mut unknown_params = Vec::new();
    for param in &args.params {
        let Some((key, value)) = param.split_once('=') else {
            bail!("--param {param:?}: expected KEY=VALUE");
        };
        match key {
            params::SIGNAL_BUILD_DONE_PORT => {
                done_port = value
                    .parse()
                    .ok()
                    .filter(|p| *p > 0)
                    .with_context(|| format!("--param {param:?}: not a port number"))?;
            }
            BUILD_METHOD => bail!("--param {param:?}: the build method is --method"),
            _ => {
                if params::find(key).is_none() {
                    unknown_params.push(key.to_owned());
                }
                extra_params.push(param.clone());
            }
        }
    }
    Ok(Plan {
        strategy,
        input,
        input_kind,
        done_port,
        extra_params,
        unknown_params,
    })
}

impl Plan {
    /// The build server's tags: the build id (what cleanup finds), then the
    /// agent's parameters. `input_url` is the input as the server reaches
    /// it; `input_sha256` is given for a file served from here.
    pub fn tags(
        &self,
        method: Method,
        build_id: &str,
        input_url: &str,
        input_sha256: Option<&str>,
    ) -> Vec<String> {
        let mut tags = vec![
            format!("{BUILD_TAG_PREFIX}{build_id}"),
            format!("{BUILD_METHOD}={method}"),
            format!("{}={input_url}", self.input_kind.url_key()),
        ];
        if let Some(sha) = input_sha256 {
            tags.push(format!("{}={sha}", self.input_kind.sha256_key()));
        }
        tags.push(format!(
            "{}={}",
            params::SIGNAL_BUILD_DONE_PORT,
            self.done_port
        ));
        tags.extend(self.extra_params.iter().cloned());
        tags
    }
}

fn is_url(text: &str) -> bool {
    text.starts_with("http://") || text.starts_with("https://")
}

/// A disk image: a URL, or a local file served as is.
fn disk_image_source(image: &str) -> Result<InputSource> {
    if is_url(image) {
        return Ok(InputSource::Url(image.to_owned()));
    }
    if !std::path::Path::new(image).is_file() {
        bail!(
            "--disk-image {image}: no such file; give a qcow2 or raw image file, or an http(s) URL"
        );
    }
    Ok(InputSource::File(image.into()))
}

/// A URL stays a URL; a local file is served; `SCHEME:...` is a source
/// to build.
fn rootfs_source(rootfs: &str) -> Result<InputSource> {
    if is_url(rootfs) {
        return Ok(InputSource::Url(rootfs.to_owned()));
    }
    let path = std::path::Path::new(rootfs);
    if path.is_file() {
        return Ok(InputSource::File(path.to_path_buf()));
    }
    if !rootfs.contains(':') {
        bail!(
            "--rootfs {rootfs}: no such file; give a tarball, an http(s) URL or a source ({})",
            crate::rootfs::SCHEMES
        );
    }
    Ok(InputSource::Rootfs(rootfs.parse()?))
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    const LOCAL: Capabilities = Capabilities {
        local_bootscripts: true,
        helper_servers: false,
        forwards_to_host: true,
        imports_qcow2: false,
    };
    const CLOUD: Capabilities = Capabilities {
        local_bootscripts: false,
        helper_servers: true,
        forwards_to_host: false,
        imports_qcow2: true,
    };

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        build: BuildArgs,
    }

    fn args(extra: &[&str]) -> BuildArgs {
        let mut argv = vec!["imgforge", "--name", "img"];
        argv.extend_from_slice(extra);
        Cli::try_parse_from(argv).unwrap().build
    }

    fn err(extra: &[&str], caps: Capabilities) -> String {
        format!("{:#}", plan(&args(extra), "test", caps).unwrap_err())
    }

    #[test]
    fn the_strategy_follows_the_provider() {
        let url = ["--rootfs", "http://example.test/r.tar"];
        let local = plan(&args(&url), "local", LOCAL).unwrap();
        assert_eq!(local.strategy, Strategy::Bootscript);
        assert_eq!(local.done_port, INITRD_DONE_PORT);
        let cloud = plan(&args(&url), "scaleway", CLOUD).unwrap();
        assert_eq!(cloud.strategy, Strategy::Import);
        assert_eq!(cloud.done_port, INITRD_DONE_PORT);
        let helper = plan(
            &args(&[&url[..], &["--strategy", "helper"]].concat()),
            "scaleway",
            CLOUD,
        );
        assert_eq!(helper.unwrap().done_port, HELPER_DONE_PORT);
        let e = err(&[&url[..], &["--strategy", "import"]].concat(), LOCAL);
        assert!(e.contains("--provider scaleway"), "{e}");
        let e = err(&[&url[..], &["--strategy", "helper"]].concat(), LOCAL);
        assert!(e.contains("--strategy bootscript"), "{e}");
        let e = err(&[&url[..], &["--strategy", "bootscript"]].concat(), CLOUD);
        assert!(e.contains("--bootscript-id"), "{e}");
        let e = err(&[&url[..], &["--public-url", "http://x"]].concat(), LOCAL);
        assert!(e.contains("--public-url is for remote providers"), "{e}");
    }

    #[test]
    fn only_x86_64_is_built() {
        let url = ["--rootfs", "http://example.test/r.tar"];
        let e = err(&[&url[..], &["--arch", "arm64"]].concat(), LOCAL);
        assert!(e.contains("x86_64 images only"), "{e}");
        assert!(plan(
            &args(&[&url[..], &["--arch", "amd64"]].concat()),
            "local",
            LOCAL
        )
        .is_ok());
        let refused = Cli::try_parse_from(["imgforge", "--name", "i", "--arch", "sparc"]);
        let e = refused.err().unwrap().to_string();
        assert!(e.contains("x86_64 (amd64), arm64 (aarch64)"), "{e}");
    }

    #[test]
    fn the_input_matches_the_method() {
        let e = err(&["--method", "from-qcow2"], LOCAL);
        assert!(e.contains("--disk-image"), "{e}");
        let e = err(&["--disk-image", "http://x/d.qcow2"], LOCAL);
        assert!(e.contains("goes with --method from-qcow2"), "{e}");
        let e = err(&[], LOCAL);
        assert!(e.contains("give --rootfs"), "{e}");
        let e = err(&["--rootfs", "/no/such/file.tar"], LOCAL);
        assert!(e.contains("no such file"), "{e}");
        let e = err(
            &["--method", "from-qcow2", "--disk-image", "/no/such.qcow2"],
            LOCAL,
        );
        assert!(e.contains("no such file"), "{e}");

        let file = tempfile::NamedTempFile::new().unwrap();
        let path = file.path().to_str().unwrap();
        let p = plan(&args(&["--rootfs", path]), "local", LOCAL).unwrap();
        assert_eq!(p.input, InputSource::File(path.into()));
        let p = plan(&args(&["--rootfs", "debian:bookworm"]), "local", LOCAL).unwrap();
        assert!(matches!(p.input, InputSource::Rootfs(_)), "{:?}", p.input);
        let p = plan(
            &args(&[
                "--method",
                "from-qcow2",
                "--disk-image",
                "https://x/d.qcow2",
            ]),
            "local",
            LOCAL,
        )
        .unwrap();
        assert_eq!(p.input, InputSource::Url("https://x/d.qcow2".into()));
    }

    #[test]
    fn tags_carry_the_agents_parameters() {
        let a = args(&[
            "--rootfs",
            "http://x/r.tar",
            "--param",
            "efi_size=200M",
            "--param",
            "signal_build_done_port=2222",
            "--param",
            "grow_fss=1",
        ]);
        let p = plan(&a, "local", LOCAL).unwrap();
        assert_eq!(p.unknown_params, ["grow_fss"]);
        let tags = p.tags(
            Method::FromRootfs,
            "abcd1234",
            "http://10.0.2.2:80/r",
            Some("ff"),
        );
        assert_eq!(
            tags,
            [
                "imgforge-build=abcd1234",
                "build_method=from-rootfs",
                "rootfs_url=http://10.0.2.2:80/r",
                "rootfs_sha256=ff",
                "signal_build_done_port=2222",
                "efi_size=200M",
                "grow_fss=1",
            ]
        );
        let e = err(&["--rootfs", "http://x/r", "--param", "efi_size"], LOCAL);
        assert!(e.contains("expected KEY=VALUE"), "{e}");
        let e = err(
            &[
                "--rootfs",
                "http://x/r",
                "--param",
                "signal_build_done_port=0",
            ],
            LOCAL,
        );
        assert!(e.contains("not a port number"), "{e}");
        let e = err(
            &["--rootfs", "http://x/r", "--param", "build_method=x"],
            LOCAL,
        );
        assert!(e.contains("--method"), "{e}");
    }
}
