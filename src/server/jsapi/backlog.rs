//! The stream side of a consumer's backlog ([`crate::stream::backlog`]):
//! resolving the deliver policies that need the stream at creation
//! (`last_per_subject` through the store's `last_per_subject`,
//! `by_start_time` through a time search), and the exact counts behind
//! `num_pending` (the store's `count_matching`), taken after each read of
//! a batch and for `CONSUMER.INFO`/`LIST`/`CREATE`.
//!
//! Cost: one owner round trip per filter per batch read, and none when the
//! batch reached the end the stream had when the read was sent (the
//! common case of a live watcher); a count walks the store's in-memory
//! index from the batch on.

use super::call::stream_err;
use super::direct::{parse_rfc3339, seq_from_time};
use crate::stream::backlog::{Backlog, MAX_LAST_PER_SUBJECT};
use crate::stream::consumer::{ApiError, Consumer, ConsumerConfig, DeliverPolicy};
use crate::stream::{StoredMessage, StreamHandle};

/// Messages `c` will deliver after stream sequence `after`, counted now.
pub(super) async fn count_after(h: &StreamHandle, c: &Consumer, after: u64) -> u64 {
    count_upto(h, c, after, h.state().last_seq).await
}

/// [`count_after`] when the stream's last sequence was `end` (none after
/// it is counted when `after >= end`: no round trip).
async fn count_upto(h: &StreamHandle, c: &Consumer, after: u64, end: u64) -> u64 {
    let b = &c.backlog;
    let lss = b.lss_after(after);
    let from = after.max(b.resume).saturating_add(1);
    if from > end {
        return lss;
    }
    let (plus, minus) = c.count_filters();
    let mut n: u64 = 0;
    for f in &plus {
        n = n.saturating_add(h.count_matching(f, from, u64::MAX).await.unwrap_or(0));
    }
    for x in &minus {
        n = n.saturating_sub(h.count_matching(x, from, u64::MAX).await.unwrap_or(0));
    }
    lss.saturating_add(n)
}

/// After reading `msgs` (new messages from [`Consumer::read_from`]) with
/// a read sent when the stream's last sequence was `end`: sets
/// `num_pending` to those of them `c` wants plus what follows them. A
/// batch that reaches `end` counts nothing after it (exact as of the
/// read, as nats-server's count is as of its delivery), so a live
/// consumer reading at the tail makes no count round trip.
pub(super) async fn after_read(
    h: &StreamHandle,
    c: &mut Consumer,
    msgs: &[StoredMessage],
    end: u64,
) {
    let Some(last) = msgs.last().map(|m| m.seq) else {
        return;
    };
    let wanted = msgs.iter().filter(|m| c.wants(m.seq, &m.subject)).count() as u64;
    let rest = count_upto(h, c, last, end).await;
    c.set_pending(wanted, rest);
}

/// `c.backlog.num_pending` counted afresh from its position.
pub(super) async fn refresh(h: &StreamHandle, c: &mut Consumer) {
    let n = count_after(h, c, c.delivered_sseq).await;
    c.backlog.num_pending = n;
}

/// The start of a consumer whose deliver policy needs the stream:
/// `Some((first sequence, backlog))` for `last_per_subject` and
/// `by_start_time`, `None` for the others.
pub(super) async fn resolve_start(
    h: &StreamHandle,
    cfg: &ConsumerConfig,
) -> Result<Option<(u64, Backlog)>, ApiError> {
    match &cfg.deliver_policy {
        DeliverPolicy::LastPerSubject => {
            let filters = match cfg.filter_subjects.as_slice() {
                [] => vec![">".to_string()],
                f => f.to_vec(),
            };
            let resume = h.state().last_seq;
            let seqs = h
                .last_per_subject(&filters, resume, MAX_LAST_PER_SUBJECT)
                .await
                .map_err(stream_err)?
                .ok_or_else(|| {
                    ApiError::new(
                        400,
                        10094,
                        format!("deliver policy last_per_subject: more than {MAX_LAST_PER_SUBJECT} subjects match; use a narrower filter"),
                    )
                })?;
            let b = Backlog::last_per_subject(seqs, resume);
            Ok(Some((b.start(), b)))
        }
        DeliverPolicy::ByStartTime(t) => {
            let ns = parse_rfc3339(t).ok_or_else(|| {
                ApiError::new(
                    400,
                    10025,
                    format!("opt_start_time {t:?} is not an RFC 3339 time"),
                )
            })?;
            let seq = seq_from_time(h, ns).await.map_err(stream_err)?;
            Ok(Some((seq, Backlog::default())))
        }
        _ => Ok(None),
    }
}
