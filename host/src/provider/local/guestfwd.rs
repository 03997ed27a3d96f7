//! Bridging QEMU slirp `guestfwd` connections to a host TCP service.
//!
//! `-netdev user,guestfwd=tcp:IP:PORT-cmd:COMMAND` makes QEMU (libslirp) spawn
//! COMMAND once per guest connection to `IP:PORT`, with that connection on the
//! command's stdin and stdout. The chardev form (`...-tcp:HOST:PORT`) opens a
//! single host connection at startup and breaks after the first request
//! (machine-facts.md §2), so imgforge uses the `cmd` form with itself as the
//! command: `imgforge guestfwd-bridge 127.0.0.1:PORT`, which runs
//! [`bridge_stdio_to`].
//!
//! Notes for the CLI wiring:
//! - libslirp hands the child the *same* socket as stdin, stdout **and
//!   stderr**. Anything the bridge writes to stderr (logs, error messages) is
//!   sent to the guest, so the `guestfwd-bridge` subcommand must not log to
//!   stderr and should exit with a status code rather than print errors.
//! - Return (and so exit) as soon as [`bridge_stdio_to`] returns: the process
//!   exiting is what closes the guest's connection.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::Path;

use anyhow::Context as _;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt as _, BufReader};
use tokio::net::TcpStream;

/// The hidden subcommand of `imgforge` that runs [`bridge_stdio_to`].
pub const BRIDGE_SUBCOMMAND: &str = "guestfwd-bridge";

/// Buffer size for each direction.
const BUF_SIZE: usize = 64 * 1024;

/// Connect to `addr` and shuttle bytes between it and this process's
/// stdin/stdout until the service closes its side.
///
/// Stdin is read on a dedicated OS thread rather than with
/// `tokio::io::stdin()`: a blocking read on Tokio's blocking pool cannot be
/// cancelled and would keep the runtime from shutting down (hence the process
/// from exiting, hence the guest from seeing the connection close) until the
/// guest sends more data. A plain thread does not hold the process open.
pub async fn bridge_stdio_to(addr: SocketAddr) -> anyhow::Result<()> {
    bridge(stdin_reader(), tokio::io::stdout(), addr).await
}

/// Stdin as an `AsyncRead`, fed by a detached OS thread. Read errors end the
/// stream like EOF.
pub(crate) fn stdin_reader() -> impl AsyncRead + Unpin + Send + 'static {
    let (mut to_bridge, from_stdin) = tokio::io::duplex(BUF_SIZE);
    let rt = tokio::runtime::Handle::current();
    let spawned = std::thread::Builder::new()
        .name("guestfwd-stdin".into())
        .spawn(move || {
            use std::io::Read as _;
            let mut stdin = std::io::stdin().lock();
            let mut buf = vec![0u8; BUF_SIZE];
            loop {
                let n = match stdin.read(&mut buf) {
                    Ok(0) => break,
                    Ok(n) => n,
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                    Err(_) => break,
                };
                if rt.block_on(to_bridge.write_all(&buf[..n])).is_err() {
                    break; // the bridge is gone
                }
            }
            // Dropping `to_bridge` signals EOF to the reader.
        });
    if spawned.is_err() {
        // No thread: the duplex writer was moved into the failed closure and
        // dropped, so the bridge sees an immediate EOF on stdin and still
        // relays the service's answer (if any).
    }
    from_stdin
}

/// Connect to `addr`, copy `reader` → socket and socket → `writer`
/// concurrently, and return once the socket's read side has ended and
/// `writer` has been flushed and shut down.
///
/// Half-close: when `reader` reaches EOF (or fails) the socket's write half is
/// shut down, so the service sees EOF, while the answer keeps flowing back.
/// The reverse is not awaited: when the service closes first, the bridge
/// returns without waiting for `reader` to end.
pub async fn bridge<R, W>(reader: R, mut writer: W, addr: SocketAddr) -> anyhow::Result<()>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let stream = TcpStream::connect(addr)
        .await
        .with_context(|| format!("connecting to {addr}"))?;
    // Small HTTP requests/answers: do not let Nagle delay them.
    let _ = stream.set_nodelay(true);
    let (sock_rd, mut sock_wr) = stream.into_split();

    let upstream = async move {
        let mut reader = BufReader::with_capacity(BUF_SIZE, reader);
        let copied = tokio::io::copy_buf(&mut reader, &mut sock_wr).await;
        // Propagate EOF (or a failed input) to the service either way.
        let shut = sock_wr.shutdown().await;
        copied.and(shut.map(|_| 0))
    };
    let downstream = async {
        let mut sock_rd = BufReader::with_capacity(BUF_SIZE, sock_rd);
        tokio::io::copy_buf(&mut sock_rd, &mut writer)
            .await
            .context("copying from the service to the output")?;
        writer.flush().await.context("flushing the output")?;
        writer.shutdown().await.context("closing the output")?;
        anyhow::Ok(())
    };
    tokio::pin!(upstream, downstream);

    tokio::select! {
        res = &mut downstream => return res,
        // Input finished first (normally EOF): keep relaying the answer. An
        // input error is not fatal: the write half is shut down regardless,
        // and the service decides what to answer to a truncated request.
        _ = &mut upstream => {}
    }
    downstream.await
}

/// Build the `guestfwd=` fragment of a `-netdev user,...` option that forwards
/// guest connections to `guest_ip:guest_port` to `target` through
/// `bridge_exe guestfwd-bridge target`, e.g.
/// `guestfwd=tcp:169.254.42.42:80-cmd:'/usr/bin/imgforge' guestfwd-bridge 127.0.0.1:40123`.
///
/// Quoting, innermost first:
/// - libslirp splits the command with `g_shell_parse_argv` (shell-like
///   rules), so the executable path is single-quoted, with `'` written as
///   `'\''`; spaces and other shell metacharacters in it are therefore safe.
/// - QEMU's option parser treats `,` as a separator, so every comma in the
///   fragment is doubled.
///
/// The result is meant to be appended after a `,` to the rest of the netdev
/// options. A path that is not valid UTF-8 is converted lossily (and would
/// then name a different file); keep the executable at a UTF-8 path.
pub fn guestfwd_rule(
    guest_ip: Ipv4Addr,
    guest_port: u16,
    bridge_exe: &Path,
    target: SocketAddr,
) -> String {
    guestfwd_command_rule(
        guest_ip,
        guest_port,
        bridge_exe,
        &[BRIDGE_SUBCOMMAND.to_string(), target.to_string()],
    )
}

/// Like [`guestfwd_rule`] for any command: `exe args...` runs once per guest
/// connection with the connection on stdin/stdout (and stderr). Arguments
/// with characters outside `[A-Za-z0-9._:/=@-]` are single-quoted.
pub fn guestfwd_command_rule(
    guest_ip: Ipv4Addr,
    guest_port: u16,
    exe: &Path,
    args: &[String],
) -> String {
    let mut command = single_quote(&exe.to_string_lossy());
    for arg in args {
        command.push(' ');
        let plain = !arg.is_empty()
            && arg
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "._:/=@-".contains(c));
        if plain {
            command.push_str(arg);
        } else {
            command.push_str(&single_quote(arg));
        }
    }
    format!("guestfwd=tcp:{guest_ip}:{guest_port}-cmd:{command}").replace(',', ",,")
}

fn single_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;
    use tokio::io::{AsyncBufReadExt as _, AsyncReadExt as _};
    use tokio::net::TcpListener;
    use tokio::sync::oneshot;

    const TIMEOUT: Duration = Duration::from_secs(10);

    /// A server that reads everything until EOF, reports it, then writes
    /// `reply` and closes. Proves that EOF on the bridge's input reaches it.
    async fn read_all_then_reply(reply: &'static [u8]) -> (SocketAddr, oneshot::Receiver<Vec<u8>>) {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, rx) = oneshot::channel();
        tokio::spawn(async move {
            let (mut conn, _) = listener.accept().await.unwrap();
            let mut got = Vec::new();
            conn.read_to_end(&mut got).await.unwrap();
            let _ = tx.send(got);
            conn.write_all(reply).await.unwrap();
            conn.shutdown().await.unwrap();
        });
        (addr, rx)
    }

    #[tokio::test]
    async fn bytes_both_ways_and_eof_propagates() {
        let (addr, server_got) = read_all_then_reply(b"pong from server").await;
        // Input: the test writes into `input_w`, the bridge reads `input_r`.
        let (mut input_w, input_r) = tokio::io::duplex(1024);
        // Output: the bridge writes `output_w`, the test reads `output_r`.
        let (output_w, mut output_r) = tokio::io::duplex(1024);
        let bridge_task = tokio::spawn(bridge(input_r, output_w, addr));

        input_w.write_all(b"ping ").await.unwrap();
        input_w.write_all(b"from guest").await.unwrap();
        drop(input_w); // EOF on the bridge's input

        let got = tokio::time::timeout(TIMEOUT, server_got)
            .await
            .expect("server never saw EOF")
            .unwrap();
        assert_eq!(got, b"ping from guest");

        let mut out = Vec::new();
        tokio::time::timeout(TIMEOUT, output_r.read_to_end(&mut out))
            .await
            .expect("output never ended")
            .unwrap();
        assert_eq!(out, b"pong from server");
        tokio::time::timeout(TIMEOUT, bridge_task)
            .await
            .expect("bridge did not return")
            .unwrap()
            .unwrap();
    }

    #[tokio::test]
    async fn large_transfer_both_ways() {
        // An echo server; more data than any buffer in the path.
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            let (conn, _) = listener.accept().await.unwrap();
            let (mut r, mut w) = conn.into_split();
            tokio::io::copy(&mut r, &mut w).await.unwrap();
            w.shutdown().await.unwrap();
        });
        let data: Vec<u8> = (0..3 * 1024 * 1024u32)
            .map(|i| (i * 7 % 251) as u8)
            .collect();
        let (mut input_w, input_r) = tokio::io::duplex(4096);
        let (output_w, mut output_r) = tokio::io::duplex(4096);
        let bridge_task = tokio::spawn(bridge(input_r, output_w, addr));
        let to_send = data.clone();
        let writer = tokio::spawn(async move {
            input_w.write_all(&to_send).await.unwrap();
            // dropping input_w: EOF
        });
        let mut out = Vec::new();
        tokio::time::timeout(TIMEOUT, output_r.read_to_end(&mut out))
            .await
            .expect("echo never ended")
            .unwrap();
        writer.await.unwrap();
        assert_eq!(out.len(), data.len());
        assert!(out == data, "echoed bytes differ");
        tokio::time::timeout(TIMEOUT, bridge_task)
            .await
            .expect("bridge did not return")
            .unwrap()
            .unwrap();
    }

    #[tokio::test]
    async fn server_closing_first_ends_the_bridge_without_input_eof() {
        // An HTTP-ish server: reads one request line, answers, closes.
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            let (conn, _) = listener.accept().await.unwrap();
            let mut conn = tokio::io::BufReader::new(conn);
            let mut line = String::new();
            conn.read_line(&mut line).await.unwrap();
            assert_eq!(line, "GET / HTTP/1.0\r\n");
            conn.get_mut()
                .write_all(b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nok")
                .await
                .unwrap();
            // dropped: closed
        });
        let (mut input_w, input_r) = tokio::io::duplex(1024);
        let (output_w, mut output_r) = tokio::io::duplex(1024);
        let bridge_task = tokio::spawn(bridge(input_r, output_w, addr));
        input_w.write_all(b"GET / HTTP/1.0\r\n").await.unwrap();
        // input_w is kept open: the bridge must still finish.
        let mut out = Vec::new();
        tokio::time::timeout(TIMEOUT, output_r.read_to_end(&mut out))
            .await
            .expect("output never ended")
            .unwrap();
        assert!(
            out.ends_with(b"\r\n\r\nok"),
            "{:?}",
            String::from_utf8_lossy(&out)
        );
        tokio::time::timeout(TIMEOUT, bridge_task)
            .await
            .expect("bridge waited for input EOF")
            .unwrap()
            .unwrap();
        drop(input_w);
    }

    #[tokio::test]
    async fn http_through_bridge_to_metadata_server() {
        let meta = crate::provider::local::metadata_server::ServerMetadata::new("id-1", "vm-1");
        let server = crate::provider::local::metadata_server::MetadataServer::start(meta).unwrap();
        let (mut input_w, input_r) = tokio::io::duplex(1024);
        let (output_w, mut output_r) = tokio::io::duplex(1024);
        let bridge_task = tokio::spawn(bridge(input_r, output_w, server.addr()));
        let body = r#"{"state_detail":"booted"}"#;
        let req = format!(
            "PATCH /state HTTP/1.1\r\nHost: 169.254.42.42\r\nContent-Type: application/json\r\n\
             Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        );
        input_w.write_all(req.as_bytes()).await.unwrap();
        let mut out = Vec::new();
        tokio::time::timeout(TIMEOUT, output_r.read_to_end(&mut out))
            .await
            .expect("no complete answer")
            .unwrap();
        let out = String::from_utf8(out).unwrap();
        assert!(out.starts_with("HTTP/1.1 200"), "{out}");
        assert_eq!(server.state_details(), vec!["booted"]);
        tokio::time::timeout(TIMEOUT, bridge_task)
            .await
            .expect("bridge did not return")
            .unwrap()
            .unwrap();
        drop(input_w);
        server.shutdown().await;
    }

    #[tokio::test]
    async fn connect_failure_is_an_error() {
        // Bind then drop to get a port with (almost certainly) no listener.
        let addr = {
            let l = std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
            l.local_addr().unwrap()
        };
        let (_w, r) = tokio::io::duplex(16);
        let (w2, _r2) = tokio::io::duplex(16);
        let err = bridge(r, w2, addr).await.unwrap_err();
        assert!(err.to_string().contains(&addr.to_string()), "{err:#}");
    }

    // ---- the real stdio path, in a child process ----

    const CHILD_ENV: &str = "IMGFORGE_TEST_GUESTFWD_CHILD_ADDR";

    /// Not a test by itself: the body of the child process spawned by
    /// `stdio_bridge_in_child_process`. Ignored so that it only runs there.
    #[test]
    #[ignore = "helper run in a child process by stdio_bridge_in_child_process"]
    fn stdio_child() {
        let Ok(addr) = std::env::var(CHILD_ENV) else {
            return;
        };
        let addr: SocketAddr = addr.parse().unwrap();
        let rt = tokio::runtime::Runtime::new().unwrap();
        rt.block_on(bridge_stdio_to(addr)).unwrap();
        // Dropping `rt` here must not wait for stdin (still open in the parent).
    }

    #[tokio::test]
    async fn stdio_bridge_in_child_process() {
        use std::process::Stdio;
        // Server: read one line, answer, close; the child's stdin stays open.
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            let (conn, _) = listener.accept().await.unwrap();
            let mut conn = tokio::io::BufReader::new(conn);
            let mut line = String::new();
            conn.read_line(&mut line).await.unwrap();
            let reply = format!("<<echo:{}>>", line.trim_end());
            conn.get_mut().write_all(reply.as_bytes()).await.unwrap();
        });

        let mut child = tokio::process::Command::new(std::env::current_exe().unwrap())
            .args([
                "provider::local::guestfwd::tests::stdio_child",
                "--exact",
                "--ignored",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(CHILD_ENV, addr.to_string())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        let mut stdin = child.stdin.take().unwrap();
        stdin.write_all(b"hello bridge\n").await.unwrap();
        // Keep `stdin` open: the child must exit because the service closed.
        let mut stdout = child.stdout.take().unwrap();
        let mut out = Vec::new();
        tokio::time::timeout(TIMEOUT, stdout.read_to_end(&mut out))
            .await
            .expect("child stdout never closed")
            .unwrap();
        let status = tokio::time::timeout(TIMEOUT, child.wait())
            .await
            .expect("child did not exit while its stdin was open")
            .unwrap();
        drop(stdin);
        // The test harness prints its own lines around ours.
        let out = String::from_utf8_lossy(&out);
        assert!(out.contains("<<echo:hello bridge>>"), "{out}");
        assert!(status.success(), "{status:?}\n{out}");
    }

    // ---- guestfwd_rule ----

    fn target() -> SocketAddr {
        "127.0.0.1:40123".parse().unwrap()
    }

    #[test]
    fn rule_simple_path() {
        let rule = guestfwd_rule(
            Ipv4Addr::new(169, 254, 42, 42),
            80,
            Path::new("/usr/bin/imgforge"),
            target(),
        );
        assert_eq!(
            rule,
            "guestfwd=tcp:169.254.42.42:80-cmd:'/usr/bin/imgforge' guestfwd-bridge 127.0.0.1:40123"
        );
    }

    #[test]
    fn rule_doubles_commas() {
        let rule = guestfwd_rule(
            Ipv4Addr::new(169, 254, 42, 42),
            80,
            Path::new("/opt/a,b/imgforge"),
            target(),
        );
        assert_eq!(
            rule,
            "guestfwd=tcp:169.254.42.42:80-cmd:'/opt/a,,b/imgforge' guestfwd-bridge 127.0.0.1:40123"
        );
    }

    /// Undo QEMU's comma escaping, then split the command the way a POSIX
    /// shell does (g_shell_parse_argv follows the same quoting rules).
    fn shell_split_cmd(rule: &str) -> Vec<String> {
        let unescaped = rule.replace(",,", ",");
        let cmd = unescaped.split_once("-cmd:").unwrap().1;
        let out = std::process::Command::new("sh")
            .arg("-c")
            .arg(format!("printf '%s\\0' {cmd}"))
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
        String::from_utf8(out.stdout)
            .unwrap()
            .split_terminator('\0')
            .map(str::to_owned)
            .collect()
    }

    #[test]
    fn rule_quotes_awkward_paths() {
        for exe in [
            "/home/me/My Builds/imgforge",
            "/tmp/it's here/imgforge",
            "/tmp/a,b;c $HOME `x` \"q\"/imgforge",
        ] {
            let rule = guestfwd_rule(
                Ipv4Addr::new(169, 254, 42, 42),
                80,
                Path::new(exe),
                target(),
            );
            assert!(rule.starts_with("guestfwd=tcp:169.254.42.42:80-cmd:"));
            // No single comma survives: QEMU would split the option there.
            assert!(
                !rule.replace(",,", "").contains(','),
                "unescaped comma in {rule}"
            );
            assert_eq!(
                shell_split_cmd(&rule),
                vec![exe, BRIDGE_SUBCOMMAND, "127.0.0.1:40123"],
                "{rule}"
            );
        }
    }
}
