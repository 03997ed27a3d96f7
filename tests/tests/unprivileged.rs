//! `imgforge rootfs debian:bookworm --profile minimal` as a non-root user (mmdebstrap's unshare mode), run as a
//! user this test creates; and the clear errors when one of that mode's prerequisites is
//! missing (newuidmap hidden from PATH, no /etc/subuid entry). Needs root to make the users,
//! as CI has; the build downloads about 130 MB from Debian's archive. Root mode (imgforge run
//! as root) is the path of tests/debian.rs.

use std::ffi::OsStr;
use std::process::Command;
use std::time::Instant;

use tests::imgforge_bin;
use tests::unix_user::{path_without, TestUser, USER_PATH};

fn text(out: &std::process::Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

#[test]
fn a_non_root_user_builds_debian_bookworm() {
    let user = TestUser::create("deb").unwrap();
    let imgforge = user.install(&imgforge_bin()).unwrap();
    let out_file = user.dir().join("bookworm.tar.zst");
    let started = Instant::now();
    let out = user
        .run(
            USER_PATH,
            &imgforge,
            [
                OsStr::new("--json"),
                OsStr::new("rootfs"),
                OsStr::new("debian:bookworm"),
                OsStr::new("--profile"),
                OsStr::new("minimal"),
                OsStr::new("--hostname"),
                OsStr::new("imgforge-debian"),
                OsStr::new("-o"),
                out_file.as_os_str(),
            ],
        )
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    println!(
        "debian:bookworm as {}: {report} in {:?}",
        user.name,
        started.elapsed()
    );
    let sha256 = Command::new("sha256sum").arg(&out_file).output().unwrap();
    assert_eq!(
        report["sha256"].as_str().unwrap(),
        String::from_utf8_lossy(&sha256.stdout)
            .split(' ')
            .next()
            .unwrap()
    );

    // GNU tar judges the output. Owners are numeric and must be the rootfs's own ids (the user
    // namespace mapped them back), not the building user's.
    let tar = |args: &[&str]| {
        let o = Command::new("tar")
            .args(args)
            .arg(&out_file)
            .output()
            .unwrap();
        assert!(o.status.success(), "tar {args:?}: {}", text(&o));
        String::from_utf8(o.stdout).unwrap()
    };
    let listing = tar(&["--numeric-owner", "-tvf"]);
    let names: Vec<String> = tar(&["-tf"])
        .lines()
        .map(|n| n.trim_start_matches("./").to_string())
        .collect();
    assert_eq!(names.len() as u64, report["entries"].as_u64().unwrap());
    assert_eq!(names[0], "", "the root comes first");
    let line_of = |name: &str| {
        listing
            .lines()
            .find(|l| l.ends_with(&format!(" ./{name}")))
            .unwrap_or_else(|| panic!("no {name} in the tarball"))
            .to_string()
    };
    assert!(
        line_of("etc/shadow").contains(" 0/42 "),
        "{}",
        line_of("etc/shadow")
    );
    assert!(
        line_of("usr/bin/passwd").starts_with("-rwsr-xr-x 0/0 "),
        "{}",
        line_of("usr/bin/passwd")
    );
    for prefix in ["boot/vmlinuz-", "boot/initrd.img-"] {
        assert!(names.iter().any(|n| n.starts_with(prefix)), "no {prefix}*");
    }
    for wanted in [
        &["usr/sbin/grub-install"][..],
        &["usr/lib/systemd/systemd", "lib/systemd/systemd"],
        &["usr/sbin/mke2fs", "sbin/mke2fs"],
    ] {
        assert!(
            names.iter().any(|n| wanted.contains(&n.as_str())),
            "none of {wanted:?}"
        );
    }

    let file = |name: &str| {
        let o = Command::new("tar")
            .arg("-xOf")
            .arg(&out_file)
            .arg(name)
            .output()
            .unwrap();
        assert!(o.status.success(), "tar -xOf {name}: {}", text(&o));
        String::from_utf8(o.stdout).unwrap()
    };
    assert_eq!(file("./etc/hostname"), "imgforge-debian\n");
    // The minimal profile is not a cloud server, and inspect says what it lacks.
    let inspect = Command::new(imgforge_bin())
        .args(["--json", "inspect"])
        .arg(&out_file)
        .output()
        .unwrap();
    assert!(inspect.status.success(), "{}", text(&inspect));
    let report: serde_json::Value = serde_json::from_slice(&inspect.stdout).unwrap();
    let problems = report["server"]["findings"].to_string();
    for expected in [
        "no SSH server",
        "no cloud-init",
        "no network configuration",
        "no QEMU guest agent",
        "no growpart",
    ] {
        assert!(problems.contains(expected), "{expected} in {problems}");
    }
    assert!(
        !problems.contains("no kernel") && !problems.contains("defect"),
        "{problems}"
    );
    let grub_cfg = file("./etc/default/grub.d/50-imgforge-serial.cfg");
    assert!(
        grub_cfg.contains("GRUB_CMDLINE_LINUX=\"console=tty0 console=ttyS0,115200\"")
            && grub_cfg.contains("GRUB_TIMEOUT=1")
            && grub_cfg.contains("GRUB_TERMINAL=\"console serial\""),
        "{grub_cfg}"
    );
}

/// `imgforge rootfs debian:bookworm` as `user` with `path` as PATH, which must fail: its output,
/// and where the tarball would have been.
fn failed_build(user: &TestUser, path: &str) -> (String, std::path::PathBuf) {
    let imgforge = user.install(&imgforge_bin()).unwrap();
    let target = user.dir().join("x.tar");
    let out = user
        .run(
            path,
            &imgforge,
            [
                OsStr::new("rootfs"),
                OsStr::new("debian:bookworm"),
                OsStr::new("-o"),
                target.as_os_str(),
            ],
        )
        .unwrap();
    let text = text(&out);
    assert!(!out.status.success(), "{text}");
    (text, target)
}

#[test]
fn without_newuidmap_the_error_names_it_and_its_package() {
    let user = TestUser::create("nomap").unwrap();
    let farm = path_without(&["newuidmap", "newgidmap"], &["/usr/local/bin", "/usr/bin"]).unwrap();
    let (text, target) = failed_build(&user, farm.path().to_str().unwrap());
    assert!(text.contains("unshare mode"), "{text}");
    assert!(
        text.contains("newuidmap is not installed: apt-get install uidmap"),
        "{text}"
    );
    assert!(
        text.contains("newgidmap is not installed: apt-get install uidmap"),
        "{text}"
    );
    assert!(
        !text.contains("E: cannot find newuidmap"),
        "mmdebstrap ran: {text}"
    );
    assert!(!target.exists(), "a failed build left its output");
}

#[test]
fn without_subordinate_ids_the_error_gives_the_usermod_line() {
    let user = TestUser::create("nosub").unwrap();
    user.remove_subordinate_ids().unwrap();
    let (text, target) = failed_build(&user, USER_PATH);
    assert!(
        text.contains(&format!(
            "/etc/subuid has no entry for the user {}",
            user.name
        )),
        "{text}"
    );
    assert!(
        text.contains("sudo usermod --add-subuids") && text.contains(&user.name),
        "{text}"
    );
    assert!(!target.exists(), "a failed build left its output");
}
