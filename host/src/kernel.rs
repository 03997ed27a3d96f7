//! Where the build server's kernel comes from: Debian's kernel package
//! (downloaded with `apt-get download` and unpacked once into a cache), or
//! files the user points at.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};
use tracing::info;

use crate::tools::RunTool;

/// A kernel image and its module tree.
#[derive(Clone, Debug)]
pub struct Kernel {
    pub vmlinuz: PathBuf,
    /// `lib/modules/<version>` (the tree `modules.dep` would live in).
    pub modules_dir: PathBuf,
    /// What the kernel is, for the bootscript metadata (package and version).
    pub description: String,
}

impl Kernel {
    /// A kernel given as files (`--kernel FILE --modules DIR`).
    pub fn from_files(vmlinuz: &Path, modules_dir: &Path) -> Result<Kernel> {
        if !vmlinuz.is_file() {
            bail!("kernel {} is not a file", vmlinuz.display());
        }
        if !modules_dir.is_dir() {
            bail!(
                "module directory {} is not a directory",
                modules_dir.display()
            );
        }
        Ok(Kernel {
            vmlinuz: vmlinuz.to_path_buf(),
            modules_dir: modules_dir.to_path_buf(),
            description: vmlinuz.display().to_string(),
        })
    }

    /// The kernel of Debian package `package` (a metapackage such as
    /// `linux-image-cloud-amd64` is followed to the versioned package it
    /// depends on). Unpacked under `cache`; a second call with the same
    /// package version does not touch the network.
    pub fn from_debian_package(package: &str, cache: &Path) -> Result<Kernel> {
        let (name, version) = resolve_package(package)?;
        let dir = cache.join(format!("{name}_{}", version.replace([':', '/'], "_")));
        if !dir.join(".complete").exists() {
            download_and_unpack(&name, &version, &dir)?;
        }
        locate_in_tree(&dir, &format!("{name} {version}"))
    }
}

/// Follows a metapackage to the package that holds the kernel. Reads apt's
/// local package lists (`apt-cache`), so `apt-get update` must have run.
fn resolve_package(package: &str) -> Result<(String, String)> {
    let mut name = package.to_string();
    for _ in 0..3 {
        let fields = apt_show(&name)?;
        let version = field(&fields, "Version")
            .with_context(|| format!("apt-cache show {name}: no Version"))?;
        let depends = field(&fields, "Depends").unwrap_or_default();
        // A metapackage holds no files; it depends on the versioned image.
        let next = depends
            .split(',')
            .map(|d| d.trim().split([' ', '|']).next().unwrap_or(""))
            .find(|d| d.starts_with("linux-image-") && *d != name);
        match next {
            Some(n) => name = n.to_string(),
            _ => return Ok((name, version)),
        }
    }
    bail!("{package} does not lead to a kernel package")
}

fn apt_show(package: &str) -> Result<String> {
    let out = Command::new("apt-cache")
        .args(["show", "--no-all-versions", package])
        .output()
        .running("apt-cache")
        .context("imgforge takes the kernel from Debian's packages (on other systems pass --kernel and --modules)")?;
    if !out.status.success() || out.stdout.is_empty() {
        bail!(
            "apt-cache knows no package {package}: run `apt-get update`, or pass --kernel FILE --modules DIR ({})",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn field(control: &str, name: &str) -> Option<String> {
    control.lines().find_map(|l| {
        l.strip_prefix(name)?
            .strip_prefix(':')
            .map(|v| v.trim().to_string())
    })
}

fn download_and_unpack(name: &str, version: &str, dest: &Path) -> Result<()> {
    let parent = dest.parent().context("cache path has no parent")?;
    std::fs::create_dir_all(parent).with_context(|| format!("create {}", parent.display()))?;
    let work = tempfile::tempdir_in(parent).context("create a temporary directory in the cache")?;
    info!("downloading {name} {version} with apt-get");
    let status = Command::new("apt-get")
        .args(["download", "-q", &format!("{name}={version}")])
        .current_dir(work.path())
        .status()
        .running("apt-get")?;
    if !status.success() {
        bail!(
            "apt-get download {name}={version} failed ({status}); is Debian's archive reachable?"
        );
    }
    let deb = std::fs::read_dir(work.path())?
        .flatten()
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|e| e == "deb"))
        .context("apt-get download left no .deb")?;
    let tree = work.path().join("tree");
    let status = Command::new("dpkg-deb")
        .arg("-x")
        .arg(&deb)
        .arg(&tree)
        .status()
        .running("dpkg-deb")?;
    if !status.success() {
        bail!("dpkg-deb -x {} failed ({status})", deb.display());
    }
    std::fs::write(tree.join(".complete"), format!("{name} {version}\n"))?;
    if dest.exists() {
        std::fs::remove_dir_all(dest).ok();
    }
    std::fs::rename(&tree, dest)
        .with_context(|| format!("move the unpacked kernel to {}", dest.display()))?;
    Ok(())
}

/// Finds `boot/vmlinuz-*` and the matching `lib/modules/*` in an unpacked
/// package.
fn locate_in_tree(tree: &Path, what: &str) -> Result<Kernel> {
    let vmlinuz = std::fs::read_dir(tree.join("boot"))
        .with_context(|| format!("{what}: no boot/ directory"))?
        .flatten()
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("vmlinuz-"))
        })
        .with_context(|| format!("{what}: no boot/vmlinuz-*"))?;
    let version = vmlinuz.file_name().unwrap().to_string_lossy()["vmlinuz-".len()..].to_string();
    let modules_dir = ["lib/modules", "usr/lib/modules"]
        .iter()
        .map(|d| tree.join(d).join(&version))
        .find(|p| p.is_dir())
        .with_context(|| format!("{what}: no lib/modules/{version}"))?;
    Ok(Kernel {
        vmlinuz,
        modules_dir,
        description: format!("{what} ({version})"),
    })
}

/// `$XDG_CACHE_HOME/imgforge` or `~/.cache/imgforge`.
pub fn cache_dir() -> PathBuf {
    std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .unwrap_or_else(|| PathBuf::from("/var/cache"))
        .join("imgforge")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_fields() {
        let c = "Package: linux-image-cloud-amd64\nVersion: 6.1.158-1\nDepends: linux-image-6.1.0-41-cloud-amd64 (= 6.1.158-1)\n";
        assert_eq!(field(c, "Version").as_deref(), Some("6.1.158-1"));
        assert!(field(c, "Depends")
            .unwrap()
            .starts_with("linux-image-6.1.0-41"));
        assert_eq!(field(c, "Pre-Depends"), None);
    }

    #[test]
    fn a_tree_without_modules_is_refused() {
        let t = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(t.path().join("boot")).unwrap();
        std::fs::write(t.path().join("boot/vmlinuz-6.1.0-1-test"), b"k").unwrap();
        let err = locate_in_tree(t.path(), "test").unwrap_err().to_string();
        assert!(err.contains("lib/modules/6.1.0-1-test"), "{err}");
        std::fs::create_dir_all(t.path().join("lib/modules/6.1.0-1-test")).unwrap();
        let k = locate_in_tree(t.path(), "test").unwrap();
        assert!(k.vmlinuz.ends_with("vmlinuz-6.1.0-1-test"));
    }
}
