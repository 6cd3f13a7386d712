//! `edgeact bench`: load time, memory against the estimate, and classifications per second
//! of each scoring path over the same inputs (figures printed, nothing asserted).

use std::io::Write;
use std::path::{Path, PathBuf};

use crate::classify::input;
use crate::classify::{Classifier, Request, ScorePath};
use crate::model::config::EngineConfig;
use crate::model::scoring::LogprobOver;
use crate::model::{self, Engine};
use crate::spec::Task;
use crate::util::jsonl::JsonLines;
use crate::util::proc::rss_mib;
use crate::util::stats::percentile;

use super::AppError;

/// Settings of `edgeact bench`.
#[derive(Debug, Clone)]
pub struct BenchConfig {
    pub engine: EngineConfig,
    pub task: Task,
    /// JSON-lines requests to classify (a `label` field, when present, is scored).
    pub data: PathBuf,
    pub limit: usize,
    /// Queue depths of the batched path (one micro-batch each).
    pub batch_sizes: Vec<usize>,
    /// Requests the naive path runs on (the first ones).
    pub naive_limit: usize,
    /// Times the fast rows run, alternating (on a loaded machine one round says little).
    /// Where the task's labels can be scored over the labels alone, each fast row runs
    /// over the vocabulary and over the labels in every round.
    pub rounds: usize,
}

/// `edgeact bench`: load time, memory against the estimate, and classifications per
/// second on each scoring path over the same inputs, printed as a table (nothing asserted).
pub fn run(cfg: BenchConfig, out: &mut dyn Write) -> Result<(), AppError> {
    let t0 = std::time::Instant::now();
    let mut engine = Engine::load(&crate::spec::config_for_tasks(&cfg.engine, [&cfg.task])?, 1)?;
    let load_ms = t0.elapsed().as_secs_f64() * 1e3;
    let t1 = std::time::Instant::now();
    let mut classifier = Classifier::new(&mut engine, cfg.task, 0, None, None)?;
    let prefix_ms = t1.elapsed().as_secs_f64() * 1e3;
    let (reqs, gold) = read_requests(&cfg.data, cfg.limit)?;
    let pruning = classifier.task.prune_margin_nats;
    let prunable =
        classifier.task.prune_margin_nats.is_some() && !classifier.trie().decoded.is_empty();
    let rows = rows(prunable, &cfg.batch_sizes, cfg.rounds);
    writeln!(
        out,
        "model {} | board {} | task {} ({} labels, prefix {} tokens) | {} inputs | up to {} requests per decode",
        engine.info.path.display(),
        engine.info.board,
        classifier.task.name,
        classifier.task.labels.len(),
        classifier.prefix_len(),
        reqs.len(),
        engine.jobs_per_decode_for(classifier.trie())
    )
    .map_err(AppError::Output)?;
    writeln!(
        out,
        "load {load_ms:.0} ms (model + context), prefix {prefix_ms:.0} ms ({:?}), estimate {} MiB ({})",
        classifier.prefix_source,
        engine.info.estimate_mib,
        engine.info.estimate.detail()
    )
    .map_err(AppError::Output)?;
    writeln!(
        out,
        "| path | logprob over | batch | classif/s | p50 ms | p99 ms | decoded tok/request | accuracy | speed-up | tokens/decode | rows/decode |\n|---|---|---|---|---|---|---|---|---|---|---|"
    )
    .map_err(AppError::Output)?;
    let task_over = classifier.task.logprob_over;
    let mut base_rate = None;
    let mut shapes = Vec::new();
    for row in rows {
        classifier.task.prune_margin_nats = if row.prune { pruning } else { None };
        classifier.task.logprob_over = row.over.unwrap_or(task_over);
        // The two slow reference paths run on the first `naive_limit` requests only.
        let n = match row.path {
            Some(ScorePath::Fast) => reqs.len(),
            _ => cfg.naive_limit.clamp(1, reqs.len().max(1)).min(reqs.len()),
        };
        let m = measure(&classifier, &mut engine, &row, &reqs[..n], &gold[..n]);
        let base = *base_rate.get_or_insert(m.rate);
        let name = if n < reqs.len() {
            format!("{} (first {n})", row.name)
        } else {
            row.name.to_string()
        };
        writeln!(
            out,
            "| {name} | {} | {} | {:.2} | {:.1} | {:.1} | {:.1} | {} | {:.2}x | {:.1} | {:.1} |",
            m.over.map_or("-", |o| match o {
                LogprobOver::Labels => "labels",
                LogprobOver::Vocab => "vocab",
            }),
            row.batch,
            m.rate,
            percentile(&m.latencies_ms, 50),
            percentile(&m.latencies_ms, 99),
            m.decoded as f64 / n.max(1) as f64,
            m.accuracy,
            m.rate / base,
            m.work.tokens_per_decode(),
            m.work.rows_per_decode()
        )
        .map_err(AppError::Output)?;
        // The same-shape comparison once per row kind (the first round), over the vocabulary.
        if row.path == Some(ScorePath::Fast)
            && (row.batch > 1 || !row.prune)
            && row.round == 0
            && m.over != Some(LogprobOver::Labels)
        {
            shapes.push((format!("{} at batch {}", row.name, row.batch), m));
        }
    }
    classifier.task.logprob_over = task_over;
    if let Some(why) = engine.label_rows_unavailable() {
        writeln!(out, "labels scored from the full logits rows: {why}")
            .map_err(AppError::Output)?;
    }
    if let Some(m) = pruning {
        writeln!(out, "pruning margin {m} nats (task prune_margin_nats)")
            .map_err(AppError::Output)?;
    }
    // Prompt processing inside edgeact, comparable with llama-bench's pp test: batches of n
    // tokens, each from an empty sequence, logits for the last token only.
    let mut pp = Vec::new();
    for n in [16usize, 64, 256] {
        if n <= engine.n_batch() {
            pp.push(format!(
                "{:.0} tok/s at batch {n}",
                engine.prompt_rate(512, n)?
            ));
        }
    }
    writeln!(out, "prompt processing: {}", pp.join(", ")).map_err(AppError::Output)?;
    same_shape(&mut engine, &shapes, out)?;
    let (peak, now) = rss_mib();
    writeln!(
        out,
        "peak RSS {peak:.0} MiB (now {now:.0} MiB) against an estimate of {} MiB",
        engine.info.estimate_mib
    )
    .map_err(AppError::Output)?;
    Ok(())
}

/// For each fast-path row: llama.cpp alone on decodes of the same shape (tokens and logits
/// rows per decode, from [`model::DecodeCounts`], each decode from an empty sequence),
/// against the row's decoded tokens/s. What is left between them is edgeact's own work per
/// decode (batch building, KV-cache copies, scoring) and attention over the cached prefix.
fn same_shape(
    engine: &mut Engine,
    shapes: &[(String, Measured)],
    out: &mut dyn Write,
) -> Result<(), AppError> {
    for (name, m) in shapes {
        let tokens = m.work.tokens_per_decode().round().max(1.0) as usize;
        let rows = m.work.rows_per_decode().round().max(1.0) as usize;
        let alone = engine.prompt_rate_rows(512.max(4 * tokens), tokens, rows)?;
        let path = m.rate * m.decoded_per_request;
        writeln!(
            out,
            "same shape, llama.cpp alone ({tokens} tokens, {rows} logits rows a decode): {alone:.0} tok/s; \
             {name}: {path:.0} decoded tok/s ({:.2}x); with 1 row a decode: {:.0} tok/s",
            path / alone,
            engine.prompt_rate(512.max(4 * tokens), tokens)?
        )
        .map_err(AppError::Output)?;
    }
    Ok(())
}

/// The first `limit` parsable requests of the data, and their gold labels when given.
fn read_requests(
    data: &Path,
    limit: usize,
) -> Result<(Vec<Request>, Vec<Option<String>>), AppError> {
    let input_err = |source| AppError::Input {
        what: data.display().to_string(),
        source,
    };
    let mut lines = JsonLines::open(data).map_err(input_err)?;
    let mut reqs = Vec::new();
    let mut gold = Vec::new();
    while let Some((n, line)) = lines.next_line().map_err(input_err)? {
        if let Ok(Some(r)) = input::parse_line(line, n) {
            gold.push(r.fields.get("label").cloned());
            reqs.push(r);
        }
        if reqs.len() >= limit {
            break;
        }
    }
    Ok((reqs, gold))
}

/// One row of the table: a scoring path at a batch size, with or without pruning.
struct Row {
    name: &'static str,
    /// `None`: prefix reuse with each label scored on its own (no label trie).
    path: Option<ScorePath>,
    batch: usize,
    prune: bool,
    /// What a fast row asks the labels to be normalized over (None: the task's setting).
    over: Option<LogprobOver>,
    round: usize,
}

/// The rows, slowest first; the pruned row only where pruning can change anything
/// (`prunable`: the task prunes and has multi-token labels). The fast rows run `rounds`
/// times, each over the vocabulary then over the labels.
fn rows(prunable: bool, depths: &[usize], rounds: usize) -> Vec<Row> {
    let row = |name, path, batch, prune| Row {
        name,
        path,
        batch,
        prune,
        over: None,
        round: 0,
    };
    let mut rows = vec![
        row(
            "naive (every label from scratch)",
            Some(ScorePath::Naive),
            1,
            false,
        ),
        row("prefix reuse, labels one by one", None, 1, false),
    ];
    let mut fast = vec![row(
        "prefix reuse + label trie",
        Some(ScorePath::Fast),
        1,
        false,
    )];
    if prunable {
        fast.push(row("+ pruned label search", Some(ScorePath::Fast), 1, true));
    }
    for &depth in depths {
        fast.push(row(
            "+ micro-batching",
            Some(ScorePath::Fast),
            depth.max(1),
            true,
        ));
    }
    for round in 0..rounds.max(1) {
        for f in &fast {
            for over in [LogprobOver::Vocab, LogprobOver::Labels] {
                rows.push(Row {
                    over: Some(over),
                    round,
                    ..row(f.name, f.path, f.batch, f.prune)
                });
            }
        }
    }
    rows
}

/// What one row measured.
struct Measured {
    rate: f64,
    /// Per request (a batch's time for each of its requests), sorted.
    latencies_ms: Vec<f64>,
    decoded: usize,
    decoded_per_request: f64,
    /// `0.875`, or `-` without gold labels.
    accuracy: String,
    /// The decodes the row ran (llama.cpp calls, tokens, logits rows).
    work: model::DecodeCounts,
    /// What the results say their log-probabilities were normalized over (None: no result
    /// carried it, as on the one-by-one path).
    over: Option<LogprobOver>,
}

fn measure(
    classifier: &Classifier,
    engine: &mut Engine,
    row: &Row,
    reqs: &[Request],
    gold: &[Option<String>],
) -> Measured {
    let mut lat = Vec::new();
    let mut decoded = 0usize;
    let mut correct = 0usize;
    let mut labeled = 0usize;
    let mut over = None;
    let counts = engine.decode_counts();
    let start = std::time::Instant::now();
    for (chunk, g) in reqs.chunks(row.batch).zip(gold.chunks(row.batch)) {
        let t = std::time::Instant::now();
        let res: Vec<Option<(String, usize)>> = match row.path {
            Some(path) => classifier
                .classify_many(engine, chunk, path)
                .into_iter()
                .map(|r| {
                    r.ok().map(|r| {
                        over = Some(r.logprob_over);
                        (r.top_label, r.tokens.decoded)
                    })
                })
                .collect(),
            None => chunk
                .iter()
                .map(|r| labels_one_by_one(classifier, engine, r))
                .collect(),
        };
        let ms = t.elapsed().as_secs_f64() * 1e3;
        for (r, g) in res.into_iter().zip(g) {
            lat.push(ms);
            if let Some((top_label, n_decoded)) = r {
                decoded += n_decoded;
                if let Some(g) = g {
                    labeled += 1;
                    correct += usize::from(&top_label == g);
                }
            }
        }
    }
    let rate = reqs.len() as f64 / start.elapsed().as_secs_f64();
    let work = engine.decode_counts().since(&counts);
    lat.sort_by(f64::total_cmp);
    Measured {
        rate,
        latencies_ms: lat,
        decoded,
        decoded_per_request: decoded as f64 / reqs.len().max(1) as f64,
        work,
        over,
        accuracy: if labeled > 0 {
            format!("{:.3}", correct as f64 / labeled as f64)
        } else {
            "-".into()
        },
    }
}

/// The bench's middle path: the cached prefix is reused, but each label is scored by its own
/// `score` call (the request's suffix decoded again each time, no label trie shared), as a
/// prompt cache without label batching would. Returns the top label (by the task's score,
/// uncalibrated) and the tokens decoded; `None` when the request fails.
fn labels_one_by_one(
    classifier: &Classifier,
    engine: &mut Engine,
    req: &Request,
) -> Option<(String, usize)> {
    let prepared = classifier.prepare(engine, req).ok()?;
    let trie = classifier.trie();
    let mut best: Option<(f64, usize)> = None;
    let mut decoded = 0;
    for (i, path) in trie.paths.iter().enumerate() {
        let tokens: Vec<_> = path.iter().map(|&n| trie.nodes[n].token).collect();
        let one = crate::model::scoring::LabelTrie::new(&[tokens]).ok()?;
        let job = model::ScoreJob {
            // `bench` prepares its one task in prefix slot 0.
            prefix: Some(0),
            tokens: &prepared.tokens,
            trie: &one,
            pruning: None,
            logprob_over: LogprobOver::Vocab,
        };
        let out = engine.score(std::slice::from_ref(&job)).ok()?.pop()?;
        let label = out.labels.first()?;
        decoded += out.decoded_tokens;
        let score = match classifier.task.score {
            crate::spec::ScoreNorm::Total => label.total,
            crate::spec::ScoreNorm::Mean => label.mean,
        };
        if best.is_none_or(|(b, _)| score > b) {
            best = Some((score, i));
        }
    }
    best.map(|(_, i)| (classifier.task.labels[i].name.clone(), decoded))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fast_rows_alternate_both_ways_each_round() {
        let r = rows(false, &[8, 32], 2);
        // naive, one by one, then 2 rounds x 3 fast rows x 2 ways.
        assert_eq!(r.len(), 2 + 2 * 3 * 2);
        assert!(r[..2].iter().all(|x| x.over.is_none() && x.round == 0));
        let fast: Vec<(usize, usize, Option<LogprobOver>)> =
            r[2..].iter().map(|x| (x.round, x.batch, x.over)).collect();
        assert_eq!(fast[0], (0, 1, Some(LogprobOver::Vocab)));
        assert_eq!(fast[1], (0, 1, Some(LogprobOver::Labels)));
        assert_eq!(fast[5], (0, 32, Some(LogprobOver::Labels)));
        assert_eq!(fast[6], (1, 1, Some(LogprobOver::Vocab)));
        // Pruning adds its row, both ways.
        let one = rows(true, &[8], 1);
        assert_eq!(one.len(), 2 + 3 * 2);
        assert!(one[2..].iter().all(|x| x.over.is_some()));
        assert!(one.iter().any(|x| x.prune && x.batch == 1));
    }
}
