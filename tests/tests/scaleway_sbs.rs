//! Contract tests of the Scaleway provider with SBS (Block API) volumes and
//! snapshots, against the in-repo fake: every resource command routes by
//! volume type (`sbs_volume`/`sbs_snapshot` to the Block API, `l_ssd` to the
//! Instance API), a 404 from the wrong API is never taken for success, and
//! image labels resolve through the marketplace as sdk-go does.
//!
//! Each test is one of issue 15's measured bugs: it failed on the provider
//! that spoke only the Instance API.

use std::process::{Command, Output, Stdio};
use std::time::Duration;

use host::provider::scaleway::{Client, ClientOptions, Config, RetryPolicy, SecretKey};
use host::provider::scaleway::{ScalewayOptions, ScalewayProvider, VolumeType};
use host::provider::{Boot, Provider, ServerSpec, VolumeSpec};
use serde_json::Value;
use tests::fake_scaleway::{call_sequence, FakeScaleway};

const GB: u64 = 1_000_000_000;

async fn fake() -> FakeScaleway {
    FakeScaleway::builder()
        .delay(Duration::from_millis(30))
        .start()
        .await
}

fn config(fake: &FakeScaleway) -> Config {
    Config {
        access_key: None,
        secret_key: SecretKey::new(fake.secret()),
        default_project_id: fake.project(),
        default_zone: fake.zone(),
        default_region: "fr-par".to_string(),
        api_url: fake.url(),
        profile: None,
        config_path: None,
    }
}

/// The provider on `fake` with the default options (`sbs_volume`), with
/// retries and polling shrunk to milliseconds.
fn provider(fake: &FakeScaleway) -> ScalewayProvider {
    let client_options = ClientOptions {
        retry: RetryPolicy {
            max_attempts: 8,
            initial_backoff: Duration::from_millis(1),
            max_backoff: Duration::from_millis(8),
        },
        request_timeout: Duration::from_secs(5),
        connect_timeout: Duration::from_secs(5),
        poll_interval: Duration::from_millis(10),
        per_page: 100,
    };
    let options = ScalewayOptions {
        server_timeout: Duration::from_secs(10),
        snapshot_timeout: Duration::from_secs(10),
        image_timeout: Duration::from_secs(10),
        ..ScalewayOptions::default()
    };
    assert_eq!(options.volume_type, VolumeType::SbsVolume, "the default");
    ScalewayProvider::new(
        Client::with_options(&config(fake), client_options).unwrap(),
        options,
    )
}

/// A helper-style server: root and a blank second volume, a build tag.
fn spec() -> ServerSpec {
    ServerSpec {
        name: "imgforge-build-b1-test".into(),
        boot: Some(Boot::Local),
        volumes: vec![
            VolumeSpec::Blank { size: 10 * GB },
            VolumeSpec::Blank { size: 20 * GB },
        ],
        tags: vec!["imgforge-build=b1".into()],
        exposed_ports: vec![22],
        host_services: vec![],
        memory_mib: None,
        cloud_init: None,
        ssh_public_keys: vec![],
    }
}

/// imgforge with the fake's configuration in the environment only (no
/// access key: no Object Storage).
fn imgforge(fake: &FakeScaleway, home: &std::path::Path, args: &[&str]) -> Output {
    let output = Command::new(tests::imgforge_bin())
        .env("HOME", home)
        .env_remove("XDG_CONFIG_HOME")
        .env_remove("SCW_PROFILE")
        .env_remove("SCW_CONFIG_PATH")
        .env_remove("SCW_ACCESS_KEY")
        .env_remove("IMGFORGE_SCW_VOLUME_TYPE")
        .env("SCW_API_URL", fake.url())
        .env("SCW_SECRET_KEY", fake.secret())
        .env("SCW_DEFAULT_PROJECT_ID", fake.project())
        .env("SCW_DEFAULT_ZONE", fake.zone())
        .env("IMGFORGE_PROVIDER", "scaleway")
        .arg("--json")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    eprintln!("{args:?}: {}", String::from_utf8_lossy(&output.stderr));
    output
}

/// [`imgforge`], which must succeed; its JSON output.
fn json(fake: &FakeScaleway, home: &std::path::Path, args: &[&str]) -> Value {
    let output = imgforge(fake, home, args);
    assert!(
        output.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_slice(&output.stdout).unwrap()
}

/// A stopped SBS server made through the CLI: its id and volume ids.
async fn sbs_server(
    fake: &FakeScaleway,
    home: &std::path::Path,
    name: &str,
) -> (String, Vec<String>) {
    let server = tokio::task::block_in_place(|| {
        json(
            fake,
            home,
            &[
                "server",
                "create",
                "--name",
                name,
                "--volume",
                "10G",
                "--volume",
                "1G",
                "--tag",
                "imgforge-build=deadbeef",
            ],
        )
    });
    let volumes: Vec<String> = server["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap().to_string())
        .collect();
    (server["id"].as_str().unwrap().to_string(), volumes)
}

#[tokio::test]
async fn the_label_resolves_through_the_marketplace_to_the_sbs_image() {
    let fake = fake().await;
    let provider = provider(&fake);
    let created = provider.create_server(&spec()).await.unwrap();
    let calls = fake.calls();
    let lookup = &calls[0];
    assert_eq!(lookup.path, "/marketplace/v2/local-images", "{calls:#?}");
    for part in [
        "image_label=debian_bookworm",
        "zone=fr-par-1",
        "type=instance_sbs",
    ] {
        assert!(lookup.query.contains(part), "{}", lookup.query);
    }
    let body = calls[1].body_json.as_ref().unwrap();
    assert_eq!(
        body["image"].as_str(),
        fake.label_sbs_image_id("debian_bookworm").as_deref(),
        "{body}"
    );
    assert_eq!(body["volumes"]["0"]["volume_type"], "sbs_volume", "{body}");
    assert_eq!(body["volumes"]["1"]["volume_type"], "sbs_volume", "{body}");
    let held = fake.server(&created.id).unwrap();
    assert_eq!(Some(held.image), fake.label_sbs_image_id("debian_bookworm"));
    assert_eq!(fake.block_volumes().len(), 2);
    assert!(fake.volumes().is_empty(), "{:?}", fake.volumes());

    // l_ssd resolves to the instance_local image.
    let fake = self::fake().await;
    let l_ssd = {
        let mut options = ScalewayOptions {
            volume_type: VolumeType::LSsd,
            ..ScalewayOptions::default()
        };
        options.server_timeout = Duration::from_secs(10);
        ScalewayProvider::new(Client::new(&config(&fake)).unwrap(), options)
    };
    l_ssd.create_server(&spec()).await.unwrap();
    let calls = fake.calls();
    assert!(calls[0].query.contains("type=instance_local"), "{calls:#?}");
    let body = calls[1].body_json.as_ref().unwrap();
    assert_eq!(
        body["image"].as_str(),
        fake.label_image_id("debian_bookworm").as_deref()
    );
    assert_eq!(fake.volumes().len(), 2);
    assert!(fake.block_volumes().is_empty());
}

#[tokio::test]
async fn an_sbs_server_goes_through_its_life_in_the_block_api() {
    let fake = fake().await;
    let provider = provider(&fake);
    let created = provider.create_server(&spec()).await.unwrap();
    provider.start_server(&created.id).await.unwrap();
    provider.stop_server(&created.id).await.unwrap();
    let snapshot = provider
        .create_snapshot(&created.volumes[1], "sbs-image")
        .await
        .unwrap();
    assert_eq!(snapshot.base_volume, created.volumes[1]);
    assert_eq!(snapshot.size, 20 * GB);
    let held = fake.block_snapshot(&snapshot.id).expect("a Block snapshot");
    assert_eq!(held.status, "available");
    assert!(
        held.tags.contains(&"imgforge-build=b1".to_string()),
        "{:?}",
        held.tags
    );
    assert!(fake.snapshots().is_empty());
    let image = provider
        .create_image("sbs-image", &snapshot.id, "x86_64")
        .await
        .unwrap();
    assert_eq!(image.root_volume, snapshot.id);
    let held = fake
        .images()
        .into_iter()
        .find(|i| i.id == image.id)
        .unwrap();
    assert!(held.tags.contains(&"imgforge-build=b1".to_string()));
    provider.delete_server(&created.id, true).await.unwrap();
    assert!(fake.servers().is_empty());
    assert!(
        fake.block_volumes().is_empty(),
        "{:?}",
        fake.block_volumes()
    );

    assert_eq!(
        call_sequence(&fake.calls()),
        [
            "GET /marketplace/v2/local-images",
            "POST /servers",
            // start
            "GET /servers/{id}",
            "POST /servers/{id}/action",
            "GET /servers/{id}",
            // stop
            "POST /servers/{id}/action",
            "GET /servers/{id}",
            // snapshot: the volume (Block first: the configured type), its
            // server's build tag, create, poll
            "GET /block/v1/zones/fr-par-1/volumes/{id}",
            "GET /servers/{id}",
            "POST /block/v1/zones/fr-par-1/snapshots",
            "GET /block/v1/zones/fr-par-1/snapshots/{id}",
            // image: the snapshot's build tag, create, poll
            "POST /images",
            "GET /images/{id}",
            // delete: the server, then its volumes in the Block API
            "GET /servers/{id}",
            "DELETE /servers/{id}",
            "DELETE /block/v1/zones/fr-par-1/volumes/{id}",
        ]
        .map(String::from)
        .to_vec()
    );
    assert!(
        !fake
            .calls()
            .iter()
            .any(|c| c.path.starts_with("/instance/") && c.path.contains("/volumes/")),
        "no Instance volume route for an SBS volume"
    );
}

/// `server rm` of a server with SBS volumes removes them (it sent the
/// Instance API's DELETE, took its 404 for success and left them billed).
#[tokio::test(flavor = "multi_thread")]
async fn server_rm_removes_sbs_volumes() {
    let fake = fake().await;
    let home = tempfile::tempdir().unwrap();
    let (id, volumes) = sbs_server(&fake, home.path(), "rm-me").await;
    assert_eq!(fake.block_volumes().len(), 2);
    let deleted = tokio::task::block_in_place(|| json(&fake, home.path(), &["server", "rm", &id]));
    assert_eq!(deleted["deleted"], id.as_str());
    assert!(fake.servers().is_empty());
    assert!(
        fake.block_volumes().is_empty(),
        "{:?}",
        fake.block_volumes()
    );
    let block_deletes: Vec<String> = fake
        .calls()
        .into_iter()
        .filter(|c| c.method == "DELETE" && c.path.starts_with("/block/"))
        .map(|c| c.path)
        .collect();
    assert_eq!(block_deletes.len(), 2, "{block_deletes:?}");
    for volume in &volumes {
        assert!(block_deletes.iter().any(|p| p.ends_with(volume.as_str())));
    }
}

/// `snapshot create` of an SBS volume (was: "no server with id or name"),
/// and of a server whose root is SBS (was: Instance 404 on its volume);
/// `snapshot list` shows Block snapshots.
#[tokio::test(flavor = "multi_thread")]
async fn snapshot_create_and_list_see_block_snapshots() {
    let fake = fake().await;
    let home = tempfile::tempdir().unwrap();
    let (id, volumes) = sbs_server(&fake, home.path(), "snap-me").await;
    let (of_volume, of_server) = tokio::task::block_in_place(|| {
        (
            json(
                &fake,
                home.path(),
                &["snapshot", "create", "--name", "of-volume", &volumes[1]],
            ),
            json(
                &fake,
                home.path(),
                &["snapshot", "create", "--name", "of-server", &id],
            ),
        )
    });
    assert_eq!(of_volume["base_volume"], volumes[1].as_str());
    assert_eq!(of_server["base_volume"], volumes[0].as_str());
    let held = fake.block_snapshots();
    assert_eq!(held.len(), 2, "{held:?}");
    for snapshot in &held {
        assert_eq!(snapshot.status, "available");
        assert!(
            snapshot
                .tags
                .contains(&"imgforge-build=deadbeef".to_string()),
            "build tags reach Block snapshots: {:?}",
            snapshot.tags
        );
    }
    assert!(fake.snapshots().is_empty());
    let listed = tokio::task::block_in_place(|| json(&fake, home.path(), &["snapshot", "list"]));
    let ids: Vec<&str> = listed
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids.len(), 2, "{listed}");
    for wanted in [&of_volume["id"], &of_server["id"]] {
        assert!(ids.contains(&wanted.as_str().unwrap()), "{listed}");
    }
    let got = tokio::task::block_in_place(|| {
        json(
            &fake,
            home.path(),
            &["snapshot", "get", of_volume["id"].as_str().unwrap()],
        )
    });
    assert_eq!(got["name"], of_volume["name"]);
}

/// `image create --snapshot` of a Block snapshot (was: "no snapshot"), and
/// `image rm --with-snapshot` of an image whose root is an `sbs_snapshot`
/// (was: image deleted, snapshot left, exit 1).
#[tokio::test(flavor = "multi_thread")]
async fn images_of_block_snapshots_are_created_and_removed_with_them() {
    let fake = fake().await;
    let home = tempfile::tempdir().unwrap();
    let (_, volumes) = sbs_server(&fake, home.path(), "img-me").await;
    let image = tokio::task::block_in_place(|| {
        let snapshot = json(
            &fake,
            home.path(),
            &["snapshot", "create", "--name", "root", &volumes[0]],
        );
        json(
            &fake,
            home.path(),
            &[
                "image",
                "create",
                "--name",
                "from-block",
                "--snapshot",
                snapshot["id"].as_str().unwrap(),
            ],
        )
    });
    let snapshot_id = image["root_volume"].as_str().unwrap().to_string();
    assert!(fake.block_snapshot(&snapshot_id).is_some());
    let held = fake.images();
    assert_eq!(held.len(), 1);
    assert!(
        held[0]
            .tags
            .contains(&"imgforge-build=deadbeef".to_string()),
        "{:?}",
        held[0].tags
    );

    let output = tokio::task::block_in_place(|| {
        imgforge(
            &fake,
            home.path(),
            &["image", "rm", "--with-snapshot", "from-block"],
        )
    });
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(fake.images().is_empty());
    assert!(
        fake.block_snapshot(&snapshot_id).is_none(),
        "{:?}",
        fake.block_snapshots()
    );
}

/// `cleanup` removes the Block volumes a killed build left (detached, named
/// after the build server), and the Block snapshots of the build.
#[tokio::test(flavor = "multi_thread")]
async fn cleanup_removes_block_volumes_of_killed_builds() {
    let fake = fake().await;
    let home = tempfile::tempdir().unwrap();
    let (attached, volumes) = sbs_server(&fake, home.path(), "imgforge-build-deadbeef-a").await;
    tokio::task::block_in_place(|| {
        json(
            &fake,
            home.path(),
            &["snapshot", "create", "--name", "half", &volumes[1]],
        )
    });
    // A server deleted without its volumes: they stay, detached.
    let (gone, _) = sbs_server(&fake, home.path(), "imgforge-build-deadbeef-b").await;
    tokio::task::block_in_place(|| {
        json(
            &fake,
            home.path(),
            &["server", "rm", "--keep-volumes", &gone],
        )
    });
    // Someone else's detached volume stays.
    let (other, _) = sbs_server(&fake, home.path(), "not-a-build").await;
    tokio::task::block_in_place(|| {
        json(
            &fake,
            home.path(),
            &["server", "rm", "--keep-volumes", &other],
        )
    });
    assert_eq!(fake.block_volumes().len(), 6);

    let listed =
        tokio::task::block_in_place(|| json(&fake, home.path(), &["cleanup", "--dry-run"]));
    let lines: Vec<&str> = listed["resources"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l.as_str().unwrap())
        .collect();
    assert_eq!(lines.len(), 4, "{lines:#?}");
    assert!(lines[0].starts_with("server imgforge-build-deadbeef-a"));
    assert_eq!(
        lines
            .iter()
            .filter(|l| l.starts_with("volume imgforge-build-deadbeef-b"))
            .count(),
        2,
        "{lines:#?}"
    );
    assert!(lines[3].starts_with("Block snapshot half"), "{lines:#?}");
    assert_eq!(fake.block_volumes().len(), 6);

    tokio::task::block_in_place(|| json(&fake, home.path(), &["cleanup"]));
    assert!(fake.servers().is_empty(), "{:?}", fake.servers());
    let left: Vec<String> = fake.block_volumes().into_iter().map(|v| v.name).collect();
    assert_eq!(left.len(), 2, "{left:?}");
    assert!(
        left.iter().all(|n| n.starts_with("not-a-build")),
        "{left:?}"
    );
    assert!(fake.block_snapshots().is_empty());
    assert!(!attached.is_empty());
}

/// A delete whose id neither API has is done (gone); an id only the
/// Instance API has is deleted there even with SBS configured.
#[tokio::test]
async fn deletes_find_the_family_of_an_id() {
    let fake = fake().await;
    let provider = provider(&fake);
    provider
        .delete_volume("00000000-0000-4000-8000-000000000001")
        .await
        .unwrap();
    provider
        .delete_snapshot("00000000-0000-4000-8000-000000000002")
        .await
        .unwrap();
    let l_ssd = ServerSpec {
        volumes: vec![VolumeSpec::Blank { size: 10 * GB }],
        ..spec()
    };
    let l_ssd_provider = ScalewayProvider::new(
        Client::new(&config(&fake)).unwrap(),
        ScalewayOptions {
            volume_type: VolumeType::LSsd,
            ..ScalewayOptions::default()
        },
    );
    let server = l_ssd_provider.create_server(&l_ssd).await.unwrap();
    let deleted = reqwest::Client::new()
        .delete(format!("{}/servers/{}", fake.zone_url(), server.id))
        .header("X-Auth-Token", fake.secret())
        .send()
        .await
        .unwrap();
    assert_eq!(deleted.status(), 204);
    assert_eq!(fake.volumes().len(), 1);
    provider.delete_volume(&server.volumes[0]).await.unwrap();
    assert!(fake.volumes().is_empty());
}
