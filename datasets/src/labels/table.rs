//! `labels.parquet`: the queue's rows as a table, for people and the
//! reward model's loader.

use std::path::Path;
use std::sync::Arc;

use polars::prelude::*;

use super::{file_err, LabelError, LabelRow};

/// Writes `rows` to `path` whole (renamed into place).
pub(super) fn write(path: &Path, rows: &[Arc<LabelRow>]) -> Result<(), LabelError> {
    let list = |f: &dyn Fn(&LabelRow) -> Series| -> Series {
        Series::new("".into(), rows.iter().map(|r| f(r)).collect::<Vec<_>>())
    };
    let col = |name: &str, s: Series| -> Column { s.with_name(name.into()).into() };
    let strings = |f: fn(&LabelRow) -> &str| {
        Series::new("".into(), rows.iter().map(|r| f(r)).collect::<Vec<_>>())
    };
    let mut df = DataFrame::new_infer_height(vec![
        col(
            "group",
            Series::new("".into(), rows.iter().map(|r| r.group).collect::<Vec<_>>()),
        ),
        col("prompt", strings(|r| &r.prompt)),
        col(
            "responses",
            list(&|r| {
                Series::new(
                    "".into(),
                    r.responses.iter().map(String::as_str).collect::<Vec<_>>(),
                )
            }),
        ),
        col(
            "ranking",
            list(&|r| Series::new("".into(), r.ranking.clone())),
        ),
        col(
            "label",
            Series::new("".into(), rows.iter().map(|r| r.label).collect::<Vec<_>>()),
        ),
        col("labeller", strings(|r| &r.labeller)),
        col(
            "shown_at",
            Series::new(
                "".into(),
                rows.iter().map(|r| r.shown_at).collect::<Vec<_>>(),
            ),
        ),
        col(
            "submitted_at",
            Series::new(
                "".into(),
                rows.iter().map(|r| r.submitted_at).collect::<Vec<_>>(),
            ),
        ),
        col(
            "seconds",
            Series::new(
                "".into(),
                rows.iter().map(|r| r.seconds).collect::<Vec<_>>(),
            ),
        ),
        col(
            "not_rankable",
            Series::new(
                "".into(),
                rows.iter().map(|r| r.not_rankable).collect::<Vec<_>>(),
            ),
        ),
        col(
            "skipped",
            Series::new(
                "".into(),
                rows.iter().map(|r| r.skipped).collect::<Vec<_>>(),
            ),
        ),
        col("reason", strings(|r| &r.reason)),
        col("comment", strings(|r| &r.comment)),
        col(
            "round",
            Series::new("".into(), rows.iter().map(|r| r.round).collect::<Vec<_>>()),
        ),
        col("policy", strings(|r| &r.policy)),
    ])
    .map_err(|e| file_err(path, e))?;
    crate::load::write_parquet(path, &mut df).map_err(|e| file_err(path, e))
}
