//! Grounded answers: on a small model the answer is *selected*, not generated. The
//! passages a run retrieved are re-ranked (BM25, the share of the question's terms a
//! passage covers, and optionally the model's log-probability of the question given the
//! passage), then the sentence of the best passage that answers the question is chosen
//! the same way. The answer is that sentence, copied, with the passage id: so a citation
//! is always a retrieved passage and every number in an answer occurs in its passage (by
//! construction, and checked by [`ungrounded_numbers`]). When no passage covers enough of
//! the question the answer says so and offers a member of staff instead of guessing.

use super::kb::Kb;
use super::semantic::answerable;
use crate::model::EngineError;

/// The answer when nothing retrieved is good enough.
pub const NOT_FOUND: &str =
    "I could not find this in the knowledge base. Shall I call a member of staff?";

pub use crate::spec::policy::GroundConfig;

/// Log-probability of continuations after prompts: how the model scores candidates.
pub trait TextScorer {
    /// For each `(prompt, continuation)`: the continuation's summed log-probability and
    /// its token count.
    fn continuation_logprobs(
        &mut self,
        pairs: &[(String, String)],
    ) -> Result<Vec<(f64, usize)>, EngineError>;

    /// Each of `labels` after the one `prompt` (label sequences must differ).
    fn label_logprobs(
        &mut self,
        prompt: &str,
        labels: &[String],
    ) -> Result<Vec<(f64, usize)>, EngineError> {
        let pairs: Vec<(String, String)> = labels
            .iter()
            .map(|l| (prompt.to_string(), l.clone()))
            .collect();
        self.continuation_logprobs(&pairs)
    }
}

/// Words that frame a request rather than name its topic (general English): a knowledge
/// base rarely uses them, so as question terms they would weigh most and make an
/// answerable question look unanswerable ("I want my money back ..., is that possible?").
pub const FRAME_WORDS: &str =
    "want wants need needs possible please like would could know tell anything something somewhere still also just really";

/// The question's distinct terms with their weights (IDF); terms of an earlier question
/// (a follow-up's context) count `context_weight` as much.
pub fn weighted_terms(
    kb: &Kb,
    question: &str,
    context: Option<&str>,
    context_weight: f64,
) -> Vec<(String, f64)> {
    let mut out: Vec<(String, f64)> = Vec::new();
    let mut add = |t: String, w: f64| {
        if !out.iter().any(|(o, _)| *o == t) {
            out.push((t, w));
        }
    };
    for t in kb.query_terms(question) {
        let w = kb.idf(&t);
        add(t, w);
    }
    if let Some(c) = context {
        for t in kb.query_terms(c) {
            let w = kb.idf(&t) * context_weight;
            add(t, w);
        }
    }
    out
}

/// The question's terms as [`weighted_terms`] without the words that frame a request
/// ([`FRAME_WORDS`]): what an answer must cover. Tool choice keeps them ("I want to
/// complain" asks for staff).
pub fn topic_terms(
    kb: &Kb,
    question: &str,
    context: Option<&str>,
    context_weight: f64,
) -> Vec<(String, f64)> {
    let frame = kb.terms(FRAME_WORDS);
    weighted_terms(kb, question, context, context_weight)
        .into_iter()
        .filter(|(t, _)| !frame.contains(t))
        .collect()
}

/// How a question asks whether something exists, is sold or can be had (general English):
/// "do you have", "is there", "does anyone sell", "can I get / book / pay with".
const EXISTENCE_CUES: [&[&str]; 16] = [
    &["do", "you", "have"],
    &["do", "you", "sell"],
    &["do", "you", "offer"],
    &["do", "u", "have"],
    &["do", "u", "sell"],
    &["have", "you", "got"],
    &["is", "there"],
    &["are", "there"],
    &["can", "i", "buy"],
    &["can", "i", "get"],
    &["can", "i", "book"],
    &["can", "i", "borrow"],
    &["can", "i", "hire"],
    &["can", "i", "rent"],
    &["can", "i", "pay", "with"],
    &["can", "i", "pay", "by"],
];

/// First words of a question about who sells a thing ("do any stalls sell X", "who sells
/// X"): only then does "sell" open the thing asked about (not in "I'd like to sell my honey").
const SELLER_QUESTION_STARTS: [&str; 5] = ["do", "does", "who", "which", "where"];

/// Words that end the thing asked about ("a cinema *in* the hall", "a hotel *nearby*").
const OBJECT_ENDS: [&str; 14] = [
    "in", "at", "on", "for", "near", "nearby", "here", "around", "close", "inside", "to", "with",
    "that", "which",
];

/// For a question asking whether something exists ("Do you have a cinema in the hall?"),
/// a word of that thing the knowledge base never uses ("cinema"), after its synonyms: the
/// knowledge base cannot say it has it, so the answer is "not found", however much of the
/// frame it covers ("hall"). None for other questions or known things.
pub fn unknown_object(kb: &Kb, question: &str) -> Option<String> {
    let w = words_lower(question);
    let seller = || {
        SELLER_QUESTION_STARTS
            .contains(&w.first()?.as_str())
            .then(|| w.iter().position(|x| x == "sell" || x == "sells"))?
            .map(|i| i + 1)
    };
    let start = EXISTENCE_CUES
        .iter()
        .find_map(|cue| {
            w.windows(cue.len())
                .position(|win| win == *cue)
                .map(|i| i + cue.len())
        })
        .or_else(seller)?;
    let object: Vec<&str> = w[start..]
        .iter()
        .map(String::as_str)
        .skip_while(|x| matches!(*x, "a" | "an" | "any" | "some" | "the"))
        .take_while(|x| !OBJECT_ENDS.contains(x))
        .collect();
    kb.query_terms(&object.join(" "))
        .into_iter()
        .find(|t| !kb.knows(t))
}

/// Share of the question's term weight that `terms` contain (0 when the question has none).
pub fn coverage(question: &[(String, f64)], terms: &[String]) -> f64 {
    let total: f64 = question.iter().map(|(_, w)| w).sum();
    if total <= 0.0 {
        return 0.0;
    }
    let hit: f64 = question
        .iter()
        .filter(|(t, _)| terms.contains(t))
        .map(|(_, w)| w)
        .sum();
    hit / total
}

/// Sentences of a passage: cut after `.`, `!`, `?` or `;` followed by a space, so decimal
/// numbers (`6.90`) and times stay whole.
pub fn split_sentences(text: &str) -> Vec<String> {
    let chars: Vec<char> = text
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
        .chars()
        .collect();
    let mut out = Vec::new();
    let mut cur = String::new();
    for (i, &c) in chars.iter().enumerate() {
        cur.push(c);
        let end = matches!(c, '.' | '!' | '?' | ';') && chars.get(i + 1).is_none_or(|n| *n == ' ');
        if end {
            let s = cur.trim().trim_end_matches(';').trim().to_string();
            if !s.is_empty() {
                out.push(s);
            }
            cur.clear();
        }
    }
    let s = cur.trim().to_string();
    if !s.is_empty() {
        out.push(s);
    }
    out
}

/// Numbers, times and prices in `text`: digit runs joined by `.`, `:` or `,` (`6.90`,
/// `16:00`, `1,500`), a trailing separator left out.
pub fn numbers(text: &str) -> Vec<String> {
    let chars: Vec<char> = text.chars().collect();
    let mut out = Vec::new();
    let mut i = 0;
    while i < chars.len() {
        if !chars[i].is_ascii_digit() {
            i += 1;
            continue;
        }
        let mut j = i;
        while j < chars.len()
            && (chars[j].is_ascii_digit()
                || (matches!(chars[j], '.' | ':' | ',')
                    && chars.get(j + 1).is_some_and(|n| n.is_ascii_digit())))
        {
            j += 1;
        }
        out.push(chars[i..j].iter().collect());
        i = j;
    }
    out
}

/// The numbers of `answer` that do not occur in `passage` (empty for a grounded answer).
pub fn ungrounded_numbers(answer: &str, passage: &str) -> Vec<String> {
    let have = numbers(passage);
    numbers(answer)
        .into_iter()
        .filter(|n| !have.contains(n))
        .collect()
}

/// Values scaled to 0..=1 over the candidates (all 0 when they are equal).
pub fn min_max(v: &[f64]) -> Vec<f64> {
    let lo = v.iter().copied().fold(f64::INFINITY, f64::min);
    let hi = v.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    // Equal values (or NaN) carry no ranking information.
    if hi.partial_cmp(&lo) != Some(std::cmp::Ordering::Greater) {
        return vec![0.0; v.len()];
    }
    v.iter().map(|x| (x - lo) / (hi - lo)).collect()
}

/// The kind of fact a question asks for, told by its wording: the sentence that holds
/// that kind of fact is the likelier answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum FactKind {
    /// "when", "what time", "until", "how late", "hours": a clock time.
    Time,
    /// "how much", "cost", "price", "fee": an amount of money.
    Price,
    /// "how long", "how many days", "valid", "expire": a number of days, years, minutes.
    Duration,
    /// "where", "which floor", "which street": a place.
    Place,
    /// "how do I", "how can I", "how to": a way to do it, told by an instruction (a
    /// sentence that starts with a verb: "Sign up at the service desk ...").
    Way,
}

/// The kind of fact `question` asks for, if its wording tells (first match wins, so "how
/// much does parking cost per hour" is a price, not a time).
pub fn fact_kind(question: &str) -> Option<FactKind> {
    let q = format!(" {} ", words_lower(question).join(" "));
    let has = |pats: &[&str]| pats.iter().any(|p| q.contains(&format!(" {p} ")));
    if has(&[
        "how much", "cost", "costs", "price", "fee", "fees", "charge",
    ]) {
        Some(FactKind::Price)
    } else if has(&[
        "how long",
        "how many days",
        "how many years",
        "valid",
        "expire",
    ]) {
        Some(FactKind::Duration)
    } else if has(&[
        "when",
        "what time",
        "until",
        "till",
        "how late",
        "how early",
        "hours",
    ]) {
        Some(FactKind::Time)
    } else if has(&[
        "where",
        "which floor",
        "which street",
        "which unit",
        "which entrance",
    ]) {
        Some(FactKind::Place)
    } else if has(&[
        "how do i",
        "how can i",
        "how to",
        "how should i",
        "how do you",
    ]) {
        Some(FactKind::Way)
    } else {
        None
    }
}

/// Verbs an instruction starts with (general English, not one knowledge base's).
const IMPERATIVES: [&str; 36] = [
    "ask", "apply", "book", "bring", "buy", "call", "check", "collect", "come", "contact", "email",
    "enter", "fill", "follow", "get", "go", "keep", "leave", "order", "pay", "pick", "press",
    "register", "report", "return", "scan", "see", "send", "show", "sign", "speak", "take", "talk",
    "use", "validate", "visit",
];

/// Lowercase words of `text` (letters, digits and apostrophes), unstemmed.
pub fn words_lower(text: &str) -> Vec<String> {
    text.split(|c: char| !c.is_alphanumeric() && c != '\'')
        .filter(|w| !w.is_empty())
        .map(str::to_lowercase)
        .collect()
}

/// Whether `sentence` holds a fact of `kind`: a clock time (`16:00`), an amount of money
/// (a number with a currency word or sign, or "free"), a number of time units, a place
/// (floor, entrance, street, unit, "next to").
pub fn holds_kind(sentence: &str, kind: FactKind) -> bool {
    let w = words_lower(sentence);
    let nums = numbers(sentence);
    let any = |set: &[&str]| w.iter().any(|x| set.contains(&x.as_str()));
    match kind {
        FactKind::Time => nums.iter().any(|n| n.contains(':')),
        FactKind::Price => {
            (!nums.is_empty()
                && (any(&[
                    "euro", "euros", "eur", "dollar", "dollars", "pound", "pounds",
                ]) || sentence.contains(['€', '$', '£'])))
                || any(&["free", "charge", "costs", "cost"])
        }
        FactKind::Duration => {
            let units = [
                "minute", "minutes", "hour", "hours", "day", "days", "week", "weeks", "month",
                "months", "year", "years",
            ];
            w.windows(2).any(|p| {
                units.contains(&p[1].as_str())
                    && (p[0].chars().all(|c| c.is_ascii_digit())
                        || [
                            "one", "two", "three", "four", "five", "six", "ten", "twelve",
                        ]
                        .contains(&p[0].trim_end_matches("-year").trim_end_matches("-day")))
            }) || w
                .iter()
                .any(|x| x.ends_with("-year") || x.ends_with("-day"))
        }
        FactKind::Way => w
            .first()
            .is_some_and(|first| IMPERATIVES.contains(&first.as_str())),
        FactKind::Place => any(&[
            "floor", "entrance", "street", "unit", "next", "behind", "square", "stairs", "metres",
            "office",
        ]),
    }
}

/// One retrieved passage as a candidate, with its features and fused score.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Candidate {
    pub id: String,
    /// The retriever's score: BM25, or with the sentence encoder BM25 fused with the
    /// cosine ([`super::semantic::fused_scores`]); weighed by `[policy.ground] w_bm25`.
    pub retrieval: f64,
    pub coverage: f64,
    /// The model's mean log-probability of the question given the passage.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub model: Option<f64>,
    /// The cosine of meaning between question and passage (with the sentence encoder).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cosine: Option<f64>,
    pub score: f64,
}

/// Fuses the features into `score` (model scores min-max scaled over the candidates).
pub fn fuse(cands: &mut [Candidate], cfg: &GroundConfig) {
    let best = cands.iter().map(|c| c.retrieval).fold(0.0, f64::max);
    let model: Vec<f64> = cands.iter().map(|c| c.model.unwrap_or(0.0)).collect();
    let model = min_max(&model);
    for (c, m) in cands.iter_mut().zip(model) {
        let retrieval = if best > 0.0 { c.retrieval / best } else { 0.0 };
        c.score = cfg.w_bm25 * retrieval + cfg.w_cover * c.coverage + cfg.w_model * m;
    }
}

/// Index of the best candidate: highest score, ties to the earlier (BM25 order).
pub fn best(scores: &[f64]) -> Option<usize> {
    let mut best: Option<usize> = None;
    for (i, &s) in scores.iter().enumerate() {
        if best.is_none_or(|b| s > scores[b]) {
            best = Some(i);
        }
    }
    best
}

/// The answer from scored sentences: the best one, and the runner-up when it scores within
/// `margin` of it and both fit `max_chars`; kept in passage order.
pub fn pick_sentences(
    sentences: &[String],
    scores: &[f64],
    margin: f64,
    max_chars: usize,
) -> String {
    let Some(b) = best(scores) else {
        return String::new();
    };
    let mut chosen = vec![b];
    let second = (0..scores.len())
        .filter(|&i| i != b)
        .max_by(|&x, &y| scores[x].total_cmp(&scores[y]).then(y.cmp(&x)));
    if let Some(s) = second {
        let len = sentences[b].chars().count() + 1 + sentences[s].chars().count();
        if scores[b] - scores[s] <= margin && len <= max_chars {
            chosen.push(s);
            chosen.sort();
        }
    }
    // Pieces are sentences or clauses cut at `;`: a piece that does not end a sentence
    // is joined to the next with `;` again, and a piece that starts a sentence starts with
    // a capital ("the card is ready at once" after "The loyalty card is free."); letters
    // change case, numbers stay as copied.
    let mut out = String::new();
    for &i in &chosen {
        if out.is_empty() || out.ends_with(['.', '!', '?']) {
            if !out.is_empty() {
                out.push(' ');
            }
            out.push_str(&capitalised(&sentences[i]));
        } else {
            out.push_str("; ");
            out.push_str(&sentences[i]);
        }
    }
    // A clause cut at `;` that ends the answer ends it with a full stop.
    if !out.is_empty() && !out.ends_with(['.', '!', '?']) {
        out.push('.');
    }
    out
}

fn capitalised(s: &str) -> String {
    let mut c = s.chars();
    match c.next() {
        Some(f) => f.to_uppercase().chain(c).collect(),
        None => String::new(),
    }
}

/// What grounded selection decided, with its evidence for the trace.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Grounded {
    /// The selected sentences, or [`NOT_FOUND`].
    pub answer: String,
    /// The passage the answer is taken from; None when nothing was good enough.
    pub cited: Option<String>,
    pub candidates: Vec<Candidate>,
    /// The best passage's sentences and their scores.
    pub sentence_scores: Vec<f64>,
}

impl Grounded {
    /// The answer as the kiosk says it: `text [id]`, or the not-found text.
    pub fn line(&self) -> String {
        match &self.cited {
            Some(id) => format!("{} [{id}]", self.answer),
            None => self.answer.clone(),
        }
    }
}

/// The question as selection sees it: its words, and an earlier question a follow-up
/// continues.
#[derive(Debug, Clone, Copy)]
pub struct Query<'a> {
    pub question: &'a str,
    pub context: Option<&'a str>,
}

/// How much an earlier question's terms weigh in a follow-up.
pub const CONTEXT_WEIGHT: f64 = 0.5;

fn model_prompt(text: &str) -> String {
    format!("Passage: {text}\nA customer asks:")
}

fn model_scores(
    scorer: &mut dyn TextScorer,
    texts: &[String],
    question: &str,
) -> Result<Vec<f64>, EngineError> {
    let q = format!(
        " {}",
        question.split_whitespace().collect::<Vec<_>>().join(" ")
    );
    let pairs: Vec<(String, String)> = texts.iter().map(|t| (model_prompt(t), q.clone())).collect();
    Ok(scorer
        .continuation_logprobs(&pairs)?
        .into_iter()
        .map(|(total, n)| total / n.max(1) as f64)
        .collect())
}

/// Chooses among the retrieved passages `hits` (id, BM25 score; only ids of `kb`) and
/// selects the answer from the best. `scorer` is asked only when `cfg.w_model > 0`.
pub fn select(
    kb: &Kb,
    query: Query,
    hits: &[(String, f64)],
    mut scorer: Option<&mut dyn TextScorer>,
    cfg: &GroundConfig,
) -> Result<Grounded, EngineError> {
    let q_terms = topic_terms(kb, query.question, query.context, CONTEXT_WEIGHT);
    // Meaning: a follow-up is embedded with the question it continues.
    let sem_question = match query.context {
        Some(c) => format!("{} {c}", query.question),
        None => query.question.to_string(),
    };
    let sem = kb.semantic();
    let cosines = kb.cosines(&sem_question);
    let passages: Vec<_> = hits
        .iter()
        .filter_map(|(id, s)| kb.get(id).map(|p| (p, *s)))
        .collect();
    let mut cands: Vec<Candidate> = passages
        .iter()
        .map(|(p, s)| Candidate {
            id: p.id.clone(),
            retrieval: *s,
            coverage: coverage(&q_terms, &kb.terms(&format!("{} {}", p.title, p.text))),
            model: None,
            cosine: cosines
                .as_ref()
                .and_then(|c| kb.index_of(&p.id).map(|i| c[i])),
            score: 0.0,
        })
        .collect();
    let use_model = cfg.w_model > 0.0 && cands.len() > 1;
    if let (true, Some(sc)) = (use_model, scorer.as_deref_mut()) {
        let texts: Vec<String> = passages.iter().map(|(p, _)| p.one_line()).collect();
        for (c, m) in cands
            .iter_mut()
            .zip(model_scores(sc, &texts, query.question)?)
        {
            c.model = Some(m);
        }
    }
    fuse(&mut cands, cfg);
    if let Some(sem) = sem {
        for c in &mut cands {
            c.score += sem.cfg.w_passage * c.cosine.unwrap_or(0.0);
        }
    }
    let scores: Vec<f64> = cands.iter().map(|c| c.score).collect();
    let not_found = |cands: Vec<Candidate>| Grounded {
        answer: NOT_FOUND.into(),
        cited: None,
        candidates: cands,
        sentence_scores: Vec::new(),
    };
    let Some(b) = best(&scores) else {
        return Ok(not_found(cands));
    };
    let min_cosine = sem.map_or(f64::INFINITY, |s| s.cfg.min_cosine);
    if !answerable(
        cands[b].coverage,
        cfg.min_coverage,
        cands[b].cosine,
        min_cosine,
    ) || (unknown_object(kb, query.question).is_some()
        && !cands[b]
            .cosine
            .is_some_and(|c| sem.is_some_and(|s| c >= s.cfg.known_cosine)))
    {
        return Ok(not_found(cands));
    }
    let passage = passages[b].0;
    let sentences = split_sentences(&passage.text);
    // Sentences are scored by the question's coverage (the title, shared by all, does not
    // tell them apart, so question terms of the title weigh `w_title_terms`) and whether
    // they hold the kind of fact asked for; a small position prior breaks ties to the first.
    let kind = fact_kind(query.question).or_else(|| query.context.and_then(fact_kind));
    let title_terms = kb.terms(&passage.title);
    let s_terms: Vec<(String, f64)> = q_terms
        .iter()
        .map(|(t, w)| {
            let f = if title_terms.contains(t) {
                cfg.w_title_terms
            } else {
                1.0
            };
            (t.clone(), w * f)
        })
        .collect();
    let mut s_scores: Vec<f64> = sentences
        .iter()
        .enumerate()
        .map(|(i, s)| {
            let k = kind.is_some_and(|k| holds_kind(s, k));
            coverage(&s_terms, &kb.terms(s)) + cfg.w_kind * f64::from(u8::from(k)) - 1e-3 * i as f64
        })
        .collect();
    if let (Some(sem), Some(i)) = (sem, kb.index_of(&passage.id)) {
        let c = sem.sentence_cosines(&sem_question, i);
        if c.len() == s_scores.len() {
            for (s, c) in s_scores.iter_mut().zip(c) {
                *s += sem.cfg.w_sentence * c;
            }
        }
    }
    if let (true, Some(sc)) = (cfg.w_model > 0.0 && sentences.len() > 1, scorer) {
        let m = min_max(&model_scores(sc, &sentences, query.question)?);
        for (s, m) in s_scores.iter_mut().zip(m) {
            *s += cfg.w_model * m;
        }
    }
    let answer = pick_sentences(
        &sentences,
        &s_scores,
        cfg.second_margin,
        cfg.max_answer_chars,
    );
    // By construction the answer is copied from the passage; the check keeps it so.
    if answer.is_empty() || !ungrounded_numbers(&answer, &passage.text).is_empty() {
        return Ok(not_found(cands));
    }
    Ok(Grounded {
        answer,
        cited: Some(passage.id.clone()),
        candidates: cands,
        sentence_scores: s_scores,
    })
}

/// Whether a question continues the previous one ("and on Saturday?"): it starts with a
/// connective or is too short to stand alone.
pub fn is_follow_up(question: &str) -> bool {
    let q = question.trim().to_lowercase();
    let words: Vec<&str> = q
        .split(|c: char| !c.is_alphanumeric() && c != '\'')
        .filter(|w| !w.is_empty())
        .collect();
    let starts = ["and", "what about", "how about", "also", "same for", "or"];
    let connective = starts
        .iter()
        .any(|s| q.starts_with(&format!("{s} ")) || q == *s);
    connective || (1..=2).contains(&words.len())
}

#[cfg(test)]
#[path = "ground_tests.rs"]
mod tests;
