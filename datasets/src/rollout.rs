//! PPO rollouts as tables: one row per sampled answer, with its per-token
//! numbers, for people to inspect and later stages to label.

use std::path::Path;

use polars::prelude::*;

use crate::load::{write_parquet, DataError};

/// One sampled answer and what PPO computed for it. Per-token vectors run
/// over the answer's tokens.
#[derive(Debug, Clone, PartialEq)]
pub struct RolloutRow {
    pub iteration: i64,
    pub prompt: String,
    pub answer: String,
    pub token_ids: Vec<i64>,
    pub logprobs: Vec<f64>,
    pub ref_logprobs: Vec<f64>,
    pub values: Vec<f64>,
    pub rewards: Vec<f64>,
    pub advantages: Vec<f64>,
    pub returns: Vec<f64>,
    /// The reward model's score of the whole answer.
    pub score: f64,
    /// Whether the answer ended with EOS (an episode: its environment
    /// said done).
    pub finished: bool,
    /// A multi-turn episode's turns in order (empty for one answer):
    /// the `turn_roles`, `turn_texts` and `turn_tokens` columns; `answer`
    /// and `token_ids` hold them all, the environment's too.
    pub turns: Vec<RolloutTurn>,
}

/// One turn of an episode: who wrote it (`policy` or `environment`), its
/// text and its number of tokens.
#[derive(Debug, Clone, PartialEq)]
pub struct RolloutTurn {
    pub role: String,
    pub text: String,
    pub tokens: u32,
}

fn list_f64(name: &str, rows: &[RolloutRow], get: impl Fn(&RolloutRow) -> &Vec<f64>) -> Column {
    let items: Vec<Series> = rows
        .iter()
        .map(|r| Series::new("".into(), get(r).as_slice()))
        .collect();
    Series::new(name.into(), items).into()
}

fn turn_texts(name: &str, rows: &[RolloutRow], get: fn(&RolloutTurn) -> &str) -> Column {
    let items: Vec<Series> = rows
        .iter()
        .map(|r| Series::new("".into(), r.turns.iter().map(get).collect::<Vec<&str>>()))
        .collect();
    Series::new(name.into(), items).into()
}

fn turn_tokens(rows: &[RolloutRow]) -> Column {
    let items: Vec<Series> = rows
        .iter()
        .map(|r| {
            Series::new(
                "".into(),
                r.turns.iter().map(|t| t.tokens).collect::<Vec<u32>>(),
            )
        })
        .collect();
    Series::new("turn_tokens".into(), items).into()
}

/// The rows as a DataFrame.
pub fn rollout_frame(rows: &[RolloutRow]) -> Result<DataFrame, PolarsError> {
    let ids: Vec<Series> = rows
        .iter()
        .map(|r| Series::new("".into(), r.token_ids.as_slice()))
        .collect();
    DataFrame::new_infer_height(vec![
        Column::new(
            "iteration".into(),
            rows.iter().map(|r| r.iteration).collect::<Vec<_>>(),
        ),
        Column::new(
            "prompt".into(),
            rows.iter().map(|r| r.prompt.as_str()).collect::<Vec<_>>(),
        ),
        Column::new(
            "answer".into(),
            rows.iter().map(|r| r.answer.as_str()).collect::<Vec<_>>(),
        ),
        Series::new("token_ids".into(), ids).into(),
        list_f64("logprobs", rows, |r| &r.logprobs),
        list_f64("ref_logprobs", rows, |r| &r.ref_logprobs),
        list_f64("values", rows, |r| &r.values),
        list_f64("rewards", rows, |r| &r.rewards),
        list_f64("advantages", rows, |r| &r.advantages),
        list_f64("returns", rows, |r| &r.returns),
        Column::new(
            "score".into(),
            rows.iter().map(|r| r.score).collect::<Vec<_>>(),
        ),
        Column::new(
            "finished".into(),
            rows.iter().map(|r| r.finished).collect::<Vec<_>>(),
        ),
        turn_texts("turn_roles", rows, |t| &t.role),
        turn_texts("turn_texts", rows, |t| &t.text),
        turn_tokens(rows),
    ])
}

/// Where a stage keeps its rollouts: `<stage>/rollouts/iter-NNNN.parquet`.
pub const ROLLOUTS_DIR: &str = "rollouts";

/// The rollouts file of iteration `it` in a stage folder.
pub fn rollouts_file(stage_dir: &Path, it: i64) -> std::path::PathBuf {
    stage_dir
        .join(ROLLOUTS_DIR)
        .join(format!("iter-{it:04}.parquet"))
}

/// A stage folder's rollouts files, by iteration.
pub fn rollouts_files(stage_dir: &Path) -> Vec<(i64, std::path::PathBuf)> {
    let mut out: Vec<(i64, std::path::PathBuf)> = std::fs::read_dir(stage_dir.join(ROLLOUTS_DIR))
        .into_iter()
        .flatten()
        .filter_map(Result::ok)
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            let it = name
                .strip_prefix("iter-")?
                .strip_suffix(".parquet")?
                .parse()
                .ok()?;
            Some((it, e.path()))
        })
        .collect();
    out.sort();
    out
}

/// Writes rollouts as Parquet, atomically.
pub fn write_rollouts(path: &Path, rows: &[RolloutRow]) -> Result<(), DataError> {
    let mut df = rollout_frame(rows).map_err(|e| DataError::Parse {
        path: path.to_owned(),
        message: format!("cannot build the rollout table ({e})"),
    })?;
    write_parquet(path, &mut df)
}

/// The prompt and answer of each row of a rollouts file, for judging
/// them afresh (the gold-score-against-KL picture).
pub fn read_prompts_and_answers(path: &Path) -> Result<Vec<(String, String)>, DataError> {
    let df = crate::load::read_table(path)?;
    let prompts = crate::load::string_column(&df, path, "prompt", "the prompt text")?;
    let answers = crate::load::string_column(&df, path, "answer", "the sampled answer")?;
    Ok(prompts.into_iter().zip(answers).collect())
}

/// Each row's prompt, answer and score (NaN where a score is missing),
/// for a page that shows the newest rollouts.
pub fn read_scored(path: &Path) -> Result<Vec<(String, String, f64)>, DataError> {
    let df = crate::load::read_table(path)?;
    let prompts = crate::load::string_column(&df, path, "prompt", "the prompt text")?;
    let answers = crate::load::string_column(&df, path, "answer", "the sampled answer")?;
    let scores = df
        .column("score")
        .and_then(|c| c.cast(&DataType::Float64))
        .map_err(|e| DataError::Parse {
            path: path.to_owned(),
            message: format!("no numeric score column ({e})"),
        })?;
    let scores = scores.f64().expect("cast to f64");
    Ok(prompts
        .into_iter()
        .zip(answers)
        .zip(scores.iter())
        .map(|((prompt, answer), score)| (prompt, answer, score.unwrap_or(f64::NAN)))
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::load::read_table;

    #[test]
    fn rollouts_round_trip_through_parquet() {
        let row = RolloutRow {
            iteration: 3,
            prompt: "Add: 1+2\n".into(),
            answer: "3".into(),
            token_ids: vec![51, 256],
            logprobs: vec![-0.1, -0.2],
            ref_logprobs: vec![-0.3, -0.4],
            values: vec![0.5, 0.6],
            rewards: vec![0.0, 1.0],
            advantages: vec![0.1, -0.1],
            returns: vec![0.6, 0.5],
            score: 1.0,
            finished: true,
            turns: vec![],
        };
        let episode = RolloutRow {
            answer: "CALC 1+2= 3A: 3".into(),
            turns: ["CALC 1+2", "= 3", "A: 3"]
                .iter()
                .zip(["policy", "environment", "policy"])
                .map(|(text, role)| RolloutTurn {
                    role: role.into(),
                    text: (*text).into(),
                    tokens: text.len() as u32,
                })
                .collect(),
            ..row.clone()
        };
        let d = tempfile::tempdir().unwrap();
        let p = rollouts_file(d.path(), 3);
        write_rollouts(&p, &[row.clone(), episode]).unwrap();
        assert_eq!(rollouts_files(d.path()), vec![(3, p.clone())]);
        let scored = read_scored(&p).unwrap();
        assert_eq!(scored.len(), 2);
        assert_eq!((scored[0].1.as_str(), scored[0].2), ("3", 1.0));
        assert_eq!(
            read_prompts_and_answers(&p).unwrap(),
            vec![
                ("Add: 1+2\n".to_string(), "3".to_string()),
                ("Add: 1+2\n".to_string(), "CALC 1+2= 3A: 3".to_string())
            ]
        );
        let df = read_table(&p).unwrap();
        assert_eq!(df.height(), 2);
        let names: Vec<String> = df
            .get_column_names()
            .iter()
            .map(|c| c.to_string())
            .collect();
        for c in [
            "prompt",
            "answer",
            "token_ids",
            "logprobs",
            "ref_logprobs",
            "values",
            "rewards",
            "advantages",
            "returns",
            "score",
        ] {
            assert!(names.contains(&c.to_string()), "{c} missing");
        }
        let ids = df
            .column("token_ids")
            .unwrap()
            .list()
            .unwrap()
            .get_as_series(0)
            .unwrap();
        assert_eq!(
            ids.i64().unwrap().iter().collect::<Vec<_>>(),
            vec![Some(51), Some(256)]
        );
        let turns = |c: &str, row: usize| {
            df.column(c)
                .unwrap()
                .list()
                .unwrap()
                .get_as_series(row)
                .unwrap()
        };
        assert_eq!(turns("turn_roles", 0).len(), 0, "one answer: no turns");
        let roles: Vec<_> = turns("turn_roles", 1)
            .str()
            .unwrap()
            .iter()
            .flatten()
            .map(str::to_owned)
            .collect();
        assert_eq!(roles, ["policy", "environment", "policy"]);
        let texts: Vec<_> = turns("turn_texts", 1)
            .str()
            .unwrap()
            .iter()
            .flatten()
            .map(str::to_owned)
            .collect();
        assert_eq!(texts, ["CALC 1+2", "= 3", "A: 3"]);
        let tokens: Vec<_> = turns("turn_tokens", 1)
            .u32()
            .unwrap()
            .iter()
            .flatten()
            .collect();
        assert_eq!(tokens, [8, 3, 4]);
    }
}
