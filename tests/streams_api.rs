//! Streams over the JetStream API (issue 13): `STREAM.CREATE`, `UPDATE`
//! and `DELETE` driven by async-nats's `jetstream` client and by raw API
//! requests (to check nats-server's error codes), against a real frond:
//! idempotent create, conflicts, subject overlap, limit updates, delete
//! with its consumers, persistence across restart and SIGKILL, frond.toml
//! streams refused, `max_storage`, and publish permissions on the API.

mod common;

use std::time::Duration;

use async_nats::jetstream::{self, stream};
use common::{connect_nats as connect, js_api as api, wait_until, Frond, FrondSpec, LONG};
use serde_json::{json, Value};

fn err_code(v: &Value) -> u64 {
    v["error"]["err_code"].as_u64().unwrap_or(0)
}

async fn names(c: &async_nats::Client) -> Vec<String> {
    let v = api(c, "$JS.API.STREAM.NAMES", json!({})).await;
    let mut n: Vec<String> = v["streams"]
        .as_array()
        .expect("streams")
        .iter()
        .map(|s| s.as_str().unwrap().to_string())
        .collect();
    n.sort();
    n
}

async fn publish(js: &jetstream::Context, subject: &str, n: usize) -> Vec<u64> {
    let mut seqs = Vec::new();
    for i in 0..n {
        let ack = js
            .publish(subject.to_string(), format!("m{i}").into())
            .await
            .expect("publish")
            .await
            .expect("PubAck");
        seqs.push(ack.sequence);
    }
    seqs
}

fn orders() -> stream::Config {
    stream::Config {
        name: "ORDERS".into(),
        subjects: vec!["orders.>".into()],
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn create_update_delete_with_the_stock_client() {
    let f = Frond::start_new(FrondSpec::default()).await;
    let c = connect(&f).await;
    let js = jetstream::new(c.clone());
    let mut s = js.create_stream(orders()).await.expect("create ORDERS");
    assert_eq!(s.info().await.unwrap().config.subjects, vec!["orders.>"]);
    assert_eq!(publish(&js, "orders.new", 3).await, vec![1, 2, 3]);
    // Idempotent: same config again, and get_or_create.
    js.create_stream(orders()).await.expect("identical create");
    let mut again = js
        .get_or_create_stream(orders())
        .await
        .expect("get_or_create");
    assert_eq!(again.info().await.unwrap().state.messages, 3);
    assert_eq!(names(&c).await, vec!["ORDERS", "TELEMETRY"]);

    // Same name, different config: 10058. Overlaps: 10065.
    let v = api(
        &c,
        "$JS.API.STREAM.CREATE.ORDERS",
        json!({"name": "ORDERS", "subjects": ["orders.>"], "max_msgs": 5}),
    )
    .await;
    assert_eq!(err_code(&v), 10058, "{v}");
    for subj in ["orders.eu.>", "telemetry.x", "*.new"] {
        let v = api(
            &c,
            "$JS.API.STREAM.CREATE.OTHER",
            json!({"name": "OTHER", "subjects": [subj]}),
        )
        .await;
        assert_eq!(err_code(&v), 10065, "{subj}: {v}");
    }
    let v = api(
        &c,
        "$JS.API.STREAM.CREATE.R3",
        json!({"name": "R3", "subjects": ["r3"], "num_replicas": 3}),
    )
    .await;
    assert_eq!(err_code(&v), 10074, "{v}");
    let v = api(
        &c,
        "$JS.API.STREAM.CREATE.M",
        json!({"name": "M", "mirror": {"name": "ORDERS"}}),
    )
    .await;
    assert_eq!(err_code(&v), 10052, "{v}");

    // Update the limits: max_msgs 2 keeps the newest two.
    let info = js
        .update_stream(stream::Config {
            max_messages: 2,
            ..orders()
        })
        .await
        .expect("update ORDERS");
    assert_eq!(info.config.max_messages, 2);
    publish(&js, "orders.new", 2).await;
    let mut s = js.get_stream("ORDERS").await.unwrap();
    let st = s.info().await.unwrap().state.clone();
    assert_eq!(
        (st.messages, st.first_sequence, st.last_sequence),
        (2, 4, 5)
    );
    // Immutable fields: storage.
    let v = api(
        &c,
        "$JS.API.STREAM.UPDATE.ORDERS",
        json!({"name": "ORDERS", "subjects": ["orders.>"], "storage": "memory"}),
    )
    .await;
    assert_eq!(err_code(&v), 10052, "{v}");

    // A consumer goes with its stream.
    s.create_consumer(jetstream::consumer::pull::Config {
        durable_name: Some("worker".into()),
        ..Default::default()
    })
    .await
    .expect("consumer");
    let dir = f.stream_dir("ORDERS");
    assert!(dir.join("api-stream.rec").is_file());
    js.delete_stream("ORDERS").await.expect("delete ORDERS");
    assert!(!dir.exists(), "the stream's directory is removed");
    assert_eq!(names(&c).await, vec!["TELEMETRY"]);
    let v = api(&c, "$JS.API.CONSUMER.INFO.ORDERS.worker", json!({})).await;
    assert_eq!(err_code(&v), 10059, "{v}");
    let v = api(&c, "$JS.API.STREAM.DELETE.ORDERS", json!({})).await;
    assert_eq!(err_code(&v), 10059, "{v}");
    // Nothing captures orders.> any more: a JetStream publish has no answer.
    let r = js.publish("orders.new", "x".into()).await.unwrap().await;
    assert!(r.is_err(), "no stream acknowledges orders.new: {r:?}");
    // Recreated: empty, from sequence 1.
    js.create_stream(orders()).await.expect("create again");
    assert_eq!(publish(&js, "orders.new", 1).await, vec![1]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn created_streams_survive_restart_and_sigkill() {
    let mut f = Frond::start_new(FrondSpec::default()).await;
    let kv = stream::Config {
        name: "KV_cfg".into(),
        subjects: vec!["$KV.cfg.>".into()],
        max_messages_per_subject: 5,
        allow_rollup: true,
        deny_delete: true,
        allow_direct: true,
        metadata: [("owner".to_string(), "twin".to_string())].into(),
        ..Default::default()
    };
    {
        let js = jetstream::new(connect(&f).await);
        js.create_stream(kv.clone()).await.expect("create KV_cfg");
        js.create_stream(orders()).await.expect("create ORDERS");
        js.create_stream(stream::Config {
            name: "GONE".into(),
            subjects: vec!["gone.>".into()],
            ..Default::default()
        })
        .await
        .expect("create GONE");
        publish(&js, "$KV.cfg.a", 3).await;
        publish(&js, "orders.x", 2).await;
        js.delete_stream("GONE").await.expect("delete GONE");
    }
    f.terminate();
    f.start().await;
    {
        let c = connect(&f).await;
        assert_eq!(names(&c).await, vec!["KV_cfg", "ORDERS", "TELEMETRY"]);
        let js = jetstream::new(c);
        let mut s = js.get_stream("KV_cfg").await.expect("KV_cfg after restart");
        let info = s.info().await.unwrap().clone();
        assert_eq!(info.state.messages, 3);
        assert_eq!(info.config.max_messages_per_subject, 5);
        assert!(info.config.allow_rollup && info.config.deny_delete && info.config.allow_direct);
        assert_eq!(
            info.config.metadata.get("owner").map(String::as_str),
            Some("twin")
        );
        // Identical create after restart: still idempotent.
        js.create_stream(kv.clone())
            .await
            .expect("idempotent after restart");
        assert_eq!(publish(&js, "orders.x", 2).await, vec![3, 4]);
        js.delete_stream("ORDERS").await.expect("delete ORDERS");
    }
    f.kill9();
    f.start().await;
    let c = connect(&f).await;
    assert_eq!(names(&c).await, vec!["KV_cfg", "TELEMETRY"]);
    let js = jetstream::new(c);
    assert_eq!(publish(&js, "$KV.cfg.b", 1).await, vec![4]);
    // Acknowledged before SIGKILL means durable: a created stream too.
    js.create_stream(orders()).await.expect("create ORDERS");
    assert_eq!(publish(&js, "orders.y", 2).await, vec![1, 2]);
    f.kill9();
    f.start().await;
    let js = jetstream::new(connect(&f).await);
    let mut s = js.get_stream("ORDERS").await.expect("ORDERS after SIGKILL");
    assert_eq!(s.info().await.unwrap().state.messages, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn frond_toml_streams_are_not_changed_over_the_api() {
    let f = Frond::start_new(FrondSpec::default()).await;
    let c = connect(&f).await;
    let js = jetstream::new(c.clone());
    let mut t = js.get_stream("TELEMETRY").await.unwrap();
    let cfg = t.info().await.unwrap().config.clone();
    // The same config: idempotent create (get_or_create works).
    js.get_or_create_stream(cfg.clone())
        .await
        .expect("get_or_create TELEMETRY");
    let v = api(
        &c,
        "$JS.API.STREAM.UPDATE.TELEMETRY",
        json!({"name": "TELEMETRY", "subjects": ["telemetry.>"], "max_msgs": 10}),
    )
    .await;
    assert_eq!(err_code(&v), 10052, "{v}");
    assert!(
        v["error"]["description"]
            .as_str()
            .unwrap()
            .contains("frond.toml"),
        "{v}"
    );
    let v = api(&c, "$JS.API.STREAM.DELETE.TELEMETRY", json!({})).await;
    assert_eq!(err_code(&v), 10052, "{v}");
    let v = api(
        &c,
        "$JS.API.STREAM.CREATE.TELEMETRY",
        json!({"name": "TELEMETRY", "subjects": ["other"]}),
    )
    .await;
    assert_eq!(err_code(&v), 10058, "{v}");
    assert_eq!(names(&c).await, vec!["TELEMETRY"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_storage_bounds_created_streams() {
    let f = Frond::start_new(FrondSpec {
        // Top-level key (the generated config starts with `node = …`).
        node: "truck1\"\nmax_storage = \"40MiB".into(),
        mqtt_config: "max_retained_bytes = \"1MiB\"\n".into(),
        // Appended to TELEMETRY's [[stream]] section.
        extra_config: "max_bytes = \"8MiB\"\n".into(),
        ..Default::default()
    })
    .await;
    let c = connect(&f).await;
    let mib = 1u64 << 20;
    let create = |name: &str, max_bytes: i64| {
        let c = c.clone();
        let name = name.to_string();
        async move {
            let body = json!({"name": name, "subjects": [format!("{}.>", name.to_lowercase())], "max_bytes": max_bytes});
            api(&c, &format!("$JS.API.STREAM.CREATE.{name}"), body).await
        }
    };
    // 40 MiB - 2 MiB (retained) - 8 MiB (TELEMETRY) = 30 MiB left.
    let v = create("A", (20 * mib) as i64).await;
    assert_eq!(err_code(&v), 0, "{v}");
    let v = create("B", (20 * mib) as i64).await;
    assert_eq!(err_code(&v), 10047, "{v}");
    let v = create("C", -1).await;
    assert_eq!(err_code(&v), 10113, "{v}");
    let v = create("D", (10 * mib) as i64).await;
    assert_eq!(err_code(&v), 0, "{v}");
    let v = api(&c, "$JS.API.STREAM.DELETE.A", json!({})).await;
    assert_eq!(v["success"], json!(true), "{v}");
    let v = create("B", (20 * mib) as i64).await;
    assert_eq!(err_code(&v), 0, "{v}");
    assert_eq!(names(&c).await, vec!["B", "D", "TELEMETRY"]);
}

const AUTH: &str = r#"
[auth]
anonymous = false
[[auth.users]]
name = "app"
password = "app-pw"
deny_publish = ["$JS.API.STREAM.CREATE.>", "$JS.API.STREAM.DELETE.>"]
[[auth.users]]
name = "admin"
password = "admin-pw"
"#;

async fn login(f: &Frond, user: &str, pw: &str) -> async_nats::Client {
    async_nats::ConnectOptions::with_user_and_password(user.into(), pw.into())
        .connect(format!("127.0.0.1:{}", f.nats_port))
        .await
        .expect("login")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn creating_and_deleting_need_publish_permission_on_the_api() {
    let f = Frond::start_new(FrondSpec {
        extra_config: AUTH.into(),
        ..Default::default()
    })
    .await;
    let app = login(&f, "app", "app-pw").await;
    let admin = login(&f, "admin", "admin-pw").await;
    let r = tokio::time::timeout(
        Duration::from_secs(3),
        jetstream::new(app.clone()).create_stream(orders()),
    )
    .await;
    assert!(!matches!(r, Ok(Ok(_))), "app may not create: {r:?}");
    assert_eq!(names(&admin).await, vec!["TELEMETRY"]);
    jetstream::new(admin.clone())
        .create_stream(orders())
        .await
        .expect("admin creates");
    let r = tokio::time::timeout(
        Duration::from_secs(3),
        jetstream::new(app.clone()).delete_stream("ORDERS"),
    )
    .await;
    assert!(!matches!(r, Ok(Ok(_))), "app may not delete");
    // app may still use the stream (INFO is allowed).
    wait_until("ORDERS visible to app", LONG, || {
        let app = app.clone();
        async move { names(&app).await.contains(&"ORDERS".to_string()) }
    })
    .await;
    assert_eq!(names(&admin).await, vec!["ORDERS", "TELEMETRY"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kv_and_object_store_streams_are_created_by_the_stock_client() {
    let f = Frond::start_new(FrondSpec::default()).await;
    let c = connect(&f).await;
    let js = jetstream::new(c.clone());
    let kv = js
        .create_key_value(jetstream::kv::Config {
            bucket: "cfg".into(),
            history: 5,
            max_age: Duration::from_secs(3600),
            ..Default::default()
        })
        .await
        .expect("create_key_value");
    assert_eq!(kv.put("a", "1".into()).await.expect("kv put"), 1);
    assert_eq!(kv.put("b", "2".into()).await.expect("kv put"), 2);
    js.create_object_store(jetstream::object_store::Config {
        bucket: "blobs".into(),
        ..Default::default()
    })
    .await
    .expect("create_object_store");
    assert_eq!(names(&c).await, vec!["KV_cfg", "OBJ_blobs", "TELEMETRY"]);
    let v = api(&c, "$JS.API.STREAM.INFO.KV_cfg", json!({})).await;
    let cfg = &v["config"];
    assert_eq!(cfg["subjects"], json!(["$KV.cfg.>"]), "{v}");
    assert_eq!(cfg["max_msgs_per_subject"], json!(5), "{v}");
    assert_eq!(cfg["allow_rollup_hdrs"], json!(true), "{v}");
    assert_eq!(cfg["allow_direct"], json!(true), "{v}");
    assert_eq!(v["state"]["messages"], json!(2), "{v}");
    let v = api(&c, "$JS.API.STREAM.INFO.OBJ_blobs", json!({})).await;
    assert_eq!(
        v["config"]["subjects"],
        json!(["$O.blobs.C.>", "$O.blobs.M.>"]),
        "{v}"
    );
    js.delete_key_value("cfg").await.expect("delete_key_value");
    assert_eq!(names(&c).await, vec!["OBJ_blobs", "TELEMETRY"]);
}

/// A stream removed from frond.toml leaves its directory (messages,
/// durable consumers): creating a stream of that name over the API is
/// refused (10058) rather than handing those to the caller.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn create_does_not_adopt_a_leftover_directory() {
    let f = Frond::start_new(FrondSpec::default()).await;
    let left = f.data_dir().join("streams").join("LEFT");
    std::fs::create_dir_all(left.join("consumers")).expect("leftover dir");
    std::fs::write(left.join("consumers").join("old.json"), b"{}").expect("leftover consumer");
    let c = connect(&f).await;
    let body = json!({"name": "LEFT", "subjects": ["left.>"], "storage": "file",
                      "retention": "limits", "max_bytes": 1 << 20});
    let v = api(&c, "$JS.API.STREAM.CREATE.LEFT", body).await;
    assert_eq!(err_code(&v), 10058, "{v}");
    assert!(left.join("consumers").join("old.json").exists());
    assert!(!names(&c).await.contains(&"LEFT".to_string()));
}
