//! A database of the test's own on the PostgreSQL of `scripts/services`, and dropping
//! it again (its replication slots first).

use std::str::FromStr;
use std::time::Duration;

use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{ConnectOptions, Connection, PgConnection, PgPool};

/// An admin URL: OUTBOX_DATABASE_URL, or the local `postgres` role.
pub fn admin_url() -> String {
    std::env::var("OUTBOX_DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into())
}

/// A database created for one test.
pub struct FreshDatabase {
    pub name: String,
    /// The admin URL with this database as its path.
    pub url: String,
    pub pool: PgPool,
}

/// Creates the database `name` (unique per test: `<prefix>_<random>`) and a pool of 10
/// connections to it.
pub async fn create(name: &str) -> FreshDatabase {
    let mut admin = PgConnection::connect(&admin_url())
        .await
        .expect("cannot reach PostgreSQL; start it with scripts/services start");
    sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
        .execute(&mut admin)
        .await
        .unwrap();
    let options = PgConnectOptions::from_str(&admin_url())
        .unwrap()
        .database(name)
        .log_statements(log::LevelFilter::Trace);
    let url = {
        let mut url = url::Url::parse(&admin_url()).unwrap();
        url.set_path(name);
        url.to_string()
    };
    let pool = PgPoolOptions::new()
        .max_connections(10)
        .connect_with(options)
        .await
        .unwrap();
    FreshDatabase {
        name: name.to_string(),
        url,
        pool,
    }
}

/// Drops the database `name`, after its replication slots: slots belong to the server
/// and keep their database alive (a stopping relay's walsender may need a moment to let
/// go of its slot).
pub async fn drop(name: &str) {
    let Ok(mut admin) = PgConnection::connect(&admin_url()).await else {
        return;
    };
    for _ in 0..50 {
        let _ = sqlx::query(
            "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots
             WHERE database = $1 AND NOT active",
        )
        .bind(name)
        .execute(&mut admin)
        .await;
        let remaining: i64 =
            sqlx::query_scalar("SELECT count(*) FROM pg_replication_slots WHERE database = $1")
                .bind(name)
                .fetch_one(&mut admin)
                .await
                .unwrap_or(0);
        if remaining == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let _ = sqlx::query(sqlx::AssertSqlSafe(format!(
        "DROP DATABASE IF EXISTS {name} WITH (FORCE)"
    )))
    .execute(&mut admin)
    .await;
}
