//! The model zoo. Every model is a plain struct over `tch::nn::Path` whose variable names are
//! exactly PyTorch's state-dict keys, and implements `nn::ModuleT` on raw [0,1] NCHW input (any
//! normalisation is the model's first op, spec §7).

use tch::nn;
use wdro_stages::params::Arch;

/// A network with its variables.
pub struct Net {
    pub vs: nn::VarStore,
    pub module: Box<dyn nn::ModuleT + Send>,
    pub arch: Arch,
}

impl Net {
    /// Logits for x (float, [0,1] unless the arch says otherwise).
    pub fn forward_t(&self, x: &tch::Tensor, train: bool) -> tch::Tensor {
        self.module.forward_t(x, train)
    }
}
