//! Console logging. Every line carries the kernel's uptime (CLOCK_BOOTTIME),
//! like dmesg, so the agent's steps line up with the kernel's messages and
//! boot timings can be read straight off the serial console.

use std::fmt;
use std::time::Duration;

use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::time::FormatTime;
use tracing_subscriber::EnvFilter;

/// Time since the kernel booted.
pub fn uptime() -> Duration {
    nix::time::clock_gettime(nix::time::ClockId::CLOCK_BOOTTIME)
        .map(Duration::from)
        .unwrap_or_default()
}

struct Uptime;

impl FormatTime for Uptime {
    fn format_time(&self, w: &mut Writer<'_>) -> fmt::Result {
        let t = uptime();
        write!(w, "[{:5}.{:06}]", t.as_secs(), t.subsec_micros())
    }
}

/// Logs to stderr (the console when running as PID 1). `verbose` turns on
/// debug lines; `RUST_LOG` overrides both.
pub fn init(verbose: bool) {
    let default = if verbose { "debug" } else { "info" };
    let filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new(format!("{default},hyper=info,reqwest=info")));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_timer(Uptime)
        .with_target(false)
        .with_ansi(false)
        .with_writer(std::io::stderr)
        .try_init();
}
