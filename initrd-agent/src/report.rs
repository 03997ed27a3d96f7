//! The end of every run, the initrd's and the `run` command's: the result
//! becomes the done line (an error with its stage becomes a failure line
//! here and nowhere else), goes to the metadata server as `state_detail`,
//! and leaves the agent as [`Delivery`] says.

use std::net::IpAddr;

use anyhow::Context;
use tracing::{error, info};

use contract::params::{INITRD_DONE_PORT, SIGNAL_BUILD_DONE_PORT, SIGNAL_FAILURE};
use contract::{DoneLine, StateDetail};

use crate::metadata::MetadataClient;
use crate::params::{self, Cmdline, Params};
use crate::signal;
use crate::stage::StageError;

/// How the done line leaves the agent: what differs between the initrd and
/// the `run` command.
pub struct Delivery {
    /// Print the done line on stdout (the `run` command's caller reads it).
    pub print: bool,
    /// Whether and where the done line is served on the done port.
    pub listen: Listen,
    /// `signal_failure=0` keeps the done port closed for a failed build.
    pub honour_signal_failure: bool,
    /// Never return: PID 1's worker must not exit (PID 1 would take it for
    /// a crash), so it waits once it serves, or when it cannot.
    pub forever: bool,
}

/// Where the done port listens.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Listen {
    /// The done line is not served.
    Nowhere,
    /// Every address (the host comes in over the network or a forward).
    EveryAddress,
    /// This address only.
    Address(IpAddr),
}

impl Delivery {
    /// PID 1's worker: serves the done line on every address until the
    /// server is stopped.
    pub const INITRD: Delivery = Delivery {
        print: false,
        listen: Listen::EveryAddress,
        honour_signal_failure: true,
        forever: true,
    };

    /// `initrd-agent run`: prints the done line, then serves it as asked
    /// (whatever the result) until killed.
    pub fn command(listen: Listen) -> Delivery {
        Delivery {
            print: true,
            listen,
            honour_signal_failure: false,
            forever: false,
        }
    }
}

/// Reports the result: state on the metadata server, then the done line as
/// `delivery` says. `params` are the resolved parameters when resolution got
/// that far, else the port and `signal_failure` come from the command line
/// and the defaults. Returns the exit code (0 for a successful build, 1
/// otherwise) unless `delivery.forever`.
pub async fn finish(
    result: Result<DoneLine, StageError>,
    params: Option<&Params>,
    cmdline: &Cmdline,
    metadata: Option<&MetadataClient>,
    delivery: &Delivery,
) -> i32 {
    let line = match result {
        Ok(line) => line,
        Err(e) => {
            error!("build failed in stage {}: {:#}", e.stage, e.error);
            e.to_done_line()
        }
    };
    if let Some(md) = metadata {
        let state = if line.is_success() {
            StateDetail::Done
        } else {
            StateDetail::Failed(line.message.clone())
        };
        md.report_state(&state).await;
    }
    let fallback;
    let params = match params {
        Some(p) => p,
        None => {
            fallback = Params::resolve(None, cmdline);
            &fallback
        }
    };
    let code = if line.is_success() { 0 } else { 1 };
    if delivery.print {
        print!("{}", line.to_line());
    }
    if delivery.listen != Listen::Nowhere {
        if !line.is_success() && delivery.honour_signal_failure && !params.flag(SIGNAL_FAILURE) {
            info!("signal_failure=0: not opening the done port for a failed build");
        } else {
            serve(line, delivery.listen, done_port(params)).await;
        }
    }
    if delivery.forever {
        std::future::pending::<()>().await;
    }
    code
}

/// `signal_build_done_port`, or the initrd's default when it is not a port.
fn done_port(params: &Params) -> u16 {
    params
        .get(SIGNAL_BUILD_DONE_PORT)
        .and_then(|p| params::parse_port(p).ok())
        .unwrap_or(INITRD_DONE_PORT)
}

/// Serves `line` on `port` until the task is dropped; a port that cannot
/// be bound is logged.
async fn serve(line: DoneLine, listen: Listen, port: u16) {
    let bound = match listen {
        Listen::Nowhere => return,
        Listen::EveryAddress => signal::bind(port).await,
        Listen::Address(ip) => tokio::net::TcpListener::bind((ip, port))
            .await
            .with_context(|| format!("cannot listen on {ip} port {port}")),
    };
    match bound {
        Ok(listener) => {
            let _ = signal::serve(listener, line).await;
        }
        Err(e) => error!("{e:#}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use contract::Stage;
    use tokio::io::AsyncReadExt;

    use crate::stage::StageContext;

    fn failed() -> Result<DoneLine, StageError> {
        Err(anyhow::anyhow!("no volume")).stage(Stage::Disk)
    }

    #[tokio::test]
    async fn the_command_exits_0_or_1_without_serving() {
        let cmdline = Cmdline::default();
        let quiet = Delivery::command(Listen::Nowhere);
        let ok = DoneLine::success(contract::Method::FromQcow2, 1.0, 5, vec![]);
        assert_eq!(finish(Ok(ok), None, &cmdline, None, &quiet).await, 0);
        assert_eq!(finish(failed(), None, &cmdline, None, &quiet).await, 1);
    }

    #[tokio::test]
    async fn the_command_serves_a_failure_on_the_given_address_and_port() {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        // The command serves whatever signal_failure says.
        let cmdline = Cmdline::from_pairs([
            format!("{SIGNAL_BUILD_DONE_PORT}={port}").as_str(),
            "signal_failure=0",
        ])
        .unwrap();
        let delivery = Delivery::command(Listen::Address([127, 0, 0, 1].into()));
        let server = tokio::spawn(async move {
            finish(failed(), None, &cmdline, None, &delivery).await;
        });
        let line = loop {
            match tokio::net::TcpStream::connect(("127.0.0.1", port)).await {
                Ok(mut s) => {
                    let mut text = String::new();
                    s.read_to_string(&mut text).await.unwrap();
                    break text;
                }
                Err(_) => tokio::time::sleep(std::time::Duration::from_millis(10)).await,
            }
        };
        server.abort();
        let line: DoneLine = serde_json::from_str(line.trim_end()).unwrap();
        assert_eq!(line.stage, Some(Stage::Disk));
        assert_eq!(line.message, "no volume");
    }

    #[test]
    fn the_done_port_is_the_parameter_else_the_default() {
        let port = |pairs: &[&str]| {
            done_port(&Params::resolve(
                None,
                &Cmdline::from_pairs(pairs.iter().copied()).unwrap(),
            ))
        };
        assert_eq!(port(&[]), INITRD_DONE_PORT);
        assert_eq!(port(&["signal_build_done_port=8022"]), 8022);
        assert_eq!(port(&["signal_build_done_port=x"]), INITRD_DONE_PORT);
    }
}
