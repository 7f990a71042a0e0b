//! The board from a feed, and its HTML: rules the page keeps whatever etcd holds.

use std::sync::Arc;

use super::*;
use crate::schema::Instance;

fn instance(service: &str, id: &str, draining: bool) -> Arc<Instance> {
    let mut i = crate::schema::decode_instance(
        "k",
        service,
        id,
        br#"{"addr":"10.0.0.1:80","node":"n1","tags":["t"]}"#,
    )
    .unwrap();
    i.draining = draining;
    Arc::new(i)
}

fn snapshot(list: &[Arc<Instance>]) -> Arc<StoreSnapshot> {
    let mut s = StoreSnapshot::default();
    for i in list {
        s.services
            .entry(i.service.clone())
            .or_default()
            .push(i.clone());
    }
    Arc::new(s)
}

fn feed(desired: &[Arc<Instance>], rendered: &[Arc<Instance>]) -> Feed {
    Feed {
        revision: 7,
        desired: snapshot(desired),
        rendered: snapshot(rendered),
        ..Default::default()
    }
}

#[test]
fn instances_show_draining_and_held_and_keep_their_first_seen_time() {
    let (a, b, c) = (
        instance("web", "a", false),
        instance("web", "b", true),
        instance("web", "c", false),
    );
    let mut seen = HashMap::new();
    let f = feed(&[a.clone(), b.clone()], &[a.clone(), b.clone(), c.clone()]);
    let board = build(&f, &Probes::default(), &mut seen, 1000);
    let rows = &board.services[0].instances;
    assert_eq!(
        rows.iter()
            .map(|r| (r.id.as_str(), r.draining, r.held))
            .collect::<Vec<_>>(),
        vec![("a", false, false), ("b", true, false), ("c", false, true)]
    );
    assert_eq!(
        board.hold.as_ref().unwrap().instances,
        vec!["web/c".to_string()]
    );
    // Seen again later: the age counts from the first sight; a gone instance is forgotten.
    let later = build(
        &feed(std::slice::from_ref(&a), std::slice::from_ref(&a)),
        &Probes::default(),
        &mut seen,
        1050,
    );
    assert_eq!(later.services[0].instances[0].seen_since, 1000);
    assert!(later.hold.is_none());
    assert_eq!(seen.len(), 1);
}

#[test]
fn every_value_from_etcd_is_escaped() {
    let mut f = feed(&[], &[]);
    let hostile = "<script>alert(1)</script>\"'&\r\nevent: x";
    f.left_out = Arc::new(
        [(
            format!("/p/services/{hostile}/a"),
            format!("tag {hostile:?}"),
        )]
        .into(),
    );
    f.errors = vec![hostile.into()];
    let mut board = build(&f, &Probes::default(), &mut HashMap::new(), 1);
    board.watcher = hostile.into();
    board.etcd = vec![Endpoint {
        endpoint: hostile.into(),
        healthy: Some(false),
        detail: hostile.into(),
    }];
    let html = html::board(&board, 10);
    assert!(!html.contains("<script"), "{html}");
    assert!(!html.contains('\n') && !html.contains('\r'), "{html}");
    assert!(
        html.contains("&lt;script&gt;alert(1)&lt;/script&gt;&quot;&#39;&amp;&#13;&#10;event: x"),
        "{html}"
    );
}

#[test]
fn a_hold_shows_its_countdown_and_what_confirms_it() {
    let a = instance("web", "a", false);
    let mut f = feed(&[], &[a]);
    f.held_until = Some(1060);
    let board = build(&f, &Probes::default(), &mut HashMap::new(), 1000);
    let html = html::board(&board, 10);
    assert!(html.contains("data-until=\"1060\">60 s</b>"), "{html}");
    assert!(html.contains("kill -USR1"), "{html}");
    assert!(html.contains("<li>web/a</li>"), "{html}");
}

#[test]
fn haproxy_s_view_and_drift_come_from_the_admin_socket_answer() {
    let a = instance("web", "a", false);
    let cfg: Arc<str> = "backend svc_web\n  server a 10.0.0.1:80 weight 100 check\n".into();
    let mut f = feed(std::slice::from_ref(&a), std::slice::from_ref(&a));
    f.files = vec![FileFeed {
        dest: "/d".into(),
        admin_socket: Some("/s".into()),
        rendered: Some(cfg.clone()),
        file: Some(cfg),
    }];
    let state = "1\n# be_id be_name srv_id srv_name srv_addr srv_op_state srv_admin_state srv_uweight\n3 svc_web 1 a 10.0.0.1 0 1 100 100 10 6 3 4 6 0 0 0 - 80 - 0 0 - - 0\n";
    let probes = Probes {
        haproxy: vec![Some(Ok(state.into()))],
        etcd: Vec::new(),
    };
    let board = build(&f, &probes, &mut HashMap::new(), 1);
    let run = board.services[0].instances[0].haproxy.clone().unwrap();
    assert_eq!(
        (run.backend.as_str(), run.state.as_str(), run.up),
        ("svc_web", "maint", Some(false))
    );
    assert_eq!(board.drift[0].differences.len(), 1, "{:?}", board.drift);
    assert!(board.drift[0].differences[0].starts_with("svc_web/a: HAProxy has it in maintenance"));
}

#[test]
fn an_event_is_one_data_line_per_line() {
    assert_eq!(
        serve::event("<p>a</p>\n<p>b</p>"),
        "event: board\ndata: <p>a</p>\ndata: <p>b</p>\n\n"
    );
}
