//! Owns the model's chat template: `ChatTemplate` (rendering a conversation as transformers'
//! `apply_chat_template` does) and `assistant_spans` (the byte ranges the loss counts).
//! Layer: data — may import the ground, linalg, backend and model; no sibling.
//!
//! The template is Jinja, rendered with minijinja set up as transformers sets up Jinja2:
//! `trim_blocks` and `lstrip_blocks`, `tojson` as Python's `json.dumps` (no HTML escaping,
//! `indent`, `separators`, `sort_keys`), `raise_exception`, `strftime_now` (UTC), the
//! Python string and dict methods (`.strip()`, `.startswith()`, `.items()`, … from
//! minijinja-contrib), and the variables `messages`, `tools` and `documents` (none),
//! `add_generation_prompt` and the tokenizer's named special tokens (`bos_token`, …).
//!
//! Assistant spans: for assistant message i of a conversation rendered as text T, the turn
//! starts where the rendering of messages 0..i with `add_generation_prompt` ends (it must be
//! a prefix of T), and its content ends at the first byte where T differs from the rendering
//! with a marker appended to message i's content. Whatever the template puts between (a
//! `<think>` block) counts as the assistant's.

use std::collections::BTreeMap;
use std::ops::Range;
use std::path::Path;

use minijinja::value::{Kwargs, Serde, Value};
use minijinja::{Environment, ErrorKind};

use crate::error::{Error, Result};

/// Appended to an assistant message's content to find where the content ends.
const MARK: &str = "\u{e000}";

/// The named special tokens transformers passes to a template.
const NAMED_TOKENS: [&str; 7] = [
    "bos_token",
    "eos_token",
    "unk_token",
    "sep_token",
    "pad_token",
    "cls_token",
    "mask_token",
];

/// A compiled chat template and the variables it is rendered with.
pub struct ChatTemplate {
    env: Environment<'static>,
    /// Where the template came from, for messages.
    origin: String,
    /// Named special tokens and extra variables (`date_string`, …).
    vars: BTreeMap<String, serde_json::Value>,
}

impl std::fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ChatTemplate({})", self.origin)
    }
}

/// Python's `json.dumps(value, ensure_ascii=False, indent=…, separators=…, sort_keys=…)`.
fn py_json(v: &serde_json::Value, indent: Option<usize>, seps: (&str, &str), sort: bool) -> String {
    fn go(
        v: &serde_json::Value,
        ind: Option<usize>,
        level: usize,
        seps: (&str, &str),
        sort: bool,
        out: &mut String,
    ) {
        let nl = |out: &mut String, level: usize| {
            if let Some(n) = ind {
                out.push('\n');
                out.push_str(&" ".repeat(n * level));
            }
        };
        match v {
            serde_json::Value::Array(items) if !items.is_empty() => {
                out.push('[');
                for (k, item) in items.iter().enumerate() {
                    if k > 0 {
                        out.push_str(seps.0);
                    }
                    nl(out, level + 1);
                    go(item, ind, level + 1, seps, sort, out);
                }
                nl(out, level);
                out.push(']');
            }
            serde_json::Value::Object(map) if !map.is_empty() => {
                out.push('{');
                let mut entries: Vec<(&String, &serde_json::Value)> = map.iter().collect();
                if sort {
                    entries.sort_by(|a, b| a.0.cmp(b.0));
                }
                for (k, (key, item)) in entries.into_iter().enumerate() {
                    if k > 0 {
                        out.push_str(seps.0);
                    }
                    nl(out, level + 1);
                    out.push_str(&serde_json::Value::String(key.clone()).to_string());
                    out.push_str(seps.1);
                    go(item, ind, level + 1, seps, sort, out);
                }
                nl(out, level);
                out.push('}');
            }
            other => out.push_str(&other.to_string()),
        }
    }
    let mut out = String::new();
    go(v, indent, 0, seps, sort, &mut out);
    out
}

fn tojson(value: Value, kwargs: Kwargs) -> std::result::Result<String, minijinja::Error> {
    let indent: Option<usize> = kwargs.get("indent")?;
    let sort: Option<bool> = kwargs.get("sort_keys")?;
    let _ascii: Option<bool> = kwargs.get("ensure_ascii")?;
    let seps: Option<Vec<String>> = kwargs.get("separators")?;
    kwargs.assert_all_used()?;
    let v: serde_json::Value = serde_json::to_value(&value)
        .map_err(|e| minijinja::Error::new(ErrorKind::InvalidOperation, format!("tojson: {e}")))?;
    let default = if indent.is_some() { "," } else { ", " };
    let (item, key) = match &seps {
        Some(s) if s.len() == 2 => (s[0].as_str(), s[1].as_str()),
        _ => (default, ": "),
    };
    Ok(py_json(&v, indent, (item, key), sort.unwrap_or(false)))
}

/// Python's `datetime.strftime` for the directives chat templates use.
pub fn strftime(t: time::OffsetDateTime, format: &str) -> String {
    const DAYS: [&str; 7] = [
        "Monday",
        "Tuesday",
        "Wednesday",
        "Thursday",
        "Friday",
        "Saturday",
        "Sunday",
    ];
    let month = t.month().to_string();
    let day = DAYS[t.weekday().number_days_from_monday() as usize];
    let mut out = String::new();
    let mut chars = format.chars();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('d') => out.push_str(&format!("{:02}", t.day())),
            Some('m') => out.push_str(&format!("{:02}", u8::from(t.month()))),
            Some('Y') => out.push_str(&t.year().to_string()),
            Some('y') => out.push_str(&format!("{:02}", t.year().rem_euclid(100))),
            Some('b') => out.push_str(&month[..3]),
            Some('B') => out.push_str(&month),
            Some('a') => out.push_str(&day[..3]),
            Some('A') => out.push_str(day),
            Some('H') => out.push_str(&format!("{:02}", t.hour())),
            Some('I') => out.push_str(&format!("{:02}", (t.hour() + 11) % 12 + 1)),
            Some('p') => out.push_str(if t.hour() < 12 { "AM" } else { "PM" }),
            Some('M') => out.push_str(&format!("{:02}", t.minute())),
            Some('S') => out.push_str(&format!("{:02}", t.second())),
            Some('j') => out.push_str(&format!("{:03}", t.ordinal())),
            Some('%') => out.push('%'),
            Some(other) => {
                out.push('%');
                out.push(other);
            }
            None => out.push('%'),
        }
    }
    out
}

/// The token a `tokenizer_config.json` entry names: a string or `{"content": …}`.
fn token_text(v: &serde_json::Value) -> Option<String> {
    match v {
        serde_json::Value::String(s) => Some(s.clone()),
        serde_json::Value::Object(m) => m.get("content")?.as_str().map(str::to_string),
        _ => None,
    }
}

impl ChatTemplate {
    /// Compiles `source`; `vars` are the named special tokens and any extra variables.
    pub fn new(
        source: &str,
        origin: &str,
        vars: BTreeMap<String, serde_json::Value>,
    ) -> Result<ChatTemplate> {
        let mut env = Environment::new();
        let mut syntax = minijinja::syntax::SyntaxConfig::builder();
        syntax.trim_blocks(true).lstrip_blocks(true);
        env.set_syntax(
            syntax
                .build()
                .map_err(|e| Error::Data(format!("{origin}: {e}")))?,
        );
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_filter("tojson", tojson);
        env.add_function(
            "raise_exception",
            |msg: String| -> std::result::Result<Value, minijinja::Error> {
                Err(minijinja::Error::new(ErrorKind::InvalidOperation, msg))
            },
        );
        env.add_function("strftime_now", |format: String| {
            strftime(time::OffsetDateTime::now_utc(), &format)
        });
        env.add_template_owned("chat", source.to_string())
            .map_err(|e| {
                Error::Data(format!(
                    "{origin}: the chat template does not compile ({e}); fix or replace the model's \
                     chat template"
                ))
            })?;
        Ok(ChatTemplate {
            env,
            origin: origin.to_string(),
            vars,
        })
    }

    /// The model's template as transformers loads it: `chat_template.jinja` when present,
    /// else `tokenizer_config.json`'s `chat_template` (a string, or a list of
    /// `{name, template}` whose `default` is used), with the config's named special tokens.
    /// `None` when the model has no template.
    pub fn from_model_files(
        tokenizer_config: Option<&Path>,
        jinja: Option<&Path>,
    ) -> Result<Option<ChatTemplate>> {
        let config: serde_json::Value = match tokenizer_config {
            Some(p) => {
                let text = std::fs::read_to_string(p).map_err(|e| Error::io("reading", p, e))?;
                serde_json::from_str(&text)
                    .map_err(|e| Error::Data(format!("{}: not valid JSON: {e}", p.display())))?
            }
            None => serde_json::Value::Null,
        };
        let mut vars = BTreeMap::new();
        for name in NAMED_TOKENS {
            if let Some(t) = config.get(name).and_then(token_text) {
                vars.insert(name.to_string(), serde_json::Value::String(t));
            }
        }
        if let Some(p) = jinja {
            let source = std::fs::read_to_string(p).map_err(|e| Error::io("reading", p, e))?;
            return ChatTemplate::new(&source, &p.display().to_string(), vars).map(Some);
        }
        let origin = match tokenizer_config {
            Some(p) => format!("{} (chat_template)", p.display()),
            None => return Ok(None),
        };
        let source = match config.get("chat_template") {
            Some(serde_json::Value::String(s)) => s.clone(),
            Some(serde_json::Value::Array(list)) => list
                .iter()
                .find(|t| t.get("name").and_then(|n| n.as_str()) == Some("default"))
                .and_then(|t| t.get("template")?.as_str())
                .map(str::to_string)
                .ok_or_else(|| {
                    Error::Data(format!(
                        "{origin}: a list of templates without one named `default`"
                    ))
                })?,
            _ => return Ok(None),
        };
        ChatTemplate::new(&source, &origin, vars).map(Some)
    }

    /// Adds a variable the template sees (for example `date_string`).
    pub fn set_var(&mut self, name: &str, value: serde_json::Value) {
        self.vars.insert(name.to_string(), value);
    }

    /// Renders `messages` (a JSON list of `{role, content, …}`).
    pub fn render(
        &self,
        messages: &[serde_json::Value],
        add_generation_prompt: bool,
    ) -> Result<String> {
        // transformers fills `reasoning_content` (and `thinking`) from either name.
        let messages: Vec<serde_json::Value> = messages
            .iter()
            .map(|m| {
                let mut m = m.clone();
                if let Some(obj) = m.as_object_mut() {
                    let r = ["reasoning_content", "thinking", "reasoning"]
                        .iter()
                        .find_map(|k| obj.get(*k).filter(|v| !v.is_null()).cloned());
                    if let Some(r) = r {
                        obj.insert("reasoning_content".into(), r.clone());
                        obj.entry("thinking").or_insert(r);
                    }
                }
                m
            })
            .collect();
        let mut ctx: BTreeMap<String, Value> = self
            .vars
            .iter()
            .map(|(k, v)| (k.clone(), Value::from(Serde(v))))
            .collect();
        ctx.insert("messages".into(), Value::from(Serde(&messages)));
        ctx.insert("tools".into(), Value::from(()));
        ctx.insert("documents".into(), Value::from(()));
        ctx.insert(
            "add_generation_prompt".into(),
            Value::from(add_generation_prompt),
        );
        let tmpl = self.env.get_template("chat").expect("added in new");
        tmpl.render(ctx).map_err(|e| {
            Error::Data(format!(
                "{}: rendering a conversation failed: {e}",
                self.origin
            ))
        })
    }

    /// The conversation's text and, for each assistant message, the byte range from the
    /// start of its turn to the end of its content (see the module docs).
    pub fn assistant_spans(
        &self,
        messages: &[serde_json::Value],
    ) -> Result<(String, Vec<Range<usize>>)> {
        let text = self.render(messages, false)?;
        let mut spans = Vec::new();
        for (i, m) in messages.iter().enumerate() {
            if m.get("role").and_then(|r| r.as_str()) != Some("assistant") {
                continue;
            }
            let prefix = self.render(&messages[..i], true)?;
            if !text.starts_with(&prefix) {
                return Err(Error::Data(format!(
                    "{}: the conversation up to message {i} renders differently from the start of \
                     the whole conversation, so the assistant turns cannot be found for the loss \
                     mask; use shape `prompt_completion` for such data",
                    self.origin
                )));
            }
            let content = m.get("content").and_then(|c| c.as_str()).ok_or_else(|| {
                Error::Data(format!(
                    "message {i}: an assistant message's `content` must be a string"
                ))
            })?;
            let mut marked = messages.to_vec();
            marked[i]["content"] = serde_json::Value::String(format!("{content}{MARK}"));
            let other = self.render(&marked, false)?;
            let end = text
                .bytes()
                .zip(other.bytes())
                .position(|(a, b)| a != b)
                .unwrap_or(text.len().min(other.len()));
            spans.push(prefix.len()..end.max(prefix.len()));
        }
        Ok((text, spans))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_as_python_dumps() {
        let v: serde_json::Value = serde_json::json!({"b": [1, "é<"], "a": {}});
        assert_eq!(
            py_json(&v, None, (", ", ": "), true),
            r#"{"a": {}, "b": [1, "é<"]}"#
        );
        assert_eq!(
            py_json(&v, Some(2), (",", ": "), true),
            "{\n  \"a\": {},\n  \"b\": [\n    1,\n    \"é<\"\n  ]\n}"
        );
    }

    #[test]
    fn strftime_directives() {
        let t = time::macros::datetime!(2024-07-26 15:04:05 UTC);
        assert_eq!(strftime(t, "%d %b %Y"), "26 Jul 2024");
        assert_eq!(
            strftime(t, "%A %B %y %I%p %j %%"),
            "Friday July 24 03PM 208 %"
        );
    }
}
