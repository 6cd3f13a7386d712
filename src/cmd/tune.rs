//! `edgeact tune`: the evaluate-and-feed-back step. Tries candidate templates, K-shot
//! example sets and calibration on/off, and the learned methods (TF-IDF, the head on model
//! features, the stack of both; [`crate::eval::select`]) trained on K examples per label or
//! the whole train split, all on the same dev rows, and writes the winner (by macro-F1) as a
//! task file with the measured dev score in it (and its head or stack file beside it).

use std::io::Write;
use std::path::PathBuf;

use super::AppError;
use crate::classify::features::FeatureTokenizer;
use crate::classify::head::{HeadError, HeadFile, TrainParams};
use crate::classify::stack::StackFile;
use crate::classify::SetupError;
use crate::eval::learn::{per_class_name, per_class_upto, xy, FeatureStore};
use crate::eval::select::{
    learned_candidates_with, stack_feature, LearnGrid, LearnedCandidate, PromptScores, Split,
};
use crate::eval::select_encoder::{encoder_candidates, Embedded};
use crate::eval::tune::{candidates, pick_best, Candidate, DemoGrid};
use crate::eval::{self, EvalError, Example};
use crate::model::config::EngineConfig;
use crate::model::{Engine, FeatureParams, PooledStates};
use crate::spec::{HeadRef, Method, Task, TrainSource};

/// The learned side of `edgeact tune`.
#[derive(Debug, Clone)]
pub struct LearnConfig {
    /// Methods tried: head, stack, tfidf (an empty list tries none).
    pub grid: LearnGrid,
    /// Training examples per label (usize::MAX: the whole train split).
    pub per_class: usize,
    pub features: FeatureParams,
    pub cache_dir: Option<PathBuf>,
    /// The stack's prompt block is tried only up to this many training texts (each is one
    /// more prompt run at tune time).
    pub prompt_block_max_train: usize,
    /// Whether the stacks with the sentence encoder's embedding are tried
    /// ([`crate::eval::select_encoder`]; the encoder beside the model).
    pub encoder: bool,
}

/// Settings of `edgeact tune`.
#[derive(Debug, Clone)]
pub struct TuneConfig {
    pub engine: EngineConfig,
    /// Candidate templates; their own examples are one candidate each.
    pub templates: Vec<Task>,
    /// K-shot sets to try besides each file's own examples (0 = zero-shot).
    pub shots: Vec<usize>,
    pub data: PathBuf,
    pub train_split: String,
    pub dev_split: String,
    /// Dev examples at most (evenly spaced sample).
    pub limit: usize,
    pub out: PathBuf,
    pub batch_size: usize,
    /// Whether the prompt candidates (templates x shots x calibration) are tried.
    pub prompt_candidates: bool,
    /// The prompt candidates with retrieved demonstrations (with `prompt_candidates`).
    pub demos: DemoGrid,
    pub learn: LearnConfig,
}

/// What a dev row came from.
enum Tried {
    Prompt(usize),
    Learned(usize),
}

/// Scores every candidate on the dev split and writes the best as a task file.
pub fn run(cfg: TuneConfig, out: &mut dyn Write) -> Result<(), AppError> {
    let dev = eval::read_labeled(&cfg.data, Some(&cfg.dev_split), cfg.limit)?;
    let needs_pool = cfg.shots.iter().any(|&k| k > 0)
        || !cfg.learn.grid.methods.is_empty()
        || cfg.learn.encoder
        || !cfg.demos.by.is_empty();
    let pool = if needs_pool {
        eval::read_labeled(&cfg.data, Some(&cfg.train_split), usize::MAX)?
    } else {
        Vec::new()
    };
    for t in &cfg.templates {
        eval::check_labels(t, &dev, &cfg.data)?;
    }
    let cands = if cfg.prompt_candidates {
        candidates(&cfg.templates, &cfg.shots, &pool, &cfg.demos)?
    } else {
        Vec::new()
    };
    let mut engine = if !cands.is_empty() || cfg.learn.grid.needs_features() {
        Some(Engine::load(
            &crate::spec::config_for_tasks(&cfg.engine, &cfg.templates)?,
            1,
        )?)
    } else {
        None
    };
    let mut scores = Vec::with_capacity(cands.len());
    let mut runs = Vec::with_capacity(cands.len());
    let mut tried = Vec::new();
    writeln!(
        out,
        "| candidate | dev n | accuracy | macro-F1 | ECE |\n|---|---|---|---|---|"
    )
    .map_err(AppError::Output)?;
    let mut dev_probs = Vec::with_capacity(cands.len());
    for (i, c) in cands.iter().enumerate() {
        let Some(engine) = engine.as_mut() else { break };
        tried.push(Tried::Prompt(i));
        match eval::run_task_probs(
            engine,
            c.task.clone(),
            Some(c.calibrate),
            &dev,
            cfg.batch_size,
            true,
        ) {
            Ok((run, probs)) => {
                row(out, &c.label, &run.metrics)?;
                scores.push(Some(run.metrics.macro_f1));
                runs.push(Some(run));
                dev_probs.push(probs);
            }
            Err(e) => {
                // A candidate that cannot run (say, a prefix too long for n_ctx) loses.
                writeln!(out, "| {} | - | - | - | failed: {e} |", c.label)
                    .map_err(AppError::Output)?;
                scores.push(None);
                runs.push(None);
                dev_probs.push(Vec::new());
            }
        }
    }
    let prompts = PromptRuns {
        cands: &cands,
        scores: &scores,
        dev_probs: &dev_probs,
    };
    let (learned, n_train, block) = learn(&cfg, engine.as_mut(), &pool, &dev, prompts, out)?;
    for (i, c) in learned.iter().enumerate() {
        tried.push(Tried::Learned(i));
        scores.push(Some(c.dev.macro_f1));
    }
    let Some(b) = pick_best(&scores) else {
        return Err(AppError::Eval(EvalError::Empty {
            path: cfg.data.clone(),
            split: " (every candidate failed)".into(),
        }));
    };
    if let Tried::Learned(i) = tried[b] {
        let c = &learned[i];
        // A stack that reads the prompt's scores runs with that prompt: its task file is
        // the prompt candidate's (examples, calibration).
        let base = match block.filter(|_| c.model.needs_prompt()) {
            Some(k) => {
                let mut t = cands[k].task.clone();
                t.calibration.enabled = cands[k].calibrate;
                t
            }
            None => cfg.templates[0].clone(),
        };
        write_learned(
            &cfg,
            engine.as_ref(),
            c,
            &base,
            n_train,
            (dev.len(), tried.len()),
        )?;
        writeln!(
            out,
            "best: {} (dev macro-F1 {:.3}, accuracy {:.3}; confidences at temperature {:.3}, \
             fitted on dev) -> {}",
            c.label,
            c.dev.macro_f1,
            c.dev.accuracy,
            c.model.model.temperature,
            cfg.out.display()
        )
        .map_err(AppError::Output)?;
        return Ok(());
    }
    let Some(engine) = engine else {
        return Err(AppError::Eval(EvalError::Empty {
            path: cfg.data.clone(),
            split: " (no candidate)".into(),
        }));
    };
    let b = match tried[b] {
        Tried::Prompt(i) => i,
        Tried::Learned(_) => 0,
    };
    let (winner, run) = (&cands[b], runs[b].as_ref().map(|r| &r.metrics));
    write_prompt(&cfg, &engine, winner, run, tried.len())?;
    writeln!(out, "best: {} -> {}", winner.label, cfg.out.display()).map_err(AppError::Output)?;
    Ok(())
}

/// Writes a prompt winner as the task file, with its dev scores in `[measured]`.
fn write_prompt(
    cfg: &TuneConfig,
    engine: &Engine,
    winner: &crate::eval::tune::Candidate,
    run: Option<&eval::metrics::Metrics>,
    n_tried: usize,
) -> Result<(), AppError> {
    let mut task = winner.task.clone();
    task.calibration.enabled = winner.calibrate;
    let mut measured = toml::Table::new();
    measured.insert("by".into(), "edgeact tune".into());
    measured.insert("candidate".into(), winner.label.clone().into());
    measured.insert("data".into(), cfg.data.display().to_string().into());
    measured.insert("dev_split".into(), cfg.dev_split.clone().into());
    if let Some(m) = run {
        measured.insert("dev_n".into(), (m.n as i64).into());
        measured.insert(
            "dev_macro_f1".into(),
            ((m.macro_f1 * 1e4).round() / 1e4).into(),
        );
        measured.insert(
            "dev_accuracy".into(),
            ((m.accuracy * 1e4).round() / 1e4).into(),
        );
    }
    measured.insert("model_sha256".into(), engine.info.sha256.clone().into());
    measured.insert("candidates_tried".into(), (n_tried as i64).into());
    task.measured = Some(measured);
    write_tuned(cfg, &task, n_tried)
}

/// Writes the winning task file, its header naming the data, the dev split and how many
/// candidates it beat.
fn write_tuned(cfg: &TuneConfig, task: &Task, n_tried: usize) -> Result<(), AppError> {
    let text = format!(
        "# Written by `edgeact tune` from {} (dev split `{}`): the best of {} candidates by macro-F1.\n{}",
        cfg.data.display(),
        cfg.dev_split,
        n_tried,
        task.to_toml()
    );
    if let Some(dir) = cfg.out.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(|source| EvalError::Write {
            path: dir.into(),
            source,
        })?;
    }
    std::fs::write(&cfg.out, text).map_err(|source| EvalError::Write {
        path: cfg.out.clone(),
        source,
    })?;
    Ok(())
}

fn row(out: &mut dyn Write, label: &str, m: &eval::metrics::Metrics) -> Result<(), AppError> {
    writeln!(
        out,
        "| {} | {} | {:.3} | {:.3} | {:.3} |",
        label, m.n, m.accuracy, m.macro_f1, m.ece
    )
    .map_err(AppError::Output)
}

fn head_err(task: &Task) -> impl Fn(HeadError) -> AppError + '_ {
    move |e| {
        AppError::Setup(SetupError::Head {
            task: task.name.clone(),
            source: e,
        })
    }
}

/// The prompt candidates' dev runs, for the stack's prompt block.
struct PromptRuns<'a> {
    cands: &'a [Candidate],
    /// Dev macro-F1 (None: failed).
    scores: &'a [Option<f64>],
    /// Dev label probabilities of each candidate (empty: failed).
    dev_probs: &'a [Vec<Vec<f64>>],
}

impl PromptRuns<'_> {
    /// The best prompt candidate whose examples are none of `train`'s texts (a prompt that
    /// shows a training text would score it too well, and the stack would over-trust it).
    fn block_source(&self, train: &[&str]) -> Option<usize> {
        let train: std::collections::HashSet<&str> = train.iter().copied().collect();
        let clean = |c: &Candidate| {
            c.task.examples.iter().all(|e| {
                e.get(crate::spec::TRUNCATED_FIELD)
                    .is_none_or(|t| !train.contains(t.as_str()))
            })
        };
        let scores: Vec<Option<f64>> = self
            .cands
            .iter()
            .zip(self.scores)
            .map(|(c, s)| s.filter(|_| clean(c)))
            .collect();
        pick_best(&scores)
    }
}

/// Fits the learned candidates (features extracted or read from the cache first; the best
/// clean prompt candidate run over the train texts for the stack's prompt block) and prints
/// one row each; returns them, the number of training examples, and the prompt candidate
/// the prompt block read.
fn learn(
    cfg: &TuneConfig,
    engine: Option<&mut Engine>,
    pool: &[Example],
    dev: &[Example],
    prompts: PromptRuns<'_>,
    out: &mut dyn Write,
) -> Result<(Vec<LearnedCandidate>, usize, Option<usize>), AppError> {
    let grid = &cfg.learn.grid;
    if grid.methods.is_empty() && !cfg.learn.encoder {
        return Ok((Vec::new(), 0, None));
    }
    let task = &cfg.templates[0];
    let (train, short) = per_class_upto(task, pool, cfg.learn.per_class)?;
    if !short.is_empty() {
        let list: Vec<String> = short.iter().map(|(l, n)| format!("{l} ({n})")).collect();
        writeln!(
            out,
            "note: {} of {} labels have fewer than {} train examples; using what there is: {}",
            short.len(),
            task.labels.len(),
            cfg.learn.per_class,
            list.join(", ")
        )
        .map_err(AppError::Output)?;
    }
    let labels: Vec<String> = task.labels.iter().map(|l| l.name.clone()).collect();
    let (tx, ty) = xy(task, &train);
    let (dx, dy) = xy(task, dev);
    let mut grid = grid.clone();
    let (ts, ds) = match engine.as_deref().filter(|_| grid.needs_features()) {
        Some(engine) => features(cfg, engine, &mut grid, (&tx, &dx))?,
        None => (Vec::new(), Vec::new()),
    };
    let grid = &grid;
    let block = match engine {
        Some(engine) if grid.methods.contains(&Method::Stack) || cfg.learn.encoder => {
            prompt_block(cfg, engine, &prompts, &train, &tx, out)?
        }
        _ => None,
    };
    let scores = block.as_ref().map(|(k, train_probs)| PromptScores {
        train: train_probs,
        dev: &prompts.dev_probs[*k],
        logprob_over: prompts.cands[*k].task.logprob_over,
    });
    let mut failed = None;
    let mut all = learned_candidates_with(
        &labels,
        Split {
            texts: &tx,
            states: &ts,
            y: &ty,
        },
        Split {
            texts: &dx,
            states: &ds,
            y: &dy,
        },
        scores,
        grid,
        |c| {
            if let Err(e) = row(out, &format!("{} ({} train)", c.label, tx.len()), &c.dev) {
                failed = Some(e);
            }
        },
    )
    .map_err(head_err(task))?;
    if let Some(e) = failed {
        return Err(e);
    }
    if cfg.learn.encoder {
        let train_split = Split {
            texts: &tx,
            states: &ts,
            y: &ty,
        };
        let dev_split = Split {
            texts: &dx,
            states: &ds,
            y: &dy,
        };
        let splits = (train_split, dev_split);
        let fitted = encoder_learn(cfg, grid, &labels, splits, scores, &all, out)?;
        all.extend(fitted);
    }
    Ok((all, train.len(), block.map(|(k, _)| k)))
}

/// The encoder candidates: the encoder beside the model embeds the train and dev texts,
/// then each candidate is fitted and printed as a row. `grid`: the one the model features
/// were taken with (its layers resolved).
fn encoder_learn(
    cfg: &TuneConfig,
    grid: &LearnGrid,
    labels: &[String],
    (train, dev): (Split<'_>, Split<'_>),
    scores: Option<PromptScores<'_>>,
    fitted: &[LearnedCandidate],
    out: &mut dyn Write,
) -> Result<Vec<LearnedCandidate>, AppError> {
    let task = &cfg.templates[0];
    let dir = crate::encoder::dir_beside(&cfg.engine.model_path);
    let enc = crate::encoder::shared(&dir)
        .map_err(|e| head_err(task)(HeadError::Train(format!("method encoder: {e}"))))?;
    let t0 = std::time::Instant::now();
    let embed = |texts: &[&str]| texts.iter().map(|t| enc.embed(t)).collect::<Vec<_>>();
    let (et, ed) = (embed(train.texts), embed(dev.texts));
    let n = train.texts.len() + dev.texts.len();
    let secs = t0.elapsed().as_secs_f64();
    writeln!(
        out,
        "encoder: {n} texts embedded in {secs:.1} s ({:.1} texts/s)",
        n as f64 / secs.max(1e-9)
    )
    .map_err(AppError::Output)?;
    let feature = stack_feature(grid, fitted);
    let mut failed = None;
    let all = encoder_candidates(
        labels,
        (train, dev),
        Embedded {
            sha256: &enc.sha256,
            train: &et,
            dev: &ed,
        },
        Some(&feature),
        scores,
        grid,
        |c| {
            if let Err(e) = row(
                out,
                &format!("{} ({} train)", c.label, train.texts.len()),
                &c.dev,
            ) {
                failed = Some(e);
            }
        },
    )
    .map_err(head_err(task))?;
    match failed {
        Some(e) => Err(e),
        None => Ok(all),
    }
}

/// A prompt candidate's index and its label probabilities of every train text.
type BlockSource = (usize, Vec<Vec<f64>>);

/// The prompt block's source: the best clean prompt candidate, run over the train texts
/// (None, with a note, when there is none or the train split is over the cap).
fn prompt_block(
    cfg: &TuneConfig,
    engine: &mut Engine,
    prompts: &PromptRuns<'_>,
    train: &[Example],
    tx: &[&str],
    out: &mut dyn Write,
) -> Result<Option<BlockSource>, AppError> {
    let Some(k) = prompts.block_source(tx) else {
        return Ok(None);
    };
    let c = &prompts.cands[k];
    if train.len() > cfg.learn.prompt_block_max_train {
        writeln!(
            out,
            "note: no prompt block in the stack: {} train texts are over its cap of {} (one prompt run each)",
            train.len(),
            cfg.learn.prompt_block_max_train
        )
        .map_err(AppError::Output)?;
        return Ok(None);
    }
    writeln!(
        out,
        "prompt block: {} (scoring {} train texts)",
        c.label,
        train.len()
    )
    .map_err(AppError::Output)?;
    let (_, probs) = eval::run_task_probs(
        engine,
        c.task.clone(),
        Some(c.calibrate),
        train,
        cfg.batch_size,
        true,
    )?;
    Ok(Some((k, probs)))
}

/// Pooled states of the train and dev texts, through the feature cache, at the union of
/// the grid's layer choices (resolved here, where the model's layer count is known).
fn features(
    cfg: &TuneConfig,
    engine: &Engine,
    grid: &mut LearnGrid,
    (tx, dx): (&[&str], &[&str]),
) -> Result<(Vec<PooledStates>, Vec<PooledStates>), AppError> {
    let err = head_err(&cfg.templates[0]);
    let mut fctx = engine
        .feature_context(cfg.learn.features)
        .map_err(|e| err(e.into()))?;
    grid.resolve_layers(fctx.n_layer());
    let spec = &grid.feature;
    let tok = FeatureTokenizer::new(engine, spec, fctx.max_tokens()).map_err(&err)?;
    let mut store = FeatureStore::open(cfg.learn.cache_dir.as_deref(), engine, spec, &tok);
    let ts = store
        .states(engine, &mut fctx, spec, tx, true, "train features")
        .map_err(&err)?;
    let ds = store
        .states(engine, &mut fctx, spec, dx, true, "dev features")
        .map_err(&err)?;
    Ok((ts, ds))
}

fn r4(x: f64) -> f64 {
    (x * 1e4).round() / 1e4
}

/// Writes a learned winner: its head file (method head) or stack file (stack, tfidf) beside
/// `cfg.out`, and the task file pointing at it.
fn write_learned(
    cfg: &TuneConfig,
    engine: Option<&Engine>,
    c: &LearnedCandidate,
    task0: &Task,
    n_train: usize,
    (dev_n, n_tried): (usize, usize),
) -> Result<(), AppError> {
    let stem = cfg
        .out
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| task0.name.clone());
    let per_class = per_class_name(cfg.learn.per_class);
    let mut measured = std::collections::BTreeMap::new();
    measured.insert("by".into(), "edgeact tune".into());
    measured.insert("candidate".into(), c.label.clone().into());
    measured.insert("data".into(), cfg.data.display().to_string().into());
    measured.insert("per_class".into(), per_class.clone().into());
    measured.insert("n_train".into(), n_train.into());
    measured.insert("dev_n".into(), dev_n.into());
    measured.insert("dev_accuracy".into(), r4(c.dev.accuracy).into());
    measured.insert("dev_macro_f1".into(), r4(c.dev.macro_f1).into());
    measured.insert("temperature".into(), c.model.model.temperature.into());
    let labels: Vec<String> = task0.labels.iter().map(|l| l.name.clone()).collect();
    let (sha, n_embd) = engine.map_or((String::new(), 0), |e| (e.info.sha256.clone(), e.n_embd()));
    let file_name = match (c.method, c.model.to_linear_head()) {
        (Method::Head, Some((feature, head))) => {
            let name = format!("{stem}.head.json");
            let f = HeadFile {
                version: 1,
                labels,
                feature,
                model_sha256: sha.clone(),
                n_embd,
                train: TrainParams {
                    alpha: c.model.lr.alpha,
                    ..TrainParams::default()
                },
                measured,
                head,
            };
            let path = sibling(&cfg.out, &name);
            f.save(&path).map_err(head_err(task0))?;
            // Read back with the checks `classify` applies: a winner that cannot run is an
            // error here, not at the first request.
            HeadFile::load(&path).map_err(head_err(task0))?;
            name
        }
        _ => {
            let name = format!("{stem}.stack.json");
            let model_sha = c.model.needs_features().map(|_| sha.clone());
            let mut f = StackFile::new(labels, model_sha, n_embd, c.model.clone());
            f.measured = measured;
            let path = sibling(&cfg.out, &name);
            f.save(&path).map_err(head_err(task0))?;
            StackFile::load(&path).map_err(head_err(task0))?;
            name
        }
    };
    let mut task = task0.clone();
    task.head = Some(HeadRef {
        file: PathBuf::from(&file_name),
        method: c.method,
    });
    let mut m = toml::Table::new();
    m.insert("by".into(), "edgeact tune".into());
    m.insert("candidate".into(), c.label.clone().into());
    m.insert("method".into(), c.method.name().into());
    m.insert("data".into(), cfg.data.display().to_string().into());
    m.insert("per_class".into(), per_class.into());
    m.insert("n_train".into(), (n_train as i64).into());
    m.insert("dev_split".into(), cfg.dev_split.clone().into());
    m.insert("dev_n".into(), (dev_n as i64).into());
    m.insert("dev_macro_f1".into(), r4(c.dev.macro_f1).into());
    m.insert("dev_accuracy".into(), r4(c.dev.accuracy).into());
    m.insert("temperature".into(), c.model.model.temperature.into());
    if !sha.is_empty() {
        m.insert("model_sha256".into(), sha.into());
    }
    m.insert("candidates_tried".into(), (n_tried as i64).into());
    task.measured = Some(m);
    task.train = Some(train_source(cfg));
    write_tuned(cfg, &task, n_tried)
}

/// The `[train]` table of a learned winner: the same rows again for `edgeact learn`. The
/// data path is made absolute, since the task file is usually written to another folder.
fn train_source(cfg: &TuneConfig) -> TrainSource {
    TrainSource::of_run(
        &cfg.data,
        &cfg.train_split,
        &cfg.dev_split,
        cfg.learn.per_class,
        cfg.limit,
    )
}

/// `name` in the folder of `path`.
fn sibling(path: &std::path::Path, name: &str) -> PathBuf {
    path.parent()
        .map(|d| d.join(name))
        .unwrap_or_else(|| PathBuf::from(name))
}
