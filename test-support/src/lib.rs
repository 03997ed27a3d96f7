//! Test fixtures shared by imgforge's crates: real servers bound to
//! 127.0.0.1 that a test starts, drives (files to serve, faults to inject)
//! and inspects (the requests they saw). They are for tests and benchmarks
//! only, as dev-dependencies, and never ship in `imgforge` or the agent.
//! A fixture speaks the real protocol on a real loopback socket, so the code
//! under test runs its real client end to end; it is not a mock of a remote
//! service and does not imitate any service's API (the fake Scaleway API
//! lives in the `tests` crate).
//!
//! Fixtures: `http_fixture`, a file server with fault injection;
//! `s3_server`, a real S3 server (moto's server mode, a PyPI tool listed in
//! `scripts/tools.list`) and a pass-through in front of it that fails or
//! holds part uploads.
//!
//! This crate depends on no imgforge crate, so that a crate's unit tests can
//! use it without compiling the host.

pub mod http_fixture;
pub mod s3_server;
