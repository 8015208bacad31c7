//! Record types and formats shared by the davinci services (DESIGN.md §4).
//!
//! Everything here is pure: no I/O, no async. Services read and write these types so every
//! stage agrees on the bytes.

pub mod benchmarks;
pub mod ctx;
pub mod ctx_text;
pub mod diff;
pub mod hash;
pub mod megatron;
pub mod packed;
pub mod pr;
pub mod sample;
pub mod search_replace;
pub mod synth;
pub mod task;
pub mod traj;
