//! Routes through the real front door (etcd, the watcher, HAProxy with the shipped
//! template): extra hosts, wildcards, path prefixes (longest wins, strip), allow-lists,
//! a TCP listen port, TLS passthrough by SNI, sticky cookies across a runtime-added
//! server, and two services claiming one host. Instances are hand-written records.
mod common;

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use common::haproxy::{Backend, FrontDoor, Options};
use common::*;

const T: Duration = Duration::from_secs(15);

/// An HTTP server answering `<name> <path as received>`, so a test sees which backend
/// answered and what path reached it. Stops when the task is aborted (on drop).
struct Echo {
    addr: std::net::SocketAddr,
    task: tokio::task::JoinHandle<()>,
}

impl Echo {
    async fn start(name: &str) -> Echo {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let n = name.to_string();
        let task = tokio::spawn(async move {
            loop {
                let Ok((mut s, _)) = l.accept().await else {
                    continue;
                };
                let n = n.clone();
                tokio::spawn(async move {
                    let mut buf = Vec::new();
                    let mut chunk = [0u8; 4096];
                    while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
                        match s.read(&mut chunk).await {
                            Ok(0) | Err(_) => return,
                            Ok(k) => buf.extend_from_slice(&chunk[..k]),
                        }
                    }
                    let text = String::from_utf8_lossy(&buf);
                    let path = text.split_whitespace().nth(1).unwrap_or("?").to_string();
                    let body = format!("{n} {path}");
                    let resp = format!(
                        "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                        body.len()
                    );
                    let _ = s.write_all(resp.as_bytes()).await;
                });
            }
        });
        Echo { addr, task }
    }

    /// A hand-written record with these route options (a JSON object, or "").
    fn record(&self, route: &str) -> String {
        if route.is_empty() {
            format!(r#"{{"addr":"{}"}}"#, self.addr)
        } else {
            format!(r#"{{"addr":"{}","route":{route}}}"#, self.addr)
        }
    }
}

impl Drop for Echo {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// One request: (status, headers, body). `headers`: extra request header lines.
async fn request(
    addr: &str,
    host: &str,
    path: &str,
    headers: &str,
) -> Option<(u16, String, String)> {
    let fut = async {
        let mut s = tokio::net::TcpStream::connect(addr).await.ok()?;
        let req =
            format!("GET {path} HTTP/1.1\r\nHost: {host}\r\n{headers}Connection: close\r\n\r\n");
        s.write_all(req.as_bytes()).await.ok()?;
        let mut buf = Vec::new();
        s.read_to_end(&mut buf).await.ok()?;
        let text = String::from_utf8_lossy(&buf).to_string();
        let status = text.split_whitespace().nth(1)?.parse().ok()?;
        let (head, body) = text.split_once("\r\n\r\n")?;
        Some((status, head.to_string(), body.to_string()))
    };
    tokio::time::timeout(Duration::from_secs(3), fut)
        .await
        .ok()
        .flatten()
}

async fn get(fd: &FrontDoor, host: &str, path: &str) -> (u16, String) {
    match request(&fd.http_addr(), host, path, "").await {
        Some((status, _, body)) => (status, body),
        None => (0, String::new()),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hosts_wildcards_and_the_longest_path_prefix_reach_the_right_backends() {
    let etcd = Etcd::start().await;
    let fd = FrontDoor::start(&etcd, Options::default()).await;
    let (shop, api, v2) = (
        Echo::start("shop").await,
        Echo::start("api").await,
        Echo::start("v2").await,
    );
    etcd.put(
        &fd.service_key("shop", "s1"),
        &shop.record(r#"{"hosts":["example.com","*.shop.example.com"]}"#),
    )
    .await;
    etcd.put(
        &fd.service_key("api", "a1"),
        &api.record(r#"{"hosts":["example.com"],"path":"/api","strip_prefix":true}"#),
    )
    .await;
    etcd.put(
        &fd.service_key("v2", "b1"),
        &v2.record(r#"{"hosts":["example.com"],"path":"/api/v2","default_host":false}"#),
    )
    .await;
    wait_until("v2 routed", T, || async {
        get(&fd, "example.com", "/api/v2/x").await.1 == "v2 /api/v2/x"
    })
    .await;
    for (host, path, want) in [
        ("example.com", "/", "shop /"),
        ("EXAMPLE.com:80", "/cart", "shop /cart"),
        ("example.com", "/apix", "shop /apix"),
        // The prefix is taken off: /api is /, /api/x is /x, the query stays.
        ("example.com", "/api", "api /"),
        ("example.com", "/api/users?id=1", "api /users?id=1"),
        ("example.com", "/api/v2", "v2 /api/v2"),
        ("a.shop.example.com", "/", "shop /"),
        ("a.b.shop.example.com", "/", "shop /"),
        // The default host beside the extra ones, path prefix kept.
        ("shop.test", "/x", "shop /x"),
        ("api.test", "/api/x", "api /x"),
    ] {
        assert_eq!(
            get(&fd, host, path).await,
            (200, want.to_string()),
            "{host}{path}"
        );
    }
    // No route: the no-service answer (503), whatever the path.
    for (host, path) in [
        ("shop.example.com", "/"),
        ("v2.test", "/api/v2"),
        ("api.test", "/"),
        ("other.example.com", "/api"),
    ] {
        assert_eq!(get(&fd, host, path).await.0, 503, "{host}{path}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_allow_list_answers_other_clients_403() {
    let etcd = Etcd::start().await;
    let fd = FrontDoor::start(&etcd, Options::default()).await;
    let (open, closed) = (Echo::start("open").await, Echo::start("closed").await);
    etcd.put(
        &fd.service_key("open", "o"),
        &open.record(r#"{"allow":["127.0.0.0/8"]}"#),
    )
    .await;
    etcd.put(
        &fd.service_key("closed", "c"),
        &closed.record(r#"{"allow":["10.0.0.0/8","fd00::/8"]}"#),
    )
    .await;
    wait_until("both routed", T, || async {
        get(&fd, "open.test", "/").await.0 == 200 && get(&fd, "closed.test", "/").await.0 == 403
    })
    .await;
    assert_eq!(get(&fd, "closed.test", "/secret").await.0, 403);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tcp_service_gets_its_listen_port() {
    let etcd = Etcd::start().await;
    let port = free_port();
    let fd = FrontDoor::start(
        &etcd,
        Options {
            vars: format!("tcp_bind_ip = \"127.0.0.1\"\nlisten_ports = [{port}]"),
            ..Default::default()
        },
    )
    .await;
    let b = Backend::start("pg").await;
    etcd.put(
        &fd.service_key("pg", "p1"),
        &format!(
            r#"{{"addr":"{}","route":{{"mode":"tcp","listen":{port}}}}}"#,
            b.addr
        ),
    )
    .await;
    let addr = format!("127.0.0.1:{port}");
    wait_until("the listen port answers", T, || async {
        matches!(http_get(&addr, "whatever", "/").await, Some((200, body)) if body == "pg")
    })
    .await;
    // Not routed by Host: a TCP service has no HTTP route.
    assert_eq!(get(&fd, "pg.test", "/").await.0, 503);
}

/// A self-signed certificate for `cn` in `dir`: (cert, key).
fn self_signed(dir: &std::path::Path, cn: &str) -> (String, String) {
    let (cert, key) = (dir.join(format!("{cn}.crt")), dir.join(format!("{cn}.key")));
    let out = std::process::Command::new("openssl")
        .args([
            "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
        ])
        .args(["-subj", &format!("/CN={cn}")])
        .arg("-keyout")
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .output()
        .expect("openssl req");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    (cert.display().to_string(), key.display().to_string())
}

/// `openssl s_client -servername <sni>` against `addr`: its whole output.
fn s_client(addr: &str, sni: &str) -> String {
    let mut child = std::process::Command::new("openssl")
        .args(["s_client", "-connect", addr, "-servername", sni])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("openssl s_client");
    // Closing stdin ends the session once the handshake is done.
    drop(child.stdin.take());
    let out = child.wait_with_output().expect("s_client output");
    String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_is_passed_through_by_sni_on_the_shared_https_port() {
    need("openssl", "openssl");
    let etcd = Etcd::start().await;
    // The harness binds the default template's HTTPS on a free port of its own: the
    // SNI frontend shares it with the certificates' TLS termination.
    let fd = FrontDoor::start(&etcd, Options::default()).await;
    let https = fd.https_port;
    let (cert, key) = self_signed(fd.dir.path(), "db-backend");
    let tls_port = free_port();
    let mut server = Proc::spawn(
        "openssl s_server",
        owned_command("openssl")
            .args(["s_server", "-quiet", "-accept"])
            .arg(format!("127.0.0.1:{tls_port}"))
            .args(["-cert", &cert, "-key", &key, "-www"])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null()),
    );
    etcd.put(
        &fd.service_key("db", "d1"),
        &format!(
            r#"{{"addr":"127.0.0.1:{tls_port}","route":{{"mode":"tcp","sni":["db.example.com","*.db.example.com"]}}}}"#
        ),
    )
    .await;
    let addr = format!("127.0.0.1:{https}");
    wait_until("db.example.com reaches the TLS backend", T, || async {
        let a = addr.clone();
        tokio::task::spawn_blocking(move || s_client(&a, "db.example.com"))
            .await
            .unwrap()
            .contains("CN = db-backend")
    })
    .await;
    let (a, b) = (addr.clone(), addr.clone());
    let wild = tokio::task::spawn_blocking(move || s_client(&a, "x.db.example.com"))
        .await
        .unwrap();
    assert!(wild.contains("CN = db-backend"), "{wild}");
    // A name nobody claims is never passed through to db: the front door terminates it
    // with its own certificates (the default one here).
    let other = tokio::task::spawn_blocking(move || s_client(&b, "other.example.com"))
        .await
        .unwrap();
    assert!(!other.contains("db-backend"), "{other}");
    server.kill();
}

/// The `Set-Cookie` value HAProxy gave for `name`, if any.
fn cookie(head: &str, name: &str) -> Option<String> {
    head.lines()
        .filter_map(|l| {
            l.strip_prefix("set-cookie: ")
                .or_else(|| l.strip_prefix("Set-Cookie: "))
        })
        .find_map(|c| c.strip_prefix(&format!("{name}=")))
        .map(|v| v.split(';').next().unwrap_or("").to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sticky_cookie_holds_and_a_runtime_added_server_gets_one_too() {
    let etcd = Etcd::start().await;
    let fd = FrontDoor::start(&etcd, Options::with_admin_socket()).await;
    let (a, b) = (Echo::start("a").await, Echo::start("b").await);
    let route = r#"{"sticky":"cookie"}"#;
    etcd.put(&fd.service_key("web", "a"), &a.record(route))
        .await;
    wait_until("web routed", T, || async {
        get(&fd, "web.test", "/").await == (200, "a /".to_string())
    })
    .await;
    let reloads = fd.haproxy.reloads().await;
    etcd.put(&fd.service_key("web", "b"), &b.record(route))
        .await;
    // b arrives through the runtime API (no reload) and is served with a cookie of its own.
    let mut cookies = std::collections::BTreeMap::new();
    let deadline = tokio::time::Instant::now() + T;
    while cookies.len() < 2 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "both servers hand out cookies: {cookies:?}"
        );
        if let Some((200, head, body)) = request(&fd.http_addr(), "web.test", "/", "").await {
            if let Some(c) = cookie(&head, "portolan_web") {
                cookies.insert(body, c);
            }
        }
    }
    assert_eq!(
        fd.haproxy.reloads().await,
        reloads,
        "b was added at run time"
    );
    assert_ne!(cookies["a /"], cookies["b /"]);
    for (body, c) in &cookies {
        for _ in 0..10 {
            let got = request(
                &fd.http_addr(),
                "web.test",
                "/",
                &format!("Cookie: portolan_web={c}\r\n"),
            )
            .await
            .map(|(_, _, body)| body);
            assert_eq!(got.as_deref(), Some(body.as_str()), "cookie {c}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn of_two_services_claiming_one_host_the_older_keeps_it_and_the_other_is_named() {
    let etcd = Etcd::start().await;
    let receiver = common::haproxy::HookReceiver::start().await;
    let mut fd = FrontDoor::prepare(&etcd, Options::default()).await;
    let mut config = std::fs::read_to_string(&fd.config).unwrap();
    config += &format!(
        "\n[[hook]]\nevents = [\"reject\"]\nurl = {:?}\n",
        receiver.url
    );
    std::fs::write(&fd.config, config).unwrap();
    fd.start_watcher();
    fd.wait_for_first_reload().await;
    let (first, second) = (Echo::start("first").await, Echo::start("second").await);
    let claim = r#"{"hosts":["shared.example.com"]}"#;
    etcd.put(&fd.service_key("first", "f"), &first.record(claim))
        .await;
    wait_until("first routed", T, || async {
        get(&fd, "shared.example.com", "/").await.1 == "first /"
    })
    .await;
    etcd.put(&fd.service_key("second", "s"), &second.record(claim))
        .await;
    wait_until("second routed at its own host", T, || async {
        get(&fd, "second.test", "/").await.1 == "second /"
    })
    .await;
    assert_eq!(get(&fd, "shared.example.com", "/").await.1, "first /");
    wait_until("the refusal is logged, naming both", T, || async {
        std::fs::read_to_string(&fd.watcher_log)
            .unwrap_or_default()
            .contains(
                "service second is refused host shared.example.com: service first claimed it first",
            )
    })
    .await;
    // The watcher's status record names it, and so does `portolan ls` (on stderr).
    let ls = || async {
        let out = tokio::process::Command::from(portolan_cmd())
            .args(["--config", "/dev/null", "ls", "--etcd-endpoints"])
            .arg(etcd.endpoint())
            .args(["--prefix", &fd.prefix])
            .kill_on_drop(true)
            .output()
            .await
            .expect("portolan ls");
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    let named = format!(
        "warning: watcher {}: service second is refused host shared.example.com: service first claimed it first",
        fd.name
    );
    wait_until("ls names the conflict", T, || async {
        ls().await.contains(&named)
    })
    .await;
    // The reject hook heard it once.
    wait_until("a reject event", T, || async {
        !receiver.events("reject").is_empty()
    })
    .await;
    let reject = receiver.events("reject");
    assert_eq!(reject.len(), 1, "{reject:?}");
    assert!(
        reject[0]["summary"]
            .as_str()
            .unwrap()
            .starts_with("route conflict: service second is refused host shared.example.com"),
        "{reject:?}"
    );
    // Its owner gone, the other takes the route.
    etcd.delete(&fd.service_key("first", "f")).await;
    wait_until("second takes the host", T, || async {
        get(&fd, "shared.example.com", "/").await.1 == "second /"
    })
    .await;
    wait_until("the conflict is over for ls too", T, || async {
        !ls().await.contains("refused host")
    })
    .await;
}

/// End to end from Docker labels: a container asking for an extra host and a path
/// with the prefix stripped is reached there through the front door, and a container
/// whose route label tries to inject a line is not registered at all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn docker_route_labels_reach_the_front_door() {
    use common::registrar::{Opts, Rig};
    let mut rig = Rig::new("routes-docker").await;
    let fd = FrontDoor::start(&rig.etcd, Options::default()).await;
    // The registrar writes under the watcher's prefix.
    rig.prefix = fd.prefix.clone();
    let _registrar = rig.start(&Opts::default());
    let c = rig.container(&[
        "--label",
        "portolan.service=labelled",
        "--label",
        "portolan.hosts=labels.example.com",
        "--label",
        "portolan.path=/p",
        "--label",
        "portolan.strip_prefix=true",
    ]);
    let bad = rig.container(&[
        "--label",
        "portolan.service=injected",
        "--label",
        "portolan.path=/x\n    bind :9999",
    ]);
    wait_until("the labelled container answers at its path", T, || async {
        let (status, body) = get(&fd, "labels.example.com", "/p").await;
        status == 200 && body.trim() == c.short_id()
    })
    .await;
    assert_eq!(get(&fd, "labels.example.com", "/").await.0, 503);
    assert_eq!(
        get(&fd, "labelled.test", "/p/").await.1.trim(),
        c.short_id()
    );
    // The other one is left out, named: never in etcd, never in the file.
    assert!(rig.value(&rig.key("injected", &bad, 8080)).await.is_none());
    assert!(!fd.dest_text().contains("9999") && !fd.dest_text().contains("injected"));
    drop((c, bad));
    common::remove_labelled(&rig.run);
}
