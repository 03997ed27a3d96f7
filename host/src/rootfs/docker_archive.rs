//! `docker-archive:PATH[:TAG]`: the output of `docker save` / `podman save`
//! (a tar, possibly compressed, or its extracted directory), applied like an
//! OCI image.
//!
//! `manifest.json` names the config and the layer tars, either the legacy
//! `<id>/layer.tar` or, since Docker 25, OCI-style `blobs/sha256/<hex>`.
//! Checked: each layer's uncompressed sha256 against the config's
//! `diff_ids`, each `blobs/sha256/<hex>` (and legacy `<hex>.json` config)
//! against its name.
//!
//! An uncompressed archive is read in place: its members are indexed by
//! seeking over their contents, then each layer is read from its offset
//! (positional reads, so layers are read in parallel from one file). A
//! compressed archive is first decompressed into an unnamed temporary file
//! next to the output.

use std::collections::HashMap;
use std::fs::File;
use std::io::{self, BufReader, Read, Seek, SeekFrom};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{anyhow, bail, Context, Result};
use serde::Deserialize;
use sha2::{Digest, Sha256};
use tracing::info;

use super::oci::{check_config_arch, sha256_hex, ImageConfig};
use super::tarstream::{sniff_compression, Decoder, EntryKind, TarReader};
use super::tree::{LayerSpec, Opener};
use formats::Compression;

const JSON_LIMIT: u64 = 16 << 20;

#[derive(Debug, Deserialize)]
#[serde(rename_all = "PascalCase")]
struct ManifestEntry {
    config: String,
    #[serde(default)]
    repo_tags: Option<Vec<String>>,
    layers: Vec<String>,
}

enum Member {
    File { offset: u64, size: u64 },
    Link(String),
}

enum Archive {
    Dir(PathBuf),
    Tar {
        file: Arc<File>,
        members: HashMap<String, Member>,
    },
}

/// Member names as keys: no leading `./` or `/`.
fn clean(name: &str) -> Result<String> {
    let mut parts: Vec<&str> = Vec::new();
    for p in name.split('/') {
        match p {
            "" | "." => {}
            ".." => {
                if parts.pop().is_none() {
                    bail!("the archive path '{name}' leads outside the archive");
                }
            }
            p => parts.push(p),
        }
    }
    Ok(parts.join("/"))
}

impl Archive {
    fn open(path: &Path, temp_dir: &Path) -> Result<Archive> {
        if path.is_dir() {
            return Ok(Archive::Dir(path.to_path_buf()));
        }
        let mut file =
            File::open(path).with_context(|| format!("cannot open '{}'", path.display()))?;
        let mut magic = [0u8; formats::SNIFF_LEN];
        let n = file.read(&mut magic)?;
        file.seek(SeekFrom::Start(0))?;
        let file = match sniff_compression(&magic[..n])? {
            Compression::None => file,
            c => {
                info!("decompressing the {c} archive into a temporary file");
                let mut temp = tempfile::tempfile_in(temp_dir).with_context(|| {
                    format!("cannot create a temporary file in '{}'", temp_dir.display())
                })?;
                let mut dec = Decoder::sniff(BufReader::new(file))?;
                io::copy(&mut dec, &mut temp).context("cannot decompress the archive")?;
                temp.seek(SeekFrom::Start(0))?;
                temp
            }
        };
        let mut members = HashMap::new();
        let mut tar = TarReader::new(BufReader::with_capacity(64 << 10, &file));
        while let Some(e) = tar
            .next_entry_seeking()
            .context("it is not a readable tar archive")?
        {
            let name = clean(&String::from_utf8_lossy(&e.path))?;
            let member = match e.kind {
                EntryKind::File => Member::File {
                    offset: e.data_offset,
                    size: e.size,
                },
                EntryKind::Symlink | EntryKind::HardLink => {
                    let target = String::from_utf8_lossy(&e.link).into_owned();
                    let target = if e.kind == EntryKind::Symlink {
                        let dir = Path::new(&name)
                            .parent()
                            .map(|p| p.to_string_lossy().into_owned())
                            .unwrap_or_default();
                        clean(&format!("{dir}/{target}"))?
                    } else {
                        clean(&target)?
                    };
                    Member::Link(target)
                }
                _ => continue,
            };
            members.insert(name, member);
        }
        Ok(Archive::Tar {
            file: Arc::new(file),
            members,
        })
    }

    fn has(&self, name: &str) -> bool {
        match self {
            Archive::Dir(d) => d.join(name).is_file(),
            Archive::Tar { members, .. } => members.contains_key(name),
        }
    }

    /// Opens a member (links followed).
    fn open_member(&self, name: &str) -> Result<Box<dyn Read + Send>> {
        let name = clean(name)?;
        match self {
            Archive::Dir(d) => {
                let p = d.join(&name);
                let f = File::open(&p)
                    .with_context(|| format!("'{name}' is missing from the archive"))?;
                Ok(Box::new(f))
            }
            Archive::Tar { file, members } => {
                let mut current = name.clone();
                for _ in 0..16 {
                    match members.get(&current) {
                        Some(Member::File { offset, size }) => {
                            return Ok(Box::new(RangeReader {
                                file: Arc::clone(file),
                                offset: *offset,
                                left: *size,
                            }))
                        }
                        Some(Member::Link(t)) => current = t.clone(),
                        None => bail!("'{name}' is missing from the archive"),
                    }
                }
                bail!("'{name}': too many levels of links in the archive")
            }
        }
    }

    fn read_small(&self, name: &str) -> Result<Vec<u8>> {
        let mut data = Vec::new();
        self.open_member(name)?
            .take(JSON_LIMIT + 1)
            .read_to_end(&mut data)
            .with_context(|| format!("cannot read '{name}'"))?;
        if data.len() as u64 > JSON_LIMIT {
            bail!("'{name}' is too large");
        }
        Ok(data)
    }
}

/// Reads a range of a file with positional reads (shared between threads).
struct RangeReader {
    file: Arc<File>,
    offset: u64,
    left: u64,
}

impl Read for RangeReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let want = buf.len().min(self.left.min(usize::MAX as u64) as usize);
        if want == 0 {
            return Ok(0);
        }
        let n = self.file.read_at(&mut buf[..want], self.offset)?;
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the archive is truncated",
            ));
        }
        self.offset += n as u64;
        self.left -= n as u64;
        Ok(n)
    }
}

/// The hex digest a member's name carries: `blobs/sha256/<hex>` or a legacy
/// `<hex>.json` config.
fn digest_in_name(name: &str) -> Option<String> {
    let base = name.rsplit('/').next()?;
    let hex = base.strip_suffix(".json").unwrap_or(base);
    let by_name = name.starts_with("blobs/sha256/") || base.ends_with(".json");
    (by_name && hex.len() == 64 && hex.bytes().all(|b| b.is_ascii_hexdigit()))
        .then(|| hex.to_ascii_lowercase())
}

fn tag_matches(wanted: &str, tag: &str) -> bool {
    let strip = |t: &str| {
        let t = t
            .strip_prefix("docker.io/library/")
            .or_else(|| t.strip_prefix("docker.io/"))
            .or_else(|| t.strip_prefix("localhost/"))
            .unwrap_or(t)
            .to_string();
        if t.rsplit('/').next().is_some_and(|last| last.contains(':')) {
            t
        } else {
            format!("{t}:latest")
        }
    };
    wanted == tag || strip(wanted) == strip(tag)
}

/// The layers of the image (tagged `tag`) in the archive at `path`.
pub(crate) fn layers(
    path: &Path,
    tag: Option<&str>,
    arch: &str,
    temp_dir: &Path,
) -> Result<Vec<(LayerSpec, Opener)>> {
    let name = format!("docker-archive:{}", path.display());
    if !path.exists() {
        bail!("{name}: '{}' does not exist", path.display());
    }
    let archive =
        Archive::open(path, temp_dir).with_context(|| format!("{name}: cannot read it"))?;
    if !archive.has("manifest.json") {
        bail!(
            "{name}: not a docker archive (`docker save` output): it has no manifest.json{}",
            if archive.has("index.json") || path.join("index.json").is_file() {
                " (it looks like an OCI image layout: use oci:PATH)"
            } else {
                ""
            }
        );
    }
    let manifest: Vec<ManifestEntry> =
        serde_json::from_slice(&archive.read_small("manifest.json")?)
            .with_context(|| format!("{name}: manifest.json is not a docker archive manifest"))?;
    let describe = |e: &ManifestEntry| {
        e.repo_tags
            .as_ref()
            .map(|t| t.join(" "))
            .unwrap_or_else(|| e.config.clone())
    };
    let entry = match (tag, manifest.len()) {
        (_, 0) => bail!("{name}: manifest.json lists no image"),
        (None, 1) => &manifest[0],
        (None, _) => bail!(
            "{name} holds several images ({}): choose one with docker-archive:{}:TAG",
            manifest.iter().map(describe).collect::<Vec<_>>().join(", "),
            path.display()
        ),
        (Some(t), _) => manifest
            .iter()
            .find(|e| e.repo_tags.iter().flatten().any(|rt| tag_matches(t, rt)))
            .ok_or_else(|| {
                anyhow!(
                    "{name}: no image tagged '{t}' (it has: {})",
                    manifest.iter().map(describe).collect::<Vec<_>>().join(", ")
                )
            })?,
    };

    let config_data = archive
        .read_small(&entry.config)
        .with_context(|| format!("{name}: cannot read the image config"))?;
    if let Some(hex) = digest_in_name(&clean(&entry.config)?) {
        let got = hex::encode(Sha256::digest(&config_data));
        if got != hex {
            bail!(
                "{name}: digest mismatch: the config '{}' has the sha256 {got}",
                entry.config
            );
        }
    }
    let config: ImageConfig = serde_json::from_slice(&config_data).with_context(|| {
        format!(
            "{name}: the image config '{}' is not valid JSON",
            entry.config
        )
    })?;
    check_config_arch(&config, arch, &format!("{name}: the image"))?;
    let diff_ids = config.rootfs.map(|r| r.diff_ids).unwrap_or_default();
    if diff_ids.len() != entry.layers.len() {
        bail!(
            "{name}: manifest.json lists {} layers but the config lists {} diff_ids",
            entry.layers.len(),
            diff_ids.len()
        );
    }
    info!(
        "{name}: image {}: {} layer(s)",
        describe(entry),
        entry.layers.len()
    );
    let archive = Arc::new(archive);
    let n = entry.layers.len();
    let mut out = Vec::with_capacity(n);
    for (i, layer) in entry.layers.iter().enumerate() {
        let what = format!("{name}: layer {}/{n} ({layer})", i + 1);
        let member = clean(layer)?;
        let spec = LayerSpec {
            name: what.clone(),
            sha256: digest_in_name(&member),
            size: None,
            diff_id: Some(
                sha256_hex(&diff_ids[i])
                    .with_context(|| format!("{what}: its diff_id"))?
                    .to_string(),
            ),
            whiteouts: true,
            skip: None,
        };
        if !archive.has(&member) {
            bail!("{what}: it is missing from the archive");
        }
        let archive = Arc::clone(&archive);
        let open: Opener = Box::new(move || archive.open_member(&member));
        out.push((spec, open));
    }
    Ok(out)
}
