//! The HTTP webhook sink of the outbox relay: one `POST` per event to the URL routed
//! from `sink.url` (such as `https://billing.internal/hooks/{aggregatetype}`).
//!
//! The request, signed as [Standard Webhooks](https://www.standardwebhooks.com/) says:
//! - body: the payload bytes as stored (empty for a NULL payload); `content-type:
//!   application/json` when they are JSON, `application/octet-stream` otherwise;
//! - `webhook-id` (the event id), `webhook-timestamp` (Unix seconds of this attempt) and,
//!   with a secret, `webhook-signature: v1,<base64 HMAC-SHA256 of "id.timestamp.body">`;
//! - `outbox-aggregateid` and one `outbox-<name>` header per message header (`outbox-id`,
//!   `outbox-type`, `outbox-aggregatetype`, then the row's `headers` column). HTTP
//!   headers are ASCII text, so names and values are percent-encoded (RFC 3986) where
//!   they hold other bytes or `%`: a receiver decodes them to get the bytes back.
//!
//! The answer decides: 2xx is delivered; 408, 429, 502, 503 and 504, a timeout or no
//! connection mean the receiver is unavailable (retried, no attempt used up); any other
//! 4xx is permanent (dead letter); other answers (3xx, 500...) are retried as attempts.
//!
//! Order: one aggregate's events (one URL and key) are sent one after another, each once
//! the previous one was answered 2xx, and a failure holds the rest back; different
//! aggregates are sent at once, at most `max_in_flight` requests together.
//!
//! Batches (`batch_size` > 1): the events of a publish that go to one URL are sent in
//! order, up to `batch_size` per request, one request after the other; different URLs
//! at once. The body is a JSON array, one object per event: `id`, `aggregateid`,
//! `headers` (every message header, values encoded as in the single mode), and
//! `payload` (the payload when it is JSON, else `null` with `payload_base64`).
//! `webhook-id` is `batch_` and a hash of the events' ids (the same for a resend of the
//! same batch), and `outbox-batch-size` says how many events it holds. The answer counts
//! for every event of the batch: a 4xx dead-letters them all. After a batch that failed
//! otherwise, the URL's later batches are held back (unavailable: no attempt used).

mod settings;

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use hmac::{Hmac, Mac};
use outbox_core::{
    publish_per_aggregate, BoxFuture, CheckError, DeliveryError, DeliveryOutcome, ErrorKind,
    Message, Sink,
};
use percent_encoding::{utf8_percent_encode, AsciiSet, NON_ALPHANUMERIC};
use reqwest::header::{HeaderMap, HeaderName, HeaderValue, CONTENT_TYPE};
use reqwest::StatusCode;
use sha2::Sha256;
use tokio::sync::Semaphore;
use tracing::warn;

pub use settings::{SecretError, WebhookSecret, WebhookSettings};

/// Why the sink could not be built.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error("cannot read the CA certificate {path}: {detail}; point sink.ca_file at a PEM file")]
    CaFile { path: String, detail: String },
    #[error("cannot build the HTTP client: {0}")]
    Client(String),
}

/// POSTs each event to its URL, signed, and counts it delivered on a 2xx answer.
pub struct WebhookSink {
    settings: WebhookSettings,
    client: reqwest::Client,
    in_flight: Semaphore,
}

impl WebhookSink {
    /// A sink with its HTTP client (rustls, the Mozilla roots plus `ca_file`, no
    /// redirects followed: a redirect would resend the body to another place).
    pub fn new(settings: WebhookSettings) -> Result<WebhookSink, BuildError> {
        let mut client = reqwest::Client::builder()
            .use_rustls_tls()
            .redirect(reqwest::redirect::Policy::none())
            .connect_timeout(settings.timeout)
            .timeout(settings.timeout)
            .user_agent(concat!("outbox-relay/", env!("CARGO_PKG_VERSION")));
        if let Some(path) = &settings.ca_file {
            let ca_error = |detail: String| BuildError::CaFile {
                path: path.display().to_string(),
                detail,
            };
            let pem = std::fs::read(path).map_err(|err| ca_error(err.to_string()))?;
            let certificate =
                reqwest::Certificate::from_pem(&pem).map_err(|err| ca_error(err.to_string()))?;
            client = client.add_root_certificate(certificate);
        }
        let client = client
            .build()
            .map_err(|err| BuildError::Client(err.to_string()))?;
        let in_flight = Semaphore::new(settings.max_in_flight.max(1));
        Ok(WebhookSink {
            settings,
            client,
            in_flight,
        })
    }

    async fn publish_one(&self, message: &Message) -> DeliveryOutcome {
        let _slot = self.in_flight.acquire().await.expect("never closed");
        let request = match self.request(message) {
            Ok(request) => request,
            Err(err) => return DeliveryOutcome::Failed(err),
        };
        match request.send().await {
            Ok(response) => classify_answer(&redacted(&message.topic), response).await,
            Err(err) => {
                let err = without_url(err);
                warn!(url = %redacted(&message.topic), error = %err, "no answer from the webhook receiver; retried");
                DeliveryOutcome::Failed(DeliveryError::unavailable(format!(
                    "no answer from the webhook receiver: {err}"
                )))
            }
        }
    }

    /// Batch mode: each URL's messages in order, `batch_size` per request.
    async fn publish_batches(&self, messages: &[Message]) -> Vec<DeliveryOutcome> {
        let mut urls: Vec<(&str, Vec<usize>)> = Vec::new();
        for (index, message) in messages.iter().enumerate() {
            match urls.iter_mut().find(|(url, _)| *url == message.topic) {
                Some((_, indexes)) => indexes.push(index),
                None => urls.push((&message.topic, vec![index])),
            }
        }
        let sent = futures::future::join_all(urls.iter().map(|(url, indexes)| async move {
            let mut outcomes = Vec::with_capacity(indexes.len());
            let mut held: Option<DeliveryError> = None;
            for chunk in indexes.chunks(self.settings.batch_size) {
                let outcome = match &held {
                    Some(err) => DeliveryOutcome::Failed(DeliveryError::unavailable(format!(
                        "held back behind a failed batch to the same URL: {}",
                        err.reason
                    ))),
                    None => {
                        let batch: Vec<&Message> = chunk.iter().map(|&i| &messages[i]).collect();
                        self.send_batch(url, &batch).await
                    }
                };
                if let DeliveryOutcome::Failed(err) = &outcome {
                    if err.kind != ErrorKind::Permanent && held.is_none() {
                        held = Some(err.clone());
                    }
                }
                outcomes.extend(chunk.iter().map(|&i| (i, outcome.clone())));
            }
            outcomes
        }))
        .await;
        let mut outcomes = vec![None; messages.len()];
        for (index, outcome) in sent.into_iter().flatten() {
            outcomes[index] = Some(outcome);
        }
        outcomes
            .into_iter()
            .map(|o| o.expect("one outcome per message"))
            .collect()
    }

    async fn send_batch(&self, url: &str, batch: &[&Message]) -> DeliveryOutcome {
        let _slot = self.in_flight.acquire().await.expect("never closed");
        let mut ids = Vec::with_capacity(batch.len());
        let mut events = Vec::with_capacity(batch.len());
        for message in batch {
            let id = message
                .headers
                .iter()
                .find(|(name, _)| name == "id")
                .map(|(_, value)| String::from_utf8_lossy(value).into_owned())
                .unwrap_or_default();
            let headers: serde_json::Map<String, serde_json::Value> = message
                .headers
                .iter()
                .map(|(name, value)| {
                    let value = header_value(value).to_str().unwrap_or_default().to_string();
                    (name.clone(), serde_json::Value::String(value))
                })
                .collect();
            let mut event = serde_json::json!({
                "id": id,
                "aggregateid": String::from_utf8_lossy(&message.key),
                "headers": headers,
                "payload": serde_json::Value::Null,
            });
            if let Some(payload) = &message.value {
                match serde_json::from_slice::<serde_json::Value>(payload) {
                    Ok(json) => event["payload"] = json,
                    Err(_) => {
                        event["payload_base64"] = serde_json::Value::String(
                            base64::engine::general_purpose::STANDARD.encode(payload),
                        )
                    }
                }
            }
            ids.push(id);
            events.push(event);
        }
        let body = serde_json::to_vec(&events).expect("JSON values serialize");
        let batch_id = {
            use sha2::Digest;
            let digest = Sha256::digest(ids.join(",").as_bytes());
            let hex: String = digest.iter().take(16).map(|b| format!("{b:02x}")).collect();
            format!("batch_{hex}")
        };
        let timestamp = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs()
            .to_string();
        let mut headers = HeaderMap::new();
        headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        headers.insert("webhook-id", header_value(batch_id.as_bytes()));
        headers.insert("webhook-timestamp", header_value(timestamp.as_bytes()));
        if let Some(secret) = &self.settings.secret {
            let signature = sign(secret, &batch_id, &timestamp, &body);
            headers.insert("webhook-signature", header_value(signature.as_bytes()));
        }
        headers.insert("outbox-batch-size", HeaderValue::from(batch.len()));
        let sent = self
            .client
            .post(url)
            .headers(headers)
            .body(body)
            .send()
            .await;
        match sent {
            Ok(response) => classify_answer(&redacted(url), response).await,
            Err(err) => {
                let err = without_url(err);
                warn!(url = %redacted(url), error = %err, "no answer from the webhook receiver; retried");
                DeliveryOutcome::Failed(DeliveryError::unavailable(format!(
                    "no answer from the webhook receiver: {err}"
                )))
            }
        }
    }

    /// The signed request for `message`, or why it can never be sent.
    fn request(&self, message: &Message) -> Result<reqwest::RequestBuilder, DeliveryError> {
        let body = message.value.clone().unwrap_or_default();
        let id = message
            .headers
            .iter()
            .find(|(name, _)| name == "id")
            .map(|(_, value)| String::from_utf8_lossy(value).into_owned())
            .ok_or_else(|| DeliveryError::permanent("the message has no id header"))?;
        let timestamp = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs()
            .to_string();
        let mut headers = HeaderMap::new();
        let content_type = match serde_json::from_slice::<serde::de::IgnoredAny>(&body) {
            Ok(_) => "application/json",
            Err(_) => "application/octet-stream",
        };
        headers.insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
        headers.insert("webhook-id", header_value(id.as_bytes()));
        headers.insert("webhook-timestamp", header_value(timestamp.as_bytes()));
        if let Some(secret) = &self.settings.secret {
            let signature = sign(secret, &id, &timestamp, &body);
            headers.insert("webhook-signature", header_value(signature.as_bytes()));
        }
        headers.append("outbox-aggregateid", header_value(&message.key));
        for (name, value) in &message.headers {
            headers.append(header_name(name), header_value(value));
        }
        Ok(self
            .client
            .post(message.topic.as_str())
            .headers(headers)
            .body(body))
    }
}

impl Sink for WebhookSink {
    fn name(&self) -> &'static str {
        "webhook"
    }

    fn publish(&self, messages: Vec<Message>) -> BoxFuture<'_, Vec<DeliveryOutcome>> {
        Box::pin(async move {
            if self.settings.batch_size > 1 {
                return self.publish_batches(&messages).await;
            }
            publish_per_aggregate(&messages, |message| self.publish_one(message)).await
        })
    }

    /// Whether the receiver's host answers HTTP at all (any status will do), when the
    /// URL template names a fixed host; with `{aggregatetype}` in the host there is
    /// nothing to ask before an event.
    fn check(&self, timeout: Duration) -> BoxFuture<'_, Result<(), CheckError>> {
        Box::pin(async move {
            let Some(base) = self.settings.fixed_origin() else {
                return Ok(());
            };
            tokio::time::timeout(timeout, self.client.head(base.as_str()).send())
                .await
                .map_err(|_| format!("the webhook receiver {base} did not answer within {timeout:?}"))?
                .map_err(|err| {
                    format!(
                        "the webhook receiver {base} does not answer: {}; check sink.url and that the receiver runs",
                        without_url(err)
                    )
                })?;
            Ok(())
        })
    }
}

/// What the receiver's answer means for the relay.
async fn classify_answer(url: &str, response: reqwest::Response) -> DeliveryOutcome {
    let status = response.status();
    if status.is_success() {
        return DeliveryOutcome::Delivered;
    }
    let location = response
        .headers()
        .get(reqwest::header::LOCATION)
        .and_then(|l| l.to_str().ok())
        .map(str::to_string);
    // A short excerpt of the receiver's own explanation, for the dead letter.
    let text = response.text().await.unwrap_or_default();
    let excerpt: String = text.chars().take(200).collect();
    let answered = format!("the webhook receiver answered {status} to {url}: {excerpt:?}");
    let error = match status {
        StatusCode::REQUEST_TIMEOUT
        | StatusCode::TOO_MANY_REQUESTS
        | StatusCode::BAD_GATEWAY
        | StatusCode::SERVICE_UNAVAILABLE
        | StatusCode::GATEWAY_TIMEOUT => {
            warn!(%url, %status, "the webhook receiver is unavailable; retried");
            DeliveryError::unavailable(answered)
        }
        s if s.is_client_error() => DeliveryError::permanent(answered),
        s if s.is_redirection() => DeliveryError::retriable(format!(
            "{answered}; redirects are not followed (to {}): point sink.url at the final address",
            location.as_deref().unwrap_or("nowhere given")
        )),
        _ => DeliveryError::retriable(answered),
    };
    DeliveryOutcome::Failed(error)
}

/// `url` fit for logs and dead letters: a password in its user part and the values of
/// its query (where webhook tokens often travel) replaced by `***`.
pub fn redacted(url: &str) -> String {
    let Ok(mut parsed) = url::Url::parse(url) else {
        return "(a URL that cannot be parsed)".into();
    };
    if parsed.password().is_some() {
        let _ = parsed.set_password(Some("***"));
    }
    if parsed.query().is_some() {
        let names: Vec<String> = parsed
            .query_pairs()
            .map(|(name, _)| name.into_owned())
            .collect();
        let mut query = parsed.query_pairs_mut();
        query.clear();
        for name in names {
            query.append_pair(&name, "***");
        }
    }
    // `append_pair` encodes `*`, and a template's placeholder is encoded too: both read
    // better as written.
    parsed
        .to_string()
        .replace("%2A%2A%2A", "***")
        .replace("%7Baggregatetype%7D", "{aggregatetype}")
}

/// A client error without the URL, which may carry credentials in its user part.
fn without_url(err: reqwest::Error) -> reqwest::Error {
    err.without_url()
}

/// `v1,<base64 HMAC-SHA256(secret, "id.timestamp.body")>`, Standard Webhooks' signature.
pub fn sign(secret: &WebhookSecret, id: &str, timestamp: &str, body: &[u8]) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret.key()).expect("HMAC takes any key");
    mac.update(id.as_bytes());
    mac.update(b".");
    mac.update(timestamp.as_bytes());
    mac.update(b".");
    mac.update(body);
    format!(
        "v1,{}",
        base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes())
    )
}

/// Bytes that are percent-encoded in header values: everything but visible ASCII, and
/// `%` itself so that decoding gives the original bytes back.
const VALUE_ESCAPES: &AsciiSet = &percent_encoding::CONTROLS.add(b' ').add(b'%').add(0x7f);

fn header_value(value: &[u8]) -> HeaderValue {
    let encoded: String = percent_encoding::percent_encode(value, VALUE_ESCAPES).collect();
    HeaderValue::from_str(&encoded).expect("percent-encoded text is a valid header value")
}

/// `outbox-<name>`, lower-case (HTTP header names are), with anything but letters,
/// digits, `-`, `.` and `_` percent-encoded.
fn header_name(name: &str) -> HeaderName {
    const NAME_ESCAPES: &AsciiSet = &NON_ALPHANUMERIC.remove(b'-').remove(b'.').remove(b'_');
    let encoded = utf8_percent_encode(&name.to_ascii_lowercase(), NAME_ESCAPES).to_string();
    HeaderName::from_bytes(format!("outbox-{encoded}").as_bytes())
        .expect("letters, digits, '-', '.', '_' and '%' make a valid header name")
}

/// Whether `url` can receive events: an absolute `http` or `https` URL of characters a
/// URL holds as they are (no spaces, quotes or non-ASCII: the relay sends the URL as
/// routed, never a silently re-encoded one). The webhook sink's
/// [`outbox_core::DestinationRule`].
pub fn check_url(url: &str) -> Result<(), String> {
    if let Some(bad) = url
        .chars()
        .find(|c| !c.is_ascii_graphic() || "\"<>\\^`{|}".contains(*c))
    {
        return Err(format!(
            "is not a valid URL: it holds {bad:?}, which a URL cannot hold as it is; change the event's aggregatetype or sink.url"
        ));
    }
    match url::Url::parse(url) {
        Ok(parsed) if matches!(parsed.scheme(), "http" | "https") && parsed.has_host() => Ok(()),
        Ok(_) => Err("is not an http:// or https:// URL; change sink.url".into()),
        Err(err) => Err(format!(
            "is not a valid URL ({err}); change the event's aggregatetype or sink.url"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signature_matches_the_standard_webhooks_example() {
        // The example of the Standard Webhooks specification's reference libraries.
        let secret = WebhookSecret::parse("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").unwrap();
        let signature = sign(
            &secret,
            "msg_p5jXN8AQM9LWM0D4loKWxJek",
            "1614265330",
            br#"{"test": 2432232314}"#,
        );
        assert_eq!(signature, "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=");
    }

    #[test]
    fn header_values_keep_their_bytes() {
        assert_eq!(header_value(b"00-abc-01"), "00-abc-01");
        assert_eq!(header_value(b"a b%\r\n\xff"), "a%20b%25%0D%0A%FF");
        assert_eq!(header_name("Trace Parent"), "outbox-trace%20parent");
        assert_eq!(
            header_name("outbox.retried-dead-letter"),
            "outbox-outbox.retried-dead-letter"
        );
    }

    #[test]
    fn urls_are_shown_without_their_secrets() {
        assert_eq!(
            redacted("https://hook:s3cret@hooks.example/in/order?token=abc&x=1"),
            "https://hook:***@hooks.example/in/order?token=***&x=***"
        );
        assert_eq!(
            redacted("http://127.0.0.1:9/order"),
            "http://127.0.0.1:9/order"
        );
        assert_eq!(
            redacted("https://hooks.example/{aggregatetype}"),
            "https://hooks.example/{aggregatetype}"
        );
    }

    #[test]
    fn urls() {
        assert!(check_url("https://hooks.example/orders").is_ok());
        assert!(check_url("http://127.0.0.1:8080/x/order_1-a.b~c").is_ok());
        let err = check_url("http://127.0.0.1:8080/x/my order").unwrap_err();
        assert!(err.starts_with("is not a valid URL: it holds ' '"), "{err}");
        assert!(check_url("http://h/x/ordér").is_err());
        assert!(check_url("ftp://hooks.example/").is_err());
        assert!(check_url("hooks.example/orders").is_err());
    }
}
