//! The artifact server answers only `/<token>/<name>` of files it was given.

mod serve_common;

use host::serve::ArtifactServer;
use serve_common::{pattern, raw, sha256_hex, url_path, write_file};

const LOOPBACK: &str = "127.0.0.1:0";

/// A server with one file `rootfs.tar` served, and a sibling file in the same
/// directory that is not.
async fn setup() -> (tempfile::TempDir, ArtifactServer, String, Vec<u8>) {
    let dir = tempfile::tempdir().unwrap();
    let data = pattern(4096, 7);
    let path = write_file(dir.path(), "rootfs.tar", &data);
    write_file(dir.path(), "secret.txt", b"root:x:0:0:secret\n");
    let server = ArtifactServer::start(LOOPBACK.parse().unwrap(), None)
        .await
        .unwrap();
    let served = server.add_file(&path).await.unwrap();
    assert_eq!(served.sha256, sha256_hex(&data));
    (dir, server, url_path(&served.url), data)
}

#[tokio::test]
async fn the_right_url_serves_the_file_over_raw_tcp() {
    let (_dir, server, path, data) = setup().await;
    let r = raw(server.addr(), "GET", &path, "").await;
    assert_eq!(r.status, 200);
    assert_eq!(r.body, data);
}

#[tokio::test]
async fn urls_are_unguessable() {
    let (dir, server, path, _) = setup().await;
    let token = path.split('/').nth(1).unwrap();
    assert_eq!(token.len(), 32, "128 bits as hex: {path}");
    assert!(token.bytes().all(|b| b.is_ascii_hexdigit()));
    // The same file added again gets another token.
    let again = server
        .add_file(dir.path().join("rootfs.tar"))
        .await
        .unwrap();
    assert_ne!(url_path(&again.url), path);
}

#[tokio::test]
async fn everything_but_the_exact_path_is_404() {
    let (_dir, server, path, data) = setup().await;
    let token = path.split('/').nth(1).unwrap().to_string();
    let mut wrong_token = token.clone().into_bytes();
    wrong_token[5] = if wrong_token[5] == b'0' { b'1' } else { b'0' };
    let wrong_token = String::from_utf8(wrong_token).unwrap();
    let targets = [
        "/".to_string(),
        format!("/{token}"),
        format!("/{token}/"),
        format!("/{wrong_token}/rootfs.tar"),
        format!("/{}/rootfs.tar", &token[..31]),
        format!("/{token}0/rootfs.tar"),
        format!("/{}/rootfs.tar", token.to_uppercase()),
        format!("/{token}/secret.txt"),
        format!("/{token}/ROOTFS.TAR"),
        format!("/{token}/rootfs.tar/"),
        format!("/{token}/rootfs.tar/x"),
        format!("/{token}/rootfs.tar%00"),
        format!("/{token}/rootfs.tar%2f"),
        format!("/{token}%2frootfs.tar"),
        format!("//{token}/rootfs.tar"),
        format!("/{token}//rootfs.tar"),
        format!("/./{token}/rootfs.tar"),
        format!("/{token}/./rootfs.tar"),
        format!("/{token}/x/../rootfs.tar"),
        format!("/x/../{token}/rootfs.tar"),
        format!("/{token}/../etc/passwd"),
        format!("/{token}/..%2fsecret.txt"),
        format!("/{token}/%2e%2e%2fsecret.txt"),
        format!("/{token}/%2e%2e/secret.txt"),
        format!("/{token}/%2E%2E%2F%2E%2E%2Fetc%2Fpasswd"),
        format!("/{token}/%252e%252e%252fsecret.txt"),
        format!("/{token}/rootfs.tar%zz"),
        "/../etc/passwd".to_string(),
        "/../../../../etc/passwd".to_string(),
        "/%2e%2e/etc/passwd".to_string(),
        "/%2e%2e%2f%2e%2e%2fetc%2fpasswd".to_string(),
        "/etc/passwd".to_string(),
        "/secret.txt".to_string(),
        "/rootfs.tar".to_string(),
        "//etc/passwd".to_string(),
        "/.%2e/.%2e/etc/passwd".to_string(),
        "*".to_string(),
    ];
    for target in &targets {
        let r = raw(server.addr(), "GET", target, "").await;
        assert_eq!(r.status, 404, "GET {target}");
        assert!(
            r.body.len() < 64,
            "GET {target}: {} body bytes",
            r.body.len()
        );
        assert!(
            !String::from_utf8_lossy(&r.body).contains("root:"),
            "GET {target}"
        );
        assert_ne!(r.body, data);
        let r = raw(server.addr(), "HEAD", target, "").await;
        assert_eq!(r.status, 404, "HEAD {target}");
    }
    let stats = server.stats();
    assert_eq!(stats.rejected, 2 * targets.len() as u64);
    assert_eq!(stats.requests, 0);
    assert_eq!(stats.bytes_served, 0);
}

#[tokio::test]
async fn no_listing_with_reqwest_either() {
    let (_dir, server, path, _) = setup().await;
    let token = path.split('/').nth(1).unwrap();
    let base = format!("http://{}", server.addr());
    for p in ["/".to_string(), format!("/{token}/"), format!("/{token}")] {
        let resp = reqwest::get(format!("{base}{p}")).await.unwrap();
        assert_eq!(resp.status(), 404, "{p}");
        let body = resp.text().await.unwrap();
        assert!(!body.contains("rootfs"), "{p}: {body}");
    }
}

#[tokio::test]
async fn other_methods_are_refused() {
    let (_dir, server, path, _) = setup().await;
    for method in ["POST", "PUT", "DELETE", "OPTIONS", "PATCH"] {
        let r = raw(server.addr(), method, &path, "Content-Length: 0\r\n").await;
        assert_eq!(r.status, 405, "{method}");
        assert_eq!(r.header("allow"), Some("GET, HEAD"));
        let r = raw(
            server.addr(),
            method,
            "/nothing/here",
            "Content-Length: 0\r\n",
        )
        .await;
        assert_eq!(r.status, 404, "{method} elsewhere");
    }
}

#[tokio::test]
async fn names_that_need_encoding() {
    let dir = tempfile::tempdir().unwrap();
    let path = write_file(dir.path(), "root fs+v1 (é).tar", b"hello");
    let server = ArtifactServer::start(LOOPBACK.parse().unwrap(), None)
        .await
        .unwrap();
    let served = server.add_file(&path).await.unwrap();
    assert!(
        served.url.ends_with("/root%20fs%2Bv1%20%28%C3%A9%29.tar"),
        "{}",
        served.url
    );
    let body = reqwest::get(&served.url)
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    assert_eq!(&body[..], b"hello");
    // The name decodes to the same bytes whatever the client escapes.
    let token = url_path(&served.url).split('/').nth(1).unwrap().to_string();
    let r = raw(
        server.addr(),
        "GET",
        &format!("/{token}/%72oot%20fs+v1%20(%c3%a9).tar"),
        "",
    )
    .await;
    assert_eq!(r.status, 200);
    assert_eq!(r.body, b"hello");
    // The raw UTF-8 bytes of the name are not a valid request target for
    // hyper; a half-escaped name is another name.
    let r = raw(
        server.addr(),
        "GET",
        &format!("/{token}/root%20fs%2Bv1%20%28%C3%29.tar"),
        "",
    )
    .await;
    assert_eq!(r.status, 404);
}

#[tokio::test]
async fn directories_and_missing_files_cannot_be_added() {
    let dir = tempfile::tempdir().unwrap();
    let server = ArtifactServer::start(LOOPBACK.parse().unwrap(), None)
        .await
        .unwrap();
    assert!(server.add_file(dir.path()).await.is_err());
    assert!(server.add_file(dir.path().join("nope")).await.is_err());
    assert!(server.add_file("/dev/null").await.is_err());
}
