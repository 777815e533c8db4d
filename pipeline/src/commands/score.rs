use std::path::Path;

use anyhow::{bail, Context};
use rlhf_datasets::Tokenizer;
use rlhf_stages::model::device::parse_device;
use rlhf_stages::model::score::sequence_logprobs;
use rlhf_stages::{Head, HeadChoice, Model};
use serde_json::{json, Value};

use crate::cli::ScoreArgs;
use crate::commands::jsonl::read_json_lines;

/// One thing to score, as given: text (tokenized once the model is
/// loaded) or token ids.
enum Given {
    Text(String),
    Ids(Vec<i64>),
}

/// One thing to score: its text (if given as text) and its ids.
struct Item {
    text: Option<String>,
    ids: Vec<i64>,
}

pub fn run(args: ScoreArgs) -> anyhow::Result<()> {
    let device = parse_device(&args.device.device)?;
    let mut given: Vec<Given> = args.text.iter().cloned().map(Given::Text).collect();
    if let Some(path) = &args.input {
        given.extend(read_items(path)?);
    }
    if given.is_empty() {
        bail!("nothing to score: give --text or --input");
    }
    // Token ids need no tokenizer: a folder without one still scores them.
    let needs_tokenizer = given.iter().any(|g| matches!(g, Given::Text(_)));
    let (tok, _vs, gpt) = if needs_tokenizer {
        let m = Model::load(&args.model, HeadChoice::Want(Head::Lm), device)?;
        (Some(m.tokenizer), m.vs, m.net)
    } else {
        let (vs, gpt) = Model::load_network(&args.model, HeadChoice::Want(Head::Lm), device)?;
        (Tokenizer::from_model_dir(&args.model).ok(), vs, gpt)
    };
    let items = given
        .into_iter()
        .map(|g| match (g, &tok) {
            (Given::Text(t), Some(tok)) => Ok(Item {
                ids: tok.encode(&t)?,
                text: Some(t),
            }),
            (Given::Text(_), None) => unreachable!("loaded with its tokenizer"),
            (Given::Ids(ids), _) => Ok(Item { text: None, ids }),
        })
        .collect::<anyhow::Result<Vec<Item>>>()?;
    let limit = gpt.n_positions() as usize;
    let vocab = gpt.vocab_size();
    for (i, item) in items.iter().enumerate() {
        if item.ids.len() > limit {
            bail!(
                "item {i}: {} tokens exceed the model's n_positions ({limit})",
                item.ids.len()
            );
        }
        if let Some(bad) = item.ids.iter().find(|&&id| id < 0 || id >= vocab) {
            bail!("item {i}: token id {bad} is outside the vocabulary (0..{vocab})");
        }
    }
    let seqs: Vec<Vec<i64>> = items.iter().map(|it| it.ids.clone()).collect();
    let logprobs = sequence_logprobs(&gpt, &seqs, args.batch_size, device);
    for (item, lp) in items.iter().zip(logprobs) {
        let nll: f64 = -lp.iter().sum::<f64>();
        let n = lp.len();
        let mean_nll = if n > 0 { nll / n as f64 } else { f64::NAN };
        let tokens = tok.as_ref().map(|tok| {
            item.ids
                .iter()
                .map(|&id| tok.token_text(id))
                .collect::<Vec<_>>()
        });
        let line = json!({
            "text": item.text,
            "ids": item.ids,
            "tokens": tokens,
            "logprobs": lp,
            "n_scored": n,
            "nll": nll,
            "mean_nll": if n > 0 { json!(mean_nll) } else { Value::Null },
            "perplexity": if n > 0 { json!(mean_nll.exp()) } else { Value::Null },
        });
        println!("{line}");
    }
    Ok(())
}

fn read_items(path: &Path) -> anyhow::Result<Vec<Given>> {
    let mut items = Vec::new();
    for (row, v) in read_json_lines(path)? {
        let item = match (v.get("text"), v.get("ids")) {
            (Some(Value::String(t)), _) => Given::Text(t.clone()),
            (_, Some(Value::Array(ids))) => Given::Ids(
                ids.iter()
                    .map(|x| x.as_i64())
                    .collect::<Option<Vec<_>>>()
                    .with_context(|| {
                        format!(
                            "{}: line {row}: \"ids\" must be a list of integers",
                            path.display()
                        )
                    })?,
            ),
            _ => bail!(
                "{}: line {row}: expected a \"text\" string or an \"ids\" list of integers",
                path.display()
            ),
        };
        items.push(item);
    }
    Ok(items)
}
