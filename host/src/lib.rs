//! Host library.

pub mod accel;
pub mod boot;
pub mod bootscript;
pub mod done_signal;
pub mod guestfwd;
pub mod interrupt;
pub mod kernel;
pub mod metadata_server;
pub mod qemu;
pub mod rootfs;
pub mod serve;
