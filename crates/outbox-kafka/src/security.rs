//! Secrets in librdkafka properties, and connection failures explained.
//!
//! librdkafka quotes rejected values in its errors (a malformed `ssl.key.pem`, a bad
//! `sasl.jaas.config`), so hiding values in our own `Debug` is not enough: every text
//! that comes from librdkafka goes through a [`Redactor`] holding the secret values.

use std::sync::Arc;

/// Words that mark a property's value as a secret (`sasl.password`, `ssl.key.pem`,
/// `ssl.keystore.password`, `sasl.jaas.config`, `sasl.oauthbearer.client.secret`...).
const SECRET_WORDS: &[&str] = &["password", "secret", "key", "token", "jaas", "credential"];

/// Whether the value of property `name` must never be shown.
pub fn is_secret_property(name: &str) -> bool {
    let name = name.to_ascii_lowercase();
    SECRET_WORDS.iter().any(|word| name.contains(word))
}

/// Replaces known secret values in texts with `<redacted>`.
#[derive(Clone, Default)]
pub struct Redactor {
    /// Longest first, so a secret that contains another is replaced whole.
    secrets: Arc<Vec<String>>,
}

impl Redactor {
    /// A redactor for the secret-named properties among `properties`.
    pub fn for_properties<'a>(properties: impl IntoIterator<Item = (&'a str, &'a str)>) -> Self {
        Redactor::for_values(
            properties
                .into_iter()
                .filter(|(name, _)| is_secret_property(name))
                .map(|(_, value)| value.to_string()),
        )
    }

    /// A redactor for these values, and for each line of multi-line ones (PEM keys
    /// are quoted line by line).
    pub fn for_values(values: impl IntoIterator<Item = String>) -> Self {
        let mut secrets: Vec<String> = Vec::new();
        for value in values {
            let value = value.trim().to_string();
            if value.lines().count() > 1 {
                secrets.extend(
                    value
                        .lines()
                        .map(str::trim)
                        .filter(|line| line.len() >= 8 && !line.starts_with("-----"))
                        .map(str::to_string),
                );
            }
            secrets.push(value);
        }
        // One- and two-letter values would garble every message and protect nothing.
        secrets.retain(|secret| secret.len() >= 3);
        secrets.sort_by_key(|secret| std::cmp::Reverse(secret.len()));
        secrets.dedup();
        Redactor {
            secrets: Arc::new(secrets),
        }
    }

    /// `text` with every secret replaced by `<redacted>`.
    pub fn redact(&self, text: &str) -> String {
        let mut text = text.to_string();
        for secret in self.secrets.iter() {
            if text.contains(secret.as_str()) {
                text = text.replace(secret.as_str(), "<redacted>");
            }
        }
        text
    }
}

impl std::fmt::Debug for Redactor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Redactor({} secrets)", self.secrets.len())
    }
}

/// What librdkafka's connection errors mean and what to change, for the failures that
/// retrying cannot fix. `None` when nothing matches (a broker that is down: retry).
pub fn refused_connection_hint(error: &str) -> Option<&'static str> {
    let text = error.to_ascii_lowercase();
    let hints: &[(&[&str], &str)] = &[
        (
            &["certificate verify failed", "broker certificate could not be verified"],
            "the broker's TLS certificate is not signed by a trusted CA: set kafka.properties \"ssl.ca.location\" to the CA file that signed it",
        ),
        (
            &["alert bad certificate", "alert certificate required", "alert unknown ca", "alert certificate unknown"],
            "the broker refused our TLS client certificate, or wants one: set kafka.properties \"ssl.certificate.location\" and \"ssl.key.location\" to a certificate its CA signed, with its key",
        ),
        (
            &["hostname mismatch", "ip address mismatch"],
            "the broker's TLS certificate does not name the host in kafka_brokers: use the host name the certificate was issued for",
        ),
        (
            &["sasl authentication error", "authentication failed", "invalid credentials", "invalid username or password"],
            "the broker refused the credentials: check kafka.properties \"sasl.username\", \"sasl.password\" and \"sasl.mechanism\" (it must be one the listener enables)",
        ),
        (
            &["unsupported sasl mechanism", "no mutual mechanism", "unsupported_sasl_mechanism"],
            "the listener does not offer this SASL mechanism: set kafka.properties \"sasl.mechanism\" to one it enables (PLAIN, SCRAM-SHA-256, SCRAM-SHA-512, OAUTHBEARER)",
        ),
        (
            &["connecting to a ssl listener", "connecting to a sasl", "incorrect security.protocol"],
            "the listener speaks a different security protocol: set kafka.properties \"security.protocol\" to what it expects (SSL, SASL_SSL or SASL_PLAINTEXT)",
        ),
        (
            &["wrong version number", "packet length too long", "record layer failure", "unexpected eof while reading"],
            "TLS was attempted against a listener that does not speak it (or the other way round): set kafka.properties \"security.protocol\" to what the listener expects",
        ),
        (
            &["ssl handshake failed", "ssl_handshake"],
            "the TLS handshake with the broker failed: check kafka.properties \"ssl.*\" (CA, client certificate and key)",
        ),
        (
            &["topic authorization failed", "cluster authorization failed", "authorization failed", "not authorized"],
            "the broker's ACLs do not allow this principal: grant the ACLs listed in the README (\"Least privilege\")",
        ),
    ];
    hints
        .iter()
        .find(|(needles, _)| needles.iter().any(|needle| text.contains(needle)))
        .map(|(_, hint)| *hint)
}

/// A listener that closes the connection at the first request, again and again, most
/// likely expects TLS or SASL from us; a broker that is restarting does it too, so the
/// connection check concludes this only after a few seconds of nothing else.
pub fn protocol_mismatch_hint(error: &str) -> Option<&'static str> {
    let text = error.to_ascii_lowercase();
    (text.contains("closed by peer") && text.contains("apiversion_query")).then_some(
        "the broker closes the connection at the first request: the listener most likely expects TLS or SASL; set kafka.properties \"security.protocol\" to what it expects (SSL, SASL_SSL or SASL_PLAINTEXT)",
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secret_names() {
        for name in [
            "sasl.password",
            "ssl.key.password",
            "ssl.key.pem",
            "sasl.jaas.config",
            "sasl.oauthbearer.client.secret",
            "ssl.keystore.password",
        ] {
            assert!(is_secret_property(name), "{name}");
        }
        for name in ["sasl.username", "security.protocol", "ssl.ca.location"] {
            assert!(!is_secret_property(name), "{name}");
        }
    }

    #[test]
    fn redactor_replaces_values_and_pem_lines() {
        let pem = "-----BEGIN PRIVATE KEY-----\nMIIEvQIBADANBgkqhkiG9w0BAQEFAASC\nAbCdEfGhIjKlMnOpQrStUvWx\n-----END PRIVATE KEY-----";
        let redactor = Redactor::for_properties([
            ("sasl.password", "hunter22"),
            ("ssl.key.pem", pem),
            ("sasl.username", "alice"),
        ]);
        let text = "bad hunter22 and MIIEvQIBADANBgkqhkiG9w0BAQEFAASC by alice";
        let shown = redactor.redact(text);
        assert_eq!(shown, "bad <redacted> and <redacted> by alice");
    }

    #[test]
    fn hints_for_refusals_only() {
        assert!(refused_connection_hint(
            "SSL handshake failed: error:0A000086:SSL routines::certificate verify failed"
        )
        .unwrap()
        .contains("ssl.ca.location"));
        assert!(refused_connection_hint("SASL authentication error: Authentication failed during authentication due to invalid credentials with SASL mechanism SCRAM-SHA-512").unwrap().contains("sasl.password"));
        assert!(refused_connection_hint(
            "Connect to ipv4#127.0.0.1:9092 failed: Connection refused"
        )
        .is_none());
    }
}
