//! `imgforge image push` and `imgforge build --strategy import` against a
//! real S3 server on loopback (moto) and the Scaleway fake, whose Block API
//! import reads the uploaded object from that server and validates it as
//! Scaleway documents. Judges: the S3 server's own listings, qemu-img (the
//! object read back and converted to raw), the fake's records.

use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;
use test_support::s3_server::{S3FaultProxy, S3Server};
use tests::fake_scaleway::FakeScaleway;
use tests::{bootscript_dir, busybox_rootfs_tar_gz, LocalHome};

const BUCKET: &str = "imgforge-push-tests";
/// Scaleway's smallest import, SI.
const GB: u64 = 1_000_000_000;

/// A local provider home, a real S3 server, and the fake reading from it.
struct Setup {
    home: LocalHome,
    s3: S3Server,
    fake: FakeScaleway,
    work: tempfile::TempDir,
}

impl Setup {
    async fn start() -> Setup {
        let s3 = S3Server::start().await.unwrap();
        let fake = FakeScaleway::builder()
            .delay(Duration::from_millis(50))
            .object_storage(&s3.endpoint())
            .start()
            .await;
        Setup {
            home: LocalHome::new(),
            s3,
            fake,
            work: tempfile::tempdir().unwrap(),
        }
    }

    /// `imgforge ARGS` on the local home, with the fake's credentials and
    /// `endpoint` (the S3 server, or a proxy in front of it) as Object
    /// Storage.
    fn imgforge(&self, endpoint: &str, args: &[&str]) -> Command {
        let mut command = self.home.command(args);
        command
            .env("HOME", self.work.path())
            .env_remove("XDG_CONFIG_HOME")
            .env_remove("SCW_PROFILE")
            .env_remove("SCW_CONFIG_PATH")
            .env("SCW_API_URL", self.fake.url())
            .env("SCW_SECRET_KEY", self.fake.secret())
            .env("SCW_ACCESS_KEY", "SCWXXXXXXXXXXXXXXXXX")
            .env("SCW_DEFAULT_PROJECT_ID", self.fake.project())
            .env("SCW_DEFAULT_ZONE", self.fake.zone())
            .env("IMGFORGE_S3_ENDPOINT", endpoint)
            .env("IMGFORGE_SCW_BUCKET", BUCKET)
            .stdin(Stdio::null());
        command
    }

    /// `imgforge --json image push IMAGE --provider scaleway EXTRA...`.
    fn push(&self, endpoint: &str, image: &str, extra: &[&str]) -> Output {
        let mut args = vec!["--json", "image", "push", image, "--provider", "scaleway"];
        args.extend_from_slice(extra);
        self.imgforge(endpoint, &args).output().unwrap()
    }

    /// A local image whose disk is `data` followed by zeros up to `size`,
    /// stored as a QCOW2 with `compression` (zlib or zstd) clusters.
    fn local_image(&self, name: &str, data: &[u8], size: &str, compression: &str) -> String {
        let server = self.home.json([
            "server",
            "create",
            "--name",
            &format!("{name}-source"),
            "--volume",
            size,
        ]);
        let server_id = server["id"].as_str().unwrap().to_string();
        let snapshot = self.home.json([
            "snapshot",
            "create",
            &server_id,
            "--name",
            &format!("{name}-snap"),
        ]);
        let snapshot_id = snapshot["id"].as_str().unwrap();
        // The snapshot's data, replaced by the test's disk.
        let raw = self.work.path().join(format!("{name}.raw"));
        std::fs::write(&raw, data).unwrap();
        let file = self
            .home
            .path()
            .join(format!("snapshots/{snapshot_id}.qcow2"));
        qemu_img(&[
            "convert",
            "-f",
            "raw",
            "-O",
            "qcow2",
            "-c",
            "-o",
            &format!("compression_type={compression}"),
            raw.to_str().unwrap(),
            file.to_str().unwrap(),
        ]);
        qemu_img(&["resize", "-f", "qcow2", file.to_str().unwrap(), size]);
        let image = self
            .home
            .json(["image", "create", "--name", name, "--snapshot", snapshot_id]);
        let removed = self
            .home
            .command(["server", "rm", &server_id])
            .output()
            .unwrap();
        assert!(removed.status.success(), "{removed:?}");
        image["id"].as_str().unwrap().to_string()
    }

    /// The S3 server's unfinished uploads and objects in the bucket.
    async fn s3_leftovers(&self) -> (Vec<(String, String)>, Vec<String>) {
        (
            self.s3
                .list_multipart_uploads(BUCKET)
                .await
                .unwrap_or_default(),
            self.s3.list_objects(BUCKET).await.unwrap_or_default(),
        )
    }

    /// A push through `proxy` (set to hold a part), once it is mid-upload:
    /// one part sent, the next held.
    async fn spawn_held_push(&self, proxy: &S3FaultProxy, image: &str) -> std::process::Child {
        let child = self
            .imgforge(
                &proxy.endpoint(),
                &[
                    "image",
                    "push",
                    image,
                    "--provider",
                    "scaleway",
                    "--part-size",
                    "5M",
                    "--parallel-parts",
                    "1",
                ],
            )
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        wait_for_held_part(proxy, 1).await;
        child
    }

    /// The push's temporary QCOW2s.
    fn temp_exports(&self) -> Vec<String> {
        self.home.files("tmp")
    }
}

fn qemu_img(args: &[&str]) -> String {
    let output = Command::new("qemu-img").args(args).output().unwrap();
    assert!(
        output.status.success(),
        "qemu-img {args:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

fn report_of(output: &Output) -> Value {
    assert!(
        output.status.success(),
        "imgforge failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_slice(&output.stdout).unwrap()
}

/// Pseudo-random bytes (incompressible enough that the QCOW2 is as large).
fn noise(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(6364136223846793005).wrapping_add(1);
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

/// Whether two files have the same bytes (streamed: raw disks are large).
fn same_bytes(a: &Path, b: &Path) -> bool {
    use std::io::Read;
    let (mut a, mut b) = (
        std::io::BufReader::with_capacity(1 << 20, std::fs::File::open(a).unwrap()),
        std::io::BufReader::with_capacity(1 << 20, std::fs::File::open(b).unwrap()),
    );
    let (mut x, mut y) = (vec![0u8; 1 << 20], vec![0u8; 1 << 20]);
    loop {
        let n = a.read(&mut x).unwrap();
        let mut filled = 0;
        while filled < n {
            let m = b.read(&mut y[filled..n]).unwrap();
            if m == 0 {
                return false;
            }
            filled += m;
        }
        if x[..n] != y[..n] {
            return false;
        }
        if n == 0 {
            return b.read(&mut y).unwrap() == 0;
        }
    }
}

fn qemu_img_info(path: &Path) -> Value {
    serde_json::from_str(&qemu_img(&[
        "info",
        "--output=json",
        path.to_str().unwrap(),
    ]))
    .unwrap()
}

/// A 3 GiB image: the uploaded object, read back from the S3 server,
/// converted to raw, equals the local image's raw export; the local image
/// was zstd-compressed and the object is not; the upload took several
/// parts; the image's root volume is the imported Block snapshot, tagged
/// with the build.
#[tokio::test(flavor = "multi_thread")]
async fn a_pushed_image_is_the_local_image_byte_for_byte() {
    let setup = Setup::start().await;
    let mut data = noise(14 << 20, 1);
    data.extend(vec![0u8; 3 << 20]);
    data.extend(noise(3 << 20, 2));
    let image = setup.local_image("bytes", &data, "3G", "zstd");
    let endpoint = setup.s3.endpoint();
    let output = tokio::task::block_in_place(|| {
        setup.push(&endpoint, &image, &["--keep-object", "--part-size", "5M"])
    });
    let report = report_of(&output);
    assert!(report["upload"]["parts"].as_u64().unwrap() > 1, "{report}");
    assert_eq!(report["arch"], "x86_64");
    assert_eq!(report["object_kept"], true);
    let key = report["key"].as_str().unwrap();
    let build_id = report["build_id"].as_str().unwrap();
    assert_eq!(key, format!("imgforge/{build_id}/bytes.qcow2"));

    // The Scaleway side: the image's root is the imported snapshot.
    let snapshot_id = report["snapshot_id"].as_str().unwrap();
    let snapshot = setup.fake.block_snapshot(snapshot_id).unwrap();
    assert_eq!(snapshot.status, "available");
    assert_eq!(snapshot.key.as_deref(), Some(key));
    assert_eq!(snapshot.bucket.as_deref(), Some(BUCKET));
    assert_eq!(
        snapshot.requested_size,
        Some(4 * GB),
        "3 GiB rounds up to 4 GB"
    );
    assert!(snapshot
        .tags
        .contains(&format!("imgforge-build={build_id}")));
    let images = setup.fake.images();
    let pushed = images.iter().find(|i| i.id == report["image_id"]).unwrap();
    assert_eq!(pushed.name, "bytes");
    assert_eq!(pushed.root_volume, snapshot_id);
    assert!(pushed.tags.contains(&format!("imgforge-build={build_id}")));

    // The object, judged by qemu-img.
    let object = setup.s3.get_object(BUCKET, key).await.unwrap().unwrap();
    let object_file = setup.work.path().join("object.qcow2");
    std::fs::write(&object_file, &object).unwrap();
    let info = qemu_img_info(&object_file);
    assert_eq!(info["format"], "qcow2");
    assert!(info.get("backing-filename").is_none(), "{info}");
    assert_eq!(info["format-specific"]["data"]["compression-type"], "zlib");
    let from_object = setup.work.path().join("object.raw");
    qemu_img(&[
        "convert",
        "-O",
        "raw",
        object_file.to_str().unwrap(),
        from_object.to_str().unwrap(),
    ]);
    let exported = setup.work.path().join("local.raw");
    let export = setup
        .home
        .command(["image", "export", &image, "--format", "raw", "-o"])
        .arg(&exported)
        .output()
        .unwrap();
    assert!(export.status.success(), "{export:?}");
    assert_eq!(
        std::fs::metadata(&from_object).unwrap().len(),
        3 << 30,
        "no growth above 1 GB"
    );
    assert!(
        same_bytes(&from_object, &exported),
        "the object differs from the local image"
    );
    let (uploads, _) = setup.s3_leftovers().await;
    assert!(uploads.is_empty(), "{uploads:?}");
    assert!(
        setup.temp_exports().is_empty(),
        "{:?}",
        setup.temp_exports()
    );
}

/// Without --keep-object the object goes once the image exists; a disk
/// smaller than Scaleway's 1 GB is grown to it.
#[tokio::test(flavor = "multi_thread")]
async fn the_object_is_removed_and_small_disks_are_grown() {
    let setup = Setup::start().await;
    let image = setup.local_image("small", &noise(2 << 20, 3), "64M", "zlib");
    let endpoint = setup.s3.endpoint();
    let report = report_of(&tokio::task::block_in_place(|| {
        setup.push(&endpoint, &image, &[])
    }));
    assert_eq!(report["object_kept"], false);
    assert_eq!(report["volume_size"], GB);
    let snapshot = setup
        .fake
        .block_snapshot(report["snapshot_id"].as_str().unwrap())
        .unwrap();
    assert_eq!(snapshot.status, "available");
    assert_eq!(snapshot.requested_size, Some(GB));
    let (uploads, objects) = setup.s3_leftovers().await;
    assert!(
        uploads.is_empty() && objects.is_empty(),
        "{uploads:?} {objects:?}"
    );

    // Pushing it again under the same name is refused before any upload.
    let again = tokio::task::block_in_place(|| setup.push(&endpoint, &image, &[]));
    assert!(!again.status.success());
    let stderr = String::from_utf8_lossy(&again.stderr);
    assert!(stderr.contains("has an image named \"small\""), "{stderr}");
    let (uploads, objects) = setup.s3_leftovers().await;
    assert!(
        uploads.is_empty() && objects.is_empty(),
        "{uploads:?} {objects:?}"
    );
}

/// A part upload that fails twice is sent again and the push succeeds; the
/// grown disk's object says 1 GB.
#[tokio::test(flavor = "multi_thread")]
async fn a_part_that_fails_twice_is_retried() {
    let setup = Setup::start().await;
    let proxy = S3FaultProxy::start(&setup.s3.endpoint()).await.unwrap();
    let image = setup.local_image("retried", &noise(12 << 20, 4), "64M", "zlib");
    proxy.fail_part_uploads(2);
    let report = report_of(&tokio::task::block_in_place(|| {
        setup.push(
            &proxy.endpoint(),
            &image,
            &[
                "--part-size",
                "5M",
                "--parallel-parts",
                "1",
                "--keep-object",
            ],
        )
    }));
    assert_eq!(proxy.failed(), 2);
    assert_eq!(report["upload"]["retries"], 2, "{report}");
    let attempts = proxy.part_upload_attempts();
    let parts = report["upload"]["parts"].as_u64().unwrap();
    assert!(parts >= 2, "{report}");
    assert_eq!(attempts.len() as u64, parts + 2, "{attempts:?}");
    assert_eq!(&attempts[..3], &[1, 1, 1], "part 1 was tried three times");
    let key = report["key"].as_str().unwrap();
    let object = setup.s3.get_object(BUCKET, key).await.unwrap().unwrap();
    let object_file = setup.work.path().join("retried.qcow2");
    std::fs::write(&object_file, &object).unwrap();
    assert_eq!(qemu_img_info(&object_file)["virtual-size"], GB);
}

/// Waits until the proxy holds a part (the push is mid-upload).
async fn wait_for_held_part(proxy: &S3FaultProxy, held_after: usize) {
    let deadline = Instant::now() + Duration::from_secs(120);
    while proxy.part_upload_attempts().len() <= held_after {
        assert!(
            Instant::now() < deadline,
            "the upload never reached the held part"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // The held request is in; give it a moment to be parked.
    tokio::time::sleep(Duration::from_millis(300)).await;
}

/// Ctrl-C mid-upload: exit 130, the multipart upload aborted (the S3
/// server lists none), no object, no snapshot, no temporary QCOW2.
#[tokio::test(flavor = "multi_thread")]
async fn sigint_during_the_upload_leaves_nothing() {
    let setup = Setup::start().await;
    let proxy = S3FaultProxy::start(&setup.s3.endpoint()).await.unwrap();
    let image = setup.local_image("interrupted", &noise(16 << 20, 5), "64M", "zlib");
    proxy.hang_after_parts(1);
    let mut child = setup.spawn_held_push(&proxy, &image).await;
    assert_eq!(
        setup.s3.list_multipart_uploads(BUCKET).await.unwrap().len(),
        1,
        "the upload is under way"
    );
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGINT,
    )
    .unwrap();
    let status = tokio::task::block_in_place(|| child.wait()).unwrap();
    let mut stderr = String::new();
    std::io::Read::read_to_string(child.stderr.as_mut().unwrap(), &mut stderr).unwrap();
    assert_eq!(status.code(), Some(130), "{stderr}");
    let (uploads, objects) = setup.s3_leftovers().await;
    assert!(uploads.is_empty(), "uploads left: {uploads:?}\n{stderr}");
    assert!(objects.is_empty(), "objects left: {objects:?}");
    assert!(setup.fake.block_snapshots().is_empty());
    assert!(
        setup.temp_exports().is_empty(),
        "{:?}",
        setup.temp_exports()
    );
}

/// An import that ends in `error` fails the push with the snapshot's id and
/// status, and removes the object and the snapshot.
#[tokio::test(flavor = "multi_thread")]
async fn an_import_that_ends_in_error_removes_object_and_snapshot() {
    let setup = Setup::start().await;
    let image = setup.local_image("refused", &noise(1 << 20, 6), "64M", "zlib");
    setup.fake.fail_next_import("the volume could not be read");
    let endpoint = setup.s3.endpoint();
    let output = tokio::task::block_in_place(|| setup.push(&endpoint, &image, &[]));
    assert_eq!(output.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("did not succeed"), "{stderr}");
    assert!(stderr.contains("error"), "{stderr}");
    assert!(setup.fake.block_snapshots().is_empty(), "snapshot left");
    assert!(setup.fake.images().is_empty());
    let (uploads, objects) = setup.s3_leftovers().await;
    assert!(
        uploads.is_empty() && objects.is_empty(),
        "{uploads:?} {objects:?}"
    );
}

/// A push killed without a chance to clean up (SIGKILL) leaves its upload;
/// `imgforge cleanup --provider scaleway --build-id` aborts it.
#[tokio::test(flavor = "multi_thread")]
async fn cleanup_aborts_the_upload_of_a_killed_push() {
    let setup = Setup::start().await;
    let proxy = S3FaultProxy::start(&setup.s3.endpoint()).await.unwrap();
    let image = setup.local_image("killed", &noise(16 << 20, 7), "64M", "zlib");
    proxy.hang_after_parts(1);
    let mut child = setup.spawn_held_push(&proxy, &image).await;
    child.kill().unwrap();
    tokio::task::block_in_place(|| child.wait()).unwrap();
    let uploads = setup.s3.list_multipart_uploads(BUCKET).await.unwrap();
    assert_eq!(uploads.len(), 1, "{uploads:?}");
    let build_id = uploads[0]
        .0
        .strip_prefix("imgforge/")
        .and_then(|rest| rest.split_once('/'))
        .unwrap()
        .0
        .to_string();
    let endpoint = setup.s3.endpoint();
    let cleanup = |extra: &[&str]| -> Value {
        let mut args = vec!["--json", "cleanup", "--provider", "scaleway", "--build-id"];
        args.push(&build_id);
        args.extend_from_slice(extra);
        report_of(&setup.imgforge(&endpoint, &args).output().unwrap())
    };
    let dry = tokio::task::block_in_place(|| cleanup(&["--dry-run"]));
    let listed = dry["resources"].to_string();
    assert!(listed.contains("multipart upload"), "{listed}");
    assert_eq!(
        setup.s3.list_multipart_uploads(BUCKET).await.unwrap().len(),
        1
    );
    tokio::task::block_in_place(|| cleanup(&[]));
    let (uploads, objects) = setup.s3_leftovers().await;
    assert!(
        uploads.is_empty() && objects.is_empty(),
        "{uploads:?} {objects:?}"
    );
}

/// `imgforge build --provider scaleway` (import, the default): a real local
/// build (QEMU, the agent), then the push; the Scaleway image's root is the
/// imported snapshot, the object and the local image are gone.
#[tokio::test(flavor = "multi_thread")]
async fn a_build_with_the_import_strategy_ends_with_the_imported_image() {
    let setup = Setup::start().await;
    let rootfs = setup.work.path().join("rootfs.tar.gz");
    std::fs::write(&rootfs, busybox_rootfs_tar_gz("imported", false)).unwrap();
    let endpoint = setup.s3.endpoint();
    let output = tokio::task::block_in_place(|| {
        setup
            .imgforge(
                &endpoint,
                &[
                    "--json",
                    "build",
                    "--provider",
                    "scaleway",
                    "--method",
                    "unpartitioned-from-rootfs",
                    "--rootfs",
                    rootfs.to_str().unwrap(),
                    "--name",
                    "imported",
                    "--size",
                    "64M",
                    "--bootscript-dir",
                    bootscript_dir().to_str().unwrap(),
                    "--boot-timeout",
                    "180",
                    "--timeout",
                    "300",
                ],
            )
            .output()
            .unwrap()
    });
    let report = report_of(&output);
    assert_eq!(report["strategy"], "import");
    assert_eq!(report["provider"], "scaleway");
    assert_eq!(report["done"]["status"], "0");
    let image_id = report["image_id"].as_str().unwrap();
    let images = setup.fake.images();
    let image = images.iter().find(|i| i.id == image_id).unwrap();
    assert_eq!(image.name, "imported");
    let snapshot = setup.fake.block_snapshot(&image.root_volume).unwrap();
    assert_eq!(snapshot.status, "available");
    assert_eq!(
        snapshot.key.as_deref(),
        Some(
            format!(
                "imgforge/{}/imported.qcow2",
                report["build_id"].as_str().unwrap()
            )
            .as_str()
        )
    );
    let (uploads, objects) = setup.s3_leftovers().await;
    assert!(
        uploads.is_empty() && objects.is_empty(),
        "{uploads:?} {objects:?}"
    );
    // Nothing local stays: no server, volume, image or temporary export.
    setup.home.assert_no_servers_left();
    assert!(
        setup.home.files("images").is_empty(),
        "{:?}",
        setup.home.files("images")
    );
    assert!(setup.temp_exports().is_empty());
    assert!(setup.fake.servers().is_empty(), "no server in the cloud");
}

/// Upload options Object Storage cannot take are refused before the export
/// and before anything is created.
#[tokio::test(flavor = "multi_thread")]
async fn impossible_part_sizes_are_refused_first() {
    let setup = Setup::start().await;
    let image = setup.local_image("unsent", &noise(1 << 20, 8), "64M", "zlib");
    let endpoint = setup.s3.endpoint();
    let output =
        tokio::task::block_in_place(|| setup.push(&endpoint, &image, &["--part-size", "1M"]));
    assert_eq!(output.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("--part-size 1 MiB: Object Storage takes parts of 5M or more"),
        "{stderr}"
    );
    assert!(setup.temp_exports().is_empty());
    assert!(
        setup.s3.list_objects(BUCKET).await.is_err(),
        "the bucket was not even created"
    );
    assert!(setup.fake.calls().is_empty(), "no Scaleway call");
}
