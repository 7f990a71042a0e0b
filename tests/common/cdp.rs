//! A headless Chromium driven over the DevTools protocol, for tests of the status page
//! in a real browser. Chromium's `--remote-debugging-port=0` picks a free port and says
//! which in `<user-data-dir>/DevToolsActivePort`; the protocol is JSON over a
//! WebSocket, spoken here by a minimal client (text frames out, masked; frames in,
//! fragmented or not; ping answered), which is all a test needs — no crate for it.

use std::collections::HashMap;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;
use tokio::sync::oneshot;

use super::{need, owned_command, Proc};

/// Chromium's flags for a headless run as root in a container: no sandbox, no GPU, and
/// nothing that phones home.
const FLAGS: &[&str] = &[
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
    "--remote-debugging-port=0",
];

type Pending = Arc<Mutex<HashMap<u64, oneshot::Sender<Value>>>>;

/// A WebSocket to one DevTools target.
pub struct Session {
    writer: tokio::sync::Mutex<OwnedWriteHalf>,
    pending: Pending,
    next: std::sync::atomic::AtomicU64,
    /// Every event received, in order.
    pub events: Arc<Mutex<Vec<Value>>>,
    reader: tokio::task::JoinHandle<()>,
}

impl Drop for Session {
    fn drop(&mut self) {
        self.reader.abort();
    }
}

impl Session {
    async fn connect(port: u16, path: &str) -> Session {
        let stream = TcpStream::connect(("127.0.0.1", port))
            .await
            .expect("connect to Chromium's DevTools port");
        let (mut r, mut w) = stream.into_split();
        let req = format!(
            "GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: cG9ydG9sYW4tdGVzdC1rZXk=\r\nSec-WebSocket-Version: 13\r\n\r\n"
        );
        w.write_all(req.as_bytes()).await.expect("handshake");
        let mut head = Vec::new();
        let mut byte = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") {
            r.read_exact(&mut byte).await.expect("handshake answer");
            head.push(byte[0]);
        }
        let head = String::from_utf8_lossy(&head);
        assert!(
            head.starts_with("HTTP/1.1 101"),
            "DevTools refused the WebSocket: {head}"
        );
        let pending: Pending = Default::default();
        let events: Arc<Mutex<Vec<Value>>> = Default::default();
        let writer = tokio::sync::Mutex::new(w);
        let reader = tokio::spawn(read_loop(r, pending.clone(), events.clone()));
        Session {
            writer,
            pending,
            next: 1.into(),
            events,
            reader,
        }
    }

    /// Sends `method` and waits (bounded) for its result; panics on a protocol error.
    pub async fn call(&self, method: &str, params: Value) -> Value {
        let id = self.next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        self.pending.lock().unwrap().insert(id, tx);
        let msg = json!({"id": id, "method": method, "params": params}).to_string();
        {
            let mut w = self.writer.lock().await;
            w.write_all(&frame(msg.as_bytes()))
                .await
                .expect("send to DevTools");
        }
        let answer = tokio::time::timeout(Duration::from_secs(30), rx)
            .await
            .unwrap_or_else(|_| panic!("DevTools did not answer {method} within 30 s"))
            .expect("DevTools connection closed");
        if let Some(e) = answer.get("error") {
            panic!("DevTools {method}: {e}");
        }
        answer["result"].clone()
    }

    /// Evaluates `expr` in the page; its value (JSON).
    pub async fn eval(&self, expr: &str) -> Value {
        let r = self
            .call(
                "Runtime.evaluate",
                json!({"expression": expr, "returnByValue": true, "awaitPromise": true}),
            )
            .await;
        if let Some(e) = r.get("exceptionDetails") {
            panic!("{expr}: {e}");
        }
        r["result"]["value"].clone()
    }

    /// Events of `method` seen so far.
    pub fn events_of(&self, method: &str) -> Vec<Value> {
        self.events
            .lock()
            .unwrap()
            .iter()
            .filter(|e| e["method"] == method)
            .cloned()
            .collect()
    }
}

/// One client frame: FIN, text, masked (clients must mask).
fn frame(payload: &[u8]) -> Vec<u8> {
    let mut out = vec![0x81u8];
    let len = payload.len();
    if len < 126 {
        out.push(0x80 | len as u8);
    } else if len <= u16::MAX as usize {
        out.push(0x80 | 126);
        out.extend_from_slice(&(len as u16).to_be_bytes());
    } else {
        out.push(0x80 | 127);
        out.extend_from_slice(&(len as u64).to_be_bytes());
    }
    let mask = [0x37u8, 0xfa, 0x21, 0x3d];
    out.extend_from_slice(&mask);
    out.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    out
}

async fn read_loop(mut r: OwnedReadHalf, pending: Pending, events: Arc<Mutex<Vec<Value>>>) {
    let mut message = Vec::new();
    loop {
        let mut h = [0u8; 2];
        if r.read_exact(&mut h).await.is_err() {
            return;
        }
        let (fin, opcode) = (h[0] & 0x80 != 0, h[0] & 0x0f);
        let mut len = (h[1] & 0x7f) as u64;
        if len == 126 {
            let mut b = [0u8; 2];
            if r.read_exact(&mut b).await.is_err() {
                return;
            }
            len = u16::from_be_bytes(b) as u64;
        } else if len == 127 {
            let mut b = [0u8; 8];
            if r.read_exact(&mut b).await.is_err() {
                return;
            }
            len = u64::from_be_bytes(b);
        }
        let mut payload = vec![0u8; len as usize];
        if r.read_exact(&mut payload).await.is_err() {
            return;
        }
        match opcode {
            0x8 => return,
            // Pings are not answered: Chromium's DevTools server does not send them.
            0x9 | 0xA => continue,
            _ => message.extend_from_slice(&payload),
        }
        if !fin {
            continue;
        }
        let Ok(v) = serde_json::from_slice::<Value>(&message) else {
            message.clear();
            continue;
        };
        message.clear();
        match v.get("id").and_then(Value::as_u64) {
            Some(id) => {
                if let Some(tx) = pending.lock().unwrap().remove(&id) {
                    let _ = tx.send(v);
                }
            }
            None => events.lock().unwrap().push(v),
        }
    }
}

/// A headless Chromium of this test's own, with one page open.
pub struct Browser {
    pub proc: Proc,
    pub dir: tempfile::TempDir,
    port: u16,
    pub browser: Session,
    pub page: Session,
}

impl Browser {
    /// Starts Chromium and opens a blank page, with the Runtime, Log and Page domains on.
    pub async fn start() -> Browser {
        need("chromium", "chromium");
        let dir = tempfile::tempdir().expect("chromium profile dir");
        let mut cmd = owned_command("chromium");
        cmd.args(FLAGS)
            .arg(format!("--user-data-dir={}", dir.path().display()))
            .arg("about:blank")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        let proc = Proc::spawn("chromium", &mut cmd);
        let file = dir.path().join("DevToolsActivePort");
        let mut active = String::new();
        super::wait_until(
            "Chromium's DevToolsActivePort file",
            Duration::from_secs(30),
            || {
                active = std::fs::read_to_string(&file).unwrap_or_default();
                let ready = active.lines().count() >= 2;
                async move { ready }
            },
        )
        .await;
        let mut lines = active.lines();
        let port: u16 = lines.next().unwrap().trim().parse().expect("DevTools port");
        let path = lines.next().unwrap().trim().to_string();
        let browser = Session::connect(port, &path).await;
        let target = browser
            .call("Target.createTarget", json!({"url": "about:blank"}))
            .await;
        let id = target["targetId"].as_str().expect("targetId").to_string();
        let page = Session::connect(port, &format!("/devtools/page/{id}")).await;
        for domain in ["Runtime.enable", "Log.enable", "Page.enable"] {
            page.call(domain, json!({})).await;
        }
        Browser {
            proc,
            dir,
            port,
            browser,
            page,
        }
    }

    /// Sets the viewport (CSS pixels).
    pub async fn viewport(&self, width: u32, height: u32, mobile: bool) {
        self.page
            .call(
                "Emulation.setDeviceMetricsOverride",
                json!({"width": width, "height": height, "deviceScaleFactor": 1, "mobile": mobile}),
            )
            .await;
    }

    /// Loads `url` and waits for the document to be complete.
    pub async fn open(&self, url: &str) {
        self.page.call("Page.navigate", json!({"url": url})).await;
        let page = &self.page;
        super::wait_until("the page to load", Duration::from_secs(20), || async {
            page.eval("document.readyState").await == "complete"
        })
        .await;
    }

    /// A PNG of the whole page.
    pub async fn screenshot(&self) -> Vec<u8> {
        let r = self
            .page
            .call(
                "Page.captureScreenshot",
                json!({"format": "png", "captureBeyondViewport": true}),
            )
            .await;
        base64_decode(r["data"].as_str().expect("screenshot data"))
    }

    /// Console errors, uncaught exceptions and failed loads the page reported.
    pub fn errors(&self) -> Vec<String> {
        let mut out = Vec::new();
        for e in self.page.events_of("Runtime.exceptionThrown") {
            out.push(format!("exception: {}", e["params"]["exceptionDetails"]));
        }
        for e in self.page.events_of("Runtime.consoleAPICalled") {
            if e["params"]["type"] == "error" || e["params"]["type"] == "assert" {
                out.push(format!("console.error: {}", e["params"]["args"]));
            }
        }
        for e in self.page.events_of("Log.entryAdded") {
            if e["params"]["entry"]["level"] == "error" {
                out.push(format!("log: {}", e["params"]["entry"]["text"]));
            }
        }
        out
    }

    /// Closes the browser and waits for it to exit; killed by PID if it does not.
    pub async fn close(mut self) {
        let _ = tokio::time::timeout(
            Duration::from_secs(5),
            self.browser.call("Browser.close", json!({})),
        )
        .await;
        if self.proc.wait_exit(Duration::from_secs(10)).is_none() {
            eprintln!("chromium did not exit within 10 s of Browser.close: killing it");
            self.proc.kill();
        }
    }
}

/// Standard base64 (the screenshot), padding and all.
fn base64_decode(s: &str) -> Vec<u8> {
    let val = |c: u8| match c {
        b'A'..=b'Z' => Some(c - b'A'),
        b'a'..=b'z' => Some(c - b'a' + 26),
        b'0'..=b'9' => Some(c - b'0' + 52),
        b'+' => Some(62),
        b'/' => Some(63),
        _ => None,
    };
    let mut out = Vec::with_capacity(s.len() * 3 / 4);
    let (mut acc, mut bits) = (0u32, 0);
    for v in s.bytes().filter_map(val) {
        acc = (acc << 6) | v as u32;
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
        }
    }
    out
}
