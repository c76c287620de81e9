//! Shared transformer blocks. Architecture files wire these; they never re-implement them.

pub mod attention;
pub mod linear;
pub mod mla;
pub mod mlp;
pub mod moe;
pub mod norm;
pub mod rope;
