//! Contract tests of `imgforge build --provider scaleway` against the
//! in-repo fake of the Instance API (this machine cannot reach Scaleway).
//!
//! The real imgforge binary runs the whole build. The fake's `poweron`
//! hands the server to a stand-in for the guest that runs, on this machine,
//! what the server would run: for a helper server its cloud-init script
//! (which downloads initrd-agent from imgforge's artifact server, checks it
//! and runs it), for a bootscript server the agent itself; either way
//! against a file standing in for the volume, with the fake's metadata API
//! for the tags and the progress, and the done line on loopback (the fake's
//! public address for every server is 127.0.0.1).

use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::Value;
use test_support::s3_server::S3Server;
use tests::fake_scaleway::{call_sequence, FakeScaleway, Server};

const MIB: u64 = 1 << 20;
/// The volume the image is written to (`--size`).
const VOLUME_SIZE: u64 = 64 * MIB;
/// The disk image the builds write (from-qcow2).
const DISK_SIZE: u64 = 8 * MIB;

/// A port nothing listens on now.
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A fake, a work directory, and the guest stand-ins it started.
struct Scenario {
    fake: Arc<FakeScaleway>,
    work: tempfile::TempDir,
    /// A qcow2 of [`raw_disk`] for `--disk-image`.
    disk_image: PathBuf,
    raw_disk: Vec<u8>,
    guests: Arc<Mutex<Vec<Child>>>,
    /// The volume file of each server the guest stand-in ran, by server id.
    volumes: Arc<Mutex<Vec<(String, PathBuf)>>>,
    /// What the guest stand-in does at poweron.
    guest: Arc<Mutex<Guest>>,
    /// Object Storage: the cleanup looks there for what pushes left, and
    /// must not reach for the real endpoint.
    s3: S3Server,
}

/// What the stand-in for the guest does when a server is powered on.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Guest {
    /// Runs the server's boot (script or agent).
    Run,
    /// Answers the next `n` API requests with 429, then runs.
    StormThenRun(u32),
    /// Makes the next API request under `prefix` fail, then runs.
    FailNextThenRun {
        prefix: &'static str,
        status: u16,
        body: &'static str,
    },
    /// Nothing: a server that never reports.
    Silent,
    /// Reports `done` through the metadata API, but no done line reaches
    /// the host (a security group that blocks the port).
    DoneUnreachable,
}

impl Scenario {
    async fn start(fake: FakeScaleway) -> Scenario {
        let work = tempfile::tempdir().unwrap();
        let raw_disk: Vec<u8> = (0..DISK_SIZE)
            .map(|i| {
                if (i / 4096) % 3 == 0 {
                    0
                } else {
                    (i * 31 / 7) as u8
                }
            })
            .collect();
        let raw = work.path().join("disk.raw");
        std::fs::write(&raw, &raw_disk).unwrap();
        let disk_image = work.path().join("disk.qcow2");
        let converted = Command::new("qemu-img")
            .args(["convert", "-f", "raw", "-O", "qcow2"])
            .arg(&raw)
            .arg(&disk_image)
            .output()
            .unwrap();
        assert!(converted.status.success(), "{converted:?}");

        let guests = Arc::new(Mutex::new(Vec::new()));
        let volumes = Arc::new(Mutex::new(Vec::new()));
        let guest = Arc::new(Mutex::new(Guest::Run));
        let (powered_on, mut next) = tokio::sync::mpsc::unbounded_channel::<Server>();
        fake.on_poweron(move |server| {
            let _ = powered_on.send(server.clone());
        });
        let scenario = Scenario {
            fake: Arc::new(fake),
            work,
            disk_image,
            raw_disk,
            guests: guests.clone(),
            volumes: volumes.clone(),
            guest: guest.clone(),
            s3: S3Server::start().await.unwrap(),
        };
        let fake = scenario.fake.clone();
        let dir = scenario.work.path().to_path_buf();
        tokio::spawn(async move {
            while let Some(server) = next.recv().await {
                let mode = *guest.lock().unwrap();
                match mode {
                    Guest::Silent => continue,
                    Guest::DoneUnreachable => {
                        fake.set_state_detail(&server.id, "done");
                        continue;
                    }
                    Guest::StormThenRun(n) => fake.inject_429(n),
                    Guest::FailNextThenRun {
                        prefix,
                        status,
                        body,
                    } => fake.fail_next(prefix, status, body),
                    Guest::Run => {}
                }
                let metadata = fake.serve_metadata(&server.id).await;
                // The last volume is the one the agent writes, as big as
                // the fake made it.
                let (_, volume_id) = server.volumes.last_key_value().unwrap();
                // An l_ssd volume, or an sbs_volume (Block API).
                let size = fake
                    .volumes()
                    .into_iter()
                    .find(|v| &v.id == volume_id)
                    .map(|v| v.size)
                    .or_else(|| {
                        fake.block_volumes()
                            .into_iter()
                            .find(|v| &v.id == volume_id)
                            .map(|v| v.size)
                    })
                    .unwrap();
                let volume = dir.join(format!("{}.volume", server.id));
                std::fs::File::create(&volume)
                    .unwrap()
                    .set_len(size)
                    .unwrap();
                let child = run_guest(&server, metadata, &volume, &dir);
                guests.lock().unwrap().push(child);
                volumes.lock().unwrap().push((server.id.clone(), volume));
            }
        });
        scenario
    }

    /// `imgforge build --provider scaleway ...` with the fake's credentials.
    fn build(&self, name: &str, extra: &[&str]) -> Output {
        self.build_sized(name, "64M", extra)
    }

    /// [`Scenario::build`] onto a volume of `size`.
    fn build_sized(&self, name: &str, size: &str, extra: &[&str]) -> Output {
        self.run_build(name, size, extra, true)
    }

    /// [`Scenario::build`], printing its result as text.
    fn build_text(&self, name: &str) -> Output {
        self.run_build(name, "64M", &[], false)
    }

    fn run_build(&self, name: &str, size: &str, extra: &[&str], json: bool) -> Output {
        let artifacts = free_port();
        let listen = format!("127.0.0.1:{artifacts}");
        let public_url = format!("http://127.0.0.1:{artifacts}");
        let done_port = format!("signal_build_done_port={}", free_port());
        let mut args = if json { vec!["--json"] } else { vec![] };
        args.extend([
            "build",
            "--provider",
            "scaleway",
            "--method",
            "from-qcow2",
            "--name",
            name,
            "--size",
            size,
            "--listen",
            &listen,
            "--public-url",
            &public_url,
            "--param",
            &done_port,
            "--boot-timeout",
            "60",
            "--timeout",
            "120",
        ]);
        // These scenarios are of build servers in the cloud; import (the
        // default) is tested in scaleway_push.rs.
        if !extra.contains(&"--strategy") {
            args.extend(["--strategy", "helper"]);
        }
        args.extend_from_slice(extra);
        let output = self
            .imgforge()
            .args(&args)
            .arg("--disk-image")
            .arg(&self.disk_image)
            .output()
            .unwrap();
        eprintln!("{}", String::from_utf8_lossy(&output.stderr));
        output
    }

    /// imgforge with the Scaleway configuration in the environment only.
    fn imgforge(&self) -> Command {
        let mut command = Command::new(tests::imgforge_bin());
        command
            .env("HOME", self.work.path())
            .env_remove("XDG_CONFIG_HOME")
            .env_remove("SCW_PROFILE")
            .env_remove("SCW_CONFIG_PATH")
            .env("SCW_API_URL", self.fake.url())
            .env("SCW_SECRET_KEY", self.fake.secret())
            .env("SCW_ACCESS_KEY", "SCWXXXXXXXXXXXXXXXXX")
            .env("IMGFORGE_S3_ENDPOINT", self.s3.endpoint())
            .env("SCW_DEFAULT_PROJECT_ID", self.fake.project())
            .env("SCW_DEFAULT_ZONE", self.fake.zone())
            .env("IMGFORGE_AGENT", tests::agent_bin())
            .stdin(Stdio::null());
        command
    }

    fn set_guest(&self, guest: Guest) {
        *self.guest.lock().unwrap() = guest;
    }

    /// The body of the build's `POST /servers`.
    fn create_request(&self) -> Value {
        self.fake
            .calls()
            .into_iter()
            .find(|c| c.method == "POST" && c.path.ends_with("/servers"))
            .and_then(|c| c.body_json)
            .expect("a POST /servers with a JSON body")
    }

    /// The volume file the guest stand-in of `server` wrote.
    fn volume_of(&self, server: &str) -> PathBuf {
        self.volumes
            .lock()
            .unwrap()
            .iter()
            .find(|(id, _)| id == server)
            .map(|(_, path)| path.clone())
            .unwrap_or_else(|| panic!("no guest ran for server {server}"))
    }

    fn assert_nothing_but_images_left(&self) {
        assert!(self.fake.servers().is_empty(), "{:?}", self.fake.servers());
        assert!(self.fake.volumes().is_empty(), "{:?}", self.fake.volumes());
        assert!(
            self.fake.block_volumes().is_empty(),
            "{:?}",
            self.fake.block_volumes()
        );
    }
}

impl Drop for Scenario {
    fn drop(&mut self) {
        for child in self.guests.lock().unwrap().iter_mut() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Runs what `server` would run at boot: its cloud-init script (helper) or
/// the agent as the initrd would (bootscript).
fn run_guest(server: &Server, metadata: SocketAddr, volume: &Path, dir: &Path) -> Child {
    let log = std::fs::File::create(dir.join(format!("{}.guest.log", server.id))).unwrap();
    let mut command = if server.boot_type == "bootscript" {
        let mut command = Command::new(tests::agent_bin());
        command
            .args([
                "run",
                "--metadata",
                "--serve",
                "--serve-address",
                "127.0.0.1",
            ])
            .arg("--param")
            .arg(format!("METADATA_IP={metadata}"))
            .arg("--volume")
            .arg(volume);
        command
    } else {
        let script = server
            .user_data
            .get("cloud-init")
            .expect("a helper server has a cloud-init script");
        let path = dir.join(format!("{}.cloud-init", server.id));
        std::fs::write(&path, script).unwrap();
        let mut command = Command::new("sh");
        command
            .arg(&path)
            .env("IMGFORGE_VOLUME", volume)
            .env("METADATA_IP", metadata.to_string())
            .env("IMGFORGE_DONE_ADDRESS", "127.0.0.1");
        command
    };
    command
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .unwrap()
}

#[derive(PartialEq)]
enum Strategy {
    /// A helper server with `sbs_volume` volumes (the default).
    Helper,
    /// A helper server with `--scw-volume-type l_ssd`.
    HelperLSsd,
    Bootscript,
}

/// The calls of a whole build (see [`call_sequence`]).
fn expected_calls(strategy: Strategy) -> Vec<&'static str> {
    // The name is free.
    let mut calls = vec!["GET /images"];
    if strategy != Strategy::Bootscript {
        // The stock image's label, for the root volume's type.
        calls.push("GET /marketplace/v2/local-images");
    }
    calls.push("POST /servers");
    if strategy != Strategy::Bootscript {
        calls.push("PATCH /servers/{id}/user_data/cloud-init");
    }
    calls.extend([
        // poweron, then the progress and done-line polling.
        "GET /servers/{id}",
        "POST /servers/{id}/action",
        "GET /servers/{id}",
        // poweroff
        "POST /servers/{id}/action",
        "GET /servers/{id}",
    ]);
    if strategy == Strategy::Helper {
        // The written sbs_volume is snapshotted through the Block API and
        // the snapshot takes the server's build tag; the volumes are
        // deleted there.
        calls.extend([
            "GET /block/v1/zones/fr-par-1/volumes/{id}",
            "GET /servers/{id}",
            "POST /block/v1/zones/fr-par-1/snapshots",
            "GET /block/v1/zones/fr-par-1/snapshots/{id}",
            "POST /images",
            "GET /images/{id}",
            "GET /servers/{id}",
            "DELETE /servers/{id}",
            "DELETE /block/v1/zones/fr-par-1/volumes/{id}",
        ]);
    } else {
        if strategy == Strategy::Bootscript {
            // A bootscript server's volume is l_ssd, but sbs_volume is
            // configured: the Block API is asked first and its 404 is no
            // answer.
            calls.push("GET /block/v1/zones/fr-par-1/volumes/{id}");
        }
        calls.extend([
            // The snapshot of the written volume takes the server's build tag.
            "GET /volumes/{id}",
            "GET /servers/{id}",
            "POST /snapshots",
            "GET /snapshots/{id}",
        ]);
        if strategy == Strategy::Bootscript {
            // The image's snapshot, Block API first again.
            calls.extend([
                "GET /block/v1/zones/fr-par-1/snapshots/{id}",
                "GET /snapshots/{id}",
            ]);
        }
        calls.extend([
            "POST /images",
            "GET /images/{id}",
            "GET /servers/{id}",
            "DELETE /servers/{id}",
            "DELETE /volumes/{id}",
        ]);
    }
    calls
}

fn report_of(output: &Output) -> Value {
    assert!(
        output.status.success(),
        "imgforge build failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_slice(&output.stdout).unwrap()
}

async fn fake() -> FakeScaleway {
    FakeScaleway::builder()
        .delay(Duration::from_millis(50))
        .start()
        .await
}

#[tokio::test(flavor = "multi_thread")]
async fn a_helper_build_writes_the_second_volume_and_leaves_only_the_image() {
    let scenario = Scenario::start(fake().await).await;
    let output = tokio::task::block_in_place(|| scenario.build("helper-image", &[]));
    let report = report_of(&output);
    assert_eq!(report["provider"], "scaleway");
    assert_eq!(report["strategy"], "helper");
    assert_eq!(report["done"]["status"], "0", "{report}");
    let build_id = report["build_id"].as_str().unwrap().to_string();
    // The agent's state, through the metadata API and the server's
    // state_detail, is the build's progress, as with the local provider.
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("s] server: "), "{stderr}");

    let sequence = call_sequence(&scenario.fake.calls());
    assert_eq!(sequence, expected_calls(Strategy::Helper), "{sequence:#?}");

    // The server: the stock image's instance_sbs id, a blank second
    // sbs_volume, the build's tags.
    let body = scenario.create_request();
    assert_eq!(
        body["image"].as_str(),
        scenario
            .fake
            .label_sbs_image_id("debian_bookworm")
            .as_deref(),
        "{body}"
    );
    assert_eq!(body["volumes"]["1"]["size"], VOLUME_SIZE, "{body}");
    assert_eq!(body["volumes"]["1"]["volume_type"], "sbs_volume", "{body}");
    let tags: Vec<&str> = body["tags"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t.as_str().unwrap())
        .collect();
    assert!(
        tags.contains(&format!("imgforge-build={build_id}").as_str()),
        "{tags:?}"
    );
    assert!(tags.contains(&"build_method=from-qcow2"), "{tags:?}");
    let server_id = scenario
        .fake
        .calls()
        .into_iter()
        .find_map(|c| {
            c.path
                .strip_suffix("/user_data/cloud-init")
                .and_then(|p| p.rsplit('/').next().map(str::to_string))
        })
        .unwrap();

    // The guest wrote the disk image onto the second volume.
    let written = std::fs::read(scenario.volume_of(&server_id)).unwrap();
    assert_eq!(written.len() as u64, VOLUME_SIZE);
    assert!(
        written[..DISK_SIZE as usize] == scenario.raw_disk[..],
        "the volume does not hold the disk image"
    );

    // The snapshot is a Block snapshot of volume 1 with the build's tag,
    // and the image of that snapshot; nothing else is left.
    let snapshot_call = scenario
        .fake
        .calls()
        .into_iter()
        .find(|c| c.method == "POST" && c.path.ends_with("/snapshots"))
        .unwrap();
    assert!(
        snapshot_call.path.starts_with("/block/v1/"),
        "{snapshot_call:?}"
    );
    assert!(scenario.fake.snapshots().is_empty());
    let snapshots = scenario.fake.block_snapshots();
    assert_eq!(snapshots.len(), 1);
    let (volume_id, volume_name) = snapshots[0].parent_volume.clone().unwrap();
    let sent = snapshot_call.body_json.unwrap();
    assert_eq!(sent["volume_id"], volume_id.as_str());
    assert_eq!(sent["project_id"], scenario.fake.project().as_str());
    assert!(volume_name.ends_with("-vol1"), "{volume_name}");
    let build_tag = format!("imgforge-build={build_id}");
    assert!(
        snapshots[0].tags.contains(&build_tag),
        "{:?}",
        snapshots[0].tags
    );
    let images = scenario.fake.images();
    assert_eq!(images.len(), 1);
    assert_eq!(images[0].name, "helper-image");
    assert_eq!(images[0].root_volume, snapshots[0].id);
    assert!(images[0].tags.contains(&build_tag), "{:?}", images[0].tags);
    assert_eq!(report["image_id"], images[0].id.as_str());
    scenario.assert_nothing_but_images_left();
}

/// `--scw-volume-type l_ssd` (commercial types that need local volumes):
/// the instance_local image, l_ssd volumes, the Instance API's snapshot.
#[tokio::test(flavor = "multi_thread")]
async fn a_helper_build_on_l_ssd_volumes_uses_the_instance_api() {
    let scenario = Scenario::start(fake().await).await;
    let output = tokio::task::block_in_place(|| {
        scenario.build("local-image", &["--scw-volume-type", "l_ssd"])
    });
    let report = report_of(&output);
    assert_eq!(report["done"]["status"], "0", "{report}");
    let sequence = call_sequence(&scenario.fake.calls());
    assert_eq!(
        sequence,
        expected_calls(Strategy::HelperLSsd),
        "{sequence:#?}"
    );
    let body = scenario.create_request();
    assert_eq!(
        body["image"].as_str(),
        scenario.fake.label_image_id("debian_bookworm").as_deref(),
        "{body}"
    );
    assert_eq!(body["volumes"]["1"]["volume_type"], "l_ssd", "{body}");
    let snapshots = scenario.fake.snapshots();
    assert_eq!(snapshots.len(), 1);
    assert!(scenario.fake.block_snapshots().is_empty());
    let (_, volume_name) = snapshots[0].base_volume.clone().unwrap();
    assert!(volume_name.ends_with("-vol1"), "{volume_name}");
    assert_eq!(scenario.fake.images()[0].root_volume, snapshots[0].id);
    scenario.assert_nothing_but_images_left();
}

async fn legacy_fake() -> FakeScaleway {
    FakeScaleway::builder()
        .delay(Duration::from_millis(50))
        .bootscripts(&["image-creation-x86_64"])
        .start()
        .await
}

/// Where bootscripts still exist, the original flow: a bootscript server
/// with one blank volume, the parameters as tags, the agent in the initrd.
#[tokio::test(flavor = "multi_thread")]
async fn a_bootscript_build_boots_the_bootscript_and_snapshots_volume_0() {
    let scenario = Scenario::start(legacy_fake().await).await;
    let output = tokio::task::block_in_place(|| {
        scenario.build(
            "bootscript-image",
            &[
                "--strategy",
                "bootscript",
                "--bootscript-id",
                "image-creation-x86_64",
            ],
        )
    });
    let report = report_of(&output);
    assert_eq!(report["strategy"], "bootscript");
    assert_eq!(report["done"]["status"], "0", "{report}");

    let sequence = call_sequence(&scenario.fake.calls());
    assert_eq!(
        sequence,
        expected_calls(Strategy::Bootscript),
        "{sequence:#?}"
    );
    let create = scenario.create_request();
    assert_eq!(create["boot_type"], "bootscript", "{create}");
    assert_eq!(create["bootscript"], "image-creation-x86_64", "{create}");
    assert!(create.get("image").is_none(), "{create}");
    assert_eq!(create["volumes"]["0"]["size"], VOLUME_SIZE, "{create}");
    assert!(create["volumes"].get("1").is_none(), "{create}");

    let (server_id, volume) = scenario.volumes.lock().unwrap()[0].clone();
    let written = std::fs::read(volume).unwrap();
    assert!(written[..DISK_SIZE as usize] == scenario.raw_disk[..]);
    let (_, volume_name) = scenario.fake.snapshots()[0].base_volume.clone().unwrap();
    assert!(volume_name.ends_with("-vol0"), "{volume_name}");
    assert_eq!(scenario.fake.images().len(), 1);
    assert!(!server_id.is_empty());
    scenario.assert_nothing_but_images_left();
}

/// Today's API refuses bootscripts: the build says so, suggests the helper
/// strategy, and leaves nothing.
#[tokio::test(flavor = "multi_thread")]
async fn a_refused_bootscript_says_to_use_the_helper_strategy() {
    let scenario = Scenario::start(fake().await).await;
    let output = tokio::task::block_in_place(|| {
        scenario.build(
            "refused",
            &["--strategy", "bootscript", "--bootscript-id", "abc"],
        )
    });
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("bootscripts were removed from Scaleway on 2023-05-15"),
        "{stderr}"
    );
    assert!(stderr.contains("--strategy helper"), "{stderr}");
    assert!(stderr.contains("invalid_arguments"), "{stderr}");
    scenario.assert_nothing_but_images_left();
    assert!(scenario.fake.images().is_empty());

    // Without a bootscript id it stops before any request.
    let before = scenario.fake.calls().len();
    let output =
        tokio::task::block_in_place(|| scenario.build("refused", &["--strategy", "bootscript"]));
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("needs --bootscript-id"), "{stderr}");
    assert_eq!(scenario.fake.calls().len(), before);
}

/// 429s without Retry-After before the build and again while the server
/// runs: the build rides them out and creates exactly one server.
#[tokio::test(flavor = "multi_thread")]
async fn a_429_storm_is_ridden_out() {
    let scenario = Scenario::start(fake().await).await;
    scenario.set_guest(Guest::StormThenRun(4));
    scenario.fake.inject_429(4);
    let output = tokio::task::block_in_place(|| scenario.build_text("stormy"));
    assert!(output.status.success());
    // The result line of a local build.
    let stdout = String::from_utf8_lossy(&output.stdout);
    let line =
        regex::Regex::new(r"^image stormy \(([0-9a-f-]{36})\) built in [0-9]+ s\n$").unwrap();
    let id = &line
        .captures(&stdout)
        .unwrap_or_else(|| panic!("{stdout:?}"))[1];
    assert_eq!(scenario.fake.images()[0].id, id);
    let calls = scenario.fake.calls();
    let refused = calls.iter().filter(|c| c.status == 429).count();
    assert!(refused >= 8, "only {refused} requests were refused");
    let creates = calls
        .iter()
        .filter(|c| c.method == "POST" && c.path.ends_with("/servers") && c.status == 201)
        .count();
    assert_eq!(creates, 1);
    assert_eq!(scenario.fake.images().len(), 1);
    scenario.assert_nothing_but_images_left();
}

/// The image cannot be created (a quota): the build fails with the API's
/// message and removes the server, its volumes and the snapshot.
#[tokio::test(flavor = "multi_thread")]
async fn a_failure_mid_pipeline_removes_everything_it_created() {
    let scenario = Scenario::start(fake().await).await;
    // Armed once the server runs: the next /images request is the POST.
    scenario.set_guest(Guest::FailNextThenRun {
        prefix: "/images",
        status: 403,
        body: r#"{"type":"quotas_exceeded","message":"Quotas exceeded: images"}"#,
    });
    let output = tokio::task::block_in_place(|| scenario.build("over-quota", &[]));
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("Quotas exceeded"), "{stderr}");
    scenario.assert_nothing_but_images_left();
    assert!(
        scenario.fake.snapshots().is_empty(),
        "{:?}",
        scenario.fake.snapshots()
    );
    assert!(
        scenario.fake.block_snapshots().is_empty(),
        "{:?}",
        scenario.fake.block_snapshots()
    );
    assert!(scenario.fake.images().is_empty());
}

/// The agent reports a failure (the disk image does not fit the volume):
/// the build fails at once with the agent's message and leaves nothing.
#[tokio::test(flavor = "multi_thread")]
async fn an_agent_failure_ends_the_build_and_leaves_nothing() {
    let scenario = Scenario::start(fake().await).await;
    let output = tokio::task::block_in_place(|| scenario.build_sized("too-small", "4M", &[]));
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("the build failed in stage"), "{stderr}");
    assert!(stderr.contains("larger than the volume"), "{stderr}");
    scenario.assert_nothing_but_images_left();
    assert!(scenario.fake.snapshots().is_empty());
}

/// Ctrl-C while the build waits for the server: exit 130, nothing left.
#[tokio::test(flavor = "multi_thread")]
async fn sigint_removes_the_build_server_and_its_volumes() {
    let scenario = Scenario::start(fake().await).await;
    scenario.set_guest(Guest::Silent);
    let artifacts = free_port();
    let mut child = scenario
        .imgforge()
        .args(["build", "--provider", "scaleway", "--method", "from-qcow2"])
        .args(["--strategy", "helper"])
        .args(["--name", "interrupted", "--size", "64M"])
        .arg("--listen")
        .arg(format!("127.0.0.1:{artifacts}"))
        .arg("--public-url")
        .arg(format!("http://127.0.0.1:{artifacts}"))
        .arg("--disk-image")
        .arg(&scenario.disk_image)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Wait for the server to be running.
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while !scenario.fake.servers().iter().any(|s| s.state == "running") {
        assert!(std::time::Instant::now() < deadline, "no server came up");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGINT,
    )
    .unwrap();
    let status = tokio::task::block_in_place(|| child.wait()).unwrap();
    let mut stderr = String::new();
    std::io::Read::read_to_string(child.stderr.as_mut().unwrap(), &mut stderr).unwrap();
    assert_eq!(status.code(), Some(130), "{stderr}");
    scenario.assert_nothing_but_images_left();
}

/// `imgforge cleanup --provider scaleway`: servers, detached volumes and
/// unused snapshots of killed builds go; finished builds' images (and their
/// snapshots) stay; `--dry-run` and `--build-id` limit it.
#[tokio::test(flavor = "multi_thread")]
async fn cleanup_removes_the_leftovers_of_builds_and_keeps_images() {
    let scenario = Scenario::start(fake().await).await;
    let json = |args: &[&str]| -> Value {
        let output = scenario
            .imgforge()
            .arg("--json")
            .args(args)
            .output()
            .unwrap();
        assert!(
            output.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        serde_json::from_slice(&output.stdout).unwrap()
    };
    let gone = tokio::task::block_in_place(|| {
        // A finished build.
        report_of(&scenario.build("kept", &[]));
        // What a killed build left: a stopped server with its volumes, a
        // snapshot of one of them, and the volumes of a server deleted
        // without them.
        let leftover = |name: &str| {
            json(&[
                "server",
                "create",
                "--provider",
                "scaleway",
                "--name",
                name,
                "--volume",
                "10G",
                "--volume",
                "1G",
                "--tag",
                "imgforge-build=deadbeef",
            ])
        };
        let server = leftover("imgforge-build-deadbeef-a");
        let volume = server["volumes"][1].as_str().unwrap();
        json(&[
            "snapshot",
            "create",
            "--provider",
            "scaleway",
            "--name",
            "half",
            volume,
        ]);
        leftover("imgforge-build-deadbeef-b")["id"]
            .as_str()
            .unwrap()
            .to_string()
    });
    let deleted = reqwest::Client::new()
        .delete(format!("{}/servers/{gone}", scenario.fake.zone_url()))
        .header("X-Auth-Token", scenario.fake.secret())
        .send()
        .await
        .unwrap();
    assert_eq!(deleted.status(), 204);
    assert_eq!(scenario.fake.servers().len(), 1);
    // sbs_volume volumes and Block snapshots (the default volume type).
    assert_eq!(scenario.fake.block_volumes().len(), 4);
    assert_eq!(scenario.fake.block_snapshots().len(), 2);

    let listed =
        tokio::task::block_in_place(|| json(&["cleanup", "--provider", "scaleway", "--dry-run"]));
    let lines: Vec<&str> = listed["resources"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l.as_str().unwrap())
        .collect();
    assert_eq!(lines.len(), 4, "{lines:#?}");
    assert!(
        lines[0].starts_with("server imgforge-build-deadbeef-a"),
        "{lines:#?}"
    );
    assert_eq!(
        lines
            .iter()
            .filter(|l| l.starts_with("volume imgforge-build-deadbeef-b"))
            .count(),
        2
    );
    assert!(lines[3].starts_with("Block snapshot half"), "{lines:#?}");
    // Nothing was removed, and another build id matches nothing.
    assert_eq!(scenario.fake.block_volumes().len(), 4);
    let other = tokio::task::block_in_place(|| {
        json(&[
            "cleanup",
            "--provider",
            "scaleway",
            "--build-id",
            "0badc0de",
        ])
    });
    assert_eq!(other["resources"].as_array().unwrap().len(), 0);

    let removed = tokio::task::block_in_place(|| json(&["cleanup", "--provider", "scaleway"]));
    assert_eq!(removed["resources"].as_array().unwrap().len(), 4);
    assert!(scenario.fake.servers().is_empty());
    scenario.assert_nothing_but_images_left();
    let images = scenario.fake.images();
    assert_eq!(images.len(), 1);
    assert_eq!(images[0].name, "kept");
    let snapshots = scenario.fake.block_snapshots();
    assert_eq!(snapshots.len(), 1, "{snapshots:?}");
    assert_eq!(images[0].root_volume, snapshots[0].id);
}

/// The agent reports `done`, but its done port cannot be reached: the build
/// says which port to open instead of waiting for --timeout, and leaves
/// nothing.
#[tokio::test(flavor = "multi_thread")]
async fn an_unreachable_done_port_is_named_in_the_error() {
    let scenario = Scenario::start(fake().await).await;
    scenario.set_guest(Guest::DoneUnreachable);
    let started = std::time::Instant::now();
    let output = tokio::task::block_in_place(|| scenario.build("blocked", &[]));
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("let TCP port"), "{stderr}");
    assert!(stderr.contains("security group"), "{stderr}");
    // Well before --timeout (120 s).
    assert!(started.elapsed() < Duration::from_secs(60));
    scenario.assert_nothing_but_images_left();
    assert!(scenario.fake.images().is_empty());
}
