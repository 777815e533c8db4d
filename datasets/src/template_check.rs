//! Whether a chat template keeps earlier turns a prefix of later ones
//! (`rlhf check-template`): a multi-turn episode appends each turn to the
//! tokens the policy already saw, which is only right when rendering the
//! longer conversation starts with the shorter one's text and tokens.
//! Templates that drop earlier reasoning (Qwen3's removes `<think>` blocks
//! of turns before the last question) are not. The conversations are
//! TRL's `is_chat_template_prefix_preserving`'s, and one more whose
//! assistant turn carries a `<think>` block.

use crate::jinja::{JinjaTemplate, Message, TemplateError};
use crate::tokenizer::{Tokenizer, TokenizerError};

/// One pair of renderings that must extend each other.
#[derive(Debug, Clone, PartialEq)]
pub struct PrefixCase {
    pub name: &'static str,
    pub earlier: String,
    pub later: String,
    /// `later` starts with `earlier`'s text.
    pub text_prefix: bool,
    /// `later`'s tokens start with `earlier`'s.
    pub token_prefix: bool,
}

impl PrefixCase {
    /// The byte where the two texts part, for the message.
    pub fn parts_at(&self) -> usize {
        self.earlier
            .bytes()
            .zip(self.later.bytes())
            .take_while(|(a, b)| a == b)
            .count()
    }
}

/// Every case, and the verdicts.
#[derive(Debug, Clone, PartialEq)]
pub struct PrefixCheck {
    pub cases: Vec<PrefixCase>,
}

impl PrefixCheck {
    /// TRL's verdict: every text a prefix of the next.
    pub fn text_preserving(&self) -> bool {
        self.cases.iter().all(|c| c.text_prefix)
    }

    /// The stricter one multi-turn training needs: tokens too.
    pub fn token_preserving(&self) -> bool {
        self.cases.iter().all(|c| c.text_prefix && c.token_prefix)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum CheckError {
    #[error(transparent)]
    Template(#[from] TemplateError),
    #[error(transparent)]
    Tokenizer(#[from] TokenizerError),
}

/// Renders the cases with `template` and tokenizes them with `tokenizer`.
pub fn check_prefix_preserving(
    template: &JinjaTemplate,
    tokenizer: &Tokenizer,
) -> Result<PrefixCheck, CheckError> {
    let m = Message::new;
    let question = m("user", "What color is the sky?");
    let answer = m("assistant", "It is blue.");
    let thought = m(
        "assistant",
        "<think>\nThe sky scatters blue light.\n</think>\n\nIt is blue.",
    );
    let follow_up = m("user", "And at night?");
    let pairs: [(&'static str, Vec<Message>, bool, Vec<Message>); 3] = [
        (
            "prompt, then its answer",
            vec![question.clone()],
            true,
            vec![question.clone(), answer.clone()],
        ),
        (
            "answer, then the next question",
            vec![question.clone(), answer.clone()],
            false,
            vec![question.clone(), answer, follow_up.clone()],
        ),
        (
            "answer with <think>, then the next question",
            vec![question.clone(), thought.clone()],
            false,
            vec![question, thought, follow_up],
        ),
    ];
    let mut cases = Vec::new();
    for (name, first, generation_prompt, second) in pairs {
        let earlier = template.render(&first, generation_prompt)?;
        let later = template.render(&second, false)?;
        let (a, b) = (tokenizer.encode(&earlier)?, tokenizer.encode(&later)?);
        cases.push(PrefixCase {
            name,
            text_prefix: later.starts_with(&earlier),
            token_prefix: b.starts_with(&a),
            earlier,
            later,
        });
    }
    Ok(PrefixCheck { cases })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(template: &str) -> PrefixCheck {
        let t = JinjaTemplate::new(template, serde_json::Map::new()).unwrap();
        check_prefix_preserving(&t, &Tokenizer::bytes()).unwrap()
    }

    #[test]
    fn chatml_keeps_prefixes_and_a_template_that_drops_thinking_does_not() {
        let chatml = "{% for m in messages %}{{ '<|im_start|>' + m.role + '\\n' + m.content + '<|im_end|>\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}";
        let c = check(chatml);
        assert!(c.text_preserving() && c.token_preserving(), "{c:?}");
        // Earlier turns lose their reasoning once a question follows.
        let drops = "{% for m in messages %}{% set content = m.content %}{% if m.role == 'assistant' and not loop.last %}{% set content = content.split('</think>')[-1].lstrip('\\n') %}{% endif %}{{ '<|im_start|>' + m.role + '\\n' + content + '<|im_end|>\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}";
        let c = check(drops);
        assert!(!c.text_preserving());
        let broken: Vec<&str> = c
            .cases
            .iter()
            .filter(|c| !c.text_prefix)
            .map(|c| c.name)
            .collect();
        assert_eq!(broken, ["answer with <think>, then the next question"]);
        let case = c.cases.iter().find(|c| !c.text_prefix).unwrap();
        assert_eq!(&case.earlier[case.parts_at()..][..7], "<think>");
    }
}
