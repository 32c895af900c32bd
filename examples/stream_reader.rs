//! A local program reading a frond stream with a durable JetStream pull
//! consumer (async-nats): it resumes where it left off after a restart of
//! itself or of frond, because the consumer's acknowledged position is on
//! disk in frond's data directory.
//!
//! ```sh
//! frond run &                                     # stream DEFAULT captures every MQTT publish
//! cargo run --example mqtt_device -- 127.0.0.1:1883 sensor-1 10
//! cargo run --example stream_reader -- 127.0.0.1:4222 DEFAULT 10
//! ```
//!
//! Arguments: NATS address, stream name, how many messages to read
//! (default 127.0.0.1:4222, DEFAULT, 10).

use std::time::Duration;

use async_nats::jetstream::{self, consumer::pull};
use smol::stream::StreamExt;

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    for line in run(std::env::args().skip(1).collect()).await? {
        println!("{line}");
    }
    Ok(())
}

/// Reads and acknowledges up to the wanted number of messages; returns a
/// line per message (`#<seq> <subject>: <payload>`).
pub async fn run(
    args: Vec<String>,
) -> Result<Vec<String>, Box<dyn std::error::Error + Send + Sync>> {
    let mut args = args.into_iter();
    let addr = args.next().unwrap_or_else(|| "127.0.0.1:4222".into());
    let stream = args.next().unwrap_or_else(|| "DEFAULT".into());
    let want: usize = args.next().map_or(Ok(10), |n| n.parse())?;

    let js = jetstream::new(async_nats::connect(addr).await?);
    let stream = js.get_stream(&stream).await?;
    let consumer = stream
        .get_or_create_consumer(
            "reader",
            pull::Config {
                durable_name: Some("reader".into()),
                ack_policy: jetstream::consumer::AckPolicy::Explicit,
                ..Default::default()
            },
        )
        .await?;
    let mut lines = Vec::new();
    let mut read = 0;
    while read < want {
        let mut batch = consumer
            .fetch()
            .max_messages(want - read)
            .expires(Duration::from_secs(5))
            .messages()
            .await?;
        let mut got = 0;
        while let Some(msg) = batch.next().await {
            let msg = msg?;
            let seq = msg.info().map(|i| i.stream_sequence).unwrap_or(0);
            let text = String::from_utf8_lossy(&msg.payload);
            lines.push(format!("#{seq} {}: {text}", msg.subject));
            // Acknowledged: not delivered to this consumer again.
            msg.ack().await?;
            got += 1;
        }
        if got == 0 {
            break; // no new messages for 5 s
        }
        read += got;
    }
    Ok(lines)
}
