//! `dir:` and `tar:` sources: a directory tree round-trips through the
//! tarball (extracted by GNU tar), and re-packing is canonical.

mod rootfs_common;

use std::ffi::CString;
use std::fs;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{symlink, PermissionsExt};
use std::path::Path;
use std::process::Command;

use host::rootfs::{build, Options, Report, Source};
use rootfs_common::*;

fn build_src(spec: String, out: &Path) -> anyhow::Result<Report> {
    let src: Source = spec.parse()?;
    build(&src, out, &Options::default())
}

fn set_mtime(path: &Path, secs: i64) {
    let c = CString::new(path.as_os_str().as_bytes()).unwrap();
    let t = libc::timespec {
        tv_sec: secs,
        tv_nsec: 0,
    };
    let times = [t, t];
    // SAFETY: `c` is a NUL-terminated path and `times` two timespecs, both
    // alive for the call, which only reads them.
    let r = unsafe {
        libc::utimensat(
            libc::AT_FDCWD,
            c.as_ptr(),
            times.as_ptr(),
            libc::AT_SYMLINK_NOFOLLOW,
        )
    };
    assert_eq!(r, 0, "utimensat {}", path.display());
}

fn chown(path: &Path, uid: u32, gid: u32) {
    std::os::unix::fs::lchown(path, Some(uid), Some(gid)).unwrap();
}

fn chmod(path: &Path, mode: u32) {
    fs::set_permissions(path, fs::Permissions::from_mode(mode)).unwrap();
}

fn mknod(path: &Path, kind: libc::mode_t, mode: u32, major: u32, minor: u32) {
    let c = CString::new(path.as_os_str().as_bytes()).unwrap();
    // SAFETY: `c` is a NUL-terminated path alive for the call, which only reads it.
    let r = unsafe { libc::mknod(c.as_ptr(), kind | mode, libc::makedev(major, minor)) };
    assert_eq!(r, 0, "mknod {}", path.display());
}

/// A tree with every kind of entry and attribute the rootfs must keep.
fn make_tree(root: &Path) {
    let as_root = is_root();
    fs::create_dir_all(root.join("usr/bin")).unwrap();
    fs::create_dir_all(root.join("etc")).unwrap();
    fs::create_dir_all(root.join("tmp")).unwrap();
    fs::create_dir_all(root.join("srv/shared")).unwrap();
    fs::create_dir_all(root.join("dev")).unwrap();
    fs::write(root.join("etc/hostname"), "tree\n").unwrap();
    fs::write(root.join("usr/bin/ping"), vec![0x7f; 70_000]).unwrap();
    fs::write(root.join("usr/bin/su"), "su\n").unwrap();
    fs::hard_link(root.join("usr/bin/su"), root.join("usr/bin/su-again")).unwrap();
    fs::write(root.join("empty"), "").unwrap();
    let long_dir = root.join("d".repeat(120));
    fs::create_dir(&long_dir).unwrap();
    fs::write(long_dir.join("f".repeat(150)), "long name\n").unwrap();
    symlink("usr/bin", root.join("bin")).unwrap();
    symlink("/etc/hostname", root.join("etc/link-abs")).unwrap();
    symlink(
        format!("{}/target", "t".repeat(120)),
        root.join("long-link"),
    )
    .unwrap();
    chmod(&root.join("usr/bin/su"), 0o4755);
    chmod(&root.join("tmp"), 0o1777);
    chmod(&root.join("srv/shared"), 0o2775);
    xattr::set(root.join("etc/hostname"), "user.comment", b"hello").unwrap();
    xattr::set(root.join("usr/bin/ping"), "user.bin", b"a\nb\0c=d").unwrap();
    if as_root {
        chown(&root.join("srv/shared"), 1234, 5678);
        chown(&root.join("etc/hostname"), 1000, 1000);
        chown(&root.join("bin"), 7, 8);
        // cap_net_raw+ep, VFS_CAP_REVISION_2.
        let cap: [u8; 20] = [
            0, 0, 0, 2, 0, 0x20, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
        ];
        xattr::set(root.join("usr/bin/ping"), "security.capability", &cap).unwrap();
        mknod(&root.join("dev/null"), libc::S_IFCHR, 0o666, 1, 3);
        mknod(&root.join("dev/sda"), libc::S_IFBLK, 0o660, 8, 0);
        mknod(&root.join("dev/fifo"), libc::S_IFIFO, 0o600, 0, 0);
    } else {
        println!("not root: owners, devices and security.capability are not covered");
        mknod(&root.join("dev/fifo"), libc::S_IFIFO, 0o600, 0, 0);
    }
    // Mtimes last (creating entries changes their directories' mtimes).
    let mut t = 1_500_000_000;
    let mut paths = vec![root.to_path_buf()];
    let mut i = 0;
    while i < paths.len() {
        let p = paths[i].clone();
        if fs::symlink_metadata(&p).unwrap().is_dir() {
            let mut names: Vec<_> = fs::read_dir(&p)
                .unwrap()
                .map(|e| e.unwrap().path())
                .collect();
            names.sort();
            paths.extend(names);
        }
        i += 1;
    }
    for p in paths.iter().rev() {
        t += 1000;
        set_mtime(p, t);
    }
}

#[test]
fn dir_round_trips_through_gnu_tar() {
    let t = tempdir();
    let src = t.path().join("src");
    fs::create_dir(&src).unwrap();
    make_tree(&src);
    let out = t.path().join("rootfs.tar");
    let report = build_src(format!("dir:{}", src.display()), &out).unwrap();
    assert_eq!(report.sha256, file_sha256(&out));

    let back = t.path().join("back");
    gnu_extract(&out, &back);
    let before = listing_from_dir(&src);
    let after = listing_from_dir(&back);
    assert_same(&before, &after, "source tree vs extracted tarball");
    assert_eq!(report.entries, before.len() as u64);
    // The same from the tar listing (not through an extractor).
    let from_tar = listing_from_tar(&out);
    assert_same(
        &without_mtimes(&before),
        &without_mtimes(&from_tar),
        "source tree vs tar listing",
    );
    if is_root() {
        assert_eq!(after["dev/sda"].link, "8:0");
        assert_eq!(
            after["usr/bin/ping"].xattrs["security.capability"].len(),
            20
        );
        assert_eq!(after["srv/shared"].uid, 1234);
    }
    assert_eq!(after["usr/bin/su"].mode, 0o4755);
    assert_eq!(after["tmp"].mode, 0o1777);
    assert_eq!(
        after["usr/bin/su-again"].group.as_deref(),
        Some("usr/bin/su")
    );
    assert_eq!(after["usr/bin/ping"].xattrs["user.bin"], b"a\nb\0c=d");

    // Packing twice gives the same bytes.
    let again = build_src(
        format!("dir:{}", src.display()),
        &t.path().join("again.tar"),
    )
    .unwrap();
    assert_eq!(again.sha256, report.sha256);
}

#[test]
fn output_inside_the_packed_tree_is_left_out() {
    let t = tempdir();
    fs::write(t.path().join("a"), "a").unwrap();
    let out = t.path().join("self.tar");
    build_src(format!("dir:{}", t.path().display()), &out).unwrap();
    let l = listing_from_tar(&out);
    assert_eq!(l.keys().cloned().collect::<Vec<_>>(), [".", "a"], "{l:?}");
}

#[test]
fn tar_sources_are_repacked_canonically() {
    let t = tempdir();
    let src = t.path().join("src");
    fs::create_dir(&src).unwrap();
    make_tree(&src);
    let canonical = t.path().join("canonical.tar");
    let want = build_src(format!("dir:{}", src.display()), &canonical).unwrap();

    // Our own output, plain and compressed by the system tools or crates:
    // re-packing gives the same bytes.
    let plain = fs::read(&canonical).unwrap();
    let inputs = [
        ("plain.tar", plain.clone()),
        ("in.tar.gz", compress(&plain, LayerCompression::Gzip)),
        ("in.tar.zst", compress(&plain, LayerCompression::Zstd)),
        ("in.tar.xz", {
            let mut e = liblzma::write::XzEncoder::new(Vec::new(), 1);
            std::io::Write::write_all(&mut e, &plain).unwrap();
            e.finish().unwrap()
        }),
    ];
    for (name, data) in inputs {
        let input = t.path().join(name);
        fs::write(&input, data).unwrap();
        let r = build_src(
            format!("tar:{}", input.display()),
            &t.path().join(format!("re-{name}.tar")),
        )
        .unwrap();
        assert_eq!(r.sha256, want.sha256, "re-packing {name}");
    }

    // A GNU tar archive (its own order, names without ./, user names):
    // the same tree comes out, sorted, with numeric owners only.
    let gnu = t.path().join("gnu.tar");
    let st = Command::new("tar")
        .args(["--xattrs", "--xattrs-include=*", "-cf"])
        .arg(&gnu)
        .arg("-C")
        .arg(&src)
        .arg(".")
        .status()
        .unwrap();
    assert!(st.success());
    let out = t.path().join("from-gnu.tar");
    build_src(format!("tar:{}", gnu.display()), &out).unwrap();
    assert_same(
        &listing_from_tar(&out),
        &listing_from_tar(&canonical),
        "GNU tar input vs dir: output",
    );
    let data = fs::read(&out).unwrap();
    for e in tar::Archive::new(&data[..]).entries().unwrap() {
        let e = e.unwrap();
        assert!(
            e.header().username_bytes().unwrap_or_default().is_empty(),
            "user names are dropped"
        );
    }
}

#[test]
fn tar_input_with_duplicates_keeps_the_last_and_adds_parents() {
    let t = tempdir();
    let input = t.path().join("dups.tar");
    let data = Layer::new()
        .file("a/b/c", "first")
        .file("a/b/c", "second")
        .file(
            ".wh.kept",
            "whiteout names are plain files in a rootfs tarball",
        )
        .finish();
    fs::write(&input, data).unwrap();
    let out = t.path().join("out.tar");
    build_src(format!("tar:{}", input.display()), &out).unwrap();
    let l = listing_from_tar(&out);
    assert_eq!(
        l.keys().cloned().collect::<Vec<_>>(),
        [".", ".wh.kept", "a", "a/b", "a/b/c"]
    );
    assert_eq!(l["a/b/c"].sha256, sha256_hex(b"second"));
    assert_eq!(l["a"].mode, 0o755);
}
