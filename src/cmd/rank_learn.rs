//! `edgeact rank-learn`: the hybrid ranker's fusion weights learned from rank feedback
//! events (JSON lines, [`FeedbackEvent`]) and written into the task file's `[rank.fusion]`
//! atomically. Each event's items get the first stage's scores (fitted on an unlabelled
//! corpus) and the model's P(yes) for the event's query; [`learn_weights`] fits the
//! weights and keeps them only when they rank the dev events (or, without dev events, the
//! feedback itself) at least as well as the current weights.

use std::io::Write;
use std::path::{Path, PathBuf};

use super::AppError;
use crate::model::config::{ConfigError, EngineConfig};
use crate::model::Engine;
use crate::rank::feedback::{learn_weights, with_fusion_weights, FeedbackEvent, Judged};
use crate::rank::hybrid::{HybridConfig, Stages};
use crate::rank::{RankConfig, Ranker};
use crate::spec::Task;
use crate::util::invalid::Invalid;
use crate::util::jsonl::JsonLines;

/// Everything `edgeact rank-learn` runs with.
#[derive(Debug, Clone)]
pub struct RankLearnConfig {
    /// None: skip the model (its P(yes) counts 0, so its weight is not learned).
    pub engine: Option<EngineConfig>,
    pub task: Task,
    pub rank: RankConfig,
    /// Feedback events to learn from (JSON lines).
    pub feedback: PathBuf,
    /// Held-out feedback events the learned weights must not rank worse.
    pub dev: Option<PathBuf>,
    /// Unlabelled texts (JSON lines with `text`) the first stage is fitted on.
    pub corpus: PathBuf,
    pub k: usize,
    /// The task file written (the task's own file by default).
    pub out: PathBuf,
    /// Report only; write nothing.
    pub dry_run: bool,
    pub calibrate: Option<bool>,
    pub batch_size: usize,
}

fn input_err(p: &Path) -> impl Fn(std::io::Error) -> AppError + '_ {
    move |source| AppError::Input {
        what: p.display().to_string(),
        source,
    }
}

fn bad_line(p: &Path, line: usize, reason: String) -> AppError {
    AppError::Config(ConfigError::Invalid(Invalid::new(
        p,
        format!("line {line}"),
        reason,
    )))
}

/// The events of `path` for `task` (events naming another task are skipped); a line that
/// is not an event is an error naming it.
fn read_events(path: &Path, task: &str) -> Result<(Vec<FeedbackEvent>, usize), AppError> {
    let mut lines = JsonLines::open(path).map_err(input_err(path))?;
    let (mut events, mut other) = (Vec::new(), 0);
    while let Some((n, line)) = lines.next_line().map_err(input_err(path))? {
        if line.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        let e: FeedbackEvent =
            serde_json::from_slice(line).map_err(|e| bad_line(path, n, e.to_string()))?;
        match &e.task {
            Some(t) if t != task => other += 1,
            _ => events.push(e),
        }
    }
    Ok((events, other))
}

/// The `text` of every JSON line of the corpus (lines without one are skipped).
fn read_corpus(path: &Path) -> Result<Vec<String>, AppError> {
    let mut lines = JsonLines::open(path).map_err(input_err(path))?;
    let mut texts = Vec::new();
    while let Some((_, line)) = lines.next_line().map_err(input_err(path))? {
        if let Ok(v) = serde_json::from_slice::<serde_json::Value>(line) {
            if let Some(t) = v["text"].as_str() {
                texts.push(t.to_string());
            }
        }
    }
    Ok(texts)
}

/// Each event's judged features; the model scores every event's items for its query.
fn judge(
    cfg: &RankLearnConfig,
    engine: &mut Option<Engine>,
    stages: &Stages,
    events: &[FeedbackEvent],
) -> Result<Vec<Judged>, AppError> {
    let mut out = Vec::with_capacity(events.len());
    for e in events {
        let p_yes = match engine.as_mut() {
            None => vec![0.0; e.items.len()],
            Some(engine) => {
                let ranker =
                    Ranker::with_model(engine, &cfg.task, &cfg.rank, &e.query, 0, cfg.calibrate)?;
                ranker
                    .score(engine, &e.items, cfg.batch_size)
                    .into_iter()
                    .map(|r| r.map_or(0.0, |r| r.score))
                    .collect()
            }
        };
        out.push(Judged::new(e, stages, &p_yes));
    }
    Ok(out)
}

/// Writes `text` to `path` through a temporary file in the same folder and a rename, so
/// that a reader sees the old file or the new one, never half of one.
fn write_atomic(path: &Path, text: &str) -> Result<(), AppError> {
    let out_err = |source| {
        AppError::Eval(crate::eval::EvalError::Write {
            path: path.to_path_buf(),
            source,
        })
    };
    let name = path
        .file_name()
        .map_or("task.toml".into(), |n| n.to_string_lossy());
    let tmp = path.with_file_name(format!(".{name}.tmp"));
    let mut f = std::fs::File::create(&tmp).map_err(out_err)?;
    f.write_all(text.as_bytes()).map_err(out_err)?;
    f.sync_all().map_err(out_err)?;
    std::fs::rename(&tmp, path).map_err(out_err)
}

/// `edgeact rank-learn`: learns, reports, and writes the task file unless `dry_run`.
pub fn run(cfg: RankLearnConfig, out: &mut dyn Write) -> Result<(), AppError> {
    let (train, skipped) = read_events(&cfg.feedback, &cfg.task.name)?;
    let dev = match &cfg.dev {
        Some(p) => Some(read_events(p, &cfg.task.name)?.0),
        None => None,
    };
    let corpus = read_corpus(&cfg.corpus)?;
    let refs: Vec<&str> = corpus.iter().map(String::as_str).collect();
    let stages = Stages::fit(&refs, HybridConfig::default());
    let mut engine = match &cfg.engine {
        None => None,
        Some(e) => Some(Engine::load(e, 1)?),
    };
    let train_j = judge(&cfg, &mut engine, &stages, &train)?;
    let dev_j = match &dev {
        Some(d) => judge(&cfg, &mut engine, &stages, d)?,
        None => train_j.clone(),
    };
    let current = cfg.rank.fusion;
    let learned = learn_weights(&train_j, &dev_j, &current, cfg.k);
    let check = if dev.is_some() {
        "dev events"
    } else {
        "the feedback events (no --dev)"
    };
    writeln!(
        out,
        "{} feedback events ({} for other tasks skipped), {} (clicked, ignored) pairs; check on {} ({})\n\
         current weights {:?}\nfitted weights  {:?}\nNDCG@{} on the check events: {:.3} before, {:.3} after{}",
        train.len(), skipped, learned.pairs, check, dev_j.len(), current, learned.fitted, cfg.k,
        learned.ndcg_before, learned.ndcg_after,
        match (learned.pairs, learned.kept_current) {
            (0, _) => " (no clicked/ignored pairs: nothing learned, nothing written)",
            (_, true) => " (fitted weights were worse: current weights kept)",
            _ => "",
        }
    )
    .map_err(AppError::Output)?;
    if cfg.dry_run || learned.kept_current {
        return Ok(());
    }
    let src = std::fs::read_to_string(&cfg.task.path).map_err(input_err(&cfg.task.path))?;
    let text = with_fusion_weights(&src, &learned.weights);
    // The new file must load as the old one did, with the new weights.
    let reread = Task::parse(&text, &cfg.out, &cfg.task.name)?;
    if RankConfig::from_task(&reread)?.map(|r| r.fusion) != Some(learned.weights) {
        return Err(AppError::Config(ConfigError::Invalid(Invalid::new(
            &cfg.task.path,
            "rank.fusion".to_string(),
            "the learned weights do not read back from the rewritten file",
        ))));
    }
    write_atomic(&cfg.out, &text)?;
    writeln!(
        out,
        "weights {:?} -> {}",
        learned.weights,
        cfg.out.display()
    )
    .map_err(AppError::Output)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn learns_from_feedback_and_rewrites_the_task_file_without_the_model() {
        let dir = tempfile::tempdir().unwrap();
        let task_path = dir.path().join("r.toml");
        std::fs::write(
            &task_path,
            "# kept comment\ninstruction = \"Match?\"\nquery = \"Item: {text}\\nAnswer:\"\n\
             labels = [{ name = \"yes\", text = \" yes\" }, { name = \"no\", text = \" no\" }]\n\n\
             [rank]\ntop_k = 3\n\n[rank.fusion]\nlexical = 0.1\nchar = 1.0\nmodel = 0.0\n",
        )
        .unwrap();
        let task = Task::load(&task_path).unwrap();
        let rank = RankConfig::from_task(&task).unwrap().unwrap();
        // The clicked item shares the query's words: the lexical weight rises.
        let corpus = dir.path().join("corpus.jsonl");
        let texts = [
            "prune roses",
            "rosemary bread",
            "roses in spring",
            "laptops",
            "soil",
        ];
        let lines: String = texts
            .iter()
            .map(|t| format!("{}\n", serde_json::json!({ "text": t })))
            .collect();
        std::fs::write(&corpus, lines).unwrap();
        let feedback = dir.path().join("fb.jsonl");
        let ev = r#"{"query":"roses pruning","items":[{"id":"a","text":"rosemary roast"},{"id":"b","text":"prune roses now"},{"id":"c","text":"laptops"}],"clicked":["b"]}"#;
        let other =
            r#"{"task":"another","query":"x","items":[{"id":"a","text":"x"}],"clicked":["a"]}"#;
        std::fs::write(&feedback, format!("{ev}\n{ev}\n{other}\n")).unwrap();
        let cfg = RankLearnConfig {
            engine: None,
            task,
            rank,
            feedback,
            dev: None,
            corpus,
            k: 5,
            out: task_path.clone(),
            dry_run: false,
            calibrate: None,
            batch_size: 4,
        };
        let mut out = Vec::new();
        run(cfg, &mut out).unwrap();
        let report = String::from_utf8(out).unwrap();
        assert!(
            report.contains("2 feedback events (1 for other tasks skipped)"),
            "{report}"
        );
        let written = std::fs::read_to_string(&task_path).unwrap();
        assert!(written.starts_with("# kept comment"), "{written}");
        let t = Task::load(&task_path).unwrap();
        let w = RankConfig::from_task(&t).unwrap().unwrap().fusion;
        assert!(w.lexical > 0.1, "{written}");
        assert_eq!(written.matches("[rank.fusion]").count(), 1, "{written}");
        assert!(!dir.path().join(".r.toml.tmp").exists());
    }
}
