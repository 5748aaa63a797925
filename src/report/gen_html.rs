//! Owns the report's view of what the model says: `generation` and `improbable_badge`.
//! Layer: report — may import every floor from the ground up to pipeline and, in this folder,
//! colour.rs, data.rs, gen_data.rs, text.rs.
//!
//! A generated query shows the model's greedy generation token by token, each token shaded
//! by how unlikely the model found it (1 − p) with log p on hover; clicking a token shows its
//! top proponent documents (τ for that token alone) with their tokens shaded by τ, where
//! the score stage kept per-token scores (page.js switches the panels; the first token's is
//! shown at load).

use std::fmt::Write;

use super::colour::Diverging;
use super::data::QueryReport;
use super::gen_data::{GenDoc, Generated, IMPROBABLE_NATS_PER_TOKEN};
use super::text::{escape, num};

/// A badge for a query whose given completion the model finds improbable (empty otherwise).
pub fn improbable_badge(q: &QueryReport) -> String {
    match q.improbable {
        Some(n) => format!(
            " <span class=\"badge miss improbable\" title=\"mean −log p per completion token \
             above {:.2} nats (p below 10% per token): the model would not say this; the \
             attribution explains a completion it does not produce\">⚠ improbable \
             completion: {} nats per token</span>",
            IMPROBABLE_NATS_PER_TOKEN,
            num(n)
        ),
        None => String::new(),
    }
}

/// The generation block of a generated query (empty for other queries).
pub fn generation(q: &QueryReport) -> String {
    let Some(tokens) = &q.generation else {
        return String::new();
    };
    if tokens.is_empty() {
        return String::new();
    }
    let mut o = String::from(
        "<div class=\"gen\"><h3>What the model says <span class=\"nt\">(its own greedy \
         generation; shade: 1 − p; click a token for the documents behind it)</span></h3>\
         <div class=\"gentext\">",
    );
    let _ = write!(o, "<span class=\"prompt\">{}</span>", escape(&q.prompt));
    for t in tokens {
        let p = t.logprob.exp();
        let _ = write!(
            o,
            "<span class=\"g\" data-gi=\"{}\" data-lp=\"log p = {} (p = {})\" \
             style=\"background:rgba(230,120,20,{:.3})\">{}</span>",
            t.gen_index,
            num(t.logprob),
            num(p),
            (1.0 - p).clamp(0.06, 0.85),
            escape(&visible(&t.text))
        );
    }
    o.push_str("</div>");
    for t in tokens {
        o.push_str(&panel(t));
    }
    o.push_str("</div>");
    o
}

/// A token's text with its whitespace made visible enough to click (a newline as ↵).
fn visible(text: &str) -> String {
    if text.is_empty() {
        "\u{200b}".into()
    } else {
        text.replace('\n', "↵\n")
    }
}

/// The hidden panel of one generated token: its top proponents, tokens shaded by τ.
fn panel(t: &Generated) -> String {
    let mut o = format!(
        "<div class=\"genpanel\" data-gi=\"{}\" hidden><p class=\"note\">Generated token {} \
         <b>{}</b> · log p = {} · ",
        t.gen_index,
        t.gen_index,
        escape(&format!("{:?}", t.text)),
        num(t.logprob)
    );
    if t.docs.is_empty() {
        o.push_str("no document has τ &gt; 0 for this token.</p></div>");
        return o;
    }
    o.push_str("its top proponents (τ for this token alone):</p>");
    let scale = Diverging::spanning(t.docs.iter().flat_map(|d| {
        let n = f64::from(d.n_train.max(1));
        d.tokens.iter().flatten().map(move |s| s.score / n)
    }));
    for (i, d) in t.docs.iter().enumerate() {
        o.push_str(&doc(d, &scale, i == 0));
    }
    o.push_str("</div>");
    o
}

fn doc(d: &GenDoc, scale: &Diverging, open: bool) -> String {
    let mut o = format!(
        "<details class=\"doc\"{}><summary><b>#{}</b> <span class=\"id\">{}</span>\
         <span class=\"tau\">τ = {}</span></summary><div class=\"text\">",
        if open { " open" } else { "" },
        d.rank,
        escape(&d.train_id),
        num(d.tau)
    );
    let n = f64::from(d.n_train.max(1));
    match &d.tokens {
        Some(tokens) => {
            for s in tokens {
                let tau = s.score / n;
                let _ = write!(
                    o,
                    "<span class=\"t\" style=\"background:{};color:{}\" data-s=\"τ {}\">{}</span>",
                    scale.colour(tau).hex(),
                    scale.text_colour(tau),
                    num(tau),
                    escape(&s.text)
                );
            }
        }
        None => o.push_str(&escape(&d.text)),
    }
    o.push_str("</div></details>");
    o
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::report::gen_data::Shade;

    fn query(generation: Option<Vec<Generated>>, improbable: Option<f64>) -> QueryReport {
        QueryReport {
            query_id: "q".into(),
            prompt: "The <river>".into(),
            completion: " flows".into(),
            measurement: 1.0,
            known_sources: Vec::new(),
            best_known_rank: None,
            known_ranks: Vec::new(),
            n_scored: 2,
            proponents: Vec::new(),
            opponents: Vec::new(),
            generation,
            improbable,
        }
    }

    #[test]
    fn a_generated_token_shows_its_log_p_and_a_panel_of_shaded_proponents() {
        let g = vec![
            Generated {
                gen_index: 0,
                text: " flows".into(),
                logprob: -0.1,
                docs: vec![GenDoc {
                    train_id: "d<1>".into(),
                    dataset: "train".into(),
                    rank: 1,
                    tau: 0.5,
                    n_train: 2,
                    text: "a b".into(),
                    tokens: Some(vec![
                        Shade {
                            text: "a".into(),
                            score: 0.8,
                        },
                        Shade {
                            text: " b".into(),
                            score: 0.2,
                        },
                    ]),
                }],
            },
            Generated {
                gen_index: 1,
                text: "\n".into(),
                logprob: -3.0,
                docs: Vec::new(),
            },
        ];
        let html = generation(&query(Some(g), None));
        assert!(html.contains("The &lt;river&gt;"), "prompt escaped");
        assert_eq!(html.matches("class=\"g\"").count(), 2);
        assert_eq!(html.matches("class=\"genpanel\"").count(), 2);
        assert!(html.contains("data-lp=\"log p = -0.1"), "{html}");
        assert!(html.contains("d&lt;1&gt;") && html.contains("data-s=\"τ 0.4"));
        assert!(html.contains("no document has τ &gt; 0"));
        assert!(html.contains("↵"), "a newline token stays visible");
        assert!(generation(&query(None, None)).is_empty());
        assert!(improbable_badge(&query(None, None)).is_empty());
        assert!(improbable_badge(&query(None, Some(4.5))).contains("improbable completion: 4.5"));
    }
}
