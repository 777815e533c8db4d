//! Files -> examples -> token batches: loaders, schemas, tokenizers, the
//! bundled task. No model code lives here.

pub mod atomic;
pub mod tokenizer;

pub use tokenizer::Tokenizer;
pub mod task;
