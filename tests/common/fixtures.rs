//! The shipped SMAP pipeline and model repository, and variants of them
//! that tests write to temporary directories.

use std::path::{Path, PathBuf};

pub const SMAP_PIPELINE: &str = "pipelines/smap.toml";

pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The shipped models' window (`satwatch.window`, the same for all of them): a
/// channel's first `window()` samples only fill it, and its first score is at
/// that seq.
pub fn window() -> i64 {
    let model = repo_root().join("model_repository/smap_A-1");
    let spec = satwatch::repository::load_model(&model).expect("the shipped A-1 model loads");
    spec.window as i64
}

/// Copies a directory tree (a model repository, for tests that change it).
pub fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), target).unwrap();
        }
    }
}

/// Writes a copy of the SMAP pipeline into `dir` as `name`, changed by
/// `edit` (the model repository path made absolute so the copy works from
/// anywhere); returns its path.
pub fn pipeline_variant(dir: &Path, name: &str, edit: impl FnOnce(&mut toml::Table)) -> PathBuf {
    let text = std::fs::read_to_string(repo_root().join(SMAP_PIPELINE)).unwrap();
    let mut table: toml::Table = text.parse().unwrap();
    table["repository"]["path"] =
        toml::Value::String(repo_root().join("model_repository").display().to_string());
    edit(&mut table);
    let path = dir.join(name);
    std::fs::write(&path, toml::to_string(&table).unwrap()).unwrap();
    path
}

/// Sets `[section] key = value` in a pipeline table.
pub fn set(table: &mut toml::Table, section: &str, key: &str, value: impl Into<toml::Value>) {
    table
        .entry(section)
        .or_insert_with(|| toml::Value::Table(Default::default()))
        .as_table_mut()
        .unwrap()
        .insert(key.to_owned(), value.into());
}
