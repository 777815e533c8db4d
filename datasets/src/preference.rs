//! Preference data: answers to one prompt, ranked.
//!
//! Three schemas read into the same [`RankedGroup`]:
//! - pairwise `{prompt, chosen, rejected}` (TRL's explicit prompt);
//! - implicit prompt `{chosen, rejected}`: two full dialogues (Anthropic's
//!   HH-RLHF), the prompt being their shared part up to the last
//!   `\n\nAssistant:` they have in common;
//! - K-wise `{prompt, responses: [..], ranking: [..]}`, `ranking[i]` the rank
//!   of `responses[i]` with 0 the best (InstructGPT's K = 4..9 rankings).
//!
//! An optional numeric `margin` column applies to every pair of its row.

use std::path::Path;

use polars::prelude::*;

use crate::load::{describe, require, string_column, DataError};

/// Answers to one prompt and their ranks (0 = best; equal ranks are ties).
#[derive(Debug, Clone, PartialEq)]
pub struct RankedGroup {
    pub prompt: String,
    pub responses: Vec<String>,
    pub ranking: Vec<usize>,
    /// Required reward gap for every pair (Llama 2's margin loss); 0 if absent.
    pub margin: f64,
}

impl RankedGroup {
    /// Every ordered pair `(better, worse)` of response indices; ties give none.
    pub fn pairs(&self) -> Vec<(usize, usize)> {
        let k = self.responses.len();
        let mut out = Vec::with_capacity(k * (k - 1) / 2);
        for i in 0..k {
            for j in i + 1..k {
                match self.ranking[i].cmp(&self.ranking[j]) {
                    std::cmp::Ordering::Less => out.push((i, j)),
                    std::cmp::Ordering::Greater => out.push((j, i)),
                    std::cmp::Ordering::Equal => {}
                }
            }
        }
        out
    }
}

const EXPECTED: &str =
    "{prompt, chosen, rejected}, {chosen, rejected} (implicit prompt) or {prompt, responses, ranking}";

/// The marker after which HH-RLHF dialogues give the assistant's turn.
pub const ASSISTANT_MARKER: &str = "\n\nAssistant:";

/// Splits two full dialogues into (prompt, chosen answer, rejected answer).
///
/// The prompt is the longest shared prefix cut back to the end of the last
/// `\n\nAssistant:` inside it, so it ends where the assistant starts
/// speaking. Dialogues that differ before their last assistant turn keep
/// those earlier differences inside the answers. Dialogues sharing no
/// assistant marker get an empty prompt.
pub fn split_implicit_prompt(chosen: &str, rejected: &str) -> (String, String, String) {
    let common = chosen
        .char_indices()
        .zip(rejected.chars())
        .find(|((_, a), b)| a != b)
        .map_or(chosen.len().min(rejected.len()), |((i, _), _)| i);
    let shared = &chosen[..common];
    let cut = shared
        .rfind(ASSISTANT_MARKER)
        .map_or(0, |i| i + ASSISTANT_MARKER.len());
    (
        chosen[..cut].to_owned(),
        chosen[cut..].to_owned(),
        rejected[cut..].to_owned(),
    )
}

/// Ranked groups read from a table, and the rows passed over because they
/// say nothing (real preference sets have them: HH-RLHF's test split has a
/// pair whose chosen equals its rejected).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Rankings {
    pub groups: Vec<RankedGroup>,
    /// Each group's row in the table (0-based).
    pub rows: Vec<usize>,
    /// Pairs whose chosen answer equals the rejected one.
    pub identical: usize,
    /// Groups that rank every answer equal.
    pub all_tied: usize,
    /// Groups a labeller skipped or marked not rankable (a labelling
    /// queue's `skipped` / `not_rankable` columns).
    pub unlabelled: usize,
}

impl Rankings {
    pub fn skipped(&self) -> usize {
        self.identical + self.all_tied + self.unlabelled
    }

    /// "N rows skipped (...)" for the log, if any were.
    pub fn skipped_note(&self) -> Option<String> {
        (self.skipped() > 0).then(|| {
            format!(
                "{} rows skipped as saying nothing: {} with `chosen` identical to `rejected`, {} ranking every answer equal, {} skipped or not rankable by their labeller",
                self.skipped(),
                self.identical,
                self.all_tied,
                self.unlabelled
            )
        })
    }
}

/// Reads ranked groups from a table in any of the three schemas, passing
/// over (and counting) rows that say nothing; a table of nothing else is
/// an error.
pub fn ranked_groups(df: &DataFrame, path: &Path) -> Result<Rankings, DataError> {
    let (labelled, original) = labelled_rows(df, path)?;
    let mut kept = ranked_rows(&labelled, path)?;
    kept.unlabelled = df.height() - labelled.height();
    kept.rows = kept.rows.iter().map(|&i| original[i]).collect();
    if kept.groups.is_empty() {
        let note = kept.skipped_note().unwrap_or_default();
        return Err(DataError::Parse {
            path: path.to_owned(),
            message: format!("no row ranks two different answers: {note}"),
        });
    }
    Ok(kept)
}

/// The rows a labeller ranked (all rows of a table without a labelling
/// queue's `skipped` / `not_rankable` columns), and their row numbers.
pub(crate) fn labelled_rows(
    df: &DataFrame,
    path: &Path,
) -> Result<(DataFrame, Vec<usize>), DataError> {
    let mut keep = vec![true; df.height()];
    for name in ["skipped", "not_rankable"] {
        let Ok(column) = df.column(name) else {
            continue;
        };
        let flags = column.bool().map_err(|_| DataError::WrongType {
            path: path.to_owned(),
            column: name.into(),
            expected: "booleans".into(),
            found: describe(column.dtype()),
        })?;
        for (k, flag) in keep.iter_mut().zip(flags.iter()) {
            *k &= flag != Some(true);
        }
    }
    let original: Vec<usize> = (0..df.height()).filter(|&i| keep[i]).collect();
    if original.len() == df.height() {
        return Ok((df.clone(), original));
    }
    let mask = BooleanChunked::new("keep".into(), &keep);
    let filtered = df.filter(&mask).map_err(|e| DataError::Parse {
        path: path.to_owned(),
        message: e.to_string(),
    })?;
    Ok((filtered, original))
}

fn ranked_rows(df: &DataFrame, path: &Path) -> Result<Rankings, DataError> {
    let margins = margin_column(df, path)?;
    let mut groups = if df.column("responses").is_ok() {
        kwise(df, path)?
    } else {
        let chosen = string_column(df, path, "chosen", EXPECTED)?;
        let rejected = string_column(df, path, "rejected", EXPECTED)?;
        let prompts = if df.column("prompt").is_ok() {
            Some(string_column(df, path, "prompt", EXPECTED)?)
        } else {
            None
        };
        let mut out = Vec::with_capacity(chosen.len());
        for (i, (c, r)) in chosen.into_iter().zip(rejected).enumerate() {
            let (prompt, c, r) = match &prompts {
                Some(p) => (p[i].clone(), c, r),
                None => split_implicit_prompt(&c, &r),
            };
            out.push(RankedGroup {
                prompt,
                responses: vec![c, r],
                ranking: vec![0, 1],
                margin: 0.0,
            });
        }
        out
    };
    let mut kept = Rankings::default();
    for (i, mut g) in groups.drain(..).enumerate() {
        if let Some(m) = &margins {
            g.margin = m[i];
        }
        if g.responses.len() == 2 && g.responses[0] == g.responses[1] {
            kept.identical += 1;
        } else if g.pairs().is_empty() {
            kept.all_tied += 1;
        } else {
            kept.groups.push(g);
            kept.rows.push(i);
        }
    }
    Ok(kept)
}

fn margin_column(df: &DataFrame, path: &Path) -> Result<Option<Vec<f64>>, DataError> {
    let Ok(column) = df.column("margin") else {
        return Ok(None);
    };
    let wrong = || DataError::WrongType {
        path: path.to_owned(),
        column: "margin".into(),
        expected: "numbers".into(),
        found: describe(column.dtype()),
    };
    if !column.dtype().is_primitive_numeric() {
        return Err(wrong());
    }
    let floats = column.cast(&DataType::Float64).map_err(|_| wrong())?;
    let floats = floats.f64().map_err(|_| wrong())?;
    floats
        .iter()
        .enumerate()
        .map(|(i, v)| match v {
            Some(m) if m.is_finite() && m >= 0.0 => Ok(m),
            Some(m) => Err(DataError::BadValue {
                path: path.to_owned(),
                row: i + 1,
                column: "margin".into(),
                message: format!("is {m}; expected a finite number >= 0"),
            }),
            None => Ok(0.0),
        })
        .collect::<Result<Vec<_>, _>>()
        .map(Some)
}

fn kwise(df: &DataFrame, path: &Path) -> Result<Vec<RankedGroup>, DataError> {
    let prompts = string_column(df, path, "prompt", EXPECTED)?;
    let list_of = |name: &str, expected: &str| -> Result<Vec<Option<Series>>, DataError> {
        let column = require(df, path, name, EXPECTED)?;
        let lists = column.list().map_err(|_| DataError::WrongType {
            path: path.to_owned(),
            column: name.into(),
            expected: expected.into(),
            found: describe(column.dtype()),
        })?;
        Ok(lists.series_iter().collect())
    };
    let responses = list_of("responses", "lists of strings")?;
    let rankings = list_of("ranking", "lists of integers")?;
    let bad = |row: usize, column: &str, message: String| DataError::BadValue {
        path: path.to_owned(),
        row,
        column: column.into(),
        message,
    };
    let mut out = Vec::with_capacity(prompts.len());
    for (i, prompt) in prompts.into_iter().enumerate() {
        let row = i + 1;
        let r = responses[i]
            .as_ref()
            .ok_or_else(|| bad(row, "responses", "is missing (null)".into()))?;
        let k = rankings[i]
            .as_ref()
            .ok_or_else(|| bad(row, "ranking", "is missing (null)".into()))?;
        let answers: Vec<String> = r
            .str()
            .map_err(|_| {
                bad(
                    row,
                    "responses",
                    format!("must hold strings, got {}", describe(r.dtype())),
                )
            })?
            .iter()
            .map(|s| {
                s.map(str::to_owned)
                    .ok_or_else(|| bad(row, "responses", "contains a null".into()))
            })
            .collect::<Result<_, _>>()?;
        if !k.dtype().is_integer() {
            return Err(bad(
                row,
                "ranking",
                format!("must hold integers, got {}", describe(k.dtype())),
            ));
        }
        let ranks = k
            .cast(&DataType::Int64)
            .map_err(|e| bad(row, "ranking", e.to_string()))?;
        let ranks: Vec<i64> = ranks
            .i64()
            .map_err(|e| bad(row, "ranking", e.to_string()))?
            .iter()
            .map(|v| v.ok_or_else(|| bad(row, "ranking", "contains a null".into())))
            .collect::<Result<_, _>>()?;
        if answers.len() < 2 {
            return Err(bad(
                row,
                "responses",
                format!("has {} answer(s); ranking needs at least 2", answers.len()),
            ));
        }
        if ranks.len() != answers.len() {
            return Err(bad(
                row,
                "ranking",
                format!("has {} ranks for {} responses", ranks.len(), answers.len()),
            ));
        }
        if let Some(r) = ranks.iter().find(|&&r| r < 0) {
            return Err(bad(
                row,
                "ranking",
                format!("has rank {r}; ranks start at 0 (the best)"),
            ));
        }
        out.push(RankedGroup {
            prompt,
            responses: answers,
            ranking: ranks.into_iter().map(|r| r as usize).collect(),
            margin: 0.0,
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::load::read_table;

    fn load(name: &str, text: &str) -> Result<Vec<RankedGroup>, DataError> {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join(name);
        std::fs::write(&p, text).unwrap();
        ranked_groups(&read_table(&p)?, &p).map(|r| r.groups)
    }

    #[test]
    fn implicit_prompt_splits_at_the_last_shared_assistant_turn() {
        let c = "\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: Joke?\n\nAssistant: Why did the chicken...";
        let r = "\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: Joke?\n\nAssistant: No.";
        let (p, a, b) = split_implicit_prompt(c, r);
        assert_eq!(
            p,
            "\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: Joke?\n\nAssistant:"
        );
        assert_eq!(
            (a.as_str(), b.as_str()),
            (" Why did the chicken...", " No.")
        );
        // Differing before the last assistant turn: the earlier difference
        // stays inside both answers, which share only the first turns.
        let c = "\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: Joke?\n\nAssistant: Sure.";
        let r = "\n\nHuman: Hi\n\nAssistant: Go away.\n\nHuman: Joke?\n\nAssistant: No.";
        let (p, a, b) = split_implicit_prompt(c, r);
        assert_eq!(p, "\n\nHuman: Hi\n\nAssistant:");
        assert_eq!(a, " Hello!\n\nHuman: Joke?\n\nAssistant: Sure.");
        assert_eq!(b, " Go away.\n\nHuman: Joke?\n\nAssistant: No.");
        // Nothing shared: empty prompt, whole texts as answers.
        assert_eq!(
            split_implicit_prompt("abc", "xyz"),
            (String::new(), "abc".into(), "xyz".into())
        );
        // Multi-byte characters at the split do not panic.
        let (p, a, _) = split_implicit_prompt("\n\nAssistant: é", "\n\nAssistant: è");
        assert_eq!((p.as_str(), a.as_str()), ("\n\nAssistant:", " é"));
    }

    #[test]
    fn three_schemas_give_groups_and_pairs() {
        let g = load(
            "p.jsonl",
            "{\"prompt\": \"q\", \"chosen\": \"a\", \"rejected\": \"b\", \"margin\": 1.5}\n",
        )
        .unwrap();
        assert_eq!(g[0].responses, vec!["a", "b"]);
        assert_eq!((g[0].pairs(), g[0].margin), (vec![(0, 1)], 1.5));
        let g = load("i.jsonl", "{\"chosen\": \"\\n\\nHuman: q\\n\\nAssistant: a\", \"rejected\": \"\\n\\nHuman: q\\n\\nAssistant: b\"}\n").unwrap();
        assert_eq!(g[0].prompt, "\n\nHuman: q\n\nAssistant:");
        let g = load("k.jsonl", "{\"prompt\": \"q\", \"responses\": [\"x\", \"y\", \"z\", \"w\"], \"ranking\": [2, 0, 1, 2]}\n").unwrap();
        // 4 answers, one tie: C(4,2) - 1 = 5 pairs, better first.
        assert_eq!(g[0].pairs(), vec![(1, 0), (2, 0), (1, 2), (1, 3), (2, 3)]);
    }

    #[test]
    fn bad_rows_are_named() {
        let m = |t: &str| load("b.jsonl", t).unwrap_err().to_string();
        let e = m("{\"prompt\": \"q\", \"responses\": [\"x\", \"y\"], \"ranking\": [0]}\n");
        assert!(
            e.contains("row 1") && e.contains("1 ranks for 2 responses"),
            "{e}"
        );
        let e = m("{\"prompt\": \"q\", \"responses\": [\"x\", \"y\"], \"ranking\": [0, 0]}\n");
        assert!(
            e.contains("no row ranks") && e.contains("1 ranking every"),
            "{e}"
        );
        let e = m("{\"prompt\": \"q\", \"chosen\": \"a\", \"rejected\": \"a\"}\n");
        assert!(e.contains("1 with `chosen` identical"), "{e}");
        let e = m(
            "{\"prompt\": \"q\", \"chosen\": \"a\", \"rejected\": \"b\", \"margin\": \"big\"}\n",
        );
        assert!(
            e.contains("`margin` holds strings, expected numbers"),
            "{e}"
        );
        let e = m("{\"prompt\": \"q\", \"good\": \"a\"}\n");
        assert!(e.contains("missing column `chosen`"), "{e}");
    }

    #[test]
    fn rows_that_say_nothing_are_skipped_counted_and_rows_kept_in_order() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("k.jsonl");
        std::fs::write(
            &p,
            "{\"prompt\": \"q\", \"responses\": [\"x\", \"x\"], \"ranking\": [0, 1]}\n\
             {\"prompt\": \"q\", \"responses\": [\"x\", \"y\"], \"ranking\": [0, 0]}\n\
             {\"prompt\": \"r\", \"responses\": [\"x\", \"y\"], \"ranking\": [1, 0]}\n",
        )
        .unwrap();
        let r = ranked_groups(&read_table(&p).unwrap(), &p).unwrap();
        assert_eq!((r.groups.len(), r.rows.clone()), (1, vec![2]));
        assert_eq!((r.identical, r.all_tied, r.skipped()), (1, 1, 2));
        assert_eq!(r.groups[0].prompt, "r");
        assert!(r.skipped_note().unwrap().starts_with("2 rows skipped"));
    }

    #[test]
    fn helpful_base_skips_its_identical_pair_when_present() {
        let p = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../shared/data/hh-rlhf/helpful-base-test.jsonl.gz");
        if !p.exists() {
            eprintln!("skipped: {} is absent", p.display());
            return;
        }
        let table = read_table(&p).unwrap();
        let r = ranked_groups(&table, &p).unwrap();
        assert!(r.identical >= 1, "{:?}", (r.identical, r.all_tied));
        assert_eq!(r.groups.len() + r.skipped(), table.height());
    }

    #[test]
    fn reads_the_real_hh_rlhf_file_when_present() {
        // The shared copy of Anthropic's HH-RLHF test split, beside the
        // checkout; skipped on machines without it.
        let p = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../shared/data/hh-rlhf/harmless-base-test.jsonl.gz");
        if !p.exists() {
            return;
        }
        let groups = ranked_groups(&read_table(&p).unwrap(), &p).unwrap().groups;
        assert_eq!(groups.len(), 2312);
        let with_turn = groups
            .iter()
            .filter(|g| g.prompt.ends_with(ASSISTANT_MARKER))
            .count();
        assert!(with_turn >= 2307, "{with_turn}");
    }
}

/// Writes ranked groups as K-wise Parquet (`prompt`, `responses`,
/// `ranking`, `margin`, plus provenance: `round` and the `policy` that
/// wrote the answers, empty for human data), atomically.
pub fn write_ranked_groups(
    path: &Path,
    groups: &[RankedGroup],
    round: &[i64],
    policy: &[String],
) -> Result<(), DataError> {
    let to_err = |e: PolarsError| DataError::Parse {
        path: path.to_owned(),
        message: format!("cannot build the preference table ({e})"),
    };
    let responses: Vec<Series> = groups
        .iter()
        .map(|g| {
            Series::new(
                "".into(),
                g.responses.iter().map(String::as_str).collect::<Vec<_>>(),
            )
        })
        .collect();
    let rankings: Vec<Series> = groups
        .iter()
        .map(|g| {
            Series::new(
                "".into(),
                g.ranking.iter().map(|&r| r as i64).collect::<Vec<_>>(),
            )
        })
        .collect();
    let mut df = DataFrame::new_infer_height(vec![
        Column::new(
            "prompt".into(),
            groups.iter().map(|g| g.prompt.as_str()).collect::<Vec<_>>(),
        ),
        Series::new("responses".into(), responses).into(),
        Series::new("ranking".into(), rankings).into(),
        Column::new(
            "margin".into(),
            groups.iter().map(|g| g.margin).collect::<Vec<_>>(),
        ),
        Column::new("round".into(), round.to_vec()),
        Column::new("policy".into(), policy.to_vec()),
    ])
    .map_err(to_err)?;
    crate::load::write_parquet(path, &mut df)
}

#[cfg(test)]
mod parquet_tests {
    use super::*;
    use crate::load::read_table;

    #[test]
    fn ranked_groups_round_trip_through_parquet() {
        let groups = vec![
            RankedGroup {
                prompt: "q".into(),
                responses: vec!["a".into(), "b".into(), "c".into()],
                ranking: vec![2, 0, 1],
                margin: 0.0,
            },
            RankedGroup {
                prompt: "r".into(),
                responses: vec!["x".into(), "y".into()],
                ranking: vec![0, 1],
                margin: 0.5,
            },
        ];
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("prefs.parquet");
        write_ranked_groups(
            &p,
            &groups,
            &[0, 1],
            &["".into(), "runs/x/ppo/checkpoint".into()],
        )
        .unwrap();
        let back = ranked_groups(&read_table(&p).unwrap(), &p).unwrap().groups;
        assert_eq!(back, groups);
    }
}
