//! A non-root Unix user for a test, made with `useradd` and removed (with its subordinate ids
//! and home) when dropped; commands run as that user through `runuser` with a clean
//! environment. Running as root is required to make one ([`TestUser::create`] says why not).

use std::ffi::OsStr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// A user that exists for the lifetime of the value.
pub struct TestUser {
    pub name: String,
    /// A directory the user owns (mode 0755 so the test can read results).
    pub dir: tempfile::TempDir,
}

/// The PATH a Debian user gets by default (no sbin directories).
pub const USER_PATH: &str = "/usr/local/bin:/usr/bin:/bin";

impl TestUser {
    /// Creates a user `imgforge-<tag>-<pid>` with subordinate ids (useradd gives them on
    /// Debian 12). Errors when not root.
    pub fn create(tag: &str) -> anyhow::Result<TestUser> {
        anyhow::ensure!(
            nix::unistd::geteuid().is_root(),
            "making a test user needs root (CI runs as root)"
        );
        let name = format!("imgforge-{tag}-{}", std::process::id());
        anyhow::ensure!(name.len() <= 32, "user name {name} is too long");
        let out = Command::new("useradd")
            .args(["--create-home", "--shell", "/bin/sh", &name])
            .output()?;
        anyhow::ensure!(
            out.status.success(),
            "useradd {name}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let user = TestUser {
            name,
            dir: tempfile::Builder::new()
                .prefix("imgforge-user-")
                .tempdir()?,
        };
        std::fs::set_permissions(user.dir.path(), std::fs::Permissions::from_mode(0o755))?;
        let chown = Command::new("chown")
            .arg(&user.name)
            .arg(user.dir.path())
            .status()?;
        anyhow::ensure!(chown.success(), "chown {}", user.dir.path().display());
        Ok(user)
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// A copy of `program` the user can run: the test's own build may sit under a directory
    /// only root can enter.
    pub fn install(&self, program: &Path) -> anyhow::Result<PathBuf> {
        let to = self.dir().join(program.file_name().unwrap());
        std::fs::copy(program, &to)?;
        std::fs::set_permissions(&to, std::fs::Permissions::from_mode(0o755))?;
        Ok(to)
    }

    /// Runs `program ARGS` as the user, with only PATH, HOME, USER, LOGNAME and TMPDIR set
    /// (`path` for PATH).
    pub fn run<I, S>(&self, path: &str, program: &Path, args: I) -> std::io::Result<Output>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let home = format!("/home/{}", self.name);
        Command::new("runuser")
            .args(["-u", &self.name, "--", "/usr/bin/env", "-i"])
            .arg(format!("PATH={path}"))
            .arg(format!("HOME={home}"))
            .arg(format!("USER={}", self.name))
            .arg(format!("LOGNAME={}", self.name))
            .arg(format!("TMPDIR={}", self.dir().display()))
            .arg(program)
            .args(args)
            .output()
    }

    /// Removes the user's subordinate uid and gid ranges from /etc/subuid and /etc/subgid.
    pub fn remove_subordinate_ids(&self) -> anyhow::Result<()> {
        for (file, flag) in [
            ("/etc/subuid", "--del-subuids"),
            ("/etc/subgid", "--del-subgids"),
        ] {
            let contents = std::fs::read_to_string(file)?;
            for line in contents.lines() {
                let f: Vec<&str> = line.split(':').collect();
                if f.len() == 3 && f[0] == self.name {
                    let start: u64 = f[1].parse()?;
                    let count: u64 = f[2].parse()?;
                    let range = format!("{start}-{}", start + count - 1);
                    let st = Command::new("usermod")
                        .args([flag, &range, &self.name])
                        .status()?;
                    anyhow::ensure!(st.success(), "usermod {flag} {range} {}", self.name);
                }
            }
        }
        Ok(())
    }
}

impl Drop for TestUser {
    fn drop(&mut self) {
        // mmdebstrap's unshare mode leaves files owned by subordinate ids behind on failure:
        // remove the directory as root before the user.
        let _ = std::fs::remove_dir_all(self.dir.path());
        let _ = Command::new("userdel")
            .args(["--remove", &self.name])
            .output();
    }
}

/// A directory of symlinks to every program in `dirs` except `hidden`, to use as PATH: the way
/// a test makes one tool "not installed" without touching the machine's packages.
pub fn path_without(hidden: &[&str], dirs: &[&str]) -> anyhow::Result<tempfile::TempDir> {
    let farm = tempfile::Builder::new()
        .prefix("imgforge-path-")
        .tempdir()?;
    std::fs::set_permissions(farm.path(), std::fs::Permissions::from_mode(0o755))?;
    for dir in dirs {
        let Ok(entries) = std::fs::read_dir(dir) else {
            continue;
        };
        for entry in entries.flatten() {
            let name = entry.file_name();
            if hidden.iter().any(|h| OsStr::new(h) == name) {
                continue;
            }
            let link = farm.path().join(&name);
            if std::fs::symlink_metadata(&link).is_err() {
                std::os::unix::fs::symlink(entry.path(), link)?;
            }
        }
    }
    Ok(farm)
}
