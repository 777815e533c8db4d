//! A simulated human labeller for the bundled task.
//!
//! Writing demonstrations, it is right with probability `accuracy` and
//! otherwise makes the mistakes people make: a forgotten carry, two numbers
//! left swapped, a dropped letter, the input copied back. Ranking answers,
//! it orders them by the gold score plus Gaussian noise, so that it agrees
//! with the gold ranking on most pairs but not all (InstructGPT's labellers
//! agreed with each other on about 73% of comparisons).

use rand::seq::SliceRandom;
use rand::Rng;
use rand_distr::{Distribution, Normal};

use super::{judge, Instruction};

/// One plausible wrong answer to `instruction`.
pub fn mistake(instruction: &Instruction, rng: &mut impl Rng) -> String {
    let correct = instruction.answer();
    match instruction {
        Instruction::Reverse(word) => {
            let chars: Vec<char> = correct.chars().collect();
            match rng.random_range(0..4) {
                0 if chars.len() > 1 => {
                    // Two neighbouring letters swapped.
                    let mut c = chars.clone();
                    let i = rng.random_range(0..c.len() - 1);
                    c.swap(i, i + 1);
                    c.into_iter().collect()
                }
                1 if chars.len() > 2 => drop_one(&chars, rng),
                2 => word.clone(),                  // the word copied back
                _ => habitual_mistake(instruction), // first letter kept in place
            }
        }
        Instruction::Sort(xs) => {
            let mut sorted = xs.clone();
            sorted.sort_unstable();
            let out: Vec<u32> = match rng.random_range(0..5) {
                0 => {
                    let mut v = sorted.clone();
                    let i = rng.random_range(0..v.len() - 1);
                    v.swap(i, i + 1);
                    v
                }
                1 => {
                    let mut v = sorted.clone();
                    v.remove(rng.random_range(0..v.len()));
                    v
                }
                2 => xs.clone(),
                3 => {
                    // One number written twice, its neighbour lost: the
                    // mistake PPO found when the rankings lacked it.
                    let mut v = sorted.clone();
                    let i = rng.random_range(0..v.len() - 1);
                    if rng.random_bool(0.5) {
                        v[i] = v[i + 1];
                    } else {
                        v[i + 1] = v[i];
                    }
                    v
                }
                _ => sorted.iter().rev().copied().collect(),
            };
            out.iter().map(u32::to_string).collect::<Vec<_>>().join(" ")
        }
        Instruction::Upper(word) => {
            let chars: Vec<char> = correct.chars().collect();
            match rng.random_range(0..4) {
                0 => {
                    // A letter left lowercase.
                    let mut c = chars.clone();
                    let i = rng.random_range(0..c.len());
                    c[i] = c[i].to_ascii_lowercase();
                    c.into_iter().collect()
                }
                1 if chars.len() > 2 => drop_one(&chars, rng),
                2 => word.clone(), // the word copied back
                _ => title_case(word),
            }
        }
    }
}

/// `chars` with one of them, at random, dropped.
fn drop_one(chars: &[char], rng: &mut impl Rng) -> String {
    let mut c = chars.to_vec();
    c.remove(rng.random_range(0..c.len()));
    c.into_iter().collect()
}

/// Only the first letter capitalised ("Candle" for "CANDLE").
fn title_case(word: &str) -> String {
    let mut c: Vec<char> = word.chars().collect();
    c[0] = c[0].to_ascii_uppercase();
    c.into_iter().collect()
}

/// The mistake a labeller makes again and again on hard items: the first
/// letter left in place, the last two numbers left unsorted, only the first
/// letter capitalised.
pub fn habitual_mistake(instruction: &Instruction) -> String {
    match instruction {
        Instruction::Reverse(word) => {
            let mut c: Vec<char> = word.chars().collect();
            c[1..].reverse();
            c.into_iter().collect()
        }
        Instruction::Sort(xs) => {
            let mut v = xs.clone();
            v.sort_unstable();
            let n = v.len();
            v.swap(n - 2, n - 1);
            v.iter().map(u32::to_string).collect::<Vec<_>>().join(" ")
        }
        Instruction::Upper(word) => title_case(word),
    }
}

/// A demonstration. Easy items are right with probability `accuracy`
/// (else a random mistake); hard items are right only with probability
/// `hard_accuracy`, else the habitual mistake. A model imitating these
/// demonstrations learns the habit, which a reward model trained on
/// rankings can then teach it out of.
pub fn demonstrate(
    instruction: &Instruction,
    accuracy: f64,
    hard_accuracy: f64,
    rng: &mut impl Rng,
) -> String {
    if instruction.is_hard() {
        if rng.random_bool(hard_accuracy) {
            instruction.answer()
        } else {
            habitual_mistake(instruction)
        }
    } else if rng.random_bool(accuracy) {
        instruction.answer()
    } else {
        mistake(instruction, rng)
    }
}

/// `k` distinct candidate answers (the correct one among them with
/// probability `p_correct`), in random order.
pub fn candidates(
    instruction: &Instruction,
    k: usize,
    p_correct: f64,
    rng: &mut impl Rng,
) -> Vec<String> {
    let mut out: Vec<String> = Vec::with_capacity(k);
    if rng.random_bool(p_correct) {
        out.push(instruction.answer());
    }
    // Rankings must show the habit is worse, or no reward model can learn it.
    let habit = habitual_mistake(instruction);
    if instruction.is_hard() && rng.random_bool(0.7) && !out.contains(&habit) {
        out.push(habit);
    }
    let mut tries = 0;
    while out.len() < k && tries < 200 {
        tries += 1;
        let m = mistake(instruction, rng);
        // Stack two mistakes sometimes, for worse answers.
        let m = if rng.random_bool(0.3) {
            mutate(&m, rng)
        } else {
            m
        };
        if !out.contains(&m) {
            out.push(m);
        }
    }
    out.shuffle(rng);
    out
}

/// A character-level edit: drop or duplicate one character.
fn mutate(s: &str, rng: &mut impl Rng) -> String {
    let mut c: Vec<char> = s.chars().collect();
    if c.len() < 2 {
        return format!("{s}{s}");
    }
    let i = rng.random_range(0..c.len());
    if rng.random_bool(0.5) {
        c.remove(i);
    } else {
        c.insert(i, c[i]);
    }
    c.into_iter().collect()
}

/// Ranks `answers` (0 = best) by gold score plus `noise`-sd Gaussian noise.
/// `noise = 0` gives the gold ranking, in which answers of equal gold score
/// share a rank (a tie, which no comparison is made of).
pub fn rank(prompt: &str, answers: &[String], noise: f64, rng: &mut impl Rng) -> Vec<usize> {
    let normal = Normal::new(0.0, noise.max(1e-12)).expect("valid sd");
    let noisy: Vec<f64> = answers
        .iter()
        .map(|a| {
            judge(prompt, a).unwrap_or(0.0) + if noise > 0.0 { normal.sample(rng) } else { 0.0 }
        })
        .collect();
    // Competition ranking: an answer's rank is how many score higher.
    noisy
        .iter()
        .map(|s| noisy.iter().filter(|&&o| o > *s).count())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    #[test]
    fn mistakes_are_wrong_and_demonstrations_mix() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(1);
        let mut right = 0;
        for _ in 0..2000 {
            let i = Instruction::random(&mut rng);
            let m = mistake(&i, &mut rng);
            if m == i.answer() {
                // Only possible for palindromes-like or duplicate numbers.
                continue;
            }
            assert!(judge(&i.prompt(), &m).unwrap() < 1.0);
            if !i.is_hard() && demonstrate(&i, 0.6, 0.3, &mut rng) == i.answer() {
                right += 1;
            }
            if i.is_hard() {
                let d = demonstrate(&i, 0.6, 0.0, &mut rng);
                assert_eq!(d, habitual_mistake(&i));
                if d != i.answer() {
                    assert!(judge(&i.prompt(), &d).unwrap() < 1.0, "{i:?}: {d}");
                }
            }
        }
        assert!((450..750).contains(&right), "{right}");
    }

    #[test]
    fn gold_rank_orders_by_score_and_noise_flips_some_pairs() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(2);
        let p = "Upper: candle\n";
        let answers = vec!["CANDlE".to_string(), "CANDLE".into(), "candle".into()];
        assert_eq!(rank(p, &answers, 0.0, &mut rng), vec![1, 0, 2]);
        // Equal gold scores tie: each is one letter off.
        let tied = vec![
            "CANDlE".to_string(),
            "CANDLE".into(),
            "cANDLE".into(),
            "x".into(),
        ];
        assert_eq!(rank(p, &tied, 0.0, &mut rng), vec![1, 0, 1, 3]);
        let mut flips = 0;
        for _ in 0..1000 {
            let r = rank(p, &answers, 0.3, &mut rng);
            flips += usize::from(r[0] < r[1]);
        }
        assert!(flips > 20 && flips < 300, "{flips}");
    }
}
