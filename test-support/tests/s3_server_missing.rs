//! Without moto, `S3Server::start` names the install command. (Its own test
//! binary: it sets `IMGFORGE_MOTO_SERVER`, which other tests must not see.)

use test_support::s3_server::{S3Server, MOTO_INSTALL};

#[tokio::test]
async fn a_missing_moto_server_names_its_install_command() {
    std::env::set_var("IMGFORGE_MOTO_SERVER", "/nonexistent/moto_server");
    let e = S3Server::start().await.err().expect("no moto there");
    let text = e.to_string();
    assert!(
        text.contains("/nonexistent/moto_server is not installed"),
        "{text}"
    );
    assert!(text.contains(MOTO_INSTALL), "{text}");
}
