use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use base64::Engine as _;

/// How the webhook sink sends.
#[derive(Clone)]
pub struct WebhookSettings {
    /// The URL template, `{aggregatetype}` replaced per event (routing renders it; kept
    /// here to know which host to check).
    pub url: String,
    /// Signs each request when set.
    pub secret: Option<WebhookSecret>,
    /// The longest a request (connecting included) may take before it counts as
    /// unanswered.
    pub timeout: Duration,
    /// Requests sent at once, across aggregates.
    pub max_in_flight: usize,
    /// Events per request: 1 sends each event alone (its payload as the body); more
    /// sends up to this many events to one URL as a JSON array, one request after the
    /// other (see the crate's documentation).
    pub batch_size: usize,
    /// A PEM certificate trusted beside the Mozilla roots (a private CA).
    pub ca_file: Option<PathBuf>,
}

impl WebhookSettings {
    pub fn new(url: impl Into<String>) -> WebhookSettings {
        WebhookSettings {
            url: url.into(),
            secret: None,
            timeout: Duration::from_secs(10),
            max_in_flight: 64,
            batch_size: 1,
            ca_file: None,
        }
    }

    /// `scheme://host:port/` of the URL template when no placeholder sits in it.
    pub(crate) fn fixed_origin(&self) -> Option<url::Url> {
        let authority_end = self
            .url
            .find("://")
            .map(|start| {
                let rest = &self.url[start + 3..];
                start + 3 + rest.find('/').unwrap_or(rest.len())
            })
            .unwrap_or(self.url.len());
        if self.url[..authority_end].contains('{') {
            return None;
        }
        let mut url = url::Url::parse(&self.url.replace("{aggregatetype}", "x")).ok()?;
        url.set_path("/");
        url.set_query(None);
        url.set_fragment(None);
        let _ = url.set_password(None);
        let _ = url.set_username("");
        Some(url)
    }
}

/// The URL without its secrets (see [`crate::redacted`]).
impl fmt::Debug for WebhookSettings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WebhookSettings")
            .field("url", &crate::redacted(&self.url))
            .field("secret", &self.secret)
            .field("timeout", &self.timeout)
            .field("max_in_flight", &self.max_in_flight)
            .field("batch_size", &self.batch_size)
            .field("ca_file", &self.ca_file)
            .finish()
    }
}

/// The signing key, given as Standard Webhooks writes it: `whsec_` and the key in
/// base64. Never printed.
#[derive(Clone)]
pub struct WebhookSecret(Vec<u8>);

/// A secret [`WebhookSecret::parse`] refuses.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum SecretError {
    #[error("the webhook secret does not start with \"whsec_\"; give it as whsec_ followed by the key in base64 (such as the output of `echo whsec_$(head -c 32 /dev/urandom | base64)`)")]
    NoPrefix,
    #[error("the webhook secret after \"whsec_\" is not base64; give it as whsec_ followed by the key in base64")]
    NotBase64,
    #[error("the webhook secret's key is {0} bytes; use 24 to 64 random bytes")]
    Length(usize),
}

impl WebhookSecret {
    pub fn parse(text: &str) -> Result<WebhookSecret, SecretError> {
        let encoded = text
            .trim()
            .strip_prefix("whsec_")
            .ok_or(SecretError::NoPrefix)?;
        let key = base64::engine::general_purpose::STANDARD
            .decode(encoded)
            .map_err(|_| SecretError::NotBase64)?;
        if !(24..=64).contains(&key.len()) {
            return Err(SecretError::Length(key.len()));
        }
        Ok(WebhookSecret(key))
    }

    pub(crate) fn key(&self) -> &[u8] {
        &self.0
    }
}

impl fmt::Debug for WebhookSecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("WebhookSecret(<hidden>)")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets() {
        assert!(WebhookSecret::parse("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").is_ok());
        assert_eq!(
            WebhookSecret::parse("MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").unwrap_err(),
            SecretError::NoPrefix
        );
        assert_eq!(
            WebhookSecret::parse("whsec_not base64!").unwrap_err(),
            SecretError::NotBase64
        );
        assert_eq!(
            WebhookSecret::parse("whsec_c2hvcnQ=").unwrap_err(),
            SecretError::Length(5)
        );
        let secret = WebhookSecret::parse("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").unwrap();
        assert_eq!(format!("{secret:?}"), "WebhookSecret(<hidden>)");
    }

    #[test]
    fn the_origin_is_known_when_the_host_is_fixed() {
        let origin = |url: &str| {
            WebhookSettings::new(url)
                .fixed_origin()
                .map(|u| u.to_string())
        };
        assert_eq!(
            origin("https://hooks.example:8443/in/{aggregatetype}?a=1").as_deref(),
            Some("https://hooks.example:8443/")
        );
        assert_eq!(origin("https://{aggregatetype}.hooks.example/in"), None);
    }
}
