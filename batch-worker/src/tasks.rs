//! The bulk tasks as [`Processor`]s.

use std::path::Path;

use shared::wire::{InputItem, OutputLine};

use crate::embedded::Processor;
use crate::engine::{Classifier, Device, EngineError};

/// `classify`: the edge's intent model over each item.
pub struct Classify {
    model: Classifier,
    batch_size: usize,
}

impl Classify {
    /// Loads `<model_dir>/intent`.
    pub fn load(model_dir: &Path, device: Device, batch_size: usize) -> Result<Self, EngineError> {
        Ok(Self {
            model: Classifier::load(&model_dir.join("intent"), device)?,
            batch_size: batch_size.max(1),
        })
    }

    pub fn provider(&self) -> &'static str {
        self.model.provider()
    }
}

impl Processor for Classify {
    fn batch_size(&self) -> usize {
        self.batch_size
    }

    fn inference_time(&self) -> std::time::Duration {
        self.model.run_time()
    }

    fn process(&mut self, items: &[InputItem]) -> Result<Vec<OutputLine>, EngineError> {
        let texts: Vec<&str> = items.iter().map(|i| i.input.as_str()).collect();
        let outputs = self.model.classify(&texts)?;
        Ok(items
            .iter()
            .zip(outputs)
            .map(|(item, out)| OutputLine::Ok {
                custom_id: item.custom_id.clone(),
                output: serde_json::to_value(out).unwrap_or_default(),
            })
            .collect())
    }
}
