//! Contract tests of the fake Scaleway Instance API, with plain reqwest: the
//! fake must answer what reference/scaleway-api.md documents.

use std::time::Duration;

use reqwest::{Client, Method, StatusCode};
use serde_json::{json, Value};
use test_support::s3_server::S3Server;
use tests::fake_scaleway::FakeScaleway;

struct Api {
    fake: FakeScaleway,
    http: Client,
}

impl Api {
    async fn new(fake: FakeScaleway) -> Api {
        Api {
            fake,
            http: Client::new(),
        }
    }

    /// Sends `method` to the zone-relative `path` with the right token.
    async fn call(&self, method: Method, path: &str, body: Option<Value>) -> (StatusCode, Value) {
        let mut req = self
            .http
            .request(method, format!("{}{path}", self.fake.zone_url()))
            .header("X-Auth-Token", self.fake.secret());
        if let Some(b) = body {
            req = req.json(&b);
        }
        let resp = req.send().await.unwrap();
        let status = resp.status();
        let text = resp.text().await.unwrap();
        let v = if text.is_empty() {
            Value::Null
        } else {
            serde_json::from_str(&text).unwrap_or(Value::String(text))
        };
        (status, v)
    }

    async fn create_server(&self, name: &str, tags: &[&str]) -> Value {
        let (st, v) = self
            .call(
                Method::POST,
                "/servers",
                Some(json!({
                    "name": name,
                    "commercial_type": "DEV1-S",
                    "image": "debian_bookworm",
                    "project": self.fake.project(),
                    "tags": tags,
                    "volumes": {"1": {"size": 20_000_000_000u64, "volume_type": "l_ssd"}},
                })),
            )
            .await;
        assert_eq!(st, StatusCode::CREATED, "{v}");
        v["server"].clone()
    }

    async fn action(&self, id: &str, action: &str) -> (StatusCode, Value) {
        self.call(
            Method::POST,
            &format!("/servers/{id}/action"),
            Some(json!({ "action": action })),
        )
        .await
    }

    /// Sends `method` to a path relative to `/block/v1/zones/{zone}`.
    async fn block(&self, method: Method, path: &str, body: Option<Value>) -> (StatusCode, Value) {
        let mut req = self
            .http
            .request(
                method,
                format!(
                    "{}/block/v1/zones/{}{path}",
                    self.fake.url(),
                    self.fake.zone()
                ),
            )
            .header("X-Auth-Token", self.fake.secret());
        if let Some(b) = body {
            req = req.json(&b);
        }
        let resp = req.send().await.unwrap();
        let status = resp.status();
        let text = resp.text().await.unwrap();
        let v = if text.is_empty() {
            Value::Null
        } else {
            serde_json::from_str(&text).unwrap_or(Value::String(text))
        };
        (status, v)
    }

    /// Polls `path` until `field.state` is `want`.
    async fn wait_state(&self, path: &str, field: &str, want: &str) -> Value {
        for _ in 0..100 {
            let (st, v) = self.call(Method::GET, path, None).await;
            assert_eq!(st, StatusCode::OK, "{v}");
            if v[field]["state"] == want {
                return v[field].clone();
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        panic!("{path} never reached {want}");
    }
}

async fn fast() -> Api {
    Api::new(
        FakeScaleway::builder()
            .delay(Duration::from_millis(50))
            .start()
            .await,
    )
    .await
}

#[tokio::test]
async fn auth_is_required() {
    let api = fast().await;
    let url = format!("{}/servers", api.fake.zone_url());
    for token in [None, Some("wrong")] {
        let mut req = api.http.get(&url);
        if let Some(t) = token {
            req = req.header("X-Auth-Token", t);
        }
        let resp = req.send().await.unwrap();
        assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);
        let v: Value = resp.json().await.unwrap();
        assert_eq!(v["type"], "denied_authentication");
        assert!(v["message"].is_string());
    }
    let (st, _) = api.call(Method::GET, "/servers", None).await;
    assert_eq!(st, StatusCode::OK);
    assert_eq!(api.fake.calls().len(), 3);
}

#[tokio::test]
async fn create_server_validates_required_fields() {
    let api = fast().await;
    let (st, v) = api.call(Method::POST, "/servers", Some(json!({}))).await;
    assert_eq!(st, StatusCode::BAD_REQUEST);
    assert_eq!(v["type"], "invalid_arguments");
    let mut args: Vec<&str> = v["details"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| {
            assert_eq!(d["reason"], "required");
            assert!(d["help_message"].is_string());
            d["argument_name"].as_str().unwrap()
        })
        .collect();
    args.sort();
    assert_eq!(args, ["commercial_type", "image", "volumes"]);

    // Not JSON: refused.
    let resp = api
        .http
        .post(format!("{}/servers", api.fake.zone_url()))
        .header("X-Auth-Token", api.fake.secret())
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::BAD_REQUEST);
    // Unknown label.
    let (st, v) = api
        .call(
            Method::POST,
            "/servers",
            Some(json!({"commercial_type": "DEV1-S", "image": "no_such_label", "volumes": {}})),
        )
        .await;
    assert_eq!(st, StatusCode::NOT_FOUND, "{v}");
    assert_eq!(v["resource"], "instance_image");
    assert!(api.fake.servers().is_empty());
    assert!(api.fake.volumes().is_empty());
}

#[tokio::test]
async fn bootscript_boot_type_is_refused() {
    let api = fast().await;
    let (st, v) = api
        .call(
            Method::POST,
            "/servers",
            Some(json!({
                "commercial_type": "DEV1-S",
                "image": "debian_bookworm",
                "boot_type": "bootscript",
                "volumes": {},
            })),
        )
        .await;
    assert_eq!(st, StatusCode::BAD_REQUEST);
    assert_eq!(v["type"], "invalid_arguments");
    assert_eq!(v["details"][0]["argument_name"], "boot_type");
    assert!(v["details"][0]["help_message"]
        .as_str()
        .unwrap()
        .contains("no longer supported"));
    assert!(api.fake.servers().is_empty());
}

#[tokio::test]
async fn create_and_poweron_reaches_running() {
    let api = fast().await;
    let seen = std::sync::Arc::new(std::sync::Mutex::new(vec![]));
    let s2 = seen.clone();
    api.fake.on_poweron(move |s| {
        s2.lock()
            .unwrap()
            .push(s.tag("build_method").map(String::from));
    });

    let resp = api
        .http
        .post(format!("{}/servers", api.fake.zone_url()))
        .header("X-Auth-Token", api.fake.secret())
        .json(&json!({
            "name": "helper",
            "commercial_type": "DEV1-S",
            "image": "debian_bookworm",
            "tags": ["build_method=from-rootfs"],
            "volumes": {"1": {"size": 20_000_000_000u64, "volume_type": "l_ssd"}},
        }))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::CREATED);
    let location = resp.headers()["location"].to_str().unwrap().to_string();
    let v: Value = resp.json().await.unwrap();
    let s = &v["server"];
    let id = s["id"].as_str().unwrap();
    assert!(location.ends_with(&format!("/servers/{id}")));
    assert_eq!(s["state"], "stopped");
    assert_eq!(s["bootscript"], Value::Null);
    assert_eq!(s["boot_type"], "local");
    assert_eq!(s["public_ip"]["address"], "127.0.0.1");
    assert_eq!(s["volumes"]["0"]["boot"], true);
    assert_eq!(s["volumes"]["1"]["size"], 20_000_000_000u64);
    assert_eq!(s["volumes"]["1"]["server"]["id"], id);
    assert_eq!(s["allowed_actions"], json!(["poweron", "backup"]));

    // User data: text/plain, 204.
    let ud = format!("{}/servers/{id}/user_data/cloud-init", api.fake.zone_url());
    let resp = api
        .http
        .patch(&ud)
        .header("X-Auth-Token", api.fake.secret())
        .header("Content-Type", "text/plain")
        .body("#cloud-config\n")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::NO_CONTENT);
    let (_, v) = api
        .call(Method::GET, &format!("/servers/{id}/user_data"), None)
        .await;
    assert_eq!(v, json!({"user_data": ["cloud-init"]}));
    let body = api
        .http
        .get(&ud)
        .header("X-Auth-Token", api.fake.secret())
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert_eq!(body, "#cloud-config\n");

    let (st, v) = api.action(id, "poweron").await;
    assert_eq!(st, StatusCode::ACCEPTED, "{v}");
    assert_eq!(v["task"]["status"], "pending");
    assert_eq!(*seen.lock().unwrap(), [Some("from-rootfs".to_string())]);
    let (_, v) = api.call(Method::GET, &format!("/servers/{id}"), None).await;
    assert_eq!(v["server"]["state"], "starting");
    // Wrong state while starting.
    let (st, v) = api.action(id, "poweron").await;
    assert_eq!(st, StatusCode::CONFLICT, "{v}");
    assert_eq!(v["type"], "transient_state");

    let s = api
        .wait_state(&format!("/servers/{id}"), "server", "running")
        .await;
    assert!(s["allowed_actions"]
        .as_array()
        .unwrap()
        .contains(&json!("terminate")));
    let (st, v) = api.action(id, "poweron").await;
    assert_eq!(st, StatusCode::PRECONDITION_FAILED);
    assert_eq!(
        v,
        json!({"type": "precondition_failed", "message": "server should be stopped"})
    );

    let (st, _) = api.action(id, "stop_in_place").await;
    assert_eq!(st, StatusCode::ACCEPTED);
    api.wait_state(&format!("/servers/{id}"), "server", "stopped in place")
        .await;
}

#[tokio::test]
async fn list_by_tags_paginates() {
    let api = fast().await;
    for i in 0..5 {
        api.create_server(&format!("tagged-{i}"), &["imgforge", "build=1"])
            .await;
    }
    api.create_server("other", &["imgforge"]).await;
    let mut names = vec![];
    for page in 1..=3 {
        let resp = api
            .http
            .get(format!(
                "{}/servers?tags=imgforge,build=1&page={page}&per_page=2",
                api.fake.zone_url()
            ))
            .header("X-Auth-Token", api.fake.secret())
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), StatusCode::OK);
        assert_eq!(resp.headers()["x-total-count"], "5");
        let v: Value = resp.json().await.unwrap();
        assert_eq!(v["total_count"], 5);
        let servers = v["servers"].as_array().unwrap();
        assert_eq!(servers.len(), if page < 3 { 2 } else { 1 });
        names.extend(
            servers
                .iter()
                .map(|s| s["name"].as_str().unwrap().to_string()),
        );
    }
    names.sort();
    assert_eq!(
        names,
        ["tagged-0", "tagged-1", "tagged-2", "tagged-3", "tagged-4"]
    );
    let (st, v) = api.call(Method::GET, "/servers?per_page=101", None).await;
    assert_eq!(st, StatusCode::BAD_REQUEST);
    assert_eq!(v["details"][0]["argument_name"], "per_page");
    let (_, v) = api.call(Method::GET, "/servers?name=other", None).await;
    assert_eq!(v["total_count"], 1);
}

#[tokio::test]
async fn snapshot_then_image_become_available() {
    let api = fast().await;
    let s = api.create_server("helper", &[]).await;
    let vol = s["volumes"]["1"]["id"].as_str().unwrap();
    let (st, v) = api
        .call(
            Method::POST,
            "/snapshots",
            Some(json!({"name": "snap", "volume_id": vol, "project": api.fake.project()})),
        )
        .await;
    assert_eq!(st, StatusCode::CREATED, "{v}");
    assert_eq!(v["snapshot"]["state"], "snapshotting");
    assert!(v["task"]["id"].is_string());
    let snap = v["snapshot"]["id"].as_str().unwrap().to_string();
    // An image from a snapshot that is not ready yet: refused.
    let body = json!({"name": "img", "root_volume": snap, "arch": "x86_64", "project": api.fake.project()});
    let (st, _) = api.call(Method::POST, "/images", Some(body.clone())).await;
    assert_eq!(st, StatusCode::CONFLICT);
    let sj = api
        .wait_state(&format!("/snapshots/{snap}"), "snapshot", "available")
        .await;
    assert_eq!(sj["size"], 20_000_000_000u64);
    assert_eq!(sj["base_volume"]["id"], vol);

    let (st, v) = api.call(Method::POST, "/images", Some(body)).await;
    assert_eq!(st, StatusCode::CREATED, "{v}");
    assert_eq!(v["image"]["state"], "creating");
    let img = v["image"]["id"].as_str().unwrap().to_string();
    let ij = api
        .wait_state(&format!("/images/{img}"), "image", "available")
        .await;
    assert_eq!(ij["root_volume"]["id"], snap);
    let (_, v) = api.call(Method::GET, "/images?name=img", None).await;
    assert_eq!(v["total_count"], 1);
    // The snapshot is in use; deleting the image leaves it.
    let (st, v) = api
        .call(Method::DELETE, &format!("/snapshots/{snap}"), None)
        .await;
    assert_eq!(st, StatusCode::PRECONDITION_FAILED, "{v}");
    let (st, _) = api
        .call(Method::DELETE, &format!("/images/{img}"), None)
        .await;
    assert_eq!(st, StatusCode::NO_CONTENT);
    assert_eq!(api.fake.snapshots().len(), 1);
    assert!(api.fake.images().is_empty());
}

#[tokio::test]
async fn injected_429s_are_bare() {
    let api = fast().await;
    api.fake.inject_429(2);
    for _ in 0..2 {
        let resp = api
            .http
            .get(format!("{}/servers", api.fake.zone_url()))
            .header("X-Auth-Token", api.fake.secret())
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), StatusCode::TOO_MANY_REQUESTS);
        assert!(resp.headers().get("retry-after").is_none());
        assert!(resp.bytes().await.unwrap().is_empty());
    }
    let (st, _) = api.call(Method::GET, "/servers", None).await;
    assert_eq!(st, StatusCode::OK);

    api.fake
        .fail_next("/snapshots", 503, r#"{"type":"unknown","message":"x"}"#);
    let (st, _) = api.call(Method::GET, "/servers", None).await;
    assert_eq!(st, StatusCode::OK);
    let (st, v) = api.call(Method::GET, "/snapshots", None).await;
    assert_eq!(st, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(v["type"], "unknown");
    let statuses: Vec<u16> = api.fake.calls().iter().map(|c| c.status).collect();
    assert_eq!(statuses, [429, 429, 200, 200, 503]);
}

#[tokio::test]
async fn terminate_removes_server_and_local_volumes() {
    let api = Api::new(FakeScaleway::builder().manual().start().await).await;
    let s = api.create_server("helper", &[]).await;
    let id = s["id"].as_str().unwrap();
    assert_eq!(api.fake.volumes().len(), 2);
    // Terminate is not allowed on a stopped server.
    let (st, _) = api.action(id, "terminate").await;
    assert_eq!(st, StatusCode::PRECONDITION_FAILED);
    api.action(id, "poweron").await;
    api.fake.advance();
    assert_eq!(api.fake.server(id).unwrap().state, "running");
    let (st, _) = api.action(id, "terminate").await;
    assert_eq!(st, StatusCode::ACCEPTED);
    assert_eq!(api.fake.server(id).unwrap().state, "stopping");
    api.fake.advance();
    let (st, v) = api.call(Method::GET, &format!("/servers/{id}"), None).await;
    assert_eq!(st, StatusCode::NOT_FOUND);
    assert_eq!(v["resource"], "instance_server");
    assert!(api.fake.servers().is_empty());
    assert!(api.fake.volumes().is_empty());
}

#[tokio::test]
async fn delete_of_running_server_is_refused_and_volumes_survive() {
    let api = Api::new(FakeScaleway::builder().manual().start().await).await;
    let s = api.create_server("helper", &[]).await;
    let id = s["id"].as_str().unwrap();
    let vol = s["volumes"]["1"]["id"].as_str().unwrap();
    api.action(id, "poweron").await;
    api.fake.advance();
    let (st, v) = api
        .call(Method::DELETE, &format!("/servers/{id}"), None)
        .await;
    assert_eq!(st, StatusCode::PRECONDITION_FAILED);
    assert_eq!(v["type"], "precondition_failed");
    // Attached volumes cannot be deleted.
    let (st, v) = api
        .call(Method::DELETE, &format!("/volumes/{vol}"), None)
        .await;
    assert_eq!(st, StatusCode::PRECONDITION_FAILED);
    assert_eq!(v["precondition"], "resource_still_in_use");

    api.action(id, "poweroff").await;
    api.fake.advance();
    let (st, _) = api
        .call(Method::DELETE, &format!("/servers/{id}"), None)
        .await;
    assert_eq!(st, StatusCode::NO_CONTENT);
    assert_eq!(api.fake.volumes().len(), 2);
    for v in api.fake.volumes() {
        assert_eq!(v.server, None);
        let (st, _) = api
            .call(Method::DELETE, &format!("/volumes/{}", v.id), None)
            .await;
        assert_eq!(st, StatusCode::NO_CONTENT);
    }
    assert!(api.fake.volumes().is_empty());
}

/// The intended use of the guest hook: the test reads the done port from
/// the server's tags and serves the done line on the server's public
/// address, as the image-creation initrd would.
#[tokio::test]
async fn poweron_hook_stands_in_for_the_guest() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let api = fast().await;
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let port = listener.local_addr().unwrap().port();
    let listener = std::sync::Mutex::new(Some(listener));
    api.fake.on_poweron(move |s| {
        assert_eq!(
            s.tag("signal_build_done_port"),
            Some(port.to_string().as_str())
        );
        let l =
            tokio::net::TcpListener::from_std(listener.lock().unwrap().take().unwrap()).unwrap();
        tokio::spawn(async move {
            while let Ok((mut c, _)) = l.accept().await {
                let _ = c
                    .write_all(b"{\"status\": \"0\", \"message\": \"done\"}\n")
                    .await;
            }
        });
    });
    let tag = format!("signal_build_done_port={port}");
    let s = api.create_server("helper", &[&tag]).await;
    let id = s["id"].as_str().unwrap();
    api.action(id, "poweron").await;
    let s = api
        .wait_state(&format!("/servers/{id}"), "server", "running")
        .await;
    assert!(api.fake.set_state_detail(id, "booted"));
    let (_, v) = api.call(Method::GET, &format!("/servers/{id}"), None).await;
    assert_eq!(v["server"]["state_detail"], "booted");
    let addr = format!("{}:{port}", s["public_ip"]["address"].as_str().unwrap());
    let mut c = tokio::net::TcpStream::connect(addr).await.unwrap();
    let mut line = String::new();
    c.read_to_string(&mut line).await.unwrap_or_default();
    assert!(line.contains("\"message\": \"done\""), "{line}");
}

/// "Created, but the client saw a 502": the server exists and can be found
/// by tag; a 500 has no effect and a plain-text body.
#[tokio::test]
async fn faults_after_effect_and_500() {
    let api = fast().await;
    api.fake.fail_next_after_effect("/servers", 502, "");
    let (st, v) = api
        .call(
            Method::POST,
            "/servers",
            Some(
                json!({"commercial_type": "DEV1-S", "image": "debian_bookworm",
                        "tags": ["imgforge-build=42"], "volumes": {}}),
            ),
        )
        .await;
    assert_eq!(st, StatusCode::BAD_GATEWAY);
    assert_eq!(v, Value::Null);
    let (_, v) = api
        .call(Method::GET, "/servers?tags=imgforge-build=42", None)
        .await;
    assert_eq!(v["total_count"], 1);
    assert_eq!(api.fake.servers().len(), 1);

    api.fake.inject_500(1);
    let (st, v) = api
        .call(
            Method::POST,
            "/servers",
            Some(json!({"commercial_type": "DEV1-S", "image": "debian_bookworm", "volumes": {}})),
        )
        .await;
    assert_eq!(st, StatusCode::INTERNAL_SERVER_ERROR);
    assert!(v.is_string());
    assert_eq!(api.fake.servers().len(), 1);
    let calls = api.fake.calls();
    assert_eq!(calls[0].method, "POST");
    assert_eq!(
        calls[0].path,
        format!("/instance/v1/zones/{}/servers", api.fake.zone())
    );
    assert_eq!(calls[1].query, "tags=imgforge-build=42");
    assert_eq!(
        calls[0].body_json.as_ref().unwrap()["tags"][0],
        "imgforge-build=42"
    );
}

// ---------------------------------------------------------------------------
// Legacy (bootscript) mode

const IMAGE_CREATION: &str = "b2d1f7a4-6e0c-4c51-9c3f-0a1b2c3d4e5f";

async fn legacy() -> Api {
    Api::new(
        FakeScaleway::builder()
            .delay(Duration::from_millis(50))
            .bootscripts(&[IMAGE_CREATION])
            .start()
            .await,
    )
    .await
}

/// The body of `scw create --bootscript=X 50G` (reference §6).
fn legacy_create(bootscript: &str) -> Value {
    json!({
        "name": "image-builder",
        "commercial_type": "DEV1-S",
        "boot_type": "bootscript",
        "bootscript": bootscript,
        "tags": ["build_method=from-rootfs"],
        "volumes": {"0": {"size": 50_000_000_000u64, "volume_type": "l_ssd", "name": "blank"}},
    })
}

#[tokio::test]
async fn legacy_mode_accepts_a_bootscript_server() {
    let api = legacy().await;
    let (st, v) = api
        .call(
            Method::POST,
            "/servers",
            Some(legacy_create(IMAGE_CREATION)),
        )
        .await;
    assert_eq!(st, StatusCode::CREATED, "{v}");
    let id = v["server"]["id"].as_str().unwrap().to_string();

    let (st, v) = api.call(Method::GET, &format!("/servers/{id}"), None).await;
    assert_eq!(st, StatusCode::OK);
    let s = &v["server"];
    assert_eq!(s["boot_type"], "bootscript");
    assert_eq!(s["bootscript"]["id"], IMAGE_CREATION);
    assert_eq!(
        s["bootscript"]["title"],
        format!("Image creation {IMAGE_CREATION}")
    );
    for k in ["kernel", "initrd", "bootcmdargs", "architecture", "zone"] {
        assert!(s["bootscript"][k].is_string(), "{k}: {}", s["bootscript"]);
    }
    assert_eq!(s["image"], Value::Null);
    assert_eq!(s["arch"], "x86_64");
    assert_eq!(s["volumes"]["0"]["size"], 50_000_000_000u64);
    assert_eq!(s["volumes"]["0"]["name"], "blank");
    assert_eq!(s["volumes"]["0"]["volume_type"], "l_ssd");
    let server = api.fake.server(&id).unwrap();
    assert_eq!(server.bootscript.as_deref(), Some(IMAGE_CREATION));
    assert_eq!(server.image, "");

    // image-tools also PATCHed the boot type.
    let (st, v) = api
        .call(
            Method::PATCH,
            &format!("/servers/{id}"),
            Some(json!({"boot_type": "bootscript"})),
        )
        .await;
    assert_eq!(st, StatusCode::OK, "{v}");
    assert_eq!(v["server"]["bootscript"]["id"], IMAGE_CREATION);

    // It boots like any other server.
    api.action(&id, "poweron").await;
    api.wait_state(&format!("/servers/{id}"), "server", "running")
        .await;

    // The removed listing answers in this mode.
    let (st, v) = api
        .call(Method::GET, "/bootscripts?arch=x86_64", None)
        .await;
    assert_eq!(st, StatusCode::OK);
    assert_eq!(v["total_count"], 1);
    assert_eq!(v["bootscripts"][0]["id"], IMAGE_CREATION);
    let (st, v) = api
        .call(Method::GET, &format!("/bootscripts/{IMAGE_CREATION}"), None)
        .await;
    assert_eq!(st, StatusCode::OK);
    assert_eq!(v["bootscript"]["id"], IMAGE_CREATION);
}

#[tokio::test]
async fn legacy_mode_patches_a_local_server_to_bootscript() {
    let api = legacy().await;
    let s = api.create_server("local", &[]).await;
    let id = s["id"].as_str().unwrap();
    assert_eq!(s["boot_type"], "local");
    assert_eq!(s["bootscript"], Value::Null);
    // boot_type bootscript needs a bootscript id somewhere.
    let path = format!("/servers/{id}");
    let (st, v) = api
        .call(
            Method::PATCH,
            &path,
            Some(json!({"boot_type": "bootscript"})),
        )
        .await;
    assert_eq!(st, StatusCode::BAD_REQUEST);
    assert_eq!(v["details"][0]["argument_name"], "bootscript");
    let (st, v) = api
        .call(
            Method::PATCH,
            &path,
            Some(json!({"boot_type": "bootscript", "bootscript": IMAGE_CREATION})),
        )
        .await;
    assert_eq!(st, StatusCode::OK, "{v}");
    assert_eq!(v["server"]["boot_type"], "bootscript");
    assert_eq!(v["server"]["bootscript"]["id"], IMAGE_CREATION);
    assert_eq!(api.fake.server(id).unwrap().boot_type, "bootscript");
}

#[tokio::test]
async fn legacy_mode_validates_the_bootscript_and_the_root_size() {
    let api = legacy().await;
    let unknown = "00000000-0000-0000-0000-00000000beef";
    let (st, v) = api
        .call(Method::POST, "/servers", Some(legacy_create(unknown)))
        .await;
    assert_eq!(st, StatusCode::NOT_FOUND);
    assert_eq!(v["type"], "not_found");
    assert_eq!(v["resource"], "instance_bootscript");
    assert_eq!(v["resource_id"], unknown);
    let (st, v) = api
        .call(Method::GET, &format!("/bootscripts/{unknown}"), None)
        .await;
    assert_eq!(st, StatusCode::NOT_FOUND);
    assert_eq!(v["resource"], "instance_bootscript");

    // No image: volume "0" needs a size.
    let mut body = legacy_create(IMAGE_CREATION);
    body["volumes"] = json!({"0": {"volume_type": "l_ssd"}});
    let (st, v) = api.call(Method::POST, "/servers", Some(body)).await;
    assert_eq!(st, StatusCode::BAD_REQUEST);
    assert_eq!(v["details"][0]["argument_name"], "size");
    let mut body = legacy_create(IMAGE_CREATION);
    body["volumes"] = json!({});
    let (st, _) = api.call(Method::POST, "/servers", Some(body)).await;
    assert_eq!(st, StatusCode::BAD_REQUEST);

    // boot_type bootscript without an id.
    let mut body = legacy_create(IMAGE_CREATION);
    body.as_object_mut().unwrap().remove("bootscript");
    let (st, v) = api.call(Method::POST, "/servers", Some(body)).await;
    assert_eq!(st, StatusCode::BAD_REQUEST);
    assert_eq!(v["details"][0]["argument_name"], "bootscript");
    assert_eq!(v["details"][0]["reason"], "required");

    // A local server still needs an image.
    let mut body = legacy_create(IMAGE_CREATION);
    body["boot_type"] = json!("local");
    let (st, v) = api.call(Method::POST, "/servers", Some(body)).await;
    assert_eq!(st, StatusCode::BAD_REQUEST);
    assert_eq!(v["details"][0]["argument_name"], "image");
    assert!(api.fake.servers().is_empty());
    assert!(api.fake.volumes().is_empty());
}

#[tokio::test]
async fn default_mode_still_refuses_bootscripts() {
    let api = fast().await;
    let (st, v) = api
        .call(
            Method::POST,
            "/servers",
            Some(legacy_create(IMAGE_CREATION)),
        )
        .await;
    // Refused for the bootscript before the missing image is noticed.
    assert_eq!(st, StatusCode::BAD_REQUEST);
    assert_eq!(v["type"], "invalid_arguments");
    assert_eq!(v["details"][0]["argument_name"], "boot_type");
    let mut body = legacy_create(IMAGE_CREATION);
    body["image"] = json!("debian_bookworm");
    let (st, v) = api.call(Method::POST, "/servers", Some(body)).await;
    assert_eq!(st, StatusCode::BAD_REQUEST);
    assert_eq!(v["details"][0]["argument_name"], "boot_type");
    assert!(api.fake.servers().is_empty());

    let s = api.create_server("local", &[]).await;
    let id = s["id"].as_str().unwrap();
    assert_eq!(s["bootscript"], Value::Null);
    let (st, v) = api
        .call(
            Method::PATCH,
            &format!("/servers/{id}"),
            Some(json!({"boot_type": "bootscript", "bootscript": IMAGE_CREATION})),
        )
        .await;
    assert_eq!(st, StatusCode::BAD_REQUEST);
    assert!(v["details"][0]["help_message"]
        .as_str()
        .unwrap()
        .contains("no longer supported"));
    assert_eq!(api.fake.server(id).unwrap().boot_type, "local");
    let (st, _) = api
        .call(Method::GET, &format!("/bootscripts/{IMAGE_CREATION}"), None)
        .await;
    assert_eq!(st, StatusCode::NOT_FOUND);
}

// ---------------------------------------------------------------------------
// Metadata API

#[tokio::test]
async fn metadata_conf_follows_the_server_record() {
    let api = fast().await;
    let s = api.create_server("meta", &["a=b", "x"]).await;
    let id = s["id"].as_str().unwrap();
    let md = api.fake.serve_metadata(id).await;
    assert!(md.ip().is_loopback());
    let conf = format!("http://{md}/conf?format=json");

    let v: Value = api
        .http
        .get(&conf)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(v["id"], id);
    assert_eq!(v["name"], "meta");
    assert_eq!(v["hostname"], "meta");
    assert_eq!(v["tags"], json!(["a=b", "x"]));
    assert_eq!(v["state_detail"], "");
    assert_eq!(v["commercial_type"], "DEV1-S");
    assert_eq!(v["project"], api.fake.project());
    assert_eq!(v["public_ip"]["address"], "127.0.0.1");
    assert_eq!(v["volumes"]["0"]["id"], s["volumes"]["0"]["id"]);
    assert_eq!(v["volumes"]["1"]["size"], 20_000_000_000u64);
    assert_eq!(v["volumes"]["1"]["volume_type"], "l_ssd");
    assert_eq!(v["bootscript"], Value::Null);

    // A tag change through the Instance API shows on the next read.
    let (st, _) = api
        .call(
            Method::PATCH,
            &format!("/servers/{id}"),
            Some(json!({"tags": ["build_method=from-qcow2"]})),
        )
        .await;
    assert_eq!(st, StatusCode::OK);
    let v: Value = api
        .http
        .get(&conf)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(v["tags"], json!(["build_method=from-qcow2"]));

    // The text form comes from the same record.
    let text = api
        .http
        .get(format!("http://{md}/conf"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(text.contains("TAGS_0=build_method=from-qcow2"), "{text}");
    assert!(text.contains(&format!("ID={id}")), "{text}");
}

#[tokio::test]
async fn metadata_state_and_user_data_reach_the_instance_api() {
    let api = fast().await;
    let s = api.create_server("guest", &[]).await;
    let id = s["id"].as_str().unwrap();
    let md = api.fake.serve_metadata(id).await;

    // PATCH /state shows in the Instance API's state_detail.
    let resp = api
        .http
        .patch(format!("http://{md}/state"))
        .json(&json!({"state_detail": "kernel-started"}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let (_, v) = api.call(Method::GET, &format!("/servers/{id}"), None).await;
    assert_eq!(v["server"]["state_detail"], "kernel-started");
    assert_eq!(api.fake.server(id).unwrap().state_detail, "kernel-started");

    // User data set through the Instance API is readable by the guest.
    let resp = api
        .http
        .patch(format!(
            "{}/servers/{id}/user_data/cloud-init",
            api.fake.zone_url()
        ))
        .header("X-Auth-Token", api.fake.secret())
        .header("Content-Type", "text/plain")
        .body("#!/bin/sh\necho hi\n")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::NO_CONTENT);
    let resp = api
        .http
        .get(format!("http://{md}/user_data/cloud-init"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(resp.text().await.unwrap(), "#!/bin/sh\necho hi\n");
    let v: Value = api
        .http
        .get(format!("http://{md}/user_data?format=json"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(v, json!({"user_data": ["cloud-init"]}));
    let resp = api
        .http
        .get(format!("http://{md}/user_data/absent"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::NOT_FOUND);

    // And what the guest writes shows in the Instance API.
    let resp = api
        .http
        .patch(format!("http://{md}/user_data/result"))
        .body("ok")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::NO_CONTENT);
    let (st, v) = api
        .call(
            Method::GET,
            &format!("/servers/{id}/user_data/result"),
            None,
        )
        .await;
    assert_eq!(st, StatusCode::OK);
    assert_eq!(v, "ok");

    // Once the server is gone, the metadata server answers 500.
    let (st, _) = api
        .call(Method::DELETE, &format!("/servers/{id}"), None)
        .await;
    assert_eq!(st, StatusCode::NO_CONTENT);
    let resp = api
        .http
        .get(format!("http://{md}/conf?format=json"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::INTERNAL_SERVER_ERROR);
}

#[tokio::test]
async fn metadata_of_a_legacy_server_shows_its_bootscript() {
    let api = legacy().await;
    let (st, v) = api
        .call(
            Method::POST,
            "/servers",
            Some(legacy_create(IMAGE_CREATION)),
        )
        .await;
    assert_eq!(st, StatusCode::CREATED, "{v}");
    let id = v["server"]["id"].as_str().unwrap();
    let md = api.fake.serve_metadata(id).await;
    let v: Value = api
        .http
        .get(format!("http://{md}/conf?format=json"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(v["bootscript"]["id"], IMAGE_CREATION);
    assert_eq!(v["tags"], json!(["build_method=from-rootfs"]));
    assert_eq!(v["volumes"]["0"]["size"], 50_000_000_000u64);
}

#[tokio::test]
async fn metadata_server_stops_with_the_fake() {
    let api = fast().await;
    let s = api.create_server("gone", &[]).await;
    let md = api.fake.serve_metadata(s["id"].as_str().unwrap()).await;
    let http = api.http.clone();
    drop(api);
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert!(http
        .get(format!("http://{md}/conf"))
        .timeout(Duration::from_secs(2))
        .send()
        .await
        .is_err());
}

// ---------------------------------------------------------------------------
// Block API: snapshots imported from a real S3 server (moto), volumes, and
// images from Block snapshots.

/// Runs `qemu-img ARGS` in `dir`.
fn qemu_img(dir: &std::path::Path, args: &[&str]) {
    let out = std::process::Command::new("qemu-img")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("run qemu-img");
    assert!(
        out.status.success(),
        "qemu-img {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A moto with bucket `images`, and a manual fake that imports from it.
async fn with_s3() -> (Api, S3Server) {
    let s3 = S3Server::start().await.unwrap();
    s3.create_bucket("images").await.unwrap();
    let fake = FakeScaleway::builder()
        .manual()
        .object_storage(&s3.endpoint())
        .start()
        .await;
    (Api::new(fake).await, s3)
}

async fn put_file(s3: &S3Server, key: &str, path: &std::path::Path) {
    s3.put_object("images", key, std::fs::read(path).unwrap())
        .await
        .unwrap();
}

impl Api {
    /// Imports `images/{key}`: the snapshot as answered (200).
    async fn import(&self, key: &str, size: Option<u64>) -> Value {
        let mut body = json!({
            "bucket": "images",
            "key": key,
            "name": format!("imported {key}"),
            "project_id": self.fake.project(),
            "tags": ["imgforge"],
        });
        if let Some(size) = size {
            body["size"] = json!(size);
        }
        let (st, v) = self
            .block(
                Method::POST,
                "/snapshots/import-from-object-storage",
                Some(body),
            )
            .await;
        assert_eq!(st, StatusCode::OK, "{v}");
        assert_eq!(v["status"], "creating", "{v}");
        v
    }
}

#[tokio::test]
async fn block_import_from_object_storage_then_an_image() {
    let (api, s3) = with_s3().await;
    let dir = tempfile::tempdir().unwrap();
    qemu_img(
        dir.path(),
        &["create", "-q", "-f", "qcow2", "web.qcow2", "1G"],
    );
    put_file(&s3, "builds/web.qcow2", &dir.path().join("web.qcow2")).await;

    let snap = api.import("builds/web.qcow2", None).await;
    let id = snap["id"].as_str().unwrap().to_string();
    assert_eq!(snap["class"], "sbs");
    assert_eq!(snap["size"], 1u64 << 30, "the virtual size: {snap}");
    assert_eq!(snap["project_id"], api.fake.project());
    assert_eq!(snap["parent_volume"], Value::Null);
    assert_eq!(snap["references"], json!([]));
    assert_eq!(snap["tags"], json!(["imgforge"]));
    assert_eq!(snap["zone"], "fr-par-1");
    assert!(snap.get("project").is_none() && snap.get("snapshot").is_none());
    let rec = api.fake.block_snapshot(&id).unwrap();
    assert_eq!(rec.bucket.as_deref(), Some("images"));
    assert_eq!(rec.key.as_deref(), Some("builds/web.qcow2"));
    assert_eq!((rec.size, rec.requested_size), (1 << 30, None));

    // An image before the snapshot is available: 400 (reference §7).
    let image = json!({"name": "web", "root_volume": id, "arch": "x86_64",
                       "project": api.fake.project(), "tags": ["imgforge"]});
    let (st, v) = api.call(Method::POST, "/images", Some(image.clone())).await;
    assert_eq!(st, StatusCode::BAD_REQUEST, "{v}");
    assert_eq!(v["message"], "snapshot is not available", "{v}");

    api.fake.advance();
    let (st, v) = api
        .block(Method::GET, &format!("/snapshots/{id}"), None)
        .await;
    assert_eq!(st, StatusCode::OK);
    assert_eq!(v["status"], "available", "{v}");
    let (_, list) = api
        .block(
            Method::GET,
            &format!(
                "/snapshots?project_id={}&name=web&tags=imgforge&page=1&page_size=10",
                api.fake.project()
            ),
            None,
        )
        .await;
    assert_eq!(list["total_count"], 1, "{list}");
    assert_eq!(list["snapshots"][0]["id"], id.as_str());
    let (_, none) = api.block(Method::GET, "/snapshots?tags=other", None).await;
    assert_eq!(none["total_count"], 0, "{none}");

    // The image: its root volume is the Block snapshot.
    let (st, v) = api.call(Method::POST, "/images", Some(image)).await;
    assert_eq!(st, StatusCode::CREATED, "{v}");
    assert_eq!(v["image"]["root_volume"]["id"], id.as_str());
    assert_eq!(v["image"]["root_volume"]["volume_type"], "sbs_snapshot");
    assert_eq!(v["image"]["root_volume"]["size"], 1u64 << 30);
    let image_id = v["image"]["id"].as_str().unwrap().to_string();

    // A Block id is no Instance resource.
    for path in [format!("/snapshots/{id}"), format!("/volumes/{id}")] {
        for m in [Method::GET, Method::DELETE] {
            let (st, v) = api.call(m.clone(), &path, None).await;
            assert_eq!(st, StatusCode::NOT_FOUND, "{m} {path}: {v}");
            assert_eq!(v["type"], "not_found");
        }
    }

    // In use by the image: not deleted; the image goes, the snapshot stays.
    let (st, v) = api
        .block(Method::DELETE, &format!("/snapshots/{id}"), None)
        .await;
    assert_eq!(st, StatusCode::PRECONDITION_FAILED, "{v}");
    assert_eq!(v["precondition"], "resource_still_in_use");
    api.fake.advance();
    let (st, _) = api
        .call(Method::DELETE, &format!("/images/{image_id}"), None)
        .await;
    assert_eq!(st, StatusCode::NO_CONTENT);
    assert_eq!(api.fake.block_snapshots().len(), 1);
    let (st, _) = api
        .block(Method::DELETE, &format!("/snapshots/{id}"), None)
        .await;
    assert_eq!(st, StatusCode::NO_CONTENT);
    assert!(api.fake.block_snapshots().is_empty());
    let (st, v) = api
        .block(Method::GET, &format!("/snapshots/{id}"), None)
        .await;
    assert_eq!(st, StatusCode::NOT_FOUND, "{v}");
}

#[tokio::test]
async fn block_import_refuses_what_scaleway_refuses() {
    let (api, s3) = with_s3().await;
    let d = tempfile::tempdir().unwrap();
    let p = d.path();
    qemu_img(p, &["create", "-q", "-f", "qcow2", "base.qcow2", "1G"]);
    qemu_img(
        p,
        &[
            "convert",
            "-c",
            "-O",
            "qcow2",
            "-o",
            "compression_type=zstd",
            "base.qcow2",
            "zstd.qcow2",
        ],
    );
    qemu_img(
        p,
        &[
            "convert",
            "-c",
            "-O",
            "qcow2",
            "-o",
            "compression_type=zlib",
            "base.qcow2",
            "zlib.qcow2",
        ],
    );
    qemu_img(
        p,
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            "base.qcow2",
            "-F",
            "qcow2",
            "child.qcow2",
        ],
    );
    qemu_img(
        p,
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "--object",
            "secret,id=sec0,data=pw",
            "-o",
            "encrypt.format=luks,encrypt.key-secret=sec0",
            "enc.qcow2",
            "1G",
        ],
    );
    qemu_img(p, &["create", "-q", "-f", "qcow2", "small.qcow2", "512M"]);
    for f in ["base", "zstd", "zlib", "child", "enc", "small"] {
        put_file(&s3, &format!("{f}.qcow2"), &p.join(format!("{f}.qcow2"))).await;
    }
    s3.put_object("images", "raw.qcow2", vec![0; 4096])
        .await
        .unwrap();

    // Content problems: accepted, then `error`; the reason is the fake's.
    let cases = [
        ("zstd.qcow2", None, "zstd-compressed"),
        ("child.qcow2", None, "backing file"),
        ("enc.qcow2", None, "encrypted"),
        ("small.qcow2", None, "virtual size 536870912 is not between"),
        ("raw.qcow2", None, "not a QCOW2 image"),
        ("missing.qcow2", None, "not found"),
        (
            "base.qcow2",
            Some(1_000_000_000),
            "smaller than the image's virtual size",
        ),
    ];
    let mut ids = vec![];
    for (key, size, _) in &cases {
        ids.push(
            api.import(key, *size).await["id"]
                .as_str()
                .unwrap()
                .to_string(),
        );
    }
    // The next valid import fails as the test says; the one after succeeds.
    api.fake.fail_next_import("the fake was told to fail");
    let failed = api.import("base.qcow2", None).await["id"]
        .as_str()
        .unwrap()
        .to_string();
    let zlib = api.import("zlib.qcow2", Some(2_000_000_000)).await["id"]
        .as_str()
        .unwrap()
        .to_string();
    let small_sized = api.import("small.qcow2", Some(1_000_000_000)).await["id"]
        .as_str()
        .unwrap()
        .to_string();
    api.fake.advance();
    for ((key, _, reason), id) in cases.iter().zip(&ids) {
        let (_, v) = api
            .block(Method::GET, &format!("/snapshots/{id}"), None)
            .await;
        assert_eq!(v["status"], "error", "{key}: {v}");
        assert!(
            v.get("error_reason").is_none(),
            "the API has no reason: {v}"
        );
        let rec = api.fake.block_snapshot(id).unwrap();
        let got = rec.error_reason.unwrap_or_default();
        assert!(got.contains(reason), "{key}: {got:?} lacks {reason:?}");
    }
    let rec = api.fake.block_snapshot(&failed).unwrap();
    assert_eq!(
        (rec.status.as_str(), rec.error_reason.as_deref()),
        ("error", Some("the fake was told to fail"))
    );
    let rec = api.fake.block_snapshot(&zlib).unwrap();
    assert_eq!(
        (rec.status.as_str(), rec.size),
        ("available", 2_000_000_000),
        "{rec:?}"
    );
    // A 512 MiB image with an explicit size of 1 GB is within the limits.
    assert_eq!(
        api.fake.block_snapshot(&small_sized).unwrap().status,
        "available"
    );

    // Argument problems: 400 at once, nothing created.
    let n = api.fake.block_snapshots().len();
    let bad = [
        (
            json!({"bucket": "images", "key": "disk.raw", "name": "r"}),
            "key",
        ),
        (json!({"bucket": "images", "key": "base.qcow2"}), "name"),
        (json!({"key": "base.qcow2", "name": "x"}), "bucket"),
        (
            json!({"bucket": "images", "key": "base.qcow2", "name": "x", "size": 500_000_000}),
            "size",
        ),
        (
            json!({"bucket": "images", "key": "base.qcow2", "name": "x", "size": 2_000_000_000_000u64}),
            "size",
        ),
        (
            json!({"bucket": "images", "key": "base.qcow2", "name": "x", "project_id": "nope"}),
            "project_id",
        ),
    ];
    for (body, arg) in bad {
        let (st, v) = api
            .block(
                Method::POST,
                "/snapshots/import-from-object-storage",
                Some(body.clone()),
            )
            .await;
        assert_eq!(st, StatusCode::BAD_REQUEST, "{body}: {v}");
        assert_eq!(v["type"], "invalid_arguments", "{v}");
        assert_eq!(v["details"][0]["argument_name"], arg, "{v}");
    }
    let (st, v) = api
        .block(
            Method::POST,
            "/snapshots/import-from-object-storage",
            Some(json!({"bucket": "images", "key": "base.qcow2", "name": "x",
                        "project_id": uuid_v4()})),
        )
        .await;
    assert_eq!(st, StatusCode::FORBIDDEN, "{v}");
    assert_eq!(api.fake.block_snapshots().len(), n);

    // Without Object Storage, the fake refuses imports: a test-setup mistake.
    let plain = fast().await;
    let (st, v) = plain
        .block(
            Method::POST,
            "/snapshots/import-from-object-storage",
            Some(json!({"bucket": "images", "key": "base.qcow2", "name": "x"})),
        )
        .await;
    assert_eq!(st, StatusCode::BAD_REQUEST, "{v}");
    assert!(
        v["message"].as_str().unwrap().contains("object_storage"),
        "{v}"
    );
}

fn uuid_v4() -> String {
    // A UUID that is not the fake's project.
    "3f2b1c4e-8d7a-4b6e-9c1d-2a3b4c5d6e7f".to_string()
}

#[tokio::test]
async fn block_volumes_and_their_snapshots() {
    let api = Api::new(FakeScaleway::builder().manual().start().await).await;
    let (st, v) = api
        .block(
            Method::POST,
            "/volumes",
            Some(
                json!({"name": "data", "project_id": api.fake.project(), "perf_iops": 15000,
                        "from_empty": {"size": 20_000_000_000u64}, "tags": ["t"]}),
            ),
        )
        .await;
    assert_eq!(st, StatusCode::OK, "{v}");
    assert_eq!(v["status"], "creating");
    assert_eq!(v["type"], "sbs_15k");
    assert_eq!(v["specs"], json!({"perf_iops": 15000, "class": "sbs"}));
    assert_eq!(v["parent_snapshot_id"], Value::Null);
    let vol = v["id"].as_str().unwrap().to_string();
    // A snapshot needs the volume out of `creating`.
    let snap_body =
        json!({"volume_id": vol, "name": "s1", "project_id": api.fake.project(), "tags": ["a"]});
    let (st, v) = api
        .block(Method::POST, "/snapshots", Some(snap_body.clone()))
        .await;
    assert_eq!(st, StatusCode::CONFLICT, "{v}");
    api.fake.advance();
    let (_, v) = api
        .block(Method::GET, &format!("/volumes/{vol}"), None)
        .await;
    assert_eq!(v["status"], "available", "{v}");

    let (st, v) = api.block(Method::POST, "/snapshots", Some(snap_body)).await;
    assert_eq!(st, StatusCode::OK, "{v}");
    assert_eq!(v["status"], "creating");
    assert_eq!(v["parent_volume"]["id"], vol.as_str());
    assert_eq!(v["parent_volume"]["type"], "sbs_15k");
    assert_eq!(v["size"], 20_000_000_000u64);
    let snap = v["id"].as_str().unwrap().to_string();
    api.fake.advance();
    let (st, v) = api
        .block(
            Method::PATCH,
            &format!("/snapshots/{snap}"),
            Some(json!({"name": "s2", "tags": ["b"]})),
        )
        .await;
    assert_eq!(st, StatusCode::OK, "{v}");
    assert_eq!(
        (v["name"].as_str(), v["status"].as_str()),
        (Some("s2"), Some("available"))
    );
    let (_, list) = api
        .block(
            Method::GET,
            &format!("/snapshots?volume_id={vol}&tags=b"),
            None,
        )
        .await;
    assert_eq!(list["total_count"], 1, "{list}");

    // A volume from the snapshot: not smaller than it.
    let (st, v) = api
        .block(Method::POST, "/volumes",
               Some(json!({"name": "copy", "from_snapshot": {"snapshot_id": snap, "size": 1_000_000_000u64}})))
        .await;
    assert_eq!(st, StatusCode::BAD_REQUEST, "{v}");
    let (st, v) = api
        .block(
            Method::POST,
            "/volumes",
            Some(json!({"name": "copy", "from_snapshot": {"snapshot_id": snap}})),
        )
        .await;
    assert_eq!(st, StatusCode::OK, "{v}");
    assert_eq!(v["parent_snapshot_id"], snap.as_str());
    assert_eq!(v["type"], "sbs_5k");
    assert_eq!(v["size"], 20_000_000_000u64);
    let (st, v) = api
        .block(Method::POST, "/volumes", Some(json!({"name": "none"})))
        .await;
    assert_eq!(st, StatusCode::BAD_REQUEST, "{v}");

    let (_, list) = api
        .block(Method::GET, "/volumes?page_size=1&page=2", None)
        .await;
    assert_eq!(list["total_count"], 2, "{list}");
    assert_eq!(list["volumes"].as_array().unwrap().len(), 1);
    assert_eq!(list["volumes"][0]["name"], "copy", "oldest first: {list}");
    let (st, _) = api.block(Method::GET, "/volumes?page_size=101", None).await;
    assert_eq!(st, StatusCode::BAD_REQUEST);
    api.fake.advance();
    let (st, _) = api
        .block(Method::DELETE, &format!("/volumes/{vol}"), None)
        .await;
    assert_eq!(st, StatusCode::NO_CONTENT);
    assert_eq!(api.fake.block_volumes().len(), 1);
    let (st, v) = api
        .block(Method::GET, &format!("/volumes/{vol}"), None)
        .await;
    assert_eq!(st, StatusCode::NOT_FOUND);
    assert_eq!(v["resource"], "block_volume");
}

// ---------------------------------------------------------------------------
// SBS servers and marketplace local images.

#[tokio::test]
async fn sbs_volumes_of_a_server_are_block_volumes() {
    let api = fast().await;
    let (st, v) = api
        .call(
            Method::POST,
            "/servers",
            Some(json!({
                "name": "sbs",
                "commercial_type": "DEV1-S",
                "image": "debian_bookworm",
                "volumes": {
                    "0": {"volume_type": "sbs_volume", "size": 20_000_000_000u64},
                    "1": {"volume_type": "sbs_volume", "size": 30_000_000_000u64},
                },
            })),
        )
        .await;
    assert_eq!(st, StatusCode::CREATED, "{v}");
    let server = v["server"].clone();
    let sid = server["id"].as_str().unwrap().to_string();
    let root = server["volumes"]["0"]["id"].as_str().unwrap().to_string();
    let extra = server["volumes"]["1"]["id"].as_str().unwrap().to_string();
    assert_eq!(
        server["volumes"]["0"]["volume_type"], "sbs_volume",
        "{server}"
    );
    assert_eq!(server["volumes"]["0"]["boot"], true);
    assert_eq!(server["volumes"]["1"]["size"], 30_000_000_000u64);
    assert!(api.fake.volumes().is_empty(), "no Instance volume");

    // The Block API has them, attached to the server.
    let (st, v) = api
        .block(Method::GET, &format!("/volumes/{root}"), None)
        .await;
    assert_eq!(st, StatusCode::OK, "{v}");
    assert_eq!(v["status"], "in_use");
    assert_eq!(v["size"], 20_000_000_000u64);
    assert_eq!(v["references"][0]["product_resource_id"], sid.as_str());
    assert_eq!(
        v["references"][0]["product_resource_type"],
        "instance_server"
    );
    let (_, list) = api
        .block(
            Method::GET,
            &format!("/volumes?product_resource_id={sid}"),
            None,
        )
        .await;
    assert_eq!(list["total_count"], 2, "{list}");
    // Not Instance volumes; not deletable while attached.
    for m in [Method::GET, Method::DELETE] {
        let (st, _) = api.call(m, &format!("/volumes/{extra}"), None).await;
        assert_eq!(st, StatusCode::NOT_FOUND);
    }
    let (st, v) = api
        .block(Method::DELETE, &format!("/volumes/{extra}"), None)
        .await;
    assert_eq!(st, StatusCode::PRECONDITION_FAILED, "{v}");
    // A Block snapshot of an attached volume is fine.
    let (st, v) = api
        .block(
            Method::POST,
            "/snapshots",
            Some(json!({"volume_id": root, "name": "live"})),
        )
        .await;
    assert_eq!(st, StatusCode::OK, "{v}");

    // Terminate: the server goes, its SBS volumes stay, detached.
    api.action(&sid, "poweron").await;
    api.wait_state(&format!("/servers/{sid}"), "server", "running")
        .await;
    let (st, _) = api.action(&sid, "terminate").await;
    assert_eq!(st, StatusCode::ACCEPTED);
    for _ in 0..100 {
        if api.fake.server(&sid).is_none() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(api.fake.server(&sid).is_none());
    let vols = api.fake.block_volumes();
    assert_eq!(vols.len(), 2);
    for v in &vols {
        assert_eq!(
            (v.status.as_str(), v.server.as_deref()),
            ("available", None)
        );
        assert!(v.last_detached_at.is_some());
    }
    let (_, v) = api
        .block(Method::GET, &format!("/volumes/{root}"), None)
        .await;
    assert_eq!(v["references"], json!([]), "{v}");
    let (st, _) = api
        .block(Method::DELETE, &format!("/volumes/{extra}"), None)
        .await;
    assert_eq!(st, StatusCode::NO_CONTENT);
}

#[tokio::test]
async fn marketplace_local_images_resolve_labels_per_type() {
    let api = fast().await;
    let http = Client::new();
    let get = |q: &str| {
        let url = format!("{}/marketplace/v2/local-images?{q}", api.fake.url());
        let http = http.clone();
        async move {
            // Public: no token.
            let resp = http.get(url).send().await.unwrap();
            (resp.status(), resp.json::<Value>().await.unwrap())
        }
    };
    let (st, v) = get("image_label=debian_bookworm&zone=fr-par-1&type=instance_sbs").await;
    assert_eq!(st, StatusCode::OK, "{v}");
    assert_eq!(v["total_count"], 1, "{v}");
    let sbs = v["local_images"][0].clone();
    assert_eq!(sbs["label"], "debian_bookworm");
    assert_eq!(sbs["type"], "instance_sbs");
    assert_eq!(sbs["zone"], "fr-par-1");
    assert_eq!(sbs["arch"], "x86_64");
    assert!(sbs["compatible_commercial_types"]
        .as_array()
        .unwrap()
        .contains(&json!("DEV1-S")));
    assert_eq!(
        sbs["id"].as_str(),
        api.fake.label_sbs_image_id("debian_bookworm").as_deref()
    );
    let (_, v) = get("image_label=debian_bookworm&zone=fr-par-1").await;
    assert_eq!(v["total_count"], 2, "{v}");
    let local = v["local_images"]
        .as_array()
        .unwrap()
        .iter()
        .find(|i| i["type"] == "instance_local")
        .unwrap()
        .clone();
    assert_eq!(
        local["id"].as_str(),
        api.fake.label_image_id("debian_bookworm").as_deref()
    );
    let (_, v) = get("image_label=no_such_label&zone=fr-par-1").await;
    assert_eq!(v["total_count"], 0, "{v}");
    let (st, _) = get("image_label=debian_bookworm&type=b_ssd").await;
    assert_eq!(st, StatusCode::BAD_REQUEST);

    // A server from the instance_sbs image gets an SBS root by default.
    let (st, v) = api
        .call(
            Method::POST,
            "/servers",
            Some(json!({"name": "s", "commercial_type": "DEV1-S",
                        "image": sbs["id"], "volumes": {}})),
        )
        .await;
    assert_eq!(st, StatusCode::CREATED, "{v}");
    assert_eq!(
        v["server"]["volumes"]["0"]["volume_type"], "sbs_volume",
        "{v}"
    );
    assert_eq!(v["server"]["image"]["id"], sbs["id"]);
    assert_eq!(api.fake.block_volumes().len(), 1);
    // From the instance_local one, l_ssd.
    let (_, v) = api
        .call(
            Method::POST,
            "/servers",
            Some(json!({"name": "l", "commercial_type": "DEV1-S",
                        "image": local["id"], "volumes": {}})),
        )
        .await;
    assert_eq!(v["server"]["volumes"]["0"]["volume_type"], "l_ssd", "{v}");
}

#[tokio::test]
async fn fail_next_takes_block_paths() {
    let api = Api::new(FakeScaleway::builder().manual().start().await).await;
    let path = format!("/block/v1/zones/{}/volumes", api.fake.zone());
    api.fake.fail_next(
        &path,
        503,
        r#"{"type":"unavailable","message":"try later"}"#,
    );
    let body = json!({"name": "v", "from_empty": {"size": 10_000_000_000u64}});
    let (st, v) = api
        .block(Method::POST, "/volumes", Some(body.clone()))
        .await;
    assert_eq!(st, StatusCode::SERVICE_UNAVAILABLE, "{v}");
    assert!(api.fake.block_volumes().is_empty(), "no effect");
    let (st, v) = api.block(Method::POST, "/volumes", Some(body)).await;
    assert_eq!(st, StatusCode::OK, "{v}");
    assert_eq!(api.fake.calls().len(), 2);
}
