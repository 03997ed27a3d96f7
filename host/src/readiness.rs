//! Whether a root filesystem can work as a cloud server: the checks `imgforge inspect` reports
//! for a disk and `imgforge build` prints as warnings before it spends a build server.
//!
//! The checks are pure ([`assess`]) over a [`RootView`], a read-only view of the files; the
//! views are an ext4 filesystem read offline (inspect) and a rootfs tarball read in one pass
//! ([`TarView`]). Paths are absolute and not resolved through symlinks, so each check lists the
//! places a file lives with and without merged /usr.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use anyhow::{Context, Result};
use serde::Serialize;

/// Read-only access to a root filesystem's files.
pub trait RootView {
    /// Whether `path` exists (any kind of file).
    fn exists(&self, path: &str) -> bool;
    /// The contents of the regular file `path` (small files only; None when absent).
    fn read(&self, path: &str) -> Option<Vec<u8>>;
    /// The names in directory `path` (empty when absent).
    fn list(&self, path: &str) -> Vec<String>;
}

/// One thing a server needs that the root filesystem lacks or gets wrong.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Finding {
    /// What is missing or wrong, in words.
    pub problem: String,
    /// What to add or change.
    pub fix: String,
    /// `missing` (the server lacks a capability) or `defect` (something that must not be in an
    /// image: shared host keys, a shared machine-id, a root password).
    pub kind: FindingKind,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum FindingKind {
    Missing,
    Defect,
}

/// What the checks found.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Readiness {
    /// What is there, one short line each (`sshd`, `cloud-init (datasources: ...)`...).
    pub present: Vec<String>,
    pub findings: Vec<Finding>,
}

impl Readiness {
    pub fn is_ready(&self) -> bool {
        self.findings.is_empty()
    }

    fn missing(&mut self, problem: impl Into<String>, fix: impl Into<String>) {
        self.findings.push(Finding {
            problem: problem.into(),
            fix: fix.into(),
            kind: FindingKind::Missing,
        });
    }

    fn defect(&mut self, problem: impl Into<String>, fix: impl Into<String>) {
        self.findings.push(Finding {
            problem: problem.into(),
            fix: fix.into(),
            kind: FindingKind::Defect,
        });
    }
}

fn any(view: &dyn RootView, paths: &[&str]) -> bool {
    paths.iter().any(|p| view.exists(p))
}

fn text(view: &dyn RootView, path: &str) -> Option<String> {
    view.read(path)
        .map(|b| String::from_utf8_lossy(&b).into_owned())
}

/// The `*.cfg` files of a directory, sorted, as full paths.
fn files_in(view: &dyn RootView, dir: &str, suffix: &str) -> Vec<String> {
    let mut names: Vec<String> = view
        .list(dir)
        .into_iter()
        .filter(|n| n.ends_with(suffix))
        .collect();
    names.sort();
    names.into_iter().map(|n| format!("{dir}/{n}")).collect()
}

/// cloud-init's datasource_list: the last file that sets it wins (cloud.cfg, then cloud.cfg.d
/// in order). Only the single-line form, which is also all ds-identify reads.
fn datasource_list(view: &dyn RootView) -> Option<Vec<String>> {
    let mut files = vec!["/etc/cloud/cloud.cfg".to_string()];
    files.extend(files_in(view, "/etc/cloud/cloud.cfg.d", ".cfg"));
    let mut list = None;
    for file in files {
        let Some(contents) = text(view, &file) else {
            continue;
        };
        for line in contents.lines() {
            let Some(value) = line.trim_start().strip_prefix("datasource_list:") else {
                continue;
            };
            if line.starts_with(char::is_whitespace) {
                continue;
            }
            let value = value.split('#').next().unwrap_or("").trim();
            let inner = value.trim_start_matches('[').trim_end_matches(']');
            list = Some(
                inner
                    .split(',')
                    .map(|s| s.trim().trim_matches(['"', '\'']).to_string())
                    .filter(|s| !s.is_empty())
                    .collect(),
            );
        }
    }
    list
}

/// Whether the network is configured to come up by itself (DHCP), and how.
fn network_config(view: &dyn RootView) -> Option<String> {
    let networkd = files_in(view, "/etc/systemd/network", ".network")
        .into_iter()
        .filter(|f| {
            text(view, f).is_some_and(|t| t.contains("DHCP=yes") || t.contains("DHCP=ipv4"))
        })
        .collect::<Vec<_>>();
    let networkd_enabled =
        view.exists("/etc/systemd/system/multi-user.target.wants/systemd-networkd.service");
    if let Some(file) = networkd.first() {
        if networkd_enabled {
            return Some(format!("systemd-networkd, DHCP ({file})"));
        }
    }
    let mut ifupdown = vec!["/etc/network/interfaces".to_string()];
    ifupdown.extend(
        view.list("/etc/network/interfaces.d")
            .into_iter()
            .map(|n| format!("/etc/network/interfaces.d/{n}")),
    );
    if any(view, &["/sbin/ifup", "/usr/sbin/ifup"]) {
        if let Some(file) = ifupdown
            .iter()
            .find(|f| text(view, f).is_some_and(|t| t.contains("inet dhcp")))
        {
            return Some(format!("ifupdown, DHCP ({file})"));
        }
    }
    if let Some(file) = files_in(view, "/etc/netplan", ".yaml").first() {
        return Some(format!("netplan ({file})"));
    }
    if any(view, &["/usr/sbin/NetworkManager"]) {
        return Some("NetworkManager".to_string());
    }
    None
}

/// Runs every check.
pub fn assess(view: &dyn RootView) -> Readiness {
    let mut r = Readiness::default();
    let kernels: Vec<String> = view
        .list("/boot")
        .into_iter()
        .filter(|n| n.starts_with("vmlinuz-"))
        .collect();
    if kernels.is_empty() && !view.exists("/vmlinuz") {
        r.missing(
            "no kernel (/boot/vmlinuz-*)",
            "install a kernel package (linux-image-cloud-amd64 on Debian); a container image has none",
        );
    } else {
        r.present.push(format!("kernel ({})", kernels.join(" ")));
    }
    if any(
        view,
        &[
            "/sbin/init",
            "/usr/sbin/init",
            "/lib/systemd/systemd",
            "/usr/lib/systemd/systemd",
        ],
    ) {
        r.present.push("init".into());
    } else {
        r.missing(
            "no init (/sbin/init)",
            "install systemd-sysv (or another init)",
        );
    }
    if any(view, &["/usr/sbin/sshd", "/sbin/sshd"]) {
        r.present.push("sshd".into());
    } else {
        r.missing("no SSH server (sshd)", "install openssh-server");
    }
    if any(view, &["/usr/bin/cloud-init", "/bin/cloud-init"]) {
        match datasource_list(view) {
            Some(list) if !list.iter().any(|d| d == "Scaleway") => {
                r.present
                    .push(format!("cloud-init (datasources: {})", list.join(", ")));
                r.missing(
                    format!(
                        "cloud-init's datasource_list ({}) leaves out Scaleway",
                        list.join(", ")
                    ),
                    "add Scaleway to datasource_list (a file in /etc/cloud/cloud.cfg.d/)",
                );
            }
            Some(list) => r
                .present
                .push(format!("cloud-init (datasources: {})", list.join(", "))),
            None => r
                .present
                .push("cloud-init (datasources: all, detected by ds-identify)".into()),
        }
    } else {
        r.missing(
            "no cloud-init: the server would take no SSH key, hostname or user data",
            "install cloud-init",
        );
    }
    match network_config(view) {
        Some(how) => r.present.push(format!("network: {how}")),
        None => r.missing(
            "no network configuration: the NIC would stay down",
            "a systemd-networkd .network file with DHCP=yes (and systemd-networkd enabled), or ifupdown with `iface eth0 inet dhcp`",
        ),
    }
    if any(view, &["/usr/sbin/qemu-ga", "/sbin/qemu-ga"]) {
        r.present.push("QEMU guest agent".into());
    } else {
        r.missing("no QEMU guest agent", "install qemu-guest-agent");
    }
    if any(view, &["/usr/bin/growpart", "/bin/growpart"]) {
        r.present.push("growpart".into());
    } else {
        r.missing(
            "no growpart: the root filesystem would not grow to the volume",
            "install cloud-guest-utils",
        );
    }
    match text(view, "/etc/machine-id").map(|t| t.trim().to_string()) {
        Some(id) if id.len() == 32 && id.bytes().all(|b| b.is_ascii_hexdigit()) => r.defect(
            "/etc/machine-id is set: every server from this image would share it",
            "empty it (`: > /etc/machine-id`); systemd makes one at first boot",
        ),
        Some(id) if id.is_empty() || id == "uninitialized" => {
            r.present.push("machine-id made at first boot".into());
        }
        Some(id) => r.defect(
            format!("/etc/machine-id holds {id:?}, not an id"),
            "empty it (`: > /etc/machine-id`)",
        ),
        None => r
            .present
            .push("machine-id made at first boot (no /etc/machine-id)".into()),
    }
    let host_keys: Vec<String> = view
        .list("/etc/ssh")
        .into_iter()
        .filter(|n| n.starts_with("ssh_host_") && n.ends_with("_key"))
        .collect();
    if !host_keys.is_empty() {
        r.defect(
            format!(
                "SSH host keys in the image ({}): every server would share them",
                host_keys.join(" ")
            ),
            "remove /etc/ssh/ssh_host_*; cloud-init (or `ssh-keygen -A`) makes them at first boot",
        );
    }
    if let Some(shadow) = text(view, "/etc/shadow") {
        let root = shadow
            .lines()
            .find_map(|l| l.strip_prefix("root:"))
            .and_then(|rest| rest.split(':').next());
        match root {
            Some("") => r.defect(
                "root has an empty password: anyone can log in as root on the console",
                "lock it (`usermod -p '*' root`)",
            ),
            Some(hash) if hash.starts_with('$') => r.defect(
                "root has a password: every server from this image would share it",
                "lock it (`usermod -p '*' root`) and log in with SSH keys",
            ),
            _ => r.present.push("no root password".into()),
        }
    }
    r
}

/// The findings as lines for a user: `missing: ...; fix` / `defect: ...; fix`.
pub fn render(findings: &[Finding]) -> Vec<String> {
    findings
        .iter()
        .map(|f| {
            let kind = match f.kind {
                FindingKind::Missing => "missing",
                FindingKind::Defect => "defect",
            };
            format!("{kind}: {} ({})", f.problem, f.fix)
        })
        .collect()
}

/// The files of a rootfs tarball that the checks read, gathered in one pass.
#[derive(Debug, Default)]
pub struct TarView {
    paths: BTreeSet<String>,
    contents: BTreeMap<String, Vec<u8>>,
}

/// Files the checks read (directories: every file in them).
fn wanted(path: &str) -> bool {
    const FILES: &[&str] = &[
        "/etc/shadow",
        "/etc/machine-id",
        "/etc/cloud/cloud.cfg",
        "/etc/network/interfaces",
    ];
    const DIRS: &[&str] = &[
        "/etc/cloud/cloud.cfg.d/",
        "/etc/systemd/network/",
        "/etc/network/interfaces.d/",
    ];
    FILES.contains(&path) || DIRS.iter().any(|d| path.starts_with(d))
}

impl TarView {
    /// Reads a rootfs tarball (plain, gzip, zstd or xz).
    pub fn read(path: &Path) -> Result<TarView> {
        let file = std::fs::File::open(path).with_context(|| format!("open {}", path.display()))?;
        let decoder = crate::rootfs::Decoder::sniff(std::io::BufReader::new(file))
            .with_context(|| format!("{}", path.display()))?;
        let mut tar = crate::rootfs::TarReader::new(decoder);
        let mut view = TarView::default();
        while let Some(entry) = tar
            .next_entry()
            .with_context(|| format!("read {}", path.display()))?
        {
            let name = String::from_utf8_lossy(&entry.path);
            let name = format!("/{}", name.trim_start_matches("./").trim_start_matches('/'));
            let name = name.trim_end_matches('/').to_string();
            if wanted(&name) && entry.size <= 1 << 20 {
                let mut data = Vec::new();
                std::io::Read::read_to_end(&mut tar.data(), &mut data)?;
                view.contents.insert(name.clone(), data);
            }
            view.paths.insert(name);
        }
        Ok(view)
    }

    /// A view over given paths and contents (tests).
    pub fn from_files(files: &[(&str, &str)]) -> TarView {
        let mut view = TarView::default();
        for (path, contents) in files {
            view.paths.insert(path.to_string());
            view.contents
                .insert(path.to_string(), contents.as_bytes().to_vec());
        }
        view
    }
}

impl RootView for TarView {
    fn exists(&self, path: &str) -> bool {
        self.paths.contains(path)
    }

    fn read(&self, path: &str) -> Option<Vec<u8>> {
        self.contents.get(path).cloned()
    }

    fn list(&self, dir: &str) -> Vec<String> {
        let prefix = format!("{}/", dir.trim_end_matches('/'));
        self.paths
            .range(prefix.clone()..)
            .take_while(|p| p.starts_with(&prefix))
            .filter_map(|p| {
                let rest = &p[prefix.len()..];
                (!rest.is_empty() && !rest.contains('/')).then(|| rest.to_string())
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cloud() -> Vec<(&'static str, &'static str)> {
        vec![
            ("/boot/vmlinuz-6.1.0-cloud-amd64", ""),
            ("/usr/lib/systemd/systemd", ""),
            ("/usr/sbin/sshd", ""),
            ("/usr/bin/cloud-init", ""),
            (
                "/etc/cloud/cloud.cfg",
                "datasource_list: [ NoCloud, Ec2 ]\n",
            ),
            (
                "/etc/cloud/cloud.cfg.d/90-imgforge.cfg",
                "datasource_list: [ Scaleway, NoCloud, None ]\n",
            ),
            (
                "/etc/systemd/network/90-imgforge-dhcp.network",
                "[Network]\nDHCP=yes\n",
            ),
            (
                "/etc/systemd/system/multi-user.target.wants/systemd-networkd.service",
                "",
            ),
            ("/usr/sbin/qemu-ga", ""),
            ("/usr/bin/growpart", ""),
            ("/etc/machine-id", ""),
            ("/etc/ssh/sshd_config", ""),
            ("/etc/shadow", "root:*:19000:0:99999:7:::\n"),
        ]
    }

    fn problems(files: &[(&str, &str)]) -> Vec<String> {
        assess(&TarView::from_files(files))
            .findings
            .iter()
            .map(|f| f.problem.clone())
            .collect()
    }

    #[test]
    fn a_cloud_rootfs_is_ready() {
        let r = assess(&TarView::from_files(&cloud()));
        assert!(r.is_ready(), "{:?}", r.findings);
        assert!(r
            .present
            .contains(&"cloud-init (datasources: Scaleway, NoCloud, None)".to_string()));
    }

    #[test]
    fn a_busybox_rootfs_lacks_everything_a_server_needs() {
        let p = problems(&[("/bin/busybox", ""), ("/sbin/init", "")]);
        for expected in [
            "no kernel",
            "no SSH server",
            "no cloud-init",
            "no network configuration",
            "no QEMU guest agent",
            "no growpart",
        ] {
            assert!(
                p.iter().any(|x| x.starts_with(expected)),
                "{expected} in {p:?}"
            );
        }
        assert!(!p.iter().any(|x| x.starts_with("no init")), "{p:?}");
    }

    #[test]
    fn shared_identity_and_passwords_are_defects() {
        let mut files = cloud();
        files.retain(|(p, _)| *p != "/etc/machine-id" && *p != "/etc/shadow");
        files.push(("/etc/machine-id", "0123456789abcdef0123456789abcdef\n"));
        files.push(("/etc/ssh/ssh_host_ed25519_key", "x"));
        files.push(("/etc/shadow", "root:$y$j9T$abc:19000:0:99999:7:::\n"));
        let r = assess(&TarView::from_files(&files));
        let kinds: Vec<FindingKind> = r.findings.iter().map(|f| f.kind).collect();
        assert_eq!(kinds, [FindingKind::Defect; 3], "{:?}", r.findings);
        let mut empty = cloud();
        empty.retain(|(p, _)| *p != "/etc/shadow");
        empty.push(("/etc/shadow", "root::19000:0:99999:7:::\n"));
        assert_eq!(
            problems(&empty),
            ["root has an empty password: anyone can log in as root on the console"]
        );
    }

    #[test]
    fn a_datasource_list_without_scaleway_and_a_disabled_networkd_are_named() {
        let mut files = cloud();
        files.retain(|(p, _)| {
            !p.starts_with("/etc/cloud/cloud.cfg.d") && !p.contains("target.wants")
        });
        let p = problems(&files);
        assert_eq!(p.len(), 2, "{p:?}");
        assert!(p[0].contains("(NoCloud, Ec2) leaves out Scaleway"), "{p:?}");
        assert!(p[1].starts_with("no network configuration"), "{p:?}");
    }
}
