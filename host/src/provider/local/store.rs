//! The local provider's state directory (`$IMGFORGE_HOME`).
//!
//! ```text
//! lock                       flock(2)ed for every read-modify-write
//! servers/<id>.json          records (written to a temporary file, fsynced,
//! volumes/<id>.json            renamed over the old one: a crash leaves the
//! snapshots/<id>.json          old or the new record, never a torn one)
//! images/<id>.json
//! servers/<id>/              a server's runtime files (console log, QMP
//!                              socket, pid file, kernel and initrd copies)
//! volumes/<id>.qcow2         volume and snapshot data
//! snapshots/<id>.qcow2
//! ```
//!
//! Several `imgforge` processes share the directory (concurrent builds, the
//! metadata process QEMU spawns per guest connection), so records are only
//! read and written through a [`Locked`] handle.

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use nix::fcntl::{Flock, FlockArg};
use serde::de::DeserializeOwned;
use serde::Serialize;

/// A record type and the directory holding its records.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Server,
    Volume,
    Snapshot,
    Image,
}

impl Kind {
    fn dir(self) -> &'static str {
        match self {
            Kind::Server => "servers",
            Kind::Volume => "volumes",
            Kind::Snapshot => "snapshots",
            Kind::Image => "images",
        }
    }

    pub fn noun(self) -> &'static str {
        match self {
            Kind::Server => "server",
            Kind::Volume => "volume",
            Kind::Snapshot => "snapshot",
            Kind::Image => "image",
        }
    }
}

#[derive(Clone, Debug)]
pub struct Store {
    home: PathBuf,
}

impl Store {
    /// `$IMGFORGE_HOME`, else `$XDG_DATA_HOME/imgforge`, else
    /// `~/.local/share/imgforge`.
    pub fn default_home() -> Result<PathBuf> {
        if let Some(home) = std::env::var_os("IMGFORGE_HOME").filter(|h| !h.is_empty()) {
            return Ok(PathBuf::from(home));
        }
        if let Some(data) = std::env::var_os("XDG_DATA_HOME").filter(|h| !h.is_empty()) {
            return Ok(PathBuf::from(data).join("imgforge"));
        }
        let home = std::env::var_os("HOME")
            .filter(|h| !h.is_empty())
            .context("neither IMGFORGE_HOME, XDG_DATA_HOME nor HOME is set")?;
        Ok(PathBuf::from(home).join(".local/share/imgforge"))
    }

    /// Opens (creating if needed) the state directory at `home`.
    pub fn open(home: &Path) -> Result<Store> {
        for kind in [Kind::Server, Kind::Volume, Kind::Snapshot, Kind::Image] {
            let dir = home.join(kind.dir());
            fs::create_dir_all(&dir)
                .with_context(|| format!("create the state directory {}", dir.display()))?;
        }
        // Absolute: QEMU runs detached and its paths must not depend on our
        // working directory.
        let home = fs::canonicalize(home).with_context(|| format!("{}", home.display()))?;
        Ok(Store { home })
    }

    pub fn home(&self) -> &Path {
        &self.home
    }

    /// Takes the store's lock (blocking until other processes release it).
    pub fn lock(&self) -> Result<Locked<'_>> {
        let path = self.home.join("lock");
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .with_context(|| format!("open {}", path.display()))?;
        let lock = Flock::lock(file, FlockArg::LockExclusive)
            .map_err(|(_, e)| e)
            .with_context(|| format!("lock {}", path.display()))?;
        Ok(Locked {
            store: self,
            _lock: lock,
        })
    }

    /// A server's runtime directory.
    pub fn server_dir(&self, id: &str) -> PathBuf {
        self.home.join(Kind::Server.dir()).join(id)
    }

    /// A volume's or snapshot's qcow2 file.
    pub fn data_path(&self, kind: Kind, id: &str) -> PathBuf {
        self.home.join(kind.dir()).join(format!("{id}.qcow2"))
    }

    fn record_path(&self, kind: Kind, id: &str) -> PathBuf {
        self.home.join(kind.dir()).join(format!("{id}.json"))
    }
}

/// The store with its lock held; records are read and written through it.
pub struct Locked<'a> {
    store: &'a Store,
    _lock: Flock<File>,
}

impl Locked<'_> {
    pub fn exists(&self, kind: Kind, id: &str) -> bool {
        valid_id(id) && self.store.record_path(kind, id).is_file()
    }

    pub fn read<T: DeserializeOwned>(&self, kind: Kind, id: &str) -> Result<T> {
        if !valid_id(id) {
            bail!("{id:?} is not a {} id", kind.noun());
        }
        let path = self.store.record_path(kind, id);
        let bytes = match fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                bail!(
                    "no {} {id} (see `imgforge {} list`)",
                    kind.noun(),
                    kind.noun()
                )
            }
            Err(e) => return Err(e).with_context(|| format!("read {}", path.display())),
        };
        serde_json::from_slice(&bytes).with_context(|| format!("parse {}", path.display()))
    }

    /// Writes a record atomically (temporary file, fsync, rename).
    pub fn write<T: Serialize>(&self, kind: Kind, id: &str, record: &T) -> Result<()> {
        if !valid_id(id) {
            bail!("{id:?} is not a {} id", kind.noun());
        }
        let path = self.store.record_path(kind, id);
        let tmp = path.with_extension("json.tmp");
        let mut bytes = serde_json::to_vec_pretty(record)?;
        bytes.push(b'\n');
        let mut file = File::create(&tmp).with_context(|| format!("create {}", tmp.display()))?;
        file.write_all(&bytes)
            .and_then(|()| file.sync_all())
            .with_context(|| format!("write {}", tmp.display()))?;
        fs::rename(&tmp, &path).with_context(|| format!("rename to {}", path.display()))?;
        Ok(())
    }

    /// Every record of `kind`, oldest file name first (ids are random, so
    /// callers sort as they need).
    pub fn list<T: DeserializeOwned>(&self, kind: Kind) -> Result<Vec<T>> {
        let dir = self.store.home.join(kind.dir());
        let mut ids: Vec<String> = fs::read_dir(&dir)
            .with_context(|| format!("read {}", dir.display()))?
            .filter_map(|e| e.ok())
            .filter_map(|e| {
                let name = e.file_name().into_string().ok()?;
                name.strip_suffix(".json").map(str::to_owned)
            })
            .filter(|id| valid_id(id))
            .collect();
        ids.sort();
        ids.iter().map(|id| self.read(kind, id)).collect()
    }

    pub fn remove(&self, kind: Kind, id: &str) -> Result<()> {
        if !valid_id(id) {
            bail!("{id:?} is not a {} id", kind.noun());
        }
        let path = self.store.record_path(kind, id);
        match fs::remove_file(&path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(e).with_context(|| format!("remove {}", path.display())),
        }
    }
}

/// A fresh id (a UUID, as the cloud's).
pub fn new_id() -> String {
    uuid::Uuid::new_v4().to_string()
}

/// Ids become file names: only what [`new_id`] produces is accepted, so a
/// user-supplied "id" can never name a path outside the store.
fn valid_id(id: &str) -> bool {
    !id.is_empty() && id.len() <= 64 && id.bytes().all(|b| b.is_ascii_hexdigit() || b == b'-')
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;

    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    struct Rec {
        n: u32,
    }

    #[test]
    fn records_round_trip_and_missing_ones_name_the_list_command() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let locked = store.lock().unwrap();
        let id = new_id();
        locked.write(Kind::Image, &id, &Rec { n: 7 }).unwrap();
        assert_eq!(locked.read::<Rec>(Kind::Image, &id).unwrap(), Rec { n: 7 });
        assert_eq!(locked.list::<Rec>(Kind::Image).unwrap().len(), 1);
        assert!(locked.list::<Rec>(Kind::Server).unwrap().is_empty());
        locked.remove(Kind::Image, &id).unwrap();
        let err = locked
            .read::<Rec>(Kind::Image, &id)
            .unwrap_err()
            .to_string();
        assert!(err.contains("imgforge image list"), "{err}");
    }

    #[test]
    fn ids_that_are_paths_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let locked = store.lock().unwrap();
        for bad in ["../x", "a/b", "", "name with space"] {
            assert!(locked.read::<Rec>(Kind::Server, bad).is_err(), "{bad}");
            assert!(locked.write(Kind::Server, bad, &Rec { n: 1 }).is_err());
        }
    }

    /// Many processes' worth of read-modify-write cycles on one record
    /// (threads, each with its own lock file handle): none is lost.
    #[test]
    fn the_lock_serialises_read_modify_write() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let id = new_id();
        store
            .lock()
            .unwrap()
            .write(Kind::Server, &id, &Rec { n: 0 })
            .unwrap();
        let threads: Vec<_> = (0..8)
            .map(|_| {
                let store = store.clone();
                let id = id.clone();
                std::thread::spawn(move || {
                    for _ in 0..25 {
                        let locked = store.lock().unwrap();
                        let mut r: Rec = locked.read(Kind::Server, &id).unwrap();
                        r.n += 1;
                        locked.write(Kind::Server, &id, &r).unwrap();
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        let r: Rec = store.lock().unwrap().read(Kind::Server, &id).unwrap();
        assert_eq!(r.n, 200);
    }
}
