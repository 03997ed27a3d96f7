//! Which API a volume, a snapshot or an image root lives in, and which
//! marketplace image a label stands for: the pure decisions behind the
//! provider's routing between the Instance API (`l_ssd` volumes and their
//! snapshots) and the Block API (`sbs_volume` volumes, `sbs_snapshot`
//! snapshots), reference §2.1, §2.4, §3 and §7.
//!
//! The real Instance API answers 404 for a Block id (and the Block API for
//! an Instance id), so a 404 from one API says nothing about the other: an
//! id of unknown family is looked up in both ([`lookup_order`]), and only a
//! 404 from both means it is gone.

use anyhow::{bail, Result};
use serde::Deserialize;

/// The API that holds a volume or a snapshot.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Family {
    /// Instance API: `l_ssd` (and `scratch`) volumes and their snapshots.
    Instance,
    /// Block API: `sbs_volume` volumes, `sbs_snapshot` snapshots.
    Block,
}

impl Family {
    /// The family of an Instance `volume_type` (a server's volume, a
    /// snapshot's or an image root's): `sbs_volume` and `sbs_snapshot` (and
    /// the Block API's own `sbs_5k`/`sbs_15k`) are Block, the rest Instance;
    /// `None` when the type is not given.
    pub fn of_type(volume_type: Option<&str>) -> Option<Family> {
        let t = volume_type.filter(|t| !t.is_empty())?;
        Some(if t.starts_with("sbs_") {
            Family::Block
        } else {
            Family::Instance
        })
    }

    pub fn other(self) -> Family {
        match self {
            Family::Instance => Family::Block,
            Family::Block => Family::Instance,
        }
    }
}

/// The volume type of the volumes this provider creates
/// (`--scw-volume-type`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum VolumeType {
    /// Local SSD, Instance API; needed by commercial types without Block
    /// Storage, gone with the server at `terminate`.
    LSsd,
    /// Block Storage (SBS), the API's default root since 2025.
    #[default]
    SbsVolume,
}

impl VolumeType {
    /// The value of `volume_type` in POST /servers.
    pub fn as_str(self) -> &'static str {
        match self {
            VolumeType::LSsd => "l_ssd",
            VolumeType::SbsVolume => "sbs_volume",
        }
    }

    pub fn parse(text: &str) -> Result<VolumeType> {
        Ok(match text {
            "l_ssd" => VolumeType::LSsd,
            "sbs_volume" => VolumeType::SbsVolume,
            other => bail!("unknown Scaleway volume type {other:?}: l_ssd or sbs_volume"),
        })
    }

    pub fn family(self) -> Family {
        match self {
            VolumeType::LSsd => Family::Instance,
            VolumeType::SbsVolume => Family::Block,
        }
    }

    /// The volume type for a volume copied from a snapshot of `family`: a
    /// volume stays in its snapshot's API.
    pub fn of_snapshot(family: Family) -> VolumeType {
        match family {
            Family::Instance => VolumeType::LSsd,
            Family::Block => VolumeType::SbsVolume,
        }
    }

    /// The marketplace local-image `type` for a server whose root volume is
    /// of this type (what sdk-go sends): `instance_sbs` or `instance_local`.
    pub fn marketplace_type(self) -> &'static str {
        match self {
            VolumeType::LSsd => "instance_local",
            VolumeType::SbsVolume => "instance_sbs",
        }
    }
}

/// The volume type of a new blank volume: bootscript servers (the legacy
/// API, before SBS) keep `l_ssd`; the others take the configured type.
pub fn blank_volume_type(bootscript: bool, configured: VolumeType) -> VolumeType {
    if bootscript {
        VolumeType::LSsd
    } else {
        configured
    }
}

/// Which API to ask first about an id whose family is unknown: the one of
/// the configured volume type (where most ids are), then the other.
pub fn lookup_order(configured: VolumeType) -> [Family; 2] {
    let first = configured.family();
    [first, first.other()]
}

/// An image reference that is an id (a UUID), not a marketplace label.
pub fn is_image_id(image: &str) -> bool {
    let bytes = image.as_bytes();
    bytes.len() == 36
        && bytes.iter().enumerate().all(|(i, b)| match i {
            8 | 13 | 18 | 23 => *b == b'-',
            _ => b.is_ascii_hexdigit(),
        })
}

/// One item of `GET /marketplace/v2/local-images`.
#[derive(Clone, Debug, Deserialize)]
pub struct LocalImage {
    pub id: String,
    #[serde(default)]
    pub label: String,
    /// `instance_local` or `instance_sbs`.
    #[serde(rename = "type", default)]
    pub kind: String,
    pub zone: Option<String>,
    pub arch: Option<String>,
    #[serde(default)]
    pub compatible_commercial_types: Vec<String>,
}

/// The local image a label stands for, as sdk-go picks it: the label's
/// image of `kind` in `zone`, preferring one that lists `commercial_type`
/// among its compatible types.
pub fn pick_local_image<'a>(
    images: &'a [LocalImage],
    label: &str,
    zone: &str,
    kind: &str,
    commercial_type: &str,
) -> Result<&'a LocalImage> {
    let candidates: Vec<&LocalImage> = images
        .iter()
        .filter(|i| i.label == label && i.kind == kind)
        .filter(|i| i.zone.as_deref().is_none_or(|z| z == zone))
        .collect();
    if let Some(compatible) = candidates.iter().find(|i| {
        i.compatible_commercial_types
            .iter()
            .any(|t| t == commercial_type)
    }) {
        return Ok(compatible);
    }
    match candidates.first() {
        Some(any) => Ok(any),
        None => {
            let kinds: Vec<&str> = images
                .iter()
                .filter(|i| i.label == label)
                .map(|i| i.kind.as_str())
                .collect();
            if kinds.is_empty() {
                bail!("the marketplace has no image labelled {label:?} in zone {zone}")
            }
            bail!(
                "the marketplace image {label:?} has no {kind} variant in zone {zone} (only {}): \
                 choose the other --scw-volume-type",
                kinds.join(", ")
            )
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn families_follow_the_volume_type() {
        assert_eq!(Family::of_type(Some("sbs_volume")), Some(Family::Block));
        assert_eq!(Family::of_type(Some("sbs_snapshot")), Some(Family::Block));
        assert_eq!(Family::of_type(Some("sbs_5k")), Some(Family::Block));
        assert_eq!(Family::of_type(Some("l_ssd")), Some(Family::Instance));
        assert_eq!(Family::of_type(Some("scratch")), Some(Family::Instance));
        assert_eq!(Family::of_type(Some("")), None);
        assert_eq!(Family::of_type(None), None);
    }

    #[test]
    fn volume_types_parse_and_map() {
        assert_eq!(VolumeType::default(), VolumeType::SbsVolume);
        for t in [VolumeType::LSsd, VolumeType::SbsVolume] {
            assert_eq!(VolumeType::parse(t.as_str()).unwrap(), t);
            assert_eq!(Family::of_type(Some(t.as_str())), Some(t.family()));
        }
        assert!(VolumeType::parse("b_ssd").is_err());
        assert_eq!(VolumeType::SbsVolume.marketplace_type(), "instance_sbs");
        assert_eq!(VolumeType::LSsd.marketplace_type(), "instance_local");
        assert_eq!(
            VolumeType::of_snapshot(Family::Block),
            VolumeType::SbsVolume
        );
        assert_eq!(
            blank_volume_type(true, VolumeType::SbsVolume),
            VolumeType::LSsd
        );
        assert_eq!(
            blank_volume_type(false, VolumeType::SbsVolume),
            VolumeType::SbsVolume
        );
    }

    #[test]
    fn unknown_ids_are_looked_up_where_most_are_first() {
        assert_eq!(
            lookup_order(VolumeType::SbsVolume),
            [Family::Block, Family::Instance]
        );
        assert_eq!(
            lookup_order(VolumeType::LSsd),
            [Family::Instance, Family::Block]
        );
    }

    #[test]
    fn ids_are_not_labels() {
        assert!(is_image_id("0b1c2d3e-4f50-6172-8394-a5b6c7d8e9f0"));
        assert!(!is_image_id("debian_bookworm"));
        assert!(!is_image_id("0b1c2d3e-4f50-6172-8394-a5b6c7d8e9f"));
    }

    fn local(id: &str, label: &str, kind: &str, types: &[&str]) -> LocalImage {
        LocalImage {
            id: id.into(),
            label: label.into(),
            kind: kind.into(),
            zone: Some("fr-par-1".into()),
            arch: Some("x86_64".into()),
            compatible_commercial_types: types.iter().map(|t| t.to_string()).collect(),
        }
    }

    #[test]
    fn labels_resolve_by_root_volume_type() {
        let images = [
            local("a", "debian_bookworm", "instance_local", &["DEV1-S"]),
            local("b", "debian_bookworm", "instance_sbs", &["GP1-S"]),
            local("c", "debian_bookworm", "instance_sbs", &["DEV1-S"]),
            local("d", "ubuntu_noble", "instance_sbs", &["DEV1-S"]),
        ];
        let pick = |kind, ct| {
            pick_local_image(&images, "debian_bookworm", "fr-par-1", kind, ct).map(|i| &i.id)
        };
        assert_eq!(pick("instance_local", "DEV1-S").unwrap(), "a");
        assert_eq!(pick("instance_sbs", "DEV1-S").unwrap(), "c");
        assert_eq!(pick("instance_sbs", "GP1-S").unwrap(), "b");
        // No compatible one listed: the first of the kind.
        assert_eq!(pick("instance_sbs", "PRO2-XS").unwrap(), "b");
        let only_sbs = &images[1..];
        let err = pick_local_image(
            only_sbs,
            "debian_bookworm",
            "fr-par-1",
            "instance_local",
            "",
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("--scw-volume-type"), "{err}");
        let err = pick_local_image(&images, "nope", "fr-par-1", "instance_sbs", "")
            .unwrap_err()
            .to_string();
        assert!(err.contains("no image labelled"), "{err}");
        let err = pick_local_image(&images, "debian_bookworm", "nl-ams-1", "instance_sbs", "")
            .unwrap_err()
            .to_string();
        assert!(err.contains("nl-ams-1"), "{err}");
    }
}
