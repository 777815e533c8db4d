//! The bundled task: short instructions whose answers a program can judge.
//!
//! Three families, each a one-line prompt and a one-line answer:
//!
//! | family  | prompt             | correct answer |
//! |---------|--------------------|----------------|
//! | reverse | `Reverse: planet\n` | `tenalp`       |
//! | sort    | `Sort: 7 2 9 4\n`   | `2 4 7 9`      |
//! | upper   | `Upper: candle\n`   | `CANDLE`       |
//!
//! Words have 3-7 letters and lists 3-6 digits: sizes a small byte-level
//! GPT learns in minutes on CPU. (An `Add: 37+8` family was tried and
//! dropped: a 4-layer byte-level GPT did not learn the units digit in 16
//! epochs, so neither SFT nor a reward model could do it and PPO had no
//! right answers to reinforce.)
//!
//! [`judge`] is the gold judge: 1 for the exact answer, partial credit in
//! [0, 0.9) for near misses, so that better answers always score higher and
//! a reward model has a gradient of quality to learn. [`labeller`] simulates
//! the people who write demonstrations and rank answers: right only part of
//! the time, with the mistakes people make.

pub mod generate;
pub mod labeller;

use rand::Rng;

/// One instruction of the task.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Instruction {
    Reverse(String),
    Sort(Vec<u32>),
    Upper(String),
}

pub const FAMILIES: [&str; 3] = ["reverse", "sort", "upper"];

/// Words for `Reverse` and `Upper`, 3 to 8 letters.
const WORDS: &[&str] = &[
    "apple", "river", "planet", "garden", "window", "silver", "forest", "candle", "bridge",
    "yellow", "orange", "pencil", "rocket", "basket", "dragon", "castle", "mirror", "summer",
    "winter", "spring", "autumn", "cloud", "stone", "paper", "music", "light", "dream", "ocean",
    "tiger", "horse", "mouse", "table", "chair", "house", "green", "black", "white", "brown",
    "purple", "sugar", "bread", "honey", "lemon", "melon", "grape", "peach", "cat", "dog", "sun",
    "moon", "star", "tree", "fish", "bird", "frog", "lake", "hill", "road", "rain", "snow", "wind",
    "fire", "gold", "iron", "salt", "milk", "rice", "corn", "bean", "seed", "leaf", "root", "rose",
    "king", "queen", "knight", "castle", "tower", "village", "market", "school", "doctor",
    "farmer", "sailor", "artist", "writer", "singer", "dancer", "runner", "player", "number",
    "letter", "animal", "flower", "butter", "cookie", "pepper", "carrot", "potato", "tomato",
    "banana", "cherry", "coffee", "teacup", "kettle", "hammer", "ladder", "button", "zipper",
    "jacket", "pocket", "helmet", "saddle", "anchor", "harbor", "island", "desert", "valley",
    "canyon", "meadow", "puzzle", "riddle", "secret", "signal", "thunder", "rainbow", "blanket",
    "pillow", "lantern", "compass", "journey", "captain", "machine", "picture", "morning",
    "evening", "kitchen",
];

/// Half dictionary words, half random letters: reversal and upper-casing
/// must be learnt as skills, not memorised word by word.
fn random_word(rng: &mut impl Rng) -> String {
    if rng.random_bool(0.5) {
        let short: Vec<&&str> = WORDS.iter().filter(|w| w.len() <= 7).collect();
        (*short[rng.random_range(0..short.len())]).to_owned()
    } else {
        let n = rng.random_range(3..=7);
        (0..n)
            .map(|_| char::from(b'a' + rng.random_range(0..26u8)))
            .collect()
    }
}

impl Instruction {
    /// A random instruction of a random family.
    pub fn random(rng: &mut impl Rng) -> Self {
        match rng.random_range(0..3) {
            // Half dictionary words, half random letters: reversal must be
            // learnt as a skill, not memorised word by word.
            0 => Instruction::Reverse(random_word(rng)),
            1 => {
                let n = rng.random_range(3..=6);
                Instruction::Sort((0..n).map(|_| rng.random_range(0..10)).collect())
            }
            _ => Instruction::Upper(random_word(rng)),
        }
    }

    /// Items on which the simulated labeller errs most: long words, long
    /// lists, sums with a carry (people err more on harder items).
    pub fn is_hard(&self) -> bool {
        match self {
            Instruction::Reverse(w) => w.chars().count() >= 6,
            Instruction::Sort(xs) => xs.len() >= 5,
            Instruction::Upper(w) => w.chars().count() >= 6,
        }
    }

    pub fn family(&self) -> &'static str {
        match self {
            Instruction::Reverse(_) => "reverse",
            Instruction::Sort(_) => "sort",
            Instruction::Upper(_) => "upper",
        }
    }

    /// The prompt text, newline-terminated.
    pub fn prompt(&self) -> String {
        match self {
            Instruction::Reverse(w) => format!("Reverse: {w}\n"),
            Instruction::Sort(xs) => format!("Sort: {}\n", join(xs)),
            Instruction::Upper(w) => format!("Upper: {w}\n"),
        }
    }

    /// Parses a prompt written by [`Instruction::prompt`] (trailing
    /// whitespace and a chat template's role markers are tolerated).
    pub fn parse(prompt: &str) -> Option<Self> {
        let p = prompt.trim();
        let p = p.rsplit("<|user|>").next().unwrap_or(p);
        let p = p.split("<|assistant|>").next().unwrap_or(p).trim();
        if let Some(w) = p.strip_prefix("Reverse: ") {
            let w = w.trim();
            return (!w.is_empty() && w.chars().all(|c| c.is_ascii_alphabetic()))
                .then(|| Instruction::Reverse(w.into()));
        }
        if let Some(xs) = p.strip_prefix("Sort: ") {
            let xs: Option<Vec<u32>> = xs.split_whitespace().map(|x| x.parse().ok()).collect();
            return xs.filter(|v| !v.is_empty()).map(Instruction::Sort);
        }
        if let Some(w) = p.strip_prefix("Upper: ") {
            let w = w.trim();
            return (!w.is_empty() && w.chars().all(|c| c.is_ascii_lowercase()))
                .then(|| Instruction::Upper(w.into()));
        }
        None
    }

    /// The correct answer.
    pub fn answer(&self) -> String {
        match self {
            Instruction::Reverse(w) => w.chars().rev().collect(),
            Instruction::Sort(xs) => {
                let mut v = xs.clone();
                v.sort_unstable();
                join(&v)
            }
            Instruction::Upper(w) => w.to_ascii_uppercase(),
        }
    }
}

fn join(xs: &[u32]) -> String {
    xs.iter().map(u32::to_string).collect::<Vec<_>>().join(" ")
}

/// Near misses earn at most this; only the exact answer earns 1.
pub const PARTIAL_CREDIT_CAP: f64 = 0.9;

/// The gold judge: the score of `answer` to `prompt` in [0, 1], or `None` if
/// the prompt is not one of the task's.
///
/// Leading/trailing whitespace and an end-of-text marker are ignored;
/// anything else after the answer (a second line, say) costs credit.
pub fn judge(prompt: &str, answer: &str) -> Option<f64> {
    let instruction = Instruction::parse(prompt)?;
    let expected = instruction.answer();
    let got = answer.trim_end_matches("<|endoftext|>").trim();
    if got == expected {
        return Some(1.0);
    }
    let partial = match &instruction {
        Instruction::Reverse(_) | Instruction::Upper(_) => similarity(got, &expected),
        Instruction::Sort(_) => {
            let nums: Option<Vec<&str>> = {
                let parts: Vec<&str> = got.split_whitespace().collect();
                parts
                    .iter()
                    .all(|p| p.parse::<u32>().is_ok())
                    .then_some(parts)
            };
            match nums {
                Some(parts) if !parts.is_empty() => {
                    let want: Vec<&str> = expected.split(' ').collect();
                    let hits = parts.iter().zip(&want).filter(|(a, b)| a == b).count();
                    hits as f64 / parts.len().max(want.len()) as f64
                }
                _ => 0.0,
            }
        }
    };
    Some(PARTIAL_CREDIT_CAP * partial.clamp(0.0, 1.0))
}

/// 1 - Levenshtein distance / longer length, over chars.
fn similarity(a: &str, b: &str) -> f64 {
    let (a, b): (Vec<char>, Vec<char>) = (a.chars().collect(), b.chars().collect());
    let longest = a.len().max(b.len());
    if longest == 0 {
        return 1.0;
    }
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.iter().enumerate() {
        let mut cur = vec![i + 1; b.len() + 1];
        for (j, cb) in b.iter().enumerate() {
            cur[j + 1] = (prev[j] + usize::from(ca != cb))
                .min(prev[j + 1] + 1)
                .min(cur[j] + 1);
        }
        prev = cur;
    }
    1.0 - prev[b.len()] as f64 / longest as f64
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    #[test]
    fn prompts_parse_back_and_answers_are_right() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(0);
        for _ in 0..200 {
            let i = Instruction::random(&mut rng);
            assert_eq!(Instruction::parse(&i.prompt()), Some(i.clone()));
            assert_eq!(judge(&i.prompt(), &i.answer()), Some(1.0));
        }
        assert_eq!(Instruction::Sort(vec![7, 2, 9, 4]).answer(), "2 4 7 9");
        assert_eq!(Instruction::Upper("candle".into()).answer(), "CANDLE");
        assert_eq!(Instruction::Reverse("planet".into()).answer(), "tenalp");
    }

    #[test]
    fn judge_gives_partial_credit_below_exact() {
        let s = |p: &str, a: &str| judge(p, a).unwrap();
        assert_eq!(s("Upper: candle\n", " CANDLE "), 1.0);
        assert_eq!(s("Upper: candle\n", "CANDLE<|endoftext|>"), 1.0);
        // Only the first letter capitalised: one letter of six right.
        assert!((s("Upper: candle\n", "Candle") - 0.9 / 6.0).abs() < 1e-12);
        assert!((s("Upper: candle\n", "CANDlE") - 0.9 * 5.0 / 6.0).abs() < 1e-12);
        assert_eq!(
            judge("Upper: Candle\n", "CANDLE"),
            None,
            "lowercase words only"
        );
        assert!((s("Sort: 7 2 9 4\n", "2 4 9 7") - 0.45).abs() < 1e-12);
        assert_eq!(s("Sort: 7 2 9 4\n", "7 2 9 4"), 0.0);
        assert!((s("Reverse: planet\n", "tenalq") - 0.9 * 5.0 / 6.0).abs() < 1e-12);
        assert!(s("Reverse: planet\n", "tenalp\nUpper") < 0.9);
        assert_eq!(judge("Translate: hi", "salut"), None);
    }

    #[test]
    fn chat_templated_prompts_are_understood() {
        let p = "<|user|>Sort: 3 1 2\n<|assistant|>";
        assert_eq!(judge(p, "1 2 3"), Some(1.0));
    }
}
