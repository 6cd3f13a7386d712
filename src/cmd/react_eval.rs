//! `edgeact react-eval`: the scenario file through the scored policy (and, with
//! `--baseline`, the generated grammar loop and the no-grammar loop; with `--qa`, the qa
//! mode): retrieval hit rate@k, tool choice, citations, grounding faults, unparsable steps,
//! tokens and seconds; `metrics.json` and `traces.jsonl` in the output folder.
//! The weights are the task file's `[policy]` section (a copy of the task file with
//! another `[policy]` is how they are compared on a dev scenario file).

use std::io::Write;
use std::path::PathBuf;

use serde_json::json;

use super::react::load_kb;
use crate::model::config::EngineConfig;
use crate::model::Engine;
use crate::react::agent::{self, RunOptions};
use crate::react::generator::EngineGenerator;
use crate::react::kb::Kb;
use crate::react::policy::{self, PolicyConfig};
use crate::react::qa;
use crate::react::scenario::{self, LoopMetrics, Rate, Scenario};
use crate::react::tools::{self, Toolbox};
use crate::react::trace::Trace;
use crate::react::ReactError;
use crate::spec::react::ReactSpec;

/// Settings of `edgeact react-eval`.
#[derive(Debug, Clone)]
pub struct ReactEvalConfig {
    pub engine: EngineConfig,
    pub spec: ReactSpec,
    pub scenarios: PathBuf,
    /// At most this many scenarios (evenly spaced).
    pub limit: usize,
    /// Run the loop without the grammar too (the regex baseline).
    pub baseline: bool,
    /// Run the `qa` mode too.
    pub qa: bool,
    /// Only the `qa` mode (no loop): grounded selection alone, quick on a dev set.
    pub qa_only: bool,
    /// The latency benchmark: only the scored policy on the `kb_search` scenarios (one
    /// kiosk answer end to end: choose the tool, retrieve, select, cite), p50/p99 seconds
    /// and generated tokens per answer.
    pub bench: bool,
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

fn io(e: std::io::Error) -> ReactError {
    ReactError::Output(e)
}

/// Runs every scenario through the loop (and the baseline, and QA) and prints the
/// metrics; writes `metrics.json` and `traces.jsonl` to the output folder.
pub fn run(cfg: ReactEvalConfig, out: &mut dyn Write) -> Result<(), ReactError> {
    let Some(kb) = load_kb(&cfg.spec, &cfg.engine.model_path)? else {
        return Err(ReactError::Usage(
            "react-eval needs a task with a knowledge base".into(),
        ));
    };
    let mut scenarios = scenario::load(&cfg.scenarios, Some(&kb))?;
    if cfg.bench {
        scenarios.retain(|s| s.expect_tool == "kb_search");
    }
    let scenarios = sample(scenarios, cfg.limit);
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
    let mut modes: Vec<(&str, Mode)> = Vec::new();
    if !cfg.qa_only {
        modes.push(("react_scored", Mode::Scored));
    }
    if cfg.baseline && !cfg.qa_only && !cfg.bench {
        modes.push(("react_grammar", Mode::Generated { grammar: true }));
        modes.push(("react_regex", Mode::Generated { grammar: false }));
    }
    let policy = spec.policy.clone();
    writeln!(out, "policy {}", json!(policy)).map_err(io)?;
    let ctx = Ctx {
        spec: &spec,
        kb: &kb,
        scenarios: &scenarios,
        policy,
    };
    let mut results = serde_json::Map::new();
    for (name, mode) in modes {
        let m = loop_mode(&ctx, &mut gen, name, mode, out, &mut traces_file)?;
        if cfg.bench {
            writeln!(
                out,
                "benchmark: {} kiosk answers (choose the tool, retrieve, select, cite), board {}, {} threads: p50 {:.3} s, p99 {:.3} s, mean {:.3} s, {:.2} generated tokens per answer; load average {}",
                m.runs,
                cfg.engine.board,
                cfg.engine.threads,
                m.p50_seconds,
                m.p99_seconds,
                m.mean_seconds,
                m.mean_generated_tokens,
                load_average()
            )
            .map_err(io)?;
        }
        results.insert(name.to_string(), json!(m));
    }
    if (cfg.qa || cfg.qa_only) && !cfg.bench {
        if let Some(qa_spec) = spec.qa.clone() {
            let m = qa_mode(&ctx, &qa_spec, &mut gen, false, out, &mut traces_file)?;
            results.insert("qa".into(), m);
            if cfg.baseline {
                let m = qa_mode(&ctx, &qa_spec, &mut gen, true, out, &mut traces_file)?;
                results.insert("qa_generated".into(), m);
            }
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

/// The 1, 5 and 15 minute load averages (`/proc/loadavg`), or `unknown`: speed figures
/// are only comparable with the load they were taken under.
fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|| "unknown".into())
}

/// How a mode answers.
#[derive(Debug, Clone, Copy)]
enum Mode {
    Scored,
    Generated { grammar: bool },
}

/// What every mode runs over.
struct Ctx<'a> {
    spec: &'a ReactSpec,
    kb: &'a std::sync::Arc<Kb>,
    scenarios: &'a [Scenario],
    policy: PolicyConfig,
}

/// Every scenario through the loop (with or without the grammar): one line each, the
/// traces appended to `traces_file`, the metrics printed and returned.
fn loop_mode(
    ctx: &Ctx,
    gen: &mut EngineGenerator,
    mode: &str,
    how: Mode,
    out: &mut dyn Write,
    traces_file: &mut std::fs::File,
) -> Result<LoopMetrics, ReactError> {
    let mut traces: Vec<Trace> = Vec::new();
    for s in ctx.scenarios {
        let mut tools = Toolbox::new(ctx.spec, Some(ctx.kb.clone()));
        let t = match how {
            Mode::Scored => {
                let kb: &Kb = ctx.kb;
                policy::run(
                    ctx.spec,
                    Some(kb),
                    &s.question,
                    &[],
                    gen,
                    &mut tools,
                    &ctx.policy,
                )?
            }
            Mode::Generated { grammar } => agent::run(
                ctx.spec,
                &s.question,
                &[],
                gen,
                &mut tools,
                RunOptions { grammar },
            )?,
        };
        writeln!(
            out,
            "  {mode} {:<5} {:<12} {:<12} steps {} unparsable {} {:>6.2} s  {}",
            s.id,
            t.first_tool().unwrap_or("-"),
            t.stop_reason.as_str(),
            t.steps.len(),
            t.unparsable_steps,
            t.total_ms / 1e3,
            tools::cut_chars(&t.answer, 70)
        )
        .map_err(io)?;
        let line = json!({"mode": mode, "scenario": s.id, "trace": t});
        writeln!(traces_file, "{line}").map_err(io)?;
        traces.push(t);
    }
    let pairs: Vec<(&Scenario, &Trace)> = ctx.scenarios.iter().zip(&traces).collect();
    let m = scenario::score(&pairs, Some(ctx.kb));
    print_metrics(out, mode, &m).map_err(io)?;
    Ok(m)
}

/// The kb_search scenarios through retrieve-then-answer: passage cited, fact in answer.
fn qa_mode(
    ctx: &Ctx,
    qa_spec: &crate::spec::react::QaSpec,
    gen: &mut EngineGenerator,
    generated: bool,
    out: &mut dyn Write,
    traces_file: &mut std::fs::File,
) -> Result<serde_json::Value, ReactError> {
    let mut cited = Rate::default();
    let mut fact = Rate::default();
    let mut ms = 0.0;
    let mut tokens = 0usize;
    let mut not_retrieved = 0usize;
    let mut ungrounded = 0usize;
    let (mut refused_unanswerable, mut refused_answerable) = (Rate::default(), Rate::default());
    let mode = if generated { "qa_generated" } else { "qa" };
    for s in ctx.scenarios {
        if s.expect_tool != "kb_search" {
            continue;
        }
        let r = if generated {
            qa::answer_generated(ctx.spec, qa_spec, ctx.kb, &s.question, gen)?
        } else {
            qa::answer(
                ctx.spec,
                qa_spec,
                ctx.kb,
                &s.question,
                None,
                gen,
                &ctx.policy.ground,
            )?
        };
        if let Some(c) = &r.cited {
            match ctx.kb.get(c) {
                Some(p) if r.passages.iter().any(|x| &x.id == c) => {
                    ungrounded +=
                        crate::react::ground::ungrounded_numbers(&r.answer, &p.text).len();
                }
                _ => not_retrieved += 1,
            }
        }
        if let Some(p) = &s.expect_passage {
            cited.add(r.cited.as_deref() == Some(p.as_str()));
            refused_answerable.add(r.cited.is_none());
        } else {
            refused_unanswerable.add(r.cited.is_none());
        }
        if let Some(f) = &s.expect_fact {
            fact.add(r.answer.to_lowercase().contains(&f.to_lowercase()));
        }
        ms += r.retrieve_ms + r.generate_ms;
        tokens += r.generated_tokens;
        let line = json!({"mode": mode, "scenario": s.id, "result": r});
        writeln!(traces_file, "{line}").map_err(io)?;
    }
    let n = cited.n.max(fact.n).max(1) as f64;
    writeln!(
        out,
        "{mode} (kb_search scenarios): correct passage cited {cited}, fact in answer {fact}, not found: unanswerable {refused_unanswerable}, answerable {refused_answerable}; cited not retrieved {not_retrieved}, ungrounded numbers {ungrounded}, mean {:.1} tokens, {:.2} s",
        tokens as f64 / n,
        ms / 1e3 / n
    )
    .map_err(io)?;
    Ok(json!({"passage_cited": cited, "fact_in_answer": fact,
              "refused_unanswerable": refused_unanswerable, "refused_answerable": refused_answerable,
              "cited_not_retrieved": not_retrieved, "ungrounded_numbers": ungrounded,
              "mean_generated_tokens": tokens as f64 / n, "mean_seconds": ms / 1e3 / n}))
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
    writeln!(
        out,
        "  not found: unanswerable {}, answerable {}",
        m.refused_unanswerable, m.refused_answerable
    )?;
    writeln!(out, "  ended with final        {}", m.finished)?;
    writeln!(
        out,
        "  cited not retrieved     {}; numbers absent from the cited passage {}",
        m.cited_not_retrieved, m.ungrounded_numbers
    )?;
    let stops: Vec<String> = m
        .stop_reasons
        .iter()
        .map(|(k, v)| format!("{k} {v}"))
        .collect();
    writeln!(out, "  stop reasons            {}", stops.join(", "))?;
    writeln!(
        out,
        "  per answer              {:.2} steps, {:.1} generated tokens, mean {:.2} s, p50 {:.2} s, p99 {:.2} s",
        m.mean_steps, m.mean_generated_tokens, m.mean_seconds, m.p50_seconds, m.p99_seconds
    )
}
