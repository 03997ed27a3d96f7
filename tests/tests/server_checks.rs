//! What `imgforge server create|ssh` refuses before anything is created, and what `imgforge
//! inspect` says a busybox root filesystem lacks as a server. No guest boots an OS here: the
//! image is a snapshot of a blank volume, and the one running server is OVMF with nothing to
//! boot.

use std::ffi::OsStr;
use std::process::Output;

use tests::LocalHome;

fn text(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr)
}

/// Runs `imgforge ARGS`, which must fail; returns its output.
fn fails<I, S>(home: &LocalHome, args: I) -> String
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    let out = home.command(args).output().unwrap();
    assert!(!out.status.success(), "succeeded: {}", text(&out));
    text(&out)
}

/// An image `img` of 64 MiB (a snapshot of a blank volume).
fn small_image(home: &LocalHome) {
    let server = home.json(["server", "create", "--name", "src", "--volume", "64M"]);
    let id = server["id"].as_str().unwrap().to_string();
    home.json(["snapshot", "create", &id, "--name", "snap"]);
    home.json(["image", "create", "--name", "img", "--snapshot", "snap"]);
    home.json(["server", "rm", "src"]);
}

#[test]
fn bad_keys_user_data_and_root_sizes_are_refused_before_anything_is_created() {
    let home = LocalHome::new();
    small_image(&home);
    let dir = tempfile::tempdir().unwrap();
    let private = dir.path().join("id_ed25519");
    let st = std::process::Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-f"])
        .arg(&private)
        .status()
        .unwrap();
    assert!(st.success());
    let garbage = dir.path().join("garbage.pub");
    std::fs::write(&garbage, "this is not a key\n").unwrap();
    let binary = dir.path().join("user-data.bin");
    std::fs::write(&binary, [0xff, 0xfe, 0x00, 0x80]).unwrap();
    let missing = dir.path().join("missing.pub");

    let create = |extra: &[&OsStr]| {
        let mut args: Vec<&OsStr> = [
            "server", "create", "--name", "s", "--image", "img", "--expose", "22",
        ]
        .iter()
        .map(OsStr::new)
        .collect();
        args.extend_from_slice(extra);
        fails(&home, args)
    };
    let key = OsStr::new("--ssh-key");
    let err = create(&[key, private.as_os_str()]);
    assert!(
        err.contains("is a private key: give its public half"),
        "{err}"
    );
    let err = create(&[key, garbage.as_os_str()]);
    assert!(err.contains("is not an OpenSSH public key"), "{err}");
    let err = create(&[key, missing.as_os_str()]);
    assert!(err.contains("cannot read the SSH public key"), "{err}");
    let err = create(&[OsStr::new("--user-data"), binary.as_os_str()]);
    assert!(err.contains("is not text"), "{err}");
    let err = create(&[OsStr::new("--root-size"), OsStr::new("32M")]);
    assert!(err.contains("cannot hold snapshot snap"), "{err}");
    assert!(err.contains("give at least 64 MiB"), "{err}");
    // None of them left a server or a volume.
    home.assert_no_servers_left();

    // A bigger root is fine, and the volume has that size.
    let ok = home.json([
        "server",
        "create",
        "--name",
        "s",
        "--image",
        "img",
        "--root-size",
        "128M",
    ]);
    let volume = ok["volumes"][0].as_str().unwrap().to_string();
    let info = tests::judge(
        "qemu-img",
        &[
            OsStr::new("info"),
            OsStr::new("--output=json"),
            home.path()
                .join(format!("volumes/{volume}.qcow2"))
                .as_os_str(),
        ],
    )
    .unwrap();
    let info: serde_json::Value = serde_json::from_str(&info).unwrap();
    assert_eq!(info["virtual-size"], 128u64 << 20, "{info}");
    home.json(["server", "rm", "s"]);
}

#[test]
fn server_ssh_needs_a_running_server_with_port_22() {
    let home = LocalHome::new();
    home.json(["server", "create", "--name", "closed", "--volume", "16M"]);
    home.json([
        "server", "create", "--name", "open", "--volume", "16M", "--expose", "22",
    ]);
    let err = fails(&home, ["server", "ssh", "open", "--", "true"]);
    assert!(
        err.contains("server open is stopped: start it first"),
        "{err}"
    );
    // OVMF finds nothing to boot, but the server runs: the refusal is about the port.
    home.json(["server", "start", "closed"]);
    let err = fails(&home, ["server", "ssh", "closed", "--", "true"]);
    assert!(
        err.contains("does not expose port 22: create it with --expose 22"),
        "{err}"
    );
    home.json(["server", "rm", "--force", "closed"]);
    home.json(["server", "rm", "open"]);
    home.assert_no_servers_left();
}

#[test]
fn inspect_says_what_a_busybox_rootfs_lacks_as_a_server() {
    let dir = tempfile::tempdir().unwrap();
    let tarball = dir.path().join("busybox.tar.gz");
    std::fs::write(&tarball, tests::busybox_rootfs_tar_gz("hello", false)).unwrap();
    let home = LocalHome::new();
    let report = home.json(["inspect".as_ref(), tarball.as_os_str()]);
    let problems: Vec<String> = report["server"]["findings"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["problem"].as_str().unwrap().to_string())
        .collect();
    for expected in [
        "no kernel",
        "no SSH server",
        "no cloud-init",
        "no network configuration",
        "no QEMU guest agent",
        "no growpart",
    ] {
        assert!(
            problems.iter().any(|p| p.starts_with(expected)),
            "{expected} in {problems:?}"
        );
    }
    let out = home
        .command(["inspect".as_ref(), tarball.as_os_str()])
        .output()
        .unwrap();
    assert!(out.status.success());
    assert!(
        text(&out).contains("missing: no SSH server (sshd) (install openssh-server)"),
        "{}",
        text(&out)
    );
}

#[test]
fn the_server_test_of_an_image_that_never_answers_fails_and_leaves_nothing() {
    let home = LocalHome::new();
    small_image(&home);
    // A blank disk: OVMF boots nothing, so SSH never answers.
    let err = fails(&home, ["boot", "img", "--ssh", "--timeout", "15"]);
    assert!(err.contains("no SSH login after 15s"), "{err}");
    home.assert_no_servers_left();
}
