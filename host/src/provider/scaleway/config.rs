//! Scaleway credentials and defaults, read the way the `scw` CLI reads them.
//!
//! Sources, strongest first:
//! 1. environment variables `SCW_SECRET_KEY`, `SCW_ACCESS_KEY`,
//!    `SCW_DEFAULT_PROJECT_ID`, `SCW_DEFAULT_ZONE`, `SCW_DEFAULT_REGION`,
//!    `SCW_API_URL`;
//! 2. the selected named profile under `profiles:` in the config file
//!    (selected by `SCW_PROFILE`, else the file's `active_profile`);
//! 3. the file's top-level keys (the "default" profile);
//! 4. built-in defaults: `api_url` [`DEFAULT_API_URL`], zone [`DEFAULT_ZONE`],
//!    region: the zone's (`fr-par-1` is in `fr-par`), as the scw CLI does.
//!
//! The file is `$SCW_CONFIG_PATH`, else `$XDG_CONFIG_HOME/scw/config.yaml`,
//! else `~/.config/scw/config.yaml`; a missing file is fine when the
//! environment supplies what is needed.
//!
//! The loader takes the file path and an environment lookup function
//! ([`Config::load_from`]) so that tests never touch the real HOME or
//! environment. The secret key is held in [`SecretKey`], whose `Debug` and
//! `Display` never show the value.
//!
//! YAML crate: `serde_yaml` is deprecated. `serde_yaml_ng` has had no release
//! since May 2024 and still depends on the archived `unsafe-libyaml`
//! (RUSTSEC-2024-0449); `serde-saphyr` needs Rust 1.89, above the workspace's
//! `rust-version`. `serde_norway` is a maintained fork with regular releases
//! that carries its own maintained libyaml port and keeps serde_yaml's API.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

use serde::Deserialize;

/// The API endpoint used when neither the file nor `SCW_API_URL` names one.
pub const DEFAULT_API_URL: &str = "https://api.scaleway.com";
/// The zone used when neither the file nor `SCW_DEFAULT_ZONE` names one.
pub const DEFAULT_ZONE: &str = "fr-par-1";

/// A Scaleway secret key. `Debug` and `Display` print a redacted marker, so
/// the value cannot leak through logs, errors or `{:?}` of a containing type.
#[derive(Clone, PartialEq, Eq)]
pub struct SecretKey(String);

impl SecretKey {
    /// Wraps a secret key value.
    pub fn new(value: impl Into<String>) -> Self {
        SecretKey(value.into())
    }

    /// The value itself, for the `X-Auth-Token` header only.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

const REDACTED: &str = "SCW...REDACTED";

impl fmt::Debug for SecretKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SecretKey({REDACTED})")
    }
}

impl fmt::Display for SecretKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(REDACTED)
    }
}

/// Resolved configuration: everything the API client needs.
#[derive(Clone, Debug)]
pub struct Config {
    /// The access key (an identifier, not a secret); informational only.
    pub access_key: Option<String>,
    pub secret_key: SecretKey,
    pub default_project_id: String,
    pub default_zone: String,
    /// The region of Object Storage (`fr-par`, `nl-ams`…): `default_region`,
    /// else the zone's region.
    pub default_region: String,
    pub api_url: String,
    /// The named profile that was applied, if any.
    pub profile: Option<String>,
    /// The config file that was read, if one existed.
    pub config_path: Option<PathBuf>,
}

/// Why the configuration could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("scaleway config: cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("scaleway config: {path} is not a valid scw config file: {message}")]
    Parse { path: PathBuf, message: String },
    #[error(
        "scaleway config: profile {name:?} (from {selected_by}) is not defined under `profiles:` in {path}"
    )]
    UnknownProfile {
        name: String,
        selected_by: &'static str,
        path: String,
    },
    #[error(
        "scaleway config: no secret key: set SCW_SECRET_KEY or `secret_key` in {path} (or in the selected profile)"
    )]
    MissingSecretKey { path: String },
    #[error(
        "scaleway config: no project id: set SCW_DEFAULT_PROJECT_ID or `default_project_id` in {path} (or in the selected profile)"
    )]
    MissingProjectId { path: String },
}

/// One profile's keys, as written in the file (all optional).
#[derive(Clone, Default, Deserialize)]
#[serde(default)]
struct ProfileKeys {
    access_key: Option<String>,
    secret_key: Option<String>,
    default_project_id: Option<String>,
    default_zone: Option<String>,
    default_region: Option<String>,
    api_url: Option<String>,
}

/// The file: the default profile's keys at top level, plus named profiles.
/// Unknown keys (`default_organization_id`, `default_region`, `send_telemetry`…)
/// are ignored.
#[derive(Default, Deserialize)]
#[serde(default)]
struct ConfigFile {
    #[serde(flatten)]
    default_profile: ProfileKeys,
    active_profile: Option<String>,
    profiles: BTreeMap<String, ProfileKeys>,
}

/// Where the scw CLI looks for its config file, given an environment lookup.
pub fn default_config_path(env: &dyn Fn(&str) -> Option<String>) -> Option<PathBuf> {
    if let Some(path) = non_empty(env("SCW_CONFIG_PATH")) {
        return Some(PathBuf::from(path));
    }
    if let Some(xdg) = non_empty(env("XDG_CONFIG_HOME")) {
        return Some(Path::new(&xdg).join("scw/config.yaml"));
    }
    non_empty(env("HOME")).map(|home| Path::new(&home).join(".config/scw/config.yaml"))
}

fn non_empty(value: Option<String>) -> Option<String> {
    value.filter(|v| !v.trim().is_empty())
}

impl Config {
    /// Loads from the real environment and the scw CLI's config file.
    pub fn load() -> Result<Config, ConfigError> {
        let env = |name: &str| std::env::var(name).ok();
        let path = default_config_path(&env);
        Config::load_from(path.as_deref(), &env)
    }

    /// Loads from `path` (a missing file counts as empty) and the variables
    /// that `env` returns.
    pub fn load_from(
        path: Option<&Path>,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Config, ConfigError> {
        let (file, config_path) = match path {
            Some(path) => match std::fs::read_to_string(path) {
                Ok(text) => (parse_file(path, &text)?, Some(path.to_path_buf())),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => (ConfigFile::default(), None),
                Err(source) => {
                    return Err(ConfigError::Read {
                        path: path.to_path_buf(),
                        source,
                    })
                }
            },
            None => (ConfigFile::default(), None),
        };
        let shown_path = path
            .map(|p| p.display().to_string())
            .unwrap_or_else(|| "~/.config/scw/config.yaml".to_string());

        let (profile_name, selected_by) = match non_empty(env("SCW_PROFILE")) {
            Some(name) => (Some(name), "SCW_PROFILE"),
            None => (non_empty(file.active_profile.clone()), "active_profile"),
        };
        let profile_name = profile_name.filter(|name| name != "default");
        let profile = match &profile_name {
            Some(name) => match file.profiles.get(name) {
                Some(profile) => profile.clone(),
                None => {
                    return Err(ConfigError::UnknownProfile {
                        name: name.clone(),
                        selected_by,
                        path: shown_path,
                    })
                }
            },
            None => ProfileKeys::default(),
        };
        let default = &file.default_profile;

        // env > selected profile > default profile keys.
        let pick = |var: &str, from_profile: &Option<String>, from_default: &Option<String>| {
            non_empty(env(var))
                .or_else(|| non_empty(from_profile.clone()))
                .or_else(|| non_empty(from_default.clone()))
        };
        let secret_key = pick("SCW_SECRET_KEY", &profile.secret_key, &default.secret_key)
            .ok_or_else(|| ConfigError::MissingSecretKey {
                path: shown_path.clone(),
            })?;
        let default_project_id = pick(
            "SCW_DEFAULT_PROJECT_ID",
            &profile.default_project_id,
            &default.default_project_id,
        )
        .ok_or_else(|| ConfigError::MissingProjectId {
            path: shown_path.clone(),
        })?;
        let access_key = pick("SCW_ACCESS_KEY", &profile.access_key, &default.access_key);
        let default_zone = pick(
            "SCW_DEFAULT_ZONE",
            &profile.default_zone,
            &default.default_zone,
        )
        .unwrap_or_else(|| DEFAULT_ZONE.to_string());
        let default_region = pick(
            "SCW_DEFAULT_REGION",
            &profile.default_region,
            &default.default_region,
        )
        .unwrap_or_else(|| region_of_zone(default_zone.trim()).to_string());
        let api_url = pick("SCW_API_URL", &profile.api_url, &default.api_url)
            .unwrap_or_else(|| DEFAULT_API_URL.to_string());

        Ok(Config {
            access_key,
            secret_key: SecretKey::new(secret_key.trim()),
            default_project_id: default_project_id.trim().to_string(),
            default_zone: default_zone.trim().to_string(),
            default_region: default_region.trim().to_string(),
            api_url: api_url.trim().trim_end_matches('/').to_string(),
            profile: profile_name,
            config_path,
        })
    }
}

/// The region a zone is in: the zone without its `-N` suffix (`fr-par-1` →
/// `fr-par`), as in scaleway-sdk-go's `Zone.Region`.
pub fn region_of_zone(zone: &str) -> &str {
    match zone.rsplit_once('-') {
        Some((region, number))
            if !number.is_empty() && number.bytes().all(|b| b.is_ascii_digit()) =>
        {
            region
        }
        _ => zone,
    }
}

fn parse_file(path: &Path, text: &str) -> Result<ConfigFile, ConfigError> {
    if text.trim().is_empty() {
        return Ok(ConfigFile::default());
    }
    // serde_norway's messages name a location and the expected type; they do
    // not quote string values, so the secret key cannot end up in them.
    serde_norway::from_str(text).map_err(|e| ConfigError::Parse {
        path: path.to_path_buf(),
        message: e.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    const FILE: &str = r#"
access_key: SCWDEFAULTACCESS
secret_key: 11111111-1111-1111-1111-111111111111
default_project_id: 22222222-2222-2222-2222-222222222222
default_organization_id: 22222222-2222-2222-2222-222222222222
default_region: fr-par
send_telemetry: false
profiles:
  work:
    secret_key: 33333333-3333-3333-3333-333333333333
    default_zone: nl-ams-1
  other:
    default_project_id: 44444444-4444-4444-4444-444444444444
    api_url: http://127.0.0.1:9/
"#;

    fn write_config(text: &str) -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.yaml");
        std::fs::write(&path, text).unwrap();
        (dir, path)
    }

    fn env_of(vars: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let vars: HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        move |name| vars.get(name).cloned()
    }

    #[test]
    fn default_profile_from_file_with_builtin_defaults() {
        let (_dir, path) = write_config(FILE);
        let config = Config::load_from(Some(&path), &env_of(&[])).unwrap();
        assert_eq!(
            config.secret_key.expose(),
            "11111111-1111-1111-1111-111111111111"
        );
        assert_eq!(
            config.default_project_id,
            "22222222-2222-2222-2222-222222222222"
        );
        assert_eq!(config.access_key.as_deref(), Some("SCWDEFAULTACCESS"));
        assert_eq!(config.default_zone, DEFAULT_ZONE);
        assert_eq!(config.api_url, DEFAULT_API_URL);
        assert_eq!(config.profile, None);
        assert_eq!(config.config_path.as_deref(), Some(path.as_path()));
    }

    #[test]
    fn active_profile_in_file_selects_a_named_profile() {
        let (_dir, path) = write_config(&format!("active_profile: work\n{FILE}"));
        let config = Config::load_from(Some(&path), &env_of(&[])).unwrap();
        assert_eq!(config.profile.as_deref(), Some("work"));
        // From the profile:
        assert_eq!(
            config.secret_key.expose(),
            "33333333-3333-3333-3333-333333333333"
        );
        assert_eq!(config.default_zone, "nl-ams-1");
        // Not in the profile, so from the default profile's keys:
        assert_eq!(
            config.default_project_id,
            "22222222-2222-2222-2222-222222222222"
        );
    }

    #[test]
    fn scw_profile_overrides_active_profile() {
        let (_dir, path) = write_config(&format!("active_profile: work\n{FILE}"));
        let config = Config::load_from(Some(&path), &env_of(&[("SCW_PROFILE", "other")])).unwrap();
        assert_eq!(config.profile.as_deref(), Some("other"));
        assert_eq!(
            config.default_project_id,
            "44444444-4444-4444-4444-444444444444"
        );
        assert_eq!(config.api_url, "http://127.0.0.1:9");
        assert_eq!(
            config.secret_key.expose(),
            "11111111-1111-1111-1111-111111111111"
        );
        assert_eq!(config.default_zone, DEFAULT_ZONE);
    }

    #[test]
    fn environment_overrides_the_file_and_the_profile() {
        let (_dir, path) = write_config(&format!("active_profile: work\n{FILE}"));
        let env = env_of(&[
            ("SCW_SECRET_KEY", "55555555-5555-5555-5555-555555555555"),
            ("SCW_ACCESS_KEY", "SCWENVACCESS"),
            (
                "SCW_DEFAULT_PROJECT_ID",
                "66666666-6666-6666-6666-666666666666",
            ),
            ("SCW_DEFAULT_ZONE", "pl-waw-2"),
            ("SCW_API_URL", "http://localhost:1234/"),
        ]);
        let config = Config::load_from(Some(&path), &env).unwrap();
        assert_eq!(
            config.secret_key.expose(),
            "55555555-5555-5555-5555-555555555555"
        );
        assert_eq!(config.access_key.as_deref(), Some("SCWENVACCESS"));
        assert_eq!(
            config.default_project_id,
            "66666666-6666-6666-6666-666666666666"
        );
        assert_eq!(config.default_zone, "pl-waw-2");
        assert_eq!(config.api_url, "http://localhost:1234");
    }

    #[test]
    fn environment_alone_is_enough_without_a_file() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("nope/config.yaml");
        let env = env_of(&[
            ("SCW_SECRET_KEY", "55555555-5555-5555-5555-555555555555"),
            (
                "SCW_DEFAULT_PROJECT_ID",
                "66666666-6666-6666-6666-666666666666",
            ),
        ]);
        let config = Config::load_from(Some(&missing), &env).unwrap();
        assert_eq!(config.config_path, None);
        assert_eq!(config.default_zone, DEFAULT_ZONE);
    }

    #[test]
    fn missing_secret_key_names_both_ways_to_set_it() {
        let (_dir, path) = write_config("default_project_id: p\n");
        let err = Config::load_from(Some(&path), &env_of(&[])).unwrap_err();
        assert!(matches!(err, ConfigError::MissingSecretKey { .. }));
        let text = err.to_string();
        assert!(text.contains("SCW_SECRET_KEY"), "{text}");
        assert!(text.contains("secret_key"), "{text}");
        assert!(text.contains(&path.display().to_string()), "{text}");
    }

    #[test]
    fn missing_project_id_names_both_ways_to_set_it() {
        let (_dir, path) = write_config("secret_key: s\n");
        let err = Config::load_from(Some(&path), &env_of(&[])).unwrap_err();
        let text = err.to_string();
        assert!(text.contains("SCW_DEFAULT_PROJECT_ID"), "{text}");
        assert!(text.contains("default_project_id"), "{text}");
    }

    #[test]
    fn unknown_profile_is_an_error_naming_its_source() {
        let (_dir, path) = write_config(FILE);
        let err = Config::load_from(Some(&path), &env_of(&[("SCW_PROFILE", "nope")])).unwrap_err();
        let text = err.to_string();
        assert!(
            text.contains("\"nope\"") && text.contains("SCW_PROFILE"),
            "{text}"
        );
    }

    #[test]
    fn region_comes_from_the_zone_unless_given() {
        assert_eq!(region_of_zone("fr-par-1"), "fr-par");
        assert_eq!(region_of_zone("nl-ams-3"), "nl-ams");
        assert_eq!(region_of_zone("it-mil"), "it-mil");
        let config = Config::load_from(
            None,
            &env_of(&[
                ("SCW_SECRET_KEY", "s"),
                ("SCW_DEFAULT_PROJECT_ID", "p"),
                ("SCW_DEFAULT_ZONE", "pl-waw-2"),
            ]),
        )
        .unwrap();
        assert_eq!(config.default_region, "pl-waw");
        let config = Config::load_from(
            None,
            &env_of(&[
                ("SCW_SECRET_KEY", "s"),
                ("SCW_DEFAULT_PROJECT_ID", "p"),
                ("SCW_DEFAULT_REGION", "nl-ams"),
            ]),
        )
        .unwrap();
        assert_eq!(config.default_region, "nl-ams");
    }

    #[test]
    fn config_path_follows_the_scw_cli() {
        let env = env_of(&[("HOME", "/home/u")]);
        assert_eq!(
            default_config_path(&env),
            Some(PathBuf::from("/home/u/.config/scw/config.yaml"))
        );
        let env = env_of(&[("HOME", "/home/u"), ("SCW_CONFIG_PATH", "/etc/scw.yaml")]);
        assert_eq!(
            default_config_path(&env),
            Some(PathBuf::from("/etc/scw.yaml"))
        );
    }

    #[test]
    fn secret_never_shows_in_debug_or_display() {
        let (_dir, path) = write_config(FILE);
        let config = Config::load_from(Some(&path), &env_of(&[])).unwrap();
        let secret = "11111111-1111-1111-1111-111111111111";
        let shown = format!("{config:?} {} {:?}", config.secret_key, config.secret_key);
        assert!(!shown.contains(secret), "{shown}");
        assert!(shown.contains("REDACTED"), "{shown}");
    }
}
