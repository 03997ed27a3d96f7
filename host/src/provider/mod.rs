//! Providers: where build servers run and images are kept.
//!
//! The [`Provider`] trait is the cloud's vocabulary (servers with volumes and
//! tags, snapshots of volumes, images made of snapshots), shaped after
//! Scaleway's Instance API so that the build pipeline reads the same for the
//! local QEMU provider ([`local`]) and Scaleway ([`scaleway`]).

pub mod local;
pub mod scaleway;

use std::collections::BTreeMap;
use std::net::SocketAddr;

use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};

/// How a server boots.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Boot {
    /// Kernel, initrd and arguments of a bootscript. For the local provider:
    /// the directory `imgforge initrd -o DIR` wrote.
    Bootscript(String),
    /// The firmware boots the first volume (UEFI).
    Local,
}

/// A volume to create with a server.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum VolumeSpec {
    /// An empty volume of `size` bytes.
    Blank { size: u64 },
    /// A copy of a snapshot, grown to `size` bytes when given (never
    /// smaller than the snapshot).
    FromSnapshot {
        snapshot: String,
        #[serde(default)]
        size: Option<u64>,
    },
}

/// What to create a server with.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServerSpec {
    pub name: String,
    pub boot: Option<Boot>,
    /// Volume slots 0, 1, ...: the guest sees them in this order.
    pub volumes: Vec<VolumeSpec>,
    pub tags: Vec<String>,
    /// Guest TCP ports the host must reach (the done signal's port).
    pub exposed_ports: Vec<u16>,
    /// Host addresses the guest must reach (the artifact server). A provider
    /// that cannot arrange it says so when the server is created.
    pub host_services: Vec<SocketAddr>,
    /// Guest memory in MiB (local) or the commercial type's (cloud).
    pub memory_mib: Option<u32>,
    /// The user data cloud-init reads (`user_data/cloud-init` on the metadata
    /// service): a script or a cloud-config, run at the server's first boot.
    /// A provider without user data refuses it.
    pub cloud_init: Option<String>,
    /// OpenSSH public keys (`ssh-ed25519 AAAA... comment`) the metadata
    /// service gives the server (`ssh_public_keys`). A provider whose keys
    /// live elsewhere refuses them with where to put them.
    pub ssh_public_keys: Vec<String>,
}

/// Scaleway's server states.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ServerState {
    Stopped,
    Starting,
    Running,
    Stopping,
}

impl std::fmt::Display for ServerState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            ServerState::Stopped => "stopped",
            ServerState::Starting => "starting",
            ServerState::Running => "running",
            ServerState::Stopping => "stopping",
        })
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Server {
    pub id: String,
    pub name: String,
    pub state: ServerState,
    /// What the guest last reported (`PATCH /state` on the metadata server).
    pub state_detail: String,
    pub tags: Vec<String>,
    pub boot: Boot,
    /// Volume ids, slot 0 first.
    pub volumes: Vec<String>,
    /// Where the host reaches each exposed guest port while running.
    pub endpoints: BTreeMap<u16, SocketAddr>,
    pub arch: String,
    pub created_at: String,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Volume {
    pub id: String,
    pub name: String,
    pub size: u64,
    /// The server it is attached to.
    pub server: Option<String>,
    pub created_at: String,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Snapshot {
    pub id: String,
    pub name: String,
    pub size: u64,
    pub base_volume: String,
    pub created_at: String,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Image {
    pub id: String,
    pub name: String,
    pub arch: String,
    /// The snapshot holding the image's root volume.
    pub root_volume: String,
    pub created_at: String,
}

/// What a provider's servers can do, for the choices of `imgforge build`
/// (instead of comparing provider names).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Capabilities {
    /// Servers boot a bootscript directory built on this machine
    /// (`Boot::Bootscript(dir)`), not a bootscript id the cloud offers.
    pub local_bootscripts: bool,
    /// Servers can boot stock images with cloud-init user data (a helper
    /// server for `--strategy helper`).
    pub helper_servers: bool,
    /// Servers reach services on this machine's loopback through the
    /// provider's own forwards (`guest_url`, `host_services`), so no public
    /// URL is needed.
    pub forwards_to_host: bool,
    /// Takes images as QCOW2 files built on this machine (`--strategy
    /// import`: upload, import, no build server in the cloud).
    pub imports_qcow2: bool,
}

/// Servers, volumes, snapshots and images of one provider.
///
/// Every call is one request to the provider; nothing waits for a guest.
/// `stop_server` returns once the server is stopped.
#[async_trait::async_trait]
pub trait Provider: Send + Sync {
    /// `local` or `scaleway`.
    fn name(&self) -> &'static str;

    /// What the build pipeline must choose by; see [`Capabilities`].
    fn capabilities(&self) -> Capabilities;

    async fn create_server(&self, spec: &ServerSpec) -> Result<Server>;
    async fn get_server(&self, id: &str) -> Result<Server>;
    async fn list_servers(&self) -> Result<Vec<Server>>;
    async fn start_server(&self, id: &str) -> Result<Server>;
    async fn stop_server(&self, id: &str) -> Result<Server>;
    /// Deletes a stopped server, and its volumes when `with_volumes`.
    async fn delete_server(&self, id: &str, with_volumes: bool) -> Result<()>;
    async fn set_server_tags(&self, id: &str, tags: &[String]) -> Result<Server>;
    /// The last lines of the server's serial console, when the provider
    /// keeps it.
    async fn console_tail(&self, id: &str, lines: usize) -> Result<Option<String>>;

    async fn get_volume(&self, id: &str) -> Result<Volume>;
    async fn list_volumes(&self) -> Result<Vec<Volume>>;
    async fn delete_volume(&self, id: &str) -> Result<()>;

    async fn create_snapshot(&self, volume: &str, name: &str) -> Result<Snapshot>;
    async fn get_snapshot(&self, id: &str) -> Result<Snapshot>;
    async fn list_snapshots(&self) -> Result<Vec<Snapshot>>;
    async fn delete_snapshot(&self, id: &str) -> Result<()>;

    async fn create_image(&self, name: &str, snapshot: &str, arch: &str) -> Result<Image>;
    async fn get_image(&self, id: &str) -> Result<Image>;
    async fn list_images(&self) -> Result<Vec<Image>>;
    async fn delete_image(&self, id: &str) -> Result<()>;

    /// The URL a server uses for `url`, a URL on this machine (the artifact
    /// server); its address must be among the spec's `host_services`.
    fn guest_url(&self, url: &str) -> Result<String>;

    /// Removes what builds left behind (a build that was killed, or whose
    /// own cleanup failed): servers tagged [`BUILD_TAG_PREFIX`]`<id>` with
    /// their volumes, and the snapshots of such builds that no image uses.
    /// Images are never removed. `build` restricts it to one build id;
    /// `dry_run` only lists. Returns one line per resource.
    async fn cleanup_builds(&self, build: Option<&str>, dry_run: bool) -> Result<Vec<String>>;
}

/// `imgforge-build=<id>`: the tag on everything a build creates.
pub const BUILD_TAG_PREFIX: &str = "imgforge-build=";

/// The name of every build server starts with this, then the build id and
/// a dash (`imgforge-build-<id>-<image name>`); a provider names the
/// server's volumes after it.
pub const BUILD_SERVER_PREFIX: &str = "imgforge-build-";

/// The build id in a list of tags, if any.
pub fn build_id_of(tags: &[String]) -> Option<&str> {
    tags.iter().find_map(|t| t.strip_prefix(BUILD_TAG_PREFIX))
}

/// Picks the one item whose id is `key`, else the one named `key`.
pub fn find_by_id_or_name<'a, T>(
    items: &'a [T],
    key: &str,
    kind: &str,
    id: impl Fn(&T) -> &str,
    name: impl Fn(&T) -> &str,
) -> Result<&'a T> {
    if let Some(item) = items.iter().find(|i| id(i) == key) {
        return Ok(item);
    }
    let named: Vec<&T> = items.iter().filter(|i| name(i) == key).collect();
    match named.as_slice() {
        [one] => Ok(one),
        [] => bail!("no {kind} with id or name {key:?} (see `imgforge {kind} list`)"),
        many => bail!(
            "{} {kind}s are named {key:?}: use an id ({})",
            many.len(),
            many.iter().map(|i| id(i)).collect::<Vec<_>>().join(", ")
        ),
    }
}

/// The image `key` (an id or a unique name).
pub async fn find_image(provider: &dyn Provider, key: &str) -> Result<Image> {
    let images = provider.list_images().await?;
    find_by_id_or_name(&images, key, "image", |i| &i.id, |i| &i.name).cloned()
}

/// The server `key` (an id or a unique name).
pub async fn find_server(provider: &dyn Provider, key: &str) -> Result<Server> {
    let servers = provider.list_servers().await?;
    find_by_id_or_name(&servers, key, "server", |s| &s.id, |s| &s.name).cloned()
}

/// The snapshot `key` (an id or a unique name).
pub async fn find_snapshot(provider: &dyn Provider, key: &str) -> Result<Snapshot> {
    let snapshots = provider.list_snapshots().await?;
    find_by_id_or_name(&snapshots, key, "snapshot", |s| &s.id, |s| &s.name).cloned()
}

/// The current time as RFC 3339 (UTC), for `created_at`.
pub fn now_rfc3339() -> String {
    humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_win_over_names_and_ambiguous_names_are_refused() {
        let items = vec![("a", "x"), ("b", "x"), ("c", "a")];
        let get = |key| find_by_id_or_name(&items, key, "image", |i| i.0, |i| i.1);
        assert_eq!(get("a").unwrap().0, "a");
        let err = get("x").unwrap_err().to_string();
        assert!(err.contains("2 images are named \"x\""), "{err}");
        assert!(get("zzz").unwrap_err().to_string().contains("image list"));
    }
}
