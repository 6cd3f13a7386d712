//! Shared set-up for the integration tests: the real model, the shipped boards and tasks.

#![allow(dead_code)]

pub mod gguf_writer;

use std::path::{Path, PathBuf};

use edgeact::model::config::{self, BoardFile, EngineConfig};
use edgeact::model::Engine;
use edgeact::spec::Task;

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
    /// Configuration after the first listener (default: anonymous clients allowed).
    extra_conf: String,
    child: Option<Child>,
}

impl Broker {
    pub fn start(dir: &Path) -> Broker {
        Broker::start_with(dir, "allow_anonymous true\n")
    }

    /// With `extra_conf` (auth, ACL, more listeners) after the first, plain listener.
    pub fn start_with(dir: &Path, extra_conf: &str) -> Broker {
        // Started as root, mosquitto drops to its own user: let it write its persistence file.
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o777)).unwrap();
        let mut b = Broker {
            port: free_port(),
            dir: dir.to_path_buf(),
            extra_conf: extra_conf.to_string(),
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
                "listener {} 127.0.0.1\npersistence true\npersistence_location {}/\nmax_queued_messages 100000\n{}",
                self.port,
                self.dir.display(),
                self.extra_conf,
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

/// `edgeact serve` as a child process.
pub struct Daemon {
    pub child: Child,
    pub stderr_path: PathBuf,
}

impl Daemon {
    pub fn start(broker: &Broker, device: &str, state: &Path, extra: &[&str]) -> Daemon {
        Daemon::start_url(&broker.url(), device, state, extra)
    }

    /// On any broker URL (mqtts:// with TLS settings in `extra`).
    pub fn start_url(url: &str, device: &str, state: &Path, extra: &[&str]) -> Daemon {
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
                url,
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

// ---------------------------------------------------------------------------------------
// Security: a test CA and server certificate (openssl), Mosquitto with a password file, an
// ACL and a TLS listener.

/// PEM files made by `make_tls_files`.
pub struct TlsFiles {
    /// The test CA that signed the server certificate.
    pub ca: PathBuf,
    pub server_cert: PathBuf,
    pub server_key: PathBuf,
    /// A second CA that signed nothing the broker uses: the wrong CA.
    pub other_ca: PathBuf,
}

fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl")
        .current_dir(dir)
        .args(args)
        .output()
        .expect("openssl (apt-get install openssl)");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A test CA, a server certificate for 127.0.0.1 / localhost signed by it, and an
/// unrelated second CA, all in `dir` (EC P-256, valid two days).
pub fn make_tls_files(dir: &Path) -> TlsFiles {
    use std::os::unix::fs::PermissionsExt;
    std::fs::create_dir_all(dir).unwrap();
    let ec = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
    ];
    for (name, cn) in [("ca", "edgeact test CA"), ("other-ca", "unrelated CA")] {
        let mut a = vec!["req", "-x509"];
        a.extend(ec);
        let key = format!("{name}.key");
        let pem = format!("{name}.pem");
        let subj = format!("/CN={cn}");
        a.extend(["-keyout", &key, "-out", &pem, "-days", "2", "-subj", &subj]);
        openssl(dir, &a);
    }
    let mut a = vec!["req"];
    a.extend(ec);
    a.extend([
        "-keyout",
        "server.key",
        "-out",
        "server.csr",
        "-subj",
        "/CN=localhost",
    ]);
    openssl(dir, &a);
    std::fs::write(
        dir.join("server.ext"),
        "subjectAltName=IP:127.0.0.1,DNS:localhost\nbasicConstraints=CA:FALSE\n",
    )
    .unwrap();
    openssl(
        dir,
        &[
            "x509",
            "-req",
            "-in",
            "server.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            "server.pem",
            "-days",
            "2",
            "-extfile",
            "server.ext",
        ],
    );
    // Mosquitto drops to its own user: it must read the key.
    for f in ["ca.pem", "server.pem", "server.key", "other-ca.pem"] {
        std::fs::set_permissions(dir.join(f), std::fs::Permissions::from_mode(0o644)).unwrap();
    }
    TlsFiles {
        ca: dir.join("ca.pem"),
        server_cert: dir.join("server.pem"),
        server_key: dir.join("server.key"),
        other_ca: dir.join("other-ca.pem"),
    }
}

/// Mosquitto that refuses anonymous clients: a password file with `admin` (password
/// `admin-pw`) and one user per device id (password `pw-<id>`), an ACL giving admin every
/// topic and a device only `edgeact/<its user name>/#`; a plain listener (`broker.port`,
/// for the admin probe) and a TLS listener (`tls_port`).
pub struct SecureBroker {
    pub broker: Broker,
    pub tls_port: u16,
    pub tls: TlsFiles,
}

impl SecureBroker {
    pub fn start(dir: &Path, devices: &[&str]) -> SecureBroker {
        use std::os::unix::fs::PermissionsExt;
        let tls = make_tls_files(&dir.join("tls"));
        let passwd = dir.join("passwd");
        let mut users = vec![("admin".to_string(), "admin-pw".to_string())];
        users.extend(devices.iter().map(|d| (d.to_string(), format!("pw-{d}"))));
        for (i, (u, p)) in users.iter().enumerate() {
            let mut c = Command::new("mosquitto_passwd");
            c.arg("-b");
            if i == 0 {
                c.arg("-c");
            }
            let st = c
                .arg(&passwd)
                .arg(u)
                .arg(p)
                .output()
                .expect("mosquitto_passwd");
            assert!(
                st.status.success(),
                "{}",
                String::from_utf8_lossy(&st.stderr)
            );
        }
        let acl = dir.join("acl");
        std::fs::write(
            &acl,
            "pattern readwrite edgeact/%u/#\n\nuser admin\ntopic readwrite #\n",
        )
        .unwrap();
        for f in [&passwd, &acl] {
            std::fs::set_permissions(f, std::fs::Permissions::from_mode(0o644)).unwrap();
        }
        let tls_port = free_port();
        let conf = format!(
            "allow_anonymous false\npassword_file {}\nacl_file {}\nlistener {tls_port} 127.0.0.1\ncafile {}\ncertfile {}\nkeyfile {}\n",
            passwd.display(),
            acl.display(),
            tls.ca.display(),
            tls.server_cert.display(),
            tls.server_key.display(),
        );
        let broker = Broker::start_with(dir, &conf);
        SecureBroker {
            broker,
            tls_port,
            tls,
        }
    }

    pub fn tls_url(&self) -> String {
        format!("mqtts://127.0.0.1:{}", self.tls_port)
    }

    /// A probe on the plain listener as `user` with its password.
    pub fn probe(&self, user: &str, password: &str, id: &str, subs: &[&str]) -> Probe {
        let mut o = Probe::options(self.broker.port, id);
        o.set_credentials(user, password);
        Probe::connect_with(o, subs)
    }

    /// A password file for `device` in `dir`.
    pub fn password_file(&self, dir: &Path, device: &str) -> PathBuf {
        let p = dir.join(format!("{device}.password"));
        std::fs::write(&p, format!("pw-{device}\n")).unwrap();
        p
    }
}

/// Runs `edgeact serve` to its exit (for start-up failures), with a time limit.
/// `env`: extra environment variables. Exit code (None: killed at the limit) and stderr.
pub fn serve_until_exit(args: &[&str], env: &[(&str, &str)], secs: u64) -> (Option<i32>, String) {
    let mut child = Command::new(bin())
        .current_dir(root())
        .arg("serve")
        .args(args)
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        if let Some(_st) = child.try_wait().unwrap() {
            let out = child.wait_with_output().unwrap();
            return (
                out.status.code(),
                String::from_utf8_lossy(&out.stderr).into_owned(),
            );
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let out = child.wait_with_output().unwrap();
            return (None, String::from_utf8_lossy(&out.stderr).into_owned());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}
