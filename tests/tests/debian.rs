//! The end-to-end flow on the local provider: `imgforge build --rootfs
//! debian:bookworm` (the cloud profile: mmdebstrap, then from-rootfs in a QEMU
//! build server, GRUB installed from inside the rootfs), `imgforge boot IMAGE`
//! to a login prompt under OVMF, `imgforge inspect` on the exported raw disk,
//! then servers made from the image, judged by real clients: OpenSSH logs in
//! with the key given at creation, an unmodified cloud-init runs the user data
//! with the Scaleway datasource, and the QEMU guest agent answers.

use std::ffi::OsStr;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use tests::{bootscript_dir, judge, LocalHome};

const USER_DATA: &str = "#cloud-config
write_files:
  - path: /etc/imgforge-test.txt
    content: written by cloud-init
runcmd:
  - [sh, -c, \"echo ran > /root/runcmd-marker\"]
";

fn text(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr)
}

/// `imgforge server ssh SERVER -- COMMAND` (the key the server was created with).
fn ssh(home: &LocalHome, server: &str, command: &str) -> Output {
    home.command(["server", "ssh", server, "--", command])
        .output()
        .unwrap()
}

/// Waits until `ssh SERVER true` works; returns how long it took.
fn wait_for_ssh(home: &LocalHome, server: &str, timeout: Duration) -> Duration {
    let started = Instant::now();
    loop {
        let out = ssh(home, server, "true");
        if out.status.success() {
            return started.elapsed();
        }
        assert!(
            started.elapsed() < timeout,
            "no SSH login to {server} after {timeout:?}: {}\nconsole:\n{}",
            text(&out),
            console(home, server)
        );
        std::thread::sleep(Duration::from_secs(3));
    }
}

fn console(home: &LocalHome, server: &str) -> String {
    let out = home
        .command(["server", "console", server, "--lines", "30"])
        .output()
        .unwrap();
    text(&out)
}

fn server_id(home: &LocalHome, server: &str) -> String {
    home.json(["server", "get", server])["id"]
        .as_str()
        .unwrap()
        .to_string()
}

fn ssh_port(home: &LocalHome, server: &str) -> u16 {
    let endpoint = home.json(["server", "get", server])["endpoints"]["22"]
        .as_str()
        .unwrap()
        .to_string();
    endpoint.rsplit(':').next().unwrap().parse().unwrap()
}

/// The server's ed25519 host key as its sshd presents it (no login needed).
fn host_key(port: u16, timeout: Duration) -> String {
    let started = Instant::now();
    loop {
        let out = Command::new("ssh-keyscan")
            .args(["-t", "ed25519", "-p", &port.to_string(), "127.0.0.1"])
            .output()
            .unwrap();
        let keys = String::from_utf8_lossy(&out.stdout);
        if let Some(line) = keys.lines().find(|l| l.contains("ssh-ed25519")) {
            return line.split_whitespace().nth(2).unwrap().to_string();
        }
        assert!(started.elapsed() < timeout, "no host key on port {port}");
        std::thread::sleep(Duration::from_secs(3));
    }
}

/// One QEMU guest agent command over the server's channel (`qga.sock`).
fn guest_agent(socket: &Path, request: serde_json::Value) -> serde_json::Value {
    let stream = UnixStream::connect(socket).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let mut writer = &stream;
    let mut reader = BufReader::new(&stream);
    // guest-sync resynchronises the channel (a previous client may have left bytes).
    let sync = serde_json::json!({"execute": "guest-sync", "arguments": {"id": 4242}});
    writeln!(writer, "{sync}").unwrap();
    loop {
        let mut line = String::new();
        reader.read_line(&mut line).unwrap();
        if line.contains("4242") {
            break;
        }
    }
    writeln!(writer, "{request}").unwrap();
    let mut line = String::new();
    reader.read_line(&mut line).unwrap();
    serde_json::from_str(&line).unwrap()
}

/// A file of the guest, read through the guest agent.
fn guest_file(socket: &Path, path: &str) -> String {
    let handle = guest_agent(
        socket,
        serde_json::json!({"execute": "guest-file-open", "arguments": {"path": path}}),
    )["return"]
        .as_i64()
        .unwrap_or_else(|| panic!("guest-file-open {path} failed"));
    let read = guest_agent(
        socket,
        serde_json::json!({"execute": "guest-file-read", "arguments": {"handle": handle}}),
    );
    guest_agent(
        socket,
        serde_json::json!({"execute": "guest-file-close", "arguments": {"handle": handle}}),
    );
    let b64 = read["return"]["buf-b64"].as_str().unwrap();
    use base64::Engine as _;
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(b64)
        .unwrap();
    String::from_utf8(bytes).unwrap()
}

fn key_pair(dir: &Path, name: &str) -> PathBuf {
    let key = dir.join(name);
    let st = Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-f"])
        .arg(&key)
        .status()
        .unwrap();
    assert!(st.success());
    key
}

#[test]
fn debian_bookworm_builds_boots_to_login_and_inspects() {
    let home = LocalHome::new();
    let report = home.json([
        "build",
        "--provider",
        "local",
        "--rootfs",
        "debian:bookworm",
        "--hostname",
        "imgforge-debian",
        "--name",
        "t",
        "--size",
        "2G",
        "--bootscript-dir",
        bootscript_dir().to_str().unwrap(),
    ]);
    assert_eq!(report["done"]["status"], "0", "{report}");
    // The cloud profile lacks nothing a server needs (checked before the build).
    assert_eq!(
        report["readiness"]["findings"],
        serde_json::json!([]),
        "{report}"
    );
    home.assert_no_servers_left();

    let boot = home.json([
        "boot",
        "t",
        "--expect",
        "login:",
        "--timeout",
        &Duration::from_secs(300).as_secs().to_string(),
    ]);
    assert!(
        boot["matched"]
            .as_str()
            .unwrap()
            .contains("imgforge-debian login:"),
        "{boot}"
    );

    let raw = home.path().join("t.raw");
    home.json([
        "image".as_ref(),
        "export".as_ref(),
        OsStr::new("t"),
        "-o".as_ref(),
        raw.as_os_str(),
        "--format".as_ref(),
        "raw".as_ref(),
    ]);
    let sgdisk = judge("sgdisk", &[OsStr::new("-v"), raw.as_os_str()]).unwrap();
    assert!(sgdisk.contains("No problems found"), "{sgdisk}");

    let facts = home.json(["inspect".as_ref(), raw.as_os_str()]);
    assert_eq!(facts["partition_table"], "gpt", "{facts}");
    let partitions = facts["partitions"].as_array().unwrap();
    let esp = partitions
        .iter()
        .find(|p| p["number"] == 15)
        .expect("partition 15 (ESP)");
    assert_eq!(esp["type_name"], "EFI System");
    let files: Vec<&str> = esp["filesystem"]["fat"]["files"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["path"].as_str().unwrap())
        .collect();
    assert!(
        files
            .iter()
            .any(|f| f.eq_ignore_ascii_case("EFI/BOOT/BOOTX64.EFI")),
        "{files:?}"
    );
    let root = partitions
        .iter()
        .find(|p| p["number"] == 1)
        .expect("partition 1 (root)");
    let ext4 = &root["filesystem"]["ext4"];
    assert_eq!(
        ext4["os_release"]["pretty_name"], "Debian GNU/Linux 12 (bookworm)",
        "{root}"
    );
    assert!(
        ext4["kernels"]
            .as_array()
            .unwrap()
            .iter()
            .any(|k| k.as_str().unwrap().contains("vmlinuz-")),
        "{root}"
    );
    assert_eq!(ext4["hostname"], "imgforge-debian");
    // Offline, the disk says it can be a server: nothing missing, no defect.
    assert_eq!(ext4["server"]["findings"], serde_json::json!([]), "{root}");
    std::fs::remove_file(&raw).unwrap();

    servers_from_the_image(&home);
    home.assert_no_servers_left();
}

/// Servers made from image `t`: one with a key, user data and a root volume twice the image's;
/// one without a key. Then the server test (`imgforge boot t --ssh`).
fn servers_from_the_image(home: &LocalHome) {
    let keys = tempfile::tempdir().unwrap();
    let key = key_pair(keys.path(), "id_a");
    let user_data = keys.path().join("user-data");
    std::fs::write(&user_data, USER_DATA).unwrap();
    let pub_a = key.with_extension("pub");
    home.json([
        "server".as_ref(),
        "create".as_ref(),
        OsStr::new("--name"),
        OsStr::new("web-a"),
        OsStr::new("--image"),
        OsStr::new("t"),
        OsStr::new("--root-size"),
        OsStr::new("4G"),
        OsStr::new("--ssh-key"),
        pub_a.as_os_str(),
        OsStr::new("--user-data"),
        user_data.as_os_str(),
        OsStr::new("--expose"),
        OsStr::new("22"),
    ]);
    home.json([
        "server", "create", "--name", "web-b", "--image", "t", "--expose", "22",
    ]);
    let started = Instant::now();
    home.json(["server", "start", "web-a"]);
    home.json(["server", "start", "web-b"]);

    let ssh_ready = wait_for_ssh(home, "web-a", Duration::from_secs(600));
    let out = ssh(home, "web-a", "cloud-init status --wait --long");
    let cloud_init_done = started.elapsed();
    println!(
        "web-a: SSH after {:.0} s, cloud-init done after {:.0} s (with web-b booting beside it)",
        ssh_ready.as_secs_f64(),
        cloud_init_done.as_secs_f64()
    );
    assert!(text(&out).contains("status: done"), "{}", text(&out));
    let facts = |command: &str| {
        let out = ssh(home, "web-a", command);
        assert!(out.status.success(), "{command}: {}", text(&out));
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    };
    // The user data ran: write_files (init stage) and runcmd (final stage).
    assert_eq!(facts("cat /etc/imgforge-test.txt"), "written by cloud-init");
    assert_eq!(facts("cat /root/runcmd-marker"), "ran");
    // An unmodified cloud-init picked the Scaleway datasource by the SMBIOS manufacturer.
    assert_eq!(facts("cloud-init query platform"), "scaleway");
    assert_eq!(facts("hostname"), "web-a");
    // The root partition and filesystem grew to the 4 GiB volume (image: 2 GiB).
    let root_bytes: u64 = facts("df -B1 --output=size / | tail -1").parse().unwrap();
    assert!(root_bytes > 3 << 30, "root is {root_bytes} bytes");
    let state = facts("systemctl is-system-running || true");
    let failed = facts("systemctl --failed --no-legend --plain || true");
    assert_eq!(state, "running", "failed units: {failed}");
    assert_eq!(facts("systemctl is-active qemu-guest-agent"), "active");
    let machine_id_a = facts("cat /etc/machine-id");
    let host_key_a = facts("cut -d' ' -f2 /etc/ssh/ssh_host_ed25519_key.pub");

    // web-b: no key was given. Its host key and machine-id are its own.
    let port_b = ssh_port(home, "web-b");
    let host_key_b = host_key(port_b, Duration::from_secs(600));
    assert_ne!(host_key_a, host_key_b, "two servers share an SSH host key");
    let socket_b = home
        .path()
        .join("servers")
        .join(server_id(home, "web-b"))
        .join("qga.sock");
    let machine_id_b = guest_file(&socket_b, "/etc/machine-id").trim().to_string();
    assert_eq!(machine_id_b.len(), 32, "{machine_id_b:?}");
    assert_ne!(machine_id_a, machine_id_b, "two servers share a machine-id");
    // Without a key, nobody logs in: the key of web-a is refused, and the server offers no
    // password or keyboard-interactive login at all.
    let refused = home
        .command([
            "server".as_ref(),
            "ssh".as_ref(),
            OsStr::new("web-b"),
            OsStr::new("-i"),
            key.as_os_str(),
            OsStr::new("--"),
            OsStr::new("true"),
        ])
        .output()
        .unwrap();
    assert!(!refused.status.success());
    assert!(
        text(&refused).contains("Permission denied (publickey)"),
        "{}",
        text(&refused)
    );

    for server in ["web-a", "web-b"] {
        home.json(["server", "rm", "--force", server]);
    }

    // The server test, as the README's main job runs it.
    let report = home.json([
        "boot",
        "t",
        "--ssh",
        "--command",
        "cloud-init query platform",
        "--timeout",
        "600",
    ]);
    println!("imgforge boot t --ssh: {report}");
    assert_eq!(
        report["output"].as_str().unwrap().trim(),
        "scaleway",
        "{report}"
    );
    assert!(
        report["cloud_init_done_s"].as_f64().unwrap() >= report["ssh_ready_s"].as_f64().unwrap()
    );
}
