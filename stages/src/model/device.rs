//! Choosing where tensors live: `auto` is CUDA when present, else the CPU.

use tch::Device;

#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    #[error("device \"{0}\" is not one of auto, cpu, cuda, cuda:N")]
    Unknown(String),
    #[error("device \"{0}\" was asked for but CUDA is not available here")]
    NoCuda(String),
    #[error("device \"{asked}\": this machine has {count} CUDA device(s)")]
    NoSuchGpu { asked: String, count: usize },
}

/// Parses `auto`, `cpu`, `cuda` or `cuda:N`.
/// Checks that `spec` is a device name (auto, cpu, cuda, gpu, cuda:N)
/// without asking the machine: for config files read on another machine.
pub fn check_device_spec(spec: &str) -> Result<(), DeviceError> {
    let s = spec.trim().to_ascii_lowercase();
    let indexed = s
        .strip_prefix("cuda:")
        .is_some_and(|n| n.parse::<usize>().is_ok());
    if matches!(s.as_str(), "auto" | "cpu" | "cuda" | "gpu") || indexed {
        Ok(())
    } else {
        Err(DeviceError::Unknown(spec.into()))
    }
}

pub fn parse_device(spec: &str) -> Result<Device, DeviceError> {
    let spec_lc = spec.trim().to_ascii_lowercase();
    let cuda_count = || tch::Cuda::device_count() as usize;
    match spec_lc.as_str() {
        "auto" => Ok(Device::cuda_if_available()),
        "cpu" => Ok(Device::Cpu),
        "cuda" | "gpu" => {
            if tch::Cuda::is_available() {
                Ok(Device::Cuda(0))
            } else {
                Err(DeviceError::NoCuda(spec.into()))
            }
        }
        s => {
            let index: usize = s
                .strip_prefix("cuda:")
                .and_then(|n| n.parse().ok())
                .ok_or_else(|| DeviceError::Unknown(spec.into()))?;
            if !tch::Cuda::is_available() {
                return Err(DeviceError::NoCuda(spec.into()));
            }
            if index >= cuda_count() {
                return Err(DeviceError::NoSuchGpu {
                    asked: spec.into(),
                    count: cuda_count(),
                });
            }
            Ok(Device::Cuda(index))
        }
    }
}

/// A short name for logs and metrics.
pub fn device_name(device: Device) -> String {
    match device {
        Device::Cpu => "cpu".into(),
        Device::Cuda(i) => format!("cuda:{i}"),
        other => format!("{other:?}").to_lowercase(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_known_names_and_rejects_others() {
        assert_eq!(parse_device("cpu").unwrap(), Device::Cpu);
        assert_eq!(parse_device("auto").unwrap(), Device::cuda_if_available());
        assert!(parse_device("tpu").unwrap_err().to_string().contains("tpu"));
        if !tch::Cuda::is_available() {
            assert!(parse_device("cuda:0")
                .unwrap_err()
                .to_string()
                .contains("not available"));
        }
    }
}
