//! A database of the harness's own per session, migrated as the system needs it.

use std::path::Path;
use std::process::{Command, Stdio};
use std::str::FromStr;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{Connection, PgConnection, PgPool};
use uuid::Uuid;

use crate::system::{System, BENCH_APPLICATION_NAME};

pub struct BenchDb {
    pub name: String,
    pub url: String,
    pub pool: PgPool,
    /// Our relay's topic template, or Debezium's topic prefix.
    pub template: String,
    /// Where the events of aggregate type `order` land.
    pub topic: String,
    /// What every topic of this session's system is named after (`bench-<system>-<id>`).
    pub topic_prefix: String,
    admin_url: String,
}

impl BenchDb {
    /// Creates a fresh database and migrates it with `outbox migrate` (`--cdc` for our
    /// CDC mode; Debezium creates its own slot and publication on the same table).
    pub async fn create(
        admin_url: &str,
        relay_bin: &Path,
        system: System,
        pool_size: u32,
    ) -> Result<BenchDb> {
        let mut db = BenchDb::create_named(
            admin_url,
            relay_bin,
            &system.name().replace('-', "_"),
            system == System::Cdc,
            pool_size,
        )
        .await?;
        let unique = &Uuid::now_v7().simple().to_string()[..12];
        let prefix = format!("bench-{}-{unique}", system.name());
        (db.template, db.topic) = if system.is_debezium() {
            (prefix.clone(), format!("{prefix}.outbox.event.order"))
        } else {
            (
                format!("{prefix}.{{aggregatetype}}"),
                format!("{prefix}.order"),
            )
        };
        db.topic_prefix = prefix;
        Ok(db)
    }

    /// Creates `outbox_bench_<name>`, migrated by `outbox migrate` (with `--cdc`, its
    /// publication and slot too), with no topic of its own.
    pub async fn create_named(
        admin_url: &str,
        relay_bin: &Path,
        name: &str,
        cdc: bool,
        pool_size: u32,
    ) -> Result<BenchDb> {
        let name = format!("outbox_bench_{name}");
        let mut admin = PgConnection::connect(admin_url).await?;
        drop_slots(&mut admin, &name).await?;
        sqlx::query(sqlx::AssertSqlSafe(String::from(&format!(
            "DROP DATABASE IF EXISTS {name} WITH (FORCE)"
        ))))
        .execute(&mut admin)
        .await?;
        sqlx::query(sqlx::AssertSqlSafe(String::from(&format!(
            "CREATE DATABASE {name}"
        ))))
        .execute(&mut admin)
        .await?;
        let url = url_with_db(admin_url, &name)?;
        let mut migrate = Command::new(relay_bin);
        migrate
            .arg("migrate")
            .env("OUTBOX_DATABASE_URL", &url)
            .stdout(Stdio::null());
        if cdc {
            migrate.arg("--cdc");
        }
        if !migrate.status()?.success() {
            bail!("outbox migrate failed on {name}");
        }
        // Named, so their backends' CPU can be told from the system's; kept for the
        // whole session, so none of it leaves with a closed connection.
        let options = PgConnectOptions::from_str(&url)?.application_name(BENCH_APPLICATION_NAME);
        let pool = PgPoolOptions::new()
            .max_connections(pool_size)
            .idle_timeout(None)
            .max_lifetime(None)
            .connect_with(options)
            .await?;
        Ok(BenchDb {
            name,
            url,
            pool,
            template: String::new(),
            topic: String::new(),
            topic_prefix: String::new(),
            admin_url: admin_url.to_string(),
        })
    }

    /// Drops the database and its replication slots: an abandoned slot would hold WAL
    /// on the server forever.
    pub async fn drop(self) -> Result<()> {
        self.pool.close().await;
        let mut admin = PgConnection::connect(&self.admin_url).await?;
        for _ in 0..50 {
            let left = drop_slots(&mut admin, &self.name).await?;
            if left == 0 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        sqlx::query(sqlx::AssertSqlSafe(String::from(&format!(
            "DROP DATABASE IF EXISTS {} WITH (FORCE)",
            self.name
        ))))
        .execute(&mut admin)
        .await?;
        Ok(())
    }
}

/// Drops the inactive slots of a database; returns how many slots remain.
async fn drop_slots(admin: &mut PgConnection, database: &str) -> Result<i64> {
    sqlx::query(
        "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots
         WHERE database = $1 AND NOT active",
    )
    .bind(database)
    .execute(&mut *admin)
    .await?;
    Ok(
        sqlx::query_scalar("SELECT count(*) FROM pg_replication_slots WHERE database = $1")
            .bind(database)
            .fetch_one(&mut *admin)
            .await?,
    )
}

fn url_with_db(url: &str, db: &str) -> Result<String> {
    let mut url = url::Url::parse(url).context("--database-url is not a URL")?;
    url.set_path(db);
    Ok(url.to_string())
}
