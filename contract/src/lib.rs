//! The contract between the host (`imgforge`) and the agent
//! (`initrd-agent`), defined once so that drift is a compile error.
//!
//! The agent runs in a build server; the host cannot call it, only read
//! what it publishes and set what it reads. Everything that crosses that
//! line is here:
//!
//! | what | direction | where it travels | module |
//! |---|---|---|---|
//! | build parameters (`KEY=value`) | host → agent | server tags, kernel command line | [`params`] |
//! | the build method's name | host → agent | the `build_method` parameter | [`method`] |
//! | progress (`booted`, `building: fetch 40`, `done`, `failed: ...`) | agent → host | the metadata service's `state_detail` | [`state`] |
//! | the result (one JSON line) | agent → host | TCP, the `signal_build_done_port` | [`done_line`] |
//!
//! This crate holds data and its text forms only: no I/O, no async, and no
//! dependency but serde, because the agent links it into a small static
//! binary. Parsing here is strict where a typo would silently change a build
//! (method names) and lenient where the other side may say more than this
//! version knows (state_detail text a cloud or a helper script writes).

pub mod done_line;
pub mod method;
pub mod params;
pub mod state;

pub use done_line::{DoneLine, LayoutEntry};
pub use method::Method;
pub use state::{Stage, StateDetail};

/// A text form that is not one of the contract's values; says what was
/// read and what would have been accepted.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ParseError {
    message: String,
}

impl ParseError {
    fn new(message: String) -> Self {
        ParseError { message }
    }
}

impl std::fmt::Display for ParseError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for ParseError {}
