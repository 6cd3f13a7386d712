//! The ReAct modes from a validated config: `react` (the loop, with sessions), `qa`
//! (retrieve then answer with a citation), and `react-eval` (the scenario file, with and
//! without the grammar, and the QA mode).

use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;

use serde_json::json;

use super::agent::{self, EngineGenerator, RunOptions, Trace, Turn};
use super::kb::Kb;
use super::qa;
use super::scenario::{self, LoopMetrics, Rate, Scenario};
use super::session;
use super::tools::Toolbox;
use super::ReactError;
use crate::model::config::EngineConfig;
use crate::model::Engine;
use crate::spec::react::ReactSpec;

#[derive(Debug, Clone)]
pub struct ReactConfig {
    pub engine: EngineConfig,
    pub spec: ReactSpec,
    pub questions: Vec<String>,
    /// Carry earlier turns of this session (and record this one).
    pub session: Option<String>,
    pub session_dir: PathBuf,
    pub grammar: bool,
    pub pretty: bool,
}

fn load_kb(spec: &ReactSpec) -> Result<Option<Arc<Kb>>, ReactError> {
    Ok(match &spec.kb {
        Some(k) => Some(Arc::new(Kb::load(&k.dir)?)),
        None => None,
    })
}

fn write_json(
    out: &mut dyn Write,
    v: &impl serde::Serialize,
    pretty: bool,
) -> Result<(), ReactError> {
    // Plain data structures: serializing cannot fail.
    let s = if pretty {
        serde_json::to_string_pretty(v).unwrap_or_default()
    } else {
        serde_json::to_string(v).unwrap_or_default()
    };
    writeln!(out, "{s}").map_err(ReactError::Output)
}

/// Each question through the loop: the answer on one line, then the trace as JSON.
pub fn react(cfg: ReactConfig, out: &mut dyn Write) -> Result<(), ReactError> {
    if cfg.questions.is_empty() {
        return Err(ReactError::Usage("give a question".into()));
    }
    let kb = load_kb(&cfg.spec)?;
    let mut engine = Engine::load(&cfg.engine, 1)?;
    let mut tools = Toolbox::new(&cfg.spec, kb);
    let (mut gen, source) = EngineGenerator::new(&mut engine, cfg.spec.temperature)
        .with_prefix(0, &agent::render_prefix(&cfg.spec))?;
    tracing::info!(?source, "task prefix ready");
    for q in &cfg.questions {
        let history = match &cfg.session {
            Some(id) => session::load(&cfg.session_dir, id)?,
            None => Vec::new(),
        };
        let trace = agent::run(
            &cfg.spec,
            q,
            &history,
            &mut gen,
            &mut tools,
            RunOptions {
                grammar: cfg.grammar,
            },
        )?;
        writeln!(out, "{}", trace.answer).map_err(ReactError::Output)?;
        write_json(out, &trace, cfg.pretty)?;
        if let Some(id) = &cfg.session {
            session::append(
                &cfg.session_dir,
                id,
                Turn {
                    question: q.clone(),
                    answer: trace.answer.clone(),
                },
            )?;
        }
    }
    Ok(())
}

/// Each question through retrieve-then-answer: the answer on one line, then the result.
pub fn qa(cfg: ReactConfig, out: &mut dyn Write) -> Result<(), ReactError> {
    let qa_spec = cfg.spec.qa.clone().ok_or_else(|| {
        ReactError::Usage(format!(
            "task {} has no [qa] section",
            cfg.spec.path.display()
        ))
    })?;
    if cfg.questions.is_empty() {
        return Err(ReactError::Usage("give a question".into()));
    }
    let Some(kb) = load_kb(&cfg.spec)? else {
        return Err(ReactError::Usage("qa needs a knowledge base".into()));
    };
    let mut engine = Engine::load(&cfg.engine, 1)?;
    let max_chars = cfg.spec.kb.as_ref().map_or(220, |k| k.max_passage_chars);
    let (mut gen, source) = EngineGenerator::new(&mut engine, cfg.spec.temperature)
        .with_prefix(0, &qa::render_prefix(&qa_spec, &kb, max_chars))?;
    tracing::info!(?source, "qa prefix ready");
    for q in &cfg.questions {
        let r = qa::answer(&cfg.spec, &qa_spec, &kb, q, &mut gen)?;
        match &r.cited {
            Some(id) => writeln!(out, "{} [{id}]", r.answer),
            None => writeln!(out, "{}", r.answer),
        }
        .map_err(ReactError::Output)?;
        write_json(out, &r, cfg.pretty)?;
    }
    Ok(())
}

#[derive(Debug, Clone)]
pub struct EvalConfig {
    pub engine: EngineConfig,
    pub spec: ReactSpec,
    pub scenarios: PathBuf,
    /// At most this many scenarios (evenly spaced).
    pub limit: usize,
    /// Run the loop without the grammar too (the regex baseline).
    pub baseline: bool,
    /// Run the `qa` mode too.
    pub qa: bool,
    /// Retrieval hit rate at these k.
    pub ks: Vec<usize>,
    /// Only the retrieval hit rates (no model is loaded).
    pub retrieval_only: bool,
    pub out_dir: PathBuf,
}

fn sample(scenarios: Vec<Scenario>, limit: usize) -> Vec<Scenario> {
    let n = scenarios.len();
    if limit >= n {
        return scenarios;
    }
    (0..limit)
        .map(|i| scenarios[i * n / limit].clone())
        .collect()
}

/// Runs every scenario through the loop (and the baseline, and QA) and prints the
/// metrics; writes `metrics.json` and `traces.jsonl` to the output folder.
pub fn eval(cfg: EvalConfig, out: &mut dyn Write) -> Result<(), ReactError> {
    let io = |e: std::io::Error| ReactError::Output(e);
    let Some(kb) = load_kb(&cfg.spec)? else {
        return Err(ReactError::Usage(
            "react-eval needs a task with a knowledge base".into(),
        ));
    };
    let scenarios = sample(scenario::load(&cfg.scenarios, Some(&kb))?, cfg.limit);
    std::fs::create_dir_all(&cfg.out_dir).map_err(io)?;
    let mut spec = cfg.spec.clone();
    // Hand-offs during an evaluation go to a file, not to staff; each scenario gets a
    // fresh toolbox, so the rate limit does not carry between scenarios.
    spec.notify.sink = cfg.out_dir.join("notify.jsonl").display().to_string();
    let mut traces_file = std::fs::File::create(cfg.out_dir.join("traces.jsonl")).map_err(io)?;
    writeln!(
        out,
        "{} scenarios from {}, task {}, seed {}",
        scenarios.len(),
        cfg.scenarios.display(),
        spec.name,
        spec.seed
    )
    .map_err(io)?;
    let mut retrieval = serde_json::Map::new();
    for &k in &cfg.ks {
        let (hits, n) = scenario::retrieval_hit_rate(&kb, &scenarios, k);
        let r = Rate { hits, n };
        writeln!(out, "retrieval hit rate@{k} (BM25 on the question): {r}").map_err(io)?;
        retrieval.insert(format!("hit_rate_at_{k}"), json!(r.value()));
    }
    if cfg.retrieval_only {
        return Ok(());
    }
    let mut engine = Engine::load(&cfg.engine, 1)?;
    let (mut gen, _) = EngineGenerator::new(&mut engine, spec.temperature)
        .with_prefix(0, &agent::render_prefix(&spec))?;
    let mut modes: Vec<(&str, bool)> = vec![("react_grammar", true)];
    if cfg.baseline {
        modes.push(("react_regex", false));
    }
    let mut results = serde_json::Map::new();
    for (mode, grammar) in modes {
        let mut traces: Vec<Trace> = Vec::new();
        for s in &scenarios {
            let mut tools = Toolbox::new(&spec, Some(kb.clone()));
            let t = agent::run(
                &spec,
                &s.question,
                &[],
                &mut gen,
                &mut tools,
                RunOptions { grammar },
            )?;
            writeln!(
                out,
                "  {mode} {:<5} {:<12} {:<12} steps {} unparsable {} {:>6.2} s  {}",
                s.id,
                t.first_tool().unwrap_or("-"),
                t.stop_reason.as_str(),
                t.steps.len(),
                t.unparsable_steps,
                t.total_ms / 1e3,
                super::tools::cut_chars(&t.answer, 70)
            )
            .map_err(io)?;
            let line = json!({"mode": mode, "scenario": s.id, "trace": t});
            writeln!(traces_file, "{line}").map_err(io)?;
            traces.push(t);
        }
        let pairs: Vec<(&Scenario, &Trace)> = scenarios.iter().zip(&traces).collect();
        let m = scenario::score(&pairs);
        print_metrics(out, mode, &m).map_err(io)?;
        results.insert(mode.to_string(), json!(m));
    }
    if cfg.qa {
        if let Some(qa_spec) = spec.qa.clone() {
            let mut cited = Rate::default();
            let mut fact = Rate::default();
            let mut ms = 0.0;
            let mut tokens = 0usize;
            for s in &scenarios {
                if s.expect_tool != "kb_search" {
                    continue;
                }
                let r = qa::answer(&spec, &qa_spec, &kb, &s.question, &mut gen)?;
                if let Some(p) = &s.expect_passage {
                    cited.add(r.cited.as_deref() == Some(p.as_str()));
                }
                if let Some(f) = &s.expect_fact {
                    fact.add(r.answer.to_lowercase().contains(&f.to_lowercase()));
                }
                ms += r.retrieve_ms + r.generate_ms;
                tokens += r.generated_tokens;
                let line = json!({"mode": "qa", "scenario": s.id, "result": r});
                writeln!(traces_file, "{line}").map_err(io)?;
            }
            let n = cited.n.max(fact.n).max(1) as f64;
            writeln!(
                out,
                "qa (kb_search scenarios): correct passage cited {cited}, fact in answer {fact}, mean {:.1} tokens, {:.2} s",
                tokens as f64 / n,
                ms / 1e3 / n
            )
            .map_err(io)?;
            results.insert(
                "qa".into(),
                json!({"passage_cited": cited, "fact_in_answer": fact,
                       "mean_generated_tokens": tokens as f64 / n, "mean_seconds": ms / 1e3 / n}),
            );
        }
    }
    let metrics = json!({
        "task": spec.name,
        "scenarios": cfg.scenarios,
        "n": scenarios.len(),
        "seed": spec.seed,
        "model_sha256": gen.engine.info.sha256,
        "board": gen.engine.info.board,
        "retrieval": retrieval,
        "modes": results,
    });
    std::fs::write(
        cfg.out_dir.join("metrics.json"),
        serde_json::to_string_pretty(&metrics).unwrap_or_default(),
    )
    .map_err(io)?;
    writeln!(
        out,
        "wrote {}/metrics.json and traces.jsonl",
        cfg.out_dir.display()
    )
    .map_err(io)?;
    Ok(())
}

fn print_metrics(out: &mut dyn Write, mode: &str, m: &LoopMetrics) -> std::io::Result<()> {
    writeln!(out, "{mode}:")?;
    writeln!(
        out,
        "  unparsable steps {} of {} ({} runs with one); refused tool calls {}",
        m.unparsable_steps, m.steps, m.runs_with_unparsable, m.refused_calls
    )?;
    writeln!(out, "  correct first tool      {}", m.tool_choice)?;
    writeln!(out, "  passage retrieved       {}", m.passage_retrieved)?;
    writeln!(out, "  passage cited in answer {}", m.passage_cited)?;
    writeln!(out, "  fact in answer          {}", m.fact_in_answer)?;
    writeln!(out, "  ended with final        {}", m.finished)?;
    let stops: Vec<String> = m
        .stop_reasons
        .iter()
        .map(|(k, v)| format!("{k} {v}"))
        .collect();
    writeln!(out, "  stop reasons            {}", stops.join(", "))?;
    writeln!(
        out,
        "  mean per answer         {:.2} steps, {:.1} generated tokens, {:.2} s",
        m.mean_steps, m.mean_generated_tokens, m.mean_seconds
    )
}
