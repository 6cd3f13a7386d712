//! `rank` on the real model (scripts/fetch-model): the shipped `rank-interest` task ranks
//! candidates for a profile; the ranking is sorted, scores are probabilities, a clearly
//! relevant item outranks a clearly irrelevant one, and the profile prefix is reused.

use std::collections::BTreeMap;

use edgeact::rank::{Item, RankConfig, Ranker};

use crate::testkit;

const PROFILE: &str =
    "Loves cooking Italian food at home: fresh pasta, pizza dough, risotto and tomato sauces.";

fn item(id: &str, title: &str, description: &str) -> Item {
    let mut fields = BTreeMap::new();
    fields.insert("title".to_string(), title.to_string());
    fields.insert("description".to_string(), description.to_string());
    Item {
        id: id.into(),
        fields,
    }
}

fn items() -> Vec<Item> {
    vec![
        item(
            "tax",
            "Quarterly tax filing deadlines",
            "A checklist of forms small businesses must file with the tax office each quarter.",
        ),
        item(
            "pasta",
            "Homemade tagliatelle with fresh tomato sauce",
            "A step-by-step Italian recipe for making fresh egg pasta and a simple tomato sauce.",
        ),
        item(
            "tyres",
            "Changing winter tyres on a truck",
            "Torque settings and tools for swapping the tyres of a delivery truck.",
        ),
        item(
            "pizza",
            "Neapolitan pizza dough",
            "How to knead and proof pizza dough for a crisp crust in a home oven.",
        ),
    ]
}

#[test]
fn ranking_is_sorted_by_the_fused_score_with_the_relevant_item_first() {
    let task = testkit::task("rank-interest");
    let cfg = RankConfig::from_task(&task).unwrap().expect("[rank]");
    let mut engine = testkit::engine(1);
    // The model's stage is measured here: scored whatever the task's weight for it.
    let ranker = Ranker::with_model(&mut engine, &task, &cfg, PROFILE, 0, None).unwrap();
    let items = items();
    let scored: Vec<_> = ranker
        .score(&mut engine, &items, 4)
        .into_iter()
        .map(Result::unwrap)
        .collect();
    for r in &scored {
        assert!((0.0..=1.0).contains(&r.score), "{r:?}");
        assert!((0.0..=1.0).contains(&r.score_raw), "{r:?}");
        // The profile is in the prefix: every item reuses it and decodes only its suffix.
        assert!(r.tokens_reused >= ranker.prefix_tokens() - 1, "{r:?}");
        assert!(r.tokens_decoded < r.tokens_reused, "{r:?}");
    }
    let ranked = ranker.rank(scored, &items, None, None);
    eprintln!("{ranked:#?}");
    assert_eq!(ranked.len(), items.len());
    // The task fuses (its [rank.fusion] weighs the lexical stages): the fused score orders.
    let fused = |r: &edgeact::rank::Ranked| r.fused.expect("a fused score");
    assert!(ranked.windows(2).all(|w| fused(&w[0]) >= fused(&w[1])));
    assert_eq!(
        ranked.iter().map(|r| r.rank).collect::<Vec<_>>(),
        (1..=items.len()).collect::<Vec<_>>()
    );
    let pos = |id: &str| ranked.iter().position(|r| r.id == id).unwrap();
    assert!(pos("pasta") < pos("tax"), "{ranked:#?}");
    assert!(pos("pizza") < pos("tyres"), "{ranked:#?}");
    // top-k and a minimum score cut the list (scored again one at a time: batching changes
    // llama.cpp's rounding a little, so compare with this run's own scores).
    let again: Vec<_> = ranker
        .score(&mut engine, &items, 1)
        .into_iter()
        .map(Result::unwrap)
        .collect();
    let median = {
        let mut s: Vec<f64> = again.iter().map(|r| r.score).collect();
        s.sort_by(f64::total_cmp);
        s[s.len() / 2]
    };
    let all = ranker.rank(again.clone(), &items, None, None);
    let top = ranker.rank(again.clone(), &items, Some(2), None);
    assert_eq!(top.len(), 2);
    assert_eq!(
        (top[0].id.as_str(), top[1].id.as_str()),
        (all[0].id.as_str(), all[1].id.as_str())
    );
    let above = ranker.rank(again, &items, None, Some(median));
    assert!(!above.is_empty() && above.iter().all(|r| r.score >= median));
    assert!(above.len() < items.len());
}

/// The shipped task weighs the model's P(yes) 0 in `[rank.fusion]`: the model is then not
/// asked (no profile prefix, no item decoded), and the ranking is the one the model pass
/// would have given.
#[test]
fn a_task_that_does_not_weigh_the_model_never_asks_it() {
    let task = testkit::task("rank-interest");
    let cfg = RankConfig::from_task(&task).unwrap().expect("[rank]");
    assert_eq!(cfg.fusion.model, 0.0, "the shipped task's weight");
    let mut engine = testkit::engine(1);
    let items = items();
    let lexical = Ranker::new(&mut engine, &task, &cfg, PROFILE, 0, None).unwrap();
    assert_eq!(lexical.prefix_tokens(), 0);
    let scored: Vec<_> = lexical
        .score(&mut engine, &items, 4)
        .into_iter()
        .map(Result::unwrap)
        .collect();
    assert!(
        scored
            .iter()
            .all(|r| !r.model_scored && r.tokens_decoded == 0 && r.tokens_reused == 0),
        "{scored:#?}"
    );
    let without = lexical.rank(scored, &items, None, None);
    let with_model = Ranker::with_model(&mut engine, &task, &cfg, PROFILE, 0, None).unwrap();
    assert!(with_model.prefix_tokens() > 0);
    let scored: Vec<_> = with_model
        .score(&mut engine, &items, 4)
        .into_iter()
        .map(Result::unwrap)
        .collect();
    assert!(scored
        .iter()
        .all(|r| r.model_scored && r.tokens_decoded > 0));
    let with = with_model.rank(scored, &items, None, None);
    let key = |v: &[edgeact::rank::Ranked]| -> Vec<(String, Option<f64>)> {
        v.iter().map(|r| (r.id.clone(), r.fused)).collect()
    };
    assert_eq!(key(&without), key(&with));
}

#[test]
fn cli_rank_prints_the_ranking() {
    let dir = tempfile::tempdir().unwrap();
    let profile = dir.path().join("profile.txt");
    std::fs::write(&profile, PROFILE).unwrap();
    let items_path = dir.path().join("items.jsonl");
    let text: String = items()
        .iter()
        .map(|i| {
            format!(
                "{}\n",
                serde_json::json!({"id": i.id, "title": i.fields["title"], "description": i.fields["description"]})
            )
        })
        .collect();
    std::fs::write(&items_path, text).unwrap();
    let out = testkit::edgeact(
        &[
            "rank",
            "--top-k",
            "3",
            "--profile",
            profile.to_str().unwrap(),
            "--items",
            items_path.to_str().unwrap(),
        ],
        &[],
        b"",
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let rows: Vec<serde_json::Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(rows.len(), 3);
    // The task fuses: the fused score orders; its model weight is 0, so the model was not
    // asked (`model_scored` false, nothing decoded).
    let fused: Vec<f64> = rows.iter().map(|r| r["fused"].as_f64().unwrap()).collect();
    assert!(fused.windows(2).all(|w| w[0] >= w[1]), "{fused:?}");
    assert!(rows
        .iter()
        .all(|r| r["model_scored"] == false && r["tokens_decoded"] == 0));
    assert_eq!(rows[0]["rank"], 1);
    assert!(rows.iter().all(|r| r["id"] != "tax" || r["rank"] == 3));
}

/// `rank-learn` on the real model: feedback events in, the task file's `[rank.fusion]`
/// rewritten (the rest kept), the report naming NDCG before and after; the learned
/// weights never rank the check events worse than the current ones.
#[test]
fn cli_rank_learn_writes_weights_the_task_reads_back() {
    let dir = tempfile::tempdir().unwrap();
    let task_path = dir.path().join("rank-learn-test.toml");
    let original =
        std::fs::read_to_string(testkit::root().join("tasks/rank-interest.toml")).unwrap();
    std::fs::write(&task_path, &original).unwrap();
    let corpus = dir.path().join("corpus.jsonl");
    let texts: String = items()
        .iter()
        .map(|i| format!("{}\n", serde_json::json!({"text": format!("{}. {}", i.fields["title"], i.fields["description"])})))
        .collect();
    std::fs::write(&corpus, texts).unwrap();
    let shown: Vec<serde_json::Value> = items()
        .iter()
        .map(|i| serde_json::json!({"id": i.id, "title": i.fields["title"], "description": i.fields["description"]}))
        .collect();
    let event = |clicked: &[&str]| serde_json::json!({"task": "rank-interest", "query": PROFILE, "items": shown, "clicked": clicked});
    let feedback = dir.path().join("feedback.jsonl");
    std::fs::write(
        &feedback,
        format!("{}\n{}\n", event(&["pasta"]), event(&["pizza", "pasta"])),
    )
    .unwrap();
    let out = testkit::edgeact(
        &[
            "rank-learn",
            "--task",
            task_path.to_str().unwrap(),
            "--feedback",
            feedback.to_str().unwrap(),
            "--corpus",
            corpus.to_str().unwrap(),
        ],
        &[],
        b"",
    );
    let report = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(report.contains("2 feedback events"), "{report}");
    let line = report
        .lines()
        .find(|l| l.starts_with("NDCG@5"))
        .expect(&report);
    let nums: Vec<f64> = line
        .split(|c: char| !(c.is_ascii_digit() || c == '.'))
        .filter_map(|w| w.parse().ok())
        .collect();
    // "NDCG@5 on the check events: BEFORE before, AFTER after".
    assert!(nums.len() >= 3 && nums[2] >= nums[1], "{line}");
    let written = std::fs::read_to_string(&task_path).unwrap();
    assert_eq!(written.matches("[rank.fusion]").count(), 1, "{written}");
    let head = original.split("# Stage weights").next().unwrap();
    assert!(written.starts_with(head), "{written}");
    let task = edgeact::spec::Task::load(&task_path).unwrap();
    let w = RankConfig::from_task(&task).unwrap().unwrap().fusion;
    assert_eq!(w.problem(), None, "{w:?}");
}
