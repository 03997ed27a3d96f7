//! What mmdebstrap's unshare mode (a non-root user building `debian:SUITE`) needs from this
//! machine, checked before mmdebstrap runs so that a missing piece is named with its fix instead
//! of mmdebstrap's raw `E: cannot find newuidmap`.
//!
//! The needs, as mmdebstrap checks them: `newuidmap` and `newgidmap` on PATH (the setuid helpers
//! of Debian's `uidmap`), one entry for the user's *name* in `/etc/subuid` and `/etc/subgid`
//! (large enough for a Debian system's ids, up to 65534), and unprivileged user namespaces.
//! [`problems`] is the pure decision over [`Facts`]; [`Facts::gather`] reads this machine.

use std::process::Command;

use crate::tools;

/// How many subordinate ids a Debian rootfs needs: its ids run up to 65534 (`nobody`).
pub const SUBIDS_NEEDED: u64 = 65536;

/// What the checks read from the machine.
#[derive(Debug, Clone)]
pub struct Facts {
    pub user: String,
    pub newuidmap: bool,
    pub newgidmap: bool,
    /// The contents of `/etc/subuid` and `/etc/subgid` (None when unreadable).
    pub subuid: Option<String>,
    pub subgid: Option<String>,
    /// Why creating a user namespace failed, if it did.
    pub userns_error: Option<String>,
    /// `kernel.apparmor_restrict_unprivileged_userns` is 1 (Ubuntu 23.10 and later).
    pub apparmor_restricts_userns: bool,
}

impl Facts {
    /// Reads this machine, for the calling user.
    pub fn gather() -> Facts {
        let uid = nix::unistd::getuid();
        let user = nix::unistd::User::from_uid(uid)
            .ok()
            .flatten()
            .map(|u| u.name)
            .unwrap_or_else(|| uid.to_string());
        Facts {
            user,
            newuidmap: tools::on_path("newuidmap"),
            newgidmap: tools::on_path("newgidmap"),
            subuid: std::fs::read_to_string("/etc/subuid").ok(),
            subgid: std::fs::read_to_string("/etc/subgid").ok(),
            userns_error: probe_user_namespace().err(),
            apparmor_restricts_userns: std::fs::read_to_string(
                "/proc/sys/kernel/apparmor_restrict_unprivileged_userns",
            )
            .is_ok_and(|v| v.trim() == "1"),
        }
    }
}

/// Creates a user namespace in a child process (the way mmdebstrap first tries it).
fn probe_user_namespace() -> Result<(), String> {
    use std::os::unix::process::CommandExt;
    // Any program will do: what is probed is the unshare before the exec.
    let mut cmd = Command::new("/bin/sh");
    cmd.args(["-c", "exit 0"])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null());
    // SAFETY: unshare(2) is a plain system call, safe between fork and exec.
    unsafe {
        cmd.pre_exec(|| {
            nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWUSER).map_err(std::io::Error::from)
        });
    }
    match cmd.status() {
        Ok(s) if s.success() => Ok(()),
        Ok(s) => Err(format!("the probe exited with {s}")),
        Err(e) => Err(format!("unshare(CLONE_NEWUSER): {e}")),
    }
}

/// The subordinate id range of `user` in a subuid/subgid file: (start, count).
fn entry(file: &str, user: &str) -> Option<(u64, u64)> {
    file.lines().find_map(|line| {
        let mut f = line.trim().splitn(3, ':');
        if f.next()? != user {
            return None;
        }
        Some((
            f.next()?.trim().parse().ok()?,
            f.next()?.trim().parse().ok()?,
        ))
    })
}

/// A range after every range already given out (at least 100000, as useradd starts).
fn free_range(files: &[&str]) -> u64 {
    files
        .iter()
        .flat_map(|f| f.lines())
        .filter_map(|line| {
            let mut f = line.trim().splitn(3, ':').skip(1);
            Some(f.next()?.trim().parse::<u64>().ok()? + f.next()?.trim().parse::<u64>().ok()?)
        })
        .fold(100_000, u64::max)
}

/// Each missing prerequisite, in words that say how to fix it. Empty when mmdebstrap's unshare
/// mode can work.
pub fn problems(facts: &Facts) -> Vec<String> {
    let mut out = Vec::new();
    for (present, tool) in [
        (facts.newuidmap, "newuidmap"),
        (facts.newgidmap, "newgidmap"),
    ] {
        if !present {
            out.push(tools::tool(tool).not_installed());
        }
    }
    let user = &facts.user;
    let mut missing_files = Vec::new();
    for (path, contents) in [
        ("/etc/subuid", &facts.subuid),
        ("/etc/subgid", &facts.subgid),
    ] {
        match contents.as_deref().map(|c| entry(c, user)) {
            None => missing_files.push(format!("{path} does not exist or cannot be read")),
            Some(None) => missing_files.push(format!("{path} has no entry for the user {user}")),
            Some(Some((_, count))) if count < SUBIDS_NEEDED => missing_files.push(format!(
                "{path} gives {user} {count} subordinate ids, fewer than the {SUBIDS_NEEDED} a Debian system needs"
            )),
            Some(Some(_)) => {}
        }
    }
    if !missing_files.is_empty() {
        let start = free_range(&[
            facts.subuid.as_deref().unwrap_or(""),
            facts.subgid.as_deref().unwrap_or(""),
        ]);
        let end = start + SUBIDS_NEEDED - 1;
        out.push(format!(
            "{}: run `sudo usermod --add-subuids {start}-{end} --add-subgids {start}-{end} {user}`",
            missing_files.join("; ")
        ));
    }
    if let Some(why) = &facts.userns_error {
        out.push(format!(
            "unprivileged user namespaces are not available ({why}): enable them \
             (`sudo sysctl -w kernel.unprivileged_userns_clone=1` on Debian's older kernels, \
             `user.max_user_namespaces` above 0)"
        ));
    } else if facts.apparmor_restricts_userns {
        out.push(
            "AppArmor restricts unprivileged user namespaces \
             (kernel.apparmor_restrict_unprivileged_userns=1): allow mmdebstrap in an AppArmor \
             profile, or `sudo sysctl -w kernel.apparmor_restrict_unprivileged_userns=0`"
                .to_string(),
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ready() -> Facts {
        Facts {
            user: "alice".into(),
            newuidmap: true,
            newgidmap: true,
            subuid: Some("bob:100000:65536\nalice:165536:65536\n".into()),
            subgid: Some("alice:165536:65536\n".into()),
            userns_error: None,
            apparmor_restricts_userns: false,
        }
    }

    #[test]
    fn a_ready_machine_has_no_problem() {
        assert_eq!(problems(&ready()), Vec::<String>::new());
    }

    #[test]
    fn a_missing_newuidmap_names_the_package() {
        let facts = Facts {
            newuidmap: false,
            ..ready()
        };
        assert_eq!(
            problems(&facts),
            ["newuidmap is not installed: apt-get install uidmap"]
        );
    }

    #[test]
    fn a_missing_entry_gets_a_free_range_and_the_usermod_line() {
        let facts = Facts {
            subgid: Some("bob:100000:65536\n".into()),
            subuid: Some("bob:100000:65536\nalicia:165536:65536\n".into()),
            ..ready()
        };
        let p = problems(&facts);
        assert_eq!(p.len(), 1, "{p:?}");
        assert!(
            p[0].contains("/etc/subuid has no entry for the user alice"),
            "{p:?}"
        );
        assert!(
            p[0].contains("/etc/subgid has no entry for the user alice"),
            "{p:?}"
        );
        assert!(
            p[0].ends_with(
                "`sudo usermod --add-subuids 231072-296607 --add-subgids 231072-296607 alice`"
            ),
            "{p:?}"
        );
    }

    #[test]
    fn a_small_range_an_unreadable_file_and_no_user_namespaces_are_each_named() {
        let facts = Facts {
            subuid: Some("alice:100000:1000\n".into()),
            subgid: None,
            userns_error: Some("unshare(CLONE_NEWUSER): Operation not permitted".into()),
            ..ready()
        };
        let p = problems(&facts);
        assert_eq!(p.len(), 2, "{p:?}");
        assert!(p[0].contains("gives alice 1000 subordinate ids"), "{p:?}");
        assert!(
            p[0].contains("/etc/subgid does not exist or cannot be read"),
            "{p:?}"
        );
        assert!(
            p[1].starts_with("unprivileged user namespaces are not available"),
            "{p:?}"
        );
        let apparmor = Facts {
            apparmor_restricts_userns: true,
            ..ready()
        };
        assert!(problems(&apparmor)[0].contains("AppArmor"));
    }

    #[test]
    fn this_machine_can_create_a_user_namespace() {
        // The probe itself: CI runs as root, where this always works; a false "not available"
        // here would refuse every non-root build.
        assert_eq!(probe_user_namespace(), Ok(()));
    }
}
