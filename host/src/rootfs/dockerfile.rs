//! `imgforge dockerfile`: multi-architecture Dockerfiles in the style of
//! image-tools' `docker-rules.mk`.
//!
//! A Dockerfile names its default base with an ordinary `FROM` line and the
//! bases for other architectures with commented alternatives after it:
//!
//! ```text
//! FROM scaleway/ubuntu:amd64-xenial
//! #FROM scaleway/ubuntu:armhf-xenial   # arch=armv7l
//! #FROM scaleway/ubuntu:arm64-xenial   # arch=arm64
//! ```
//!
//! For `--arch A` each `FROM` line is replaced by its first alternative
//! marked `arch=A` (architectures compare by their canonical names, so
//! `armv7l`, `armhf` and `arm` are one, as are `x86_64` and `amd64`), and
//! kept when it has none. Alternatives belong to the `FROM` line before them
//! (those before the first one, to the first), so multi-stage Dockerfiles
//! work stage by stage. A `# arch=...` marker on the chosen line is removed:
//! Docker does not allow comments after an instruction.

use std::sync::OnceLock;

use anyhow::{bail, Result};
use regex::Regex;
use serde::Serialize;

use super::oci::normalise_arch;

/// The Dockerfile for one architecture.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Selected {
    pub arch: String,
    /// The `FROM` lines in effect, in order.
    pub from: Vec<String>,
    pub dockerfile: String,
}

fn active_re() -> &'static Regex {
    static RE: OnceLock<Regex> = OnceLock::new();
    RE.get_or_init(|| {
        Regex::new(r"(?i)^\s*(FROM\s+[^#]*?)\s*(?:#\s*arch\s*=\s*(\S+)\s*)?$").unwrap()
    })
}

fn alternative_re() -> &'static Regex {
    static RE: OnceLock<Regex> = OnceLock::new();
    RE.get_or_init(|| {
        Regex::new(r"(?i)^\s*#\s*(FROM\s+[^#]*?)\s*#\s*arch\s*=\s*(\S+)\s*$").unwrap()
    })
}

/// Selects the `FROM` lines of `text` for `arch`.
pub fn select(text: &str, arch: &str) -> Result<Selected> {
    let want = normalise_arch(arch);
    let lines: Vec<&str> = text.split_inclusive('\n').collect();
    // Indexes of active FROM lines, and the alternatives of each.
    let mut actives: Vec<usize> = Vec::new();
    let mut alternatives: Vec<(usize, String, String)> = Vec::new(); // (group, FROM ..., arch)
    let mut pending: Vec<(String, String)> = Vec::new();
    for (i, raw) in lines.iter().enumerate() {
        let line = raw.trim_end_matches(['\n', '\r']);
        if let Some(c) = alternative_re().captures(line) {
            let alt = (c[1].to_string(), c[2].to_string());
            match actives.len() {
                0 => pending.push(alt),
                n => alternatives.push((n - 1, alt.0, alt.1)),
            }
        } else if active_re().is_match(line) {
            actives.push(i);
        }
    }
    if actives.is_empty() {
        bail!("the Dockerfile has no FROM line");
    }
    for (from, a) in pending {
        alternatives.push((0, from, a));
    }
    let mut out = String::with_capacity(text.len());
    let mut from = Vec::new();
    let mut group = 0;
    for (i, raw) in lines.iter().enumerate() {
        if actives.get(group) != Some(&i) {
            out.push_str(raw);
            continue;
        }
        let line = raw.trim_end_matches(['\n', '\r']);
        let eol = &raw[line.len()..];
        let c = active_re().captures(line).expect("matched before");
        let chosen = alternatives
            .iter()
            .find(|(g, _, a)| *g == group && normalise_arch(a) == want)
            .map(|(_, f, _)| f.clone());
        let selected = match chosen {
            Some(f) => f,
            None => {
                if let Some(a) = c.get(2) {
                    if normalise_arch(a.as_str()) != want {
                        tracing::warn!(
                            "line {}: no FROM for {arch}: keeping '{}' (marked arch={})",
                            i + 1,
                            &c[1],
                            a.as_str()
                        );
                    }
                }
                c[1].to_string()
            }
        };
        let indent = &line[..line.len() - line.trim_start().len()];
        out.push_str(indent);
        out.push_str(&selected);
        out.push_str(eol);
        from.push(selected);
        group += 1;
    }
    Ok(Selected {
        arch: want,
        from,
        dockerfile: out,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn picks_the_alternative_for_the_arch() {
        let df = "FROM ubuntu:amd64\n#FROM ubuntu:arm64 # arch=arm64\nRUN true\n";
        let s = select(df, "aarch64").unwrap();
        assert_eq!(
            s.dockerfile,
            "FROM ubuntu:arm64\n#FROM ubuntu:arm64 # arch=arm64\nRUN true\n"
        );
        assert_eq!(select(df, "amd64").unwrap().dockerfile, df);
        assert!(select("RUN true\n", "amd64").is_err());
    }
}
