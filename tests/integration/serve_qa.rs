//! `qa` over MQTT: a request with `"mode": "qa"` on a ReAct task's request topic is
//! answered by retrieve-then-answer (as `edgeact qa`), on the real model and a real
//! Mosquitto; the result carries the cited passage and its text, goes through the same
//! outbox as every result, and a follow-up in the same session resolves against it.

use crate::serve::kiosk_copy;
use crate::testkit::broker::Broker;
use crate::testkit::daemon::Daemon;
use crate::testkit::probe::{result_ids, wait_online, Probe};

#[test]
fn qa_over_mqtt_answers_with_the_cited_passage_and_follows_up() {
    let dir = tempfile::tempdir().unwrap();
    let task = kiosk_copy(dir.path());
    let broker = Broker::start(dir.path());
    let probe = Probe::connect(broker.port, "probe-qa", &["edgeact/qa/#"]);
    let mut daemon = Daemon::start(
        &broker,
        "qa",
        dir.path(),
        &["--task", task.to_str().unwrap()],
    );
    wait_online(&probe, "edgeact/qa");
    let session = "kiosk-qa-5e1f0c9a7b3d";
    probe.publish(
        "edgeact/qa/kiosk/request",
        format!(
            r#"{{"id":"q1","mode":"qa","question":"What are your opening hours on Sunday?","session":"{session}"}}"#
        ),
    );
    probe.publish(
        "edgeact/qa/kiosk/request",
        format!(r#"{{"id":"q2","mode":"qa","question":"and on Saturday?","session":"{session}"}}"#),
    );
    probe.publish(
        "edgeact/qa/kiosk/request",
        r#"{"id":"q3","mode":"chat","question":"hello"}"#,
    );
    probe.wait_for(600, "two answers, their traces and an error", |_| {
        let ids = result_ids(&probe, "edgeact/qa/kiosk/result");
        ids.contains("q1")
            && ids.contains("q2")
            && probe.on("edgeact/qa/kiosk/trace").len() >= 2
            && !probe.on("edgeact/qa/errors").is_empty()
    });
    let results = probe.on("edgeact/qa/kiosk/result");
    let by_id = |id: &str| {
        results
            .iter()
            .map(|m| m.json())
            .find(|v| v["id"] == id)
            .unwrap()
    };
    for (id, passage, time) in [
        ("q1", "hours-sunday", "16:00"),
        ("q2", "hours-saturday", "18:00"),
    ] {
        let r = by_id(id);
        eprintln!("{r}");
        assert_eq!(r["mode"], "qa", "{r}\n{}", daemon.log());
        assert_eq!(r["finished"], true);
        assert_eq!(r["session"], session);
        // The citation is a retrieved passage, given with its text; every number of the
        // answer occurs in it.
        assert_eq!(r["cited"], passage, "{r}");
        let citations: Vec<&str> = r["citations"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|c| c.as_str())
            .collect();
        assert!(citations.contains(&passage), "{r}");
        let text = r["passage"].as_str().unwrap();
        let answer = r["answer"].as_str().unwrap();
        assert!(answer.contains(time) && text.contains(time), "{r}");
        assert!(answer.ends_with(&format!("[{passage}]")), "{r}");
        assert!(
            edgeact::react::ground::ungrounded_numbers(answer, text).is_empty(),
            "{r}"
        );
        assert_eq!(r["generated_tokens"], 0, "selected, not generated: {r}");
    }
    let t = probe.on("edgeact/qa/kiosk/trace")[0].json();
    let steps = t["steps"].as_array().unwrap();
    assert_eq!(steps.len(), 2, "{t}");
    assert_eq!(steps[0]["tool"], "kb_search");
    assert!(steps[1]["final_answer"].is_string(), "{t}");
    let err = probe.on("edgeact/qa/errors")[0].json();
    assert!(
        err["error"]["message"].as_str().unwrap().contains("mode"),
        "{err}"
    );
    // Both turns are in the session, as for a loop.
    let turns: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(dir.path().join(format!("qa/sessions/{session}.json"))).unwrap(),
    )
    .unwrap();
    assert_eq!(turns.as_array().map(Vec::len), Some(2), "{turns}");
    assert!(daemon.terminate().success());
}
