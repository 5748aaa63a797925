//! Where a model or data set comes from: the `source` and `revision` keys that `[model]` and
//! every `[data.NAME]` share. Layer: ground (config) — imports nothing from the crate.

use serde::{Deserialize, Serialize};

/// Where a model or dataset comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum SourceKind {
    /// A local path if `id` names an existing file or folder (or starts with `/`, `./`,
    /// `../`), otherwise the hub. Resolved on load.
    #[default]
    Auto,
    /// The Hugging Face hub (online, or its cache when offline).
    Hub,
    /// A local file or folder.
    Local,
}

/// `revision`'s default: the `main` branch.
pub(crate) fn default_revision() -> String {
    "main".to_string()
}
