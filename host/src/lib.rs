//! imgforge, the host side: builds root filesystems and initrds, serves artifacts, drives a
//! provider (local QEMU or Scaleway) through a build, and tests what it built.
//!
//! | module | job |
//! |---|---|
//! | [`build`] | `imgforge build`: a pure [`plan`](build::plan) (strategy, input, tags), then the build server's lifecycle |
//! | [`provider`] | the `Provider` trait; `local/` (QEMU, state store, metadata) and `scaleway/` |
//! | [`local::qemu`](provider::local::qemu), [`accel`](provider::local::accel), [`guestfwd`](provider::local::guestfwd), [`metadata_server`](provider::local::metadata_server) | QEMU command lines, KVM or TCG, guest forwards, the Scaleway-format metadata API |
//! | [`scaleway::api`](provider::scaleway::api), [`client`](provider::scaleway::client), [`config`](provider::scaleway::config) | Scaleway API client and configuration |
//! | [`push`], [`object_storage`], [`scaleway::push`](provider::scaleway::push) | `image push`: a local image to a Scaleway image through Object Storage (S3 multipart) and the Block API import |
//! | [`resources`] | `server`/`snapshot`/`image`/`cleanup` commands, one call each |
//! | [`rootfs`] | `imgforge rootfs`: sources to a normalised tarball (`debian:` profiles) |
//! | [`bootscript`], [`kernel`] | the image-creation initrd and its kernel from Debian |
//! | [`serve`] | the artifact server build servers download from |
//! | [`done_signal`], [`helper_script`] | polling the agent's done line; the helper server's cloud-init script |
//!
//! What crosses to the agent (parameters, `state_detail`, the done line) is
//! defined in the `contract` crate; byte formats both read, in `formats`.
//! | [`boot`], [`server_test`], [`ssh`] | boot tests: console (`boot`), SSH login and cloud-init (`boot --ssh`), `server ssh` |
//! | [`inspect`], [`readiness`] | offline disk inspection; what a root filesystem lacks as a server |
//! | [`arch`], [`tools`], [`size`], [`interrupt`] | architecture names; external tools and their install commands; sizes; Ctrl-C cleanup |

pub mod arch;
pub mod boot;
pub mod bootscript;
pub mod build;
pub mod done_signal;
pub mod helper_script;
pub mod inspect;
pub mod interrupt;
pub mod kernel;
pub mod object_storage;
pub mod provider;
pub mod push;
pub mod readiness;
pub mod resources;
pub mod rootfs;
pub mod serve;
pub mod server_test;
pub mod size;
pub mod ssh;
pub mod tools;
