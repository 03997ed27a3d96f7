//! Contract tests of the Scaleway provider against the in-repo fake of the
//! Instance API: the provider's operations issue the documented calls, end in
//! the documented states, ride out rate limiting, leave nothing behind on
//! delete, and turn the refusal of bootscripts into an error that says what
//! to do. No environment variables: the configuration comes from the fake.

use std::net::{Ipv4Addr, SocketAddr};
use std::time::Duration;

use host::provider::scaleway::{Client, ClientOptions, Config, RetryPolicy, SecretKey};
use host::provider::scaleway::{ScalewayOptions, ScalewayProvider, VolumeType};
use host::provider::{Boot, Provider, ServerSpec, ServerState, VolumeSpec};
use tests::fake_scaleway::{call_sequence, FakeScaleway};

const GB: u64 = 1_000_000_000;

async fn fake() -> FakeScaleway {
    FakeScaleway::builder()
        .delay(Duration::from_millis(30))
        .start()
        .await
}

/// The provider on `fake`, with retries and polling shrunk to milliseconds.
/// Its volumes are `l_ssd` (Instance API); `scaleway_sbs.rs` has the
/// default, `sbs_volume`.
fn provider(fake: &FakeScaleway) -> ScalewayProvider {
    let config = Config {
        access_key: None,
        secret_key: SecretKey::new(fake.secret()),
        default_project_id: fake.project(),
        default_zone: fake.zone(),
        default_region: "fr-par".to_string(),
        api_url: fake.url(),
        profile: None,
        config_path: None,
    };
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
        volume_type: VolumeType::LSsd,
        ..ScalewayOptions::default()
    };
    ScalewayProvider::new(
        Client::with_options(&config, client_options).unwrap(),
        options,
    )
}

/// A helper-style build server: the stock image's root volume and a blank
/// second volume, the build's tag, the done-signal port exposed.
fn spec() -> ServerSpec {
    ServerSpec {
        name: "imgforge-build-test".into(),
        boot: Some(Boot::Local),
        volumes: vec![
            VolumeSpec::Blank { size: 10 * GB },
            VolumeSpec::Blank { size: 20 * GB },
        ],
        tags: vec![
            "imgforge-build=b1".into(),
            "build_method=from-rootfs".into(),
        ],
        exposed_ports: vec![22],
        host_services: vec![],
        memory_mib: None,
        cloud_init: None,
        ssh_public_keys: vec![],
    }
}

/// create → start → stop → snapshot volume 1 → image → delete with volumes.
async fn lifecycle(provider: &ScalewayProvider, fake: &FakeScaleway) {
    let created = provider.create_server(&spec()).await.unwrap();
    assert_eq!(created.state, ServerState::Stopped);
    assert!(
        created.name.starts_with("imgforge-build-test-"),
        "{}",
        created.name
    );
    assert_eq!(created.tags, spec().tags, "the caller's tags round-trip");
    assert_eq!(created.volumes.len(), 2);
    let held = fake.server(&created.id).unwrap();
    assert_eq!(held.commercial_type, "DEV1-S");
    assert_eq!(held.boot_type, "local");
    assert_eq!(Some(held.image), fake.label_image_id("debian_bookworm"));
    assert!(
        held.tags.contains(&"imgforge".to_string()),
        "{:?}",
        held.tags
    );
    let second = fake
        .volumes()
        .into_iter()
        .find(|v| v.id == created.volumes[1]);
    assert_eq!(
        second.map(|v| (v.size, v.volume_type)),
        Some((20 * GB, "l_ssd".into()))
    );

    let running = provider.start_server(&created.id).await.unwrap();
    assert_eq!(running.state, ServerState::Running);
    assert_eq!(
        running.endpoints.get(&22),
        Some(&SocketAddr::from((Ipv4Addr::LOCALHOST, 22))),
        "exposed ports are reached on the public address"
    );
    let listed = provider.list_servers().await.unwrap();
    assert_eq!(
        listed.iter().map(|s| &s.id).collect::<Vec<_>>(),
        [&created.id]
    );

    let stopped = provider.stop_server(&created.id).await.unwrap();
    assert_eq!(stopped.state, ServerState::Stopped);

    let snapshot = provider
        .create_snapshot(&created.volumes[1], "test-image")
        .await
        .unwrap();
    assert_eq!(snapshot.base_volume, created.volumes[1]);
    assert_eq!(snapshot.size, 20 * GB);
    let held = fake
        .snapshots()
        .into_iter()
        .find(|s| s.id == snapshot.id)
        .unwrap();
    assert_eq!(held.state, "available");
    assert!(
        held.tags.contains(&"imgforge-build=b1".to_string()),
        "{:?}",
        held.tags
    );

    let image = provider
        .create_image("test-image", &snapshot.id, "x86_64")
        .await
        .unwrap();
    assert_eq!(
        (image.name.as_str(), image.arch.as_str()),
        ("test-image", "x86_64")
    );
    assert_eq!(image.root_volume, snapshot.id);
    let held = fake
        .images()
        .into_iter()
        .find(|i| i.id == image.id)
        .unwrap();
    assert_eq!(held.state, "available");
    assert!(
        held.tags.contains(&"imgforge-build=b1".to_string()),
        "{:?}",
        held.tags
    );

    provider.delete_server(&created.id, true).await.unwrap();
    assert!(fake.servers().is_empty(), "{:?}", fake.servers());
    assert!(fake.volumes().is_empty(), "{:?}", fake.volumes());
    assert_eq!(fake.snapshots().len(), 1, "the snapshot stays");
    assert_eq!(fake.images().len(), 1, "the image stays");
}

#[tokio::test]
async fn a_server_goes_through_its_life_with_the_documented_calls() {
    let fake = fake().await;
    let provider = provider(&fake);
    lifecycle(&provider, &fake).await;

    let calls = fake.calls();
    assert_eq!(
        call_sequence(&calls),
        [
            // create: the label's instance_local image, the server
            "GET /marketplace/v2/local-images",
            "POST /servers",
            // start: read, poweron, poll (and list)
            "GET /servers/{id}",
            "POST /servers/{id}/action",
            "GET /servers/{id}",
            "GET /servers",
            // stop: read, poweroff, poll
            "GET /servers/{id}",
            "POST /servers/{id}/action",
            "GET /servers/{id}",
            // snapshot: the volume (Instance API first, as configured), the
            // build tag of its server, create, poll
            "GET /volumes/{id}",
            "GET /servers/{id}",
            "POST /snapshots",
            "GET /snapshots/{id}",
            // image: the snapshot's build tag, create, poll
            "POST /images",
            "GET /images/{id}",
            // delete: read, the server, its two volumes
            "GET /servers/{id}",
            "DELETE /servers/{id}",
            "DELETE /volumes/{id}",
        ]
        .map(String::from)
        .to_vec(),
        "{calls:#?}"
    );
    let actions: Vec<&str> = calls
        .iter()
        .filter(|c| c.path.ends_with("/action"))
        .filter_map(|c| c.body_json.as_ref()?["action"].as_str())
        .collect();
    assert_eq!(actions, ["poweron", "poweroff"]);
    let volume_deletes = calls
        .iter()
        .filter(|c| c.method == "DELETE" && c.path.contains("/volumes/"))
        .count();
    assert_eq!(volume_deletes, 2);
    let list = calls
        .iter()
        .find(|c| c.path.ends_with("/servers") && c.method == "GET");
    assert!(list.unwrap().query.contains("tags=imgforge"), "{list:?}");
}

#[tokio::test]
async fn a_429_storm_is_ridden_out() {
    let fake = fake().await;
    let provider = provider(&fake);
    fake.inject_429(5);
    let created = provider.create_server(&spec()).await.unwrap();
    fake.inject_429(5);
    provider.start_server(&created.id).await.unwrap();
    fake.inject_429(5);
    provider.stop_server(&created.id).await.unwrap();
    fake.inject_429(5);
    let snapshot = provider
        .create_snapshot(&created.volumes[1], "storm")
        .await
        .unwrap();
    fake.inject_429(5);
    provider
        .create_image("storm", &snapshot.id, "x86_64")
        .await
        .unwrap();
    fake.inject_429(5);
    provider.delete_server(&created.id, true).await.unwrap();
    assert!(fake.servers().is_empty() && fake.volumes().is_empty());
    let limited = fake.calls().iter().filter(|c| c.status == 429).count();
    assert_eq!(limited, 30);
    let creations = fake
        .calls()
        .iter()
        .filter(|c| c.method == "POST" && c.path.ends_with("/servers") && c.status == 201)
        .count();
    assert_eq!(creations, 1, "one server, however many 429s");
}

#[tokio::test]
async fn a_bootscript_boot_is_refused_with_what_to_do_instead() {
    let fake = fake().await;
    let provider = provider(&fake);
    let spec = ServerSpec {
        boot: Some(Boot::Bootscript("image-creation-x86_64".into())),
        ..spec()
    };
    let err = provider.create_server(&spec).await.unwrap_err();
    let text = format!("{err:#}");
    assert!(
        text.contains("removed from Scaleway on 2023-05-15"),
        "{text}"
    );
    assert!(text.contains("--strategy helper"), "{text}");
    assert!(
        text.contains("invalid_arguments"),
        "the API's answer stays: {text}"
    );
    let sent = &fake.calls()[0];
    assert_eq!(sent.body_json.as_ref().unwrap()["boot_type"], "bootscript");
    assert!(fake.servers().is_empty() && fake.volumes().is_empty());
}

#[tokio::test]
async fn stopped_in_place_counts_as_stopped() {
    let fake = fake().await;
    let provider = provider(&fake);
    let created = provider.create_server(&spec()).await.unwrap();
    provider.start_server(&created.id).await.unwrap();
    let status = reqwest::Client::new()
        .post(format!("{}/servers/{}/action", fake.zone_url(), created.id))
        .header("X-Auth-Token", fake.secret())
        .json(&serde_json::json!({"action": "stop_in_place"}))
        .send()
        .await
        .unwrap()
        .status();
    assert_eq!(status.as_u16(), 202);
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while fake.server(&created.id).unwrap().state != "stopped in place" {
        assert!(
            std::time::Instant::now() < deadline,
            "never stopped in place"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let server = provider.get_server(&created.id).await.unwrap();
    assert_eq!(server.state, ServerState::Stopped);
    let before = fake.calls().len();
    assert_eq!(
        provider.stop_server(&created.id).await.unwrap().state,
        ServerState::Stopped
    );
    assert!(
        !fake.calls()[before..]
            .iter()
            .any(|c| c.path.ends_with("/action")),
        "no poweroff for a server stopped in place"
    );
    provider.delete_server(&created.id, true).await.unwrap();
    assert!(fake.servers().is_empty() && fake.volumes().is_empty());
}

#[tokio::test]
async fn tags_round_trip_and_running_servers_are_not_deleted() {
    let fake = fake().await;
    let provider = provider(&fake);
    let created = provider.create_server(&spec()).await.unwrap();
    let tagged = provider
        .set_server_tags(&created.id, &["k=v".to_string()])
        .await
        .unwrap();
    assert_eq!(tagged.tags, ["k=v"]);
    let held = fake.server(&created.id).unwrap().tags;
    assert_eq!(held, ["imgforge", "k=v", "imgforge-exposed-ports=22"]);
    provider.start_server(&created.id).await.unwrap();
    let err = provider.delete_server(&created.id, true).await.unwrap_err();
    assert!(format!("{err:#}").contains("stop it first"), "{err:#}");
    assert_eq!(provider.console_tail(&created.id, 10).await.unwrap(), None);
    provider.stop_server(&created.id).await.unwrap();
    provider.delete_server(&created.id, true).await.unwrap();
    assert!(fake.servers().is_empty() && fake.volumes().is_empty());
}

#[tokio::test]
async fn cloud_init_user_data_reaches_the_server() {
    let fake = fake().await;
    let provider = provider(&fake);
    let created = provider.create_server(&spec()).await.unwrap();
    let script = "#!/bin/sh\necho hello\n";
    provider
        .set_user_data(&created.id, "cloud-init", script)
        .await
        .unwrap();
    let held = fake.server(&created.id).unwrap().user_data;
    assert_eq!(
        held.get("cloud-init").map(Vec::as_slice),
        Some(script.as_bytes())
    );
    provider.delete_server(&created.id, true).await.unwrap();
}
