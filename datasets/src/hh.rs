//! Anthropic's HH-RLHF dialogues as messages.
//!
//! HH-RLHF writes a conversation as one text, `\n\nHuman: …\n\nAssistant:
//! …`, turn after turn. Read as messages (`Human` is the user), the
//! conversation can be rendered in a model's own chat format, which is how
//! an instruct model was trained to read one: SFT learns the assistant
//! turns of a dialogue, PPO answers its last human turn, and a reward
//! model reads the prompt and answers of a pair as the policy writes them.

use crate::schema::ChatTemplate;

/// The marker before each human turn.
pub const HUMAN: &str = "\n\nHuman:";
/// The marker before each assistant turn.
pub const ASSISTANT: &str = "\n\nAssistant:";

/// A conversation as `(role, content)` pairs.
pub type Messages = Vec<(String, String)>;

/// The turns of an HH dialogue, each content trimmed of the space around
/// it; `None` when the text does not start with a human turn.
///
/// A dialogue that ends with an empty assistant turn (an HH prompt, cut
/// where the assistant starts speaking) keeps that turn with empty content.
pub fn messages(text: &str) -> Option<Messages> {
    let rest = text.strip_prefix(HUMAN)?;
    let mut out = Vec::new();
    let mut role = "user";
    let mut rest = rest;
    loop {
        let next = [(HUMAN, "user"), (ASSISTANT, "assistant")]
            .iter()
            .filter_map(|&(marker, next_role)| rest.find(marker).map(|at| (at, marker, next_role)))
            .min_by_key(|&(at, _, _)| at);
        match next {
            Some((at, marker, next_role)) => {
                out.push((role.to_owned(), rest[..at].trim().to_owned()));
                rest = &rest[at + marker.len()..];
                role = next_role;
            }
            None => {
                out.push((role.to_owned(), rest.trim().to_owned()));
                return Some(out);
            }
        }
    }
}

/// An HH prompt (a dialogue cut after its last `\n\nAssistant:`) as the
/// messages before that turn; `None` for a text that is not one.
pub fn prompt_messages(prompt: &str) -> Option<Messages> {
    let mut turns = messages(prompt)?;
    match turns.pop() {
        Some((role, content)) if role == "assistant" && content.is_empty() => Some(turns),
        _ => None,
    }
}

/// An HH dialogue as a prompt for the policy: every turn before its last
/// assistant turn, rendered with the generation prompt; `None` for a text
/// that is not an HH dialogue ending with an assistant turn.
pub fn render_prompt(dialogue: &str, chat: &ChatTemplate) -> Option<Result<String, String>> {
    let mut turns = messages(dialogue)?;
    match turns.pop() {
        Some((role, _)) if role == "assistant" => Some(chat.render_prompt(&turns)),
        _ => None,
    }
}

/// Ranked groups whose prompt is an HH dialogue, rendered with a model's
/// Jinja chat template: the prompt as its messages with the generation
/// prompt, the answers trimmed (the reader appends EOS, the template's end
/// of turn). Groups whose answers carry further turns cannot be put in
/// that form; they are dropped, and their number returned. Marker
/// templates (no Jinja) leave the groups as they are: their markers are
/// HH's own.
pub fn render_groups(
    groups: &mut Vec<crate::preference::RankedGroup>,
    rows: &mut Vec<usize>,
    chat: &ChatTemplate,
) -> Result<usize, (usize, String)> {
    if !matches!(chat, ChatTemplate::Jinja(_)) {
        return Ok(0);
    }
    let mut dropped = 0;
    let mut keep = Vec::with_capacity(groups.len());
    for (group, &row) in groups.drain(..).zip(rows.iter()) {
        let Some(turns) = prompt_messages(&group.prompt) else {
            keep.push((group, row));
            continue;
        };
        if group
            .responses
            .iter()
            .any(|r| r.contains(HUMAN) || r.contains(ASSISTANT))
        {
            dropped += 1;
            continue;
        }
        let prompt = chat.render_prompt(&turns).map_err(|e| (row, e))?;
        let responses = group
            .responses
            .iter()
            .map(|r| r.trim().to_owned())
            .collect();
        keep.push((
            crate::preference::RankedGroup {
                prompt,
                responses,
                ..group
            },
            row,
        ));
    }
    *rows = keep.iter().map(|(_, row)| *row).collect();
    *groups = keep.into_iter().map(|(g, _)| g).collect();
    Ok(dropped)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pairs(v: &[(&str, &str)]) -> Messages {
        v.iter()
            .map(|(r, c)| (r.to_string(), c.to_string()))
            .collect()
    }

    #[test]
    fn dialogues_become_messages() {
        let text = "\n\nHuman: Hi there\n\nAssistant: Hello!  \n\nHuman: Which is taller?\n\nAssistant: The tower.";
        assert_eq!(
            messages(text).unwrap(),
            pairs(&[
                ("user", "Hi there"),
                ("assistant", "Hello!"),
                ("user", "Which is taller?"),
                ("assistant", "The tower."),
            ])
        );
        assert_eq!(messages("Human: no leading blank line"), None);
        assert_eq!(
            prompt_messages("\n\nHuman: Q\n\nAssistant:").unwrap(),
            pairs(&[("user", "Q")])
        );
        // A whole dialogue is not a prompt.
        assert_eq!(prompt_messages("\n\nHuman: Q\n\nAssistant: A"), None);
        // Two human turns in a row stay two messages.
        assert_eq!(
            messages("\n\nHuman: a\n\nHuman: b\n\nAssistant:").unwrap(),
            pairs(&[("user", "a"), ("user", "b"), ("assistant", "")])
        );
    }

    #[test]
    fn marker_templates_render_the_dialogue_as_hh_writes_it() {
        let chat = ChatTemplate::for_tokenizer(&crate::Tokenizer::bytes());
        let rendered = render_prompt("\n\nHuman: Q\n\nAssistant: A", &chat)
            .unwrap()
            .unwrap();
        assert_eq!(rendered, "<|user|>Q<|assistant|>");
        assert!(render_prompt("\n\nHuman: Q", &chat).is_none());
    }

    /// SmolLM2's template (ChatML with a default system turn).
    fn chatml() -> ChatTemplate {
        let template = "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nBe helpful<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";
        let t = crate::jinja::JinjaTemplate::new(template, Default::default()).unwrap();
        ChatTemplate::Jinja(std::sync::Arc::new(t))
    }

    #[test]
    fn pairs_are_rendered_in_the_models_chat_format() {
        let group = |prompt: &str, a: &str, b: &str| crate::preference::RankedGroup {
            prompt: prompt.into(),
            responses: vec![a.into(), b.into()],
            ranking: vec![0, 1],
            margin: 0.0,
        };
        let mut groups = vec![
            group(
                "\n\nHuman: Hi\n\nAssistant: Hey\n\nHuman: Why?\n\nAssistant:",
                " Because.",
                " No.",
            ),
            group("plain prompt", "a", "b"),
            group("\n\nHuman: Q\n\nAssistant:", " A\n\nHuman: more", " B"),
        ];
        let mut rows = vec![0, 4, 7];
        let dropped = render_groups(&mut groups, &mut rows, &chatml()).unwrap();
        assert_eq!(dropped, 1);
        assert_eq!(rows, vec![0, 4]);
        assert_eq!(
            groups[0].prompt,
            "<|im_start|>system\nBe helpful<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHey<|im_end|>\n<|im_start|>user\nWhy?<|im_end|>\n<|im_start|>assistant\n"
        );
        assert_eq!(groups[0].responses, vec!["Because.", "No."]);
        assert_eq!(groups[1].prompt, "plain prompt");

        // Marker templates keep HH's own text.
        let mut same = groups.clone();
        let bytes = ChatTemplate::for_tokenizer(&crate::Tokenizer::bytes());
        assert_eq!(render_groups(&mut same, &mut rows.clone(), &bytes), Ok(0));
        assert_eq!(same, groups);
    }
}
