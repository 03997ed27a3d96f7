//! The host side of the done signal: poll the agent's port until it answers
//! with its JSON line (the contract's [`DoneLine`]).
//!
//! A successful TCP connect proves nothing here: behind QEMU's user
//! networking the forward accepts while the guest is still booting (then
//! the read hangs) or while nothing listens (then it reads EOF). Only a
//! parsed line counts.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use contract::DoneLine;
use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;
use tracing::debug;

/// Tries once: connect, read one line within `read_timeout`, parse it.
pub async fn probe(addr: SocketAddr, read_timeout: Duration) -> Result<DoneLine> {
    let mut stream = tokio::time::timeout(read_timeout, TcpStream::connect(addr))
        .await
        .context("connect timed out")?
        .context("connect")?;
    let mut buf = Vec::with_capacity(512);
    let read = tokio::time::timeout(read_timeout, async {
        let mut chunk = [0u8; 4096];
        loop {
            let n = stream.read(&mut chunk).await?;
            if n == 0 {
                return Ok::<_, std::io::Error>(());
            }
            buf.extend_from_slice(&chunk[..n]);
            if buf.contains(&b'\n') || buf.len() > 1 << 20 {
                return Ok(());
            }
        }
    })
    .await;
    match read {
        Err(_) => bail!("no line within {read_timeout:?} (the guest is not up yet)"),
        Ok(Err(e)) => return Err(e).context("read"),
        Ok(Ok(())) => {}
    }
    let line = buf.split(|b| *b == b'\n').next().unwrap_or_default();
    if line.is_empty() {
        bail!("connection closed without a line (nothing listens yet)");
    }
    Ok(DoneLine::parse(line)?)
}

/// Polls `addr` until a done line arrives or `timeout` passes. `still_alive`
/// is called between attempts; its error (say, the VM exited) ends the wait
/// at once instead of at the timeout.
pub async fn wait(
    addr: SocketAddr,
    timeout: Duration,
    mut still_alive: impl FnMut() -> Result<()>,
) -> Result<DoneLine> {
    let deadline = Instant::now() + timeout;
    let mut last = String::from("no attempt");
    while Instant::now() < deadline {
        still_alive()?;
        match probe(addr, Duration::from_secs(2)).await {
            Ok(line) => return Ok(line),
            Err(e) => {
                last = format!("{e:#}");
                debug!("done signal at {addr}: {last}");
            }
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    bail!("no done signal from {addr} within {timeout:?} (last attempt: {last})")
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;
    use tokio::net::TcpListener;

    #[tokio::test]
    async fn eof_and_silence_are_not_signals_but_a_line_is() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            // First: close at once (QEMU forward, nothing listening).
            let (s, _) = listener.accept().await.unwrap();
            drop(s);
            // Second: hold the connection open silently (guest booting).
            let (_held, _) = listener.accept().await.unwrap();
            // Third: the real line.
            let (mut s, _) = listener.accept().await.unwrap();
            s.write_all(b"{\"status\":\"1\",\"message\":\"boom\",\"stage\":\"fetch\"}\n")
                .await
                .unwrap();
            tokio::time::sleep(Duration::from_secs(30)).await;
        });
        let err = probe(addr, Duration::from_millis(500)).await.unwrap_err();
        assert!(format!("{err:#}").contains("without a line"), "{err:#}");
        let err = probe(addr, Duration::from_millis(500)).await.unwrap_err();
        assert!(format!("{err:#}").contains("no line within"), "{err:#}");
        let line = wait(addr, Duration::from_secs(10), || Ok(()))
            .await
            .unwrap();
        assert!(!line.is_success());
        assert_eq!(line.stage, Some(contract::Stage::Fetch));
    }

    #[tokio::test]
    async fn a_dead_vm_ends_the_wait_early() {
        let addr: SocketAddr = "127.0.0.1:9".parse().unwrap();
        let started = Instant::now();
        let err = wait(addr, Duration::from_secs(60), || {
            bail!("qemu exited with status 1")
        })
        .await
        .unwrap_err();
        assert!(err.to_string().contains("qemu exited"));
        assert!(started.elapsed() < Duration::from_secs(5));
    }
}
