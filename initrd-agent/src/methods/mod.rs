//! Build methods: how the volume gets written. The name comes from the
//! `build_method` parameter; each method is one file implementing
//! [`BuildMethod`], and [`run`] drives the three steps.

mod from_qcow2;
mod from_rootfs;
mod rootfs_stream;
mod unpartitioned_from_rootfs;

use std::fmt;
use std::str::FromStr;

use anyhow::bail;

use crate::agent::StageError;
use crate::metadata::MetadataClient;
use crate::params::{CommonParams, Params};
use crate::signal::LayoutEntry;

/// The build methods of the original image-creation initrd (its `custom`
/// method, which ran a downloaded script, is deliberately not offered).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MethodName {
    FromRootfs,
    UnpartitionedFromRootfs,
    FromQcow2,
}

impl MethodName {
    pub const ALL: [MethodName; 3] = [
        MethodName::FromRootfs,
        MethodName::UnpartitionedFromRootfs,
        MethodName::FromQcow2,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            MethodName::FromRootfs => "from-rootfs",
            MethodName::UnpartitionedFromRootfs => "unpartitioned-from-rootfs",
            MethodName::FromQcow2 => "from-qcow2",
        }
    }

    fn valid_list() -> String {
        MethodName::ALL.map(MethodName::as_str).join(", ")
    }
}

impl fmt::Display for MethodName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for MethodName {
    type Err = anyhow::Error;

    fn from_str(s: &str) -> anyhow::Result<Self> {
        match MethodName::ALL.into_iter().find(|m| m.as_str() == s) {
            Some(m) => Ok(m),
            None if s == "custom" => bail!(
                "build_method 'custom' (run a downloaded script) is not supported; \
                 valid methods: {}",
                MethodName::valid_list()
            ),
            None => bail!(
                "unknown build_method '{s}'; valid methods: {}",
                MethodName::valid_list()
            ),
        }
    }
}

/// What every method gets: the parameters, the async runtime (methods run
/// on a blocking thread; network I/O and state reports go through the
/// runtime) and the metadata client for progress reports.
pub struct BuildContext {
    pub params: Params,
    pub common: CommonParams,
    pub runtime: tokio::runtime::Handle,
    pub metadata: Option<MetadataClient>,
}

impl BuildContext {
    /// Reports `building: <stage> <percent>` without waiting for it.
    pub fn report(&self, stage: &str, percent: u8) {
        if let Some(md) = self.metadata.clone() {
            let detail = format!("building: {stage} {percent}");
            self.runtime
                .spawn(async move { md.report_state(&detail).await });
        }
    }
}

/// What a successful build method hands back for the done line.
pub struct MethodOutcome {
    /// Bytes fetched from the network (the compressed size).
    pub bytes: u64,
    pub layout: Vec<LayoutEntry>,
}

/// One build method. The steps run in order on a blocking thread; an error
/// in any step ends the build (mounts are undone by their guards).
pub trait BuildMethod {
    /// Checks parameters and the volume before anything is written.
    fn pre_build(&mut self, ctx: &BuildContext) -> Result<(), StageError>;
    /// Writes the volume.
    fn build(&mut self, ctx: &BuildContext) -> Result<(), StageError>;
    /// Unmounts, flushes, and describes the result.
    fn post_build(&mut self, ctx: &BuildContext) -> Result<MethodOutcome, StageError>;
}

/// Runs `method` to the end. Blocking: call it from `spawn_blocking`.
pub fn run(method: MethodName, ctx: &BuildContext) -> Result<MethodOutcome, StageError> {
    let mut m: Box<dyn BuildMethod> = match method {
        MethodName::FromRootfs => Box::new(from_rootfs::FromRootfs::default()),
        MethodName::UnpartitionedFromRootfs => {
            Box::new(unpartitioned_from_rootfs::UnpartitionedFromRootfs::default())
        }
        MethodName::FromQcow2 => Box::new(from_qcow2::FromQcow2::default()),
    };
    m.pre_build(ctx)?;
    m.build(ctx)?;
    m.post_build(ctx)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_errors_list_the_valid_ones() {
        for m in MethodName::ALL {
            assert_eq!(m.as_str().parse::<MethodName>().unwrap(), m);
        }
        let err = "bogus".parse::<MethodName>().unwrap_err().to_string();
        assert!(err.contains("'bogus'"), "{err}");
        for m in MethodName::ALL {
            assert!(err.contains(m.as_str()), "{err}");
        }
    }
}
