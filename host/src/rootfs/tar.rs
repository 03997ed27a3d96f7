//! `tar:PATH`: a root filesystem tarball (plain, gzip, zstd or xz, told by
//! its magic bytes; `tar:-` reads standard input), re-packed: read once
//! into the same tree as image layers (no whiteout handling), then written
//! sorted and normalised (one entry per path, parents first, numeric owners,
//! `./` names) and compressed as the output's name says.

use std::fs::File;
use std::io::Read;
use std::path::Path;

use anyhow::{bail, Context, Result};

use super::output::Output;
use super::tree::{apply_stream, LayerSpec};

pub(crate) fn repack(path: &Path, out: &mut Output) -> Result<()> {
    let name = format!("tar:{}", path.display());
    let reader: Box<dyn Read + Send> = if path.as_os_str() == "-" {
        Box::new(std::io::stdin())
    } else {
        if !path.exists() {
            bail!("{name}: '{}' does not exist", path.display());
        }
        if path.is_dir() {
            bail!(
                "{name}: '{}' is a directory (use dir:{})",
                path.display(),
                path.display()
            );
        }
        Box::new(File::open(path).with_context(|| format!("{name}: cannot open it"))?)
    };
    apply_stream(reader, &LayerSpec::rootfs(name), out)
}
