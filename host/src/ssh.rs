//! SSH for servers: public keys given at creation (read and checked), the key a server was
//! created with (remembered for `imgforge server ssh`), and the system's OpenSSH client run
//! against a server's exposed port 22, with a known_hosts file imgforge keeps per server.
//!
//! What is stored, under `$IMGFORGE_HOME/ssh/`: `<server-id>.identity` (the private key's path)
//! and `<server-id>.known_hosts` (the host key seen at the first connection: later connections
//! to the same server must present it, whatever loopback port it is forwarded to).

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};
use base64::Engine as _;
use sha2::{Digest, Sha256};

use crate::tools::RunTool;

/// The key types OpenSSH writes in `.pub` files.
const KEY_TYPES: &[&str] = &[
    "ssh-ed25519",
    "ssh-rsa",
    "ecdsa-sha2-nistp256",
    "ecdsa-sha2-nistp384",
    "ecdsa-sha2-nistp521",
    "sk-ssh-ed25519@openssh.com",
    "sk-ecdsa-sha2-nistp256@openssh.com",
];

/// An OpenSSH public key, as one line of a `.pub` file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PublicKey {
    /// `type base64 [comment]`, as given (trimmed).
    pub line: String,
    /// `SHA256:...`, as `ssh-keygen -l` prints it.
    pub fingerprint: String,
}

/// Parses the contents of a public key file; `source` names it in errors.
pub fn parse_public_key(contents: &str, source: &str) -> Result<PublicKey> {
    if contents.contains("PRIVATE KEY-----") {
        bail!("{source} is a private key: give its public half (the .pub file)");
    }
    let lines: Vec<&str> = contents
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .collect();
    let [line] = lines.as_slice() else {
        bail!(
            "{source} is not an OpenSSH public key: expected one line `TYPE BASE64 [COMMENT]`, found {} lines",
            lines.len()
        );
    };
    let mut fields = line.split_whitespace();
    let (Some(kind), Some(data)) = (fields.next(), fields.next()) else {
        bail!("{source} is not an OpenSSH public key: expected `TYPE BASE64 [COMMENT]`");
    };
    if !KEY_TYPES.contains(&kind) {
        bail!(
            "{source} is not an OpenSSH public key: unknown key type {kind:?} (expected one of {})",
            KEY_TYPES.join(", ")
        );
    }
    let blob = base64::engine::general_purpose::STANDARD
        .decode(data)
        .map_err(|_| {
            anyhow::anyhow!("{source} is not an OpenSSH public key: its key data is not base64")
        })?;
    // The blob starts with the key type as an SSH string (u32 length, bytes).
    let named = blob
        .get(..4)
        .map(|n| u32::from_be_bytes(n.try_into().unwrap()) as usize)
        .and_then(|n| blob.get(4..4 + n));
    if named != Some(kind.as_bytes()) {
        bail!("{source} is not an OpenSSH public key: its key data does not match its type {kind}");
    }
    let digest = Sha256::digest(&blob);
    Ok(PublicKey {
        line: line.to_string(),
        fingerprint: format!(
            "SHA256:{}",
            base64::engine::general_purpose::STANDARD_NO_PAD.encode(digest)
        ),
    })
}

/// Reads and checks a public key file.
pub fn read_public_key(path: &Path) -> Result<PublicKey> {
    let contents = std::fs::read(path)
        .with_context(|| format!("cannot read the SSH public key {}", path.display()))?;
    let contents = String::from_utf8(contents).map_err(|_| {
        anyhow::anyhow!("{} is not an OpenSSH public key (not text)", path.display())
    })?;
    parse_public_key(&contents, &path.display().to_string())
}

/// The private key next to a `.pub` file, if it exists.
pub fn private_key_of(public: &Path) -> Option<PathBuf> {
    let name = public.file_name()?.to_str()?;
    let private = public.with_file_name(name.strip_suffix(".pub")?);
    private.is_file().then_some(private)
}

/// Where imgforge keeps what it knows about servers' SSH.
pub fn state_dir() -> Result<PathBuf> {
    Ok(crate::provider::local::store::Store::default_home()?.join("ssh"))
}

/// Remembers `identity` as the private key to log in to `server` with.
pub fn remember_identity(server: &str, identity: &Path) -> Result<()> {
    let dir = state_dir()?;
    std::fs::create_dir_all(&dir).with_context(|| format!("create {}", dir.display()))?;
    let identity =
        std::fs::canonicalize(identity).with_context(|| format!("{}", identity.display()))?;
    std::fs::write(
        dir.join(format!("{server}.identity")),
        identity.to_string_lossy().as_bytes(),
    )
    .context("remember the server's SSH key")
}

/// The private key `server` was created with, if imgforge knows it.
pub fn remembered_identity(server: &str) -> Option<PathBuf> {
    let path = state_dir().ok()?.join(format!("{server}.identity"));
    std::fs::read_to_string(path)
        .ok()
        .map(|p| PathBuf::from(p.trim()))
}

/// Forgets what imgforge kept about `server` (when it is deleted).
pub fn forget(server: &str) {
    if let Ok(dir) = state_dir() {
        for suffix in ["identity", "known_hosts"] {
            let _ = std::fs::remove_file(dir.join(format!("{server}.{suffix}")));
        }
    }
}

/// How to reach a server's sshd.
#[derive(Debug, Clone)]
pub struct Target {
    /// The server id: names the host key in known_hosts, whatever the port.
    pub server: String,
    pub address: std::net::SocketAddr,
    pub user: String,
    pub identity: Option<PathBuf>,
    /// The known_hosts file (first connection records, later ones check).
    pub known_hosts: PathBuf,
}

impl Target {
    /// How to reach `server`'s sshd: it must be running with port 22 exposed.
    pub fn for_server(
        server: &crate::provider::Server,
        identity: Option<PathBuf>,
        user: &str,
    ) -> Result<Target> {
        if server.state != crate::provider::ServerState::Running {
            bail!(
                "server {} is {}: start it first (imgforge server start {})",
                server.name,
                server.state,
                server.name
            );
        }
        let Some(address) = server.endpoints.get(&22) else {
            bail!(
                "server {} does not expose port 22: create it with --expose 22",
                server.name
            );
        };
        let state = state_dir()?;
        std::fs::create_dir_all(&state).with_context(|| format!("create {}", state.display()))?;
        Ok(Target {
            server: server.id.clone(),
            address: *address,
            user: user.to_string(),
            identity: identity.or_else(|| remembered_identity(&server.id)),
            known_hosts: state.join(format!("{}.known_hosts", server.id)),
        })
    }

    /// The `ssh` command for `remote_command` (an interactive shell when empty), batch mode
    /// (no password prompt: keys only) unless `interactive`.
    pub fn command(&self, remote_command: &[String], interactive: bool) -> Command {
        let mut cmd = Command::new("ssh");
        cmd.arg("-p").arg(self.address.port().to_string());
        cmd.args(["-o", "StrictHostKeyChecking=accept-new"]);
        cmd.arg("-o")
            .arg(format!("UserKnownHostsFile={}", self.known_hosts.display()));
        cmd.arg("-o")
            .arg(format!("HostKeyAlias=imgforge-{}", self.server));
        cmd.args(["-o", "ConnectTimeout=10", "-o", "LogLevel=ERROR"]);
        if !interactive {
            cmd.args(["-o", "BatchMode=yes"]);
        }
        if let Some(identity) = &self.identity {
            cmd.arg("-i").arg(identity);
            cmd.args(["-o", "IdentitiesOnly=yes"]);
        }
        cmd.arg(format!("{}@{}", self.user, self.address.ip()));
        if !remote_command.is_empty() {
            cmd.arg("--");
            cmd.args(remote_command);
        }
        cmd
    }

    /// Runs `remote_command` and returns its output; an error when ssh cannot start.
    pub fn output(&self, remote_command: &[String]) -> Result<std::process::Output> {
        self.command(remote_command, false).output().running("ssh")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // Made with `ssh-keygen -t ed25519 -C alice@example`; `ssh-keygen -l` printed the fingerprint.
    const ED25519: &str = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIN8HiW6VuGu6wedUvByoWCcDtGE+lAoK6ppVKh/0Nxn8 alice@example";

    #[test]
    fn a_public_key_parses_with_its_fingerprint() {
        let key = parse_public_key(&format!("{ED25519}\n"), "k.pub").unwrap();
        assert_eq!(key.line, ED25519);
        assert_eq!(
            key.fingerprint,
            "SHA256:PrJG4teATG9D2dLdBdc6Xyc34gPSoTjmkr+nNx69Fuc"
        );
    }

    #[test]
    fn bad_keys_are_refused_with_what_they_are() {
        let private =
            "-----BEGIN OPENSSH PRIVATE KEY-----\nb3Bl\n-----END OPENSSH PRIVATE KEY-----\n";
        let err = parse_public_key(private, "id").unwrap_err().to_string();
        assert!(err.contains("is a private key"), "{err}");
        let err = parse_public_key("hello world\n", "g")
            .unwrap_err()
            .to_string();
        assert!(err.contains("unknown key type \"hello\""), "{err}");
        let err = parse_public_key("ssh-ed25519 !!!!\n", "g")
            .unwrap_err()
            .to_string();
        assert!(err.contains("not base64"), "{err}");
        // Valid base64 of an RSA key blob presented as ed25519.
        let rsa_blob =
            base64::engine::general_purpose::STANDARD.encode(b"\0\0\0\x07ssh-rsa\0\0\0\x01\x03");
        let err = parse_public_key(&format!("ssh-ed25519 {rsa_blob}"), "g")
            .unwrap_err()
            .to_string();
        assert!(err.contains("does not match its type"), "{err}");
        let err = parse_public_key("", "e").unwrap_err().to_string();
        assert!(err.contains("found 0 lines"), "{err}");
    }

    #[test]
    fn the_ssh_command_pins_the_host_key_per_server_and_uses_the_identity() {
        let target = Target {
            server: "abc".into(),
            address: "127.0.0.1:2222".parse().unwrap(),
            user: "root".into(),
            identity: Some("/k/id".into()),
            known_hosts: "/h/abc.known_hosts".into(),
        };
        let args: Vec<String> = target
            .command(&["uname".into(), "-a".into()], false)
            .get_args()
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        let joined = args.join(" ");
        assert!(joined.starts_with("-p 2222 "), "{joined}");
        for part in [
            "HostKeyAlias=imgforge-abc",
            "UserKnownHostsFile=/h/abc.known_hosts",
            "BatchMode=yes",
            "-i /k/id",
            "root@127.0.0.1 -- uname -a",
        ] {
            assert!(joined.contains(part), "{part} in {joined}");
        }
    }
}
