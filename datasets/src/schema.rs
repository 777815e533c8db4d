//! Records as TRL names them, read from tables.
//!
//! SFT: `{prompt, completion}`, or conversational `{messages: [{role,
//! content}]}` whose last message is the assistant's answer (earlier turns
//! become the prompt through the [`ChatTemplate`]).

use std::path::Path;

use polars::prelude::*;

use crate::load::{describe, require, string_column, DataError};
use crate::tokenizer::{Tokenizer, ASSISTANT_TOKEN, SYSTEM_TOKEN, USER_TOKEN};

/// One demonstration: the text before the answer, and the answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SftRecord {
    pub prompt: String,
    pub completion: String,
}

const SFT_EXPECTED: &str = "{prompt, completion} or {messages: [{role, content}]}";

/// How messages become text.
///
/// With a tokenizer that has role tokens (the byte tokenizer does), each
/// message is `<|role|>content`; otherwise Anthropic's HH-RLHF markers
/// (`\n\nHuman: `, `\n\nAssistant: `) are used, which GPT-2's BPE reads well.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChatTemplate {
    system: String,
    user: String,
    assistant: String,
}

impl ChatTemplate {
    pub fn for_tokenizer(tokenizer: &Tokenizer) -> Self {
        if tokenizer.special().roles.is_some() {
            Self {
                system: SYSTEM_TOKEN.into(),
                user: USER_TOKEN.into(),
                assistant: ASSISTANT_TOKEN.into(),
            }
        } else {
            Self {
                system: "System: ".into(),
                user: "\n\nHuman: ".into(),
                assistant: "\n\nAssistant: ".into(),
            }
        }
    }

    fn marker(&self, role: &str) -> Option<&str> {
        match role {
            "system" => Some(&self.system),
            "user" => Some(&self.user),
            "assistant" => Some(&self.assistant),
            _ => None,
        }
    }

    /// The prompt for a conversation: every message, then the assistant
    /// marker that the answer follows.
    pub fn render_prompt(&self, messages: &[(String, String)]) -> String {
        let mut out = String::new();
        for (role, content) in messages {
            out.push_str(self.marker(role).unwrap_or(""));
            out.push_str(content);
        }
        out.push_str(&self.assistant);
        out
    }
}

/// Reads SFT records from a table in either schema.
pub fn sft_records(
    df: &DataFrame,
    path: &Path,
    chat: &ChatTemplate,
) -> Result<Vec<SftRecord>, DataError> {
    let records = if df.column("messages").is_ok() {
        conversations(df, path, chat)?
    } else {
        let prompts = string_column(df, path, "prompt", SFT_EXPECTED)?;
        let completions = string_column(df, path, "completion", SFT_EXPECTED)?;
        prompts
            .into_iter()
            .zip(completions)
            .map(|(prompt, completion)| SftRecord { prompt, completion })
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

fn conversations(
    df: &DataFrame,
    path: &Path,
    chat: &ChatTemplate,
) -> Result<Vec<SftRecord>, DataError> {
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
        let Some((last_role, completion)) = messages.pop() else {
            return Err(bad(row, "is an empty conversation".into()));
        };
        if last_role != "assistant" {
            return Err(bad(
                row,
                format!(
                    "the last message must be the assistant's answer, got role \"{last_role}\""
                ),
            ));
        }
        out.push(SftRecord {
            prompt: chat.render_prompt(&messages),
            completion,
        });
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
        let t = ChatTemplate {
            system: "System: ".into(),
            user: "\n\nHuman: ".into(),
            assistant: "\n\nAssistant: ".into(),
        };
        assert_eq!(
            t.render_prompt(&[("user".into(), "Hi".into())]),
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
