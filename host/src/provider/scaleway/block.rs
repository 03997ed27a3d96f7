//! Typed Block API v1 calls (`/block/v1/zones/{zone}`, reference §3 and §7):
//! the snapshots of SBS volumes and the QCOW2 import from Object Storage.
//!
//! Block objects come back unwrapped (no `{"snapshot": …}` envelope) and
//! name their project `project_id`. A Block snapshot has no error reason:
//! an import that fails only says `status: error`, so the caller explains
//! what Scaleway refuses (see `push.rs`).

use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::api::Poll;
use super::client::{Client, Error};

/// A Block snapshot (`class: sbs`).
#[derive(Clone, Debug, Deserialize)]
pub struct BlockSnapshot {
    pub id: String,
    #[serde(default)]
    pub name: String,
    /// `creating`, `available`, `error`, `deleting`, `deleted`, `in_use`,
    /// `locked`, `exporting`.
    pub status: String,
    #[serde(default)]
    pub size: u64,
    #[serde(default)]
    pub tags: Vec<String>,
    pub project_id: Option<String>,
    pub zone: Option<String>,
    pub class: Option<String>,
    pub created_at: Option<String>,
    /// The volume it was taken from (none for an import).
    #[serde(default)]
    pub parent_volume: Option<BlockRef>,
}

/// `{id, name}` of another Block object.
#[derive(Clone, Debug, Default, Deserialize)]
pub struct BlockRef {
    #[serde(default)]
    pub id: String,
    #[serde(default)]
    pub name: String,
}

/// What a Block volume is attached to.
#[derive(Clone, Debug, Default, Deserialize)]
pub struct BlockReference {
    /// `instance_server` for a server's volume.
    pub product_resource_type: Option<String>,
    pub product_resource_id: Option<String>,
}

/// A Block volume (an Instance `sbs_volume`).
#[derive(Clone, Debug, Deserialize)]
pub struct BlockVolume {
    pub id: String,
    #[serde(default)]
    pub name: String,
    /// `sbs_5k`, `sbs_15k`.
    #[serde(rename = "type")]
    pub volume_type: Option<String>,
    #[serde(default)]
    pub size: u64,
    /// `creating`, `available`, `in_use`, `deleting`, `error`, …
    #[serde(default)]
    pub status: String,
    #[serde(default)]
    pub tags: Vec<String>,
    #[serde(default)]
    pub references: Vec<BlockReference>,
    pub created_at: Option<String>,
}

impl BlockVolume {
    /// The Instance server it is attached to, if any.
    pub fn server(&self) -> Option<&str> {
        self.references
            .iter()
            .filter(|r| r.product_resource_type.as_deref() == Some("instance_server"))
            .find_map(|r| r.product_resource_id.as_deref())
            .filter(|id| !id.is_empty())
    }
}

/// POST /snapshots of a Block volume.
#[derive(Clone, Debug, Serialize)]
pub struct CreateBlockSnapshotRequest {
    pub volume_id: String,
    /// Must be unique in the project: an unknown outcome is checked by name.
    pub name: String,
    pub project_id: String,
    pub tags: Vec<String>,
}

/// POST /snapshots/import-from-object-storage.
#[derive(Clone, Debug, Serialize)]
pub struct ImportSnapshotRequest {
    pub bucket: String,
    pub key: String,
    /// Must be unique in the project: an unknown outcome is checked by name.
    pub name: String,
    pub project_id: String,
    pub tags: Vec<String>,
    /// The volume size; Scaleway defaults to the QCOW2's virtual size.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub size: Option<u64>,
}

/// One poll of a waited-on import, for progress.
pub type StatusSeen<'a> = &'a (dyn Fn(&BlockSnapshot) + Send + Sync);

impl Client {
    /// Imports a QCOW2 object as a Block snapshot (status `creating`), never
    /// starting two imports for one call.
    pub async fn import_snapshot(
        &self,
        request: &ImportSnapshotRequest,
    ) -> Result<BlockSnapshot, Error> {
        let block = self.block();
        block
            .post_checked("/snapshots/import-from-object-storage", request, || async {
                block.find_block_snapshot_by_name(&request.name).await
            })
            .await
    }

    /// Snapshots a Block volume (status `creating`), never starting two
    /// snapshots for one call.
    pub async fn create_block_snapshot(
        &self,
        request: &CreateBlockSnapshotRequest,
    ) -> Result<BlockSnapshot, Error> {
        let block = self.block();
        block
            .post_checked("/snapshots", request, || async {
                block.find_block_snapshot_by_name(&request.name).await
            })
            .await
    }

    /// GET /block/…/volumes/{id}.
    pub async fn get_block_volume(&self, id: &str) -> Result<BlockVolume, Error> {
        self.block().get_json(&format!("/volumes/{id}"), &[]).await
    }

    /// The project's Block volumes, all pages.
    pub async fn list_block_volumes(&self) -> Result<Vec<BlockVolume>, Error> {
        let query = [("project_id", self.project_id().to_string())];
        self.block().list_all("/volumes", &query, "volumes").await
    }

    /// DELETE /block/…/volumes/{id}.
    pub async fn delete_block_volume(&self, id: &str) -> Result<(), Error> {
        self.block().delete(&format!("/volumes/{id}")).await
    }

    /// GET /block/…/snapshots/{id}.
    pub async fn get_block_snapshot(&self, id: &str) -> Result<BlockSnapshot, Error> {
        self.block()
            .get_json(&format!("/snapshots/{id}"), &[])
            .await
    }

    /// The project's Block snapshots, all pages; with `tag`, only those
    /// carrying it.
    pub async fn list_block_snapshots(
        &self,
        tag: Option<&str>,
    ) -> Result<Vec<BlockSnapshot>, Error> {
        let mut query = vec![("project_id", self.project_id().to_string())];
        if let Some(tag) = tag {
            query.push(("tags", tag.to_string()));
        }
        self.block()
            .list_all("/snapshots", &query, "snapshots")
            .await
    }

    async fn find_block_snapshot_by_name(
        &self,
        name: &str,
    ) -> Result<Option<BlockSnapshot>, Error> {
        let query = [
            ("project_id", self.project_id().to_string()),
            ("name", name.to_string()),
        ];
        let found: Vec<BlockSnapshot> = self
            .block()
            .list_all("/snapshots", &query, "snapshots")
            .await?;
        let mut exact: Vec<BlockSnapshot> = found.into_iter().filter(|s| s.name == name).collect();
        match exact.len() {
            0 | 1 => Ok(exact.pop()),
            n => Err(Error::Ambiguous(format!(
                "{n} Block snapshots are named {name:?}; cannot tell which one this request created"
            ))),
        }
    }

    /// DELETE /block/…/snapshots/{id}.
    pub async fn delete_block_snapshot(&self, id: &str) -> Result<(), Error> {
        self.block().delete(&format!("/snapshots/{id}")).await
    }

    /// Polls a Block snapshot until `available`; `error` fails at once.
    /// `seen` gets every poll (progress).
    pub async fn wait_for_block_snapshot_available(
        &self,
        id: &str,
        timeout: Duration,
        seen: StatusSeen<'_>,
    ) -> Result<BlockSnapshot, Error> {
        self.poll_until(
            &format!("Block snapshot {id}"),
            "available",
            timeout,
            || async {
                let snapshot = self.get_block_snapshot(id).await?;
                seen(&snapshot);
                Ok(match snapshot.status.as_str() {
                    "available" => Poll::Done(snapshot),
                    "error" | "deleted" | "deleting" | "locked" => {
                        Poll::Failed(snapshot.status, String::new())
                    }
                    _ => Poll::Pending(snapshot.status),
                })
            },
        )
        .await
    }
}
