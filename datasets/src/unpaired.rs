//! Answers labelled good or bad on their own (KTO's data), read from:
//! - TRL's unpaired format `{prompt, completion, label}`, `label` a
//!   boolean (true: a good answer);
//! - a thumbs-up/down labelling queue's `labels.parquet` (`{prompt,
//!   responses, label}`, one answer per row);
//! - rankings in any schema [`crate::preference`] reads: each group's
//!   best-ranked answers good, its worst-ranked bad, those between left
//!   out (as TRL's `unpair_preference_dataset` does for pairs).
//!
//! Rows that say nothing (a null label, a labeller's skip, a ranking with
//! every answer tied) are passed over and counted.

use std::path::Path;

use polars::prelude::*;

use crate::load::{describe, string_column, DataError};
use crate::preference::{labelled_rows, ranked_groups, RankedGroup};

const EXPECTED: &str =
    "{prompt, completion, label} (label a boolean), a thumbs queue's {prompt, responses, label}, or rankings";

/// One answer to a prompt and whether it is good.
#[derive(Debug, Clone, PartialEq)]
pub struct LabelledAnswer {
    pub prompt: String,
    pub answer: String,
    pub desirable: bool,
}

/// The labelled answers of a table, each one's row (0-based), and what
/// was passed over.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Unpaired {
    pub answers: Vec<LabelledAnswer>,
    pub rows: Vec<usize>,
    /// Rows with no label (null), or skipped by their labeller.
    pub unlabelled: usize,
    /// Rankings that said nothing (identical or all-tied answers).
    pub says_nothing: usize,
    /// Answers of rankings neither best nor worst, left out.
    pub middle: usize,
}

impl Unpaired {
    pub fn desirable(&self) -> usize {
        self.answers.iter().filter(|a| a.desirable).count()
    }

    /// "N rows skipped (...)" for the log, if any were.
    pub fn skipped_note(&self) -> Option<String> {
        (self.unlabelled + self.says_nothing > 0).then(|| {
            format!(
                "{} rows skipped as saying nothing: {} without a label or skipped by their labeller, {} rankings of identical or equally ranked answers",
                self.unlabelled + self.says_nothing,
                self.unlabelled,
                self.says_nothing
            )
        })
    }
}

/// Reads labelled answers from a table in any of the three forms; a table
/// with none is an error.
pub fn labelled_answers(df: &DataFrame, path: &Path) -> Result<Unpaired, DataError> {
    let out = if is_thumbs(df) {
        let (labelled, original) = labelled_rows(df, path)?;
        let mut out = thumbs(&labelled, path, &original)?;
        out.rows = out.rows.iter().map(|&i| original[i]).collect();
        out.unlabelled += df.height() - labelled.height();
        out
    } else {
        from_rankings(df, path)?
    };
    if out.answers.is_empty() {
        return Err(DataError::Parse {
            path: path.to_owned(),
            message: format!(
                "no row labels an answer: {}",
                out.skipped_note().unwrap_or_default()
            ),
        });
    }
    Ok(out)
}

/// TRL's unpaired rows, or a queue's rows with a thumbs label given (a
/// ranked queue's table has the column too, all null).
fn is_thumbs(df: &DataFrame) -> bool {
    let labels = df.column("label").map(|c| c.len() - c.null_count());
    df.column("completion").is_ok()
        || (labels.is_ok() && (df.column("ranking").is_err() || labels.unwrap_or(0) > 0))
}

/// Rows with a `label` column: TRL's `completion` or a queue's one-answer
/// `responses` (rows of groups of several answers, ranked not labelled,
/// are passed over); `original` maps the rows to the file's.
fn thumbs(df: &DataFrame, path: &Path, original: &[usize]) -> Result<Unpaired, DataError> {
    let prompts = string_column(df, path, "prompt", EXPECTED)?;
    let answers: Vec<Option<String>> = match df.column("completion") {
        Ok(_) => string_column(df, path, "completion", EXPECTED)?
            .into_iter()
            .map(Some)
            .collect(),
        Err(_) => single_answers(df, path)?,
    };
    let column = crate::load::require(df, path, "label", EXPECTED)?;
    // A column of nulls alone (nobody has labelled yet) reads as no type.
    let column = match column.dtype() {
        DataType::Null => &column.cast(&DataType::Boolean).unwrap_or(column.clone()),
        _ => column,
    };
    let labels = column.bool().map_err(|_| DataError::WrongType {
        path: path.to_owned(),
        column: "label".into(),
        expected: "booleans (true: a good answer)".into(),
        found: describe(column.dtype()),
    })?;
    let mut out = Unpaired::default();
    for (i, ((prompt, answer), label)) in prompts
        .into_iter()
        .zip(answers)
        .zip(labels.iter())
        .enumerate()
    {
        let Some(desirable) = label else {
            out.unlabelled += 1;
            continue;
        };
        let Some(answer) = answer else {
            return Err(DataError::BadValue {
                path: path.to_owned(),
                row: original[i] + 1,
                column: "responses".into(),
                message: "a label judges one answer; this row holds another number of answers"
                    .into(),
            });
        };
        out.answers.push(LabelledAnswer {
            prompt,
            answer,
            desirable,
        });
        out.rows.push(i);
    }
    Ok(out)
}

/// A queue's `responses`: the answer of each row that holds one.
fn single_answers(df: &DataFrame, path: &Path) -> Result<Vec<Option<String>>, DataError> {
    let column = crate::load::require(df, path, "responses", EXPECTED)?;
    let wrong = || DataError::WrongType {
        path: path.to_owned(),
        column: "responses".into(),
        expected: "lists of one string".into(),
        found: describe(column.dtype()),
    };
    let lists = column.list().map_err(|_| wrong())?;
    Ok(lists
        .series_iter()
        .map(|list| {
            let strings = list.as_ref().and_then(|s| s.str().ok().cloned());
            match strings.as_ref().map(|s| (s.len(), s.get(0))) {
                Some((1, Some(answer))) => Some(answer.to_owned()),
                _ => None,
            }
        })
        .collect())
}

/// Each ranking's best answers good and worst bad.
fn from_rankings(df: &DataFrame, path: &Path) -> Result<Unpaired, DataError> {
    let rankings = ranked_groups(df, path)?;
    let mut out = Unpaired {
        unlabelled: rankings.unlabelled,
        says_nothing: rankings.identical + rankings.all_tied,
        ..Unpaired::default()
    };
    for (group, &row) in rankings.groups.iter().zip(&rankings.rows) {
        let RankedGroup {
            prompt,
            responses,
            ranking,
            ..
        } = group;
        let (best, worst) = (ranking.iter().min(), ranking.iter().max());
        for (answer, rank) in responses.iter().zip(ranking) {
            let desirable = Some(rank) == best;
            if !desirable && Some(rank) != worst {
                out.middle += 1;
                continue;
            }
            out.answers.push(LabelledAnswer {
                prompt: prompt.clone(),
                answer: answer.clone(),
                desirable,
            });
            out.rows.push(row);
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read(text: &str) -> Result<Unpaired, DataError> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("data.jsonl");
        std::fs::write(&path, text).unwrap();
        labelled_answers(&crate::load::read_table(&path)?, &path)
    }

    #[test]
    fn trl_unpaired_rows_and_null_labels() {
        let u = read(concat!(
            r#"{"prompt": "p1", "completion": "good", "label": true}"#,
            "\n",
            r#"{"prompt": "p1", "completion": "bad", "label": false}"#,
            "\n",
            r#"{"prompt": "p2", "completion": "?", "label": null}"#,
            "\n"
        ))
        .unwrap();
        assert_eq!(u.answers.len(), 2);
        assert_eq!(
            (u.answers[0].desirable, u.answers[1].desirable),
            (true, false)
        );
        assert_eq!(u.answers[1].answer, "bad");
        assert_eq!((u.rows.clone(), u.unlabelled), (vec![0, 1], 1));
    }

    #[test]
    fn rankings_give_their_best_and_worst_answers() {
        let u =
            read(r#"{"prompt": "p", "responses": ["a", "b", "c", "d"], "ranking": [2, 0, 1, 2]}"#)
                .unwrap();
        let got: Vec<(&str, bool)> = u
            .answers
            .iter()
            .map(|a| (a.answer.as_str(), a.desirable))
            .collect();
        assert_eq!(got, [("a", false), ("b", true), ("d", false)]);
        assert_eq!(u.middle, 1);
        let pairs = read(concat!(
            r#"{"prompt": "p", "chosen": "x", "rejected": "y"}"#,
            "\n",
            r#"{"prompt": "q", "chosen": "z", "rejected": "z"}"#,
            "\n"
        ))
        .unwrap();
        assert_eq!((pairs.desirable(), pairs.answers.len()), (1, 2));
        assert_eq!(pairs.says_nothing, 1, "chosen identical to rejected");
    }

    #[test]
    fn bad_labels_name_the_column_and_row() {
        let err = read(r#"{"prompt": "p", "completion": "a", "label": "yes"}"#).unwrap_err();
        assert!(err.to_string().contains("`label`"), "{err}");
        assert!(err.to_string().contains("booleans"), "{err}");
        let err = read(r#"{"prompt": "p", "responses": ["a", "b"], "label": true}"#).unwrap_err();
        assert!(err.to_string().contains("judges one answer"), "{err}");
        assert!(err.to_string().contains("row 1"), "{err}");
        // A queue mixing ranked groups and thumbs: the ranked rows (no
        // label) are passed over.
        let mixed = read(concat!(
            r#"{"prompt": "p", "responses": ["a", "b"], "ranking": [0, 1], "label": null}"#,
            "\n",
            r#"{"prompt": "q", "responses": ["c"], "ranking": [], "label": true}"#,
            "\n"
        ))
        .unwrap();
        assert_eq!(
            (mixed.answers.len(), mixed.rows.clone(), mixed.unlabelled),
            (1, vec![1], 1)
        );
        let err = read(r#"{"prompt": "p", "completion": "a", "label": null}"#).unwrap_err();
        assert!(err.to_string().contains("no row labels an answer"), "{err}");
    }
}
