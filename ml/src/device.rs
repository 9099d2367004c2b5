//! Device selection: `auto` = CUDA when available, else CPU.

use tch::Device;

/// Parses `auto`, `cpu`, `cuda` or `cuda:N`.
pub fn parse_device(s: &str) -> Result<Device, String> {
    match s {
        "auto" | "" => Ok(Device::cuda_if_available()),
        "cpu" => Ok(Device::Cpu),
        "cuda" => {
            if tch::Cuda::is_available() {
                Ok(Device::Cuda(0))
            } else {
                Err("device = \"cuda\" but no CUDA device is available; use device = \"auto\" or \"cpu\"".into())
            }
        }
        s if s.starts_with("cuda:") => {
            let n: usize = s[5..].parse().map_err(|_| format!("bad device {s:?}"))?;
            if (n as i64) < tch::Cuda::device_count() {
                Ok(Device::Cuda(n))
            } else {
                Err(format!("device {s:?} does not exist ({} CUDA devices)", tch::Cuda::device_count()))
            }
        }
        other => Err(format!("unknown device {other:?}: use auto, cpu, cuda or cuda:N")),
    }
}
