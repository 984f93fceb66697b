//! What survived: the database's committed rows against what the independent consumer
//! read from Kafka. Pure, so that the arithmetic is unit-tested.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use uuid::Uuid;

/// A row the database holds at the end (committed for certain).
#[derive(Debug, Clone)]
pub struct CommittedRow {
    pub id: Uuid,
    pub dead_lettered: bool,
}

/// One message the consumer read, in its partition's order.
#[derive(Debug, Clone)]
pub struct Arrival {
    pub id: Uuid,
    pub aggregate: String,
    pub n: i64,
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
    /// When a producer handed it to its client (Kafka's CreateTime), in ms since 1970.
    pub produced_ms: i64,
    /// When the consumer read it, from the scenario's start.
    pub at: Duration,
}

/// A commit the writers saw succeed, for the recovery time.
#[derive(Debug, Clone, Copy)]
pub struct CommitTime {
    pub id: Uuid,
    pub at: Duration,
}

#[derive(Debug, Default, Clone, PartialEq)]
pub struct Score {
    /// Rows committed (the database's truth at the end).
    pub events: u64,
    /// Committed rows never read from Kafka (dead letters excluded: counted apart).
    pub lost: u64,
    /// Committed rows the relay dead-lettered.
    pub dead_lettered: u64,
    /// First copies of an event that arrived after a newer event of its aggregate.
    pub reorder: u64,
    /// Repeated copies that arrived after a newer event of their aggregate.
    pub stale: u64,
    /// Copies beyond the first.
    pub dup: u64,
    /// Messages whose id is not a committed row (a rolled-back transaction published).
    pub phantom: u64,
    /// Messages written after a message of their partition produced more than
    /// [`ZOMBIE_SLACK_MS`] later: a relay's write that landed after its successor's (one
    /// producer writes a partition in the order it produced).
    pub zombie: u64,
}

/// How far back a message's CreateTime may lie behind an earlier one of its partition
/// before it counts as a zombie write.
pub const ZOMBIE_SLACK_MS: i64 = 1_000;

impl Score {
    pub fn failed(&self) -> bool {
        self.lost > 0 || self.reorder > 0 || self.phantom > 0 || self.zombie > 0
    }
}

/// Scores `arrivals` (any order; sorted here by partition position) against `rows`.
pub fn score(rows: &[CommittedRow], arrivals: &[Arrival]) -> Score {
    let committed: HashSet<Uuid> = rows.iter().map(|r| r.id).collect();
    let mut arrivals: Vec<&Arrival> = arrivals.iter().collect();
    arrivals
        .sort_by(|a, b| (&a.topic, a.partition, a.offset).cmp(&(&b.topic, b.partition, b.offset)));
    let mut seen: HashSet<Uuid> = HashSet::new();
    let mut newest: HashMap<&str, i64> = HashMap::new();
    let mut latest_produced: HashMap<(&str, i32), i64> = HashMap::new();
    let mut score = Score {
        events: rows.len() as u64,
        ..Score::default()
    };
    for arrival in arrivals {
        let latest = latest_produced
            .entry((arrival.topic.as_str(), arrival.partition))
            .or_insert(i64::MIN);
        if arrival.produced_ms < latest.saturating_sub(ZOMBIE_SLACK_MS) {
            score.zombie += 1;
        }
        *latest = (*latest).max(arrival.produced_ms);
        if !committed.contains(&arrival.id) {
            score.phantom += 1;
            continue;
        }
        let newest_n = newest.entry(arrival.aggregate.as_str()).or_insert(i64::MIN);
        let behind = arrival.n < *newest_n;
        if !seen.insert(arrival.id) {
            score.dup += 1;
            if behind {
                score.stale += 1;
            }
            continue;
        }
        if behind {
            score.reorder += 1;
        }
        *newest_n = (*newest_n).max(arrival.n);
    }
    for row in rows {
        if !seen.contains(&row.id) {
            if row.dead_lettered {
                score.dead_lettered += 1;
            } else {
                score.lost += 1;
            }
        }
    }
    score
}

/// Seconds from `fault_end` until the lag is below one second: the first moment `t`
/// from which on every event committed by `t - 1s` has been read by `t`. `None` when
/// that was still not so when the consumer stopped reading (`observed_until`).
pub fn recovery(
    fault_end: Duration,
    observed_until: Duration,
    commits: &[CommitTime],
    arrivals: &[Arrival],
) -> Option<f64> {
    let mut first_arrival: HashMap<Uuid, Duration> = HashMap::new();
    for arrival in arrivals {
        first_arrival
            .entry(arrival.id)
            .and_modify(|at| *at = (*at).min(arrival.at))
            .or_insert(arrival.at);
    }
    // (commit time, first arrival) in commit order, with the running maximum of the
    // arrivals: the lag condition at `t` is "max arrival of commits <= t - 1s  <=  t".
    let mut events: Vec<(Duration, Duration)> = commits
        .iter()
        .map(|c| {
            (
                c.at,
                first_arrival.get(&c.id).copied().unwrap_or(Duration::MAX),
            )
        })
        .collect();
    events.sort();
    let mut running = Vec::with_capacity(events.len());
    let mut max = Duration::ZERO;
    for (_, arrived) in &events {
        max = max.max(*arrived);
        running.push(max);
    }
    let end = observed_until.max(fault_end);
    let lag_ok = |t: Duration| {
        let cutoff = t.saturating_sub(Duration::from_secs(1));
        let committed = events.partition_point(|(at, _)| *at <= cutoff);
        committed == 0 || running[committed - 1] <= t
    };
    // The condition can only turn false again when a newer commit is late, so take the
    // last moment it was false, stepping by 10 ms.
    let step = Duration::from_millis(10);
    let mut t = fault_end;
    let mut last_bad: Option<Duration> = None;
    while t <= end {
        if !lag_ok(t) {
            last_bad = Some(t);
        }
        t += step;
    }
    match last_bad {
        None => Some(0.0),
        Some(bad) if bad + step > end => None,
        Some(bad) => Some((bad + step - fault_end).as_secs_f64()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A committed row and the message that carries it.
    fn row(aggregate: &str, n: i64) -> (CommittedRow, Arrival) {
        let id = Uuid::from_u128(((aggregate.len() as u128) << 64) | n as u128);
        let row = CommittedRow {
            id,
            dead_lettered: false,
        };
        let message = Arrival {
            id,
            aggregate: aggregate.into(),
            n,
            topic: "t".into(),
            partition: 0,
            offset: 0,
            produced_ms: 0,
            at: Duration::ZERO,
        };
        (row, message)
    }

    fn arrival(row: &(CommittedRow, Arrival), offset: i64) -> Arrival {
        Arrival {
            id: row.0.id,
            aggregate: row.1.aggregate.clone(),
            n: row.1.n,
            topic: "t".into(),
            partition: 0,
            offset,
            produced_ms: offset * 10,
            at: Duration::from_millis(offset as u64),
        }
    }

    #[test]
    fn clean_delivery_scores_zero() {
        let rows: Vec<_> = (0..5).map(|n| row("a", n)).collect();
        let arrivals: Vec<_> = rows
            .iter()
            .enumerate()
            .map(|(i, r)| arrival(r, i as i64))
            .collect();
        let committed: Vec<_> = rows.iter().map(|r| r.0.clone()).collect();
        let score = score(&committed, &arrivals);
        assert_eq!(
            score,
            Score {
                events: 5,
                ..Score::default()
            }
        );
        assert!(!score.failed());
    }

    #[test]
    fn loss_reorder_stale_duplicate_and_phantom_are_told_apart() {
        let rows: Vec<_> = (0..4).map(|n| row("a", n)).collect();
        let phantom = row("bb", 9);
        let arrivals = vec![
            arrival(&rows[0], 0),
            arrival(&rows[2], 1),
            arrival(&rows[1], 2), // first copy after a newer one: reorder
            arrival(&rows[2], 3), // a copy of the newest: duplicate, not stale
            arrival(&rows[0], 4), // a copy of an older one after newer: stale
            arrival(&phantom, 5),
            // rows[3] never arrives: lost
        ];
        let committed: Vec<_> = rows.iter().map(|r| r.0.clone()).collect();
        let score = score(&committed, &arrivals);
        assert_eq!(
            score,
            Score {
                events: 4,
                lost: 1,
                dead_lettered: 0,
                reorder: 1,
                stale: 1,
                dup: 2,
                phantom: 1,
                zombie: 0,
            }
        );
        assert!(score.failed());
    }

    #[test]
    fn a_write_produced_long_before_its_predecessor_is_a_zombie() {
        let rows: Vec<_> = (0..3).map(|n| row("a", n)).collect();
        let mut arrivals: Vec<_> = rows
            .iter()
            .enumerate()
            .map(|(i, r)| arrival(r, i as i64))
            .collect();
        // The old relay's copy of event 0, produced at 5 ms, lands after the successor
        // wrote event 2 produced at 3 s.
        arrivals[2].produced_ms = 3_000;
        let mut late = arrival(&rows[0], 3);
        late.produced_ms = 5;
        arrivals.push(late);
        // Within the slack, a step back is no zombie (clocks, batches).
        let mut close = arrival(&rows[2], 4);
        close.produced_ms = 2_500;
        arrivals.push(close);
        let committed: Vec<_> = rows.iter().map(|r| r.0.clone()).collect();
        let score = score(&committed, &arrivals);
        assert_eq!(score.zombie, 1);
        assert!(score.failed());
        // Another partition has its own order.
        arrivals[3].partition = 1;
        assert_eq!(super::score(&committed, &arrivals).zombie, 0);
    }

    #[test]
    fn a_dead_letter_is_not_a_loss() {
        let mut dead = row("a", 0).0;
        dead.dead_lettered = true;
        let score = score(&[dead], &[]);
        assert_eq!((score.lost, score.dead_lettered), (0, 1));
    }

    #[test]
    fn recovery_is_the_time_until_the_lag_stays_below_a_second() {
        let ms = Duration::from_millis;
        let id = |n| Uuid::from_u128(n);
        let commits = vec![
            CommitTime {
                id: id(1),
                at: ms(1_000),
            },
            CommitTime {
                id: id(2),
                at: ms(2_000),
            },
            CommitTime {
                id: id(3),
                at: ms(9_000),
            },
        ];
        let at = |n, t| Arrival {
            id: id(n),
            aggregate: "a".into(),
            n: n as i64,
            topic: "t".into(),
            partition: 0,
            offset: n as i64,
            produced_ms: 0,
            at: ms(t),
        };
        // The fault ends at 3 s; event 2 (committed at 2 s) arrives at 5 s: the lag is
        // above a second until 5 s, 2 s after the fault.
        let arrivals = vec![at(1, 1_010), at(2, 5_000), at(3, 9_010)];
        let recovered = recovery(ms(3_000), ms(12_000), &commits, &arrivals).unwrap();
        assert!((recovered - 2.0).abs() < 0.02, "{recovered}");
        // Never caught up: event 3 never arrives.
        let arrivals = vec![at(1, 1_010), at(2, 5_000)];
        assert_eq!(recovery(ms(3_000), ms(12_000), &commits, &arrivals), None);
        // No lag at all after the fault.
        let arrivals = vec![at(1, 1_010), at(2, 2_010), at(3, 9_010)];
        assert_eq!(
            recovery(ms(3_000), ms(12_000), &commits, &arrivals),
            Some(0.0)
        );
    }
}
