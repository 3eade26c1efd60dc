//! Model repository control while running, after Triton's: an index of the
//! repository, explicit load and unload, and a poll mode that watches the
//! directory.
//!
//! Loading a model reads its `config.pbtxt` and the version its
//! `version_policy` selects, opens the ONNX file on a backend and checks it
//! against the config, all off the async runtime. Only then is the new version
//! handed to the processor, which swaps it in between batches (see
//! [`Engine::swap_model`](crate::engine::Engine::swap_model)). A version that
//! fails any step is refused with the reason and the previous one keeps
//! serving.

use std::{
    collections::HashMap,
    path::{Path, PathBuf},
    sync::{Arc, RwLock},
    time::SystemTime,
};

use serde::Serialize;
use tokio::sync::{mpsc, oneshot, watch, Mutex};

use crate::{
    backend,
    config::EngineSettings,
    engine::Runner,
    health::Health,
    repository::{self, ModelSpec},
};

/// A new model version for the processor to swap in; it answers on `reply`.
pub struct ModelUpdate {
    pub spec: Arc<ModelSpec>,
    pub runner: Runner,
    pub reply: oneshot::Sender<Result<(), crate::engine::EngineError>>,
}

/// The versions being served, shared with the HTTP metadata endpoints.
pub type Served = Arc<RwLock<Vec<Arc<ModelSpec>>>>;

/// Why a load or unload was refused, with the HTTP status that says so.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("{0}")]
    NotFound(String),
    /// The model or its new version cannot be served; the old one stays.
    #[error("{0}")]
    Refused(String),
    #[error("{0}")]
    Conflict(String),
}

impl ControlError {
    /// The error's kind, for metric labels and log fields.
    pub fn error_type(&self) -> &'static str {
        match self {
            ControlError::NotFound(_) => "not_found",
            ControlError::Refused(_) => "refused",
            ControlError::Conflict(_) => "conflict",
        }
    }
}

/// One row of `POST /v2/repository/index` (Triton's shape).
#[derive(Debug, Serialize, PartialEq)]
pub struct IndexEntry {
    pub name: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
    pub state: &'static str,
    pub reason: String,
}

pub struct RepositoryControl {
    root: PathBuf,
    engine: EngineSettings,
    served: Served,
    updates: mpsc::Sender<ModelUpdate>,
    /// One load at a time: two loads of one model must not race.
    loading: Mutex<()>,
    /// The last refusal per model, for the index.
    refused: std::sync::Mutex<HashMap<String, String>>,
}

impl RepositoryControl {
    pub fn new(
        root: PathBuf,
        engine: EngineSettings,
        served: Served,
        updates: mpsc::Sender<ModelUpdate>,
    ) -> Self {
        Self {
            root,
            engine,
            served,
            updates,
            loading: Mutex::new(()),
            refused: std::sync::Mutex::new(HashMap::new()),
        }
    }

    fn serving(&self, name: &str) -> Option<Arc<ModelSpec>> {
        let served = self.served.read().expect("served list updates never panic");
        served.iter().find(|s| s.name == name).cloned()
    }

    /// Every model directory in the repository, and whether it is served:
    /// `READY`, or `UNAVAILABLE` with the reason, for a model `health`
    /// reports unavailable (its calls keep failing, its channels held) as
    /// for one no channel uses.
    pub fn index(&self, health: &Health) -> Vec<IndexEntry> {
        let mut names: Vec<String> = std::fs::read_dir(&self.root)
            .into_iter()
            .flatten()
            .flatten()
            .filter(|e| e.path().join("config.pbtxt").is_file())
            .filter_map(|e| e.file_name().to_str().map(str::to_owned))
            .collect();
        names.sort();
        let refused = self
            .refused
            .lock()
            .expect("refusal log updates never panic");
        names
            .into_iter()
            .map(
                |name| match (self.serving(&name), health.model_unavailable(&name)) {
                    (Some(spec), Some(reason)) => IndexEntry {
                        version: Some(spec.version.to_string()),
                        state: "UNAVAILABLE",
                        reason,
                        name,
                    },
                    (Some(spec), None) => IndexEntry {
                        version: Some(spec.version.to_string()),
                        state: "READY",
                        reason: refused
                            .get(&name)
                            .map(|r| format!("a newer load was refused: {r}"))
                            .unwrap_or_default(),
                        name,
                    },
                    (None, _) => IndexEntry {
                        version: None,
                        state: "UNAVAILABLE",
                        reason: "no channel of this pipeline uses it".into(),
                        name,
                    },
                },
            )
            .collect()
    }

    /// Loads the version of `name` that its `version_policy` selects and
    /// swaps it in; returns that version.
    pub async fn load(&self, name: &str) -> Result<u64, ControlError> {
        let _one_at_a_time = self.loading.lock().await;
        let current = self.serving(name).ok_or_else(|| {
            ControlError::NotFound(format!(
                "model '{name}' serves no channel of this pipeline (satwatch loads the models its channels name)"
            ))
        })?;
        let result = self.load_version(name).await;
        let mut refused = self
            .refused
            .lock()
            .expect("refusal log updates never panic");
        match &result {
            Ok(version) => {
                refused.remove(name);
                tracing::info!(
                    model = name,
                    version,
                    previous = current.version,
                    "model loaded"
                );
            }
            Err(err) => {
                refused.insert(name.to_owned(), err.to_string());
                tracing::warn!(model = name, serving = current.version, reason = %err, "model load refused; the previous version keeps serving");
            }
        }
        result
    }

    /// Opens and checks the new version off the runtime; the engine refuses
    /// it if its shapes differ from the served one's.
    async fn load_version(&self, name: &str) -> Result<u64, ControlError> {
        let dir = self
            .model_dir(name)
            .ok_or_else(|| ControlError::NotFound(format!("unknown model '{name}'")))?;
        let engine = self.engine.clone();
        let (spec, runner) = tokio::task::spawn_blocking(move || {
            let spec = Arc::new(
                repository::load_model(&dir).map_err(|e| ControlError::Refused(e.to_string()))?,
            );
            let selection = backend::select(std::slice::from_ref(&spec), &engine)
                .map_err(|e| ControlError::Refused(e.to_string()))?;
            let runner = selection
                .runners
                .into_iter()
                .next()
                .expect("one model, one runner");
            Ok::<_, ControlError>((spec, runner))
        })
        .await
        .map_err(|e| ControlError::Refused(format!("loading {name} panicked: {e}")))??;
        let (reply, answer) = oneshot::channel();
        let version = spec.version;
        self.updates
            .send(ModelUpdate {
                spec: spec.clone(),
                runner,
                reply,
            })
            .await
            .map_err(|_| ControlError::Conflict("satwatch is shutting down".into()))?;
        answer
            .await
            .map_err(|_| ControlError::Conflict("satwatch is shutting down".into()))?
            .map_err(|e| ControlError::Refused(e.to_string()))?;
        let mut served = self
            .served
            .write()
            .expect("served list updates never panic");
        if let Some(slot) = served.iter_mut().find(|s| s.name == name) {
            *slot = spec;
        }
        Ok(version)
    }

    /// Triton's unload. Every served model scores channels that have no
    /// other model, so unloading one would leave them unscored (their
    /// records would have to be dropped or held): refused, with the reason.
    pub fn unload(&self, name: &str) -> Result<(), ControlError> {
        if self.serving(name).is_some() {
            return Err(ControlError::Conflict(format!(
                "model '{name}' scores channels of this pipeline and has no replacement; \
                 unloading it would leave them unscored. Load another version instead, or \
                 remove the channels from the pipeline file and restart"
            )));
        }
        match self.model_dir(name) {
            Some(dir) if dir.join("config.pbtxt").is_file() => Ok(()), // Not loaded: nothing to do, as in Triton.
            // A name that is a path (`../x`, `/etc`) is answered like any
            // unknown model, so the answer says nothing about what lies
            // outside the repository.
            _ => Err(ControlError::NotFound(format!("unknown model '{name}'"))),
        }
    }

    /// The directory of the model called `name`, if `name` can name one: a
    /// single plain path component, so never a directory outside the
    /// repository.
    fn model_dir(&self, name: &str) -> Option<PathBuf> {
        let mut components = Path::new(name).components();
        match (components.next(), components.next()) {
            (Some(std::path::Component::Normal(plain)), None) if plain == name => {
                Some(self.root.join(name))
            }
            _ => None,
        }
    }

    /// Poll mode: reloads a model when the version its policy selects, its
    /// config or that version's ONNX file changes. A refused change is not
    /// retried until the files change again.
    pub async fn poll(
        self: Arc<Self>,
        interval: std::time::Duration,
        mut shutdown: watch::Receiver<bool>,
    ) {
        let names: Vec<String> = {
            let served = self.served.read().expect("served list updates never panic");
            served.iter().map(|s| s.name.clone()).collect()
        };
        let mut seen: HashMap<String, Fingerprint> = names
            .iter()
            .map(|n| (n.clone(), fingerprint(&self.root.join(n))))
            .collect();
        let mut tick = tokio::time::interval(interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = shutdown.changed() => break,
                _ = tick.tick() => {}
            }
            for name in &names {
                let now = fingerprint(&self.root.join(name));
                if seen.get(name) == Some(&now) {
                    continue;
                }
                seen.insert(name.clone(), now);
                // Outcomes are logged by `load`.
                let _ = self.load(name).await;
            }
        }
    }
}

/// What poll mode compares: the policy's version and the files' sizes and
/// modification times.
#[derive(Debug, PartialEq)]
struct Fingerprint {
    version: Option<u64>,
    files: Vec<Option<(u64, SystemTime)>>,
}

fn fingerprint(dir: &Path) -> Fingerprint {
    let stat = |p: PathBuf| {
        std::fs::metadata(p)
            .ok()
            .and_then(|m| Some((m.len(), m.modified().ok()?)))
    };
    let version = repository::load_config(dir)
        .ok()
        .and_then(|config| repository::policy_versions(&config, dir).ok())
        .and_then(|v| v.last().copied());
    let mut files = vec![stat(dir.join("config.pbtxt"))];
    if let Some(v) = version {
        files.push(stat(dir.join(v.to_string()).join("model.onnx")));
    }
    Fingerprint { version, files }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unload_answers_a_path_as_it_answers_any_unknown_model() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("repository");
        for model in [root.join("known"), dir.path().join("outside")] {
            std::fs::create_dir_all(&model).unwrap();
            std::fs::write(model.join("config.pbtxt"), "").unwrap();
        }
        let control = RepositoryControl::new(
            root.clone(),
            EngineSettings::default(),
            Arc::new(RwLock::new(Vec::new())),
            mpsc::channel(1).0,
        );
        assert!(
            control.unload("known").is_ok(),
            "in the repository, not served"
        );
        let outside = dir.path().join("outside");
        for name in [
            "no_such_model",
            "../outside",
            "known/../../outside",
            "./known",
            "known/",
            "..",
            ".",
            "",
            outside.to_str().unwrap(),
        ] {
            match control.unload(name) {
                Err(ControlError::NotFound(reason)) => {
                    assert_eq!(reason, format!("unknown model '{name}'"))
                }
                other => panic!("{name:?}: {other:?}"),
            }
        }
    }
}
