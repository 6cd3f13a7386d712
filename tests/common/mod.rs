//! Shared set-up for the integration tests: the real model, the shipped boards and tasks.

#![allow(dead_code)]

pub mod gguf_writer;

use std::path::{Path, PathBuf};

use edgeact::config::{self, BoardFile, EngineConfig};
use edgeact::engine::Engine;
use edgeact::task::Task;

pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The x86-dev board with the model fetched by scripts/fetch-model, made absolute.
pub fn board() -> EngineConfig {
    let mut cfg = config::load_board(
        "x86-dev",
        &[root().join("board-configs")],
        &BoardFile::default(),
    )
    .expect("x86-dev board");
    cfg.model_path = root().join(&cfg.model_path);
    assert!(
        cfg.model_path.exists(),
        "{} is missing: run scripts/fetch-model first",
        cfg.model_path.display()
    );
    cfg
}

pub fn task(name: &str) -> Task {
    Task::load(&root().join("tasks").join(format!("{name}.toml"))).expect("task")
}

pub fn engine(slots: usize) -> Engine {
    Engine::load(&board(), slots).expect("engine")
}

pub fn bin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_edgeact"))
}

// ---------------------------------------------------------------------------------------
// MQTT: a real Mosquitto on a free loopback port, a test client, and the daemon.

use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// A free TCP port on loopback.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Mosquitto from Debian, with persistence, on `port`.
pub struct Broker {
    pub port: u16,
    dir: PathBuf,
    child: Option<Child>,
}

impl Broker {
    pub fn start(dir: &Path) -> Broker {
        // Started as root, mosquitto drops to its own user: let it write its persistence file.
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o777)).unwrap();
        let mut b = Broker {
            port: free_port(),
            dir: dir.to_path_buf(),
            child: None,
        };
        b.restart();
        b
    }

    /// Starts it again on the same port with the same persistence file.
    pub fn restart(&mut self) {
        let conf = self.dir.join("mosquitto.conf");
        std::fs::write(
            &conf,
            format!(
                "listener {} 127.0.0.1\nallow_anonymous true\npersistence true\npersistence_location {}/\nmax_queued_messages 10000\n",
                self.port,
                self.dir.display()
            ),
        )
        .unwrap();
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("mosquitto.log"))
            .unwrap();
        let child = Command::new("mosquitto")
            .arg("-c")
            .arg(&conf)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("mosquitto (apt-get install mosquitto)");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(
                Instant::now() < deadline,
                "mosquitto did not start on {}",
                self.port
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// SIGTERM (persistence is written on the way out) and wait.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            unsafe_kill(c.id(), "TERM");
            let _ = c.wait();
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("mosquitto.log")).unwrap_or_default()
    }

    pub fn url(&self) -> String {
        format!("mqtt://127.0.0.1:{}", self.port)
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

pub fn unsafe_kill(pid: u32, sig: &str) {
    let _ = Command::new("kill")
        .arg(format!("-{sig}"))
        .arg(pid.to_string())
        .status();
}

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
        let mut o = rumqttc::MqttOptions::new(id, "127.0.0.1", port);
        o.set_clean_session(false);
        o.set_keep_alive(Duration::from_secs(5));
        o.set_max_packet_size(4 << 20, 4 << 20);
        o.set_inflight(200);
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

/// `edgeact serve` as a child process.
pub struct Daemon {
    pub child: Child,
    pub stderr_path: PathBuf,
}

impl Daemon {
    pub fn start(broker: &Broker, device: &str, state: &Path, extra: &[&str]) -> Daemon {
        let stderr_path = state.join(format!(
            "{device}-{}.log",
            Instant::now().elapsed().as_nanos()
        ));
        std::fs::create_dir_all(state).unwrap();
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&stderr_path)
            .unwrap();
        let child = Command::new(bin())
            .current_dir(root())
            .args([
                "serve",
                "--broker",
                &broker.url(),
                "--device-id",
                device,
                "--outbox-dir",
            ])
            .arg(state.join(device))
            .args(["--stats-interval-s", "1"])
            .args(extra)
            .env("RUST_LOG", "edgeact=info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        Daemon { child, stderr_path }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.stderr_path).unwrap_or_default()
    }

    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGTERM and wait for the exit status.
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        unsafe_kill(self.child.id(), "TERM");
        self.child.wait().unwrap()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
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
