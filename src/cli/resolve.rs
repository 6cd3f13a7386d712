//! From the raw command line to a validated [`cmd::Command`]: tasks found and loaded, the
//! board profile merged with the flags, defaults applied. Every check a flag can fail
//! happens here, before any model is loaded, in the order the flags' files are needed
//! (so the first error a user sees does not depend on this refactor). `serve`'s own,
//! longer resolution is [`super::serve`].

use std::io::IsTerminal;
use std::path::{Path, PathBuf};

use super::args::*;
use super::defaults;
use crate::classify::features::{parse_layers, FeatureSpec, Pooling};
use crate::classify::ScorePath;
use crate::cmd::quantize::QuantizeConfig;
use crate::cmd::{self, AppError, ClassifyConfig, Inputs};
use crate::eval::learn::default_cache_dir;
use crate::eval::select::LearnGrid;
use crate::eval::tune::DemoGrid;
use crate::model::budget::KvCacheType;
use crate::model::config::{self, BoardFile, ConfigError, EngineConfig};
use crate::model::scoring::{AbstainRule, LogprobOver};
use crate::model::FeatureParams;
use crate::rank::RankConfig;
use crate::react::session::Sessions;
use crate::react::ReactError;
use crate::spec::react::ReactSpec;
use crate::spec::{DemoSimilarity, Method, Task};
use crate::util::invalid::Invalid;

/// The command with its validated config.
pub fn command(c: Command) -> Result<cmd::Command, AppError> {
    Ok(match c {
        Command::Classify(a) => cmd::Command::Classify(classify(a)?),
        Command::Plan(a) => {
            let (engine, n_tasks) = super::serve::plan_config(a)?;
            cmd::Command::Plan(engine, n_tasks)
        }
        Command::Quantize(a) => cmd::Command::Quantize(quantize(a)?),
        Command::Serve(a) => cmd::Command::Serve(Box::new(super::serve::config(*a)?)),
        Command::Eval(a) => cmd::Command::Eval(eval(a)?),
        Command::Tune(a) if a.head.head => cmd::Command::TuneHead(tune_head(a)?),
        Command::Tune(a) => cmd::Command::Tune(tune(a)?),
        Command::Learn(a) => cmd::Command::Learn(learn(a)?),
        Command::Bench(a) => cmd::Command::Bench(bench(a)?),
        Command::BenchAccuracy(a) => cmd::Command::BenchAccuracy(bench_accuracy(a)?),
        Command::React(a) => cmd::Command::React(a.config()?),
        Command::Qa(a) => cmd::Command::Qa(a.config()?),
        Command::ReactEval(a) => cmd::Command::ReactEval(react_eval(a)?),
        Command::Monitor(a) => cmd::Command::Monitor(monitor(a)?),
        Command::Rank(a) => cmd::Command::Rank(rank(a)?),
        Command::RankEval(a) => cmd::Command::RankEval(rank_eval(a)?),
        Command::RankLearn(a) => cmd::Command::RankLearn(rank_learn(a)?),
    })
}

fn quantize(a: QuantizeArgs) -> Result<QuantizeConfig, AppError> {
    let engine = a.board.engine_config()?;
    let ty =
        a.ty.parse()
            .map_err(|reason| invalid(command_line(), "--type", reason))?;
    Ok(QuantizeConfig {
        input: engine.model_path,
        output: a.out,
        ty,
        threads: engine.threads,
    })
}

/// A configuration error of the command line (or of a file the flags name).
pub(super) fn invalid(path: &Path, key: &str, reason: String) -> AppError {
    AppError::Config(ConfigError::Invalid(Invalid::new(path, key, reason)))
}

fn command_line() -> &'static Path {
    Path::new("command line")
}

/// A classification (or ranking) task by name or path.
pub(super) fn find_task(name: &str) -> Result<Task, AppError> {
    Ok(Task::find(name, &config::task_dirs())?)
}

fn find_react_task(name: &str) -> Result<ReactSpec, AppError> {
    Ok(ReactSpec::find(name, &config::task_dirs()).map_err(ReactError::from)?)
}

/// `$EDGEACT_STATE_DIR`, else `./state`.
pub(super) fn state_dir() -> PathBuf {
    std::env::var_os("EDGEACT_STATE_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(defaults::STATE_DIR))
}

impl BoardArgs {
    fn overrides(&self) -> BoardFile {
        BoardFile {
            model_path: self.model.clone(),
            // A model given on the command line is checked only against a sha given with it.
            model_sha256: self.model_sha256.clone(),
            threads: self.threads,
            threads_batch: self.threads,
            memory_budget_mib: self.memory_budget_mib,
            n_ctx: self.n_ctx,
            allow_ctx_shrink: self.allow_ctx_shrink.then_some(true),
            kv_cache_type: self.kv_cache_type.as_deref().map(|s| match s {
                "q8_0" => KvCacheType::Q8_0,
                _ => KvCacheType::F16,
            }),
            gpu_layers: self.gpu_layers,
            ..Default::default()
        }
    }

    /// The board profile with the flags over it.
    pub fn engine_config(&self) -> Result<EngineConfig, AppError> {
        let mut cfg = config::load_board(&self.board, &config::board_dirs(), &self.overrides())?;
        if self.model.is_some() && self.model_sha256.is_none() {
            cfg.model_sha256 = None;
        }
        if self.no_prefix_cache {
            cfg.prefix_cache_dir = None;
        } else if cfg.prefix_cache_dir.is_none() {
            let cache = std::env::var_os("EDGEACT_CACHE")
                .map(PathBuf::from)
                .or_else(|| {
                    std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/edgeact"))
                });
            cfg.prefix_cache_dir = cache.map(|c| c.join("prefix"));
        }
        Ok(cfg)
    }
}

impl CalibrateArgs {
    /// None: as the task file says.
    pub fn choice(&self) -> Option<bool> {
        match (self.calibrate, self.no_calibrate) {
            (true, _) => Some(true),
            (_, true) => Some(false),
            _ => None,
        }
    }
}

fn classify(a: ClassifyArgs) -> Result<ClassifyConfig, AppError> {
    let engine = a.board.engine_config()?;
    let mut task = find_task(&a.task)?;
    match a.logprob_over.as_deref() {
        Some("vocab") => task.logprob_over = LogprobOver::Vocab,
        Some("labels") => task.logprob_over = LogprobOver::Labels,
        _ => {}
    }
    let inputs = match (&a.input, a.texts.is_empty()) {
        (Some(p), _) if p.as_os_str() == "-" => Inputs::Stdin,
        (Some(p), _) => Inputs::File(p.clone()),
        (None, false) => Inputs::Texts(a.texts.clone()),
        (None, true) if !std::io::stdin().is_terminal() => Inputs::Stdin,
        (None, true) => return Err(AppError::NoTexts),
    };
    let abstain = (a.min_confidence.is_some() || a.min_margin.is_some()).then(|| AbstainRule {
        min_confidence: a.min_confidence.unwrap_or(task.abstain.min_confidence),
        min_margin: a.min_margin.unwrap_or(task.abstain.min_margin),
    });
    Ok(ClassifyConfig {
        engine,
        task,
        inputs,
        calibrate: a.calibration.choice(),
        abstain,
        path: if a.naive {
            ScorePath::Naive
        } else {
            ScorePath::Fast
        },
        batch_size: a.batch_size,
        pretty: a.pretty,
        method: a.method.as_deref().and_then(crate::spec::Method::parse),
    })
}

fn eval(a: EvalArgs) -> Result<cmd::eval::EvalConfig, AppError> {
    let mut tasks = vec![find_task(&a.task)?];
    for t in &a.templates {
        tasks.push(find_task(t)?);
    }
    Ok(cmd::eval::EvalConfig {
        engine: a.board.engine_config()?,
        out: a
            .out
            .unwrap_or_else(|| PathBuf::from(format!("out/eval-{}", tasks[0].name))),
        tasks,
        data: a.data,
        split: a.split,
        limit: a.limit,
        shots: a.shots,
        shots_split: a.shots_split,
        calibrate: a.calibration.choice(),
        batch_size: a.batch_size,
    })
}

/// `tune`'s methods when the user names none: the encoder's stacks join when the encoder
/// is there to run them (fetched beside the model), so a task tuned without it never needs it.
fn default_methods(encoder_fetched: bool) -> Vec<String> {
    let mut m: Vec<String> = defaults::tune::METHODS
        .split(',')
        .map(str::to_string)
        .collect();
    if encoder_fetched {
        m.push("encoder".into());
    }
    m
}

fn tune(a: TuneArgs) -> Result<cmd::tune::TuneConfig, AppError> {
    let mut templates = Vec::new();
    for t in &a.task {
        templates.push(find_task(t)?);
    }
    let engine = a.board.engine_config()?;
    let mut prompt_candidates = false;
    let mut methods = Vec::new();
    let mut encoder = false;
    let listed = a.methods.clone().unwrap_or_else(|| {
        default_methods(crate::encoder::dir_beside(&engine.model_path).is_dir())
    });
    for m in &listed {
        match m.trim() {
            "prompt" => prompt_candidates = true,
            "encoder" => encoder = true,
            "tfidf" => methods.push(Method::Tfidf),
            "head" => methods.push(Method::Head),
            "stack" => methods.push(Method::Stack),
            other => {
                return Err(invalid(
                    command_line(),
                    "methods",
                    format!("`{other}` is not prompt, tfidf, head, stack or encoder"),
                ))
            }
        }
    }
    let encoder_dir = crate::encoder::dir_beside(&engine.model_path);
    if encoder && !encoder_dir.is_dir() {
        // Said now, not after the other candidates have run.
        return Err(invalid(
            command_line(),
            "methods",
            format!(
                "`encoder` needs the sentence encoder in {} (fetch it with `scripts/fetch-model --encoder`)",
                encoder_dir.display()
            ),
        ));
    }
    let demos = demo_grid(&a, prompt_candidates)?;
    let learn = cmd::tune::LearnConfig {
        grid: LearnGrid {
            methods,
            feature: FeatureSpec {
                prompt: a.head.feature_prompt.clone(),
                pooling: Pooling::Last,
                max_text_tokens: a.head.max_text_tokens,
                layers: a.head.layers()?,
            },
            poolings: a.head.poolings()?,
            layer_choices: a.head.layer_choices()?,
            final_layer: 0,
            alphas: a.head.alpha.clone(),
            stack_weights: defaults::tune::STACK_WEIGHTS.to_vec(),
            max_iterations: defaults::tune::LEARN_MAX_ITERATIONS,
        },
        per_class: a.head.per_class()?,
        features: FeatureParams {
            n_batch_tokens: a.head.feature_batch,
            ..FeatureParams::for_config(&engine)
        },
        cache_dir: feature_cache(a.head.no_feature_cache),
        prompt_block_max_train: defaults::tune::STACK_PROMPT_MAX_TRAIN,
        encoder,
    };
    Ok(cmd::tune::TuneConfig {
        prompt_candidates,
        demos,
        learn,
        engine,
        out: a
            .out
            .unwrap_or_else(|| PathBuf::from(format!("tasks/{}-tuned.toml", templates[0].name))),
        templates,
        shots: a.shots,
        data: a.data,
        train_split: a.train_split,
        dev_split: a.dev_split,
        limit: a.limit,
        batch_size: a.batch_size,
    })
}

/// `tune --demos`: the retrieved-demonstration candidates (only with the prompt ones).
fn demo_grid(a: &TuneArgs, prompt: bool) -> Result<DemoGrid, AppError> {
    // Off unless asked for: measured on dev they won nowhere and cost 6-19x the tokens a
    // request decodes (docs/accuracy.md), so they would only make every tune slower.
    let listed = a.demos.clone().unwrap_or_else(|| vec!["none".to_string()]);
    let mut by = Vec::new();
    for d in &listed {
        match d.trim() {
            "none" => {}
            s => by.push(DemoSimilarity::parse(s).ok_or_else(|| {
                invalid(
                    command_line(),
                    "demos",
                    format!("`{s}` is not tfidf, encoder or none"),
                )
            })?),
        }
    }
    Ok(DemoGrid {
        by: if prompt { by } else { Vec::new() },
        pool_per_label: a
            .head
            .per_class()?
            .min(defaults::tune::DEMO_POOL_MAX_PER_LABEL),
    })
}

impl HeadArgs {
    /// `--per-class`: a count, or `all` (usize::MAX).
    fn per_class(&self) -> Result<usize, AppError> {
        match self.per_class.trim() {
            "all" => Ok(usize::MAX),
            n => n.parse::<usize>().ok().filter(|&k| k > 0).ok_or_else(|| {
                invalid(
                    command_line(),
                    "per-class",
                    format!("`{n}` is not a positive count or `all`"),
                )
            }),
        }
    }

    /// The layer choices (`;`-separated), each `final` or comma-separated indices.
    fn layer_choices(&self) -> Result<Vec<Vec<u32>>, AppError> {
        self.layers
            .split(';')
            .map(|c| {
                parse_layers(c).ok_or_else(|| {
                    invalid(
                        command_line(),
                        "layers",
                        format!("`{c}` is not `final` or comma-separated layer indices"),
                    )
                })
            })
            .collect()
    }

    /// The first layer choice (`tune --head` fits one).
    fn layers(&self) -> Result<Vec<u32>, AppError> {
        Ok(self.layer_choices()?.swap_remove(0))
    }

    fn poolings(&self) -> Result<Vec<Pooling>, AppError> {
        self.pooling
            .iter()
            .map(|p| {
                Pooling::parse(p.trim()).ok_or_else(|| {
                    invalid(
                        command_line(),
                        "pooling",
                        format!("`{p}` is not last, mean or last+mean"),
                    )
                })
            })
            .collect()
    }
}

fn learn(a: LearnArgs) -> Result<cmd::learn::LearnRunConfig, AppError> {
    let task = find_task(&a.task)?;
    let engine = a.board.engine_config()?;
    Ok(cmd::learn::LearnRunConfig {
        features: FeatureParams {
            n_batch_tokens: a.feature_batch,
            ..FeatureParams::for_config(&engine)
        },
        engine,
        task,
        feedback: a.feedback,
        state_dir: a.state_dir.unwrap_or_else(state_dir),
        cache_dir: feature_cache(a.no_feature_cache),
        max_text_bytes: defaults::learn::MAX_TEXT_BYTES,
        progress: std::io::stderr().is_terminal(),
    })
}

fn feature_cache(off: bool) -> Option<PathBuf> {
    if off {
        None
    } else {
        default_cache_dir()
    }
}

fn tune_head(a: TuneArgs) -> Result<cmd::tune_head::TuneHeadConfig, AppError> {
    let task = find_task(&a.task[0])?;
    let engine = a.board.engine_config()?;
    Ok(cmd::tune_head::TuneHeadConfig {
        out: a
            .out
            .unwrap_or_else(|| PathBuf::from(format!("tasks/{}-head.toml", task.name))),
        task,
        data: a.data,
        train_split: a.train_split,
        dev_split: a.dev_split,
        per_class: a.head.per_class()?,
        limit: a.limit,
        prompt: a.head.feature_prompt.clone(),
        layers: a.head.layers()?,
        poolings: a.head.poolings()?,
        alphas: a.head.alpha.clone(),
        max_text_tokens: a.head.max_text_tokens,
        features: FeatureParams {
            n_batch_tokens: a.head.feature_batch,
            ..FeatureParams::for_config(&engine)
        },
        cache_dir: feature_cache(a.head.no_feature_cache),
        engine,
    })
}

fn bench(a: BenchArgs) -> Result<cmd::bench::BenchConfig, AppError> {
    Ok(cmd::bench::BenchConfig {
        engine: a.board.engine_config()?,
        task: find_task(&a.task)?,
        data: a.data,
        limit: a.limit,
        batch_sizes: a.batch_size,
        naive_limit: a.naive_limit.unwrap_or(a.limit),
        rounds: a.rounds.max(1),
    })
}

fn bench_accuracy(a: BenchAccuracyArgs) -> Result<cmd::bench_accuracy::FiguresConfig, AppError> {
    use cmd::bench_accuracy::{default_feature, FiguresConfig, Row};
    let engine = a.board.engine_config()?;
    let bad = |key: &str, v: &str| {
        invalid(
            command_line(),
            key,
            format!("`{v}` is not one of the choices (see --help)"),
        )
    };
    let pooling = Pooling::parse(&a.pooling).ok_or_else(|| bad("pooling", &a.pooling))?;
    let mut rows = Vec::new();
    for r in &a.rows {
        rows.push(Row::parse(r.trim()).ok_or_else(|| bad("rows", r))?);
    }
    Ok(FiguresConfig {
        task: find_task(&a.task)?,
        data: a.data,
        train_split: defaults::tune::TRAIN_SPLIT.into(),
        dev_split: defaults::tune::DEV_SPLIT.into(),
        test_split: defaults::bench_accuracy::TEST_SPLIT.into(),
        limit: a.limit,
        dev_limit: a.dev_limit,
        shots: a.shots,
        head_k: a.head_k,
        feature: default_feature(pooling, a.max_text_tokens),
        alpha: a.alpha,
        features: FeatureParams {
            n_batch_tokens: a.feature_batch,
            ..FeatureParams::for_config(&engine)
        },
        cache_dir: feature_cache(a.no_feature_cache),
        batch_size: a.batch_size,
        rows,
        engine,
    })
}

impl ReactArgs {
    /// The `react` / `qa` config: the task with the flags' seed and time limit over it.
    pub fn config(&self) -> Result<cmd::react::ReactConfig, AppError> {
        let mut spec = find_react_task(&self.task)?;
        if let Some(s) = self.seed {
            spec.seed = s;
        }
        if let Some(t) = self.timeout_ms {
            spec.timeout_ms = t;
        }
        Ok(cmd::react::ReactConfig {
            engine: self.board.engine_config()?,
            spec,
            questions: self.questions.clone(),
            session: self.session.clone(),
            sessions: Sessions::new(
                self.session_dir
                    .clone()
                    .unwrap_or_else(|| state_dir().join("sessions")),
                defaults::session_limits(false),
            ),
            grammar: !self.no_grammar,
            generate: self.generate,
            pretty: self.pretty,
        })
    }
}

fn react_eval(a: ReactEvalArgs) -> Result<cmd::react_eval::ReactEvalConfig, AppError> {
    let mut spec = find_react_task(&a.task)?;
    if let Some(s) = a.seed {
        spec.seed = s;
    }
    if let Some(t) = a.timeout_ms {
        spec.timeout_ms = t;
    }
    Ok(cmd::react_eval::ReactEvalConfig {
        engine: a.board.engine_config()?,
        out_dir: a
            .out
            .unwrap_or_else(|| PathBuf::from(format!("out/react-eval-{}", spec.name))),
        spec,
        scenarios: a.scenarios,
        limit: a.limit,
        baseline: a.baseline,
        qa: a.qa,
        qa_only: a.qa_only,
        bench: a.bench,
        ks: a.k,
        retrieval_only: a.retrieval_only,
    })
}

/// The task's validated `[monitor]` section; a task without one is a usage error.
fn monitor(a: MonitorArgs) -> Result<cmd::monitor::ReplayConfig, AppError> {
    let task = find_task(&a.task)?;
    let Some(monitor) = crate::monitor::MonitorConfig::from_task(&task)? else {
        return Err(invalid(
            &task.path,
            "monitor",
            "the task has no [monitor] section".into(),
        ));
    };
    let labels = match a.label_field {
        Some(f) => cmd::monitor::Labels::Field(f),
        None => cmd::monitor::Labels::Model(a.board.engine_config()?),
    };
    Ok(cmd::monitor::ReplayConfig {
        task,
        monitor,
        data: a.data,
        labels,
        state: a.state,
        batch_size: a.batch_size,
    })
}

/// The task's validated `[rank]` section; a task without one is a usage error.
fn rank_section(task: &Task) -> Result<RankConfig, AppError> {
    RankConfig::from_task(task)?
        .ok_or_else(|| invalid(&task.path, "rank", "the task has no [rank] section".into()))
}

fn rank(a: RankArgs) -> Result<cmd::rank::RankRunConfig, AppError> {
    let task = find_task(&a.task)?;
    let rank = rank_section(&task)?;
    let profile = std::fs::read_to_string(&a.profile).map_err(|source| AppError::Input {
        what: a.profile.display().to_string(),
        source,
    })?;
    Ok(cmd::rank::RankRunConfig {
        engine: a.board.engine_config()?,
        task,
        rank,
        profile,
        items: a.items,
        top_k: a.top_k,
        min_score: a.min_score,
        calibrate: a.calibration.choice(),
        batch_size: a.batch_size,
    })
}

fn rank_eval(a: RankEvalArgs) -> Result<cmd::rank_eval::RankEvalConfig, AppError> {
    let task = find_task(&a.task)?;
    let rank = rank_section(&task)?;
    Ok(cmd::rank_eval::RankEvalConfig {
        engine: a.board.engine_config()?,
        task,
        rank,
        data: a.data,
        families: a.families,
        split: a.split,
        relevant: a.relevant,
        candidates: a.candidates,
        k: a.k,
        seed: a.seed,
        random_runs: a.random_runs,
        draws: a.draws,
        no_model: a.no_model,
        calibrate: a.calibration.choice(),
        batch_size: a.batch_size,
        out: a.out,
        feedback_out: a.feedback_out,
    })
}

fn rank_learn(a: RankLearnArgs) -> Result<cmd::rank_learn::RankLearnConfig, AppError> {
    let task = find_task(&a.task)?;
    let rank = rank_section(&task)?;
    Ok(cmd::rank_learn::RankLearnConfig {
        engine: match a.no_model {
            true => None,
            false => Some(a.board.engine_config()?),
        },
        out: a.out.unwrap_or_else(|| task.path.clone()),
        task,
        rank,
        feedback: a.feedback,
        dev: a.dev,
        corpus: a.corpus,
        k: a.k,
        dry_run: a.dry_run,
        calibrate: a.calibration.choice(),
        batch_size: a.batch_size,
    })
}

#[cfg(test)]
mod tests {
    use super::default_methods;

    /// `classify --logprob-over` overrides the task file's key; without it the task's
    /// default (over the labels) stays.
    #[test]
    fn classify_logprob_over_flag_overrides_the_task() {
        use clap::Parser;
        let over = |extra: &[&str]| {
            let mut argv = vec!["edgeact", "classify"];
            argv.extend_from_slice(extra);
            argv.push("a text");
            let cli = super::Cli::try_parse_from(argv).unwrap();
            let super::Command::Classify(a) = cli.command else {
                panic!("not classify")
            };
            super::classify(a).unwrap().task.logprob_over
        };
        use crate::model::scoring::LogprobOver;
        assert_eq!(over(&[]), LogprobOver::Labels);
        assert_eq!(over(&["--logprob-over", "vocab"]), LogprobOver::Vocab);
        assert_eq!(over(&["--logprob-over", "labels"]), LogprobOver::Labels);
        assert!(
            super::Cli::try_parse_from(["edgeact", "classify", "--logprob-over", "x", "t"])
                .is_err()
        );
    }

    #[test]
    fn the_encoder_joins_tunes_default_methods_only_when_fetched() {
        assert_eq!(default_methods(false), ["prompt", "tfidf", "head", "stack"]);
        assert_eq!(
            default_methods(true),
            ["prompt", "tfidf", "head", "stack", "encoder"]
        );
    }
}
