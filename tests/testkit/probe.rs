//! A test MQTT client that records what it receives, and waits on it.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// A received message.
#[derive(Clone, Debug)]
pub struct Got {
    pub topic: String,
    pub payload: Vec<u8>,
    pub retain: bool,
}

impl Got {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.payload).unwrap_or(serde_json::Value::Null)
    }
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.payload).into_owned()
    }
}

/// A test MQTT client with a persistent session (misses nothing across broker restarts);
/// it records every message on its subscriptions.
pub struct Probe {
    pub client: rumqttc::Client,
    pub got: Arc<Mutex<Vec<Got>>>,
}

impl Probe {
    pub fn connect(port: u16, id: &str, subscriptions: &[&str]) -> Probe {
        Probe::connect_with(Probe::options(port, id), subscriptions)
    }

    /// The probe's default options (persistent session, large packets), to adjust.
    pub fn options(port: u16, id: &str) -> rumqttc::MqttOptions {
        let mut o = rumqttc::MqttOptions::new(id, "127.0.0.1", port);
        o.set_clean_session(false);
        o.set_keep_alive(Duration::from_secs(5));
        o.set_max_packet_size(4 << 20, 4 << 20);
        o.set_inflight(200);
        o
    }

    /// A probe with these options (credentials, TLS).
    pub fn connect_with(o: rumqttc::MqttOptions, subscriptions: &[&str]) -> Probe {
        let (client, mut conn) = rumqttc::Client::new(o, 100_000);
        let got = Arc::new(Mutex::new(Vec::new()));
        let sink = got.clone();
        let subs: Vec<String> = subscriptions.iter().map(|s| s.to_string()).collect();
        let c2 = client.clone();
        std::thread::spawn(move || {
            for ev in conn.iter() {
                match ev {
                    Ok(rumqttc::Event::Incoming(rumqttc::Packet::ConnAck(_))) => {
                        for s in &subs {
                            let _ = c2.try_subscribe(s.clone(), rumqttc::QoS::AtLeastOnce);
                        }
                    }
                    Ok(rumqttc::Event::Incoming(rumqttc::Packet::Publish(p))) => {
                        sink.lock().unwrap().push(Got {
                            topic: p.topic.clone(),
                            payload: p.payload.to_vec(),
                            retain: p.retain,
                        });
                    }
                    Ok(_) => {}
                    Err(rumqttc::ConnectionError::RequestsDone) => break,
                    Err(_) => std::thread::sleep(Duration::from_millis(100)),
                }
            }
        });
        Probe { client, got }
    }

    pub fn publish(&self, topic: &str, payload: impl Into<Vec<u8>>) {
        self.client
            .publish(topic, rumqttc::QoS::AtLeastOnce, false, payload)
            .expect("queue publish");
    }

    pub fn on(&self, topic: &str) -> Vec<Got> {
        self.got
            .lock()
            .unwrap()
            .iter()
            .filter(|g| g.topic == topic)
            .cloned()
            .collect()
    }

    /// Waits until `pred` holds over what was received, or panics after `secs`.
    pub fn wait_for(&self, secs: u64, what: &str, pred: impl Fn(&[Got]) -> bool) {
        let deadline = Instant::now() + Duration::from_secs(secs);
        loop {
            // Release the lock before `pred` runs: it may read the probe again.
            let snapshot = self.got.lock().unwrap().clone();
            if pred(&snapshot) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "timed out after {secs}s waiting for {what}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// Waits for the retained `available` of `prefix` to say `online` (subscriptions in place).
pub fn wait_online(probe: &Probe, prefix: &str) {
    let topic = format!("{prefix}/available");
    probe.wait_for(60, &format!("{topic} = online"), |g| {
        g.iter()
            .rev()
            .find(|m| m.topic == topic)
            .is_some_and(|m| m.payload == b"online")
    });
}

/// Distinct request ids among results on `topic`.
pub fn result_ids(probe: &Probe, topic: &str) -> std::collections::BTreeSet<String> {
    probe
        .on(topic)
        .iter()
        .filter_map(|g| g.json()["id"].as_str().map(String::from))
        .collect()
}
