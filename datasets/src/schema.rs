//! Records as TRL names them, read from tables.
//!
//! SFT: `{prompt, completion}`, or conversational `{messages: [{role,
//! content}]}` whose last message is the assistant's answer. A
//! conversation is rendered by the [`ChatTemplate`] and every assistant
//! turn in it is learned, as TRL's `assistant_only_loss` does.

use std::ops::Range;
use std::path::Path;
use std::sync::Arc;

use polars::prelude::*;

use crate::jinja::{JinjaTemplate, Message};
use crate::load::{describe, require, string_column, DataError};
use crate::tokenizer::{Tokenizer, ASSISTANT_TOKEN, SYSTEM_TOKEN, USER_TOKEN};

/// One demonstration: the text before the (first) answer, and the text
/// from it on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SftRecord {
    pub prompt: String,
    pub completion: String,
    /// Byte ranges of `completion` that are learned (the assistant turns
    /// of a conversation); `None`: all of it.
    pub learn: Option<Vec<Range<usize>>>,
    /// Whether EOS follows the completion (and is learned). A Jinja
    /// template ends its turns with its own tokens instead.
    pub eos: bool,
}

impl SftRecord {
    /// A prompt and its whole answer, then EOS.
    pub fn new(prompt: impl Into<String>, completion: impl Into<String>) -> Self {
        Self {
            prompt: prompt.into(),
            completion: completion.into(),
            learn: None,
            eos: true,
        }
    }
}

const SFT_EXPECTED: &str =
    "{prompt, completion}, {messages: [{role, content}]} or HH-RLHF's {chosen} dialogues";

/// How messages become text: the model folder's Jinja template when its
/// tokenizer has one; else role markers. With a tokenizer that has role
/// tokens (the byte tokenizer does), each message is `<|role|>content`;
/// otherwise Anthropic's HH-RLHF markers (`\n\nHuman: `, `\n\nAssistant: `),
/// which GPT-2's BPE reads well.
#[derive(Debug, Clone)]
pub enum ChatTemplate {
    Markers {
        system: String,
        user: String,
        assistant: String,
    },
    Jinja(Arc<JinjaTemplate>),
}

impl ChatTemplate {
    pub fn for_tokenizer(tokenizer: &Tokenizer) -> Self {
        if let Some(t) = tokenizer.chat_template() {
            return Self::Jinja(t);
        }
        let (system, user, assistant) = match tokenizer.special().roles {
            Some(_) => (SYSTEM_TOKEN, USER_TOKEN, ASSISTANT_TOKEN),
            None => ("System: ", "\n\nHuman: ", "\n\nAssistant: "),
        };
        Self::Markers {
            system: system.into(),
            user: user.into(),
            assistant: assistant.into(),
        }
    }

    fn marker(&self, role: &str) -> Option<&str> {
        let Self::Markers {
            system,
            user,
            assistant,
        } = self
        else {
            return ["system", "user", "assistant"]
                .contains(&role)
                .then_some("");
        };
        match role {
            "system" => Some(system),
            "user" => Some(user),
            "assistant" => Some(assistant),
            _ => None,
        }
    }

    /// The prompt for a conversation: every message, then the start of the
    /// assistant's turn that the answer follows (a template's generation
    /// prompt).
    pub fn render_prompt(&self, messages: &[(String, String)]) -> Result<String, String> {
        match self {
            Self::Jinja(t) => t
                .render(&to_messages(messages), true)
                .map_err(|e| e.to_string()),
            Self::Markers { assistant, .. } => {
                let mut out = String::new();
                for (role, content) in messages {
                    out.push_str(self.marker(role).unwrap_or(""));
                    out.push_str(content);
                }
                out.push_str(assistant);
                Ok(out)
            }
        }
    }

    /// A whole conversation as one demonstration: the text before the
    /// first assistant turn is the prompt, and every assistant turn is
    /// learned.
    pub fn render_conversation(&self, messages: &[(String, String)]) -> Result<SftRecord, String> {
        let (text, spans, eos) = match self {
            Self::Jinja(t) => {
                let (text, spans) = t
                    .render_with_assistant_spans(&to_messages(messages))
                    .map_err(|e| e.to_string())?;
                (text, spans, false)
            }
            Self::Markers { .. } => {
                let mut text = String::new();
                let mut spans = Vec::new();
                for (role, content) in messages {
                    text.push_str(self.marker(role).unwrap_or(""));
                    let start = text.len();
                    text.push_str(content);
                    if role == "assistant" {
                        spans.push(start..text.len());
                    }
                }
                (text, spans, true)
            }
        };
        let Some(first) = spans.first().map(|s| s.start) else {
            return Err("has no assistant message to learn".into());
        };
        let completion = text[first..].to_owned();
        let learn: Vec<Range<usize>> = spans
            .iter()
            .map(|s| s.start - first..s.end - first)
            .collect();
        // One turn covering the whole rest: the plain prompt/completion case.
        let whole = learn.len() == 1 && learn[0] == (0..completion.len());
        Ok(SftRecord {
            prompt: text[..first].to_owned(),
            completion,
            learn: (!whole).then_some(learn),
            eos,
        })
    }
}

fn to_messages(messages: &[(String, String)]) -> Vec<Message> {
    messages.iter().map(|(r, c)| Message::new(r, c)).collect()
}

/// Prompts to answer (PPO, eval): `{prompt}` strings as they are, or
/// `{messages}` conversations rendered with the generation prompt.
pub fn prompt_texts(
    df: &DataFrame,
    path: &Path,
    chat: &ChatTemplate,
) -> Result<Vec<String>, DataError> {
    const EXPECTED: &str =
        "{prompt}, {messages: [{role, content}]} or HH-RLHF's {chosen} dialogues";
    if df.column("messages").is_err() {
        if is_hh(df) {
            return hh_dialogues(df, path, EXPECTED, |d| crate::hh::render_prompt(d, chat));
        }
        return string_column(df, path, "prompt", EXPECTED);
    }
    let conversations = read_messages(df, path, chat)?;
    conversations
        .iter()
        .enumerate()
        .map(|(i, m)| {
            chat.render_prompt(m)
                .map_err(|message| DataError::BadValue {
                    path: path.to_owned(),
                    row: i + 1,
                    column: "messages".into(),
                    message,
                })
        })
        .collect()
}

/// Reads SFT records from a table in either schema.
pub fn sft_records(
    df: &DataFrame,
    path: &Path,
    chat: &ChatTemplate,
) -> Result<Vec<SftRecord>, DataError> {
    let records = if df.column("messages").is_ok() {
        conversations(df, path, chat)?
    } else if is_hh(df) {
        hh_dialogues(df, path, SFT_EXPECTED, |d| {
            crate::hh::messages(d).map(|m| chat.render_conversation(&m))
        })?
    } else {
        let prompts = string_column(df, path, "prompt", SFT_EXPECTED)?;
        let completions = string_column(df, path, "completion", SFT_EXPECTED)?;
        prompts
            .into_iter()
            .zip(completions)
            .map(|(prompt, completion)| SftRecord::new(prompt, completion))
            .collect()
    };
    for (i, r) in records.iter().enumerate() {
        if r.completion.trim().is_empty() {
            return Err(DataError::BadValue {
                path: path.to_owned(),
                row: i + 1,
                column: "completion".into(),
                message: "is empty; a demonstration needs an answer to learn".into(),
            });
        }
    }
    Ok(records)
}

/// A table of HH-RLHF pairs (`chosen` dialogues, no `prompt`) read as
/// conversations: SFT learns the chosen dialogue, PPO answers its prompt.
fn is_hh(df: &DataFrame) -> bool {
    df.column("prompt").is_err() && df.column("chosen").is_ok()
}

/// Each row's `chosen` dialogue through `read` (`None`: not a dialogue).
fn hh_dialogues<T>(
    df: &DataFrame,
    path: &Path,
    expected: &str,
    read: impl Fn(&str) -> Option<Result<T, String>>,
) -> Result<Vec<T>, DataError> {
    let bad = |row: usize, message: String| DataError::BadValue {
        path: path.to_owned(),
        row,
        column: "chosen".into(),
        message,
    };
    let dialogues = string_column(df, path, "chosen", expected)?;
    let mut out = Vec::with_capacity(dialogues.len());
    for (i, dialogue) in dialogues.iter().enumerate() {
        match read(dialogue) {
            Some(Ok(value)) => out.push(value),
            Some(Err(message)) => return Err(bad(i + 1, message)),
            None => {
                return Err(bad(
                    i + 1,
                    "is not an HH-RLHF dialogue (`\\n\\nHuman: …\\n\\nAssistant: …`)".into(),
                ))
            }
        }
    }
    Ok(out)
}

fn conversations(
    df: &DataFrame,
    path: &Path,
    chat: &ChatTemplate,
) -> Result<Vec<SftRecord>, DataError> {
    let bad = |row: usize, message: String| DataError::BadValue {
        path: path.to_owned(),
        row,
        column: "messages".into(),
        message,
    };
    let mut out = Vec::new();
    for (i, messages) in read_messages(df, path, chat)?.into_iter().enumerate() {
        let row = i + 1;
        match messages.last() {
            None => return Err(bad(row, "is an empty conversation".into())),
            Some((role, _)) if role != "assistant" => {
                return Err(bad(
                    row,
                    format!("the last message must be the assistant's answer, got role \"{role}\""),
                ))
            }
            Some(_) => {}
        }
        out.push(
            chat.render_conversation(&messages)
                .map_err(|m| bad(row, m))?,
        );
    }
    Ok(out)
}

/// Each row's `messages` as (role, content) pairs, roles checked.
fn read_messages(
    df: &DataFrame,
    path: &Path,
    chat: &ChatTemplate,
) -> Result<Vec<Vec<(String, String)>>, DataError> {
    let column = require(df, path, "messages", SFT_EXPECTED)?;
    let wrong_type = || DataError::WrongType {
        path: path.to_owned(),
        column: "messages".into(),
        expected: "lists of {role, content} objects".into(),
        found: describe(column.dtype()),
    };
    let lists = column.list().map_err(|_| wrong_type())?;
    let bad = |row: usize, message: String| DataError::BadValue {
        path: path.to_owned(),
        row,
        column: "messages".into(),
        message,
    };
    let mut out = Vec::with_capacity(lists.len());
    for (i, conversation) in lists.series_iter().enumerate() {
        let row = i + 1;
        let conversation = conversation.ok_or_else(|| bad(row, "is missing (null)".into()))?;
        let fields = conversation.struct_().map_err(|_| wrong_type())?;
        let field = |name: &str| -> Result<Vec<Option<String>>, DataError> {
            let s = fields
                .field_by_name(name)
                .map_err(|_| bad(row, format!("messages need a `{name}` field")))?;
            let s = s.str().map_err(|_| {
                bad(
                    row,
                    format!("`{name}` must be a string, got {}", describe(s.dtype())),
                )
            })?;
            Ok(s.iter().map(|v| v.map(str::to_owned)).collect())
        };
        let (roles, contents) = (field("role")?, field("content")?);
        let mut messages = Vec::with_capacity(roles.len());
        for (j, (role, content)) in roles.into_iter().zip(contents).enumerate() {
            let role = role.ok_or_else(|| bad(row, format!("message {}: role is null", j + 1)))?;
            if chat.marker(&role).is_none() {
                return Err(bad(
                    row,
                    format!(
                        "message {}: unknown role \"{role}\"; expected system, user or assistant",
                        j + 1
                    ),
                ));
            }
            let content =
                content.ok_or_else(|| bad(row, format!("message {}: content is null", j + 1)))?;
            messages.push((role, content));
        }
        out.push(messages);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::load::read_table;

    fn load(text: &str) -> Result<Vec<SftRecord>, DataError> {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("sft.jsonl");
        std::fs::write(&p, text).unwrap();
        let df = read_table(&p)?;
        sft_records(&df, &p, &ChatTemplate::for_tokenizer(&Tokenizer::bytes()))
    }

    #[test]
    fn prompt_completion_and_messages_read_alike() {
        let a =
            load("{\"prompt\": \"<|user|>Hi<|assistant|>\", \"completion\": \"Hello\"}\n").unwrap();
        let b = load(
            "{\"messages\": [{\"role\": \"user\", \"content\": \"Hi\"}, {\"role\": \"assistant\", \"content\": \"Hello\"}]}\n",
        )
        .unwrap();
        assert_eq!(a, b);
        let sys = load("{\"messages\": [{\"role\": \"system\", \"content\": \"Be brief.\"}, {\"role\": \"user\", \"content\": \"Hi\"}, {\"role\": \"assistant\", \"content\": \"Yo\"}]}\n").unwrap();
        assert_eq!(sys[0].prompt, "<|system|>Be brief.<|user|>Hi<|assistant|>");
    }

    #[test]
    fn text_markers_without_role_tokens() {
        let t = ChatTemplate::Markers {
            system: "System: ".into(),
            user: "\n\nHuman: ".into(),
            assistant: "\n\nAssistant: ".into(),
        };
        assert_eq!(
            t.render_prompt(&[("user".into(), "Hi".into())]).unwrap(),
            "\n\nHuman: Hi\n\nAssistant: "
        );
    }

    #[test]
    fn bad_records_name_row_and_problem() {
        let m = |t: &str| load(t).unwrap_err().to_string();
        let e = m("{\"prompt\": \"a\", \"completion\": \"b\"}\n{\"prompt\": \"a\", \"completion\": \" \"}\n");
        assert!(e.contains("row 2") && e.contains("empty"), "{e}");
        let e = m("{\"prompt\": \"a\", \"answer\": \"b\"}\n");
        assert!(e.contains("missing column `completion`"), "{e}");
        let e = m("{\"prompt\": \"a\", \"completion\": 5}\n");
        assert!(e.contains("`completion` holds integers"), "{e}");
        let e = m("{\"messages\": [{\"role\": \"robot\", \"content\": \"x\"}, {\"role\": \"assistant\", \"content\": \"y\"}]}\n");
        assert!(
            e.contains("row 1") && e.contains("unknown role \"robot\""),
            "{e}"
        );
        let e = m("{\"messages\": [{\"role\": \"user\", \"content\": \"x\"}]}\n");
        assert!(e.contains("last message must be the assistant"), "{e}");
        let e = m("{\"messages\": \"hello\"}\n");
        assert!(e.contains("`messages` holds strings"), "{e}");
    }
}

#[cfg(test)]
mod conversation_tests {
    use super::*;
    use crate::batch::{collate, tokenize_pairs};
    use crate::load::read_table;

    const THREE_TURNS: &str = r#"{"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Sort: 3 1 2"}, {"role": "assistant", "content": "1 2 3"}, {"role": "user", "content": "Reverse it"}, {"role": "assistant", "content": "3 2 1"}, {"role": "user", "content": "Thanks"}, {"role": "assistant", "content": "Welcome."}]}"#;

    /// The learned target tokens of one tokenized conversation, decoded.
    fn learned(tok: &Tokenizer, dir: &Path) -> (String, Vec<SftRecord>) {
        let p = dir.join("chat.jsonl");
        std::fs::write(&p, format!("{THREE_TURNS}\n")).unwrap();
        let records = sft_records(
            &read_table(&p).unwrap(),
            &p,
            &ChatTemplate::for_tokenizer(tok),
        )
        .unwrap();
        let (pairs, _) = tokenize_pairs(&records, tok, 4096).unwrap();
        let batch = collate(&[&pairs[0]], tok.pad_id());
        let ids: Vec<i64> = batch
            .targets
            .iter()
            .zip(&batch.loss_mask)
            .filter(|(_, &m)| m > 0.0)
            .map(|(&t, _)| t)
            .collect();
        assert_eq!(ids.len(), batch.target_tokens);
        (tok.decode(&ids, true).unwrap(), records)
    }

    #[test]
    fn every_assistant_turn_is_learned_with_markers() {
        let d = tempfile::tempdir().unwrap();
        let tok = Tokenizer::bytes();
        let (text, records) = learned(&tok, d.path());
        assert_eq!(text, "1 2 33 2 1Welcome.<|endoftext|>");
        assert_eq!(
            records[0].prompt,
            "<|system|>Be brief.<|user|>Sort: 3 1 2<|assistant|>"
        );
    }

    #[test]
    fn a_folder_template_renders_conversations_and_prompts() {
        let d = tempfile::tempdir().unwrap();
        Tokenizer::bytes()
            .save(&d.path().join("tokenizer.json"))
            .unwrap();
        let chatml = "{% for m in messages %}{{ '[' + m.role + ']' + m.content + eos_token }}{% endfor %}{% if add_generation_prompt %}{{ '[assistant]' }}{% endif %}";
        let config = serde_json::json!({"chat_template": chatml, "eos_token": "<|pad|>"});
        std::fs::write(d.path().join("tokenizer_config.json"), config.to_string()).unwrap();
        let tok = Tokenizer::from_model_dir(d.path()).unwrap();
        // The config's eos_token ends answers.
        assert_eq!(tok.eos_id(), 257);
        let (text, records) = learned(&tok, d.path());
        // Each turn's text and its end-of-turn token, nothing of the others.
        assert_eq!(text, "1 2 3<|pad|>3 2 1<|pad|>Welcome.<|pad|>");
        assert!(!records[0].eos);
        let p = d.path().join("prompts.jsonl");
        std::fs::write(
            &p,
            "{\"messages\": [{\"role\": \"user\", \"content\": \"Hi\"}]}\n",
        )
        .unwrap();
        let chat = ChatTemplate::for_tokenizer(&tok);
        let prompts = prompt_texts(&read_table(&p).unwrap(), &p, &chat).unwrap();
        assert_eq!(prompts, ["[user]Hi<|pad|>[assistant]"]);
        // The files travel with the tokenizer into checkpoints.
        let out = d.path().join("copy");
        std::fs::create_dir(&out).unwrap();
        tok.save_chat_files(&out).unwrap();
        assert!(out.join("tokenizer_config.json").exists());
    }
}
