//! Output directories that never lose a user's files.
//!
//! A result is written into a staging directory beside its destination and moved into place
//! at the end, so a failed run leaves the destination as it was. A destination that exists and
//! holds files is refused unless the caller allows overwriting, and then only the files this
//! project writes ([`is_own_file`]) are replaced: anything else in the directory stays.
//! Files and directories are fsync'd before the final renames.

use std::fs::File;
use std::io::ErrorKind;
use std::path::{Path, PathBuf};

use crate::error::{ModelError, Result};

/// Whether `name` is a file this project writes into a checkpoint directory (and so may
/// replace there with `--overwrite`).
pub fn is_own_file(name: &str) -> bool {
    const FIXED: [&str; 6] = [
        "config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "adadim_report.json",
        crate::shards::SINGLE_FILE,
        crate::shards::INDEX_FILE,
    ];
    FIXED.contains(&name) || is_shard_name(name)
}

/// `model-00001-of-00003.safetensors`.
fn is_shard_name(name: &str) -> bool {
    let Some(rest) = name
        .strip_prefix("model-")
        .and_then(|r| r.strip_suffix(".safetensors"))
    else {
        return false;
    };
    match rest.split_once("-of-") {
        Some((k, n)) => [k, n]
            .iter()
            .all(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit())),
        None => false,
    }
}

fn invalid(path: &Path, msg: &str) -> ModelError {
    ModelError::Invalid(format!("{}: {msg}", path.display()))
}

/// Checks, before any work, that a result may go to `dest`: it does not exist, is an empty
/// directory, or (with `overwrite`) is a directory.
pub fn check_destination(dest: &Path, overwrite: bool) -> Result<()> {
    match std::fs::symlink_metadata(dest) {
        Err(e) if e.kind() == ErrorKind::NotFound => Ok(()),
        Err(e) => Err(ModelError::io(dest, e)),
        Ok(m) if !m.is_dir() => Err(invalid(dest, "exists and is not a directory")),
        Ok(_) if overwrite || is_empty_dir(dest)? => Ok(()),
        Ok(_) => Err(invalid(
            dest,
            "the directory is not empty; pass --overwrite to replace the files this tool writes \
             there (other files are kept)",
        )),
    }
}

fn is_empty_dir(dir: &Path) -> Result<bool> {
    let mut entries = std::fs::read_dir(dir).map_err(|e| ModelError::io(dir, e))?;
    Ok(entries.next().is_none())
}

/// fsyncs a file or a directory.
pub fn sync_path(path: &Path) -> Result<()> {
    File::open(path)
        .and_then(|f| f.sync_all())
        .map_err(|e| ModelError::io(path, e))
}

/// A directory being written. Dropped without [`StagingDir::commit`], it is removed, unless it
/// was reopened to resume an interrupted run (an error then must not lose that run's work).
pub struct StagingDir {
    tmp: PathBuf,
    dest: PathBuf,
    overwrite: bool,
    committed: bool,
    keep: bool,
}

/// `<dest><suffix>` beside `dest`.
fn sibling(dest: &Path, suffix: &str) -> Result<PathBuf> {
    let name = dest
        .file_name()
        .ok_or_else(|| invalid(dest, "not a directory name"))?;
    let mut tmp_name = name.to_os_string();
    tmp_name.push(suffix);
    Ok(dest.with_file_name(tmp_name))
}

impl StagingDir {
    /// Checks `dest` ([`check_destination`]) and creates the staging directory
    /// `<dest>.tmp-<pid>` (a stale one of the same process id is this tool's and is replaced).
    pub fn new(dest: &Path, overwrite: bool) -> Result<Self> {
        check_destination(dest, overwrite)?;
        let tmp = sibling(dest, &format!(".tmp-{}", std::process::id()))?;
        if tmp.exists() {
            std::fs::remove_dir_all(&tmp).map_err(|e| ModelError::io(&tmp, e))?;
        }
        std::fs::create_dir_all(&tmp).map_err(|e| ModelError::io(&tmp, e))?;
        Ok(Self {
            tmp,
            dest: dest.to_path_buf(),
            overwrite,
            committed: false,
            keep: false,
        })
    }

    /// The staging directory of a resumable job, `<dest>.adadim-partial`, which outlives an
    /// interrupted process: created when `resume` is false (an existing one is an error, since
    /// it holds an interrupted run), reopened when it is true.
    pub fn resumable(dest: &Path, overwrite: bool, resume: bool) -> Result<Self> {
        check_destination(dest, overwrite)?;
        let tmp = Self::resumable_path(dest)?;
        match (resume, tmp.is_dir()) {
            (true, true) => {}
            (true, false) => {
                return Err(invalid(
                    &tmp,
                    "no interrupted run to resume (the directory does not exist)",
                ));
            }
            (false, true) => {
                return Err(invalid(
                    &tmp,
                    "holds an interrupted run: pass --resume to continue it, or remove the \
                     directory to start over",
                ));
            }
            (false, false) => std::fs::create_dir_all(&tmp).map_err(|e| ModelError::io(&tmp, e))?,
        }
        Ok(Self {
            tmp,
            dest: dest.to_path_buf(),
            overwrite,
            committed: false,
            keep: resume,
        })
    }

    /// Where [`Self::resumable`] stages `dest`.
    pub fn resumable_path(dest: &Path) -> Result<PathBuf> {
        sibling(dest, ".adadim-partial")
    }

    pub fn path(&self) -> &Path {
        &self.tmp
    }

    /// Path of a file inside the staging directory.
    pub fn join(&self, name: &str) -> PathBuf {
        self.tmp.join(name)
    }

    /// fsyncs everything staged and moves it to the destination. A missing or empty destination
    /// is replaced by the staging directory in one rename; otherwise (`overwrite`) each staged
    /// file replaces its namesake, and older files of this tool that the new result does not
    /// have (shards of another count) are removed: no other file is touched.
    pub fn commit(mut self) -> Result<PathBuf> {
        let staged: Vec<String> = std::fs::read_dir(&self.tmp)
            .map_err(|e| ModelError::io(&self.tmp, e))?
            .map(|e| {
                e.map(|e| e.file_name().to_string_lossy().into_owned())
                    .map_err(|err| ModelError::io(&self.tmp, err))
            })
            .collect::<Result<_>>()?;
        for name in &staged {
            sync_path(&self.tmp.join(name))?;
        }
        sync_path(&self.tmp)?;
        check_destination(&self.dest, self.overwrite)?;
        let dest = &self.dest;
        if dest.is_dir() && is_empty_dir(dest)? {
            std::fs::remove_dir(dest).map_err(|e| ModelError::io(dest, e))?;
        }
        if !dest.exists() {
            std::fs::rename(&self.tmp, dest).map_err(|e| ModelError::io(dest, e))?;
        } else {
            for name in &staged {
                let to = dest.join(name);
                std::fs::rename(self.tmp.join(name), &to).map_err(|e| ModelError::io(&to, e))?;
            }
            let stale: Vec<PathBuf> = std::fs::read_dir(dest)
                .map_err(|e| ModelError::io(dest, e))?
                .filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| is_own_file(n) && !staged.contains(n))
                .map(|n| dest.join(n))
                .collect();
            for path in stale {
                std::fs::remove_file(&path).map_err(|e| ModelError::io(&path, e))?;
            }
            std::fs::remove_dir(&self.tmp).map_err(|e| ModelError::io(&self.tmp, e))?;
        }
        sync_path(dest)?;
        if let Some(parent) = dest.parent().filter(|p| !p.as_os_str().is_empty()) {
            sync_path(parent)?;
        }
        self.committed = true;
        Ok(dest.clone())
    }
}

impl Drop for StagingDir {
    fn drop(&mut self) {
        if !self.committed && !self.keep {
            let _ = std::fs::remove_dir_all(&self.tmp);
        }
    }
}

/// Writes `bytes` to `path` through a temporary file in the same directory, fsync'd before the
/// rename.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    use std::io::Write;
    let mut tmp_name = path.file_name().unwrap_or_default().to_os_string();
    tmp_name.push(format!(".tmp-{}", std::process::id()));
    let tmp = path.with_file_name(tmp_name);
    File::create(&tmp)
        .and_then(|mut f| {
            f.write_all(bytes)?;
            f.sync_all()
        })
        .map_err(|e| ModelError::io(&tmp, e))?;
    std::fs::rename(&tmp, path).map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        ModelError::io(path, e)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(path: &Path, text: &str) {
        std::fs::write(path, text).unwrap();
    }

    #[test]
    fn own_files_are_recognised() {
        for name in [
            "config.json",
            "model.safetensors",
            "model.safetensors.index.json",
            "model-00001-of-00002.safetensors",
            "tokenizer.json",
            "tokenizer_config.json",
            "adadim_report.json",
        ] {
            assert!(is_own_file(name), "{name}");
        }
        for name in [
            "notes.txt",
            "model-1-of-x.safetensors",
            "model-.safetensors",
            "README.md",
        ] {
            assert!(!is_own_file(name), "{name}");
        }
    }

    #[test]
    fn a_non_empty_destination_is_refused_without_overwrite() {
        let root = tempfile::tempdir().unwrap();
        let dest = root.path().join("out");
        std::fs::create_dir(&dest).unwrap();
        write(&dest.join("mine.txt"), "keep");
        let e = StagingDir::new(&dest, false).err().unwrap().to_string();
        assert!(e.contains("not empty") && e.contains("--overwrite"), "{e}");
        assert_eq!(
            std::fs::read_to_string(dest.join("mine.txt")).unwrap(),
            "keep"
        );
        // An empty directory and a missing one are fine.
        let empty = root.path().join("empty");
        std::fs::create_dir(&empty).unwrap();
        let s = StagingDir::new(&empty, false).unwrap();
        write(&s.join("config.json"), "{}");
        s.commit().unwrap();
        assert!(empty.join("config.json").is_file());
        // A file is not a directory.
        write(&root.path().join("file"), "x");
        assert!(StagingDir::new(&root.path().join("file"), true).is_err());
    }

    #[test]
    fn overwrite_replaces_only_own_files() {
        let root = tempfile::tempdir().unwrap();
        let dest = root.path().join("out");
        std::fs::create_dir(&dest).unwrap();
        write(&dest.join("mine.txt"), "keep");
        write(&dest.join("config.json"), "old");
        write(&dest.join("model-00001-of-00002.safetensors"), "old shard");
        write(&dest.join("model-00002-of-00002.safetensors"), "old shard");
        let s = StagingDir::new(&dest, true).unwrap();
        write(&s.join("config.json"), "new");
        write(&s.join("model.safetensors"), "new weights");
        let staged = s.path().to_path_buf();
        s.commit().unwrap();
        let mut names: Vec<String> = std::fs::read_dir(&dest)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        assert_eq!(names, ["config.json", "mine.txt", "model.safetensors"]);
        assert_eq!(
            std::fs::read_to_string(dest.join("config.json")).unwrap(),
            "new"
        );
        assert_eq!(
            std::fs::read_to_string(dest.join("mine.txt")).unwrap(),
            "keep"
        );
        assert!(!staged.exists());
    }

    #[test]
    fn a_failed_run_leaves_the_destination_as_it_was() {
        let root = tempfile::tempdir().unwrap();
        let dest = root.path().join("out");
        std::fs::create_dir(&dest).unwrap();
        write(&dest.join("config.json"), "old");
        {
            let s = StagingDir::new(&dest, true).unwrap();
            write(&s.join("config.json"), "new");
            // dropped without commit
        }
        assert_eq!(
            std::fs::read_to_string(dest.join("config.json")).unwrap(),
            "old"
        );
        let names: Vec<_> = std::fs::read_dir(root.path()).unwrap().collect();
        assert_eq!(names.len(), 1, "the staging directory is gone");
    }

    #[test]
    fn resumable_staging_needs_resume_to_reopen() {
        let root = tempfile::tempdir().unwrap();
        let dest = root.path().join("out");
        let partial = StagingDir::resumable_path(&dest).unwrap();
        assert!(
            StagingDir::resumable(&dest, false, true)
                .err()
                .unwrap()
                .to_string()
                .contains("no interrupted run")
        );
        let s = StagingDir::resumable(&dest, false, false).unwrap();
        write(&s.join("progress"), "3");
        // An interruption: the process ends without dropping anything.
        std::mem::forget(s);
        let e = StagingDir::resumable(&dest, false, false)
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("--resume"), "{e}");
        // A resumed run that fails keeps the interrupted run's work.
        drop(StagingDir::resumable(&dest, false, true).unwrap());
        let s = StagingDir::resumable(&dest, false, true).unwrap();
        assert_eq!(std::fs::read_to_string(s.join("progress")).unwrap(), "3");
        std::fs::remove_file(s.join("progress")).unwrap();
        write(&s.join("config.json"), "{}");
        s.commit().unwrap();
        assert!(dest.join("config.json").is_file() && !partial.exists());
    }
}
