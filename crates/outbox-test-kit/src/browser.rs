//! Headless Chromium (Debian's `chromium`), driven over its DevTools protocol: enough
//! to load a page, read what it shows, click and type as a person would, and take
//! screenshots.

use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use base64::Engine;
use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::net::TcpStream;
use tokio::process::{Child, Command};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

/// A headless Chromium with one page open. Killed when dropped.
pub struct Browser {
    child: Child,
    socket: WebSocketStream<MaybeTlsStream<TcpStream>>,
    session: String,
    next_id: u64,
    profile: std::path::PathBuf,
}

const COMMAND_TIMEOUT: Duration = Duration::from_secs(30);

impl Browser {
    /// Starts Chromium and opens `url` in a 1280×900 window.
    pub async fn open(url: &str) -> Result<Browser> {
        let profile =
            std::env::temp_dir().join(format!("outbox-chromium-{}", uuid::Uuid::now_v7()));
        let mut child = Command::new("chromium")
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-background-networking",
                "--disable-extensions",
                "--no-first-run",
                "--hide-scrollbars",
                "--window-size=1280,900",
                "--remote-debugging-address=127.0.0.1",
                "--remote-debugging-port=0",
            ])
            .arg(format!("--user-data-dir={}", profile.display()))
            .arg("about:blank")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .context(
                "cannot start chromium; scripts/setup installs it (apt-get install chromium)",
            )?;
        // Chromium prints its DevTools address on stderr once it listens.
        let stderr = child.stderr.take().expect("piped stderr");
        let mut lines = BufReader::new(stderr).lines();
        let address = tokio::time::timeout(COMMAND_TIMEOUT, async {
            while let Some(line) = lines.next_line().await? {
                if let Some(at) = line.find("ws://") {
                    return Ok::<_, anyhow::Error>(line[at..].trim().to_string());
                }
            }
            bail!("chromium exited before it listened for DevTools")
        })
        .await
        .map_err(|_| {
            anyhow!("chromium did not listen for DevTools within {COMMAND_TIMEOUT:?}")
        })??;
        // Keep draining stderr so that Chromium never blocks on a full pipe.
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        let (socket, _) = tokio_tungstenite::connect_async(address.as_str())
            .await
            .context("cannot connect to chromium's DevTools")?;
        let mut browser = Browser {
            child,
            socket,
            session: String::new(),
            next_id: 0,
            profile,
        };
        let target = browser
            .call("Target.createTarget", json!({ "url": "about:blank" }))
            .await?;
        let target_id = target["targetId"]
            .as_str()
            .context("no targetId")?
            .to_string();
        let attached = browser
            .call(
                "Target.attachToTarget",
                json!({ "targetId": target_id, "flatten": true }),
            )
            .await?;
        browser.session = attached["sessionId"]
            .as_str()
            .context("no sessionId")?
            .to_string();
        browser.call("Page.enable", json!({})).await?;
        browser
            .call(
                "Emulation.setDeviceMetricsOverride",
                json!({ "width": 1280, "height": 900, "deviceScaleFactor": 1, "mobile": false }),
            )
            .await?;
        browser.call("Page.navigate", json!({ "url": url })).await?;
        Ok(browser)
    }

    /// Sends a DevTools command (to the page once one is attached) and waits for its
    /// answer, skipping the events that arrive meanwhile.
    async fn call(&mut self, method: &str, params: Value) -> Result<Value> {
        self.next_id += 1;
        let id = self.next_id;
        let mut command = json!({ "id": id, "method": method, "params": params });
        if !self.session.is_empty() {
            command["sessionId"] = json!(self.session);
        }
        self.socket
            .send(Message::Text(command.to_string().into()))
            .await?;
        let deadline = Instant::now() + COMMAND_TIMEOUT;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let message = tokio::time::timeout(left, self.socket.next())
                .await
                .map_err(|_| {
                    anyhow!("{method}: no answer from chromium within {COMMAND_TIMEOUT:?}")
                })?
                .ok_or_else(|| anyhow!("{method}: chromium closed the connection"))??;
            let Message::Text(text) = message else {
                continue;
            };
            let answer: Value = serde_json::from_str(&text)?;
            if answer["id"] != json!(id) {
                continue;
            }
            if let Some(error) = answer.get("error") {
                bail!("{method}: {error}");
            }
            return Ok(answer["result"].clone());
        }
    }

    /// The value of a JavaScript expression in the page (promises awaited).
    pub async fn eval(&mut self, expression: &str) -> Result<Value> {
        let result = self
            .call(
                "Runtime.evaluate",
                json!({ "expression": expression, "returnByValue": true, "awaitPromise": true }),
            )
            .await?;
        if let Some(exception) = result.get("exceptionDetails") {
            bail!("{expression}: {exception}");
        }
        Ok(result["result"]["value"].clone())
    }

    /// The text an element shows (`""` when there is no such element).
    pub async fn text(&mut self, selector: &str) -> Result<String> {
        let expression = format!(
            "(() => {{ const e = document.querySelector({}); return e ? e.textContent : ''; }})()",
            json!(selector)
        );
        Ok(self
            .eval(&expression)
            .await?
            .as_str()
            .unwrap_or("")
            .to_string())
    }

    /// Waits until `expression` is true in the page; fails after `timeout`, saying what
    /// `describe` (another expression) shows then.
    pub async fn wait_for(
        &mut self,
        expression: &str,
        timeout: Duration,
        describe: &str,
    ) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            if self.eval(expression).await.ok() == Some(Value::Bool(true)) {
                return Ok(());
            }
            if Instant::now() > deadline {
                let shown = self.eval(describe).await.unwrap_or(Value::Null);
                bail!("after {timeout:?} the page still does not satisfy {expression}; it shows {shown}");
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Clicks the middle of the element `selector` with the mouse.
    pub async fn click(&mut self, selector: &str) -> Result<()> {
        let expression = format!(
            "(() => {{ const e = document.querySelector({}); if (!e) return null; e.scrollIntoView({{block: 'center'}}); const r = e.getBoundingClientRect(); return [r.x + r.width / 2, r.y + r.height / 2]; }})()",
            json!(selector)
        );
        let point = self.eval(&expression).await?;
        let (Some(x), Some(y)) = (point[0].as_f64(), point[1].as_f64()) else {
            bail!("no element {selector} to click");
        };
        for kind in ["mousePressed", "mouseReleased"] {
            self.call(
                "Input.dispatchMouseEvent",
                json!({ "type": kind, "x": x, "y": y, "button": "left", "clickCount": 1 }),
            )
            .await?;
        }
        Ok(())
    }

    /// Clicks into the field `selector`, clears it and types `text`.
    pub async fn type_into(&mut self, selector: &str, text: &str) -> Result<()> {
        self.click(selector).await?;
        self.eval(&format!(
            "document.querySelector({}).select()",
            json!(selector)
        ))
        .await?;
        self.call("Input.insertText", json!({ "text": text }))
            .await?;
        Ok(())
    }

    /// Saves a PNG of the whole page.
    pub async fn screenshot(&mut self, path: &Path) -> Result<()> {
        let shot = self
            .call(
                "Page.captureScreenshot",
                json!({ "format": "png", "captureBeyondViewport": true }),
            )
            .await?;
        let png = base64::engine::general_purpose::STANDARD
            .decode(shot["data"].as_str().context("no screenshot data")?)?;
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        std::fs::write(path, png).with_context(|| format!("cannot write {}", path.display()))?;
        Ok(())
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = self.child.start_kill();
        let _ = std::fs::remove_dir_all(&self.profile);
    }
}
