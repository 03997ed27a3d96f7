//! Host and agent agree on their contract, over the real wire: the host's
//! build plan sets the tags, the host's metadata server serves them to the
//! real static `initrd-agent` (run as a command on a file volume, no VM),
//! and the host's own readers judge what comes back: every `state_detail`
//! the agent reported, and its done line read from the done port.
//!
//! Both programs take their words from the `contract` crate, so drift is a
//! compile error; this test catches what the compiler cannot: a key the host
//! sets that the agent does not read, a state the host would not recognise,
//! a done line the host cannot parse.

use std::ffi::OsStr;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use contract::method::Input;
use contract::{DoneLine, Method, Stage, StateDetail};
use host::build::plan::{InputSource, Plan};
use host::build::Strategy;
use host::provider::local::metadata_server::{MetadataServer, ServerMetadata};
use test_support::http_fixture::HttpFixture;

/// A raw disk with a GPT and one partition, as sgdisk writes it.
fn gpt_disk(dir: &Path) -> Vec<u8> {
    let path = dir.join("disk.raw");
    std::fs::File::create(&path)
        .unwrap()
        .set_len(8 << 20)
        .unwrap();
    tests::judge(
        "sgdisk",
        &[
            OsStr::new("-n"),
            OsStr::new("1:2048:0"),
            OsStr::new("-t"),
            OsStr::new("1:8300"),
            path.as_os_str(),
        ],
    )
    .unwrap();
    std::fs::read(&path).unwrap()
}

/// A 16 MiB file for the agent to write (from-qcow2 needs no block device).
fn blank_volume(dir: &Path) -> std::path::PathBuf {
    let volume = dir.join("volume.img");
    std::fs::File::create(&volume)
        .unwrap()
        .set_len(16 << 20)
        .unwrap();
    volume
}

/// The host's plan for a from-qcow2 build of `url`, its tags, as
/// `imgforge build` sets them on the build server.
fn host_tags(done_port: u16, url: &str) -> Vec<String> {
    let plan = Plan {
        strategy: Strategy::Helper,
        input: InputSource::Url(url.into()),
        input_kind: Input::DiskImage,
        done_port,
        extra_params: vec!["grow_fs=0".into(), "signal_failure=1".into()],
        unknown_params: vec![],
    };
    plan.tags(Method::FromQcow2, "c0ffee00", url, None)
}

struct AgentRun {
    done: DoneLine,
    states: Vec<StateDetail>,
    log: String,
}

/// Runs the agent as a helper server's cloud-init does: parameters from
/// the metadata server's tags, the done line served until it is killed.
async fn run_agent(tags: &[String], done_port: u16, volume: &Path) -> AgentRun {
    let metadata = MetadataServer::start(ServerMetadata::new("srv-contract", "contract")).unwrap();
    metadata.set_tags(tags.iter().cloned());
    let log_path = volume.with_extension("log");
    let log = std::fs::File::create(&log_path).unwrap();
    let mut agent = Command::new(tests::agent_bin())
        .args([
            "run",
            "--metadata",
            "--serve",
            "--serve-address",
            "127.0.0.1",
        ])
        .arg("--param")
        .arg(format!("METADATA_IP={}", metadata.addr()))
        .arg("--volume")
        .arg(volume)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap();
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], done_port));
    let done = host::done_signal::wait(addr, Duration::from_secs(60), || {
        match agent.try_wait()? {
            Some(status) => anyhow::bail!("initrd-agent exited early: {status}"),
            None => Ok(()),
        }
    })
    .await;
    let _ = agent.kill();
    let _ = agent.wait();
    let log = std::fs::read_to_string(&log_path).unwrap();
    let done = done.unwrap_or_else(|e| panic!("{e:#}\nagent log:\n{log}"));
    let states = metadata
        .state_details()
        .iter()
        .map(|s| s.parse().unwrap_or_else(|e| match e {}))
        .collect();
    metadata.shutdown().await;
    AgentRun { done, states, log }
}

#[tokio::test(flavor = "multi_thread")]
async fn the_agent_reads_every_key_the_host_sets_and_the_host_reads_what_the_agent_says() {
    let dir = tempfile::tempdir().unwrap();
    let disk = gpt_disk(dir.path());
    let fixture = HttpFixture::start(vec![("/disk.raw".into(), disk.clone().into())]).unwrap();
    let done_port = host::provider::local::qemu::free_loopback_port()
        .unwrap()
        .port();
    let url = format!("http://{}/disk.raw", fixture.addr());
    let tags = host_tags(done_port, &url);
    let volume = blank_volume(dir.path());

    let run = run_agent(&tags, done_port, &volume).await;

    // Parameter keys: each KEY=VALUE tag of the host's plan (the build id
    // is a label for cleanup, not a parameter) is one the agent resolved
    // from the server's tags.
    let resolved = run
        .log
        .lines()
        .find(|l| l.contains("parameters resolved:"))
        .unwrap_or_else(|| panic!("no parameter line in:\n{}", run.log));
    for tag in tags.iter().filter(|t| !t.starts_with("imgforge-build=")) {
        assert!(
            resolved.contains(&format!("{tag} (server tag)")),
            "the agent did not take {tag:?} from the tags: {resolved}"
        );
    }

    // The done line, as the host parses it.
    let done = &run.done;
    assert!(done.is_success(), "{done:?}\n{}", run.log);
    assert_eq!(done.method, Some(Method::FromQcow2));
    assert_eq!(done.bytes, Some(disk.len() as u64));
    let layout = done.layout.as_deref().unwrap();
    assert_eq!(layout.len(), 1, "{layout:?}");
    assert_eq!(layout[0].number, Some(1));
    // from-qcow2 grows the last partition to the volume (sgdisk wrote it for 8 MiB).
    assert!(layout[0].size_bytes > 8 << 20, "{layout:?}");

    // Every state the agent reported is one the host recognises.
    assert!(
        run.states
            .iter()
            .all(|s| !matches!(s, StateDetail::Other(_))),
        "{:?}",
        run.states
    );
    assert!(run.states.contains(&StateDetail::Building {
        stage: Stage::Fetch,
        percent: 0
    }));
    assert_eq!(
        run.states.last(),
        Some(&StateDetail::Done),
        "{:?}",
        run.states
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_failure_reaches_the_host_with_its_stage_and_message() {
    let dir = tempfile::tempdir().unwrap();
    let fixture = HttpFixture::start(vec![]).unwrap();
    let done_port = host::provider::local::qemu::free_loopback_port()
        .unwrap()
        .port();
    let url = format!("http://{}/missing.qcow2", fixture.addr());
    let tags = host_tags(done_port, &url);
    let volume = blank_volume(dir.path());

    let run = run_agent(&tags, done_port, &volume).await;

    let done = &run.done;
    assert!(!done.is_success());
    assert_eq!(done.stage, Some(Stage::Fetch), "{done:?}");
    assert!(done.message.contains("404"), "{done:?}");
    let last = run.states.last().unwrap();
    assert_eq!(last, &StateDetail::Failed(done.message.clone()));
    assert!(last.is_end());
}
