//! The service's task: subscribes to `$JS.API.>` and `$JS.ACK.>` on the
//! router, and runs the loop of one iteration (requests and acks, timers,
//! delivery, retention, files, then replies), sleeping until input, a new
//! stream message, a timer, a subscription (while a push consumer waits
//! for a subscriber) or shutdown. It alone reads the clock and
//! passes `now` to [`JsApi`].

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use smol::channel::Receiver;
use smol::future::FutureExt;

use super::{Admin, JsApi, INBOX_BYTES, MIRROR_POLL, REQUEST_BYTES};
use crate::router::{Broker, Outbox};
use crate::stream::{Retention, StreamHandle};
use crate::uplink::UplinkStatus;
use crate::util::unix_nanos;

fn subscribe(broker: &Broker) -> (u64, Arc<Outbox>) {
    let conn = broker.new_conn_id();
    let outbox = Outbox::new(INBOX_BYTES);
    broker.subscribe_nats(conn, 1, "$JS.API.>".into(), None, outbox.clone());
    broker.subscribe_nats(conn, 2, "$JS.ACK.>".into(), None, outbox.clone());
    broker.subscribe_nats(conn, 3, "$JS.FC.>".into(), None, outbox.clone());
    (conn, outbox)
}

/// Handle requests and acks from `outbox`, one at a time, until
/// [`REQUEST_BYTES`] of them are taken or the answers waiting reach the
/// answer budget ([`JsApi::takes_requests`]); the rest wait in the outbox
/// for the next iteration, after these answers are routed.
pub(super) async fn take_requests(api: &mut JsApi, outbox: &Outbox, now: u64) {
    let mut taken = 0;
    while taken < REQUEST_BYTES && api.takes_requests() {
        let Some((_, m)) = outbox.take(1).pop() else {
            return;
        };
        taken += m.size();
        api.handle(&m, now).await;
    }
}

enum Wake {
    Input,
    Stream,
    Timer,
    Subscribed,
    Shutdown,
}

/// Run the service until `shutdown` fires. `streams_dir` holds the stream
/// directories; `mirrored` names the streams mirrored to the hub, whose
/// progress `uplink` reports.
///
/// The consumers are loaded and the API subscriptions registered when this
/// is called (before the returned future first runs), so requests sent
/// right after start-up wait in the service's inbox instead of meeting
/// "no responders".
pub fn serve(
    broker: Arc<Broker>,
    streams_dir: PathBuf,
    mirrored: Vec<String>,
    admin: Admin,
    uplink: Option<Arc<UplinkStatus>>,
    shutdown: Receiver<()>,
) -> impl std::future::Future<Output = ()> {
    let api =
        JsApi::open(&broker.streams(), &streams_dir, &mirrored, unix_nanos()).with_admin(admin);
    let (conn, outbox) = subscribe(&broker);
    run(api, conn, outbox, broker, uplink, shutdown)
}

/// Wake the loop through `tx` whenever stream `h` grows, until it closes.
fn watch(h: &StreamHandle, tx: &smol::channel::Sender<()>) -> smol::Task<()> {
    let (h, tx) = (h.clone(), tx.clone());
    smol::spawn(async move {
        let mut seen = h.state().last_seq;
        loop {
            h.wait_for(seen + 1).await;
            let last = h.state().last_seq;
            if last <= seen {
                return; // closed
            }
            seen = last;
            let _ = tx.try_send(());
        }
    })
}

async fn run(
    mut api: JsApi,
    mut conn: u64,
    mut outbox: Arc<Outbox>,
    broker: Arc<Broker>,
    uplink: Option<Arc<UplinkStatus>>,
    shutdown: Receiver<()>,
) {
    // One watcher per stream wakes the loop when messages arrive (it ends
    // when its stream closes).
    let (wake_tx, wake_rx) = smol::channel::bounded::<()>(1);
    let mut watchers: Vec<smol::Task<()>> = broker
        .streams()
        .iter()
        .map(|h| watch(h, &wake_tx))
        .collect();
    let cursors = |name: &str| -> Option<u64> {
        uplink
            .as_ref()?
            .mirrors()
            .into_iter()
            .find(|m| m.stream == name)
            .map(|m| m.cursor)
    };
    loop {
        if shutdown.is_closed() {
            break;
        }
        let now = unix_nanos();
        if outbox.is_slow() {
            log::warn!("jetstream: API requests arrived faster than they were served; some were dropped (clients retry)");
            broker.drop_conn(conn);
            outbox.close();
            (conn, outbox) = subscribe(&broker);
        }
        take_requests(&mut api, &outbox, now).await;
        api.finish_direct().await;
        for h in api.take_created() {
            watchers.retain(|t| !t.is_finished());
            watchers.push(watch(&h, &wake_tx));
        }
        api.tick(now, &cursors);
        let generation = broker.generation();
        let no_subscriber = api.deliver_all(now, &|s| broker.has_interest(s)).await;
        api.apply_retention().await;
        api.persist();
        for (to, m) in api.take_out() {
            broker.route_to(&to, Arc::new(m), std::time::Instant::now());
        }
        if outbox.pending() > 0 {
            continue;
        }
        // A push consumer without a subscriber wakes when one subscribes
        // (listening before the generation check misses none).
        let subscribed = no_subscriber.then(|| broker.on_subscribe());
        if subscribed.is_some() && broker.generation() != generation {
            continue;
        }
        let (deadline, more_work) = api.next_deadline();
        if more_work {
            smol::future::yield_now().await;
            continue;
        }
        let mut sleep = deadline.map(|d| Duration::from_nanos(d.saturating_sub(unix_nanos())));
        if api.any_mirrored() {
            sleep = Some(sleep.map_or(MIRROR_POLL, |s| s.min(MIRROR_POLL)));
        }
        let hungry = api.hungry()
            || api
                .slots
                .iter()
                .any(|s| s.handle.config().retention == Retention::Interest);
        let wake = async {
            outbox.wait(true).await;
            Wake::Input
        }
        .or(async {
            if hungry {
                let _ = wake_rx.recv().await;
                Wake::Stream
            } else {
                std::future::pending().await
            }
        })
        .or(async {
            match sleep {
                Some(d) => {
                    smol::Timer::after(d).await;
                    Wake::Timer
                }
                None => std::future::pending().await,
            }
        })
        .or(async {
            match subscribed {
                Some(l) => {
                    l.await;
                    Wake::Subscribed
                }
                None => std::future::pending().await,
            }
        })
        .or(async {
            let _ = shutdown.recv().await;
            Wake::Shutdown
        })
        .await;
        match wake {
            Wake::Shutdown => break,
            Wake::Input | Wake::Stream | Wake::Timer | Wake::Subscribed => {}
        }
    }
    api.persist();
    broker.drop_conn(conn);
    outbox.close();
}
