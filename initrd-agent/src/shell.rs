//! The debugging shell of a build server (`INITRD_PRE_SHELL`,
//! `POST_BUILD_SHELL`): an interactive shell on the console, before or
//! after the build.

use std::path::Path;

use tracing::{error, info, warn};

/// Runs an interactive shell on the console and waits for it to exit
/// (`INITRD_PRE_SHELL` / `POST_BUILD_SHELL`, for debugging a build server).
/// The default initrd carries no shell: add `busybox` to the bootscript's
/// initrd tools for one.
pub fn debug_shell(why: &str) {
    let shell = ["/bin/sh", "/usr/bin/busybox", "/bin/busybox"]
        .into_iter()
        .find(|p| Path::new(p).is_file());
    let Some(shell) = shell else {
        warn!(
            "{why} is set but this initrd has no shell: add busybox to the bootscript's initrd tools \
             (busybox-static) and rebuild it with `imgforge initrd`; continuing without a shell"
        );
        return;
    };
    info!("{why}: starting {shell} on the console; exit the shell to continue");
    let mut cmd = std::process::Command::new(shell);
    if shell.ends_with("busybox") {
        cmd.arg("sh");
    }
    match cmd.status() {
        Ok(status) => info!("{why}: shell exited ({status})"),
        Err(e) => error!("{why}: cannot start {shell}: {e}"),
    }
}
