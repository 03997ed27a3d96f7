//! Client for the Scaleway-format instance metadata server: the server's
//! tags (where build parameters live) and the `PATCH /state` progress
//! reports. The real service answers 429 now and then, so reads retry with
//! backoff; state reports are best effort and never fail a build.

use std::time::Duration;

use anyhow::{bail, Context, Result};
use contract::StateDetail;
use serde::Deserialize;
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
}

impl MetadataClient {
    /// `address` is `IP` or `IP:port` (`METADATA_IP`).
    pub fn new(address: &str, report_state: bool) -> Result<Self> {
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(2))
            .timeout(Duration::from_secs(5))
            .no_proxy()
            .build()
            .context("build the metadata HTTP client")?;
        Ok(MetadataClient {
            base: format!("http://{address}"),
            http,
            attempts: 8,
            report_state,
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

    /// PATCH /state {"state_detail": detail}. Best effort: logged, not
    /// returned, because a build must not fail over a progress report.
    pub async fn report_state(&self, detail: &StateDetail) {
        if !self.report_state {
            return;
        }
        let url = format!("{}/state", self.base);
        let body = serde_json::json!({ "state_detail": detail.to_string() });
        for attempt in 1..=3u32 {
            match self.http.patch(&url).json(&body).send().await {
                Ok(r) if r.status().is_success() => return,
                Ok(r) => debug!("PATCH /state answered {} (attempt {attempt})", r.status()),
                Err(e) => debug!("PATCH /state failed: {e} (attempt {attempt})"),
            }
            tokio::time::sleep(Duration::from_millis(200 * u64::from(attempt))).await;
        }
        warn!("could not report state '{detail}' to the metadata server");
    }
}
