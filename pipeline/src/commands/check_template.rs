//! `rlhf check-template MODEL`: whether the folder's chat template keeps
//! earlier turns a prefix of later ones (see
//! `rlhf_datasets::template_check`).

use std::path::Path;

use anyhow::{bail, Context};
use rlhf_datasets::template_check::{check_prefix_preserving, PrefixCase};
use rlhf_datasets::Tokenizer;

pub fn run(model: &Path) -> anyhow::Result<()> {
    let tokenizer = Tokenizer::from_model_dir(model)
        .with_context(|| format!("{}: reading its tokenizer", model.display()))?;
    let Some(template) = tokenizer.chat_template() else {
        bail!(
            "{} has no chat template (tokenizer_config.json's chat_template or chat_template.jinja)",
            model.display()
        );
    };
    let check = check_prefix_preserving(&template, &tokenizer)?;
    for case in &check.cases {
        let verdict = match (case.text_prefix, case.token_prefix) {
            (true, true) => "kept (text and tokens)".to_owned(),
            (true, false) => {
                "text kept, tokens not (the tokenizer merges across the turn boundary)".into()
            }
            (false, _) => format!("NOT kept: {}", parting(case)),
        };
        println!("{}: {verdict}", case.name);
    }
    if check.token_preserving() {
        println!(
            "{}: prefix-preserving: every turn's tokens start the next rendering's",
            model.display()
        );
        return Ok(());
    }
    bail!(
        "{}: the chat template is not prefix-preserving{}; multi-turn episodes append turns to the tokens already seen, so they need one that is (give the model folder a chat_template.jinja that keeps earlier turns as they were rendered)",
        model.display(),
        if check.text_preserving() { " in tokens" } else { "" }
    )
}

/// Where the two renderings part, shown around that point.
fn parting(case: &PrefixCase) -> String {
    let at = case.parts_at();
    let around = |s: &str| {
        let start = floor(s, at.saturating_sub(30));
        let end = floor(s, (at + 40).min(s.len()));
        format!("{:?}", &s[start..end])
    };
    format!(
        "the renderings part at byte {at}: earlier {} vs later {}",
        around(&case.earlier),
        around(&case.later)
    )
}

/// The largest char boundary of `s` at or before `i`.
fn floor(s: &str, mut i: usize) -> usize {
    while !s.is_char_boundary(i) {
        i -= 1;
    }
    i
}
