//! Finding and loading the ONNX Runtime shared library.
//!
//! ganomalyd links ONNX Runtime dynamically (`ort`'s `load-dynamic`), so one
//! binary runs on a CPU box with the `onnxruntime` wheel's library and on a GPU
//! box with `onnxruntime-gpu`'s. The library is looked for, in order:
//! 1. the path in the config (`[inference] ort_library`) or `--ort-library`;
//! 2. the `ORT_DYLIB_PATH` environment variable;
//! 3. a Python virtual environment named `.venv` in the working directory, next
//!    to the executable or in one of its parent directories, or in the source
//!    checkout this binary was built from (`make venv` creates it there).

use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock};

/// Errors finding or loading ONNX Runtime.
#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    #[error(
        "ONNX Runtime library not found (looked in: {searched}). Install it with `make venv` \
         (or `python3 -m venv .venv && .venv/bin/pip install onnxruntime==1.31.1`, or onnxruntime-gpu for CUDA), \
         then set `[inference] ort_library` or ORT_DYLIB_PATH to .../site-packages/onnxruntime/capi/libonnxruntime.so.1.31.1"
    )]
    NotFound { searched: String },
    #[error("{path} does not exist")]
    Missing { path: PathBuf },
    #[error("cannot load ONNX Runtime from {path}: {reason}")]
    Load { path: PathBuf, reason: String },
    #[error("ONNX Runtime is already loaded from {loaded}; cannot switch to {requested} in the same process")]
    AlreadyLoaded { loaded: PathBuf, requested: PathBuf },
}

/// The library loaded into this process (ONNX Runtime can be loaded only once).
static LOADED: OnceLock<PathBuf> = OnceLock::new();
/// The process-wide ORT environment, kept alive for the life of the process.
static ENVIRONMENT: OnceLock<ort::environment::Environment> = OnceLock::new();
static INIT_LOCK: Mutex<()> = Mutex::new(());

/// Locates the library without loading it.
pub fn find(explicit: Option<&Path>) -> Result<PathBuf, RuntimeError> {
    if let Some(p) = explicit {
        return if p.is_file() { Ok(p.to_path_buf()) } else { Err(RuntimeError::Missing { path: p.to_path_buf() }) };
    }
    if let Some(p) = std::env::var_os("ORT_DYLIB_PATH").filter(|p| !p.is_empty()) {
        let p = PathBuf::from(p);
        return if p.is_file() { Ok(p) } else { Err(RuntimeError::Missing { path: p }) };
    }
    let mut roots: Vec<PathBuf> = Vec::new();
    if let Ok(cwd) = std::env::current_dir() {
        roots.push(cwd);
    }
    if let Ok(exe) = std::env::current_exe() {
        roots.extend(exe.ancestors().skip(1).map(Path::to_path_buf));
    }
    roots.push(PathBuf::from(env!("CARGO_MANIFEST_DIR")));
    let mut searched = vec!["ORT_DYLIB_PATH (unset)".to_string()];
    for root in roots {
        let venv = root.join(".venv");
        searched.push(venv.display().to_string());
        if let Some(p) = in_venv(&venv) {
            return Ok(p);
        }
    }
    searched.dedup();
    Err(RuntimeError::NotFound { searched: searched.join(", ") })
}

/// `.venv/lib/python3.*/site-packages/onnxruntime/capi/libonnxruntime.so*`.
fn in_venv(venv: &Path) -> Option<PathBuf> {
    let lib = venv.join("lib");
    let mut pythons: Vec<_> = std::fs::read_dir(&lib).ok()?.flatten().map(|e| e.path()).collect();
    pythons.sort();
    for py in pythons {
        let capi = py.join("site-packages/onnxruntime/capi");
        let Ok(entries) = std::fs::read_dir(&capi) else { continue };
        let mut libs: Vec<PathBuf> = entries
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with("libonnxruntime.so")))
            .collect();
        // Prefer the fully versioned file (the wheel ships no plain `.so`).
        libs.sort_by_key(|p| std::cmp::Reverse(p.as_os_str().len()));
        if let Some(p) = libs.into_iter().next() {
            return Some(p);
        }
    }
    None
}

/// Loads ONNX Runtime once per process and returns the library path in use.
/// Calling it again is cheap; asking for a different library afterwards fails.
pub fn init(explicit: Option<&Path>) -> Result<PathBuf, RuntimeError> {
    let _guard = INIT_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(loaded) = LOADED.get() {
        if let Some(p) = explicit {
            if p != loaded && std::fs::canonicalize(p).ok().as_deref() != std::fs::canonicalize(loaded).ok().as_deref()
            {
                return Err(RuntimeError::AlreadyLoaded { loaded: loaded.clone(), requested: p.to_path_buf() });
            }
        }
        return Ok(loaded.clone());
    }
    let path = find(explicit)?;
    let builder =
        ort::init_from(&path).map_err(|e| RuntimeError::Load { path: path.clone(), reason: e.to_string() })?;
    let env = builder
        .with_name("ganomalyd")
        .build()
        .map_err(|e| RuntimeError::Load { path: path.clone(), reason: e.to_string() })?;
    let _ = ENVIRONMENT.set(env);
    tracing::info!(library = %path.display(), "ONNX Runtime loaded");
    let _ = LOADED.set(path.clone());
    Ok(path)
}

/// Loads ONNX Runtime if needed and returns the process-wide environment that
/// sessions are built from (`ort::session::Session::builder(env)`).
pub fn environment(explicit: Option<&Path>) -> Result<&'static ort::environment::Environment, RuntimeError> {
    let path = init(explicit)?;
    ENVIRONMENT.get().ok_or_else(|| RuntimeError::Load { path, reason: "environment was not created".into() })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn explicit_missing_path_is_named() {
        let err = find(Some(Path::new("/nonexistent/libonnxruntime.so"))).unwrap_err();
        assert!(err.to_string().contains("/nonexistent/libonnxruntime.so"), "{err}");
    }

    #[test]
    fn finds_library_in_a_venv_layout() {
        let dir = tempfile::tempdir().unwrap();
        let capi = dir.path().join(".venv/lib/python3.11/site-packages/onnxruntime/capi");
        std::fs::create_dir_all(&capi).unwrap();
        std::fs::write(capi.join("libonnxruntime.so.1.31.1"), b"").unwrap();
        std::fs::write(capi.join("libonnxruntime_providers_shared.so"), b"").unwrap();
        assert_eq!(in_venv(&dir.path().join(".venv")), Some(capi.join("libonnxruntime.so.1.31.1")));
        assert_eq!(in_venv(&dir.path().join("nothing")), None);
    }
}
