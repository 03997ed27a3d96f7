//! Serving the done signal: once the build has ended the agent answers
//! every TCP connection on `signal_build_done_port` with one JSON line (the
//! contract's [`DoneLine`]) and closes it.

use std::net::{Ipv6Addr, SocketAddr};

use anyhow::{Context, Result};
use contract::DoneLine;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpListener;
use tracing::{debug, info, warn};

/// The initrd's worker writes the resolved done port here, so that PID 1
/// can signal on the right port if the worker dies after resolving
/// parameters.
pub const PORT_FILE: &str = "/run/initrd-agent.port";

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

    #[tokio::test]
    async fn every_connection_gets_the_line() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let line = DoneLine::failure(contract::Stage::Params, "no build_method".into());
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
