//! Wills: armed at CONNECT, published through [`Ingest`] when their
//! connection ends uncleanly (now, or after their MQTT 5 delay unless the
//! client id connects again first), and settled in their durable store
//! once published.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use smol::channel::{bounded, Sender};
use smol::future::FutureExt;
use smol::Timer;

use crate::broker::retained::Retained;
use crate::broker::wills::{unix_ms, StoredWill, WillStore};
use crate::ingest::Ingest;
use crate::mqtt::WillMessage;
use crate::router::Broker;

/// Wills waiting out their MQTT 5 delay, by client id, and the durable
/// copies of all unsettled wills ([`WillStore`]; `None` in tests of the
/// shell). A new connection with the same client id cancels its will
/// (MQTT 5 §3.1.3.2.2). One per server, shared by all MQTT listeners.
#[derive(Default)]
pub struct DelayedWills {
    pending: Mutex<HashMap<String, Sender<()>>>,
    store: Option<Arc<WillStore>>,
    /// Where a will with the retain flag becomes the retained message.
    retained: Option<Arc<Retained>>,
}

impl DelayedWills {
    pub fn with_store(store: WillStore, retained: Arc<Retained>) -> DelayedWills {
        DelayedWills {
            pending: Default::default(),
            store: Some(Arc::new(store)),
            retained: Some(retained),
        }
    }

    /// Make the will of a connection that just connected durable (or
    /// forget the stored one when it has none); blocks on the disk, so the
    /// CONNACK leaves after it. Returns the arming token.
    pub async fn arm(&self, client_id: &str, will: Option<&WillMessage>) -> Option<u64> {
        let store = self.store.clone()?;
        let id = client_id.to_string();
        let stored = will.map(|w| StoredWill::new(client_id, w));
        let token = stored.as_ref().map(|w| w.token);
        let r = smol::unblock(move || match &stored {
            Some(w) => store.save(w),
            None => store.remove(&id),
        })
        .await;
        if let Err(e) = r {
            log::warn!("mqtt: cannot store the will of {client_id}: {e}; it is lost if frond stops before it is due");
        }
        token
    }

    /// Forget the durable copy of a will its client discarded (clean
    /// DISCONNECT).
    pub(super) async fn forget(&self, client_id: &str, token: u64) {
        if let Some(store) = self.store.clone() {
            let id = client_id.to_string();
            let _ = smol::unblock(move || store.settle(&id, token)).await;
        }
    }

    pub(super) fn cancel(&self, client_id: &str) {
        let mut p = self.pending.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(tx) = p.remove(client_id) {
            tx.close();
        }
    }

    fn insert(&self, client_id: &str, tx: Sender<()>) {
        let mut p = self.pending.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(old) = p.insert(client_id.to_string(), tx) {
            old.close();
        }
    }
}

/// Publish a will now, or after its delay unless cancelled. `armed`: the
/// client id and token of its durable copy, settled once it is stored (a
/// delayed one is first rewritten with its due time).
pub fn publish_will(
    broker: &Arc<Broker>,
    wills: &Arc<DelayedWills>,
    armed: Option<(String, u64)>,
    will: WillMessage,
) {
    let broker = broker.clone();
    let (cancel_tx, cancel_rx) = bounded::<()>(1);
    if !will.delay.is_zero() {
        if let Some((id, _)) = &armed {
            wills.insert(id, cancel_tx);
        }
    }
    let store = wills.store.clone();
    let retained = wills.retained.clone();
    smol::spawn(async move {
        if let (Some(store), Some((id, token)), false) = (&store, &armed, will.delay.is_zero()) {
            let mut w = StoredWill::new(id, &will);
            w.token = *token;
            w.due_ms = unix_ms().saturating_add(w.delay_ms);
            let store = store.clone();
            if let Err(e) = smol::unblock(move || store.save(&w)).await {
                log::warn!("mqtt: cannot store the due time of a will: {e}");
            }
        }
        if !will.delay.is_zero() {
            let fire = async {
                Timer::after(will.delay).await;
                true
            }
            .or(async {
                let _ = cancel_rx.recv().await;
                false
            })
            .await;
            if !fire {
                return;
            }
        }
        let ingest = Ingest::new(&broker);
        let subject = will.subject.clone();
        let (copy, capture) = ingest.route_will(ingest.will(will), Instant::now());
        if let (Some(copy), Some(retained)) = (copy, retained) {
            let now_ms = super::unix_now_ms();
            let set = move || {
                let h = copy.headers.as_deref();
                retained.set_with(&copy.subject, &copy.payload, copy.qos, h, now_ms)
            };
            // Over mqtt.max_retained(_bytes): published, not retained
            // (logged by the store, counted by `retained`).
            if let Err(crate::ingest::Refused::RetainedFailed(e)) =
                ingest.retained(smol::unblock(set).await)
            {
                log::warn!("mqtt: retained will on {subject} not stored: {e}");
            }
        }
        if let Some(c) = capture {
            if let Err(e) = c.stream.publish(c.message).await {
                log::warn!("mqtt: will on {subject} not stored: {e}");
            }
        }
        if let (Some(store), Some((id, token))) = (store, armed) {
            let r = smol::unblock(move || store.settle(&id, token)).await;
            if let Err(e) = r {
                log::warn!("mqtt: cannot delete a published will's file: {e}; it is published again at the next start");
            }
        }
    })
    .detach();
}
