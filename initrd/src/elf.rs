//! Shared-library closure of host executables, so that tools copied into the
//! initrd find everything the dynamic loader will ask for.
//!
//! The lookup imitates glibc's `ld.so` on Debian x86_64 closely enough for
//! Debian's own binaries:
//!
//! * the program interpreter (`PT_INTERP`) is needed as is;
//! * each `DT_NEEDED` name containing a `/` is used as a path;
//! * otherwise the needing object's `DT_RUNPATH` is searched if it has one,
//!   else its `DT_RPATH` followed by the executable's `DT_RPATH` (RPATH is
//!   inherited, RUNPATH is not); `$ORIGIN`/`${ORIGIN}` expand to the
//!   object's directory;
//! * then the default directories (`/lib/x86_64-linux-gnu`,
//!   `/usr/lib/x86_64-linux-gnu`, `/lib64`, `/usr/lib64`, `/lib`,
//!   `/usr/lib`). The initrd has no `ld.so.cache`, so these are also where
//!   the loader will look at run time;
//! * candidates of another ELF class or machine are skipped, like ld.so does;
//! * a name already loaded for the same executable is not searched again
//!   (ld.so matches `DT_NEEDED` against loaded objects first), and objects
//!   are processed breadth first, in ld.so's order.
//!
//! Not imitated: `LD_LIBRARY_PATH`, `ld.so.cache` (equivalent to the default
//! directories for Debian's packaged libraries), `glibc-hwcaps`
//! subdirectories, and `$LIB`/`$PLATFORM` tokens.
//!
//! Each result keeps the path the loader will open (lexically normalised:
//! in the initrd every directory is real, so `bin/../lib` *is* `lib`) and the
//! canonical host file to copy, because on Debian most library names are
//! symlinks (`libext2fs.so.2 -> libext2fs.so.2.4`) and `/lib` itself is a
//! symlink to `usr/lib`.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::fs;
use std::path::{Component, Path, PathBuf};

use goblin::elf::Elf;

/// Default library directories of Debian's x86_64 glibc, in search order.
pub const DEBIAN_X86_64_LIBRARY_DIRS: [&str; 6] = [
    "/lib/x86_64-linux-gnu",
    "/usr/lib/x86_64-linux-gnu",
    "/lib64",
    "/usr/lib64",
    "/lib",
    "/usr/lib",
];

/// Errors computing a library closure.
#[derive(Debug, thiserror::Error)]
pub enum ElfError {
    /// A file could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A file is not an ELF object.
    #[error("{path} is not an ELF binary goblin can read ({source}); only ELF executables can be copied with their libraries (for a script, list its interpreter as a tool instead)")]
    Parse {
        path: PathBuf,
        #[source]
        source: goblin::error::Error,
    },
    /// A needed library was not found.
    #[error("shared library `{library}` needed by {needed_by} was not found (searched {}); install the package that provides it", display_dirs(.searched))]
    MissingLibrary {
        library: String,
        needed_by: PathBuf,
        /// The directories searched, in order.
        searched: Vec<PathBuf>,
    },
    /// The program interpreter does not exist on the host.
    #[error("program interpreter {interpreter} of {binary} does not exist on this host; the binary was built for another system")]
    MissingInterpreter {
        interpreter: PathBuf,
        binary: PathBuf,
    },
}

fn display_dirs(dirs: &[PathBuf]) -> String {
    if dirs.is_empty() {
        return "no directories".to_owned();
    }
    dirs.iter()
        .map(|d| d.display().to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

/// A shared object the loader will open.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Library {
    /// The path the loader looks up (where to store it in the initrd).
    pub path: PathBuf,
    /// The host file behind it, symlinks resolved (what to copy).
    pub real_path: PathBuf,
}

impl Library {
    /// Whether `path` is not the real file (a symlink, or under one).
    pub fn is_symlink(&self) -> bool {
        self.path != self.real_path
    }
}

/// The closure of `executables` with Debian x86_64's default directories:
/// the interpreter plus every needed library, recursively, deduplicated and
/// sorted by path. Statically linked executables contribute nothing.
pub fn library_closure(executables: &[PathBuf]) -> Result<Vec<Library>, ElfError> {
    Resolver::debian_x86_64().closure(executables)
}

/// The dynamic-loader imitation; [`Resolver::with_default_dirs`] exists so
/// tests (and other layouts) can choose the default search directories.
#[derive(Debug, Clone)]
pub struct Resolver {
    default_dirs: Vec<PathBuf>,
}

impl Default for Resolver {
    fn default() -> Self {
        Self::debian_x86_64()
    }
}

/// What the lookup needs from one ELF file.
#[derive(Debug, Clone)]
struct ObjectInfo {
    interpreter: Option<String>,
    soname: Option<String>,
    needed: Vec<String>,
    rpath: Vec<String>,
    runpath: Vec<String>,
    class: u8,
    machine: u16,
}

impl Resolver {
    /// Debian x86_64: [`DEBIAN_X86_64_LIBRARY_DIRS`].
    pub fn debian_x86_64() -> Self {
        Self::with_default_dirs(DEBIAN_X86_64_LIBRARY_DIRS.iter().map(PathBuf::from))
    }

    /// A resolver whose default directories (searched after RPATH/RUNPATH)
    /// are `dirs`, in order.
    pub fn with_default_dirs(dirs: impl IntoIterator<Item = PathBuf>) -> Self {
        Resolver {
            default_dirs: dirs.into_iter().collect(),
        }
    }

    /// See [`library_closure`].
    pub fn closure(&self, executables: &[PathBuf]) -> Result<Vec<Library>, ElfError> {
        let mut cache = HashMap::new();
        let mut found = BTreeMap::new();
        for exe in executables {
            self.closure_of(exe, &mut cache, &mut found)?;
        }
        Ok(found
            .into_iter()
            .map(|(path, real_path)| Library { path, real_path })
            .collect())
    }

    /// Adds the closure of one executable to `found` (path -> real path).
    /// Each executable is its own process, so names resolved for one do not
    /// shortcut the lookup for another.
    fn closure_of(
        &self,
        exe: &Path,
        cache: &mut HashMap<PathBuf, ObjectInfo>,
        found: &mut BTreeMap<PathBuf, PathBuf>,
    ) -> Result<(), ElfError> {
        let exe_path = lexical_normalize(&absolute(exe));
        let exe_info = object_info(&exe_path, cache)?;
        // Names already satisfied by a loaded object's SONAME: ld.so checks
        // these before searching (libc's DT_NEEDED `ld-linux-x86-64.so.2`
        // is the interpreter already mapped, not another file).
        let mut loaded: HashSet<String> = HashSet::new();
        if let Some(interp) = &exe_info.interpreter {
            let interp = PathBuf::from(interp);
            if !interp.is_file() {
                return Err(ElfError::MissingInterpreter {
                    interpreter: interp,
                    binary: exe_path.clone(),
                });
            }
            found.insert(lexical_normalize(&interp), real_path(&interp)?);
            loaded.extend(object_info(&interp, cache)?.soname);
        }
        // RPATH of the executable applies to every object that has no
        // RUNPATH of its own (glibc walks the loader chain; for the common
        // case the executable is the only RPATH carrier).
        let exe_origin = parent(&exe_path);
        let inherited_rpath = if exe_info.runpath.is_empty() {
            expand(&exe_info.rpath, &exe_origin)
        } else {
            Vec::new()
        };

        let mut queue = VecDeque::from([(exe_path.clone(), exe_info)]);
        while let Some((object, info)) = queue.pop_front() {
            let origin = parent(&object);
            for name in &info.needed {
                if !loaded.insert(name.clone()) {
                    continue;
                }
                let (lookup, searched) = if name.contains('/') {
                    (
                        Some(PathBuf::from(name)).filter(|p| p.is_file()),
                        Vec::new(),
                    )
                } else {
                    let mut dirs = if info.runpath.is_empty() {
                        let mut dirs = expand(&info.rpath, &origin);
                        if object != exe_path {
                            dirs.extend(inherited_rpath.iter().cloned());
                        }
                        dirs
                    } else {
                        expand(&info.runpath, &origin)
                    };
                    dirs.extend(self.default_dirs.iter().cloned());
                    let hit = dirs
                        .iter()
                        .map(|d| d.join(name))
                        .find(|candidate| compatible(candidate, &info, cache));
                    (hit, dirs)
                };
                let Some(lookup) = lookup else {
                    return Err(ElfError::MissingLibrary {
                        library: name.clone(),
                        needed_by: object.clone(),
                        searched,
                    });
                };
                let path = lexical_normalize(&absolute(&lookup));
                let real = real_path(&lookup)?;
                let lib_info = object_info(&lookup, cache)?;
                loaded.extend(lib_info.soname.clone());
                found.insert(path.clone(), real);
                queue.push_back((path, lib_info));
            }
        }
        Ok(())
    }
}

/// Whether `candidate` is a file ld.so would accept for `needer`: an ELF
/// object of the same class and machine. Unreadable or non-ELF candidates
/// are skipped, as the loader does.
fn compatible(
    candidate: &Path,
    needer: &ObjectInfo,
    cache: &mut HashMap<PathBuf, ObjectInfo>,
) -> bool {
    if !candidate.is_file() {
        return false;
    }
    match object_info(candidate, cache) {
        Ok(info) => info.class == needer.class && info.machine == needer.machine,
        Err(_) => false,
    }
}

fn object_info(
    path: &Path,
    cache: &mut HashMap<PathBuf, ObjectInfo>,
) -> Result<ObjectInfo, ElfError> {
    if let Some(info) = cache.get(path) {
        return Ok(info.clone());
    }
    let bytes = fs::read(path).map_err(|source| ElfError::Read {
        path: path.to_owned(),
        source,
    })?;
    let elf = Elf::parse(&bytes).map_err(|source| ElfError::Parse {
        path: path.to_owned(),
        source,
    })?;
    let split = |entries: &[&str]| -> Vec<String> {
        entries
            .iter()
            .flat_map(|e| e.split(':'))
            .filter(|d| !d.is_empty())
            .map(str::to_owned)
            .collect()
    };
    let info = ObjectInfo {
        interpreter: elf.interpreter.map(str::to_owned),
        soname: elf.soname.map(str::to_owned),
        needed: elf.libraries.iter().map(|s| (*s).to_owned()).collect(),
        rpath: split(&elf.rpaths),
        runpath: split(&elf.runpaths),
        class: elf.header.e_ident[goblin::elf::header::EI_CLASS],
        machine: elf.header.e_machine,
    };
    cache.insert(path.to_owned(), info.clone());
    Ok(info)
}

/// Expands `$ORIGIN` in RPATH/RUNPATH entries.
fn expand(entries: &[String], origin: &Path) -> Vec<PathBuf> {
    let origin = origin.to_string_lossy();
    entries
        .iter()
        .map(|e| PathBuf::from(e.replace("${ORIGIN}", &origin).replace("$ORIGIN", &origin)))
        .collect()
}

fn parent(path: &Path) -> PathBuf {
    path.parent()
        .map(Path::to_owned)
        .unwrap_or_else(|| PathBuf::from("/"))
}

fn absolute(path: &Path) -> PathBuf {
    if path.is_absolute() {
        path.to_owned()
    } else {
        std::env::current_dir()
            .map(|cwd| cwd.join(path))
            .unwrap_or_else(|_| path.to_owned())
    }
}

fn real_path(path: &Path) -> Result<PathBuf, ElfError> {
    fs::canonicalize(path).map_err(|source| ElfError::Read {
        path: path.to_owned(),
        source,
    })
}

/// Removes `.` and resolves `..` textually (never above `/`).
fn lexical_normalize(path: &Path) -> PathBuf {
    let mut out = PathBuf::new();
    for component in path.components() {
        match component {
            Component::CurDir => {}
            Component::ParentDir => {
                out.pop();
            }
            other => out.push(other),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Command;

    fn paths(libs: &[Library]) -> Vec<&Path> {
        libs.iter().map(|l| l.path.as_path()).collect()
    }

    #[test]
    fn mke2fs_closure_matches_ldd() {
        let mke2fs = PathBuf::from("/usr/sbin/mke2fs");
        if !mke2fs.exists() {
            crate::test_support::skip_for_missing_tool(
                "/usr/sbin/mke2fs is not installed (apt-get install e2fsprogs)",
            );
            return;
        }
        let libs = library_closure(std::slice::from_ref(&mke2fs)).unwrap();
        let p = paths(&libs);
        for expected in [
            "/lib64/ld-linux-x86-64.so.2",
            "/lib/x86_64-linux-gnu/libext2fs.so.2",
            "/lib/x86_64-linux-gnu/libc.so.6",
            "/lib/x86_64-linux-gnu/libcom_err.so.2",
            "/lib/x86_64-linux-gnu/libblkid.so.1",
            "/lib/x86_64-linux-gnu/libuuid.so.1",
            "/lib/x86_64-linux-gnu/libe2p.so.2",
        ] {
            assert!(
                p.contains(&Path::new(expected)),
                "{expected} missing from {p:?}"
            );
        }
        assert_eq!(libs.len(), 7, "{p:?}");
        let mut sorted = libs.clone();
        sorted.sort();
        assert_eq!(sorted, libs, "output must be sorted");

        // The name stays the symlink ld.so opens; the real file is reported.
        let ext2fs = libs
            .iter()
            .find(|l| l.path.ends_with("libext2fs.so.2"))
            .unwrap();
        assert!(ext2fs.is_symlink());
        assert!(fs::symlink_metadata(&ext2fs.real_path)
            .unwrap()
            .file_type()
            .is_file());
        assert!(
            ext2fs
                .real_path
                .to_string_lossy()
                .contains("libext2fs.so.2."),
            "{ext2fs:?}"
        );
    }

    #[test]
    fn static_binary_has_empty_closure() {
        // Debian's busybox-static (and `busybox` on some systems) is static.
        let busybox = PathBuf::from("/bin/busybox");
        let is_static = Command::new("file")
            .arg("-L")
            .arg(&busybox)
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).contains("statically linked"))
            .unwrap_or(false);
        if !is_static {
            crate::test_support::skip_for_missing_tool(
                "/bin/busybox is absent or not statically linked (apt-get install busybox-static)",
            );
            return;
        }
        assert_eq!(library_closure(&[busybox]).unwrap(), []);
    }

    #[test]
    fn missing_library_names_it_and_the_binary() {
        let mke2fs = PathBuf::from("/usr/sbin/mke2fs");
        if !mke2fs.exists() {
            crate::test_support::skip_for_missing_tool(
                "/usr/sbin/mke2fs is not installed (apt-get install e2fsprogs)",
            );
            return;
        }
        let empty = tempfile::tempdir().unwrap();
        let resolver = Resolver::with_default_dirs([empty.path().to_owned()]);
        let err = resolver.closure(std::slice::from_ref(&mke2fs)).unwrap_err();
        match &err {
            ElfError::MissingLibrary {
                library,
                needed_by,
                searched,
            } => {
                assert_eq!(library, "libext2fs.so.2");
                assert_eq!(needed_by, &mke2fs);
                assert_eq!(searched, &[empty.path().to_owned()]);
            }
            other => panic!("expected MissingLibrary, got {other}"),
        }
        let msg = err.to_string();
        assert!(
            msg.contains("libext2fs.so.2") && msg.contains("/usr/sbin/mke2fs"),
            "{msg}"
        );
    }

    #[test]
    fn fake_search_path_finds_symlinked_libraries_and_skips_non_elf() {
        let mke2fs = PathBuf::from("/usr/sbin/mke2fs");
        if !mke2fs.exists() {
            crate::test_support::skip_for_missing_tool(
                "/usr/sbin/mke2fs is not installed (apt-get install e2fsprogs)",
            );
            return;
        }
        // First directory: a decoy that is not ELF (ld.so skips it); second
        // directory: a symlink to the real library.
        let decoy = tempfile::tempdir().unwrap();
        fs::write(decoy.path().join("libext2fs.so.2"), b"not elf").unwrap();
        let links = tempfile::tempdir().unwrap();
        std::os::unix::fs::symlink(
            "/usr/lib/x86_64-linux-gnu/libext2fs.so.2",
            links.path().join("libext2fs.so.2"),
        )
        .unwrap();
        let mut dirs = vec![decoy.path().to_owned(), links.path().to_owned()];
        dirs.extend(DEBIAN_X86_64_LIBRARY_DIRS.iter().map(PathBuf::from));
        let libs = Resolver::with_default_dirs(dirs)
            .closure(&[mke2fs])
            .unwrap();
        let ext2fs = libs
            .iter()
            .find(|l| l.path.ends_with("libext2fs.so.2"))
            .unwrap();
        assert_eq!(ext2fs.path, links.path().join("libext2fs.so.2"));
        assert_eq!(
            ext2fs.real_path,
            fs::canonicalize("/usr/lib/x86_64-linux-gnu/libext2fs.so.2").unwrap()
        );
    }

    /// RUNPATH with `$ORIGIN`, checked on a program built with gcc.
    #[test]
    fn runpath_with_origin_is_honoured() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        fs::create_dir_all(root.join("app/bin")).unwrap();
        fs::create_dir_all(root.join("app/lib")).unwrap();
        fs::write(root.join("foo.c"), "int foo(void) { return 1; }\n").unwrap();
        fs::write(
            root.join("main.c"),
            "int foo(void);\nint main(void) { return foo(); }\n",
        )
        .unwrap();
        let ok = |args: &[&str]| {
            Command::new("gcc")
                .args(args)
                .current_dir(root)
                .status()
                .map(|s| s.success())
                .unwrap_or(false)
        };
        if !ok(&["-shared", "-fPIC", "-o", "app/lib/libfoo.so", "foo.c"]) {
            crate::test_support::skip_for_missing_tool(
                "gcc cannot build a shared library here (apt-get install gcc)",
            );
            return;
        }
        assert!(ok(&[
            "-o",
            "app/bin/prog",
            "main.c",
            "-Lapp/lib",
            "-lfoo",
            "-Wl,--enable-new-dtags,-rpath,$ORIGIN/../lib",
        ]));
        let prog = root.join("app/bin/prog");
        let libs = library_closure(std::slice::from_ref(&prog)).unwrap();
        let p = paths(&libs);
        assert!(
            p.contains(&root.join("app/lib/libfoo.so").as_path()),
            "{p:?}"
        );
        assert!(
            p.contains(&Path::new("/lib/x86_64-linux-gnu/libc.so.6")),
            "{p:?}"
        );

        // Without the library, the error names it and the program.
        fs::remove_file(root.join("app/lib/libfoo.so")).unwrap();
        let err = library_closure(std::slice::from_ref(&prog)).unwrap_err();
        assert!(
            matches!(&err, ElfError::MissingLibrary { library, needed_by, .. }
                if library == "libfoo.so" && needed_by == &prog),
            "{err}"
        );
        assert!(err.to_string().contains("app/bin/../lib"), "{err}");
    }

    #[test]
    fn non_elf_tool_is_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        let script = dir.path().join("script.sh");
        fs::write(&script, "#!/bin/sh\necho hi\n").unwrap();
        let err = library_closure(&[script]).unwrap_err();
        assert!(matches!(err, ElfError::Parse { .. }), "{err}");
    }

    #[test]
    fn lexical_normalize_resolves_dots() {
        assert_eq!(
            lexical_normalize(Path::new("/a/b/../c/./d")),
            Path::new("/a/c/d")
        );
        assert_eq!(lexical_normalize(Path::new("/../x")), Path::new("/x"));
    }
}
