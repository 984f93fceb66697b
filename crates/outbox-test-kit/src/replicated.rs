//! A PostgreSQL primary with a synchronous streaming standby, both of the test's own
//! (`initdb` and `pg_basebackup` into a temporary directory, on free loopback ports),
//! so a test may stop the standby's WAL receiver without holding up the commits of
//! every other test on the shared server.
//!
//! The binaries are Debian's PostgreSQL 15, the one `scripts/services` installs; they
//! run as the `postgres` user (initdb refuses root).

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use sqlx::{Connection, PgConnection};

const BIN: &str = "/usr/lib/postgresql/15/bin";
/// The standby's `application_name`, as `synchronous_standby_names` names it.
pub const STANDBY_NAME: &str = "outbox_test_standby";

/// A running primary and its synchronous standby; both stop and their files go when
/// it is dropped.
pub struct ReplicatedPostgres {
    dir: PathBuf,
    pub primary_port: u16,
    pub standby_port: u16,
    /// The WAL receiver held by [`ReplicatedPostgres::pause_standby`], if any.
    paused: Option<u32>,
}

impl ReplicatedPostgres {
    /// Creates both clusters and waits until the standby streams as the primary's
    /// synchronous standby.
    pub async fn start() -> ReplicatedPostgres {
        let dir = std::env::temp_dir().join(format!(
            "outbox-replicated-{}",
            uuid::Uuid::new_v4().simple()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        run(Command::new("chown").arg("postgres:postgres").arg(&dir));
        let pair = ReplicatedPostgres {
            primary_port: free_port(),
            standby_port: free_port(),
            dir,
            paused: None,
        };
        pair.start_primary();
        pair.start_standby();
        pair.wait_synchronous().await;
        pair
    }

    /// The superuser's URL of `database` on the primary.
    pub fn primary_url(&self, database: &str) -> String {
        format!(
            "postgres://postgres@127.0.0.1:{}/{database}",
            self.primary_port
        )
    }

    fn standby_url(&self, database: &str) -> String {
        format!(
            "postgres://postgres@127.0.0.1:{}/{database}",
            self.standby_port
        )
    }

    fn start_primary(&self) {
        let data = self.dir.join("primary");
        as_postgres(&[
            &format!("{BIN}/initdb"),
            "-D",
            path(&data),
            "-U",
            "postgres",
            "--auth=trust",
            "--no-sync",
            "-E",
            "UTF8",
        ]);
        append_config(
            &data,
            &format!(
                "port = {port}\n\
                 listen_addresses = '127.0.0.1'\n\
                 unix_socket_directories = '{socket}'\n\
                 wal_level = logical\n\
                 max_wal_senders = 10\n\
                 max_replication_slots = 10\n\
                 shared_buffers = 32MB\n",
                port = self.primary_port,
                socket = path(&data),
            ),
        );
        self.pg_ctl(&data, "start");
    }

    fn start_standby(&self) {
        let data = self.dir.join("standby");
        as_postgres(&[
            &format!("{BIN}/pg_basebackup"),
            "-h",
            "127.0.0.1",
            "-p",
            &self.primary_port.to_string(),
            "-U",
            "postgres",
            "-D",
            path(&data),
            "-X",
            "stream",
            "-c",
            "fast",
            "-C",
            "-S",
            STANDBY_NAME,
        ]);
        // The copy carries the primary's postgresql.conf: later lines win.
        append_config(
            &data,
            &format!(
                "port = {port}\n\
                 unix_socket_directories = '{socket}'\n\
                 hot_standby = on\n\
                 primary_conninfo = 'host=127.0.0.1 port={primary} user=postgres application_name={STANDBY_NAME}'\n\
                 primary_slot_name = '{STANDBY_NAME}'\n",
                port = self.standby_port,
                socket = path(&data),
                primary = self.primary_port,
            ),
        );
        as_postgres(&["touch", path(&data.join("standby.signal"))]);
        self.pg_ctl(&data, "start");
    }

    fn pg_ctl(&self, data: &Path, action: &str) {
        let log = data.with_extension("log");
        as_postgres(&[
            &format!("{BIN}/pg_ctl"),
            "-D",
            path(data),
            "-l",
            path(&log),
            "-w",
            action,
        ]);
    }

    async fn wait_synchronous(&self) {
        let mut primary = PgConnection::connect(&self.primary_url("postgres"))
            .await
            .unwrap();
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "ALTER SYSTEM SET synchronous_standby_names = '{STANDBY_NAME}'"
        )))
        .execute(&mut primary)
        .await
        .unwrap();
        sqlx::query("SELECT pg_reload_conf()")
            .execute(&mut primary)
            .await
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let sync: bool = sqlx::query_scalar(
                "SELECT EXISTS (SELECT 1 FROM pg_stat_replication WHERE application_name = $1 AND state = 'streaming' AND sync_state = 'sync')",
            )
            .bind(STANDBY_NAME)
            .fetch_one(&mut primary)
            .await
            .unwrap();
            if sync {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "the standby did not become synchronous within 30 s; see {}",
                self.dir.display()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Stops the standby's WAL receiver (SIGSTOP): the primary's WAL reaches it no
    /// more, and a synchronous commit waits until [`ReplicatedPostgres::resume_standby`].
    pub async fn pause_standby(&mut self) {
        let mut standby = PgConnection::connect(&self.standby_url("postgres"))
            .await
            .unwrap();
        let pid: i32 = sqlx::query_scalar("SELECT pid FROM pg_stat_wal_receiver")
            .fetch_one(&mut standby)
            .await
            .expect("the standby has a WAL receiver");
        run(Command::new("kill").args(["-STOP", &pid.to_string()]));
        self.paused = Some(pid as u32);
    }

    pub fn resume_standby(&mut self) {
        if let Some(pid) = self.paused.take() {
            run(Command::new("kill").args(["-CONT", &pid.to_string()]));
        }
    }

    /// Whether the standby has the row of `table` in `database` with this `id` (a
    /// hot-standby read).
    pub async fn standby_has(&self, database: &str, table: &str, id: uuid::Uuid) -> bool {
        let mut standby = PgConnection::connect(&self.standby_url(database))
            .await
            .unwrap();
        sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
            "SELECT EXISTS (SELECT 1 FROM {table} WHERE id = $1)"
        )))
        .bind(id)
        .fetch_one(&mut standby)
        .await
        .unwrap()
    }
}

impl Drop for ReplicatedPostgres {
    fn drop(&mut self) {
        self.resume_standby();
        for data in [self.dir.join("standby"), self.dir.join("primary")] {
            if data.join("postmaster.pid").exists() {
                let _ = Command::new("runuser")
                    .args(["-u", "postgres", "--"])
                    .arg(format!("{BIN}/pg_ctl"))
                    .args(["-D", path(&data), "-m", "immediate", "-w", "stop"])
                    .current_dir("/")
                    .output();
            }
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn path(p: &Path) -> &str {
    p.to_str().expect("a UTF-8 temporary path")
}

fn append_config(data: &Path, lines: &str) {
    use std::io::Write;
    let mut file = std::fs::OpenOptions::new()
        .append(true)
        .open(data.join("postgresql.conf"))
        .unwrap();
    file.write_all(lines.as_bytes()).unwrap();
}

/// Runs `args` as the `postgres` user (the tests run as root on CI; `sudo` otherwise).
fn as_postgres(args: &[&str]) {
    let root = Command::new("id")
        .arg("-u")
        .output()
        .map(|o| o.stdout.starts_with(b"0\n"))
        .unwrap_or(false);
    let mut command = if root {
        let mut c = Command::new("runuser");
        c.args(["-u", "postgres", "--"]);
        c
    } else {
        let mut c = Command::new("sudo");
        c.args(["-u", "postgres"]);
        c
    };
    run(command.args(args).current_dir("/"));
}

fn run(command: &mut Command) {
    let output = command.output().expect("the command starts");
    assert!(
        output.status.success(),
        "{command:?} failed: {}",
        String::from_utf8_lossy(&output.stderr).trim()
    );
}
