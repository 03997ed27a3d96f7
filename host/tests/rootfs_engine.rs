//! `docker:` and `podman:` sources: the error when an engine is missing or
//! not working, and (where podman works) `create` + `export` of an image
//! that podman loaded from the fixture layout, checked against `oci:`.

mod rootfs_common;

use std::fs;
use std::path::Path;
use std::process::Command;
use std::time::Instant;

use host::rootfs::{build, export_image, Engine, EngineKind, Options, Source};
use rootfs_common::*;

#[test]
fn a_missing_engine_is_named_with_a_way_around_it() {
    let t = tempdir();
    let out = t.path().join("out.tar");
    for (kind, name, install) in [
        (EngineKind::Docker, "docker", "apt-get install docker.io"),
        (EngineKind::Podman, "podman", "apt-get install podman"),
    ] {
        let engine = Engine::with_program(kind, "/nonexistent/imgforge-test/engine");
        let e = format!(
            "{:#}",
            export_image(&engine, "alpine:3", &out, &Options::default()).unwrap_err()
        );
        assert!(
            e.contains(&format!("{name} is not installed: {install}")),
            "{e}"
        );
        assert!(
            e.contains(&format!("`{name} save")) && e.contains("docker-archive:FILE"),
            "{e}"
        );
        assert!(dir_names(t.path()).is_empty(), "{:?}", dir_names(t.path()));
    }
}

#[test]
fn docker_without_a_daemon_says_so() {
    let t = tempdir();
    let out = t.path().join("out.tar");
    let engine = Engine::new(EngineKind::Docker);
    if let Err(e) = engine.check() {
        let msg = format!("{e:#}");
        assert!(
            msg.contains("docker is not installed")
                || msg.contains("docker is installed but not working"),
            "{msg}"
        );
        let src: Source = "docker:alpine:3".parse().unwrap();
        let e = format!("{:#}", build(&src, &out, &Options::default()).unwrap_err());
        assert!(
            e.contains("docker") && e.contains("docker-archive:FILE"),
            "{e}"
        );
        assert!(dir_names(t.path()).is_empty());
        println!("docker here: {msg}");
    } else {
        println!("SKIPPED: docker works on this machine; its error path cannot be shown");
    }
}

/// Removes a podman image (by id: all its names) when dropped.
struct PodmanImage(String);

impl Drop for PodmanImage {
    fn drop(&mut self) {
        let _ = Command::new("podman").args(["rmi", "-f", &self.0]).output();
    }
}

fn podman(args: &[&str]) -> Result<String, String> {
    let o = Command::new("podman")
        .args(args)
        .output()
        .map_err(|e| e.to_string())?;
    if o.status.success() {
        Ok(String::from_utf8_lossy(&o.stdout).trim().to_string())
    } else {
        Err(format!(
            "podman {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&o.stderr).trim()
        ))
    }
}

/// What podman changes by design, left out of the comparisons:
/// - directories' mtimes (it re-creates layer tars from its storage);
/// - `opt`: layer 2 holds `opt/.wh.app` but no `opt/` entry, and podman
///   makes the layer's own `opt` directory 0755 root:root, which then hides
///   the lower one's mode and owner (0750 1000:1000) in the merged view;
///   umoci and imgforge keep the lower directory as it was.
fn podman_view(l: &Listing) -> Listing {
    let mut l = without_mtimes(l);
    let opt = l.get_mut("opt").expect("opt");
    assert_eq!(opt.kind, "dir");
    opt.mode = 0;
    opt.uid = 0;
    opt.gid = 0;
    l
}

#[test]
fn podman_create_and_export_matches_the_oci_source() {
    if let Err(e) = Engine::new(EngineKind::Podman).check() {
        skip_for_missing_tool(&format!("podman does not work here: {e:#}"));
        return;
    }
    if !is_root() {
        println!("SKIPPED: the image's owners and device nodes need rootful podman");
        return;
    }
    // Podman names an image pulled from oci:PATH after PATH: keep it
    // lowercase.
    let stamp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    let t = tempfile::Builder::new()
        .prefix(&format!("imgforge-podman-{}-{stamp}", std::process::id()))
        .rand_bytes(0)
        .tempdir()
        .unwrap();
    let layout = t.path().join("layout");
    // Podman's storage (containers/storage, overlay) refuses two legitimate
    // constructs of the full fixture: a whiteout of a path its own layer
    // adds ("file exists") and a hard link to a lower layer's file ("no
    // such file or directory"). It also applies each layer to its own
    // directory, so a path through a lower layer's symlink (lib/libbar.so,
    // lib -> usr/lib) makes a directory `lib` that hides the symlink, where
    // umoci and imgforge follow the symlink. Those three are left out here.
    let fixture = Fixture {
        same_layer_whiteout: false,
        cross_layer_hardlink: false,
        through_symlink: false,
    };
    write_oci(
        &layout,
        &fixture_layers_with(fixture),
        LayerCompression::Gzip,
    );
    let ours = t.path().join("oci.tar");
    build(
        &format!("oci:{}", layout.display()).parse().unwrap(),
        &ours,
        &Options::default(),
    )
    .unwrap();
    let want = listing_from_tar(&ours);

    let name = format!(
        "localhost/imgforge-rootfs-test-{}-{stamp}:latest",
        std::process::id()
    );
    let id = match podman(&["pull", "-q", &format!("oci:{}:latest", layout.display())]) {
        Ok(id) => id,
        Err(e) => {
            println!("SKIPPED: podman cannot load an OCI layout here: {e}");
            return;
        }
    };
    let _cleanup = PodmanImage(id.clone());
    podman(&["tag", &id, &name]).unwrap();

    let start = Instant::now();
    let out = t.path().join("podman.tar.zst");
    let r = build(
        &format!("podman:{name}").parse().unwrap(),
        &out,
        &Options::default(),
    )
    .unwrap();
    println!("podman:{name}: exported in {:?}", start.elapsed());
    assert_eq!(r.sha256, file_sha256(&out));
    let got = listing_from_tar(&out);
    assert_same(
        &podman_view(&got),
        &podman_view(&want),
        "podman export vs oci:",
    );
    // No container left behind.
    let containers = podman(&[
        "ps",
        "-a",
        "--filter",
        &format!("ancestor={name}"),
        "--format",
        "{{.ID}}",
    ])
    .unwrap();
    assert!(containers.is_empty(), "containers left: {containers}");

    // podman save (docker-archive), as podman writes it.
    let saved = t.path().join("saved.tar");
    podman(&[
        "save",
        "-q",
        "--format",
        "docker-archive",
        "-o",
        saved.to_str().unwrap(),
        &name,
    ])
    .unwrap();
    let out = t.path().join("saved-rootfs.tar");
    build(
        &format!("docker-archive:{}", saved.display())
            .parse()
            .unwrap(),
        &out,
        &Options::default(),
    )
    .unwrap();
    assert_same(
        &podman_view(&listing_from_tar(&out)),
        &podman_view(&want),
        "podman save docker-archive vs oci:",
    );

    // And an OCI layout as podman writes it.
    let dir = t.path().join("podman-oci");
    podman(&[
        "save",
        "-q",
        "--format",
        "oci-dir",
        "-o",
        dir.to_str().unwrap(),
        &name,
    ])
    .unwrap();
    let out = t.path().join("podman-oci.tar");
    build(
        &format!("oci:{}", dir.display()).parse().unwrap(),
        &out,
        &Options::default(),
    )
    .unwrap();
    assert_same(
        &podman_view(&listing_from_tar(&out)),
        &podman_view(&want),
        "podman oci-dir vs oci:",
    );
    assert!(fs::metadata(Path::new(&out)).unwrap().len() > 0);
}
