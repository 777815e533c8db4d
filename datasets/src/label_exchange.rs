//! A labelling queue handed to and from the tools teams already use:
//! Label Studio (a `Ranker` with one bucket per rank, so answers on one
//! rank are tied) and Argilla (a `RankingQuestion`). `export` writes the
//! groups as the tool imports them, each carrying its group number;
//! `import` reads the tool's JSON export back as [`Imported`] labels.
//!
//! Answers are named by their index in the group (`a0`, `a1`, ... for
//! Label Studio, `response_1`, ... for Argilla); the policy and round are
//! not exported. Label Studio's items are shuffled per group (seeded), so
//! the page order says nothing either.

use std::path::{Path, PathBuf};

use rand::seq::SliceRandom;
use rand::SeedableRng;
use serde_json::{json, Value};

use crate::labels::{Group, Imported};

/// The tools.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    LabelStudio,
    Argilla,
}

/// A label file that cannot be read back; names the file and the task.
#[derive(Debug, thiserror::Error)]
#[error("{path}: {message}")]
pub struct ExchangeError {
    pub path: PathBuf,
    pub message: String,
}

/// Labels read from a tool's export, and what was left out.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ImportFile {
    pub labels: Vec<Imported>,
    /// Answers not all placed on a rank (Label Studio's unranked column
    /// not empty, an answer missing): left out.
    pub incomplete: usize,
    /// Argilla drafts (not submitted): left out.
    pub drafts: usize,
}

const GROUP_KEY: &str = "rlhf_group";
const LS_SKIP: &str = "skipped in Label Studio";
const ARGILLA_DISCARD: &str = "discarded in Argilla";

/// The queue's groups in the tool's import format.
pub fn export(groups: &[Group], format: Format) -> Value {
    let tasks = groups.iter().enumerate().map(|(g, group)| match format {
        Format::LabelStudio => {
            let mut order: Vec<usize> = (0..group.responses.len()).collect();
            order.shuffle(&mut rand_chacha::ChaCha8Rng::seed_from_u64(g as u64));
            let items: Vec<Value> = order
                .iter()
                .enumerate()
                .map(|(shown, &i)| {
                    json!({"id": format!("a{i}"), "title": format!("Answer {}", letter(shown)), "body": group.responses[i]})
                })
                .collect();
            json!({"data": {"prompt": group.prompt, "items": items, GROUP_KEY: g}})
        }
        Format::Argilla => {
            let mut fields = serde_json::Map::new();
            fields.insert("prompt".into(), json!(group.prompt));
            for (i, r) in group.responses.iter().enumerate() {
                fields.insert(format!("response_{}", i + 1), json!(r));
            }
            json!({"id": format!("rlhf-group-{g}"), "fields": fields, "metadata": {GROUP_KEY: g}})
        }
    });
    Value::Array(tasks.collect())
}

fn letter(i: usize) -> String {
    match u8::try_from(i).ok().filter(|&i| i < 26) {
        Some(i) => char::from(b'A' + i).to_string(),
        None => (i + 1).to_string(),
    }
}

/// Label Studio's labelling config for groups of up to `k` answers: one
/// bucket per rank, a "not rankable" choice and a comment.
pub fn label_studio_config(k: usize) -> String {
    let buckets: String = (1..=k)
        .map(|r| {
            let title = match r {
                1 => "Rank 1 (best)".to_owned(),
                r => format!("Rank {r}"),
            };
            format!("    <Bucket name=\"rank_{r}\" title=\"{title}\"/>\n")
        })
        .collect();
    format!(
        "<View>\n  <Style>.htx-ranker-item p:last-child {{ display: none }}</Style>\n  \
         <Header value=\"Prompt\"/>\n  <Text name=\"prompt\" value=\"$prompt\"/>\n  \
         <List name=\"answers\" value=\"$items\" title=\"Answers\"/>\n  \
         <Ranker name=\"rank\" toName=\"answers\">\n{buckets}  </Ranker>\n  \
         <Choices name=\"flags\" toName=\"prompt\" choice=\"multiple\">\n    <Choice value=\"Not rankable\"/>\n  </Choices>\n  \
         <TextArea name=\"comment\" toName=\"prompt\" placeholder=\"Comment (optional)\" maxSubmissions=\"1\"/>\n</View>\n"
    )
}

/// Reads a tool's JSON export of `groups` (the queue it was exported
/// from) back as labels.
pub fn import(
    format: Format,
    text: &str,
    groups: &[Group],
    path: &Path,
) -> Result<ImportFile, ExchangeError> {
    let err = |message: String| ExchangeError {
        path: path.to_owned(),
        message,
    };
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    let value: Value = serde_json::from_str(text).map_err(|e| err(format!("not JSON: {e}")))?;
    let tasks = match (&value, format) {
        (Value::Array(tasks), _) => tasks,
        (Value::Object(o), Format::Argilla) if o.get("records").is_some_and(Value::is_array) => {
            o["records"].as_array().expect("checked")
        }
        _ => {
            return Err(err(match format {
                Format::LabelStudio => {
                    "expected a JSON list of tasks (Label Studio's JSON export)".into()
                }
                Format::Argilla => {
                    "expected a JSON list of records (Argilla's records.to_json)".into()
                }
            }))
        }
    };
    let mut out = ImportFile::default();
    for (n, task) in tasks.iter().enumerate() {
        let place = |m: String| err(format!("{} {n}: {m}", what(format)));
        let group = group_of(task, format, groups).map_err(place)?;
        match format {
            Format::LabelStudio => {
                label_studio_task(task, group, groups[group].responses.len(), &mut out)
            }
            Format::Argilla => argilla_record(task, group, groups[group].responses.len(), &mut out),
        }
        .map_err(place)?;
    }
    Ok(out)
}

fn what(format: Format) -> &'static str {
    match format {
        Format::LabelStudio => "task",
        Format::Argilla => "record",
    }
}

/// The group a task names, checked against the queue's prompt.
fn group_of(task: &Value, format: Format, groups: &[Group]) -> Result<usize, String> {
    let (holder, prompt) = match format {
        Format::LabelStudio => (&task["data"], &task["data"]["prompt"]),
        Format::Argilla => (&task["metadata"], &task["fields"]["prompt"]),
    };
    let from_id = task["id"]
        .as_str()
        .and_then(|id| id.strip_prefix("rlhf-group-"))
        .and_then(|g| g.parse::<u64>().ok());
    let g = holder[GROUP_KEY]
        .as_u64()
        .or(from_id)
        .ok_or_else(|| format!("no `{GROUP_KEY}` (was it exported by `rlhf label export`?)"))?;
    let group = usize::try_from(g)
        .ok()
        .and_then(|g| groups.get(g).map(|group| (g, group)));
    let Some((g, group)) = group else {
        return Err(format!(
            "group {g} is not in this queue ({} groups)",
            groups.len()
        ));
    };
    if prompt.as_str().is_some_and(|p| p != group.prompt) {
        return Err(format!(
            "its prompt differs from group {g}'s in this queue (an export of another round?)"
        ));
    }
    Ok(g)
}

/// Each annotation of a Label Studio task.
fn label_studio_task(
    task: &Value,
    group: usize,
    k: usize,
    out: &mut ImportFile,
) -> Result<(), String> {
    let annotations = match &task["annotations"] {
        Value::Null => return Ok(()),
        Value::Array(a) => a,
        _ => return Err("`annotations` is not a list".into()),
    };
    for (a, annotation) in annotations.iter().enumerate() {
        let labeller = match &annotation["completed_by"] {
            Value::Number(id) => format!("label-studio:{id}"),
            Value::Object(user) => match user.get("email").and_then(Value::as_str) {
                Some(email) => format!("label-studio:{email}"),
                None => format!("label-studio:{}", user.get("id").unwrap_or(&Value::Null)),
            },
            _ => "label-studio".into(),
        };
        let mut label = Imported {
            group,
            labeller,
            submitted_at: annotation["created_at"]
                .as_str()
                .and_then(iso_millis)
                .unwrap_or(0),
            seconds: annotation["lead_time"].as_f64().unwrap_or(0.0),
            ..Default::default()
        };
        let mut ranked = None;
        for result in annotation["result"].as_array().into_iter().flatten() {
            let value = &result["value"];
            match result["type"].as_str() {
                Some("ranker") => ranked = Some(ranks_from_buckets(&value["ranker"], k)),
                Some("choices") => {
                    let choices = value["choices"].as_array().into_iter().flatten();
                    label.not_rankable |= choices
                        .filter_map(Value::as_str)
                        .any(|c| c == "Not rankable");
                }
                Some("textarea") => {
                    let lines: Vec<&str> = value["text"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .filter_map(Value::as_str)
                        .collect();
                    label.comment = lines.join("\n");
                }
                _ => {}
            }
        }
        if annotation["was_cancelled"].as_bool() == Some(true) {
            label.skipped = true;
            label.reason = LS_SKIP.into();
        } else if !label.not_rankable {
            match ranked
                .transpose()
                .map_err(|e| format!("annotation {a}: {e}"))?
            {
                Some(Some(ranking)) => label.ranking = ranking,
                _ => {
                    out.incomplete += 1;
                    continue;
                }
            }
        }
        out.labels.push(label);
    }
    Ok(())
}

/// Ranks (in the group's order) from a Ranker's value: buckets `rank_N`
/// (same bucket, same rank), or one list in rank order; `None` when an
/// answer was left unplaced.
fn ranks_from_buckets(ranker: &Value, k: usize) -> Result<Option<Vec<i64>>, String> {
    let mut ranks = vec![None; k];
    let mut put = |id: &Value, rank: i64| -> Result<(), String> {
        let index = id
            .as_str()
            .and_then(|id| id.strip_prefix('a'))
            .and_then(|i| i.parse::<usize>().ok())
            .filter(|&i| i < k)
            .ok_or_else(|| format!("answer id {id} is not one of a0..a{}", k.saturating_sub(1)))?;
        if ranks[index].replace(rank).is_some() {
            return Err(format!("answer {id} is placed twice"));
        }
        Ok(())
    };
    match ranker {
        Value::Array(ids) => {
            for (rank, id) in ids.iter().enumerate() {
                put(id, rank as i64)?;
            }
        }
        // Without buckets the one list is keyed by the Ranker's name.
        Value::Object(one)
            if one.len() == 1 && !one.keys().any(|n| n == "_" || n.starts_with("rank_")) =>
        {
            return ranks_from_buckets(one.values().next().expect("one"), k);
        }
        Value::Object(buckets) => {
            for (name, ids) in buckets {
                let ids = ids
                    .as_array()
                    .ok_or_else(|| format!("bucket {name} is not a list"))?;
                if name == "_" {
                    if ids.is_empty() {
                        continue;
                    }
                    return Ok(None);
                }
                let rank = bucket_rank(name, k).ok_or_else(|| {
                    format!("bucket {name}: expected rank_1 .. rank_{k} (the config `rlhf label export` writes)")
                })?;
                for id in ids {
                    put(id, rank)?;
                }
            }
        }
        _ => return Err("the ranker's value is neither buckets nor a list".into()),
    }
    Ok(ranks.into_iter().collect())
}

/// `rank_N` (1 to k) -> N - 1.
fn bucket_rank(name: &str, k: usize) -> Option<i64> {
    let n: usize = name.strip_prefix("rank_")?.parse().ok()?;
    (1..=k).contains(&n).then_some(n as i64 - 1)
}

/// Each response of an Argilla record: nested (`responses.ranking`, as
/// `records.to_json` writes) or flat (`ranking.responses`, as
/// `to_datasets` writes). A value is `[{value, rank}]` (ties kept) or the
/// option names in rank order.
fn argilla_record(
    record: &Value,
    group: usize,
    k: usize,
    out: &mut ImportFile,
) -> Result<(), String> {
    let responses: Vec<(Value, Value, Value)> = match &record["responses"]["ranking"] {
        Value::Array(list) => list
            .iter()
            .map(|r| {
                (
                    r["value"].clone(),
                    r["user_id"].clone(),
                    r["status"].clone(),
                )
            })
            .collect(),
        _ => {
            let flat = |key: &str| record[key].as_array().cloned().unwrap_or_default();
            let (values, users, status) = (
                flat("ranking.responses"),
                flat("ranking.responses.users"),
                flat("ranking.responses.status"),
            );
            values
                .into_iter()
                .enumerate()
                .map(|(i, v)| {
                    (
                        v,
                        users.get(i).cloned().unwrap_or(Value::Null),
                        status.get(i).cloned().unwrap_or(Value::Null),
                    )
                })
                .collect()
        }
    };
    let comment_of = |user: &Value| {
        record["responses"]["comment"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|c| &c["user_id"] == user)
            .and_then(|c| c["value"].as_str())
            .unwrap_or("")
            .to_owned()
    };
    for (i, (value, user, status)) in responses.into_iter().enumerate() {
        let labeller = match user.as_str() {
            Some(u) => format!("argilla:{u}"),
            None => format!("argilla:{user}"),
        };
        let mut label = Imported {
            group,
            labeller,
            comment: comment_of(&user),
            ..Default::default()
        };
        match status.as_str() {
            Some("draft") => {
                out.drafts += 1;
                continue;
            }
            Some("discarded") => {
                label.skipped = true;
                label.reason = ARGILLA_DISCARD.into();
            }
            _ => match argilla_ranks(&value, k).map_err(|e| format!("response {i}: {e}"))? {
                Some(ranking) => label.ranking = ranking,
                None => {
                    out.incomplete += 1;
                    continue;
                }
            },
        }
        out.labels.push(label);
    }
    Ok(())
}

fn argilla_ranks(value: &Value, k: usize) -> Result<Option<Vec<i64>>, String> {
    let items = value.as_array().ok_or("the ranking is not a list")?;
    let mut ranks = vec![None; k];
    for (position, item) in items.iter().enumerate() {
        let (name, rank) = match item {
            Value::String(name) => (name.as_str(), position as i64 + 1),
            Value::Object(o) => (
                o.get("value")
                    .and_then(Value::as_str)
                    .ok_or("an item has no `value`")?,
                o.get("rank")
                    .and_then(Value::as_i64)
                    .ok_or("an item has no integer `rank`")?,
            ),
            _ => return Err("an item is neither a name nor {value, rank}".into()),
        };
        let index = name
            .strip_prefix("response_")
            .and_then(|i| i.parse::<usize>().ok())
            .filter(|&i| (1..=k).contains(&i))
            .ok_or_else(|| format!("`{name}` is not one of response_1..response_{k}"))?;
        if !(1..=k as i64).contains(&rank) {
            return Err(format!("rank {rank} of {name} is not in 1..{k}"));
        }
        if ranks[index - 1].replace(rank - 1).is_some() {
            return Err(format!("{name} is ranked twice"));
        }
    }
    Ok(ranks.into_iter().collect())
}

/// `2024-05-01T10:00:00.123456Z` or `...+02:00` -> Unix milliseconds.
fn iso_millis(text: &str) -> Option<i64> {
    let (date, time) = text.split_once('T')?;
    let mut d = date.splitn(3, '-').map(|p| p.parse::<i64>().ok());
    let (y, m, day) = (d.next()??, d.next()??, d.next()??);
    let split = time.find(['Z', '+', '-']).unwrap_or(time.len());
    let (clock, zone) = time.split_at(split);
    let mut c = clock.splitn(3, ':');
    let (h, min) = (
        c.next()?.parse::<i64>().ok()?,
        c.next()?.parse::<i64>().ok()?,
    );
    let sec: f64 = c.next().unwrap_or("0").parse().ok()?;
    let offset_min = match zone.chars().next() {
        Some(sign @ ('+' | '-')) => {
            let (oh, om) = zone[1..].split_once(':').unwrap_or((&zone[1..], "0"));
            let minutes = oh.parse::<i64>().ok()? * 60 + om.parse::<i64>().ok()?;
            if sign == '+' {
                minutes
            } else {
                -minutes
            }
        }
        _ => 0,
    };
    // Days from 1970-01-01 (Howard Hinnant's days_from_civil).
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * (m + if m > 2 { -3 } else { 9 }) + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    let seconds = days * 86_400 + h * 3600 + (min - offset_min) * 60;
    Some(seconds * 1000 + (sec * 1000.0).round() as i64)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn groups() -> Vec<Group> {
        (0..3)
            .map(|g| Group {
                prompt: format!("prompt {g}"),
                responses: (0..3).map(|a| format!("answer {a} of {g}")).collect(),
                round: 2,
                policy: "round-1/ppo".into(),
            })
            .collect()
    }

    #[test]
    fn iso_times_become_unix_milliseconds() {
        assert_eq!(iso_millis("1970-01-01T00:00:00Z"), Some(0));
        assert_eq!(
            iso_millis("2021-03-09T22:16:08.728353Z"),
            Some(1_615_328_168_728)
        );
        assert_eq!(
            iso_millis("2021-03-09T23:16:08.728+01:00"),
            Some(1_615_328_168_728)
        );
        assert_eq!(iso_millis("yesterday"), None);
    }

    #[test]
    fn label_studio_buckets_ties_skips_and_unfinished_rankings() {
        let groups = groups();
        let tasks = export(&groups, Format::LabelStudio);
        assert_eq!(tasks[1]["data"][GROUP_KEY], 1);
        let items = tasks[1]["data"]["items"].as_array().unwrap();
        let mut ids: Vec<&str> = items.iter().map(|i| i["id"].as_str().unwrap()).collect();
        ids.sort();
        assert_eq!(ids, ["a0", "a1", "a2"]);
        assert!(
            !tasks.to_string().contains("round-1/ppo"),
            "the policy is not exported"
        );
        let ranker = |v: Value| json!([{"type": "ranker", "from_name": "rank", "to_name": "answers", "value": {"ranker": v}}]);
        let mut exported = tasks.clone();
        exported[0]["annotations"] = json!([
            {"completed_by": {"id": 7, "email": "ann@example.org"}, "was_cancelled": false, "lead_time": 12.5,
             "created_at": "2021-03-09T22:16:08.728353Z",
             "result": [ranker(json!({"_": [], "rank_1": ["a2", "a0"], "rank_2": ["a1"], "rank_3": []})).as_array().unwrap()[0].clone(),
                        {"type": "textarea", "from_name": "comment", "value": {"text": ["close call"]}}]},
            {"completed_by": 8, "was_cancelled": true, "result": []},
            {"completed_by": 9, "result": ranker(json!({"_": ["a1"], "rank_1": ["a0", "a2"]}))},
        ]);
        exported[1]["annotations"] = json!([
            {"completed_by": 7, "result": [{"type": "choices", "from_name": "flags", "value": {"choices": ["Not rankable"]}}]},
            {"completed_by": 8, "result": ranker(json!(["a1", "a2", "a0"]))},
        ]);
        let path = Path::new("ls.json");
        let got = import(Format::LabelStudio, &exported.to_string(), &groups, path).unwrap();
        assert_eq!(got.incomplete, 1, "an answer left in the unranked column");
        let l = &got.labels;
        assert_eq!(l.len(), 4);
        assert_eq!(
            (l[0].labeller.as_str(), l[0].ranking.as_slice()),
            ("label-studio:ann@example.org", &[0, 1, 0][..])
        );
        assert_eq!(
            (l[0].comment.as_str(), l[0].seconds, l[0].submitted_at),
            ("close call", 12.5, 1_615_328_168_728)
        );
        assert!(l[1].skipped && l[1].ranking.is_empty() && l[1].labeller == "label-studio:8");
        assert!(l[2].not_rankable && l[2].group == 1);
        assert_eq!(l[3].ranking, [2, 0, 1], "a bucketless list is rank order");
        exported[1]["annotations"] =
            json!([{"completed_by": 8, "result": ranker(json!({"rank": ["a2", "a0", "a1"]}))}]);
        let got = import(Format::LabelStudio, &exported.to_string(), &groups, path).unwrap();
        assert_eq!(
            got.labels[2].ranking,
            [1, 2, 0],
            "keyed by the Ranker's name"
        );

        exported[2]["annotations"] = json!([{"result": ranker(json!({"rank_1": ["a0", "a7"]}))}]);
        let e = import(Format::LabelStudio, &exported.to_string(), &groups, path).unwrap_err();
        assert_eq!(
            e.to_string(),
            "ls.json: task 2: annotation 0: answer id \"a7\" is not one of a0..a2"
        );
        exported[2]["data"]["prompt"] = json!("another prompt");
        let e = import(Format::LabelStudio, &exported.to_string(), &groups, path).unwrap_err();
        assert!(
            e.to_string()
                .contains("task 2: its prompt differs from group 2's"),
            "{e}"
        );
        let e = import(Format::LabelStudio, "{}", &groups, path).unwrap_err();
        assert!(
            e.to_string().contains("expected a JSON list of tasks"),
            "{e}"
        );
    }

    #[test]
    fn argilla_ranks_with_ties_in_nested_and_flat_records() {
        let groups = groups();
        let mut records = export(&groups, Format::Argilla);
        assert_eq!(records[2]["fields"]["response_3"], "answer 2 of 2");
        records[0]["responses"] = json!({
            "ranking": [
                {"user_id": "u1", "status": "submitted", "value": [{"value": "response_1", "rank": 2}, {"value": "response_2", "rank": 1}, {"value": "response_3", "rank": 1}]},
                {"user_id": "u2", "value": ["response_3", "response_1", "response_2"]},
                {"user_id": "u3", "status": "discarded", "value": []},
                {"user_id": "u4", "status": "draft", "value": ["response_1"]},
            ],
            "comment": [{"user_id": "u1", "value": "B and C say the same"}],
        });
        let mut flat = records[1].clone();
        flat.as_object_mut().unwrap().remove("metadata");
        flat["ranking.responses"] = json!([[{"value": "response_2", "rank": 1}, {"value": "response_1", "rank": 2}, {"value": "response_3", "rank": 3}]]);
        flat["ranking.responses.users"] = json!(["u1"]);
        flat["ranking.responses.status"] = json!(["submitted"]);
        records[1] = flat;
        let path = Path::new("argilla.json");
        let got = import(
            Format::Argilla,
            &json!({"records": records}).to_string(),
            &groups,
            path,
        )
        .unwrap();
        assert_eq!(got.drafts, 1);
        let l = &got.labels;
        assert_eq!(l.len(), 4);
        assert_eq!(
            (
                l[0].labeller.as_str(),
                l[0].ranking.as_slice(),
                l[0].comment.as_str()
            ),
            ("argilla:u1", &[1, 0, 0][..], "B and C say the same")
        );
        assert_eq!(l[1].ranking, [1, 2, 0]);
        assert!(l[2].skipped && l[2].reason == ARGILLA_DISCARD);
        assert_eq!(
            (l[3].group, l[3].ranking.as_slice()),
            (1, &[1, 0, 2][..]),
            "the group from the record's id"
        );

        records[0]["responses"]["ranking"] =
            json!([{"user_id": "u1", "value": [{"value": "response_9", "rank": 1}]}]);
        let e = import(Format::Argilla, &records.to_string(), &groups, path).unwrap_err();
        assert_eq!(
            e.to_string(),
            "argilla.json: record 0: response 0: `response_9` is not one of response_1..response_3"
        );
    }
}
