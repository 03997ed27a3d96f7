//! Progress: the agent's `state_detail` on the metadata service, and the
//! stages a build goes through (also named in a failed build's done line).
//!
//! | text | meaning |
//! |---|---|
//! | `kernel-started` | the initrd's agent is up and can reach the metadata service |
//! | `booted` | the agent has read its parameters |
//! | `building: <stage> <percent>` | the build method is in `<stage>` |
//! | `done` | the volume is written; the done line follows |
//! | `failed: <message>` | the build ended in an error; the done line follows unless `signal_failure=0` |
//!
//! Anything else (a cloud's own states, a helper script's `helper: ...`) is
//! [`StateDetail::Other`]: shown to the user, never a decision.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::ParseError;

/// Where in a build the agent is, or where it failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Stage {
    /// Reading the metadata service.
    Metadata,
    /// Bringing up the network (DHCP, `ip=`).
    Network,
    /// Resolving and checking the parameters.
    Params,
    /// Partitioning or opening the volume.
    Disk,
    /// Making filesystems.
    Fs,
    /// Downloading (and checking) the rootfs or disk image.
    Fetch,
    /// Unpacking the rootfs onto the new filesystem.
    Extract,
    /// Writing a disk image onto the volume.
    Write,
    /// Writing /etc/fstab.
    Fstab,
    /// Installing GRUB into the EFI system partition.
    Bootloader,
    /// Growing the last partition and its filesystem (`grow_fs`).
    Grow,
    /// Unmounting and flushing.
    Finish,
    /// The agent itself (a panic, a task that ended): a bug.
    Agent,
}

impl Stage {
    pub const ALL: [Stage; 13] = [
        Stage::Metadata,
        Stage::Network,
        Stage::Params,
        Stage::Disk,
        Stage::Fs,
        Stage::Fetch,
        Stage::Extract,
        Stage::Write,
        Stage::Fstab,
        Stage::Bootloader,
        Stage::Grow,
        Stage::Finish,
        Stage::Agent,
    ];

    pub const fn as_str(self) -> &'static str {
        match self {
            Stage::Metadata => "metadata",
            Stage::Network => "network",
            Stage::Params => "params",
            Stage::Disk => "disk",
            Stage::Fs => "fs",
            Stage::Fetch => "fetch",
            Stage::Extract => "extract",
            Stage::Write => "write",
            Stage::Fstab => "fstab",
            Stage::Bootloader => "bootloader",
            Stage::Grow => "grow",
            Stage::Finish => "finish",
            Stage::Agent => "agent",
        }
    }
}

impl fmt::Display for Stage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Stage {
    type Err = ParseError;

    fn from_str(s: &str) -> Result<Self, ParseError> {
        Stage::ALL
            .into_iter()
            .find(|stage| stage.as_str() == s)
            .ok_or_else(|| ParseError::new(format!("unknown build stage '{s}'")))
    }
}

/// One `state_detail` value.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StateDetail {
    KernelStarted,
    Booted,
    Building {
        stage: Stage,
        percent: u8,
    },
    Done,
    Failed(String),
    /// Text that is not the agent's (see the module's doc).
    Other(String),
}

impl StateDetail {
    /// `done` or `failed: ...`: the agent has finished and its done line
    /// is (or should be) on the done port.
    pub fn is_end(&self) -> bool {
        matches!(self, StateDetail::Done | StateDetail::Failed(_))
    }
}

impl fmt::Display for StateDetail {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StateDetail::KernelStarted => f.write_str("kernel-started"),
            StateDetail::Booted => f.write_str("booted"),
            StateDetail::Building { stage, percent } => write!(f, "building: {stage} {percent}"),
            StateDetail::Done => f.write_str("done"),
            StateDetail::Failed(message) => write!(f, "failed: {message}"),
            StateDetail::Other(text) => f.write_str(text),
        }
    }
}

impl FromStr for StateDetail {
    type Err = std::convert::Infallible;

    /// Never fails: what is not the agent's is [`StateDetail::Other`].
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let building = |rest: &str| -> Option<StateDetail> {
            let (stage, percent) = rest.split_once(' ')?;
            let percent: u8 = percent.parse().ok().filter(|p| *p <= 100)?;
            Some(StateDetail::Building {
                stage: stage.parse().ok()?,
                percent,
            })
        };
        Ok(match s {
            "kernel-started" => StateDetail::KernelStarted,
            "booted" => StateDetail::Booted,
            "done" => StateDetail::Done,
            _ => {
                if let Some(message) = s.strip_prefix("failed: ") {
                    StateDetail::Failed(message.to_owned())
                } else if let Some(detail) = s.strip_prefix("building: ").and_then(building) {
                    detail
                } else {
                    StateDetail::Other(s.to_owned())
                }
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> StateDetail {
        s.parse().unwrap()
    }

    #[test]
    fn every_value_round_trips_through_its_text() {
        let mut values = vec![
            StateDetail::KernelStarted,
            StateDetail::Booted,
            StateDetail::Done,
            StateDetail::Failed("rootfs_url answered 404".into()),
            StateDetail::Other("helper: fetching initrd-agent".into()),
        ];
        for stage in Stage::ALL {
            values.push(StateDetail::Building { stage, percent: 0 });
            values.push(StateDetail::Building {
                stage,
                percent: 100,
            });
        }
        for value in values {
            assert_eq!(parse(&value.to_string()), value, "{value}");
        }
    }

    #[test]
    fn texts_of_the_wire() {
        assert_eq!(
            parse("building: fetch 40"),
            StateDetail::Building {
                stage: Stage::Fetch,
                percent: 40
            }
        );
        assert_eq!(parse("failed: x: y"), StateDetail::Failed("x: y".into()));
        // A cloud's own words, or a malformed building line, are not ours.
        for other in [
            "booting kernel",
            "building: fetch",
            "building: fetch 101",
            "building: teleport 5",
            "failed",
            "",
        ] {
            assert_eq!(parse(other), StateDetail::Other(other.into()), "{other:?}");
        }
    }

    #[test]
    fn done_and_failed_end_the_build() {
        assert!(parse("done").is_end());
        assert!(parse("failed: boom").is_end());
        assert!(!parse("building: finish 100").is_end());
        assert!(!parse("helper: fetching initrd-agent").is_end());
    }

    #[test]
    fn stages_round_trip_and_unknown_ones_are_named() {
        for stage in Stage::ALL {
            assert_eq!(stage.as_str().parse::<Stage>().unwrap(), stage);
            let json = serde_json::to_string(&stage).unwrap();
            assert_eq!(json, format!("\"{stage}\""));
        }
        let err = "teleport".parse::<Stage>().unwrap_err().to_string();
        assert!(err.contains("'teleport'"), "{err}");
    }
}
