//! The Marketplace API's local images (`GET /marketplace/v2/local-images`,
//! reference §2.1): how a client resolves an image label to the id of an
//! image in a zone, for local (`instance_local`) or Block (`instance_sbs`)
//! root volumes. See the parent module's doc, "Marketplace".

use axum::http::StatusCode;
use serde_json::{json, Map, Value};

use super::{err, invalid, Config, Reply, R, ZONES};

pub(super) fn route(cfg: &Config, path: &str, query: &[(String, String)]) -> R {
    if path.trim_end_matches('/') != "/marketplace/v2/local-images" {
        return Err(err(
            StatusCode::NOT_FOUND,
            "not_found",
            &format!("no route for {path}"),
            json!({}),
        ));
    }
    let q = |k: &str| {
        query
            .iter()
            .find(|(key, _)| key == k)
            .map(|(_, v)| v.as_str())
    };
    if let Some(t) = q("type").filter(|t| !["instance_local", "instance_sbs"].contains(t)) {
        return Err(invalid(vec![(
            "type",
            "constraint",
            format!("type must be instance_local or instance_sbs (got {t:?})"),
        )]));
    }
    if let Some(z) = q("zone").filter(|z| !ZONES.contains(z)) {
        return Err(invalid(vec![(
            "zone",
            "constraint",
            format!("unknown zone {z:?}"),
        )]));
    }
    let mut items = vec![];
    for (label, image) in &cfg.labels {
        for (kind, id) in [
            ("instance_local", &image.id),
            ("instance_sbs", &image.sbs_id),
        ] {
            let compatible: Vec<&String> = cfg
                .commercial_types
                .iter()
                .filter(|t| (image.arch == "arm64") == t.starts_with("COPARM"))
                .collect();
            let local = json!({
                "id": id,
                "arch": image.arch,
                "zone": cfg.zone,
                "compatible_commercial_types": compatible,
                "label": label,
                "type": kind,
            });
            let keep = q("image_label").is_none_or(|l| l == label)
                && q("zone").is_none_or(|z| z == cfg.zone)
                && q("type").is_none_or(|t| t == kind);
            if keep {
                items.push(local);
            }
        }
    }
    let num = |name: &str, default: u64| -> Result<u64, Reply> {
        match q(name) {
            None => Ok(default),
            Some(s) => s.parse::<u64>().ok().filter(|n| *n >= 1).ok_or_else(|| {
                invalid(vec![(
                    name,
                    "format",
                    format!("{name} must be a positive integer"),
                )])
            }),
        }
    };
    let page = num("page", 1)?;
    let page_size = num("page_size", 50)?.min(100);
    let total = items.len() as u64;
    let start = ((page - 1) * page_size).min(total) as usize;
    let end = (page * page_size).min(total) as usize;
    let mut body = Map::new();
    body.insert(
        "local_images".into(),
        Value::Array(items[start..end].to_vec()),
    );
    body.insert("total_count".into(), json!(total));
    Ok(Reply::json(StatusCode::OK, Value::Object(body)))
}
