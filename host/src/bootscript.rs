//! A bootscript's artifacts: the kernel, the initrd with the agent, and
//! `bootscript.json` describing them (the fields of Scaleway's historical
//! bootscript object plus checksums). `imgforge initrd` writes them; the
//! local provider boots them.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use initrd::bootscript::Bootscript;
use serde::{Deserialize, Serialize};
use tracing::info;

use crate::kernel::{self, Kernel};
use crate::tools::RunTool;

/// The bootscripts that ship with imgforge, by name.
const BUILTIN: &[(&str, &str)] = &[(
    "image-creation-x86_64",
    include_str!("../../bootscripts/image-creation-x86_64.toml"),
)];

/// `bootscript.json`.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct BootscriptInfo {
    pub title: String,
    pub arch: String,
    /// File names relative to the directory holding this file.
    pub kernel: String,
    pub initrd: String,
    pub bootcmdargs: String,
    pub kernel_sha256: String,
    pub initrd_sha256: String,
    pub kernel_source: String,
    pub modules: Vec<String>,
}

/// Loads a built-in bootscript by name, or a `.toml` file by path.
pub fn load(name_or_path: &str) -> Result<Bootscript> {
    if let Some((_, text)) = BUILTIN.iter().find(|(n, _)| *n == name_or_path) {
        return Bootscript::from_str(text)
            .with_context(|| format!("built-in bootscript {name_or_path}"));
    }
    let path = Path::new(name_or_path);
    if path.extension().is_some_and(|e| e == "toml") || path.exists() {
        return Bootscript::load(path).with_context(|| format!("bootscript {}", path.display()));
    }
    let names: Vec<&str> = BUILTIN.iter().map(|(n, _)| *n).collect();
    bail!(
        "no bootscript named '{name_or_path}'; built in: {}; or give a path to a .toml file",
        names.join(", ")
    )
}

/// Where the kernel comes from.
pub enum KernelChoice {
    /// What the bootscript says (a Debian package).
    FromBootscript,
    Files {
        vmlinuz: PathBuf,
        modules: PathBuf,
    },
}

/// Finds the static agent: `IMGFORGE_AGENT`, else in the cargo target
/// directory this executable was built in, else next to this executable
/// (installed side by side). A dynamically linked candidate (the host build
/// in the same cargo target directory) is passed over.
pub fn find_agent() -> Result<PathBuf> {
    if let Some(p) = std::env::var_os("IMGFORGE_AGENT") {
        return Ok(PathBuf::from(p));
    }
    let exe = std::env::current_exe().context("locate the imgforge executable")?;
    let dir = exe.parent().context("imgforge has no parent directory")?;
    let candidates = [
        dir.join("../x86_64-unknown-linux-musl/agent/initrd-agent"),
        dir.join("../../x86_64-unknown-linux-musl/agent/initrd-agent"),
        dir.join("initrd-agent"),
    ];
    candidates
        .into_iter()
        .find(|p| p.is_file() && is_static(p))
        .context(
            "initrd-agent not found: build it with `cargo build --profile agent --target \
         x86_64-unknown-linux-musl -p initrd-agent`, or pass --agent / set IMGFORGE_AGENT",
        )
}

fn is_static(path: &Path) -> bool {
    initrd::elf::library_closure(&[path.to_path_buf()]).is_ok_and(|libs| libs.is_empty())
}

/// Builds the artifacts of `bootscript` into `out_dir`. Byte-identical
/// output for identical inputs.
pub fn build(
    bootscript: &Bootscript,
    kernel: KernelChoice,
    agent: &Path,
    out_dir: &Path,
) -> Result<BootscriptInfo> {
    if !is_static(agent) {
        bail!(
            "{} is not a statically linked executable; the initrd needs the static musl build \
             (cargo build --profile agent --target x86_64-unknown-linux-musl -p initrd-agent)",
            agent.display()
        );
    }
    let kernel = match kernel {
        KernelChoice::Files { vmlinuz, modules } => Kernel::from_files(&vmlinuz, &modules)?,
        KernelChoice::FromBootscript => {
            let package = bootscript.kernel.debian_package.as_deref().context(
                "the bootscript names no kernel package; pass --kernel FILE --modules DIR",
            )?;
            Kernel::from_debian_package(package, &kernel::cache_dir().join("kernels"))?
        }
    };
    info!("kernel: {}", kernel.description);

    let tools = bootscript
        .initrd
        .tools
        .iter()
        .map(|t| initrd::builder::find_tool(t))
        .collect::<Result<Vec<_>, _>>()?;
    let spec = initrd::builder::InitrdSpec {
        agent: agent.to_path_buf(),
        modules_dir: kernel.modules_dir.clone(),
        modules: bootscript.initrd.modules.clone(),
        tools,
        files: bootscript.initrd.files.clone(),
        generated: grub_efi_image(&bootscript.initrd.grub_efi_modules)?
            .into_iter()
            .collect(),
        compression: bootscript.initrd.compression,
        mtime: source_date_epoch(),
    };
    let image = initrd::builder::build(&spec).context("build the initrd")?;
    info!(
        "initrd: {} entries, {} bytes, modules {}",
        image.entries,
        image.bytes.len(),
        image.module_load_order.join(",")
    );

    std::fs::create_dir_all(out_dir).with_context(|| format!("create {}", out_dir.display()))?;
    let vmlinuz = std::fs::read(&kernel.vmlinuz)
        .with_context(|| format!("read {}", kernel.vmlinuz.display()))?;
    write_atomic(&out_dir.join("vmlinuz"), &vmlinuz)?;
    write_atomic(&out_dir.join("initrd.img"), &image.bytes)?;
    let info = BootscriptInfo {
        title: bootscript.title.clone(),
        arch: bootscript.arch.clone(),
        kernel: "vmlinuz".into(),
        initrd: "initrd.img".into(),
        bootcmdargs: bootscript.bootcmdargs.clone(),
        kernel_sha256: initrd::builder::sha256_hex(&vmlinuz),
        initrd_sha256: image.sha256_hex(),
        kernel_source: kernel.description,
        modules: image.module_load_order,
    };
    let mut json = serde_json::to_vec_pretty(&info)?;
    json.push(b'\n');
    write_atomic(&out_dir.join("bootscript.json"), &json)?;
    Ok(info)
}

/// GRUB's modules for x86_64 EFI (Debian's grub-efi-amd64-bin).
pub const GRUB_X86_64_EFI_DIR: &str = "/usr/lib/grub/x86_64-efi";

/// Builds the GRUB EFI image the agent installs on root filesystems that
/// have no GRUB of their own. Its prefix is `/EFI/BOOT`, where the agent
/// writes grub.cfg next to it on the ESP.
fn grub_efi_image(modules: &[String]) -> Result<Option<initrd::GeneratedFile>> {
    if modules.is_empty() {
        return Ok(None);
    }
    let dir = crate::tools::require_path(GRUB_X86_64_EFI_DIR)
        .context("the bootscript asks for a GRUB EFI image")?;
    let out = tempfile::NamedTempFile::new().context("create a temporary file")?;
    let status = std::process::Command::new("grub-mkimage")
        .args(["-O", "x86_64-efi", "-p", "/EFI/BOOT", "-d"])
        .arg(dir)
        .arg("-o")
        .arg(out.path())
        .args(modules)
        .status()
        .running("grub-mkimage")?;
    if !status.success() {
        bail!(
            "grub-mkimage failed ({status}) for modules {}",
            modules.join(" ")
        );
    }
    Ok(Some(initrd::GeneratedFile {
        path: "usr/lib/imgforge/grub/BOOTX64.EFI".into(),
        contents: std::fs::read(out.path())?,
        mode: 0o644,
    }))
}

/// Reads `bootscript.json` from an artifact directory.
pub fn read_info(dir: &Path) -> Result<BootscriptInfo> {
    let path = dir.join("bootscript.json");
    let text = std::fs::read(&path).with_context(|| {
        format!(
            "read {} (run `imgforge initrd -o {}`)",
            path.display(),
            dir.display()
        )
    })?;
    serde_json::from_slice(&text).with_context(|| format!("parse {}", path.display()))
}

/// Honours SOURCE_DATE_EPOCH for the archive's timestamps (0 otherwise).
fn source_date_epoch() -> u64 {
    std::env::var("SOURCE_DATE_EPOCH")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0)
}

/// Writes through a temporary file and a rename, so a reader never sees a
/// half-written artifact and an interrupted run leaves the old one intact.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = path.parent().context("path has no parent")?;
    let mut tmp = tempfile::NamedTempFile::new_in(dir)
        .with_context(|| format!("create a file in {}", dir.display()))?;
    std::io::Write::write_all(&mut tmp, bytes)?;
    // Temporary files are created 0600; artifacts are for everyone to read.
    tmp.as_file()
        .set_permissions(std::os::unix::fs::PermissionsExt::from_mode(0o644))?;
    tmp.persist(path)
        .with_context(|| format!("write {}", path.display()))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builtin_bootscript_parses_and_unknown_names_are_listed() {
        let b = load("image-creation-x86_64").unwrap();
        assert_eq!(b.arch, "x86_64");
        assert!(b.initrd.modules.iter().any(|m| m == "virtio_blk"));
        let err = format!("{:#}", load("nope").unwrap_err());
        assert!(err.contains("image-creation-x86_64"), "{err}");
    }
}
