//! `oci:PATH[:TAG]`: an OCI image layout (as written by `skopeo copy ...
//! oci:DIR`, `umoci`, `buildah push ... oci:DIR`, `docker buildx --output
//! type=oci,tar=false`), applied natively: no container engine is needed.
//!
//! `index.json` leads to a manifest, chosen by TAG (the
//! `org.opencontainers.image.ref.name` annotation) and by architecture
//! through image indexes, nested ones included; the manifest's layers are
//! then applied in order by [`super::tree`]. Every blob read (indexes,
//! manifests, config, layers) is checked against its descriptor's size and
//! sha256, and each uncompressed layer against the config's `diff_ids`.
//!
//! The types here are a small, tolerant subset of the image spec (OCI and
//! Docker v2 media types alike) rather than the `oci-spec` crate, whose
//! strict parsing refuses some real-world Docker manifests and which would
//! bring a dozen dependencies for five structs.

use std::collections::HashMap;
use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};
use serde::Deserialize;
use sha2::{Digest, Sha256};
use tracing::info;

use super::tree::{LayerSpec, Opener};

/// Largest index, manifest or config blob read into memory.
const JSON_LIMIT: u64 = 16 << 20;
const REF_NAME: &str = "org.opencontainers.image.ref.name";

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct Descriptor {
    #[serde(default)]
    pub media_type: String,
    pub digest: String,
    pub size: u64,
    #[serde(default)]
    pub platform: Option<Platform>,
    #[serde(default)]
    pub annotations: HashMap<String, String>,
}

#[derive(Debug, Clone, Deserialize)]
pub(crate) struct Platform {
    #[serde(default)]
    pub architecture: String,
    #[serde(default)]
    pub os: String,
    #[serde(default)]
    pub variant: Option<String>,
}

impl Platform {
    fn describe(&self) -> String {
        let mut s = format!("{}/{}", self.os, self.architecture);
        if let Some(v) = &self.variant {
            s.push('/');
            s.push_str(v);
        }
        s
    }
}

/// An image index or a manifest: told apart by their fields, since the
/// `mediaType` field is optional.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct AnyManifest {
    #[serde(default)]
    manifests: Option<Vec<Descriptor>>,
    #[serde(default)]
    config: Option<Descriptor>,
    #[serde(default)]
    layers: Option<Vec<Descriptor>>,
}

/// The parts of an image configuration that matter here.
#[derive(Debug, Default, Deserialize)]
pub(crate) struct ImageConfig {
    #[serde(default)]
    pub architecture: Option<String>,
    #[serde(default)]
    pub os: Option<String>,
    #[serde(default)]
    pub variant: Option<String>,
    #[serde(default)]
    pub rootfs: Option<RootFs>,
}

#[derive(Debug, Default, Deserialize)]
pub(crate) struct RootFs {
    #[serde(default)]
    pub diff_ids: Vec<String>,
}

/// The canonical (OCI/Go) name of an architecture: x86_64 → amd64,
/// aarch64 → arm64, armhf → arm, i686 → 386.
pub fn normalise_arch(arch: &str) -> String {
    match arch.to_ascii_lowercase().as_str() {
        "x86_64" | "x86-64" | "amd64" => "amd64".into(),
        "aarch64" | "arm64" => "arm64".into(),
        "armhf" | "armv7" | "armv7l" | "arm" => "arm".into(),
        "i386" | "i686" | "386" => "386".into(),
        other => other.into(),
    }
}

/// The hex part of a `sha256:HEX` digest, checked.
pub(crate) fn sha256_hex(digest: &str) -> Result<&str> {
    let (alg, hex) = digest
        .split_once(':')
        .ok_or_else(|| anyhow!("'{digest}' is not a digest (ALGORITHM:HEX)"))?;
    if alg != "sha256" {
        bail!("the digest '{digest}' uses {alg}: only sha256 is supported");
    }
    if hex.len() != 64
        || !hex
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    {
        bail!("'{digest}' is not a valid sha256 digest");
    }
    Ok(hex)
}

fn short(digest: &str) -> &str {
    &digest[..digest.len().min(19)]
}

/// Checks a manifest's config against the wanted architecture.
pub(crate) fn check_config_arch(config: &ImageConfig, arch: &str, what: &str) -> Result<()> {
    if let Some(a) = &config.architecture {
        if !a.is_empty() && normalise_arch(a) != arch {
            bail!(
                "{what} is for {}/{a}, not {arch}: build for its architecture with --arch {a}",
                config.os.as_deref().unwrap_or("linux")
            );
        }
    }
    Ok(())
}

/// Checks a layer's media type.
pub(crate) fn check_layer_media_type(media_type: &str, what: &str) -> Result<()> {
    const OK: &[&str] = &[
        "",
        "application/vnd.oci.image.layer.v1.tar",
        "application/vnd.oci.image.layer.v1.tar+gzip",
        "application/vnd.oci.image.layer.v1.tar+zstd",
        "application/vnd.oci.image.layer.nondistributable.v1.tar",
        "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip",
        "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd",
        "application/vnd.docker.image.rootfs.diff.tar",
        "application/vnd.docker.image.rootfs.diff.tar.gzip",
        "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip",
    ];
    if !OK.contains(&media_type) {
        bail!("{what} has the media type '{media_type}', which is not a filesystem layer imgforge can apply");
    }
    Ok(())
}

struct Layout {
    root: PathBuf,
    /// For messages: `oci:PATH`.
    name: String,
}

enum Loaded {
    Index(Vec<Descriptor>),
    Manifest(Box<Manifest>),
}

#[derive(Debug)]
struct Manifest {
    config: Descriptor,
    layers: Vec<Descriptor>,
}

impl Layout {
    fn blob_path(&self, digest: &str) -> Result<PathBuf> {
        Ok(self.root.join("blobs/sha256").join(sha256_hex(digest)?))
    }

    /// A small blob, checked against its descriptor.
    fn read_blob(&self, d: &Descriptor, what: &str) -> Result<Vec<u8>> {
        let path = self
            .blob_path(&d.digest)
            .with_context(|| format!("{}: {what}", self.name))?;
        if d.size > JSON_LIMIT {
            bail!(
                "{}: {what} {} is too large ({} bytes)",
                self.name,
                d.digest,
                d.size
            );
        }
        let mut data = Vec::new();
        File::open(&path)
            .with_context(|| {
                format!(
                    "{}: {what} {} is missing from the layout ({})",
                    self.name,
                    d.digest,
                    path.display()
                )
            })?
            .take(JSON_LIMIT + 1)
            .read_to_end(&mut data)
            .with_context(|| format!("{}: cannot read {what} {}", self.name, d.digest))?;
        if data.len() as u64 != d.size {
            bail!(
                "{}: size mismatch: {what} {} has {} bytes but its descriptor says {}",
                self.name,
                d.digest,
                data.len(),
                d.size
            );
        }
        let got = hex::encode(Sha256::digest(&data));
        if got != sha256_hex(&d.digest)? {
            bail!(
                "{}: digest mismatch: {what} blob's sha256 is {got} but its descriptor says {}",
                self.name,
                d.digest
            );
        }
        Ok(data)
    }

    fn load(&self, d: &Descriptor) -> Result<Loaded> {
        let data = self.read_blob(d, "manifest")?;
        let m: AnyManifest = serde_json::from_slice(&data)
            .with_context(|| format!("{}: manifest {} is not valid JSON", self.name, d.digest))?;
        match m {
            AnyManifest {
                manifests: Some(list),
                ..
            } => Ok(Loaded::Index(list)),
            AnyManifest {
                config: Some(config),
                layers: Some(layers),
                ..
            } => Ok(Loaded::Manifest(Box::new(Manifest { config, layers }))),
            _ => bail!(
                "{}: {} ({}) is neither an image index nor an image manifest",
                self.name,
                d.digest,
                d.media_type
            ),
        }
    }

    fn config(&self, m: &Manifest) -> Result<ImageConfig> {
        let data = self.read_blob(&m.config, "config")?;
        serde_json::from_slice(&data).with_context(|| {
            format!(
                "{}: config {} is not valid JSON",
                self.name, m.config.digest
            )
        })
    }

    /// The manifest for `arch` among `descs`, through nested indexes.
    fn select(
        &self,
        descs: &[Descriptor],
        arch: &str,
        depth: usize,
        seen: &mut Vec<String>,
    ) -> Result<Option<(Descriptor, Manifest, ImageConfig)>> {
        if depth > 8 {
            bail!("{}: image indexes nest too deeply", self.name);
        }
        let matches = |p: &Platform| {
            normalise_arch(&p.architecture) == arch && (p.os.is_empty() || p.os == "linux")
        };
        for d in descs {
            let Some(p) = &d.platform else { continue };
            if !matches(p) {
                seen.push(p.describe());
                continue;
            }
            match self.load(d)? {
                Loaded::Index(list) => {
                    if let Some(found) = self.select(&list, arch, depth + 1, seen)? {
                        return Ok(Some(found));
                    }
                }
                Loaded::Manifest(m) => {
                    let config = self.config(&m)?;
                    return Ok(Some((d.clone(), *m, config)));
                }
            }
        }
        for d in descs.iter().filter(|d| d.platform.is_none()) {
            match self.load(d)? {
                Loaded::Index(list) => {
                    if let Some(found) = self.select(&list, arch, depth + 1, seen)? {
                        return Ok(Some(found));
                    }
                }
                Loaded::Manifest(m) => {
                    let config = self.config(&m)?;
                    match &config.architecture {
                        Some(a) if !a.is_empty() && normalise_arch(a) != arch => {
                            let mut p = format!("{}/{a}", config.os.as_deref().unwrap_or("linux"));
                            if let Some(v) = &config.variant {
                                p = format!("{p}/{v}");
                            }
                            seen.push(p);
                        }
                        _ => return Ok(Some((d.clone(), *m, config))),
                    }
                }
            }
        }
        Ok(None)
    }
}

/// Splits `PATH[:TAG]`: the whole string if it exists, else at the last
/// colon whose left part exists.
pub(crate) fn split_path_tag(spec: &str) -> (PathBuf, Option<String>) {
    if Path::new(spec).exists() {
        return (PathBuf::from(spec), None);
    }
    // Tags may hold colons themselves (docker-archive's `name:tag`).
    for (i, _) in spec
        .match_indices(':')
        .collect::<Vec<_>>()
        .into_iter()
        .rev()
    {
        let (p, tag) = (&spec[..i], &spec[i + 1..]);
        if !p.is_empty() && !tag.is_empty() && Path::new(p).exists() {
            return (PathBuf::from(p), Some(tag.to_string()));
        }
    }
    (PathBuf::from(spec), None)
}

/// The layers of the image at `root` (tagged `tag`) for `arch`.
pub(crate) fn layers(
    root: &Path,
    tag: Option<&str>,
    arch: &str,
) -> Result<Vec<(LayerSpec, Opener)>> {
    let root = root.to_path_buf();
    let name = format!("oci:{}", root.display());
    if !root.exists() {
        bail!("{name}: '{}' does not exist", root.display());
    }
    if !root.is_dir() {
        bail!(
            "{name}: not an OCI image layout: it is not a directory (for a `docker save` or `podman save` tarball use docker-archive:{})",
            root.display()
        );
    }
    for required in ["oci-layout", "index.json"] {
        if !root.join(required).is_file() {
            bail!("{name}: not an OCI image layout: it has no {required} file");
        }
    }
    let layout_file = std::fs::read(root.join("oci-layout"))
        .with_context(|| format!("{name}: cannot read oci-layout"))?;
    let version: serde_json::Value = serde_json::from_slice(&layout_file)
        .with_context(|| format!("{name}: not an OCI image layout: oci-layout is not JSON"))?;
    if version
        .get("imageLayoutVersion")
        .and_then(|v| v.as_str())
        .is_none()
    {
        bail!("{name}: not an OCI image layout: oci-layout has no imageLayoutVersion");
    }
    let index_data = std::fs::read(root.join("index.json"))
        .with_context(|| format!("{name}: cannot read index.json"))?;
    let index: AnyManifest = serde_json::from_slice(&index_data)
        .with_context(|| format!("{name}: index.json is not a valid image index"))?;
    let all = index
        .manifests
        .ok_or_else(|| anyhow!("{name}: index.json has no manifests"))?;

    let names: Vec<&str> = {
        let mut n: Vec<&str> = all
            .iter()
            .filter_map(|d| d.annotations.get(REF_NAME).map(String::as_str))
            .collect();
        n.sort();
        n.dedup();
        n
    };
    let candidates: Vec<Descriptor> = match tag {
        Some(t) => {
            let c: Vec<Descriptor> = all
                .iter()
                .filter(|d| d.annotations.get(REF_NAME).is_some_and(|n| n == t))
                .cloned()
                .collect();
            if c.is_empty() {
                bail!(
                    "{name}: no image tagged '{t}' (tags: {})",
                    if names.is_empty() {
                        "none".to_string()
                    } else {
                        names.join(", ")
                    }
                );
            }
            c
        }
        None => {
            if names.len() > 1 {
                bail!(
                    "{name} holds several images ({}): choose one with oci:{}:TAG",
                    names.join(", "),
                    root.display()
                );
            }
            all
        }
    };
    if candidates.is_empty() {
        bail!("{name}: index.json lists no image");
    }
    let mut seen = Vec::new();
    let layout = Layout {
        root: root.clone(),
        name: name.clone(),
    };
    let (desc, manifest, config) =
        layout
            .select(&candidates, arch, 0, &mut seen)?
            .ok_or_else(|| {
                seen.sort();
                seen.dedup();
                anyhow!(
                    "{name}: no image for linux/{arch} (it has {}): choose another with --arch",
                    if seen.is_empty() {
                        "none".to_string()
                    } else {
                        seen.join(", ")
                    }
                )
            })?;
    check_config_arch(&config, arch, &format!("{name}: image {}", desc.digest))?;
    let diff_ids = config.rootfs.map(|r| r.diff_ids).unwrap_or_default();
    if !diff_ids.is_empty() && diff_ids.len() != manifest.layers.len() {
        bail!(
            "{name}: the manifest lists {} layers but its config lists {} diff_ids",
            manifest.layers.len(),
            diff_ids.len()
        );
    }
    let total: u64 = manifest.layers.iter().map(|l| l.size).sum();
    info!(
        "{name}: image {} for linux/{arch}: {} layer(s), {total} bytes",
        short(&desc.digest),
        manifest.layers.len()
    );
    let n = manifest.layers.len();
    let mut out = Vec::with_capacity(n);
    for (i, l) in manifest.layers.iter().enumerate() {
        let what = format!("{name}: layer {}/{n} ({})", i + 1, short(&l.digest));
        check_layer_media_type(&l.media_type, &what)?;
        let hex = sha256_hex(&l.digest)
            .with_context(|| what.clone())?
            .to_string();
        let diff_id = match diff_ids.get(i) {
            Some(d) => Some(
                sha256_hex(d)
                    .with_context(|| format!("{what}: its diff_id"))?
                    .to_string(),
            ),
            None => None,
        };
        let path = layout.blob_path(&l.digest)?;
        let missing = format!(
            "{what}: blob {} is missing from the layout ({})",
            l.digest,
            path.display()
        );
        let spec = LayerSpec {
            name: what,
            sha256: Some(hex),
            size: Some(l.size),
            diff_id,
            whiteouts: true,
            skip: None,
        };
        let open: Opener = Box::new(move || {
            let f = File::open(&path).context(missing)?;
            Ok(Box::new(f) as Box<dyn Read + Send>)
        });
        out.push((spec, open));
    }
    Ok(out)
}
