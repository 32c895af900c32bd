//! An MQTT device publishing telemetry to frond with rumqttc (QoS 1, so
//! each reading is on disk in a stream before the broker acknowledges it).
//!
//! ```sh
//! frond run &                                  # embedded defaults: MQTT on 127.0.0.1:1883
//! cargo run --example mqtt_device -- 127.0.0.1:1883 truck-042 10
//! ```
//!
//! Arguments: broker address, device id, number of readings (default
//! 127.0.0.1:1883, sensor-1, 10). The topic is `telemetry/<id>/temp`
//! (subject `telemetry.<id>.temp` on the NATS side and on the hub).

use std::time::Duration;

use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let acked = run(std::env::args().skip(1).collect()).await?;
    println!("{acked} readings acknowledged (stored) by the broker");
    Ok(())
}

/// Publishes the readings; returns how many the broker acknowledged.
pub async fn run(args: Vec<String>) -> Result<usize, Box<dyn std::error::Error>> {
    let mut args = args.into_iter();
    let addr = args.next().unwrap_or_else(|| "127.0.0.1:1883".into());
    let id = args.next().unwrap_or_else(|| "sensor-1".into());
    let count: usize = args.next().map_or(Ok(10), |n| n.parse())?;
    let (host, port) = addr.rsplit_once(':').ok_or("address must be host:port")?;

    let mut opts = MqttOptions::new(id.clone(), host, port.parse()?);
    opts.set_keep_alive(Duration::from_secs(30));
    // A persistent session: QoS 1 publishes not yet acknowledged are
    // resent after a reconnect.
    opts.set_clean_session(false);
    let (client, mut events) = AsyncClient::new(opts, 64);

    let topic = format!("telemetry/{id}/temp");
    let publisher = tokio::spawn(async move {
        for i in 0..count {
            let reading = format!(
                "{{\"seq\":{i},\"celsius\":{:.1}}}",
                20.0 + (i % 10) as f64 / 2.0
            );
            client
                .publish(&topic, QoS::AtLeastOnce, false, reading)
                .await?;
        }
        Ok::<_, rumqttc::ClientError>(client)
    });

    // Drive the connection until every reading is acknowledged.
    let mut acked = 0;
    while acked < count {
        match events.poll().await {
            Ok(Event::Incoming(Packet::PubAck(_))) => acked += 1,
            Ok(_) => {}
            Err(e) => {
                eprintln!("connection: {e}; retrying");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
    }
    let client = publisher.await??;
    client.disconnect().await?;
    Ok(acked)
}
