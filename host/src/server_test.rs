//! `imgforge boot IMAGE --ssh`: the server test of an image, as its user would try it. A
//! throwaway server from the image, with a fresh ed25519 key pair and port 22 exposed; the
//! system's OpenSSH client logs in, `cloud-init status --wait` must end `done`, and a command
//! runs. The server is removed whatever happens: on success, on failure, on Ctrl-C (it carries a
//! build tag, so `imgforge cleanup` also finds it if imgforge is killed).

use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde::Serialize;
use tracing::info;

use crate::provider::{
    find_image, Boot, Provider, ServerSpec, ServerState, VolumeSpec, BUILD_TAG_PREFIX,
};
use crate::tools::RunTool;

/// What the test does besides logging in.
#[derive(Debug, Clone)]
pub struct ServerTestOptions {
    /// Volume 0's size (default: the image's).
    pub root_size: Option<u64>,
    pub memory_mib: Option<u32>,
    /// Run after cloud-init is done.
    pub command: String,
    /// Give up when SSH is not ready, or cloud-init not done, after this long.
    pub timeout: Duration,
}

/// What the test saw.
#[derive(Debug, Clone, Serialize)]
pub struct ServerTestReport {
    pub image: String,
    pub server: String,
    /// Server start to the first successful SSH login.
    pub ssh_ready_s: f64,
    /// Server start to `cloud-init status --wait` returning.
    pub cloud_init_done_s: f64,
    /// `cloud-init status --long` once done.
    pub cloud_init_status: String,
    pub command: String,
    pub output: String,
}

/// Runs the server test of `image` on `provider`.
pub fn run(
    provider: Arc<dyn Provider>,
    image: &str,
    options: &ServerTestOptions,
) -> Result<ServerTestReport> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("start the async runtime")?;
    let test_id = crate::build::new_build_id();
    {
        let provider = provider.clone();
        let test_id = test_id.clone();
        crate::interrupt::on_interrupt(move || {
            eprintln!("imgforge: interrupted; removing the test server");
            if let Ok(rt) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                let _ = rt.block_on(provider.cleanup_builds(Some(&test_id), false));
            }
        });
    }
    let result = rt.block_on(test(provider.as_ref(), image, options, &test_id));
    // Whatever happened, the server goes (a stopped or half-created one too).
    match rt.block_on(provider.cleanup_builds(Some(&test_id), false)) {
        Ok(removed) => {
            for line in removed {
                info!("removed {line}");
            }
        }
        Err(e) => tracing::warn!("could not remove the test server: {e:#}"),
    }
    result
}

async fn test(
    provider: &dyn Provider,
    image_key: &str,
    options: &ServerTestOptions,
    test_id: &str,
) -> Result<ServerTestReport> {
    let image = find_image(provider, image_key).await?;
    let keys = tempfile::tempdir().context("create a temporary directory")?;
    let identity = keys.path().join("id_ed25519");
    make_key_pair(&identity)?;
    let public = crate::ssh::read_public_key(&identity.with_extension("pub"))?;
    let spec = ServerSpec {
        name: format!("imgforge-test-{test_id}"),
        boot: Some(Boot::Local),
        volumes: vec![VolumeSpec::FromSnapshot {
            snapshot: image.root_volume.clone(),
            size: options.root_size,
        }],
        tags: vec![format!("{BUILD_TAG_PREFIX}{test_id}")],
        exposed_ports: vec![22],
        host_services: vec![],
        memory_mib: options.memory_mib,
        cloud_init: None,
        ssh_public_keys: vec![public.line],
    };
    let server = provider.create_server(&spec).await?;
    info!(
        "server test: created {} ({}) from image {}",
        server.name, server.id, image.name
    );
    let started = Instant::now();
    let server = provider.start_server(&server.id).await?;
    let mut target = crate::ssh::Target::for_server(&server, Some(identity.clone()), "root")?;
    target.known_hosts = keys.path().join("known_hosts");

    // SSH: until a login works, the server stops, or the time is up.
    let deadline = started + options.timeout;
    loop {
        let out = target.output(&["true".to_string()])?;
        if out.status.success() {
            break;
        }
        let last_error = String::from_utf8_lossy(&out.stderr).trim().to_string();
        if provider.get_server(&server.id).await?.state != ServerState::Running {
            bail!(
                "the server stopped before SSH was ready{}",
                console_hint(provider, &server.id).await
            );
        }
        if Instant::now() >= deadline {
            bail!(
                "no SSH login after {:?} (last error: {last_error}){}",
                options.timeout,
                console_hint(provider, &server.id).await
            );
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
    let ssh_ready = started.elapsed();
    info!(
        "server test: SSH ready after {:.1} s",
        ssh_ready.as_secs_f64()
    );

    let run = |command: &str| -> Result<(bool, String)> {
        // One string: ssh hands the remote command to the login shell, which parses it.
        let out = target.output(&[command.to_string()])?;
        Ok((
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned()
                + &String::from_utf8_lossy(&out.stderr),
        ))
    };
    let (_, waited) = run(&format!(
        "timeout {} cloud-init status --wait >/dev/null; cloud-init status --long",
        options.timeout.saturating_sub(ssh_ready).as_secs().max(1)
    ))?;
    let cloud_init_done = started.elapsed();
    if !waited.contains("status: done") {
        bail!("cloud-init did not end `done`:\n{}", waited.trim());
    }
    info!(
        "server test: cloud-init done after {:.1} s",
        cloud_init_done.as_secs_f64()
    );
    let (ok, output) = run(&options.command)?;
    if !ok {
        bail!(
            "`{}` failed in the server:\n{}",
            options.command,
            output.trim()
        );
    }
    Ok(ServerTestReport {
        image: image.name,
        server: server.name,
        ssh_ready_s: round(ssh_ready),
        cloud_init_done_s: round(cloud_init_done),
        cloud_init_status: waited.trim().to_string(),
        command: options.command.clone(),
        output,
    })
}

fn round(d: Duration) -> f64 {
    (d.as_secs_f64() * 10.0).round() / 10.0
}

/// A fresh ed25519 key pair at `path` (and `path.pub`), no passphrase.
fn make_key_pair(path: &Path) -> Result<()> {
    let out = Command::new("ssh-keygen")
        .args([
            "-q",
            "-t",
            "ed25519",
            "-N",
            "",
            "-C",
            "imgforge-server-test",
            "-f",
        ])
        .arg(path)
        .output()
        .running("ssh-keygen")?;
    if !out.status.success() {
        bail!(
            "ssh-keygen failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// The end of the server's console, to say why it is not reachable.
async fn console_hint(provider: &dyn Provider, server: &str) -> String {
    match provider.console_tail(server, 15).await {
        Ok(Some(tail)) => format!("; console tail:\n{tail}"),
        _ => String::new(),
    }
}
