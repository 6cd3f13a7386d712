//! Benchmark of `edgeact serve` through a real Mosquitto on loopback (figures printed,
//! nothing asserted): throughput of a burst, request-to-result latency one request at a
//! time, and the outbox replay rate after a broker outage.
//!
//! cargo run --release --example bench_serve -- [N]   (the edgeact binary must be built)

use std::collections::HashMap;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

// From the test kit: Mosquitto and stopping a child; the benchmarks use part of it.
#[path = "../tests/testkit/bench.rs"]
mod bench;
#[allow(dead_code)]
#[path = "../tests/testkit/broker.rs"]
mod broker;

use bench::repo_and_binary;
use broker::{terminate, Broker};
use rumqttc::{Client, Event, MqttOptions, Packet, QoS};

/// Receive times of results by request id.
type Seen = Arc<Mutex<HashMap<String, Instant>>>;

fn probe(port: u16) -> (Client, Seen) {
    let mut o = MqttOptions::new("bench-probe", "127.0.0.1", port);
    o.set_clean_session(false);
    o.set_max_packet_size(1 << 22, 1 << 22);
    o.set_inflight(500);
    let (client, mut conn) = Client::new(o, 100_000);
    conn.eventloop.network_options.set_tcp_nodelay(true);
    let seen: Seen = Arc::new(Mutex::new(HashMap::new()));
    let s = seen.clone();
    let c2 = client.clone();
    std::thread::spawn(move || {
        for ev in conn.iter() {
            match ev {
                Ok(Event::Incoming(Packet::ConnAck(_))) => {
                    let _ = c2.try_subscribe("edgeact/bench/sentiment/result", QoS::AtLeastOnce);
                }
                Ok(Event::Incoming(Packet::Publish(p))) => {
                    if let Ok(v) = serde_json::from_slice::<serde_json::Value>(&p.payload) {
                        if let Some(id) = v["id"].as_str() {
                            s.lock()
                                .unwrap()
                                .entry(id.to_string())
                                .or_insert_with(Instant::now);
                        }
                    }
                }
                Ok(_) => {}
                Err(_) => std::thread::sleep(Duration::from_millis(50)),
            }
        }
    });
    std::thread::sleep(Duration::from_millis(300));
    (client, seen)
}

fn wait_count(seen: &Seen, n: usize, secs: u64) -> bool {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while seen.lock().unwrap().len() < n {
        if Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    true
}

fn req(id: &str, i: usize) -> String {
    serde_json::json!({"id": id, "text": format!("The service today was {} ({i})", if i.is_multiple_of(2) { "excellent" } else { "awful" })}).to_string()
}

fn pct(v: &mut [f64], q: f64) -> f64 {
    v.sort_by(f64::total_cmp);
    v[((v.len() - 1) as f64 * q).round() as usize]
}

fn main() {
    let n: usize = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(200);
    let (root, bin) = repo_and_binary();
    let dir = std::env::temp_dir().join(format!("edgeact-bench-serve-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    // Persistent, so the outage phase restarts the same broker with its sessions.
    let mut broker = Broker::start_with(&dir, "allow_anonymous true\nmax_inflight_messages 1000\n");
    let port = broker.port;
    let mut daemon = Command::new(&bin)
        .current_dir(&root)
        .args(["serve", "--broker", &broker.url(), "--device-id", "bench"])
        .arg("--outbox-dir")
        .arg(dir.join("outbox"))
        .args(["--queue-capacity", "100000"])
        .env("RUST_LOG", "edgeact=info")
        .stderr(std::fs::File::create(dir.join("daemon.log")).unwrap())
        .spawn()
        .expect("build edgeact first: cargo build --release");
    let (client, seen) = probe(port);
    std::thread::sleep(Duration::from_secs(3));
    let topic = "edgeact/bench/sentiment/request";

    // 1. Latency, one request at a time.
    let mut lat = Vec::new();
    for i in 0..30 {
        let id = format!("lat{i}");
        let t = Instant::now();
        client
            .publish(topic, QoS::AtLeastOnce, false, req(&id, i))
            .unwrap();
        while !seen.lock().unwrap().contains_key(&id) {
            std::thread::sleep(Duration::from_micros(200));
        }
        lat.push(t.elapsed().as_secs_f64() * 1e3);
    }
    let base = seen.lock().unwrap().len();

    // 2. Throughput of a burst.
    let t0 = Instant::now();
    for i in 0..n {
        client
            .publish(topic, QoS::AtLeastOnce, false, req(&format!("b{i}"), i))
            .unwrap();
    }
    assert!(wait_count(&seen, base + n, 600), "burst not answered");
    let burst_s = t0.elapsed().as_secs_f64();

    // 3. Outage: results pile up in the outbox while the broker is down, then replay.
    let base = seen.lock().unwrap().len();
    for i in 0..n {
        client
            .publish(topic, QoS::AtLeastOnce, false, req(&format!("o{i}"), i))
            .unwrap();
    }
    std::thread::sleep(Duration::from_millis(300));
    broker.stop();
    // Let the daemon classify what it already received.
    std::thread::sleep(Duration::from_secs((n as u64 / 25).max(3)));
    let delivered_before = seen.lock().unwrap().len() - base;
    broker.restart();
    let t1 = Instant::now();
    let ok = wait_count(&seen, base + n, 600);
    let replay_s = t1.elapsed().as_secs_f64();
    let replayed = seen.lock().unwrap().len() - base - delivered_before;

    println!("| measure | value |\n|---|---|");
    println!(
        "| latency, one request at a time (30) | p50 {:.1} ms, p99 {:.1} ms |",
        pct(&mut lat.clone(), 0.5),
        pct(&mut lat, 0.99)
    );
    println!(
        "| burst of {n} requests | {:.1} results/s ({burst_s:.2} s) |",
        n as f64 / burst_s
    );
    println!(
        "| outage of {n} requests | {delivered_before} delivered before the cut, {replayed} after reconnect in {replay_s:.2} s{} |",
        if ok { "" } else { " (INCOMPLETE)" }
    );
    terminate(&mut daemon);
    broker.stop();
    println!("(daemon log: {})", dir.join("daemon.log").display());
}
