//! The Key/Value and Object Store benchmark client behind `scripts/kv-bench`:
//! one stock client (async-nats, its KV and object store APIs), so frond and
//! nats-server are driven by the same code in the same run.
//!
//! ```sh
//! cargo run --release --example kv_bench -- 127.0.0.1:4222 rates
//! cargo run --release --example kv_bench -- 127.0.0.1:4222 rates 20000 put,get
//! cargo run --release --example kv_bench -- 127.0.0.1:4222 fill 100000
//! ```
//!
//! `rates` prints one JSON object: acknowledged KV puts/s (64 puts in
//! flight), KV gets/s (64 in flight), watch deliveries/s (4 watchers on
//! their own connections, each must see every put), and object put/get
//! MB/s of a 64 MiB object (digest checked by the client on get); a third
//! argument picks parts (`put,get,watch,object`, all by default;
//! `object_put` puts the object without reading it back, for profiling). `fill N`
//! puts N distinct keys (64 in flight) and prints when done, so the caller
//! can read the server's RSS. Every operation must succeed: an error ends
//! the run with a message, never a partial figure.

use std::time::{Duration, Instant};

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use async_nats::jetstream::{self, kv, object_store};
use smol::stream::StreamExt;
use tokio::io::AsyncReadExt;

type Error = Box<dyn std::error::Error + Send + Sync>;

const IN_FLIGHT: usize = 64;

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), Error> {
    let mut args = std::env::args().skip(1);
    let addr = args.next().unwrap_or_else(|| "127.0.0.1:4222".into());
    let mode = args.next().unwrap_or_else(|| "rates".into());
    let n: usize = args.next().map_or(Ok(20_000), |n| n.parse())?;
    let js = jetstream::new(async_nats::connect(&addr).await?);
    match mode.as_str() {
        "rates" => {
            let parts = args.next().unwrap_or_else(|| "put,get,watch,object".into());
            rates(&addr, &js, n, &parts).await
        }
        "fill" => fill(&js, n).await,
        other => Err(format!("unknown mode {other:?}: rates or fill").into()),
    }
}

async fn bucket(js: &jetstream::Context, name: &str) -> Result<kv::Store, Error> {
    let _ = js.delete_key_value(name).await;
    Ok(js
        .create_key_value(kv::Config {
            bucket: name.into(),
            history: 1,
            ..Default::default()
        })
        .await?)
}

/// Runs `op(i)` for i in 0..n with [`IN_FLIGHT`] at once; returns ops/s.
async fn pipelined<F, Fut>(n: usize, op: F) -> Result<f64, Error>
where
    F: Fn(usize) -> Fut + Clone + Send + 'static,
    Fut: std::future::Future<Output = Result<(), Error>> + Send,
{
    let start = Instant::now();
    let next = Arc::new(AtomicUsize::new(0));
    let mut workers = Vec::new();
    for _ in 0..IN_FLIGHT {
        let (next, op) = (next.clone(), op.clone());
        workers.push(tokio::spawn(async move {
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= n {
                    return Ok::<(), Error>(());
                }
                op(i).await?;
            }
        }));
    }
    for w in workers {
        w.await??;
    }
    Ok(n as f64 / start.elapsed().as_secs_f64())
}

/// An op that puts a 100-byte value at `<prefix><i % modulo>`.
fn put_op(
    kv: &kv::Store,
    prefix: &'static str,
    modulo: usize,
) -> impl Fn(usize) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<(), Error>> + Send>>
       + Clone
       + Send
       + 'static {
    let kv = kv.clone();
    move |i| {
        let kv = kv.clone();
        Box::pin(async move {
            kv.put(format!("{prefix}{}", i % modulo), vec![b'v'; 100].into())
                .await?;
            Ok(())
        })
    }
}

async fn rates(addr: &str, js: &jetstream::Context, n: usize, parts: &str) -> Result<(), Error> {
    let kv = bucket(js, "bench").await?;
    let mut out = Vec::new();
    let want = |p: &str| parts.split(',').any(|x| x == p);
    if want("put") || want("get") {
        let put = pipelined(n, put_op(&kv, "k", 1000)).await?;
        out.push(format!("\"kv_put\": {put:.0}"));
    }
    if want("get") {
        let store = kv.clone();
        let get = pipelined(n, move |i| {
            let kv = store.clone();
            async move {
                match kv.get(format!("k{}", i % 1000)).await? {
                    Some(v) if v.len() == 100 => Ok(()),
                    other => Err(format!("get k{}: {other:?}", i % 1000).into()),
                }
            }
        })
        .await?;
        out.push(format!("\"kv_get\": {get:.0}"));
    }
    if want("watch") {
        let watch = watch_fan_out(addr, &kv, n).await?;
        out.push(format!("\"watch_deliveries\": {watch:.0}"));
    }
    if want("object") || want("object_put") {
        let (obj_put, obj_get) = object(js, 64 << 20, want("object")).await?;
        out.push(format!("\"obj_put_mbs\": {obj_put:.1}"));
        if let Some(get) = obj_get {
            out.push(format!("\"obj_get_mbs\": {get:.1}"));
        }
    }
    println!("{{{}}}", out.join(", "));
    Ok(())
}

/// 4 watchers, each on its own connection; `n` puts; deliveries/s from the
/// first put until every watcher has seen every put.
async fn watch_fan_out(addr: &str, kv: &kv::Store, n: usize) -> Result<f64, Error> {
    let mut watchers = Vec::new();
    for _ in 0..4 {
        let js = jetstream::new(async_nats::connect(addr).await?);
        let store = js.get_key_value("bench").await?;
        let mut w = store.watch("w.>").await?;
        watchers.push(tokio::spawn(async move {
            let mut seen = 0;
            while seen < n {
                match tokio::time::timeout(Duration::from_secs(30), w.next()).await {
                    Ok(Some(Ok(_))) => seen += 1,
                    Ok(Some(Err(e))) => return Err(format!("watch: {e}")),
                    Ok(None) => return Err("watch ended".into()),
                    Err(_) => return Err(format!("watch stalled after {seen} of {n}")),
                }
            }
            Ok(Instant::now())
        }));
    }
    let start = Instant::now();
    // Every put on its own key: with history 1 a put replaces the key's
    // previous revision, and a watcher that is behind skips replaced
    // revisions (in nats-server too), so "every watcher sees every put"
    // holds only when nothing is replaced.
    pipelined(n, put_op(kv, "w.k", usize::MAX)).await?;
    let mut last = start;
    for w in watchers {
        last = last.max(w.await??);
    }
    Ok((4 * n) as f64 / (last - start).as_secs_f64())
}

/// Puts and (with `get`) gets one object of `size` bytes; returns (put,
/// get) MB/s.
async fn object(
    js: &jetstream::Context,
    size: usize,
    get: bool,
) -> Result<(f64, Option<f64>), Error> {
    let _ = js.delete_object_store("blobs").await;
    let store = js
        .create_object_store(object_store::Config {
            bucket: "blobs".into(),
            ..Default::default()
        })
        .await?;
    let data: Vec<u8> = (0..size)
        .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
        .collect();
    let mb = size as f64 / 1e6;
    let start = Instant::now();
    store.put("firmware.bin", &mut data.as_slice()).await?;
    let put = mb / start.elapsed().as_secs_f64();
    if !get {
        return Ok((put, None));
    }
    let start = Instant::now();
    let mut obj = store.get("firmware.bin").await?;
    let mut back = Vec::with_capacity(size);
    obj.read_to_end(&mut back).await?;
    let get = mb / start.elapsed().as_secs_f64();
    if back != data {
        return Err(format!("object read back {} bytes, differs", back.len()).into());
    }
    Ok((put, Some(get)))
}

async fn fill(js: &jetstream::Context, n: usize) -> Result<(), Error> {
    let kv = bucket(js, "fill").await?;
    let rate = pipelined(n, put_op(&kv, "device.", usize::MAX)).await?;
    println!("{{\"filled\": {n}, \"kv_put\": {rate:.0}}}");
    Ok(())
}
