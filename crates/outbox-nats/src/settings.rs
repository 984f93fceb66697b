//! What the NATS sink needs to know.

use std::time::Duration;

/// The sink's settings.
#[derive(Clone)]
pub struct NatsSettings {
    /// The server, such as `nats://127.0.0.1:4222`.
    pub url: String,
    /// How long connecting, and each check, may take.
    pub connect_timeout: Duration,
    /// How long a publish waits for the stream's acknowledgement before it counts as
    /// unavailable (retried without using up an attempt).
    pub ack_timeout: Duration,
    /// A stream the sink creates at start when it is missing; `None` when streams are
    /// an operator's business (a subject no stream captures is then retried, with the
    /// fix in the reason).
    pub stream: Option<StreamSettings>,
}

impl NatsSettings {
    /// A client connected to `url`, within `connect_timeout`; the error says why not.
    pub(crate) async fn client(&self) -> Result<async_nats::Client, String> {
        tokio::time::timeout(
            self.connect_timeout,
            async_nats::ConnectOptions::new()
                .connection_timeout(self.connect_timeout)
                .connect(self.url.as_str()),
        )
        .await
        .map_err(|_| format!("no answer within {:?}", self.connect_timeout))?
        .map_err(|err| err.to_string())
    }

    /// The URL fit for messages: a user and password (or token) in it replaced by `***`.
    pub fn shown_url(&self) -> String {
        match (self.url.find("://"), self.url.rfind('@')) {
            (Some(scheme), Some(at)) if at > scheme => {
                format!("{}***{}", &self.url[..scheme + 3], &self.url[at..])
            }
            _ => self.url.clone(),
        }
    }

    pub fn new(url: impl Into<String>) -> NatsSettings {
        NatsSettings {
            url: url.into(),
            connect_timeout: Duration::from_secs(10),
            ack_timeout: Duration::from_secs(5),
            stream: None,
        }
    }
}

/// The stream the sink may create.
#[derive(Debug, Clone)]
pub struct StreamSettings {
    pub name: String,
    /// The subjects it captures, such as `outbox.>`.
    pub subjects: Vec<String>,
    /// How long the server remembers a `Nats-Msg-Id` to drop a copy sent again: longer
    /// than a relay takes to resend after a lost acknowledgement or a restart.
    pub duplicate_window: Duration,
}

impl StreamSettings {
    pub fn new(name: impl Into<String>, subjects: Vec<String>) -> StreamSettings {
        StreamSettings {
            name: name.into(),
            subjects,
            duplicate_window: Duration::from_secs(2 * 60 * 60),
        }
    }
}

/// The URL without its credentials.
impl std::fmt::Debug for NatsSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NatsSettings")
            .field("url", &self.shown_url())
            .field("connect_timeout", &self.connect_timeout)
            .field("ack_timeout", &self.ack_timeout)
            .field("stream", &self.stream)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credentials_stay_out_of_the_shown_url() {
        assert_eq!(
            NatsSettings::new("nats://relay:s3cret@nats-1:4222").shown_url(),
            "nats://***@nats-1:4222"
        );
        let settings = NatsSettings::new("nats://relay:s3cret@nats-1:4222");
        assert!(!format!("{settings:?}").contains("s3cret"));
        assert_eq!(
            NatsSettings::new("nats://127.0.0.1:4222").shown_url(),
            "nats://127.0.0.1:4222"
        );
    }
}
