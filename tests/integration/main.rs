//! The integration tests: one test binary (llama.cpp linked once), one module per area, the
//! shared set-up in the test kit (tests/testkit/, shared with the serve benchmarks in
//! examples/). Most tests run on the real model (scripts/fetch-model) and data
//! (scripts/fetch-data); the MQTT ones start Debian's Mosquitto themselves.
//!
//! One area: `cargo test --release --test integration serve::` (a module path filter).

#[path = "../testkit/mod.rs"]
mod testkit;

mod bad_input;
mod cli;
mod demos;
mod encoder;
mod home_assistant;
mod kiosk;
mod layers;
mod learn;
mod learned;
mod logprob_over;
mod lora;
mod memory;
mod model;
mod monitor;
mod netedge;
mod no_weights;
mod packaging;
mod powerloss;
mod rank;
mod react;
mod security;
mod serve;
mod serve_qa;
mod setup;
