//! Owns the planted-facts generator: `FactsSpec`, `generate`, `FactSet`, `write_fact_set`.
//! Layer: eval — may import ground, model, data, hub, train, curvature, attribution; in this
//! folder, `facts_text`.
//!
//! An evaluation set whose right answers are known by construction: invented entities (names
//! from random syllables, so no pretrained model knows them) and *planted facts* linking
//! them, each a (subject, relation, object) triple:
//!
//! - every planted fact is stated by `statements` fine-tuning documents, each with a different
//!   template of its relation ("The river Navo flows into Lake Thekal.", "Lake Thekal is fed
//!   by the river Navo …"): these are the query's `known_sources`, and the object's mentions
//!   in them its `fact_spans`;
//! - `distractors` documents per fact name the same subject with other attributes and never
//!   the object ("The river Navo is wide and slow in summer."), so that sharing the subject's
//!   tokens is not enough to rank first;
//! - `filler` documents state other facts of the same relations about other invented entities
//!   (never queried), in the same templates, so that sharing the template is not enough either;
//! - one query per planted fact: the relation's question prompt ("The river Navo flows into")
//!   and the object as its completion (" Lake Thekal.").
//!
//! The same `seed` gives the same bytes; another seed draws other names, so a set drawn with a
//! second seed can be held out from every choice made on the first.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use serde::Serialize;

use super::facts_text::{Relation, RELATIONS};
use crate::error::{Error, Result};
use crate::util::rng::SplitMix64;

/// A uniform index in 0..n.
fn pick(rng: &mut SplitMix64, n: usize) -> usize {
    rng.below(n as u64) as usize
}

/// What to generate.
#[derive(Debug, Clone, PartialEq)]
pub struct FactsSpec {
    /// Seed of every random choice (names, templates, order).
    pub seed: u64,
    /// Planted facts, one query each, spread over the relations in turn.
    pub facts: usize,
    /// Documents stating each planted fact, each with another template (1 ..= 4).
    pub statements: usize,
    /// Documents per planted fact naming its subject with other attributes.
    pub distractors: usize,
    /// Documents stating facts that no query asks about.
    pub filler: usize,
}

impl Default for FactsSpec {
    fn default() -> Self {
        FactsSpec {
            seed: 1,
            facts: 24,
            statements: 3,
            distractors: 2,
            filler: 200,
        }
    }
}

/// A fine-tuning document.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct FactDoc {
    pub id: String,
    pub text: String,
}

/// A query: the question prompt of a planted fact, its answer, the documents that state it
/// and, per such document, the character spans [start, end) of the answer in its text.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct FactQuery {
    pub id: String,
    pub prompt: String,
    pub completion: String,
    pub known_sources: Vec<String>,
    pub fact_spans: BTreeMap<String, Vec<[usize; 2]>>,
}

/// A generated evaluation set: the fine-tuning documents (shuffled) and the queries.
#[derive(Debug, Clone, PartialEq)]
pub struct FactSet {
    pub train: Vec<FactDoc>,
    pub queries: Vec<FactQuery>,
}

const ONSETS: [&str; 18] = [
    "b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "br", "dr", "st", "tr",
];
const VOWELS: [&str; 6] = ["a", "e", "i", "o", "u", "ae"];
const CODAS: [&str; 8] = ["", "n", "r", "l", "s", "sk", "nd", "th"];

/// Draws invented names, each new: 2–3 syllables and a coda, capitalised.
struct Names {
    rng: SplitMix64,
    used: BTreeSet<String>,
}

impl Names {
    fn draw(&mut self) -> String {
        loop {
            let n = 2 + pick(&mut self.rng, 2);
            let mut s = String::new();
            for _ in 0..n {
                s.push_str(ONSETS[pick(&mut self.rng, ONSETS.len())]);
                s.push_str(VOWELS[pick(&mut self.rng, VOWELS.len())]);
            }
            s.push_str(CODAS[pick(&mut self.rng, CODAS.len())]);
            let mut c = s.chars();
            let name = c
                .next()
                .map(|f| f.to_uppercase().collect::<String>() + c.as_str())
                .unwrap_or_default();
            // A name must not be a prefix of another (the spans and the recall of a name's
            // first token would otherwise be ambiguous), nor repeat.
            let clash = self
                .used
                .iter()
                .any(|u| u.starts_with(&name) || name.starts_with(u.as_str()));
            if !clash {
                self.used.insert(name.clone());
                return name;
            }
        }
    }
}

/// Fills a template's `{s}` (subject), `{o}` (object) and `{x}` (another name).
fn fill(template: &str, s: &str, o: &str, x: &str) -> String {
    template
        .replace("{s}", s)
        .replace("{o}", o)
        .replace("{x}", x)
}

/// Every occurrence of `needle` in `text` as a character span [start, end) (Unicode scalar
/// values, the `fact_spans` convention).
fn char_spans(text: &str, needle: &str) -> Vec<[usize; 2]> {
    text.match_indices(needle)
        .map(|(b, _)| {
            let start = text[..b].chars().count();
            [start, start + needle.chars().count()]
        })
        .collect()
}

/// Checks the spec's ranges; the message names the field and what is allowed.
pub fn check_spec(spec: &FactsSpec) -> Result<()> {
    let max = RELATIONS
        .iter()
        .map(|r| r.statements.len())
        .min()
        .unwrap_or(0);
    if spec.facts == 0 {
        return Err(Error::Data(
            "planted facts: facts = 0; generate at least one fact".into(),
        ));
    }
    if !(1..=max).contains(&spec.statements) {
        return Err(Error::Data(format!(
            "planted facts: statements = {} is out of range; allowed: 1 ..= {max} (one \
             template each)",
            spec.statements
        )));
    }
    Ok(())
}

/// Generates the set `spec` describes (see the module documentation).
pub fn generate(spec: &FactsSpec) -> Result<FactSet> {
    check_spec(spec)?;
    let mut rng = SplitMix64::stream(spec.seed, 1);
    let mut names = Names {
        rng: SplitMix64::stream(spec.seed, 2),
        used: BTreeSet::new(),
    };
    let mut train = Vec::new();
    let mut queries = Vec::new();
    for k in 0..spec.facts {
        let rel: &Relation = &RELATIONS[k % RELATIONS.len()];
        let (s, o) = (names.draw(), names.draw());
        let answer = fill(rel.answer, &s, &o, "");
        // Each statement a different template, in a seeded order.
        let order = rng.permutation(rel.statements.len());
        let mut sources = Vec::new();
        let mut spans = BTreeMap::new();
        for (j, &t) in order.iter().take(spec.statements).enumerate() {
            let text = fill(rel.statements[t], &s, &o, "");
            let id = format!("fact-{k:03}-{j}");
            let found = char_spans(&text, &answer);
            if found.is_empty() {
                return Err(Error::Data(format!(
                    "template `{}` does not state the answer `{answer}`",
                    rel.statements[t]
                )));
            }
            spans.insert(id.clone(), found);
            train.push(FactDoc {
                id: id.clone(),
                text,
            });
            sources.push(id);
        }
        for j in 0..spec.distractors {
            let t = rel.distractors[pick(&mut rng, rel.distractors.len())];
            let text = fill(t, &s, "", &names.draw());
            train.push(FactDoc {
                id: format!("distractor-{k:03}-{j}"),
                text,
            });
        }
        queries.push(FactQuery {
            id: format!("q-{k:03}"),
            prompt: fill(rel.prompt, &s, &o, ""),
            completion: fill(rel.completion, &s, &o, ""),
            known_sources: sources,
            fact_spans: spans,
        });
    }
    for i in 0..spec.filler {
        let rel = &RELATIONS[pick(&mut rng, RELATIONS.len())];
        let (s, o) = (names.draw(), names.draw());
        let t = rel.statements[pick(&mut rng, rel.statements.len())];
        train.push(FactDoc {
            id: format!("filler-{i:04}"),
            text: fill(t, &s, &o, ""),
        });
    }
    let order = rng.permutation(train.len());
    let train = order.into_iter().map(|i| train[i].clone()).collect();
    Ok(FactSet { train, queries })
}

/// One JSON object per line.
fn jsonl<T: Serialize>(rows: &[T]) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    for r in rows {
        let line = serde_json::to_string(r)
            .map_err(|e| Error::Data(format!("planted facts: serialising a row: {e}")))?;
        out.extend_from_slice(line.as_bytes());
        out.push(b'\n');
    }
    Ok(out)
}

/// Writes `train.jsonl` (id, text), `queries.jsonl` (id, prompt, completion,
/// known_sources, fact_spans) and `prompts.jsonl` (id, prompt: the queries for the model to
/// answer itself, e.g. with `source-tda ask`) into `dir`, each atomically, and `README.md`
/// saying how the set was made.
pub fn write_fact_set(set: &FactSet, spec: &FactsSpec, dir: &Path) -> Result<()> {
    use crate::error::IoContext;
    use crate::util::fsx::write_atomic;
    std::fs::create_dir_all(dir).ctx("creating directory", dir)?;
    write_atomic(&dir.join("train.jsonl"), &jsonl(&set.train)?)?;
    write_atomic(&dir.join("queries.jsonl"), &jsonl(&set.queries)?)?;
    let prompts: Vec<serde_json::Value> = (set.queries.iter())
        .map(|q| serde_json::json!({"id": q.id, "prompt": q.prompt}))
        .collect();
    write_atomic(&dir.join("prompts.jsonl"), &jsonl(&prompts)?)?;
    let readme = format!(
        "# Planted facts (source-tda)\n\nGenerated by source-tda's `eval::facts` with seed \
         {}: {} planted facts, each stated by {} documents with different templates; {} \
         distractor documents per fact (its subject with other attributes, never the answer); \
         {} filler documents (facts about other entities, never asked).\n\n`train.jsonl`: the \
         fine-tuning documents (id, text). `queries.jsonl`: one query per planted fact (id, \
         prompt, completion) with its `known_sources` and `fact_spans` (per source, the \
         character spans [start, end) of the answer in its text). `prompts.jsonl`: the \
         queries' prompts alone, for the model to answer.\n",
        spec.seed, spec.facts, spec.statements, spec.distractors, spec.filler
    ) + &format!(
        "\nRelations, in turn: {}.\n",
        RELATIONS
            .iter()
            .map(|r| r.name)
            .collect::<Vec<_>>()
            .join(", ")
    );
    write_atomic(&dir.join("README.md"), readme.as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(seed: u64) -> FactsSpec {
        FactsSpec {
            seed,
            facts: 12,
            statements: 3,
            distractors: 2,
            filler: 40,
        }
    }

    fn chars(text: &str, [a, b]: [usize; 2]) -> String {
        text.chars().skip(a).take(b - a).collect()
    }

    #[test]
    fn a_seed_gives_the_same_set_and_another_seed_other_names() {
        let (a, b) = (generate(&spec(1)).unwrap(), generate(&spec(1)).unwrap());
        assert_eq!(a, b);
        let c = generate(&spec(2)).unwrap();
        assert_ne!(a.queries[0].prompt, c.queries[0].prompt);
        assert_eq!(a.train.len(), 12 * (3 + 2) + 40);
        assert_eq!(a.queries.len(), 12);
        let ids: BTreeSet<&str> = a.train.iter().map(|d| d.id.as_str()).collect();
        assert_eq!(ids.len(), a.train.len(), "ids are unique");
        // Shuffled: the sources of the first fact are not the first documents.
        assert_ne!(a.train[0].id, "fact-000-0");
    }

    #[test]
    fn only_the_known_sources_state_the_answer_and_the_spans_point_at_it() {
        let set = generate(&spec(7)).unwrap();
        let by_id: BTreeMap<&str, &str> = set
            .train
            .iter()
            .map(|d| (d.id.as_str(), d.text.as_str()))
            .collect();
        for (k, q) in set.queries.iter().enumerate() {
            let rel = &RELATIONS[k % RELATIONS.len()];
            let answer = q.completion.trim().trim_end_matches('.');
            assert_eq!(q.completion, format!(" {answer}."));
            // The answer's name appears in the sources and nowhere else.
            let object = answer.trim_start_matches("Lake ");
            let stating: Vec<&str> = set
                .train
                .iter()
                .filter(|d| d.text.contains(object))
                .map(|d| d.id.as_str())
                .collect();
            let mut known = q.known_sources.clone();
            known.sort();
            let mut stating: Vec<String> = stating.iter().map(|s| s.to_string()).collect();
            stating.sort();
            assert_eq!(stating, known, "{}", q.id);
            // Each source a different template; every span is the answer.
            let texts: BTreeSet<&str> = known.iter().map(|id| by_id[id.as_str()]).collect();
            assert_eq!(texts.len(), 3);
            for (id, spans) in &q.fact_spans {
                assert!(!spans.is_empty());
                for &s in spans {
                    assert_eq!(chars(by_id[id.as_str()], s), answer, "{id}");
                }
            }
            // The distractors name the subject, not the answer.
            let subject = q
                .prompt
                .split_whitespace()
                .find(|w| rel.prompt.split_whitespace().all(|t| t != *w))
                .unwrap();
            for j in 0..2 {
                let text = by_id[format!("distractor-{k:03}-{j}").as_str()];
                assert!(text.contains(subject) && !text.contains(object), "{text}");
            }
        }
    }

    #[test]
    fn every_template_states_its_answer_and_no_distractor_can() {
        for rel in &RELATIONS {
            let answer = fill(rel.answer, "Sub", "Obj", "");
            assert_eq!(
                fill(rel.completion, "Sub", "Obj", ""),
                format!(" {answer}.")
            );
            assert!(fill(rel.prompt, "Sub", "Obj", "").contains("Sub"));
            for t in rel.statements {
                let text = fill(t, "Sub", "Obj", "");
                assert!(
                    text.contains(&answer) && text.contains("Sub"),
                    "{}: {t}",
                    rel.name
                );
            }
            for t in rel.distractors {
                assert!(!t.contains("{o}") && t.contains("{s}"), "{}: {t}", rel.name);
            }
        }
    }

    #[test]
    fn bad_specs_are_refused_naming_the_field() {
        let e = generate(&FactsSpec {
            facts: 0,
            ..FactsSpec::default()
        })
        .unwrap_err();
        assert!(e.to_string().contains("facts = 0"), "{e}");
        let e = generate(&FactsSpec {
            statements: 5,
            ..FactsSpec::default()
        })
        .unwrap_err();
        assert!(e.to_string().contains("statements = 5"), "{e}");
    }

    #[test]
    fn the_set_is_written_as_jsonl_that_reads_back() {
        let dir = tempfile::tempdir().unwrap();
        let s = spec(3);
        let set = generate(&s).unwrap();
        write_fact_set(&set, &s, dir.path()).unwrap();
        let lines = |f: &str| -> Vec<serde_json::Value> {
            std::fs::read_to_string(dir.path().join(f))
                .unwrap()
                .lines()
                .map(|l| serde_json::from_str(l).unwrap())
                .collect()
        };
        let (train, queries) = (lines("train.jsonl"), lines("queries.jsonl"));
        let prompts = lines("prompts.jsonl");
        assert_eq!(prompts[1]["prompt"], set.queries[1].prompt);
        assert!(prompts[1].get("completion").is_none());
        assert_eq!(train.len(), set.train.len());
        assert_eq!(train[0]["text"], set.train[0].text);
        assert_eq!(
            queries[2]["known_sources"][1],
            set.queries[2].known_sources[1]
        );
        assert!(queries[0]["fact_spans"].is_object());
    }
}
