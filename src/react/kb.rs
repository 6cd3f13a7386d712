//! The local knowledge base: passages loaded from a folder of Markdown (`## Title {#id}`
//! sections) and JSON-lines (`{"id", "title"?, "text"}`) files, ranked by BM25 (crate
//! `bm25`, English stemming and stop words) with ties broken by load order.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use super::semantic::{self, SemanticIndex};
use crate::encoder::{self, EncoderError};
use crate::util::jsonl::JsonLines;
use bm25::{DefaultTokenizer, Language, SearchEngine, SearchEngineBuilder, Tokenizer};

#[derive(Debug, thiserror::Error)]
pub enum KbError {
    #[error("knowledge base {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("knowledge base {path}, line {line}: {reason}")]
    Entry {
        path: PathBuf,
        line: usize,
        reason: String,
    },
    #[error("knowledge base {dir}: passage id `{id}` appears twice ({first} and {second})")]
    DuplicateId {
        dir: PathBuf,
        id: String,
        first: PathBuf,
        second: PathBuf,
    },
    #[error("knowledge base {0}: no passages (.md sections or .jsonl lines) found")]
    Empty(PathBuf),
    #[error(transparent)]
    Encoder(#[from] EncoderError),
}

/// One retrievable passage.
#[derive(Debug, Clone, PartialEq)]
pub struct Passage {
    pub id: String,
    pub title: String,
    pub text: String,
    pub source: PathBuf,
}

impl Passage {
    /// Title and text on one line, as an observation shows it.
    pub fn one_line(&self) -> String {
        let body = self.text.split_whitespace().collect::<Vec<_>>().join(" ");
        if self.title.is_empty() {
            body
        } else {
            format!("{}: {body}", self.title)
        }
    }
}

/// A search hit: the passage's index in [`Kb::passages`] and its score (BM25; with the
/// sentence encoder, BM25 fused with the cosine).
#[derive(Debug, Clone, PartialEq)]
pub struct Hit {
    pub index: usize,
    pub score: f32,
}

pub struct Kb {
    pub dir: PathBuf,
    pub passages: Vec<Passage>,
    engine: SearchEngine<usize>,
    /// The retriever's own tokenizer (English stemming, stop words), so answer selection
    /// compares the same terms BM25 matched.
    tokenizer: DefaultTokenizer,
    /// Passages each term occurs in (title and text).
    doc_freq: HashMap<String, usize>,
    /// The knowledge base's own synonyms (`synonyms.txt`): a phrase customers use (its
    /// lowercase words) and the knowledge base's words for it.
    synonyms: Vec<(Vec<String>, String)>,
    /// Passage and sentence embeddings when the sentence encoder is attached
    /// ([`Kb::attach_encoder`]): retrieval and selection then use meaning as well as words.
    semantic: Option<SemanticIndex>,
}

/// The file of a knowledge base folder that lists its synonyms (not indexed).
pub const SYNONYMS_FILE: &str = "synonyms.txt";

/// Lowercase words of `text` (letters, digits and apostrophes).
fn words(text: &str) -> Vec<String> {
    text.split(|c: char| !c.is_alphanumeric() && c != '\'' && c != '\u{2019}')
        .filter(|w| !w.is_empty())
        .map(|w| w.to_lowercase().replace('\u{2019}', "'"))
        .collect()
}

/// `synonyms.txt`: one line per group, `the knowledge base's words: phrase, phrase`;
/// blank lines and `#` comments skipped. A line without `:` is an error naming it.
pub fn parse_synonyms(src: &str, source: &Path) -> Result<Vec<(Vec<String>, String)>, KbError> {
    let mut out = Vec::new();
    for (i, line) in src.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let Some((canon, alts)) = line.split_once(':') else {
            return Err(KbError::Entry {
                path: source.into(),
                line: i + 1,
                reason: "expected `words: phrase, phrase`".into(),
            });
        };
        for alt in alts.split(',') {
            let w = words(alt);
            if !w.is_empty() {
                out.push((w, canon.trim().to_string()));
            }
        }
    }
    // Longer phrases first, so "new year's eve" wins over "new year".
    out.sort_by_key(|p| std::cmp::Reverse(p.0.len()));
    Ok(out)
}

impl std::fmt::Debug for Kb {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Kb")
            .field("dir", &self.dir)
            .field("passages", &self.passages.len())
            .finish()
    }
}

/// A lowercase id from a heading: letters and digits, other runs become `-`.
pub fn slug(s: &str) -> String {
    let mut out = String::new();
    for c in s.chars() {
        if c.is_alphanumeric() {
            out.extend(c.to_lowercase());
        } else if !out.ends_with('-') && !out.is_empty() {
            out.push('-');
        }
    }
    out.trim_end_matches('-').to_string()
}

/// Sections of a Markdown file: each `## ` heading starts a passage that runs to the next
/// `#`/`##` heading. `{#id}` at the end of the heading names it; otherwise the slug of the
/// heading does.
pub fn parse_markdown(src: &str, source: &Path) -> Vec<Passage> {
    let mut out = Vec::new();
    let mut cur: Option<Passage> = None;
    for line in src.lines() {
        let heading = line.strip_prefix("## ");
        if heading.is_some() || line.starts_with("# ") {
            if let Some(p) = cur.take() {
                out.push(p);
            }
        }
        if let Some(h) = heading {
            let h = h.trim();
            let (title, id) = match h.rfind("{#") {
                Some(i) if h.ends_with('}') => (h[..i].trim(), h[i + 2..h.len() - 1].trim()),
                _ => (h, ""),
            };
            cur = Some(Passage {
                id: if id.is_empty() {
                    slug(title)
                } else {
                    id.to_string()
                },
                title: title.to_string(),
                text: String::new(),
                source: source.to_path_buf(),
            });
        } else if let Some(p) = cur.as_mut() {
            if !line.starts_with("# ") && (!p.text.is_empty() || !line.trim().is_empty()) {
                p.text.push_str(line);
                p.text.push('\n');
            }
        }
    }
    if let Some(p) = cur {
        out.push(p);
    }
    for p in &mut out {
        p.text = p.text.trim().to_string();
    }
    out.retain(|p| !p.text.is_empty());
    out
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct JsonEntry {
    id: String,
    #[serde(default)]
    title: String,
    text: String,
}

pub fn parse_jsonl(src: &str, source: &Path) -> Result<Vec<Passage>, KbError> {
    let mut out = Vec::new();
    let mut lines = JsonLines::new(src.as_bytes());
    // Reading from memory cannot fail.
    while let Ok(Some((n, line))) = lines.next_line() {
        let e: JsonEntry = serde_json::from_slice(line).map_err(|e| KbError::Entry {
            path: source.into(),
            line: n,
            reason: e.to_string(),
        })?;
        if e.id.trim().is_empty() || e.text.trim().is_empty() {
            return Err(KbError::Entry {
                path: source.into(),
                line: n,
                reason: "`id` and `text` must not be empty".into(),
            });
        }
        out.push(Passage {
            id: e.id,
            title: e.title,
            text: e.text,
            source: source.into(),
        });
    }
    Ok(out)
}

impl Kb {
    /// Every `.md` and `.jsonl` file of `dir` (not recursive), in name order.
    pub fn load(dir: &Path) -> Result<Kb, KbError> {
        let io = |source| KbError::Io {
            path: dir.into(),
            source,
        };
        let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
            .map_err(io)?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| {
                p.extension().is_some_and(|e| e == "md" || e == "jsonl")
                    && p.file_name().is_some_and(|n| n != "README.md")
            })
            .collect();
        files.sort();
        let syn_path = dir.join(SYNONYMS_FILE);
        let synonyms = match std::fs::read_to_string(&syn_path) {
            Ok(src) => parse_synonyms(&src, &syn_path)?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
            Err(source) => {
                return Err(KbError::Io {
                    path: syn_path,
                    source,
                })
            }
        };
        let mut passages = Vec::new();
        for f in &files {
            let src = std::fs::read_to_string(f).map_err(|source| KbError::Io {
                path: f.clone(),
                source,
            })?;
            if f.extension().is_some_and(|e| e == "md") {
                passages.extend(parse_markdown(&src, f));
            } else {
                passages.extend(parse_jsonl(&src, f)?);
            }
        }
        let mut kb = Kb::from_passages(dir, passages)?;
        kb.synonyms = synonyms;
        Ok(kb)
    }

    pub fn from_passages(dir: &Path, passages: Vec<Passage>) -> Result<Kb, KbError> {
        if passages.is_empty() {
            return Err(KbError::Empty(dir.into()));
        }
        let mut seen: HashMap<&str, &Path> = HashMap::new();
        for p in &passages {
            if let Some(first) = seen.insert(&p.id, &p.source) {
                return Err(KbError::DuplicateId {
                    dir: dir.into(),
                    id: p.id.clone(),
                    first: first.into(),
                    second: p.source.clone(),
                });
            }
        }
        let docs: Vec<bm25::Document<usize>> = passages
            .iter()
            .enumerate()
            .map(|(i, p)| bm25::Document::new(i, format!("{} {}", p.title, p.text)))
            .collect();
        let engine = SearchEngineBuilder::<usize>::with_documents(Language::English, docs).build();
        let tokenizer = DefaultTokenizer::new(Language::English);
        let mut doc_freq: HashMap<String, usize> = HashMap::new();
        for p in &passages {
            let mut terms = tokenizer.tokenize(&format!("{} {}", p.title, p.text));
            terms.sort();
            terms.dedup();
            for t in terms {
                *doc_freq.entry(t).or_default() += 1;
            }
        }
        Ok(Kb {
            dir: dir.into(),
            passages,
            engine,
            tokenizer,
            doc_freq,
            synonyms: Vec::new(),
            semantic: None,
        })
    }

    /// [`Kb::load`], with the sentence encoder attached when it is fetched beside the
    /// model at `model_path` ([`encoder::dir_beside`]); without it the knowledge base
    /// works on words alone. A fetched but damaged encoder is an error naming the file.
    pub fn load_beside(dir: &Path, model_path: &Path) -> Result<Kb, KbError> {
        let mut kb = Kb::load(dir)?;
        let enc_dir = encoder::dir_beside(model_path);
        if enc_dir.is_dir() {
            kb.attach_encoder(encoder::shared(&enc_dir)?);
        }
        Ok(kb)
    }

    /// Embeds every passage and sentence with `enc` (once, kept in memory).
    pub fn attach_encoder(&mut self, enc: std::sync::Arc<encoder::Encoder>) {
        let items: Vec<(String, Vec<String>, String)> = self
            .passages
            .iter()
            .map(|p| {
                (
                    p.title.clone(),
                    super::ground::split_sentences(&p.text),
                    p.text.clone(),
                )
            })
            .collect();
        self.semantic = Some(SemanticIndex::build(enc, &items));
    }

    /// The semantic index, when the encoder is attached.
    pub fn semantic(&self) -> Option<&SemanticIndex> {
        self.semantic.as_ref()
    }

    /// Cosine of `question` to each passage (None without the encoder).
    pub fn cosines(&self, question: &str) -> Option<Vec<f64>> {
        self.semantic.as_ref().map(|s| s.passage_cosines(question))
    }

    /// The `k` best passages for `query`: by BM25, fused with the cosine of meaning when
    /// the encoder is attached ([`semantic::fused_scores`]). Passages sharing no term with
    /// the query are not returned (with the encoder: unless their meaning is close).
    /// Equal scores keep load order, so results are deterministic.
    pub fn search(&self, query: &str, k: usize) -> Vec<Hit> {
        let mut hits = self.bm25(query);
        if let Some(sem) = &self.semantic {
            let mut bm25 = vec![0.0; self.passages.len()];
            for h in &hits {
                bm25[h.index] = f64::from(h.score);
            }
            let fused = semantic::fused_scores(&bm25, &sem.passage_cosines(query), &sem.cfg);
            hits = fused
                .into_iter()
                .enumerate()
                .filter_map(|(index, s)| {
                    s.map(|s| Hit {
                        index,
                        score: s as f32,
                    })
                })
                .collect();
        }
        hits.sort_by(|a, b| {
            b.score
                .partial_cmp(&a.score)
                .unwrap_or(std::cmp::Ordering::Equal)
                .then(a.index.cmp(&b.index))
        });
        hits.truncate(k);
        hits
    }

    /// Every passage sharing a term with `query`, with its BM25 score (unordered).
    fn bm25(&self, query: &str) -> Vec<Hit> {
        self.engine
            .search(&self.expand(query), None)
            .into_iter()
            .map(|r| Hit {
                index: r.document.id,
                score: r.score,
            })
            .filter(|h| h.score > 0.0)
            .collect()
    }

    /// The index in [`Kb::passages`] of passage `id`.
    pub fn index_of(&self, id: &str) -> Option<usize> {
        self.passages.iter().position(|p| p.id == id)
    }

    pub fn get(&self, id: &str) -> Option<&Passage> {
        self.passages.iter().find(|p| p.id == id)
    }

    /// The knowledge base's synonyms for the search: `text` with each phrase of
    /// `synonyms.txt` replaced by the knowledge base's words for it ("restroom" becomes
    /// "toilets"); unchanged when there are none.
    pub fn expand(&self, text: &str) -> String {
        if self.synonyms.is_empty() {
            return text.to_string();
        }
        let w = words(text);
        let mut out: Vec<String> = Vec::new();
        let mut i = 0;
        while i < w.len() {
            let hit = self
                .synonyms
                .iter()
                .find(|(p, _)| w.len() - i >= p.len() && w[i..i + p.len()] == p[..]);
            match hit {
                Some((p, canon)) => {
                    out.push(canon.clone());
                    i += p.len();
                }
                None => {
                    out.push(w[i].clone());
                    i += 1;
                }
            }
        }
        out.join(" ")
    }

    /// The terms of a question: its words with the synonyms applied, as the retriever sees
    /// them.
    pub fn query_terms(&self, text: &str) -> Vec<String> {
        self.terms(&self.expand(text))
    }

    /// `text` as the retriever sees it: lowercase, stop words out, stemmed.
    pub fn terms(&self, text: &str) -> Vec<String> {
        self.tokenizer.tokenize(text)
    }

    /// Whether any passage (title or text) holds `term` (a term as [`Kb::terms`] gives it).
    pub fn knows(&self, term: &str) -> bool {
        self.doc_freq.contains_key(term)
    }

    /// Inverse document frequency, `ln(1 + N / (1 + df))`: a term the knowledge base never
    /// uses weighs most, so questions about things it does not hold score low.
    pub fn idf(&self, term: &str) -> f64 {
        let n = self.passages.len() as f64;
        let df = self.doc_freq.get(term).copied().unwrap_or(0) as f64;
        (1.0 + n / (1.0 + df)).ln()
    }
}

/// A passage of file `t.md` for unit tests.
#[cfg(test)]
pub(crate) fn test_passage(id: &str, title: &str, text: &str) -> Passage {
    Passage {
        id: id.into(),
        title: title.into(),
        text: text.into(),
        source: "t.md".into(),
    }
}

/// A knowledge base in folder `kb` of `(id, title, text)` passages, for unit tests.
#[cfg(test)]
pub(crate) fn test_kb(passages: &[(&str, &str, &str)]) -> Kb {
    let passages = passages
        .iter()
        .map(|&(id, title, text)| test_passage(id, title, text))
        .collect();
    Kb::from_passages(Path::new("kb"), passages).expect("test passages are valid")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(id: &str, title: &str, text: &str) -> Passage {
        test_passage(id, title, text)
    }

    #[test]
    fn markdown_sections_become_passages() {
        let src = "# Hours\nintro ignored\n## Sunday opening {#hours-sunday}\nOpen 10:00 to 16:00.\n\n## Public holidays\nClosed on 25 December.\n";
        let ps = parse_markdown(src, Path::new("hours.md"));
        assert_eq!(ps.len(), 2);
        assert_eq!(ps[0].id, "hours-sunday");
        assert_eq!(ps[0].title, "Sunday opening");
        assert_eq!(ps[0].text, "Open 10:00 to 16:00.");
        assert_eq!(ps[1].id, "public-holidays");
        assert_eq!(ps[1].one_line(), "Public holidays: Closed on 25 December.");
    }

    #[test]
    fn jsonl_errors_name_the_line() {
        let e = parse_jsonl(
            "{\"id\":\"a\",\"text\":\"x\"}\nnot json\n",
            Path::new("f.jsonl"),
        )
        .unwrap_err();
        assert!(e.to_string().contains("line 2"), "{e}");
        let e = parse_jsonl("{\"id\":\"\",\"text\":\"x\"}\n", Path::new("f.jsonl")).unwrap_err();
        assert!(e.to_string().contains("must not be empty"), "{e}");
    }

    #[test]
    fn bm25_ranks_the_matching_passage_first() {
        let kb = Kb::from_passages(
            Path::new("kb"),
            vec![
                p(
                    "hours",
                    "Opening hours",
                    "We open at 9:00 and close at 18:00 on weekdays.",
                ),
                p(
                    "returns",
                    "Returns",
                    "Items can be returned within 30 days with a receipt.",
                ),
                p(
                    "card",
                    "Lost card",
                    "Report a lost loyalty card at the service desk.",
                ),
                p(
                    "parking",
                    "Parking",
                    "The car park closes one hour after the market.",
                ),
            ],
        )
        .unwrap();
        let top = |q: &str| kb.passages[kb.search(q, 1)[0].index].id.clone();
        assert_eq!(top("when do you close on weekdays"), "hours");
        assert_eq!(top("can I return a jacket without a receipt"), "returns");
        assert_eq!(top("I lost my card"), "card");
        assert_eq!(top("where can I park the car"), "parking");
        // Stemming: "returning" finds "returned".
        assert_eq!(top("returning items"), "returns");
        assert!(kb.search("zebra quantum", 3).is_empty());
        let hits = kb.search("card closes hour", 3);
        assert!(hits.windows(2).all(|w| w[0].score >= w[1].score));
    }

    #[test]
    fn synonyms_replace_the_customers_phrase() {
        let src = "# comment\ntoilets: restroom, loo\n31 December: new year's eve\n";
        let mut kb = Kb::from_passages(
            Path::new("kb"),
            vec![
                p("dir-toilets", "Toilets", "Toilets are on the ground floor."),
                p(
                    "hours",
                    "Holidays",
                    "On 31 December the hall closes at 14:00.",
                ),
            ],
        )
        .unwrap();
        kb.synonyms = parse_synonyms(src, Path::new("synonyms.txt")).unwrap();
        assert_eq!(kb.expand("Where is the Restroom?"), "where is the toilets");
        assert_eq!(
            kb.expand("Open on New Year\u{2019}s Eve?"),
            "open on 31 December"
        );
        assert_eq!(
            kb.passages[kb.search("restroom", 1)[0].index].id,
            "dir-toilets"
        );
        assert!(parse_synonyms("no colon here", Path::new("s.txt"))
            .unwrap_err()
            .to_string()
            .contains("line 1"));
    }

    #[test]
    fn duplicate_ids_are_refused() {
        let e = Kb::from_passages(Path::new("kb"), vec![p("a", "", "one"), p("a", "", "two")])
            .unwrap_err();
        assert!(e.to_string().contains("`a` appears twice"), "{e}");
        assert!(Kb::from_passages(Path::new("kb"), vec![]).is_err());
    }
}
