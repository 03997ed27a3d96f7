//! `imgforge server|snapshot|image ...`: one subcommand per provider call,
//! for scripts and for looking at what a build left (or did not leave).

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};
use serde::Serialize;

use crate::provider::local::accel::AccelChoice;
use crate::provider::local::{ExportFormat, LocalProvider};
use crate::provider::scaleway::{ScalewayOptions, ScalewayProvider};
use crate::provider::{
    find_image, find_server, find_snapshot, Boot, Provider, ServerSpec, VolumeSpec,
};
use crate::size::parse_size;
use crate::tools::RunTool;

/// Which provider, and how it runs servers.
#[derive(Args, Debug, Clone)]
pub struct ProviderArgs {
    /// Where servers run and images are kept.
    #[arg(
        long,
        global = true,
        value_enum,
        env = "IMGFORGE_PROVIDER",
        default_value = "local"
    )]
    pub provider: ProviderName,
    /// QEMU accelerator of the local provider; `auto` uses KVM only when a
    /// probe guest actually runs under it.
    #[arg(
        long,
        global = true,
        value_enum,
        env = "IMGFORGE_ACCEL",
        default_value = "auto"
    )]
    pub accel: AccelChoice,
    /// Scaleway: the build server's commercial type.
    #[arg(
        long,
        global = true,
        env = "IMGFORGE_SCW_COMMERCIAL_TYPE",
        default_value = "DEV1-S"
    )]
    pub scw_commercial_type: String,
    /// Scaleway: the stock image (marketplace label or image id) that
    /// locally booted servers start from.
    #[arg(
        long,
        global = true,
        env = "IMGFORGE_SCW_IMAGE",
        default_value = "debian_bookworm"
    )]
    pub scw_image: String,
    /// Scaleway: the type of the volumes servers are created with:
    /// `sbs_volume` (Block Storage) or `l_ssd` (local SSD, for commercial
    /// types that need it). The stock image label resolves to the
    /// marketplace image for that root type.
    #[arg(
        long,
        global = true,
        env = "IMGFORGE_SCW_VOLUME_TYPE",
        default_value = "sbs_volume",
        value_parser = ["sbs_volume", "l_ssd"]
    )]
    pub scw_volume_type: String,
    /// Scaleway: the Object Storage bucket images are uploaded to for import
    /// (created if missing); default `imgforge-<project id>`.
    #[arg(
        long,
        global = true,
        env = "IMGFORGE_SCW_BUCKET",
        value_name = "BUCKET"
    )]
    pub bucket: Option<String>,
    /// Scaleway: the S3 endpoint of Object Storage; default
    /// `https://s3.<region>.scw.cloud` for the configured region. Another
    /// S3 service or a test server can stand in.
    #[arg(long, global = true, env = "IMGFORGE_S3_ENDPOINT", value_name = "URL")]
    pub s3_endpoint: Option<String>,
}

#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProviderName {
    Local,
    Scaleway,
}

impl ProviderArgs {
    /// Opens the chosen provider.
    pub fn open(&self) -> Result<Box<dyn Provider>> {
        match self.provider {
            ProviderName::Local => Ok(Box::new(self.open_local()?)),
            ProviderName::Scaleway => Ok(Box::new(self.open_scaleway()?)),
        }
    }

    /// Opens the Scaleway provider with the scw CLI's configuration
    /// (`~/.config/scw/config.yaml` and the `SCW_*` variables).
    pub fn open_scaleway(&self) -> Result<ScalewayProvider> {
        let config = crate::provider::scaleway::Config::load()
            .context("read the Scaleway configuration (as the scw CLI does)")?;
        let options = ScalewayOptions {
            commercial_type: self.scw_commercial_type.clone(),
            image_label: self.scw_image.clone(),
            volume_type: crate::provider::scaleway::VolumeType::parse(&self.scw_volume_type)?,
            ..ScalewayOptions::default()
        };
        let provider = ScalewayProvider::from_config(&config, options)?;
        // Object Storage (for the cleanup of pushes) needs the access key;
        // without one, everything else still works.
        Ok(match config.access_key {
            Some(_) => provider.with_object_storage(self.open_object_storage(&config)?),
            None => provider,
        })
    }

    /// Object Storage for the configured Scaleway account: the region's
    /// endpoint (or `--s3-endpoint`), `--bucket`, the access and secret key.
    pub fn open_object_storage(
        &self,
        config: &crate::provider::scaleway::Config,
    ) -> Result<crate::object_storage::ObjectStore> {
        let endpoint = match &self.s3_endpoint {
            Some(url) => url.clone(),
            None => format!("https://s3.{}.scw.cloud", config.default_region),
        };
        let endpoint = url::Url::parse(&endpoint)
            .with_context(|| format!("Object Storage endpoint {endpoint:?} is not a URL"))?;
        let bucket = self
            .bucket
            .clone()
            .unwrap_or_else(|| format!("imgforge-{}", config.default_project_id));
        let Some(access_key) = config.access_key.as_deref() else {
            bail!(
                "Object Storage needs the access key of the API key: set SCW_ACCESS_KEY or                  `access_key` in the scw config file"
            );
        };
        crate::object_storage::ObjectStore::new(
            crate::object_storage::Location {
                endpoint,
                region: config.default_region.clone(),
                bucket,
            },
            access_key,
            config.secret_key.expose(),
        )
    }

    /// Opens the local provider (commands that only exist locally).
    pub fn open_local(&self) -> Result<LocalProvider> {
        let home = crate::provider::local::store::Store::default_home()?;
        LocalProvider::open(&home, self.accel)
    }
}

#[derive(Subcommand, Debug)]
pub enum ServerCommand {
    /// Create a (stopped) server with its volumes.
    Create {
        #[arg(long)]
        name: String,
        /// Boot a bootscript's kernel and initrd (local: a directory written
        /// by `imgforge initrd -o DIR`; Scaleway: a bootscript id, where
        /// bootscripts still exist); without it the server boots volume 0.
        #[arg(long)]
        bootscript: Option<String>,
        /// A blank volume of this size (4G, 512M...); repeat for more.
        #[arg(long = "volume", value_parser = parse_size)]
        volumes: Vec<u64>,
        /// Volume 0 as a copy of this image's snapshot.
        #[arg(long, conflicts_with = "bootscript")]
        image: Option<String>,
        /// A server tag (KEY=value); repeat for more.
        #[arg(long = "tag")]
        tags: Vec<String>,
        /// A guest TCP port to reach from this machine; repeat for more.
        #[arg(long = "expose")]
        exposed_ports: Vec<u16>,
        /// Guest memory in MiB.
        #[arg(long)]
        memory: Option<u32>,
        /// Volume 0's size when it comes from --image (at least the image's;
        /// the server grows its root partition and filesystem into it).
        #[arg(long, value_parser = parse_size, requires = "image")]
        root_size: Option<u64>,
        /// An OpenSSH public key (FILE.pub) the metadata service gives the
        /// server; repeatable. The private key beside the first is what
        /// `imgforge server ssh` logs in with.
        #[arg(long = "ssh-key", value_name = "FILE.pub")]
        ssh_keys: Vec<PathBuf>,
        /// cloud-init user data (a cloud-config or a script), served to the
        /// server as `user_data/cloud-init`.
        #[arg(long, value_name = "FILE")]
        user_data: Option<PathBuf>,
    },
    List,
    Get {
        server: String,
    },
    Start {
        server: String,
    },
    Stop {
        server: String,
    },
    /// Replace the server's tags.
    SetTags {
        server: String,
        tags: Vec<String>,
    },
    /// Log in with the system's OpenSSH client (the server's port 22 must be
    /// exposed and the server running), like `scw instance server ssh`.
    Ssh {
        server: String,
        /// The private key (default: the one the server was created with).
        #[arg(short = 'i', value_name = "FILE")]
        identity: Option<PathBuf>,
        /// The user to log in as.
        #[arg(short = 'l', long, default_value = "root")]
        user: String,
        /// A command to run instead of a shell (after `--`).
        #[arg(last = true)]
        command: Vec<String>,
    },
    /// Print the end of the serial console.
    Console {
        server: String,
        #[arg(long, default_value_t = 40)]
        lines: usize,
    },
    /// Delete a server and its volumes.
    Rm {
        server: String,
        /// Stop it first if it is running.
        #[arg(long)]
        force: bool,
        /// Keep the volumes.
        #[arg(long)]
        keep_volumes: bool,
    },
}

#[derive(Subcommand, Debug)]
pub enum SnapshotCommand {
    /// Snapshot a volume (of a stopped server).
    Create {
        /// The volume id, or a server (id or name) for its volume 0.
        volume: String,
        #[arg(long)]
        name: String,
    },
    List,
    Get {
        snapshot: String,
    },
    Rm {
        snapshot: String,
    },
}

#[derive(Subcommand, Debug)]
pub enum ImageCommand {
    /// Make an image of a snapshot.
    Create {
        #[arg(long)]
        name: String,
        #[arg(long)]
        snapshot: String,
        /// What the snapshot's disk is built for: x86_64 (amd64) or arm64
        /// (aarch64).
        #[arg(long, default_value = "x86_64", value_parser = crate::arch::parse)]
        arch: crate::arch::Arch,
    },
    List,
    Get {
        image: String,
    },
    Rm {
        image: String,
        /// Also delete the snapshot it is made of.
        #[arg(long)]
        with_snapshot: bool,
    },
    /// Send a local image to Scaleway (`--provider scaleway`): upload it as
    /// QCOW2 to Object Storage, import it as a Block snapshot, create the
    /// image; the object is removed afterwards.
    Push {
        /// The local image (id or name).
        image: String,
        #[command(flatten)]
        push: crate::push::PushArgs,
    },
    /// Write the image's disk to a file (local provider only).
    Export {
        image: String,
        #[arg(short, long)]
        output: PathBuf,
        #[arg(long, value_enum, default_value = "raw")]
        format: ExportFormat,
    },
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("start the async runtime")
}

fn print<T: Serialize>(json: bool, value: &T, text: impl FnOnce(&T) -> String) -> Result<()> {
    if json {
        println!("{}", serde_json::to_string_pretty(value)?);
    } else {
        let text = text(value);
        if !text.is_empty() {
            println!("{}", text.trim_end());
        }
    }
    Ok(())
}

/// cloud-init user data from a file: text, as the metadata service serves it.
fn read_user_data(path: &std::path::Path) -> Result<String> {
    let bytes = std::fs::read(path)
        .with_context(|| format!("cannot read the user data {}", path.display()))?;
    String::from_utf8(bytes).map_err(|_| {
        anyhow::anyhow!(
            "the user data {} is not text: give a cloud-config or a script",
            path.display()
        )
    })
}

fn server_line(s: &crate::provider::Server) -> String {
    format!("{}  {:<20} {:<9} {}", s.id, s.name, s.state, s.state_detail)
}

pub fn run_server(command: ServerCommand, provider: &ProviderArgs, json: bool) -> Result<()> {
    let rt = runtime()?;
    let p = provider.open()?;
    rt.block_on(async {
        match command {
            ServerCommand::Create {
                name,
                bootscript,
                volumes,
                image,
                tags,
                exposed_ports,
                memory,
                root_size,
                ssh_keys,
                user_data,
            } => {
                // Every input is checked before anything is created.
                let keys = ssh_keys
                    .iter()
                    .map(|k| crate::ssh::read_public_key(k))
                    .collect::<Result<Vec<_>>>()?;
                let identity = ssh_keys.first().and_then(|k| crate::ssh::private_key_of(k));
                let cloud_init = user_data.as_deref().map(read_user_data).transpose()?;
                let mut volume_specs = Vec::new();
                if let Some(image) = image {
                    let image = find_image(p.as_ref(), &image).await?;
                    volume_specs.push(VolumeSpec::FromSnapshot {
                        snapshot: image.root_volume,
                        size: root_size,
                    });
                }
                volume_specs.extend(volumes.into_iter().map(|size| VolumeSpec::Blank { size }));
                let spec = ServerSpec {
                    name,
                    boot: Some(match bootscript {
                        Some(dir) => Boot::Bootscript(absolute(&dir)?),
                        None => Boot::Local,
                    }),
                    volumes: volume_specs,
                    tags,
                    exposed_ports,
                    host_services: vec![],
                    memory_mib: memory,
                    cloud_init,
                    ssh_public_keys: keys.into_iter().map(|k| k.line).collect(),
                };
                let server = p.create_server(&spec).await?;
                if let Some(identity) = identity {
                    crate::ssh::remember_identity(&server.id, &identity)?;
                }
                print(json, &server, server_line)
            }
            ServerCommand::List => {
                let servers = p.list_servers().await?;
                print(json, &servers, |v| {
                    v.iter().map(server_line).collect::<Vec<_>>().join("\n")
                })
            }
            ServerCommand::Get { server } => {
                let server = find_server(p.as_ref(), &server).await?;
                print(json, &server, |s| {
                    let mut out = server_line(s);
                    out.push_str(&format!("\n  tags: {}", s.tags.join(" ")));
                    out.push_str(&format!("\n  volumes: {}", s.volumes.join(" ")));
                    for (guest, host) in &s.endpoints {
                        out.push_str(&format!("\n  port {guest} -> {host}"));
                    }
                    out
                })
            }
            ServerCommand::Start { server } => {
                let server = find_server(p.as_ref(), &server).await?;
                let server = p.start_server(&server.id).await?;
                print(json, &server, server_line)
            }
            ServerCommand::Stop { server } => {
                let server = find_server(p.as_ref(), &server).await?;
                let server = p.stop_server(&server.id).await?;
                print(json, &server, server_line)
            }
            ServerCommand::SetTags { server, tags } => {
                let server = find_server(p.as_ref(), &server).await?;
                let server = p.set_server_tags(&server.id, &tags).await?;
                print(json, &server, server_line)
            }
            ServerCommand::Ssh {
                server,
                identity,
                user,
                command,
            } => {
                let server = find_server(p.as_ref(), &server).await?;
                let target = crate::ssh::Target::for_server(&server, identity, &user)?;
                let status = target.command(&command, true).status().running("ssh")?;
                // ssh's own exit code (the remote command's, or 255) is ours.
                std::process::exit(status.code().unwrap_or(255));
            }
            ServerCommand::Console { server, lines } => {
                let server = find_server(p.as_ref(), &server).await?;
                let tail = p.console_tail(&server.id, lines).await?;
                let tail = tail.context("this server has no console log")?;
                print(json, &serde_json::json!({ "console": tail }), |_| {
                    tail.clone()
                })
            }
            ServerCommand::Rm {
                server,
                force,
                keep_volumes,
            } => {
                let server = find_server(p.as_ref(), &server).await?;
                if force {
                    p.stop_server(&server.id).await?;
                }
                p.delete_server(&server.id, !keep_volumes).await?;
                crate::ssh::forget(&server.id);
                print(json, &serde_json::json!({ "deleted": server.id }), |_| {
                    format!("deleted server {} ({})", server.name, server.id)
                })
            }
        }
    })
}

pub fn run_snapshot(command: SnapshotCommand, provider: &ProviderArgs, json: bool) -> Result<()> {
    let rt = runtime()?;
    let p = provider.open()?;
    let line =
        |s: &crate::provider::Snapshot| format!("{}  {:<20} {:>12} bytes", s.id, s.name, s.size);
    rt.block_on(async {
        match command {
            SnapshotCommand::Create { volume, name } => {
                let volume_id = match p.get_volume(&volume).await {
                    Ok(v) => v.id,
                    Err(_) => {
                        let server = find_server(p.as_ref(), &volume).await?;
                        server
                            .volumes
                            .first()
                            .cloned()
                            .context("the server has no volume")?
                    }
                };
                let snapshot = p.create_snapshot(&volume_id, &name).await?;
                print(json, &snapshot, line)
            }
            SnapshotCommand::List => {
                let all = p.list_snapshots().await?;
                print(json, &all, |v| {
                    v.iter().map(line).collect::<Vec<_>>().join("\n")
                })
            }
            SnapshotCommand::Get { snapshot } => {
                let snapshot = find_snapshot(p.as_ref(), &snapshot).await?;
                print(json, &snapshot, line)
            }
            SnapshotCommand::Rm { snapshot } => {
                let snapshot = find_snapshot(p.as_ref(), &snapshot).await?;
                p.delete_snapshot(&snapshot.id).await?;
                print(json, &serde_json::json!({ "deleted": snapshot.id }), |_| {
                    format!("deleted snapshot {} ({})", snapshot.name, snapshot.id)
                })
            }
        }
    })
}

pub fn run_image(command: ImageCommand, provider: &ProviderArgs, json: bool) -> Result<()> {
    let rt = runtime()?;
    let line = |i: &crate::provider::Image| {
        format!("{}  {:<20} {:<7} {}", i.id, i.name, i.arch, i.created_at)
    };
    if let ImageCommand::Push { image, push } = &command {
        return crate::push::run_push(image, push, provider, json);
    }
    if let ImageCommand::Export {
        image,
        output,
        format,
    } = command
    {
        // Only the local provider's images are files on this machine; the
        // check comes before any provider is opened.
        match provider.provider {
            ProviderName::Local => {}
            // imgforge's Scaleway snapshots are Block snapshots of
            // sbs_volume volumes, or Instance snapshots with l_ssd.
            ProviderName::Scaleway => bail!(
                "image export reads the local provider's images; a Scaleway image cannot be \
                 exported here: create a server from it, or export its snapshot to Object \
                 Storage as QCOW2 (`scw block snapshot export-to-object-storage` for the Block \
                 Storage snapshots imgforge makes, `scw instance snapshot export` for those \
                 of l_ssd volumes, --scw-volume-type l_ssd)"
            ),
        }
        let local = provider.open_local()?;
        return rt.block_on(async {
            let image = find_image(&local, &image).await?;
            local.export_image(&image.id, &output, format).await?;
            print(
                json,
                &serde_json::json!({ "image": image.id, "output": output, "format": format!("{format:?}").to_lowercase() }),
                |_| format!("{} -> {}", image.name, output.display()),
            )
        });
    }
    let p = provider.open()?;
    rt.block_on(async {
        match command {
            ImageCommand::Create {
                name,
                snapshot,
                arch,
            } => {
                let snapshot = find_snapshot(p.as_ref(), &snapshot).await?;
                let image = p
                    .create_image(&name, &snapshot.id, arch.image_name())
                    .await?;
                print(json, &image, line)
            }
            ImageCommand::List => {
                let all = p.list_images().await?;
                print(json, &all, |v| {
                    v.iter().map(line).collect::<Vec<_>>().join("\n")
                })
            }
            ImageCommand::Get { image } => {
                let image = find_image(p.as_ref(), &image).await?;
                print(json, &image, line)
            }
            ImageCommand::Rm {
                image,
                with_snapshot,
            } => {
                let image = find_image(p.as_ref(), &image).await?;
                p.delete_image(&image.id).await?;
                if with_snapshot {
                    p.delete_snapshot(&image.root_volume).await?;
                }
                print(json, &serde_json::json!({ "deleted": image.id }), |_| {
                    format!("deleted image {} ({})", image.name, image.id)
                })
            }
            ImageCommand::Export { .. } | ImageCommand::Push { .. } => {
                unreachable!("handled above")
            }
        }
    })
}

fn absolute(path: &str) -> Result<String> {
    let p = std::fs::canonicalize(path).with_context(|| format!("bootscript directory {path}"))?;
    Ok(p.to_string_lossy().into_owned())
}

/// `imgforge cleanup`: what interrupted builds left behind.
#[derive(Args, Debug)]
pub struct CleanupArgs {
    /// Only this build's resources (the `imgforge-build=<id>` tag; a build
    /// prints its id). Without it, every build's leftovers: do not run it
    /// while another build is running on the same account.
    #[arg(long, value_name = "ID")]
    pub build_id: Option<String>,
    /// List what would be removed, remove nothing.
    #[arg(long)]
    pub dry_run: bool,
    #[command(flatten)]
    pub provider: ProviderArgs,
}

pub fn run_cleanup(args: CleanupArgs, json: bool) -> Result<()> {
    let provider = args.provider.open()?;
    let removed =
        runtime()?.block_on(provider.cleanup_builds(args.build_id.as_deref(), args.dry_run))?;
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({
                "dry_run": args.dry_run,
                "resources": removed,
            }))?
        );
    } else if removed.is_empty() {
        println!("nothing to clean up");
    } else {
        let verb = if args.dry_run {
            "would remove"
        } else {
            "removed"
        };
        for line in removed {
            println!("{verb} {line}");
        }
    }
    Ok(())
}
