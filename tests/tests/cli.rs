//! The `imgforge` binary as a user runs it.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Duration;

use tests::{agent_bin, imgforge_bin};

#[test]
fn initrd_output_is_byte_identical_across_runs() {
    let a = tempfile::tempdir().unwrap();
    let b = tempfile::tempdir().unwrap();
    for dir in [a.path(), b.path()] {
        let out = Command::new(imgforge_bin())
            .args([
                "--json",
                "initrd",
                "--bootscript",
                "image-creation-x86_64",
                "-o",
            ])
            .arg(dir)
            .env("IMGFORGE_AGENT", agent_bin())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let info: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(info["initrd_sha256"].as_str().unwrap().len(), 64);
    }
    for f in ["vmlinuz", "initrd.img", "bootscript.json"] {
        let x = std::fs::read(a.path().join(f)).unwrap();
        let y = std::fs::read(b.path().join(f)).unwrap();
        assert!(x == y, "{f} differs between two runs");
    }
    let json: serde_json::Value =
        serde_json::from_slice(&std::fs::read(a.path().join("bootscript.json")).unwrap()).unwrap();
    let initrd = std::fs::read(a.path().join("initrd.img")).unwrap();
    assert_eq!(json["initrd_sha256"], initrd::sha256_hex(&initrd));
    assert_eq!(json["arch"], "x86_64");
    assert!(json["bootcmdargs"]
        .as_str()
        .unwrap()
        .contains("console=ttyS0"));
}

#[test]
fn initrd_with_an_unknown_bootscript_lists_the_known_ones() {
    let out = Command::new(imgforge_bin())
        .args(["initrd", "--bootscript", "nope", "-o", "/tmp/never"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("no bootscript named 'nope'") && err.contains("image-creation-x86_64"),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn serve_prints_unguessable_urls_serves_the_bytes_and_stops_on_sigint() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("rootfs.tar");
    let data: Vec<u8> = (0..3_000_000u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 24) as u8)
        .collect();
    std::fs::write(&file, &data).unwrap();
    let mut child = Command::new(imgforge_bin())
        .arg("serve")
        .arg(&file)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut first = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut first)
        .unwrap();
    let fields: Vec<&str> = first.split_whitespace().collect();
    let (url, size, sha) = (fields[0], fields[1], fields[2]);
    assert!(url.starts_with("http://127.0.0.1:"), "{first}");
    assert!(url.ends_with("/rootfs.tar"), "{first}");
    assert_eq!(size, "3000000");
    assert_eq!(sha, initrd::sha256_hex(&data));
    let token = url.rsplit('/').nth(1).unwrap();
    assert!(token.len() >= 32, "token of at least 128 bits: {token}");

    let client = reqwest::Client::new();
    let body = client.get(url).send().await.unwrap().bytes().await.unwrap();
    assert!(body[..] == data[..]);
    let other = url.replace("/rootfs.tar", "/etc-passwd");
    assert_eq!(client.get(&other).send().await.unwrap().status(), 404);

    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGINT,
    )
    .unwrap();
    let started = std::time::Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "imgforge serve did not stop on SIGINT"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(status.success(), "{status}");
}

#[test]
fn an_interrupted_rootfs_build_leaves_no_partial_output() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("rootfs.tar.zst");
    // `tar:-` reads stdin, which is kept open and fed half a tar header, so
    // the build is in progress when the signal comes.
    let mut child = Command::new(imgforge_bin())
        .args(["rootfs", "tar:-", "-o"])
        .arg(&out)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    std::io::Write::write_all(&mut stdin, &[b'a'; 300]).unwrap();
    // Wait until the partial file exists, then interrupt.
    let started = std::time::Instant::now();
    while std::fs::read_dir(dir.path()).unwrap().count() == 0 {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "no partial output appeared"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGINT,
    )
    .unwrap();
    let status = child.wait().unwrap();
    drop(stdin);
    assert_eq!(status.code(), Some(130), "{status}");
    let left: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .flatten()
        .map(|e| e.file_name())
        .collect();
    assert!(left.is_empty(), "left behind: {left:?}");
}

#[test]
fn image_export_refuses_the_scaleway_provider() {
    // The local provider's home stays empty: it is not opened for a
    // Scaleway image.
    let home = tempfile::tempdir().unwrap();
    let out_dir = tempfile::tempdir().unwrap();
    let output = out_dir.path().join("x.qcow2");
    let out = Command::new(imgforge_bin())
        .args(["image", "export", "SOMEID", "--format", "qcow2", "-o"])
        .arg(&output)
        .args(["--provider", "scaleway"])
        .env("IMGFORGE_HOME", home.path())
        // Dummy credentials and a closed API port: the refusal comes before
        // any Scaleway call, whatever the configuration.
        .env("SCW_ACCESS_KEY", "SCWXXXXXXXXXXXXXXXXX")
        .env("SCW_SECRET_KEY", "11111111-1111-1111-1111-111111111111")
        .env(
            "SCW_DEFAULT_PROJECT_ID",
            "11111111-1111-1111-1111-111111111111",
        )
        .env("SCW_API_URL", "http://127.0.0.1:9")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("image export reads the local provider's images")
            && err.contains("a Scaleway image cannot be exported here")
            && err.contains("scw instance snapshot export"),
        "{err}"
    );
    assert!(!output.exists());
    let left: Vec<_> = std::fs::read_dir(home.path()).unwrap().flatten().collect();
    assert!(left.is_empty(), "the local provider was opened: {left:?}");
}

#[test]
fn boot_refuses_a_missing_file_and_times_out_on_a_blank_disk() {
    let out = Command::new(imgforge_bin())
        .args(["boot", "/nonexistent/disk.raw"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("/nonexistent/disk.raw") && err.contains("not a disk image file"),
        "{err}"
    );

    // A blank disk has nothing to boot: the wait ends at the timeout with the
    // console tail, and no QEMU is left running.
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("blank.raw");
    std::fs::File::create(&disk)
        .unwrap()
        .set_len(64 << 20)
        .unwrap();
    let started = std::time::Instant::now();
    let out = Command::new(imgforge_bin())
        .env("IMGFORGE_ACCEL", "tcg")
        .arg("boot")
        .arg(&disk)
        .args(["--expect", "login:", "--timeout", "12"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("no console line matching /login:/"), "{err}");
    assert!(started.elapsed() < Duration::from_secs(40));
    let ps = Command::new("pgrep")
        .args(["-f", disk.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(
        ps.stdout.is_empty(),
        "a QEMU for the blank disk is still running"
    );
}

#[test]
fn an_interrupted_boot_leaves_no_qemu_behind() {
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("blank-interrupted.raw");
    std::fs::File::create(&disk)
        .unwrap()
        .set_len(64 << 20)
        .unwrap();
    let mut child = Command::new(imgforge_bin())
        .env("IMGFORGE_ACCEL", "tcg")
        .arg("boot")
        .arg(&disk)
        .args(["--timeout", "120"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let qemu_running = || {
        !Command::new("pgrep")
            .args(["-f", disk.to_str().unwrap()])
            .output()
            .unwrap()
            .stdout
            .is_empty()
    };
    let started = std::time::Instant::now();
    while !qemu_running() {
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "QEMU never started"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGINT,
    )
    .unwrap();
    assert_eq!(child.wait().unwrap().code(), Some(130));
    std::thread::sleep(Duration::from_millis(500));
    assert!(!qemu_running(), "QEMU survived the interrupted boot");
}
