//! Output formats: every compression round-trips to the same tar, and the
//! reported sha256 and size are the file's.

mod rootfs_common;

use std::fs;
use std::path::Path;
use std::process::Command;
use std::time::Instant;

use host::rootfs::{build, Compression, Options, OutputOptions, Source};
use rootfs_common::*;

/// Decompresses with the system tool if it is there, else with the crates.
fn system_decompress(path: &Path, tool: &str) -> (Vec<u8>, &'static str) {
    if have(tool) {
        let o = Command::new(tool).arg("-dc").arg(path).output().unwrap();
        assert!(
            o.status.success(),
            "{tool} -dc {}: {}",
            path.display(),
            String::from_utf8_lossy(&o.stderr)
        );
        (o.stdout, "system tool")
    } else {
        (decompress_file(path), "crate")
    }
}

#[test]
fn every_compression_round_trips_and_reports_its_digest() {
    let t = tempdir();
    let layout = t.path().join("layout");
    write_oci(&layout, &fixture_layers(), LayerCompression::Gzip);
    // Some bulk, so that compressors have work (and zstd several frames).
    let src = t.path().join("src");
    fs::create_dir(&src).unwrap();
    for i in 0..20 {
        let text: String = (0..4000)
            .map(|j| format!("line {i} {j} {}\n", (i * j) % 97))
            .collect();
        fs::write(src.join(format!("f{i:02}")), text).unwrap();
    }
    let source: Source = format!("dir:{}", src.display()).parse().unwrap();
    let plain = t.path().join("rootfs.tar");
    let base = build(&source, &plain, &Options::default()).unwrap();
    assert_eq!(base.compression, Compression::None);
    let plain_bytes = fs::read(&plain).unwrap();
    assert_eq!(base.sha256, sha256_hex(&plain_bytes));
    assert_eq!(base.size, plain_bytes.len() as u64);

    for (name, tool, compression) in [
        ("rootfs.tar.gz", "gzip", Compression::Gzip),
        ("rootfs.tgz", "gzip", Compression::Gzip),
        ("rootfs.tar.zst", "zstd", Compression::Zstd),
        ("rootfs.tar.xz", "xz", Compression::Xz),
    ] {
        let out = t.path().join(name);
        let start = Instant::now();
        let r = build(&source, &out, &Options::default()).unwrap();
        let took = start.elapsed();
        assert_eq!(r.compression, compression, "{name}");
        assert_eq!(r.sha256, file_sha256(&out), "{name}: reported sha256");
        assert_eq!(
            r.size,
            fs::metadata(&out).unwrap().len(),
            "{name}: reported size"
        );
        assert_eq!(r.entries, base.entries, "{name}: entries");
        assert!(
            r.size < base.size / 3,
            "{name} is not compressed: {} bytes",
            r.size
        );
        let (back, how) = system_decompress(&out, tool);
        assert!(
            back == plain_bytes,
            "{name}: decompressed ({how}) differs from the plain tar"
        );
        println!(
            "{name}: {} bytes in {took:?}, checked with the {how}",
            r.size
        );
    }

    // Levels and thread counts change the bytes, not the content.
    let out = t.path().join("fast.tar.zst");
    let opts = Options {
        output: OutputOptions {
            level: Some(1),
            threads: Some(1),
        },
        ..Options::default()
    };
    build(&source, &out, &opts).unwrap();
    assert!(decompress_file(&out) == plain_bytes);
    let bad = Options {
        output: OutputOptions {
            level: Some(30),
            threads: None,
        },
        ..Options::default()
    };
    let e = build(&source, &t.path().join("bad.tar.zst"), &bad).unwrap_err();
    assert!(
        format!("{e:#}").contains("zstd compression levels"),
        "{e:#}"
    );
    assert!(!t.path().join("bad.tar.zst").exists());
}

#[test]
fn the_json_report_has_the_documented_fields() {
    let t = tempdir();
    fs::write(t.path().join("f"), "x").unwrap();
    let src: Source = format!("dir:{}", t.path().display()).parse().unwrap();
    let out = t.path().join("out.tar.zst");
    let r = build(&src, &out, &Options::default()).unwrap();
    let v = serde_json::to_value(&r).unwrap();
    let mut keys: Vec<&String> = v.as_object().unwrap().keys().collect();
    keys.sort();
    assert_eq!(keys, ["compression", "entries", "path", "sha256", "size"]);
    assert_eq!(v["compression"], "zstd");
    assert_eq!(v["entries"], 2);
    assert_eq!(v["sha256"].as_str().unwrap().len(), 64);
}
