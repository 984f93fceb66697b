//! The limits of the machine, measured in the same run as the systems, so each system's
//! figure can be read as a share of what the parts under it allow:
//! - Kafka alone: the relay's own producer (`KafkaSink`, with the relay's settings and
//!   batch size) sends the same messages with no database; its latency (handed to the
//!   producer → consumed) is the floor under commit → consume, its drain the ceiling of
//!   publishing. Measured with Kafka transactions (the relay's default) and without.
//! - PostgreSQL alone: the writers' commit rate with no system running, at each
//!   shape of transaction the steps use.
//! - The replication stream alone: PostgreSQL decodes a backlog from a slot with
//!   `pgoutput`, the way our relay and Debezium ask for it, and `pg_recvlogical` reads it
//!   with no Kafka behind: the ceiling of any CDC drain.

use std::collections::BTreeSet;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _, Result};
use outbox_core::{DeliveryOutcome, Message, Sink};
use outbox_kafka::{KafkaSettings, KafkaSink};
use outbox_relay::{Config, ConfigOverrides};
use tokio::sync::mpsc;
use uuid::Uuid;

use crate::arrivals::Arrivals;
use crate::db::BenchDb;
use crate::load::{self, payload, BACKLOG_EVENTS_PER_TX};
use crate::now_micros;
use crate::report::{KafkaAlone, KafkaStep, Limits, PostgresAlone, StreamAlone, WriterCeiling};
use crate::session::Context;

pub async fn measure(cx: &Context<'_>, round: usize) -> Result<Limits> {
    let (settings, batch) = relay_producer(cx)?;
    let mut kafka = Vec::new();
    for transactions in [true, false] {
        let mut settings = settings.clone();
        if !transactions {
            settings.transactional_id = None;
        } else if settings.transactional_id.is_none() {
            // Configured off (kafka.transactions = false): there is nothing to compare.
            continue;
        }
        let alone = kafka_alone(cx, settings, batch)
            .await
            .with_context(|| format!("Kafka alone (transactions {})", on_off(transactions)))?;
        for s in &alone.steps {
            eprintln!(
                "bench: Kafka alone (transactions {}) {}/s: p50 {:.1} p99 {:.1} p99.9 {:.1} ms",
                on_off(transactions),
                s.target_rate,
                s.p50_ms,
                s.p99_ms,
                s.p999_ms
            );
        }
        eprintln!(
            "bench: Kafka alone (transactions {}) drain: {:.0} events/s",
            on_off(transactions),
            alone.drain_events_per_sec
        );
        kafka.push(alone);
    }
    let postgres = postgres_alone(cx).await.context("PostgreSQL alone")?;
    for w in &postgres.writers {
        eprintln!(
            "bench: PostgreSQL alone, {} event(s) per transaction: {:.0} events/s",
            w.events_per_tx, w.events_per_sec
        );
    }
    let stream = stream_alone(cx)
        .await
        .context("the replication stream alone")?;
    eprintln!(
        "bench: replication stream alone: {:.0} events/s ({} events in {:.2} s)",
        stream.events_per_sec, stream.events, stream.seconds
    );
    Ok(Limits {
        round,
        kafka,
        postgres,
        stream,
    })
}

fn on_off(on: bool) -> &'static str {
    if on {
        "on"
    } else {
        "off"
    }
}

/// The producer settings and batch size (`polling.batch_size`; CDC batches as many)
/// the relay would run with, from the same file and environment the harness gives it.
fn relay_producer(cx: &Context<'_>) -> Result<(KafkaSettings, usize)> {
    let overrides = ConfigOverrides {
        database_url: Some(cx.admin_url.to_string()),
        kafka_brokers: Some(cx.launcher.kafka_brokers.to_string()),
        ..Default::default()
    };
    let config = Config::load(cx.launcher.kafka_config, &overrides)?.resolve()?;
    let mut settings = config
        .kafka()
        .cloned()
        .context("the relay's sink is not Kafka; the bench measures Kafka")?;
    if settings.transactional_id.is_some() {
        settings.transactional_id = Some(format!("outbox-bench/{}", Uuid::now_v7()));
    }
    Ok((settings, config.batch_size as usize))
}

async fn kafka_alone(
    cx: &Context<'_>,
    settings: KafkaSettings,
    batch: usize,
) -> Result<KafkaAlone> {
    let unique = &Uuid::now_v7().simple().to_string()[..12];
    let topic = format!("bench-kafka-alone-{unique}.order");
    let result = kafka_alone_on(cx, settings, batch, &topic).await;
    cx.topics.delete(&[topic]).await?;
    result
}

async fn kafka_alone_on(
    cx: &Context<'_>,
    settings: KafkaSettings,
    batch: usize,
    topic: &str,
) -> Result<KafkaAlone> {
    let plan = cx.plan;
    let transactions = settings.transactional_id.is_some();
    let sink: Arc<dyn Sink> = Arc::new(KafkaSink::new(settings)?);
    sink.lead();
    // The first publish creates the topic (and initializes the transactions).
    publish_all(&*sink, vec![message(topic, 0, plan.payload_bytes).1]).await?;
    let arrivals = Arrivals::start(
        cx.launcher.kafka_brokers,
        &cx.launcher.kafka_properties,
        topic,
    )?;
    // Warm-up at the first rate, unmeasured: the first transactions of a new
    // transactional id and topic are slower (a p50 of 33–40 ms at 1k/s where the next
    // runs had 5–16), and the systems get a warm-up of their own too.
    let warm_up = plan.steps[0] as usize * 2;
    let commits = open_loop(
        &sink,
        topic,
        batch,
        plan.steps[0],
        warm_up,
        1,
        plan.payload_bytes,
    )
    .await?;
    arrivals.settle(&commits, Duration::from_secs(60)).await;
    let mut steps = Vec::new();
    let mut n = 1 + warm_up;
    for &rate in &plan.steps {
        let events = (rate as f64 * plan.step_seconds).round() as usize;
        let commits = open_loop(&sink, topic, batch, rate, events, n, plan.payload_bytes).await?;
        n += events;
        let settled = arrivals.settle(&commits, Duration::from_secs(120)).await;
        settled.drained(&format!("the step at {rate}/s"))?;
        let ms = |q: f64| settled.latency.value_at_quantile(q) as f64 / 1000.0;
        steps.push(KafkaStep {
            target_rate: rate,
            events,
            p50_ms: ms(0.5),
            p99_ms: ms(0.99),
            p999_ms: ms(0.999),
            max_ms: settled.latency.max() as f64 / 1000.0,
        });
    }

    // The drain: the backlog's messages are all there at once; the relay's loop, minus
    // the database, publishes them one batch after the other.
    let events = plan.backlog_events;
    let messages: Vec<(Uuid, Message)> = (n..n + events)
        .map(|i| message(topic, i, plan.payload_bytes))
        .collect();
    let started = now_micros();
    let commits: Vec<(Uuid, u64)> = messages.iter().map(|(id, _)| (*id, started)).collect();
    let mut messages: Vec<Message> = messages.into_iter().map(|(_, m)| m).collect();
    while !messages.is_empty() {
        let rest = messages.split_off(batch.min(messages.len()));
        publish_all(&*sink, std::mem::replace(&mut messages, rest)).await?;
    }
    let settled = arrivals.settle(&commits, Duration::from_secs(300)).await;
    arrivals.stop();
    settled.drained("the drain")?;
    let seconds = settled.seconds_since(started);
    Ok(KafkaAlone {
        transactions,
        batch_size: batch,
        steps,
        drain_events: events,
        drain_seconds: seconds,
        drain_events_per_sec: events as f64 / seconds,
    })
}

/// Hands `events` messages to a publisher loop at `rate`, open loop, each stamped as it
/// is handed over; the loop publishes whatever has queued, up to `batch`, as the relay
/// does with what its fetch returns.
async fn open_loop(
    sink: &Arc<dyn Sink>,
    topic: &str,
    batch: usize,
    rate: u32,
    events: usize,
    first: usize,
    payload_bytes: usize,
) -> Result<Vec<(Uuid, u64)>> {
    let (queue, mut queued) = mpsc::unbounded_channel::<Message>();
    let publisher = {
        let sink = sink.clone();
        tokio::spawn(async move {
            let mut buffer = Vec::with_capacity(batch);
            while queued.recv_many(&mut buffer, batch).await > 0 {
                publish_all(&*sink, std::mem::take(&mut buffer)).await?;
            }
            anyhow::Ok(())
        })
    };
    let interval = Duration::from_secs_f64(1.0 / rate as f64);
    let start = tokio::time::Instant::now();
    let mut commits = Vec::with_capacity(events);
    for i in 0..events {
        tokio::time::sleep_until(start + interval * i as u32).await;
        let (id, message) = message(topic, first + i, payload_bytes);
        commits.push((id, now_micros()));
        if queue.send(message).is_err() {
            break;
        }
    }
    drop(queue);
    publisher.await??;
    Ok(commits)
}

/// Publishes a batch; every message must be delivered (the limit of a healthy broker).
async fn publish_all(sink: &dyn Sink, messages: Vec<Message>) -> Result<()> {
    let count = messages.len();
    let outcomes = sink.publish(messages).await;
    let failed: Vec<String> = outcomes
        .into_iter()
        .filter_map(|o| match o {
            DeliveryOutcome::Delivered => None,
            DeliveryOutcome::Failed(err) => Some(err.reason),
        })
        .collect();
    if let Some(reason) = failed.first() {
        bail!("{} of {count} messages failed: {reason}", failed.len());
    }
    Ok(())
}

/// The message the relay would make of the writers' `n`-th event.
fn message(topic: &str, n: usize, payload_bytes: usize) -> (Uuid, Message) {
    let id = Uuid::now_v7();
    let message = Message {
        topic: topic.to_string(),
        key: (n % 1000).to_string().into_bytes(),
        value: Some(payload(payload_bytes, n).to_string().into_bytes()),
        headers: vec![
            ("id".into(), id.to_string().into_bytes()),
            ("type".into(), b"Bench".to_vec()),
            ("aggregatetype".into(), b"order".to_vec()),
        ],
    };
    (id, message)
}

/// The writers' commit rate with nothing reading the table, for each number of events
/// per transaction the steps use, and the backlog's.
async fn postgres_alone(cx: &Context<'_>) -> Result<PostgresAlone> {
    let plan = cx.plan;
    let mut shapes: BTreeSet<usize> = plan
        .steps
        .iter()
        .map(|&rate| cx.shape.events_per_tx(rate))
        .collect();
    shapes.insert(BACKLOG_EVENTS_PER_TX);
    let db = BenchDb::create_named(
        cx.admin_url,
        cx.launcher.relay_bin,
        "postgres_alone",
        false,
        cx.shape.writers as u32,
    )
    .await?;
    let mut writers = Vec::new();
    let result = async {
        for per_tx in shapes {
            // About as many transactions for every shape: 2,000 (quick) to 10,000.
            let events = (plan.backlog_events * per_tx / BACKLOG_EVENTS_PER_TX).max(5000);
            let written = load::closed_loop(&db.pool, cx.shape, events, per_tx).await?;
            writers.push(WriterCeiling {
                events_per_tx: per_tx,
                events,
                events_per_sec: written.rate(),
            });
        }
        anyhow::Ok(())
    }
    .await;
    db.drop().await?;
    result?;
    Ok(PostgresAlone { writers })
}

/// A backlog written to a table with a slot, then decoded by PostgreSQL and read by
/// `pg_recvlogical` up to the WAL position after the last commit.
async fn stream_alone(cx: &Context<'_>) -> Result<StreamAlone> {
    let plan = cx.plan;
    let db = BenchDb::create_named(
        cx.admin_url,
        cx.launcher.relay_bin,
        "stream_alone",
        true,
        cx.shape.writers as u32,
    )
    .await?;
    let result = async {
        let events = plan.backlog_events;
        load::closed_loop(&db.pool, cx.shape, events, BACKLOG_EVENTS_PER_TX).await?;
        let end: String = sqlx::query_scalar("SELECT pg_current_wal_lsn()::text")
            .fetch_one(&db.pool)
            .await?;
        let (slot, publication): (String, String) = sqlx::query_as(
            "SELECT s.slot_name::text, p.pubname::text
             FROM pg_replication_slots s, pg_publication p
             WHERE s.database = current_database() AND s.plugin = 'pgoutput'",
        )
        .fetch_one(&db.pool)
        .await
        .context("outbox migrate --cdc made no slot and publication")?;
        let started = Instant::now();
        // The options our relay's replication client sends.
        let status = tokio::task::spawn_blocking({
            let (end, (url, password)) = (end.clone(), url_without_password(&db.url)?);
            move || {
                let mut recvlogical = Command::new("pg_recvlogical");
                // A password goes in the environment: a command line is public.
                if let Some(password) = password {
                    recvlogical.env("PGPASSWORD", password);
                }
                recvlogical
                    .args(["--no-loop", "--start", "-f", "-"])
                    .args(["-d", &url, "-S", &slot, "-E", &end])
                    .args(["-o", "proto_version=1", "-o", "messages=true"])
                    .arg("-o")
                    .arg(format!("publication_names={publication}"))
                    .stdout(Stdio::null())
                    .status()
            }
        })
        .await?
        .context("running pg_recvlogical (Debian's postgresql-client)")?;
        let seconds = started.elapsed().as_secs_f64();
        if !status.success() {
            bail!("pg_recvlogical failed ({status})");
        }
        // It stops at the end position, or early when the server hangs up: check it got
        // there.
        let reached: bool = sqlx::query_scalar(
            "SELECT confirmed_flush_lsn >= $1::text::pg_lsn FROM pg_replication_slots
             WHERE database = current_database()",
        )
        .bind(&end)
        .fetch_one(&db.pool)
        .await?;
        if !reached {
            bail!("pg_recvlogical stopped before the end of the backlog ({end})");
        }
        anyhow::Ok(StreamAlone {
            events,
            seconds,
            events_per_sec: events as f64 / seconds,
        })
    }
    .await;
    db.drop().await?;
    result
}

/// The URL without its password, and the password (percent-decoded).
fn url_without_password(url: &str) -> Result<(String, Option<String>)> {
    let mut url = url::Url::parse(url).context("the database URL is not a URL")?;
    let password = url.password().map(|p| {
        percent_encoding::percent_decode_str(p)
            .decode_utf8_lossy()
            .into_owned()
    });
    let _ = url.set_password(None);
    Ok((url.to_string(), password))
}
