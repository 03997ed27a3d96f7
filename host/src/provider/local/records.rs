//! What the local provider stores about a server (volumes, snapshots and
//! images are stored as the provider's own types).

use std::collections::BTreeMap;
use std::net::SocketAddr;

use serde::{Deserialize, Serialize};

use crate::provider::Boot;

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ServerRecord {
    pub id: String,
    pub name: String,
    pub tags: Vec<String>,
    pub boot: Boot,
    /// Kernel arguments of a bootscript boot (the kernel and initrd are
    /// copied into the server's directory).
    #[serde(default)]
    pub append: String,
    /// Volume ids, slot 0 first.
    pub volumes: Vec<String>,
    pub arch: String,
    pub created_at: String,
    pub memory_mib: u32,
    pub exposed_ports: Vec<u16>,
    pub host_services: Vec<SocketAddr>,
    #[serde(default)]
    pub state_detail: String,
    #[serde(default)]
    pub user_data: BTreeMap<String, String>,
    /// OpenSSH public keys served as `ssh_public_keys`.
    #[serde(default)]
    pub ssh_public_keys: Vec<String>,
    /// Set while a QEMU process runs the server.
    #[serde(default)]
    pub runtime: Option<Runtime>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Runtime {
    pub pid: u32,
    pub endpoints: BTreeMap<u16, SocketAddr>,
    pub accel: String,
    pub started_at: String,
    /// Set by `stop` before it asks QEMU to quit.
    #[serde(default)]
    pub stopping: bool,
}
