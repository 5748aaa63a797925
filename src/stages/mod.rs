//! The stages the runner knows, in pipeline order. Each file is one stage: it glues the
//! library modules to the [`Stage`](crate::pipeline::Stage) contract.

mod fetch;
mod finetune;
mod prepare;

pub use fetch::{FetchStage, Fetched};
pub use finetune::{base_model_dir, FinetuneStage};
pub use prepare::PrepareStage;

use crate::pipeline::Stage;

/// Every implemented stage, in pipeline order.
pub fn all() -> Vec<Box<dyn Stage>> {
    vec![
        Box::new(FetchStage),
        Box::new(PrepareStage),
        Box::new(FinetuneStage),
    ]
}
