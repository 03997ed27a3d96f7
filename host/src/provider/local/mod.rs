//! The local provider: servers are QEMU processes on this machine, volumes
//! and snapshots are qcow2 files, images are records pointing at snapshots.
//! State lives in `$IMGFORGE_HOME` ([`store`]).
//!
//! Networking is QEMU user mode with `restrict=on`: a server reaches only
//! its metadata server (169.254.42.42:80, answered by [`metadata`]) and the
//! host services its spec lists (at [`HOST_SERVICES_GUEST_IP`], same port);
//! the host reaches the exposed guest ports on loopback.

pub mod accel;
pub mod guestfwd;
pub mod machine;
pub mod metadata;
pub mod metadata_server;
pub mod qemu;
pub mod records;
pub mod store;

use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use tracing::{debug, info, warn};

use self::accel::AccelChoice;
use self::machine::MachineFiles;
use self::qemu::{Accel, GuestCommand, GuestForward, PortForward, UserNet};
use self::records::{Runtime, ServerRecord};
use self::store::{new_id, Kind, Store};
use super::{
    now_rfc3339, Boot, Capabilities, Image, Provider, Server, ServerSpec, ServerState, Snapshot,
    Volume, VolumeSpec,
};
use crate::tools::RunTool;

/// Where a server reaches the host services of its spec.
pub const HOST_SERVICES_GUEST_IP: Ipv4Addr = Ipv4Addr::new(169, 254, 42, 10);

const DEFAULT_MEMORY_MIB: u32 = 1024;

/// How long `stop` lets a UEFI-booted guest power off by itself.
const POWERDOWN_GRACE: Duration = Duration::from_secs(60);

/// Formats `imgforge image export` writes (qemu-img's names).
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExportFormat {
    Raw,
    Qcow2,
    Vmdk,
}

impl ExportFormat {
    fn qemu_img_name(self) -> &'static str {
        match self {
            ExportFormat::Raw => "raw",
            ExportFormat::Qcow2 => "qcow2",
            ExportFormat::Vmdk => "vmdk",
        }
    }
}

pub struct LocalProvider {
    store: Store,
    /// Resolved when a server starts, not when the provider opens: listing
    /// images must not pay for a KVM probe.
    accel: AccelChoice,
    /// imgforge itself: QEMU runs it per guest connection (metadata, bridge).
    exe: PathBuf,
}

impl LocalProvider {
    /// The provider over the state directory `home`, starting servers with
    /// `accel`.
    pub fn open(home: &Path, accel: AccelChoice) -> Result<LocalProvider> {
        let store = Store::open(home)?;
        let exe = std::env::current_exe().context("locate the imgforge executable")?;
        Ok(LocalProvider { store, accel, exe })
    }

    /// The qcow2 file holding a snapshot (for `imgforge boot IMAGE`).
    /// The state directory (`$IMGFORGE_HOME`).
    pub fn home(&self) -> &Path {
        self.store.home()
    }

    pub fn snapshot_file(&self, id: &str) -> Result<PathBuf> {
        self.store.lock()?.read::<Snapshot>(Kind::Snapshot, id)?;
        Ok(self.store.data_path(Kind::Snapshot, id))
    }

    /// Writes image `id`'s disk to `output` in `format`.
    pub async fn export_image(&self, id: &str, output: &Path, format: ExportFormat) -> Result<()> {
        let image = self.get_image(id).await?;
        let source = self.snapshot_file(&image.root_volume)?;
        let output = output.to_path_buf();
        let partial = partial_path(&output);
        blocking(move || {
            let result = qemu_img([
                OsStr::new("convert"),
                "-O".as_ref(),
                OsStr::new(format.qemu_img_name()),
                source.as_os_str(),
                partial.as_os_str(),
            ]);
            match result {
                Ok(()) => std::fs::rename(&partial, &output)
                    .with_context(|| format!("rename to {}", output.display())),
                Err(e) => {
                    let _ = std::fs::remove_file(&partial);
                    Err(e)
                }
            }
        })
        .await
    }

    /// Writes image `id`'s disk to `output` as a standalone QCOW2 whose
    /// clusters are zlib-compressed (`compress`) or plain, never zstd, with
    /// a virtual size of at least `min_size` bytes (grown at the end, which
    /// a guest's growpart takes as free space): what an import into a cloud
    /// takes, whatever compression the local snapshot uses.
    pub async fn export_for_import(
        &self,
        id: &str,
        output: &Path,
        compress: bool,
        min_size: u64,
    ) -> Result<()> {
        let image = self.get_image(id).await?;
        let source = self.snapshot_file(&image.root_volume)?;
        let output = output.to_path_buf();
        let partial = partial_path(&output);
        blocking(move || {
            let result = (|| {
                let mut args: Vec<&OsStr> = vec![
                    "convert".as_ref(),
                    "-O".as_ref(),
                    "qcow2".as_ref(),
                    "-o".as_ref(),
                    "compression_type=zlib".as_ref(),
                ];
                if compress {
                    args.push("-c".as_ref());
                }
                args.extend([source.as_os_str(), partial.as_os_str()]);
                run_qemu_img(&args)?;
                let size = virtual_size(&partial)?;
                if size < min_size {
                    let min = min_size.to_string();
                    run_qemu_img(&[
                        "resize".as_ref(),
                        "-f".as_ref(),
                        "qcow2".as_ref(),
                        partial.as_os_str(),
                        min.as_ref(),
                    ])?;
                }
                std::fs::rename(&partial, &output)
                    .with_context(|| format!("rename to {}", output.display()))
            })();
            if result.is_err() {
                let _ = std::fs::remove_file(&partial);
            }
            result
        })
        .await
    }

    /// The server's record with its runtime refreshed: a QEMU that exited
    /// (guest powered off, killed) leaves the server stopped.
    fn refresh(&self, record: &mut ServerRecord) -> bool {
        if let Some(rt) = &record.runtime {
            if !machine::is_alive(rt.pid, &machine::process_name(&record.id)) {
                debug!("server {}: QEMU {} is gone", record.id, rt.pid);
                record.runtime = None;
                return true;
            }
        }
        false
    }

    fn read_server(&self, id: &str) -> Result<ServerRecord> {
        let locked = self.store.lock()?;
        let mut record: ServerRecord = locked.read(Kind::Server, id)?;
        if self.refresh(&mut record) {
            locked.write(Kind::Server, id, &record)?;
        }
        Ok(record)
    }

    fn to_server(record: &ServerRecord) -> Server {
        let (state, endpoints) = match &record.runtime {
            None => (ServerState::Stopped, BTreeMap::new()),
            Some(rt) if rt.stopping => (ServerState::Stopping, rt.endpoints.clone()),
            Some(rt) => (ServerState::Running, rt.endpoints.clone()),
        };
        Server {
            id: record.id.clone(),
            name: record.name.clone(),
            state,
            state_detail: record.state_detail.clone(),
            tags: record.tags.clone(),
            boot: record.boot.clone(),
            volumes: record.volumes.clone(),
            endpoints,
            arch: record.arch.clone(),
            created_at: record.created_at.clone(),
        }
    }

    /// The QEMU command line for `record`, with `endpoints` forwarded.
    fn machine_command(
        &self,
        record: &ServerRecord,
        endpoints: &BTreeMap<u16, SocketAddr>,
        accel: Accel,
    ) -> Result<Command> {
        let dir = self.store.server_dir(&record.id);
        let files = MachineFiles::new(&dir);
        let disks: Vec<PathBuf> = record
            .volumes
            .iter()
            .map(|v| self.store.data_path(Kind::Volume, v))
            .collect();
        let net = UserNet {
            host_forwards: endpoints
                .iter()
                .map(|(guest_port, host)| PortForward {
                    host: *host,
                    guest_port: *guest_port,
                })
                .collect(),
            guest_forwards: record
                .host_services
                .iter()
                .map(|target| GuestForward {
                    guest_ip: HOST_SERVICES_GUEST_IP,
                    guest_port: target.port(),
                    target: *target,
                })
                .collect(),
            guest_commands: vec![GuestCommand {
                guest_ip: qemu::METADATA_GUEST_IP,
                guest_port: 80,
                exe: self.exe.clone(),
                args: vec![
                    metadata::SUBCOMMAND.into(),
                    "--home".into(),
                    self.store.home().to_string_lossy().into_owned(),
                    record.id.clone(),
                ],
            }],
            bridge_exe: self.exe.clone(),
        };
        let cpus = 2;
        Ok(match &record.boot {
            Boot::Bootscript(_) => qemu::BootscriptVm {
                kernel: dir.join("vmlinuz"),
                initrd: dir.join("initrd.img"),
                append: record.append.clone(),
                disks,
                memory_mib: record.memory_mib,
                cpus,
                accel,
                net,
                serial_log: files.console_log(),
            }
            .command(),
            Boot::Local => {
                let vm = qemu::UefiVm {
                    disk: disks[0].clone(),
                    memory_mib: record.memory_mib,
                    cpus,
                    accel,
                    vars: dir.join("OVMF_VARS.fd"),
                    serial_log: files.console_log(),
                    snapshot: false,
                    extra_disks: disks[1..].to_vec(),
                    net: Some(net),
                    instance: Some(qemu::InstanceIdentity {
                        product: format!("SCW-{}", metadata::COMMERCIAL_TYPE),
                        guest_agent_socket: files.guest_agent_socket(),
                    }),
                };
                if !dir.join("OVMF_VARS.fd").exists() {
                    vm.prepare_vars()?;
                }
                vm.command()
            }
        })
    }

    fn create_volume_files(&self, spec: &VolumeSpec, id: &str) -> Result<u64> {
        let path = self.store.data_path(Kind::Volume, id);
        match spec {
            VolumeSpec::Blank { size } => {
                if *size < 1 << 20 {
                    bail!("a volume of {size} bytes is too small (at least 1 MiB)");
                }
                qemu_img([
                    OsStr::new("create"),
                    OsStr::new("-q"),
                    OsStr::new("-f"),
                    OsStr::new("qcow2"),
                    path.as_os_str(),
                    OsStr::new(&size.to_string()),
                ])?;
                Ok(*size)
            }
            VolumeSpec::FromSnapshot { snapshot, size } => {
                let snap: Snapshot = self.store.lock()?.read(Kind::Snapshot, snapshot)?;
                let source = self.store.data_path(Kind::Snapshot, snapshot);
                qemu_img([
                    OsStr::new("convert"),
                    "-O".as_ref(),
                    OsStr::new("qcow2"),
                    source.as_os_str(),
                    path.as_os_str(),
                ])?;
                match size {
                    // The guest grows its partition and filesystem (growpart).
                    Some(size) if *size > snap.size => {
                        qemu_img([
                            OsStr::new("resize"),
                            OsStr::new("-q"),
                            path.as_os_str(),
                            OsStr::new(&size.to_string()),
                        ])?;
                        Ok(*size)
                    }
                    _ => Ok(snap.size),
                }
            }
        }
    }

    fn create_server_blocking(&self, spec: &ServerSpec) -> Result<Server> {
        if spec.name.trim().is_empty() {
            bail!("a server needs a name");
        }
        let boot = spec
            .boot
            .clone()
            .context("a server needs a boot: a bootscript or the local (UEFI) boot")?;
        if spec.volumes.is_empty() {
            bail!("a server needs at least one volume");
        }
        if spec.cloud_init.is_some() && matches!(boot, Boot::Bootscript(_)) {
            bail!("cloud-init runs in an image, not in a bootscript's initrd");
        }
        for volume in &spec.volumes {
            if let VolumeSpec::FromSnapshot {
                snapshot,
                size: Some(size),
            } = volume
            {
                let snap: Snapshot = self.store.lock()?.read(Kind::Snapshot, snapshot)?;
                if *size < snap.size {
                    bail!(
                        "a volume of {size} bytes cannot hold snapshot {} ({} bytes): give at least {}",
                        snap.name,
                        snap.size,
                        crate::size::format_size(snap.size)
                    );
                }
            }
        }
        let mut ports = std::collections::BTreeSet::new();
        for service in &spec.host_services {
            if !service.ip().is_loopback() {
                bail!(
                    "the local provider's servers reach only this machine (restrict=on): \
                     {service} is not a loopback address"
                );
            }
            if !ports.insert(service.port()) {
                bail!("two host services on port {}", service.port());
            }
        }
        let id = new_id();
        let volume_ids: Vec<String> = spec.volumes.iter().map(|_| new_id()).collect();
        let volume_record = |slot: usize, size: u64| Volume {
            id: volume_ids[slot].clone(),
            name: format!("{}-vol-{slot}", spec.name),
            size,
            server: Some(id.clone()),
            created_at: now_rfc3339(),
        };
        let mut record = ServerRecord {
            id: id.clone(),
            name: spec.name.clone(),
            tags: spec.tags.clone(),
            boot: boot.clone(),
            append: String::new(),
            volumes: volume_ids.clone(),
            arch: "x86_64".into(),
            created_at: now_rfc3339(),
            memory_mib: spec.memory_mib.unwrap_or(DEFAULT_MEMORY_MIB),
            exposed_ports: spec.exposed_ports.clone(),
            host_services: spec.host_services.clone(),
            state_detail: String::new(),
            user_data: spec
                .cloud_init
                .iter()
                .map(|c| ("cloud-init".to_string(), c.clone()))
                .collect(),
            ssh_public_keys: spec.ssh_public_keys.clone(),
            runtime: None,
        };
        // The records come first, files after: whatever interrupts the
        // creation, the server is on record (with its tags, for a build's
        // cleanup), and deleting it removes the files that exist.
        {
            let locked = self.store.lock()?;
            for (slot, vid) in volume_ids.iter().enumerate() {
                locked.write(Kind::Volume, vid, &volume_record(slot, 0))?;
            }
            locked.write(Kind::Server, &id, &record)?;
        }
        let result = (|| {
            let dir = self.store.server_dir(&id);
            std::fs::create_dir_all(&dir).with_context(|| format!("create {}", dir.display()))?;
            if let Boot::Bootscript(artifacts) = &boot {
                record.append = copy_bootscript(Path::new(artifacts), &dir)?;
            }
            let mut sizes = Vec::new();
            for (vspec, vid) in spec.volumes.iter().zip(&volume_ids) {
                sizes.push(self.create_volume_files(vspec, vid)?);
            }
            let locked = self.store.lock()?;
            for (slot, size) in sizes.into_iter().enumerate() {
                locked.write(Kind::Volume, &volume_ids[slot], &volume_record(slot, size))?;
            }
            locked.write(Kind::Server, &id, &record)?;
            Ok(Self::to_server(&record))
        })();
        if result.is_err() {
            // Nothing half-made stays behind.
            if let Err(e) = self.delete_server_blocking(&id, true) {
                warn!("remove the half-created server {id}: {e:#}");
            }
        }
        result
    }

    fn start_server_blocking(&self, id: &str) -> Result<Server> {
        // Before the lock: a first KVM probe takes seconds.
        let accel = accel::resolve(self.accel)?;
        let locked = self.store.lock()?;
        let mut record: ServerRecord = locked.read(Kind::Server, id)?;
        self.refresh(&mut record);
        if record.runtime.is_some() {
            bail!("server {} ({}) is already running", record.name, id);
        }
        let files = MachineFiles::new(&self.store.server_dir(id));
        let name = machine::process_name(id);
        // A port picked free can be taken before QEMU binds it (another
        // build starting): pick again.
        let mut attempt = 0;
        let (pid, endpoints) = loop {
            attempt += 1;
            let endpoints = record
                .exposed_ports
                .iter()
                .map(|p| Ok((*p, qemu::free_loopback_port()?)))
                .collect::<Result<BTreeMap<_, _>>>()?;
            let cmd = self.machine_command(&record, &endpoints, accel)?;
            match machine::launch(cmd, &files, &name) {
                Ok(pid) => break (pid, endpoints),
                Err(e) if attempt < 3 && format!("{e:#}").contains("host forwarding") => {
                    debug!("retrying with other ports: {e:#}");
                }
                Err(e) => return Err(e.context(format!("start server {}", record.name))),
            }
        };
        info!(
            "server {} ({id}) started: QEMU pid {pid}, console {}",
            record.name,
            files.console_log().display()
        );
        record.state_detail = String::new();
        record.runtime = Some(Runtime {
            pid,
            endpoints,
            accel: format!("{accel:?}").to_lowercase(),
            started_at: now_rfc3339(),
            stopping: false,
        });
        locked.write(Kind::Server, id, &record)?;
        Ok(Self::to_server(&record))
    }

    fn stop_server_blocking(&self, id: &str) -> Result<Server> {
        let (pid, boot) = {
            let locked = self.store.lock()?;
            let mut record: ServerRecord = locked.read(Kind::Server, id)?;
            self.refresh(&mut record);
            let Some(rt) = record.runtime.as_mut() else {
                locked.write(Kind::Server, id, &record)?;
                return Ok(Self::to_server(&record));
            };
            rt.stopping = true;
            let pid = rt.pid;
            locked.write(Kind::Server, id, &record)?;
            (pid, record.boot.clone())
        };
        // The lock is not held while QEMU shuts down: the guest's metadata
        // requests need it.
        let files = MachineFiles::new(&self.store.server_dir(id));
        let powerdown = match boot {
            // The agent waits to be stopped and has nothing to flush.
            Boot::Bootscript(_) => None,
            Boot::Local => Some(POWERDOWN_GRACE),
        };
        machine::stop(&files, pid, &machine::process_name(id), powerdown)?;
        let locked = self.store.lock()?;
        let mut record: ServerRecord = locked.read(Kind::Server, id)?;
        record.runtime = None;
        locked.write(Kind::Server, id, &record)?;
        Ok(Self::to_server(&record))
    }

    fn delete_server_blocking(&self, id: &str, with_volumes: bool) -> Result<()> {
        let locked = self.store.lock()?;
        let mut record: ServerRecord = locked.read(Kind::Server, id)?;
        self.refresh(&mut record);
        if record.runtime.is_some() {
            bail!(
                "server {} ({id}) is running: stop it first (imgforge server stop {id})",
                record.name
            );
        }
        for vid in &record.volumes {
            if with_volumes {
                locked.remove(Kind::Volume, vid)?;
                remove_if_exists(&self.store.data_path(Kind::Volume, vid))?;
            } else if let Ok(mut volume) = locked.read::<Volume>(Kind::Volume, vid) {
                volume.server = None;
                locked.write(Kind::Volume, vid, &volume)?;
            }
        }
        let dir = self.store.server_dir(id);
        if dir.exists() {
            std::fs::remove_dir_all(&dir).with_context(|| format!("remove {}", dir.display()))?;
        }
        locked.remove(Kind::Server, id)
    }

    fn create_snapshot_blocking(&self, volume_id: &str, name: &str) -> Result<Snapshot> {
        let volume: Volume = {
            let locked = self.store.lock()?;
            let volume: Volume = locked.read(Kind::Volume, volume_id)?;
            if let Some(server) = &volume.server {
                let mut record: ServerRecord = locked.read(Kind::Server, server)?;
                self.refresh(&mut record);
                if record.runtime.is_some() {
                    bail!(
                        "volume {volume_id} belongs to the running server {}: stop it \
                         before taking a snapshot",
                        record.name
                    );
                }
            }
            volume
        };
        let id = new_id();
        let path = self.store.data_path(Kind::Snapshot, &id);
        let partial = partial_path(&path);
        // A snapshot is a compact copy: only written clusters.
        let source = self.store.data_path(Kind::Volume, volume_id);
        if let Err(e) = qemu_img([
            OsStr::new("convert"),
            "-O".as_ref(),
            OsStr::new("qcow2"),
            source.as_os_str(),
            partial.as_os_str(),
        ]) {
            let _ = std::fs::remove_file(&partial);
            return Err(e);
        }
        let snapshot = Snapshot {
            id: id.clone(),
            name: name.to_owned(),
            size: volume.size,
            base_volume: volume_id.to_owned(),
            created_at: now_rfc3339(),
        };
        let locked = self.store.lock()?;
        std::fs::rename(&partial, &path)
            .with_context(|| format!("rename to {}", path.display()))?;
        locked.write(Kind::Snapshot, &id, &snapshot)?;
        Ok(snapshot)
    }
}

#[async_trait::async_trait]
impl Provider for LocalProvider {
    fn name(&self) -> &'static str {
        "local"
    }

    /// Servers are QEMU processes booting bootscript directories of this
    /// machine, reaching its loopback through guest forwards; no cloud
    /// images to start a helper server from.
    fn capabilities(&self) -> Capabilities {
        Capabilities {
            local_bootscripts: true,
            helper_servers: false,
            forwards_to_host: true,
            imports_qcow2: false,
        }
    }

    async fn create_server(&self, spec: &ServerSpec) -> Result<Server> {
        let this = self.clone_handle();
        let spec = spec.clone();
        blocking(move || this.create_server_blocking(&spec)).await
    }

    async fn get_server(&self, id: &str) -> Result<Server> {
        Ok(Self::to_server(&self.read_server(id)?))
    }

    async fn list_servers(&self) -> Result<Vec<Server>> {
        let locked = self.store.lock()?;
        let mut records: Vec<ServerRecord> = locked.list(Kind::Server)?;
        for record in &mut records {
            if self.refresh(record) {
                locked.write(Kind::Server, &record.id, record)?;
            }
        }
        let mut servers: Vec<Server> = records.iter().map(Self::to_server).collect();
        servers.sort_by(|a, b| a.created_at.cmp(&b.created_at).then(a.id.cmp(&b.id)));
        Ok(servers)
    }

    async fn start_server(&self, id: &str) -> Result<Server> {
        let this = self.clone_handle();
        let id = id.to_owned();
        blocking(move || this.start_server_blocking(&id)).await
    }

    async fn stop_server(&self, id: &str) -> Result<Server> {
        let this = self.clone_handle();
        let id = id.to_owned();
        blocking(move || this.stop_server_blocking(&id)).await
    }

    async fn delete_server(&self, id: &str, with_volumes: bool) -> Result<()> {
        self.delete_server_blocking(id, with_volumes)
    }

    async fn set_server_tags(&self, id: &str, tags: &[String]) -> Result<Server> {
        let locked = self.store.lock()?;
        let mut record: ServerRecord = locked.read(Kind::Server, id)?;
        record.tags = tags.to_vec();
        self.refresh(&mut record);
        locked.write(Kind::Server, id, &record)?;
        Ok(Self::to_server(&record))
    }

    async fn console_tail(&self, id: &str, lines: usize) -> Result<Option<String>> {
        let files = MachineFiles::new(&self.store.server_dir(id));
        match std::fs::read(files.console_log()) {
            Ok(bytes) => Ok(Some(qemu::tail(&String::from_utf8_lossy(&bytes), lines))),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e).context("read the console log"),
        }
    }

    async fn get_volume(&self, id: &str) -> Result<Volume> {
        self.store.lock()?.read(Kind::Volume, id)
    }

    async fn list_volumes(&self) -> Result<Vec<Volume>> {
        let mut v: Vec<Volume> = self.store.lock()?.list(Kind::Volume)?;
        v.sort_by(|a, b| a.created_at.cmp(&b.created_at).then(a.id.cmp(&b.id)));
        Ok(v)
    }

    async fn delete_volume(&self, id: &str) -> Result<()> {
        let locked = self.store.lock()?;
        let volume: Volume = locked.read(Kind::Volume, id)?;
        if let Some(server) = volume.server.filter(|s| locked.exists(Kind::Server, s)) {
            bail!("volume {id} is attached to server {server}: delete the server first");
        }
        remove_if_exists(&self.store.data_path(Kind::Volume, id))?;
        locked.remove(Kind::Volume, id)
    }

    async fn create_snapshot(&self, volume: &str, name: &str) -> Result<Snapshot> {
        let this = self.clone_handle();
        let (volume, name) = (volume.to_owned(), name.to_owned());
        blocking(move || this.create_snapshot_blocking(&volume, &name)).await
    }

    async fn get_snapshot(&self, id: &str) -> Result<Snapshot> {
        self.store.lock()?.read(Kind::Snapshot, id)
    }

    async fn list_snapshots(&self) -> Result<Vec<Snapshot>> {
        let mut v: Vec<Snapshot> = self.store.lock()?.list(Kind::Snapshot)?;
        v.sort_by(|a, b| a.created_at.cmp(&b.created_at).then(a.id.cmp(&b.id)));
        Ok(v)
    }

    async fn delete_snapshot(&self, id: &str) -> Result<()> {
        let locked = self.store.lock()?;
        locked.read::<Snapshot>(Kind::Snapshot, id)?;
        let images: Vec<Image> = locked.list(Kind::Image)?;
        if let Some(image) = images.iter().find(|i| i.root_volume == id) {
            bail!(
                "snapshot {id} is the root volume of image {} ({}): delete the image first",
                image.name,
                image.id
            );
        }
        remove_if_exists(&self.store.data_path(Kind::Snapshot, id))?;
        locked.remove(Kind::Snapshot, id)
    }

    async fn create_image(&self, name: &str, snapshot: &str, arch: &str) -> Result<Image> {
        if name.trim().is_empty() {
            bail!("an image needs a name");
        }
        let locked = self.store.lock()?;
        locked.read::<Snapshot>(Kind::Snapshot, snapshot)?;
        let image = Image {
            id: new_id(),
            name: name.to_owned(),
            arch: arch.to_owned(),
            root_volume: snapshot.to_owned(),
            created_at: now_rfc3339(),
        };
        locked.write(Kind::Image, &image.id, &image)?;
        Ok(image)
    }

    async fn get_image(&self, id: &str) -> Result<Image> {
        self.store.lock()?.read(Kind::Image, id)
    }

    async fn list_images(&self) -> Result<Vec<Image>> {
        let mut v: Vec<Image> = self.store.lock()?.list(Kind::Image)?;
        v.sort_by(|a, b| a.created_at.cmp(&b.created_at).then(a.id.cmp(&b.id)));
        Ok(v)
    }

    async fn delete_image(&self, id: &str) -> Result<()> {
        let locked = self.store.lock()?;
        locked.read::<Image>(Kind::Image, id)?;
        locked.remove(Kind::Image, id)
    }

    fn guest_url(&self, url: &str) -> Result<String> {
        let mut parsed = url::Url::parse(url).with_context(|| format!("URL {url:?}"))?;
        let loopback = match parsed.host() {
            Some(url::Host::Ipv4(ip)) => ip.is_loopback(),
            Some(url::Host::Ipv6(ip)) => ip.is_loopback(),
            Some(url::Host::Domain(d)) => d == "localhost",
            None => false,
        };
        if !loopback {
            bail!(
                "{url}: the local provider's servers reach only this machine (restrict=on); \
                 give a local file, or a URL on 127.0.0.1"
            );
        }
        parsed
            .set_ip_host(IpAddr::V4(HOST_SERVICES_GUEST_IP))
            .map_err(|()| anyhow::anyhow!("{url}: cannot rewrite its host"))?;
        Ok(parsed.to_string())
    }

    /// Local snapshots are made only from stopped build servers, right before
    /// the image: the servers are what a killed build leaves behind.
    async fn cleanup_builds(&self, build: Option<&str>, dry_run: bool) -> Result<Vec<String>> {
        let mut removed = Vec::new();
        for server in self.list_servers().await? {
            let Some(id) = super::build_id_of(&server.tags) else {
                continue;
            };
            if build.is_some_and(|b| b != id) {
                continue;
            }
            let line = format!(
                "server {} ({}) of build {id}, with its volumes",
                server.name, server.id
            );
            if !dry_run {
                self.stop_server(&server.id).await?;
                self.delete_server(&server.id, true).await?;
            }
            removed.push(line);
        }
        Ok(removed)
    }
}

impl LocalProvider {
    /// A second handle on the same store, for blocking work on another
    /// thread.
    fn clone_handle(&self) -> LocalProvider {
        LocalProvider {
            store: self.store.clone(),
            accel: self.accel,
            exe: self.exe.clone(),
        }
    }
}

/// Copies a bootscript's kernel and initrd into the server's directory and
/// returns its kernel arguments.
fn copy_bootscript(artifacts: &Path, dir: &Path) -> Result<String> {
    let info = crate::bootscript::read_info(artifacts).with_context(|| {
        format!(
            "{} is not a bootscript directory (make one with `imgforge initrd -o DIR`)",
            artifacts.display()
        )
    })?;
    for (from, to) in [(&info.kernel, "vmlinuz"), (&info.initrd, "initrd.img")] {
        let source = artifacts.join(from);
        std::fs::copy(&source, dir.join(to))
            .with_context(|| format!("copy {}", source.display()))?;
    }
    Ok(info.bootcmdargs)
}

/// Runs qemu-img; an error carries its message.
fn qemu_img<const N: usize>(args: [&OsStr; N]) -> Result<()> {
    run_qemu_img(&args)
}

/// The virtual size of a QCOW2 file, from its header.
fn virtual_size(path: &Path) -> Result<u64> {
    let mut file = std::fs::File::open(path).with_context(|| format!("open {}", path.display()))?;
    let len = file.metadata()?.len();
    let header = qcow2::Header::read(&mut file, len)
        .with_context(|| format!("read the QCOW2 header of {}", path.display()))?;
    Ok(header.virtual_size)
}

fn run_qemu_img(args: &[&OsStr]) -> Result<()> {
    let output = Command::new("qemu-img")
        .args(args)
        .output()
        .running("qemu-img")?;
    if !output.status.success() {
        bail!(
            "qemu-img {:?} failed: {}",
            args,
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    Ok(())
}

/// `<path>.partial`, registered with [`crate::interrupt::register_partial`]:
/// data files are written there and renamed once complete.
fn partial_path(path: &Path) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(".partial");
    let partial = path.with_file_name(name);
    crate::interrupt::register_partial(&partial);
    partial
}

fn remove_if_exists(path: &Path) -> Result<()> {
    match std::fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e).with_context(|| format!("remove {}", path.display())),
    }
}

/// Runs blocking provider work off the async runtime's workers.
async fn blocking<T: Send + 'static>(f: impl FnOnce() -> Result<T> + Send + 'static) -> Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .context("provider task panicked")?
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every file under `dir`, recursively.
    fn files_under(dir: &Path) -> Vec<PathBuf> {
        let mut found = Vec::new();
        for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
            let path = entry.path();
            if path.is_dir() {
                found.extend(files_under(&path));
            } else {
                found.push(path);
            }
        }
        found
    }

    #[test]
    fn capabilities_local_bootscripts_and_forwards() {
        let home = tempfile::tempdir().unwrap();
        let provider = LocalProvider::open(home.path(), AccelChoice::Tcg).unwrap();
        assert_eq!(
            provider.capabilities(),
            Capabilities {
                local_bootscripts: true,
                helper_servers: false,
                forwards_to_host: true,
                imports_qcow2: false,
            }
        );
    }

    #[tokio::test]
    async fn a_server_that_cannot_be_made_leaves_no_record_or_file() {
        let home = tempfile::tempdir().unwrap();
        let provider = LocalProvider::open(home.path(), AccelChoice::Tcg).unwrap();
        let before = files_under(home.path());
        // The first volume is made, the second is refused.
        let spec = ServerSpec {
            name: "half".into(),
            boot: Some(Boot::Local),
            volumes: vec![
                VolumeSpec::Blank { size: 16 << 20 },
                VolumeSpec::Blank { size: 1000 },
            ],
            tags: vec!["imgforge-build=0123abcd".into()],
            exposed_ports: vec![],
            host_services: vec![],
            memory_mib: None,
            cloud_init: None,
            ssh_public_keys: vec![],
        };
        let err = provider.create_server(&spec).await.unwrap_err();
        assert!(format!("{err:#}").contains("too small"), "{err:#}");
        assert!(provider.list_servers().await.unwrap().is_empty());
        assert!(provider.list_volumes().await.unwrap().is_empty());
        // Only the store's lock file, which the first lock made.
        let left: Vec<PathBuf> = files_under(home.path())
            .into_iter()
            .filter(|p| !before.contains(p) && !p.ends_with("lock"))
            .collect();
        assert!(left.is_empty(), "{left:?}");
    }
}
