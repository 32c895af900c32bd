//! A local NATS service on the gateway answering requests, with
//! async-nats. MQTT 5 devices reach it too: a PUBLISH to `svc/time` with a
//! Response Topic and Correlation Data arrives here with a reply subject,
//! and the answer goes back to the device's response topic with its
//! correlation data.
//!
//! ```sh
//! frond run &                                   # NATS on 127.0.0.1:4222
//! cargo run --example nats_service -- 127.0.0.1:4222 3
//! nats request svc.time ''                     # or: mosquitto_rr -V mqttv5 -t svc/time -e resp/me -m ''
//! ```
//!
//! Arguments: NATS address and how many requests to answer before
//! exiting (default 127.0.0.1:4222, forever).

use smol::stream::StreamExt;

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    run(std::env::args().skip(1).collect()).await?;
    Ok(())
}

/// Answers requests on `svc.time`; returns how many it answered.
pub async fn run(args: Vec<String>) -> Result<usize, Box<dyn std::error::Error>> {
    let mut args = args.into_iter();
    let addr = args.next().unwrap_or_else(|| "127.0.0.1:4222".into());
    let limit: Option<usize> = args.next().map(|n| n.parse()).transpose()?;

    let client = async_nats::connect(addr).await?;
    // A queue group: run several copies and each request reaches one.
    let mut requests = client.queue_subscribe("svc.time", "svc".into()).await?;
    println!("answering requests on svc.time");
    let mut answered = 0;
    while let Some(req) = requests.next().await {
        let Some(reply) = req.reply else {
            continue; // a plain publish, not a request
        };
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)?
            .as_secs();
        client.publish(reply, now.to_string().into()).await?;
        answered += 1;
        if limit.is_some_and(|l| answered >= l) {
            break;
        }
    }
    client.flush().await?;
    Ok(answered)
}
