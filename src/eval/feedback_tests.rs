use super::*;

fn rules() -> FeedbackRules {
    FeedbackRules::new(
        [
            (
                "sentiment".to_string(),
                FeedbackKind::Labels(vec!["positive".into(), "negative".into()]),
            ),
            ("news".to_string(), FeedbackKind::Rank),
        ],
        32,
    )
}

fn err(json: &str) -> FeedbackError {
    parse(json.as_bytes(), &rules()).unwrap_err()
}

#[test]
fn a_correction_and_a_rank_event_are_accepted() {
    let f = parse(
        br#"{"task":"sentiment","text":"meh","label":"negative","id":7}"#,
        &rules(),
    )
    .unwrap();
    assert_eq!(
        f,
        Feedback::Label(LabelFeedback {
            task: "sentiment".into(),
            text: "meh".into(),
            label: "negative".into(),
            id: Some("7".into()),
        })
    );
    let r = parse(
        br#"{"task":"news","query":"floods","items":[{"id":"a"},{"id":"b"}],"clicked":"b","ignored":["a"]}"#,
        &rules(),
    )
    .unwrap();
    let Feedback::Rank(r) = r else { panic!() };
    assert_eq!((r.clicked, r.ignored), (vec!["b".into()], vec!["a".into()]));
}

#[test]
fn each_fault_is_named_with_its_kind() {
    let cases = [
        (
            r#"{"task":"x","text":"t","label":"positive"}"#,
            "unknown_task",
            "unknown task `x`",
        ),
        (
            r#"{"task":"sentiment","text":"t","label":"meh"}"#,
            "unknown_label",
            "its labels: positive, negative",
        ),
        (
            r#"{"task":"sentiment","text":"0123456789012345678901234567890123","label":"positive"}"#,
            "too_long",
            "`text` is 34 bytes",
        ),
        (
            r#"{"task":"sentiment","label":"positive"}"#,
            "invalid_request",
            "`text` is missing",
        ),
        (
            r#"{"task":"sentiment","text":"  ","label":"positive"}"#,
            "invalid_request",
            "`text` is empty",
        ),
        (
            r#"{"task":"sentiment","text":3,"label":"positive"}"#,
            "invalid_request",
            "`text` must be a string",
        ),
        (
            r#"{"task":"sentiment","query":"q","items":[1],"clicked":"1"}"#,
            "invalid_request",
            "classifies",
        ),
        (
            r#"{"task":"news","query":"q","items":[]}"#,
            "invalid_request",
            "`items` is empty",
        ),
        (
            r#"{"task":"news","query":"q","items":[1]}"#,
            "invalid_request",
            "nothing to learn",
        ),
        (r#"[1]"#, "invalid_json", "expected an object"),
        (r#"{"task":"#, "invalid_json", "not a JSON object"),
    ];
    for (json, kind, msg) in cases {
        let e = err(json);
        assert_eq!(e.kind(), kind, "{json}: {e}");
        assert!(e.to_string().contains(msg), "{json}: {e}");
    }
}

fn label(task: &str, text: &str, l: &str) -> Feedback {
    Feedback::Label(LabelFeedback {
        task: task.into(),
        text: text.into(),
        label: l.into(),
        id: None,
    })
}

#[cfg(unix)]
#[test]
fn the_log_is_owner_only_survives_a_torn_tail_and_keeps_tasks_apart() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let log = FeedbackLog::new(dir.path().join("state"));
    log.append(&[label("sentiment", "a", "positive")]).unwrap();
    let path = log.path("sentiment");
    assert_eq!(
        std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
        0o600
    );
    // A power loss mid-write left half a record.
    let mut f = std::fs::OpenOptions::new()
        .append(true)
        .open(&path)
        .unwrap();
    f.write_all(br#"{"task":"sentiment","te"#).unwrap();
    log.append(&[label("sentiment", "b", "negative")]).unwrap();
    log.append(&[label("other", "c", "x")]).unwrap();
    let (got, skipped) = log.read("sentiment").unwrap();
    assert_eq!(
        got,
        vec![
            label("sentiment", "a", "positive"),
            label("sentiment", "b", "negative")
        ]
    );
    assert_eq!(skipped, 1);
    assert_eq!(log.read("other").unwrap().0.len(), 1);
    assert_eq!(log.read("none").unwrap(), (Vec::new(), 0));
    // A name that could leave the folder is hashed.
    let p = log.path("../x");
    assert_eq!(p.parent(), Some(dir.path().join("state").as_path()));
}

#[test]
fn a_feedback_file_with_a_bad_line_names_it() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("f.jsonl");
    std::fs::write(
        &p,
        "{\"task\":\"sentiment\",\"text\":\"a\",\"label\":\"positive\"}\n\n{\"task\":\"sentiment\",\"text\":\"b\",\"label\":\"neutral\"}\n",
    )
    .unwrap();
    let e = read_file(&p, Some(&rules())).unwrap_err().to_string();
    assert!(
        e.contains("line 3") && e.contains("unknown label `neutral`"),
        "{e}"
    );
}

fn ex(text: &str, l: &str) -> Example {
    Example {
        request: Request::text("1", text),
        label: l.into(),
        split: None,
    }
}

#[test]
fn corrections_relabel_append_supersede_and_stay_out_of_dev() {
    let train = vec![ex("good", "positive"), ex("bad", "positive")];
    let dev = vec![ex("fine", "positive")];
    let fb = [
        label("sentiment", "bad", "negative"),
        label("sentiment", "awful", "positive"),
        label("sentiment", "awful", "negative"),
        label("sentiment", "fine", "negative"),
        label("other", "zzz", "negative"),
    ];
    let (rows, m) = merge(train, &dev, &fb, "sentiment");
    let got: Vec<(String, String)> = rows
        .iter()
        .map(|e| (e.request.fields["text"].clone(), e.label.clone()))
        .collect();
    let want = [
        ("good", "positive"),
        ("bad", "negative"),
        ("awful", "negative"),
    ];
    assert_eq!(
        got,
        want.map(|(a, b)| (a.to_string(), b.to_string())).to_vec()
    );
    assert_eq!(
        m,
        Merge {
            added: 1,
            relabeled: 1,
            in_dev: 1,
            superseded: 1
        }
    );
}
