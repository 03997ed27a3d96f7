//! The Block API (`/block/v1/zones/{zone}/…`, reference §3 and §7): SBS
//! snapshots (imported from Object Storage, or of a Block volume) and
//! volumes. See the parent module's doc, "Block API".

use std::time::{Duration, Instant};

use axum::http::StatusCode;
use serde_json::{json, Map, Value};

use super::{
    err, invalid, is_uuid, new_id, not_found, now_rfc3339, still_in_use, str_field, tags_field,
    transient, Config, Inner, Reply, Req, State, Step, R,
};

/// 1 GB and 1 TB (SI), the import limits of reference §7.
pub(super) const MIN_IMPORT: u64 = 1_000_000_000;
pub(super) const MAX_IMPORT: u64 = 1_000_000_000_000;

/// How many bytes of the object an import reads: the QCOW2 header.
const HEADER_BYTES: u64 = 4096;

/// A Block snapshot as the fake holds it.
#[derive(Clone, Debug)]
pub struct BlockSnapshot {
    pub id: String,
    pub name: String,
    pub zone: String,
    pub project: String,
    /// `creating`, `available` or `error`.
    pub status: String,
    /// Bytes: the import's `size`, else the QCOW2's virtual size (0 if
    /// the object could not be read); a volume's size.
    pub size: u64,
    pub tags: Vec<String>,
    /// The volume it was taken from: `(id, name)`.
    pub parent_volume: Option<(String, String)>,
    /// An import's object.
    pub bucket: Option<String>,
    pub key: Option<String>,
    /// An import's `size` argument, as sent.
    pub requested_size: Option<u64>,
    /// Why it ended in `error`. The API has no such field: tests read it
    /// here, the API's clients only see `status: error`.
    pub error_reason: Option<String>,
    pub created_at: String,
    pub updated_at: String,
}

/// A Block volume as the fake holds it.
#[derive(Clone, Debug)]
pub struct BlockVolume {
    pub id: String,
    pub name: String,
    pub zone: String,
    pub project: String,
    /// `sbs_5k` or `sbs_15k`.
    pub volume_type: String,
    pub perf_iops: u64,
    pub size: u64,
    /// `creating`, `available` or `in_use`.
    pub status: String,
    pub parent_snapshot_id: Option<String>,
    /// The Instance server it is attached to.
    pub server: Option<String>,
    pub tags: Vec<String>,
    pub created_at: String,
    pub updated_at: String,
    pub last_detached_at: Option<String>,
}

/// An import's object as read before routing: its first bytes, or `None`
/// if S3 has no such object (`Err`: S3 could not be asked).
pub(super) type ObjectRead = Result<Option<Vec<u8>>, String>;

pub(super) fn is_import_path(path: &str) -> bool {
    path.strip_prefix("/block/v1/zones/")
        .and_then(|r| r.split_once('/'))
        .is_some_and(|(_, rest)| {
            rest.trim_end_matches('/') == "snapshots/import-from-object-storage"
        })
}

/// Reads the first bytes of an import's object from the configured Object
/// Storage endpoint; `None` when there is nothing to read (no endpoint, no
/// bucket or key in the body: the route refuses those).
pub(super) async fn read_object(inner: &Inner, body: &[u8]) -> Option<ObjectRead> {
    let endpoint = inner.cfg.lock().unwrap().object_storage.clone()?;
    let v: Value = serde_json::from_slice(body).ok()?;
    let bucket = v.get("bucket")?.as_str()?;
    let key = v.get("key")?.as_str()?;
    if bucket.is_empty() || key.is_empty() {
        return None;
    }
    let mut url = reqwest::Url::parse(&endpoint).ok()?;
    url.path_segments_mut()
        .ok()?
        .clear()
        .push(bucket)
        .extend(key.split('/'));
    let read = async {
        let resp = reqwest::Client::new()
            .get(url)
            // moto checks no signature, but refuses anonymous reads.
            .header("authorization", "AWS fake-scaleway:unsigned")
            .header("range", format!("bytes=0-{}", HEADER_BYTES - 1))
            .timeout(Duration::from_secs(10))
            .send()
            .await
            .map_err(|e| format!("Object Storage: {e}"))?;
        match resp.status().as_u16() {
            200 | 206 => Ok(Some(
                resp.bytes()
                    .await
                    .map_err(|e| format!("Object Storage: {e}"))?
                    .to_vec(),
            )),
            // An empty object: a range past its end.
            416 => Ok(Some(vec![])),
            404 => Ok(None),
            s => Err(format!(
                "Object Storage answered {s}: {}",
                resp.text().await.unwrap_or_default()
            )),
        }
    };
    Some(read.await)
}

/// What a QCOW2 header says, or why it cannot be imported.
fn check_qcow2(header: &[u8]) -> Result<u64, String> {
    let be32 = |o: usize| u32::from_be_bytes(header[o..o + 4].try_into().unwrap());
    let be64 = |o: usize| u64::from_be_bytes(header[o..o + 8].try_into().unwrap());
    if header.len() < 72 || &header[..4] != b"QFI\xfb" {
        return Err("the object is not a QCOW2 image (no QFI\\xfb magic)".into());
    }
    let version = be32(4);
    if !(2..=3).contains(&version) {
        return Err(format!("unsupported QCOW2 version {version}"));
    }
    if be64(8) != 0 {
        return Err("QCOW2 images with a backing file are not supported".into());
    }
    if be32(32) != 0 {
        return Err("encrypted QCOW2 images are not supported".into());
    }
    if version == 3 && header.len() >= 105 {
        let incompatible = be64(72);
        let header_length = be32(100);
        let zstd_type = header_length >= 105 && header[104] == 1;
        if zstd_type || (incompatible & (1 << 3) != 0 && header[104] == 1) {
            return Err("zstd-compressed QCOW2 images are not supported".into());
        }
    }
    Ok(be64(24))
}

pub(super) fn route(cfg: &Config, st: &mut State, req: &Req) -> R {
    let segs: Vec<&str> = req.segs.iter().map(|s| s.as_str()).collect();
    match (req.method.as_str(), segs.as_slice()) {
        ("POST", ["snapshots", "import-from-object-storage"]) => import(cfg, st, req),
        ("POST", ["snapshots"]) => create_snapshot(cfg, st, req),
        ("GET", ["snapshots"]) => {
            let tags = req.all("tags");
            let items: Vec<Value> = st
                .block_snapshots
                .iter()
                .filter(|s| s.zone == req.zone)
                .filter(|s| req.q("name").is_none_or(|n| s.name.contains(n)))
                .filter(|s| req.q("project_id").is_none_or(|p| s.project == p))
                .filter(|s| {
                    req.q("volume_id")
                        .is_none_or(|v| s.parent_volume.as_ref().is_some_and(|(id, _)| id == v))
                })
                .filter(|s| tags.iter().all(|t| s.tags.iter().any(|x| x == t)))
                .map(|s| st.block_snapshot_json(s))
                .collect();
            paginate(req, "snapshots", items)
        }
        ("GET", ["snapshots", id]) => {
            let s = st.block_snapshot(&req.zone, id)?;
            Ok(Reply::json(StatusCode::OK, st.block_snapshot_json(s)))
        }
        ("PATCH", ["snapshots", id]) => {
            let m = req.json()?;
            let name = str_field(&m, "name")?.map(String::from);
            let tags = tags_field(&m)?;
            let s = st.block_snapshot_mut(&req.zone, id)?;
            if let Some(n) = name {
                s.name = n;
            }
            if let Some(t) = tags {
                s.tags = t;
            }
            s.updated_at = now_rfc3339();
            let s = st.block_snapshot(&req.zone, id)?;
            Ok(Reply::json(StatusCode::OK, st.block_snapshot_json(s)))
        }
        ("DELETE", ["snapshots", id]) => {
            let s = st.block_snapshot(&req.zone, id)?;
            if s.status == "creating" {
                return Err(transient("block_snapshot", id, "creating"));
            }
            if st.images.iter().any(|i| i.root_volume == *id) {
                return Err(still_in_use(
                    "delete the images that use the snapshot first",
                ));
            }
            st.block_snapshots.retain(|s| s.id != *id);
            st.pending.remove(*id);
            Ok(Reply::empty(StatusCode::NO_CONTENT))
        }
        ("POST", ["volumes"]) => create_volume(cfg, st, req),
        ("GET", ["volumes"]) => {
            let tags = req.all("tags");
            let items: Vec<Value> = st
                .block_volumes
                .iter()
                .filter(|v| v.zone == req.zone)
                .filter(|v| req.q("name").is_none_or(|n| v.name.contains(n)))
                .filter(|v| req.q("project_id").is_none_or(|p| v.project == p))
                .filter(|v| req.q("volume_type").is_none_or(|t| v.volume_type == t))
                .filter(|v| {
                    req.q("product_resource_id")
                        .is_none_or(|r| v.server.as_deref() == Some(r))
                })
                .filter(|v| tags.iter().all(|t| v.tags.iter().any(|x| x == t)))
                .map(block_volume_json)
                .collect();
            paginate(req, "volumes", items)
        }
        ("GET", ["volumes", id]) => {
            let v = st.block_volume(&req.zone, id)?;
            Ok(Reply::json(StatusCode::OK, block_volume_json(v)))
        }
        ("DELETE", ["volumes", id]) => {
            let v = st.block_volume(&req.zone, id)?;
            if v.server.is_some() {
                return Err(still_in_use("detach the volume from its server first"));
            }
            if v.status == "creating" {
                return Err(transient("block_volume", id, "creating"));
            }
            st.block_volumes.retain(|v| v.id != *id);
            st.pending.remove(*id);
            Ok(Reply::empty(StatusCode::NO_CONTENT))
        }
        _ => Err(err(
            StatusCode::NOT_FOUND,
            "not_found",
            &format!(
                "no route for {} /block/v1/zones/{}/{}",
                req.method,
                req.zone,
                req.segs.join("/")
            ),
            json!({}),
        )),
    }
}

/// The Block API's pagination: `page` (from 1) and `page_size` (1..=100,
/// default 50); `{key: [...], total_count}`, no headers.
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
    let per_page = num("page_size", 50)?;
    if page < 1 {
        return Err(invalid(vec![(
            "page",
            "constraint",
            "page must be at least 1".into(),
        )]));
    }
    if !(1..=100).contains(&per_page) {
        return Err(invalid(vec![(
            "page_size",
            "constraint",
            "page_size must be between 1 and 100".into(),
        )]));
    }
    let total = items.len() as u64;
    let start = ((page - 1) * per_page).min(total) as usize;
    let end = (page * per_page).min(total) as usize;
    let mut body = Map::new();
    body.insert(key.into(), Value::Array(items[start..end].to_vec()));
    body.insert("total_count".into(), json!(total));
    Ok(Reply::json(StatusCode::OK, Value::Object(body)))
}

/// `project_id`: the fake's project by default; another UUID is 403, not
/// a UUID 400.
fn check_project_id(cfg: &Config, m: &Map<String, Value>) -> Result<String, Reply> {
    match str_field(m, "project_id")? {
        None => Ok(cfg.project.clone()),
        Some(p) if p == cfg.project => Ok(p.into()),
        Some(p) if !is_uuid(p) => Err(invalid(vec![(
            "project_id",
            "format",
            "project_id must be a UUID".into(),
        )])),
        Some(_) => Err(err(
            StatusCode::FORBIDDEN,
            "permissions_denied",
            "insufficient permissions",
            json!({"details": [{"resource": "block_snapshot", "action": "write"}]}),
        )),
    }
}

fn required_str<'a>(m: &'a Map<String, Value>, k: &'static str) -> Result<&'a str, Reply> {
    match str_field(m, k)? {
        Some(s) if !s.is_empty() => Ok(s),
        _ => Err(invalid(vec![(k, "required", format!("{k} is required"))])),
    }
}

fn size_field(m: &Map<String, Value>, k: &str) -> Result<Option<u64>, Reply> {
    match m.get(k) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => {
            // The SDKs send sizes as integers (JS: numbers; some clients
            // quote uint64s), accept both.
            let n = v
                .as_u64()
                .or_else(|| v.as_str().and_then(|s| s.parse().ok()))
                .filter(|n| *n > 0);
            n.map(Some).ok_or_else(|| {
                invalid(vec![(
                    k,
                    "format",
                    format!("{k} must be a positive integer (bytes)"),
                )])
            })
        }
    }
}

fn due(cfg: &Config) -> Option<Instant> {
    cfg.delay.map(|d| Instant::now() + d)
}

fn import(cfg: &Config, st: &mut State, req: &Req) -> R {
    let m = req.json()?;
    let mut details = vec![];
    for k in ["bucket", "key", "name"] {
        if str_field(&m, k)?.is_none_or(str::is_empty) {
            details.push((k, "required", format!("{k} is required")));
        }
    }
    if !details.is_empty() {
        return Err(invalid(details));
    }
    let bucket = required_str(&m, "bucket")?.to_string();
    let key = required_str(&m, "key")?.to_string();
    let name = required_str(&m, "name")?.to_string();
    let project = check_project_id(cfg, &m)?;
    let tags = tags_field(&m)?.unwrap_or_default();
    let requested_size = size_field(&m, "size")?;
    if !(key.ends_with(".qcow2") || key.ends_with(".qcow")) {
        return Err(invalid(vec![(
            "key",
            "constraint",
            "the object must be a QCOW2 image whose key ends in .qcow2 or .qcow".into(),
        )]));
    }
    if let Some(size) = requested_size.filter(|s| !(MIN_IMPORT..=MAX_IMPORT).contains(s)) {
        return Err(invalid(vec![(
            "size",
            "constraint",
            format!("size must be between {MIN_IMPORT} and {MAX_IMPORT} bytes (got {size})"),
        )]));
    }
    if cfg.object_storage.is_none() {
        return Err(err(
            StatusCode::BAD_REQUEST,
            "invalid_request_error",
            "the fake has no Object Storage: start it with Builder::object_storage(endpoint)",
            json!({}),
        ));
    }
    let object = req
        .object
        .clone()
        .expect("an import's object is read before routing");
    // Content problems: the snapshot is created and ends in `error`.
    let checked: Result<u64, String> = match object {
        Err(e) => Err(e),
        Ok(None) => Err(format!("object {bucket}/{key} not found")),
        Ok(Some(header)) => check_qcow2(&header).and_then(|virtual_size| match requested_size {
            Some(s) if s < virtual_size => Err(format!(
                "size {s} is smaller than the image's virtual size {virtual_size}"
            )),
            Some(_) => Ok(virtual_size),
            None if !(MIN_IMPORT..=MAX_IMPORT).contains(&virtual_size) => Err(format!(
                "the image's virtual size {virtual_size} is not between {MIN_IMPORT} and \
                     {MAX_IMPORT} bytes"
            )),
            None => Ok(virtual_size),
        }),
    };
    let (size, error) = match checked {
        Ok(virtual_size) => {
            let error = st.fail_imports.pop_front();
            (requested_size.unwrap_or(virtual_size), error)
        }
        Err(reason) => (requested_size.unwrap_or(0), Some(reason)),
    };
    let now = now_rfc3339();
    let snap = BlockSnapshot {
        id: new_id(),
        name,
        zone: req.zone.clone(),
        project,
        status: "creating".into(),
        size,
        tags,
        parent_volume: None,
        bucket: Some(bucket),
        key: Some(key),
        requested_size,
        error_reason: None,
        created_at: now.clone(),
        updated_at: now,
    };
    st.pending
        .insert(snap.id.clone(), (due(cfg), Step::BlockSnapshotDone(error)));
    let body = st.block_snapshot_json(&snap);
    st.block_snapshots.push(snap);
    Ok(Reply::json(StatusCode::OK, body))
}

fn create_snapshot(cfg: &Config, st: &mut State, req: &Req) -> R {
    let m = req.json()?;
    let volume_id = required_str(&m, "volume_id")?.to_string();
    let project = check_project_id(cfg, &m)?;
    let tags = tags_field(&m)?.unwrap_or_default();
    let vol = st.block_volume(&req.zone, &volume_id)?.clone();
    if vol.status == "creating" {
        return Err(transient("block_volume", &volume_id, "creating"));
    }
    let id = new_id();
    let name = str_field(&m, "name")?
        .map(String::from)
        .unwrap_or_else(|| format!("snp-{}", &id[..8]));
    let now = now_rfc3339();
    let snap = BlockSnapshot {
        id: id.clone(),
        name,
        zone: req.zone.clone(),
        project,
        status: "creating".into(),
        size: vol.size,
        tags,
        parent_volume: Some((vol.id.clone(), vol.name.clone())),
        bucket: None,
        key: None,
        requested_size: None,
        error_reason: None,
        created_at: now.clone(),
        updated_at: now,
    };
    st.pending
        .insert(id, (due(cfg), Step::BlockSnapshotDone(None)));
    let body = st.block_snapshot_json(&snap);
    st.block_snapshots.push(snap);
    Ok(Reply::json(StatusCode::OK, body))
}

fn create_volume(cfg: &Config, st: &mut State, req: &Req) -> R {
    let m = req.json()?;
    let project = check_project_id(cfg, &m)?;
    let tags = tags_field(&m)?.unwrap_or_default();
    let perf_iops = match m.get("perf_iops") {
        None | Some(Value::Null) => 5000,
        Some(v) => v.as_u64().unwrap_or(0),
    };
    let volume_type = match perf_iops {
        5000 => "sbs_5k",
        15000 => "sbs_15k",
        _ => {
            return Err(invalid(vec![(
                "perf_iops",
                "constraint",
                "perf_iops must be 5000 or 15000".into(),
            )]))
        }
    };
    let from_empty = m.get("from_empty").filter(|v| !v.is_null());
    let from_snapshot = m.get("from_snapshot").filter(|v| !v.is_null());
    let (size, parent) = match (from_empty, from_snapshot) {
        (Some(Value::Object(e)), None) => match size_field(e, "size")? {
            Some(size) => (size, None),
            None => {
                return Err(invalid(vec![(
                    "from_empty.size",
                    "required",
                    "from_empty.size is required".into(),
                )]))
            }
        },
        (None, Some(Value::Object(f))) => {
            let sid = required_str(f, "snapshot_id")?;
            let snap = st.block_snapshot(&req.zone, sid)?;
            if snap.status != "available" {
                return Err(transient("block_snapshot", sid, &snap.status));
            }
            let size = size_field(f, "size")?.unwrap_or(snap.size);
            if size < snap.size {
                return Err(invalid(vec![(
                    "from_snapshot.size",
                    "constraint",
                    format!("size must be at least the snapshot's {} bytes", snap.size),
                )]));
            }
            (size, Some(snap.id.clone()))
        }
        _ => {
            return Err(invalid(vec![(
                "from_empty",
                "required",
                "exactly one of from_empty and from_snapshot is required".into(),
            )]))
        }
    };
    let id = new_id();
    let now = now_rfc3339();
    let vol = BlockVolume {
        id: id.clone(),
        name: str_field(&m, "name")?
            .map(String::from)
            .unwrap_or_else(|| format!("vol-{}", &id[..8])),
        zone: req.zone.clone(),
        project,
        volume_type: volume_type.into(),
        perf_iops,
        size,
        status: "creating".into(),
        parent_snapshot_id: parent,
        server: None,
        tags,
        created_at: now.clone(),
        updated_at: now,
        last_detached_at: None,
    };
    st.pending
        .insert(id, (due(cfg), Step::BlockVolumeAvailable));
    let body = block_volume_json(&vol);
    st.block_volumes.push(vol);
    Ok(Reply::json(StatusCode::OK, body))
}

/// The Volume object (scaleway-sdk-js block v1 marshalling).
fn block_volume_json(v: &BlockVolume) -> Value {
    let references: Vec<Value> = v
        .server
        .iter()
        .map(|sid| {
            json!({
                "id": format!("{}-ref", &v.id[..8]),
                "product_resource_type": "instance_server",
                "product_resource_id": sid,
                "created_at": v.updated_at,
                "type": "exclusive",
                "status": "attached",
            })
        })
        .collect();
    json!({
        "id": v.id,
        "name": v.name,
        "type": v.volume_type,
        "size": v.size,
        "project_id": v.project,
        "created_at": v.created_at,
        "updated_at": v.updated_at,
        "references": references,
        "parent_snapshot_id": v.parent_snapshot_id,
        "status": v.status,
        "tags": v.tags,
        "specs": {"perf_iops": v.perf_iops, "class": "sbs"},
        "last_detached_at": v.last_detached_at,
        "zone": v.zone,
    })
}

/// The Block volume for an `sbs_volume` that `POST /servers` creates
/// (`in_use` at once, 5000 IOPS).
pub(super) fn from_server(v: &super::Volume) -> BlockVolume {
    BlockVolume {
        id: v.id.clone(),
        name: v.name.clone(),
        zone: v.zone.clone(),
        project: v.project.clone(),
        volume_type: "sbs_5k".into(),
        perf_iops: 5000,
        size: v.size,
        status: "in_use".into(),
        parent_snapshot_id: None,
        server: v.server.clone(),
        tags: vec![],
        created_at: v.creation_date.clone(),
        updated_at: v.creation_date.clone(),
        last_detached_at: None,
    }
}

/// A Block volume as the Instance API shows it in a server's `volumes`.
pub(super) fn server_volume_json(cfg: &Config, v: &BlockVolume) -> Value {
    json!({
        "id": v.id,
        "name": v.name,
        "size": v.size,
        "volume_type": "sbs_volume",
        "state": "available",
        "organization": cfg.organization,
        "project": v.project,
        "zone": v.zone,
        "creation_date": v.created_at,
        "modification_date": v.updated_at,
    })
}

impl State {
    pub(super) fn attach_block_volume(&mut self, id: &str, server: &str) {
        if let Some(v) = self.block_volumes.iter_mut().find(|v| v.id == id) {
            v.server = Some(server.into());
            v.status = "in_use".into();
            v.updated_at = now_rfc3339();
        }
    }

    /// A server is gone (deleted or terminated): its Block volumes stay,
    /// detached.
    pub(super) fn detach_block_volumes(&mut self, server: &str) {
        let now = now_rfc3339();
        for v in self.block_volumes.iter_mut() {
            if v.server.as_deref() == Some(server) {
                v.server = None;
                v.status = "available".into();
                v.last_detached_at = Some(now.clone());
                v.updated_at = now.clone();
            }
        }
    }

    fn block_snapshot(&self, zone: &str, id: &str) -> Result<&BlockSnapshot, Reply> {
        self.block_snapshots
            .iter()
            .find(|s| s.id == id && s.zone == zone)
            .ok_or_else(|| not_found("block_snapshot", id))
    }
    fn block_snapshot_mut(&mut self, zone: &str, id: &str) -> Result<&mut BlockSnapshot, Reply> {
        self.block_snapshots
            .iter_mut()
            .find(|s| s.id == id && s.zone == zone)
            .ok_or_else(|| not_found("block_snapshot", id))
    }
    pub(super) fn block_volume(&self, zone: &str, id: &str) -> Result<&BlockVolume, Reply> {
        self.block_volumes
            .iter()
            .find(|v| v.id == id && v.zone == zone)
            .ok_or_else(|| not_found("block_volume", id))
    }

    /// The Snapshot object (scaleway-sdk-js block v1 marshalling).
    fn block_snapshot_json(&self, s: &BlockSnapshot) -> Value {
        let parent = s.parent_volume.as_ref().map(|(id, name)| {
            let v = self.block_volumes.iter().find(|v| &v.id == id);
            json!({
                "id": id,
                "name": name,
                "type": v.map_or("sbs_5k", |v| v.volume_type.as_str()),
                "status": v.map_or("deleted", |v| v.status.as_str()),
            })
        });
        json!({
            "id": s.id,
            "name": s.name,
            "parent_volume": parent,
            "size": s.size,
            "project_id": s.project,
            "created_at": s.created_at,
            "updated_at": s.updated_at,
            "references": [],
            "status": s.status,
            "tags": s.tags,
            "zone": s.zone,
            "class": "sbs",
        })
    }

    pub(super) fn block_snapshot_done(&mut self, id: &str, error: Option<String>, date: String) {
        if let Some(s) = self.block_snapshots.iter_mut().find(|s| s.id == id) {
            s.status = if error.is_some() {
                "error"
            } else {
                "available"
            }
            .into();
            s.error_reason = error;
            s.updated_at = date;
        }
    }

    pub(super) fn block_volume_available(&mut self, id: &str, date: String) {
        if let Some(v) = self.block_volumes.iter_mut().find(|v| v.id == id) {
            v.status = if v.server.is_some() {
                "in_use"
            } else {
                "available"
            }
            .into();
            v.updated_at = date;
        }
    }
}
