//! `docker:IMAGE` / `podman:IMAGE`: the image's filesystem through a
//! container engine, `create` then `export` (the engine pulls the image if
//! it is not there). The exported tar is normalised like any root
//! filesystem tarball; Docker's `/.dockerenv` marker is left out.
//!
//! Without a working engine the error says which one is missing and how to
//! do without it (`save` the image elsewhere and use `docker-archive:`).

use std::collections::VecDeque;
use std::ffi::OsString;
use std::io::{BufRead, BufReader, Read};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};

use anyhow::{anyhow, bail, Context, Result};
use tracing::{debug, info, warn};

use super::oci::normalise_arch;
use super::output::Output;
use super::tree::{apply_stream, LayerSpec};

/// Which container engine.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EngineKind {
    Docker,
    Podman,
}

impl EngineKind {
    pub fn name(self) -> &'static str {
        match self {
            EngineKind::Docker => "docker",
            EngineKind::Podman => "podman",
        }
    }
}

/// A container engine's command-line client.
#[derive(Debug, Clone)]
pub struct Engine {
    pub kind: EngineKind,
    /// The program to run (`docker`, `podman`, or a path).
    pub program: OsString,
}

impl Engine {
    pub fn new(kind: EngineKind) -> Engine {
        Engine {
            kind,
            program: kind.name().into(),
        }
    }

    /// The same engine's commands, run through another program (tests, or a
    /// client installed under another name).
    pub fn with_program(kind: EngineKind, program: impl Into<OsString>) -> Engine {
        Engine {
            kind,
            program: program.into(),
        }
    }

    fn name(&self) -> &'static str {
        self.kind.name()
    }

    fn fallback(&self) -> String {
        format!(
            "export the image with `{} save IMAGE -o FILE` (on a machine where it works) and use docker-archive:FILE",
            self.name()
        )
    }

    /// Checks that the engine is installed and answers (Docker: its daemon
    /// too).
    pub fn check(&self) -> Result<()> {
        let out = Command::new(&self.program)
            .arg("version")
            .stdin(Stdio::null())
            .output();
        match out {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => bail!(
                "{} is not installed: apt-get install {}, or {}",
                self.name(),
                match self.kind {
                    EngineKind::Docker => "docker.io",
                    EngineKind::Podman => "podman",
                },
                self.fallback()
            ),
            Err(e) => bail!("cannot run {}: {e}", self.program.to_string_lossy()),
            Ok(o) if !o.status.success() => bail!(
                "{} is installed but not working (`{} version` failed: {}): {}, or {}",
                self.name(),
                self.name(),
                last_lines(&String::from_utf8_lossy(&o.stderr), 3),
                match self.kind {
                    EngineKind::Docker => "start its daemon (systemctl start docker)",
                    EngineKind::Podman => "check `podman info`",
                },
                self.fallback()
            ),
            Ok(_) => Ok(()),
        }
    }

    fn run(&self, args: &[&str]) -> Result<String> {
        let o = Command::new(&self.program)
            .args(args)
            .stdin(Stdio::null())
            .output()
            .with_context(|| format!("cannot run {}", self.name()))?;
        if !o.status.success() {
            bail!(
                "`{} {}` failed: {}",
                self.name(),
                args.join(" "),
                last_lines(&String::from_utf8_lossy(&o.stderr), 5)
            );
        }
        Ok(String::from_utf8_lossy(&o.stdout).trim().to_string())
    }

    /// Writes the filesystem of `image` for `arch` to `out`.
    pub(crate) fn export(
        &self,
        image: &str,
        arch: &str,
        explicit_arch: bool,
        out: &mut Output,
    ) -> Result<()> {
        if image.is_empty() || image.starts_with('-') {
            bail!("{}:{image}: not an image name", self.name());
        }
        self.check()?;
        // If the image is already there, check its architecture first.
        if let Ok(a) = self.run(&["image", "inspect", "--format", "{{.Architecture}}", image]) {
            if !a.is_empty() && normalise_arch(&a) != arch {
                bail!(
                    "{}:{image} is for {a}, not {arch}: build for its architecture with --arch {a}",
                    self.name()
                );
            }
        }
        let platform = format!("linux/{arch}");
        let mut args = vec!["create"];
        if explicit_arch {
            args.extend(["--platform", &platform]);
        }
        // A command is required when the image has none; it never runs.
        args.extend([image, "/bin/true"]);
        let id = self.run(&args)?;
        let id = id.lines().last().unwrap_or_default().trim().to_string();
        if id.is_empty() {
            bail!("`{} create {image}` printed no container id", self.name());
        }
        let container = Container {
            engine: self.clone(),
            id,
        };
        info!(
            "{}: exporting {image} (container {})",
            self.name(),
            short(&container.id)
        );
        let mut cmd = Command::new(&self.program);
        cmd.args(["export", &container.id]);
        let skip: Option<fn(&[u8]) -> bool> = match self.kind {
            EngineKind::Docker => Some(|p| p == b".dockerenv"),
            EngineKind::Podman => None,
        };
        let spec = LayerSpec {
            skip,
            ..LayerSpec::rootfs(format!("{}:{image}", self.name()))
        };
        run_stream(cmd, &format!("{} export", self.name()), &spec, out)
    }
}

fn short(id: &str) -> &str {
    &id[..id.len().min(12)]
}

/// Removes the container when dropped.
struct Container {
    engine: Engine,
    id: String,
}

impl Drop for Container {
    fn drop(&mut self) {
        if let Err(e) = self.engine.run(&["rm", "-f", &self.id]) {
            warn!("cannot remove the container {}: {e:#}", self.id);
        }
    }
}

pub(crate) fn last_lines(s: &str, n: usize) -> String {
    let lines: Vec<&str> = s.lines().map(str::trim).filter(|l| !l.is_empty()).collect();
    let tail = &lines[lines.len().saturating_sub(n)..];
    if tail.is_empty() {
        "no message".into()
    } else {
        tail.join(" / ")
    }
}

/// Runs `cmd`, reading its standard output as a root filesystem tarball
/// into `out`; its standard error goes to the log, and its last lines into
/// the error if it fails.
pub(crate) fn run_stream(
    mut cmd: Command,
    what: &str,
    spec: &LayerSpec,
    out: &mut Output,
) -> Result<()> {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("cannot run {what}"))?;
    let stdout = child.stdout.take().ok_or_else(|| anyhow!("no stdout"))?;
    let stderr = child.stderr.take().ok_or_else(|| anyhow!("no stderr"))?;
    let tail: Arc<Mutex<VecDeque<String>>> = Arc::default();
    let logger = {
        let tail = Arc::clone(&tail);
        let tag = what.split_whitespace().next().unwrap_or(what).to_string();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                info!("{tag}: {line}");
                let mut t = tail.lock().unwrap();
                if t.len() == 20 {
                    t.pop_front();
                }
                t.push_back(line);
            }
        })
    };
    let result = apply_stream(Box::new(stdout) as Box<dyn Read + Send>, spec, out);
    // The pipe is closed by now: a child still writing gets EPIPE.
    let status = child
        .wait()
        .with_context(|| format!("cannot wait for {what}"))?;
    let _ = logger.join();
    if !status.success() {
        let tail: Vec<String> = tail.lock().unwrap().iter().cloned().collect();
        let err = anyhow!(
            "{what} failed ({status}): {}",
            last_lines(&tail.join("\n"), 5)
        );
        if let Err(e) = result {
            debug!("reading its output failed too: {e:#}");
        }
        return Err(err);
    }
    result
}
