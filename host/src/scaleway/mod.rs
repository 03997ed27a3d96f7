//! Scaleway Instance API v1: configuration, an HTTP client that rides out
//! rate limits and transient failures without duplicating creations, and the
//! typed calls the Scaleway provider needs (servers, volumes, snapshots,
//! images, user data) plus waiters for their states.
//!
//! API facts come from `shared/reference/scaleway-api.md` (sections 1 and 2).

pub mod api;
pub mod client;
pub mod config;

#[cfg(test)]
mod tests;

pub use api::{
    Image, ImageState, Server, ServerAction, ServerState, Snapshot, SnapshotState, Volume,
};
pub use client::{ApiError, Client, ClientOptions, Error, RetryPolicy};
pub use config::{Config, ConfigError, SecretKey};
