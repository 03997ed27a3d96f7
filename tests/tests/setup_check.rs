//! `scripts/setup.sh --check` and imgforge's own "not installed" errors come from one list
//! (scripts/tools.list): a tool hidden from PATH is named by both, with the same install command.

use std::path::PathBuf;
use std::process::Command;

use tests::unix_user::path_without;
use tests::{imgforge_bin, workspace_root};

fn setup_script() -> PathBuf {
    workspace_root().join("scripts/setup.sh")
}

/// The PATH this test runs with, as a list of directories.
fn path_dirs() -> Vec<String> {
    std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default())
        .map(|p| p.to_string_lossy().into_owned())
        .collect()
}

fn check_with_path(path: &str) -> (bool, String) {
    let out = Command::new("bash")
        .arg(setup_script())
        .arg("--check")
        .env("PATH", path)
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

#[test]
fn the_check_passes_on_a_set_up_machine() {
    let (ok, text) = check_with_path(&std::env::var("PATH").unwrap());
    assert!(ok, "{text}");
    let listed = host::tools::all().len();
    assert!(
        text.contains(&format!("setup: all {listed} tools present")),
        "{text}"
    );
}

#[test]
fn a_tool_hidden_from_path_is_named_by_setup_and_by_imgforge_alike() {
    let dirs = path_dirs();
    let dirs: Vec<&str> = dirs.iter().map(String::as_str).collect();
    let farm = path_without(&["qemu-img"], &dirs).unwrap();
    let path = farm.path().to_str().unwrap();

    let (ok, text) = check_with_path(path);
    assert!(!ok, "the check passed without qemu-img:\n{text}");
    let expected = host::tools::tool("qemu-img").not_installed();
    assert_eq!(
        expected,
        "qemu-img is not installed: apt-get install qemu-utils"
    );
    assert!(text.contains(&format!("missing: {expected}")), "{text}");
    let total = host::tools::all().len();
    assert!(
        text.contains(&format!("setup: 1 of {total} tools missing")),
        "only qemu-img should be missing:\n{text}"
    );

    // imgforge itself, needing qemu-img for a volume, says the same words.
    let home = tempfile::tempdir().unwrap();
    let out = Command::new(imgforge_bin())
        .args(["server", "create", "--name", "s", "--volume", "1G"])
        .env("IMGFORGE_HOME", home.path())
        .env("PATH", path)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(stderr.contains(&expected), "{stderr}");
    // Nothing half-made is left: no server record.
    let list = Command::new(imgforge_bin())
        .args(["server", "list", "--json"])
        .env("IMGFORGE_HOME", home.path())
        .output()
        .unwrap();
    let servers: serde_json::Value = serde_json::from_slice(&list.stdout).unwrap();
    assert_eq!(servers.as_array().map(Vec::len), Some(0), "{servers}");
}

#[test]
fn setup_refuses_an_unknown_argument() {
    let out = Command::new("bash")
        .arg(setup_script())
        .arg("--chek")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("unknown argument '--chek'"));
}
