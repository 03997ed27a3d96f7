//! The S3 fixtures against a real moto: a multipart upload over raw,
//! unsigned HTTP (listed, aborted, completed), and the fault proxy's
//! failing and held part uploads.

use std::time::Duration;

use reqwest::{Client, StatusCode};
use test_support::s3_server::{S3FaultProxy, S3Server};

/// CreateMultipartUpload at `endpoint`: the upload id.
async fn create_upload(http: &Client, endpoint: &str, bucket: &str, key: &str) -> String {
    let resp = http
        .post(format!("{endpoint}/{bucket}/{key}?uploads"))
        .send()
        .await
        .unwrap();
    assert!(resp.status().is_success(), "{}", resp.status());
    let text = resp.text().await.unwrap();
    #[derive(serde::Deserialize)]
    struct Initiated {
        #[serde(rename = "UploadId")]
        upload_id: String,
    }
    let r: Initiated = quick_xml::de::from_str(&text).unwrap();
    r.upload_id
}

/// UploadPart at `endpoint`: the status and the ETag.
async fn upload_part(
    http: &Client,
    endpoint: &str,
    bucket: &str,
    key: &str,
    upload: &str,
    part: u32,
    body: Vec<u8>,
) -> (StatusCode, Option<String>, String) {
    let resp = http
        .put(format!(
            "{endpoint}/{bucket}/{key}?partNumber={part}&uploadId={upload}"
        ))
        .body(body)
        .send()
        .await
        .unwrap();
    let status = resp.status();
    let etag = resp
        .headers()
        .get("etag")
        .map(|v| v.to_str().unwrap().to_string());
    (status, etag, resp.text().await.unwrap())
}

#[tokio::test]
async fn a_multipart_upload_is_listed_aborted_and_completed() {
    let s3 = S3Server::start().await.unwrap();
    assert!(s3.endpoint().starts_with("http://127.0.0.1:"));
    let http = Client::new();
    let ep = s3.endpoint();
    s3.create_bucket("images").await.unwrap();
    assert!(s3.list_objects("images").await.unwrap().is_empty());
    assert!(s3
        .list_multipart_uploads("images")
        .await
        .unwrap()
        .is_empty());

    // Started, one part: listed; aborted: gone, and no object.
    let id = create_upload(&http, &ep, "images", "a/web.qcow2").await;
    let (st, etag, _) =
        upload_part(&http, &ep, "images", "a/web.qcow2", &id, 1, vec![1; 100]).await;
    assert_eq!(st, StatusCode::OK);
    assert!(etag.is_some());
    assert_eq!(
        s3.list_multipart_uploads("images").await.unwrap(),
        vec![("a/web.qcow2".to_string(), id.clone())]
    );
    let resp = http
        .delete(format!("{ep}/images/a/web.qcow2?uploadId={id}"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::NO_CONTENT);
    assert!(s3
        .list_multipart_uploads("images")
        .await
        .unwrap()
        .is_empty());
    assert_eq!(s3.get_object("images", "a/web.qcow2").await.unwrap(), None);

    // Two parts (all but the last at least 5 MiB), completed: one object.
    let id = create_upload(&http, &ep, "images", "b.qcow2").await;
    let first = vec![7u8; 5 << 20];
    let second = b"tail".to_vec();
    let (_, e1, _) = upload_part(&http, &ep, "images", "b.qcow2", &id, 1, first.clone()).await;
    let (_, e2, _) = upload_part(&http, &ep, "images", "b.qcow2", &id, 2, second.clone()).await;
    let complete = format!(
        "<CompleteMultipartUpload><Part><PartNumber>1</PartNumber><ETag>{}</ETag></Part>\
         <Part><PartNumber>2</PartNumber><ETag>{}</ETag></Part></CompleteMultipartUpload>",
        e1.unwrap(),
        e2.unwrap()
    );
    let resp = http
        .post(format!("{ep}/images/b.qcow2?uploadId={id}"))
        .body(complete)
        .send()
        .await
        .unwrap();
    assert_eq!(
        resp.status(),
        StatusCode::OK,
        "{}",
        resp.text().await.unwrap()
    );
    assert!(s3
        .list_multipart_uploads("images")
        .await
        .unwrap()
        .is_empty());
    assert_eq!(s3.list_objects("images").await.unwrap(), vec!["b.qcow2"]);
    let got = s3.get_object("images", "b.qcow2").await.unwrap().unwrap();
    assert_eq!(got.len(), first.len() + second.len());
    assert!(got.ends_with(b"tail"));

    // Fixtures: put and get, a missing key, a missing bucket.
    s3.put_object("images", "dir/x.raw", b"hello".to_vec())
        .await
        .unwrap();
    assert_eq!(
        s3.get_object("images", "dir/x.raw")
            .await
            .unwrap()
            .as_deref(),
        Some(&b"hello"[..])
    );
    assert_eq!(
        s3.list_objects("images").await.unwrap(),
        vec!["b.qcow2", "dir/x.raw"]
    );
    assert!(s3.get_object("nope", "x").await.is_err());
}

#[tokio::test]
async fn the_proxy_fails_two_part_uploads_then_forwards() {
    let s3 = S3Server::start().await.unwrap();
    s3.create_bucket("bkt").await.unwrap();
    let proxy = S3FaultProxy::start(&s3.endpoint()).await.unwrap();
    let ep = proxy.endpoint();
    let http = Client::new();
    // Other requests pass unchanged.
    let id = create_upload(&http, &ep, "bkt", "k.qcow2").await;
    proxy.fail_part_uploads(2);
    let mut statuses = vec![];
    loop {
        let (st, etag, body) = upload_part(&http, &ep, "bkt", "k.qcow2", &id, 1, vec![3; 64]).await;
        statuses.push(st);
        if st.is_success() {
            assert!(etag.is_some());
            break;
        }
        assert!(body.contains("<Code>InternalError</Code>"), "{body}");
        assert!(statuses.len() < 5);
    }
    assert_eq!(
        statuses,
        [
            StatusCode::INTERNAL_SERVER_ERROR,
            StatusCode::INTERNAL_SERVER_ERROR,
            StatusCode::OK
        ]
    );
    assert_eq!(proxy.part_upload_attempts(), [1, 1, 1]);
    assert_eq!(proxy.failed(), 2);
    // The failed attempts never reached moto, the third did: one upload, in progress.
    assert_eq!(
        s3.list_multipart_uploads("bkt").await.unwrap(),
        vec![("k.qcow2".to_string(), id)]
    );
    let (method, path) = &proxy.requests()[0];
    assert_eq!(
        (method.as_str(), path.as_str()),
        ("POST", "/bkt/k.qcow2?uploads")
    );
}

#[tokio::test]
async fn the_proxy_holds_part_uploads_after_n_until_dropped() {
    let s3 = S3Server::start().await.unwrap();
    s3.create_bucket("bkt").await.unwrap();
    let proxy = S3FaultProxy::start(&s3.endpoint()).await.unwrap();
    let ep = proxy.endpoint();
    let http = Client::new();
    let id = create_upload(&http, &ep, "bkt", "k.qcow2").await;
    proxy.hang_after_parts(1);
    let (st, _, _) = upload_part(&http, &ep, "bkt", "k.qcow2", &id, 1, vec![0; 10]).await;
    assert_eq!(st, StatusCode::OK);
    // Part 2 is held: no answer.
    let held = http
        .put(format!("{ep}/bkt/k.qcow2?partNumber=2&uploadId={id}"))
        .body(vec![0; 10])
        .timeout(Duration::from_millis(500))
        .send()
        .await;
    assert!(held.unwrap_err().is_timeout());
    // An abort still passes.
    let resp = http
        .delete(format!("{ep}/bkt/k.qcow2?uploadId={id}"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::NO_CONTENT);
    assert!(s3.list_multipart_uploads("bkt").await.unwrap().is_empty());
    assert_eq!(proxy.part_upload_attempts(), [1, 2]);

    // A held request ends (the connection closes) when the proxy is dropped.
    let pending = tokio::spawn({
        let http = http.clone();
        let url = format!("{ep}/bkt/k.qcow2?partNumber=3&uploadId={id}");
        async move { http.put(url).body(vec![0; 10]).send().await }
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(!pending.is_finished());
    drop(proxy);
    let r = tokio::time::timeout(Duration::from_secs(5), pending)
        .await
        .expect("the held request ends with the proxy")
        .unwrap();
    assert!(r.is_err(), "{r:?}");
}
