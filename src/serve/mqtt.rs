//! MQTT names and options: the topic layout (Frigate / Home Assistant style), the broker
//! URL, TLS and credentials validated into rumqttc options, which connection errors are a
//! configuration mistake (refused credentials, an untrusted certificate), and the reconnect
//! backoff.
//!
//! The daemon speaks MQTT 5 for one reason: its CONNECT carries a Maximum Packet Size, and a
//! v5 broker must then drop (not send) anything larger for this client and treat it as
//! delivered. With MQTT 3.1.1 an oversized QoS 1 request breaks the connection, the broker
//! redelivers it on every reconnect, and the daemon answers nothing else again.

use std::path::PathBuf;
use std::time::Duration;

use rumqttc::v5::mqttbytes::v5::LastWill;
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::MqttOptions;
use rumqttc::{NetworkOptions, Transport};

/// Outgoing publishes in flight (sent, PUBACK not yet in) at most; also the receive maximum
/// announced to the broker, so at most this many requests are buffered at once.
pub const INFLIGHT: u16 = 64;

/// Bytes an MQTT 5 PUBLISH adds to its topic and payload, at most, as this daemon sends it:
/// fixed header (5), topic length (2), packet id (2), property length (1), with room to
/// spare.
pub const PUBLISH_OVERHEAD_BYTES: usize = 16;

/// The size of the PUBLISH packet carrying `payload_len` bytes on `topic`, at most.
pub fn publish_packet_bytes(topic: &str, payload_len: usize) -> usize {
    topic.len() + payload_len + PUBLISH_OVERHEAD_BYTES
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum MqttConfigError {
    #[error("broker URL `{url}`: {reason}")]
    Url { url: String, reason: String },
    #[error("`{key}`: {reason}")]
    Invalid { key: String, reason: String },
    #[error("cannot read {path}: {reason}")]
    File { path: PathBuf, reason: String },
    /// The broker (or TLS) refused the first connection for a reason retrying cannot fix.
    #[error("broker {broker} refused the connection: {reason}")]
    Refused { broker: String, reason: String },
}

/// A password: never printed by `{:?}`.
#[derive(Clone, PartialEq)]
pub struct Secret(pub String);

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(***)")
    }
}

/// Reads a password file: the first line, without its line end; empty is an error, and so
/// is a file that others can read (see [`check_private`]).
pub fn read_password_file(path: &std::path::Path) -> Result<Secret, MqttConfigError> {
    check_private(path)?;
    let text = std::fs::read_to_string(path).map_err(|e| MqttConfigError::File {
        path: path.to_path_buf(),
        reason: e.to_string(),
    })?;
    let line = text.lines().next().unwrap_or("").trim_end_matches('\r');
    if line.is_empty() {
        return Err(MqttConfigError::Invalid {
            key: "password_file".into(),
            reason: format!("{} is empty", path.display()),
        });
    }
    Ok(Secret(line.to_string()))
}

/// Refuses a secret file others can read, as ssh does a private key: any permission for
/// others, or for the group when the file is the daemon user's own (a root-owned file shared
/// with the service's group, mode 0640, is the usual way to hand it a secret, so that stays
/// allowed). The check is at start-up, so a leaked password is fixed before it is used.
fn check_private(path: &std::path::Path) -> Result<(), MqttConfigError> {
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::metadata(path).map_err(|e| MqttConfigError::File {
        path: path.to_path_buf(),
        reason: e.to_string(),
    })?;
    let mode = meta.mode() & 0o7777;
    // The daemon's own files: /proc/self belongs to the process's effective user (std has
    // no geteuid, and this spares a libc dependency for one call).
    let own = std::fs::metadata("/proc/self").map_or(true, |me| me.uid() == meta.uid());
    let open_to = if own { 0o077 } else { 0o007 };
    if mode & open_to == 0 {
        return Ok(());
    }
    Err(MqttConfigError::Invalid {
        key: "password_file".into(),
        reason: format!(
            "{} has mode {mode:04o}, open to its group or others; run chmod 600 {} (or 640 \
             with the file owned by root and the service's group)",
            path.display(),
            path.display()
        ),
    })
}

/// Where the broker is and how to talk to it.
#[derive(Debug, Clone, PartialEq)]
pub struct BrokerConfig {
    pub host: String,
    pub port: u16,
    pub tls: bool,
    pub ca_file: Option<PathBuf>,
    pub client_cert: Option<PathBuf>,
    pub client_key: Option<PathBuf>,
    pub username: Option<String>,
    /// From `password_file` or the EDGEACT_MQTT_PASSWORD environment variable, never a flag.
    pub password: Option<Secret>,
    pub client_id: String,
    pub keep_alive_s: u64,
    /// Largest packet, both ways: announced to the broker in CONNECT (it drops bigger
    /// messages for us instead of sending them), and checked on every message before it is
    /// recorded for publishing.
    pub max_packet_bytes: usize,
}

/// Parses `mqtt://host:port` or `mqtts://host:port` (port defaults 1883 / 8883).
pub fn parse_broker_url(url: &str) -> Result<(String, u16, bool), MqttConfigError> {
    let err = |reason: &str| MqttConfigError::Url {
        url: url.into(),
        reason: reason.into(),
    };
    let (tls, rest) = if let Some(r) = url.strip_prefix("mqtts://") {
        (true, r)
    } else if let Some(r) = url.strip_prefix("mqtt://") {
        (false, r)
    } else {
        return Err(err("must start with mqtt:// or mqtts://"));
    };
    let rest = rest.trim_end_matches('/');
    let (host, port) = match rest.rsplit_once(':') {
        Some((h, p)) => (
            h,
            p.parse::<u16>()
                .map_err(|_| err(&format!("port `{p}` is not a number from 1 to 65535")))?,
        ),
        None => (rest, if tls { 8883 } else { 1883 }),
    };
    if host.is_empty() {
        return Err(err("has no host"));
    }
    if port == 0 {
        return Err(err("port 0 is not allowed"));
    }
    Ok((host.to_string(), port, tls))
}

impl BrokerConfig {
    /// rumqttc options (MQTT 5): persistent session that never expires (the broker keeps
    /// unacknowledged requests for us across restarts), manual acks, the packet limit
    /// announced, last will `offline` on `available`.
    pub fn options(&self, topics: &Topics) -> Result<MqttOptions, MqttConfigError> {
        if self.keep_alive_s < 1 {
            return Err(MqttConfigError::Invalid {
                key: "keep_alive_s".into(),
                reason: "must be at least 1 second".into(),
            });
        }
        let mut o = MqttOptions::new(self.client_id.clone(), self.host.clone(), self.port);
        o.set_keep_alive(Duration::from_secs(self.keep_alive_s));
        o.set_clean_start(false);
        // MQTT 5 ends a session at disconnect unless told otherwise; u32::MAX: never.
        o.set_session_expiry_interval(Some(u32::MAX));
        o.set_manual_acks(true);
        let max = u32::try_from(self.max_packet_bytes).unwrap_or(u32::MAX);
        o.set_max_packet_size(Some(max));
        o.set_receive_maximum(Some(INFLIGHT));
        o.set_outgoing_inflight_upper_limit(INFLIGHT);
        let mut net = NetworkOptions::new();
        // Small messages, latency matters: no Nagle delay.
        net.set_tcp_nodelay(true);
        o.set_network_options(net);
        o.set_last_will(LastWill::new(
            topics.available(),
            "offline",
            QoS::AtLeastOnce,
            true,
            None,
        ));
        match (&self.username, &self.password) {
            (Some(u), p) => {
                o.set_credentials(u.clone(), p.clone().map(|s| s.0).unwrap_or_default());
            }
            (None, Some(_)) => {
                return Err(MqttConfigError::Invalid {
                    key: "username".into(),
                    reason:
                        "a password is set (password_file or EDGEACT_MQTT_PASSWORD) but no username"
                            .into(),
                })
            }
            (None, None) => {}
        }
        if !self.tls {
            for (key, set) in [
                ("ca_file", self.ca_file.is_some()),
                ("client_cert", self.client_cert.is_some()),
                ("client_key", self.client_key.is_some()),
            ] {
                if set {
                    return Err(MqttConfigError::Invalid {
                        key: key.into(),
                        reason: "is set but the broker URL is mqtt:// (plain text); use mqtts://"
                            .into(),
                    });
                }
            }
        }
        if self.tls {
            let read = |p: &PathBuf| {
                std::fs::read(p).map_err(|e| MqttConfigError::File {
                    path: p.clone(),
                    reason: e.to_string(),
                })
            };
            let ca = match &self.ca_file {
                Some(p) => {
                    let pem = read(p)?;
                    if !String::from_utf8_lossy(&pem).contains("-----BEGIN CERTIFICATE-----") {
                        return Err(MqttConfigError::Invalid {
                            key: "ca_file".into(),
                            reason: format!("{} holds no PEM certificate", p.display()),
                        });
                    }
                    pem
                }
                None => {
                    return Err(MqttConfigError::Invalid {
                        key: "ca_file".into(),
                        reason: "mqtts:// needs a CA certificate file (--ca-file)".into(),
                    })
                }
            };
            let client_auth = match (&self.client_cert, &self.client_key) {
                (Some(c), Some(k)) => Some((read(c)?, read(k)?)),
                (None, None) => None,
                _ => {
                    return Err(MqttConfigError::Invalid {
                        key: "client_cert".into(),
                        reason: "client_cert and client_key go together".into(),
                    })
                }
            };
            o.set_transport(Transport::tls(ca, client_auth, None));
        }
        Ok(o)
    }
}

/// Why a failed connection attempt is a configuration mistake that retrying will not fix
/// (bad credentials, not authorized, an untrusted or mismatched server certificate), in
/// words; `None` for errors worth retrying (broker down, network, timeouts).
pub fn refusal_reason(e: &rumqttc::v5::ConnectionError) -> Option<String> {
    use rumqttc::v5::mqttbytes::v5::ConnectReturnCode as C;
    use rumqttc::v5::ConnectionError as E;
    match e {
        E::ConnectionRefused(code) => match code {
            C::BadUserNamePassword | C::BadAuthenticationMethod => {
                Some("bad user name or password (check username and password_file)".into())
            }
            C::NotAuthorized | C::Banned => Some(
                "not authorized: missing or wrong user name / password, or this client is not allowed \
                 (check username, password_file or EDGEACT_MQTT_PASSWORD)"
                    .into(),
            ),
            C::BadClientId | C::ClientIdentifierNotValid => {
                Some("the client id was rejected (client_id)".into())
            }
            C::RefusedProtocolVersion | C::UnsupportedProtocolVersion => Some(
                "the broker does not speak MQTT 5 (Mosquitto 1.6 or later does)".into(),
            ),
            _ => None,
        },
        E::Tls(t) => match t {
            // Network trouble during the handshake is worth a retry; a certificate or
            // protocol failure (InvalidData) is not.
            rumqttc::TlsError::Io(io) if io.kind() != std::io::ErrorKind::InvalidData => None,
            other => Some(format!(
                "TLS handshake failed: {other} (check ca_file, the broker's certificate and its host name)"
            )),
        },
        _ => None,
    }
}

/// A hint for connection errors that are retried but may be a mismatch of plain text and
/// TLS between client and listener.
pub fn connect_hint(e: &rumqttc::v5::ConnectionError, tls: bool) -> &'static str {
    match e {
        rumqttc::v5::ConnectionError::Io(io)
            if matches!(
                io.kind(),
                std::io::ErrorKind::UnexpectedEof | std::io::ErrorKind::ConnectionReset
            ) =>
        {
            if tls {
                " (is the listener plain text? then use mqtt://)"
            } else {
                " (does the listener expect TLS? then use mqtts:// and ca_file)"
            }
        }
        _ => "",
    }
}

/// The topic layout under one prefix (default `edgeact/<device_id>`).
#[derive(Debug, Clone, PartialEq)]
pub struct Topics {
    pub prefix: String,
    /// Fleet-wide prefix for shared subscriptions (`$share/<group>/<fleet>/<task>/request`).
    pub fleet_prefix: String,
    pub share_group: Option<String>,
}

impl Topics {
    pub fn request(&self, task: &str) -> String {
        format!("{}/{task}/request", self.prefix)
    }
    /// Every task's request topic: unknown tasks get an error record, not silence.
    pub fn request_wildcard(&self) -> String {
        format!("{}/+/request", self.prefix)
    }
    pub fn shared_request(&self, task: &str) -> Option<String> {
        self.share_group
            .as_ref()
            .map(|g| format!("$share/{g}/{}/{task}/request", self.fleet_prefix))
    }
    pub fn result(&self, task: &str) -> String {
        format!("{}/{task}/result", self.prefix)
    }
    pub fn trace(&self, task: &str) -> String {
        format!("{}/{task}/trace", self.prefix)
    }
    /// Side effects of a ReAct task's `notify` tool.
    pub fn notify(&self, task: &str) -> String {
        format!("{}/{task}/notify", self.prefix)
    }
    pub fn state(&self, task: &str) -> String {
        format!("{}/{task}/state", self.prefix)
    }
    pub fn errors(&self) -> String {
        format!("{}/errors", self.prefix)
    }
    pub fn available(&self) -> String {
        format!("{}/available", self.prefix)
    }
    pub fn stats(&self) -> String {
        format!("{}/stats", self.prefix)
    }
    /// Corrected labels and ranking events, for every task (the record names its task).
    pub fn feedback(&self) -> String {
        format!("{}/feedback", self.prefix)
    }

    /// The task named by a request topic (own prefix or fleet prefix), if it is one.
    pub fn task_of(&self, topic: &str) -> Option<String> {
        for p in [&self.prefix, &self.fleet_prefix] {
            if let Some(rest) = topic
                .strip_prefix(p.as_str())
                .and_then(|r| r.strip_prefix('/'))
            {
                if let Some(task) = rest.strip_suffix("/request") {
                    if !task.is_empty() && !task.contains('/') {
                        return Some(task.to_string());
                    }
                }
            }
        }
        None
    }
}

/// Home Assistant device discovery: one sensor per classification task (`tasks`: the ones
/// that publish a retained `<task>/state`) showing its latest label. Availability is the
/// daemon's `available` topic; Home Assistant ignores payloads other than
/// `payload_available` / `payload_not_available`, so the template maps `stopped` (clean
/// shutdown) to `offline` too.
pub fn ha_discovery(device_id: &str, topics: &Topics, tasks: &[String]) -> (String, String) {
    let cmps: serde_json::Map<String, serde_json::Value> = tasks
        .iter()
        .map(|t| {
            (
                format!("{t}_label"),
                serde_json::json!({
                    "p": "sensor",
                    "name": format!("{t} label"),
                    "unique_id": format!("edgeact_{device_id}_{t}_label"),
                    "state_topic": topics.state(t),
                    "value_template": "{{ value_json.label }}",
                    "json_attributes_topic": topics.state(t),
                }),
            )
        })
        .collect();
    let payload = serde_json::json!({
        "dev": {"ids": format!("edgeact_{device_id}"), "name": format!("edgeact {device_id}"), "mf": "edgeact"},
        "o": {"name": "edgeact", "sw": env!("CARGO_PKG_VERSION")},
        "availability_topic": topics.available(),
        "payload_available": "online",
        "payload_not_available": "offline",
        "availability_template": "{{ 'online' if value == 'online' else 'offline' }}",
        "cmps": cmps,
    });
    (
        format!("homeassistant/device/{device_id}/config"),
        payload.to_string(),
    )
}

/// Reconnect delay: exponential from 250 ms to 30 s, with ±50 % jitter so a fleet does not
/// reconnect in lockstep after a broker restart.
pub fn backoff(attempt: u32, jitter_seed: u64) -> Duration {
    let base_ms = (250u64 << attempt.min(7)).min(30_000);
    // xorshift of the seed gives a factor in [0.5, 1.5).
    let mut x = jitter_seed | 1;
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    let factor = 0.5 + (x % 1000) as f64 / 1000.0;
    Duration::from_millis((base_ms as f64 * factor) as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn topics() -> Topics {
        Topics {
            prefix: "edgeact/kiosk1".into(),
            fleet_prefix: "edgeact/fleet".into(),
            share_group: Some("g1".into()),
        }
    }

    #[test]
    fn urls() {
        assert_eq!(
            parse_broker_url("mqtt://127.0.0.1:1884"),
            Ok(("127.0.0.1".into(), 1884, false))
        );
        assert_eq!(
            parse_broker_url("mqtts://broker.local"),
            Ok(("broker.local".into(), 8883, true))
        );
        assert!(parse_broker_url("http://x")
            .unwrap_err()
            .to_string()
            .contains("mqtt://"));
        assert!(parse_broker_url("mqtt://x:99999")
            .unwrap_err()
            .to_string()
            .contains("99999"));
        assert!(parse_broker_url("mqtt://:1883").is_err());
    }

    #[test]
    fn topic_layout_and_task_of() {
        let t = topics();
        assert_eq!(t.result("sentiment"), "edgeact/kiosk1/sentiment/result");
        assert_eq!(
            t.shared_request("sentiment").unwrap(),
            "$share/g1/edgeact/fleet/sentiment/request"
        );
        assert_eq!(
            t.task_of("edgeact/kiosk1/sentiment/request").as_deref(),
            Some("sentiment")
        );
        assert_eq!(
            t.task_of("edgeact/fleet/city-event/request").as_deref(),
            Some("city-event")
        );
        assert_eq!(t.task_of("edgeact/kiosk1/a/b/request"), None);
        assert_eq!(t.task_of("edgeact/kiosk1/sentiment/result"), None);
        assert_eq!(t.task_of("other/sentiment/request"), None);
    }

    #[test]
    fn keep_alive_is_validated_not_panicking() {
        let b = BrokerConfig {
            keep_alive_s: 0,
            ..plain()
        };
        assert!(matches!(
            b.options(&topics()),
            Err(MqttConfigError::Invalid { .. })
        ));
        let tls = BrokerConfig {
            tls: true,
            keep_alive_s: 5,
            ..b
        };
        assert!(tls
            .options(&topics())
            .unwrap_err()
            .to_string()
            .contains("ca_file"));
    }

    #[test]
    fn the_connect_announces_the_packet_limit_and_keeps_the_session() {
        let o = BrokerConfig {
            max_packet_bytes: 300_000,
            ..plain()
        }
        .options(&topics())
        .unwrap();
        // The broker must drop bigger messages for us rather than send them (MQTT 5).
        assert_eq!(o.max_packet_size(), Some(300_000));
        // Unacknowledged requests wait for us across disconnects and restarts.
        assert!(!o.clean_start());
        assert_eq!(o.session_expiry_interval(), Some(u32::MAX));
        assert_eq!(o.receive_maximum(), Some(INFLIGHT));
        assert_eq!(
            publish_packet_bytes("a/b", 100),
            3 + 100 + PUBLISH_OVERHEAD_BYTES
        );
    }

    fn plain() -> BrokerConfig {
        BrokerConfig {
            host: "127.0.0.1".into(),
            port: 1883,
            tls: false,
            ca_file: None,
            client_cert: None,
            client_key: None,
            username: None,
            password: None,
            client_id: "c".into(),
            keep_alive_s: 5,
            max_packet_bytes: 1 << 20,
        }
    }

    #[test]
    fn tls_and_credentials_are_validated_up_front() {
        let dir = tempfile::tempdir().unwrap();
        let not_pem = dir.path().join("ca.pem");
        std::fs::write(&not_pem, "hello").unwrap();
        let e = BrokerConfig {
            ca_file: Some(not_pem.clone()),
            ..plain()
        }
        .options(&topics())
        .unwrap_err();
        assert!(e.to_string().contains("mqtts://"), "{e}");
        let e = BrokerConfig {
            tls: true,
            ca_file: Some(not_pem),
            ..plain()
        }
        .options(&topics())
        .unwrap_err();
        assert!(e.to_string().contains("no PEM certificate"), "{e}");
        let e = BrokerConfig {
            tls: true,
            ca_file: Some(dir.path().join("missing.pem")),
            ..plain()
        }
        .options(&topics())
        .unwrap_err();
        assert!(matches!(e, MqttConfigError::File { .. }), "{e}");
        let e = BrokerConfig {
            password: Some(Secret("pw".into())),
            ..plain()
        }
        .options(&topics())
        .unwrap_err();
        assert!(e.to_string().contains("no username"), "{e}");
        // The password never shows in debug output.
        let with = BrokerConfig {
            username: Some("kiosk1".into()),
            password: Some(Secret("hunter2".into())),
            ..plain()
        };
        assert!(with.options(&topics()).is_ok());
        assert!(!format!("{with:?}").contains("hunter2"));
        // Password files: first line, line end stripped; empty is an error.
        let pw = dir.path().join("pw");
        std::fs::write(&pw, "s3cret\r\nignored\n").unwrap();
        set_mode(&pw, 0o600);
        assert_eq!(read_password_file(&pw).unwrap(), Secret("s3cret".into()));
        std::fs::write(&pw, "\n").unwrap();
        assert!(read_password_file(&pw)
            .unwrap_err()
            .to_string()
            .contains("empty"));
    }

    fn set_mode(p: &std::path::Path, mode: u32) {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).unwrap();
    }

    #[test]
    fn a_password_file_others_can_read_is_refused_like_ssh_does() {
        let dir = tempfile::tempdir().unwrap();
        let pw = dir.path().join("mqtt.password");
        std::fs::write(&pw, "s3cret\n").unwrap();
        for mode in [0o644, 0o640, 0o604, 0o660] {
            set_mode(&pw, mode);
            let e = read_password_file(&pw).unwrap_err().to_string();
            for needle in [
                "`password_file`".to_string(),
                pw.display().to_string(),
                format!("{mode:04o}"),
                "chmod 600".to_string(),
            ] {
                assert!(e.contains(&needle), "mode {mode:o}: `{needle}` not in: {e}");
            }
            assert!(!e.contains("s3cret"), "{e}");
        }
        for mode in [0o600, 0o400] {
            set_mode(&pw, mode);
            assert_eq!(read_password_file(&pw).unwrap(), Secret("s3cret".into()));
        }
    }

    #[test]
    fn refusals_that_retrying_cannot_fix() {
        use rumqttc::v5::mqttbytes::v5::ConnectReturnCode as C;
        use rumqttc::v5::ConnectionError as E;
        let auth = refusal_reason(&E::ConnectionRefused(C::BadUserNamePassword)).unwrap();
        assert!(auth.contains("user name or password"), "{auth}");
        assert!(refusal_reason(&E::ConnectionRefused(C::NotAuthorized)).is_some());
        assert!(refusal_reason(&E::ConnectionRefused(C::ServiceUnavailable)).is_none());
        let bad_cert = std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            "invalid peer certificate: UnknownIssuer",
        );
        let tls = refusal_reason(&E::Tls(rumqttc::TlsError::Io(bad_cert))).unwrap();
        assert!(
            tls.contains("UnknownIssuer") && tls.contains("ca_file"),
            "{tls}"
        );
        let reset = std::io::Error::new(std::io::ErrorKind::ConnectionReset, "reset");
        assert!(refusal_reason(&E::Tls(rumqttc::TlsError::Io(reset))).is_none());
        let refused = std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "refused");
        assert!(
            refusal_reason(&E::Io(refused)).is_none(),
            "a broker that is down is retried"
        );
        let eof = std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "eof");
        assert!(connect_hint(&E::Io(eof), false).contains("mqtts://"));
    }

    #[test]
    fn backoff_grows_with_jitter_and_caps() {
        let d0 = backoff(0, 42);
        assert!(d0 >= Duration::from_millis(125) && d0 < Duration::from_millis(375));
        assert!(backoff(20, 7) <= Duration::from_millis(45_000));
        assert_ne!(backoff(3, 1), backoff(3, 2));
    }

    #[test]
    fn discovery_names_each_task() {
        let (topic, payload) = ha_discovery("kiosk1", &topics(), &["sentiment".into()]);
        assert_eq!(topic, "homeassistant/device/kiosk1/config");
        let v: serde_json::Value = serde_json::from_str(&payload).unwrap();
        assert_eq!(v["cmps"]["sentiment_label"]["p"], "sensor");
        assert_eq!(
            v["cmps"]["sentiment_label"]["state_topic"],
            "edgeact/kiosk1/sentiment/state"
        );
    }

    #[test]
    fn discovery_maps_stopped_to_not_available() {
        // Home Assistant ignores an availability payload that is neither payload_available
        // nor payload_not_available: a clean shutdown's `stopped` would leave the sensors
        // shown as available. The template maps everything but `online` to `offline`.
        let (_, payload) = ha_discovery("kiosk1", &topics(), &["sentiment".into()]);
        let v: serde_json::Value = serde_json::from_str(&payload).unwrap();
        assert_eq!(
            v["availability_template"],
            "{{ 'online' if value == 'online' else 'offline' }}"
        );
        assert_eq!(v["availability_topic"], "edgeact/kiosk1/available");
    }
}
