//! The PostgreSQL URL every outbox command connects with: one parser (sqlx's
//! [`PgConnectOptions`]) for the polling connections and the replication stream alike,
//! and a password that never appears in output.

use std::fmt;
use std::str::FromStr;

use sqlx::postgres::{PgConnectOptions, PgSslMode};

/// Query parameters sqlx understands. Anything else is refused up front: sqlx would
/// otherwise log the unknown parameter *with its value*, which may be a secret.
const KNOWN_PARAMETERS: &[&str] = &[
    "sslmode",
    "ssl-mode",
    "sslrootcert",
    "ssl-root-cert",
    "ssl-ca",
    "sslcert",
    "ssl-cert",
    "sslkey",
    "ssl-key",
    "statement-cache-capacity",
    "host",
    "hostaddr",
    "port",
    "dbname",
    "user",
    "password",
    "application_name",
    "options",
];

/// Why a database URL cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum UrlError {
    /// The text does not parse as a URL; the value is the parser's message.
    #[error("database_url is not a valid URL ({0}); write it as postgres://USER[:PASSWORD]@HOST:PORT/DATABASE[?sslmode=verify-full&sslrootcert=/path/ca.crt]")]
    Syntax(String),
    #[error("database_url has scheme {0:?}; it must start with postgres:// or postgresql://")]
    /// The URL's scheme (the value) is neither `postgres` nor `postgresql`.
    Scheme(String),
    #[error("database_url has the unknown parameter {0:?}; remove it (known: sslmode, sslrootcert, sslcert, sslkey, host, hostaddr, port, dbname, user, password, application_name, options)")]
    /// A query parameter (the value) sqlx does not know. Refused rather than ignored,
    /// because sqlx would log it with its value, which may be a secret.
    UnknownParameter(String),
    #[error("database_url cannot be used: {0}")]
    /// sqlx refused the URL; the value is its message, with the password redacted.
    Invalid(String),
    #[error("database_url_file {path}: {cause}; point it at a readable file that holds the URL")]
    /// The file named by `database_url_file` could not be read or is empty.
    File {
        /// The file's path.
        path: String,
        /// Why it could not be used: the I/O error, or that it is empty.
        cause: String,
    },
}

/// A PostgreSQL URL, such as `postgres://outbox:pw@db:5432/app?sslmode=verify-full`.
/// `Debug` and `Display` show it with the password replaced by `***`; only
/// [`DatabaseUrl::expose`] and [`DatabaseUrl::connect_options`] see the secret.
#[derive(Clone, PartialEq, serde::Deserialize, serde::Serialize)]
#[serde(transparent)]
pub struct DatabaseUrl(String);

impl DatabaseUrl {
    /// Wraps `url` as it is; [`DatabaseUrl::connect_options`] checks it.
    pub fn new(url: impl Into<String>) -> Self {
        DatabaseUrl(url.into())
    }

    /// Reads the URL from a file (a mounted secret); surrounding whitespace is ignored.
    pub fn from_file(path: &std::path::Path) -> Result<Self, UrlError> {
        let text = std::fs::read_to_string(path).map_err(|err| UrlError::File {
            path: path.display().to_string(),
            cause: err.to_string(),
        })?;
        let url = text.trim();
        if url.is_empty() {
            return Err(UrlError::File {
                path: path.display().to_string(),
                cause: "the file is empty".into(),
            });
        }
        Ok(DatabaseUrl(url.to_string()))
    }

    /// The URL with its password, for connecting only.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// Checks the URL and turns it into sqlx's connection options. `PG*` environment
    /// variables and `~/.pgpass` fill in what the URL leaves out, as in libpq.
    pub fn connect_options(&self) -> Result<PgConnectOptions, UrlError> {
        let url = url::Url::parse(&self.0).map_err(|err| UrlError::Syntax(err.to_string()))?;
        if !matches!(url.scheme(), "postgres" | "postgresql") {
            return Err(UrlError::Scheme(url.scheme().to_string()));
        }
        for (key, _) in url.query_pairs() {
            if !KNOWN_PARAMETERS.contains(&key.as_ref()) && !key.starts_with("options[") {
                return Err(UrlError::UnknownParameter(key.into_owned()));
            }
        }
        let options = PgConnectOptions::from_str(&self.0)
            .map_err(|err| UrlError::Invalid(redact_text(&err.to_string(), self)))?;
        Ok(options)
    }

    /// The URL with any password (user part or `password=` parameter) replaced by `***`.
    pub fn redacted(&self) -> String {
        match url::Url::parse(&self.0) {
            Ok(mut url) => {
                if url.password().is_some() {
                    let _ = url.set_password(Some("***"));
                }
                let has_password = url.query_pairs().any(|(key, _)| key == "password");
                let pairs: Vec<(String, String)> = url
                    .query_pairs()
                    .map(|(key, value)| {
                        let value = if key == "password" {
                            "***".to_string()
                        } else {
                            value.into_owned()
                        };
                        (key.into_owned(), value)
                    })
                    .collect();
                if has_password {
                    url.query_pairs_mut().clear().extend_pairs(pairs);
                }
                url.to_string()
            }
            Err(_) => "<unparseable URL>".into(),
        }
    }

    /// Every form the URL's password may take in a message (as written, decoded).
    pub fn secrets(&self) -> Vec<String> {
        let Ok(url) = url::Url::parse(&self.0) else {
            // Unparseable: the whole text may hold a secret.
            return vec![self.0.clone()];
        };
        let mut secrets = Vec::new();
        if let Some(password) = url.password() {
            secrets.push(password.to_string());
            if let Ok(decoded) = percent_decode(password) {
                secrets.push(decoded);
            }
        }
        for (key, value) in url.query_pairs() {
            if key == "password" {
                secrets.push(value.into_owned());
            }
        }
        secrets.retain(|secret| !secret.is_empty());
        secrets
    }
}

/// Replaces every form of `url`'s password in `text` by `***`: for messages built by
/// others (drivers, servers) that may quote what they were given.
pub fn redact_text(text: &str, url: &DatabaseUrl) -> String {
    let mut text = text.to_string();
    let mut secrets = url.secrets();
    // Longest first, so a password that contains another is replaced whole.
    secrets.sort_by_key(|secret| std::cmp::Reverse(secret.len()));
    for secret in secrets {
        text = text.replace(&secret, "***");
    }
    text
}

fn percent_decode(text: &str) -> Result<String, std::str::Utf8Error> {
    percent_encoding::percent_decode_str(text)
        .decode_utf8()
        .map(|decoded| decoded.into_owned())
}

/// Why connecting failed, in words a user can act on, for failures that retrying cannot
/// fix (TLS, authentication, `pg_hba.conf`). `None` for the others (server down,
/// network), which are worth retrying. `message` is the driver's error text.
pub fn refused_connection_hint(message: &str) -> Option<&'static str> {
    let text = message.to_ascii_lowercase();
    let hints: &[(&[&str], &str)] = &[
        (
            &["unknownissuer", "unknown issuer", "certificate verify failed", "invalidcertificate", "badsignature"],
            "the server's TLS certificate is not signed by a trusted CA: set sslrootcert in database_url to the CA file that signed it (or fix the server's certificate)",
        ),
        (
            &["notvalidforname", "not valid for name", "hostname mismatch"],
            "the server's TLS certificate does not name the host in database_url: connect with the host name the certificate was issued for, or use sslmode=verify-ca",
        ),
        (
            &["password authentication failed", "sasl authentication failed", "28p01"],
            "PostgreSQL refused the password: check the user and password in database_url (or database_url_file)",
        ),
        (
            &["no encryption"],
            "the server accepts this role only over TLS (pg_hba.conf hostssl): set sslmode=verify-full (with sslrootcert) or sslmode=require in database_url",
        ),
        (
            &["pg_hba.conf", "28000"],
            "pg_hba.conf has no rule that lets this user connect from here (or rejects it): add one on the server, or connect as a user it allows",
        ),
        (
            &["server does not support tls", "server does not support ssl", "rejected ssl", "ssl is not enabled", "tls upgrade rejected"],
            "the server does not offer TLS but database_url asks for it (sslmode=require or verify-*): enable ssl on the server, or lower sslmode",
        ),
        (
            &["no such file", "certificate", "private key", "pem"],
            "a TLS file named in database_url (sslrootcert, sslcert, sslkey) cannot be read or is not PEM: check the path and the file",
        ),
    ];
    hints
        .iter()
        .find(|(needles, _)| needles.iter().any(|needle| text.contains(needle)))
        .map(|(_, hint)| *hint)
}

/// Whether `connection` is encrypted, and with which TLS version (`pg_stat_ssl`).
pub async fn connection_tls(
    connection: &mut sqlx::PgConnection,
) -> Result<Option<String>, sqlx::Error> {
    let row: Option<(bool, Option<String>)> =
        sqlx::query_as("SELECT ssl, version FROM pg_stat_ssl WHERE pid = pg_backend_pid()")
            .fetch_optional(connection)
            .await?;
    Ok(match row {
        Some((true, version)) => Some(version.unwrap_or_else(|| "TLS".into())),
        _ => None,
    })
}

/// How a connection is secured, in words for logs and `outbox status`.
pub fn describe_ssl_mode(mode: PgSslMode) -> &'static str {
    match mode {
        PgSslMode::Disable => "disable (plaintext)",
        PgSslMode::Allow => "allow (plaintext unless the server insists on TLS)",
        PgSslMode::Prefer => "prefer (TLS when the server offers it, else plaintext)",
        PgSslMode::Require => "require (TLS, server certificate not checked)",
        PgSslMode::VerifyCa => "verify-ca (TLS, certificate checked against sslrootcert)",
        PgSslMode::VerifyFull => "verify-full (TLS, certificate and host name checked)",
    }
}

impl fmt::Debug for DatabaseUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "DatabaseUrl({})", self.redacted())
    }
}

impl fmt::Display for DatabaseUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.redacted())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_never_show() {
        let url = DatabaseUrl::new("postgres://u:p%26ss@h/db?password=q%3Dx&sslmode=require");
        let shown = format!("{url} {url:?}");
        assert!(
            !shown.contains("p%26ss") && !shown.contains("q%3Dx"),
            "{shown}"
        );
        assert!(shown.contains("sslmode=require"), "{shown}");
        assert_eq!(
            redact_text("password p&ss and q=x and p%26ss", &url),
            "password *** and *** and ***"
        );
    }

    #[test]
    fn one_parser_reads_every_part() {
        let url = DatabaseUrl::new(
            "postgres://u:a%26b%3Dc@db.example:6543/app?sslmode=verify-full&sslrootcert=/ca.pem",
        );
        let options = url.connect_options().unwrap();
        assert_eq!(options.get_host(), "db.example");
        assert_eq!(options.get_port(), 6543);
        assert!(matches!(options.get_ssl_mode(), PgSslMode::VerifyFull));
        let socket = DatabaseUrl::new("postgres://u@localhost/app?host=/var/run/postgresql")
            .connect_options()
            .unwrap();
        assert_eq!(
            socket.get_socket().map(|p| p.display().to_string()),
            Some("/var/run/postgresql".into())
        );
    }

    #[test]
    fn unknown_parameters_are_refused_without_their_value() {
        let err = DatabaseUrl::new("postgres://u@h/db?passwd=hunter2")
            .connect_options()
            .unwrap_err()
            .to_string();
        assert!(err.contains("\"passwd\""), "{err}");
        assert!(!err.contains("hunter2"), "{err}");
    }
}
