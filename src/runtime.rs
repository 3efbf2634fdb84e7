//! Finding and loading the ONNX Runtime shared library.
//!
//! ganomalyd links ONNX Runtime dynamically (`ort`'s `load-dynamic`), so one
//! binary runs on a CPU box with the `onnxruntime` wheel's library and on a GPU
//! box with `onnxruntime-gpu`'s. The library is looked for, in order:
//! 1. the path in the config (`[inference] ort_library`) or `--ort-library`;
//! 2. the `ORT_DYLIB_PATH` environment variable;
//! 3. `/usr/lib/ganomalyd/libonnxruntime.so*`, where the Debian package
//!    (`make deb`, `packaging/`) installs the library it ships, so an installed
//!    daemon needs no configuration.
//!
//! Nothing else: no `.venv` in the working directory, beside the executable or
//! in the checkout it was built from. The library runs as the daemon, so a
//! directory someone else can write to (a working directory, a build path on
//! a box the binary was copied to) must not be able to supply it. The
//! project's `.venv` is used by an explicit route: the Makefile exports
//! `ORT_DYLIB_PATH` for `make demo`, `make test` and `make bench`, and the
//! integration tests' support code sets it when unset; only the library's own
//! unit tests (`cfg(test)`) look in the checkout's `.venv`.

use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock};

/// Where the Debian package puts ONNX Runtime (a private directory: the
/// library is the wheel's, not a system-wide `libonnxruntime`).
pub const PACKAGED_DIR: &str = "/usr/lib/ganomalyd";

/// Errors finding or loading ONNX Runtime.
#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    #[error(
        "ONNX Runtime library not found (looked in: {searched}). Install the package, or install it with `make venv` \
         (or `python3 -m venv .venv && .venv/bin/pip install onnxruntime==1.31.1`, or onnxruntime-gpu for CUDA) \
         and set `[inference] ort_library` or ORT_DYLIB_PATH to .../site-packages/onnxruntime/capi/libonnxruntime.so.1.31.1 \
         (a .venv is never searched on its own: the library runs as the daemon)"
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
    // The checkout's `.venv`, for the unit tests of this crate only (never
    // compiled into a daemon).
    #[cfg(test)]
    let roots = vec![PathBuf::from(env!("CARGO_MANIFEST_DIR"))];
    #[cfg(not(test))]
    let roots: Vec<PathBuf> = Vec::new();
    let env = std::env::var_os("ORT_DYLIB_PATH");
    find_in(explicit, env.as_deref(), Path::new(PACKAGED_DIR), &roots)
}

/// `.venv/lib/python3.*/site-packages/onnxruntime/capi/libonnxruntime.so*`
/// under `root`: the library `make venv` installs, for the explicit dev
/// routes (test support code sets `ORT_DYLIB_PATH` to it).
pub fn dev_library(root: &Path) -> Option<PathBuf> {
    in_venv(&root.join(".venv"))
}

/// The search of [`find`] with the world passed in: the environment
/// variable's value, the package directory and the roots whose `.venv` is
/// tried, in order.
fn find_in(
    explicit: Option<&Path>,
    env: Option<&std::ffi::OsStr>,
    packaged: &Path,
    roots: &[PathBuf],
) -> Result<PathBuf, RuntimeError> {
    if let Some(p) = explicit {
        return if p.is_file() { Ok(p.to_path_buf()) } else { Err(RuntimeError::Missing { path: p.to_path_buf() }) };
    }
    if let Some(p) = env.filter(|p| !p.is_empty()) {
        let p = PathBuf::from(p);
        return if p.is_file() { Ok(p) } else { Err(RuntimeError::Missing { path: p }) };
    }
    let mut searched = vec!["ORT_DYLIB_PATH (unset)".to_string(), format!("{}/libonnxruntime.so*", packaged.display())];
    if let Some(p) = in_dir(packaged) {
        return Ok(p);
    }
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
    pythons.into_iter().find_map(|py| in_dir(&py.join("site-packages/onnxruntime/capi")))
}

/// `dir/libonnxruntime.so*`, the most versioned name first (the wheel ships no
/// plain `.so`; a directory with `.so`, `.so.1` and `.so.1.31.1` links yields
/// the file they point to).
fn in_dir(dir: &Path) -> Option<PathBuf> {
    let mut libs: Vec<PathBuf> = std::fs::read_dir(dir)
        .ok()?
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with("libonnxruntime.so")))
        .collect();
    libs.sort_by_key(|p| std::cmp::Reverse(p.as_os_str().len()));
    libs.into_iter().next()
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

    #[test]
    fn finds_the_versioned_library_in_a_package_dir() {
        let dir = tempfile::tempdir().unwrap();
        for name in ["libonnxruntime.so", "libonnxruntime.so.1.31.1", "libonnxruntime_providers_shared.so", "README"] {
            std::fs::write(dir.path().join(name), b"").unwrap();
        }
        assert_eq!(in_dir(dir.path()), Some(dir.path().join("libonnxruntime.so.1.31.1")));
        assert_eq!(in_dir(&dir.path().join("nothing")), None);
    }

    #[test]
    fn search_order_is_config_env_package_dir_venv() {
        let dir = tempfile::tempdir().unwrap();
        let packaged = dir.path().join("usr/lib/ganomalyd");
        let root = dir.path().join("checkout");
        let capi = root.join(".venv/lib/python3.11/site-packages/onnxruntime/capi");
        std::fs::create_dir_all(&packaged).unwrap();
        std::fs::create_dir_all(&capi).unwrap();
        let roots = vec![dir.path().join("elsewhere"), root.clone()];
        let venv_lib = capi.join("libonnxruntime.so.1.31.1");
        std::fs::write(&venv_lib, b"").unwrap();

        // Only the venv has it.
        assert_eq!(find_in(None, None, &packaged, &roots).unwrap(), venv_lib);
        // The package's library wins over the venv's.
        let pkg_lib = packaged.join("libonnxruntime.so.1.31.1");
        std::fs::write(&pkg_lib, b"").unwrap();
        assert_eq!(find_in(None, None, &packaged, &roots).unwrap(), pkg_lib);
        // ORT_DYLIB_PATH wins over both, and an empty one counts as unset.
        let env_lib = dir.path().join("libonnxruntime.so.custom");
        std::fs::write(&env_lib, b"").unwrap();
        assert_eq!(find_in(None, Some(env_lib.as_os_str()), &packaged, &roots).unwrap(), env_lib);
        assert_eq!(find_in(None, Some("".as_ref()), &packaged, &roots).unwrap(), pkg_lib);
        // The config wins over everything.
        assert_eq!(find_in(Some(&venv_lib), Some(env_lib.as_os_str()), &packaged, &roots).unwrap(), venv_lib);
    }

    #[test]
    fn a_planted_venv_in_the_working_directory_is_not_loaded() {
        // What a daemon (not a unit test) searches: no roots at all.
        let dir = tempfile::tempdir().unwrap();
        let capi = dir.path().join(".venv/lib/python3.11/site-packages/onnxruntime/capi");
        std::fs::create_dir_all(&capi).unwrap();
        std::fs::write(capi.join("libonnxruntime.so.1.31.1"), b"planted").unwrap();
        let err = find_in(None, None, &dir.path().join("no-package"), &[]).unwrap_err().to_string();
        assert!(err.contains("ORT_DYLIB_PATH") && !err.contains(".venv/lib"), "{err}");
        assert_eq!(dev_library(dir.path()), Some(capi.join("libonnxruntime.so.1.31.1")), "the explicit route finds it");
    }

    #[test]
    fn not_found_lists_the_package_dir_before_the_venvs() {
        let dir = tempfile::tempdir().unwrap();
        let packaged = dir.path().join("pkg");
        let roots = vec![dir.path().join("a")];
        let err = find_in(None, None, &packaged, &roots).unwrap_err().to_string();
        let pkg = err.find(&format!("{}/libonnxruntime.so*", packaged.display())).expect(&err);
        let venv = err.find(&dir.path().join("a/.venv").display().to_string()).expect(&err);
        assert!(pkg < venv, "{err}");
    }
}
