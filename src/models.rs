//! Model files are checked against the set-up's manifest (`scripts/assets.sha256`, compiled in)
//! before anything loads them: a corrupt or swapped file stops the server with a clear error.

use std::io::Read;
use std::path::Path;

use sha2::{Digest, Sha256};

const MANIFEST: &str = include_str!("../scripts/assets.sha256");

/// A model file that failed its check.
#[derive(Debug, thiserror::Error)]
pub enum ModelFileError {
    /// Missing or unreadable.
    #[error("{path}: {source}; run `make setup` (or scripts/setup.sh) to install it")]
    Read {
        /// File.
        path: String,
        /// I/O error.
        source: std::io::Error,
    },
    /// Present but not the file the manifest names.
    #[error("{path}: sha256 {actual} does not match the manifest ({expected}); delete it and run `make setup`")]
    Mismatch {
        /// File.
        path: String,
        /// From the manifest.
        expected: String,
        /// Of the file.
        actual: String,
    },
}

/// The manifest's sha256 for a file whose path ends with `suffix` (e.g. `silero_vad.onnx`).
fn expected_for(suffix: &str) -> Option<&'static str> {
    MANIFEST.lines().find_map(|line| {
        let line = line.trim();
        if line.starts_with('#') {
            return None;
        }
        let (hash, path) = line.split_once(char::is_whitespace)?;
        let path = path.trim();
        (path == suffix || path.ends_with(&format!("/{suffix}"))).then_some(hash)
    })
}

/// Hashes `path` and compares it with the manifest entry for its name (relative to the models
/// folder when it is inside it). Files the manifest does not list (an operator's own models)
/// are accepted with a warning. Returns whether the file was verified.
pub fn verify(path: &Path, models_dir: &Path) -> Result<bool, ModelFileError> {
    let shown = path.display().to_string();
    let key = path
        .strip_prefix(models_dir)
        .ok()
        .map(|p| p.to_string_lossy().to_string())
        .or_else(|| path.file_name().map(|n| n.to_string_lossy().to_string()))
        .unwrap_or_default();
    let mut file = std::fs::File::open(path).map_err(|source| ModelFileError::Read {
        path: shown.clone(),
        source,
    })?;
    let Some(expected) = expected_for(&key) else {
        tracing::warn!(file = %shown, "not in scripts/assets.sha256: loaded without a checksum");
        return Ok(false);
    };
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut buf).map_err(|source| ModelFileError::Read {
            path: shown.clone(),
            source,
        })?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    let actual: String = hasher
        .finalize()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    if actual != expected {
        return Err(ModelFileError::Mismatch {
            path: shown,
            expected: expected.to_string(),
            actual,
        });
    }
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn manifest_names_the_vad_model_and_runtime() {
        assert!(expected_for("silero_vad.onnx").is_some());
        assert!(expected_for("onnxruntime/libonnxruntime.so.1.31.1").is_some());
        assert!(expected_for("nope.onnx").is_none());
    }

    #[test]
    fn a_file_that_differs_from_the_manifest_is_refused() {
        let dir = std::env::temp_dir().join(format!("xz-models-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("silero_vad.onnx");
        std::fs::write(&f, b"not a model").unwrap();
        let err = verify(&f, &dir).unwrap_err().to_string();
        assert!(err.contains("does not match"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
