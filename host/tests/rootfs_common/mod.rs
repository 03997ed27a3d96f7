//! Shared by the rootfs_* tests: fixture layers, OCI layouts and docker
//! archives written with the `tar` crate, and listings of trees (from a tar
//! or from a directory) to compare results file by file.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::fs;
use std::io::{Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::json;
use sha2::{Digest, Sha256};

pub fn sha256_hex(data: &[u8]) -> String {
    hex::encode(Sha256::digest(data))
}

pub fn file_sha256(path: &Path) -> String {
    let mut f = fs::File::open(path).unwrap();
    let mut h = Sha256::new();
    std::io::copy(&mut f, &mut h).unwrap();
    hex::encode(h.finalize())
}

pub fn is_root() -> bool {
    // SAFETY: geteuid(2) takes no argument and always succeeds.
    unsafe { libc::geteuid() == 0 }
}

/// A test needs a tool that scripts/setup.sh installs and it is missing: outside the project's
/// setup the test is skipped with `message`; under scripts/test.sh (which sets
/// `IMGFORGE_REQUIRE_TOOLS=1`) it fails, so that a missing install step cannot pass as a skip.
pub fn skip_for_missing_tool(message: &str) {
    if std::env::var_os("IMGFORGE_REQUIRE_TOOLS").is_some() {
        panic!("{message} (scripts/test.sh requires every tool of scripts/tools.list)");
    }
    eprintln!("skipping: {message}");
}

pub fn have(program: &str) -> bool {
    Command::new(program)
        .arg("--version")
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false)
}

/// The files in `dir` (names), to check that nothing was left behind.
pub fn dir_names(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

// ---------------------------------------------------------------------------
// Layers.

/// Builds one layer tar with the `tar` crate (ustar headers, pax records for
/// xattrs).
pub struct Layer {
    b: tar::Builder<Vec<u8>>,
    pub mtime: u64,
}

impl Default for Layer {
    fn default() -> Self {
        Self::new()
    }
}

impl Layer {
    pub fn new() -> Layer {
        Layer::with_mtime(1_600_000_000)
    }

    /// A layer whose entries have this mtime.
    pub fn with_mtime(mtime: u64) -> Layer {
        Layer {
            b: tar::Builder::new(Vec::new()),
            mtime,
        }
    }

    fn header(&self, path: &str, ty: tar::EntryType, mode: u32, uid: u64, gid: u64) -> tar::Header {
        let mut h = tar::Header::new_ustar();
        h.set_path(path).unwrap();
        h.set_entry_type(ty);
        h.set_mode(mode);
        h.set_uid(uid);
        h.set_gid(gid);
        h.set_mtime(self.mtime);
        h.set_size(0);
        h
    }

    fn pax(&mut self, records: &[(&str, &[u8])]) {
        let mut data = Vec::new();
        for (k, v) in records {
            let body = k.len() + v.len() + 3;
            let mut len = body + 1;
            while len != body + len.to_string().len() {
                len = body + len.to_string().len();
            }
            data.extend_from_slice(format!("{len} {k}=").as_bytes());
            data.extend_from_slice(v);
            data.push(b'\n');
        }
        let mut h = tar::Header::new_ustar();
        h.set_path("PaxHeaders/x").unwrap();
        h.set_entry_type(tar::EntryType::XHeader);
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        h.set_cksum();
        self.b.append(&h, &data[..]).unwrap();
    }

    pub fn dir(mut self, path: &str, mode: u32, uid: u64, gid: u64) -> Self {
        let mut h = self.header(path, tar::EntryType::Directory, mode, uid, gid);
        h.set_cksum();
        self.b.append(&h, &[][..]).unwrap();
        self
    }

    pub fn file(self, path: &str, content: &str) -> Self {
        self.file_full(path, content.as_bytes(), 0o644, 0, 0, &[])
    }

    pub fn file_full(
        mut self,
        path: &str,
        content: &[u8],
        mode: u32,
        uid: u64,
        gid: u64,
        xattrs: &[(&str, &[u8])],
    ) -> Self {
        if !xattrs.is_empty() {
            let recs: Vec<(String, &[u8])> = xattrs
                .iter()
                .map(|(k, v)| (format!("SCHILY.xattr.{k}"), *v))
                .collect();
            let recs: Vec<(&str, &[u8])> = recs.iter().map(|(k, v)| (k.as_str(), *v)).collect();
            self.pax(&recs);
        }
        let mut h = self.header(path, tar::EntryType::Regular, mode, uid, gid);
        h.set_size(content.len() as u64);
        h.set_cksum();
        self.b.append(&h, content).unwrap();
        self
    }

    pub fn symlink(mut self, path: &str, target: &str) -> Self {
        let mut h = self.header(path, tar::EntryType::Symlink, 0o777, 0, 0);
        h.set_link_name(target).unwrap();
        h.set_cksum();
        self.b.append(&h, &[][..]).unwrap();
        self
    }

    /// A hard link (its header carries mode 0755, as the fixture's link
    /// targets have: extractors differ on whether a link's own header mode
    /// applies to the inode).
    pub fn hardlink(mut self, path: &str, target: &str) -> Self {
        let mut h = self.header(path, tar::EntryType::Link, 0o755, 0, 0);
        h.set_link_name(target).unwrap();
        h.set_cksum();
        self.b.append(&h, &[][..]).unwrap();
        self
    }

    pub fn char_dev(mut self, path: &str, mode: u32, major: u32, minor: u32) -> Self {
        let mut h = self.header(path, tar::EntryType::Char, mode, 0, 0);
        h.set_device_major(major).unwrap();
        h.set_device_minor(minor).unwrap();
        h.set_cksum();
        self.b.append(&h, &[][..]).unwrap();
        self
    }

    pub fn fifo(mut self, path: &str, mode: u32) -> Self {
        let mut h = self.header(path, tar::EntryType::Fifo, mode, 0, 0);
        h.set_cksum();
        self.b.append(&h, &[][..]).unwrap();
        self
    }

    /// A whiteout (`.wh.NAME`) for `path`.
    pub fn whiteout(self, path: &str) -> Self {
        let (dir, name) = path.rsplit_once('/').map_or(("", path), |(d, n)| (d, n));
        let wh = if dir.is_empty() {
            format!(".wh.{name}")
        } else {
            format!("{dir}/.wh.{name}")
        };
        self.file(&wh, "")
    }

    /// An opaque marker for the directory `dir`.
    pub fn opaque(self, dir: &str) -> Self {
        self.file(&format!("{dir}/.wh..wh..opq"), "")
    }

    pub fn finish(self) -> Vec<u8> {
        self.b.into_inner().unwrap()
    }
}

/// The three fixture layers: whiteouts, an opaque directory, hard links
/// (one across layers, one outliving its first name's replacement), a
/// symlinked parent, owners, setuid and sticky modes, xattrs, a device node
/// and a fifo; a file replaced by a directory and the reverse.
pub fn fixture_layers() -> Vec<Vec<u8>> {
    fixture_layers_with(Fixture::FULL)
}

/// Which of the fixture's rarer constructs to include.
#[derive(Clone, Copy, Debug)]
pub struct Fixture {
    /// Layer 3 adds `etc/hostname` and whites it out too.
    pub same_layer_whiteout: bool,
    /// Layer 3 hard-links `usr/bin/tool-link3` to layer 2's file.
    pub cross_layer_hardlink: bool,
    /// Layer 2 writes `lib/libbar.so` through the symlink `lib`.
    pub through_symlink: bool,
}

impl Fixture {
    pub const FULL: Fixture = Fixture {
        same_layer_whiteout: true,
        cross_layer_hardlink: true,
        through_symlink: true,
    };
}

pub fn fixture_layers_with(f: Fixture) -> Vec<Vec<u8>> {
    let l1 = Layer::new()
        .dir("./", 0o755, 0, 0)
        .dir("etc/", 0o755, 0, 0)
        .file("etc/passwd", "root:x:0:0:root:/root:/bin/sh\n")
        .file("etc/hostname", "base\n")
        .dir("usr/", 0o755, 0, 0)
        .dir("usr/bin/", 0o755, 0, 0)
        .file_full("usr/bin/tool", b"tool v1\n", 0o755, 0, 0, &[])
        .hardlink("usr/bin/tool-hard", "usr/bin/tool")
        .file_full("usr/bin/suid", b"suid\n", 0o4755, 0, 0, &[])
        .dir("usr/lib/", 0o755, 0, 0)
        .file("usr/lib/libfoo.so", "foo\n")
        .symlink("lib", "usr/lib")
        .dir("var/", 0o755, 0, 0)
        .dir("var/cache/", 0o755, 0, 0)
        .file("var/cache/a", "a\n")
        .file("var/cache/b", "b\n")
        .dir("var/cache/sub/", 0o700, 0, 0)
        .file("var/cache/sub/c", "c\n")
        .dir("opt/", 0o750, 1000, 1000)
        .dir("opt/app/", 0o755, 1000, 1000)
        .file_full("opt/app/data", b"data\n", 0o600, 1000, 1000, &[])
        .dir("tmp/", 0o1777, 0, 0)
        .dir("home/", 0o755, 0, 0)
        .dir("home/user/", 0o700, 1000, 1000)
        .file_full(
            "home/user/notes",
            b"notes\n",
            0o644,
            1000,
            1000,
            &[("user.comment", b"hello")],
        )
        .dir("data/", 0o755, 0, 0)
        .dir("data/dir/", 0o755, 0, 0)
        .file("data/dir/x", "x\n")
        .dir("dev/", 0o755, 0, 0)
        .char_dev("dev/null", 0o666, 1, 3)
        .fifo("dev/fifo", 0o644)
        .finish();
    let l2 = Layer::with_mtime(1_600_000_100)
        .dir("etc/", 0o755, 0, 0)
        .file("etc/hostname", "layer2\n")
        .whiteout("usr/lib/libfoo.so")
        .file_full("usr/bin/tool", b"tool v2\n", 0o755, 0, 0, &[])
        // Through the symlink lib -> usr/lib.
        .file(
            if f.through_symlink {
                "lib/libbar.so"
            } else {
                "usr/lib/libbar.so"
            },
            "bar\n",
        )
        .opaque("var/cache")
        .file("var/cache/new", "new\n")
        .whiteout("opt/app")
        .file_full(
            "etc/cap",
            b"cap\n",
            0o755,
            0,
            0,
            &[("user.x", b"bin\x0a\x00ary")],
        )
        .finish();
    let l3 = Layer::with_mtime(1_600_000_200)
        .whiteout("home")
        .file("var/cache/b", "b3\n")
        // Added, then whited out in the same layer: the addition stays.
        .file("etc/hostname", "layer3\n");
    let l3 = if f.same_layer_whiteout {
        l3.whiteout("etc/hostname")
    } else {
        l3
    };
    let l3 = if f.cross_layer_hardlink {
        l3.hardlink("usr/bin/tool-link3", "usr/bin/tool")
    } else {
        l3.file_full("usr/bin/tool-link3", b"tool v2\n", 0o755, 0, 0, &[])
    };
    let l3 = l3
        .dir("var/cache/new/", 0o755, 0, 0)
        .file("var/cache/new/inner", "inner\n")
        .file("data/dir", "now a file\n")
        .dir("srv/", 0o700, 33, 33)
        .file_full("srv/www", b"www\n", 0o640, 33, 33, &[])
        .finish();
    vec![l1, l2, l3]
}

// ---------------------------------------------------------------------------
// Image layouts.

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LayerCompression {
    None,
    Gzip,
    Zstd,
}

pub fn compress(data: &[u8], c: LayerCompression) -> Vec<u8> {
    match c {
        LayerCompression::None => data.to_vec(),
        LayerCompression::Gzip => {
            let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::new(1));
            e.write_all(data).unwrap();
            e.finish().unwrap()
        }
        LayerCompression::Zstd => zstd::encode_all(data, 3).unwrap(),
    }
}

fn media_type(c: LayerCompression) -> &'static str {
    match c {
        LayerCompression::None => "application/vnd.oci.image.layer.v1.tar",
        LayerCompression::Gzip => "application/vnd.oci.image.layer.v1.tar+gzip",
        LayerCompression::Zstd => "application/vnd.oci.image.layer.v1.tar+zstd",
    }
}

/// Writes a blob; returns its descriptor.
pub fn put_blob(layout: &Path, media_type: &str, data: &[u8]) -> serde_json::Value {
    let hex = sha256_hex(data);
    let dir = layout.join("blobs/sha256");
    fs::create_dir_all(&dir).unwrap();
    fs::write(dir.join(&hex), data).unwrap();
    json!({"mediaType": media_type, "digest": format!("sha256:{hex}"), "size": data.len()})
}

/// Writes an image manifest (config + layers) as a blob; returns its
/// descriptor.
pub fn put_image(
    layout: &Path,
    layers: &[Vec<u8>],
    c: LayerCompression,
    arch: &str,
) -> serde_json::Value {
    let diff_ids: Vec<String> = layers
        .iter()
        .map(|l| format!("sha256:{}", sha256_hex(l)))
        .collect();
    let config = json!({
        "architecture": arch,
        "os": "linux",
        "config": {},
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
    });
    let config_desc = put_blob(
        layout,
        "application/vnd.oci.image.config.v1+json",
        &serde_json::to_vec(&config).unwrap(),
    );
    let layer_descs: Vec<serde_json::Value> = layers
        .iter()
        .map(|l| put_blob(layout, media_type(c), &compress(l, c)))
        .collect();
    let manifest = json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": config_desc,
        "layers": layer_descs,
    });
    put_blob(
        layout,
        "application/vnd.oci.image.manifest.v1+json",
        &serde_json::to_vec(&manifest).unwrap(),
    )
}

pub fn write_index(layout: &Path, manifests: Vec<serde_json::Value>) {
    fs::create_dir_all(layout).unwrap();
    fs::write(
        layout.join("oci-layout"),
        br#"{"imageLayoutVersion":"1.0.0"}"#,
    )
    .unwrap();
    let index = json!({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json", "manifests": manifests});
    fs::write(
        layout.join("index.json"),
        serde_json::to_vec_pretty(&index).unwrap(),
    )
    .unwrap();
}

/// An OCI layout holding one image (tag `latest`).
pub fn write_oci(layout: &Path, layers: &[Vec<u8>], c: LayerCompression) {
    let mut desc = put_image(layout, layers, c, "amd64");
    desc["annotations"] = json!({"org.opencontainers.image.ref.name": "latest"});
    write_index(layout, vec![desc]);
}

/// A `docker save`-style archive (legacy layout: `<id>/layer.tar`,
/// `<config hex>.json`), as a tar file.
pub fn write_docker_archive(path: &Path, layers: &[Vec<u8>]) {
    let diff_ids: Vec<String> = layers
        .iter()
        .map(|l| format!("sha256:{}", sha256_hex(l)))
        .collect();
    let config = serde_json::to_vec(&json!({
        "architecture": "amd64",
        "os": "linux",
        "config": {},
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
    }))
    .unwrap();
    let config_name = format!("{}.json", sha256_hex(&config));
    let mut b = tar::Builder::new(Vec::new());
    let mut add = |name: &str, data: &[u8]| {
        let mut h = tar::Header::new_ustar();
        h.set_path(name).unwrap();
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        h.set_cksum();
        b.append(&h, data).unwrap();
    };
    let mut names = Vec::new();
    for (i, l) in layers.iter().enumerate() {
        let id = sha256_hex(format!("layer{i}").as_bytes());
        let name = format!("{id}/layer.tar");
        add(&name, l);
        names.push(name);
    }
    add(&config_name, &config);
    let manifest =
        json!([{"Config": config_name, "RepoTags": ["fixture:latest"], "Layers": names}]);
    add("manifest.json", &serde_json::to_vec(&manifest).unwrap());
    fs::write(path, b.into_inner().unwrap()).unwrap();
}

// ---------------------------------------------------------------------------
// Listings.

/// One path in a listing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Item {
    pub kind: String,
    pub mode: u32,
    pub uid: u64,
    pub gid: u64,
    pub size: u64,
    /// sha256 of a regular file's content.
    pub sha256: String,
    /// Symlink target, or `major:minor` of a device.
    pub link: String,
    pub xattrs: BTreeMap<String, Vec<u8>>,
    /// For files with several names: the smallest of those names.
    pub group: Option<String>,
    pub mtime: i64,
}

pub type Listing = BTreeMap<String, Item>;

/// Reads a (possibly compressed) tar with the `tar` crate: path (without
/// `./` or trailing `/`; the root is `.`) → item. Hard links take their
/// target's content.
pub fn listing_from_tar(path: &Path) -> Listing {
    let data = decompress_file(path);
    let mut ar = tar::Archive::new(&data[..]);
    let mut out = Listing::new();
    let mut links: Vec<(String, String)> = Vec::new();
    // Raw entries: pax headers are read here, by their length prefix (the
    // crate's own pax parser splits binary values at newlines).
    let mut pax: Vec<(String, Vec<u8>)> = Vec::new();
    for e in ar.entries().unwrap().raw(true) {
        let mut e = e.unwrap();
        if e.header().entry_type() == tar::EntryType::XHeader {
            let mut d = Vec::new();
            e.read_to_end(&mut d).unwrap();
            pax = parse_pax(&d);
            continue;
        }
        let records = std::mem::take(&mut pax);
        let find = |k: &str| {
            records
                .iter()
                .find(|(key, _)| key == k)
                .map(|(_, v)| v.clone())
        };
        let raw_name = find("path").unwrap_or_else(|| e.path_bytes().into_owned());
        let name = clean(&String::from_utf8_lossy(&raw_name));
        let h = e.header().clone();
        let xattrs: BTreeMap<String, Vec<u8>> = records
            .iter()
            .filter_map(|(k, v)| Some((k.strip_prefix("SCHILY.xattr.")?.to_string(), v.clone())))
            .collect();
        let link_name = find("linkpath").or_else(|| e.link_name_bytes().map(|c| c.into_owned()));
        let (kind, link, sha) = match h.entry_type() {
            tar::EntryType::Directory => ("dir", String::new(), String::new()),
            tar::EntryType::Regular => {
                let mut content = Vec::new();
                e.read_to_end(&mut content).unwrap();
                ("file", String::new(), sha256_hex(&content))
            }
            tar::EntryType::Symlink => (
                "symlink",
                String::from_utf8_lossy(&link_name.unwrap()).into_owned(),
                String::new(),
            ),
            tar::EntryType::Link => {
                let target = clean(&String::from_utf8_lossy(&link_name.unwrap()));
                links.push((name.clone(), target));
                ("hardlink", String::new(), String::new())
            }
            tar::EntryType::Char => (
                "char",
                format!(
                    "{}:{}",
                    h.device_major().unwrap().unwrap(),
                    h.device_minor().unwrap().unwrap()
                ),
                String::new(),
            ),
            tar::EntryType::Block => (
                "block",
                format!(
                    "{}:{}",
                    h.device_major().unwrap().unwrap(),
                    h.device_minor().unwrap().unwrap()
                ),
                String::new(),
            ),
            tar::EntryType::Fifo => ("fifo", String::new(), String::new()),
            other => panic!("unexpected entry type {other:?} for {name}"),
        };
        assert!(
            !out.contains_key(&name),
            "{name} appears twice in {}",
            path.display()
        );
        out.insert(
            name,
            Item {
                kind: kind.into(),
                mode: h.mode().unwrap() & 0o7777,
                uid: h.uid().unwrap(),
                gid: h.gid().unwrap(),
                size: if kind == "file" { h.size().unwrap() } else { 0 },
                sha256: sha,
                link,
                xattrs,
                group: None,
                mtime: h.mtime().unwrap() as i64,
            },
        );
    }
    // Hard links: the target's content; groups named by their smallest path.
    let mut groups: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for (name, target) in links {
        let t = out
            .get(&target)
            .unwrap_or_else(|| panic!("hard link {name} to missing {target}"))
            .clone();
        assert_eq!(t.kind, "file", "hard link {name} to a non-file {target}");
        let item = out.get_mut(&name).unwrap();
        item.kind = "file".into();
        item.size = t.size;
        item.sha256 = t.sha256.clone();
        item.mode = t.mode;
        item.uid = t.uid;
        item.gid = t.gid;
        item.xattrs = t.xattrs.clone();
        groups
            .entry(target.clone())
            .or_insert_with(|| vec![target])
            .push(name);
    }
    for members in groups.values() {
        let min = members.iter().min().unwrap().clone();
        for m in members {
            out.get_mut(m).unwrap().group = Some(min.clone());
        }
    }
    out
}

/// Pax records, read by their length prefix.
pub fn parse_pax(mut d: &[u8]) -> Vec<(String, Vec<u8>)> {
    let mut out = Vec::new();
    while !d.is_empty() {
        let sp = d.iter().position(|&b| b == b' ').unwrap();
        let len: usize = std::str::from_utf8(&d[..sp]).unwrap().parse().unwrap();
        let rec = &d[sp + 1..len - 1];
        let eq = rec.iter().position(|&b| b == b'=').unwrap();
        out.push((
            String::from_utf8_lossy(&rec[..eq]).into_owned(),
            rec[eq + 1..].to_vec(),
        ));
        d = &d[len..];
    }
    out
}

fn clean(name: &str) -> String {
    let parts: Vec<&str> = name
        .split('/')
        .filter(|p| !p.is_empty() && *p != ".")
        .collect();
    if parts.is_empty() {
        ".".into()
    } else {
        parts.join("/")
    }
}

/// A directory tree's listing (same shape as [`listing_from_tar`]).
pub fn listing_from_dir(root: &Path) -> Listing {
    let mut out = Listing::new();
    let mut inodes: BTreeMap<u64, Vec<String>> = BTreeMap::new();
    fn walk(root: &Path, rel: &str, out: &mut Listing, inodes: &mut BTreeMap<u64, Vec<String>>) {
        let path = if rel == "." {
            root.to_path_buf()
        } else {
            root.join(rel)
        };
        let md = fs::symlink_metadata(&path).unwrap();
        let ft = md.file_type();
        let mut xattrs = BTreeMap::new();
        if let Ok(names) = xattr::list(&path) {
            for n in names {
                if let Ok(Some(v)) = xattr::get(&path, &n) {
                    xattrs.insert(n.to_string_lossy().into_owned(), v);
                }
            }
        }
        let (kind, link, sha) = if ft.is_dir() {
            ("dir", String::new(), String::new())
        } else if ft.is_file() {
            if md.nlink() > 1 {
                inodes.entry(md.ino()).or_default().push(rel.to_string());
            }
            ("file", String::new(), file_sha256(&path))
        } else if ft.is_symlink() {
            (
                "symlink",
                String::from_utf8_lossy(fs::read_link(&path).unwrap().as_os_str().as_bytes())
                    .into_owned(),
                String::new(),
            )
        } else if ft.is_char_device() || ft.is_block_device() {
            let rdev = md.rdev();
            (
                if ft.is_char_device() { "char" } else { "block" },
                format!("{}:{}", libc::major(rdev), libc::minor(rdev)),
                String::new(),
            )
        } else if ft.is_fifo() {
            ("fifo", String::new(), String::new())
        } else {
            panic!("unexpected file type at {}", path.display());
        };
        out.insert(
            rel.to_string(),
            Item {
                kind: kind.into(),
                mode: md.mode() & 0o7777,
                uid: md.uid().into(),
                gid: md.gid().into(),
                size: if kind == "file" { md.len() } else { 0 },
                sha256: sha,
                link,
                xattrs,
                group: None,
                mtime: md.mtime(),
            },
        );
        if ft.is_dir() {
            let mut names: Vec<String> = fs::read_dir(&path)
                .unwrap()
                .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .collect();
            names.sort();
            for n in names {
                let child = if rel == "." { n } else { format!("{rel}/{n}") };
                walk(root, &child, out, inodes);
            }
        }
    }
    walk(root, ".", &mut out, &mut inodes);
    for members in inodes.values() {
        if members.len() > 1 {
            let min = members.iter().min().unwrap().clone();
            for m in members {
                out.get_mut(m).unwrap().group = Some(min.clone());
            }
        }
    }
    out
}

/// Listing without mtimes (for comparisons where times differ by design).
pub fn without_mtimes(l: &Listing) -> Listing {
    l.iter()
        .map(|(k, v)| {
            let mut v = v.clone();
            v.mtime = 0;
            (k.clone(), v)
        })
        .collect()
}

/// Asserts two listings are equal, reporting the differing paths.
pub fn assert_same(a: &Listing, b: &Listing, what: &str) {
    let mut diffs = Vec::new();
    for (k, v) in a {
        match b.get(k) {
            None => diffs.push(format!("only in the first: {k} {v:?}")),
            Some(w) if w != v => diffs.push(format!("{k}:\n    {v:?}\n != {w:?}")),
            _ => {}
        }
    }
    for (k, v) in b {
        if !a.contains_key(k) {
            diffs.push(format!("only in the second: {k} {v:?}"));
        }
    }
    assert!(
        diffs.is_empty(),
        "{what}: {} difference(s):\n{}",
        diffs.len(),
        diffs.join("\n")
    );
}

/// Decompresses a file with the crates (by magic bytes).
pub fn decompress_file(path: &Path) -> Vec<u8> {
    let data = fs::read(path).unwrap();
    decompress(&data)
}

pub fn decompress(data: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    match data {
        [0x1f, 0x8b, ..] => {
            flate2::read::MultiGzDecoder::new(data)
                .read_to_end(&mut out)
                .unwrap();
        }
        [0x28, 0xb5, 0x2f, 0xfd, ..] => {
            out = zstd::decode_all(data).unwrap();
        }
        [0xfd, b'7', b'z', b'X', b'Z', 0, ..] => {
            liblzma::read::XzDecoder::new_multi_decoder(data)
                .read_to_end(&mut out)
                .unwrap();
        }
        _ => out = data.to_vec(),
    }
    out
}

/// Extracts a tar with GNU tar as faithfully as it can (numeric owners,
/// permissions, every xattr).
pub fn gnu_extract(tarball: &Path, dest: &Path) {
    fs::create_dir_all(dest).unwrap();
    let out = Command::new("tar")
        .args(["--xattrs", "--xattrs-include=*", "--numeric-owner", "-xpf"])
        .arg(tarball)
        .arg("-C")
        .arg(dest)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "tar -x failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

pub fn tempdir() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("imgforge-rootfs-")
        .tempdir()
        .unwrap()
}

pub fn path_buf(p: &Path, s: &str) -> PathBuf {
    p.join(s)
}
