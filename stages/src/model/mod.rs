//! The model: the GPT and Llama layouts behind one `Network`, LoRA
//! adapters, precision, devices, and the folders they are saved in
//! (`checkpoint`: Hugging Face's layout, read and written); sampling with a
//! KV cache (`sample`) and the log-probabilities of given tokens (`score`).
//! It imports nothing of training, the kinds or RL.

pub mod adapters;
pub mod checkpoint;
pub mod checkpointing;
pub mod device;
pub mod gpt;
pub mod llama;
pub mod lora;
pub mod network;
pub mod precision;
pub mod sample;
pub mod score;
