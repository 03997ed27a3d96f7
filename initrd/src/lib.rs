//! Assembles the deterministic initramfs a build server boots with.
//!
//! * [`bootscript`] — the TOML bootscript format.
//! * [`cpio`] — a deterministic cpio `newc` writer.
//! * [`modules`] — kernel-module dependency closure and load order.
//! * [`elf`] — shared-library closure of host executables.
//! * [`builder`] — puts it all together into a (gzip-compressed) initrd.

pub mod bootscript;
pub mod builder;
pub mod cpio;
pub mod elf;
pub mod modules;

#[cfg(test)]
mod test_support;

pub use bootscript::{Bootscript, BootscriptError, Compression, InitrdContents, KernelSource};
pub use builder::{build, find_tool, sha256_hex, BuildError, GeneratedFile, Initrd, InitrdSpec};
pub use cpio::{Archive, CpioError};
pub use elf::{library_closure, ElfError, Library, Resolver};
pub use modules::{Module, ModuleError, ModuleIndex};
