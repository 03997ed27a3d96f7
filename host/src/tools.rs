//! The external tools imgforge runs, and what installs each.
//!
//! Contract: the list is `scripts/tools.list`, compiled in here and read by `scripts/setup.sh`
//! (which installs it and, with `--check`, verifies it). Every "not installed" error imgforge
//! gives comes from [`Tool::not_installed`], in the same words as `setup.sh --check`, so the two
//! cannot drift. Looking up a tool that is not listed panics: that is a bug in imgforge, and the
//! unit test [`tests::every_tool_imgforge_runs_is_listed`] names the ones the code uses.

use std::path::Path;
use std::sync::LazyLock;

use anyhow::anyhow;

/// The list, as `scripts/setup.sh` reads it.
pub const LIST: &str = include_str!("../../scripts/tools.list");

/// The venv where the list's `pip:SPEC` packages are installed (as `scripts/setup.sh` does).
pub const VENV: &str = "/opt/imgforge/venv";

/// How a tool is found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A program found on `PATH`.
    Command,
    /// A program found on `PATH` that must answer `--version`.
    Version,
    /// A file at an absolute path.
    File,
    /// A directory at an absolute path.
    Dir,
    /// A rustup target.
    RustTarget,
}

/// One line of the list.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tool {
    pub kind: Kind,
    /// The program name, path or target triple.
    pub what: &'static str,
    /// The Debian package; `rustup` and `rust` are the Rust toolchain; `pip:SPEC` is a PyPI
    /// requirement installed into the venv [`VENV`].
    pub package: &'static str,
    /// What the project uses it for.
    pub purpose: &'static str,
}

impl Tool {
    /// The command a user runs to install it (as `setup.sh --check` prints it).
    pub fn install_command(&self) -> String {
        match self.package {
            "rustup" => format!("rustup target add {}", self.what),
            "rust" => "install Rust with rustup".to_string(),
            package => match package.strip_prefix("pip:") {
                Some(spec) => {
                    format!("python3 -m venv {VENV} && {VENV}/bin/pip install '{spec}'")
                }
                None => format!("apt-get install {package}"),
            },
        }
    }

    /// `WHAT is not installed: INSTALL`, the line `setup.sh --check` prints for it.
    pub fn not_installed(&self) -> String {
        format!("{} is not installed: {}", self.what, self.install_command())
    }
}

fn parse(list: &'static str) -> Result<Vec<Tool>, String> {
    let mut tools = Vec::new();
    for (number, line) in list.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (kind, rest) = first_field(line);
        let (what, rest) = first_field(rest);
        let (package, purpose) = first_field(rest);
        if package.is_empty() {
            return Err(format!("line {}: fewer than 3 fields", number + 1));
        }
        let kind = match kind {
            "command" => Kind::Command,
            "version" => Kind::Version,
            "file" => Kind::File,
            "dir" => Kind::Dir,
            "rust-target" => Kind::RustTarget,
            other => return Err(format!("line {}: unknown kind {other:?}", number + 1)),
        };
        if matches!(kind, Kind::File | Kind::Dir) && !what.starts_with('/') {
            return Err(format!(
                "line {}: {what} is not an absolute path",
                number + 1
            ));
        }
        tools.push(Tool {
            kind,
            what,
            package,
            purpose,
        });
    }
    Ok(tools)
}

/// The first whitespace-separated field of `s`, and the rest (trimmed).
fn first_field(s: &str) -> (&str, &str) {
    let s = s.trim_start();
    let end = s.find(char::is_whitespace).unwrap_or(s.len());
    (&s[..end], s[end..].trim())
}

static TOOLS: LazyLock<Vec<Tool>> =
    LazyLock::new(|| parse(LIST).unwrap_or_else(|e| panic!("scripts/tools.list: {e}")));

/// Every listed tool.
pub fn all() -> &'static [Tool] {
    &TOOLS
}

/// The listed tool `what` (a program name or a path).
///
/// # Panics
/// If it is not listed: imgforge must not run a tool setup.sh does not install.
pub fn tool(what: &str) -> &'static Tool {
    all()
        .iter()
        .find(|t| t.what == what)
        .unwrap_or_else(|| panic!("{what} is not in scripts/tools.list; add it there"))
}

/// The error for a failed attempt to run the listed program `what`: "not installed" with its
/// install command when the program was not found, else the OS error.
pub fn run_error(what: &str, error: std::io::Error) -> anyhow::Error {
    if error.kind() == std::io::ErrorKind::NotFound {
        anyhow!("{}", tool(what).not_installed())
    } else {
        anyhow!(error).context(format!("run {what}"))
    }
}

/// Extension for `Command::output()`/`status()`/`spawn()` results of a listed program.
pub trait RunTool<T> {
    /// Maps a failure to start `what` to [`run_error`].
    fn running(self, what: &str) -> anyhow::Result<T>;
}

impl<T> RunTool<T> for std::io::Result<T> {
    fn running(self, what: &str) -> anyhow::Result<T> {
        self.map_err(|e| run_error(what, e))
    }
}

/// The listed file or directory `path`, or its "not installed" error.
pub fn require_path(path: &'static str) -> anyhow::Result<&'static Path> {
    let tool = tool(path);
    let present = match tool.kind {
        Kind::Dir => Path::new(path).is_dir(),
        _ => Path::new(path).is_file(),
    };
    if present {
        Ok(Path::new(path))
    } else {
        Err(anyhow!("{}", tool.not_installed()))
    }
}

/// Whether the program `name` is on `PATH` (as `command -v` finds it).
pub fn on_path(name: &str) -> bool {
    use std::os::unix::fs::PermissionsExt;
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path).any(|dir| {
        std::fs::metadata(dir.join(name))
            .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
            .unwrap_or(false)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_list_parses_and_each_entry_is_listed_once() {
        let tools = all();
        assert!(tools.len() > 20, "{} tools", tools.len());
        for (i, t) in tools.iter().enumerate() {
            assert!(!t.purpose.is_empty(), "{} has no purpose", t.what);
            assert!(
                !tools[..i].iter().any(|u| u.what == t.what),
                "{} is listed twice",
                t.what
            );
        }
    }

    #[test]
    fn every_tool_imgforge_runs_is_listed() {
        // The names and paths the host code passes to `tool`, `running` and `require_path`.
        for what in [
            "qemu-img",
            "qemu-system-x86_64",
            crate::provider::local::qemu::OVMF_CODE,
            crate::provider::local::qemu::OVMF_VARS,
            "grub-mkimage",
            crate::bootscript::GRUB_X86_64_EFI_DIR,
            "apt-get",
            "dpkg-deb",
            "mmdebstrap",
            "newuidmap",
            "newgidmap",
            "podman",
        ] {
            tool(what);
        }
    }

    #[test]
    fn install_commands_and_messages() {
        assert_eq!(
            tool("qemu-img").not_installed(),
            "qemu-img is not installed: apt-get install qemu-utils"
        );
        assert_eq!(
            tool("x86_64-unknown-linux-musl").install_command(),
            "rustup target add x86_64-unknown-linux-musl"
        );
        let e = run_error(
            "mmdebstrap",
            std::io::Error::from(std::io::ErrorKind::NotFound),
        );
        assert_eq!(
            e.to_string(),
            "mmdebstrap is not installed: apt-get install mmdebstrap"
        );
        let e = run_error(
            "mmdebstrap",
            std::io::Error::from(std::io::ErrorKind::PermissionDenied),
        );
        assert!(e.to_string().starts_with("run mmdebstrap"), "{e}");
        assert_eq!(
            tool("/opt/imgforge/venv/bin/moto_server").not_installed(),
            "/opt/imgforge/venv/bin/moto_server is not installed: python3 -m venv /opt/imgforge/venv \
             && /opt/imgforge/venv/bin/pip install 'moto[server]==5.2.6'"
        );
    }

    #[test]
    fn bad_lists_are_refused() {
        assert!(parse("command qemu-img").is_err());
        assert!(parse("binary x y z").is_err());
        assert!(parse("file relative/path pkg purpose").is_err());
        let ok = parse("# c\n\nfile /a pkg what it is for\n").unwrap();
        assert_eq!(ok[0].purpose, "what it is for");
    }

    #[test]
    #[should_panic(expected = "not in scripts/tools.list")]
    fn an_unlisted_tool_panics() {
        tool("imgforge-no-such-tool");
    }
}
