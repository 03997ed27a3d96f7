//! Many clients at once.

mod serve_common;

use host::serve::ArtifactServer;
use serve_common::{pattern, sha256_hex, write_file};
use sha2::{Digest, Sha256};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_concurrent_downloads_hash_correctly() {
    const LEN: usize = 20 << 20;
    const CLIENTS: usize = 50;
    let dir = tempfile::tempdir().unwrap();
    let data = pattern(LEN, 99);
    let expected = sha256_hex(&data);
    let path = write_file(dir.path(), "rootfs.tar", &data);
    drop(data);
    let server = ArtifactServer::start("127.0.0.1:0".parse().unwrap(), None)
        .await
        .unwrap();
    let f = server.add_file(&path).await.unwrap();
    assert_eq!(f.sha256, expected);
    assert_eq!(f.size, LEN as u64);

    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..CLIENTS {
        let url = f.url.clone();
        tasks.spawn(async move {
            // One client each: one connection each, all at the same time.
            let client = reqwest::Client::new();
            let mut resp = client.get(&url).send().await.unwrap();
            assert_eq!(resp.status(), 200, "client {i}");
            let mut hasher = Sha256::new();
            let mut n = 0usize;
            while let Some(chunk) = resp.chunk().await.unwrap() {
                n += chunk.len();
                hasher.update(&chunk);
            }
            (n, hex::encode(hasher.finalize()))
        });
    }
    let mut done = 0;
    while let Some(r) = tasks.join_next().await {
        let (n, digest) = r.unwrap();
        assert_eq!(n, LEN);
        assert_eq!(digest, expected);
        done += 1;
    }
    assert_eq!(done, CLIENTS);
    let stats = server.stats();
    assert_eq!(stats.requests, CLIENTS as u64);
    assert_eq!(stats.bytes_served, (CLIENTS * LEN) as u64);
    assert_eq!(stats.in_flight, 0);
    server.shutdown().await;
}
