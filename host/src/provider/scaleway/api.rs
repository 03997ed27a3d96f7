//! Typed Instance API v1 calls for the Scaleway provider: servers (create,
//! get, list by tags, tags, actions, delete, user data), volumes, snapshots
//! and images, plus waiters that poll a resource until it reaches a state.
//!
//! Responses deserialize leniently: unknown fields are ignored, fields the API
//! may omit or send as `null` are `Option`s or default to empty, and states
//! the API may add later land in an `Other` variant instead of failing.
//!
//! Creations go through [`Client::post_checked`]: after an unknown outcome
//! they look for the resource by the name that was sent, so **names of
//! created resources must be unique in the project** (the provider puts a
//! random suffix in them).

use std::collections::BTreeMap;
use std::fmt;
use std::time::{Duration, Instant};

use serde::de::IgnoredAny;
use serde::{Deserialize, Deserializer, Serialize};
use tracing::debug;

use super::client::{Client, Error};

/// `null` → `T::default()`, for lists and maps the API may send as `null`.
fn null_as_default<'de, D, T>(deserializer: D) -> Result<T, D::Error>
where
    D: Deserializer<'de>,
    T: Deserialize<'de> + Default,
{
    Ok(Option::<T>::deserialize(deserializer)?.unwrap_or_default())
}

macro_rules! string_enum {
    ($(#[$meta:meta])* $name:ident { $($variant:ident => $text:literal),* $(,)? }) => {
        $(#[$meta])*
        #[derive(Clone, Debug, PartialEq, Eq, Hash, Deserialize)]
        #[serde(from = "String")]
        pub enum $name {
            $($variant,)*
            /// A state this client does not know yet.
            Other(String),
        }

        impl $name {
            /// The API's spelling.
            pub fn as_str(&self) -> &str {
                match self {
                    $($name::$variant => $text,)*
                    $name::Other(text) => text,
                }
            }
        }

        impl From<String> for $name {
            fn from(text: String) -> Self {
                match text.as_str() {
                    $($text => $name::$variant,)*
                    _ => $name::Other(text),
                }
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.as_str())
            }
        }
    };
}

string_enum!(
    /// `server.state`.
    ServerState {
        Starting => "starting",
        Running => "running",
        Stopping => "stopping",
        Stopped => "stopped",
        StoppedInPlace => "stopped in place",
        Locked => "locked",
    }
);

string_enum!(
    /// `snapshot.state`.
    SnapshotState {
        Available => "available",
        Snapshotting => "snapshotting",
        Error => "error",
        InvalidData => "invalid_data",
        Importing => "importing",
        Exporting => "exporting",
    }
);

string_enum!(
    /// `image.state`.
    ImageState {
        Available => "available",
        Creating => "creating",
        Error => "error",
    }
);

/// `{id, name}` references inside other objects.
#[derive(Clone, Debug, Default, Deserialize)]
pub struct ResourceRef {
    #[serde(default)]
    pub id: String,
    pub name: Option<String>,
}

/// A public IP as found in `server.public_ip` and `server.public_ips[]`.
#[derive(Clone, Debug, Default, Deserialize)]
pub struct PublicIp {
    pub id: Option<String>,
    pub address: Option<String>,
    pub family: Option<String>,
    pub dynamic: Option<bool>,
}

/// A volume as listed in `server.volumes`.
#[derive(Clone, Debug, Default, Deserialize)]
pub struct ServerVolume {
    #[serde(default)]
    pub id: String,
    pub name: Option<String>,
    /// Bytes.
    pub size: Option<u64>,
    pub volume_type: Option<String>,
    pub state: Option<String>,
    pub boot: Option<bool>,
}

/// The server object.
#[derive(Clone, Debug, Deserialize)]
pub struct Server {
    pub id: String,
    #[serde(default)]
    pub name: String,
    pub hostname: Option<String>,
    pub project: Option<String>,
    pub commercial_type: Option<String>,
    pub arch: Option<String>,
    pub state: ServerState,
    pub state_detail: Option<String>,
    pub boot_type: Option<String>,
    #[serde(default, deserialize_with = "null_as_default")]
    pub tags: Vec<String>,
    #[serde(default, deserialize_with = "null_as_default")]
    pub allowed_actions: Vec<String>,
    /// Keyed `"0"`, `"1"`, …; `"0"` is the root volume.
    #[serde(default, deserialize_with = "null_as_default")]
    pub volumes: BTreeMap<String, ServerVolume>,
    /// Deprecated by the API but still sent.
    pub public_ip: Option<PublicIp>,
    #[serde(default, deserialize_with = "null_as_default")]
    pub public_ips: Vec<PublicIp>,
    pub private_ip: Option<String>,
    pub image: Option<ResourceRef>,
    pub zone: Option<String>,
    pub creation_date: Option<String>,
    pub modification_date: Option<String>,
}

impl Server {
    /// `volumes["0"].id`.
    pub fn root_volume_id(&self) -> Option<&str> {
        self.volume_id(0)
    }

    /// `volumes["{index}"].id`.
    pub fn volume_id(&self, index: u32) -> Option<&str> {
        self.volumes
            .get(&index.to_string())
            .map(|v| v.id.as_str())
            .filter(|id| !id.is_empty())
    }

    /// The first public address: `public_ip.address`, else `public_ips[]`.
    pub fn public_address(&self) -> Option<&str> {
        self.public_ip
            .iter()
            .chain(self.public_ips.iter())
            .find_map(|ip| ip.address.as_deref())
    }
}

#[derive(Deserialize)]
struct ServerEnvelope {
    server: Server,
}

/// A volume of a new server (`volumes["N"]` in POST /servers).
#[derive(Clone, Debug, Default, Serialize)]
pub struct VolumeTemplate {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Bytes (SI: 10 GB = 10_000_000_000).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub size: Option<u64>,
    /// `l_ssd`, `sbs_volume`, `scratch`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub volume_type: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub base_snapshot: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub boot: Option<bool>,
}

/// POST /servers. `project` defaults to the client's project.
#[derive(Clone, Debug, Default, Serialize)]
pub struct CreateServerRequest {
    /// Must be unique in the project (see the module docs).
    pub name: String,
    pub commercial_type: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub project: Option<String>,
    /// An image id or a marketplace label.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub volumes: BTreeMap<String, VolumeTemplate>,
    /// `local` (default), `rescue`, `bootscript` (gone).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub boot_type: Option<String>,
    /// The bootscript id, with `boot_type: bootscript` (a field the API
    /// dropped with bootscripts).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bootscript: Option<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub tags: Vec<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dynamic_ip_required: Option<bool>,
}

/// Server actions (POST /servers/{id}/action).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ServerAction {
    PowerOn,
    PowerOff,
    StopInPlace,
    Reboot,
    Terminate,
}

impl ServerAction {
    pub fn as_str(self) -> &'static str {
        match self {
            ServerAction::PowerOn => "poweron",
            ServerAction::PowerOff => "poweroff",
            ServerAction::StopInPlace => "stop_in_place",
            ServerAction::Reboot => "reboot",
            ServerAction::Terminate => "terminate",
        }
    }

    /// Whether `state` shows that this action was accepted; `None` when no
    /// state tells (reboot).
    fn took_effect(self, state: &ServerState) -> Option<bool> {
        use ServerState::*;
        Some(match self {
            ServerAction::PowerOn => matches!(state, Starting | Running),
            ServerAction::PowerOff => matches!(state, Stopping | Stopped),
            ServerAction::StopInPlace => matches!(state, Stopping | StoppedInPlace),
            ServerAction::Terminate => matches!(state, Stopping),
            ServerAction::Reboot => return None,
        })
    }
}

impl fmt::Display for ServerAction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The volume object.
#[derive(Clone, Debug, Deserialize)]
pub struct Volume {
    pub id: String,
    #[serde(default)]
    pub name: String,
    pub size: Option<u64>,
    pub volume_type: Option<String>,
    pub state: Option<String>,
    pub server: Option<ResourceRef>,
    #[serde(default, deserialize_with = "null_as_default")]
    pub tags: Vec<String>,
    pub zone: Option<String>,
    pub creation_date: Option<String>,
}

#[derive(Deserialize)]
struct VolumeEnvelope {
    volume: Volume,
}

/// POST /volumes. `project` defaults to the client's project.
#[derive(Clone, Debug, Default, Serialize)]
pub struct CreateVolumeRequest {
    /// Must be unique in the project (see the module docs).
    pub name: String,
    pub volume_type: String,
    /// Bytes.
    pub size: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub project: Option<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub tags: Vec<String>,
}

/// The snapshot object.
#[derive(Clone, Debug, Deserialize)]
pub struct Snapshot {
    pub id: String,
    #[serde(default)]
    pub name: String,
    pub state: SnapshotState,
    pub size: Option<u64>,
    pub volume_type: Option<String>,
    pub base_volume: Option<ResourceRef>,
    #[serde(default, deserialize_with = "null_as_default")]
    pub tags: Vec<String>,
    pub zone: Option<String>,
    pub error_reason: Option<String>,
    pub creation_date: Option<String>,
}

#[derive(Deserialize)]
struct SnapshotEnvelope {
    snapshot: Snapshot,
}

/// POST /snapshots from a volume. `project` defaults to the client's project.
#[derive(Clone, Debug, Default, Serialize)]
pub struct CreateSnapshotRequest {
    /// Must be unique in the project (see the module docs).
    pub name: String,
    pub volume_id: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub project: Option<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub tags: Vec<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub volume_type: Option<String>,
}

/// The image object.
#[derive(Clone, Debug, Deserialize)]
pub struct Image {
    pub id: String,
    #[serde(default)]
    pub name: String,
    pub arch: Option<String>,
    pub state: ImageState,
    pub root_volume: Option<ServerVolume>,
    pub from_server: Option<String>,
    pub public: Option<bool>,
    #[serde(default, deserialize_with = "null_as_default")]
    pub tags: Vec<String>,
    pub zone: Option<String>,
    pub creation_date: Option<String>,
}

#[derive(Deserialize)]
struct ImageEnvelope {
    image: Image,
}

/// POST /images from a snapshot. `project` defaults to the client's project.
#[derive(Clone, Debug, Default, Serialize)]
pub struct CreateImageRequest {
    /// Must be unique in the project (see the module docs).
    pub name: String,
    /// The snapshot id of the root volume.
    pub root_volume: String,
    /// `x86_64`, `arm`, `arm64`.
    pub arch: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub project: Option<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub tags: Vec<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub public: Option<bool>,
}

#[derive(Serialize)]
struct TagsPatch<'a> {
    tags: &'a [String],
}

#[derive(Serialize)]
struct ActionBody {
    action: &'static str,
}

#[derive(Deserialize)]
struct UserDataKeys {
    #[serde(default, deserialize_with = "null_as_default")]
    user_data: Vec<String>,
}

/// The one item of `items` named exactly `name`, if any; more than one is an
/// error, since the outcome check cannot then tell which one it created.
fn only_named<T>(
    items: Vec<T>,
    name: &str,
    kind: &str,
    name_of: impl Fn(&T) -> &str,
) -> Result<Option<T>, Error> {
    let mut matching: Vec<T> = items.into_iter().filter(|i| name_of(i) == name).collect();
    match matching.len() {
        0 => Ok(None),
        1 => Ok(matching.pop()),
        n => Err(Error::Ambiguous(format!(
            "{n} {kind}s are named {name:?}; cannot tell which one this request created"
        ))),
    }
}

impl Client {
    // ---- servers ----

    /// POST /servers, never creating two servers for one call.
    pub async fn create_server(&self, request: &CreateServerRequest) -> Result<Server, Error> {
        let mut request = request.clone();
        request
            .project
            .get_or_insert_with(|| self.project_id().to_string());
        let created: ServerEnvelope = self
            .post_checked("/servers", &request, || async {
                let found = self.find_server_by_name(&request.name).await?;
                Ok(found.map(|server| ServerEnvelope { server }))
            })
            .await?;
        Ok(created.server)
    }

    /// GET /servers/{id}.
    pub async fn get_server(&self, id: &str) -> Result<Server, Error> {
        let envelope: ServerEnvelope = self.get_json(&format!("/servers/{id}"), &[]).await?;
        Ok(envelope.server)
    }

    /// Every server of the project carrying all of `tags` (every server of
    /// the project when `tags` is empty).
    pub async fn list_servers_by_tags(&self, tags: &[String]) -> Result<Vec<Server>, Error> {
        let mut query = vec![("project", self.project_id().to_string())];
        if !tags.is_empty() {
            query.push(("tags", tags.join(",")));
        }
        self.list_all("/servers", &query, "servers").await
    }

    /// The server of the project named exactly `name`, if any.
    pub async fn find_server_by_name(&self, name: &str) -> Result<Option<Server>, Error> {
        let query = [
            ("project", self.project_id().to_string()),
            ("name", name.to_string()),
        ];
        let servers: Vec<Server> = self.list_all("/servers", &query, "servers").await?;
        only_named(servers, name, "server", |s| &s.name)
    }

    /// PATCH /servers/{id} `{tags}`: replaces the server's tags.
    pub async fn set_server_tags(&self, id: &str, tags: &[String]) -> Result<Server, Error> {
        let envelope: ServerEnvelope = self
            .patch_json(&format!("/servers/{id}"), &TagsPatch { tags })
            .await?;
        Ok(envelope.server)
    }

    /// POST /servers/{id}/action. Not sent twice blindly: after an unknown
    /// outcome the server's state tells whether it was accepted (for
    /// terminate, a vanished server counts too); a reboot, whose effect no
    /// state shows, is not sent again and the error is returned.
    pub async fn server_action(&self, id: &str, action: ServerAction) -> Result<(), Error> {
        let path = format!("/servers/{id}/action");
        let body = ActionBody {
            action: action.as_str(),
        };
        let _: IgnoredAny = self
            .post_checked(&path, &body, || async {
                let server = match self.get_server(id).await {
                    Ok(server) => server,
                    Err(e) if e.is_not_found() && action == ServerAction::Terminate => {
                        return Ok(Some(IgnoredAny))
                    }
                    Err(e) => return Err(e),
                };
                match action.took_effect(&server.state) {
                    Some(true) => Ok(Some(IgnoredAny)),
                    Some(false) => Ok(None),
                    None => Err(Error::OutcomeUnknown {
                        request: format!("POST {} {action}", self.zone_path(&path)),
                        source: Box::new(Error::Ambiguous(format!(
                            "server {id} is {}: no state shows whether {action} was accepted",
                            server.state
                        ))),
                    }),
                }
            })
            .await?;
        Ok(())
    }

    /// DELETE /servers/{id} (its volumes survive).
    pub async fn delete_server(&self, id: &str) -> Result<(), Error> {
        self.delete(&format!("/servers/{id}")).await
    }

    /// GET /servers/{id}/user_data: the keys set on the server.
    pub async fn list_user_data_keys(&self, id: &str) -> Result<Vec<String>, Error> {
        let keys: UserDataKeys = self
            .get_json(&format!("/servers/{id}/user_data"), &[])
            .await?;
        Ok(keys.user_data)
    }

    /// GET /servers/{id}/user_data/{key} (text/plain).
    pub async fn get_user_data(&self, id: &str, key: &str) -> Result<String, Error> {
        self.get_text(&format!("/servers/{id}/user_data/{key}"))
            .await
    }

    /// PATCH /servers/{id}/user_data/{key} with a text/plain value.
    pub async fn set_user_data(&self, id: &str, key: &str, value: &str) -> Result<(), Error> {
        self.patch_text(&format!("/servers/{id}/user_data/{key}"), value)
            .await
    }

    /// DELETE /servers/{id}/user_data/{key}.
    pub async fn delete_user_data(&self, id: &str, key: &str) -> Result<(), Error> {
        self.delete(&format!("/servers/{id}/user_data/{key}")).await
    }

    // ---- volumes ----

    /// POST /volumes, never creating two volumes for one call.
    pub async fn create_volume(&self, request: &CreateVolumeRequest) -> Result<Volume, Error> {
        let mut request = request.clone();
        request
            .project
            .get_or_insert_with(|| self.project_id().to_string());
        let created: VolumeEnvelope = self
            .post_checked("/volumes", &request, || async {
                let query = [
                    ("project", self.project_id().to_string()),
                    ("name", request.name.clone()),
                ];
                let volumes: Vec<Volume> = self.list_all("/volumes", &query, "volumes").await?;
                let found = only_named(volumes, &request.name, "volume", |v| &v.name)?;
                Ok(found.map(|volume| VolumeEnvelope { volume }))
            })
            .await?;
        Ok(created.volume)
    }

    /// GET /volumes/{id}.
    pub async fn get_volume(&self, id: &str) -> Result<Volume, Error> {
        let envelope: VolumeEnvelope = self.get_json(&format!("/volumes/{id}"), &[]).await?;
        Ok(envelope.volume)
    }

    /// DELETE /volumes/{id}.
    pub async fn delete_volume(&self, id: &str) -> Result<(), Error> {
        self.delete(&format!("/volumes/{id}")).await
    }

    // ---- snapshots ----

    /// POST /snapshots from a volume, never creating two snapshots for one call.
    pub async fn create_snapshot(
        &self,
        request: &CreateSnapshotRequest,
    ) -> Result<Snapshot, Error> {
        let mut request = request.clone();
        request
            .project
            .get_or_insert_with(|| self.project_id().to_string());
        let created: SnapshotEnvelope = self
            .post_checked("/snapshots", &request, || async {
                let found = self.find_snapshot_by_name(&request.name).await?;
                Ok(found.map(|snapshot| SnapshotEnvelope { snapshot }))
            })
            .await?;
        Ok(created.snapshot)
    }

    /// GET /snapshots/{id}.
    pub async fn get_snapshot(&self, id: &str) -> Result<Snapshot, Error> {
        let envelope: SnapshotEnvelope = self.get_json(&format!("/snapshots/{id}"), &[]).await?;
        Ok(envelope.snapshot)
    }

    /// The snapshot of the project named exactly `name`, if any.
    pub async fn find_snapshot_by_name(&self, name: &str) -> Result<Option<Snapshot>, Error> {
        let query = [
            ("project", self.project_id().to_string()),
            ("name", name.to_string()),
        ];
        let snapshots: Vec<Snapshot> = self.list_all("/snapshots", &query, "snapshots").await?;
        only_named(snapshots, name, "snapshot", |s| &s.name)
    }

    /// DELETE /snapshots/{id}.
    pub async fn delete_snapshot(&self, id: &str) -> Result<(), Error> {
        self.delete(&format!("/snapshots/{id}")).await
    }

    // ---- images ----

    /// POST /images from a snapshot, never creating two images for one call.
    pub async fn create_image(&self, request: &CreateImageRequest) -> Result<Image, Error> {
        let mut request = request.clone();
        request
            .project
            .get_or_insert_with(|| self.project_id().to_string());
        let created: ImageEnvelope = self
            .post_checked("/images", &request, || async {
                let images = self.list_images_by_name(&request.name).await?;
                let found = only_named(images, &request.name, "image", |i| &i.name)?;
                Ok(found.map(|image| ImageEnvelope { image }))
            })
            .await?;
        Ok(created.image)
    }

    /// GET /images/{id}.
    pub async fn get_image(&self, id: &str) -> Result<Image, Error> {
        let envelope: ImageEnvelope = self.get_json(&format!("/images/{id}"), &[]).await?;
        Ok(envelope.image)
    }

    /// The project's images whose name matches `name` (the API's filter; it
    /// may match more than the exact name).
    pub async fn list_images_by_name(&self, name: &str) -> Result<Vec<Image>, Error> {
        let query = [
            ("project", self.project_id().to_string()),
            ("name", name.to_string()),
        ];
        self.list_all("/images", &query, "images").await
    }

    /// DELETE /images/{id} (its snapshots stay).
    pub async fn delete_image(&self, id: &str) -> Result<(), Error> {
        self.delete(&format!("/images/{id}")).await
    }

    // ---- waiters ----

    /// Polls the server until its state is one of `wanted`. A `locked` server
    /// (when not wanted) is an error at once; so is the timeout.
    pub async fn wait_for_server_state(
        &self,
        id: &str,
        wanted: &[ServerState],
        timeout: Duration,
    ) -> Result<Server, Error> {
        let wanted_text = wanted
            .iter()
            .map(ServerState::as_str)
            .collect::<Vec<_>>()
            .join(" or ");
        self.poll_until(&format!("server {id}"), &wanted_text, timeout, || async {
            let server = self.get_server(id).await?;
            let state = server.state.clone();
            if wanted.contains(&state) {
                return Ok(Poll::Done(server));
            }
            if state == ServerState::Locked {
                let detail = server
                    .state_detail
                    .map(|d| format!(": {d}"))
                    .unwrap_or_default();
                return Ok(Poll::Failed(state.to_string(), detail));
            }
            Ok(Poll::Pending(state.to_string()))
        })
        .await
    }

    /// Polls the snapshot until `available`; `error` or `invalid_data` fail at
    /// once with the API's `error_reason`.
    pub async fn wait_for_snapshot_available(
        &self,
        id: &str,
        timeout: Duration,
    ) -> Result<Snapshot, Error> {
        self.poll_until(&format!("snapshot {id}"), "available", timeout, || async {
            let snapshot = self.get_snapshot(id).await?;
            Ok(match &snapshot.state {
                SnapshotState::Available => Poll::Done(snapshot),
                state @ (SnapshotState::Error | SnapshotState::InvalidData) => Poll::Failed(
                    state.to_string(),
                    snapshot
                        .error_reason
                        .map(|r| format!(": {r}"))
                        .unwrap_or_default(),
                ),
                state => Poll::Pending(state.to_string()),
            })
        })
        .await
    }

    /// Polls the image until `available`; `error` fails at once.
    pub async fn wait_for_image_available(
        &self,
        id: &str,
        timeout: Duration,
    ) -> Result<Image, Error> {
        self.poll_until(&format!("image {id}"), "available", timeout, || async {
            let image = self.get_image(id).await?;
            Ok(match &image.state {
                ImageState::Available => Poll::Done(image),
                ImageState::Error => Poll::Failed("error".to_string(), String::new()),
                state => Poll::Pending(state.to_string()),
            })
        })
        .await
    }

    pub(super) async fn poll_until<T, F, Fut>(
        &self,
        what: &str,
        wanted: &str,
        timeout: Duration,
        read: F,
    ) -> Result<T, Error>
    where
        F: Fn() -> Fut,
        Fut: std::future::Future<Output = Result<Poll<T>, Error>>,
    {
        let started = Instant::now();
        // Quick transitions (a small snapshot, a stop) end in a second or
        // two: poll soon, then back off to the configured interval.
        let mut pause = FIRST_POLL.min(self.options().poll_interval);
        loop {
            let last_state = match read().await? {
                Poll::Done(value) => return Ok(value),
                Poll::Failed(state, reason) => {
                    return Err(Error::BadState {
                        what: what.to_string(),
                        state,
                        wanted: wanted.to_string(),
                        reason,
                    })
                }
                Poll::Pending(state) => state,
            };
            let elapsed = started.elapsed();
            if elapsed >= timeout {
                return Err(Error::WaitTimeout {
                    what: what.to_string(),
                    wanted: wanted.to_string(),
                    last_state,
                    timeout,
                });
            }
            debug!(what, state = %last_state, wanted, "waiting");
            tokio::time::sleep(pause.min(timeout - elapsed)).await;
            pause = (pause * 2).min(self.options().poll_interval);
        }
    }
}

/// The first pause of a wait; it doubles up to `poll_interval`.
const FIRST_POLL: Duration = Duration::from_millis(250);

/// One read of a waited-on resource.
pub(super) enum Poll<T> {
    Done(T),
    /// Not there yet; the current state.
    Pending(String),
    /// A state it will not leave by itself; the state and `": reason"`.
    Failed(String, String),
}
