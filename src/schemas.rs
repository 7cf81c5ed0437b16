//! The published JSON Schemas (`schemas/`): each is generated from the Rust type it describes, and a
//! test keeps the committed files equal to the types (`UPDATE_SCHEMAS=1 cargo test` rewrites them).

use serde_json::Value;

use crate::daemon::{actions, events};

/// Every published schema: its path under `schemas/` and its content.
pub fn published() -> Vec<(String, Value)> {
    let mut schemas = vec![
        ("message.v1.json".to_owned(), crate::message::json_schema()),
        (
            "agent-command.v1.json".to_owned(),
            actions::command_schema(),
        ),
        ("command-reply.v1.json".to_owned(), actions::reply_schema()),
    ];
    for (kind, schema) in events::data_schemas() {
        schemas.push((format!("events/{kind}.v1.json"), schema));
    }
    schemas
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn published_schemas_match_the_types() {
        let root = std::path::Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/schemas"));
        let update = std::env::var_os("UPDATE_SCHEMAS").is_some();
        let mut stale = Vec::new();
        for (name, schema) in published() {
            let path = root.join(&name);
            let generated = serde_json::to_string_pretty(&schema).unwrap() + "\n";
            if update {
                std::fs::create_dir_all(path.parent().unwrap()).unwrap();
                std::fs::write(&path, &generated).unwrap();
            }
            if std::fs::read_to_string(&path).unwrap_or_default() != generated {
                stale.push(name);
            }
        }
        assert!(
            stale.is_empty(),
            "stale schemas {stale:?}: run UPDATE_SCHEMAS=1 cargo test --lib schemas"
        );
    }
}
