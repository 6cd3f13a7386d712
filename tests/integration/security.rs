//! Security end to end, on a Mosquitto that refuses anonymous clients (password file), limits
//! each device to its own prefix (ACL) and has a TLS listener with a CA made by the test:
//! edgeact serves over TLS with a user name and password file; without credentials, with a
//! wrong password or with the wrong CA it exits with the cause; personal data is redacted
//! from error records and logs before they leave the device, request ids kept.

use std::time::Duration;

use crate::testkit::daemon::{serve_until_exit, Daemon};
use crate::testkit::probe::wait_online;
use crate::testkit::tls::SecureBroker;

#[test]
fn serves_over_tls_with_credentials_and_the_acl_holds() {
    let dir = tempfile::tempdir().unwrap();
    let sb = SecureBroker::start(dir.path(), &["kiosk1"]);
    let admin = sb.probe("admin", "admin-pw", "probe-admin", &["edgeact/#"]);
    let pw = sb.password_file(dir.path(), "kiosk1");
    let ca = sb.tls.ca.display().to_string();
    let pw = pw.display().to_string();
    let mut daemon = Daemon::start_url(
        &sb.tls_url(),
        "kiosk1",
        dir.path(),
        &[
            "--ca-file",
            &ca,
            "--username",
            "kiosk1",
            "--password-file",
            &pw,
        ],
    );
    wait_online(&admin, "edgeact/kiosk1");
    let req = "edgeact/kiosk1/sentiment/request";
    admin.publish(
        req,
        r#"{"id":"t1","text":"Wonderful staff, I loved every minute"}"#,
    );
    // A bad request whose error message echoes input holding personal data.
    admin.publish(
        req,
        r#"{"id":"pii-1","text":"hello","mail jane.doe@example.com or +44 20 7946 0958":{"x":1}}"#,
    );
    admin.wait_for(120, "the result and the error record", |_| {
        !admin.on("edgeact/kiosk1/sentiment/result").is_empty()
            && !admin.on("edgeact/kiosk1/errors").is_empty()
    });
    let result = admin.on("edgeact/kiosk1/sentiment/result")[0].json();
    assert_eq!(result["id"], "t1");
    assert_eq!(result["label"], "positive", "{result}");
    let err = admin.on("edgeact/kiosk1/errors")[0].json();
    assert_eq!(err["id"], "pii-1", "the request id is kept: {err}");
    assert_eq!(err["error"]["kind"], "invalid_request");
    let msg = err["error"]["message"].as_str().unwrap();
    assert!(
        msg.contains("[email]") && msg.contains("[phone]"),
        "redacted: {msg}"
    );
    assert!(!msg.contains("jane.doe") && !msg.contains("7946"), "{msg}");
    let log = daemon.log();
    assert!(
        log.contains("[email]"),
        "the log line is there, redacted: {log}"
    );
    assert!(!log.contains("jane.doe@example.com"), "{log}");

    // ACL: the device's user can neither read nor write outside edgeact/kiosk1/.
    let dev = sb.probe(
        "kiosk1",
        "pw-kiosk1",
        "probe-kiosk1",
        &["edgeact/other/#", "edgeact/kiosk1/acl-check"],
    );
    // Its subscriptions go out on ConnAck: publish until the own-topic one is in place.
    let t0 = std::time::Instant::now();
    while !dev.got.lock().unwrap().iter().any(|m| m.text() == "ready") {
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "the device user never got its own topic"
        );
        dev.publish("edgeact/kiosk1/acl-check", "ready");
        std::thread::sleep(Duration::from_millis(500));
    }
    admin.publish("edgeact/other/secret", "not for kiosk1");
    dev.publish("edgeact/other/sentiment/request", r#"{"text":"forged"}"#);
    // Same client, in order: once these arrive, the ones before them would have too.
    admin.publish("edgeact/kiosk1/acl-check", "after-admin");
    dev.publish("edgeact/kiosk1/acl-check", "after-dev");
    dev.wait_for(30, "the marker after the forbidden topic", |g| {
        g.iter().any(|m| m.text() == "after-admin")
    });
    admin.wait_for(30, "the device's marker", |g| {
        g.iter().any(|m| m.text() == "after-dev")
    });
    assert!(
        dev.on("edgeact/other/secret").is_empty(),
        "the ACL let kiosk1 read another prefix"
    );
    assert!(
        admin.on("edgeact/other/sentiment/request").is_empty(),
        "the ACL let kiosk1 publish to another prefix"
    );
    let status = daemon.terminate();
    assert!(status.success(), "exit {status:?}: {}", daemon.log());
}

#[test]
fn refused_connections_exit_with_the_cause() {
    let dir = tempfile::tempdir().unwrap();
    let sb = SecureBroker::start(dir.path(), &["kiosk1"]);
    let url = sb.tls_url();
    let ca = sb.tls.ca.display().to_string();
    let other_ca = sb.tls.other_ca.display().to_string();
    let pw = sb.password_file(dir.path(), "kiosk1").display().to_string();
    let wrong_pw = dir.path().join("wrong.password");
    std::fs::write(&wrong_pw, "not-the-password\n").unwrap();
    crate::testkit::tls::private(&wrong_pw);
    let wrong_pw = wrong_pw.display().to_string();
    let plain = sb.broker.url();
    let not_pem = dir.path().join("not-a-ca.pem");
    std::fs::write(&not_pem, "hello").unwrap();
    let not_pem = not_pem.display().to_string();
    type Case<'a> = (&'a str, Vec<&'a str>, Vec<(&'a str, &'a str)>, Vec<&'a str>);
    let cases: Vec<Case> = vec![
        (
            "no credentials",
            vec!["--broker", &url, "--ca-file", &ca],
            vec![],
            vec!["refused the connection", "not authorized"],
        ),
        (
            "wrong password (file)",
            vec![
                "--broker",
                &url,
                "--ca-file",
                &ca,
                "--username",
                "kiosk1",
                "--password-file",
                &wrong_pw,
            ],
            vec![],
            vec!["refused the connection"],
        ),
        (
            "wrong password (environment)",
            vec!["--broker", &url, "--ca-file", &ca, "--username", "kiosk1"],
            vec![("EDGEACT_MQTT_PASSWORD", "nope")],
            vec!["refused the connection"],
        ),
        (
            "wrong CA",
            vec![
                "--broker",
                &url,
                "--ca-file",
                &other_ca,
                "--username",
                "kiosk1",
                "--password-file",
                &pw,
            ],
            vec![],
            vec!["TLS handshake failed", "certificate", "ca_file"],
        ),
        (
            "CA file that is not PEM",
            vec!["--broker", &url, "--ca-file", &not_pem],
            vec![],
            vec!["ca_file", "no PEM certificate"],
        ),
        (
            "CA file with a plain-text URL",
            vec!["--broker", &plain, "--ca-file", &ca],
            vec![],
            vec!["ca_file", "mqtts://"],
        ),
        (
            "password on the command line",
            vec!["--broker", &url, "--password", "hunter2"],
            vec![],
            vec!["--password"],
        ),
    ];
    for (i, (name, args, env, needles)) in cases.iter().enumerate() {
        let outbox = dir.path().join(format!("outbox-{i}"));
        let outbox = outbox.display().to_string();
        let mut argv = vec!["--device-id", "kiosk1", "--outbox-dir", &outbox];
        argv.extend(args.iter().copied());
        let (code, stderr) = serve_until_exit(&argv, env, 120);
        assert_eq!(code, Some(2), "{name}: exit {code:?}: {stderr}");
        for n in needles {
            assert!(stderr.contains(n), "{name}: `{n}` not in: {stderr}");
        }
        eprintln!("{name}: {}", stderr.trim().lines().last().unwrap_or(""));
    }
    // The password never reaches the broker's or our output in clear.
    std::thread::sleep(Duration::from_millis(100));
    assert!(!sb.broker.log().contains("not-the-password"));
}
