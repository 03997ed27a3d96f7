//! Test helpers: synthetic kernel modules.
//!
//! Generates the smallest ELF64 relocatable object goblin accepts, holding
//! only a `.modinfo` section, so module tests need no toolchain and no real
//! kernel.

use std::fs;
use std::path::Path;

/// An ELF64 little-endian x86-64 relocatable object whose `.modinfo` holds
/// `name=` (omitted when empty), `depends=` and a license field.
pub(crate) fn fake_module(name: &str, depends: &[&str]) -> Vec<u8> {
    let mut modinfo = Vec::new();
    modinfo.extend_from_slice(b"license=GPL\0");
    if !name.is_empty() {
        modinfo.extend_from_slice(format!("name={name}\0").as_bytes());
    }
    modinfo.extend_from_slice(format!("depends={}\0", depends.join(",")).as_bytes());
    let shstrtab = b"\0.modinfo\0.shstrtab\0";

    let modinfo_off = 64u64;
    let shstrtab_off = modinfo_off + modinfo.len() as u64;
    let shoff = (shstrtab_off + shstrtab.len() as u64).div_ceil(8) * 8;

    let mut out = Vec::new();
    out.extend_from_slice(&[0x7f, b'E', b'L', b'F', 2, 1, 1, 0]);
    out.extend_from_slice(&[0; 8]);
    out.extend_from_slice(&1u16.to_le_bytes()); // ET_REL
    out.extend_from_slice(&62u16.to_le_bytes()); // EM_X86_64
    out.extend_from_slice(&1u32.to_le_bytes()); // EV_CURRENT
    out.extend_from_slice(&0u64.to_le_bytes()); // e_entry
    out.extend_from_slice(&0u64.to_le_bytes()); // e_phoff
    out.extend_from_slice(&shoff.to_le_bytes());
    out.extend_from_slice(&0u32.to_le_bytes()); // e_flags
    out.extend_from_slice(&64u16.to_le_bytes()); // e_ehsize
    out.extend_from_slice(&0u16.to_le_bytes()); // e_phentsize
    out.extend_from_slice(&0u16.to_le_bytes()); // e_phnum
    out.extend_from_slice(&64u16.to_le_bytes()); // e_shentsize
    out.extend_from_slice(&3u16.to_le_bytes()); // e_shnum
    out.extend_from_slice(&2u16.to_le_bytes()); // e_shstrndx
    assert_eq!(out.len(), 64);
    out.extend_from_slice(&modinfo);
    out.extend_from_slice(shstrtab);
    out.resize(shoff as usize, 0);

    let mut section = |name: u32, kind: u32, offset: u64, size: u64| {
        out.extend_from_slice(&name.to_le_bytes());
        out.extend_from_slice(&kind.to_le_bytes());
        out.extend_from_slice(&0u64.to_le_bytes()); // sh_flags
        out.extend_from_slice(&0u64.to_le_bytes()); // sh_addr
        out.extend_from_slice(&offset.to_le_bytes());
        out.extend_from_slice(&size.to_le_bytes());
        out.extend_from_slice(&0u32.to_le_bytes()); // sh_link
        out.extend_from_slice(&0u32.to_le_bytes()); // sh_info
        out.extend_from_slice(&1u64.to_le_bytes()); // sh_addralign
        out.extend_from_slice(&0u64.to_le_bytes()); // sh_entsize
    };
    section(0, 0, 0, 0); // SHN_UNDEF
    section(1, 1, modinfo_off, modinfo.len() as u64); // .modinfo, PROGBITS
    section(10, 3, shstrtab_off, shstrtab.len() as u64); // .shstrtab, STRTAB
    out
}

/// Writes `(relative path, modinfo name, depends)` modules below `dir`.
pub(crate) fn write_fake_modules(dir: &Path, modules: &[(&str, &str, &[&str])]) {
    for (path, name, depends) in modules {
        let path = dir.join(path);
        fs::create_dir_all(path.parent().unwrap()).unwrap();
        fs::write(path, fake_module(name, depends)).unwrap();
    }
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
