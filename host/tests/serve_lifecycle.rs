//! A file that changes is refused; shutdown and drop stop the server.

mod serve_common;

use std::io::Write;
use std::time::Duration;

use host::serve::ArtifactServer;
use serve_common::{pattern, write_file};

async fn server() -> ArtifactServer {
    ArtifactServer::start("127.0.0.1:0".parse().unwrap(), None)
        .await
        .unwrap()
}

#[tokio::test]
async fn a_file_changed_after_add_is_refused_with_409() {
    let dir = tempfile::tempdir().unwrap();
    let appended = write_file(dir.path(), "appended", b"hello");
    let rewritten = write_file(dir.path(), "rewritten", b"hello");
    let replaced = write_file(dir.path(), "replaced", b"hello");
    let removed = write_file(dir.path(), "removed", b"hello");
    let s = server().await;
    let files = [
        s.add_file(&appended).await.unwrap(),
        s.add_file(&rewritten).await.unwrap(),
        s.add_file(&replaced).await.unwrap(),
        s.add_file(&removed).await.unwrap(),
    ];
    for f in &files {
        assert_eq!(reqwest::get(&f.url).await.unwrap().status(), 200);
    }
    std::fs::OpenOptions::new()
        .append(true)
        .open(&appended)
        .unwrap()
        .write_all(b"!")
        .unwrap();
    // Same size, newer mtime.
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(&rewritten)
        .unwrap();
    f.set_modified(std::time::SystemTime::now() + Duration::from_secs(60))
        .unwrap();
    drop(f);
    // Same size and content, another inode.
    let tmp = write_file(dir.path(), "tmp", b"hello");
    let mtime = std::fs::metadata(&replaced).unwrap().modified().unwrap();
    std::fs::File::options()
        .write(true)
        .open(&tmp)
        .unwrap()
        .set_modified(mtime)
        .unwrap();
    std::fs::rename(&tmp, &replaced).unwrap();
    std::fs::remove_file(&removed).unwrap();
    for f in &files {
        let resp = reqwest::get(&f.url).await.unwrap();
        assert_eq!(resp.status(), 409, "{}", f.name);
        let body = resp.text().await.unwrap();
        assert!(!body.contains("hello"), "{}: {body}", f.name);
        let resp = reqwest::Client::new().head(&f.url).send().await.unwrap();
        assert_eq!(resp.status(), 409, "HEAD {}", f.name);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_file_changed_while_streaming_cuts_the_download() {
    const LEN: usize = 64 << 20;
    let dir = tempfile::tempdir().unwrap();
    let path = write_file(dir.path(), "big", &pattern(LEN, 5));
    let s = server().await;
    let f = s.add_file(&path).await.unwrap();
    let mut resp = reqwest::get(&f.url).await.unwrap();
    assert_eq!(resp.status(), 200);
    let mut got = resp.chunk().await.unwrap().unwrap().len();
    // Grow the file while the response is being read.
    std::fs::OpenOptions::new()
        .append(true)
        .open(&path)
        .unwrap()
        .write_all(b"more")
        .unwrap();
    let outcome = loop {
        match resp.chunk().await {
            Ok(Some(c)) => got += c.len(),
            Ok(None) => break Ok(()),
            Err(e) => break Err(e),
        }
    };
    assert!(
        outcome.is_err() && got < LEN,
        "the download must fail short of {LEN} bytes, got {got} bytes and {outcome:?}"
    );
}

#[tokio::test]
async fn shutdown_stops_listening_and_cuts_downloads() {
    const LEN: usize = 32 << 20;
    let dir = tempfile::tempdir().unwrap();
    let path = write_file(dir.path(), "big", &pattern(LEN, 3));
    let s = server().await;
    let addr = s.addr();
    let f = s.add_file(&path).await.unwrap();
    let mut resp = reqwest::get(&f.url).await.unwrap();
    let mut got = resp.chunk().await.unwrap().unwrap().len();
    let stats = s.stats_handle();
    assert_eq!(stats.get().in_flight, 1);
    s.shutdown().await;
    assert!(tokio::net::TcpStream::connect(addr).await.is_err());
    let outcome = loop {
        match resp.chunk().await {
            Ok(Some(c)) => got += c.len(),
            Ok(None) => break Ok(()),
            Err(e) => break Err(e),
        }
    };
    assert!(
        outcome.is_err() && got < LEN,
        "got {got} bytes and {outcome:?}"
    );
}

#[tokio::test]
async fn drop_stops_the_server() {
    let s = server().await;
    let addr = s.addr();
    assert!(tokio::net::TcpStream::connect(addr).await.is_ok());
    drop(s);
    // The abort takes effect at the task's next poll.
    let mut refused = false;
    for _ in 0..100 {
        if tokio::net::TcpStream::connect(addr).await.is_err() {
            refused = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(refused, "still accepting on {addr} after drop");
}
