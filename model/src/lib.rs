//! Networks built from BitLinear layers.
