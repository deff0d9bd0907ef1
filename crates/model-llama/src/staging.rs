//! All-or-nothing output: files are written into a staging path beside the destination and
//! renamed into place at the end, so an interrupted or failed run leaves nothing half-written.

use std::path::{Path, PathBuf};

use crate::error::{ModelError, Result};

/// A directory being written. Dropped without [`StagingDir::commit`], it is removed.
pub struct StagingDir {
    tmp: PathBuf,
    dest: PathBuf,
    committed: bool,
}

impl StagingDir {
    /// Creates `<dest>.tmp-<pid>` (replacing a stale one).
    pub fn new(dest: &Path) -> Result<Self> {
        let name = dest.file_name().ok_or_else(|| {
            ModelError::Invalid(format!("{}: not a directory name", dest.display()))
        })?;
        let mut tmp_name = name.to_os_string();
        tmp_name.push(format!(".tmp-{}", std::process::id()));
        let tmp = dest.with_file_name(tmp_name);
        if tmp.exists() {
            std::fs::remove_dir_all(&tmp).map_err(|e| ModelError::io(&tmp, e))?;
        }
        std::fs::create_dir_all(&tmp).map_err(|e| ModelError::io(&tmp, e))?;
        Ok(Self {
            tmp,
            dest: dest.to_path_buf(),
            committed: false,
        })
    }

    pub fn path(&self) -> &Path {
        &self.tmp
    }

    /// Path of a file inside the staging directory.
    pub fn join(&self, name: &str) -> PathBuf {
        self.tmp.join(name)
    }

    /// Moves the finished directory to its destination, replacing an older one.
    pub fn commit(mut self) -> Result<PathBuf> {
        if self.dest.exists() {
            std::fs::remove_dir_all(&self.dest).map_err(|e| ModelError::io(&self.dest, e))?;
        }
        std::fs::rename(&self.tmp, &self.dest).map_err(|e| ModelError::io(&self.dest, e))?;
        self.committed = true;
        Ok(self.dest.clone())
    }
}

impl Drop for StagingDir {
    fn drop(&mut self) {
        if !self.committed {
            let _ = std::fs::remove_dir_all(&self.tmp);
        }
    }
}

/// Writes `bytes` to `path` through a temporary file in the same directory.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let mut tmp_name = path.file_name().unwrap_or_default().to_os_string();
    tmp_name.push(format!(".tmp-{}", std::process::id()));
    let tmp = path.with_file_name(tmp_name);
    std::fs::write(&tmp, bytes).map_err(|e| ModelError::io(&tmp, e))?;
    std::fs::rename(&tmp, path).map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        ModelError::io(path, e)
    })
}
