//! Client tests against a tiny axum server on 127.0.0.1 standing in for the
//! Instance API: retries on 429 and 5xx, typed errors, pagination, creations
//! whose reply is lost, action outcome checks, and that the secret key shows
//! up in no log line or error text.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::{json, Value};

use super::api::{CreateServerRequest, ServerAction, ServerState, VolumeTemplate};
use super::client::{Client, ClientOptions, RetryPolicy};
use super::config::{Config, SecretKey};

const SECRET: &str = "7e57c0de-5ec2-4e7a-b1a5-5ec2e75ec2e7";
const SERVERS: &str = "/instance/v1/zones/fr-par-1/servers";

async fn serve(router: Router) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, router).await.unwrap() });
    format!("http://{address}")
}

fn client(api_url: &str) -> Client {
    let config = Config {
        access_key: Some("SCWTESTACCESSKEY".to_string()),
        secret_key: SecretKey::new(SECRET),
        default_project_id: "proj-1".to_string(),
        default_zone: "fr-par-1".to_string(),
        default_region: "fr-par".to_string(),
        api_url: api_url.to_string(),
        profile: None,
        config_path: None,
    };
    let options = ClientOptions {
        retry: RetryPolicy {
            max_attempts: 4,
            initial_backoff: Duration::from_millis(1),
            max_backoff: Duration::from_millis(4),
        },
        request_timeout: Duration::from_secs(5),
        connect_timeout: Duration::from_secs(5),
        poll_interval: Duration::from_millis(2),
        per_page: 100,
    };
    Client::with_options(&config, options).unwrap()
}

fn server_json(id: &str, name: &str, state: &str) -> Value {
    json!({
        "id": id, "name": name, "state": state, "state_detail": "",
        "commercial_type": "DEV1-S", "tags": ["imgforge"], "bootscript": null,
        "volumes": {"0": {"id": format!("vol-{id}"), "size": 20000000000u64, "volume_type": "l_ssd"}},
        "public_ip": {"id": "ip-1", "address": "51.15.0.1", "dynamic": true, "family": "inet"},
        "public_ips": [{"id": "ip-1", "address": "51.15.0.1"}],
        "private_ip": null, "location": null, "some_future_field": {"x": 1}
    })
}

fn auth_ok(headers: &HeaderMap) -> bool {
    headers.get("x-auth-token").and_then(|v| v.to_str().ok()) == Some(SECRET)
}

#[tokio::test]
async fn bare_429s_are_ridden_out() {
    let calls = Arc::new(AtomicU32::new(0));
    let router = Router::new()
        .route(
            "/instance/v1/zones/fr-par-1/servers/{id}",
            get(
                |State(calls): State<Arc<AtomicU32>>,
                 Path(id): Path<String>,
                 headers: HeaderMap| async move {
                    assert!(auth_ok(&headers));
                    if calls.fetch_add(1, Ordering::SeqCst) < 2 {
                        // What the API does: no body, no Retry-After.
                        return StatusCode::TOO_MANY_REQUESTS.into_response();
                    }
                    Json(json!({ "server": server_json(&id, "a", "stopped in place") }))
                        .into_response()
                },
            ),
        )
        .with_state(calls.clone());
    let client = client(&serve(router).await);
    let server = client.get_server("srv-1").await.unwrap();
    assert_eq!(calls.load(Ordering::SeqCst), 3);
    assert_eq!(server.id, "srv-1");
    assert_eq!(server.state, ServerState::StoppedInPlace);
    assert_eq!(server.root_volume_id(), Some("vol-srv-1"));
    assert_eq!(server.public_address(), Some("51.15.0.1"));
}

#[tokio::test]
async fn a_500_is_retried_for_a_get() {
    let calls = Arc::new(AtomicU32::new(0));
    let router = Router::new()
        .route(
            "/instance/v1/zones/fr-par-1/servers/{id}",
            get(
                |State(calls): State<Arc<AtomicU32>>, Path(id): Path<String>| async move {
                    if calls.fetch_add(1, Ordering::SeqCst) == 0 {
                        return (StatusCode::INTERNAL_SERVER_ERROR, "upstream trouble")
                            .into_response();
                    }
                    Json(json!({ "server": server_json(&id, "a", "running") })).into_response()
                },
            ),
        )
        .with_state(calls.clone());
    let client = client(&serve(router).await);
    let server = client.get_server("srv-2").await.unwrap();
    assert_eq!(calls.load(Ordering::SeqCst), 2);
    assert_eq!(server.state, ServerState::Running);
}

#[tokio::test]
async fn a_not_found_body_becomes_a_typed_error() {
    let router = Router::new().route(
        "/instance/v1/zones/fr-par-1/servers/{id}",
        get(|Path(id): Path<String>| async move {
            (
                StatusCode::NOT_FOUND,
                Json(json!({
                    "type": "not_found", "message": "resource is not found",
                    "resource": "instance_server", "resource_id": id
                })),
            )
        }),
    );
    let client = client(&serve(router).await);
    let error = client.get_server("123").await.unwrap_err();
    assert!(error.is_not_found());
    let api = error.api_error().expect("an API error");
    assert_eq!(api.kind, "not_found");
    assert_eq!(api.status, 404);
    assert_eq!(api.resource.as_deref(), Some("instance_server"));
    assert_eq!(api.resource_id.as_deref(), Some("123"));
    let text = error.to_string();
    assert!(
        text.starts_with("scaleway: not_found: instance_server 123: resource is not found"),
        "{text}"
    );
    assert!(text.contains(&format!("GET {SERVERS}/123")), "{text}");
}

/// `(page, per_page, tags)` of each list request.
type PagesSeen = Arc<Mutex<Vec<(u32, u32, String)>>>;

#[tokio::test]
async fn lists_are_read_across_pages() {
    let pages_seen = Arc::new(Mutex::new(Vec::new()));
    let router =
        Router::new()
            .route(
                SERVERS,
                get(
                    |State(seen): State<PagesSeen>,
                     Query(query): Query<HashMap<String, String>>| async move {
                        let page: u32 = query["page"].parse().unwrap();
                        let per_page: u32 = query["per_page"].parse().unwrap();
                        seen.lock()
                            .unwrap()
                            .push((page, per_page, query["tags"].clone()));
                        let total = 250u32;
                        let start = (page - 1) * per_page;
                        let end = (start + per_page).min(total);
                        let servers: Vec<Value> = (start..end)
                            .map(|i| server_json(&format!("s{i}"), &format!("n{i}"), "running"))
                            .collect();
                        Json(json!({ "servers": servers, "total_count": total }))
                    },
                ),
            )
            .with_state(pages_seen.clone());
    let client = client(&serve(router).await);
    let tags = vec!["imgforge".to_string(), "build=1".to_string()];
    let servers = client.list_servers_by_tags(&tags).await.unwrap();
    assert_eq!(servers.len(), 250);
    assert_eq!(servers[249].id, "s249");
    let seen = pages_seen.lock().unwrap().clone();
    let tags_query = "imgforge,build=1".to_string();
    assert_eq!(
        seen,
        vec![
            (1, 100, tags_query.clone()),
            (2, 100, tags_query.clone()),
            (3, 100, tags_query)
        ]
    );
}

/// The fake API's servers, and how many creations it was asked for.
#[derive(Clone, Default)]
struct FakeServers {
    servers: Arc<Mutex<Vec<Value>>>,
    create_requests: Arc<AtomicU32>,
    list_requests: Arc<AtomicU32>,
}

#[tokio::test]
async fn a_create_whose_reply_is_lost_is_not_duplicated() {
    let fake = FakeServers::default();
    let router =
        Router::new()
            .route(
                SERVERS,
                post(
                    |State(fake): State<FakeServers>, Json(body): Json<Value>| async move {
                        let n = fake.create_requests.fetch_add(1, Ordering::SeqCst);
                        let name = body["name"].as_str().unwrap().to_string();
                        assert_eq!(body["project"], "proj-1");
                        assert_eq!(body["volumes"]["1"]["size"], 10_000_000_000u64);
                        let server = server_json(&format!("created-{n}"), &name, "stopped");
                        fake.servers.lock().unwrap().push(server.clone());
                        // Processed, then the reply is cut short: the declared
                        // length is never reached and the connection closes.
                        let body = json!({ "server": server }).to_string();
                        let declared = (body.len() + 1000).to_string();
                        Response::builder()
                            .status(StatusCode::CREATED)
                            .header(header::CONTENT_TYPE, "application/json")
                            .header(header::CONTENT_LENGTH, declared)
                            .body(axum::body::Body::from(body))
                            .unwrap()
                    },
                )
                .get(
                    |State(fake): State<FakeServers>,
                     Query(query): Query<HashMap<String, String>>| async move {
                        fake.list_requests.fetch_add(1, Ordering::SeqCst);
                        let name = query.get("name").cloned().unwrap_or_default();
                        let servers: Vec<Value> = fake
                            .servers
                            .lock()
                            .unwrap()
                            .iter()
                            .filter(|s| s["name"].as_str().unwrap().contains(&name))
                            .cloned()
                            .collect();
                        let total = servers.len();
                        Json(json!({ "servers": servers, "total_count": total }))
                    },
                ),
            )
            .with_state(fake.clone());
    let client = client(&serve(router).await);
    let request = CreateServerRequest {
        name: "imgforge-helper-5f2a".to_string(),
        commercial_type: "DEV1-S".to_string(),
        image: Some("ubuntu_jammy".to_string()),
        volumes: [(
            "1".to_string(),
            VolumeTemplate {
                size: Some(10_000_000_000),
                volume_type: Some("l_ssd".to_string()),
                ..VolumeTemplate::default()
            },
        )]
        .into(),
        tags: vec!["imgforge".to_string()],
        dynamic_ip_required: Some(true),
        ..CreateServerRequest::default()
    };
    let server = client.create_server(&request).await.unwrap();
    assert_eq!(fake.create_requests.load(Ordering::SeqCst), 1);
    // The server came from the check, not from the lost reply.
    assert_eq!(fake.list_requests.load(Ordering::SeqCst), 1);
    assert_eq!(fake.servers.lock().unwrap().len(), 1);
    assert_eq!(server.id, "created-0");
    assert_eq!(server.name, "imgforge-helper-5f2a");
}

#[tokio::test]
async fn an_action_with_an_unknown_outcome_is_checked_before_resending() {
    // poweron answers 500 every time; whether it is sent again depends on
    // what the server's state says.
    async fn run(state_after: &'static str) -> (Result<(), super::Error>, u32) {
        let actions = Arc::new(AtomicU32::new(0));
        let router = Router::new()
            .route(
                "/instance/v1/zones/fr-par-1/servers/{id}/action",
                post(
                    |State(actions): State<Arc<AtomicU32>>, Json(body): Json<Value>| async move {
                        assert_eq!(body, json!({"action": "poweron"}));
                        actions.fetch_add(1, Ordering::SeqCst);
                        StatusCode::BAD_GATEWAY
                    },
                ),
            )
            .route(
                "/instance/v1/zones/fr-par-1/servers/{id}",
                get(move |Path(id): Path<String>| async move {
                    Json(json!({ "server": server_json(&id, "a", state_after) }))
                }),
            )
            .with_state(actions.clone());
        let client = client(&serve(router).await);
        let result = client.server_action("srv-3", ServerAction::PowerOn).await;
        (result, actions.load(Ordering::SeqCst))
    }

    // The server is starting: the poweron went through; not sent again.
    let (result, sent) = run("starting").await;
    result.unwrap();
    assert_eq!(sent, 1);

    // Still stopped: it did not; sent again up to the try budget, then the
    // 502 is returned.
    let (result, sent) = run("stopped").await;
    let error = result.unwrap_err();
    assert_eq!(error.api_error().map(|e| e.status), Some(502), "{error}");
    assert_eq!(sent, 4);
}

#[tokio::test]
async fn a_delete_retried_after_a_lost_reply_accepts_404() {
    let calls = Arc::new(AtomicU32::new(0));
    let router = Router::new()
        .route(
            "/instance/v1/zones/fr-par-1/volumes/{id}",
            axum::routing::delete(|State(calls): State<Arc<AtomicU32>>| async move {
                if calls.fetch_add(1, Ordering::SeqCst) == 0 {
                    // Deleted, but the reply is a gateway error.
                    return StatusCode::SERVICE_UNAVAILABLE.into_response();
                }
                (
                    StatusCode::NOT_FOUND,
                    Json(json!({"type": "not_found", "message": "gone"})),
                )
                    .into_response()
            }),
        )
        .with_state(calls.clone());
    let client = client(&serve(router).await);
    client.delete_volume("vol-1").await.unwrap();
    assert_eq!(calls.load(Ordering::SeqCst), 2);
    // A 404 on the first try is the caller's business.
    let error = client.delete_volume("vol-1").await.unwrap_err();
    assert!(error.is_not_found());
}

#[tokio::test]
async fn waiters_stop_on_error_states_and_time_out() {
    let reads = Arc::new(AtomicU32::new(0));
    let router = Router::new()
        .route(
            "/instance/v1/zones/fr-par-1/snapshots/{id}",
            get(
                |State(reads): State<Arc<AtomicU32>>, Path(id): Path<String>| async move {
                    let state = if id == "bad" {
                        if reads.fetch_add(1, Ordering::SeqCst) == 0 {
                            "snapshotting"
                        } else {
                            "error"
                        }
                    } else {
                        "snapshotting"
                    };
                    Json(json!({"snapshot": {
                        "id": id, "name": "s", "state": state,
                        "error_reason": if state == "error" { Value::from("disk full") } else { Value::Null }
                    }}))
                },
            ),
        )
        .route(
            "/instance/v1/zones/fr-par-1/images/{id}",
            get(|Path(id): Path<String>| async move {
                Json(json!({"image": {"id": id, "name": "i", "state": "available", "arch": "x86_64"}}))
            }),
        )
        .with_state(reads);
    let client = client(&serve(router).await);
    let error = client
        .wait_for_snapshot_available("bad", Duration::from_secs(5))
        .await
        .unwrap_err();
    let text = error.to_string();
    assert!(
        text.contains("snapshot bad is in state error") && text.contains("disk full"),
        "{text}"
    );
    let error = client
        .wait_for_snapshot_available("slow", Duration::from_millis(20))
        .await
        .unwrap_err();
    let text = error.to_string();
    assert!(
        text.contains("did not become available") && text.contains("snapshotting"),
        "{text}"
    );
    let image = client
        .wait_for_image_available("img-1", Duration::from_secs(5))
        .await
        .unwrap();
    assert_eq!(image.arch.as_deref(), Some("x86_64"));
}

/// A `MakeWriter` into a shared buffer.
#[derive(Clone, Default)]
struct CapturedLogs(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for CapturedLogs {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(bytes);
        Ok(bytes.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[tokio::test]
async fn the_secret_key_appears_in_no_log_and_no_error() {
    let logs = CapturedLogs::default();
    let writer = logs.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::TRACE)
        .with_ansi(false)
        .with_writer(move || writer.clone())
        .finish();
    let _guard = tracing::subscriber::set_default(subscriber);

    let router = Router::new()
        .route(
            "/instance/v1/zones/fr-par-1/servers/{id}",
            get(|| async {
                (
                    StatusCode::INTERNAL_SERVER_ERROR,
                    Json(json!({"type": "internal", "message": "boom"})),
                )
            }),
        )
        .route(
            SERVERS,
            post(|| async {
                (
                    StatusCode::UNAUTHORIZED,
                    Json(json!({"type": "denied_authentication", "message": "invalid token"})),
                )
            }),
        );
    let client = client(&serve(router).await);
    let get_error = client.get_server("srv-4").await.unwrap_err();
    let create_error = client
        .create_server(&CreateServerRequest {
            name: "x".to_string(),
            commercial_type: "DEV1-S".to_string(),
            ..CreateServerRequest::default()
        })
        .await
        .unwrap_err();
    // Nothing listens on port 9 of 127.0.0.1: a connection error.
    let unreachable = client_at_closed_port()
        .get_server("srv-5")
        .await
        .unwrap_err();

    let captured = String::from_utf8(logs.0.lock().unwrap().clone()).unwrap();
    assert!(
        captured.contains("retrying"),
        "the failures were logged: {captured}"
    );
    let shown = format!(
        "{captured}\n{get_error}\n{get_error:?}\n{create_error}\n{create_error:?}\n\
         {unreachable}\n{unreachable:?}\n{client:?}"
    );
    assert!(!shown.contains(SECRET), "the secret key leaked:\n{shown}");
    assert!(get_error.to_string().contains("scaleway: internal: boom"));
    assert!(create_error.to_string().contains("denied_authentication"));
}

fn client_at_closed_port() -> Client {
    client("http://127.0.0.1:9")
}
