//! Soak run of `edgeact serve` through a real Mosquitto on loopback: N requests (default
//! 20 000) with a bounded number in flight, the daemon's RSS printed every `every` answers.
//! In the middle, faults: the broker is stopped for 5 s at 1/3 and at 2/3 of the run, and
//! the daemon is killed with SIGKILL at 1/2 and started again on the same outbox. At the
//! end: every request id must have a result or an error record (nothing lost; the exit
//! status is 1 otherwise), how far RSS moved after warm-up, and the peak RSS (VmHWM) of
//! each daemon process.
//!
//! scripts/soak [N] [EVERY]   (builds, then runs this with nice)
//! cargo run --release --example soak -- [N] [EVERY] [IN_FLIGHT] [serve flags...]

use std::collections::HashSet;
use std::path::Path;
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

/// VmRSS and VmHWM of a process, MiB.
fn rss_mib(pid: u32) -> (f64, f64) {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |name: &str| {
        s.lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
            / 1024.0
    };
    (field("VmRSS:"), field("VmHWM:"))
}

#[derive(Default)]
struct Seen {
    results: HashSet<String>,
    /// Ids of the requests that got an error record.
    error_ids: HashSet<String>,
    errors: Vec<String>,
}

impl Seen {
    /// Requests answered (a result or an error record), each id once.
    fn answered(&self) -> usize {
        self.results.union(&self.error_ids).count()
    }
}

/// The probe's connection: results and error records collected into `seen` by id.
fn connect_probe(port: u16, seen: Arc<Mutex<Seen>>) -> Client {
    // A persistent session on a persistent broker: results published while the probe is
    // reconnecting after a broker outage are kept for it.
    let mut o = MqttOptions::new("soak-probe", "127.0.0.1", port);
    o.set_clean_session(false);
    o.set_max_packet_size(1 << 22, 1 << 22);
    o.set_inflight(500);
    o.set_keep_alive(Duration::from_secs(30));
    let (client, mut conn) = Client::new(o, 10_000);
    let s = seen;
    let c2 = client.clone();
    std::thread::spawn(move || {
        for ev in conn.iter() {
            match ev {
                Ok(Event::Incoming(Packet::ConnAck(_))) => {
                    for t in ["edgeact/soak/sentiment/result", "edgeact/soak/errors"] {
                        let _ = c2.try_subscribe(t, QoS::AtLeastOnce);
                    }
                }
                Ok(Event::Incoming(Packet::Publish(p))) => {
                    let v: serde_json::Value =
                        serde_json::from_slice(&p.payload).unwrap_or_default();
                    let id = v["id"].as_str().unwrap_or("").to_string();
                    let mut g = s.lock().unwrap();
                    if p.topic.ends_with("/errors") {
                        g.errors.push(format!("{id}: {}", v["error"]));
                        g.error_ids.insert(id);
                    } else {
                        g.results.insert(id);
                    }
                }
                Ok(_) => {}
                Err(_) => std::thread::sleep(Duration::from_millis(50)),
            }
        }
    });
    client
}

/// Waits for the daemon to be serving (retained `available` = online).
fn wait_online(port: u16, dir: &Path) {
    use std::sync::atomic::{AtomicUsize, Ordering};
    static WAITS: AtomicUsize = AtomicUsize::new(0);
    let avail = Arc::new(Mutex::new(false));
    {
        // Its own client id each time: an earlier waiter's connection is still alive.
        let id = format!("soak-avail-{}", WAITS.fetch_add(1, Ordering::Relaxed));
        let mut o = MqttOptions::new(id, "127.0.0.1", port);
        o.set_clean_session(true);
        let (c, mut conn) = Client::new(o, 10);
        let a = avail.clone();
        std::thread::spawn(move || {
            for ev in conn.iter() {
                match ev {
                    Ok(Event::Incoming(Packet::ConnAck(_))) => {
                        let _ = c.try_subscribe("edgeact/soak/available", QoS::AtLeastOnce);
                    }
                    Ok(Event::Incoming(Packet::Publish(p))) => {
                        *a.lock().unwrap() = &p.payload[..] == b"online";
                    }
                    Ok(_) => {}
                    Err(_) => std::thread::sleep(Duration::from_millis(50)),
                }
            }
        });
    }
    let t0 = Instant::now();
    while !*avail.lock().unwrap() {
        assert!(
            t0.elapsed() < Duration::from_secs(120),
            "daemon not online; see {}",
            dir.join("daemon.log").display()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Request number `sent`: a short text (about 12 tokens), varied from request to request.
fn request_body(sent: usize) -> String {
    let adjectives = [
        "excellent",
        "awful",
        "friendly",
        "rude",
        "spotless",
        "dirty",
        "quick",
        "slow",
    ];
    let adj = adjectives[sent % adjectives.len()];
    let text = format!(
        "Visit {sent}: the staff were {adj}{}",
        " today".repeat(sent % 3)
    );
    serde_json::json!({"id": format!("s{sent}"), "text": text}).to_string()
}

/// Sends `n` requests, at most `in_flight` unanswered, printing a line every `every`
/// answers; `fault(answered)` runs on every round and returns the daemon's pid (a new one
/// after a restart). Stops early after 300 s without progress. Returns the start time and
/// the (answered, RSS MiB) samples.
fn drive(
    client: &Client,
    seen: &Mutex<Seen>,
    n: usize,
    every: usize,
    in_flight: usize,
    fault: &mut dyn FnMut(usize) -> u32,
) -> (Instant, Vec<(usize, f64)>) {
    let start = Instant::now();
    let mut sent = 0usize;
    let mut next_report = every;
    let mut samples: Vec<(usize, f64)> = Vec::new();
    let mut last_progress = (0usize, Instant::now());
    loop {
        let done = seen.lock().unwrap().answered();
        let pid = fault(done);
        while sent < n && sent < done + in_flight {
            client
                .publish(
                    "edgeact/soak/sentiment/request",
                    QoS::AtLeastOnce,
                    false,
                    request_body(sent),
                )
                .unwrap();
            sent += 1;
        }
        if done >= next_report || done >= n {
            let (rss, hwm) = rss_mib(pid);
            let secs = start.elapsed().as_secs_f64();
            println!(
                "{done:>8} {secs:>9.1} {:>10.1} {rss:>10.1} {hwm:>10.1}",
                done as f64 / secs
            );
            samples.push((done, rss));
            next_report += every;
        }
        if done >= n {
            break;
        }
        if done > last_progress.0 {
            last_progress = (done, Instant::now());
        } else if last_progress.1.elapsed() > Duration::from_secs(300) {
            println!("no progress for 300 s at {done} of {n}: stopping");
            break;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    (start, samples)
}

/// The closing figures: answered, errors, rate, how far RSS moved after warm-up, the peak
/// RSS; the ids that got nothing. False when any did.
fn summarize(
    seen: &Seen,
    pid: u32,
    n: usize,
    start: Instant,
    samples: &[(usize, f64)],
    peak_before_kill: f64,
) -> bool {
    let answered = seen.results.len();
    let (rss_end, hwm) = rss_mib(pid);
    // Warm-up: the first 10 % of the run.
    let warm: Vec<f64> = samples
        .iter()
        .filter(|(d, _)| *d >= n / 10)
        .map(|(_, r)| *r)
        .collect();
    let (lo, hi) = warm
        .iter()
        .fold((f64::MAX, 0.0f64), |(lo, hi), &r| (lo.min(r), hi.max(r)));
    println!(
        "results {answered} of {n} (distinct ids), error records {}; {:.1} s, {:.1} req/s",
        seen.errors.len(),
        start.elapsed().as_secs_f64(),
        answered as f64 / start.elapsed().as_secs_f64()
    );
    for e in seen.errors.iter().take(5) {
        println!("  error: {e}");
    }
    if !warm.is_empty() {
        println!(
            "RSS after warm-up (from {} answers): min {lo:.1} MiB, max {hi:.1} MiB, spread {:.2} %; end {rss_end:.1} MiB, peak (VmHWM) {hwm:.1} MiB",
            n / 10,
            (hi - lo) / lo * 100.0
        );
    }
    println!(
        "peak RSS (VmHWM): {peak_before_kill:.1} MiB before the SIGKILL, {hwm:.1} MiB after the restart"
    );
    let missing: Vec<String> = (0..n)
        .map(|i| format!("s{i}"))
        .filter(|id| !seen.results.contains(id) && !seen.error_ids.contains(id))
        .collect();
    println!(
        "lost: {} of {n} request ids got neither a result nor an error record{}",
        missing.len(),
        if missing.is_empty() {
            String::new()
        } else {
            format!(", e.g. {:?}", &missing[..missing.len().min(10)])
        }
    );
    missing.is_empty()
}

/// Starts `edgeact serve` on the soak's broker and outbox; its log is appended to.
fn spawn_daemon(bin: &Path, root: &Path, url: &str, dir: &Path) -> std::process::Child {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join("daemon.log"))
        .unwrap();
    Command::new(bin)
        .current_dir(root)
        .args(["serve", "--broker", url, "--device-id", "soak"])
        .arg("--outbox-dir")
        .arg(dir.join("outbox"))
        .args(["--queue-capacity", "256", "--stats-interval-s", "5"])
        // Anything after N EVERY IN_FLIGHT goes to `edgeact serve` (e.g. --threads 1).
        .args(std::env::args().skip(4))
        .env("RUST_LOG", "edgeact=warn")
        .stderr(log)
        .spawn()
        .expect("edgeact binary (cargo build --release)")
}

fn main() {
    let arg = |i: usize, d: usize| {
        std::env::args()
            .nth(i)
            .and_then(|a| a.parse().ok())
            .unwrap_or(d)
    };
    let n = arg(1, 20_000);
    let every = arg(2, 1000);
    let in_flight = arg(3, 32);
    let (root, bin) = repo_and_binary();
    let dir = std::env::temp_dir().join(format!("edgeact-soak-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    // Persistent: the daemon's session (its subscriptions and unacknowledged requests)
    // and the probe's survive the outages.
    let mut broker = Broker::start(&dir);
    let port = broker.port;
    let url = broker.url();
    let mut daemon = spawn_daemon(&bin, &root, &url, &dir);
    let seen = Arc::new(Mutex::new(Seen::default()));
    let client = connect_probe(port, seen.clone());
    wait_online(port, &dir);
    let (rss0, _) = rss_mib(daemon.id());
    println!(
        "soak: {n} requests, at most {in_flight} in flight, daemon pid {}, RSS {rss0:.1} MiB after load",
        daemon.id()
    );
    println!(
        "{:>8} {:>9} {:>10} {:>10} {:>10}",
        "answered", "elapsed_s", "req_per_s", "rss_mib", "hwm_mib"
    );
    // Faults, by answers so far: broker outages at 1/3 and 2/3, a SIGKILL at 1/2.
    let (mut outages, mut killed, mut peak_before_kill) = (0, false, 0.0);
    let mut fault = |done: usize| {
        if outages < 2 && done >= n * (outages + 1) / 3 && n >= 3 {
            outages += 1;
            println!("-- fault: broker stopped for 5 s at {done} answered");
            broker.stop();
            std::thread::sleep(Duration::from_secs(5));
            broker.restart();
        }
        if !killed && done >= n / 2 {
            killed = true;
            peak_before_kill = rss_mib(daemon.id()).1;
            println!("-- fault: daemon killed (SIGKILL) at {done} answered, started again");
            let _ = daemon.kill();
            let _ = daemon.wait();
            std::thread::sleep(Duration::from_secs(1));
            daemon = spawn_daemon(&bin, &root, &url, &dir);
            wait_online(port, &dir);
        }
        daemon.id()
    };
    let (start, samples) = drive(&client, &seen, n, every, in_flight, &mut fault);
    let pid = fault(0);
    let ok = summarize(
        &seen.lock().unwrap(),
        pid,
        n,
        start,
        &samples,
        peak_before_kill,
    );
    terminate(&mut daemon);
    broker.stop();
    if ok {
        let _ = std::fs::remove_dir_all(&dir);
    } else {
        println!("kept for a look: {}", dir.display());
        std::process::exit(1);
    }
}
