//! The status page, as an operator sees it: headless Chromium loads `/status` from a
//! running relay (a standby beside it) while events flow, while an event retries, then
//! after a dead letter, then retries the dead letter with the page's button. Screenshots of each moment go
//! to `target/status-page/`.

mod common;

use std::path::PathBuf;
use std::time::Duration;

use common::*;
use outbox::TableRef;
use outbox_relay::config::{StatusPageSettings, StatusToken};
use outbox_test_kit::browser::Browser;
use uuid::Uuid;

const WAIT: Duration = Duration::from_secs(90);
const TOKEN: &str = "status-page-token-0123456789";

for_each_mode!(the_status_page_shows_a_running_relay_and_retries_a_dead_letter,);

fn screenshot_path(mode: Mode, moment: &str) -> PathBuf {
    repo_root()
        .join("target/status-page")
        .join(format!("{}-{moment}.png", mode_name(mode)))
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

async fn the_status_page_shows_a_running_relay_and_retries_a_dead_letter(mode: Mode) {
    let db = TestDb::for_mode(mode).await;
    let port = free_port();
    // Topics are not created on demand, so an aggregate whose topic is missing retries.
    let settings = "[topics]\ncreate = false\n";
    create_topic(&db.topic("order")).await;
    let mut config = db.relay_config_for(mode, settings);
    config.http_listen = Some(format!("127.0.0.1:{port}").parse().unwrap());
    config.status_page = Some(StatusPageSettings {
        token: Some(StatusToken::new(TOKEN)),
    });
    let relay = InProcessRelay::start(config);
    // The page's relay leads; a second one waits beside it as a standby.
    wait_until_active(port).await;
    let standby = InProcessRelay::start(db.relay_config_for(mode, settings));

    let mut browser = Browser::open(&format!("http://127.0.0.1:{port}/status"))
        .await
        .unwrap();

    // Events flow for about eight seconds: 32 transactions of 25 events.
    let mut ids = Vec::new();
    for round in 0..32 {
        let events: Vec<_> = (0..25)
            .map(|n| event("order", &format!("{}", n % 5), round * 25 + n))
            .collect();
        ids.extend(events.iter().map(|e| e.id));
        db.write(&events).await;
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let describe = "document.querySelector('header').innerText + ' | ' + document.getElementById('relays').innerText + ' | published ' + document.getElementById('published-total').textContent + ' | points ' + document.getElementById('rate-line').getAttribute('points')";
    browser
        .wait_for(
            "Number(document.getElementById('published-total').textContent) >= 400 && document.getElementById('rate-line').getAttribute('points').split(' ').length >= 3 && Number(document.getElementById('rate-now').textContent) > 0",
            WAIT,
            describe,
        )
        .await
        .unwrap();
    browser
        .screenshot(&screenshot_path(mode, "flowing"))
        .await
        .unwrap();
    assert_eq!(browser.text("#mode").await.unwrap(), mode_name(mode));
    assert_eq!(browser.text("#table").await.unwrap(), "public.outbox");
    assert_eq!(browser.text("#role").await.unwrap(), "active");
    let relays: Vec<String> = serde_json::from_value(
        browser
            .eval("[...document.querySelectorAll('#relays li')].map(li => li.textContent)")
            .await
            .unwrap(),
    )
    .unwrap();
    assert_eq!(
        relays.len(),
        2,
        "one active relay and one standby: {relays:?}"
    );
    assert!(relays[0].starts_with("active"), "{relays:?}");
    assert!(relays[1].starts_with("standby"), "{relays:?}");
    // `outbox status` names the same two sessions.
    let status: serde_json::Value = serde_json::from_str(&cli(&db, &["status", "--json"])).unwrap();
    let standbys = status["standby_relays"].as_array().unwrap();
    assert_eq!(standbys.len(), 1, "{status}");
    let pid = |relay: &serde_json::Value| format!("backend pid {} ", relay["pid"]);
    assert!(
        relays[0].contains(&pid(&status["active_relay"])),
        "{relays:?} {status}"
    );
    assert!(
        relays[1].contains(&pid(&standbys[0])),
        "{relays:?} {status}"
    );
    if mode == Mode::Cdc {
        let lag = browser.text("#slot-lag").await.unwrap();
        assert!(lag.ends_with('B'), "the slot's lag in bytes: {lag:?}");
    } else {
        assert!(!browser
            .eval("document.getElementById('pending-figure').hidden")
            .await
            .unwrap()
            .as_bool()
            .unwrap());
    }
    consume_ids(vec![db.topic("order")], &ids, WAIT).await;

    // An event whose topic does not exist is not delivered: the page says why. Polling
    // also lists it as retrying (it waits in the table for its next attempt; CDC
    // retries it in memory).
    let stuck = event("missing", "m", 0);
    let stuck_id = stuck.id;
    db.write(&[stuck]).await;
    browser
        .wait_for(
            "document.getElementById('delivery-reason').textContent.includes('does not exist and topics.create = false')",
            WAIT,
            "document.getElementById('relays').parentElement.innerText",
        )
        .await
        .unwrap();
    assert!(browser
        .text("#delivery")
        .await
        .unwrap()
        .starts_with("failing since"));
    let delivery = browser.text("#delivery-reason").await.unwrap();
    assert!(delivery.contains(&db.topic("missing")), "{delivery}");
    if mode == Mode::Polling {
        let row = format!("#retrying tr[data-id='{stuck_id}']");
        browser
            .wait_for(
                &format!("document.querySelector(\"{row} td.reason\") !== null && document.getElementById('retrying-count').textContent !== '0'"),
                WAIT,
                "document.getElementById('retrying').innerText",
            )
            .await
            .unwrap();
        let shown = browser.text(&format!("{row} td.reason")).await.unwrap();
        let recorded: Option<String> =
            sqlx::query_scalar("SELECT last_error FROM outbox WHERE id = $1")
                .bind(stuck_id)
                .fetch_one(&db.pool)
                .await
                .unwrap();
        assert_eq!(Some(shown), recorded, "the page shows the recorded error");
    }
    browser
        .screenshot(&screenshot_path(mode, "retrying"))
        .await
        .unwrap();
    create_topic(&db.topic("missing")).await;
    consume_ids(vec![db.topic("missing")], &[stuck_id], WAIT).await;
    browser
        .wait_for(
            "document.getElementById('retrying-count').textContent === '0' && document.getElementById('delivery').textContent === 'ok'",
            WAIT,
            "document.getElementById('retrying').innerText + ' | delivery ' + document.getElementById('delivery').textContent",
        )
        .await
        .unwrap();
    assert_eq!(
        browser.text("#retrying tbody td").await.unwrap(),
        "nothing retrying"
    );

    // A row whose headers the relay cannot read becomes a dead letter and parks its
    // aggregate.
    let table = TableRef::default();
    let broken = insert_raw(&db.pool, &table, "broken-7", Some(r#"{"n": 1e400}"#)).await;
    let row = format!("#dead-letters tr[data-id='{broken}']");
    browser
        .wait_for(
            &format!("document.querySelector(\"{row}\") !== null && document.getElementById('dead-letter-count').textContent === '1'"),
            WAIT,
            "document.getElementById('dead-letters').innerText + ' | count ' + document.getElementById('dead-letter-count').textContent",
        )
        .await
        .unwrap();
    let reason = browser.text(&format!("{row} td.reason")).await.unwrap();
    let (_, recorded) = dead_letter(&db, broken).await;
    assert_eq!(reason, recorded, "the page shows the recorded reason");
    assert!(reason.contains("headers"), "{reason}");
    assert_eq!(browser.text("#parked").await.unwrap(), "1");
    browser
        .screenshot(&screenshot_path(mode, "dead-letter"))
        .await
        .unwrap();

    // A wrong token is refused, and the dead letter stays as it was.
    let before = dead_lettered_at(&db, broken).await;
    browser
        .type_into("#token", "not-the-token-at-all")
        .await
        .unwrap();
    browser.click(&format!("{row} button.retry")).await.unwrap();
    browser
        .wait_for(
            "document.getElementById('message').textContent.startsWith('not retried')",
            WAIT,
            "document.getElementById('message').textContent",
        )
        .await
        .unwrap();
    let message = browser.text("#message").await.unwrap();
    assert!(message.contains("token"), "{message}");
    assert_eq!(dead_lettered_at(&db, broken).await, before, "untouched");
    assert!(before.is_some());

    // The operator fixes the row, then retries it from the page.
    sqlx::query("UPDATE outbox SET headers = '{\"n\": 1}' WHERE id = $1")
        .bind(broken)
        .execute(&db.pool)
        .await
        .unwrap();
    browser.type_into("#token", TOKEN).await.unwrap();
    browser.click(&format!("{row} button.retry")).await.unwrap();
    browser
        .wait_for(
            "document.getElementById('message').textContent.startsWith('queued')",
            WAIT,
            "document.getElementById('message').textContent",
        )
        .await
        .unwrap();
    // consume_ids fails unless the retried event reaches the broker.
    consume_ids(vec![db.topic("order")], &[broken], WAIT).await;
    browser
        .wait_for(
            "document.getElementById('dead-letter-count').textContent === '0' && document.getElementById('parked').textContent === '0'",
            WAIT,
            "document.getElementById('dead-letters').innerText",
        )
        .await
        .unwrap();
    assert_eq!(
        browser.text("#dead-letters tbody td").await.unwrap(),
        "no dead letters"
    );
    browser
        .screenshot(&screenshot_path(mode, "retried"))
        .await
        .unwrap();
    for moment in ["flowing", "retrying", "dead-letter", "retried"] {
        let png = std::fs::read(screenshot_path(mode, moment)).unwrap();
        assert!(
            png.starts_with(b"\x89PNG") && png.len() > 10_000,
            "{moment}: a real screenshot"
        );
    }

    drop(browser);
    standby.stop().await;
    relay.stop().await;
    db.drop_db().await;
}

/// Without the token setting, the page is read-only: the API refuses every retry and
/// the dead letter stays. Off by default, the page is not served at all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_status_page_is_off_by_default_and_read_only_without_a_token() {
    let db = TestDb::new().await;
    let port = free_port();
    let mut config = db.relay_config("");
    config.http_listen = Some(format!("127.0.0.1:{port}").parse().unwrap());
    assert!(config.status_page.is_none(), "off by default");
    let relay = InProcessRelay::start(config);
    wait_until_active(port).await;
    let page = http_get(port, "/status").await;
    assert!(page.starts_with("HTTP/1.1 404"), "{page}");
    relay.stop().await;

    let mut config = db.relay_config("");
    config.http_listen = Some(format!("127.0.0.1:{port}").parse().unwrap());
    config.status_page = Some(StatusPageSettings { token: None });
    let relay = InProcessRelay::start(config);
    let table = TableRef::default();
    let broken: Uuid = insert_raw(&db.pool, &table, "1", Some(r#"{"n": 1e400}"#)).await;
    dead_letter(&db, broken).await;
    let before = dead_lettered_at(&db, broken).await;
    let api = http_get(port, "/status/api").await;
    assert!(api.contains("\"retry_enabled\":false"), "{api}");
    let refused = http_request(
        port,
        "POST",
        &format!("/status/api/dead-letters/{broken}/retry"),
        &format!("Authorization: Bearer {TOKEN}\r\n"),
    )
    .await;
    assert!(refused.starts_with("HTTP/1.1 403"), "{refused}");
    assert!(refused.contains("http.status_token"), "{refused}");
    assert_eq!(dead_lettered_at(&db, broken).await, before, "untouched");
    relay.stop().await;
    db.drop_db().await;
}

/// Waits until the relay serving on `port` says it is the active one.
async fn wait_until_active(port: u16) {
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        let listening = tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_ok();
        if listening && http_get(port, "/healthz").await.contains("role=active") {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the relay never became active"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// When the row was dead-lettered, as text (a retry deletes and inserts it again).
async fn dead_lettered_at(db: &TestDb, id: Uuid) -> Option<String> {
    sqlx::query_scalar("SELECT dead_lettered_at::text FROM outbox WHERE id = $1")
        .bind(id)
        .fetch_one(&db.pool)
        .await
        .unwrap()
}
