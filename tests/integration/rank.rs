//! `rank` on the real model (scripts/fetch-model): the shipped `rank-interest` task ranks
//! candidates for a profile; the ranking is sorted, scores are probabilities, a clearly
//! relevant item outranks a clearly irrelevant one, and the profile prefix is reused.

use std::collections::BTreeMap;
use std::process::Command;

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
fn ranking_is_sorted_probabilities_with_the_relevant_item_first() {
    let task = testkit::task("rank-interest");
    let cfg = RankConfig::from_task(&task).unwrap().expect("[rank]");
    let mut engine = testkit::engine(1);
    let ranker = Ranker::new(&mut engine, &task, &cfg, PROFILE, 0, None).unwrap();
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
    let ranked = ranker.rank(scored, None, None);
    eprintln!("{ranked:#?}");
    assert_eq!(ranked.len(), items.len());
    assert!(ranked.windows(2).all(|w| w[0].score >= w[1].score));
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
    let best = again.iter().map(|r| r.score).fold(f64::MIN, f64::max);
    let median = {
        let mut s: Vec<f64> = again.iter().map(|r| r.score).collect();
        s.sort_by(f64::total_cmp);
        s[s.len() / 2]
    };
    let top = ranker.rank(again.clone(), Some(2), None);
    assert_eq!(top.len(), 2);
    assert_eq!(top[0].score, best);
    let above = ranker.rank(again, None, Some(median));
    assert!(!above.is_empty() && above.iter().all(|r| r.score >= median));
    assert!(above.len() < items.len());
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
    let out = Command::new(testkit::bin())
        .current_dir(testkit::root())
        .args(["rank", "--top-k", "3", "--profile"])
        .arg(&profile)
        .arg("--items")
        .arg(&items_path)
        .output()
        .unwrap();
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
    let scores: Vec<f64> = rows.iter().map(|r| r["score"].as_f64().unwrap()).collect();
    assert!(scores.windows(2).all(|w| w[0] >= w[1]), "{scores:?}");
    assert_eq!(rows[0]["rank"], 1);
    assert!(rows.iter().all(|r| r["id"] != "tax" || r["rank"] == 3));
}
