//! `frond bench mqtt`: an MQTT publish benchmark against any broker
//! (frond, Mosquitto, nats-server with MQTT on), built on frond's own codec.
//!
//! Each publisher is one OS thread with one connection, keeping up to
//! `inflight` QoS 1 publishes unacknowledged (QoS 0: just writes). The
//! report gives messages per second from the first publish to the last
//! acknowledgement, across all publishers.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use crate::wire::mqtt::{self, Connect, Packet, Properties, Publish, QoS, Version};

/// Benchmark parameters (see `frond --help`).
#[derive(Debug, Clone)]
pub struct MqttBench {
    pub addr: String,
    pub pubs: usize,
    pub msgs: usize,
    pub size: usize,
    pub qos: u8,
    pub inflight: usize,
    pub topic: String,
}

impl Default for MqttBench {
    fn default() -> Self {
        MqttBench {
            addr: "127.0.0.1:1883".into(),
            pubs: 4,
            msgs: 25_000,
            size: 100,
            qos: 1,
            inflight: 100,
            topic: "bench".into(),
        }
    }
}

impl MqttBench {
    /// Run and return a one-line report.
    pub fn run(&self) -> Result<String, String> {
        if self.qos > 1 {
            return Err("bench: --qos must be 0 or 1".into());
        }
        if self.inflight == 0 || self.inflight > 65_000 || self.pubs == 0 {
            return Err(
                "bench: --pubs and --inflight must be at least 1 (inflight at most 65000)".into(),
            );
        }
        let start = Instant::now();
        let threads: Vec<_> = (0..self.pubs)
            .map(|i| {
                let b = self.clone();
                std::thread::spawn(move || b.publisher(i))
            })
            .collect();
        let mut total = 0usize;
        for t in threads {
            total += t
                .join()
                .map_err(|_| "bench: a publisher thread panicked".to_string())??;
        }
        let secs = start.elapsed().as_secs_f64();
        Ok(format!(
            "mqtt qos{} {} publishers x {} msgs of {} bytes to {}: {:.0} msgs/s ({:.1} MB/s), {:.2}s",
            self.qos,
            self.pubs,
            self.msgs,
            self.size,
            self.addr,
            total as f64 / secs,
            (total * self.size) as f64 / secs / 1e6,
            secs
        ))
    }

    fn publisher(&self, i: usize) -> Result<usize, String> {
        let mut s = TcpStream::connect(&self.addr)
            .map_err(|e| format!("bench: cannot connect to {}: {e}", self.addr))?;
        let _ = s.set_nodelay(true);
        let _ = s.set_read_timeout(Some(Duration::from_secs(30)));
        let mut out = Vec::with_capacity(64 * 1024);
        let connect = Packet::Connect(Connect {
            version: Version::V311,
            clean_start: true,
            keep_alive: 60,
            client_id: format!("frond-bench-{}-{i}", std::process::id()),
            will: None,
            username: None,
            password: None,
            properties: Properties::default(),
        });
        mqtt::encode(&connect, Version::V311, &mut out).map_err(|e| e.to_string())?;
        s.write_all(&out)
            .map_err(|e| format!("bench: write: {e}"))?;
        let mut inbuf: Vec<u8> = Vec::with_capacity(64 * 1024);
        let mut chunk = vec![0u8; 64 * 1024];
        // CONNACK
        loop {
            match mqtt::decode(&inbuf, Some(Version::V311), 1 << 20) {
                Ok(Some((Packet::ConnAck(c), used))) => {
                    if c.code != 0 {
                        return Err(format!(
                            "bench: broker refused CONNECT with code {}",
                            c.code
                        ));
                    }
                    inbuf.drain(..used);
                    break;
                }
                Ok(Some((p, _))) => return Err(format!("bench: expected CONNACK, got {p:?}")),
                Ok(None) => {}
                Err(e) => return Err(format!("bench: bad CONNACK: {e}")),
            }
            let n = s
                .read(&mut chunk)
                .map_err(|e| format!("bench: read: {e}"))?;
            if n == 0 {
                return Err("bench: broker closed the connection".into());
            }
            inbuf.extend_from_slice(&chunk[..n]);
        }
        let payload = vec![b'x'; self.size];
        let topic = format!("{}/{i}", self.topic);
        let (mut sent, mut acked, mut inflight) = (0usize, 0usize, 0usize);
        let mut next_id: u16 = 1;
        while acked < self.msgs {
            out.clear();
            while sent < self.msgs
                && (self.qos == 0 || inflight < self.inflight)
                && out.len() < 60_000
            {
                let packet_id = if self.qos == 1 {
                    let id = next_id;
                    next_id = if next_id == u16::MAX { 1 } else { next_id + 1 };
                    Some(id)
                } else {
                    None
                };
                let p = Packet::Publish(Publish {
                    dup: false,
                    qos: if self.qos == 1 {
                        QoS::AtLeastOnce
                    } else {
                        QoS::AtMostOnce
                    },
                    retain: false,
                    topic: topic.clone(),
                    packet_id,
                    properties: Properties::default(),
                    payload: payload.clone(),
                });
                mqtt::encode(&p, Version::V311, &mut out).map_err(|e| e.to_string())?;
                sent += 1;
                inflight += 1;
            }
            if !out.is_empty() {
                s.write_all(&out)
                    .map_err(|e| format!("bench: write: {e}"))?;
            }
            if self.qos == 0 {
                acked = sent;
                continue;
            }
            let n = s
                .read(&mut chunk)
                .map_err(|e| format!("bench: read: {e}"))?;
            if n == 0 {
                return Err("bench: broker closed the connection".into());
            }
            inbuf.extend_from_slice(&chunk[..n]);
            let mut start = 0;
            loop {
                match mqtt::decode(&inbuf[start..], Some(Version::V311), 1 << 20) {
                    Ok(Some((Packet::PubAck(_), used))) => {
                        start += used;
                        acked += 1;
                        inflight -= 1;
                    }
                    Ok(Some((_, used))) => start += used,
                    Ok(None) => break,
                    Err(e) => return Err(format!("bench: bad packet from broker: {e}")),
                }
            }
            inbuf.drain(..start);
        }
        if self.qos == 0 {
            // Make sure the broker read everything: a PINGREQ round trip.
            out.clear();
            mqtt::encode(&Packet::PingReq, Version::V311, &mut out).map_err(|e| e.to_string())?;
            s.write_all(&out)
                .map_err(|e| format!("bench: write: {e}"))?;
            loop {
                let n = s
                    .read(&mut chunk)
                    .map_err(|e| format!("bench: read: {e}"))?;
                if n == 0 || chunk[..n].contains(&0xD0) {
                    break;
                }
            }
        }
        let mut bye = Vec::new();
        let _ = mqtt::encode(
            &Packet::Disconnect(mqtt::Disconnect {
                code: 0,
                properties: Properties::default(),
            }),
            Version::V311,
            &mut bye,
        );
        let _ = s.write_all(&bye);
        Ok(acked)
    }
}
