//! `rlhf label`: people rank a round's sampled answers in a web page.
//!
//! First step of issue #18: the queue's HTTP service and per-labeller
//! tokens. `serve` binds 127.0.0.1 by default; every request needs a
//! labeller's token (`Authorization: Bearer TOKEN`, or `?token=` for the
//! page itself); a submission is checked by the queue and refused with a
//! 4xx that changes nothing.

mod page;
mod server;
mod tokens;

pub use server::{serve, serve_until_labelled, ServeOptions, GUIDELINES_FILE};
pub use tokens::add_token;
