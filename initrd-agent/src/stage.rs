//! Errors with the stage they happened in. Every stage of the agent returns
//! [`StageError`]; one place ([`crate::report::finish`], the end of every
//! run) turns it into the failed build's done line. The stage names are the
//! contract's ([`contract::Stage`]): the host shows them.

use anyhow::Result;
use contract::{DoneLine, Stage};

/// An error with the stage it happened in.
#[derive(Debug)]
pub struct StageError {
    pub stage: Stage,
    pub error: anyhow::Error,
}

/// `.stage(Stage::Fetch)?` on any `anyhow::Result`.
pub trait StageContext<T> {
    fn stage(self, stage: Stage) -> Result<T, StageError>;
}

impl<T> StageContext<T> for Result<T> {
    fn stage(self, stage: Stage) -> Result<T, StageError> {
        self.map_err(|error| StageError { stage, error })
    }
}

impl StageError {
    pub fn to_done_line(&self) -> DoneLine {
        DoneLine::failure(self.stage, format!("{:#}", self.error))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_done_line_carries_the_stage_and_the_whole_chain() {
        let err: Result<()> = Err(anyhow::anyhow!("404").context("rootfs_url http://x/r.tar"));
        let line = err.stage(Stage::Fetch).unwrap_err().to_done_line();
        assert!(!line.is_success());
        assert_eq!(line.stage, Some(Stage::Fetch));
        assert_eq!(line.message, "rootfs_url http://x/r.tar: 404");
    }
}
