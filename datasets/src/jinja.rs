//! A model folder's Jinja `chat_template` (from `tokenizer_config.json`),
//! rendered the way `transformers`' `apply_chat_template` renders it:
//! `trim_blocks` and `lstrip_blocks`, Python's string methods
//! (`.strip()`, `.startswith()`, ...), `raise_exception`, `tojson` without
//! HTML escaping, and the special tokens as variables. minijinja is what
//! HF's own Rust servers use for this.
//!
//! A model folder's tokenizer carries its template
//! ([`crate::Tokenizer::chat_template`]); SFT conversations and PPO prompts
//! given as `messages` are rendered with it.

use std::path::Path;

use minijinja::{Environment, Error, ErrorKind};
use serde::Serialize;
use serde_json::Value;

/// One message of a conversation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Message {
    pub role: String,
    pub content: String,
}

impl Message {
    pub fn new(role: &str, content: &str) -> Self {
        Self {
            role: role.into(),
            content: content.into(),
        }
    }
}

/// Why a chat template could not be read or rendered.
#[derive(Debug, thiserror::Error)]
pub enum TemplateError {
    #[error("{path}: {message}")]
    Read { path: String, message: String },
    #[error("{0}")]
    Render(String),
}

/// A compiled chat template and the special tokens it may name.
#[derive(Debug)]
pub struct JinjaTemplate {
    env: Environment<'static>,
    /// `bos_token`, `eos_token`, ... as the tokenizer config gives them.
    tokens: serde_json::Map<String, Value>,
    /// Where it came from, for messages.
    origin: String,
}

const NAME: &str = "chat_template";

/// Steps one rendering may take: a real template renders a long
/// conversation in tens of thousands; this bounds one that loops without
/// end to well under a second.
const FUEL: u64 = 20_000_000;

/// Longest rendered conversation.
pub const MAX_RENDERED: usize = 16 << 20;

/// Output that refuses to grow past [`MAX_RENDERED`].
struct Capped {
    out: Vec<u8>,
    over: bool,
}

impl std::io::Write for Capped {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        if self.out.len() + bytes.len() > MAX_RENDERED {
            self.over = true;
            return Err(std::io::Error::other("the rendering is too long"));
        }
        self.out.extend_from_slice(bytes);
        Ok(bytes.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl JinjaTemplate {
    /// From a template's text and the special tokens it may use.
    pub fn new(
        template: &str,
        tokens: serde_json::Map<String, Value>,
    ) -> Result<Self, TemplateError> {
        let mut env = Environment::new();
        env.set_fuel(Some(FUEL));
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function(
            "raise_exception",
            |message: String| -> Result<String, Error> {
                Err(Error::new(ErrorKind::InvalidOperation, message))
            },
        );
        env.add_filter("tojson", tojson);
        env.add_template_owned(NAME, template.to_owned())
            .map_err(|e| TemplateError::Render(format!("chat template: {e}")))?;
        Ok(Self {
            env,
            tokens,
            origin: "the chat template".into(),
        })
    }

    /// Names where the template came from in its errors.
    pub fn with_origin(mut self, origin: impl Into<String>) -> Self {
        self.origin = origin.into();
        self
    }

    /// A model folder's template: `tokenizer_config.json`'s `chat_template`
    /// (a string, or the `default` of a list of named ones), else
    /// `chat_template.jinja`; `None` when the folder has neither.
    pub fn from_model_dir(dir: &Path) -> Result<Option<Self>, TemplateError> {
        let config_path = dir.join("tokenizer_config.json");
        let config = std::fs::read_to_string(&config_path).ok();
        let jinja = std::fs::read_to_string(dir.join("chat_template.jinja")).ok();
        Self::from_files(config.as_deref(), jinja.as_deref(), &config_path)
    }

    /// The template of a folder's `tokenizer_config.json` text (`config`,
    /// read from `config_path`) and `chat_template.jinja` text (`jinja`).
    pub fn from_files(
        config: Option<&str>,
        jinja: Option<&str>,
        config_path: &Path,
    ) -> Result<Option<Self>, TemplateError> {
        let config: serde_json::Map<String, Value> = match config {
            Some(text) => serde_json::from_str(text).map_err(|e| TemplateError::Read {
                path: config_path.display().to_string(),
                message: e.to_string(),
            })?,
            None => serde_json::Map::new(),
        };
        let in_config = format!("the chat template of {}", config_path.display());
        let (template, origin) = match &config.get("chat_template") {
            Some(Value::String(t)) => (Some(t.clone()), in_config),
            Some(Value::Array(named)) => (
                named
                    .iter()
                    .find(|t| t["name"] == "default")
                    .and_then(|t| t["template"].as_str().map(str::to_owned)),
                in_config,
            ),
            _ => (
                jinja.map(str::to_owned),
                format!(
                    "the chat template {}",
                    config_path.with_file_name("chat_template.jinja").display()
                ),
            ),
        };
        let Some(template) = template else {
            return Ok(None);
        };
        let tokens = config
            .iter()
            .filter(|(k, _)| k.ends_with("_token"))
            .filter_map(|(k, v)| special_token_text(v).map(|t| (k.clone(), Value::from(t))))
            .collect();
        Ok(Some(Self::new(&template, tokens)?.with_origin(origin)))
    }

    /// A special token the template may name (`eos_token`), as text.
    pub fn token(&self, name: &str) -> Option<String> {
        self.tokens.get(name)?.as_str().map(str::to_owned)
    }

    /// The conversation as the model reads it; with the generation prompt
    /// (the start of an assistant turn) for PPO and eval prompts.
    pub fn render(
        &self,
        messages: &[Message],
        add_generation_prompt: bool,
    ) -> Result<String, TemplateError> {
        let mut context = self.tokens.clone();
        context.insert(
            "messages".into(),
            serde_json::to_value(messages).expect("messages serialise"),
        );
        context.insert(
            "add_generation_prompt".into(),
            Value::from(add_generation_prompt),
        );
        let origin = &self.origin;
        let template = self
            .env
            .get_template(NAME)
            .map_err(|e| TemplateError::Render(format!("{origin}: {e}")))?;
        let mut out = Capped {
            out: Vec::new(),
            over: false,
        };
        let rendered = crate::render_guard::bounded(origin, || {
            template.render_captured_to(minijinja::Value::from_serialize(&context), &mut out)
        });
        match rendered {
            Ok(_) => {}
            Err(_) if out.over => {
                return Err(TemplateError::Render(format!(
                    "{origin}: the rendering grew past {} MiB; a chat template writes one conversation",
                    MAX_RENDERED >> 20
                )))
            }
            Err(e) if e.kind() == ErrorKind::OutOfFuel => {
                return Err(TemplateError::Render(format!(
                    "{origin}: rendering took over {FUEL} steps for one conversation; does it loop without end?"
                )))
            }
            Err(e) => return Err(TemplateError::Render(format!("{origin}: {e}"))),
        }
        String::from_utf8(out.out)
            .map_err(|e| TemplateError::Render(format!("{origin}: not UTF-8: {e}")))
    }
}

impl JinjaTemplate {
    /// The conversation rendered, and the byte ranges of its assistant
    /// turns (what SFT learns: every assistant turn, as TRL's
    /// `assistant_only_loss`). A turn's text is what rendering it adds
    /// after the conversation before it with the generation prompt; a
    /// template whose renderings do not extend each other that way is an
    /// error naming the turn.
    pub fn render_with_assistant_spans(
        &self,
        messages: &[Message],
    ) -> Result<(String, Vec<std::ops::Range<usize>>), TemplateError> {
        let full = self.render(messages, false)?;
        let mut spans = Vec::new();
        for (i, m) in messages.iter().enumerate() {
            if m.role != "assistant" {
                continue;
            }
            let before = self.render(&messages[..i], true)?;
            let through = self.render(&messages[..=i], false)?;
            if !through.starts_with(&before) || !full.starts_with(&through) {
                return Err(TemplateError::Render(format!(
                    "{}: message {}: the template's rendering of the conversation up to it does not extend the one before it, so its assistant text cannot be found",
                    self.origin,
                    i + 1
                )));
            }
            if through.len() == before.len() && !m.content.is_empty() {
                return Err(TemplateError::Render(format!(
                    "{}: message {} (assistant) renders as nothing: this template does not write assistant turns",
                    self.origin,
                    i + 1
                )));
            }
            spans.push(before.len()..through.len());
        }
        Ok((full, spans))
    }
}

/// A special token as `tokenizer_config.json` writes it: a string, or an
/// added-token object with its `content`.
fn special_token_text(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Object(o) => o.get("content").and_then(Value::as_str).map(str::to_owned),
        _ => None,
    }
}

/// `tojson` as transformers defines it: `json.dumps` without HTML escaping
/// or ASCII escaping; `indent` pretty-prints.
fn tojson(value: minijinja::Value, indent: Option<usize>) -> Result<String, Error> {
    let v: Value = serde_json::to_value(&value)
        .map_err(|e| Error::new(ErrorKind::InvalidOperation, e.to_string()))?;
    match indent {
        None => Ok(python_json(&v)),
        Some(n) => {
            let mut out = Vec::new();
            let indent = " ".repeat(n);
            let formatter = serde_json::ser::PrettyFormatter::with_indent(indent.as_bytes());
            let mut ser = serde_json::Serializer::with_formatter(&mut out, formatter);
            v.serialize(&mut ser)
                .map_err(|e| Error::new(ErrorKind::InvalidOperation, e.to_string()))?;
            Ok(String::from_utf8(out).unwrap_or_default())
        }
    }
}

/// `json.dumps(v)` with Python's default separators (`", "`, `": "`).
fn python_json(v: &Value) -> String {
    match v {
        Value::Array(items) => {
            let inner: Vec<String> = items.iter().map(python_json).collect();
            format!("[{}]", inner.join(", "))
        }
        Value::Object(map) => {
            let inner: Vec<String> = map
                .iter()
                .map(|(k, v)| format!("{}: {}", Value::from(k.as_str()), python_json(v)))
                .collect();
            format!("{{{}}}", inner.join(", "))
        }
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_three_turn_conversation_has_exactly_its_assistant_turns_as_spans() {
        let chatml = "{% for m in messages %}{{ '<|im_start|>' + m.role + '\\n' + m.content + '<|im_end|>\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}";
        let t = JinjaTemplate::new(chatml, serde_json::Map::new()).unwrap();
        let m = Message::new;
        let conversation = [
            m("system", "Be brief."),
            m("user", "Sort: 3 1 2"),
            m("assistant", "1 2 3"),
            m("user", "Reverse it"),
            m("assistant", "3 2 1"),
            m("user", "Thanks"),
            m("assistant", "You are welcome."),
        ];
        let (text, spans) = t.render_with_assistant_spans(&conversation).unwrap();
        let learned: Vec<&str> = spans.iter().map(|s| &text[s.clone()]).collect();
        assert_eq!(
            learned,
            [
                "1 2 3<|im_end|>\n",
                "3 2 1<|im_end|>\n",
                "You are welcome.<|im_end|>\n"
            ]
        );
    }

    #[test]
    fn raise_exception_and_python_methods_work() {
        let t = JinjaTemplate::new(
            "{% if messages[0].role != 'user' %}{{ raise_exception('first must be user') }}{% endif %}\
             {% for m in messages %}{{ m.content.strip() | upper }}{{ eos_token }}{% endfor %}",
            [("eos_token".to_owned(), Value::from("</s>"))].into_iter().collect(),
        )
        .unwrap();
        let out = t.render(&[Message::new("user", "  hi ")], false).unwrap();
        assert_eq!(out, "HI</s>");
        let e = t.render(&[Message::new("system", "x")], false).unwrap_err();
        assert!(e.to_string().contains("first must be user"), "{e}");
    }
}
