//! The I/O half of source-down ([`super::source`]): opening each source
//! (its cursor record and the scan of the local stream's tail), storing
//! the batches the machines hand out into the local streams, routing them
//! to local live subscribers, persisting cursors, publishing status.
//!
//! Owns: one storer task per source and its bounded channel (one batch at
//! a time, about [`source::BATCH_BYTES`] of messages plus their copies for
//! live routing).
//!
//! Invariants:
//! - A batch's messages are submitted to the local stream in hub order,
//!   then awaited in that order; a message is routed to live subscribers
//!   (as frond itself, like any stored message: NATS and MQTT
//!   subscribers, whose own permissions apply at delivery) only once it is
//!   durable. A message the stream refuses for good (too large, a header
//!   the stream rejects, discard-new limits) is logged and passed; a
//!   closed stream or an I/O error stops the batch there, and the prefix
//!   before it is what the machine's cursor advances to. (A later message
//!   of the same batch that the stream did store after such an error
//!   would be stored again on retry; the store fails every append after
//!   an I/O error, so this is not expected.)
//! - The cursor record is written with fsync after every stored batch.
//! - Persistent MQTT sessions read sourced messages from the local stream
//!   like any other stored message.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use smol::channel::{Receiver, Sender};

use super::cursor::{self, SourceCursor};
use super::link::{Link, LinkEvent};
use super::source::{self, Batch, Source, SourceParams, SourceStatus, Stored};
use crate::config::UplinkConfig;
use crate::router::{Broker, Msg};
use crate::stream::{StreamError, StreamHandle};
use crate::wire::nats::client::MsgOp;

/// What a storer task answers: (source index, outcome).
pub type StoreAnswer = (usize, Stored);

/// One configured source, open.
pub struct SourceSlot {
    pub src: Source,
    path: PathBuf,
    batches: Sender<Batch>,
}

/// Open every configured source whose local stream is open: load its
/// record, scan the local tail, start its storer task.
pub async fn open(
    cfg: &UplinkConfig,
    data_dir: &Path,
    broker: &Arc<Broker>,
    answers: &Sender<StoreAnswer>,
) -> (Vec<SourceSlot>, Vec<smol::Task<()>>) {
    let mut slots = Vec::new();
    let mut tasks = Vec::new();
    for sc in &cfg.sources {
        let Some(handle) = broker
            .streams()
            .iter()
            .find(|h| h.config().name == sc.stream)
            .cloned()
        else {
            log::error!(
                "source {} -> {} skipped: no such local stream is open",
                sc.from,
                sc.stream
            );
            continue;
        };
        let path = match cursor::source_path(data_dir, &sc.stream, &sc.from) {
            Ok(p) => p,
            Err(e) => {
                log::error!("source {} -> {} skipped: {e}", sc.from, sc.stream);
                continue;
            }
        };
        let record = match cursor::load_source(&path) {
            Ok(r) => r,
            Err(e) => {
                log::warn!("source {} -> {}: the cursor record is unusable ({e}); resuming from the copies found in the local stream", sc.from, sc.stream);
                None
            }
        };
        let (tail, local_last) = scan_tail(&handle, &sc.from, record.as_ref()).await;
        let transform = sc.transform.as_ref().and_then(|(f, t)| {
            crate::subject::mapping::Transform::new(f, t)
                .ok()
                .map(|tr| (f.clone(), tr))
        });
        let params = SourceParams {
            from: sc.from.clone(),
            filter: sc.filter.clone(),
            stream: sc.stream.clone(),
            local_subjects: handle.config().subjects.clone(),
            transform,
            start: sc.start.clone(),
            poll_interval: sc.poll_interval,
            batch: source::BATCH_MSGS,
            max_bytes: source::BATCH_BYTES,
        };
        let mut src = Source::new(params, record, tail);
        src.handle_scanned(local_last);
        log::info!(
            "source {} -> {}: resuming after hub sequence {}",
            sc.from,
            sc.stream,
            src.hub_seq()
        );
        let (tx, rx) = smol::channel::bounded(1);
        tasks.push(smol::spawn(storer(
            handle.clone(),
            broker.clone(),
            slots.len(),
            rx,
            answers.clone(),
        )));
        slots.push(SourceSlot {
            src,
            path,
            batches: tx,
        });
    }
    (slots, tasks)
}

/// The highest hub sequence of `from` among the local stream's messages
/// after the record's local sequence (the whole stream without a record),
/// and the last local sequence scanned.
async fn scan_tail(
    h: &StreamHandle,
    from: &str,
    record: Option<&SourceCursor>,
) -> (Option<u64>, u64) {
    let mut next = record.map_or(0, |r| r.local_seq) + 1;
    let mut best = None;
    loop {
        let msgs = match h.read(next, 1024, 1 << 20).await {
            Ok(m) => m,
            Err(e) => {
                log::warn!(
                    "source {from} -> {}: cannot scan the local stream ({e}); using the cursor record only",
                    h.config().name
                );
                return (best, 0);
            }
        };
        let Some(last) = msgs.last().map(|m| m.seq) else {
            return (best, next - 1);
        };
        for m in &msgs {
            if let Some(s) = source::origin_of(m.headers.as_deref(), from) {
                best = Some(best.map_or(s, |b: u64| b.max(s)));
            }
        }
        next = last + 1;
    }
}

/// Store batches for one source, one at a time.
async fn storer(
    h: StreamHandle,
    broker: Arc<Broker>,
    idx: usize,
    rx: Receiver<Batch>,
    tx: Sender<StoreAnswer>,
) {
    while let Ok(b) = rx.recv().await {
        let r = store(&h, &broker, b).await;
        if tx.send((idx, r)).await.is_err() {
            return;
        }
    }
}

/// Append `b` in order, wait for durability, route what was stored.
async fn store(h: &StreamHandle, broker: &Broker, b: Batch) -> Stored {
    let name = &h.config().name;
    let mut waiting = Vec::with_capacity(b.msgs.len());
    let mut r = Stored::default();
    for (seq, m) in b.msgs {
        let copy = Msg {
            subject: m.subject.clone(),
            reply: None,
            headers: m.headers.clone(),
            payload: m.payload.clone(),
            publisher: None,
        };
        match h.submit(m).await {
            Ok(w) => waiting.push((seq, w, copy)),
            Err(e) => {
                r.error = Some(e.to_string());
                break;
            }
        }
    }
    for (seq, mut w, copy) in waiting {
        w.wait().await;
        let res = w.try_take().unwrap_or(Err(StreamError::Closed));
        if r.error.is_some() {
            continue;
        }
        match res {
            Ok(_) => {
                r.done += 1;
                broker.route_msg(None, Arc::new(copy), 1, Instant::now());
            }
            Err(e @ (StreamError::Closed | StreamError::Io(_))) => r.error = Some(e.to_string()),
            Err(e) => {
                log::error!("source into {name}: hub message {seq} ({}) refused by the local stream, passed: {e}", copy.subject);
                r.done += 1;
                r.refused += 1;
            }
        }
    }
    r.local_last_seq = h.state().last_seq;
    r
}

/// The link is up: fresh subscriptions for every source.
pub fn on_up(link: &mut Link, slots: &mut [SourceSlot], now: Instant) {
    for s in slots.iter_mut() {
        let inbox = link.alloc_sid();
        let wake = (0..source::MAX_WAKE_SUBS)
            .map(|_| link.alloc_sid())
            .collect();
        let token = format!("{:016x}", fastrand::u64(..));
        s.src.handle_connected(now, inbox, wake, &token);
    }
}

pub fn on_down(slots: &mut [SourceSlot]) {
    for s in slots.iter_mut() {
        s.src.handle_disconnected();
    }
}

/// A hub message: each source takes what is for its subscriptions.
pub fn on_msg(slots: &mut [SourceSlot], now: Instant, m: &MsgOp) {
    for s in slots.iter_mut() {
        s.src
            .handle_msg(now, m.sid, &m.subject, m.headers.as_deref(), &m.payload);
    }
}

pub fn on_stored(slots: &mut [SourceSlot], now: Instant, (idx, r): StoreAnswer) {
    if let Some(s) = slots.get_mut(idx) {
        s.src.handle_stored(now, r);
    }
}

pub fn tick(slots: &mut [SourceSlot], now: Instant) {
    for s in slots.iter_mut() {
        s.src.handle_tick(now);
    }
}

pub fn deadline(slots: &[SourceSlot]) -> Option<Instant> {
    slots.iter().filter_map(|s| s.src.poll_deadline()).min()
}

/// Move commands to the link, batches to the storers, cursors to disk,
/// events to the log.
pub fn pump(link: &mut Link, slots: &mut [SourceSlot]) {
    for s in slots.iter_mut() {
        while let Some(c) = s.src.poll_command() {
            let Some(out) = link.send() else { break };
            if let Err(e) = c.encode(out) {
                log::error!("dropping unencodable command: {e}");
            }
        }
        let p = s.src.params();
        let (from, stream) = (p.from.clone(), p.stream.clone());
        while let Some(ev) = s.src.poll_event() {
            log::log!(ev.level(), "source {from} -> {stream}: {ev}");
        }
        if let Some(b) = s.src.poll_batch() {
            // Capacity 1 and one batch in flight: never full.
            if s.batches.try_send(b).is_err() {
                log::error!("source {from} -> {stream}: the storer is gone");
            }
        }
        if let Some(c) = s.src.poll_cursor() {
            if let Err(e) = cursor::store_source(&s.path, &c, true) {
                log::warn!(
                    "source {from} -> {stream}: cannot write {}: {e} (a restart finds the copies in the local stream)",
                    s.path.display()
                );
            }
        }
    }
}

pub fn statuses(slots: &[SourceSlot]) -> Vec<SourceStatus> {
    slots.iter().map(|s| s.src.status()).collect()
}

/// Hand a link event to the sources (before the mirrors see it).
pub fn on_event(link: &mut Link, ev: &LinkEvent, now: Instant, slots: &mut [SourceSlot]) {
    match ev {
        LinkEvent::Up { .. } => on_up(link, slots, now),
        LinkEvent::Down { .. } => on_down(slots),
        LinkEvent::Msg(m) => on_msg(slots, now, m),
        _ => {}
    }
}
