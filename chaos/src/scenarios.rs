//! The faults. Each scenario breaks one thing while the writers write, and returns when
//! the fault is over; `run` then lets the system recover and scores what survived.

use std::process::Command;
use std::time::Duration;

use anyhow::{bail, Context, Result};

use crate::blackhole::{self, Blackhole};
use crate::world::World;
use crate::Mode;
use outbox_test_kit::toxiproxy::Toxic;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scenario {
    RelayKill,
    PostgresRestartFast,
    PostgresRestartImmediate,
    PostgresLatency,
    PostgresReset,
    KafkaLatency,
    KafkaBandwidth,
    KafkaReset,
    KafkaBlackhole,
    KafkaRestart,
    KafkaPause,
    BigTransactions,
    PostgresFailover,
    /// The active relay cut off from PostgreSQL while a standby waits.
    PostgresCutStandby,
    /// The active relay's packets to PostgreSQL dropped (a true half-open connection)
    /// while a standby waits: the server's keepalive must end its session in time.
    PostgresBlackholeStandby,
    /// The active relay paused and cut off from PostgreSQL; a standby takes over and
    /// publishes; then the old relay wakes up, with Kafka in reach.
    SplitBrain,
    /// Inbox consumers of one group (processes) killed, joining and leaving, with their
    /// database and Kafka restarted: every event applied exactly once, in order.
    Inbox,
    /// A control, not a fault: rows marked published without being sent, as a relay
    /// that marks before Kafka's acknowledgement would. The harness must count them lost.
    ControlMarkedUnsent,
}

/// How long the faults last: `--quick` (CI) or the full run.
#[derive(Debug, Clone, Copy)]
pub struct Intensity {
    pub quick: bool,
}

impl Intensity {
    pub fn relay_kills(self) -> usize {
        if self.quick {
            10
        } else {
            100
        }
    }

    /// How long a latency, bandwidth or pause fault lasts.
    pub fn fault(self) -> Duration {
        Duration::from_secs(if self.quick { 5 } else { 20 })
    }

    /// Events in the big transaction of `big-transactions`.
    pub fn big_transaction(self) -> usize {
        if self.quick {
            10_000
        } else {
            50_000
        }
    }

    /// How long the long transaction of `big-transactions` stays open.
    pub fn long_transaction(self) -> Duration {
        Duration::from_secs(if self.quick { 8 } else { 30 })
    }

    /// How long the writers write before the fault and after it.
    pub fn settle(self) -> Duration {
        Duration::from_secs(if self.quick { 1 } else { 3 })
    }

    /// The relays' `kafka.message_timeout`: the outage scenarios outlast it.
    pub fn message_timeout(self) -> Duration {
        Duration::from_secs(if self.quick { 3 } else { 5 })
    }
}

/// What a fault left to measure.
pub struct Fault {
    /// When it ended, from the scenario's start.
    pub end: Duration,
    /// How long a standby took to become active, where one took over.
    pub takeover: Option<Duration>,
    /// A promise the fault broke without losing anything (a takeover slower than the
    /// bound the README states); fails the row.
    pub problem: Option<String>,
}

impl Scenario {
    pub const ALL: [Scenario; 17] = [
        Scenario::RelayKill,
        Scenario::PostgresRestartFast,
        Scenario::PostgresRestartImmediate,
        Scenario::PostgresLatency,
        Scenario::PostgresReset,
        Scenario::KafkaLatency,
        Scenario::KafkaBandwidth,
        Scenario::KafkaReset,
        Scenario::KafkaBlackhole,
        Scenario::KafkaRestart,
        Scenario::KafkaPause,
        Scenario::BigTransactions,
        Scenario::PostgresFailover,
        Scenario::PostgresCutStandby,
        Scenario::PostgresBlackholeStandby,
        Scenario::SplitBrain,
        Scenario::Inbox,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Scenario::RelayKill => "relay-kill",
            Scenario::PostgresRestartFast => "pg-restart-fast",
            Scenario::PostgresRestartImmediate => "pg-restart-immediate",
            Scenario::PostgresLatency => "pg-latency",
            Scenario::PostgresReset => "pg-reset",
            Scenario::KafkaLatency => "kafka-latency",
            Scenario::KafkaBandwidth => "kafka-bandwidth",
            Scenario::KafkaReset => "kafka-reset",
            Scenario::KafkaBlackhole => "kafka-blackhole",
            Scenario::KafkaRestart => "kafka-restart",
            Scenario::KafkaPause => "kafka-pause",
            Scenario::BigTransactions => "big-transactions",
            Scenario::PostgresFailover => "pg-failover",
            Scenario::PostgresCutStandby => "pg-cut-standby",
            Scenario::PostgresBlackholeStandby => "pg-blackhole-standby",
            Scenario::SplitBrain => "split-brain",
            Scenario::Inbox => "inbox",
            Scenario::ControlMarkedUnsent => "control-marked-unsent",
        }
    }

    pub fn from_name(name: &str) -> Option<Scenario> {
        Scenario::ALL
            .into_iter()
            .chain([Scenario::ControlMarkedUnsent])
            .find(|s| s.name() == name)
    }

    /// What it does, for the results table.
    pub fn describe(self, intensity: Intensity) -> String {
        let fault = intensity.fault().as_secs();
        let timeout = intensity.message_timeout().as_secs();
        match self {
            Scenario::RelayKill => format!(
                "the relay SIGKILLed {} times, 0.3–1.5 s apart, restarted at once",
                intensity.relay_kills()
            ),
            Scenario::PostgresRestartFast => {
                "PostgreSQL restarted (`pg_ctl restart -m fast`) mid-stream".into()
            }
            Scenario::PostgresRestartImmediate => {
                "PostgreSQL crash-restarted (`-m immediate`: no shutdown checkpoint, WAL recovery) mid-stream".into()
            }
            Scenario::PostgresLatency => {
                format!("200 ms ± 50 ms latency each way between the relay and PostgreSQL for {fault} s")
            }
            Scenario::PostgresReset => {
                "the relay's PostgreSQL connections reset (TCP RST), new ones too, for 1 s".into()
            }
            Scenario::KafkaLatency => {
                format!("200 ms ± 50 ms latency each way between the relay and Kafka for {fault} s")
            }
            Scenario::KafkaBandwidth => {
                format!("the relay's Kafka connection limited to 4 KB/s for {fault} s")
            }
            Scenario::KafkaReset => {
                "the relay's Kafka connections reset (TCP RST), new ones too, for 1 s".into()
            }
            Scenario::KafkaBlackhole => format!(
                "Kafka a black hole for the relay (connections open, nothing passes) for {} s, longer than kafka.message_timeout = {timeout} s",
                timeout + 5
            ),
            Scenario::KafkaRestart => "the Kafka broker stopped and started again".into(),
            Scenario::KafkaPause => format!(
                "the Kafka broker paused (SIGSTOP) for {} s, longer than kafka.message_timeout = {timeout} s",
                timeout + 5
            ),
            Scenario::BigTransactions => format!(
                "a {}-event transaction and a transaction open for {} s among the small ones; the relay SIGKILLed right after the big one commits and again 1 s later",
                intensity.big_transaction(),
                intensity.long_transaction().as_secs()
            ),
            Scenario::PostgresFailover => "a synchronous streaming standby (pg_basebackup, 127.0.0.1:5433) promoted after the primary crashes (`-m immediate`); writers and relay reach the database through a proxy switched to it, as a DNS name or virtual IP would be; scored against the promoted server".into(),
            Scenario::PostgresCutStandby => format!(
                "the active relay cut off from PostgreSQL (nothing passes; the connections end {} s later, as the server's TCP keepalive ends a silent peer's session) while a standby waits; takeover = from the cut until the standby is active",
                CUT_CLOSES_AFTER.as_secs()
            ),
            Scenario::PostgresBlackholeStandby => format!(
                "every packet the active relay sends to PostgreSQL dropped (nftables; its connections half-open, new ones never answered) while a standby waits, for the takeover plus 5 s; takeover = from the first dropped packet until the standby is active, and must stay within {} s (the server's keepalive, 30 s by default, plus the standby's 1 s retry and 1 s to observe it)",
                TAKEOVER_BOUND.as_secs()
            ),
            Scenario::SplitBrain => format!(
                "the active relay paused (SIGSTOP, holding a batch: kafka.linger = {} ms) and cut off from PostgreSQL as in pg-cut-standby; the standby takes over and publishes for {} s; then the old relay wakes up, Kafka in reach, still cut off from PostgreSQL. zombie must be 0: the successor's Kafka transactions fenced the old relay",
                SPLIT_BRAIN_LINGER.as_millis(),
                SUCCESSOR_ALONE.as_secs()
            ),
            Scenario::Inbox => "three inbox consumers of one group (processes): one SIGKILLed and restarted, a fourth joins and leaves, PostgreSQL restarted, Kafka restarted; scored on their database: lost = never applied, reorder = applied after a newer event of its aggregate, dup = applied twice".into(),
            Scenario::ControlMarkedUnsent => "control: pending rows marked published behind the relay's back, as a relay that marks before the acknowledgement would; must be counted lost".into(),
        }
    }

    /// Breaks what the scenario breaks, and returns once it is whole again.
    pub async fn inject(self, world: &mut World, intensity: Intensity) -> Result<Fault> {
        let proxy_fault = |proxy: &'static str, toxic: Toxic, lasting: Duration| {
            let toxiproxy = world.env.toxiproxy.clone();
            async move {
                toxiproxy.add(proxy, toxic).await?;
                tokio::time::sleep(lasting).await;
                toxiproxy.clear(proxy).await
            }
        };
        let latency = Toxic::Latency {
            latency_ms: 200,
            jitter_ms: 50,
        };
        let outage = intensity.message_timeout() + Duration::from_secs(5);
        match self {
            Scenario::RelayKill => {
                for kill in 0..intensity.relay_kills() {
                    // 0.3 to 1.5 s apart, spread without a random generator.
                    let pause = 300 + (kill as u64 * 617) % 1_200;
                    tokio::time::sleep(Duration::from_millis(pause)).await;
                    world.relay(0).kill();
                    world.start_relay(0).await?;
                }
            }
            Scenario::PostgresRestartFast => restart_postgres(world, "fast")?,
            Scenario::PostgresRestartImmediate => restart_postgres(world, "immediate")?,
            Scenario::PostgresLatency => proxy_fault("pg0", latency, intensity.fault()).await?,
            Scenario::PostgresReset => {
                proxy_fault("pg0", Toxic::ResetPeer, Duration::from_secs(1)).await?
            }
            Scenario::KafkaLatency => proxy_fault("kafka", latency, intensity.fault()).await?,
            Scenario::KafkaBandwidth => {
                proxy_fault(
                    "kafka",
                    Toxic::Bandwidth { kb_per_s: 32 },
                    intensity.fault(),
                )
                .await?
            }
            Scenario::KafkaReset => {
                proxy_fault("kafka", Toxic::ResetPeer, Duration::from_secs(1)).await?
            }
            Scenario::KafkaBlackhole => proxy_fault("kafka", Toxic::Blackhole, outage).await?,
            Scenario::KafkaRestart => {
                services(world, &["stop", "kafka"])?;
                services(world, &["start", "kafka"])?;
            }
            Scenario::KafkaPause => {
                let pid = kafka_pid(world)?;
                signal(pid, libc::SIGSTOP);
                tokio::time::sleep(outage).await;
                signal(pid, libc::SIGCONT);
            }
            Scenario::BigTransactions => {
                let long = tokio::spawn(long_transaction(
                    world.pool.clone(),
                    intensity.long_transaction(),
                ));
                big_transaction(&world.pool, intensity.big_transaction()).await?;
                tokio::time::sleep(Duration::from_millis(200)).await;
                world.relay(0).kill();
                world.start_relay(0).await?;
                tokio::time::sleep(Duration::from_secs(1)).await;
                world.relay(0).kill();
                world.start_relay(0).await?;
                long.await??;
            }
            Scenario::PostgresFailover => {
                world.standby = Some(crate::standby::Standby::create(&world.env.admin_url).await?);
                tokio::time::sleep(Duration::from_secs(3)).await;
                world
                    .standby
                    .as_ref()
                    .expect("just made")
                    .fail_over()
                    .await?;
                world
                    .switch_database(&format!("127.0.0.1:{}", crate::standby::PORT))
                    .await?;
            }
            Scenario::PostgresCutStandby => return cut_off_active_relay(world, false).await,
            Scenario::PostgresBlackholeStandby => return black_hole_active_relay(world).await,
            Scenario::SplitBrain => return cut_off_active_relay(world, true).await,
            Scenario::Inbox => {
                world.create_inbox_database().await?;
                for consumer in 0..3 {
                    world.start_inbox_consumer(consumer)?;
                }
                tokio::time::sleep(Duration::from_secs(4)).await;
                world.stop_inbox_consumer(0, true);
                tokio::time::sleep(Duration::from_secs(1)).await;
                world.start_inbox_consumer(0)?;
                tokio::time::sleep(Duration::from_secs(2)).await;
                world.start_inbox_consumer(3)?;
                tokio::time::sleep(Duration::from_secs(4)).await;
                world.stop_inbox_consumer(3, false);
                tokio::time::sleep(Duration::from_secs(2)).await;
                restart_postgres(world, "fast")?;
                tokio::time::sleep(Duration::from_secs(3)).await;
                services(world, &["stop", "kafka"])?;
                services(world, &["start", "kafka"])?;
            }
            Scenario::ControlMarkedUnsent => {
                world.relay(0).stop(Duration::from_secs(15));
                tokio::time::sleep(Duration::from_secs(1)).await;
                sqlx::query(
                    "UPDATE outbox SET published_at = now()
                     WHERE published_at IS NULL AND dead_lettered_at IS NULL",
                )
                .execute(&world.pool)
                .await?;
                world.start_relay(0).await?;
            }
        }
        Ok(Fault {
            end: world.now(),
            takeover: None,
            problem: None,
        })
    }

    /// Whether the scenario means something in `mode`.
    pub fn applies(self, mode: Mode) -> bool {
        match self {
            // CDC mode never reads the marks.
            Scenario::ControlMarkedUnsent => mode == Mode::Polling,
            _ => true,
        }
    }
}

/// How long after the cut Toxiproxy closes the cut-off relay's PostgreSQL connections.
/// Toxiproxy's own TCP stack answers the server's keepalive probes, so it cannot leave a
/// half-open connection for the server to detect; closing stands for the moment the
/// server's keepalive (`postgres.keepalive_*`, 30 s by default) ends the session.
const CUT_CLOSES_AFTER: Duration = Duration::from_secs(3);
/// `split-brain`: the relays' `kafka.linger`, so that the paused relay holds a batch
/// it has produced but not sent.
pub const SPLIT_BRAIN_LINGER: Duration = Duration::from_millis(500);
/// `split-brain`: how long the successor publishes before the old relay wakes up.
const SUCCESSOR_ALONE: Duration = Duration::from_secs(5);

/// Cuts relay 0 off from PostgreSQL (pausing it first if `pause`) while relay 1 waits
/// as a standby; returns once the standby has taken over and, with `pause`, the old
/// relay has been awake for a while.
async fn cut_off_active_relay(world: &mut World, pause: bool) -> Result<Fault> {
    world.start_relay(1).await?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let old = world.relay(0).pid().context("relay 0 runs")?;
    let cut_at = world.now();
    if pause {
        signal(old, libc::SIGSTOP);
    }
    world
        .env
        .toxiproxy
        .add(
            "pg0",
            Toxic::Cut {
                timeout_ms: CUT_CLOSES_AFTER.as_millis() as u64,
            },
        )
        .await?;
    let waited = world.wait_active(1, Duration::from_secs(60)).await;
    let takeover = world.now() - cut_at;
    if let Err(err) = waited {
        signal(old, libc::SIGCONT);
        world.env.toxiproxy.clear("pg0").await?;
        return Err(err);
    }
    if pause {
        tokio::time::sleep(SUCCESSOR_ALONE).await;
        signal(old, libc::SIGCONT);
    }
    // The old relay, awake, is still cut off a while; then the network heals and it
    // must find itself a standby.
    tokio::time::sleep(Duration::from_secs(5)).await;
    world.env.toxiproxy.clear("pg0").await?;
    Ok(Fault {
        end: world.now(),
        takeover: Some(takeover),
        problem: None,
    })
}

/// The README's worst-case takeover after the active relay's host falls silent: the
/// server ends its session after the default `postgres.keepalive_*` (15 s + 3 × 5 s; or
/// `tcp_user_timeout`, the same 30 s, when data is unacknowledged), the standby tries
/// the lock every `standby_interval` (1 s), and a second for the harness to see it.
const TAKEOVER_BOUND: Duration = Duration::from_secs(32);

/// Drops every packet relay 0 (running as the black hole's user, straight to
/// PostgreSQL) sends to the server while relay 1 waits as a standby; returns once the
/// standby has been active 5 s (or the bound has passed twice over) and the network
/// healed.
async fn black_hole_active_relay(world: &mut World) -> Result<Fault> {
    world.start_relay(1).await?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let port: u16 = world
        .env
        .pg_address
        .rsplit_once(':')
        .and_then(|(_, port)| port.parse().ok())
        .context("the PostgreSQL address has no port")?;
    let bound = TAKEOVER_BOUND;
    let cut_at = world.now();
    let hole = Blackhole::open(port)?;
    let waited = world.wait_active(1, bound * 2).await;
    let takeover = world.now() - cut_at;
    if waited.is_ok() {
        tokio::time::sleep(Duration::from_secs(5)).await;
    }
    hole.heal();
    waited?;
    let problem = (takeover > bound).then(|| {
        format!(
            "the standby took over after {:.1} s, beyond the {} s the README states",
            takeover.as_secs_f64(),
            bound.as_secs()
        )
    });
    Ok(Fault {
        end: world.now(),
        takeover: Some(takeover),
        problem,
    })
}

/// Why `--quick` leaves a scenario to the full run, if it does (its 10 minutes).
pub fn left_to_full_run(scenario: Scenario) -> Option<&'static str> {
    match scenario {
        Scenario::PostgresCutStandby => {
            Some("split-brain makes the same cut in --quick and reports the takeover")
        }
        Scenario::PostgresBlackholeStandby => {
            Some("it waits out the server's keepalive, 30 s per mode")
        }
        _ => None,
    }
}

/// What a scenario changes in its world before anything starts: the relays' settings
/// beyond the defaults (as environment), and how they reach PostgreSQL.
pub fn prepare(scenario: Scenario, world: &mut World) {
    match scenario {
        // Only the relay to be paused lingers: the successor publishes with the
        // defaults (a 500 ms linger would cap its CDC catch-up at one small batch per
        // linger).
        Scenario::SplitBrain => {
            world.first_relay_env = vec![(
                "OUTBOX_KAFKA__LINGER".into(),
                format!("{}ms", SPLIT_BRAIN_LINGER.as_millis()),
            )]
        }
        Scenario::PostgresBlackholeStandby => {
            world.direct_database = true;
            world.relay_user = Some((0, blackhole::UID, blackhole::GID));
        }
        _ => {}
    }
}

/// One transaction of `size` events over ten aggregates of its own, written in
/// statements of 1,000.
async fn big_transaction(pool: &sqlx::PgPool, size: usize) -> Result<()> {
    let mut tx = pool.begin().await?;
    let mut written = 0;
    while written < size {
        let chunk: Vec<outbox::Event> = (written..(written + 1_000).min(size))
            .map(|i| {
                outbox::Event::new(
                    "order",
                    format!("big-{}", i % 10),
                    "Changed",
                    serde_json::json!({ "n": i / 10, "writer": "big" }),
                )
            })
            .collect();
        outbox::write_all(&mut *tx, &chunk).await?;
        written += chunk.len();
    }
    tx.commit().await?;
    Ok(())
}

/// A transaction that writes three events of its own aggregate and commits after
/// `open_for`.
async fn long_transaction(pool: sqlx::PgPool, open_for: Duration) -> Result<()> {
    let events: Vec<outbox::Event> = (0..3)
        .map(|n| {
            outbox::Event::new(
                "user",
                "long-2",
                "Changed",
                serde_json::json!({ "n": n, "writer": "long" }),
            )
        })
        .collect();
    let mut tx = pool.begin().await?;
    outbox::write_all(&mut *tx, &events).await?;
    tokio::time::sleep(open_for).await;
    tx.commit().await?;
    Ok(())
}

fn restart_postgres(world: &World, how: &str) -> Result<()> {
    services(world, &["restart-postgres", how])
}

fn services(world: &World, args: &[&str]) -> Result<()> {
    let output = Command::new(&world.env.services_script)
        .args(args)
        .output()
        .with_context(|| format!("running scripts/services {}", args.join(" ")))?;
    if !output.status.success() {
        bail!(
            "scripts/services {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    Ok(())
}

/// The broker's pid, as `scripts/services status` reports it.
fn kafka_pid(world: &World) -> Result<i32> {
    let output = Command::new(&world.env.services_script)
        .arg("status")
        .output()?;
    let text = String::from_utf8_lossy(&output.stdout);
    text.lines()
        .find(|l| l.starts_with("kafka: up"))
        .and_then(|l| {
            l.rsplit_once("(pid ")
                .map(|(_, rest)| rest.trim_end_matches(')'))
        })
        .and_then(|pid| pid.parse().ok())
        .with_context(|| format!("no Kafka pid in `scripts/services status`: {text}"))
}

fn signal(pid: i32, signal: i32) {
    unsafe {
        libc::kill(pid, signal);
    }
}
