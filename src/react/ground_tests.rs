use super::*;
use crate::react::kb::test_kb;

fn kb() -> Kb {
    test_kb(&[
        (
            "hours-saturday",
            "Opening hours on Saturday",
            "On Saturday the hall opens at 08:00 and closes at 18:00.",
        ),
        (
            "hours-sunday",
            "Opening hours on Sunday",
            "On Sunday the hall is open from 10:00 to 16:00. The bakery always opens.",
        ),
        (
            "delivery",
            "Home delivery",
            "Home delivery costs 6.90 euro. Order before 15:00 for delivery the same evening.",
        ),
        ("pets", "Dogs", "Dogs on a lead are welcome."),
    ])
}

#[test]
fn sentences_keep_decimals_and_times_whole() {
    assert_eq!(
        split_sentences("Costs 6.90 euro. Open 10:00 to 16:00; closed on Monday!  Ask?"),
        vec![
            "Costs 6.90 euro.",
            "Open 10:00 to 16:00",
            "closed on Monday!",
            "Ask?"
        ]
    );
    assert_eq!(split_sentences("no end"), vec!["no end"]);
}

#[test]
fn numbers_are_found_and_checked_against_the_passage() {
    assert_eq!(
        numbers("at 16:00, 6.90 euro or 12."),
        vec!["16:00", "6.90", "12"]
    );
    assert!(ungrounded_numbers("open until 16:00", "from 10:00 to 16:00").is_empty());
    assert_eq!(
        ungrounded_numbers("open until 17:00", "from 10:00 to 16:00"),
        vec!["17:00"]
    );
}

#[test]
fn coverage_weighs_rare_terms_most() {
    let kb = kb();
    let q = weighted_terms(&kb, "Is there home delivery?", None, 0.5);
    let full = coverage(&q, &kb.terms("home delivery"));
    let none = coverage(&q, &kb.terms("dogs"));
    assert!(full > 0.99 && none == 0.0, "{full} {none}");
    // A term the knowledge base never uses weighs more than a common one.
    assert!(kb.idf("lobster") > kb.idf("hour"));
}

#[test]
fn words_that_frame_a_request_are_not_what_an_answer_must_cover() {
    let kb = kb();
    let question = "I would like home delivery, is that possible?";
    let passage = kb.terms("Home delivery costs 6.90 euro.");
    let all = coverage(&weighted_terms(&kb, question, None, 0.5), &passage);
    let topic = coverage(&topic_terms(&kb, question, None, 0.5), &passage);
    assert!(all < 0.5, "{all}");
    assert!(topic > 0.99, "{topic}");
    // A knowledge base with this home delivery passage answers it rather than turning it away.
    let g = select(
        &kb,
        Query {
            question,
            context: None,
        },
        &[("delivery".to_string(), 1.0)],
        None,
        &GroundConfig::default(),
    )
    .unwrap();
    assert_eq!(g.cited.as_deref(), Some("delivery"), "{g:?}");
}

#[test]
fn asking_for_a_thing_the_knowledge_base_never_names_is_not_found() {
    let kb = kb();
    assert_eq!(
        unknown_object(&kb, "Do you have a cinema open on Sunday?").as_deref(),
        Some("cinema")
    );
    assert!(unknown_object(&kb, "do u sell live lobsters").is_some());
    assert_eq!(
        unknown_object(&kb, "Is there home delivery on Saturday?"),
        None
    );
    assert_eq!(unknown_object(&kb, "Are there dogs in the hall?"), None);
    // Not a question whether something exists: the coverage decides.
    assert_eq!(
        unknown_object(&kb, "Can I order a sofa for delivery?"),
        None
    );
    // Whether it can be had, booked or paid with, or who sells it.
    assert_eq!(
        unknown_object(&kb, "can i get a key cut here").as_deref(),
        Some("key")
    );
    assert!(unknown_object(&kb, "Can I pay with bitcoin on Sunday?").is_some());
    assert!(unknown_object(&kb, "do any stalls sell gluten free bread").is_some());
    assert_eq!(unknown_object(&kb, "Can I get home delivery?"), None);
    // Selling is the asker's plan here, not a question who sells it.
    assert_eq!(
        unknown_object(&kb, "I'd like to sell my honey at the hall"),
        None
    );
    let ask = |question: &str| {
        select(
            &kb,
            Query {
                question,
                context: None,
            },
            &[("hours-sunday".to_string(), 1.0)],
            None,
            &GroundConfig::default(),
        )
        .unwrap()
    };
    // "open on Sunday" is well covered, the cinema is not there.
    assert_eq!(ask("Is there a cinema open on Sunday?").cited, None);
    assert_eq!(
        ask("Is the hall open on Sunday?").cited.as_deref(),
        Some("hours-sunday")
    );
}

#[test]
fn fusion_and_best_prefer_earlier_on_ties() {
    assert_eq!(best(&[1.0, 2.0, 2.0]), Some(1));
    assert_eq!(best(&[]), None);
    assert_eq!(min_max(&[1.0, 1.0]), vec![0.0, 0.0]);
    let mut c = vec![
        Candidate {
            id: "a".into(),
            retrieval: 4.0,
            coverage: 0.2,
            model: None,
            cosine: None,
            score: 0.0,
        },
        Candidate {
            id: "b".into(),
            retrieval: 2.0,
            coverage: 0.9,
            model: None,
            cosine: None,
            score: 0.0,
        },
    ];
    fuse(&mut c, &GroundConfig::default());
    assert!(c[1].score > c[0].score, "{c:?}");
}

#[test]
fn second_sentence_joins_only_within_the_margin() {
    let s = vec!["A one.".to_string(), "B two.".to_string()];
    assert_eq!(pick_sentences(&s, &[0.5, 0.9], 0.1, 200), "B two.");
    assert_eq!(pick_sentences(&s, &[0.85, 0.9], 0.1, 200), "A one. B two.");
    assert_eq!(pick_sentences(&s, &[0.85, 0.9], 0.1, 8), "B two.");
}

#[test]
fn selection_cites_a_given_passage_and_copies_its_sentence() {
    let kb = kb();
    let hits = vec![
        ("hours-saturday".to_string(), 3.0),
        ("hours-sunday".to_string(), 2.5),
    ];
    let q = Query {
        question: "How late are you open on Sunday?",
        context: None,
    };
    let g = select(&kb, q, &hits, None, &GroundConfig::default()).unwrap();
    assert_eq!(g.cited.as_deref(), Some("hours-sunday"));
    assert_eq!(g.answer, "On Sunday the hall is open from 10:00 to 16:00.");
    assert!(ungrounded_numbers(&g.answer, &kb.get("hours-sunday").unwrap().text).is_empty());
    // An id that was not retrieved is never cited, whatever the question.
    let q = Query {
        question: "home delivery price",
        context: None,
    };
    let g = select(&kb, q, &hits, None, &GroundConfig::default()).unwrap();
    assert_ne!(g.cited.as_deref(), Some("delivery"));
}

#[test]
fn a_question_the_passages_do_not_cover_gets_no_answer() {
    let kb = kb();
    let hits = vec![("pets".to_string(), 0.5)];
    let q = Query {
        question: "Can my parrot and hamster and lizard come in with the dogs?",
        context: None,
    };
    let g = select(
        &kb,
        q,
        &hits,
        None,
        &GroundConfig {
            min_coverage: 0.5,
            ..Default::default()
        },
    )
    .unwrap();
    assert_eq!((g.cited, g.answer.as_str()), (None, NOT_FOUND));
    let g = select(&kb, q, &[], None, &GroundConfig::default()).unwrap();
    assert_eq!(g.cited, None);
}

#[test]
fn a_follow_up_takes_the_earlier_question_as_context() {
    let kb = kb();
    assert!(is_follow_up("and on Saturday?"));
    assert!(is_follow_up("Saturday?"));
    assert!(!is_follow_up("How late are you open on Sunday?"));
    let hits = vec![
        ("hours-sunday".to_string(), 2.0),
        ("hours-saturday".to_string(), 2.0),
    ];
    let q = Query {
        question: "and on Saturday?",
        context: Some("How late are you open on Sunday?"),
    };
    let g = select(&kb, q, &hits, None, &GroundConfig::default()).unwrap();
    assert_eq!(g.cited.as_deref(), Some("hours-saturday"));
}

#[test]
fn the_question_tells_the_kind_of_fact_and_sentences_hold_it() {
    assert_eq!(
        fact_kind("Until when is the hall open?"),
        Some(FactKind::Time)
    );
    assert_eq!(fact_kind("What time do you shut?"), Some(FactKind::Time));
    assert_eq!(
        fact_kind("How much does parking cost per hour?"),
        Some(FactKind::Price)
    );
    assert_eq!(
        fact_kind("How long is a voucher valid?"),
        Some(FactKind::Duration)
    );
    assert_eq!(fact_kind("Where is the pharmacy?"), Some(FactKind::Place));
    // "Is it open?" asks whether, not when.
    assert_eq!(fact_kind("Is the bakery open on Sundays?"), None);
    assert!(holds_kind("Open from 10:00 to 16:00.", FactKind::Time));
    assert!(!holds_kind(
        "About half of the stalls open.",
        FactKind::Time
    ));
    assert!(holds_kind("Lockers cost 2 euro per day.", FactKind::Price));
    assert!(holds_kind(
        "Strollers are lent free of charge.",
        FactKind::Price
    ));
    assert!(holds_kind(
        "Points expire after two years.",
        FactKind::Duration
    ));
    assert!(holds_kind(
        "Covered by a two-year warranty.",
        FactKind::Duration
    ));
    assert!(holds_kind(
        "It is on the first floor, unit 112.",
        FactKind::Place
    ));
    assert!(!holds_kind("Pay by coin or card.", FactKind::Place));
}

#[test]
fn the_sentence_holding_the_asked_fact_is_chosen_and_a_close_one_joins() {
    let kb = kb();
    let hits = vec![("delivery".to_string(), 2.0)];
    let cfg = GroundConfig {
        second_margin: 0.0,
        ..Default::default()
    };
    // The time sentence, though "delivery" is in both (and in the title).
    let q = Query {
        question: "When must I order for delivery?",
        context: None,
    };
    let g = select(&kb, q, &hits, None, &cfg).unwrap();
    assert_eq!(
        g.answer, "Order before 15:00 for delivery the same evening.",
        "{g:?}"
    );
    let q = Query {
        question: "How much is delivery?",
        context: None,
    };
    let g = select(&kb, q, &hits, None, &cfg).unwrap();
    assert_eq!(g.answer, "Home delivery costs 6.90 euro.", "{g:?}");
    // With a wide margin the runner-up joins, in passage order.
    let wide = GroundConfig {
        second_margin: 5.0,
        ..Default::default()
    };
    let g = select(&kb, q, &hits, None, &wide).unwrap();
    assert_eq!(
        g.answer,
        "Home delivery costs 6.90 euro. Order before 15:00 for delivery the same evening.",
        "{g:?}"
    );
}

#[test]
fn a_clause_cut_at_a_semicolon_starts_with_a_capital() {
    let s = split_sentences("Sign up at the desk; the card is ready at once.");
    assert_eq!(s[1], "the card is ready at once.");
    assert_eq!(
        pick_sentences(&s, &[0.1, 0.9], 0.0, 200),
        "The card is ready at once."
    );
    // After a sentence's end the clause starts a sentence.
    let t = split_sentences("The card is free. Sign up at the desk; the card is ready at once.");
    assert_eq!(
        pick_sentences(&t, &[0.9, 0.1, 0.85], 0.5, 200),
        "The card is free. The card is ready at once."
    );
    assert_eq!(
        pick_sentences(&t, &[0.9, 0.85, 0.1], 0.5, 200),
        "The card is free. Sign up at the desk."
    );
    // Two clauses of one sentence keep their `;`.
    assert_eq!(
        pick_sentences(&s, &[0.9, 0.9], 0.5, 200),
        "Sign up at the desk; the card is ready at once."
    );
}

#[test]
fn a_how_to_question_prefers_the_instruction() {
    assert_eq!(
        fact_kind("how do i get a loyalty card"),
        Some(FactKind::Way)
    );
    // A more specific kind wins: the price, the place.
    assert_eq!(
        fact_kind("How do I pay, how much is it?"),
        Some(FactKind::Price)
    );
    assert_eq!(
        fact_kind("how can i find where the toilets are"),
        Some(FactKind::Place)
    );
    assert!(holds_kind(
        "Sign up at the service desk with an email address",
        FactKind::Way
    ));
    assert!(!holds_kind("The loyalty card is free.", FactKind::Way));
}
