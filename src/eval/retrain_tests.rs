use super::*;
use crate::classify::tfidf::TextParams;

fn stack_file(texts: &[&str], y: &[usize], alpha: f64) -> Learned {
    let p = StackParams {
        dense: None,
        text: Some(TextParams::words()),
        prompt: None,
        lr: LrParams {
            alpha,
            max_iterations: 100,
            balanced: true,
        },
    };
    let m = StackModel::fit(texts, &[], y, 2, &p).unwrap();
    Learned::Stack(StackFile::new(vec!["pos".into(), "neg".into()], None, 0, m))
}

#[test]
fn the_parameters_tune_chose_are_read_back() {
    let l = stack_file(&["good", "bad"], &[0, 1], 0.3);
    let p = params_of(&l);
    assert!(p.dense.is_none());
    assert_eq!(p.text, Some(TextParams::words()));
    assert_eq!(p.lr.alpha, 0.3);
}

#[test]
fn the_verdict_swaps_on_ties_and_gains_and_keeps_on_losses() {
    assert!(Verdict::of(0.8, 0.8).swapped());
    assert!(Verdict::of(0.8, 0.9).swapped());
    let k = Verdict::of(0.8, 0.7);
    assert_eq!(k.name(), "kept");
    assert!((k.delta() + 0.1).abs() < 1e-12);
}

#[test]
fn a_correction_that_fixes_dev_rows_wins_and_is_saved_atomically() {
    // The old model never saw "awful"; dev asks for it.
    let old = stack_file(&["good film", "bad film"], &[0, 1], 1.0);
    let tx = ["good film", "bad film", "awful plot", "awful acting"];
    let ty = [0, 1, 1, 1];
    let dx = ["awful story", "good story"];
    let dy = [1, 0];
    let c = fit_and_compare(
        &old,
        Split {
            texts: &tx,
            states: &[],
            y: &ty,
        },
        Split {
            texts: &dx,
            states: &[],
            y: &dy,
        },
    )
    .unwrap();
    assert!(
        c.new.macro_f1 > c.old.macro_f1,
        "{} {}",
        c.new.macro_f1,
        c.old.macro_f1
    );
    let dir = tempfile::tempdir().unwrap();
    let task_path = dir.path().join("t.toml");
    std::fs::write(
        &task_path,
        "instruction = \"x\"\nquery = \"T: {text}\\nL:\"\nlabels = [{ name = \"pos\", text = \" p\" }, { name = \"neg\", text = \" n\" }]\n[head]\nfile = \"t.stack.json\"\nmethod = \"tfidf\"\n",
    )
    .unwrap();
    let task = Task::load(&task_path).unwrap();
    let path = task.head_path().unwrap();
    let Learned::Stack(s) = &old else { panic!() };
    s.save(&path).unwrap();
    let rec = RetrainRecord {
        by: "test",
        n_train: 4,
        n_feedback: 2,
        dev: &c.new,
    };
    save_retrained(&task, &path, &old, c.model, &rec).unwrap();
    let back = Task::load(&task_path).unwrap();
    assert_eq!(
        back.measured.as_ref().unwrap()["n_feedback"].as_integer(),
        Some(2)
    );
    let (_, l, m) = load_learned(&back).unwrap();
    assert_eq!(m, Method::Tfidf);
    assert_eq!(l.labels(), ["pos", "neg"]);
    // Nothing is left beside the files.
    let names: Vec<String> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert!(names.iter().all(|n| !n.ends_with(".tmp")), "{names:?}");
}

#[test]
fn the_memory_estimate_grows_with_rows_and_features() {
    let l = stack_file(&["good", "bad"], &[0, 1], 1.0);
    assert!(retrain_bytes(&l, 1000) > retrain_bytes(&l, 10));
}

#[test]
fn a_stack_with_the_prompt_block_is_refused_with_a_reason() {
    let p = StackParams {
        dense: None,
        text: Some(TextParams::words()),
        prompt: Some(1.0),
        lr: LrParams::default(),
    };
    let prompt = vec![vec![0.9, 0.1], vec![0.2, 0.8]];
    let m =
        StackModel::fit_blocks(&["good film", "bad film"], &[], &prompt, &[0, 1], 2, &p).unwrap();
    assert!(m.prompt.is_some());
    let dir = tempfile::tempdir().unwrap();
    let task_path = dir.path().join("t.toml");
    std::fs::write(
        &task_path,
        "instruction = \"x\"\nquery = \"T: {text}\\nL:\"\nlabels = [{ name = \"pos\", text = \" p\" }, { name = \"neg\", text = \" n\" }]\n[head]\nfile = \"t.stack.json\"\nmethod = \"stack\"\n",
    )
    .unwrap();
    StackFile::new(vec!["pos".into(), "neg".into()], None, 0, m)
        .save(&dir.path().join("t.stack.json"))
        .unwrap();
    let task = Task::load(&task_path).unwrap();
    let err = load_learned(&task).err().expect("refused").to_string();
    assert!(err.contains("prompt's label scores"), "{err}");
    assert!(err.contains("edgeact tune"), "{err}");
}
