use super::*;
use crate::react::kb::test_kb;
use crate::spec::react::tests_support::SPEC;
use std::path::Path;

/// The unit task with notify and the car park / temperature sensor allowed too.
fn spec() -> ReactSpec {
    let src = SPEC.replace(
        "  { name = \"clock\", description = \"the current time\" },",
        "  { name = \"clock\", description = \"the current day, date and time\" },\n  { name = \"notify\", description = \"call staff for an emergency, a fire or someone hurt\", arg = { kind = \"json\", keys = [\"reason\"], max_value_chars = 80 } },\n  { name = \"sensor\", description = \"free spaces in the car park, or the outside temperature\", arg = { kind = \"choice\", values = [\"parking_free\", \"outside_temperature\"] } },",
    ) + "[sensor]\ndir = \"sensors\"\n";
    ReactSpec::parse(&src, Path::new("tasks/unit.toml"), "unit").unwrap()
}

fn kb() -> Kb {
    test_kb(&[
        (
            "hours-sunday",
            "Opening hours on Sunday",
            "On Sunday the hall is open from 10:00 to 16:00.",
        ),
        (
            "prices-parking",
            "Parking prices",
            "Parking in the car park is free for the first two hours, then 1.50 euro an hour.",
        ),
        (
            "food-court",
            "Food court",
            "The food court on the first floor has twelve stalls.",
        ),
        ("pets", "Dogs", "Dogs on a lead are welcome."),
    ])
}

fn chosen(spec: &ReactSpec, kb: &Kb, question: &str, cfg: &PolicyConfig) -> ToolName {
    let scores = fuse_actions(spec, Some(kb), question, &[0.0; 5], cfg);
    let labels = action_labels(spec);
    labels[ground::best(&scores).unwrap()].0
}

#[test]
fn questions_about_the_present_are_told_by_their_words() {
    assert!(asks_present("what's the time now"));
    assert!(asks_present("What day is it today?"));
    assert!(asks_present("Is the car park full at the moment?"));
    assert!(!asks_present("sunday opening times?"));
    assert!(!asks_present("Is there a bookshop nowhere near?"));
    assert!(reads_present(ToolName::Clock) && reads_present(ToolName::Sensor));
    assert!(!reads_present(ToolName::KbSearch) && !reads_present(ToolName::Notify));
}

#[test]
fn the_knowledge_base_s_coverage_discounts_another_tool_s_words() {
    let cfg = PolicyConfig::default();
    let kb_search = ActionFeatures {
        kb: 0.53,
        ..Default::default()
    };
    let clock = ActionFeatures {
        lex: 0.47,
        shadow: 0.53,
        ..Default::default()
    };
    assert!(kb_search.score(&cfg) > clock.score(&cfg));
    // Without the discount one shared word ("times") would win.
    let plain = PolicyConfig {
        kb_shadow: 0.0,
        ..Default::default()
    };
    assert!(clock.score(&plain) > kb_search.score(&plain));
    // A question about the present lifts the discount: "what is the date today".
    let today = ActionFeatures {
        lex: 0.45,
        shadow: 0.45,
        present: 1.0,
        ..Default::default()
    };
    let kb_today = ActionFeatures {
        kb: 0.45,
        ..Default::default()
    };
    assert!(today.score(&cfg) > kb_today.score(&cfg));
}

#[test]
fn tools_are_chosen_by_their_own_evidence_on_a_knowledge_base() {
    let (s, kb) = (spec(), kb());
    let cfg = PolicyConfig::default();
    let f = action_features(&s, Some(&kb), "is parking free", &[0.0; 5]);
    let by = |t: ToolName| f[action_labels(&s).iter().position(|(n, _)| *n == t).unwrap()];
    assert!(by(ToolName::KbSearch).kb > 0.9, "{f:?}");
    assert!(by(ToolName::Sensor).lex > 0.9, "{f:?}");
    assert_eq!(by(ToolName::Sensor).shadow, by(ToolName::KbSearch).kb);
    assert_eq!(by(ToolName::Notify).shadow, 0.0);
    assert_eq!(by(ToolName::KbSearch).shadow, 0.0);
    assert_eq!(chosen(&s, &kb, "is parking free", &cfg), ToolName::KbSearch);
    assert_eq!(
        chosen(&s, &kb, "sunday opening times?", &cfg),
        ToolName::KbSearch
    );
    assert_eq!(
        chosen(
            &s,
            &kb,
            "how many spaces are free in the car park right now",
            &cfg
        ),
        ToolName::Sensor
    );
    assert_eq!(
        chosen(&s, &kb, "what's the time now", &cfg),
        ToolName::Clock
    );
    // Staff are called for a fire even where the knowledge base knows the place.
    assert_eq!(
        chosen(&s, &kb, "Fire! Someone is hurt in the food court", &cfg),
        ToolName::Notify
    );
}

#[test]
fn a_choice_value_is_chosen_by_its_words_and_ties_are_left_to_the_model() {
    let kb = kb();
    let values = vec![
        "parking_free".to_string(),
        "outside_temperature".to_string(),
    ];
    let s = choice_by_words(Some(&kb), "How cold is it outside?", &values);
    assert_eq!(top_ties(&s), vec![1], "{s:?}");
    let s = choice_by_words(Some(&kb), "any spaces free in the car park", &values);
    assert_eq!(top_ties(&s), vec![0], "{s:?}");
    let s = choice_by_words(Some(&kb), "is it nice?", &values);
    assert_eq!(top_ties(&s), vec![0, 1]);
    assert_eq!(choice_by_words(None, "outside", &values), vec![0.0, 0.0]);
}

#[test]
fn a_bare_notify_description_still_calls_staff_for_an_emergency() {
    // A task as a new user writes it: notify only "call a member of staff", no tool words.
    let src = SPEC.replace(
        "  { name = \"clock\", description = \"the current time\" },",
        "  { name = \"clock\", description = \"the current time\" },\n  { name = \"notify\", description = \"call a member of staff\", arg = { kind = \"json\", keys = [\"reason\"], max_value_chars = 80 } },",
    );
    let spec = ReactSpec::parse(&src, Path::new("tasks/unit.toml"), "unit").unwrap();
    assert!(tool_words(&spec, ToolName::Notify).contains("collapsed"));
    let cfg = PolicyConfig::default();
    let kb = kb();
    for q in [
        "Someone collapsed near the food court!",
        "There is smoke coming out of a stall",
        "I want to speak to the manager",
    ] {
        assert_eq!(chosen(&spec, &kb, q, &cfg), ToolName::Notify, "{q}");
    }
    assert_eq!(
        chosen(&spec, &kb, "Parking prices for two hours?", &cfg),
        ToolName::KbSearch
    );
    // Words the task gives for notify replace the built-in ones.
    let own = format!("{src}[policy.tool_words]\nnotify = \"a complaint\"\n");
    let spec = ReactSpec::parse(&own, Path::new("tasks/unit.toml"), "unit").unwrap();
    assert!(!tool_words(&spec, ToolName::Notify).contains("collapsed"));
}
