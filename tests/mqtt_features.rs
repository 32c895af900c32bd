//! MQTT features beyond publish/subscribe, through real clients (rumqttc):
//! wills (also across a crash), the `$` topic rule, retained messages.

mod common;

use std::time::Duration;

use common::*;
use rumqttc::{AsyncClient, Event, EventLoop, LastWill, MqttOptions, Packet, QoS};
use tokio::sync::mpsc;

/// A subscriber whose received payloads arrive on a channel.
async fn subscriber(
    port: u16,
    id: &str,
    filters: &[&str],
) -> (
    AsyncClient,
    mpsc::Receiver<(String, String)>,
    tokio::task::JoinHandle<()>,
) {
    let mut opts = MqttOptions::new(id, "127.0.0.1", port);
    opts.set_keep_alive(Duration::from_secs(10));
    let (client, mut el) = AsyncClient::new(opts, 16);
    let (tx, rx) = mpsc::channel(64);
    let (sub_tx, mut sub_rx) = mpsc::channel(8);
    let task = tokio::spawn(async move {
        loop {
            match el.poll().await {
                Ok(Event::Incoming(Packet::SubAck(_))) => {
                    let _ = sub_tx.send(()).await;
                }
                Ok(Event::Incoming(Packet::Publish(p))) => {
                    let _ = tx
                        .send((
                            p.topic.clone(),
                            String::from_utf8_lossy(&p.payload).into_owned(),
                        ))
                        .await;
                }
                Ok(_) => {}
                Err(_) => return,
            }
        }
    });
    for f in filters {
        client
            .subscribe(*f, QoS::AtLeastOnce)
            .await
            .expect("queue SUBSCRIBE");
        tokio::time::timeout(Duration::from_secs(10), sub_rx.recv())
            .await
            .expect("SUBACK within 10 s");
    }
    (client, rx, task)
}

/// Connect a device with a will; returns its client and event loop (not
/// polled in the background: the caller decides how the connection ends).
async fn device_with_will(
    port: u16,
    id: &str,
    topic: &str,
    payload: &str,
) -> (AsyncClient, EventLoop) {
    device_with_will_opts(port, id, topic, payload, false).await
}

async fn device_with_will_opts(
    port: u16,
    id: &str,
    topic: &str,
    payload: &str,
    retain: bool,
) -> (AsyncClient, EventLoop) {
    let mut opts = MqttOptions::new(id, "127.0.0.1", port);
    opts.set_keep_alive(Duration::from_secs(10));
    opts.set_last_will(LastWill::new(
        topic,
        payload.to_string(),
        QoS::AtLeastOnce,
        retain,
    ));
    let (client, mut el) = AsyncClient::new(opts, 16);
    loop {
        match tokio::time::timeout(Duration::from_secs(10), el.poll()).await {
            Ok(Ok(Event::Incoming(Packet::ConnAck(_)))) => break,
            Ok(Ok(_)) => {}
            other => panic!("{id}: no CONNACK: {other:?}"),
        }
    }
    (client, el)
}

/// Receive until `marker`; returns the payloads before it.
async fn until_marker(
    rx: &mut mpsc::Receiver<(String, String)>,
    marker: &str,
) -> Vec<(String, String)> {
    let mut before = Vec::new();
    loop {
        match tokio::time::timeout(Duration::from_secs(10), rx.recv()).await {
            Ok(Some((_, p))) if p == marker => return before,
            Ok(Some(m)) => before.push(m),
            other => panic!("marker {marker:?} not received: {other:?}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn will_is_published_on_abnormal_close_only() {
    let frond = Frond::start_new(FrondSpec::default()).await;
    let (watcher, mut rx, _t) = subscriber(frond.mqtt_port, "watcher", &["status/#"]).await;

    // A clean DISCONNECT discards the will.
    let (polite, mut el) =
        device_with_will(frond.mqtt_port, "polite", "status/polite", "polite-gone").await;
    polite.disconnect().await.expect("queue DISCONNECT");
    while let Ok(Ok(ev)) = tokio::time::timeout(Duration::from_secs(10), el.poll()).await {
        if matches!(ev, rumqttc::Event::Outgoing(rumqttc::Outgoing::Disconnect)) {
            break;
        }
    }
    drop(el);

    // A connection that just drops publishes it.
    let (_rude, el) = device_with_will(frond.mqtt_port, "rude", "status/rude", "rude-gone").await;
    drop(el); // closes the socket without DISCONNECT
    match tokio::time::timeout(Duration::from_secs(10), rx.recv()).await {
        Ok(Some((topic, payload))) => {
            assert_eq!(
                (topic.as_str(), payload.as_str()),
                ("status/rude", "rude-gone")
            );
        }
        other => panic!("will of the dropped connection not received: {other:?}"),
    }
    // And the polite one's will never came: everything up to a marker
    // published after both ends is checked.
    watcher
        .publish("status/marker", QoS::AtLeastOnce, false, "marker")
        .await
        .expect("queue marker");
    let before = until_marker(&mut rx, "marker").await;
    assert!(before.is_empty(), "unexpected messages: {before:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dollar_topics_are_not_matched_by_leading_wildcards() {
    let frond = Frond::start_new(FrondSpec::default()).await;
    let (_a, mut all, _t1) = subscriber(frond.mqtt_port, "all", &["#", "+/info"]).await;
    let (pubc, mut sys, _t2) = subscriber(frond.mqtt_port, "sys", &["$SYS/#"]).await;
    pubc.publish("$SYS/info", QoS::AtLeastOnce, false, "dollar")
        .await
        .unwrap();
    pubc.publish("plain/info", QoS::AtLeastOnce, false, "marker")
        .await
        .unwrap();
    let before = until_marker(&mut all, "marker").await;
    assert!(
        before.is_empty(),
        "`#` and `+/info` must not match $SYS/info: {before:?}"
    );
    match tokio::time::timeout(Duration::from_secs(10), sys.recv()).await {
        Ok(Some((t, p))) => assert_eq!((t.as_str(), p.as_str()), ("$SYS/info", "dollar")),
        other => panic!("$SYS/# subscriber got nothing: {other:?}"),
    }
}

/// Connect, subscribe to `filter`, and collect (topic, payload, retain)
/// until `marker` arrives on `marker_topic` (published by this client after
/// its SUBACK, so everything retained arrived before it).
async fn retained_seen(
    port: u16,
    id: &str,
    filter: &str,
    marker_topic: &str,
) -> Vec<(String, String, bool)> {
    let mut opts = MqttOptions::new(id, "127.0.0.1", port);
    opts.set_keep_alive(Duration::from_secs(10));
    let (client, mut el) = AsyncClient::new(opts, 16);
    client.subscribe(filter, QoS::AtLeastOnce).await.unwrap();
    client
        .subscribe(marker_topic, QoS::AtLeastOnce)
        .await
        .unwrap();
    let mut got = Vec::new();
    let mut subacks = 0;
    loop {
        match tokio::time::timeout(Duration::from_secs(10), el.poll()).await {
            Ok(Ok(Event::Incoming(Packet::SubAck(_)))) => {
                subacks += 1;
                if subacks == 2 {
                    client
                        .publish(marker_topic, QoS::AtLeastOnce, false, "marker")
                        .await
                        .unwrap();
                }
            }
            Ok(Ok(Event::Incoming(Packet::Publish(p)))) => {
                let payload = String::from_utf8_lossy(&p.payload).into_owned();
                if payload == "marker" {
                    return got;
                }
                got.push((p.topic.clone(), payload, p.retain));
            }
            Ok(Ok(_)) => {}
            other => panic!("{id}: {other:?}"),
        }
    }
}

async fn publish_retained(port: u16, topic: &str, payload: &str) {
    let mut opts = MqttOptions::new(format!("retainer-{topic}"), "127.0.0.1", port);
    opts.set_keep_alive(Duration::from_secs(10));
    let (client, mut el) = AsyncClient::new(opts, 16);
    client
        .publish(topic, QoS::AtLeastOnce, true, payload.to_string())
        .await
        .unwrap();
    loop {
        match tokio::time::timeout(Duration::from_secs(10), el.poll()).await {
            Ok(Ok(Event::Incoming(Packet::PubAck(_)))) => return,
            Ok(Ok(_)) => {}
            other => panic!("retained publish on {topic} not acknowledged: {other:?}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retained_messages_survive_restart_and_clear() {
    let mut frond = Frond::start_new(FrondSpec::default()).await;
    publish_retained(frond.mqtt_port, "cfg/dev1/mode", "eco").await;
    publish_retained(frond.mqtt_port, "cfg/dev2/mode", "boost").await;
    publish_retained(frond.mqtt_port, "cfg/dev1/mode", "sport").await; // replaces "eco"

    let mut got = retained_seen(frond.mqtt_port, "s1", "cfg/+/mode", "m/1").await;
    got.sort();
    assert_eq!(
        got,
        vec![
            ("cfg/dev1/mode".to_string(), "sport".to_string(), true),
            ("cfg/dev2/mode".to_string(), "boost".to_string(), true),
        ]
    );

    // A SIGKILL right after the PUBACK must not lose it (fsynced first).
    publish_retained(frond.mqtt_port, "cfg/dev3/mode", "off").await;
    frond.kill9();
    frond.start().await;
    let got = retained_seen(frond.mqtt_port, "s2", "cfg/dev3/#", "m/2").await;
    assert_eq!(
        got,
        vec![("cfg/dev3/mode".to_string(), "off".to_string(), true)]
    );

    // An empty retained publish clears it, across a clean restart too.
    publish_retained(frond.mqtt_port, "cfg/dev2/mode", "").await;
    frond.terminate();
    frond.start().await;
    let mut got = retained_seen(frond.mqtt_port, "s3", "cfg/#", "m/3").await;
    got.sort();
    assert_eq!(
        got,
        vec![
            ("cfg/dev1/mode".to_string(), "sport".to_string(), true),
            ("cfg/dev3/mode".to_string(), "off".to_string(), true),
        ]
    );
}

/// Will files frond keeps for unsettled wills.
fn will_files(frond: &Frond) -> usize {
    std::fs::read_dir(frond.data_dir().join("mqtt").join("wills"))
        .map(|d| d.count())
        .unwrap_or(0)
}

/// A device connected when frond is killed has its (retained) will
/// published after the restart; a will discarded by a clean DISCONNECT
/// before the kill is not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wills_owed_at_a_crash_are_published_after_the_restart() {
    let mut frond = Frond::start_new(FrondSpec::default()).await;
    let port = frond.mqtt_port;
    let (polite, mut el) = device_with_will_opts(port, "polite", "status/polite", "p", true).await;
    polite.disconnect().await.expect("queue DISCONNECT");
    while let Ok(Ok(ev)) = tokio::time::timeout(Duration::from_secs(10), el.poll()).await {
        if matches!(ev, rumqttc::Event::Outgoing(rumqttc::Outgoing::Disconnect)) {
            break;
        }
    }
    drop(el);
    let (_dev, _el) = device_with_will_opts(port, "dev", "status/dev", "dev-offline", true).await;
    // Only the connected device's will is still owed (the CONNACK came
    // after it was stored).
    wait_until("the polite device's will is settled", LONG, || {
        let n = will_files(&frond);
        async move { n == 1 }
    })
    .await;

    frond.kill9();
    frond.start().await;
    let mut round = 0;
    let got = wait_for("the owed will is retained after the restart", LONG, || {
        round += 1;
        let id = format!("w{round}");
        async move {
            let got = retained_seen(port, &id, "status/#", &format!("m/{id}")).await;
            (!got.is_empty()).then_some(got)
        }
    })
    .await;
    assert_eq!(
        got,
        vec![("status/dev".to_string(), "dev-offline".to_string(), true)]
    );
    wait_until("the published will is settled", LONG, || {
        let n = will_files(&frond);
        async move { n == 0 }
    })
    .await;
}
