//! The metadata server of a local server, one guest connection at a time.
//!
//! QEMU's `guestfwd` runs `imgforge local-metadata --home H ID` for each
//! guest connection to 169.254.42.42:80, with the connection on stdin and
//! stdout. The process answers from the server's record in the store and
//! writes `PATCH /state` and user data back to it, so a server's metadata
//! outlives the `imgforge` command that started it, and concurrent readers
//! (`imgforge server get`, a build waiting for progress) see the guest's
//! `state_detail` as soon as it is sent.
//!
//! libslirp gives the process the connection as stderr too: nothing here
//! may print.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context, Result};
use hyper_util::rt::TokioIo;
use hyper_util::service::TowerToHyperService;

use super::metadata_server::{self, MetadataStore, ServerMetadata, SshPublicKey, VolumeMetadata};
use super::qemu;
use super::records::ServerRecord;
use super::store::{Kind, Store};
use crate::provider::Volume;

/// The hidden subcommand QEMU runs per metadata connection.
pub const SUBCOMMAND: &str = "local-metadata";

/// The commercial type local servers report (and, as `SCW-LOCAL`, their SMBIOS product).
pub const COMMERCIAL_TYPE: &str = "LOCAL";

/// The guest's address (its DHCP lease: the first of `dhcpstart`).
const GUEST_PRIVATE_IP: &str = "169.254.0.15";

/// Arguments of [`SUBCOMMAND`].
#[derive(clap::Args, Debug)]
pub struct LocalMetadataArgs {
    /// The local provider's state directory.
    #[arg(long)]
    pub home: PathBuf,
    /// The server whose metadata to serve.
    pub server: String,
}

/// The metadata of one server, read from and written to its record.
pub struct RecordMetadata {
    store: Store,
    server: String,
}

impl RecordMetadata {
    pub fn new(store: Store, server: impl Into<String>) -> Self {
        RecordMetadata {
            store,
            server: server.into(),
        }
    }

    fn update(&self, f: impl FnOnce(&mut ServerRecord)) -> Result<()> {
        let locked = self.store.lock()?;
        let mut record: ServerRecord = locked.read(Kind::Server, &self.server)?;
        f(&mut record);
        locked.write(Kind::Server, &self.server, &record)
    }

    fn record(&self) -> Result<ServerRecord> {
        self.store.lock()?.read(Kind::Server, &self.server)
    }
}

impl MetadataStore for RecordMetadata {
    fn conf(&self) -> Result<Option<ServerMetadata>> {
        let locked = self.store.lock()?;
        let record: ServerRecord = locked.read(Kind::Server, &self.server)?;
        let mut meta = ServerMetadata::new(&record.id, &record.name);
        meta.tags = record.tags.clone();
        meta.state_detail = record.state_detail.clone();
        meta.arch = record.arch.clone();
        meta.commercial_type = COMMERCIAL_TYPE.into();
        meta.private_ip = Some(GUEST_PRIVATE_IP.into());
        // The guest's one address is also its "public" one: what the host
        // forwards exposed ports to.
        meta.public_ip = Some(serde_json::json!({
            "id": record.id,
            "address": GUEST_PRIVATE_IP,
            "dynamic": false,
            "gateway": qemu::USER_NET_HOST_IP.to_string(),
            "netmask": "16",
            "family": "inet",
            "provisioning_mode": "dhcp",
        }));
        meta.ssh_public_keys = record
            .ssh_public_keys
            .iter()
            .map(|key| SshPublicKey {
                key: key.clone(),
                fingerprint: crate::ssh::parse_public_key(key, "a server's key")
                    .map(|k| k.fingerprint)
                    .unwrap_or_default(),
            })
            .collect();
        for (slot, id) in record.volumes.iter().enumerate() {
            let volume: Volume = locked.read(Kind::Volume, id)?;
            meta.volumes.insert(
                slot.to_string(),
                VolumeMetadata {
                    id: volume.id,
                    name: volume.name,
                    volume_type: "l_ssd".into(),
                    size: volume.size,
                },
            );
        }
        Ok(Some(meta))
    }

    fn set_state_detail(&self, detail: &str) -> Result<()> {
        self.update(|r| r.state_detail = detail.to_owned())
    }

    fn user_data_keys(&self) -> Result<Vec<String>> {
        Ok(self.record()?.user_data.keys().cloned().collect())
    }

    fn user_data(&self, key: &str) -> Result<Option<Vec<u8>>> {
        Ok(self
            .record()?
            .user_data
            .get(key)
            .map(|v| v.as_bytes().to_vec()))
    }

    fn set_user_data(&self, key: &str, value: Vec<u8>) -> Result<()> {
        let value = String::from_utf8(value)
            .context("the local provider keeps user data as text; this value is not UTF-8")?;
        self.update(|r| {
            r.user_data.insert(key.to_owned(), value);
        })
    }

    fn delete_user_data(&self, key: &str) -> Result<bool> {
        let mut existed = false;
        self.update(|r| existed = r.user_data.remove(key).is_some())?;
        Ok(existed)
    }
}

/// Serves HTTP on stdin/stdout until the guest closes the connection.
pub async fn serve_stdio(args: LocalMetadataArgs) -> Result<()> {
    let store = Store::open(&args.home)?;
    let backend: Arc<dyn MetadataStore> = Arc::new(RecordMetadata::new(store, args.server));
    let io = tokio::io::join(super::guestfwd::stdin_reader(), tokio::io::stdout());
    let service = TowerToHyperService::new(metadata_server::router(backend));
    hyper::server::conn::http1::Builder::new()
        .serve_connection(TokioIo::new(io), service)
        .await
        .context("serve the metadata connection")
}
