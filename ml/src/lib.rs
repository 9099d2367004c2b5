//! `wdro-ml`: everything that runs on libtorch through `tch`. The `wdro` CLI never links this
//! crate; it starts the `wdro-worker` binary for each torch stage that must run.
//!
//! * [`data`]: data set readers (IDX, CIFAR-10 binary/python, PNG folders), tensor bundles, subsets.
//! * [`models`]: the model zoo, with PyTorch's variable names so state dicts map 1:1.
//! * [`checkpoint`]: safetensors and PyTorch `.pt` (zip + data-only pickle) loading.
//! * [`losses`], [`upsilon`], [`attacks`], [`finetune`], [`clean`]: the method (spec §2–§6).
//! * [`stage_impls`]: one `run(job)` per worker stage kind.

pub mod attacks;
pub mod checkpoint;
pub mod clean;
pub mod data;
pub mod device;
pub mod finetune;
pub mod losses;
pub mod models;
pub mod stage_impls;
pub mod train;
pub mod upsilon;
