//! An in-process fake of Scaleway's Instance API v1 and of the parts of the
//! Block API v1 that an image push uses, for contract tests of the Scaleway
//! provider (this machine cannot reach Scaleway).
//!
//! # What it fakes
//!
//! The subset of `https://api.scaleway.com/instance/v1/zones/{zone}/…` that an
//! image build uses, following `reference/scaleway-api.md` §1 and §2–2.4:
//!
//! * servers: `POST /servers` (201 `{server}` + `Location`), `GET
//!   /servers/{id}`, `GET /servers?tags=a,b&name=&state=&project=&page=&per_page=`,
//!   `PATCH /servers/{id}` (`name`, `tags`, `boot_type`), `DELETE
//!   /servers/{id}` (204, volumes survive);
//! * actions: `GET /servers/{id}/action` (`{actions[]}`), `POST` the same with
//!   `{"action": poweron|poweroff|stop_in_place|reboot|terminate}` (202
//!   `{task}`);
//! * user data: `GET /servers/{id}/user_data` (`{user_data:[keys]}`),
//!   `GET|PATCH|DELETE /servers/{id}/user_data/{key}` (raw `text/plain`; 204);
//! * volumes: `GET /volumes`, `GET|DELETE /volumes/{id}`;
//! * snapshots: `POST /snapshots` `{name, volume_id, project}` (201
//!   `{snapshot, task}`), `GET /snapshots`, `GET|DELETE /snapshots/{id}`;
//! * images: `POST /images` `{name, root_volume, arch, project}` (201
//!   `{image}`), `GET /images?name=&arch=`, `GET|DELETE /images/{id}`.
//!
//! Every request needs `X-Auth-Token` (else 401 `denied_authentication`);
//! request bodies of `POST`/`PATCH` must be JSON with `Content-Type:
//! application/json` (user data: `text/plain`). Errors are JSON `{type,
//! message, …}` with the extra fields of §1 (`details[]` for
//! `invalid_arguments`, `resource`/`resource_id` for `not_found`, …). Lists
//! paginate with `page` (from 1) and `per_page` (1..=100, default 50), and
//! carry `total_count`, `X-Total-Count` and a `Link` header.
//!
//! With [`Builder::bootscripts`], also the legacy bootscript flow (see
//! "Legacy API mode"); with [`FakeScaleway::serve_metadata`], the metadata
//! API of one server (reference §4).
//!
//! With [`Builder::object_storage`], the Block API can import a QCOW2 from
//! a real S3 server (see "Block API").
//!
//! Server states follow §2.2: `stopped` → (`poweron`) `starting` → `running`
//! → (`poweroff`) `stopping` → `stopped`, or (`stop_in_place`) → `stopped in
//! place`; `reboot` goes through `starting`; `terminate` shows `stopping` and
//! then deletes the server with its `l_ssd`/`scratch` volumes (an
//! `sbs_volume` is only detached). Snapshots go `snapshotting` → `available`,
//! images `creating` → `available`.
//!
//! # Block API (`block.rs`)
//!
//! `https://api.scaleway.com/block/v1/zones/{zone}/…` (reference §3, §7;
//! field shapes from scaleway-sdk-js `packages_generated/block/src/v1`).
//! Same authentication, zones and error shapes as the Instance part, but
//! objects come back **unwrapped** (`POST /snapshots` answers the snapshot
//! itself, not `{snapshot}`), with `project_id`, dates `created_at` /
//! `updated_at`, and lists are `{snapshots|volumes: [...], total_count}`,
//! paginated with `page` and `page_size` (1..=100, default 50; no
//! `X-Total-Count` or `Link`), oldest first (the API's default
//! `created_at_asc`).
//!
//! * `POST /snapshots/import-from-object-storage` `{bucket, key, name,
//!   project_id, tags?, size?}` → 200, the snapshot in `creating`; it reads
//!   `GET {endpoint}/{bucket}/{key}` (path style, first 4 KiB, with a dummy
//!   `Authorization` header: moto checks no signature but refuses
//!   anonymous reads) from [`Builder::object_storage`] when the request
//!   arrives, and decides then whether the snapshot will end `available` or
//!   `error` after the delay (or [`FakeScaleway::advance`]).
//!   - Synchronous 400 `invalid_arguments` (the request's arguments): no
//!     `bucket`, `key` or `name`; a `key` not ending in `.qcow2`/`.qcow`; a
//!     `size` outside 1 GB..=1 TB (SI); a `project_id` that is not a UUID
//!     (another project: 403). No [`Builder::object_storage`]: 400
//!     `invalid_request_error` (a test-setup mistake).
//!   - Asynchronous `creating` → `error` (the object's content, found when
//!     reading it): no such object (or bucket), S3 unreachable, no QCOW2
//!     magic `QFI\xfb`, version other than 2 or 3, a backing file, encryption
//!     (`crypt_method` ≠ 0), zstd compression (v3 header length ≥ 105 with
//!     compression type 1 at byte 104, or incompatible feature bit 3 with
//!     it), a virtual size outside 1 GB..=1 TB when no `size` is given, a
//!     `size` smaller than the virtual size. The snapshot's `size` is the
//!     given `size`, else the virtual size (0 if unreadable).
//!   - The Block Snapshot has **no error-reason field**, so the API shows
//!     only `status: "error"`; the reason is in the fake's record,
//!     [`BlockSnapshot::error_reason`], for tests. [`FakeScaleway::fail_next_import`]
//!     makes the next import that passes every check end in `error` with a
//!     given reason. The record also keeps `bucket`, `key`, `requested_size`.
//! * `POST /snapshots {volume_id, name, project_id, tags}` (of a Block volume:
//!   `creating` → `available`, `parent_volume` `{id, name, type, status}`),
//!   `GET /snapshots?project_id=&name=&tags=&volume_id=&page=&page_size=`,
//!   `GET|PATCH|DELETE /snapshots/{id}` (PATCH: `name`, `tags`; DELETE: 204,
//!   412 `resource_still_in_use` while an image uses it, 409 while
//!   `creating`).
//! * `POST /volumes {name, project_id, perf_iops? (5000 → sbs_5k, 15000 →
//!   sbs_15k), from_empty:{size} | from_snapshot:{snapshot_id, size?},
//!   tags}` (`creating` → `available`), `GET /volumes?name=&project_id=&
//!   volume_type=&product_resource_id=&tags=&page=&page_size=`, `GET|DELETE
//!   /volumes/{id}` (412 `resource_still_in_use` while attached to a
//!   server).
//! * Instance interplay: `POST /instance/…/images` takes a Block snapshot id
//!   as `root_volume`; before it is `available` that is 400
//!   `invalid_arguments` with message `"snapshot is not available"`
//!   (reference §7, packer-plugin-scaleway#39); the image's
//!   `root_volume.volume_type` is `sbs_snapshot`. A Block id is not an
//!   Instance snapshot or volume (404 `not_found` on those paths). Deleting
//!   an image leaves its snapshot.
//! * Inspection: [`FakeScaleway::block_snapshots`], [`FakeScaleway::block_snapshot`],
//!   [`FakeScaleway::block_volumes`]. [`FakeScaleway::fail_next`] takes
//!   absolute `/block/…` (and `/marketplace/…`) prefixes too.
//!
//! # SBS servers and marketplace (`marketplace.rs`)
//!
//! * `POST /servers` volumes with `volume_type: "sbs_volume"` are made as
//!   Block volumes (`sbs_5k`, `in_use`, `references` naming the server with
//!   `product_resource_type: instance_server`), not Instance volumes: the
//!   server JSON shows them with `volume_type: sbs_volume`, the Block API
//!   lists them ([`FakeScaleway::block_volumes`]), and the Instance
//!   `/volumes/{id}` routes answer 404. An existing Block volume may be
//!   attached by `id`. `terminate` and `DELETE /servers/{id}` only detach
//!   them (`available`, `last_detached_at` set); Block `DELETE
//!   /volumes/{id}` is 412 while attached.
//! * `GET /marketplace/v2/local-images?image_label=&zone=&type=&page=&page_size=`
//!   → `{local_images: [{id, arch, zone, compatible_commercial_types,
//!   label, type}], total_count}`: for every configured label
//!   ([`Builder::image_label`]) one local image of type `instance_local`
//!   (id [`FakeScaleway::label_image_id`], what the label means in `POST
//!   /servers`) and one of type `instance_sbs` (id
//!   [`FakeScaleway::label_sbs_image_id`]), both in the fake's zone.
//! * The root volume of `POST /servers` without a `volume_type` is an
//!   `sbs_volume` for an `instance_sbs` local image or an image whose root
//!   is a Block snapshot, else `l_ssd`.
//!
//! # Legacy API mode ([`Builder::bootscripts`])
//!
//! The Instance API before bootscripts were removed (15 May 2023, reference
//! §0), for contract tests of the original flow (`scw create
//! --bootscript=X 50G`, §6). Only the ids given to the builder are known;
//! each is shown as the historical object of §2.4 (`{id, title, kernel,
//! initrd, bootcmdargs, dtb, architecture, default, public, organization,
//! zone}`). In this mode:
//!
//! * `POST /servers` with `"boot_type": "bootscript"` and `"bootscript":
//!   "<id>"` is accepted, with or without `image`. Without one, the server's
//!   `image` is `null`, its `arch` is the bootscript's, and `volumes["0"]`
//!   needs a `size` (400 `invalid_arguments`, `size`/`required` otherwise).
//! * The server JSON has `"boot_type": "bootscript"` and `"bootscript": {…}`
//!   (other servers keep `"bootscript": null`); [`Server::bootscript`] holds
//!   the id.
//! * `PATCH /servers/{id}` accepts `boot_type: bootscript` (and a
//!   `bootscript` id), as image-tools sent.
//! * `GET /bootscripts?arch=&title=&default=&public=` and `GET
//!   /bootscripts/{id}` answer (`{bootscripts[]}` paginated, `{bootscript}`).
//!
//! Without [`Builder::bootscripts`] all of this is refused as today (see
//! Assumptions) and `/bootscripts` has no route (404).
//!
//! # Assumptions (where the reference says "unverified" or is silent)
//!
//! * Legacy mode: an unknown bootscript id (`POST`/`PATCH /servers`, `GET
//!   /bootscripts/{id}`) is 404 `not_found` with `resource:
//!   "instance_bootscript"`, by analogy with `instance_image`; the name is a
//!   guess. `boot_type: bootscript` with no `bootscript` id (none in the body,
//!   none on the server already) is 400 `invalid_arguments`
//!   (`bootscript`/`required`): the old API may have fallen back to a default
//!   bootscript, but the fake makes the client name the one it means. Every
//!   bootscript has `default: false`, `public: true`, bootcmdargs `LINUX_COMMON
//!   scaleway boot=local nbd.max_part=16` (§2.4's example) and kernel/initrd
//!   URLs under `http://fake-bootscripts.invalid/<id>/` (nothing serves them).
//!   Its architecture is not checked against the image's.
//! * `PATCH /servers/{id}` stores `boot_type` `local`/`rescue` and refuses
//!   other values with 400 `invalid_arguments` (`boot_type`/`constraint`).
//!
//! * Wrong-state actions (e.g. `poweron` on a running server) answer **412**
//!   `{"type":"precondition_failed","message":"server should be stopped"}`;
//!   that exact reply was observed from the live API for `poweron` in
//!   scaleway-cli issue #4827 (2025). Actions on a server in `starting` or
//!   `stopping` answer 409 `transient_state` (`resource`, `resource_id`,
//!   `current_state`).
//! * `DELETE /servers/{id}` of a server that is not `stopped` / `stopped in
//!   place` is refused the same way: 412 `precondition_failed`, `"server
//!   should be stopped"`.
//! * `DELETE /volumes/{id}` of an attached volume, and of a snapshot that an
//!   image uses, answer 412 `precondition_failed` with `precondition:
//!   "resource_still_in_use"` and a `help_message`.
//! * Outside legacy mode, `boot_type: "bootscript"` (and, on `POST`, a
//!   `bootscript` field) is refused, on `POST` before any other check of
//!   the body (it is a value the API no longer has, so reading the body
//!   fails before a missing image is noticed), with 400
//!   `invalid_arguments`, `details[{argument_name:"boot_type",
//!   reason:"constraint", help_message:"bootscripts are no longer
//!   supported…"}]`. The reference says the API rejects bootscripts since
//!   2024 but not with which body; this shape is a guess.
//! * Snapshotting an `l_ssd` volume whose server is not stopped is refused
//!   (412 `precondition_failed`, `"server should be stopped"`), as
//!   Scaleway's console requires for local volumes.
//! * An image `label` (e.g. `debian_bookworm`) is accepted in `image` only if
//!   it was configured ([`Builder::image_label`]); an unknown label or
//!   unknown image UUID is 404 `not_found` (`resource: instance_image`).
//!   `volumes: {}` is accepted (root volume from the image, 10 GB); new
//!   volumes other than `"0"` need a `size`.
//! * A project other than [`FakeScaleway::project`] is 403
//!   `permissions_denied`. Unknown zones (not in §1's list) are 400
//!   `invalid_arguments`; other known zones work and are independent.
//! * Lists are ordered newest first (the API's default
//!   `creation_date_desc`). `name=` matches a substring; `tags=a,b` matches
//!   servers that have every listed tag.
//! * Block API: `not_found` names the resources `block_snapshot` and
//!   `block_volume`, and `transient_state` uses them too (guesses, by
//!   analogy with `instance_*`). `tags=` (repeated, as the SDKs send a list,
//!   or comma-separated) matches objects that have every listed tag;
//!   `name=` matches a substring. A snapshot's `references` is always `[]`
//!   (images are not shown there). Which import problems the real API
//!   refuses at once and which it reports by `error` is not documented: the
//!   split above (arguments at once, content later) is the fake's choice,
//!   and so are the reasons' words. `size` is also accepted as a string
//!   (some clients quote uint64s).
//! * Marketplace: public (no token checked; faults apply and calls are
//!   recorded as everywhere); local images exist only in the fake's zone (other
//!   zones list none); `compatible_commercial_types` is the fake's
//!   commercial types of the image's arch (`COPARM*` for arm64). The
//!   Instance server JSON of an `sbs_volume` has the fields of an l_ssd one
//!   with `state: "available"` (the real shape is unverified).
//! * `inject_500` answers a plain-text body (what a gateway error looks
//!   like), not the JSON error shape.
//!
//! # How tests drive it
//!
//! ```ignore
//! let fake = FakeScaleway::builder().delay(Duration::from_millis(50)).start().await;
//! std::env::set_var("SCW_API_URL", fake.url());   // base URL, no path
//! // … run the code under test with token fake.secret(), zone fake.zone() …
//! assert!(fake.servers().is_empty());             // inspection
//! assert_eq!(fake.calls()[0].path, "/instance/v1/zones/fr-par-1/servers");
//! ```
//!
//! * Time: transitions complete `delay` after the action (default 200 ms),
//!   or, with [`Builder::manual`] / [`FakeScaleway::set_manual`], only when the
//!   test calls [`FakeScaleway::advance`]. Transitions are applied lazily, at
//!   the next request or inspection call.
//! * Standing in for the guest: [`FakeScaleway::on_poweron`] registers a
//!   callback that gets the [`Server`] (tags, user data, public address) at
//!   the moment a `poweron` is accepted; a test can then e.g. serve the
//!   done line on `127.0.0.1:<port from a tag>`. The hook runs on a tokio
//!   worker of the fake, so it may `tokio::spawn`; it must not block. The
//!   public address of every server is [`Builder::public_address`] (default
//!   127.0.0.1). [`FakeScaleway::set_state_detail`] plays the guest's
//!   `PATCH /state`.
//! * The guest's metadata API: `let md = fake.serve_metadata(&id).await;`
//!   binds `127.0.0.1:0` and serves `host::provider::local::metadata_server::router` (the
//!   same router as the local provider's) over the fake's record of that
//!   server, looked up on every request: `GET /conf[?format=json]` (id, name,
//!   hostname, tags, state, state_detail, public_ip, volumes, bootscript,
//!   …), `PATCH /state` (sets the server's `state_detail`, so `GET
//!   /servers/{id}` shows it), `GET /user_data[?format=json]` and
//!   `GET|PATCH|DELETE /user_data/{key}` (the same values as the Instance
//!   API's `/servers/{id}/user_data/{key}`). Like that router, it does
//!   **not** enforce the privileged source port (< 1024) of `user_data`;
//!   nor does it inject 429s or record [`FakeScaleway::calls`]. It runs
//!   until the `FakeScaleway` is dropped; once the server is deleted, every
//!   request answers 500.
//! * Faults: [`FakeScaleway::inject_429`] (bare 429: no body, no
//!   `Retry-After`), [`FakeScaleway::inject_500`], [`FakeScaleway::fail_next`]
//!   (one response by path prefix; the request has no effect) and
//!   [`FakeScaleway::fail_next_after_effect`] (the request takes effect, then
//!   its response is replaced: "created, but the client saw a 502").
//!   Faults are checked before authentication.
//! * Observability: [`FakeScaleway::calls`] (every request, in order,
//!   including refused ones), [`FakeScaleway::servers`], [`volumes`],
//!   [`snapshots`], [`images`].
//!
//! [`volumes`]: FakeScaleway::volumes
//! [`snapshots`]: FakeScaleway::snapshots
//! [`images`]: FakeScaleway::images

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use axum::body::Body;
use axum::http::{header, HeaderMap, Method, Request, Response, StatusCode};
use host::provider::local::metadata_server::{MetadataStore, ServerMetadata, VolumeMetadata};
use serde_json::{json, Map, Value};
use tokio::task::JoinHandle;

mod block;
mod marketplace;
pub use block::{BlockSnapshot, BlockVolume};

/// The zones of reference §1.
pub const ZONES: &[&str] = &[
    "fr-par-1", "fr-par-2", "fr-par-3", "nl-ams-1", "nl-ams-2", "nl-ams-3", "pl-waw-1", "pl-waw-2",
    "pl-waw-3", "it-mil-1",
];

/// Commercial types the fake accepts by default.
pub const COMMERCIAL_TYPES: &[&str] = &[
    "DEV1-S",
    "DEV1-M",
    "DEV1-L",
    "DEV1-XL",
    "PLAY2-PICO",
    "PLAY2-NANO",
    "PLAY2-MICRO",
    "PRO2-XXS",
    "PRO2-XS",
    "PRO2-S",
    "GP1-XS",
    "GP1-S",
    "GP1-M",
    "COPARM1-2C-8G",
];

const ROOT_SIZE: u64 = 10_000_000_000;

/// One request as the fake received it.
#[derive(Clone, Debug)]
pub struct Call {
    pub method: String,
    /// The full path, e.g. `/instance/v1/zones/fr-par-1/servers`.
    pub path: String,
    /// The raw query string (without `?`), empty if none.
    pub query: String,
    /// The body if it parsed as JSON.
    pub body_json: Option<Value>,
    /// The answered status.
    pub status: u16,
}

/// A server as the fake holds it.
#[derive(Clone, Debug)]
pub struct Server {
    pub id: String,
    pub name: String,
    pub zone: String,
    pub project: String,
    pub commercial_type: String,
    pub arch: String,
    pub state: String,
    pub state_detail: String,
    pub boot_type: String,
    pub tags: Vec<String>,
    /// The image id (labels are resolved); empty for a legacy bootscript
    /// server created without an image.
    pub image: String,
    /// The bootscript id ([`Builder::bootscripts`] mode only).
    pub bootscript: Option<String>,
    /// Volume ids by index (`"0"` is the root volume).
    pub volumes: BTreeMap<u32, String>,
    /// The public address, if the server has a dynamic IP.
    pub public_address: Option<IpAddr>,
    pub public_ip_id: Option<String>,
    pub mac_address: String,
    pub user_data: BTreeMap<String, Vec<u8>>,
    pub creation_date: String,
    pub modification_date: String,
}

impl Server {
    /// The value of a `KEY=value` tag.
    pub fn tag(&self, key: &str) -> Option<&str> {
        self.tags
            .iter()
            .find_map(|t| t.strip_prefix(key)?.strip_prefix('='))
    }
}

/// A volume as the fake holds it.
#[derive(Clone, Debug)]
pub struct Volume {
    pub id: String,
    pub name: String,
    pub zone: String,
    pub project: String,
    pub size: u64,
    pub volume_type: String,
    pub state: String,
    /// The server it is attached to.
    pub server: Option<String>,
    pub creation_date: String,
}

/// A snapshot as the fake holds it.
#[derive(Clone, Debug)]
pub struct Snapshot {
    pub id: String,
    pub name: String,
    pub zone: String,
    pub project: String,
    pub state: String,
    pub size: u64,
    pub volume_type: String,
    pub base_volume: Option<(String, String)>,
    pub tags: Vec<String>,
    pub creation_date: String,
}

/// An image as the fake holds it.
#[derive(Clone, Debug)]
pub struct Image {
    pub id: String,
    pub name: String,
    pub zone: String,
    pub project: String,
    pub arch: String,
    pub state: String,
    /// The root snapshot's id.
    pub root_volume: String,
    pub tags: Vec<String>,
    pub public: bool,
    pub creation_date: String,
}

/// A stock image that a label resolves to (not listed by `GET /images`).
#[derive(Clone, Debug)]
struct StockImage {
    /// The local image of type `instance_local` (what the label resolves to
    /// in `POST /servers`).
    id: String,
    /// The local image of type `instance_sbs` (its servers' root volume is
    /// an `sbs_volume` by default).
    sbs_id: String,
    name: String,
    arch: String,
}

/// A bootscript of the legacy mode ([`Builder::bootscripts`]).
#[derive(Clone, Debug)]
struct Bootscript {
    id: String,
    title: String,
    arch: String,
}

type PoweronHook = Arc<dyn Fn(&Server) + Send + Sync>;

#[derive(Clone, Debug)]
enum Step {
    ServerTo(&'static str),
    ServerTerminate,
    SnapshotAvailable,
    ImageAvailable,
    /// A Block snapshot leaves `creating`: `available`, or `error` with
    /// this reason.
    BlockSnapshotDone(Option<String>),
    /// A Block volume leaves `creating`.
    BlockVolumeAvailable,
}

struct FailRule {
    prefix: String,
    status: StatusCode,
    body: String,
    after_effect: bool,
}

struct Config {
    token: String,
    zone: String,
    project: String,
    organization: String,
    delay: Option<Duration>,
    public_address: Option<IpAddr>,
    labels: BTreeMap<String, StockImage>,
    commercial_types: Vec<String>,
    /// `Some`: the legacy (pre-May-2023) API that accepts these bootscripts.
    bootscripts: Option<Vec<Bootscript>>,
    /// The S3 endpoint (path style) that Block snapshot imports read from.
    object_storage: Option<String>,
}

#[derive(Default)]
struct State {
    servers: Vec<Server>,
    volumes: Vec<Volume>,
    snapshots: Vec<Snapshot>,
    images: Vec<Image>,
    block_snapshots: Vec<BlockSnapshot>,
    block_volumes: Vec<BlockVolume>,
    /// Reasons for the next valid imports to end in `error`.
    fail_imports: VecDeque<String>,
    pending: HashMap<String, (Option<Instant>, Step)>,
    calls: Vec<Call>,
    n429: u32,
    n500: u32,
    fail: VecDeque<FailRule>,
    tasks: u64,
}

struct Inner {
    cfg: Mutex<Config>,
    state: Mutex<State>,
    poweron: Mutex<Vec<PoweronHook>>,
}

/// Configures a fake before it starts.
pub struct Builder {
    cfg: Config,
}

impl Builder {
    /// The secret key (`X-Auth-Token`) the fake accepts.
    pub fn token(mut self, token: &str) -> Self {
        self.cfg.token = token.into();
        self
    }
    /// The zone [`FakeScaleway::zone`] reports (default `fr-par-1`).
    pub fn zone(mut self, zone: &str) -> Self {
        self.cfg.zone = zone.into();
        self
    }
    /// The only project the token may use.
    pub fn project(mut self, project: &str) -> Self {
        self.cfg.project = project.into();
        self
    }
    /// How long a transition takes (default 200 ms).
    pub fn delay(mut self, delay: Duration) -> Self {
        self.cfg.delay = Some(delay);
        self
    }
    /// Transitions wait for [`FakeScaleway::advance`].
    pub fn manual(mut self) -> Self {
        self.cfg.delay = None;
        self
    }
    /// Every server's public address (`None`: servers get no public IP).
    pub fn public_address(mut self, addr: Option<IpAddr>) -> Self {
        self.cfg.public_address = addr;
        self
    }
    /// Accepts `label` in `image` (in addition to `debian_bookworm` and
    /// `ubuntu_jammy`).
    pub fn image_label(mut self, label: &str, arch: &str) -> Self {
        add_label(&mut self.cfg, label, arch);
        self
    }

    /// The legacy API (before bootscripts were removed on 2023-05-15):
    /// `boot_type: "bootscript"` with `bootscript: <id>` is accepted for
    /// these ids (titled `Image creation <id>`, `x86_64`), and `GET
    /// /bootscripts[/{id}]` answers. See the module doc. May be called more
    /// than once; an empty list still turns the mode on.
    pub fn bootscripts(mut self, ids: &[&str]) -> Self {
        for id in ids {
            self = self.bootscript(id, &format!("Image creation {id}"), "x86_64");
        }
        self.cfg.bootscripts.get_or_insert_with(Vec::new);
        self
    }
    /// Like [`Builder::bootscripts`], for one bootscript with a chosen
    /// `title` and `arch` (`x86_64`, `arm`, `arm64`).
    pub fn bootscript(mut self, id: &str, title: &str, arch: &str) -> Self {
        let list = self.cfg.bootscripts.get_or_insert_with(Vec::new);
        list.retain(|b| b.id != id);
        list.push(Bootscript {
            id: id.into(),
            title: title.into(),
            arch: arch.into(),
        });
        self
    }

    /// The Object Storage (S3) endpoint that `POST
    /// /block/v1/zones/{zone}/snapshots/import-from-object-storage` reads
    /// the QCOW2 from, path style: `GET {endpoint}/{bucket}/{key}` (e.g.
    /// `test_support::s3_server::S3Server::endpoint`). Without it, imports
    /// are refused (400: a test-setup mistake).
    pub fn object_storage(mut self, endpoint: &str) -> Self {
        self.cfg.object_storage = Some(endpoint.trim_end_matches('/').to_string());
        self
    }

    /// Binds 127.0.0.1:0 and serves in the current tokio runtime.
    pub async fn start(self) -> FakeScaleway {
        let inner = Arc::new(Inner {
            cfg: Mutex::new(self.cfg),
            state: Mutex::new(State::default()),
            poweron: Mutex::new(vec![]),
        });
        let listener = tokio::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
            .await
            .expect("bind the fake Scaleway API");
        let addr = listener.local_addr().unwrap();
        let shared = inner.clone();
        let app = axum::Router::new().fallback(move |req: Request<Body>| {
            let shared = shared.clone();
            async move { handle(shared, req).await }
        });
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        FakeScaleway {
            inner,
            addr,
            task,
            metadata: Mutex::new(vec![]),
        }
    }
}

fn add_label(cfg: &mut Config, label: &str, arch: &str) {
    cfg.labels.insert(
        label.into(),
        StockImage {
            id: uuid::Uuid::new_v4().to_string(),
            sbs_id: uuid::Uuid::new_v4().to_string(),
            name: label.replace('_', " "),
            arch: arch.into(),
        },
    );
}

/// The running fake. Dropping it stops the server.
pub struct FakeScaleway {
    inner: Arc<Inner>,
    addr: SocketAddr,
    task: JoinHandle<()>,
    /// The servers of [`FakeScaleway::serve_metadata`].
    metadata: Mutex<Vec<JoinHandle<()>>>,
}

impl Drop for FakeScaleway {
    fn drop(&mut self) {
        self.task.abort();
        for t in self.metadata.lock().unwrap().drain(..) {
            t.abort();
        }
    }
}

impl FakeScaleway {
    /// A fake with the defaults (see [`Builder`]).
    pub async fn start() -> FakeScaleway {
        Self::builder().start().await
    }

    pub fn builder() -> Builder {
        let mut cfg = Config {
            token: uuid::Uuid::new_v4().to_string(),
            zone: "fr-par-1".into(),
            project: uuid::Uuid::new_v4().to_string(),
            organization: uuid::Uuid::new_v4().to_string(),
            delay: Some(Duration::from_millis(200)),
            public_address: Some(IpAddr::V4(Ipv4Addr::LOCALHOST)),
            labels: BTreeMap::new(),
            commercial_types: COMMERCIAL_TYPES.iter().map(|s| s.to_string()).collect(),
            bootscripts: None,
            object_storage: None,
        };
        add_label(&mut cfg, "debian_bookworm", "x86_64");
        add_label(&mut cfg, "ubuntu_jammy", "x86_64");
        Builder { cfg }
    }

    /// The base URL (`SCW_API_URL`), e.g. `http://127.0.0.1:40123`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }
    /// The accepted `X-Auth-Token`.
    pub fn secret(&self) -> String {
        self.inner.cfg.lock().unwrap().token.clone()
    }
    pub fn zone(&self) -> String {
        self.inner.cfg.lock().unwrap().zone.clone()
    }
    pub fn project(&self) -> String {
        self.inner.cfg.lock().unwrap().project.clone()
    }
    /// `{url}/instance/v1/zones/{zone}`.
    pub fn zone_url(&self) -> String {
        format!("{}/instance/v1/zones/{}", self.url(), self.zone())
    }
    /// The id a configured image label resolves to.
    pub fn label_image_id(&self, label: &str) -> Option<String> {
        let cfg = self.inner.cfg.lock().unwrap();
        cfg.labels.get(label).map(|i| i.id.clone())
    }
    /// The id of a configured label's `instance_sbs` local image.
    pub fn label_sbs_image_id(&self, label: &str) -> Option<String> {
        let cfg = self.inner.cfg.lock().unwrap();
        cfg.labels.get(label).map(|i| i.sbs_id.clone())
    }

    /// Transitions complete after `delay`.
    pub fn set_delay(&self, delay: Duration) {
        self.inner.cfg.lock().unwrap().delay = Some(delay);
    }
    /// Transitions wait for [`FakeScaleway::advance`].
    pub fn set_manual(&self) {
        self.inner.cfg.lock().unwrap().delay = None;
    }
    /// Completes every pending transition now.
    pub fn advance(&self) {
        self.inner.state.lock().unwrap().tick(true);
    }

    /// The next `n` requests answer 429 with no body and no `Retry-After`.
    pub fn inject_429(&self, n: u32) {
        self.inner.state.lock().unwrap().n429 += n;
    }
    /// The next `n` requests answer 500 (plain-text body).
    pub fn inject_500(&self, n: u32) {
        self.inner.state.lock().unwrap().n500 += n;
    }
    /// The next request whose path starts with `path_prefix` answers
    /// `status` with `body` (JSON, if it parses) and has no effect. A prefix
    /// that does not start with `/instance/`, `/block/` or `/marketplace/`
    /// is relative to the Instance API's zone, e.g. `/snapshots`; a Block
    /// one is written in full, e.g.
    /// `/block/v1/zones/fr-par-1/snapshots/import-from-object-storage`.
    pub fn fail_next(&self, path_prefix: &str, status: u16, body: &str) {
        self.push_fail(path_prefix, status, body, false);
    }
    /// Like [`FakeScaleway::fail_next`], but the request takes effect first.
    pub fn fail_next_after_effect(&self, path_prefix: &str, status: u16, body: &str) {
        self.push_fail(path_prefix, status, body, true);
    }
    fn push_fail(&self, prefix: &str, status: u16, body: &str, after_effect: bool) {
        self.inner.state.lock().unwrap().fail.push_back(FailRule {
            prefix: prefix.into(),
            status: StatusCode::from_u16(status).expect("a valid status"),
            body: body.into(),
            after_effect,
        });
    }

    /// The next Block snapshot import that passes every check ends in
    /// `error` instead of `available`, with `reason` as its
    /// [`BlockSnapshot::error_reason`] (the API itself shows no reason).
    pub fn fail_next_import(&self, reason: &str) {
        self.inner
            .state
            .lock()
            .unwrap()
            .fail_imports
            .push_back(reason.into());
    }

    /// Calls `hook` each time a `poweron` is accepted (outside the fake's
    /// locks; the server is in `starting`).
    pub fn on_poweron(&self, hook: impl Fn(&Server) + Send + Sync + 'static) {
        self.inner.poweron.lock().unwrap().push(Arc::new(hook));
    }

    /// Sets a server's `state_detail`, as the guest's `PATCH /state` to the
    /// metadata API would (that the API mirrors it is likely but
    /// unverified, reference §4). Returns false if there is no such server.
    pub fn set_state_detail(&self, server_id: &str, detail: &str) -> bool {
        let mut st = self.inner.state.lock().unwrap();
        match st.servers.iter_mut().find(|s| s.id == server_id) {
            Some(s) => {
                s.state_detail = detail.into();
                true
            }
            None => false,
        }
    }

    /// Serves the instance metadata API (reference §4) of server
    /// `server_id` on `127.0.0.1:<ephemeral>`, for a test that plays the
    /// guest: `http://{addr}/conf?format=json` is what the guest would read
    /// at `169.254.42.42`. It is `host::provider::local::metadata_server::router` over the
    /// fake's own server record, looked up on every request: tag, user data
    /// and state changes made through the Instance API show at once, and
    /// the guest's `PATCH /state` and `user_data` writes show in the
    /// Instance API. It runs until the `FakeScaleway` is dropped; requests
    /// are not in [`FakeScaleway::calls`], and faults do not apply to it.
    ///
    /// Panics if there is no such server now. Once the server is deleted,
    /// every request answers 500.
    pub async fn serve_metadata(&self, server_id: &str) -> SocketAddr {
        assert!(
            self.server(server_id).is_some(),
            "serve_metadata: no server {server_id}"
        );
        let store: Arc<dyn MetadataStore> = Arc::new(FakeMetadata {
            inner: self.inner.clone(),
            server: server_id.into(),
        });
        let listener = tokio::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
            .await
            .expect("bind the fake metadata API");
        let addr = listener.local_addr().unwrap();
        let app = host::provider::local::metadata_server::router(store);
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        self.metadata.lock().unwrap().push(task);
        addr
    }

    /// Every request so far, in order.
    pub fn calls(&self) -> Vec<Call> {
        self.inner.state.lock().unwrap().calls.clone()
    }
    pub fn servers(&self) -> Vec<Server> {
        let mut st = self.inner.state.lock().unwrap();
        st.tick(false);
        st.servers.clone()
    }
    pub fn server(&self, id: &str) -> Option<Server> {
        self.servers().into_iter().find(|s| s.id == id)
    }
    pub fn volumes(&self) -> Vec<Volume> {
        let mut st = self.inner.state.lock().unwrap();
        st.tick(false);
        st.volumes.clone()
    }
    pub fn snapshots(&self) -> Vec<Snapshot> {
        let mut st = self.inner.state.lock().unwrap();
        st.tick(false);
        st.snapshots.clone()
    }
    pub fn images(&self) -> Vec<Image> {
        let mut st = self.inner.state.lock().unwrap();
        st.tick(false);
        st.images.clone()
    }
    /// The Block API's snapshots (imports included), oldest first.
    pub fn block_snapshots(&self) -> Vec<BlockSnapshot> {
        let mut st = self.inner.state.lock().unwrap();
        st.tick(false);
        st.block_snapshots.clone()
    }
    pub fn block_snapshot(&self, id: &str) -> Option<BlockSnapshot> {
        self.block_snapshots().into_iter().find(|s| s.id == id)
    }
    /// The Block API's volumes, oldest first.
    pub fn block_volumes(&self) -> Vec<BlockVolume> {
        let mut st = self.inner.state.lock().unwrap();
        st.tick(false);
        st.block_volumes.clone()
    }
}

// ---------------------------------------------------------------------------
// The metadata API of one server

/// [`MetadataStore`] over the fake's record of one server.
struct FakeMetadata {
    inner: Arc<Inner>,
    server: String,
}

impl FakeMetadata {
    fn with_server<T>(&self, f: impl FnOnce(&Config, &mut State, usize) -> T) -> anyhow::Result<T> {
        let cfg = self.inner.cfg.lock().unwrap();
        let mut st = self.inner.state.lock().unwrap();
        st.tick(false);
        let i = st
            .servers
            .iter()
            .position(|s| s.id == self.server)
            .ok_or_else(|| anyhow::anyhow!("server {} no longer exists", self.server))?;
        Ok(f(&cfg, &mut st, i))
    }
}

impl MetadataStore for FakeMetadata {
    fn conf(&self) -> anyhow::Result<Option<ServerMetadata>> {
        self.with_server(|cfg, st, i| {
            let s = &st.servers[i];
            let mut meta = ServerMetadata::new(&s.id, &s.name);
            meta.commercial_type = s.commercial_type.clone();
            meta.project = s.project.clone();
            meta.organization = cfg.organization.clone();
            meta.arch = s.arch.clone();
            meta.zone = s.zone.clone();
            meta.location.zone_id = s.zone.clone();
            meta.tags = s.tags.clone();
            meta.state_detail = s.state_detail.clone();
            meta.state = s.state.clone();
            meta.mac_address = s.mac_address.clone();
            meta.public_ip = s.public_address.map(|a| {
                json!({
                    "id": s.public_ip_id,
                    "address": a.to_string(),
                    "dynamic": true,
                    "gateway": "62.210.0.1",
                    "netmask": "32",
                    "family": if a.is_ipv4() { "inet" } else { "inet6" },
                })
            });
            meta.bootscript = s
                .bootscript
                .as_deref()
                .and_then(|id| find_bootscript(cfg, id))
                .map(|b| bootscript_json(cfg, b, &s.zone));
            for (idx, vid) in &s.volumes {
                let volume = match st.volumes.iter().find(|v| &v.id == vid) {
                    Some(v) => Some(VolumeMetadata {
                        id: v.id.clone(),
                        name: v.name.clone(),
                        volume_type: v.volume_type.clone(),
                        size: v.size,
                    }),
                    None => {
                        st.block_volumes
                            .iter()
                            .find(|v| &v.id == vid)
                            .map(|v| VolumeMetadata {
                                id: v.id.clone(),
                                name: v.name.clone(),
                                volume_type: "sbs_volume".into(),
                                size: v.size,
                            })
                    }
                };
                if let Some(v) = volume {
                    meta.volumes.insert(idx.to_string(), v);
                }
            }
            Some(meta)
        })
    }

    fn set_state_detail(&self, detail: &str) -> anyhow::Result<()> {
        self.with_server(|_, st, i| st.servers[i].state_detail = detail.into())
    }

    fn user_data_keys(&self) -> anyhow::Result<Vec<String>> {
        self.with_server(|_, st, i| st.servers[i].user_data.keys().cloned().collect())
    }

    fn user_data(&self, key: &str) -> anyhow::Result<Option<Vec<u8>>> {
        self.with_server(|_, st, i| st.servers[i].user_data.get(key).cloned())
    }

    fn set_user_data(&self, key: &str, value: Vec<u8>) -> anyhow::Result<()> {
        self.with_server(|_, st, i| {
            st.servers[i].user_data.insert(key.into(), value);
        })
    }

    fn delete_user_data(&self, key: &str) -> anyhow::Result<bool> {
        self.with_server(|_, st, i| st.servers[i].user_data.remove(key).is_some())
    }
}

// ---------------------------------------------------------------------------
// Replies

struct Reply {
    status: StatusCode,
    headers: Vec<(header::HeaderName, String)>,
    body: Option<(&'static str, Vec<u8>)>,
}

impl Reply {
    fn json(status: StatusCode, v: Value) -> Reply {
        Reply {
            status,
            headers: vec![],
            body: Some(("application/json", serde_json::to_vec(&v).unwrap())),
        }
    }
    fn empty(status: StatusCode) -> Reply {
        Reply {
            status,
            headers: vec![],
            body: None,
        }
    }
    fn header(mut self, name: header::HeaderName, value: String) -> Reply {
        self.headers.push((name, value));
        self
    }
    fn into_response(self) -> Response<Body> {
        let mut b = Response::builder().status(self.status);
        for (k, v) in self.headers {
            b = b.header(k, v);
        }
        match self.body {
            Some((ct, body)) => b
                .header(header::CONTENT_TYPE, ct)
                .body(Body::from(body))
                .unwrap(),
            None => b.body(Body::empty()).unwrap(),
        }
    }
}

type R = Result<Reply, Reply>;

fn err(status: StatusCode, kind: &str, message: &str, extra: Value) -> Reply {
    let mut v = json!({"type": kind, "message": message});
    if let Value::Object(m) = extra {
        v.as_object_mut().unwrap().extend(m);
    }
    Reply::json(status, v)
}

fn invalid(details: Vec<(&str, &str, String)>) -> Reply {
    let details: Vec<Value> = details
        .into_iter()
        .map(|(arg, reason, help)| {
            json!({"argument_name": arg, "reason": reason, "help_message": help})
        })
        .collect();
    err(
        StatusCode::BAD_REQUEST,
        "invalid_arguments",
        "invalid argument(s)",
        json!({ "details": details }),
    )
}

fn not_found(resource: &str, id: &str) -> Reply {
    err(
        StatusCode::NOT_FOUND,
        "not_found",
        "resource is not found",
        json!({"resource": resource, "resource_id": id}),
    )
}

fn precondition(message: &str) -> Reply {
    err(
        StatusCode::PRECONDITION_FAILED,
        "precondition_failed",
        message,
        json!({}),
    )
}

fn still_in_use(help: &str) -> Reply {
    err(
        StatusCode::PRECONDITION_FAILED,
        "precondition_failed",
        "resource is still in use",
        json!({"precondition": "resource_still_in_use", "help_message": help}),
    )
}

fn transient(resource: &str, id: &str, current: &str) -> Reply {
    err(
        StatusCode::CONFLICT,
        "transient_state",
        &format!("resource is in a transient state: {current}"),
        json!({"resource": resource, "resource_id": id, "current_state": current}),
    )
}

fn now_rfc3339() -> String {
    humantime::format_rfc3339_micros(SystemTime::now())
        .to_string()
        .replace('Z', "+00:00")
}

fn new_id() -> String {
    uuid::Uuid::new_v4().to_string()
}

fn is_uuid(s: &str) -> bool {
    uuid::Uuid::parse_str(s).is_ok() && s.len() == 36
}

// ---------------------------------------------------------------------------
// Request handling

/// Which API a path is under.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Api {
    /// `/instance/v1/zones/{zone}`
    Instance,
    /// `/block/v1/zones/{zone}`
    Block,
}

struct Req {
    method: Method,
    zone: String,
    /// Path segments after `/{api}/v1/zones/{zone}`.
    segs: Vec<String>,
    query: Vec<(String, String)>,
    headers: HeaderMap,
    body: Vec<u8>,
    /// A snapshot import's object, read before the request was routed.
    object: Option<block::ObjectRead>,
}

impl Req {
    fn q(&self, key: &str) -> Option<&str> {
        self.query
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    /// Every value of a repeated query parameter (`tags=a&tags=b`), a
    /// comma-separated one split.
    fn all(&self, key: &str) -> Vec<&str> {
        self.query
            .iter()
            .filter(|(k, _)| k == key)
            .flat_map(|(_, v)| v.split(','))
            .filter(|v| !v.is_empty())
            .collect()
    }

    fn content_type(&self) -> &str {
        self.headers
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
    }

    /// The JSON object body, strictly.
    fn json(&self) -> Result<Map<String, Value>, Reply> {
        let ct = self.content_type();
        if !ct.starts_with("application/json") {
            return Err(err(
                StatusCode::BAD_REQUEST,
                "invalid_request_error",
                &format!("Content-Type must be application/json, got {ct:?}"),
                json!({}),
            ));
        }
        match serde_json::from_slice::<Value>(&self.body) {
            Ok(Value::Object(m)) => Ok(m),
            _ => Err(err(
                StatusCode::BAD_REQUEST,
                "invalid_request_error",
                "the body is not a JSON object",
                json!({}),
            )),
        }
    }
}

fn parse_query(q: &str) -> Vec<(String, String)> {
    url::form_urlencoded::parse(q.as_bytes())
        .map(|(k, v)| (k.into_owned(), v.into_owned()))
        .collect()
}

async fn handle(inner: Arc<Inner>, req: Request<Body>) -> Response<Body> {
    let (parts, body) = req.into_parts();
    let body = axum::body::to_bytes(body, 16 << 20)
        .await
        .map(|b| b.to_vec())
        .unwrap_or_default();
    let path = parts.uri.path().to_string();
    let query = parts.uri.query().unwrap_or("").to_string();
    // A snapshot import reads its object now, before the locks (the routes
    // are synchronous).
    let object = if parts.method == Method::POST && block::is_import_path(&path) {
        block::read_object(&inner, &body).await
    } else {
        None
    };
    let mut call = Call {
        method: parts.method.to_string(),
        path: path.clone(),
        query: query.clone(),
        body_json: serde_json::from_slice(&body).ok(),
        status: 0,
    };
    let (reply, hooks) = {
        let cfg = inner.cfg.lock().unwrap();
        let mut st = inner.state.lock().unwrap();
        // Faults come first: a rate limiter or gateway answers before auth.
        let zone_rel = path
            .strip_prefix("/instance/v1/zones/")
            .and_then(|r| r.find('/').map(|i| r[i..].to_string()))
            .unwrap_or_default();
        let rule = st.fail.iter().position(|r| {
            if ["/instance/", "/block/", "/marketplace/"]
                .iter()
                .any(|api| r.prefix.starts_with(api))
            {
                path.starts_with(&r.prefix)
            } else {
                zone_rel.starts_with(&r.prefix)
            }
        });
        let mut replace = None;
        let fault = if st.n429 > 0 {
            st.n429 -= 1;
            Some(Reply::empty(StatusCode::TOO_MANY_REQUESTS))
        } else if st.n500 > 0 {
            st.n500 -= 1;
            Some(Reply {
                status: StatusCode::INTERNAL_SERVER_ERROR,
                headers: vec![],
                body: Some(("text/plain", b"internal server error".to_vec())),
            })
        } else if let Some(i) = rule {
            let r = st.fail.remove(i).unwrap();
            let reply = match serde_json::from_str::<Value>(&r.body) {
                Ok(v) => Reply::json(r.status, v),
                Err(_) if r.body.is_empty() => Reply::empty(r.status),
                Err(_) => Reply {
                    status: r.status,
                    headers: vec![],
                    body: Some(("text/plain", r.body.into_bytes())),
                },
            };
            if r.after_effect {
                replace = Some(reply);
                None
            } else {
                Some(reply)
            }
        } else {
            None
        };
        let (reply, hooks) = match fault {
            Some(f) => (f, vec![]),
            None => {
                st.tick(false);
                let mut fired = vec![];
                let r = route(&cfg, &mut st, &parts, body, object, &mut fired);
                let reply = match r {
                    Ok(r) | Err(r) => r,
                };
                (replace.unwrap_or(reply), fired)
            }
        };
        call.status = reply.status.as_u16();
        st.calls.push(call);
        (reply, hooks)
    };
    if !hooks.is_empty() {
        let fns = inner.poweron.lock().unwrap().clone();
        for server in &hooks {
            for f in &fns {
                f(server);
            }
        }
    }
    reply.into_response()
}

fn route(
    cfg: &Config,
    st: &mut State,
    parts: &axum::http::request::Parts,
    body: Vec<u8>,
    object: Option<block::ObjectRead>,
    fired: &mut Vec<Server>,
) -> R {
    let path = parts.uri.path();
    let query = parts.uri.query().unwrap_or("");
    // The marketplace is public: no token needed.
    if path.starts_with("/marketplace/") {
        return marketplace::route(cfg, path, &parse_query(query));
    }
    let token = parts
        .headers
        .get("x-auth-token")
        .and_then(|v| v.to_str().ok());
    match token {
        None => {
            return Err(err(
                StatusCode::UNAUTHORIZED,
                "denied_authentication",
                "authentication is denied",
                json!({"method": "api_key", "reason": "not_found"}),
            ))
        }
        Some(t) if t != cfg.token => {
            return Err(err(
                StatusCode::UNAUTHORIZED,
                "denied_authentication",
                "authentication is denied",
                json!({"method": "api_key", "reason": "invalid_argument"}),
            ))
        }
        Some(_) => {}
    }
    let (api, rest) = if let Some(rest) = path.strip_prefix("/instance/v1/zones/") {
        (Api::Instance, Some(rest))
    } else if let Some(rest) = path.strip_prefix("/block/v1/zones/") {
        (Api::Block, Some(rest))
    } else {
        (Api::Instance, None)
    };
    let Some(rest) = rest else {
        return Err(err(
            StatusCode::NOT_FOUND,
            "not_found",
            "unknown path",
            json!({}),
        ));
    };
    let mut segs: Vec<String> = rest.split('/').map(|s| s.to_string()).collect();
    let zone = segs.remove(0);
    if !ZONES.contains(&zone.as_str()) {
        return Err(invalid(vec![(
            "zone",
            "constraint",
            format!("unknown zone {zone:?}"),
        )]));
    }
    if segs.last().is_some_and(|s| s.is_empty()) {
        segs.pop();
    }
    let req = Req {
        method: parts.method.clone(),
        zone,
        segs,
        query: parse_query(query),
        headers: parts.headers.clone(),
        body,
        object,
    };
    if api == Api::Block {
        return block::route(cfg, st, &req);
    }
    let segs: Vec<&str> = req.segs.iter().map(|s| s.as_str()).collect();
    let m = &req.method;
    match (m.as_str(), segs.as_slice()) {
        ("POST", ["servers"]) => create_server(cfg, st, &req),
        ("GET", ["servers"]) => list_servers(cfg, st, &req),
        ("GET", ["servers", id]) => {
            let s = st.server(&req.zone, id)?;
            Ok(Reply::json(
                StatusCode::OK,
                json!({"server": st.server_json(cfg, s)}),
            ))
        }
        ("PATCH", ["servers", id]) => update_server(cfg, st, &req, id),
        ("DELETE", ["servers", id]) => delete_server(st, &req, id),
        ("GET", ["servers", id, "action"]) => {
            let s = st.server(&req.zone, id)?;
            Ok(Reply::json(
                StatusCode::OK,
                json!({"actions": allowed_actions(&s.state)}),
            ))
        }
        ("POST", ["servers", id, "action"]) => server_action(cfg, st, &req, id, fired),
        ("GET", ["servers", id, "user_data"]) => {
            let s = st.server(&req.zone, id)?;
            let keys: Vec<&String> = s.user_data.keys().collect();
            Ok(Reply::json(StatusCode::OK, json!({"user_data": keys})))
        }
        ("GET", ["servers", id, "user_data", key]) => {
            let s = st.server(&req.zone, id)?;
            match s.user_data.get(*key) {
                Some(v) => Ok(Reply {
                    status: StatusCode::OK,
                    headers: vec![],
                    body: Some(("text/plain", v.clone())),
                }),
                None => Err(not_found("instance_user_data", key)),
            }
        }
        ("PATCH", ["servers", id, "user_data", key]) => {
            st.server(&req.zone, id)?;
            if !req.content_type().starts_with("text/plain") {
                return Err(err(
                    StatusCode::BAD_REQUEST,
                    "invalid_request_error",
                    "user data must be sent as text/plain",
                    json!({}),
                ));
            }
            let s = st.server_mut(&req.zone, id)?;
            s.user_data.insert(key.to_string(), req.body.clone());
            Ok(Reply::empty(StatusCode::NO_CONTENT))
        }
        ("DELETE", ["servers", id, "user_data", key]) => {
            let s = st.server_mut(&req.zone, id)?;
            match s.user_data.remove(*key) {
                Some(_) => Ok(Reply::empty(StatusCode::NO_CONTENT)),
                None => Err(not_found("instance_user_data", key)),
            }
        }
        ("GET", ["volumes"]) => {
            let items: Vec<Value> = st
                .volumes
                .iter()
                .rev()
                .filter(|v| v.zone == req.zone)
                .map(|v| st.volume_json(cfg, v))
                .collect();
            paginate(&req, "volumes", items)
        }
        ("GET", ["volumes", id]) => {
            let v = st.volume(&req.zone, id)?;
            Ok(Reply::json(
                StatusCode::OK,
                json!({"volume": st.volume_json(cfg, v)}),
            ))
        }
        ("DELETE", ["volumes", id]) => {
            let v = st.volume(&req.zone, id)?;
            if v.server.is_some() {
                return Err(still_in_use("detach the volume from its server first"));
            }
            if v.state != "available" {
                return Err(transient("instance_volume", id, &v.state));
            }
            st.volumes.retain(|v| v.id != *id);
            Ok(Reply::empty(StatusCode::NO_CONTENT))
        }
        ("POST", ["snapshots"]) => create_snapshot(cfg, st, &req),
        ("GET", ["snapshots"]) => {
            let items: Vec<Value> = st
                .snapshots
                .iter()
                .rev()
                .filter(|s| s.zone == req.zone)
                .filter(|s| req.q("name").is_none_or(|n| s.name.contains(n)))
                .map(|s| snapshot_json(cfg, s))
                .collect();
            paginate(&req, "snapshots", items)
        }
        ("GET", ["snapshots", id]) => {
            let s = st.snapshot(&req.zone, id)?;
            Ok(Reply::json(
                StatusCode::OK,
                json!({"snapshot": snapshot_json(cfg, s)}),
            ))
        }
        ("DELETE", ["snapshots", id]) => {
            let s = st.snapshot(&req.zone, id)?;
            if s.state == "snapshotting" {
                return Err(transient("instance_snapshot", id, "snapshotting"));
            }
            if st.images.iter().any(|i| i.root_volume == *id) {
                return Err(still_in_use(
                    "delete the images that use the snapshot first",
                ));
            }
            st.snapshots.retain(|s| s.id != *id);
            st.pending.remove(*id);
            Ok(Reply::empty(StatusCode::NO_CONTENT))
        }
        ("GET", ["bootscripts"]) if cfg.bootscripts.is_some() => {
            let bool_q = |k: &str, v: bool| req.q(k).is_none_or(|q| q == v.to_string());
            let items: Vec<Value> = cfg
                .bootscripts
                .iter()
                .flatten()
                .filter(|b| req.q("arch").is_none_or(|a| b.arch == a))
                .filter(|b| req.q("title").is_none_or(|t| b.title.contains(t)))
                .filter(|_| bool_q("default", false) && bool_q("public", true))
                .map(|b| bootscript_json(cfg, b, &req.zone))
                .collect();
            paginate(&req, "bootscripts", items)
        }
        ("GET", ["bootscripts", id]) if cfg.bootscripts.is_some() => {
            let b = find_bootscript(cfg, id).ok_or_else(|| not_found("instance_bootscript", id))?;
            Ok(Reply::json(
                StatusCode::OK,
                json!({"bootscript": bootscript_json(cfg, b, &req.zone)}),
            ))
        }
        ("POST", ["images"]) => create_image(cfg, st, &req),
        ("GET", ["images"]) => {
            let items: Vec<Value> = st
                .images
                .iter()
                .rev()
                .filter(|i| i.zone == req.zone)
                .filter(|i| req.q("name").is_none_or(|n| i.name.contains(n)))
                .filter(|i| req.q("arch").is_none_or(|a| i.arch == a))
                .map(|i| st.image_json(cfg, i))
                .collect();
            paginate(&req, "images", items)
        }
        ("GET", ["images", id]) => {
            let i = st.image(&req.zone, id)?;
            Ok(Reply::json(
                StatusCode::OK,
                json!({"image": st.image_json(cfg, i)}),
            ))
        }
        ("DELETE", ["images", id]) => {
            let i = st.image(&req.zone, id)?;
            if i.state == "creating" {
                return Err(transient("instance_image", id, "creating"));
            }
            st.images.retain(|i| i.id != *id);
            Ok(Reply::empty(StatusCode::NO_CONTENT))
        }
        _ => Err(err(
            StatusCode::NOT_FOUND,
            "not_found",
            &format!("no route for {} {path}", req.method),
            json!({}),
        )),
    }
}

fn paginate(req: &Req, key: &str, items: Vec<Value>) -> R {
    let num = |name: &str, default: u64| -> Result<u64, Reply> {
        match req.q(name) {
            None => Ok(default),
            Some(s) => s
                .parse::<u64>()
                .map_err(|_| invalid(vec![(name, "format", format!("{name} must be an integer"))])),
        }
    };
    let page = num("page", 1)?;
    let per_page = num("per_page", 50)?;
    if page < 1 {
        return Err(invalid(vec![(
            "page",
            "constraint",
            "page must be at least 1".into(),
        )]));
    }
    if !(1..=100).contains(&per_page) {
        return Err(invalid(vec![(
            "per_page",
            "constraint",
            "per_page must be between 1 and 100".into(),
        )]));
    }
    let total = items.len() as u64;
    let start = ((page - 1) * per_page).min(total) as usize;
    let end = (page * per_page).min(total) as usize;
    let slice = items[start..end].to_vec();
    let last = total.div_ceil(per_page).max(1);
    let base = format!("/instance/v1/zones/{}/{}", req.zone, req.segs.join("/"));
    let link = |p: u64, rel: &str| format!("<{base}?page={p}&per_page={per_page}>; rel=\"{rel}\"");
    let mut links = vec![];
    if page < last {
        links.push(link(page + 1, "next"));
    }
    links.push(link(last, "last"));
    let mut body = Map::new();
    body.insert(key.into(), Value::Array(slice));
    body.insert("total_count".into(), json!(total));
    Ok(Reply::json(StatusCode::OK, Value::Object(body))
        .header(
            header::HeaderName::from_static("x-total-count"),
            total.to_string(),
        )
        .header(header::LINK, links.join(", ")))
}

fn allowed_actions(state: &str) -> Vec<&'static str> {
    match state {
        "stopped" => vec!["poweron", "backup"],
        "stopped in place" => vec!["poweron", "poweroff", "backup"],
        "running" => vec!["poweroff", "terminate", "reboot", "stop_in_place", "backup"],
        _ => vec![],
    }
}

fn str_field<'a>(m: &'a Map<String, Value>, k: &str) -> Result<Option<&'a str>, Reply> {
    match m.get(k) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(_) => Err(invalid(vec![(
            k,
            "format",
            format!("{k} must be a string"),
        )])),
    }
}

fn tags_field(m: &Map<String, Value>) -> Result<Option<Vec<String>>, Reply> {
    match m.get("tags") {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Array(a)) => a
            .iter()
            .map(|t| t.as_str().map(String::from))
            .collect::<Option<Vec<_>>>()
            .map(Some)
            .ok_or_else(|| invalid(vec![("tags", "format", "tags must be strings".into())])),
        Some(_) => Err(invalid(vec![(
            "tags",
            "format",
            "tags must be an array of strings".into(),
        )])),
    }
}

fn check_project(cfg: &Config, m: &Map<String, Value>) -> Result<String, Reply> {
    let p = str_field(m, "project")?;
    match p {
        None => Ok(cfg.project.clone()),
        Some(p) if p == cfg.project => Ok(p.into()),
        Some(p) if !is_uuid(p) => Err(invalid(vec![(
            "project",
            "format",
            "project must be a UUID".into(),
        )])),
        Some(_) => Err(err(
            StatusCode::FORBIDDEN,
            "permissions_denied",
            "insufficient permissions",
            json!({"details": [{"resource": "instance_server", "action": "write"}]}),
        )),
    }
}

fn find_bootscript<'a>(cfg: &'a Config, id: &str) -> Option<&'a Bootscript> {
    cfg.bootscripts.as_ref()?.iter().find(|b| b.id == id)
}

fn valid_boot_type(cfg: &Config, boot_type: &str) -> bool {
    ["local", "rescue"].contains(&boot_type)
        || (cfg.bootscripts.is_some() && boot_type == "bootscript")
}

fn boot_type_help(cfg: &Config) -> &'static str {
    if cfg.bootscripts.is_some() {
        "boot_type must be local, rescue or bootscript"
    } else {
        "boot_type must be local or rescue"
    }
}

/// Legacy mode: the bootscript a create or update body leaves the server
/// with. `boot_type` is the one the server will have, `current` the
/// server's bootscript (`None` on create). An unknown id is 404
/// `instance_bootscript`; `boot_type: bootscript` with no bootscript at all
/// is 400 `required`.
fn legacy_bootscript(
    cfg: &Config,
    m: &Map<String, Value>,
    boot_type: &str,
    current: Option<&str>,
) -> Result<Option<String>, Reply> {
    match str_field(m, "bootscript")? {
        Some(id) => find_bootscript(cfg, id)
            .map(|b| Some(b.id.clone()))
            .ok_or_else(|| not_found("instance_bootscript", id)),
        None if boot_type == "bootscript" && current.is_none() => Err(invalid(vec![(
            "bootscript",
            "required",
            "boot_type bootscript needs a bootscript id".into(),
        )])),
        None => Ok(current.map(String::from)),
    }
}

/// The historical bootscript object (reference §2.4).
fn bootscript_json(cfg: &Config, b: &Bootscript, zone: &str) -> Value {
    let base = format!("http://fake-bootscripts.invalid/{}", b.id);
    json!({
        "id": b.id,
        "title": b.title,
        "kernel": format!("{base}/vmlinuz"),
        "initrd": format!("{base}/initrd.gz"),
        "bootcmdargs": "LINUX_COMMON scaleway boot=local nbd.max_part=16",
        "dtb": "",
        "architecture": b.arch,
        "default": false,
        "public": true,
        "organization": cfg.organization,
        "zone": zone,
    })
}

/// An image UUID or label: its id, arch and root size.
fn resolve_image(
    cfg: &Config,
    st: &State,
    req: &Req,
    image_ref: &str,
) -> Result<(String, String, Option<u64>), Reply> {
    Ok(if is_uuid(image_ref) {
        if let Some(i) = cfg
            .labels
            .values()
            .find(|i| i.id == image_ref || i.sbs_id == image_ref)
        {
            (image_ref.to_string(), i.arch.clone(), Some(ROOT_SIZE))
        } else {
            let img = st
                .images
                .iter()
                .find(|i| i.id == image_ref && i.zone == req.zone)
                .ok_or_else(|| not_found("instance_image", image_ref))?;
            if img.state != "available" {
                return Err(transient("instance_image", image_ref, &img.state));
            }
            let size = st
                .root_snapshot(&img.root_volume)
                .map_or(ROOT_SIZE, |(_, size, _)| size);
            (img.id.clone(), img.arch.clone(), Some(size))
        }
    } else {
        let i = cfg
            .labels
            .get(image_ref)
            .ok_or_else(|| not_found("instance_image", image_ref))?;
        (i.id.clone(), i.arch.clone(), Some(ROOT_SIZE))
    })
}

/// The root volume's type when `POST /servers` does not say: `sbs_volume`
/// for an `instance_sbs` local image or an image whose root is a Block
/// snapshot, else `l_ssd`.
fn default_root_type(cfg: &Config, st: &State, image_id: &str) -> &'static str {
    let sbs_stock = cfg.labels.values().any(|i| i.sbs_id == image_id);
    let sbs_image = st
        .images
        .iter()
        .any(|i| i.id == image_id && st.block_snapshots.iter().any(|b| b.id == i.root_volume));
    if sbs_stock || sbs_image {
        "sbs_volume"
    } else {
        "l_ssd"
    }
}

fn create_server(cfg: &Config, st: &mut State, req: &Req) -> R {
    let m = req.json()?;
    // Today's API: `boot_type: bootscript` is an enum value that no longer
    // exists, refused while the body is read, before the checks of what it
    // means (such as a missing image).
    if cfg.bootscripts.is_none()
        && (m.get("boot_type") == Some(&json!("bootscript"))
            || m.get("bootscript").is_some_and(|v| !v.is_null()))
    {
        return Err(invalid(vec![(
            "boot_type",
            "constraint",
            "bootscripts are no longer supported: use boot_type local or rescue".into(),
        )]));
    }
    // Legacy mode: a bootscript server needs no image.
    let legacy_boot = cfg.bootscripts.is_some() && m.get("boot_type") == Some(&json!("bootscript"));
    let mut details = vec![];
    for k in ["commercial_type", "image", "volumes"] {
        if k == "image" && legacy_boot {
            continue;
        }
        if m.get(k).is_none_or(|v| v.is_null()) {
            details.push((k, "required", format!("{k} is required")));
        }
    }
    if !details.is_empty() {
        return Err(invalid(details));
    }
    let boot_type = str_field(&m, "boot_type")?.unwrap_or("local").to_string();
    let bootscript = match &cfg.bootscripts {
        None => None,
        Some(_) => legacy_bootscript(cfg, &m, &boot_type, None)?,
    };
    if !valid_boot_type(cfg, &boot_type) {
        return Err(invalid(vec![(
            "boot_type",
            "constraint",
            boot_type_help(cfg).into(),
        )]));
    }
    let commercial_type = str_field(&m, "commercial_type")?.unwrap().to_string();
    if !cfg.commercial_types.contains(&commercial_type) {
        return Err(invalid(vec![(
            "commercial_type",
            "constraint",
            format!("unknown commercial type {commercial_type:?}"),
        )]));
    }
    let project = check_project(cfg, &m)?;
    let tags = tags_field(&m)?.unwrap_or_default();
    // `root_size` is `None` without an image: volume "0" needs a size.
    let (image_id, image_arch, root_size) = match str_field(&m, "image")? {
        Some(image_ref) => resolve_image(cfg, st, req, image_ref)?,
        None => {
            let b = bootscript
                .as_ref()
                .and_then(|id| find_bootscript(cfg, id))
                .expect("only a legacy bootscript server may omit the image");
            (String::new(), b.arch.clone(), None)
        }
    };
    let root_type = default_root_type(cfg, st, &image_id);
    let Some(Value::Object(vols)) = m.get("volumes") else {
        return Err(invalid(vec![(
            "volumes",
            "format",
            "volumes must be an object keyed \"0\", \"1\"…".into(),
        )]));
    };
    let id = new_id();
    let name = str_field(&m, "name")?
        .map(String::from)
        .unwrap_or_else(|| format!("scw-{}", &id[..8]));
    // Validate every volume before creating anything.
    let mut new_vols: BTreeMap<u32, Volume> = BTreeMap::new();
    let mut attach: BTreeMap<u32, String> = BTreeMap::new();
    for (k, v) in vols {
        let idx: u32 = k.parse().map_err(|_| {
            invalid(vec![(
                "volumes",
                "format",
                format!("volume key {k:?} is not an index"),
            )])
        })?;
        let Value::Object(v) = v else {
            return Err(invalid(vec![(
                "volumes",
                "format",
                format!("volumes[{k}] must be an object"),
            )]));
        };
        if let Some(vid) = str_field(v, "id")? {
            // An Instance volume, or a Block one (`sbs_volume`).
            let attached = match st.volume(&req.zone, vid) {
                Ok(existing) => existing.server.is_some(),
                Err(not_instance) => match st.block_volume(&req.zone, vid) {
                    Ok(b) if b.status == "creating" => {
                        return Err(transient("block_volume", vid, "creating"))
                    }
                    Ok(b) => b.server.is_some(),
                    Err(_) => return Err(not_instance),
                },
            };
            if attached {
                return Err(still_in_use("the volume is attached to another server"));
            }
            attach.insert(idx, vid.to_string());
            continue;
        }
        let default_type = if idx == 0 { root_type } else { "l_ssd" };
        let volume_type = str_field(v, "volume_type")?
            .unwrap_or(default_type)
            .to_string();
        if !["l_ssd", "sbs_volume", "scratch"].contains(&volume_type.as_str()) {
            return Err(invalid(vec![(
                "volume_type",
                "constraint",
                format!("volume type {volume_type:?} is not supported"),
            )]));
        }
        let size = match (v.get("size"), root_size) {
            (None | Some(Value::Null), Some(root_size)) if idx == 0 => root_size,
            (None | Some(Value::Null), _) => {
                return Err(invalid(vec![(
                    "size",
                    "required",
                    format!("volumes[{k}].size is required"),
                )]))
            }
            (Some(s), _) => s.as_u64().filter(|s| *s > 0).ok_or_else(|| {
                invalid(vec![(
                    "size",
                    "format",
                    "size must be a positive integer (bytes)".into(),
                )])
            })?,
        };
        if let Some(root_size) = root_size.filter(|r| idx == 0 && size < *r) {
            return Err(invalid(vec![(
                "size",
                "constraint",
                format!("the root volume must be at least {root_size} bytes"),
            )]));
        }
        new_vols.insert(
            idx,
            Volume {
                id: new_id(),
                name: str_field(v, "name")?
                    .map(String::from)
                    .unwrap_or_else(|| format!("{name}-vol-{idx}")),
                zone: req.zone.clone(),
                project: project.clone(),
                size,
                volume_type,
                state: "available".into(),
                server: Some(id.clone()),
                creation_date: now_rfc3339(),
            },
        );
    }
    if !new_vols.contains_key(&0) && !attach.contains_key(&0) {
        let Some(root_size) = root_size else {
            return Err(invalid(vec![(
                "size",
                "required",
                "volumes[0].size is required without an image".into(),
            )]));
        };
        new_vols.insert(
            0,
            Volume {
                id: new_id(),
                name: format!("{name}-vol-0"),
                zone: req.zone.clone(),
                project: project.clone(),
                size: root_size,
                volume_type: root_type.into(),
                state: "available".into(),
                server: Some(id.clone()),
                creation_date: now_rfc3339(),
            },
        );
    }
    let mut volumes = BTreeMap::new();
    for (idx, vid) in attach {
        if let Some(v) = st.volumes.iter_mut().find(|v| v.id == vid) {
            v.server = Some(id.clone());
        } else {
            st.attach_block_volume(&vid, &id);
        }
        volumes.insert(idx, vid);
    }
    for (idx, v) in new_vols {
        volumes.insert(idx, v.id.clone());
        if v.volume_type == "sbs_volume" {
            // A Block volume: the Block API shows it, the Instance API's
            // volume routes do not.
            st.block_volumes.push(block::from_server(&v));
        } else {
            st.volumes.push(v);
        }
    }
    let dynamic = m
        .get("dynamic_ip_required")
        .and_then(|v| v.as_bool())
        .unwrap_or(true);
    let public_address = if dynamic { cfg.public_address } else { None };
    let now = now_rfc3339();
    let server = Server {
        id: id.clone(),
        name: name.clone(),
        zone: req.zone.clone(),
        project,
        commercial_type,
        arch: image_arch,
        state: "stopped".into(),
        state_detail: String::new(),
        boot_type,
        tags,
        image: image_id,
        bootscript,
        volumes,
        public_address,
        public_ip_id: public_address.map(|_| new_id()),
        mac_address: format!(
            "de:00:00:{:02x}:{:02x}:{:02x}",
            id.as_bytes()[0],
            id.as_bytes()[1],
            id.as_bytes()[2]
        ),
        user_data: BTreeMap::new(),
        creation_date: now.clone(),
        modification_date: now,
    };
    let body = json!({"server": st.server_json(cfg, &server)});
    st.servers.push(server);
    Ok(Reply::json(StatusCode::CREATED, body).header(
        header::LOCATION,
        format!("/instance/v1/zones/{}/servers/{id}", req.zone),
    ))
}

fn list_servers(cfg: &Config, st: &mut State, req: &Req) -> R {
    let tags: Vec<&str> = req
        .q("tags")
        .map(|t| t.split(',').filter(|s| !s.is_empty()).collect())
        .unwrap_or_default();
    let items: Vec<Value> = st
        .servers
        .iter()
        .rev()
        .filter(|s| s.zone == req.zone)
        .filter(|s| tags.iter().all(|t| s.tags.iter().any(|x| x == t)))
        .filter(|s| req.q("name").is_none_or(|n| s.name.contains(n)))
        .filter(|s| req.q("state").is_none_or(|n| s.state == n))
        .filter(|s| req.q("project").is_none_or(|n| s.project == n))
        .map(|s| st.server_json(cfg, s))
        .collect();
    paginate(req, "servers", items)
}

fn update_server(cfg: &Config, st: &mut State, req: &Req, id: &str) -> R {
    let current = st.server(&req.zone, id)?;
    let m = req.json()?;
    let name = str_field(&m, "name")?.map(String::from);
    let tags = tags_field(&m)?;
    let boot_type = str_field(&m, "boot_type")?;
    if boot_type == Some("bootscript") && cfg.bootscripts.is_none() {
        return Err(invalid(vec![(
            "boot_type",
            "constraint",
            "bootscripts are no longer supported: use boot_type local or rescue".into(),
        )]));
    }
    if let Some(b) = boot_type.filter(|b| !valid_boot_type(cfg, b)) {
        return Err(invalid(vec![(
            "boot_type",
            "constraint",
            format!("{} (got {b:?})", boot_type_help(cfg)),
        )]));
    }
    let bootscript = match cfg.bootscripts {
        Some(_) => legacy_bootscript(
            cfg,
            &m,
            boot_type.unwrap_or(&current.boot_type),
            current.bootscript.as_deref(),
        )?,
        None => None,
    };
    let boot_type = boot_type.map(String::from);
    let s = st.server_mut(&req.zone, id)?;
    if let Some(n) = name {
        s.name = n;
    }
    if let Some(t) = tags {
        s.tags = t;
    }
    if let Some(b) = boot_type {
        s.boot_type = b;
    }
    s.bootscript = bootscript;
    s.modification_date = now_rfc3339();
    let s = st.server(&req.zone, id)?;
    Ok(Reply::json(
        StatusCode::OK,
        json!({"server": st.server_json(cfg, s)}),
    ))
}

fn delete_server(st: &mut State, req: &Req, id: &str) -> R {
    let s = st.server(&req.zone, id)?;
    match s.state.as_str() {
        "stopped" | "stopped in place" => {}
        "starting" | "stopping" => return Err(transient("instance_server", id, &s.state)),
        _ => return Err(precondition("server should be stopped")),
    }
    st.servers.retain(|s| s.id != id);
    st.pending.remove(id);
    for v in st.volumes.iter_mut() {
        if v.server.as_deref() == Some(id) {
            v.server = None;
        }
    }
    st.detach_block_volumes(id);
    Ok(Reply::empty(StatusCode::NO_CONTENT))
}

fn server_action(cfg: &Config, st: &mut State, req: &Req, id: &str, fired: &mut Vec<Server>) -> R {
    let m = req.json()?;
    let Some(action) = str_field(&m, "action")? else {
        return Err(invalid(vec![(
            "action",
            "required",
            "action is required".into(),
        )]));
    };
    let known = [
        "poweron",
        "poweroff",
        "stop_in_place",
        "reboot",
        "terminate",
        "backup",
        "enable_routed_ip",
    ];
    if !known.contains(&action) {
        return Err(invalid(vec![(
            "action",
            "constraint",
            format!("unknown action {action:?}"),
        )]));
    }
    let s = st.server(&req.zone, id)?;
    if ["starting", "stopping"].contains(&s.state.as_str()) {
        return Err(transient("instance_server", id, &s.state));
    }
    if !allowed_actions(&s.state).contains(&action) {
        let message = if s.state == "running" {
            "server should be stopped"
        } else {
            "server should be running"
        };
        return Err(precondition(message));
    }
    let (now_state, step) = match action {
        "poweron" | "reboot" => ("starting", Step::ServerTo("running")),
        "poweroff" => ("stopping", Step::ServerTo("stopped")),
        "stop_in_place" => ("stopping", Step::ServerTo("stopped in place")),
        "terminate" => ("stopping", Step::ServerTerminate),
        _ => {
            return Err(invalid(vec![(
                "action",
                "constraint",
                format!("the fake does not implement {action:?}"),
            )]))
        }
    };
    let due = cfg.delay.map(|d| Instant::now() + d);
    st.pending.insert(id.to_string(), (due, step));
    let s = st.server_mut(&req.zone, id)?;
    s.state = now_state.into();
    s.modification_date = now_rfc3339();
    if action == "poweron" {
        fired.push(s.clone());
    }
    let task = st.task(
        &req.zone,
        &format!("server_{action}"),
        &format!("/servers/{id}/action"),
        &format!("/servers/{id}"),
    );
    Ok(Reply::json(StatusCode::ACCEPTED, json!({ "task": task })))
}

fn create_snapshot(cfg: &Config, st: &mut State, req: &Req) -> R {
    let m = req.json()?;
    if m.contains_key("bucket") {
        return Err(invalid(vec![(
            "bucket",
            "unknown",
            "the fake does not import snapshots from Object Storage".into(),
        )]));
    }
    let Some(volume_id) = str_field(&m, "volume_id")? else {
        return Err(invalid(vec![(
            "volume_id",
            "required",
            "volume_id is required".into(),
        )]));
    };
    let project = check_project(cfg, &m)?;
    let tags = tags_field(&m)?.unwrap_or_default();
    let vol = st.volume(&req.zone, volume_id)?.clone();
    if vol.state != "available" {
        return Err(transient("instance_volume", volume_id, &vol.state));
    }
    if let Some(sid) = &vol.server {
        let server = st.server(&req.zone, sid)?;
        if vol.volume_type != "sbs_volume"
            && !["stopped", "stopped in place"].contains(&server.state.as_str())
        {
            return Err(precondition("server should be stopped"));
        }
    }
    let id = new_id();
    let name = str_field(&m, "name")?
        .map(String::from)
        .unwrap_or_else(|| format!("snp-{}", &id[..8]));
    let volume_type = str_field(&m, "volume_type")?
        .unwrap_or(&vol.volume_type)
        .to_string();
    let snap = Snapshot {
        id: id.clone(),
        name,
        zone: req.zone.clone(),
        project,
        state: "snapshotting".into(),
        size: vol.size,
        volume_type,
        base_volume: Some((vol.id.clone(), vol.name.clone())),
        tags,
        creation_date: now_rfc3339(),
    };
    st.volumes
        .iter_mut()
        .find(|v| v.id == vol.id)
        .unwrap()
        .state = "snapshotting".into();
    st.pending.insert(
        id.clone(),
        (
            cfg.delay.map(|d| Instant::now() + d),
            Step::SnapshotAvailable,
        ),
    );
    let body = json!({
        "snapshot": snapshot_json(cfg, &snap),
        "task": st.task(&req.zone, "volume_snapshot", &format!("/volumes/{}", vol.id), &format!("/snapshots/{id}")),
    });
    st.snapshots.push(snap);
    Ok(Reply::json(StatusCode::CREATED, body))
}

fn create_image(cfg: &Config, st: &mut State, req: &Req) -> R {
    let m = req.json()?;
    let mut details = vec![];
    for k in ["name", "root_volume", "arch"] {
        if m.get(k).is_none_or(|v| v.is_null()) {
            details.push((k, "required", format!("{k} is required")));
        }
    }
    if !details.is_empty() {
        return Err(invalid(details));
    }
    if m.contains_key("default_bootscript") {
        return Err(invalid(vec![(
            "default_bootscript",
            "unknown",
            "bootscripts are no longer supported".into(),
        )]));
    }
    let name = str_field(&m, "name")?.unwrap().to_string();
    let arch = str_field(&m, "arch")?.unwrap().to_string();
    if !["x86_64", "arm", "arm64"].contains(&arch.as_str()) {
        return Err(invalid(vec![(
            "arch",
            "constraint",
            "arch must be x86_64, arm or arm64".into(),
        )]));
    }
    let root = str_field(&m, "root_volume")?.unwrap().to_string();
    let project = check_project(cfg, &m)?;
    let tags = tags_field(&m)?.unwrap_or_default();
    // An Instance snapshot, or a Block snapshot (`sbs_snapshot`), which
    // must be `available` (reference §7, packer-plugin-scaleway#39).
    match st.snapshot(&req.zone, &root) {
        Ok(snap) if snap.state != "available" => {
            return Err(transient("instance_snapshot", &root, &snap.state));
        }
        Ok(_) => {}
        Err(not_instance) => match st
            .block_snapshots
            .iter()
            .find(|s| s.id == root && s.zone == req.zone)
        {
            None => return Err(not_instance),
            Some(b) if b.status != "available" => {
                return Err(err(
                    StatusCode::BAD_REQUEST,
                    "invalid_arguments",
                    "snapshot is not available",
                    json!({"details": [{
                        "argument_name": "root_volume",
                        "reason": "constraint",
                        "help_message": format!("snapshot is not available (status {})", b.status),
                    }]}),
                ));
            }
            Some(_) => {}
        },
    }
    let id = new_id();
    let img = Image {
        id: id.clone(),
        name,
        zone: req.zone.clone(),
        project,
        arch,
        state: "creating".into(),
        root_volume: root,
        tags,
        public: m.get("public").and_then(|p| p.as_bool()).unwrap_or(false),
        creation_date: now_rfc3339(),
    };
    st.pending.insert(
        id.clone(),
        (cfg.delay.map(|d| Instant::now() + d), Step::ImageAvailable),
    );
    let body = json!({"image": st.image_json(cfg, &img)});
    st.images.push(img);
    Ok(Reply::json(StatusCode::CREATED, body).header(
        header::LOCATION,
        format!("/instance/v1/zones/{}/images/{id}", req.zone),
    ))
}

fn snapshot_json(cfg: &Config, s: &Snapshot) -> Value {
    json!({
        "id": s.id,
        "name": s.name,
        "organization": cfg.organization,
        "project": s.project,
        "state": s.state,
        "size": s.size,
        "volume_type": s.volume_type,
        "base_volume": s.base_volume.as_ref().map(|(id, name)| json!({"id": id, "name": name})),
        "tags": s.tags,
        "zone": s.zone,
        "error_reason": null,
        "creation_date": s.creation_date,
        "modification_date": s.creation_date,
    })
}

impl State {
    /// Applies due transitions (all of them with `force`).
    fn tick(&mut self, force: bool) {
        let now = Instant::now();
        let due: Vec<(String, Step)> = self
            .pending
            .iter()
            .filter(|(_, (at, _))| at.map_or(force, |at| force || at <= now))
            .map(|(id, (_, step))| (id.clone(), step.clone()))
            .collect();
        for (id, step) in due {
            self.pending.remove(&id);
            let date = now_rfc3339();
            match step {
                Step::ServerTo(state) => {
                    if let Some(s) = self.servers.iter_mut().find(|s| s.id == id) {
                        s.state = state.into();
                        s.modification_date = date;
                    }
                }
                Step::ServerTerminate => {
                    self.servers.retain(|s| s.id != id);
                    self.volumes.retain(|v| {
                        v.server.as_deref() != Some(&id) || v.volume_type == "sbs_volume"
                    });
                    for v in self.volumes.iter_mut() {
                        if v.server.as_deref() == Some(&id) {
                            v.server = None;
                        }
                    }
                    self.detach_block_volumes(&id);
                }
                Step::SnapshotAvailable => {
                    if let Some(s) = self.snapshots.iter_mut().find(|s| s.id == id) {
                        s.state = "available".into();
                        if let Some((vid, _)) = &s.base_volume {
                            if let Some(v) = self.volumes.iter_mut().find(|v| &v.id == vid) {
                                v.state = "available".into();
                            }
                        }
                    }
                }
                Step::ImageAvailable => {
                    if let Some(i) = self.images.iter_mut().find(|i| i.id == id) {
                        i.state = "available".into();
                    }
                }
                Step::BlockSnapshotDone(error) => self.block_snapshot_done(&id, error, date),
                Step::BlockVolumeAvailable => self.block_volume_available(&id, date),
            }
        }
    }

    fn task(&mut self, zone: &str, description: &str, from: &str, result: &str) -> Value {
        self.tasks += 1;
        json!({
            "id": new_id(),
            "description": description,
            "status": "pending",
            "href_from": from,
            "href_result": result,
            "progress": 0,
            "started_at": now_rfc3339(),
            "terminated_at": null,
            "zone": zone,
        })
    }

    fn server(&self, zone: &str, id: &str) -> Result<&Server, Reply> {
        self.servers
            .iter()
            .find(|s| s.id == id && s.zone == zone)
            .ok_or_else(|| not_found("instance_server", id))
    }
    fn server_mut(&mut self, zone: &str, id: &str) -> Result<&mut Server, Reply> {
        self.servers
            .iter_mut()
            .find(|s| s.id == id && s.zone == zone)
            .ok_or_else(|| not_found("instance_server", id))
    }
    fn volume(&self, zone: &str, id: &str) -> Result<&Volume, Reply> {
        self.volumes
            .iter()
            .find(|v| v.id == id && v.zone == zone)
            .ok_or_else(|| not_found("instance_volume", id))
    }
    fn snapshot(&self, zone: &str, id: &str) -> Result<&Snapshot, Reply> {
        self.snapshots
            .iter()
            .find(|s| s.id == id && s.zone == zone)
            .ok_or_else(|| not_found("instance_snapshot", id))
    }
    fn image(&self, zone: &str, id: &str) -> Result<&Image, Reply> {
        self.images
            .iter()
            .find(|i| i.id == id && i.zone == zone)
            .ok_or_else(|| not_found("instance_image", id))
    }

    /// An image's root snapshot, Instance or Block: name, size and
    /// `volume_type` (`sbs_snapshot` for a Block one).
    fn root_snapshot(&self, id: &str) -> Option<(String, u64, String)> {
        if let Some(s) = self.snapshots.iter().find(|s| s.id == id) {
            return Some((s.name.clone(), s.size, s.volume_type.clone()));
        }
        self.block_snapshots
            .iter()
            .find(|s| s.id == id)
            .map(|s| (s.name.clone(), s.size, "sbs_snapshot".to_string()))
    }

    fn volume_json(&self, cfg: &Config, v: &Volume) -> Value {
        let server = v.server.as_ref().map(|sid| {
            let name = self
                .servers
                .iter()
                .find(|s| &s.id == sid)
                .map(|s| s.name.clone())
                .unwrap_or_default();
            json!({"id": sid, "name": name})
        });
        json!({
            "id": v.id,
            "name": v.name,
            "size": v.size,
            "volume_type": v.volume_type,
            "state": v.state,
            "server": server,
            "organization": cfg.organization,
            "project": v.project,
            "zone": v.zone,
            "export_uri": null,
            "tags": [],
            "creation_date": v.creation_date,
            "modification_date": v.creation_date,
        })
    }

    fn image_json(&self, cfg: &Config, i: &Image) -> Value {
        let root = self.root_snapshot(&i.root_volume);
        json!({
            "id": i.id,
            "name": i.name,
            "arch": i.arch,
            "state": i.state,
            "root_volume": {
                "id": i.root_volume,
                "name": root.as_ref().map(|(name, _, _)| name.clone()).unwrap_or_default(),
                "size": root.as_ref().map_or(0, |(_, size, _)| *size),
                "volume_type": root.map(|(_, _, t)| t).unwrap_or_default(),
            },
            "extra_volumes": {},
            "from_server": "",
            "public": i.public,
            "tags": i.tags,
            "organization": cfg.organization,
            "project": i.project,
            "zone": i.zone,
            "creation_date": i.creation_date,
            "modification_date": i.creation_date,
            "default_bootscript": null,
        })
    }

    fn server_json(&self, cfg: &Config, s: &Server) -> Value {
        let mut volumes = Map::new();
        for (idx, vid) in &s.volumes {
            let j = match self.volumes.iter().find(|v| &v.id == vid) {
                Some(v) => Some(self.volume_json(cfg, v)),
                None => self
                    .block_volumes
                    .iter()
                    .find(|v| &v.id == vid)
                    .map(|v| block::server_volume_json(cfg, v)),
            };
            if let Some(mut j) = j {
                j["boot"] = json!(*idx == 0);
                j["server"] = json!({"id": s.id, "name": s.name});
                volumes.insert(idx.to_string(), j);
            }
        }
        let image = match cfg
            .labels
            .values()
            .find(|i| i.id == s.image || i.sbs_id == s.image)
        {
            Some(i) => json!({"id": s.image, "name": i.name, "arch": i.arch, "public": true,
                               "state": "available", "zone": s.zone}),
            None => match self.images.iter().find(|i| i.id == s.image) {
                Some(i) => self.image_json(cfg, i),
                None => json!({"id": s.image}),
            },
        };
        let public_ip = s.public_address.map(|a| {
            json!({
                "id": s.public_ip_id,
                "address": a.to_string(),
                "gateway": "62.210.0.1",
                "netmask": "32",
                "family": if a.is_ipv4() { "inet" } else { "inet6" },
                "dynamic": true,
                "provisioning_mode": "dhcp",
            })
        });
        json!({
            "id": s.id,
            "name": s.name,
            "hostname": s.name,
            "organization": cfg.organization,
            "project": s.project,
            "commercial_type": s.commercial_type,
            "arch": s.arch,
            "state": s.state,
            "state_detail": s.state_detail,
            "boot_type": s.boot_type,
            "tags": s.tags,
            "allowed_actions": allowed_actions(&s.state),
            "image": if s.image.is_empty() { Value::Null } else { image },
            "volumes": volumes,
            "public_ip": public_ip,
            "public_ips": public_ip.iter().collect::<Vec<_>>(),
            "dynamic_ip_required": s.public_address.is_some(),
            "private_ip": null,
            "ipv6": null,
            "mac_address": s.mac_address,
            "location": {"zone_id": s.zone, "cluster_id": "1", "hypervisor_id": "1", "node_id": "1", "platform_id": "1"},
            "zone": s.zone,
            "creation_date": s.creation_date,
            "modification_date": s.modification_date,
            "bootscript": s.bootscript.as_deref()
                .and_then(|id| find_bootscript(cfg, id))
                .map(|b| bootscript_json(cfg, b, &s.zone)),
            "security_group": {"id": "00000000-0000-0000-0000-000000000000", "name": "default"},
            "placement_group": null,
            "private_nics": [],
            "protected": false,
            "routed_ip_enabled": true,
        })
    }
}

/// `(method, path)` with the zone prefix cut and ids as `{id}`; 429s left
/// out, and repeats of one call in a row (polling) counted once.
pub fn call_sequence(calls: &[Call]) -> Vec<String> {
    let id =
        regex::Regex::new("[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}").unwrap();
    let mut sequence: Vec<String> = Vec::new();
    for call in calls.iter().filter(|c| c.status != 429) {
        let path = call
            .path
            .strip_prefix("/instance/v1/zones/fr-par-1")
            .unwrap_or(&call.path);
        let line = format!("{} {}", call.method, id.replace_all(path, "{id}"));
        if sequence.last() != Some(&line) {
            sequence.push(line);
        }
    }
    sequence
}
