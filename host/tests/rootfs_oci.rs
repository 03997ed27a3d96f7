//! `oci:` and `docker-archive:` sources: layers applied natively, checked
//! against an explicit expected tree, against umoci, and against each other.

mod rootfs_common;

use std::collections::BTreeMap;
use std::fs;
use std::path::Path;
use std::process::Command;
use std::time::Instant;

use host::rootfs::{build, Options, Report, Source};
use rootfs_common::*;
use serde_json::json;

const T1: i64 = 1_600_000_000;
const T2: i64 = 1_600_000_100;
const T3: i64 = 1_600_000_200;

fn oci_build(layout: &Path, out: &Path) -> Report {
    let src: Source = format!("oci:{}", layout.display()).parse().unwrap();
    build(&src, out, &Options::default()).unwrap()
}

#[allow(clippy::too_many_arguments)]
fn item(kind: &str, mode: u32, uid: u64, gid: u64, content: &str, link: &str, mtime: i64) -> Item {
    Item {
        kind: kind.into(),
        mode,
        uid,
        gid,
        size: if kind == "file" {
            content.len() as u64
        } else {
            0
        },
        sha256: if kind == "file" {
            sha256_hex(content.as_bytes())
        } else {
            String::new()
        },
        link: link.into(),
        xattrs: BTreeMap::new(),
        group: None,
        mtime,
    }
}

fn dir(mode: u32, uid: u64, mtime: i64) -> Item {
    item("dir", mode, uid, uid, "", "", mtime)
}

fn file(content: &str, mode: u32, mtime: i64) -> Item {
    item("file", mode, 0, 0, content, "", mtime)
}

/// What the three fixture layers make.
fn expected() -> Listing {
    let mut e = Listing::new();
    let mut put = |p: &str, i: Item| {
        e.insert(p.to_string(), i);
    };
    put(".", dir(0o755, 0, T1));
    put("data", dir(0o755, 0, T1));
    put("data/dir", file("now a file\n", 0o644, T3));
    put("dev", dir(0o755, 0, T1));
    put("dev/fifo", item("fifo", 0o644, 0, 0, "", "", T1));
    put("dev/null", item("char", 0o666, 0, 0, "", "1:3", T1));
    put("etc", dir(0o755, 0, T2));
    let mut cap = file("cap\n", 0o755, T2);
    cap.xattrs
        .insert("user.x".into(), b"bin\x0a\x00ary".to_vec());
    put("etc/cap", cap);
    put("etc/hostname", file("layer3\n", 0o644, T3));
    put(
        "etc/passwd",
        file("root:x:0:0:root:/root:/bin/sh\n", 0o644, T1),
    );
    put("lib", item("symlink", 0o777, 0, 0, "", "usr/lib", T1));
    put("opt", dir(0o750, 1000, T1));
    put("srv", dir(0o700, 33, T3));
    put("srv/www", item("file", 0o640, 33, 33, "www\n", "", T3));
    put("tmp", dir(0o1777, 0, T1));
    put("usr", dir(0o755, 0, T1));
    put("usr/bin", dir(0o755, 0, T1));
    put("usr/bin/suid", file("suid\n", 0o4755, T1));
    let mut tool = file("tool v2\n", 0o755, T2);
    tool.group = Some("usr/bin/tool".into());
    put("usr/bin/tool", tool.clone());
    put("usr/bin/tool-link3", tool);
    put("usr/bin/tool-hard", file("tool v1\n", 0o755, T1));
    put("usr/lib", dir(0o755, 0, T1));
    put("usr/lib/libbar.so", file("bar\n", 0o644, T2));
    put("var", dir(0o755, 0, T1));
    put("var/cache", dir(0o755, 0, T1));
    put("var/cache/b", file("b3\n", 0o644, T3));
    put("var/cache/new", dir(0o755, 0, T3));
    put("var/cache/new/inner", file("inner\n", 0o644, T3));
    e
}

#[test]
fn oci_layout_gives_exactly_the_expected_tree() {
    let t = tempdir();
    let layout = t.path().join("layout");
    write_oci(&layout, &fixture_layers(), LayerCompression::Gzip);
    let out = t.path().join("rootfs.tar");
    let start = Instant::now();
    let report = oci_build(&layout, &out);
    println!("oci: applied in {:?}", start.elapsed());
    let listing = listing_from_tar(&out);
    assert_same(&listing, &expected(), "oci: output vs the expected tree");
    assert_eq!(report.entries, listing.len() as u64);
    assert_eq!(report.sha256, file_sha256(&out));
    assert_eq!(report.size, fs::metadata(&out).unwrap().len());
    // The first entry is the root, then each directory before its contents.
    let data = fs::read(&out).unwrap();
    let mut ar = tar::Archive::new(&data[..]);
    let names: Vec<String> = ar
        .entries()
        .unwrap()
        .map(|e| String::from_utf8_lossy(&e.unwrap().path_bytes()).into_owned())
        .collect();
    assert_eq!(names[0], "./");
    let mut sorted = names.clone();
    sorted.sort_by(|a, b| {
        a.trim_end_matches('/')
            .split('/')
            .cmp(b.trim_end_matches('/').split('/'))
    });
    assert_eq!(names, sorted, "entries are not sorted");
}

#[test]
fn layer_compressions_and_docker_archives_give_identical_bytes() {
    let t = tempdir();
    let layers = fixture_layers();
    let mut digests = Vec::new();
    for (name, c) in [
        ("gzip", LayerCompression::Gzip),
        ("zstd", LayerCompression::Zstd),
        ("plain", LayerCompression::None),
    ] {
        let layout = t.path().join(format!("layout-{name}"));
        write_oci(&layout, &layers, c);
        let r = oci_build(&layout, &t.path().join(format!("{name}.tar")));
        digests.push((format!("oci ({name} layers)"), r.sha256));
    }
    // docker save output: as a tar, gzipped, and extracted.
    let archive = t.path().join("saved.tar");
    write_docker_archive(&archive, &layers);
    let gz = t.path().join("saved.tar.gz");
    fs::write(
        &gz,
        compress(&fs::read(&archive).unwrap(), LayerCompression::Gzip),
    )
    .unwrap();
    let extracted = t.path().join("saved");
    fs::create_dir(&extracted).unwrap();
    assert!(Command::new("tar")
        .arg("-xf")
        .arg(&archive)
        .arg("-C")
        .arg(&extracted)
        .status()
        .unwrap()
        .success());
    for (name, path) in [
        ("tar", &archive),
        ("tar.gz", &gz),
        ("directory", &extracted),
    ] {
        let src: Source = format!("docker-archive:{}", path.display())
            .parse()
            .unwrap();
        let r = build(
            &src,
            &t.path().join(format!("da-{name}.tar")),
            &Options::default(),
        )
        .unwrap();
        digests.push((format!("docker-archive ({name})"), r.sha256));
    }
    // With a tag.
    let src: Source = format!("docker-archive:{}:fixture:latest", archive.display())
        .parse()
        .unwrap();
    let r = build(&src, &t.path().join("da-tag.tar"), &Options::default()).unwrap();
    digests.push(("docker-archive (tagged)".into(), r.sha256));
    let first = digests[0].1.clone();
    for (what, d) in &digests {
        assert_eq!(d, &first, "{what} differs from {}", digests[0].0);
    }
    assert_same(
        &listing_from_tar(&t.path().join("da-tar.tar")),
        &expected(),
        "docker-archive output vs the expected tree",
    );
    // No temporary files left next to the outputs.
    assert!(
        dir_names(t.path()).iter().all(|n| !n.starts_with('.')),
        "{:?}",
        dir_names(t.path())
    );
}

/// Our tree against `umoci unpack` of the same layout, file by file: type,
/// mode, owner, size, content, link target, device numbers, xattrs, hard
/// link groups and mtimes (directories' and symlinks' included). Our tarball
/// is extracted with GNU tar for this. umoci's bundle `rootfs` directory is
/// its own, but it applies the layer's `./` entry to it, so the root is
/// compared too. Nothing had to be left out.
#[test]
fn matches_umoci_unpack() {
    if !have("umoci") {
        skip_for_missing_tool("umoci is not installed (apt-get install umoci)");
        return;
    }
    if !is_root() {
        println!("SKIPPED: umoci unpack keeps owners and makes device nodes only as root");
        return;
    }
    let t = tempdir();
    let layout = t.path().join("layout");
    write_oci(&layout, &fixture_layers(), LayerCompression::Gzip);
    let out = t.path().join("rootfs.tar");
    oci_build(&layout, &out);
    let ours = t.path().join("ours");
    gnu_extract(&out, &ours);

    let bundle = t.path().join("bundle");
    let o = Command::new("umoci")
        .arg("unpack")
        .arg("--image")
        .arg(format!("{}:latest", layout.display()))
        .arg(&bundle)
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "umoci unpack: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    let theirs = listing_from_dir(&bundle.join("rootfs"));
    let ours = listing_from_dir(&ours);
    assert_same(&ours, &theirs, "ours vs umoci");
    println!("{} paths identical to umoci's", ours.len());
    // And both are the expected tree (extracted, hard links as groups).
    let expected: Listing = expected();
    assert_same(
        &without_mtimes(&ours),
        &without_mtimes(&expected),
        "extracted ours vs expected",
    );
}

#[test]
fn nested_indexes_select_the_architecture() {
    let t = tempdir();
    let layout = t.path().join("multi");
    let image = |arch: &str| {
        let l = Layer::new()
            .dir("./", 0o755, 0, 0)
            .file("arch", arch)
            .finish();
        let mut d = put_image(&layout, &[l], LayerCompression::Gzip, arch);
        d["platform"] = json!({"architecture": arch, "os": "linux"});
        d
    };
    let amd64 = image("amd64");
    let mut arm64 = image("arm64");
    arm64["platform"]["variant"] = json!("v8");
    // An attestation-style entry, as buildx writes.
    let mut unknown = image("unknown");
    unknown["platform"] = json!({"architecture": "unknown", "os": "unknown"});
    let inner = json!({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json", "manifests": [unknown, arm64, amd64]});
    let mut inner_desc = put_blob(
        &layout,
        "application/vnd.oci.image.index.v1+json",
        &serde_json::to_vec(&inner).unwrap(),
    );
    inner_desc["annotations"] = json!({"org.opencontainers.image.ref.name": "v1"});
    write_index(&layout, vec![inner_desc]);

    let arch_of = |arch: Option<&str>| -> Result<String, String> {
        let out = t.path().join(format!("{}.tar", arch.unwrap_or("default")));
        let opts = Options {
            arch: arch.map(String::from),
            ..Options::default()
        };
        let src: Source = format!("oci:{}:v1", layout.display()).parse().unwrap();
        build(&src, &out, &opts).map_err(|e| format!("{e:#}"))?;
        Ok(listing_from_tar(&out)["arch"].sha256.clone())
    };
    assert_eq!(arch_of(None).unwrap(), sha256_hex(b"amd64"));
    assert_eq!(arch_of(Some("x86_64")).unwrap(), sha256_hex(b"amd64"));
    assert_eq!(arch_of(Some("aarch64")).unwrap(), sha256_hex(b"arm64"));
    let e = arch_of(Some("riscv64")).unwrap_err();
    assert!(
        e.contains("no image for linux/riscv64")
            && e.contains("linux/arm64/v8")
            && e.contains("linux/amd64"),
        "{e}"
    );
    assert!(!t.path().join("riscv64.tar").exists());
}

#[test]
fn tags_choose_among_several_images() {
    let t = tempdir();
    let layout = t.path().join("tags");
    let mut descs = Vec::new();
    for tag in ["one", "two"] {
        let l = Layer::new().file("tag", tag).finish();
        let mut d = put_image(&layout, &[l], LayerCompression::Gzip, "amd64");
        d["annotations"] = json!({"org.opencontainers.image.ref.name": tag});
        descs.push(d);
    }
    write_index(&layout, descs);
    let run = |spec: String| {
        let src: Source = spec.parse().unwrap();
        let out = t.path().join("out.tar");
        build(&src, &out, &Options::default())
            .map(|_| listing_from_tar(&out)["tag"].sha256.clone())
            .map_err(|e| format!("{e:#}"))
    };
    assert_eq!(
        run(format!("oci:{}:two", layout.display())).unwrap(),
        sha256_hex(b"two")
    );
    let e = run(format!("oci:{}", layout.display())).unwrap_err();
    assert!(e.contains("several images (one, two)"), "{e}");
    let e = run(format!("oci:{}:three", layout.display())).unwrap_err();
    assert!(
        e.contains("no image tagged 'three'") && e.contains("one, two"),
        "{e}"
    );
    // A single-arch image whose config says arm64, asked for amd64.
    let arm = t.path().join("arm");
    let l = Layer::new().file("x", "x").finish();
    let d = put_image(&arm, &[l], LayerCompression::Gzip, "arm64");
    write_index(&arm, vec![d]);
    let e = run(format!("oci:{}", arm.display())).unwrap_err();
    assert!(e.contains("linux/arm64") && e.contains("--arch"), "{e}");
}
