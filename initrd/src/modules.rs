//! Kernel-module closure: which `.ko` files an initrd needs, and in which
//! order the agent must load them.
//!
//! Debian's kernel packages ship no `modules.dep` (depmod runs in the
//! package's postinst, which we never execute), so dependencies are read
//! from each module's `.modinfo` ELF section: NUL-separated `key=value`
//! strings where `name=` is the module name and `depends=` a comma-separated
//! list of modules whose symbols it uses. `finit_module` fails with ENOENT
//! ("Unknown symbol") when a dependency is not loaded yet, so the load order
//! must be a topological order of that graph.
//!
//! Like the kernel, names treat `-` and `_` as the same character; names
//! are reported with `_`.
//!
//! Only uncompressed `.ko` files are supported (Debian builds with
//! `CONFIG_MODULE_COMPRESS_NONE`); compressed modules are indexed by file
//! name so that needing one gives a clear error instead of "not found".
//!
//! Modules listed in `modules.builtin` (shipped by Debian next to `kernel/`)
//! are compiled into the kernel: requesting one is not an error, it is
//! simply left out of the load order.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fs;
use std::path::{Path, PathBuf};

use goblin::container::Ctx;
use goblin::elf::{Elf, SectionHeader};
use goblin::strtab::Strtab;

/// Errors scanning a module tree or resolving a load order.
#[derive(Debug, thiserror::Error)]
pub enum ModuleError {
    /// A file or directory of the tree could not be read.
    #[error("cannot read {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A `.ko` file is not an ELF object goblin can read.
    #[error("{path} is not a valid kernel module ({source}); the module tree may be truncated or corrupt, re-extract the kernel package")]
    Elf {
        path: PathBuf,
        #[source]
        source: goblin::error::Error,
    },
    /// A needed module is compressed.
    #[error("kernel module `{name}` at {path} is compressed; compressed modules are not supported, decompress it (xz -d / zstd -d) or use a kernel built with CONFIG_MODULE_COMPRESS_NONE")]
    Compressed { name: String, path: PathBuf },
    /// A requested module, or a dependency, is not in the tree.
    #[error("kernel module `{name}`{} was not found in {dir} ({indexed} modules indexed); check the name and that this kernel builds it as a module", required_by_text(.required_by))]
    Missing {
        name: String,
        /// The module whose `depends=` names it; `None` when it was requested.
        required_by: Option<String>,
        /// The directory that was scanned.
        dir: PathBuf,
        /// How many modules the scan found (0 hints at a wrong directory).
        indexed: usize,
    },
    /// Modules depend on each other in a loop, which no load order satisfies.
    #[error("kernel modules depend on each other in a cycle: {}; the module tree is inconsistent (mixed kernel versions?)", .chain.join(" -> "))]
    Cycle {
        /// The loop, starting and ending with the same module.
        chain: Vec<String>,
    },
}

fn required_by_text(required_by: &Option<String>) -> String {
    match required_by {
        Some(by) => format!(" (required by `{by}`)"),
        None => " (requested)".to_owned(),
    }
}

/// One indexed kernel module.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Module {
    name: String,
    path: PathBuf,
    depends: Vec<String>,
    compressed: bool,
}

impl Module {
    /// The module name (`_` form), e.g. `virtio_pci`.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The `.ko` file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Direct dependencies from `depends=` (`_` form, sorted, deduplicated).
    pub fn depends(&self) -> &[String] {
        &self.depends
    }

    /// Whether the file is compressed (and therefore unusable here).
    pub fn is_compressed(&self) -> bool {
        self.compressed
    }
}

/// All modules of a tree, by name.
#[derive(Debug, Clone, Default)]
pub struct ModuleIndex {
    dir: PathBuf,
    modules: BTreeMap<String, Module>,
    builtin: BTreeSet<String>,
}

/// The kernel's module-name normalisation: `-` and `_` are equal.
pub fn canonical_name(name: &str) -> String {
    name.replace('-', "_")
}

impl ModuleIndex {
    /// Indexes every `*.ko` below `dir` (e.g. `.../lib/modules/<version>/`),
    /// recursively. Symlinked directories are not followed (a host's
    /// `build` link points at kernel headers, not modules). When a name
    /// occurs twice, the first file in path order wins and a warning is
    /// logged.
    pub fn scan(dir: impl AsRef<Path>) -> Result<Self, ModuleError> {
        let dir = dir.as_ref();
        let mut files = Vec::new();
        collect_module_files(dir, &mut files)?;
        files.sort();

        let mut modules = BTreeMap::new();
        for path in files {
            let module = read_module(&path)?;
            if let Some(first) = modules.get(&module.name) {
                let first: &Module = first;
                tracing::warn!(
                    module = %module.name,
                    kept = %first.path.display(),
                    ignored = %path.display(),
                    "kernel module found twice; keeping the first"
                );
                continue;
            }
            modules.insert(module.name.clone(), module);
        }

        let builtin = read_builtin(&dir.join("modules.builtin"))?;
        tracing::debug!(
            dir = %dir.display(),
            modules = modules.len(),
            builtin = builtin.len(),
            "indexed kernel modules"
        );
        Ok(ModuleIndex {
            dir: dir.to_owned(),
            modules,
            builtin,
        })
    }

    /// The scanned directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Number of indexed modules.
    pub fn len(&self) -> usize {
        self.modules.len()
    }

    /// Whether no module was found.
    pub fn is_empty(&self) -> bool {
        self.modules.is_empty()
    }

    /// Looks a module up by name (`-` and `_` are equal).
    pub fn get(&self, name: &str) -> Option<&Module> {
        self.modules.get(&canonical_name(name))
    }

    /// All modules, sorted by name.
    pub fn iter(&self) -> impl Iterator<Item = &Module> {
        self.modules.values()
    }

    /// Whether `modules.builtin` lists the module as compiled in.
    pub fn is_builtin(&self, name: &str) -> bool {
        self.builtin.contains(&canonical_name(name))
    }

    /// The requested modules plus everything they depend on, ordered so that
    /// every module comes after its dependencies.
    ///
    /// The order is deterministic: requested modules are taken in the given
    /// order, each one's dependencies in alphabetical order, depth first.
    /// Built-in modules that are requested are skipped (logged at info).
    pub fn load_order<S: AsRef<str>>(&self, requested: &[S]) -> Result<Vec<&Module>, ModuleError> {
        let mut walk = Walk {
            index: self,
            state: HashMap::new(),
            stack: Vec::new(),
            order: Vec::new(),
        };
        for name in requested {
            let name = canonical_name(name.as_ref());
            if !self.modules.contains_key(&name) && self.builtin.contains(&name) {
                tracing::info!(module = %name, "kernel module is built into the kernel; nothing to load");
                continue;
            }
            walk.visit(&name, None)?;
        }
        Ok(walk.order)
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum State {
    /// On the current depth-first path; meeting it again means a cycle.
    Visiting,
    Done,
}

struct Walk<'a> {
    index: &'a ModuleIndex,
    state: HashMap<&'a str, State>,
    stack: Vec<&'a str>,
    order: Vec<&'a Module>,
}

impl<'a> Walk<'a> {
    fn visit(&mut self, name: &str, required_by: Option<&str>) -> Result<(), ModuleError> {
        // Copy the `&'a` index out so the module borrows it, not `self`.
        let index = self.index;
        let Some(module) = index.modules.get(name) else {
            return Err(ModuleError::Missing {
                name: name.to_owned(),
                required_by: required_by.map(str::to_owned),
                dir: self.index.dir.clone(),
                indexed: self.index.modules.len(),
            });
        };
        match self.state.get(module.name.as_str()) {
            Some(State::Done) => return Ok(()),
            Some(State::Visiting) => {
                let start = self
                    .stack
                    .iter()
                    .position(|m| *m == module.name)
                    .unwrap_or(0);
                let mut chain: Vec<String> = self.stack[start..]
                    .iter()
                    .map(|m| (*m).to_owned())
                    .collect();
                chain.push(module.name.clone());
                return Err(ModuleError::Cycle { chain });
            }
            None => {}
        }
        if module.compressed {
            return Err(ModuleError::Compressed {
                name: module.name.clone(),
                path: module.path.clone(),
            });
        }
        self.state.insert(&module.name, State::Visiting);
        self.stack.push(&module.name);
        for dep in &module.depends {
            self.visit(dep, Some(&module.name))?;
        }
        self.stack.pop();
        self.state.insert(&module.name, State::Done);
        self.order.push(module);
        Ok(())
    }
}

/// Module file suffixes; the bool says whether the file is compressed.
const SUFFIXES: [(&str, bool); 4] = [
    (".ko", false),
    (".ko.xz", true),
    (".ko.zst", true),
    (".ko.gz", true),
];

fn module_suffix(file_name: &str) -> Option<(&'static str, bool)> {
    SUFFIXES
        .iter()
        .copied()
        .find(|(suffix, _)| file_name.ends_with(suffix) && file_name.len() > suffix.len())
}

fn collect_module_files(dir: &Path, out: &mut Vec<PathBuf>) -> Result<(), ModuleError> {
    let io_err = |path: &Path| {
        let path = path.to_owned();
        move |source| ModuleError::Io { path, source }
    };
    for entry in fs::read_dir(dir).map_err(io_err(dir))? {
        let entry = entry.map_err(io_err(dir))?;
        let path = entry.path();
        let file_type = entry.file_type().map_err(io_err(&path))?;
        if file_type.is_dir() {
            collect_module_files(&path, out)?;
        } else if entry.file_name().to_str().and_then(module_suffix).is_some()
            && fs::metadata(&path).map(|m| m.is_file()).unwrap_or(false)
        {
            out.push(path);
        }
    }
    Ok(())
}

fn read_module(path: &Path) -> Result<Module, ModuleError> {
    let file_name = path
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or_default();
    let (suffix, compressed) = module_suffix(file_name).unwrap_or((".ko", false));
    let stem = canonical_name(&file_name[..file_name.len() - suffix.len()]);
    if compressed {
        // Its .modinfo cannot be read without decompressing; the file name
        // is enough to report a clear error if it is ever needed.
        return Ok(Module {
            name: stem,
            path: path.to_owned(),
            depends: Vec::new(),
            compressed: true,
        });
    }

    let bytes = fs::read(path).map_err(|source| ModuleError::Io {
        path: path.to_owned(),
        source,
    })?;
    let modinfo = modinfo_section(&bytes).map_err(|source| ModuleError::Elf {
        path: path.to_owned(),
        source,
    })?;
    let mut name = None;
    let mut depends = BTreeSet::new();
    match modinfo {
        Some(data) => {
            for field in data.split(|b| *b == 0) {
                let field = String::from_utf8_lossy(field);
                if let Some(value) = field.strip_prefix("name=") {
                    name = Some(canonical_name(value));
                } else if let Some(value) = field.strip_prefix("depends=") {
                    depends.extend(
                        value
                            .split(',')
                            .map(str::trim)
                            .filter(|d| !d.is_empty())
                            .map(canonical_name),
                    );
                }
            }
        }
        None => tracing::warn!(
            path = %path.display(),
            "kernel module has no .modinfo section; assuming no dependencies"
        ),
    }
    Ok(Module {
        name: name.filter(|n| !n.is_empty()).unwrap_or(stem),
        path: path.to_owned(),
        depends: depends.into_iter().collect(),
        compressed: false,
    })
}

/// Returns the bytes of the `.modinfo` section, if any.
///
/// Only the ELF header and section headers are parsed: `Elf::parse` would
/// also decode symbols and every relocation section, which is wasted work
/// for the ~1,000 modules of a scan.
fn modinfo_section(bytes: &[u8]) -> Result<Option<&[u8]>, goblin::error::Error> {
    let header = Elf::parse_header(bytes)?;
    let ctx = Ctx::new(header.container()?, header.endianness()?);
    let sections =
        SectionHeader::parse(bytes, header.e_shoff as usize, header.e_shnum as usize, ctx)?;
    let Some(names) = sections.get(header.e_shstrndx as usize) else {
        return Ok(None);
    };
    let names = Strtab::parse(bytes, names.sh_offset as usize, names.sh_size as usize, 0)?;
    for section in &sections {
        if names.get_at(section.sh_name) == Some(".modinfo") {
            let range = section.file_range().unwrap_or(0..0);
            return bytes.get(range).map(Some).ok_or_else(|| {
                goblin::error::Error::Malformed(".modinfo section lies outside the file".into())
            });
        }
    }
    Ok(None)
}

/// Reads `modules.builtin` (lines like `kernel/fs/ext4/ext4.ko`); absent is
/// fine and means "nothing known to be built in".
fn read_builtin(path: &Path) -> Result<BTreeSet<String>, ModuleError> {
    let text = match fs::read_to_string(path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(BTreeSet::new()),
        Err(source) => {
            return Err(ModuleError::Io {
                path: path.to_owned(),
                source,
            })
        }
    };
    Ok(text
        .lines()
        .filter_map(|line| line.trim().rsplit('/').next())
        .filter_map(|file| file.strip_suffix(".ko"))
        .map(canonical_name)
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_support::{fake_module, write_fake_modules};

    fn names(order: &[&Module]) -> Vec<String> {
        order.iter().map(|m| m.name().to_owned()).collect()
    }

    #[test]
    fn chain_is_loaded_dependencies_first() {
        let dir = tempfile::tempdir().unwrap();
        write_fake_modules(
            dir.path(),
            &[
                ("kernel/a/c.ko", "c", &["b"]),
                ("kernel/b.ko", "b", &["a"]),
                ("kernel/a.ko", "a", &[]),
            ],
        );
        let index = ModuleIndex::scan(dir.path()).unwrap();
        assert_eq!(index.len(), 3);
        assert_eq!(names(&index.load_order(&["c"]).unwrap()), ["a", "b", "c"]);
        // Asking for something already pulled in does not duplicate it.
        assert_eq!(
            names(&index.load_order(&["c", "a"]).unwrap()),
            ["a", "b", "c"]
        );
    }

    #[test]
    fn diamond_is_deterministic_and_respects_requested_order() {
        let dir = tempfile::tempdir().unwrap();
        write_fake_modules(
            dir.path(),
            &[
                ("top.ko", "top", &["right", "left"]),
                ("left.ko", "left", &["base"]),
                ("right.ko", "right", &["base"]),
                ("base.ko", "base", &[]),
                ("other.ko", "other", &[]),
            ],
        );
        let index = ModuleIndex::scan(dir.path()).unwrap();
        assert_eq!(
            names(&index.load_order(&["other", "top"]).unwrap()),
            ["other", "base", "left", "right", "top"]
        );
        assert_eq!(
            names(&index.load_order(&["right", "top", "other"]).unwrap()),
            ["base", "right", "left", "top", "other"]
        );
    }

    #[test]
    fn dashes_and_underscores_are_equal_and_name_comes_from_modinfo() {
        let dir = tempfile::tempdir().unwrap();
        // File name differs from the modinfo name: modinfo wins.
        write_fake_modules(
            dir.path(),
            &[
                ("x/odd-file.ko", "virtio_pci", &["virtio-ring"]),
                ("virtio-ring.ko", "", &[]),
            ],
        );
        let index = ModuleIndex::scan(dir.path()).unwrap();
        // virtio-ring.ko has an empty name=: falls back to the file stem.
        assert!(index.get("virtio_ring").is_some());
        let order = index.load_order(&["virtio-pci"]).unwrap();
        assert_eq!(names(&order), ["virtio_ring", "virtio_pci"]);
        assert!(order[1].path().ends_with("x/odd-file.ko"));
    }

    #[test]
    fn cycle_reports_the_chain() {
        let dir = tempfile::tempdir().unwrap();
        write_fake_modules(
            dir.path(),
            &[
                ("a.ko", "a", &["b"]),
                ("b.ko", "b", &["c"]),
                ("c.ko", "c", &["b"]),
                ("d.ko", "d", &["a"]),
            ],
        );
        let index = ModuleIndex::scan(dir.path()).unwrap();
        let err = index.load_order(&["d"]).unwrap_err();
        match &err {
            ModuleError::Cycle { chain } => assert_eq!(chain, &["b", "c", "b"]),
            other => panic!("expected a cycle, got {other}"),
        }
        assert!(err.to_string().contains("b -> c -> b"), "{err}");
    }

    #[test]
    fn missing_dependency_names_who_requires_it_and_where() {
        let dir = tempfile::tempdir().unwrap();
        write_fake_modules(dir.path(), &[("vfat.ko", "vfat", &["fat"])]);
        let index = ModuleIndex::scan(dir.path()).unwrap();
        let err = index.load_order(&["vfat"]).unwrap_err();
        match &err {
            ModuleError::Missing {
                name, required_by, ..
            } => {
                assert_eq!(name, "fat");
                assert_eq!(required_by.as_deref(), Some("vfat"));
            }
            other => panic!("expected Missing, got {other}"),
        }
        let msg = err.to_string();
        assert!(msg.contains("`fat` (required by `vfat`)"), "{msg}");
        assert!(msg.contains(&dir.path().display().to_string()), "{msg}");

        let err = index.load_order(&["nope"]).unwrap_err();
        assert!(
            matches!(
                &err,
                ModuleError::Missing {
                    required_by: None,
                    ..
                }
            ),
            "{err}"
        );
    }

    #[test]
    fn builtin_modules_are_skipped() {
        let dir = tempfile::tempdir().unwrap();
        write_fake_modules(dir.path(), &[("vfat.ko", "vfat", &[])]);
        fs::write(
            dir.path().join("modules.builtin"),
            "kernel/fs/ext4/ext4.ko\n",
        )
        .unwrap();
        let index = ModuleIndex::scan(dir.path()).unwrap();
        assert!(index.is_builtin("ext4"));
        assert_eq!(
            names(&index.load_order(&["ext4", "vfat"]).unwrap()),
            ["vfat"]
        );
    }

    #[test]
    fn compressed_module_is_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        write_fake_modules(dir.path(), &[("vfat.ko", "vfat", &["fat"])]);
        fs::write(dir.path().join("fat.ko.xz"), b"\xfd7zXZ\0 not really").unwrap();
        let index = ModuleIndex::scan(dir.path()).unwrap();
        let err = index.load_order(&["vfat"]).unwrap_err();
        assert!(
            matches!(&err, ModuleError::Compressed { name, .. } if name == "fat"),
            "{err}"
        );
        assert!(
            err.to_string()
                .contains("compressed modules are not supported"),
            "{err}"
        );
    }

    #[test]
    fn garbage_ko_is_an_elf_error() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(
            dir.path().join("bad.ko"),
            b"not an elf file at all, definitely",
        )
        .unwrap();
        let err = ModuleIndex::scan(dir.path()).unwrap_err();
        assert!(matches!(err, ModuleError::Elf { .. }), "{err}");
    }

    /// The generated ELF is parsed the same way as one made by the real
    /// toolchain: gcc compiles an object and objcopy adds `.modinfo`.
    #[test]
    fn reads_modinfo_added_by_objcopy() {
        use std::process::Command;
        let dir = tempfile::tempdir().unwrap();
        let c = dir.path().join("m.c");
        let obj = dir.path().join("m.o");
        let info = dir.path().join("info");
        fs::write(&c, "int answer(void) { return 42; }\n").unwrap();
        fs::write(
            &info,
            b"license=GPL\0depends=virtio,virtio_ring\0name=real_mod\0vermagic=6.1\0",
        )
        .unwrap();
        let ok = |cmd: &mut Command| cmd.status().map(|s| s.success()).unwrap_or(false);
        if !ok(Command::new("gcc").arg("-c").arg(&c).arg("-o").arg(&obj)) {
            crate::test_support::skip_for_missing_tool(
                "gcc is not available to build a test object (apt-get install gcc)",
            );
            return;
        }
        let ko = dir.path().join("tree/real-mod.ko");
        fs::create_dir_all(ko.parent().unwrap()).unwrap();
        assert!(ok(Command::new("objcopy")
            .arg(format!("--add-section=.modinfo={}", info.display()))
            .arg(&obj)
            .arg(&ko)));
        let index = ModuleIndex::scan(dir.path().join("tree")).unwrap();
        let m = index.get("real_mod").unwrap();
        assert_eq!(m.depends(), ["virtio", "virtio_ring"]);
        // Sanity: our own generator agrees with the parser on the same data.
        let ours = fake_module("real_mod", &["virtio_ring", "virtio"]);
        let data = modinfo_section(&ours).unwrap().unwrap();
        assert!(data.windows(7).any(|w| w == b"depends"));
    }

    /// Where a real Debian cloud kernel's modules may have been extracted.
    fn real_module_tree() -> Option<PathBuf> {
        let fixed = PathBuf::from("/tmp/imgforge-kernel-test/lib/modules");
        if fixed.is_dir() {
            return Some(fixed);
        }
        let cache = PathBuf::from(std::env::var_os("HOME")?).join(".cache/imgforge/kernels");
        let mut found: Vec<PathBuf> = fs::read_dir(cache)
            .ok()?
            .flatten()
            .flat_map(|k| {
                fs::read_dir(k.path().join("lib/modules"))
                    .into_iter()
                    .flatten()
                    .flatten()
            })
            .map(|e| e.path())
            .filter(|p| p.is_dir())
            .collect();
        found.sort();
        found.pop()
    }

    #[test]
    fn real_debian_modules_resolve_in_a_loadable_order() {
        let Some(tree) = real_module_tree() else {
            eprintln!(
                "skipping: no real module tree at /tmp/imgforge-kernel-test/lib/modules \
                 or ~/.cache/imgforge/kernels/*/lib/modules/*"
            );
            return;
        };
        let index = ModuleIndex::scan(&tree).unwrap();
        let requested = [
            "virtio_pci",
            "virtio_blk",
            "virtio_net",
            "fat",
            "vfat",
            "nls_cp437",
            "nls_ascii",
        ];
        let order = names(&index.load_order(&requested).unwrap());
        let pos = |n: &str| {
            order
                .iter()
                .position(|m| m == n)
                .unwrap_or_else(|| panic!("{n} missing from {order:?}"))
        };
        for (before, after) in [
            ("virtio_ring", "virtio"),
            ("virtio", "virtio_pci"),
            ("virtio_pci_modern_dev", "virtio_pci"),
            ("virtio_pci_legacy_dev", "virtio_pci"),
            ("virtio", "virtio_blk"),
            ("virtio_ring", "virtio_blk"),
            ("failover", "net_failover"),
            ("net_failover", "virtio_net"),
            ("virtio", "virtio_net"),
            ("fat", "vfat"),
        ] {
            assert!(
                pos(before) < pos(after),
                "{before} must precede {after}: {order:?}"
            );
        }
        let mut sorted = order.clone();
        sorted.sort();
        assert_eq!(
            sorted,
            [
                "failover",
                "fat",
                "net_failover",
                "nls_ascii",
                "nls_cp437",
                "vfat",
                "virtio",
                "virtio_blk",
                "virtio_net",
                "virtio_pci",
                "virtio_pci_legacy_dev",
                "virtio_pci_modern_dev",
                "virtio_ring"
            ],
            "{order:?}"
        );
    }
}
