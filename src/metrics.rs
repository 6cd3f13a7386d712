//! Evaluation metrics and report plots (being written).
