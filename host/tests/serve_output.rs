//! What `imgforge serve` prints, its arguments, and public URLs.

mod serve_common;

use clap::Parser;
use host::serve::{format_listing, format_summary, ArtifactServer, ServeArgs, ServeStats};
use serve_common::{pattern, sha256_hex, url_path, write_file};

#[derive(Parser)]
struct Cli {
    #[command(flatten)]
    serve: ServeArgs,
}

#[test]
fn arguments() {
    let cli = Cli::try_parse_from(["serve", "a.tar", "b.img"]).unwrap();
    assert_eq!(cli.serve.files.len(), 2);
    assert_eq!(cli.serve.listen, "127.0.0.1:0".parse().unwrap());
    assert!(cli.serve.listen.ip().is_loopback(), "loopback by default");
    assert_eq!(cli.serve.public_url, None);
    let cli = Cli::try_parse_from([
        "serve",
        "--listen",
        "0.0.0.0:8080",
        "--public-url",
        "http://203.0.113.7:8080",
        "a.tar",
    ])
    .unwrap();
    assert_eq!(cli.serve.listen, "0.0.0.0:8080".parse().unwrap());
    assert_eq!(
        cli.serve.public_url.as_deref(),
        Some("http://203.0.113.7:8080")
    );
    assert!(Cli::try_parse_from(["serve"]).is_err(), "at least one file");
    assert!(Cli::try_parse_from(["serve", "--listen", "nope", "a"]).is_err());
}

#[tokio::test]
async fn listing_formats() {
    let dir = tempfile::tempdir().unwrap();
    let a = pattern(1234, 1);
    let pa = write_file(dir.path(), "rootfs.tar", &a);
    let pb = write_file(dir.path(), "disk image.qcow2", b"");
    let server = ArtifactServer::start("127.0.0.1:0".parse().unwrap(), None)
        .await
        .unwrap();
    let files = vec![
        server.add_file(&pa).await.unwrap(),
        server.add_file(&pb).await.unwrap(),
    ];

    let text = format_listing(&files, false);
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 2, "{text}");
    assert!(text.ends_with('\n'));
    let port = server.addr().port();
    let line = regex::Regex::new(&format!(
        r"^http://127\.0\.0\.1:{port}/[0-9a-f]{{32}}/(\S+)  (\d+)  ([0-9a-f]{{64}})$"
    ))
    .unwrap();
    let c = line
        .captures(lines[0])
        .unwrap_or_else(|| panic!("{:?}", lines[0]));
    assert_eq!(
        (&c[1], &c[2], &c[3]),
        ("rootfs.tar", "1234", sha256_hex(&a).as_str())
    );
    let c = line
        .captures(lines[1])
        .unwrap_or_else(|| panic!("{:?}", lines[1]));
    assert_eq!(
        (&c[1], &c[2], &c[3]),
        ("disk%20image.qcow2", "0", sha256_hex(b"").as_str())
    );
    // The printed URL works.
    let url = lines[0].split("  ").next().unwrap();
    assert_eq!(reqwest::get(url).await.unwrap().bytes().await.unwrap(), a);

    let json: serde_json::Value = serde_json::from_str(&format_listing(&files, true)).unwrap();
    let arr = json.as_array().unwrap();
    assert_eq!(arr.len(), 2);
    assert_eq!(arr[0]["url"], files[0].url.as_str());
    assert_eq!(arr[0]["path"], pa.to_str().unwrap());
    assert_eq!(arr[0]["name"], "rootfs.tar");
    assert_eq!(arr[0]["size"], 1234);
    assert_eq!(arr[0]["sha256"], sha256_hex(&a));
    assert_eq!(arr[1]["name"], "disk image.qcow2");
    assert_eq!(arr[1]["size"], 0);

    assert_eq!(format_listing(&[], false), "");
    assert_eq!(format_listing(&[], true).trim(), "[]");
}

#[test]
fn summary_line() {
    let stats = ServeStats {
        bytes_served: 1048576,
        requests: 3,
        rejected: 0,
        in_flight: 0,
    };
    assert_eq!(format_summary(&stats), "served 1048576 bytes to 3 requests");
    let stats = ServeStats {
        rejected: 2,
        ..stats
    };
    assert_eq!(
        format_summary(&stats),
        "served 1048576 bytes to 3 requests (2 rejected)"
    );
}

#[tokio::test]
async fn public_url_changes_the_printed_base_only() {
    let dir = tempfile::tempdir().unwrap();
    let p = write_file(dir.path(), "rootfs.tar", b"data");
    let server = ArtifactServer::start(
        "127.0.0.1:0".parse().unwrap(),
        Some("http://build-host.example:8080/".into()),
    )
    .await
    .unwrap();
    assert_eq!(server.public_base(), "http://build-host.example:8080");
    let f = server.add_file(&p).await.unwrap();
    let re =
        regex::Regex::new(r"^http://build-host\.example:8080/[0-9a-f]{32}/rootfs\.tar$").unwrap();
    assert!(re.is_match(&f.url), "{}", f.url);
    // Served on the real address under the same path.
    let local = format!("http://{}{}", server.addr(), url_path(&f.url));
    assert_eq!(
        reqwest::get(&local).await.unwrap().bytes().await.unwrap(),
        "data"
    );
    // Per-file counters find the file by its public URL.
    assert_eq!(server.file_bytes_served(&f), 4);

    // A path prefix (reverse proxy) is kept.
    let s2 = ArtifactServer::start(
        "127.0.0.1:0".parse().unwrap(),
        Some("https://h/prefix".into()),
    )
    .await
    .unwrap();
    let f2 = s2.add_file(&p).await.unwrap();
    assert!(f2.url.starts_with("https://h/prefix/"), "{}", f2.url);

    for bad in ["build-host:8080", "ftp://h", "http://h/?x", ""] {
        assert!(
            ArtifactServer::start("127.0.0.1:0".parse().unwrap(), Some(bad.into()))
                .await
                .is_err(),
            "{bad:?}"
        );
    }
}

#[tokio::test]
async fn default_base_is_the_bound_address() {
    let server = ArtifactServer::start("127.0.0.1:0".parse().unwrap(), None)
        .await
        .unwrap();
    assert_ne!(server.addr().port(), 0);
    assert_eq!(server.public_base(), format!("http://{}", server.addr()));
    let v6 = ArtifactServer::start("[::1]:0".parse().unwrap(), None).await;
    if let Ok(v6) = v6 {
        assert!(
            v6.public_base().starts_with("http://[::1]:"),
            "{}",
            v6.public_base()
        );
    }
}
