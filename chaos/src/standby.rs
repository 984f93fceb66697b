//! A streaming standby of the services' PostgreSQL for the failover scenario: a second
//! cluster made with `pg_basebackup` on 127.0.0.1:5433, replicating synchronously (so
//! that a commit a writer saw succeed is on the standby when the primary crashes), and
//! promoted when the primary is gone.

use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use sqlx::{Connection, PgConnection};

pub const PORT: u16 = 5433;
const SLOT: &str = "chaos_standby";
const BIN: &str = "/usr/lib/postgresql/15/bin";
const CLUSTER: [&str; 2] = ["15", "main"];

pub struct Standby {
    dir: PathBuf,
    admin_url: String,
}

impl Standby {
    /// Copies the running primary (`admin_url`) into a standby, starts it and makes it
    /// the primary's synchronous standby.
    pub async fn create(admin_url: &str) -> Result<Standby> {
        let standby = Standby {
            dir: PathBuf::from("/var/lib/postgresql/15/chaos-standby"),
            admin_url: admin_url.to_string(),
        };
        standby.remove_files();
        let mut primary = PgConnection::connect(admin_url).await?;
        drop_slot(&mut primary).await?;
        match standby.start(&mut primary).await {
            Ok(()) => Ok(standby),
            Err(err) => {
                standby.remove_files();
                let _ = reset_synchronous_standby(&mut primary).await;
                let _ = drop_slot(&mut primary).await;
                Err(err)
            }
        }
    }

    async fn start(&self, primary: &mut PgConnection) -> Result<()> {
        let dir = self.dir.to_string_lossy().to_string();
        as_postgres(&[
            &format!("{BIN}/pg_basebackup"),
            "-h",
            "127.0.0.1",
            "-p",
            "5432",
            "-U",
            "postgres",
            "-D",
            &dir,
            "-X",
            "stream",
            // An immediate checkpoint, not a spread one of minutes.
            "-c",
            "fast",
            "-C",
            "-S",
            SLOT,
        ])?;
        // Debian keeps the primary's configuration in /etc: the copy has none. A
        // standby needs at least the primary's limits, and its TLS for the hostssl rules.
        let mut config = format!(
            "port = {PORT}\n\
             listen_addresses = '127.0.0.1'\n\
             unix_socket_directories = '{dir}'\n\
             hba_file = '/etc/postgresql/15/main/pg_hba.conf'\n\
             wal_level = logical\n\
             hot_standby = on\n\
             primary_conninfo = 'host=127.0.0.1 port=5432 user=postgres application_name={SLOT}'\n\
             primary_slot_name = '{SLOT}'\n"
        );
        for setting in [
            "max_connections",
            "max_wal_senders",
            "max_replication_slots",
            "max_worker_processes",
            "max_prepared_transactions",
            "max_locks_per_transaction",
            "ssl",
            "ssl_cert_file",
            "ssl_key_file",
            "ssl_ca_file",
        ] {
            let value: String =
                sqlx::query_scalar("SELECT setting FROM pg_settings WHERE name = $1")
                    .bind(setting)
                    .fetch_one(&mut *primary)
                    .await?;
            config.push_str(&format!("{setting} = '{}'\n", value.replace('\'', "''")));
        }
        as_postgres(&[
            "sh",
            "-c",
            &format!("printf '%s' \"$0\" > {dir}/postgresql.conf && touch {dir}/standby.signal"),
            &config,
        ])?;
        as_postgres(&[
            &format!("{BIN}/pg_ctl"),
            "-D",
            &dir,
            "-l",
            &format!("{dir}/standby.log"),
            "-w",
            "start",
        ])
        .with_context(|| format!("see {dir}/standby.log"))?;
        // Streaming, then synchronous.
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let streaming: bool = sqlx::query_scalar(
                "SELECT EXISTS (SELECT 1 FROM pg_stat_replication WHERE application_name = $1 AND state = 'streaming')",
            )
            .bind(SLOT)
            .fetch_one(&mut *primary)
            .await?;
            if streaming {
                break;
            }
            if Instant::now() > deadline {
                bail!("the standby did not stream within 30 s; see {dir}/standby.log");
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        // ALTER SYSTEM cannot run in a transaction block: one statement per query.
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "ALTER SYSTEM SET synchronous_standby_names = '{SLOT}'"
        )))
        .execute(&mut *primary)
        .await?;
        sqlx::query("SELECT pg_reload_conf()")
            .execute(&mut *primary)
            .await?;
        Ok(())
    }

    /// Crashes the primary (`-m immediate`), promotes the standby and waits until it
    /// accepts writes.
    pub async fn fail_over(&self) -> Result<()> {
        as_root(&[
            "pg_ctlcluster",
            CLUSTER[0],
            CLUSTER[1],
            "stop",
            "-m",
            "immediate",
        ])?;
        let dir = self.dir.to_string_lossy().to_string();
        as_postgres(&[&format!("{BIN}/pg_ctl"), "-D", &dir, "-w", "promote"])?;
        Ok(())
    }

    /// Stops and deletes the standby, starts the old primary again (if it is down) and
    /// takes its synchronous standby and slot away before anything commits there (a
    /// commit would wait forever for the standby that is gone).
    pub async fn remove(self, services_script: &std::path::Path) -> Result<()> {
        self.remove_files();
        // Started bare, then reset, then brought in line by scripts/services.
        let _ = as_root(&["pg_ctlcluster", CLUSTER[0], CLUSTER[1], "start"]);
        let mut primary = connect_with_retry(&self.admin_url).await?;
        reset_synchronous_standby(&mut primary).await?;
        drop_slot(&mut primary).await?;
        let status = Command::new(services_script)
            .args(["start", "postgres"])
            .output()?;
        if !status.status.success() {
            bail!("scripts/services start postgres failed after the failover scenario");
        }
        Ok(())
    }

    /// Stops the standby if it runs (`-m immediate`) and deletes its files.
    fn remove_files(&self) {
        if self.dir.join("postmaster.pid").exists() {
            let dir = self.dir.to_string_lossy().to_string();
            let _ = as_postgres(&[
                &format!("{BIN}/pg_ctl"),
                "-D",
                &dir,
                "-m",
                "immediate",
                "stop",
            ]);
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

async fn connect_with_retry(url: &str) -> Result<PgConnection> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match PgConnection::connect(url).await {
            Ok(conn) => return Ok(conn),
            Err(err) if Instant::now() > deadline => return Err(err.into()),
            Err(_) => tokio::time::sleep(Duration::from_millis(250)).await,
        }
    }
}

/// Not transactional, so it does not wait for the vanished standby.
async fn reset_synchronous_standby(primary: &mut PgConnection) -> Result<()> {
    sqlx::query("ALTER SYSTEM RESET synchronous_standby_names")
        .execute(&mut *primary)
        .await?;
    sqlx::query("SELECT pg_reload_conf()")
        .execute(&mut *primary)
        .await?;
    Ok(())
}

async fn drop_slot(primary: &mut PgConnection) -> Result<()> {
    sqlx::query(
        "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE slot_name = $1",
    )
    .bind(SLOT)
    .execute(&mut *primary)
    .await?;
    Ok(())
}

fn is_root() -> bool {
    unsafe { libc::geteuid() == 0 }
}

fn as_postgres(args: &[&str]) -> Result<()> {
    let mut command = if is_root() {
        let mut c = Command::new("runuser");
        c.args(["-u", "postgres", "--"]);
        c
    } else {
        let mut c = Command::new("sudo");
        c.args(["-u", "postgres"]);
        c
    };
    run(command.args(args).current_dir("/"), args)
}

fn as_root(args: &[&str]) -> Result<()> {
    let mut command = if is_root() {
        Command::new(args[0])
    } else {
        let mut c = Command::new("sudo");
        c.arg(args[0]);
        c
    };
    run(command.args(&args[1..]), args)
}

fn run(command: &mut Command, args: &[&str]) -> Result<()> {
    let output = command
        .output()
        .with_context(|| format!("running {}", args[0]))?;
    if !output.status.success() {
        bail!(
            "{} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    Ok(())
}
