//! Activation checkpointing (`gradient_checkpointing: true`): a training
//! forward keeps only each layer's input, not the activations inside the
//! layers; the backward recomputes one layer at a time from its input.
//! Memory for activations falls from every layer's to one layer's plus
//! one `(B, T, C)` tensor per layer, for about one more forward of time.
//!
//! libtorch's autograd cannot call back into Rust, so the backward is
//! driven from here: the forward runs the layers without a graph and
//! hands on their output as a leaf; the caller's `loss.backward()` reaches
//! that leaf (through the final norm, the head and the loss), and
//! [`Checkpointing::backward`] then walks the layers in reverse, each
//! recomputed with its graph and back-propagated with the gradient of its
//! output (`sum(y * g)` has gradient `g` with respect to `y`). The
//! recompute must draw nothing at random, so dropout must be off.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

use tch::{Device, Kind, Tensor};

/// One checkpointed forward: what it shares between layers (`pass`), the
/// token ids, each layer's input without its graph, and the last layer's
/// output as the leaf the rest of the forward builds on.
struct Segment<P> {
    pass: P,
    ids: Tensor,
    inputs: Vec<Tensor>,
    output: Tensor,
}

/// A model's checkpointing switch and the forwards waiting for their
/// backward.
pub(crate) struct Checkpointing<P> {
    on: AtomicBool,
    tape: Mutex<Vec<Segment<P>>>,
}

impl<P> Default for Checkpointing<P> {
    fn default() -> Self {
        Self {
            on: AtomicBool::new(false),
            tape: Mutex::new(Vec::new()),
        }
    }
}

impl<P> std::fmt::Debug for Checkpointing<P> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Checkpointing({})", self.on.load(Ordering::SeqCst))
    }
}

/// Whether libtorch records graphs here (not under `no_grad`).
fn grad_enabled() -> bool {
    let probe = Tensor::zeros([1], (Kind::Float, Device::Cpu)).set_requires_grad(true);
    (probe * 1.0).requires_grad()
}

impl<P> Checkpointing<P> {
    pub fn set(&self, on: bool) {
        self.on.store(on, Ordering::SeqCst);
        self.tape().clear();
    }

    /// On, and this forward records a graph (a training forward).
    pub fn applies(&self) -> bool {
        self.on.load(Ordering::SeqCst) && grad_enabled()
    }

    fn tape(&self) -> std::sync::MutexGuard<'_, Vec<Segment<P>>> {
        self.tape.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Runs `layers` layers over `x` (the embedding of `ids`) without their
    /// graphs, keeps their inputs, and returns the last output as a leaf
    /// that requires grad.
    pub fn forward(
        &self,
        x: Tensor,
        ids: &Tensor,
        pass: P,
        layers: usize,
        layer: impl Fn(usize, &Tensor, &P) -> Tensor,
    ) -> Tensor {
        let mut inputs = Vec::with_capacity(layers);
        let x = tch::no_grad(|| {
            (0..layers).fold(x.detach(), |x, i| {
                let y = layer(i, &x, &pass);
                inputs.push(x);
                y
            })
        });
        let output = x.set_requires_grad(true);
        self.tape().push(Segment {
            pass,
            ids: ids.shallow_clone(),
            inputs,
            output: output.shallow_clone(),
        });
        output
    }

    /// Back-propagates every recorded forward through its layers and its
    /// embedding (`embed`), after the caller's backward reached the
    /// forwards' outputs; a forward no loss used is dropped.
    pub fn backward(
        &self,
        layer: impl Fn(usize, &Tensor, &P) -> Tensor,
        embed: impl Fn(&Tensor, &P) -> Tensor,
    ) {
        let segments = std::mem::take(&mut *self.tape());
        for s in segments.into_iter().rev() {
            let mut g = s.output.grad();
            if !g.defined() {
                continue;
            }
            for (i, x) in s.inputs.iter().enumerate().rev() {
                let x = x.detach().set_requires_grad(true);
                let y = layer(i, &x, &s.pass);
                (y * &g).sum(Kind::Float).backward();
                g = x.grad();
            }
            let e = embed(&s.ids, &s.pass);
            if e.requires_grad() {
                (e * &g).sum(Kind::Float).backward();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use crate::model::gpt::Head;
    use crate::model::network::Network;
    use tch::{nn::VarStore, Kind, Tensor};

    /// Every gradient of a loss over a left-padded batch and an unpadded
    /// one, by name.
    fn gradients(vs: &VarStore, net: &Network) -> Vec<(String, Tensor)> {
        for (_, mut t) in vs.variables() {
            t.zero_grad();
        }
        let ids = Tensor::from_slice(&[0i64, 0, 5, 9, 2, 7, 1, 3, 4, 6, 8, 3]).view([2, 6]);
        let mask = Tensor::from_slice(&[0i64, 0, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1]).view([2, 6]);
        for m in [Some(&mask), None] {
            let logits = net.forward_logits(&ids, m, true);
            let lp = logits.log_softmax(-1, Kind::Float);
            let loss = -lp
                .narrow(1, 0, 5)
                .gather(2, &ids.narrow(1, 1, 5).unsqueeze(-1), false);
            loss.mean(Kind::Float).backward();
            net.backward_checkpointed();
        }
        let mut grads: Vec<(String, Tensor)> = vs
            .variables()
            .into_iter()
            .map(|(k, t)| (k, t.grad().copy()))
            .collect();
        grads.sort_by(|a, b| a.0.cmp(&b.0));
        grads
    }

    #[test]
    fn checkpointed_gradients_equal_the_plain_backward_on_both_layouts() {
        let _rng = crate::rng_lock();
        for (vs, net) in [
            crate::tiny_gpt(3, 40, 16, 3, Head::Lm),
            crate::tiny_llama(3, 40, 16, 3, Head::Lm),
        ] {
            let plain = gradients(&vs, &net);
            net.set_gradient_checkpointing(true).unwrap();
            // The loss's own backward stops at the layers' output: their
            // weights get gradients only from the recompute.
            let ids = Tensor::from_slice(&[1i64, 2, 3, 4]).view([1, 4]);
            for (_, mut t) in vs.variables() {
                t.zero_grad();
            }
            net.forward_logits(&ids, None, true)
                .sum(Kind::Float)
                .backward();
            let (layer, g) = vs
                .variables()
                .into_iter()
                .find(|(k, _)| k.contains(".0."))
                .unwrap();
            let g = g.grad();
            assert!(
                !g.defined() || g.abs().sum(Kind::Float).double_value(&[]) == 0.0,
                "{layer}"
            );
            net.backward_checkpointed();
            let checkpointed = gradients(&vs, &net);
            for ((name, a), (_, b)) in plain.iter().zip(&checkpointed) {
                assert!(a.abs().sum(Kind::Float).double_value(&[]) > 0.0, "{name}");
                let diff = (a - b).abs().max().double_value(&[]);
                assert!(diff < 1e-6, "{name}: {diff}");
            }
            // Off again: the plain backward, bit for bit.
            net.set_gradient_checkpointing(false).unwrap();
            for ((name, a), (_, b)) in plain.iter().zip(&gradients(&vs, &net)) {
                assert!(a.equal(b), "{name}");
            }
        }
    }

    #[test]
    fn dropout_refuses_checkpointing() {
        tch::manual_seed(1);
        let vs = VarStore::new(tch::Device::Cpu);
        let cfg = crate::GptConfig {
            resid_pdrop: 0.1,
            ..crate::GptConfig::default()
        };
        let net = Network::Gpt(crate::model::gpt::Gpt::new(&vs.root(), &cfg, Head::Lm));
        let err = net.set_gradient_checkpointing(true).unwrap_err();
        assert!(err.contains("resid_pdrop"), "{err}");
        // LoRA dropout too, on either layout.
        for (vs, mut net) in [
            crate::tiny_gpt(3, 40, 16, 2, Head::Lm),
            crate::tiny_llama(3, 40, 16, 2, Head::Lm),
        ] {
            let lora = crate::model::lora::LoraConfig {
                dropout: 0.1,
                ..Default::default()
            };
            match &mut net {
                Network::Gpt(g) => g.add_lora(&vs.root(), &lora),
                Network::Llama(l) => l.add_lora(&vs.root(), &lora),
            }
            let err = net.set_gradient_checkpointing(true).unwrap_err();
            assert!(err.contains("lora.dropout"), "{err}");
        }
    }
}
