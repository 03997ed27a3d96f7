//! Host library.

pub mod accel;
pub mod boot;
pub mod bootscript;
pub mod build;
pub mod done_signal;
pub mod guestfwd;
pub mod inspect;
pub mod interrupt;
pub mod kernel;
pub mod metadata_server;
pub mod provider;
pub mod qemu;
pub mod resources;
pub mod rootfs;
pub mod scaleway;
pub mod serve;
