//! The done signal: once the build has ended the agent answers every TCP
//! connection on `signal_build_done_port` with one JSON line and closes it.
//!
//! `status` and `message` are the original initrd's fields (legacy pollers
//! only look at those); the rest are additions. A host must read and check
//! the line: behind QEMU's user networking a connect to a forwarded port
//! succeeds even when nothing listens.

use std::net::{Ipv6Addr, SocketAddr};

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpListener;
use tracing::{debug, info, warn};

/// One partition or filesystem of the finished volume, for the done line.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LayoutEntry {
    pub device: String,
    pub role: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub number: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub partuuid: Option<String>,
    pub start_bytes: u64,
    pub size_bytes: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fs: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub uuid: Option<String>,
}

/// The line the agent answers with.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DoneLine {
    pub status: String,
    pub message: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub method: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stage: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub duration_s: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bytes: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub layout: Option<Vec<LayoutEntry>>,
}

impl DoneLine {
    pub fn success(method: &str, duration_s: f64, bytes: u64, layout: Vec<LayoutEntry>) -> Self {
        DoneLine {
            status: "0".into(),
            message: "done".into(),
            method: Some(method.into()),
            stage: None,
            duration_s: Some((duration_s * 10.0).round() / 10.0),
            bytes: Some(bytes),
            layout: Some(layout),
        }
    }

    pub fn failure(stage: &str, message: String) -> Self {
        DoneLine {
            status: "1".into(),
            message,
            method: None,
            stage: Some(stage.into()),
            duration_s: None,
            bytes: None,
            layout: None,
        }
    }

    pub fn is_success(&self) -> bool {
        self.status == "0"
    }

    /// The wire form: one JSON object and a newline.
    pub fn to_line(&self) -> String {
        let mut line = serde_json::to_string(self).expect("DoneLine always serialises");
        line.push('\n');
        line
    }
}

/// Binds the done port on every address (the host reaches it through a
/// QEMU forward or the server's public IP).
pub async fn bind(port: u16) -> Result<TcpListener> {
    // A dual-stack socket where IPv6 exists, plain IPv4 otherwise (the
    // initrd has no IPv6 address configured, but the kernel may have it).
    let v6 = SocketAddr::from((Ipv6Addr::UNSPECIFIED, port));
    match TcpListener::bind(v6).await {
        Ok(l) => Ok(l),
        Err(_) => TcpListener::bind(("0.0.0.0", port))
            .await
            .with_context(|| format!("cannot listen on the done port {port}")),
    }
}

/// Answers every connection with `line` until the task is dropped.
pub async fn serve(listener: TcpListener, line: DoneLine) -> Result<()> {
    let text = line.to_line();
    info!(
        port = listener.local_addr().map(|a| a.port()).unwrap_or(0),
        "serving the done signal: {}",
        text.trim_end()
    );
    loop {
        let (mut stream, peer) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                // EMFILE and friends: keep serving rather than give up.
                warn!("accept on the done port failed: {e}");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                continue;
            }
        };
        debug!(%peer, "done-signal connection");
        let text = text.clone();
        tokio::spawn(async move {
            let _ = stream.write_all(text.as_bytes()).await;
            let _ = stream.shutdown().await;
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncReadExt;

    #[test]
    fn lines_keep_the_original_fields() {
        let ok = DoneLine::success("from-rootfs", 41.23, 390878720, vec![]);
        let v: serde_json::Value = serde_json::from_str(&ok.to_line()).unwrap();
        assert_eq!(v["status"], "0");
        assert_eq!(v["message"], "done");
        assert_eq!(v["method"], "from-rootfs");
        assert_eq!(v["duration_s"], 41.2);
        assert!(v.get("stage").is_none());

        let bad = DoneLine::failure("fetch", "rootfs_url answered 404".into());
        let line = bad.to_line();
        assert!(line.ends_with('\n') && line.matches('\n').count() == 1);
        let v: serde_json::Value = serde_json::from_str(&line).unwrap();
        assert_eq!(v["status"], "1");
        assert_eq!(v["stage"], "fetch");
        assert!(v.get("layout").is_none());
    }

    #[tokio::test]
    async fn every_connection_gets_the_line() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let line = DoneLine::failure("params", "no build_method".into());
        let server = tokio::spawn(serve(listener, line.clone()));
        for _ in 0..3 {
            let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
            let mut got = String::new();
            s.read_to_string(&mut got).await.unwrap();
            let parsed: DoneLine = serde_json::from_str(got.trim_end()).unwrap();
            assert_eq!(parsed, line);
        }
        server.abort();
    }
}
