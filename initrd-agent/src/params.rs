//! Build parameters, resolved the way the original image-creation initrd did:
//! a server tag `KEY=value` from the metadata server wins over the kernel
//! command line `KEY=value`, which wins over the built-in default.
//!
//! The keys, their defaults and what they do are the contract's
//! ([`contract::params`]), shared with the host that sets them. The
//! metadata server cannot be asked for `NO_METADATA` and `METADATA_IP`
//! (they decide whether and where to ask it), so those two come from the
//! command line alone.

use std::collections::BTreeMap;
use std::fmt;
use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use contract::params::{self as keys, EFI_SIZE, SIGNAL_BUILD_DONE_PORT, SIGNAL_FAILURE, VOLUME};

/// Where a parameter's value came from, for the log and for error messages.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Source {
    Tag,
    Cmdline,
    Default,
}

impl fmt::Display for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Source::Tag => "server tag",
            Source::Cmdline => "kernel command line",
            Source::Default => "default",
        })
    }
}

/// The kernel command line split into `KEY=value` pairs. Bare words (`quiet`)
/// map to an empty value. As in the kernel, a later occurrence wins, and a
/// value may be double-quoted to carry spaces.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Cmdline {
    pairs: BTreeMap<String, String>,
}

impl Cmdline {
    pub fn parse(text: &str) -> Self {
        let mut pairs = BTreeMap::new();
        for word in split_cmdline(text) {
            let (key, value) = match word.split_once('=') {
                Some((k, v)) => (k.to_string(), v.to_string()),
                None => (word.clone(), String::new()),
            };
            pairs.insert(key, value);
        }
        Cmdline { pairs }
    }

    /// Pairs given as `KEY=VALUE` strings (the `run` command's `--param`).
    pub fn from_pairs<'a>(pairs: impl IntoIterator<Item = &'a str>) -> Result<Self> {
        let mut map = BTreeMap::new();
        for pair in pairs {
            let Some((k, v)) = pair.split_once('=') else {
                bail!("parameter '{pair}' is not KEY=VALUE");
            };
            map.insert(k.to_string(), v.to_string());
        }
        Ok(Cmdline { pairs: map })
    }

    pub fn get(&self, key: &str) -> Option<&str> {
        self.pairs.get(key).map(String::as_str)
    }

    /// True when `key` is set to something other than `0`/empty.
    pub fn flag(&self, key: &str) -> bool {
        self.get(key).is_some_and(is_true)
    }
}

/// Splits a command line on whitespace, honouring double quotes like the
/// kernel's `next_arg()` (quotes are removed).
fn split_cmdline(text: &str) -> Vec<String> {
    let mut words = Vec::new();
    let mut current = String::new();
    let mut in_quotes = false;
    let mut has_word = false;
    for c in text.chars() {
        match c {
            '"' => {
                in_quotes = !in_quotes;
                has_word = true;
            }
            c if c.is_whitespace() && !in_quotes => {
                if has_word {
                    words.push(std::mem::take(&mut current));
                    has_word = false;
                }
            }
            c => {
                current.push(c);
                has_word = true;
            }
        }
    }
    if has_word {
        words.push(current);
    }
    words
}

fn is_true(value: &str) -> bool {
    !matches!(value.trim(), "" | "0" | "false" | "no")
}

/// Every parameter with its value and where that value came from.
#[derive(Clone, Debug, Default)]
pub struct Params {
    values: BTreeMap<String, (String, Source)>,
}

impl Params {
    /// Resolves every key found in any source. `tags` is `None` when the
    /// metadata server was not consulted. Tags that are not `KEY=value`
    /// (plain labels) are ignored; the first tag for a key wins.
    pub fn resolve(tags: Option<&[String]>, cmdline: &Cmdline) -> Self {
        let mut values = BTreeMap::new();
        for param in keys::ALL {
            if let Some(d) = param.default {
                values.insert(param.key.to_string(), (d.to_string(), Source::Default));
            }
        }
        for (key, value) in &cmdline.pairs {
            values.insert(key.clone(), (value.clone(), Source::Cmdline));
        }
        let mut from_tags = BTreeMap::new();
        for tag in tags.unwrap_or_default() {
            if let Some((k, v)) = tag.split_once('=') {
                from_tags.entry(k.to_string()).or_insert(v.to_string());
            }
        }
        for (key, value) in from_tags {
            values.insert(key, (value, Source::Tag));
        }
        Params { values }
    }

    pub fn get(&self, key: &str) -> Option<&str> {
        self.values.get(key).map(|(v, _)| v.as_str())
    }

    pub fn source(&self, key: &str) -> Option<Source> {
        self.values.get(key).map(|(_, s)| *s)
    }

    pub fn set(&mut self, key: &str, value: &str, source: Source) {
        self.values
            .insert(key.to_string(), (value.to_string(), source));
    }

    /// A parameter the current step cannot do without.
    pub fn required(&self, key: &str, needed_by: &str) -> Result<&str> {
        match self.get(key) {
            Some(v) if !v.is_empty() => Ok(v),
            _ => bail!(
                "parameter '{key}' is required by {needed_by}: set it as a server tag \
                 '{key}=...' or on the kernel command line"
            ),
        }
    }

    pub fn flag(&self, key: &str) -> bool {
        self.get(key).is_some_and(is_true)
    }

    /// The known parameters that are set, for the log: `key=value (source)`.
    /// Only known keys are listed so that unrelated kernel arguments and
    /// server tags do not flood the console.
    pub fn describe(&self) -> Vec<String> {
        keys::ALL
            .iter()
            .filter_map(|p| {
                let key = p.key;
                Some(format!("{key}={} ({})", self.get(key)?, self.source(key)?))
            })
            .collect()
    }

    /// `key`'s value, else its default (empty when it has none).
    fn value_or_default(&self, key: &str) -> &str {
        self.get(key)
            .or_else(|| keys::default_of(key))
            .unwrap_or_default()
    }

    /// The parameters every build needs, parsed and checked.
    pub fn common(&self) -> Result<CommonParams> {
        let port_text = self.value_or_default(SIGNAL_BUILD_DONE_PORT);
        let signal_port = parse_port(port_text)?;
        let efi_text = self.value_or_default(EFI_SIZE);
        let efi_size = parse_size(efi_text)
            .with_context(|| format!("efi_size='{efi_text}' is not a size; use e.g. 100M"))?;
        Ok(CommonParams {
            volume: PathBuf::from(self.value_or_default(VOLUME)),
            efi_size,
            signal_port,
            signal_failure: self.flag(SIGNAL_FAILURE),
        })
    }
}

/// Parameters shared by every build method.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CommonParams {
    pub volume: PathBuf,
    pub efi_size: u64,
    pub signal_port: u16,
    pub signal_failure: bool,
}

pub fn parse_port(text: &str) -> Result<u16> {
    match text.trim().parse::<u16>() {
        Ok(p) if p > 0 => Ok(p),
        _ => bail!("signal_build_done_port='{text}' is not a TCP port (1-65535)"),
    }
}

/// Parses `100M`, `1G`, `512K`, `4096` (bytes). Binary units, as parted and
/// sgdisk read them.
pub fn parse_size(text: &str) -> Result<u64> {
    let t = text.trim();
    let (digits, unit) = t.split_at(t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len()));
    let n: u64 = digits.parse().context("no number")?;
    let mult: u64 = match unit
        .to_ascii_uppercase()
        .trim_end_matches("IB")
        .trim_end_matches('B')
    {
        "" => 1,
        "K" => 1 << 10,
        "M" => 1 << 20,
        "G" => 1 << 30,
        "T" => 1 << 40,
        other => bail!("unknown unit '{other}'"),
    };
    n.checked_mul(mult).context("size overflows")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tags(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn tag_beats_cmdline_beats_default() {
        let cmd = Cmdline::parse("console=ttyS0 build_method=from-rootfs volume=/dev/vdb quiet");
        let t = tags(&["build_method=bogus", "web", "rootfs_url=http://x/r.tar"]);
        let p = Params::resolve(Some(&t), &cmd);
        assert_eq!(p.get("build_method"), Some("bogus"));
        assert_eq!(p.source("build_method"), Some(Source::Tag));
        assert_eq!(p.get("volume"), Some("/dev/vdb"));
        assert_eq!(p.source("volume"), Some(Source::Cmdline));
        assert_eq!(p.get("efi_size"), Some("100M"));
        assert_eq!(p.source("efi_size"), Some(Source::Default));
        assert_eq!(p.get("rootfs_url"), Some("http://x/r.tar"));
        assert_eq!(
            p.get("web"),
            None,
            "a tag without '=' is a label, not a parameter"
        );
    }

    #[test]
    fn without_metadata_the_cmdline_alone_counts() {
        let cmd = Cmdline::parse("build_method=from-qcow2 NO_METADATA=1");
        let p = Params::resolve(None, &cmd);
        assert_eq!(p.get("build_method"), Some("from-qcow2"));
        assert!(cmd.flag("NO_METADATA"));
        assert_eq!(p.get("signal_build_done_port"), Some("22"));
    }

    #[test]
    fn first_tag_wins_and_later_cmdline_wins() {
        let cmd = Cmdline::parse("volume=/dev/vda volume=/dev/vdc");
        let t = tags(&["efi_size=200M", "efi_size=300M"]);
        let p = Params::resolve(Some(&t), &cmd);
        assert_eq!(p.get("volume"), Some("/dev/vdc"));
        assert_eq!(p.get("efi_size"), Some("200M"));
    }

    #[test]
    fn quoted_cmdline_values_keep_spaces() {
        let cmd = Cmdline::parse(r#"a="x y" b=2  "c=3 4""#);
        assert_eq!(cmd.get("a"), Some("x y"));
        assert_eq!(cmd.get("b"), Some("2"));
        assert_eq!(cmd.get("c"), Some("3 4"));
    }

    #[test]
    fn required_names_the_key_and_how_to_set_it() {
        let p = Params::resolve(None, &Cmdline::default());
        let err = p
            .required("rootfs_url", "from-rootfs")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("rootfs_url") && err.contains("from-rootfs"),
            "{err}"
        );
        assert!(err.contains("server tag"), "{err}");
    }

    #[test]
    fn common_params_are_checked() {
        let p = Params::resolve(None, &Cmdline::parse("signal_build_done_port=70000"));
        assert!(p.common().unwrap_err().to_string().contains("70000"));
        let p = Params::resolve(None, &Cmdline::parse("efi_size=lots"));
        assert!(format!("{:#}", p.common().unwrap_err()).contains("efi_size='lots'"));
        let p = Params::resolve(None, &Cmdline::parse("efi_size=256M signal_failure=0"));
        let c = p.common().unwrap();
        assert_eq!(c.efi_size, 256 << 20);
        assert!(!c.signal_failure);
        assert_eq!(c.signal_port, 22);
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("100M").unwrap(), 100 << 20);
        assert_eq!(parse_size("1G").unwrap(), 1 << 30);
        assert_eq!(parse_size("2GiB").unwrap(), 2 << 30);
        assert_eq!(parse_size("4096").unwrap(), 4096);
        assert!(parse_size("12Q").is_err());
        assert!(parse_size("M").is_err());
    }
}
