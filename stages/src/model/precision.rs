//! `precision: fp32 | bf16` of a stage.
//!
//! bf16 is PyTorch's autocast: the weights, their gradients and AdamW's
//! moments stay fp32 (the master copy), while matmuls and attention run
//! in bfloat16 on CPU and CUDA alike. Logits are taken back to fp32
//! before any log-softmax, so losses, log-probabilities, KL and
//! advantages are fp32, as are norms (RMSNorm computes in fp32).

use serde::{Deserialize, Serialize};
use tch::Device;

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    #[default]
    Fp32,
    Bf16,
}

impl Precision {
    pub fn is_fp32(&self) -> bool {
        *self == Self::Fp32
    }

    /// Runs `f` (a stage) in this precision on `device`.
    pub fn run<T>(self, device: Device, f: impl FnOnce() -> T) -> T {
        match self {
            Self::Fp32 => f(),
            Self::Bf16 => crate::ffi::with_bf16_autocast(device.is_cuda(), f),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::{Kind, Tensor};

    #[test]
    fn bf16_runs_matmuls_in_bfloat16_and_restores_fp32() {
        let a = Tensor::randn([4, 8], (Kind::Float, Device::Cpu));
        let b = Tensor::randn([8, 3], (Kind::Float, Device::Cpu));
        let inside = Precision::Bf16.run(Device::Cpu, || a.matmul(&b));
        assert_eq!(inside.kind(), Kind::BFloat16);
        let close = (inside.to_kind(Kind::Float) - a.matmul(&b)).abs().max();
        assert!(close.double_value(&[]) < 0.1);
        // Elementwise work stays fp32; after the region, matmuls are fp32.
        assert_eq!(
            Precision::Bf16.run(Device::Cpu, || &a + 1.0).kind(),
            Kind::Float
        );
        assert_eq!(a.matmul(&b).kind(), Kind::Float);
        assert_eq!(
            Precision::Fp32.run(Device::Cpu, || a.matmul(&b)).kind(),
            Kind::Float
        );
    }
}
