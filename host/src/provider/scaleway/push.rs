//! A QCOW2 file to a Scaleway image, the way Scaleway documents custom
//! images today (reference §7): upload to Object Storage (S3 multipart),
//! import as a Block snapshot, create the image from it, delete the object.
//!
//! [`check_importable`] and [`import_size`] decide what Scaleway would
//! refuse before a byte is sent (pure, unit-tested); [`push`] does it;
//! [`undo`] removes whatever an unfinished push left (the upload, the
//! object, the snapshot), from the [`Pushed`] record that [`push`] fills
//! as it goes, so an interrupt handler can run it too.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde::Serialize;
use tracing::{info, warn};

use super::api::CreateImageRequest;
use super::block::ImportSnapshotRequest;
use super::{Client, MARKER_TAG};
use crate::object_storage::upload::{upload_file, Progress, UploadOptions, UploadReport};
use crate::object_storage::ObjectStore;
use crate::provider::BUILD_TAG_PREFIX;

/// Scaleway imports volumes of 1 GB to 1 TB (SI units, reference §7).
pub const MIN_IMPORT_SIZE: u64 = 1_000_000_000;
pub const MAX_IMPORT_SIZE: u64 = 1_000_000_000_000;

/// Why Scaleway would refuse a QCOW2 (the documented refusals).
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("it is not a QCOW2 image: {0}")]
    NotQcow2(String),
    #[error(
        "its clusters are zstd-compressed, which Scaleway's import refuses (use zlib or none)"
    )]
    Zstd,
    #[error("it has a backing file ({0}), which Scaleway's import refuses: flatten it first")]
    BackingFile(String),
    #[error("it is encrypted, which Scaleway's import refuses")]
    Encrypted,
    #[error("its virtual size of {0} bytes is outside what Scaleway imports (1 GB to 1 TB)")]
    Size(u64),
}

/// What Scaleway's import looks at in a QCOW2 header.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ImportFacts {
    pub virtual_size: u64,
    pub backing_file: Option<String>,
    /// 0 = none, 1 = AES, 2 = LUKS.
    pub crypt_method: u32,
    pub compression: qcow2::Compression,
}

impl From<&qcow2::Header> for ImportFacts {
    fn from(header: &qcow2::Header) -> Self {
        ImportFacts {
            virtual_size: header.virtual_size,
            backing_file: header.backing_file.clone(),
            crypt_method: header.crypt_method,
            compression: header.compression,
        }
    }
}

/// Whether Scaleway's import takes an image with this header.
pub fn check_importable(header: &ImportFacts) -> Result<(), Refusal> {
    if let Some(backing) = &header.backing_file {
        return Err(Refusal::BackingFile(backing.clone()));
    }
    if header.crypt_method != 0 {
        return Err(Refusal::Encrypted);
    }
    if header.compression == qcow2::Compression::Zstd {
        return Err(Refusal::Zstd);
    }
    if !(MIN_IMPORT_SIZE..=MAX_IMPORT_SIZE).contains(&header.virtual_size) {
        return Err(Refusal::Size(header.virtual_size));
    }
    Ok(())
}

/// Reads and checks the header of a QCOW2 file.
pub fn check_importable_file(path: &std::path::Path) -> Result<ImportFacts> {
    let mut file = std::fs::File::open(path).with_context(|| format!("open {}", path.display()))?;
    let len = file.metadata()?.len();
    let header = qcow2::Header::read(&mut file, len)
        .map_err(|e| Refusal::NotQcow2(e.to_string()))
        .with_context(|| format!("{} cannot be imported by Scaleway", path.display()))?;
    let facts = ImportFacts::from(&header);
    check_importable(&facts)
        .with_context(|| format!("{} cannot be imported by Scaleway", path.display()))?;
    Ok(facts)
}

/// The volume size to import a disk of `virtual_size` bytes as: whole SI
/// gigabytes (Scaleway sizes volumes in GB), at least 1 GB.
pub fn import_size(virtual_size: u64) -> u64 {
    virtual_size.div_ceil(MIN_IMPORT_SIZE).max(1) * MIN_IMPORT_SIZE
}

/// The object key of a push: under `imgforge/<build id>/`, so that a cleanup
/// by build id finds it, and ending in `.qcow2` as Scaleway asks.
pub fn object_key(build_id: &str, image_name: &str) -> String {
    let name: String = image_name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.') {
                c
            } else {
                '-'
            }
        })
        .collect();
    format!("{}{build_id}/{name}.qcow2", object_prefix(None))
}

/// The prefix of every object imgforge writes, or of one build's.
pub fn object_prefix(build_id: Option<&str>) -> String {
    match build_id {
        Some(id) => format!("imgforge/{id}/"),
        None => "imgforge/".to_string(),
    }
}

/// What one push is to do.
#[derive(Clone, Debug)]
pub struct PushRequest {
    /// A QCOW2 that passed [`check_importable_file`].
    pub qcow2: PathBuf,
    pub virtual_size: u64,
    pub name: String,
    /// Scaleway's arch (`x86_64`, `arm64`).
    pub arch: String,
    pub build_id: String,
    pub keep_object: bool,
}

/// Tunables of a push.
#[derive(Clone, Debug)]
pub struct PushOptions {
    pub upload: UploadOptions,
    pub import_timeout: Duration,
    pub image_timeout: Duration,
}

impl Default for PushOptions {
    fn default() -> Self {
        PushOptions {
            upload: UploadOptions::default(),
            // "several minutes" (reference §7) for a few GB; a large image
            // takes longer.
            import_timeout: Duration::from_secs(3600),
            image_timeout: Duration::from_secs(600),
        }
    }
}

/// What a push has created so far (for [`undo`]).
#[derive(Clone, Debug, Default)]
pub struct Pushed(Arc<Mutex<PushedState>>);

#[derive(Clone, Debug, Default)]
struct PushedState {
    key: Option<String>,
    upload_id: Option<String>,
    snapshot: Option<String>,
    /// The image exists: the push is done, nothing is undone any more.
    image: Option<String>,
}

impl Pushed {
    fn update(&self, f: impl FnOnce(&mut PushedState)) {
        if let Ok(mut state) = self.0.lock() {
            f(&mut state);
        }
    }

    fn get(&self) -> PushedState {
        self.0.lock().map(|s| s.clone()).unwrap_or_default()
    }
}

/// Progress of a push, for a bar or log lines.
#[derive(Clone, Debug)]
pub enum PushEvent {
    Uploading { sent: u64, total: u64 },
    Uploaded(UploadReport),
    Importing { snapshot: String, status: String },
    CreatingImage { snapshot: String },
}

/// What `imgforge image push` prints (`--json`).
#[derive(Clone, Debug, Serialize)]
pub struct PushReport {
    pub image_id: String,
    pub name: String,
    pub arch: String,
    pub snapshot_id: String,
    pub volume_size: u64,
    pub bucket: String,
    pub key: String,
    pub object_kept: bool,
    pub build_id: String,
    pub upload: UploadReport,
    pub import_seconds: f64,
}

/// Uploads, imports, creates the image; removes the object unless asked to
/// keep it. On failure, nothing stays (see [`undo`], which the caller runs).
pub async fn push(
    client: &Client,
    store: &ObjectStore,
    request: &PushRequest,
    options: &PushOptions,
    pushed: &Pushed,
    progress: Arc<dyn Fn(PushEvent) + Send + Sync>,
) -> Result<PushReport> {
    // Refused before anything is uploaded: two images of one name make every
    // later `image rm NAME` ambiguous.
    let same_name = client
        .list_images_by_name(&request.name)
        .await
        .context("list the project's images")?;
    if let Some(existing) = same_name.iter().find(|i| i.name == request.name) {
        bail!(
            "Scaleway has an image named {:?} already ({}): delete it (imgforge image rm {}              --provider scaleway) or choose another name",
            request.name,
            existing.id,
            existing.id
        );
    }
    let key = object_key(&request.build_id, &request.name);
    let build_tag = format!("{BUILD_TAG_PREFIX}{}", request.build_id);
    store
        .ensure_bucket()
        .await
        .with_context(|| format!("Object Storage bucket {}", store.location().bucket))?;
    pushed.update(|s| s.key = Some(key.clone()));

    let total = request.virtual_size;
    let file_size = std::fs::metadata(&request.qcow2)?.len();
    let uploading: Progress = {
        let progress = progress.clone();
        Arc::new(move |sent| {
            progress(PushEvent::Uploading {
                sent,
                total: file_size,
            });
        })
    };
    let upload = upload_file(
        store,
        &key,
        &request.qcow2,
        &options.upload,
        |id| pushed.update(|s| s.upload_id = Some(id.to_string())),
        uploading,
    )
    .await?;
    pushed.update(|s| s.upload_id = None);
    progress(PushEvent::Uploaded(upload.clone()));
    info!(key, bytes = upload.bytes, parts = upload.parts, "uploaded");

    let import_started = Instant::now();
    let volume_size = import_size(total);
    let snapshot = client
        .import_snapshot(&ImportSnapshotRequest {
            bucket: store.location().bucket.clone(),
            key: key.clone(),
            name: unique_name(&request.name),
            project_id: client.project_id().to_string(),
            tags: vec![MARKER_TAG.to_string(), build_tag.clone()],
            size: Some(volume_size),
        })
        .await
        .with_context(|| format!("import {} as a Block snapshot", store.describe(&key)))?;
    pushed.update(|s| s.snapshot = Some(snapshot.id.clone()));
    let seen = {
        let progress = progress.clone();
        move |s: &super::block::BlockSnapshot| {
            progress(PushEvent::Importing {
                snapshot: s.id.clone(),
                status: s.status.clone(),
            });
        }
    };
    client
        .wait_for_block_snapshot_available(&snapshot.id, options.import_timeout, &seen)
        .await
        .map_err(|e| import_failed(e, &store.describe(&key), &snapshot.id))?;
    let import_seconds = import_started.elapsed().as_secs_f64();

    progress(PushEvent::CreatingImage {
        snapshot: snapshot.id.clone(),
    });
    let image = client
        .create_image(&CreateImageRequest {
            name: request.name.clone(),
            root_volume: snapshot.id.clone(),
            arch: request.arch.clone(),
            project: None,
            tags: vec![MARKER_TAG.to_string(), build_tag],
            public: None,
        })
        .await
        .with_context(|| {
            format!(
                "create image {} from snapshot {}",
                request.name, snapshot.id
            )
        })?;
    pushed.update(|s| s.image = Some(image.id.clone()));
    let image = client
        .wait_for_image_available(&image.id, options.image_timeout)
        .await
        .with_context(|| format!("image {} ({})", request.name, image.id))?;

    if !request.keep_object {
        // The image holds the data now; a leftover object only costs money,
        // so a failure here is a warning, not a failed push.
        if let Err(e) = store.delete_object(&key).await {
            warn!(%e, "could not delete {}; remove it or run `imgforge cleanup`", store.describe(&key));
        }
    }
    Ok(PushReport {
        image_id: image.id,
        name: image.name,
        arch: request.arch.clone(),
        snapshot_id: snapshot.id,
        volume_size,
        bucket: store.location().bucket.clone(),
        key,
        object_kept: request.keep_object,
        build_id: request.build_id.clone(),
        upload,
        import_seconds,
    })
}

/// The error of an import that did not become `available`. The Block API
/// gives no reason, so the message lists what Scaleway documents refusing.
fn import_failed(error: super::Error, object: &str, snapshot: &str) -> anyhow::Error {
    anyhow::Error::new(error).context(format!(
        "Scaleway's import of {object} (Block snapshot {snapshot}) did not succeed; the Block API \
         gives no reason. Scaleway refuses zstd-compressed, encrypted or backed QCOW2 files and \
         sizes outside 1 GB-1 TB, which imgforge checked before the upload; the object and the \
         snapshot are removed"
    ))
}

/// Removes what an unfinished push created: aborts its upload, deletes its
/// snapshot and its object. A push that got to its image is left alone.
/// Returns what it removed; failures are logged (it runs on the way out).
pub async fn undo(client: &Client, store: &ObjectStore, pushed: &Pushed) -> Vec<String> {
    let state = pushed.get();
    let mut removed = Vec::new();
    if state.image.is_some() {
        return removed;
    }
    if let Some(key) = &state.key {
        // The uploads of this key: the one recorded, and one whose id never
        // reached the record (an interrupt right after the service created it).
        let mut uploads: Vec<String> = state.upload_id.iter().cloned().collect();
        match store.list_uploads(key).await {
            Ok(found) => uploads.extend(
                found
                    .into_iter()
                    .filter(|u| &u.key == key)
                    .map(|u| u.upload_id),
            ),
            Err(e) => warn!(%e, "could not list the uploads of {}", store.describe(key)),
        }
        uploads.sort();
        uploads.dedup();
        for upload_id in uploads {
            match store.abort_upload(key, &upload_id).await {
                Ok(()) => {
                    removed.push(format!(
                        "multipart upload {upload_id} of {}",
                        store.describe(key)
                    ));
                }
                Err(e) => warn!(%e, "could not abort the upload; `imgforge cleanup` aborts it"),
            }
        }
    }
    if let Some(snapshot) = &state.snapshot {
        // Not for long: the user is waiting for the interrupt to end.
        match delete_block_snapshot_when_settled(client, snapshot, Duration::from_secs(60)).await {
            Ok(()) => removed.push(format!("Block snapshot {snapshot}")),
            Err(e) => {
                warn!(%e, "could not delete Block snapshot {snapshot}; `imgforge cleanup` removes it");
            }
        }
    }
    if let Some(key) = &state.key {
        match store.delete_object(key).await {
            Ok(()) => removed.push(format!("object {}", store.describe(key))),
            Err(e) => {
                warn!(%e, "could not delete {}; `imgforge cleanup` removes it", store.describe(key));
            }
        }
    }
    pushed.update(|s| *s = PushedState::default());
    removed
}

/// Deletes a Block snapshot, waiting up to `patience` while it is still
/// being created (the API refuses to delete a resource in a transient state).
pub async fn delete_block_snapshot_when_settled(
    client: &Client,
    id: &str,
    patience: Duration,
) -> Result<()> {
    let deadline = Instant::now() + patience;
    loop {
        match client.delete_block_snapshot(id).await {
            Ok(()) => return Ok(()),
            Err(e) if e.is_not_found() => return Ok(()),
            Err(e) if is_transient_state(&e) && Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_secs(2)).await;
            }
            Err(e) => return Err(e).with_context(|| format!("delete Block snapshot {id}")),
        }
    }
}

fn is_transient_state(error: &super::Error) -> bool {
    error
        .api_error()
        .is_some_and(|e| e.status == 409 || e.kind == "transient_state")
}

/// `name` plus a random suffix: the import is checked by name after an
/// unknown outcome, so names must be unique.
fn unique_name(name: &str) -> String {
    let mut bytes = [0u8; 3];
    let _ = getrandom::fill(&mut bytes);
    format!("{name}-{}", hex::encode(bytes))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header() -> ImportFacts {
        ImportFacts {
            virtual_size: 4 << 30,
            backing_file: None,
            crypt_method: 0,
            compression: qcow2::Compression::Zlib,
        }
    }

    #[test]
    fn scaleway_refusals_are_found_before_upload() {
        assert_eq!(check_importable(&header()), Ok(()));
        let zstd = ImportFacts {
            compression: qcow2::Compression::Zstd,
            ..header()
        };
        assert_eq!(check_importable(&zstd), Err(Refusal::Zstd));
        let backed = ImportFacts {
            backing_file: Some("base.qcow2".into()),
            ..header()
        };
        assert_eq!(
            check_importable(&backed),
            Err(Refusal::BackingFile("base.qcow2".into()))
        );
        let encrypted = ImportFacts {
            crypt_method: 2,
            ..header()
        };
        assert_eq!(check_importable(&encrypted), Err(Refusal::Encrypted));
        for size in [MIN_IMPORT_SIZE - 512, MAX_IMPORT_SIZE + 512] {
            let h = ImportFacts {
                virtual_size: size,
                ..header()
            };
            assert_eq!(check_importable(&h), Err(Refusal::Size(size)));
        }
    }

    #[test]
    fn volume_sizes_are_whole_gigabytes_of_at_least_one() {
        assert_eq!(import_size(1), MIN_IMPORT_SIZE);
        assert_eq!(import_size(MIN_IMPORT_SIZE), MIN_IMPORT_SIZE);
        assert_eq!(import_size(1 << 30), 2 * MIN_IMPORT_SIZE);
        assert_eq!(import_size(4 << 30), 5 * MIN_IMPORT_SIZE);
    }

    #[test]
    fn keys_are_per_build_and_end_in_qcow2() {
        assert_eq!(
            object_key("ab12", "web server/1"),
            "imgforge/ab12/web-server-1.qcow2"
        );
        assert!(object_key("ab12", "x").starts_with(&object_prefix(Some("ab12"))));
        assert!(object_prefix(Some("ab12")).starts_with(&object_prefix(None)));
    }
}
