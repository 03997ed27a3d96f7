//! Bad input: clear errors, and no output or temporary file left behind (an
//! existing output file is left as it was).

mod rootfs_common;

use std::fs;
use std::path::Path;

use host::rootfs::{build, Options, Source};
use rootfs_common::*;
use serde_json::json;

/// Runs a build that must fail; returns the error text after checking that
/// `dir` holds exactly `keep` afterwards and `out`, if it existed, is
/// untouched.
fn must_fail(spec: &str, out: &Path, keep: &[&str]) -> String {
    let before = fs::read(out).ok();
    let err = match spec.parse::<Source>() {
        Err(e) => format!("{e:#}"),
        Ok(src) => match build(&src, out, &Options::default()) {
            Ok(r) => panic!("{spec} did not fail: {r:?}"),
            Err(e) => format!("{e:#}"),
        },
    };
    let dir = out.parent().unwrap();
    assert_eq!(dir_names(dir), keep, "after {spec}: {err}");
    assert_eq!(
        fs::read(out).ok(),
        before,
        "after {spec}: the output changed"
    );
    err
}

#[test]
fn missing_paths_and_unknown_schemes() {
    let t = tempdir();
    let out = t.path().join("out.tar.gz");
    for scheme in ["dir", "tar", "oci", "docker-archive"] {
        let e = must_fail(&format!("{scheme}:/nonexistent/imgforge"), &out, &[]);
        assert!(
            e.contains("'/nonexistent/imgforge' does not exist"),
            "{scheme}: {e}"
        );
    }
    let e = must_fail("ftp://example/rootfs.tar", &out, &[]);
    assert!(e.contains("unknown rootfs source scheme 'ftp'"), "{e}");
    for scheme in [
        "dir:PATH",
        "tar:PATH",
        "oci:PATH",
        "docker-archive:PATH",
        "docker:IMAGE",
        "podman:IMAGE",
        "debian:SUITE",
    ] {
        assert!(e.contains(scheme), "{e} does not list {scheme}");
    }
    let e = must_fail("rootfs.tar", &out, &[]);
    assert!(e.contains("no SCHEME: prefix"), "{e}");
    // Bad output names or places.
    fs::write(t.path().join("in"), "x").unwrap();
    let e = must_fail(
        &format!("dir:{}", t.path().display()),
        &t.path().join("out.zip"),
        &["in"],
    );
    assert!(e.contains(".tar.zst"), "{e}");
    let e = format!(
        "{:#}",
        build(
            &format!("dir:{}", t.path().display()).parse().unwrap(),
            &t.path().join("no/such/dir/out.tar"),
            &Options::default()
        )
        .unwrap_err()
    );
    assert!(e.contains("does not exist"), "{e}");
}

#[test]
fn not_an_oci_layout() {
    let t = tempdir();
    let empty = t.path().join("empty");
    fs::create_dir(&empty).unwrap();
    let out = t.path().join("out.tar");
    let e = must_fail(&format!("oci:{}", empty.display()), &out, &["empty"]);
    assert!(
        e.contains("not an OCI image layout") && e.contains("oci-layout"),
        "{e}"
    );
    let file = t.path().join("image.tar");
    fs::write(&file, "not a layout").unwrap();
    let e = must_fail(
        &format!("oci:{}", file.display()),
        &out,
        &["empty", "image.tar"],
    );
    assert!(
        e.contains("not an OCI image layout") && e.contains("docker-archive:"),
        "{e}"
    );
    // A docker archive given to oci:, and the reverse.
    let da = t.path().join("saved.tar");
    write_docker_archive(&da, &fixture_layers());
    let e = must_fail(
        &format!("oci:{}", da.display()),
        &out,
        &["empty", "image.tar", "saved.tar"],
    );
    assert!(e.contains("docker-archive:"), "{e}");
    let layout = t.path().join("layout");
    write_oci(&layout, &fixture_layers(), LayerCompression::Gzip);
    let e = must_fail(
        &format!("docker-archive:{}", layout.display()),
        &out,
        &["empty", "image.tar", "layout", "saved.tar"],
    );
    assert!(
        e.contains("no manifest.json") && e.contains("use oci:PATH"),
        "{e}"
    );
}

/// The blobs of a fresh fixture layout: (manifest path, config path, layer paths).
fn layout_blobs(
    layout: &Path,
) -> (
    std::path::PathBuf,
    std::path::PathBuf,
    Vec<std::path::PathBuf>,
) {
    let index: serde_json::Value =
        serde_json::from_slice(&fs::read(layout.join("index.json")).unwrap()).unwrap();
    let blob = |d: &serde_json::Value| {
        layout
            .join("blobs/sha256")
            .join(d["digest"].as_str().unwrap().trim_start_matches("sha256:"))
    };
    let mpath = blob(&index["manifests"][0]);
    let m: serde_json::Value = serde_json::from_slice(&fs::read(&mpath).unwrap()).unwrap();
    let layers = m["layers"].as_array().unwrap().iter().map(blob).collect();
    (mpath.clone(), blob(&m["config"]), layers)
}

#[test]
fn digest_and_size_mismatches_are_refused() {
    let t = tempdir();
    let out = t.path().join("rootfs.tar.zst");
    fs::write(&out, "previous build").unwrap();
    let keep = ["layout", "rootfs.tar.zst"];
    let fresh = || {
        let layout = t.path().join("layout");
        let _ = fs::remove_dir_all(&layout);
        write_oci(&layout, &fixture_layers(), LayerCompression::Gzip);
        layout
    };
    let spec = |l: &Path| format!("oci:{}", l.display());

    // A layer's bytes changed, same size: its sha256 is wrong.
    let layout = fresh();
    let (_, _, layers) = layout_blobs(&layout);
    let mut data = fs::read(&layers[1]).unwrap();
    let n = data.len();
    data[n - 5] ^= 0xff; // inside the gzip trailer: the layer still reads
    fs::write(&layers[1], &data).unwrap();
    let e = must_fail(&spec(&layout), &out, &keep);
    assert!(
        e.contains("layer 2/3") && e.contains("digest mismatch"),
        "{e}"
    );

    // A layer that grew: its size is wrong.
    let layout = fresh();
    let (_, _, layers) = layout_blobs(&layout);
    let mut data = fs::read(&layers[2]).unwrap();
    data.extend_from_slice(&[0; 512]);
    fs::write(&layers[2], &data).unwrap();
    let e = must_fail(&spec(&layout), &out, &keep);
    assert!(
        e.contains("layer 3/3") && e.contains("size mismatch"),
        "{e}"
    );

    // A missing layer blob.
    let layout = fresh();
    let (_, _, layers) = layout_blobs(&layout);
    fs::remove_file(&layers[0]).unwrap();
    let e = must_fail(&spec(&layout), &out, &keep);
    assert!(
        e.contains("layer 1/3") && e.contains("missing from the layout"),
        "{e}"
    );

    // A manifest that was edited.
    let layout = fresh();
    let (manifest, _, _) = layout_blobs(&layout);
    let text = fs::read_to_string(&manifest)
        .unwrap()
        .replace("schemaVersion\":2", "schemaVersion\":3");
    fs::write(&manifest, text).unwrap();
    let e = must_fail(&spec(&layout), &out, &keep);
    assert!(
        e.contains("manifest") && e.contains("digest mismatch"),
        "{e}"
    );

    // A config whose diff_id does not match the layer (blob digests right).
    let layout = t.path().join("layout");
    let _ = fs::remove_dir_all(&layout);
    let layers = fixture_layers();
    let mut diff_ids: Vec<String> = layers
        .iter()
        .map(|l| format!("sha256:{}", sha256_hex(l)))
        .collect();
    diff_ids[2] = format!("sha256:{}", sha256_hex(b"something else"));
    let config = put_blob(
        &layout,
        "application/vnd.oci.image.config.v1+json",
        &serde_json::to_vec(&json!({"architecture": "amd64", "os": "linux", "rootfs": {"type": "layers", "diff_ids": diff_ids}})).unwrap(),
    );
    let descs: Vec<serde_json::Value> = layers
        .iter()
        .map(|l| {
            put_blob(
                &layout,
                "application/vnd.oci.image.layer.v1.tar+gzip",
                &compress(l, LayerCompression::Gzip),
            )
        })
        .collect();
    let manifest = put_blob(
        &layout,
        "application/vnd.oci.image.manifest.v1+json",
        &serde_json::to_vec(&json!({"schemaVersion": 2, "config": config, "layers": descs}))
            .unwrap(),
    );
    write_index(&layout, vec![manifest]);
    let e = must_fail(&spec(&layout), &out, &keep);
    assert!(e.contains("layer 3/3") && e.contains("diff_id"), "{e}");
    assert_eq!(fs::read(&out).unwrap(), b"previous build");
}

#[test]
fn bad_docker_archives_and_tarballs() {
    let t = tempdir();
    let out = t.path().join("out.tar");
    // A docker archive whose layer does not match its diff_id.
    let mut layers = fixture_layers();
    let archive = t.path().join("saved.tar");
    write_docker_archive(&archive, &layers);
    let good = fs::read(&archive).unwrap();
    // Same length, one byte of a file's content changed.
    let pos = good.windows(8).position(|w| w == b"tool v1\n").unwrap();
    let mut bad = good.clone();
    bad[pos + 5] = b'9';
    fs::write(&archive, &bad).unwrap();
    let e = must_fail(
        &format!("docker-archive:{}", archive.display()),
        &out,
        &["saved.tar"],
    );
    assert!(e.contains("layer 1/3") && e.contains("diff_id"), "{e}");
    // A layer that is not a tar at all.
    layers[1] = b"this is not a tar archive, but it is long enough to hold a header...".repeat(10);
    write_docker_archive(&archive, &layers);
    let e = must_fail(
        &format!("docker-archive:{}", archive.display()),
        &out,
        &["saved.tar"],
    );
    assert!(
        e.contains("layer 2/3") && e.contains("not a tar archive"),
        "{e}"
    );

    // tar: sources that are not tarballs, or are cut short.
    let junk = t.path().join("junk.tar");
    fs::write(&junk, vec![b'j'; 4096]).unwrap();
    let e = must_fail(
        &format!("tar:{}", junk.display()),
        &out,
        &["junk.tar", "saved.tar"],
    );
    assert!(e.contains("not a tar archive"), "{e}");
    let cut = t.path().join("cut.tar.gz");
    let full = compress(&fixture_layers()[0], LayerCompression::Gzip);
    fs::write(&cut, &full[..full.len() / 2]).unwrap();
    let e = must_fail(
        &format!("tar:{}", cut.display()),
        &out,
        &["cut.tar.gz", "junk.tar", "saved.tar"],
    );
    assert!(
        e.contains("cannot be read") || e.contains("truncated"),
        "{e}"
    );
    let bz = t.path().join("x.tar.bz2");
    fs::write(&bz, b"BZh91AY&SY").unwrap();
    let e = must_fail(
        &format!("tar:{}", bz.display()),
        &out,
        &["cut.tar.gz", "junk.tar", "saved.tar", "x.tar.bz2"],
    );
    assert!(e.contains("bzip2"), "{e}");
    let e = must_fail(
        &format!("tar:{}", t.path().display()),
        &out,
        &["cut.tar.gz", "junk.tar", "saved.tar", "x.tar.bz2"],
    );
    assert!(e.contains("is a directory (use dir:"), "{e}");
}
