//! Answers labelled good or bad on their own, loaded for KTO: each one a
//! group of two rows, the answer and a mismatched answer (another
//! prompt's, under this prompt) for KTO's KL estimate, as TRL's
//! `KTOTrainer` pairs a prompt with its neighbour's completion.

use std::path::Path;

use rlhf_datasets::batch::{tokenize_groups, TokenizedGroup};
use rlhf_datasets::hh::render_groups;
use rlhf_datasets::load::{read_table, DataError};
use rlhf_datasets::preference::RankedGroup;
use rlhf_datasets::schema::ChatTemplate;
use rlhf_datasets::unpaired::labelled_answers;

use crate::error::StageError;
use crate::model::checkpoint::Model;

/// What an unpaired file holds, for the error when a stage names none.
pub const LABELLED_ABOUT: &str =
    "the labelled answers: {prompt, completion, label} rows (label true for a good answer), a thumbs queue's labels.parquet, or rankings (best good, worst bad)";

/// Labelled answers tokenized for a model.
#[derive(Debug, Clone, Default)]
pub struct LabelledGroups {
    /// Per answer: its prompt, and as responses the answer and the
    /// mismatched answer.
    pub groups: Vec<TokenizedGroup>,
    pub desirable: Vec<bool>,
    /// Rows passed over as saying nothing.
    pub skipped: usize,
}

/// The labelled answers of `path` tokenized for `model`, each with its
/// mismatched answer.
pub fn load_labelled(
    path: &Path,
    model: &Model,
    max_len: usize,
) -> Result<LabelledGroups, StageError> {
    let unpaired = labelled_answers(&read_table(path)?, path)?;
    if let Some(note) = unpaired.skipped_note() {
        tracing::warn!("{}: {note}", path.display());
    }
    if unpaired.middle > 0 {
        tracing::info!(
            "{}: rankings give their best answers as good and their worst as bad; {} answers ranked between left out",
            path.display(),
            unpaired.middle
        );
    }
    let mut groups: Vec<RankedGroup> = unpaired
        .answers
        .iter()
        .map(|a| RankedGroup {
            prompt: a.prompt.clone(),
            responses: vec![a.answer.clone()],
            ranking: vec![0],
            margin: 0.0,
        })
        .collect();
    // Which answers survive rendering, by their index.
    let mut kept: Vec<usize> = (0..groups.len()).collect();
    let chat = ChatTemplate::for_tokenizer(&model.tokenizer);
    let dropped = render_groups(&mut groups, &mut kept, &chat).map_err(|(i, message)| {
        DataError::BadValue {
            path: path.to_owned(),
            row: unpaired.rows[i] + 1,
            column: "prompt".into(),
            message,
        }
    })?;
    if dropped > 0 {
        tracing::warn!(
            "{}: {dropped} answers skipped that carry further dialogue turns (the chat template renders one answer)",
            path.display()
        );
    }
    let (mut tokenized, cut) = tokenize_groups(&groups, &model.tokenizer, max_len)?;
    if cut.prompts_cut + cut.completions_cut > 0 {
        tracing::warn!(
            "{}: truncated to {max_len} tokens: {} prompts cut on the left, {} answers cut",
            path.display(),
            cut.prompts_cut,
            cut.completions_cut
        );
    }
    add_mismatched(&mut tokenized, max_len);
    Ok(LabelledGroups {
        groups: tokenized,
        desirable: kept
            .iter()
            .map(|&i| unpaired.answers[i].desirable)
            .collect(),
        skipped: unpaired.unlabelled + unpaired.says_nothing + dropped,
    })
}

/// Gives each group a second answer: the next answer in file order whose
/// prompt differs (its own when every prompt is the same), cut to fit
/// `max_len` after this group's prompt.
pub fn add_mismatched(groups: &mut [TokenizedGroup], max_len: usize) {
    let n = groups.len();
    // Starts of runs of equal prompts: the next run's answer is the
    // nearest answer to another prompt.
    let starts: Vec<usize> = (0..n)
        .filter(|&i| i == 0 || groups[i].prompt != groups[i - 1].prompt)
        .collect();
    let mut run = 0;
    let mut others = Vec::with_capacity(n);
    for i in 0..n {
        if run + 1 < starts.len() && starts[run + 1] == i {
            run += 1;
        }
        let other = (1..starts.len())
            .map(|k| starts[(run + k) % starts.len()])
            .find(|&j| groups[j].prompt != groups[i].prompt)
            .unwrap_or(i);
        let room = max_len.saturating_sub(groups[i].prompt.len()).max(1);
        let mut answer = groups[other].responses[0].clone();
        answer.truncate(room);
        others.push(answer);
    }
    for (g, answer) in groups.iter_mut().zip(others) {
        g.responses.truncate(1);
        g.responses.push(answer);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn group(prompt: i64, answer: i64) -> TokenizedGroup {
        TokenizedGroup {
            prompt: vec![prompt],
            responses: vec![vec![answer; 3]],
            pairs: vec![],
            margin: 0.0,
        }
    }

    #[test]
    fn each_answer_gets_the_next_other_prompts_answer() {
        let mut groups = vec![
            group(1, 10),
            group(1, 11),
            group(2, 20),
            group(3, 30),
            group(3, 31),
        ];
        add_mismatched(&mut groups, 3);
        let other: Vec<i64> = groups.iter().map(|g| g.responses[1][0]).collect();
        assert_eq!(other, [20, 20, 30, 10, 10]);
        assert!(groups.iter().all(|g| g.responses[0].len() == 3));
        assert!(
            groups.iter().all(|g| g.responses[1].len() == 2),
            "cut to fit"
        );
        let mut same = vec![group(1, 10), group(1, 11)];
        add_mismatched(&mut same, 8);
        assert_eq!(same[1].responses[1], [11; 3], "no other prompt: its own");
    }
}
