//! The tensor bundle every data stage produces: a safetensors file with `images` (u8 NCHW for
//! data sets, f32 NCHW in [0,1] for adversarial sets), `labels` (i64 [N]) and metadata
//! `classes` (JSON list of class names).
