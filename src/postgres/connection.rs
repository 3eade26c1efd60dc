//! How satwatch reaches PostgreSQL. Every connection (migrations, the
//! writer, the readiness probe, checkpoint loads) goes through one
//! [`PgConnector`], so all of them use the same TLS settings.

use std::{error::Error as _, path::Path, sync::Arc};

use openssl::{
    ssl::{SslConnector, SslFiletype, SslMethod, SslVerifyMode},
    x509::{store::X509StoreBuilder, X509},
};
use postgres_openssl::MakeTlsConnector;
use tokio_postgres::{config::SslMode, Client};

use crate::config::PostgresSettings;

/// What went wrong reaching or using PostgreSQL, by what it takes to go on.
#[derive(Debug, thiserror::Error)]
pub enum PgError {
    /// The `[postgres]` settings cannot work (no URL or a bad one, TLS files
    /// that cannot be read or contradict each other): refused at start.
    #[error("PostgreSQL: {0}")]
    Settings(String),
    /// The TLS handshake failed: what to check is in the message.
    #[error("PostgreSQL: {0}")]
    Handshake(String),
    /// The server refused a statement (its SQLSTATE code and message).
    #[error("PostgreSQL: {code}: {message}")]
    Server { code: String, message: String },
    /// No connection, or it broke: worth retrying.
    #[error("PostgreSQL: {0}")]
    Connection(String),
    /// A stored checkpoint is not a detector state this version reads.
    #[error("PostgreSQL: channel_checkpoints row for {channel} does not hold a detector state this version reads: {reason}")]
    Checkpoint { channel: String, reason: String },
    /// A detector state that does not serialise to JSON.
    #[error("PostgreSQL: detector state to JSON: {0}")]
    Encode(#[from] serde_json::Error),
}

impl PgError {
    /// The error's kind, for metric labels and log fields.
    pub fn error_type(&self) -> &'static str {
        match self {
            PgError::Settings(_) => "settings",
            PgError::Handshake(_) => "tls_handshake",
            PgError::Server { .. } => "server",
            PgError::Connection(_) => "connection",
            PgError::Checkpoint { .. } => "checkpoint",
            PgError::Encode(_) => "encode",
        }
    }
}

impl From<tokio_postgres::Error> for PgError {
    fn from(err: tokio_postgres::Error) -> Self {
        // tokio-postgres's Display hides the server's message behind "db
        // error", and every other cause (refused, TLS, ...) behind its kind.
        match err.as_db_error() {
            Some(db) => PgError::Server {
                code: db.code().code().to_owned(),
                message: db.message().to_owned(),
            },
            None => PgError::Connection(with_causes(&err)),
        }
    }
}

impl From<openssl::error::ErrorStack> for PgError {
    fn from(err: openssl::error::ErrorStack) -> Self {
        PgError::Settings(format!("TLS setup: {err}"))
    }
}

/// An error and its causes on one line. None of tokio-postgres's causes
/// carries the connection string's values (a parse error names the option,
/// not its value), so the password cannot reach the message this way.
fn with_causes(err: &dyn std::error::Error) -> String {
    let mut text = err.to_string();
    let mut cause = err.source();
    while let Some(c) = cause {
        let more = c.to_string();
        if !text.contains(&more) {
            text.push_str(": ");
            text.push_str(&more);
        }
        cause = c.source();
    }
    text
}

/// How satwatch reaches PostgreSQL: the connection settings parsed once at
/// start, and one TLS connector built from the `[postgres]` settings. Cheap
/// to clone (the OpenSSL context is reference-counted).
///
/// TLS uses OpenSSL through `postgres-openssl`, not rustls: librdkafka's
/// `ssl` feature already links OpenSSL, so this adds no second TLS stack, and
/// it reads the same PEM files libpq users already have.
#[derive(Clone)]
pub struct PgConnector {
    config: tokio_postgres::Config,
    tls: MakeTlsConnector,
    /// What the server's certificate is checked against, for error messages.
    trust: Arc<str>,
}

impl PgConnector {
    /// Parses the URL and builds the TLS connector; refuses unreadable or
    /// contradictory TLS files at start rather than at the first connection.
    pub fn new(settings: &PostgresSettings) -> Result<Self, PgError> {
        let url = settings.url.as_deref().ok_or_else(|| {
            PgError::Settings(
                "no connection URL: set DATABASE_URL or [postgres] url in the pipeline file".into(),
            )
        })?;
        let config: tokio_postgres::Config = url.parse().map_err(|e: tokio_postgres::Error| {
            PgError::Settings(format!(
                "the connection URL (DATABASE_URL or [postgres] url) is not valid: {}",
                with_causes(&e)
            ))
        })?;
        let (tls, trust) = tls_connector(settings)?;
        Ok(Self {
            config,
            tls,
            trust: trust.into(),
        })
    }

    /// Connects; the connection's driver runs on its own task.
    pub async fn connect(&self) -> Result<Client, PgError> {
        let (client, connection) = self
            .config
            .connect(self.tls.clone())
            .await
            .map_err(|e| self.explain(e))?;
        tokio::spawn(async move {
            if let Err(err) = connection.await {
                tracing::debug!(error = %err, "PostgreSQL connection ended");
            }
        });
        Ok(client)
    }

    /// A connection error, with what to check when TLS was the trouble.
    fn explain(&self, err: tokio_postgres::Error) -> PgError {
        let tls_failed = err.as_db_error().is_none()
            && err
                .to_string()
                .starts_with("error performing TLS handshake");
        if !tls_failed {
            return err.into();
        }
        let cause = err.source().map(with_causes).unwrap_or_default();
        if cause.contains("server does not support TLS") {
            return PgError::Handshake(
                "TLS required (sslmode=require) but the server does not support TLS".into(),
            );
        }
        // postgres-openssl puts OpenSSL's verification verdict last, after
        // the error stack's code and source position.
        if cause.contains("certificate verify failed") {
            let verdict = cause.rsplit(": ").next().unwrap_or(&cause);
            return PgError::Handshake(format!(
                "TLS handshake failed: the server's certificate was not accepted ({verdict}); \
                 it is checked against {} and its name against the URL's host",
                self.trust
            ));
        }
        PgError::Handshake(format!("TLS handshake failed: {cause}"))
    }

    /// The URL's `sslmode`, for the start-up log.
    pub fn ssl_mode(&self) -> &'static str {
        match self.config.get_ssl_mode() {
            SslMode::Disable => "disable",
            SslMode::Prefer => "prefer",
            SslMode::Require => "require",
            _ => "other",
        }
    }

    /// What the server's certificate is checked against.
    pub fn trust(&self) -> &str {
        &self.trust
    }
}

/// The TLS connector for `settings`, and a description of what it trusts.
///
/// With a CA file, the server's certificate must chain to it (the system
/// store is not consulted, like libpq's `sslrootcert`); without one, to the
/// system's trust store. Either way its name must match the URL's host (DNS
/// name or IP address). Only `tls_skip_verify = true` turns both off.
fn tls_connector(settings: &PostgresSettings) -> Result<(MakeTlsConnector, String), PgError> {
    // Sets the system trust store, peer verification and modern defaults.
    let mut builder = SslConnector::builder(SslMethod::tls_client())?;
    let trust = match (&settings.ca_file, settings.tls_skip_verify) {
        (Some(_), true) => return Err(PgError::Settings(
            "[postgres] tls_skip_verify = true contradicts a CA file (ca_file or PGSSLROOTCERT): \
                 drop one"
                .into(),
        )),
        (None, true) => {
            builder.set_verify(SslVerifyMode::NONE);
            "nothing ([postgres] tls_skip_verify = true)".to_owned()
        }
        (Some(path), false) => {
            let certs = read_certificates(path)?;
            let mut store = X509StoreBuilder::new()?;
            for cert in certs {
                store.add_cert(cert)?;
            }
            builder.set_cert_store(store.build());
            format!("the CA file {}", path.display())
        }
        (None, false) => {
            "the system trust store (no CA file: set PGSSLROOTCERT or [postgres] ca_file)"
                .to_owned()
        }
    };
    match (&settings.client_cert_file, &settings.client_key_file) {
        (None, None) => {}
        (Some(cert), Some(key)) => {
            builder
                .set_certificate_chain_file(cert)
                .map_err(|e| file_error("client certificate", cert, &e))?;
            builder
                .set_private_key_file(key, SslFiletype::PEM)
                .map_err(|e| file_error("client key", key, &e))?;
            builder.check_private_key().map_err(|e| {
                PgError::Settings(format!(
                    "the client key {} does not belong to the client certificate {}: {e}",
                    key.display(),
                    cert.display()
                ))
            })?;
        }
        _ => {
            return Err(PgError::Settings(
                "a client certificate needs both a certificate and a key file \
                 ([postgres] client_cert_file and client_key_file, or PGSSLCERT and PGSSLKEY)"
                    .into(),
            ))
        }
    }
    let mut tls = MakeTlsConnector::new(builder.build());
    if settings.tls_skip_verify {
        tls.set_callback(|config, _host| {
            config.set_verify_hostname(false);
            Ok(())
        });
    }
    Ok((tls, trust))
}

fn read_certificates(path: &Path) -> Result<Vec<X509>, PgError> {
    let pem = std::fs::read(path).map_err(|e| {
        PgError::Settings(format!("cannot read the CA file {}: {e}", path.display()))
    })?;
    let certs = X509::stack_from_pem(&pem).map_err(|e| file_error("CA file", path, &e))?;
    if certs.is_empty() {
        return Err(PgError::Settings(format!(
            "the CA file {} holds no PEM certificate",
            path.display()
        )));
    }
    Ok(certs)
}

fn file_error(what: &str, path: &Path, err: &openssl::error::ErrorStack) -> PgError {
    PgError::Settings(format!(
        "cannot use the {what} {} (PEM expected): {err}",
        path.display()
    ))
}

/// Answers whether PostgreSQL is reachable, over a connection of its own so
/// that readiness reflects an outage even while nothing is being written.
pub struct Probe {
    connector: PgConnector,
    client: Option<Client>,
}

impl Probe {
    pub fn new(connector: PgConnector) -> Self {
        Self {
            connector,
            client: None,
        }
    }

    pub async fn check(&mut self) -> Result<(), PgError> {
        if self.client.as_ref().is_none_or(|c| c.is_closed()) {
            self.client = Some(self.connector.connect().await?);
        }
        let client = self.client.as_ref().expect("connected above");
        if let Err(err) = client.simple_query("SELECT 1").await {
            self.client = None;
            return Err(err.into());
        }
        Ok(())
    }
}
