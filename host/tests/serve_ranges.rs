//! Range, HEAD, ETag, Last-Modified and If-Range behaviour.

mod serve_common;

use host::serve::{ArtifactServer, ServedFile};
use reqwest::header::{
    HeaderMap, ACCEPT_RANGES, CONTENT_LENGTH, CONTENT_RANGE, ETAG, LAST_MODIFIED,
};
use reqwest::StatusCode;
use serve_common::{pattern, raw, url_path, write_file};

const SIZE: usize = 1000;

async fn setup(len: usize) -> (tempfile::TempDir, ArtifactServer, ServedFile, Vec<u8>) {
    let dir = tempfile::tempdir().unwrap();
    let data = pattern(len, 42);
    let path = write_file(dir.path(), "rootfs.tar.zst", &data);
    let server = ArtifactServer::start("127.0.0.1:0".parse().unwrap(), None)
        .await
        .unwrap();
    let served = server.add_file(&path).await.unwrap();
    (dir, server, served, data)
}

async fn get(url: &str, headers: &[(&str, &str)]) -> (StatusCode, HeaderMap, Vec<u8>) {
    let mut req = reqwest::Client::new().get(url);
    for (n, v) in headers {
        req = req.header(*n, *v);
    }
    let resp = req.send().await.unwrap();
    let status = resp.status();
    let headers = resp.headers().clone();
    let body = resp.bytes().await.unwrap().to_vec();
    if let Some(len) = headers.get(CONTENT_LENGTH) {
        assert_eq!(
            len.to_str().unwrap(),
            body.len().to_string(),
            "Content-Length"
        );
    }
    (status, headers, body)
}

fn h(headers: &HeaderMap, name: impl reqwest::header::AsHeaderName) -> &str {
    headers.get(name).map(|v| v.to_str().unwrap()).unwrap_or("")
}

/// `Range: <range>` → (status, Content-Range, body).
async fn range(url: &str, range: &str) -> (StatusCode, String, Vec<u8>) {
    let (status, headers, body) = get(url, &[("range", range)]).await;
    (status, h(&headers, CONTENT_RANGE).to_string(), body)
}

#[tokio::test]
async fn full_get_headers() {
    let (_dir, _server, f, data) = setup(SIZE).await;
    let (status, headers, body) = get(&f.url, &[]).await;
    assert_eq!(status, 200);
    assert_eq!(body, data);
    assert_eq!(h(&headers, CONTENT_LENGTH), SIZE.to_string());
    assert_eq!(h(&headers, ACCEPT_RANGES), "bytes");
    assert_eq!(h(&headers, ETAG), format!("\"{}\"", f.sha256));
    assert!(h(&headers, CONTENT_RANGE).is_empty());
    let lm = h(&headers, LAST_MODIFIED);
    let mtime = std::fs::metadata(&f.local_path)
        .unwrap()
        .modified()
        .unwrap();
    let parsed = httpdate::parse_http_date(lm).unwrap();
    let diff = mtime.duration_since(parsed).unwrap();
    assert!(diff.as_secs() < 1, "Last-Modified {lm}");
}

#[tokio::test]
async fn single_ranges() {
    let (_dir, _server, f, data) = setup(SIZE).await;
    let url = &f.url;

    let (s, cr, body) = range(url, "bytes=0-0").await;
    assert_eq!(
        (s, cr.as_str(), body.as_slice()),
        (StatusCode::PARTIAL_CONTENT, "bytes 0-0/1000", &data[..1])
    );

    let (s, cr, body) = range(url, "bytes=-1").await;
    assert_eq!(
        (s, cr.as_str(), body.as_slice()),
        (
            StatusCode::PARTIAL_CONTENT,
            "bytes 999-999/1000",
            &data[999..]
        )
    );

    // A suffix longer than the file is the whole file, still 206.
    let (s, cr, body) = range(url, &format!("bytes=-{}", SIZE + 10)).await;
    assert_eq!(
        (s, cr.as_str(), body.as_slice()),
        (StatusCode::PARTIAL_CONTENT, "bytes 0-999/1000", &data[..])
    );

    let (s, cr, body) = range(url, "bytes=990-").await;
    assert_eq!(
        (s, cr.as_str(), body.as_slice()),
        (
            StatusCode::PARTIAL_CONTENT,
            "bytes 990-999/1000",
            &data[990..]
        )
    );

    let (s, cr, body) = range(url, "bytes=100-199").await;
    assert_eq!(
        (s, cr.as_str(), body.as_slice()),
        (
            StatusCode::PARTIAL_CONTENT,
            "bytes 100-199/1000",
            &data[100..200]
        )
    );

    // The end is clamped to the last byte.
    let (s, cr, body) = range(url, "bytes=995-5000").await;
    assert_eq!(
        (s, cr.as_str(), body.as_slice()),
        (
            StatusCode::PARTIAL_CONTENT,
            "bytes 995-999/1000",
            &data[995..]
        )
    );

    let (s, cr, body) = range(url, "bytes=999-999").await;
    assert_eq!(
        (s, cr.as_str(), body.as_slice()),
        (
            StatusCode::PARTIAL_CONTENT,
            "bytes 999-999/1000",
            &data[999..]
        )
    );
}

#[tokio::test]
async fn unsatisfiable_and_invalid_ranges() {
    let (_dir, _server, f, _) = setup(SIZE).await;
    // Starting at or past the end, an empty suffix, and last < first (invalid
    // per RFC 9110 §14.1.1, our documented choice is 416) are all 416.
    for r in [
        "bytes=1000-",
        "bytes=1000-1000",
        "bytes=5000-6000",
        "bytes=-0",
        "bytes=5-2",
        "bytes=99999999999999999999999-",
    ] {
        let (s, cr, body) = range(&f.url, r).await;
        assert_eq!(s, StatusCode::RANGE_NOT_SATISFIABLE, "{r}");
        assert_eq!(cr, "bytes */1000", "{r}");
        assert!(body.is_empty(), "{r}");
    }
}

#[tokio::test]
async fn ignored_ranges_give_the_whole_file() {
    let (_dir, _server, f, data) = setup(SIZE).await;
    // Multiple ranges: documented choice, the whole file with 200. Malformed
    // headers and other units are ignored (RFC 9110 §14.2).
    for r in [
        "bytes=0-1,5-6",
        "bytes=0-0,-1",
        "items=0-1",
        "bytes=a-b",
        "bytes=+1-2",
        "bytes",
        "bytes=-",
    ] {
        let (s, cr, body) = range(&f.url, r).await;
        assert_eq!(s, StatusCode::OK, "{r}");
        assert!(cr.is_empty(), "{r}: {cr}");
        assert_eq!(body, data, "{r}");
    }
}

#[tokio::test]
async fn head_has_length_and_no_body() {
    let (_dir, server, f, _) = setup(SIZE).await;
    // Raw TCP with Connection: close: any body byte would show.
    let r = raw(server.addr(), "HEAD", &url_path(&f.url), "").await;
    assert_eq!(r.status, 200);
    assert_eq!(r.header("content-length"), Some("1000"));
    assert_eq!(r.header("accept-ranges"), Some("bytes"));
    assert_eq!(r.header("etag"), Some(format!("\"{}\"", f.sha256).as_str()));
    assert!(r.header("last-modified").is_some());
    assert!(r.body.is_empty(), "{} body bytes", r.body.len());

    let r = raw(
        server.addr(),
        "HEAD",
        &url_path(&f.url),
        "Range: bytes=10-19\r\n",
    )
    .await;
    assert_eq!(r.status, 206);
    assert_eq!(r.header("content-length"), Some("10"));
    assert_eq!(r.header("content-range"), Some("bytes 10-19/1000"));
    assert!(r.body.is_empty());

    let resp = reqwest::Client::new().head(&f.url).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    // reqwest's content_length() is the body's size (0 for HEAD): read the header.
    assert_eq!(h(resp.headers(), CONTENT_LENGTH), "1000");
    assert_eq!(server.stats().bytes_served, 0, "HEAD sends no body bytes");
}

#[tokio::test]
async fn etag_is_stable_and_if_range_is_honoured() {
    let (_dir, _server, f, data) = setup(SIZE).await;
    let (_, h1, _) = get(&f.url, &[]).await;
    let (_, h2, _) = get(&f.url, &[("range", "bytes=0-9")]).await;
    let etag = h(&h1, ETAG).to_string();
    let last_modified = h(&h1, LAST_MODIFIED).to_string();
    assert_eq!(etag, h(&h2, ETAG));
    assert!(!etag.starts_with("W/"), "strong ETag: {etag}");

    // Matching validator: the range is served.
    for validator in [etag.as_str(), last_modified.as_str()] {
        let (s, hd, body) = get(&f.url, &[("range", "bytes=10-19"), ("if-range", validator)]).await;
        assert_eq!(s, StatusCode::PARTIAL_CONTENT, "If-Range {validator}");
        assert_eq!(h(&hd, CONTENT_RANGE), "bytes 10-19/1000");
        assert_eq!(body, &data[10..20]);
    }
    // Anything else: the whole file, 200.
    let weak = format!("W/{etag}");
    for validator in [
        "\"0000000000000000000000000000000000000000000000000000000000000000\"",
        weak.as_str(),
        "Thu, 01 Jan 1970 00:00:00 GMT",
        "garbage",
    ] {
        let (s, hd, body) = get(&f.url, &[("range", "bytes=10-19"), ("if-range", validator)]).await;
        assert_eq!(s, StatusCode::OK, "If-Range {validator}");
        assert!(h(&hd, CONTENT_RANGE).is_empty());
        assert_eq!(body, data, "If-Range {validator}");
    }
    // A mismatched If-Range also overrides an unsatisfiable range.
    let (s, _, body) = get(&f.url, &[("range", "bytes=5000-"), ("if-range", "\"x\"")]).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(body, data);
}

#[tokio::test]
async fn empty_file() {
    let (_dir, _server, f, _) = setup(0).await;
    let (s, hd, body) = get(&f.url, &[]).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(h(&hd, CONTENT_LENGTH), "0");
    assert!(body.is_empty());
    for r in ["bytes=0-", "bytes=-1", "bytes=0-0"] {
        let (s, cr, _) = range(&f.url, r).await;
        assert_eq!(s, StatusCode::RANGE_NOT_SATISFIABLE, "{r}");
        assert_eq!(cr, "bytes */0");
    }
}

#[tokio::test]
async fn large_ranges_cross_chunk_boundaries() {
    // Three and a bit chunks, ranges that start and end mid-chunk.
    let len = 3 * host::serve::CHUNK_SIZE + 12345;
    let (_dir, server, f, data) = setup(len).await;
    let cases = [
        (1usize, len - 2),
        (host::serve::CHUNK_SIZE - 1, host::serve::CHUNK_SIZE),
        (200_000, 700_000),
    ];
    for (a, b) in cases {
        let (s, cr, body) = range(&f.url, &format!("bytes={a}-{b}")).await;
        assert_eq!(s, StatusCode::PARTIAL_CONTENT);
        assert_eq!(cr, format!("bytes {a}-{b}/{len}"));
        assert_eq!(body, &data[a..=b]);
    }
    let (_, _, body) = get(&f.url, &[]).await;
    assert_eq!(body, data);
    let expected: usize = cases.iter().map(|(a, b)| b - a + 1).sum::<usize>() + len;
    assert_eq!(server.bytes_served(), expected as u64);
    assert_eq!(server.file_bytes_served(&f), expected as u64);
    assert_eq!(server.file_requests(&f), cases.len() as u64 + 1);
}
