//! Task files (TOML) and what they define: classification tasks ([`Task`]; a `[rank]`
//! section makes one a ranking task) and ReAct tasks ([`react::ReactSpec`]), read by one
//! loader ([`TaskFile`]) that tells the kind once; query templates; the ReAct step format
//! and tool schemas; and [`SpecError`], the one error of this layer.

pub mod demos;
mod error;
mod file;
pub mod lora;
pub mod policy;
pub mod react;
pub mod step;
mod task;
pub mod template;
pub mod tool;
pub mod train;

pub use demos::{DemoSimilarity, Demos};
pub use error::SpecError;
pub use file::{find_task_file, is_react_file, searched_dirs, TaskFile};
pub use lora::{
    config_for_tasks, count_kb_encoder, lora_for_tasks, method_needs_model, needs_model,
};
pub use task::{
    Calibration, HeadRef, InputBudget, Label, Method, ScoreNorm, Task, TruncatePolicy,
    TRUNCATED_FIELD,
};
pub use template::Template;
pub use train::TrainSource;
