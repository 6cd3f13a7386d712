//! A real Mosquitto (Debian's) on a free loopback port, and stopping child processes.
//!
//! Plain std, nothing from edgeact or the rest of the kit: the serve benchmarks in examples/
//! include this file on its own (`#[path = "../tests/testkit/broker.rs"]`).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// A free TCP port on loopback.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Sends `sig` (a name: TERM, KILL, ...) to `pid` with kill(1): no libc in the tests.
pub fn signal(pid: u32, sig: &str) {
    let _ = Command::new("kill")
        .arg(format!("-{sig}"))
        .arg(pid.to_string())
        .status();
}

/// SIGTERM, then wait: the daemon and Mosquitto shut down cleanly (Mosquitto writes its
/// persistence file on the way out).
pub fn terminate(child: &mut Child) -> ExitStatus {
    signal(child.id(), "TERM");
    child.wait().expect("wait for the child")
}

/// Mosquitto on `port` with its configuration, log (mosquitto.log) and, when persistent,
/// its persistence file in `dir`.
pub struct Broker {
    pub port: u16,
    dir: PathBuf,
    /// Whether sessions and queued messages are kept in `dir` across restarts.
    persistent: bool,
    /// Configuration after the first listener (default: anonymous clients allowed).
    extra_conf: String,
    child: Option<Child>,
}

impl Broker {
    /// Persistent, anonymous clients allowed.
    pub fn start(dir: &Path) -> Broker {
        Broker::start_with(dir, "allow_anonymous true\n")
    }

    /// Persistent, with `extra_conf` (auth, ACL, more listeners) after the first, plain
    /// listener.
    pub fn start_with(dir: &Path, extra_conf: &str) -> Broker {
        Broker::launch(dir, true, extra_conf)
    }

    /// Without persistence (nothing survives a stop), with `extra_conf` after the listener.
    // For the soak benchmark (examples/soak.rs); the tests' brokers are all persistent.
    #[allow(dead_code)]
    pub fn start_volatile(dir: &Path, extra_conf: &str) -> Broker {
        Broker::launch(dir, false, extra_conf)
    }

    fn launch(dir: &Path, persistent: bool, extra_conf: &str) -> Broker {
        // Started as root, mosquitto drops to its own user: let it write its persistence file.
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o777)).unwrap();
        let mut b = Broker {
            port: free_port(),
            dir: dir.to_path_buf(),
            persistent,
            extra_conf: extra_conf.to_string(),
            child: None,
        };
        b.restart();
        b
    }

    /// Starts it again on the same port with the same persistence file.
    pub fn restart(&mut self) {
        let conf = self.dir.join("mosquitto.conf");
        let persistence = if self.persistent {
            format!(
                "persistence true\npersistence_location {}/\n",
                self.dir.display()
            )
        } else {
            String::new()
        };
        std::fs::write(
            &conf,
            format!(
                "listener {} 127.0.0.1\n{persistence}max_queued_messages 100000\n{}",
                self.port, self.extra_conf,
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
            terminate(&mut c);
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
