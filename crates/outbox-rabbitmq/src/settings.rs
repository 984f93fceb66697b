//! What the RabbitMQ sink needs to know.

use std::fmt;
use std::time::Duration;

/// The sink's settings.
#[derive(Clone)]
pub struct RabbitMqSettings {
    /// `host:port` of the AMQP listener, such as `127.0.0.1:5672`.
    pub address: String,
    pub user: String,
    /// Never printed (`Debug` hides it).
    pub password: String,
    /// The virtual host (default `/`).
    pub vhost: String,
    /// The exchange messages go to; the routed destination is the routing key.
    pub exchange: String,
    /// Declare the exchange (durable, type topic) at start when it is missing.
    pub declare_exchange: bool,
    /// How long connecting may take.
    pub connect_timeout: Duration,
    /// How long a publish waits for the broker's confirm before it counts as
    /// unavailable (retried without using up an attempt).
    pub confirm_timeout: Duration,
    /// A stream queue declared at start and bound to the exchange for every routing
    /// key, so that `outbox verify` can read back what was published. It takes every
    /// message: with it, `mandatory` never finds a message unroutable.
    pub audit_stream: Option<String>,
    /// How long the audit stream keeps messages.
    pub audit_max_age: Duration,
}

impl RabbitMqSettings {
    pub fn new(
        address: impl Into<String>,
        user: impl Into<String>,
        password: impl Into<String>,
        exchange: impl Into<String>,
    ) -> RabbitMqSettings {
        RabbitMqSettings {
            address: address.into(),
            user: user.into(),
            password: password.into(),
            vhost: "/".into(),
            exchange: exchange.into(),
            declare_exchange: true,
            audit_stream: None,
            audit_max_age: Duration::from_secs(7 * 24 * 3600),
            connect_timeout: Duration::from_secs(10),
            confirm_timeout: Duration::from_secs(5),
        }
    }

    /// The AMQP URI, with the credentials percent-encoded.
    pub(crate) fn uri(&self) -> String {
        let encode = |text: &str| -> String {
            text.bytes()
                .map(|b| match b {
                    b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                        (b as char).to_string()
                    }
                    _ => format!("%{b:02X}"),
                })
                .collect()
        };
        format!(
            "amqp://{}:{}@{}/{}",
            encode(&self.user),
            encode(&self.password),
            self.address,
            encode(&self.vhost)
        )
    }
}

impl fmt::Debug for RabbitMqSettings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RabbitMqSettings")
            .field("address", &self.address)
            .field("user", &self.user)
            .field("password", &"***")
            .field("vhost", &self.vhost)
            .field("exchange", &self.exchange)
            .field("declare_exchange", &self.declare_exchange)
            .field("connect_timeout", &self.connect_timeout)
            .field("confirm_timeout", &self.confirm_timeout)
            .field("audit_stream", &self.audit_stream)
            .field("audit_max_age", &self.audit_max_age)
            .finish()
    }
}
