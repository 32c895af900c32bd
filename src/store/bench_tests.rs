//! Open-time benchmark (ignored by default; run by `scripts/store-bench`).
//! Writes N 100-byte messages on 16-byte subjects to a real directory, then
//! times `Store::open` after a clean close, after a simulated SIGKILL (no
//! close: the active segment has no snapshot), and with every snapshot
//! removed (full scan). N from `FROND_BENCH_MSGS` (default 1,000,000);
//! the directory from `FROND_BENCH_DIR` (default: a temporary one).

use std::time::Instant;

use super::*;

fn time_open(dir: &std::path::Path, what: &str) -> Store {
    let t = Instant::now();
    let (st, rep) = Store::open(
        Box::new(FsBackend::open(dir).unwrap()),
        StoreOptions::default(),
    )
    .unwrap();
    let dt = t.elapsed();
    println!(
        "open after {what}: {:.3} s ({} messages, {} subjects, {} truncated bytes)",
        dt.as_secs_f64(),
        rep.records,
        st.subjects.len(),
        rep.truncated_bytes
    );
    st
}

#[test]
#[ignore]
fn store_open_bench() {
    let n: u64 = std::env::var("FROND_BENCH_MSGS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1_000_000);
    let tmp = tempfile::tempdir().unwrap();
    let dir = std::env::var("FROND_BENCH_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|_| tmp.path().join("bench"));
    let _ = std::fs::remove_dir_all(&dir);
    let t = Instant::now();
    let (mut st, _) = Store::open(
        Box::new(FsBackend::open(&dir).unwrap()),
        StoreOptions::default(),
    )
    .unwrap();
    let payload = vec![0x5a; 100];
    for i in 0..n {
        let subject = format!("sensors.truck.{:02}", i % 100);
        st.append(&NewRecord {
            subject: &subject,
            headers: None,
            payload: &payload,
            timestamp: 1_700_000_000_000_000_000 + i * 1000,
            tags: Tags::default(),
        })
        .unwrap();
    }
    st.close().unwrap();
    let s = st.state();
    drop(st);
    println!(
        "wrote {n} messages in {:.2} s; {:.1} bytes per message in records; {} files",
        t.elapsed().as_secs_f64(),
        s.bytes as f64 / n as f64,
        std::fs::read_dir(&dir).unwrap().count()
    );
    let st = time_open(&dir, "clean close");
    assert_eq!(st.state(), s);
    // SIGKILL: the process dies after writing, without close. Same files
    // minus the active segment's snapshot (opening removed it; nothing
    // rewrote it since).
    drop(st);
    let st = time_open(&dir, "SIGKILL (active segment scanned)");
    assert_eq!(st.state(), s);
    drop(st);
    for e in std::fs::read_dir(&dir).unwrap() {
        let p = e.unwrap().path();
        if p.extension().is_some_and(|x| x == "idx") {
            std::fs::remove_file(p).unwrap();
        }
    }
    let st = time_open(&dir, "losing every snapshot (full scan)");
    assert_eq!(st.state(), s);
}
