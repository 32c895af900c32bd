//! frond's NATS port against nats-py, the official Python client: pub/sub
//! with wildcards, a queue group, request/reply and headers
//! (tests/py/nats_py_check.py); JetStream push and ordered consumers
//! (tests/py/nats_py_push_check.py); the object store
//! (tests/py/nats_py_obj_check.py); Key/Value (tests/py/nats_py_kv_check.py).

mod common;

use common::*;

/// Runs `tests/py/<script>` against a fresh frond's NATS port; fails with
/// the script's output and frond's log unless the script succeeds.
async fn run_py(script: &str, what: &str) {
    let frond = Frond::start_new(FrondSpec::default()).await;
    wait_until("NATS port accepts", LONG, || accepts_tcp(frond.nats_port)).await;
    let path = format!("{}/tests/py/{script}", env!("CARGO_MANIFEST_DIR"));
    let out = tokio::process::Command::new("python3")
        .arg(path)
        .arg(frond.nats_port.to_string())
        .output()
        .await
        .expect("run python3 (install nats-py: pip install nats-py==2.16.0)");
    assert!(
        out.status.success(),
        "nats-py {what} against frond failed: {}\n{}\n--- frond log ---\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
        frond.log_text()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_py_pub_sub_queue_request_headers() {
    run_py("nats_py_check.py", "core").await;
}

/// nats-py's object store (`js.create_object_store`, put of bytes and of a
/// file-like object, get, info, list, watch, delete) against frond.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_py_object_store() {
    run_py("nats_py_obj_check.py", "object store").await;
}

/// nats-py's push subscription (`js.subscribe` with a durable, found by
/// subject) and ordered consumer (`ordered_consumer=True`) against frond's
/// local stream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_py_push_and_ordered_consumers() {
    run_py("nats_py_push_check.py", "push consumers").await;
}

/// nats-py's Key/Value API against frond: `js.create_key_value`,
/// put/get/create/update/delete, `kv.watch` with its initial values and
/// None marker, `kv.keys`, `kv.history`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_py_key_value() {
    run_py("nats_py_kv_check.py", "KV").await;
}
