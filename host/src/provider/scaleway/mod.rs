//! The Scaleway provider: the [`Provider`] vocabulary over Scaleway's
//! Instance API v1 and Block API v1, and the API client it goes through:
//!
//! * [`config`]: credentials and defaults, read as the `scw` CLI reads them;
//! * [`client`]: the HTTP layer ([`Client`]), which rides out rate limits and
//!   transient failures (retries on 429/5xx) without duplicating creations
//!   (checked creations);
//! * [`api`]: the typed calls the provider needs (servers, volumes,
//!   snapshots, images, user data) plus waiters that poll their states. Its
//!   types keep the API's names (`api::Server`, `api::Volume`…), so they are
//!   not re-exported here beside the trait's.
//!
//! * [`block`]: the Block API calls (SBS volumes and snapshots, imports);
//! * [`route`]: the pure decisions of which API holds what, and which
//!   marketplace image a label stands for.
//!
//! API facts come from `shared/reference/scaleway-api.md` (sections 1 to 3
//! and 7).
//!
//! How the trait maps onto the API:
//!
//! * A server is created stopped from a stock image label (`Boot::Local`,
//!   [`ScalewayOptions::image_label`]) or, for the original flow,
//!   `boot_type: bootscript`, which Scaleway refuses since bootscripts were
//!   removed on 2023-05-15: that refusal becomes an error that says so and
//!   points at `--strategy helper`. Its volumes are `volumes["0"]`,
//!   `volumes["1"]`… (sizes in SI bytes) of [`ScalewayOptions::volume_type`]
//!   (`sbs_volume` by default, `l_ssd` as an option and for bootscript
//!   servers; a copy of a snapshot stays in its snapshot's API). A label is
//!   resolved as sdk-go does, through the marketplace's local images of the
//!   type the root volume needs (`instance_sbs` or `instance_local`).
//! * Volumes and snapshots live in two APIs: `sbs_volume`/`sbs_snapshot` in
//!   the Block API, `l_ssd` in the Instance API, and each answers 404 for
//!   the other's ids. The provider routes by `volume_type` where the API
//!   says it (a server's volumes), else looks the id up in both (the
//!   configured type's API first); a 404 from one API is never taken for
//!   success, a 404 from both means gone. Lists show both APIs' objects. Its name gets a random
//!   suffix, because the client recognises a creation whose reply was lost
//!   by its unique name.
//! * Every server carries the [`MARKER_TAG`] (`list_servers` lists by it) and
//!   its exposed ports as an [`EXPOSED_PORTS_TAG`] tag; both are hidden from
//!   the tags [`Server`] shows, so the caller's tags round-trip.
//! * Build tags (`imgforge-build=<id>`, [`BUILD_TAG_PREFIX`]) given by the
//!   caller on a server are copied onto the snapshots of its volumes and onto
//!   the images made of those snapshots, so that a cleanup by tag finds
//!   them (Block snapshots take the tags directly). (Volumes created with
//!   a server cannot be tagged through POST /servers; they are found through
//!   their server, or by name once detached.)
//! * A server reaches this machine over the internet: `endpoints[port]` is
//!   the server's public address with that port, and [`Provider::guest_url`]
//!   refuses loopback URLs (the artifact server needs `--public-url`).
//! * `stopped in place` counts as stopped; `locked` (Scaleway holds the
//!   server, e.g. for abuse or billing) is an error for every operation on
//!   the server. There is no serial console over the API, so `console_tail`
//!   is `None`.

pub mod api;
pub mod block;
pub mod client;
pub mod config;
pub mod push;
pub mod route;

#[cfg(test)]
mod client_tests;

pub use client::{ApiError, Client, ClientOptions, Error, RetryPolicy};
pub use config::{Config, ConfigError, SecretKey};
pub use route::VolumeType;

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use tracing::{info, warn};

use self::api::{
    CreateImageRequest, CreateServerRequest, CreateSnapshotRequest, ServerAction, VolumeTemplate,
};
use self::block::{BlockSnapshot, BlockVolume, CreateBlockSnapshotRequest};
use self::route::Family;
use super::{
    Boot, Capabilities, Image, Provider, Server, ServerSpec, ServerState, Snapshot, Volume,
    VolumeSpec,
};

/// The tag on every server this provider creates; `list_servers` lists by it.
pub const MARKER_TAG: &str = "imgforge";
/// `imgforge-exposed-ports=22,80`: the spec's exposed ports, kept on the
/// server so that any later process can compute its endpoints.
pub const EXPOSED_PORTS_TAG: &str = "imgforge-exposed-ports=";
pub use super::{BUILD_SERVER_PREFIX, BUILD_TAG_PREFIX};

/// What a server, a snapshot or an image is created with, and how long to
/// wait for them.
#[derive(Clone, Debug)]
pub struct ScalewayOptions {
    /// The server type (`DEV1-S`, `GP1-S`…).
    pub commercial_type: String,
    /// The stock image a `Boot::Local` server starts from (a marketplace
    /// label such as `debian_bookworm`, or an image id).
    pub image_label: String,
    /// The type of the volumes servers are created with: `sbs_volume`
    /// (Block API, the default) or `l_ssd` (for commercial types that need
    /// it). Bootscript servers always get `l_ssd`.
    pub volume_type: VolumeType,
    /// Longest wait for a server to reach `running` or `stopped`.
    pub server_timeout: Duration,
    /// Longest wait for a snapshot to become `available`.
    pub snapshot_timeout: Duration,
    /// Longest wait for an image to become `available`.
    pub image_timeout: Duration,
}

impl Default for ScalewayOptions {
    fn default() -> Self {
        ScalewayOptions {
            commercial_type: "DEV1-S".to_string(),
            image_label: "debian_bookworm".to_string(),
            volume_type: VolumeType::default(),
            server_timeout: Duration::from_secs(600),
            snapshot_timeout: Duration::from_secs(1800),
            image_timeout: Duration::from_secs(600),
        }
    }
}

pub struct ScalewayProvider {
    client: Client,
    options: ScalewayOptions,
    /// Where pushes upload (for the cleanup of what a killed push left);
    /// `None` when the configuration has no access key.
    object_storage: Option<crate::object_storage::ObjectStore>,
}

impl ScalewayProvider {
    pub fn new(client: Client, options: ScalewayOptions) -> ScalewayProvider {
        ScalewayProvider {
            client,
            options,
            object_storage: None,
        }
    }

    /// The provider, with the Object Storage bucket pushes upload to.
    pub fn with_object_storage(mut self, store: crate::object_storage::ObjectStore) -> Self {
        self.object_storage = Some(store);
        self
    }

    /// The provider for the scw CLI's configuration (`Config::load`).
    pub fn from_config(config: &Config, options: ScalewayOptions) -> Result<ScalewayProvider> {
        let client = Client::new(config).context("set up the Scaleway API client")?;
        Ok(ScalewayProvider::new(client, options))
    }

    pub fn client(&self) -> &Client {
        &self.client
    }

    /// Sets user data `key` of a server (e.g. `cloud-init`, read by
    /// cloud-init at boot): the helper strategy's way to hand the guest its
    /// script. Not part of [`Provider`]: the local provider has no user data.
    pub async fn set_user_data(&self, server: &str, key: &str, value: &str) -> Result<()> {
        self.client
            .set_user_data(server, key, value)
            .await
            .with_context(|| format!("set user data {key:?} of server {server}"))
    }

    /// Every `key` item (`volumes`, `snapshots`, `images`) of the project,
    /// all pages.
    async fn list_in_project<T: serde::de::DeserializeOwned>(&self, key: &str) -> Result<Vec<T>> {
        let query = [("project", self.client.project_id().to_string())];
        self.client
            .list_all(&format!("/{key}"), &query, key)
            .await
            .with_context(|| format!("list {key}"))
    }

    /// The server, refusing states this provider cannot work with.
    /// Aborts the multipart uploads under imgforge's prefix (one build's,
    /// or all), and deletes the objects of builds that have no image.
    async fn cleanup_objects(
        &self,
        store: &crate::object_storage::ObjectStore,
        build: Option<&str>,
        images: &[api::Image],
        dry_run: bool,
    ) -> Result<Vec<String>> {
        let prefix = push::object_prefix(build);
        let mut removed = Vec::new();
        for upload in store
            .list_uploads(&prefix)
            .await
            .with_context(|| format!("list the uploads in {}", store.describe(&prefix)))?
        {
            removed.push(format!(
                "multipart upload {} of {}",
                upload.upload_id,
                store.describe(&upload.key)
            ));
            if !dry_run {
                store.abort_upload(&upload.key, &upload.upload_id).await?;
            }
        }
        let imaged: Vec<String> = images
            .iter()
            .filter_map(|image| super::build_id_of(&image.tags).map(str::to_string))
            .collect();
        for key in store
            .list_objects(&prefix)
            .await
            .with_context(|| format!("list the objects in {}", store.describe(&prefix)))?
        {
            let build_of_key = key
                .strip_prefix(&push::object_prefix(None))
                .and_then(|rest| rest.split_once('/'))
                .map(|(id, _)| id.to_string());
            if build_of_key.is_some_and(|id| imaged.contains(&id)) {
                continue;
            }
            removed.push(format!("object {}", store.describe(&key)));
            if !dry_run {
                store.delete_object(&key).await?;
            }
        }
        Ok(removed)
    }

    async fn read_server(&self, id: &str) -> Result<api::Server> {
        let server = self
            .client
            .get_server(id)
            .await
            .with_context(|| format!("get server {id}"))?;
        server_state(&server)?;
        Ok(server)
    }

    async fn wait_for(&self, id: &str, wanted: &[api::ServerState]) -> Result<api::Server> {
        let server = self
            .client
            .wait_for_server_state(id, wanted, self.options.server_timeout)
            .await?;
        Ok(server)
    }

    /// The `imgforge-build=` tags of `server` (none when there is no
    /// server, or it is gone).
    async fn build_tags_of_server(
        &self,
        server: Option<&str>,
        volume: &str,
    ) -> Result<Vec<String>> {
        let Some(server) = server.filter(|s| !s.is_empty()) else {
            return Ok(Vec::new());
        };
        match self.client.get_server(server).await {
            Ok(server) => Ok(build_tags(&server.tags)),
            Err(e) if e.is_not_found() => Ok(Vec::new()),
            Err(e) => Err(e).with_context(|| format!("get server {server} of volume {volume}")),
        }
    }

    /// The volume `id` from the API that has it (an id of unknown family
    /// is looked up in both: a 404 from one is no answer); `None` when
    /// neither has it.
    async fn locate_volume(&self, id: &str) -> Result<Option<AnyVolume>> {
        for family in route::lookup_order(self.options.volume_type) {
            let found = match family {
                Family::Instance => self.client.get_volume(id).await.map(AnyVolume::Instance),
                Family::Block => self.client.get_block_volume(id).await.map(AnyVolume::Block),
            };
            match found {
                Ok(volume) => return Ok(Some(volume)),
                Err(e) if e.is_not_found() => continue,
                Err(e) => {
                    return Err(e)
                        .with_context(|| format!("get volume {id} ({} API)", api_name(family)))
                }
            }
        }
        Ok(None)
    }

    /// The snapshot `id`, as [`ScalewayProvider::locate_volume`].
    async fn locate_snapshot(&self, id: &str) -> Result<Option<AnySnapshot>> {
        for family in route::lookup_order(self.options.volume_type) {
            let found = match family {
                Family::Instance => self
                    .client
                    .get_snapshot(id)
                    .await
                    .map(AnySnapshot::Instance),
                Family::Block => self
                    .client
                    .get_block_snapshot(id)
                    .await
                    .map(AnySnapshot::Block),
            };
            match found {
                Ok(snapshot) => return Ok(Some(snapshot)),
                Err(e) if e.is_not_found() => continue,
                Err(e) => {
                    return Err(e)
                        .with_context(|| format!("get snapshot {id} ({} API)", api_name(family)))
                }
            }
        }
        Ok(None)
    }

    /// The snapshot `id`, or an error naming both APIs.
    async fn find_any_snapshot(&self, id: &str) -> Result<AnySnapshot> {
        self.locate_snapshot(id).await?.with_context(|| {
            format!("no snapshot {id}: neither the Instance nor the Block API has it")
        })
    }

    /// Deletes volume `id` in the API of `family`; a 404 there means it is
    /// gone. A Block volume is refused while still attached (the server's
    /// deletion detaches it): wait for that, up to the server timeout.
    async fn delete_volume_in(&self, id: &str, family: Family) -> Result<()> {
        let deadline = std::time::Instant::now() + self.options.server_timeout;
        let poll = self.client.options().poll_interval;
        let mut pause = Duration::from_millis(100).min(poll);
        loop {
            let deleted = match family {
                Family::Instance => self.client.delete_volume(id).await,
                Family::Block => self.client.delete_block_volume(id).await,
            };
            match deleted {
                Ok(()) => return Ok(()),
                Err(e) if e.is_not_found() => return Ok(()),
                Err(e)
                    if family == Family::Block
                        && is_still_in_use(&e)
                        && std::time::Instant::now() < deadline =>
                {
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(poll);
                }
                Err(e) => {
                    return Err(e)
                        .with_context(|| format!("delete volume {id} ({} API)", api_name(family)))
                }
            }
        }
    }

    /// The stock image's id: an id as given, a label resolved as sdk-go
    /// does (marketplace local images of the label in the zone, of the type
    /// the root volume needs).
    async fn resolve_image(&self, root: VolumeType) -> Result<String> {
        let label = &self.options.image_label;
        if route::is_image_id(label) {
            return Ok(label.clone());
        }
        let kind = root.marketplace_type();
        let zone = self.client.zone().to_string();
        let query = [
            ("image_label", label.clone()),
            ("zone", zone.clone()),
            ("type", kind.to_string()),
        ];
        let images: Vec<route::LocalImage> = self
            .client
            .marketplace()
            .list_all("/local-images", &query, "local_images")
            .await
            .with_context(|| format!("resolve image label {label:?} in the marketplace"))?;
        let image =
            route::pick_local_image(&images, label, &zone, kind, &self.options.commercial_type)?;
        info!(label = %label, id = %image.id, kind, "resolved the image label");
        Ok(image.id.clone())
    }
}

/// A volume of either API.
enum AnyVolume {
    Instance(api::Volume),
    Block(BlockVolume),
}

/// A snapshot of either API.
enum AnySnapshot {
    Instance(api::Snapshot),
    Block(BlockSnapshot),
}

impl AnySnapshot {
    fn tags(&self) -> &[String] {
        match self {
            AnySnapshot::Instance(s) => &s.tags,
            AnySnapshot::Block(s) => &s.tags,
        }
    }

    fn family(&self) -> Family {
        match self {
            AnySnapshot::Instance(_) => Family::Instance,
            AnySnapshot::Block(_) => Family::Block,
        }
    }
}

fn api_name(family: Family) -> &'static str {
    match family {
        Family::Instance => "Instance",
        Family::Block => "Block",
    }
}

/// The API's refusal to delete an attached (or still settling) volume.
fn is_still_in_use(error: &client::Error) -> bool {
    error
        .api_error()
        .is_some_and(|e| e.status == 412 || e.status == 409 || e.kind == "transient_state")
}

/// A server's state in the trait's terms; `locked` and states this provider
/// does not know are errors.
fn server_state(server: &api::Server) -> Result<ServerState> {
    Ok(match &server.state {
        api::ServerState::Starting => ServerState::Starting,
        api::ServerState::Running => ServerState::Running,
        api::ServerState::Stopping => ServerState::Stopping,
        api::ServerState::Stopped | api::ServerState::StoppedInPlace => ServerState::Stopped,
        api::ServerState::Locked => bail!(
            "server {} ({}) is locked by Scaleway{}: nothing can be done with it until \
             Scaleway unlocks it (see the console or ask their support)",
            server.name,
            server.id,
            server
                .state_detail
                .as_deref()
                .filter(|d| !d.is_empty())
                .map(|d| format!(" ({d})"))
                .unwrap_or_default()
        ),
        api::ServerState::Other(state) => bail!(
            "server {} ({}) is in state {state:?}, which imgforge does not know",
            server.name,
            server.id
        ),
    })
}

fn is_stopped(state: &api::ServerState) -> bool {
    matches!(
        state,
        api::ServerState::Stopped | api::ServerState::StoppedInPlace
    )
}

/// Tags the provider manages itself, hidden from [`Server::tags`].
fn is_internal_tag(tag: &str) -> bool {
    tag == MARKER_TAG || tag.starts_with(EXPOSED_PORTS_TAG)
}

fn build_tags(tags: &[String]) -> Vec<String> {
    tags.iter()
        .filter(|t| t.starts_with(BUILD_TAG_PREFIX))
        .cloned()
        .collect()
}

/// The exposed ports recorded in a server's tags.
fn exposed_ports(tags: &[String]) -> Vec<u16> {
    tags.iter()
        .filter_map(|t| t.strip_prefix(EXPOSED_PORTS_TAG))
        .flat_map(|ports| ports.split(','))
        .filter_map(|port| port.trim().parse().ok())
        .collect()
}

/// The caller's tags plus the provider's own ones.
fn server_tags(tags: &[String], exposed: &[u16]) -> Vec<String> {
    let mut all = vec![MARKER_TAG.to_string()];
    all.extend(tags.iter().filter(|t| !is_internal_tag(t)).cloned());
    if !exposed.is_empty() {
        let ports: Vec<String> = exposed.iter().map(u16::to_string).collect();
        all.push(format!("{EXPOSED_PORTS_TAG}{}", ports.join(",")));
    }
    all
}

fn to_server(server: &api::Server) -> Result<Server> {
    let state = server_state(server)?;
    let mut volumes: Vec<(u32, String)> = server
        .volumes
        .iter()
        .filter(|(_, v)| !v.id.is_empty())
        .filter_map(|(index, v)| Some((index.parse().ok()?, v.id.clone())))
        .collect();
    volumes.sort();
    let address: Option<IpAddr> = server.public_address().and_then(|a| a.parse().ok());
    let endpoints = match address {
        Some(ip) => exposed_ports(&server.tags)
            .into_iter()
            .map(|port| (port, SocketAddr::new(ip, port)))
            .collect(),
        None => BTreeMap::new(),
    };
    let boot = match server.boot_type.as_deref() {
        Some("bootscript") => Boot::Bootscript(String::new()),
        _ => Boot::Local,
    };
    Ok(Server {
        id: server.id.clone(),
        name: server.name.clone(),
        state,
        state_detail: server.state_detail.clone().unwrap_or_default(),
        tags: server
            .tags
            .iter()
            .filter(|t| !is_internal_tag(t))
            .cloned()
            .collect(),
        boot,
        volumes: volumes.into_iter().map(|(_, id)| id).collect(),
        endpoints,
        arch: server.arch.clone().unwrap_or_default(),
        created_at: server.creation_date.clone().unwrap_or_default(),
    })
}

fn to_volume(volume: api::Volume) -> Volume {
    Volume {
        id: volume.id,
        name: volume.name,
        size: volume.size.unwrap_or(0),
        server: volume.server.map(|s| s.id).filter(|id| !id.is_empty()),
        created_at: volume.creation_date.unwrap_or_default(),
    }
}

fn block_to_volume(volume: BlockVolume) -> Volume {
    Volume {
        server: volume.server().map(str::to_string),
        id: volume.id,
        name: volume.name,
        size: volume.size,
        created_at: volume.created_at.unwrap_or_default(),
    }
}

fn block_to_snapshot(snapshot: BlockSnapshot) -> Snapshot {
    Snapshot {
        id: snapshot.id,
        name: snapshot.name,
        size: snapshot.size,
        base_volume: snapshot.parent_volume.map(|v| v.id).unwrap_or_default(),
        created_at: snapshot.created_at.unwrap_or_default(),
    }
}

fn any_to_snapshot(snapshot: AnySnapshot) -> Snapshot {
    match snapshot {
        AnySnapshot::Instance(s) => to_snapshot(s),
        AnySnapshot::Block(s) => block_to_snapshot(s),
    }
}

fn to_snapshot(snapshot: api::Snapshot) -> Snapshot {
    Snapshot {
        id: snapshot.id,
        name: snapshot.name,
        size: snapshot.size.unwrap_or(0),
        base_volume: snapshot.base_volume.map(|v| v.id).unwrap_or_default(),
        created_at: snapshot.creation_date.unwrap_or_default(),
    }
}

fn to_image(image: api::Image) -> Image {
    Image {
        id: image.id,
        name: image.name,
        arch: image.arch.unwrap_or_default(),
        root_volume: image.root_volume.map(|v| v.id).unwrap_or_default(),
        created_at: image.creation_date.unwrap_or_default(),
    }
}

/// `name-` and 8 random hex digits: unique names let the client recognise
/// a creation whose reply was lost.
fn unique_name(name: &str) -> String {
    let mut bytes = [0u8; 4];
    if getrandom::fill(&mut bytes).is_err() {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .subsec_nanos();
        bytes = nanos.to_le_bytes();
    }
    format!("{name}-{}", hex::encode(bytes))
}

/// Whether the API's refusal is about the bootscript boot.
fn is_bootscript_refusal(error: &client::Error) -> bool {
    let Some(api) = error.api_error() else {
        return false;
    };
    if !(400..500).contains(&api.status) {
        return false;
    }
    let text = format!(
        "{} {} {}",
        api.message,
        api.details
            .as_ref()
            .map(|d| d.to_string())
            .unwrap_or_default(),
        api.fields
            .as_ref()
            .map(|d| d.to_string())
            .unwrap_or_default(),
    );
    text.contains("bootscript") || text.contains("boot_type")
}

/// Loopback, or a wildcard listening address (0.0.0.0) that is nobody's
/// address to connect to.
fn is_loopback_host(url: &url::Url) -> bool {
    match url.host() {
        Some(url::Host::Ipv4(ip)) => ip.is_loopback() || ip.is_unspecified(),
        Some(url::Host::Ipv6(ip)) => ip.is_loopback() || ip.is_unspecified(),
        Some(url::Host::Domain(d)) => d == "localhost" || d.ends_with(".localhost"),
        None => false,
    }
}

#[async_trait::async_trait]
impl Provider for ScalewayProvider {
    fn name(&self) -> &'static str {
        "scaleway"
    }

    /// Servers start from stock images with cloud-init user data (Scaleway
    /// removed bootscripts) and reach this machine over the internet only;
    /// images can come in as QCOW2 through Object Storage.
    fn capabilities(&self) -> Capabilities {
        Capabilities {
            local_bootscripts: false,
            helper_servers: true,
            forwards_to_host: false,
            imports_qcow2: true,
        }
    }

    async fn create_server(&self, spec: &ServerSpec) -> Result<Server> {
        if spec.name.trim().is_empty() {
            bail!("a server needs a name");
        }
        if spec.volumes.is_empty() {
            bail!("a server needs at least one volume");
        }
        if let Some(service) = spec.host_services.iter().find(|s| s.ip().is_loopback()) {
            bail!(
                "a Scaleway server cannot reach {service} on this machine's loopback: serve \
                 artifacts on a public address (--listen) and pass --public-url"
            );
        }
        let bootscript = match &spec.boot {
            Some(Boot::Bootscript(id)) => Some(id.clone()),
            Some(Boot::Local) | None => None,
        };
        if !spec.ssh_public_keys.is_empty() {
            bail!(
                "Scaleway gives servers the SSH keys of the project (IAM), not keys of one \
                 server: add the key with `scw iam ssh-key create public-key=\"$(cat KEY.pub)\"` \
                 and create the server without --ssh-key"
            );
        }
        if bootscript.is_some() && spec.cloud_init.is_some() {
            bail!("cloud-init runs in a stock image, not in a bootscript's initrd");
        }
        let blank_type = route::blank_volume_type(bootscript.is_some(), self.options.volume_type);
        // A copy of a snapshot stays in its snapshot's API.
        let mut types = Vec::with_capacity(spec.volumes.len());
        for volume in &spec.volumes {
            types.push(match volume {
                VolumeSpec::Blank { .. } => blank_type,
                VolumeSpec::FromSnapshot { snapshot, .. } => {
                    VolumeType::of_snapshot(self.find_any_snapshot(snapshot).await?.family())
                }
            });
        }
        let server_name = unique_name(&spec.name);
        let volumes = spec
            .volumes
            .iter()
            .zip(&types)
            .enumerate()
            .map(|(index, (volume, volume_type))| {
                // Named after the server, so that a cleanup finds them
                // once they are detached.
                let name = Some(format!("{server_name}-vol{index}"));
                let volume_type = Some(volume_type.as_str().to_string());
                let template = match volume {
                    VolumeSpec::Blank { size } => VolumeTemplate {
                        name,
                        size: Some(*size),
                        volume_type,
                        ..VolumeTemplate::default()
                    },
                    VolumeSpec::FromSnapshot { snapshot, size } => VolumeTemplate {
                        name,
                        size: *size,
                        base_snapshot: Some(snapshot.clone()),
                        volume_type,
                        ..VolumeTemplate::default()
                    },
                };
                (index.to_string(), template)
            })
            .collect();
        // A stock image resolved for the root volume's type; a bootscript
        // boots its own kernel and initrd and volume 0 is blank.
        let image = match bootscript {
            Some(_) => None,
            None => Some(self.resolve_image(types[0]).await?),
        };
        let request = CreateServerRequest {
            name: server_name,
            commercial_type: self.options.commercial_type.clone(),
            project: None,
            image,
            bootscript: bootscript.clone(),
            volumes,
            boot_type: Some(
                if bootscript.is_some() {
                    "bootscript"
                } else {
                    "local"
                }
                .to_string(),
            ),
            tags: server_tags(&spec.tags, &spec.exposed_ports),
            dynamic_ip_required: Some(true),
        };
        let created = match self.client.create_server(&request).await {
            Ok(server) => server,
            Err(e) if bootscript.is_some() && is_bootscript_refusal(&e) => {
                return Err(anyhow::Error::new(e).context(format!(
                    "Scaleway refused to create server {} booting bootscript {:?}: bootscripts \
                     were removed from Scaleway on 2023-05-15; use `--strategy helper` (a server \
                     from a stock image that writes the image to a second volume) instead",
                    request.name,
                    bootscript.unwrap_or_default()
                )))
            }
            Err(e) => {
                return Err(anyhow::Error::new(e).context(format!(
                    "create server {} ({})",
                    request.name, request.commercial_type
                )))
            }
        };
        info!(id = %created.id, name = %created.name, "created server");
        if let Some(script) = &spec.cloud_init {
            if let Err(e) = self.set_user_data(&created.id, "cloud-init", script).await {
                // The caller never learns the server's id: remove it here.
                if let Err(cleanup) = self.delete_server(&created.id, true).await {
                    warn!(
                        "could not remove server {} after the failure: {cleanup:#}",
                        created.id
                    );
                }
                return Err(e);
            }
        }
        to_server(&created)
    }

    async fn get_server(&self, id: &str) -> Result<Server> {
        to_server(&self.read_server(id).await?)
    }

    async fn list_servers(&self) -> Result<Vec<Server>> {
        let servers = self
            .client
            .list_servers_by_tags(&[MARKER_TAG.to_string()])
            .await
            .context("list servers")?;
        let mut listed = Vec::with_capacity(servers.len());
        for server in &servers {
            match to_server(server) {
                Ok(server) => listed.push(server),
                Err(e) => warn!("not listed: {e:#}"),
            }
        }
        listed.sort_by(|a, b| a.created_at.cmp(&b.created_at).then(a.id.cmp(&b.id)));
        Ok(listed)
    }

    async fn start_server(&self, id: &str) -> Result<Server> {
        let mut server = self.read_server(id).await?;
        if server.state == api::ServerState::Stopping {
            server = self
                .wait_for(
                    id,
                    &[api::ServerState::Stopped, api::ServerState::StoppedInPlace],
                )
                .await?;
        }
        if is_stopped(&server.state) {
            self.client
                .server_action(id, ServerAction::PowerOn)
                .await
                .with_context(|| format!("power on server {id}"))?;
        }
        let server = self
            .wait_for(id, &[api::ServerState::Running])
            .await
            .with_context(|| format!("start server {id}"))?;
        to_server(&server)
    }

    async fn stop_server(&self, id: &str) -> Result<Server> {
        let mut server = self.read_server(id).await?;
        if is_stopped(&server.state) {
            return to_server(&server);
        }
        if server.state == api::ServerState::Starting {
            server = self.wait_for(id, &[api::ServerState::Running]).await?;
        }
        if server.state == api::ServerState::Running {
            self.client
                .server_action(id, ServerAction::PowerOff)
                .await
                .with_context(|| format!("power off server {id}"))?;
        }
        let server = self
            .wait_for(
                id,
                &[api::ServerState::Stopped, api::ServerState::StoppedInPlace],
            )
            .await
            .with_context(|| format!("stop server {id}"))?;
        to_server(&server)
    }

    async fn delete_server(&self, id: &str, with_volumes: bool) -> Result<()> {
        let server = self.read_server(id).await?;
        if !is_stopped(&server.state) {
            bail!(
                "server {} ({id}) is {}: stop it first (imgforge server stop {id})",
                server.name,
                server.state
            );
        }
        // Each volume with its API, from its `volume_type`.
        let mut volumes: Vec<(u32, String, Option<Family>)> = server
            .volumes
            .iter()
            .filter(|(_, v)| !v.id.is_empty())
            .filter_map(|(index, v)| {
                let family = Family::of_type(v.volume_type.as_deref());
                Some((index.parse().ok()?, v.id.clone(), family))
            })
            .collect();
        volumes.sort_by_key(|(index, _, _)| *index);
        self.client
            .delete_server(id)
            .await
            .with_context(|| format!("delete server {id}"))?;
        if with_volumes {
            for (_, volume, family) in &volumes {
                let deleted = match family {
                    Some(family) => self.delete_volume_in(volume, *family).await,
                    None => self.delete_volume(volume).await,
                };
                deleted
                    .with_context(|| format!("delete volume {volume} of deleted server {id}"))?;
            }
        }
        Ok(())
    }

    async fn set_server_tags(&self, id: &str, tags: &[String]) -> Result<Server> {
        let server = self.read_server(id).await?;
        let tags = server_tags(tags, &exposed_ports(&server.tags));
        let server = self
            .client
            .set_server_tags(id, &tags)
            .await
            .with_context(|| format!("set the tags of server {id}"))?;
        to_server(&server)
    }

    async fn console_tail(&self, _id: &str, _lines: usize) -> Result<Option<String>> {
        // The Instance API has no serial console log.
        Ok(None)
    }

    async fn get_volume(&self, id: &str) -> Result<Volume> {
        match self.locate_volume(id).await? {
            Some(AnyVolume::Instance(volume)) => Ok(to_volume(volume)),
            Some(AnyVolume::Block(volume)) => Ok(block_to_volume(volume)),
            None => bail!("no volume {id}: neither the Instance nor the Block API has it"),
        }
    }

    /// The Instance API's volumes and the Block API's.
    async fn list_volumes(&self) -> Result<Vec<Volume>> {
        let volumes: Vec<api::Volume> = self.list_in_project("volumes").await?;
        let mut volumes: Vec<Volume> = volumes.into_iter().map(to_volume).collect();
        let block = self
            .client
            .list_block_volumes()
            .await
            .context("list Block volumes")?;
        volumes.extend(block.into_iter().map(block_to_volume));
        volumes.sort_by(|a, b| a.created_at.cmp(&b.created_at).then(a.id.cmp(&b.id)));
        Ok(volumes)
    }

    /// Deletes the volume in the API that has it; gone from both is done.
    async fn delete_volume(&self, id: &str) -> Result<()> {
        let family = match self.locate_volume(id).await? {
            Some(AnyVolume::Instance(_)) => Family::Instance,
            Some(AnyVolume::Block(_)) => Family::Block,
            None => {
                info!(%id, "volume already gone (neither the Instance nor the Block API has it)");
                return Ok(());
            }
        };
        self.delete_volume_in(id, family).await
    }

    /// A snapshot in the volume's API: Instance for `l_ssd`, Block (POST
    /// /block/…/snapshots, wait `available`) for `sbs_volume`. It takes the
    /// build tags of the volume's server.
    async fn create_snapshot(&self, volume: &str, name: &str) -> Result<Snapshot> {
        if name.trim().is_empty() {
            bail!("a snapshot needs a name");
        }
        let located = self.locate_volume(volume).await?.with_context(|| {
            format!("no volume {volume}: neither the Instance nor the Block API has it")
        })?;
        let mut tags = vec![MARKER_TAG.to_string()];
        match located {
            AnyVolume::Instance(found) => {
                let server = found.server.as_ref().map(|s| s.id.as_str());
                tags.extend(self.build_tags_of_server(server, volume).await?);
                let request = CreateSnapshotRequest {
                    name: unique_name(name),
                    volume_id: volume.to_string(),
                    project: None,
                    tags,
                    volume_type: None,
                };
                let snapshot = self
                    .client
                    .create_snapshot(&request)
                    .await
                    .with_context(|| format!("snapshot volume {volume}"))?;
                let snapshot = self
                    .client
                    .wait_for_snapshot_available(&snapshot.id, self.options.snapshot_timeout)
                    .await
                    .with_context(|| format!("snapshot volume {volume}"))?;
                Ok(to_snapshot(snapshot))
            }
            AnyVolume::Block(found) => {
                tags.extend(self.build_tags_of_server(found.server(), volume).await?);
                let request = CreateBlockSnapshotRequest {
                    volume_id: volume.to_string(),
                    name: unique_name(name),
                    project_id: self.client.project_id().to_string(),
                    tags,
                };
                let snapshot = self
                    .client
                    .create_block_snapshot(&request)
                    .await
                    .with_context(|| format!("snapshot Block volume {volume}"))?;
                let snapshot = self
                    .client
                    .wait_for_block_snapshot_available(
                        &snapshot.id,
                        self.options.snapshot_timeout,
                        &|_| {},
                    )
                    .await
                    .with_context(|| format!("snapshot Block volume {volume}"))?;
                Ok(block_to_snapshot(snapshot))
            }
        }
    }

    async fn get_snapshot(&self, id: &str) -> Result<Snapshot> {
        Ok(any_to_snapshot(self.find_any_snapshot(id).await?))
    }

    /// The Instance API's snapshots and the Block API's.
    async fn list_snapshots(&self) -> Result<Vec<Snapshot>> {
        let snapshots: Vec<api::Snapshot> = self.list_in_project("snapshots").await?;
        let mut snapshots: Vec<Snapshot> = snapshots.into_iter().map(to_snapshot).collect();
        let block = self
            .client
            .list_block_snapshots(None)
            .await
            .context("list Block snapshots")?;
        snapshots.extend(block.into_iter().map(block_to_snapshot));
        snapshots.sort_by(|a, b| a.created_at.cmp(&b.created_at).then(a.id.cmp(&b.id)));
        Ok(snapshots)
    }

    /// Deletes the snapshot in the API that has it; gone from both is done.
    async fn delete_snapshot(&self, id: &str) -> Result<()> {
        match self.locate_snapshot(id).await? {
            Some(AnySnapshot::Instance(_)) => match self.client.delete_snapshot(id).await {
                Ok(()) => Ok(()),
                Err(e) if e.is_not_found() => Ok(()),
                Err(e) => Err(e).with_context(|| format!("delete snapshot {id}")),
            },
            Some(AnySnapshot::Block(_)) => {
                push::delete_block_snapshot_when_settled(
                    &self.client,
                    id,
                    self.options.snapshot_timeout,
                )
                .await
            }
            None => {
                info!(%id, "snapshot already gone (neither the Instance nor the Block API has it)");
                Ok(())
            }
        }
    }

    /// An image of an Instance or a Block snapshot (`root_volume` takes
    /// either id), with the snapshot's build tags.
    async fn create_image(&self, name: &str, snapshot: &str, arch: &str) -> Result<Image> {
        if name.trim().is_empty() {
            bail!("an image needs a name");
        }
        let source = self.find_any_snapshot(snapshot).await?;
        let mut tags = vec![MARKER_TAG.to_string()];
        tags.extend(build_tags(source.tags()));
        let request = CreateImageRequest {
            name: name.to_string(),
            root_volume: snapshot.to_string(),
            arch: arch.to_string(),
            project: None,
            tags,
            public: None,
        };
        let image = self
            .client
            .create_image(&request)
            .await
            .with_context(|| format!("create image {name} from snapshot {snapshot}"))?;
        let image = self
            .client
            .wait_for_image_available(&image.id, self.options.image_timeout)
            .await
            .with_context(|| format!("create image {name}"))?;
        Ok(to_image(image))
    }

    async fn get_image(&self, id: &str) -> Result<Image> {
        let image = self
            .client
            .get_image(id)
            .await
            .with_context(|| format!("get image {id}"))?;
        Ok(to_image(image))
    }

    async fn list_images(&self) -> Result<Vec<Image>> {
        let images: Vec<api::Image> = self.list_in_project("images").await?;
        let mut images: Vec<Image> = images.into_iter().map(to_image).collect();
        images.sort_by(|a, b| a.created_at.cmp(&b.created_at).then(a.id.cmp(&b.id)));
        Ok(images)
    }

    async fn delete_image(&self, id: &str) -> Result<()> {
        self.client
            .delete_image(id)
            .await
            .with_context(|| format!("delete image {id}"))
    }

    fn guest_url(&self, url: &str) -> Result<String> {
        let parsed = url::Url::parse(url).with_context(|| format!("URL {url:?}"))?;
        if parsed.host().is_none() {
            return Err(anyhow!(
                "{url}: a Scaleway server needs an http(s) URL with a host"
            ));
        }
        if is_loopback_host(&parsed) {
            bail!(
                "{url} is on this machine's loopback, which a Scaleway server cannot reach \
                 (it comes in over the internet): serve artifacts on a public address and pass \
                 --public-url (the artifact server's public base URL)"
            );
        }
        Ok(url.to_string())
    }

    /// Servers with a build tag (stopped, then deleted with their volumes),
    /// detached volumes named after a build server, and snapshots with a
    /// build tag that no image uses.
    async fn cleanup_builds(&self, build: Option<&str>, dry_run: bool) -> Result<Vec<String>> {
        let wanted = |tags: &[String]| {
            super::build_id_of(tags).is_some_and(|id| build.is_none_or(|b| b == id))
        };
        let mut removed = Vec::new();
        for server in self.list_servers().await? {
            if !wanted(&server.tags) {
                continue;
            }
            removed.push(format!(
                "server {} ({}) with its volumes",
                server.name, server.id
            ));
            if !dry_run {
                self.stop_server(&server.id).await?;
                self.delete_server(&server.id, true).await?;
            }
        }
        // Volumes a build server left when it was deleted without them.
        let prefix = match build {
            Some(id) => format!("{BUILD_SERVER_PREFIX}{id}-"),
            None => BUILD_SERVER_PREFIX.to_string(),
        };
        for volume in self.list_volumes().await? {
            if volume.server.is_some() || !volume.name.starts_with(&prefix) {
                continue;
            }
            removed.push(format!("volume {} ({})", volume.name, volume.id));
            if !dry_run {
                self.delete_volume(&volume.id).await?;
            }
        }
        let images: Vec<api::Image> = self.list_in_project("images").await?;
        let used: Vec<String> = images
            .iter()
            .filter_map(|image| image.root_volume.as_ref().map(|v| v.id.clone()))
            .collect();
        let snapshots: Vec<api::Snapshot> = self.list_in_project("snapshots").await?;
        for snapshot in snapshots {
            if !wanted(&snapshot.tags) || used.contains(&snapshot.id) {
                continue;
            }
            removed.push(format!("snapshot {} ({})", snapshot.name, snapshot.id));
            if !dry_run {
                self.delete_snapshot(&snapshot.id).await?;
            }
        }
        // What a killed push left: Block snapshots of an import that never
        // became an image, multipart uploads, objects of builds without an
        // image (a kept object, --keep-object, belongs to a build that has
        // its image and stays).
        for snapshot in self.client.list_block_snapshots(None).await? {
            if !wanted(&snapshot.tags) || used.contains(&snapshot.id) {
                continue;
            }
            removed.push(format!(
                "Block snapshot {} ({})",
                snapshot.name, snapshot.id
            ));
            if !dry_run {
                push::delete_block_snapshot_when_settled(
                    &self.client,
                    &snapshot.id,
                    Duration::from_secs(600),
                )
                .await?;
            }
        }
        if let Some(store) = &self.object_storage {
            // The API's leftovers are gone by now: an Object Storage that
            // cannot be read (no permission, another region) is a warning
            // with its cause, not a failure of the whole cleanup.
            match self.cleanup_objects(store, build, &images, dry_run).await {
                Ok(lines) => removed.extend(lines),
                Err(e) => warn!("Object Storage not cleaned up: {e:#}"),
            }
        }
        Ok(removed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn internal_tags_are_added_and_hidden() {
        let tags = server_tags(&["a=b".into(), "imgforge".into()], &[22, 8080]);
        assert_eq!(tags, ["imgforge", "a=b", "imgforge-exposed-ports=22,8080"]);
        assert_eq!(exposed_ports(&tags), [22, 8080]);
        assert!(tags
            .iter()
            .filter(|t| !is_internal_tag(t))
            .eq(["a=b"].iter()));
    }

    #[test]
    fn build_tags_are_picked() {
        let tags = ["x=1".to_string(), "imgforge-build=42".to_string()];
        assert_eq!(build_tags(&tags), ["imgforge-build=42"]);
    }

    #[test]
    fn unique_names_differ() {
        let (a, b) = (unique_name("srv"), unique_name("srv"));
        assert!(a.starts_with("srv-") && a.len() == "srv-".len() + 8, "{a}");
        assert_ne!(a, b);
    }

    /// A provider whose API is a closed port: nothing here sends a request.
    fn offline_provider() -> ScalewayProvider {
        let config = Config {
            access_key: None,
            secret_key: SecretKey::new("x"),
            default_project_id: "p".into(),
            default_zone: "fr-par-1".into(),
            default_region: "fr-par".into(),
            api_url: "http://127.0.0.1:9".into(),
            profile: None,
            config_path: None,
        };
        ScalewayProvider::from_config(&config, ScalewayOptions::default()).unwrap()
    }

    #[test]
    fn capabilities_helper_servers_and_imports() {
        assert_eq!(
            offline_provider().capabilities(),
            Capabilities {
                local_bootscripts: false,
                helper_servers: true,
                forwards_to_host: false,
                imports_qcow2: true,
            }
        );
    }

    #[test]
    fn guest_urls_must_be_public() {
        let provider = offline_provider();
        let public = "http://203.0.113.7:8080/a/rootfs.tar";
        assert_eq!(provider.guest_url(public).unwrap(), public);
        for url in [
            "http://127.0.0.1:8080/x",
            "http://localhost/x",
            "http://[::1]:1/x",
        ] {
            let err = provider.guest_url(url).unwrap_err().to_string();
            assert!(err.contains("--public-url"), "{err}");
        }
    }
}
