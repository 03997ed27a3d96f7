//! Client for the Scaleway-format instance metadata server: the server's
//! tags (where build parameters live) and the `PATCH /state` progress
//! reports. The real service answers 429 now and then, so reads retry with
//! backoff; state reports are best effort and never fail a build.
//!
//! State reports go out one at a time, in the order they were made, through
//! one queue per client: a progress report made without waiting must not
//! land after the final `done` and leave the server's state_detail behind.

use std::time::Duration;

use anyhow::{bail, Context, Result};
use contract::StateDetail;
use serde::Deserialize;
use tokio::sync::{mpsc, oneshot};
use tracing::{debug, warn};

pub const DEFAULT_IP: &str = contract::params::METADATA_ADDRESS;

/// The parts of `/conf?format=json` the agent uses.
#[derive(Clone, Debug, Default, Deserialize)]
pub struct Conf {
    #[serde(default)]
    pub id: String,
    #[serde(default)]
    pub name: String,
    #[serde(default)]
    pub tags: Vec<String>,
}

#[derive(Clone)]
pub struct MetadataClient {
    base: String,
    http: reqwest::Client,
    /// How many times `conf` tries before giving up.
    attempts: u32,
    report_state: bool,
    /// The queue of state reports (see the module's doc); its task ends when
    /// the last client clone is dropped.
    states: mpsc::UnboundedSender<QueuedState>,
}

/// A state to send, and who waits for it to be sent.
type QueuedState = (StateDetail, Option<oneshot::Sender<()>>);

impl MetadataClient {
    /// `address` is `IP` or `IP:port` (`METADATA_IP`). Call it inside the
    /// async runtime: the state queue's task starts here.
    pub fn new(address: &str, report_state: bool) -> Result<Self> {
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(2))
            .timeout(Duration::from_secs(5))
            .no_proxy()
            .build()
            .context("build the metadata HTTP client")?;
        let base = format!("http://{address}");
        let (tx, rx) = mpsc::unbounded_channel();
        let runtime = tokio::runtime::Handle::try_current()
            .context("the metadata client needs the async runtime")?;
        runtime.spawn(send_states(http.clone(), base.clone(), rx));
        Ok(MetadataClient {
            base,
            http,
            attempts: 8,
            report_state,
            states: tx,
        })
    }

    /// Turns `PATCH /state` reports on or off (`NO_SIGNAL_STATE` may come
    /// from a server tag, known only after the first metadata read).
    pub fn set_report_state(&mut self, on: bool) {
        self.report_state = on;
    }

    /// GET /conf?format=json, retrying connection errors, 429 and 5xx with
    /// exponential backoff (0.25 s doubling, capped at 4 s).
    pub async fn conf(&self) -> Result<Conf> {
        let url = format!("{}/conf?format=json", self.base);
        let mut delay = Duration::from_millis(250);
        let mut last = String::new();
        for attempt in 1..=self.attempts {
            match self.http.get(&url).send().await {
                Ok(resp) if resp.status().is_success() => {
                    return resp
                        .json::<Conf>()
                        .await
                        .with_context(|| format!("{url} is not metadata JSON"));
                }
                Ok(resp) if resp.status().as_u16() == 429 || resp.status().is_server_error() => {
                    last = format!("HTTP {}", resp.status());
                }
                Ok(resp) => bail!("the metadata server answered {} for {url}", resp.status()),
                Err(e) => last = format!("{e}"),
            }
            debug!(
                "metadata attempt {attempt}/{}: {last}; retrying in {delay:?}",
                self.attempts
            );
            if attempt < self.attempts {
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(4));
            }
        }
        bail!(
            "the metadata server at {} did not answer after {} attempts (last: {last}); \
             boot with NO_METADATA=1 and pass the parameters on the kernel command line, \
             or set METADATA_IP",
            self.base,
            self.attempts
        )
    }

    /// Queues `detail` and returns at once; it is sent after every report
    /// made before it.
    pub fn report_state_later(&self, detail: StateDetail) {
        if self.report_state {
            let _ = self.states.send((detail, None));
        }
    }

    /// Queues `detail` and waits until it is sent (or given up on).
    pub async fn report_state(&self, detail: &StateDetail) {
        if !self.report_state {
            return;
        }
        let (sent, wait) = oneshot::channel();
        if self.states.send((detail.clone(), Some(sent))).is_ok() {
            let _ = wait.await;
        }
    }
}

/// The state queue's task: each report in turn.
async fn send_states(
    http: reqwest::Client,
    base: String,
    mut queue: mpsc::UnboundedReceiver<QueuedState>,
) {
    while let Some((detail, sent)) = queue.recv().await {
        patch_state(&http, &base, &detail).await;
        if let Some(sent) = sent {
            let _ = sent.send(());
        }
    }
}

/// PATCH /state {"state_detail": detail}. Best effort: logged, not
/// returned, because a build must not fail over a progress report.
async fn patch_state(http: &reqwest::Client, base: &str, detail: &StateDetail) {
    let url = format!("{base}/state");
    let body = serde_json::json!({ "state_detail": detail.to_string() });
    for attempt in 1..=3u32 {
        match http.patch(&url).json(&body).send().await {
            Ok(r) if r.status().is_success() => return,
            Ok(r) => debug!("PATCH /state answered {} (attempt {attempt})", r.status()),
            Err(e) => debug!("PATCH /state failed: {e} (attempt {attempt})"),
        }
        tokio::time::sleep(Duration::from_millis(200 * u64::from(attempt))).await;
    }
    warn!("could not report state '{detail}' to the metadata server");
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::{Arc, Mutex};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    /// A metadata server that records each PATCH body as it answers it, and
    /// answers the first one slowly.
    async fn slow_first_server() -> (String, Arc<Mutex<Vec<String>>>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let bodies = Arc::new(Mutex::new(Vec::new()));
        let seen = bodies.clone();
        let arrivals = Arc::new(AtomicUsize::new(0));
        tokio::spawn(async move {
            loop {
                let (mut s, _) = listener.accept().await.unwrap();
                let seen = seen.clone();
                let arrivals = arrivals.clone();
                tokio::spawn(async move {
                    let mut buf = Vec::new();
                    let mut chunk = [0u8; 1024];
                    // One request per connection: read until the JSON body ends.
                    while !buf.ends_with(b"}") {
                        let n = s.read(&mut chunk).await.unwrap();
                        if n == 0 {
                            return;
                        }
                        buf.extend_from_slice(&chunk[..n]);
                    }
                    let text = String::from_utf8_lossy(&buf).to_string();
                    let body = text.split("\r\n\r\n").nth(1).unwrap_or_default().to_owned();
                    // Recorded when answered: a report sent before the
                    // slow first one is answered would be recorded first.
                    if arrivals.fetch_add(1, Ordering::SeqCst) == 0 {
                        tokio::time::sleep(Duration::from_millis(300)).await;
                    }
                    seen.lock().unwrap().push(body);
                    let _ = s
                        .write_all(
                            b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
                        )
                        .await;
                });
            }
        });
        (addr, bodies)
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn states_arrive_in_the_order_they_were_made() {
        let (addr, bodies) = slow_first_server().await;
        let md = MetadataClient::new(&addr, true).unwrap();
        for percent in [0, 50, 100] {
            md.report_state_later(StateDetail::Building {
                stage: contract::Stage::Fetch,
                percent,
            });
        }
        md.report_state(&StateDetail::Done).await;
        let got: Vec<String> = bodies
            .lock()
            .unwrap()
            .iter()
            .map(|b| {
                serde_json::from_str::<serde_json::Value>(b).unwrap()["state_detail"].to_string()
            })
            .collect();
        assert_eq!(
            got,
            [
                "\"building: fetch 0\"",
                "\"building: fetch 50\"",
                "\"building: fetch 100\"",
                "\"done\""
            ]
        );
    }

    #[tokio::test]
    async fn reports_stay_off_when_turned_off() {
        let (addr, bodies) = slow_first_server().await;
        let mut md = MetadataClient::new(&addr, true).unwrap();
        md.set_report_state(false);
        md.report_state_later(StateDetail::Booted);
        md.report_state(&StateDetail::Done).await;
        assert!(bodies.lock().unwrap().is_empty());
    }
}
