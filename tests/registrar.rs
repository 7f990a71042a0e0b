//! The registrar against a real etcd, a real Docker Engine and real containers serving
//! HTTP. Every test has its own etcd, prefix, node name and container label; every
//! registrar sees only its own test's containers (`--only-label`).
mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use common::registrar::*;
use common::*;
use portolan::schema::NodeRecord;

/// Upper bound for anything that should take milliseconds; generous because the
/// machine is small and shared.
const T: Duration = Duration::from_secs(20);

async fn serves_page(addr: &str, c: &Container) -> bool {
    matches!(http_get(addr, "test", "/").await, Some((200, body)) if body.trim() == c.short_id())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registers_a_started_container_at_an_address_that_serves_it() {
    let rig = Rig::new("reg-start").await;
    let registrar = rig.start(&Opts {
        resync: 1,
        ..Default::default()
    });
    let c = rig.container(&[]);
    let key = rig.image_key(&c);
    let rec = record(&rig.wait_value(&key, T).await);
    assert_eq!(rec.addr, format!("127.0.0.1:{}", c.host_port(8080)));
    assert_eq!(rec.node, rig.node);
    assert_eq!(rec.container, c.short_id());
    assert_eq!(rec.port, Some(8080));
    assert_eq!(rec.weight, 100);
    assert!(rec.tags.is_empty());
    wait_until(
        "the registered address to serve the container's page",
        T,
        || serves_page(&rec.addr, &c),
    )
    .await;

    // The node key rides on the same lease as the instance.
    let kvs = rig.kvs().await;
    let node_kv = &kvs[&rig.node_key()];
    assert_ne!(kvs[&key].lease, 0);
    assert_eq!(node_kv.lease, kvs[&key].lease);
    let node: NodeRecord = serde_json::from_str(&node_kv.value).expect("node record");
    assert_eq!(node.name, rig.node);
    assert_eq!(node.addr, "127.0.0.1");

    // Steady state: three resyncs later, not one write (keep-alives do not count).
    let revision = rig.revision().await;
    tokio::time::sleep(Duration::from_millis(3500)).await;
    assert_eq!(
        rig.revision().await,
        revision,
        "a steady state wrote to etcd"
    );
    assert!(registrar.running());

    // A clean stop is quick, and the keys stay for the TTL so a restart causes no churn.
    let took = registrar.stop().await;
    assert!(took < Duration::from_secs(3), "stop took {took:?}");
    assert!(rig.value(&key).await.is_some());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stop_kill_and_pause_deregister_and_unpause_registers_again() {
    let rig = Rig::new("reg-stop").await;
    let _registrar = rig.start(&Opts::default());
    let stopped = rig.container(&[]);
    let killed = rig.container(&[]);
    let paused = rig.container(&[]);
    for c in [&stopped, &killed, &paused] {
        rig.wait_value(&rig.image_key(c), T).await;
    }

    docker(&["stop", "-t", "1", &stopped.id]);
    rig.wait_gone(&rig.image_key(&stopped), T).await;
    docker(&["kill", "-s", "KILL", &killed.id]);
    rig.wait_gone(&rig.image_key(&killed), T).await;
    docker(&["pause", &paused.id]);
    rig.wait_gone(&rig.image_key(&paused), T).await;
    docker(&["unpause", &paused.id]);
    let rec = record(&rig.wait_value(&rig.image_key(&paused), T).await);
    wait_until("the unpaused container to serve", T, || {
        serves_page(&rec.addr, &paused)
    })
    .await;

    // SIGHUP is a reload, not a death: the key stays. A later container's registration
    // proves the registrar has processed the HUP event by then.
    let revision_of_paused = rig.kvs().await[&rig.image_key(&paused)].mod_revision;
    docker(&["kill", "-s", "HUP", &paused.id]);
    let marker = rig.container(&[]);
    rig.wait_value(&rig.image_key(&marker), T).await;
    let kvs = rig.kvs().await;
    assert_eq!(
        kvs.get(&rig.image_key(&paused)).map(|kv| kv.mod_revision),
        Some(revision_of_paused),
        "docker kill -s HUP must not deregister"
    );
    assert_eq!(rig.services().await.len(), 2, "{:?}", rig.services().await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn event_to_etcd_latency() {
    let rig = Rig::new("reg-latency").await;
    // A separate process, as in production: nothing in the test can stall it.
    let _registrar = rig.spawn(&Opts::default());
    let watch = KeyWatch::start(&rig.etcd, &rig.services_prefix()).await;
    let stream = DockerEvents::start(&rig.run);
    // Warm up (first inspect, first txn) outside the measurement.
    let warm = rig.container(&[]);
    rig.wait_value(&rig.image_key(&warm), T).await;
    stream.wait_for(&warm.id, "start").await;
    let mut containers = Vec::new();
    for _ in 0..10 {
        let c = rig.container(&[]);
        let key = rig.image_key(&c);
        rig.wait_value(&key, T).await;
        docker(&["kill", &c.id]);
        rig.wait_gone(&key, T).await;
        containers.push(c);
    }
    let last = containers.last().expect("containers");
    stream.wait_for(&last.id, "kill").await;
    let events = stream.events();
    let docker_time = |c: &Container, action: &str| {
        events
            .iter()
            .find(|(id, a, _)| *id == c.id && a == action)
            .map(|(_, _, t)| *t)
            .unwrap_or_else(|| panic!("no {action} event for {}", c.short_id()))
    };
    let mut register = Vec::new();
    let mut deregister = Vec::new();
    for c in &containers {
        let key = rig.image_key(c);
        let put = watch.last(&key, true).expect("put seen by the watch");
        let del = watch.last(&key, false).expect("delete seen by the watch");
        register.push(
            put.duration_since(docker_time(c, "start"))
                .unwrap_or_default(),
        );
        deregister.push(
            del.duration_since(docker_time(c, "kill"))
                .unwrap_or_default(),
        );
        // A kill is a stop (it drains for the moment until `die`); otherwise the key is
        // written once.
        let plain_puts = watch
            .puts(&key)
            .iter()
            .filter(|(_, v)| !record(v).draining)
            .count();
        assert_eq!(plain_puts, 1, "{key} was registered more than once");
    }
    eprintln!(
        "registrar latency: register {} deregister {} (n={})",
        summary(register.clone()),
        summary(deregister.clone()),
        containers.len()
    );
    assert!(
        register.iter().all(|d| *d < Duration::from_secs(2)),
        "{register:?}"
    );
    assert!(
        deregister.iter().all(|d| *d < Duration::from_secs(1)),
        "{deregister:?}"
    );
}

/// A container that keeps serving for 3 s after SIGTERM, as an app finishing its
/// in-flight requests does.
const GRACEFUL: &[&str] = &["sh", "-c", "trap 'sleep 3; exit 0' TERM; /bin/serve & wait"];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn docker_stop_drains_until_the_container_exits() {
    let rig = Rig::new("reg-drain").await;
    let _registrar = rig.spawn(&Opts::default());
    let watch = KeyWatch::start(&rig.etcd, &rig.services_prefix()).await;
    let stream = DockerEvents::start(&rig.run);
    let warm = rig.container(&[]);
    rig.wait_value(&rig.image_key(&warm), T).await;
    stream.wait_for(&warm.id, "start").await;

    let mut to_drain = Vec::new();
    let mut drained_for = Vec::new();
    for round in 0..3 {
        let c = Container::run(&rig.run, &["-p", "127.0.0.1::8080"], Some(GRACEFUL));
        let key = rig.image_key(&c);
        let registered = record(&rig.wait_value(&key, T).await);
        assert!(!registered.draining);
        if round == 0 {
            // SIGHUP is the app's business: the record is not touched.
            let before = rig.kvs().await[&key].mod_revision;
            docker(&["kill", "-s", "HUP", &c.id]);
            stream.wait_for(&c.id, "kill").await;
            let marker = rig.container(&[]);
            rig.wait_value(&rig.image_key(&marker), T).await;
            assert_eq!(
                rig.kvs().await[&key].mod_revision,
                before,
                "HUP rewrote the record"
            );
        }
        let id = c.id.clone();
        let stop = std::thread::spawn(move || docker(&["stop", &id]));
        wait_until("the record to say draining", T, || async {
            rig.value(&key).await.is_some_and(|v| record(&v).draining)
        })
        .await;
        let draining = record(&rig.value(&key).await.unwrap_or_default());
        assert_eq!(
            schema_record_without_drain(draining.clone()),
            registered,
            "draining changes nothing but the flag"
        );
        // The container still serves while it drains.
        assert!(
            serves_page(&draining.addr, &c).await,
            "a draining container stopped serving"
        );
        rig.wait_gone(&key, T).await;
        stop.join().expect("docker stop");
        assert!(stream.has(&c.id, "die"));
        to_drain.push((c, key));
    }
    let mut latency = Vec::new();
    for (c, key) in &to_drain {
        // The kill after the HUP is the stop's.
        let kill = stream
            .events()
            .into_iter()
            .rev()
            .find(|(i, a, _)| i == &c.id && a == "kill")
            .map(|(_, _, t)| t)
            .expect("kill event");
        let die = stream.time_of(&c.id, "die").expect("die event");
        let drained = watch
            .puts(key)
            .into_iter()
            .find(|(_, v)| record(v).draining)
            .map(|(t, _)| t)
            .expect("a draining put");
        let deleted = watch.last(key, false).expect("a delete");
        latency.push(since(drained, kill, "the draining put after the kill"));
        drained_for.push(since(deleted, drained, "the delete after the draining put"));
        assert!(
            deleted >= die,
            "deleted before the container exited: {deleted:?} < {die:?}"
        );
    }
    eprintln!(
        "drain: kill event -> draining in etcd {} ; draining -> deleted {} (n={})",
        summary(latency.clone()),
        summary(drained_for.clone()),
        latency.len()
    );
    assert!(
        latency.iter().all(|d| *d < Duration::from_secs(1)),
        "{latency:?}"
    );
    assert!(
        drained_for.iter().all(|d| *d > Duration::from_millis(2500)),
        "the drain did not last while the app finished: {drained_for:?}"
    );
}

fn schema_record_without_drain(
    mut r: portolan::schema::InstanceRecord,
) -> portolan::schema::InstanceRecord {
    r.draining = false;
    r
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stop_signal_without_an_exit_is_given_back_after_the_stop_timeout() {
    let rig = Rig::new("reg-giveback").await;
    let _registrar = rig.start(&Opts::default());
    // Ignores SIGTERM: `docker kill -s TERM` stops nothing.
    let c = Container::run(
        &rig.run,
        &["-p", "127.0.0.1::8080", "--stop-timeout", "2"],
        Some(&["sh", "-c", "trap '' TERM; /bin/serve & wait"]),
    );
    let key = rig.image_key(&c);
    let registered = record(&rig.wait_value(&key, T).await);
    docker(&["kill", "-s", "TERM", &c.id]);
    let started = Instant::now();
    wait_until("the record to say draining", T, || async {
        rig.value(&key).await.is_some_and(|v| record(&v).draining)
    })
    .await;
    wait_until("the record to be given back", T, || async {
        rig.value(&key).await.is_some_and(|v| !record(&v).draining)
    })
    .await;
    let took = started.elapsed();
    eprintln!("given back {took:?} after SIGTERM (stop timeout 2 s + 2 s margin)");
    assert!(
        took >= Duration::from_millis(3500) && took < Duration::from_secs(8),
        "given back after {took:?}"
    );
    assert_eq!(
        record(&rig.value(&key).await.unwrap_or_default()),
        registered
    );
    assert!(serves_page(&registered.addr, &c).await);
    docker(&["kill", &c.id]);
    rig.wait_gone(&key, T).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn healthcheck_registers_only_while_healthy() {
    let rig = Rig::new("reg-health").await;
    let _registrar = rig.start(&Opts::default());
    let c = rig.container(&[
        "--health-cmd",
        "test -f /www/ok",
        "--health-interval",
        "300ms",
        "--health-timeout",
        "2s",
        "--health-retries",
        "1",
    ]);
    let key = rig.image_key(&c);
    let health = || docker(&["inspect", "-f", "{{.State.Health.Status}}", &c.id]);
    wait_until("docker to call the container unhealthy", T, || async {
        health() == "unhealthy"
    })
    .await;
    // A plain container registered after that point proves the registrar has seen the
    // health events before it.
    let marker = rig.container(&[]);
    rig.wait_value(&rig.image_key(&marker), T).await;
    assert_eq!(rig.value(&key).await, None, "registered while not healthy");

    docker(&["exec", &c.id, "touch", "/www/ok"]);
    let rec = record(&rig.wait_value(&key, T).await);
    assert_eq!(health(), "healthy");
    assert!(serves_page(&rec.addr, &c).await);

    docker(&["exec", &c.id, "rm", "/www/ok"]);
    rig.wait_gone(&key, T).await;
    assert_eq!(health(), "unhealthy");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_probe_drops_a_frozen_server_and_restores_it() {
    let rig = Rig::new("reg-probe").await;
    let _registrar = rig.start(&Opts::default());
    // httpd as a child of a shell, so that it can be frozen from inside the container.
    let c = Container::run(
        &rig.run,
        &[
            "-p",
            "127.0.0.1::8080",
            "--label",
            "portolan.check.http=/",
            "--label",
            "portolan.check.interval=200ms",
            "--label",
            "portolan.check.timeout=300ms",
            "--label",
            "portolan.check.fall=2",
            "--label",
            "portolan.check.rise=2",
        ],
        Some(&["sh", "-c", "/bin/serve & wait"]),
    );
    let key = rig.image_key(&c);
    let rec = record(&rig.wait_value(&key, T).await);
    assert!(serves_page(&rec.addr, &c).await);

    docker(&["exec", &c.id, "killall", "-STOP", "httpd"]);
    let took = rig.wait_gone(&key, T).await;
    assert!(
        http_get(&rec.addr, "test", "/").await.is_none(),
        "the frozen server still answered"
    );
    eprintln!(
        "probe: frozen server deregistered after {took:?} (interval 200ms, timeout 300ms, fall 2)"
    );

    docker(&["exec", &c.id, "killall", "-CONT", "httpd"]);
    let rec = record(&rig.wait_value(&key, T).await);
    assert!(serves_page(&rec.addr, &c).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_probe_sees_through_docker_proxy() {
    let rig = Rig::new("reg-tcp").await;
    // A process with a log: the probe's verdict is the marker the absence is read after.
    let registrar = rig.spawn(&Opts::default());
    // Nothing listens inside yet: docker-proxy still accepts on the published port and
    // closes at once, which must not count as alive.
    let c = Container::run(
        &rig.run,
        &[
            "-p",
            "127.0.0.1::8080",
            "--label",
            "portolan.check.tcp=true",
            "--label",
            "portolan.check.interval=200ms",
        ],
        Some(&["sleep", "1000"]),
    );
    let key = rig.image_key(&c);
    let instance = key.rsplit('/').next().expect("instance id").to_string();
    // The probe's own verdict (logged once it has failed `fall` times in a row), not a
    // guess at how many rounds a second holds; then a container registered after it, so
    // the loop has acted on the verdict.
    wait_until("c's probe judged it down", T, || async {
        registrar
            .log()
            .lines()
            .any(|l| l.contains("probe has not passed yet") && l.contains(&instance))
    })
    .await;
    let marker = rig.container(&[]);
    rig.wait_value(&rig.image_key(&marker), T).await;
    assert!(
        !registrar.log().contains("probe passes"),
        "docker-proxy's accept counted as alive:\n{}",
        registrar.log()
    );
    assert_eq!(
        rig.value(&key).await,
        None,
        "registered with nothing listening"
    );

    docker(&["exec", "-d", &c.id, "/bin/serve"]);
    let rec = record(&rig.wait_value(&key, T).await);
    wait_until("the late server to answer", T, || {
        serves_page(&rec.addr, &c)
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn labels_env_several_ports_ignore_and_bad_labels() {
    let rig = Rig::new("reg-labels").await;
    let registrar = rig.spawn(&Opts::default());
    let web = rig.container(&[
        "--label",
        "portolan.service=web",
        "--label",
        "portolan.tags=v2,canary",
        "--label",
        "portolan.weight=50",
    ]);
    let legacy = rig.container(&["-e", "SERVICE_NAME=legacy", "-e", "SERVICE_TAGS=old"]);
    let per_port = rig.container(&["-e", "SERVICE_8080_NAME=perport"]);
    let two = rig.container(&[
        "-p",
        "127.0.0.1::9090",
        "--label",
        "portolan.port.9090.service=admin",
    ]);
    let _ignored = rig.container(&["--label", "portolan.ignore=true"]);
    let _env_ignored = rig.container(&["-e", "SERVICE_IGNORE=1"]);
    let bad_weight = rig.container(&["--label", "portolan.weight=heavy"]);
    let bad_name = rig.container(&["--label", "portolan.service=bad name!"]);
    let bad_port = rig.container(&["--label", "portolan.port.1234.service=x"]);
    // Events are handled in order: once the last container is in, all are decided.
    let last = rig.container(&["--label", "portolan.service=last"]);
    rig.wait_value(&rig.key("last", &last, 8080), T).await;

    let want: BTreeSet<String> = [
        rig.key("web", &web, 8080),
        rig.key("legacy", &legacy, 8080),
        rig.key("perport", &per_port, 8080),
        rig.key("portolan-test-busybox-8080", &two, 8080),
        rig.key("admin", &two, 9090),
        rig.key("last", &last, 8080),
    ]
    .into();
    let got = rig.services().await;
    assert_eq!(got.keys().cloned().collect::<BTreeSet<_>>(), want);

    let web_rec = record(&got[&rig.key("web", &web, 8080)]);
    assert_eq!(web_rec.tags, vec!["v2", "canary"]);
    assert_eq!(web_rec.weight, 50);
    assert!(serves_page(&web_rec.addr, &web).await);
    assert_eq!(
        record(&got[&rig.key("legacy", &legacy, 8080)]).tags,
        vec!["old"]
    );
    let admin = record(&got[&rig.key("admin", &two, 9090)]);
    assert_eq!(admin.addr, format!("127.0.0.1:{}", two.host_port(9090)));
    assert_eq!(admin.port, Some(9090));
    let two_http = record(&got[&rig.key("portolan-test-busybox-8080", &two, 8080)]);
    assert!(serves_page(&two_http.addr, &two).await);

    // Each bad container is named in a warning with the label at fault; the daemon goes on.
    let log = registrar.log();
    for (c, label) in [
        (&bad_weight, "portolan.weight"),
        (&bad_name, "portolan.service"),
        (&bad_port, "portolan.port.1234.service"),
    ] {
        let line = log
            .lines()
            .find(|l| l.contains("WARN") && l.contains(&c.name) && l.contains(label))
            .unwrap_or_else(|| panic!("no warning naming {} and {label} in:\n{log}", c.name));
        assert!(line.contains(&c.short_id()), "{line}");
    }
    let mut registrar = registrar;
    assert!(registrar.proc.alive());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn internal_registers_the_container_ip_and_port() {
    let rig = Rig::new("reg-internal").await;
    let _registrar = rig.start(&Opts {
        internal: true,
        ..Default::default()
    });
    let c = rig.container(&[]);
    let rec = record(&rig.wait_value(&rig.image_key(&c), T).await);
    let ip = docker(&[
        "inspect",
        "-f",
        "{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}",
        &c.id,
    ]);
    assert!(!ip.is_empty());
    // Only the value is checked: tests never send traffic to bridge addresses.
    assert_eq!(rec.addr, format!("{ip}:8080"));
    assert_eq!(rec.port, Some(8080));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_expires_after_the_ttl_and_a_quick_restart_reuses_the_lease() {
    let rig = Rig::new("reg-sigkill").await;
    let opts = Opts {
        ttl: 4,
        ..Default::default()
    };
    let mut first = rig.spawn(&opts);
    let a = rig.container(&[]);
    let key_a = rig.image_key(&a);
    // A probed instance must survive the restart too, while the new probe warms up.
    let probed = rig.container(&[
        "--label",
        "portolan.service=probed",
        "--label",
        "portolan.check.http=/",
    ]);
    let key_probed = rig.key("probed", &probed, 8080);
    rig.wait_value(&key_a, T).await;
    rig.wait_value(&key_probed, T).await;
    let before = rig.kvs().await;
    assert_eq!(before.len(), 3, "{before:?}");
    let lease = before[&key_a].lease;

    first.sigkill();
    let second = rig.spawn(&opts);
    second.wait_log("reusing live lease", T).await;
    let b = rig.container(&[]);
    let key_b = rig.image_key(&b);
    rig.wait_value(&key_b, T).await;
    // Longer than the TTL: the keys only survive if the lease is being kept alive.
    tokio::time::sleep(Duration::from_secs(opts.ttl + 1)).await;
    let after = rig.kvs().await;
    for (key, kv) in &before {
        assert_eq!(after.get(key), Some(kv), "{key} was rewritten or lost");
    }
    assert_eq!(after[&key_b].lease, lease);
    assert_eq!(
        std::fs::read_to_string(rig.state_file()).expect("state file"),
        format!("{{\"lease_id\":{lease}}}\n")
    );

    // Killed for good: everything of this node, node key included, goes with the lease.
    let mut second = second;
    second.sigkill();
    let start = Instant::now();
    wait_until(
        "every key to expire",
        Duration::from_secs(opts.ttl + 10),
        || async { rig.kvs().await.is_empty() },
    )
    .await;
    let took = start.elapsed();
    eprintln!(
        "registrar SIGKILL: keys expired after {took:?} (ttl {}s)",
        opts.ttl
    );
    assert!(
        took >= Duration::from_secs(opts.ttl - 2),
        "expired too early: {took:?}"
    );

    // Restarted after the TTL: the state file names a dead lease; a new one is granted
    // and everything is put back.
    let third = rig.spawn(&opts);
    rig.wait_value(&key_a, T).await;
    rig.wait_value(&key_b, T).await;
    rig.wait_value(&key_probed, T).await;
    let kvs = rig.kvs().await;
    assert_eq!(kvs.len(), 4, "{kvs:?}");
    assert_ne!(kvs[&key_a].lease, lease);
    assert!(third.log().contains("granted lease"), "{}", third.log());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconciles_what_changed_while_it_was_down() {
    let rig = Rig::new("reg-down").await;
    let opts = Opts {
        ttl: 15,
        ..Default::default()
    };
    let mut first = rig.spawn(&opts);
    let kept = rig.container(&[]);
    let removed = rig.container(&[]);
    let key_kept = rig.image_key(&kept);
    let key_removed = rig.image_key(&removed);
    rig.wait_value(&key_kept, T).await;
    rig.wait_value(&key_removed, T).await;

    // Keys that are not this registrar's to touch, and stale keys that are: one in
    // this node's prefix, and what a v1 registrar of this node would have left.
    let svc = |rest: &str| format!("{}web/{rest}", rig.hand_written_prefix());
    let other_record =
        r#"{"addr":"10.0.0.7:80","node":"othernode","container":"0123456789ab","port":80}"#;
    let other_node = format!(
        "{}/nodes/othernode/services/web/othernode-0123456789ab-80",
        rig.prefix
    );
    let other_node_v1 = svc("othernode-0123456789ab-80");
    let hand_written = svc("manual-1");
    let lookalike = svc(&format!("{}-0123456789ab-80", rig.node));
    let stale_record = format!(
        r#"{{"addr":"127.0.0.1:1","node":"{}","container":"deadbeef0000","port":8080}}"#,
        rig.node
    );
    let stale = format!(
        "{}web/{}-deadbeef0000-8080",
        rig.services_prefix(),
        rig.node
    );
    let stale_v1 = svc(&format!("{}-deadbeef0000-8080", rig.node));
    let node_v1 = format!("{}/nodes/{}", rig.prefix, rig.node);
    rig.etcd.put(&other_node, other_record).await;
    rig.etcd.put(&other_node_v1, other_record).await;
    rig.etcd.put(&hand_written, "10.0.0.9:80").await;
    rig.etcd.put(&lookalike, "10.0.0.9:80").await;
    rig.etcd.put(&stale, &stale_record).await;
    rig.etcd.put(&stale_v1, &stale_record).await;
    rig.etcd.put(&node_v1, "{}").await;

    // SIGTERM: a clean, quick stop that leaves the keys to the TTL.
    first.proc.signal(nix::sys::signal::Signal::SIGTERM);
    let status = first
        .proc
        .wait_exit(Duration::from_secs(5))
        .expect("registrar stops within 5 s of SIGTERM");
    assert!(status.success(), "{status:?}\n{}", first.log());
    let before = rig.kvs().await;
    assert!(before.contains_key(&key_kept) && before.contains_key(&key_removed));

    docker(&["rm", "-f", &removed.id]);
    let added = rig.container(&[]);
    let key_added = rig.image_key(&added);

    let second = rig.spawn(&opts);
    rig.wait_value(&key_added, T).await;
    rig.wait_gone(&key_removed, T).await;
    rig.wait_gone(&stale, T).await;
    // The v1 keys go once, at the first reconcile after the start.
    rig.wait_gone(&stale_v1, T).await;
    rig.wait_gone(&node_v1, T).await;
    let after = rig.kvs().await;
    for key in [
        &key_kept,
        &other_node,
        &other_node_v1,
        &hand_written,
        &lookalike,
        &rig.node_key(),
    ] {
        assert_eq!(after.get(key), before.get(key), "{key} was touched");
    }
    assert!(
        second.log().contains("reusing live lease"),
        "{}",
        second.log()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_with_deregister_on_exit_removes_everything_at_once() {
    let rig = Rig::new("reg-dereg").await;
    let mut registrar = rig.spawn(&Opts {
        ttl: 60,
        deregister_on_exit: true,
        ..Default::default()
    });
    let c = rig.container(&[]);
    rig.wait_value(&rig.image_key(&c), T).await;
    registrar.proc.signal(nix::sys::signal::Signal::SIGTERM);
    let status = registrar
        .proc
        .wait_exit(Duration::from_secs(5))
        .expect("registrar stops within 5 s of SIGTERM");
    assert!(status.success(), "{status:?}");
    // Not after the 60 s TTL: right now.
    assert_eq!(rig.kvs().await, BTreeMap::new());
    assert!(!rig.state_file().exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_restarts_with_its_data_or_empty_and_the_keys_come_back() {
    let mut rig = Rig::new("reg-etcd").await;
    let registrar = rig.start(&Opts::default());
    let a = rig.container(&[]);
    let key_a = rig.image_key(&a);
    rig.wait_value(&key_a, T).await;

    // An outage with the same data dir; a container starts meanwhile.
    rig.etcd.stop();
    let b = rig.container(&[]);
    let key_b = rig.image_key(&b);
    rig.etcd.restart().await;
    let start = Instant::now();
    rig.wait_value(&key_b, T).await;
    eprintln!(
        "etcd restart (same data): missed registration written {:?} after etcd was back",
        start.elapsed()
    );
    assert!(rig.value(&key_a).await.is_some());

    // A fresh, empty cluster on the same address: everything is put back, on a new lease.
    rig.etcd.restart_empty().await;
    let start = Instant::now();
    let rec = record(&rig.wait_value(&key_a, T).await);
    rig.wait_value(&key_b, T).await;
    rig.wait_value(&rig.node_key(), T).await;
    eprintln!(
        "etcd restart (empty): keys back after {:?}",
        start.elapsed()
    );
    let kvs = rig.kvs().await;
    assert_eq!(kvs.len(), 3, "{kvs:?}");
    assert_eq!(kvs[&key_a].lease, kvs[&rig.node_key()].lease);
    assert!(serves_page(&rec.addr, &a).await);
    assert!(registrar.running(), "the registrar exited");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lease_lost_in_a_partition_is_granted_again_and_everything_put_back() {
    let rig = Rig::new("reg-partition").await;
    let partition = Partition::start(rig.etcd.client_port).await;
    let mut cfg = rig.config(&Opts::default());
    cfg.etcd.endpoints = vec![partition.endpoint()];
    let registrar = InProcess::start(cfg);
    let a = rig.container(&[]);
    let key_a = rig.image_key(&a);
    rig.wait_value(&key_a, T).await;
    let old_lease = rig.kvs().await[&key_a].lease;

    // etcd keeps running, the registrar cannot reach it: the lease expires, the keys go.
    partition.cut();
    let gone = rig.wait_gone(&key_a, T).await;
    assert!(
        rig.kvs().await.is_empty(),
        "the node key outlived the lease"
    );
    let b = rig.container(&[]);
    let key_b = rig.image_key(&b);

    partition.heal();
    let start = Instant::now();
    rig.wait_value(&key_a, T).await;
    rig.wait_value(&key_b, T).await;
    rig.wait_value(&rig.node_key(), T).await;
    eprintln!(
        "partition: keys expired {gone:?} after the cut (ttl 3s), all back {:?} after it healed",
        start.elapsed()
    );
    let kvs = rig.kvs().await;
    let new_lease = kvs[&key_a].lease;
    assert_ne!(new_lease, old_lease);
    assert!(kvs.values().all(|kv| kv.lease == new_lease), "{kvs:?}");
    assert!(registrar.running());
}

/// A probed instance down since before a registrar restart must lose the key the
/// previous registrar left, even though its new probe never saw it up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_probe_failing_from_its_first_try_after_a_restart_drops_the_old_key() {
    let rig = Rig::new("reg-probe-restart").await;
    // A TTL longer than the wait below: only the probe can remove the key in time.
    let opts = Opts {
        ttl: 30,
        ..Default::default()
    };
    let mut first = rig.spawn(&opts);
    let c = Container::run(
        &rig.run,
        &[
            "-p",
            "127.0.0.1::8080",
            "--label",
            "portolan.check.http=/",
            "--label",
            "portolan.check.interval=1s",
            "--label",
            "portolan.check.timeout=300ms",
        ],
        Some(&["sh", "-c", "/bin/serve & wait"]),
    );
    let key = rig.image_key(&c);
    rig.wait_value(&key, T).await;

    first.sigkill();
    docker(&["exec", &c.id, "killall", "-STOP", "httpd"]);
    let second = rig.spawn(&opts);
    second.wait_log("reusing live lease", T).await;
    let took = rig.wait_gone(&key, T).await;
    eprintln!("probe failing since the restart: key removed after {took:?}");
    assert!(
        second.log().contains("probe has not passed yet"),
        "{}",
        second.log()
    );

    docker(&["exec", &c.id, "killall", "-CONT", "httpd"]);
    rig.wait_value(&key, T).await;
}

/// `oom` is reported when any process of the container is OOM-killed; the container
/// keeps running and must stay registered (without waiting for a resync).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oom_kill_of_a_child_process_keeps_the_container_registered() {
    let rig = Rig::new("reg-oom").await;
    let _registrar = rig.start(&Opts {
        resync: 60,
        ..Default::default()
    });
    let stream = DockerEvents::start(&rig.run);
    let c = rig.container(&["-m", "32m"]);
    let key = rig.image_key(&c);
    rig.wait_value(&key, T).await;
    stream.wait_for(&c.id, "start").await;
    let watch = KeyWatch::start(&rig.etcd, &rig.services_prefix()).await;

    // `tail` keeps the whole unterminated "line" in memory: the kernel kills it.
    let _ = try_docker(&["exec", &c.id, "sh", "-c", "head -c 200m /dev/zero | tail"]);
    stream.wait_for(&c.id, "oom").await;
    assert_eq!(
        docker(&["inspect", "-f", "{{.State.Running}}", &c.id]),
        "true"
    );
    // A marker: a container started after the oom event, registered by a pass after
    // the registrar handled that event (one ordered event stream, one loop), so any
    // write the oom caused is done by then.
    let marker = rig.container(&[]);
    rig.wait_value(&rig.image_key(&marker), T).await;
    assert!(rig.value(&key).await.is_some(), "the key is gone");
    assert_eq!(watch.count(&key, false), 0, "the key was deleted");
}

/// Two hosts given one node name: the second refuses to start, says what to do, and
/// leaves etcd exactly as it found it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_registrar_with_the_same_node_name_refuses_to_start() {
    let rig = Rig::new("reg-unique").await;
    let first = rig.start(&Opts::default());
    let c = rig.container(&[]);
    rig.wait_value(&rig.image_key(&c), T).await;
    let before = rig.kvs().await;
    let lease = before[&rig.node_key()].lease;

    // Another host: its own state dir (so its own lease) and address, the same name.
    let other = tempfile::tempdir().expect("state dir");
    let start = Instant::now();
    let mut second = rig.spawn(&Opts {
        state_dir: Some(other.path().join("state")),
        advertise_ip: Some("127.0.0.2".into()),
        ..Default::default()
    });
    let status = second
        .proc
        .wait_exit(T)
        .expect("the second registrar exits");
    let took = start.elapsed();
    let log = second.log();
    assert!(!status.success(), "{status:?}\n{log}");
    for needle in [
        format!("node name {:?} is held by another registrar", rig.node),
        format!("lease {lease:x}, advertise 127.0.0.1, started "),
        "give this host a unique --node".to_string(),
    ] {
        assert!(log.contains(&needle), "no {needle:?} in:\n{log}");
    }
    eprintln!(
        "same node name: the second registrar exited after {took:?}: {}",
        log.lines().last().unwrap_or("")
    );
    assert!(took < Duration::from_secs(10), "{took:?}");
    // Not a key written, rewritten or deleted; the lease it took is revoked.
    assert_eq!(rig.kvs().await, before);
    assert!(!other.path().join("state").join("registrar.lease").exists());
    assert!(first.running());
}

/// After a lost lease (revoked here, as an etcd outage longer than the TTL would) every
/// instance is written again: the hooks hear one `reregister` naming them, not a
/// `register` per instance.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_lease_is_one_reregister_event_not_a_register_per_instance() {
    let rig = Rig::new("reg-rereg").await;
    let json = Receiver::start().await;
    let toml = format!(
        "[[hook]]\nevents = [\"register\", \"reregister\"]\nurl = \"{}\"\n",
        json.url()
    );
    let _registrar = rig.start(&Opts {
        toml: Some(toml),
        ..Default::default()
    });
    let (a, b) = (rig.container(&[]), rig.container(&[]));
    let (ka, kb) = (rig.image_key(&a), rig.image_key(&b));
    rig.wait_value(&ka, T).await;
    rig.wait_value(&kb, T).await;
    wait_until("two register events", T, || async {
        json.events().len() >= 2
    })
    .await;

    let lease = rig.kvs().await[&ka].lease;
    let mut etcd = rig.etcd.client().await;
    etcd.lease_revoke(lease).await.expect("revoke");
    wait_until("both keys back on a new lease", T, || async {
        let kvs = rig.kvs().await;
        [&ka, &kb]
            .iter()
            .all(|k| kvs.get(*k).is_some_and(|kv| kv.lease != lease))
    })
    .await;
    wait_until("a reregister event", T, || async {
        json.events().iter().any(|e| e["event"] == "reregister")
    })
    .await;
    let events = json.events();
    let names: Vec<&str> = events.iter().filter_map(|e| e["event"].as_str()).collect();
    assert_eq!(names, ["register", "register", "reregister"], "{events:#?}");
    let e = &events[2];
    assert_eq!(e["count"], 2, "{e}");
    assert_eq!(e["node"], rig.node.as_str(), "{e}");
    let mut ids: Vec<&str> = e["instances"]
        .as_array()
        .expect("instances")
        .iter()
        .filter_map(|i| i["instance"].as_str())
        .collect();
    ids.sort();
    let mut want = vec![
        portolan::schema::instance_id(&rig.node, &a.id, 8080),
        portolan::schema::instance_id(&rig.node, &b.id, 8080),
    ];
    want.sort();
    assert_eq!(ids, want, "{e}");
}

/// A registrar whose name is taken while it runs (another registrar's record on
/// another live lease) stops with an error instead of fighting over the keys.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_name_taken_at_runtime_stops_the_registrar_with_an_error() {
    let rig = Rig::new("reg-taken").await;
    let registrar = rig.start(&Opts::default());
    let a = rig.container(&[]);
    rig.wait_value(&rig.image_key(&a), T).await;

    let mut etcd = rig.etcd.client().await;
    let theirs = etcd.lease_grant(60, None).await.expect("lease").id();
    let record = serde_json::to_string(&NodeRecord {
        name: rig.node.clone(),
        addr: "192.0.2.99".into(),
        version: "0.0.0".into(),
        started_at: 1,
    })
    .expect("json");
    etcd.put(
        rig.node_key(),
        record.as_str(),
        Some(etcd_client::PutOptions::new().with_lease(theirs)),
    )
    .await
    .expect("put");
    // Something for the registrar to write.
    let _b = rig.container(&[]);

    let err = registrar.exited(T).await.expect_err("the registrar fails");
    let text = err.to_string();
    assert!(
        text.contains("is held by another registrar") && text.contains("192.0.2.99"),
        "{text}"
    );
    // Their record stands; ours went with our revoked lease.
    let kvs = rig.kvs().await;
    assert_eq!(kvs.len(), 1, "{kvs:?}");
    assert_eq!(kvs[&rig.node_key()].value, record);
    assert_eq!(kvs[&rig.node_key()].lease, theirs);
}

/// Read-write on its own node prefix is all a registrar needs: it registers, and its
/// one look outside (for keys of the v1 layout) is refused and said once, at info.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_role_limited_to_the_node_prefix_is_enough() {
    let rig = Rig::new("reg-rbac").await;
    let node_prefix = portolan::schema::node_prefix(&rig.prefix, &rig.node);
    let v1 = format!(
        "{}web/{}-deadbeef0000-8080",
        rig.hand_written_prefix(),
        rig.node
    );
    let mut c = rig.etcd.client().await;
    c.put(
        v1.as_str(),
        format!(
            r#"{{"addr":"127.0.0.1:1","node":"{}","container":"deadbeef0000","port":8080}}"#,
            rig.node
        ),
        None,
    )
    .await
    .expect("put");
    c.user_add("root", "root-pw", None).await.expect("user");
    c.user_grant_role("root", "root").await.expect("grant");
    c.role_add("registrar").await.expect("role");
    c.role_grant_permission(
        "registrar",
        etcd_client::Permission::read_write(node_prefix.as_str()).with_prefix(),
    )
    .await
    .expect("permission");
    c.user_add("registrar", "registrar-pw", None)
        .await
        .expect("user");
    c.user_grant_role("registrar", "registrar")
        .await
        .expect("grant");
    c.auth_enable().await.expect("auth enable");
    let password_file = rig.state.path().join("etcd-password");
    write_private(&password_file, "registrar-pw\n");

    let mut registrar = rig.spawn(&Opts {
        etcd_auth: Some(("registrar".into(), password_file)),
        ..Default::default()
    });
    let a = rig.container(&[]);
    let mut root = etcd_client::Client::connect(
        [rig.etcd.endpoint()],
        Some(etcd_client::ConnectOptions::new().with_user("root", "root-pw")),
    )
    .await
    .expect("root client");
    let exists = |key: String| {
        let mut root = root.clone();
        async move {
            let r = root.get(key, None).await.expect("get");
            !r.kvs().is_empty()
        }
    };
    wait_until("the instance key", T, || exists(rig.image_key(&a))).await;
    assert!(exists(rig.node_key()).await);
    registrar
        .wait_log("etcd refuses access outside this node's prefix", T)
        .await;
    let log = registrar.log();
    assert_eq!(log.matches("refuses access outside").count(), 1, "{log}");
    // The warnings expected: the test etcd speaks plain http, and its version is one
    // whose RBAC can be bypassed (on a fixed etcd that warning is absent).
    let warnings: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("WARN") && !l.contains("plain http://"))
        .filter(|l| !l.contains("portolan_etcd_rbac_bypassable 1"))
        .collect();
    assert!(warnings.is_empty(), "{log}");
    // Not its to delete under such a role.
    assert!(root.get(v1.as_str(), None).await.expect("get").count() == 1);
    assert!(registrar.proc.alive());
}

/// A host that advertises a routable address never registers a port published on
/// loopback: the load balancer would be sent to its own 127.0.0.1.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_loopback_port_is_not_registered_when_the_host_advertises_a_routable_address() {
    let rig = Rig::new("reg-loopback").await;
    // TEST-NET-1: nothing is ever sent there (no probes); the test only reads etcd.
    let registrar = rig.spawn(&Opts {
        advertise_ip: Some("192.0.2.10".into()),
        ..Default::default()
    });
    let local = rig.container(&[]);
    let everywhere = Container::run(&rig.run, &["-p", "8080"], None);
    let rec = record(&rig.wait_value(&rig.image_key(&everywhere), T).await);
    assert_eq!(
        rec.addr,
        format!("192.0.2.10:{}", everywhere.host_port(8080))
    );
    registrar
        .wait_log(&format!("{} ({})", local.name, local.short_id()), T)
        .await;
    let log = registrar.log();
    let line = log
        .lines()
        .find(|l| l.contains("WARN") && l.contains(&local.name))
        .unwrap_or_else(|| panic!("no warning naming {}:\n{log}", local.name));
    assert!(
        line.contains("port 8080/tcp")
            && line.contains(&format!(
                "published only on loopback (127.0.0.1:{})",
                local.host_port(8080)
            )),
        "{line}"
    );
    // Events are handled in order: `local` started first and has been decided.
    assert_eq!(rig.value(&rig.image_key(&local)).await, None);
    assert_eq!(rig.services().await.len(), 1, "{:?}", rig.services().await);
}

/// `-p 172.17.0.1::8080` on a host that advertises 192.0.2.10: registered, it would aim
/// the load balancer at docker0 (its own, if it runs Docker too). Skipped and named; a
/// port published on every interface, started after it, registers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_docker0_binding_is_not_registered() {
    let rig = Rig::new("reg-docker0").await;
    let registrar = rig.spawn(&Opts {
        advertise_ip: Some("192.0.2.10".into()),
        ..Default::default()
    });
    let bridge = Container::run(&rig.run, &["-p", "172.17.0.1::8080"], None);
    let everywhere = Container::run(&rig.run, &["-p", "8080"], None);
    let rec = record(&rig.wait_value(&rig.image_key(&everywhere), T).await);
    assert_eq!(
        rec.addr,
        format!("192.0.2.10:{}", everywhere.host_port(8080))
    );
    registrar
        .wait_log(&format!("{} ({})", bridge.name, bridge.short_id()), T)
        .await;
    let log = registrar.log();
    let line = log
        .lines()
        .find(|l| l.contains("WARN") && l.contains(&bridge.name))
        .unwrap_or_else(|| panic!("no warning naming {}:\n{log}", bridge.name));
    assert!(
        line.contains("port 8080/tcp")
            && line.contains(&format!(
                "published only on 172.17.0.1:{}",
                bridge.host_port(8080)
            ))
            && line.contains("advertise_networks"),
        "{line}"
    );
    // Events are handled in order: `bridge` started first and has been decided.
    assert_eq!(rig.value(&rig.image_key(&bridge)).await, None);
    assert_eq!(rig.services().await.len(), 1, "{:?}", rig.services().await);
}

/// `[registrar] advertise_networks` lists the host IPs other hosts reach: a port bound
/// to one of them registers at that IP.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_binding_inside_advertise_networks_is_registered_at_its_host_ip() {
    let rig = Rig::new("reg-advnet").await;
    let registrar = rig.spawn(&Opts {
        advertise_ip: Some("192.0.2.10".into()),
        toml: Some("[registrar]\nadvertise_networks = [\"172.17.0.0/16\"]\n".into()),
        ..Default::default()
    });
    let bridge = Container::run(&rig.run, &["-p", "172.17.0.1::8080"], None);
    let rec = record(&rig.wait_value(&rig.image_key(&bridge), T).await);
    assert_eq!(rec.addr, format!("172.17.0.1:{}", bridge.host_port(8080)));
    assert!(
        !registrar.log().contains("published only on"),
        "{}",
        registrar.log()
    );
}

/// A key of this node deleted or overwritten behind its back is written again within
/// moments, long before the next resync.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_deleted_or_overwritten_behind_its_back_is_repaired_within_seconds() {
    let rig = Rig::new("reg-repair").await;
    let registrar = rig.start(&Opts {
        resync: 60,
        ..Default::default()
    });
    let c = rig.container(&[]);
    let key = rig.image_key(&c);
    rig.wait_value(&key, T).await;
    let want = rig.kvs().await;
    let restored = |k: &str| {
        let k = k.to_string();
        let want = want[&k].clone();
        let rig = &rig;
        move || {
            let k = k.clone();
            let want = want.clone();
            async move {
                rig.kvs()
                    .await
                    .get(&k)
                    .is_some_and(|kv| kv.value == want.value && kv.lease == want.lease)
            }
        }
    };
    let mut took = Vec::new();
    for k in [&key, &rig.node_key()] {
        rig.etcd.delete(k).await;
        took.push(wait_until(&format!("{k} back"), Duration::from_secs(2), restored(k)).await);
    }
    // Overwritten by hand, with no lease: put back as it was, on the lease.
    rig.etcd.put(&key, "10.0.0.9:80").await;
    took.push(
        wait_until(
            "the overwritten key back",
            Duration::from_secs(2),
            restored(&key),
        )
        .await,
    );
    eprintln!("repair with --resync 60: {}", summary(took));
    assert!(registrar.running());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hooks_hear_register_drain_and_deregister() {
    let rig = Rig::new("reg-hooks").await;
    let json = Receiver::start().await;
    let slack = Receiver::start().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("events.jsonl");
    let toml = format!(
        r#"
[[hook]]
events = ["register", "deregister", "drain"]
url = "{json}"

[[hook]]
events = ["register"]
url = "{slack}"
format = "slack"

[[hook]]
events = ["register", "deregister"]
command = ["sh", "-c", "cat >> {file}; echo >> {file}"]
"#,
        json = json.url(),
        slack = slack.url(),
        file = file.display()
    );
    // Resyncs every second: a reconcile that writes nothing must say nothing.
    let _registrar = rig.start(&Opts {
        toml: Some(toml),
        resync: 1,
        ..Default::default()
    });
    let c = Container::run(&rig.run, &["-p", "127.0.0.1::8080"], Some(GRACEFUL));
    let key = rig.image_key(&c);
    let rec = record(&rig.wait_value(&key, T).await);
    docker(&["stop", &c.id]);
    rig.wait_gone(&key, T).await;
    wait_until("three events at the JSON receiver", T, || async {
        json.events().len() >= 3
    })
    .await;
    let events = json.events();
    let names: Vec<&str> = events.iter().filter_map(|e| e["event"].as_str()).collect();
    assert_eq!(names, ["register", "drain", "deregister"], "{events:#?}");
    let instance = portolan::schema::instance_id(&rig.node, &c.id, 8080);
    for e in &events {
        assert_eq!(e["service"], "portolan-test-busybox", "{e}");
        assert_eq!(e["instance"], instance.as_str(), "{e}");
        assert_eq!(e["node"], rig.node.as_str(), "{e}");
        assert_eq!(e["addr"], rec.addr.as_str(), "{e}");
        assert_eq!(e["container"], c.short_id().as_str(), "{e}");
        let summary = e["summary"].as_str().unwrap_or_default();
        assert!(
            summary.contains(&instance) && !summary.contains('\n'),
            "{e}"
        );
    }

    wait_until("the Slack receiver's event", T, || async {
        !slack.events().is_empty()
    })
    .await;
    let s = &slack.events()[0];
    let text = s["text"].as_str().unwrap_or_default();
    assert!(
        text.starts_with("[register] ") && text.contains(&instance),
        "{s}"
    );
    assert_eq!(s.as_object().map(|o| o.len()), Some(1), "{s}");

    let lines = || {
        std::fs::read_to_string(&file)
            .unwrap_or_default()
            .lines()
            .filter(|l| !l.trim().is_empty())
            .map(|l| serde_json::from_str::<serde_json::Value>(l).expect("JSON line"))
            .collect::<Vec<_>>()
    };
    wait_until("two events on the command's stdin", T, || async {
        lines().len() >= 2
    })
    .await;
    let got: Vec<String> = lines()
        .iter()
        .map(|e| format!("{} {}", e["event"], e["instance"]))
        .collect();
    assert_eq!(
        got,
        [
            format!("\"register\" \"{instance}\""),
            format!("\"deregister\" \"{instance}\"")
        ]
    );
    assert_eq!(json.events().len(), 3, "a no-op resync emitted an event");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hanging_or_refusing_hook_delays_nothing() {
    let rig = Rig::new("reg-hook-delay").await;
    // Both targets count the connections they get: the hooks are shown to be tried
    // while the registrar keeps its pace, not merely configured.
    let (hanging_port, hanging) = counting_listener(true).await;
    let (refusing_port, refusing) = counting_listener(false).await;
    let toml = format!(
        r#"
[[hook]]
events = ["register", "deregister", "drain"]
url = "http://127.0.0.1:{hanging_port}/hook"

[[hook]]
events = ["register", "deregister", "drain"]
url = "http://127.0.0.1:{refusing_port}/hook"
"#
    );
    let with_hooks = Opts {
        toml: Some(toml),
        ..Default::default()
    };
    assert_eq!(rig.config(&with_hooks).hooks.len(), 2);
    let watch = KeyWatch::start(&rig.etcd, &rig.services_prefix()).await;
    let stream = DockerEvents::start(&rig.run);
    let mut figures = Vec::new();
    let mut tried = (0, 0);
    for opts in [Opts::default(), with_hooks] {
        let registrar = rig.start(&opts);
        let warm = rig.container(&[]);
        rig.wait_value(&rig.image_key(&warm), T).await;
        stream.wait_for(&warm.id, "start").await;
        let mut took = Vec::new();
        for _ in 0..5 {
            let c = rig.container(&[]);
            let key = rig.image_key(&c);
            rig.wait_value(&key, T).await;
            stream.wait_for(&c.id, "start").await;
            docker(&["kill", &c.id]);
            rig.wait_gone(&key, T).await;
            stream.wait_for(&c.id, "die").await;
            let start = stream.time_of(&c.id, "start").expect("start");
            let kill = stream.time_of(&c.id, "kill").expect("kill");
            let put = watch.puts(&key).first().map(|(t, _)| *t).expect("put");
            let del = watch.last(&key, false).expect("delete");
            took.push(since(put, start, "the put after the start event"));
            took.push(since(del, kill, "the delete after the kill event"));
        }
        // Counted while the registrar still runs: its hooks were tried during the run.
        tried = (
            hanging.load(std::sync::atomic::Ordering::Relaxed),
            refusing.load(std::sync::atomic::Ordering::Relaxed),
        );
        registrar.stop().await;
        figures.push(took);
    }
    eprintln!(
        "docker event -> etcd: without hooks {} ; with a hanging and a refusing hook {} (n={}); connections: hanging {}, refusing {}",
        summary(figures[0].clone()),
        summary(figures[1].clone()),
        figures[1].len(),
        tried.0,
        tried.1
    );
    assert!(tried.0 >= 1, "the hanging hook was never tried");
    assert!(
        tried.1 >= 2,
        "the refusing hook was not retried: {} attempt(s)",
        tried.1
    );
    assert!(
        figures[1].iter().all(|d| *d < Duration::from_secs(1)),
        "{:?}",
        figures[1]
    );
}

/// A hook target on 127.0.0.1 that counts its connections and either holds each one
/// unanswered (`hang`) or closes it at once, before any answer (a refusal).
async fn counting_listener(hang: bool) -> (u16, std::sync::Arc<std::sync::atomic::AtomicUsize>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let count = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let seen = count.clone();
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((s, _)) = listener.accept().await {
            seen.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            if hang {
                held.push(s);
            }
        }
    });
    (port, count)
}

/// `later - earlier`; a `later` that comes first is a failure, not a zero latency.
fn since(later: std::time::SystemTime, earlier: std::time::SystemTime, what: &str) -> Duration {
    later
        .duration_since(earlier)
        .unwrap_or_else(|e| panic!("{what} came {:?} before it", e.duration()))
}

/// A TCP listener on 127.0.0.1 that accepts and holds every connection until aborted.
async fn listen(port: u16) -> (u16, tokio::task::JoinHandle<()>) {
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", port))
        .await
        .expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let task = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((s, _)) = listener.accept().await {
            held.push(s);
        }
    });
    (port, task)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_host_service_is_registered_while_its_probe_passes_and_goes_with_the_lease() {
    let rig = Rig::new("reg-svc").await;
    let (port, open) = listen(0).await;
    // `[[service]]` as documented, `[[registrar.service]]` (the alias) beside it.
    let toml = format!(
        r#"
[[service]]
name = "db"
port = {port}
addr = "127.0.0.1"
tags = ["primary"]
check_tcp = true
check_interval = "200ms"
check_fall = 1
check_rise = 1

[[registrar.service]]
name = "cache"
port = 6379
route = true
"#
    );
    let mut registrar = rig.spawn(&Opts {
        toml: Some(toml),
        ..Default::default()
    });
    let key = |name: &str, port: u16| {
        portolan::schema::node_service_key(
            &rig.prefix,
            &rig.node,
            name,
            &format!("{}-svc-{name}-{port}", rig.node),
        )
    };
    let (db, cache) = (key("db", port), key("cache", 6379));
    let rec = record(&rig.wait_value(&db, T).await);
    assert_eq!(rec.addr, format!("127.0.0.1:{port}"));
    assert_eq!(rec.node, rig.node);
    assert_eq!((rec.container.as_str(), rec.port), ("", None));
    assert_eq!(rec.tags, ["primary"]);
    // Registered to be found, not routed: `route = false` is the default.
    assert!(!rec.route.is_routed());
    // No probe: registered for as long as the registrar runs, at the advertise IP.
    let cache_rec = record(&rig.wait_value(&cache, T).await);
    assert_eq!(cache_rec.addr, "127.0.0.1:6379");
    assert!(cache_rec.route.is_routed(), "route = true asks for routing");
    let kvs = rig.kvs().await;
    assert_eq!(kvs[&db].lease, kvs[&rig.node_key()].lease);

    open.abort();
    let took = rig.wait_gone(&db, T).await;
    eprintln!("host service: deregistered {took:?} after its listener closed");
    assert!(rig.value(&cache).await.is_some());
    let (_, _reopened) = listen(port).await;
    rig.wait_value(&db, T).await;

    registrar.sigkill();
    let took = rig.wait_gone(&db, T).await;
    eprintln!("host service: gone {took:?} after the registrar was SIGKILLed (ttl 3 s)");
    assert_eq!(rig.value(&cache).await, None);
    assert!(
        took > Duration::from_secs(1),
        "gone before the lease ran out: {took:?}"
    );
}
