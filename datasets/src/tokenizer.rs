//! Tokenizers: every tokenizer is an HF `tokenizer.json` run by the
//! `tokenizers` crate, offline.
//!
//! The default needs no file: a byte-level tokenizer (ids 0-255 are the bytes)
//! plus special tokens, built in code as a `tokenizer.json` with an empty BPE
//! merge list. Writing it into a checkpoint therefore gives a file that
//! `transformers` and `tokenizers` open too, and loading any checkpoint takes
//! one code path.

use std::path::{Path, PathBuf};

/// The byte tokenizer's special tokens, in id order from 256.
pub const BYTE_SPECIAL_TOKENS: [&str; 5] = [
    EOS_TOKEN,
    PAD_TOKEN,
    SYSTEM_TOKEN,
    USER_TOKEN,
    ASSISTANT_TOKEN,
];
/// End of text, GPT-2's name: used as EOS and as BOS.
pub const EOS_TOKEN: &str = "<|endoftext|>";
pub const PAD_TOKEN: &str = "<|pad|>";
pub const SYSTEM_TOKEN: &str = "<|system|>";
pub const USER_TOKEN: &str = "<|user|>";
pub const ASSISTANT_TOKEN: &str = "<|assistant|>";

#[derive(Debug, thiserror::Error)]
pub enum TokenizerError {
    #[error("cannot read tokenizer {path}: {message}")]
    Load { path: PathBuf, message: String },
    #[error("cannot write tokenizer {path}: {message}")]
    Save { path: PathBuf, message: String },
    #[error("tokenizer {what}: {message}")]
    Codec { what: &'static str, message: String },
    #[error(
        "tokenizer has no end-of-text token (looked for {looked_for}); add one to tokenizer.json"
    )]
    NoEos { looked_for: String },
    #[error("token id {id} is outside the tokenizer's vocabulary of {vocab_size}")]
    IdOutOfRange { id: i64, vocab_size: usize },
    #[error(transparent)]
    Template(#[from] crate::jinja::TemplateError),
}

/// Ids of the tokens that code, not text, inserts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SpecialIds {
    pub eos: i64,
    /// Padding: the tokenizer's own pad token, else EOS (masked out anyway).
    pub pad: i64,
    /// Role markers for the chat template, where the tokenizer has them.
    pub roles: Option<RoleIds>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RoleIds {
    pub system: i64,
    pub user: i64,
    pub assistant: i64,
}

/// Token ids and each one's byte range in the text.
pub type Encoded = (Vec<i64>, Vec<(usize, usize)>);

/// A loaded tokenizer and its special ids.
#[derive(Clone)]
pub struct Tokenizer {
    inner: Box<tokenizers::Tokenizer>,
    special: SpecialIds,
    source: String,
    /// The model folder's chat template files, kept to be saved with
    /// every checkpoint, and the template compiled from them.
    chat: Option<ChatFiles>,
}

/// `tokenizer_config.json` and `chat_template.jinja` as a model folder
/// has them, and the template they give.
#[derive(Clone)]
struct ChatFiles {
    config: Option<String>,
    jinja: Option<String>,
    template: Option<std::sync::Arc<crate::jinja::JinjaTemplate>>,
}

const TOKENIZER_CONFIG_FILE: &str = "tokenizer_config.json";
const CHAT_TEMPLATE_FILE: &str = "chat_template.jinja";

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokenizer")
            .field("source", &self.source)
            .field("vocab_size", &self.vocab_size())
            .field("special", &self.special)
            .finish()
    }
}

impl Tokenizer {
    /// The default: bytes plus [`BYTE_SPECIAL_TOKENS`], 261 ids, no file.
    pub fn bytes() -> Self {
        let json = byte_tokenizer_json();
        let inner: tokenizers::Tokenizer = json
            .parse()
            .expect("the built-in byte tokenizer JSON is valid");
        Self::from_inner(inner, "built-in bytes".into()).expect("the byte tokenizer has EOS")
    }

    /// An HF `tokenizer.json`.
    pub fn from_file(path: &Path) -> Result<Self, TokenizerError> {
        crate::files::bounded_size(path, MAX_TOKENIZER_BYTES, "a tokenizer's limit").map_err(
            |message| TokenizerError::Load {
                path: path.to_owned(),
                message,
            },
        )?;
        let inner = tokenizers::Tokenizer::from_file(path).map_err(|e| TokenizerError::Load {
            path: path.to_owned(),
            message: e.to_string(),
        })?;
        Self::from_inner(inner, path.display().to_string())
    }

    /// The tokenizer of a model folder: its `tokenizer.json`, or GPT-2's
    /// `vocab.json` + `merges.txt` pair as older HF folders ship it.
    ///
    /// Its chat template (`tokenizer_config.json`, `chat_template.jinja`)
    /// comes along, and the config's `eos_token` is the end of an answer.
    pub fn from_model_dir(dir: &Path) -> Result<Self, TokenizerError> {
        let json = dir.join("tokenizer.json");
        let (vocab, merges) = (dir.join("vocab.json"), dir.join("merges.txt"));
        let mut tokenizer = if json.exists() {
            Self::from_file(&json)?
        } else if vocab.exists() && merges.exists() {
            Self::from_gpt2_files(&vocab, &merges)?
        } else {
            return Err(TokenizerError::Load {
                path: json,
                message: "no tokenizer.json (nor vocab.json + merges.txt) in the model folder"
                    .into(),
            });
        };
        tokenizer.read_chat_files(dir)?;
        Ok(tokenizer)
    }

    /// Reads the folder's chat template files, if any.
    fn read_chat_files(&mut self, dir: &Path) -> Result<(), TokenizerError> {
        let read = |name: &str| -> Result<Option<String>, TokenizerError> {
            let path = dir.join(name);
            if !path.exists() {
                return Ok(None);
            }
            crate::files::bounded_size(&path, MAX_TOKENIZER_BYTES, "a tokenizer's limit")
                .and_then(|_| std::fs::read_to_string(&path).map_err(|e| e.to_string()))
                .map(Some)
                .map_err(|message| TokenizerError::Load { path, message })
        };
        let (config, jinja) = (read(TOKENIZER_CONFIG_FILE)?, read(CHAT_TEMPLATE_FILE)?);
        if config.is_none() && jinja.is_none() {
            return Ok(());
        }
        let template = crate::jinja::JinjaTemplate::from_files(
            config.as_deref(),
            jinja.as_deref(),
            &dir.join(TOKENIZER_CONFIG_FILE),
        )?
        .map(std::sync::Arc::new);
        if let Some(eos) = template.as_ref().and_then(|t| t.token("eos_token")) {
            if let Some(id) = self.inner.token_to_id(&eos) {
                self.special.eos = i64::from(id);
            }
        }
        self.chat = Some(ChatFiles {
            config,
            jinja,
            template,
        });
        Ok(())
    }

    /// The model folder's chat template, if it has one.
    pub fn chat_template(&self) -> Option<std::sync::Arc<crate::jinja::JinjaTemplate>> {
        self.chat.as_ref()?.template.clone()
    }

    /// Writes the chat template files this tokenizer was loaded with into
    /// `dir` (a checkpoint folder), so later stages render the same way.
    pub fn save_chat_files(&self, dir: &Path) -> Result<(), TokenizerError> {
        let Some(chat) = &self.chat else {
            return Ok(());
        };
        for (name, text) in [
            (TOKENIZER_CONFIG_FILE, &chat.config),
            (CHAT_TEMPLATE_FILE, &chat.jinja),
        ] {
            if let Some(text) = text {
                let path = dir.join(name);
                crate::atomic::write_file(&path, text.as_bytes()).map_err(|e| {
                    TokenizerError::Save {
                        path: path.clone(),
                        message: e.to_string(),
                    }
                })?;
            }
        }
        Ok(())
    }

    fn from_gpt2_files(vocab: &Path, merges: &Path) -> Result<Self, TokenizerError> {
        use tokenizers::models::bpe::BPE;
        use tokenizers::pre_tokenizers::byte_level::ByteLevel;
        let load_err = |e: tokenizers::Error| TokenizerError::Load {
            path: vocab.to_owned(),
            message: e.to_string(),
        };
        for path in [vocab, merges] {
            crate::files::bounded_size(path, MAX_TOKENIZER_BYTES, "a tokenizer's limit").map_err(
                |message| TokenizerError::Load {
                    path: path.to_owned(),
                    message,
                },
            )?;
        }
        let bpe = BPE::from_file(&vocab.to_string_lossy(), &merges.to_string_lossy())
            .build()
            .map_err(load_err)?;
        let mut inner = tokenizers::Tokenizer::new(bpe);
        inner.with_pre_tokenizer(Some(ByteLevel::new(false, true, true)));
        inner.with_decoder(Some(ByteLevel::default()));
        inner.add_special_tokens(&[tokenizers::AddedToken::from(EOS_TOKEN, true)]);
        Self::from_inner(inner, vocab.display().to_string())
    }

    fn from_inner(inner: tokenizers::Tokenizer, source: String) -> Result<Self, TokenizerError> {
        let id = |t: &str| inner.token_to_id(t).map(i64::from);
        const EOS_NAMES: [&str; 4] = [EOS_TOKEN, "</s>", "<eos>", "<|im_end|>"];
        let eos = EOS_NAMES
            .iter()
            .find_map(|t| id(t))
            .ok_or_else(|| TokenizerError::NoEos {
                looked_for: EOS_NAMES.join(", "),
            })?;
        let pad = id(PAD_TOKEN).or_else(|| id("<pad>")).unwrap_or(eos);
        let roles = match (id(SYSTEM_TOKEN), id(USER_TOKEN), id(ASSISTANT_TOKEN)) {
            (Some(system), Some(user), Some(assistant)) => Some(RoleIds {
                system,
                user,
                assistant,
            }),
            _ => None,
        };
        Ok(Self {
            inner: Box::new(inner),
            special: SpecialIds { eos, pad, roles },
            source,
            chat: None,
        })
    }

    pub fn special(&self) -> SpecialIds {
        self.special
    }

    pub fn eos_id(&self) -> i64 {
        self.special.eos
    }

    pub fn pad_id(&self) -> i64 {
        self.special.pad
    }

    /// Number of ids, special tokens included; a model's vocabulary must be
    /// at least this large.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// Where it came from, for messages.
    pub fn source(&self) -> &str {
        &self.source
    }

    /// Text to ids. Special tokens written in the text (`<|endoftext|>`) are
    /// recognised as such.
    pub fn encode(&self, text: &str) -> Result<Vec<i64>, TokenizerError> {
        let codec = |message: String| TokenizerError::Codec {
            what: "encode",
            message,
        };
        // Oniguruma panics when a pre-tokenizer regex backtracks past its
        // retry limit; that is the tokenizer's fault, not ours: say so.
        quiet_oniguruma_panics();
        let encoded = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            self.inner.encode(text, false)
        }))
        .map_err(|panic| {
            let why = panic_text(&*panic);
            codec(format!(
                "{} failed on a text of {} bytes ({why}); its pre-tokenizer regex backtracks without bound",
                self.source,
                text.len()
            ))
        })?;
        let encoding = encoded.map_err(|e| codec(e.to_string()))?;
        Ok(encoding.get_ids().iter().map(|&i| i64::from(i)).collect())
    }

    /// Text to ids and each token's byte range in the text.
    pub fn encode_with_offsets(&self, text: &str) -> Result<Encoded, TokenizerError> {
        quiet_oniguruma_panics();
        let encoded = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            self.inner.encode(text, false)
        }))
        .map_err(|panic| TokenizerError::Codec {
            what: "encode",
            message: format!("{} failed: {}", self.source, panic_text(&*panic)),
        })?
        .map_err(|e| TokenizerError::Codec {
            what: "encode",
            message: e.to_string(),
        })?;
        let ids = encoded.get_ids().iter().map(|&i| i64::from(i)).collect();
        Ok((ids, encoded.get_offsets().to_vec()))
    }

    /// Ids to text; special tokens are kept when `keep_special`.
    pub fn decode(&self, ids: &[i64], keep_special: bool) -> Result<String, TokenizerError> {
        let vocab_size = self.vocab_size();
        let ids = ids
            .iter()
            .map(|&id| match u32::try_from(id) {
                Ok(u) if (u as usize) < vocab_size => Ok(u),
                _ => Err(TokenizerError::IdOutOfRange { id, vocab_size }),
            })
            .collect::<Result<Vec<u32>, _>>()?;
        self.inner
            .decode(&ids, !keep_special)
            .map_err(|e| TokenizerError::Codec {
                what: "decode",
                message: e.to_string(),
            })
    }

    /// The text of one token, for per-token output.
    pub fn token_text(&self, id: i64) -> String {
        self.decode(&[id], true)
            .unwrap_or_else(|_| format!("<{id}>"))
    }

    /// Writes `tokenizer.json` (used inside checkpoint folders, which are
    /// written to a temporary folder first and renamed whole).
    pub fn save(&self, path: &Path) -> Result<(), TokenizerError> {
        self.inner
            .save(path, false)
            .map_err(|e| TokenizerError::Save {
                path: path.to_owned(),
                message: e.to_string(),
            })
    }
}

/// The most a `tokenizer.json` may hold (large vocabularies are ~30 MB).
const MAX_TOKENIZER_BYTES: u64 = 1 << 30;

/// Oniguruma's limit panics are turned into errors by `encode`; keep their
/// panic message off stderr (every other panic still prints).
fn quiet_oniguruma_panics() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            let text = panic_text(info.payload());
            if !text.starts_with("Onig: ") {
                previous(info);
            }
        }));
    });
}

fn panic_text(payload: &(dyn std::any::Any + Send)) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a panic".into())
}

/// GPT-2's reversible byte -> printable character map, which byte-level
/// `tokenizer.json` vocabularies are written in.
fn byte_to_char() -> [char; 256] {
    let printable = |b: u32| {
        (u32::from(b'!')..=u32::from(b'~')).contains(&b)
            || (0xA1..=0xAC).contains(&b)
            || (0xAE..=0xFF).contains(&b)
    };
    let mut map = ['\0'; 256];
    let mut next = 256u32;
    for b in 0..256u32 {
        map[b as usize] = if printable(b) {
            char::from_u32(b).expect("printable byte")
        } else {
            let c = char::from_u32(next).expect("valid code point");
            next += 1;
            c
        };
    }
    map
}

fn byte_tokenizer_json() -> String {
    let vocab: serde_json::Map<String, serde_json::Value> = byte_to_char()
        .iter()
        .enumerate()
        .map(|(byte, c)| (c.to_string(), serde_json::Value::from(byte)))
        .collect();
    let added: Vec<serde_json::Value> = BYTE_SPECIAL_TOKENS
        .iter()
        .enumerate()
        .map(|(i, content)| {
            serde_json::json!({
                "id": 256 + i, "content": content, "single_word": false, "lstrip": false,
                "rstrip": false, "normalized": false, "special": true
            })
        })
        .collect();
    serde_json::json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": null,
        "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": false, "use_regex": false},
        "post_processor": null,
        "decoder": {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": false, "use_regex": false},
        "model": {
            "type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
            "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false,
            "ignore_merges": false, "vocab": vocab, "merges": []
        }
    })
    .to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_regex_that_backtracks_without_bound_is_an_error_not_a_panic() {
        let mut json: serde_json::Value = serde_json::from_str(&byte_tokenizer_json()).unwrap();
        json["pre_tokenizer"] = serde_json::json!({
            "type": "Split", "pattern": {"Regex": "(a|aa)+$"}, "behavior": "Isolated", "invert": false
        });
        let json = json.to_string();
        let d = tempfile::tempdir().unwrap();
        let path = d.path().join("tokenizer.json");
        std::fs::write(&path, json).unwrap();
        let t = Tokenizer::from_file(&path).unwrap();
        assert_eq!(t.encode("aab").unwrap().len(), 3, "short texts still work");
        let m = t
            .encode(&format!("{}b", "a".repeat(5000)))
            .unwrap_err()
            .to_string();
        assert!(
            m.contains("tokenizer.json failed on a text of 5001 bytes")
                && m.contains("backtracks without bound"),
            "{m}"
        );
    }

    #[test]
    fn byte_tokenizer_ids_are_the_utf8_bytes() {
        let tok = Tokenizer::bytes();
        let text = "Sort: 3 1 2 -> é!";
        let ids = tok.encode(text).unwrap();
        let bytes: Vec<i64> = text.bytes().map(i64::from).collect();
        assert_eq!(ids, bytes);
        assert_eq!(tok.decode(&ids, false).unwrap(), text);
        assert_eq!(tok.vocab_size(), 261);
    }

    #[test]
    fn byte_tokenizer_special_tokens() {
        let tok = Tokenizer::bytes();
        let s = tok.special();
        assert_eq!((s.eos, s.pad), (256, 257));
        let roles = s.roles.unwrap();
        assert_eq!((roles.system, roles.user, roles.assistant), (258, 259, 260));
        let ids = tok.encode("<|user|>hi<|endoftext|>").unwrap();
        assert_eq!(ids, vec![259, 104, 105, 256]);
        assert_eq!(tok.decode(&ids, false).unwrap(), "hi");
        assert_eq!(tok.decode(&ids, true).unwrap(), "<|user|>hi<|endoftext|>");
    }

    #[test]
    fn saved_byte_tokenizer_loads_back_identically() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tokenizer.json");
        let tok = Tokenizer::bytes();
        tok.save(&path).unwrap();
        let back = Tokenizer::from_model_dir(dir.path()).unwrap();
        let text = "line one\nline two\t<|assistant|>ok";
        assert_eq!(back.encode(text).unwrap(), tok.encode(text).unwrap());
        assert_eq!(back.special(), tok.special());
    }

    #[test]
    fn decode_rejects_ids_outside_vocabulary() {
        let err = Tokenizer::bytes().decode(&[5, 999], false).unwrap_err();
        assert!(err.to_string().contains("999"), "{err}");
    }

    #[test]
    fn missing_tokenizer_file_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let err = Tokenizer::from_model_dir(dir.path()).unwrap_err();
        assert!(err.to_string().contains("tokenizer.json"), "{err}");
    }
}
