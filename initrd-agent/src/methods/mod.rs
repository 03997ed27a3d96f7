//! Build methods: how the volume gets written. The name comes from the
//! `build_method` parameter.

use std::fmt;
use std::str::FromStr;

use anyhow::bail;

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
