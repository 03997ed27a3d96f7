//! The done signal: once the build has ended, the agent answers every TCP
//! connection on `signal_build_done_port` with one JSON line and closes it.
//!
//! `status` (`"0"` success, `"1"` failure) and `message` are the original
//! initrd's fields, which legacy pollers read; the rest are additions. A
//! reader must parse the line, not take a connect as the signal: behind
//! QEMU's user networking a connect to a forwarded port succeeds even when
//! nothing listens.

use serde::{Deserialize, Serialize};

use crate::{Method, ParseError, Stage};

/// One partition or filesystem of the finished volume.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LayoutEntry {
    /// The device in the build server (`/dev/vda1`).
    pub device: String,
    /// `esp`, `root` or, for a written disk image, `partition`.
    pub role: String,
    /// The GPT partition number (none for an unpartitioned volume).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub number: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub partuuid: Option<String>,
    pub start_bytes: u64,
    pub size_bytes: u64,
    /// `vfat`, `ext4`... when the agent knows.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fs: Option<String>,
    /// The filesystem's UUID.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uuid: Option<String>,
}

/// The line the agent answers with.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DoneLine {
    pub status: String,
    pub message: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub method: Option<Method>,
    /// Where a failed build stopped.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stage: Option<Stage>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub duration_s: Option<f64>,
    /// Bytes downloaded (the compressed size).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bytes: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub layout: Option<Vec<LayoutEntry>>,
}

const SUCCESS: &str = "0";
const FAILURE: &str = "1";

impl DoneLine {
    pub fn success(method: Method, duration_s: f64, bytes: u64, layout: Vec<LayoutEntry>) -> Self {
        DoneLine {
            status: SUCCESS.into(),
            message: "done".into(),
            method: Some(method),
            stage: None,
            duration_s: Some((duration_s * 10.0).round() / 10.0),
            bytes: Some(bytes),
            layout: Some(layout),
        }
    }

    pub fn failure(stage: Stage, message: String) -> Self {
        DoneLine {
            status: FAILURE.into(),
            message,
            method: None,
            stage: Some(stage),
            duration_s: None,
            bytes: None,
            layout: None,
        }
    }

    pub fn is_success(&self) -> bool {
        self.status == SUCCESS
    }

    /// The wire form: one JSON object and a newline.
    pub fn to_line(&self) -> String {
        let mut line = serde_json::to_string(self).expect("a DoneLine always serialises");
        line.push('\n');
        line
    }

    /// Reads one line (without or with its newline).
    pub fn parse(line: &[u8]) -> Result<DoneLine, ParseError> {
        serde_json::from_slice(line).map_err(|e| {
            ParseError::new(format!(
                "not a done line ({e}): {:?}",
                String::from_utf8_lossy(line)
            ))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry() -> LayoutEntry {
        LayoutEntry {
            device: "/dev/vda2".into(),
            role: "root".into(),
            number: Some(2),
            partuuid: Some("0fc63daf-8483-4772-8e79-3d69d8477de4".into()),
            start_bytes: 105 << 20,
            size_bytes: 3 << 30,
            fs: Some("ext4".into()),
            uuid: None,
        }
    }

    #[test]
    fn lines_round_trip_and_keep_the_original_fields() {
        let ok = DoneLine::success(Method::FromRootfs, 41.23, 390878720, vec![entry()]);
        let text = ok.to_line();
        assert!(text.ends_with('\n') && text.matches('\n').count() == 1);
        let v: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(v["status"], "0");
        assert_eq!(v["message"], "done");
        assert_eq!(v["method"], "from-rootfs");
        assert_eq!(v["duration_s"], 41.2);
        assert_eq!(v["layout"][0]["fs"], "ext4");
        assert!(v["layout"][0].get("uuid").is_none());
        assert!(v.get("stage").is_none());
        let back = DoneLine::parse(text.trim_end().as_bytes()).unwrap();
        assert_eq!(back.layout.as_deref(), Some(&[entry()][..]));
        assert!(back.is_success());

        let bad = DoneLine::failure(Stage::Fetch, "rootfs_url answered 404".into());
        let v: serde_json::Value = serde_json::from_str(&bad.to_line()).unwrap();
        assert_eq!(v["status"], "1");
        assert_eq!(v["stage"], "fetch");
        assert!(v.get("layout").is_none());
        let back = DoneLine::parse(bad.to_line().as_bytes()).unwrap();
        assert_eq!(back, bad);
        assert!(!back.is_success());
    }

    #[test]
    fn a_legacy_line_parses_and_garbage_is_named() {
        let legacy = DoneLine::parse(br#"{"status":"0","message":"done"}"#).unwrap();
        assert!(legacy.is_success());
        assert_eq!(legacy.method, None);
        let err = DoneLine::parse(b"SSH-2.0-OpenSSH_9.2")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("not a done line") && err.contains("SSH-2.0"),
            "{err}"
        );
        let err = DoneLine::parse(br#"{"status":"1","message":"x","stage":"teleport"}"#)
            .unwrap_err()
            .to_string();
        assert!(err.contains("teleport"), "{err}");
    }
}
