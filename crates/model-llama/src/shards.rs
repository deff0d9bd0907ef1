//! Streaming, resumable writer of Hugging Face style sharded safetensors checkpoints.
//!
//! Tensors arrive one at a time and only the one being added is in memory. A safetensors header
//! lists every tensor of its file, so it can only be written once a shard's tensor list is
//! complete: the open shard's tensor bytes go to a data part file (`shard-NNNNN.part`), and when
//! the shard closes, its file (`shard-NNNNN.closed`) is written as header + part, and the part is
//! removed. [`ShardWriter::finish`] gives the closed shards their Hugging Face names, which need
//! the shard count.
//!
//! [`ShardWriter::checkpoint`] makes everything added so far durable and returns a
//! [`ShardState`]; after a crash, [`ShardWriter::resume`] from that state discards whatever was
//! added later. Headers are built from sorted maps, so the same sequence of tensors always gives
//! the same bytes, whether or not the run was interrupted and resumed.

use std::collections::{BTreeMap, HashSet};
use std::fs::{File, OpenOptions};
use std::io::{BufWriter, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use safetensors::Dtype;
use serde::{Deserialize, Serialize};

use crate::error::{ModelError, Result};

/// The file of a checkpoint that fits in one shard.
pub const SINGLE_FILE: &str = "model.safetensors";
/// The index of a checkpoint of several shards.
pub const INDEX_FILE: &str = "model.safetensors.index.json";

const METADATA_KEY: &str = "__metadata__";
/// The safetensors reader refuses larger headers.
const MAX_HEADER_BYTES: usize = 100_000_000;
/// Many small tensors (norms, biases) would otherwise cost a system call each.
const PART_BUFFER_BYTES: usize = 1 << 20;

/// One tensor of a shard, as its header lists it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TensorEntry {
    pub name: String,
    pub dtype: Dtype,
    pub shape: Vec<usize>,
    /// `[start, end)` of the tensor's bytes in its shard's data section.
    pub data_offsets: [u64; 2],
}

/// The tensors of one shard, in the order they were added, and its `__metadata__`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShardContents {
    pub tensors: Vec<TensorEntry>,
    pub metadata: BTreeMap<String, String>,
}

impl ShardContents {
    /// An empty shard; every shard says `"format": "pt"`, as the files Hugging Face writes do.
    fn new() -> Self {
        Self {
            tensors: Vec::new(),
            metadata: BTreeMap::from([("format".to_string(), "pt".to_string())]),
        }
    }

    /// Bytes of tensor data.
    pub fn data_len(&self) -> u64 {
        self.tensors.last().map_or(0, |t| t.data_offsets[1])
    }
}

/// A closed shard: its (temporary) file name in the writer's directory and its contents.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClosedShard {
    pub file: String,
    #[serde(flatten)]
    pub contents: ShardContents,
}

/// Everything a [`ShardWriter`] needs to carry on after an interruption: the closed shards and
/// the open shard's tensors. It serializes (e.g. to JSON) so it can be stored beside the files.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ShardState {
    max_shard_bytes: u64,
    closed: Vec<ClosedShard>,
    open: ShardContents,
}

impl ShardState {
    fn empty(max_shard_bytes: u64) -> Self {
        Self {
            max_shard_bytes,
            closed: Vec::new(),
            open: ShardContents::new(),
        }
    }

    /// The shards closed so far.
    pub fn closed(&self) -> &[ClosedShard] {
        &self.closed
    }

    /// The shard being filled.
    pub fn open(&self) -> &ShardContents {
        &self.open
    }

    /// Every tensor written, in the order it was added.
    pub fn tensors(&self) -> impl Iterator<Item = &TensorEntry> {
        self.closed
            .iter()
            .flat_map(|s| &s.contents.tensors)
            .chain(&self.open.tensors)
    }

    /// Bytes of tensor data written, headers excluded.
    pub fn data_bytes(&self) -> u64 {
        self.closed
            .iter()
            .map(|s| s.contents.data_len())
            .chain([self.open.data_len()])
            .sum()
    }
}

/// Writes a sharded safetensors checkpoint into a directory, tensor by tensor; see the module
/// documentation. Dropping it without [`ShardWriter::finish`] leaves its temporary files for a
/// [`ShardWriter::resume`].
pub struct ShardWriter {
    dir: PathBuf,
    state: ShardState,
    /// The open shard's data part.
    part: BufWriter<File>,
    names: HashSet<String>,
    /// Set when a write failed half-way: the files no longer match the state.
    failed: bool,
}

fn part_name(shard: usize) -> String {
    format!("shard-{shard:05}.part")
}

fn closed_name(shard: usize) -> String {
    format!("shard-{shard:05}.closed")
}

/// `shard-NNNNN.<ext>` → `NNNNN`.
fn temp_shard_number(file_name: &str, ext: &str) -> Option<usize> {
    let digits = file_name.strip_prefix("shard-")?.strip_suffix(ext)?;
    digits.strip_suffix('.')?.parse().ok()
}

/// The shard's header: its length as u64 LE, then JSON with sorted keys, padded with spaces
/// to a multiple of 8 bytes as the safetensors crate does.
fn header_bytes(path: &Path, contents: &ShardContents) -> Result<Vec<u8>> {
    #[derive(Serialize)]
    #[serde(untagged)]
    enum Entry<'a> {
        Metadata(&'a BTreeMap<String, String>),
        Tensor {
            dtype: Dtype,
            shape: &'a [usize],
            data_offsets: [u64; 2],
        },
    }
    let mut map = BTreeMap::new();
    map.insert(METADATA_KEY, Entry::Metadata(&contents.metadata));
    for t in &contents.tensors {
        map.insert(
            t.name.as_str(),
            Entry::Tensor {
                dtype: t.dtype,
                shape: &t.shape,
                data_offsets: t.data_offsets,
            },
        );
    }
    let mut json = serde_json::to_vec(&map).expect("a header of strings and numbers serializes");
    json.resize(json.len().next_multiple_of(8), b' ');
    if json.len() > MAX_HEADER_BYTES {
        return Err(ModelError::Invalid(format!(
            "{}: safetensors header of {} bytes is over the format's limit of {MAX_HEADER_BYTES}",
            path.display(),
            json.len()
        )));
    }
    let mut out = Vec::with_capacity(8 + json.len());
    out.extend_from_slice(&(json.len() as u64).to_le_bytes());
    out.extend_from_slice(&json);
    Ok(out)
}

/// Makes creations, renames and removals in `dir` durable.
fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| ModelError::io(dir, e))
}

fn create_part(path: &Path) -> Result<BufWriter<File>> {
    let file = File::create(path).map_err(|e| ModelError::io(path, e))?;
    Ok(BufWriter::with_capacity(PART_BUFFER_BYTES, file))
}

/// Bytes of a tensor of `dtype` and `shape`, `None` on overflow or a partial byte.
fn tensor_bytes(dtype: Dtype, shape: &[usize]) -> Option<usize> {
    let bits = shape
        .iter()
        .try_fold(1usize, |n, &d| n.checked_mul(d))?
        .checked_mul(dtype.bitsize())?;
    bits.is_multiple_of(8).then_some(bits / 8)
}

impl ShardWriter {
    /// Starts writing into `dir`, the caller's (existing) staging directory. Shards close once
    /// they would grow past `max_shard_bytes` of tensor data. Temporary files of an earlier writer
    /// in `dir` (`shard-NNNNN.part` / `.closed`) are removed; nothing else in `dir` is touched.
    pub fn new(dir: &Path, max_shard_bytes: u64) -> Result<Self> {
        Self::resume(dir, max_shard_bytes, &ShardState::empty(max_shard_bytes))
    }

    /// The directory written into.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Appends one tensor (little-endian bytes); tensors keep the order they are added in. If the
    /// open shard holds tensors and this one would take it past the size limit, the open shard is
    /// closed first, so a tensor larger than the limit gets a shard of its own. `metadata`
    /// (key → value) goes into the `__metadata__` of the shard that holds the tensor; a key the
    /// shard already has with another value (`format` is `pt`) is an error.
    pub fn add(
        &mut self,
        name: &str,
        dtype: Dtype,
        shape: &[usize],
        bytes: &[u8],
        metadata: &[(String, String)],
    ) -> Result<()> {
        self.check_usable()?;
        let invalid = |msg: String| ModelError::Invalid(format!("{}: {msg}", self.dir.display()));
        if name.is_empty() || name == METADATA_KEY {
            return Err(invalid(format!("`{name}` is not a valid tensor name")));
        }
        if self.names.contains(name) {
            return Err(invalid(format!("tensor `{name}` was already written")));
        }
        if tensor_bytes(dtype, shape) != Some(bytes.len()) {
            return Err(invalid(format!(
                "tensor `{name}`: {} bytes do not make a {dtype:?} tensor of shape {shape:?}",
                bytes.len()
            )));
        }
        let len = bytes.len() as u64;
        let open_len = self.state.open.data_len();
        let close_first = !self.state.open.tensors.is_empty()
            && open_len.saturating_add(len) > self.state.max_shard_bytes;

        // Validated against the shard that will hold the tensor before anything is written, so
        // that a rejected call leaves the writer as it was.
        let mut merged = if close_first {
            ShardContents::new().metadata
        } else {
            self.state.open.metadata.clone()
        };
        for (key, value) in metadata {
            if let Some(old) = merged.insert(key.clone(), value.clone())
                && old != *value
            {
                return Err(invalid(format!(
                    "tensor `{name}`: metadata `{key}` = `{value}` conflicts with `{old}` in its shard"
                )));
            }
        }

        let result = (|| {
            if close_first {
                self.close_open(true)?;
            }
            let start = self.state.open.data_len();
            self.part.write_all(bytes).map_err(|e| {
                ModelError::io(self.dir.join(part_name(self.state.closed.len() + 1)), e)
            })?;
            self.state.open.tensors.push(TensorEntry {
                name: name.to_string(),
                dtype,
                shape: shape.to_vec(),
                data_offsets: [start, start + len],
            });
            self.state.open.metadata = merged;
            self.names.insert(name.to_string());
            Ok(())
        })();
        self.failed = result.is_err();
        result
    }

    /// Flushes and fsyncs everything written so far and returns the state to resume from.
    pub fn checkpoint(&mut self) -> Result<ShardState> {
        self.check_usable()?;
        let path = self.open_part_path();
        self.part
            .flush()
            .and_then(|()| self.part.get_ref().sync_all())
            .map_err(|e| ModelError::io(&path, e))?;
        sync_dir(&self.dir)?;
        Ok(self.state.clone())
    }

    /// Reopens `dir` after an interruption, as it was when `state` was taken: tensors added
    /// later are discarded (their files truncated or removed), earlier ones are kept byte for
    /// byte. `max_shard_bytes` must be the one the state was written with, since the shard
    /// boundaries depend on it.
    pub fn resume(dir: &Path, max_shard_bytes: u64, state: &ShardState) -> Result<Self> {
        if !dir.is_dir() {
            return Err(ModelError::io(
                dir,
                std::io::Error::new(std::io::ErrorKind::NotFound, "not a directory"),
            ));
        }
        if state.max_shard_bytes != max_shard_bytes {
            return Err(ModelError::Invalid(format!(
                "{}: resuming with a shard limit of {max_shard_bytes} bytes, the checkpoint was \
                 written with {}",
                dir.display(),
                state.max_shard_bytes
            )));
        }
        let names = check_state(dir, state)?;
        for (i, shard) in state.closed.iter().enumerate() {
            check_closed_shard(&dir.join(closed_name(i + 1)), &shard.contents)?;
        }
        let open_shard = state.closed.len() + 1;
        let part_path = dir.join(part_name(open_shard));
        let mut part = restore_part(dir, open_shard, state.open.data_len())?;
        part.seek(SeekFrom::End(0))
            .map_err(|e| ModelError::io(&part_path, e))?;
        remove_later_files(dir, open_shard)?;
        sync_dir(dir)?;
        tracing::debug!(
            "{}: resuming with {} tensors written, {} shards closed",
            dir.display(),
            names.len(),
            state.closed.len()
        );
        Ok(Self {
            dir: dir.to_path_buf(),
            state: state.clone(),
            part: BufWriter::with_capacity(PART_BUFFER_BYTES, part),
            names,
            failed: false,
        })
    }

    /// Closes the open shard and names the files as Hugging Face does: one shard is
    /// `model.safetensors`; several are `model-00001-of-0000N.safetensors`... plus
    /// `model.safetensors.index.json` (`total_size` = bytes of tensor data, `weight_map` =
    /// tensor → file). Files and directory are fsynced. Returns the names of the files written,
    /// shards first, then the index if any. An interrupted `finish` cannot be resumed.
    pub fn finish(mut self) -> Result<Vec<String>> {
        self.check_usable()?;
        if !self.state.open.tensors.is_empty() || self.state.closed.is_empty() {
            self.close_open(false)?;
        }
        let n = self.state.closed.len();
        let finals: Vec<String> = if n == 1 {
            vec![SINGLE_FILE.to_string()]
        } else {
            (1..=n)
                .map(|i| format!("model-{i:05}-of-{n:05}.safetensors"))
                .collect()
        };
        for (shard, file) in self.state.closed.iter().zip(&finals) {
            let from = self.dir.join(&shard.file);
            let to = self.dir.join(file);
            std::fs::rename(&from, &to).map_err(|e| ModelError::io(&to, e))?;
        }
        let mut files = finals.clone();
        if n > 1 {
            #[derive(Serialize)]
            struct IndexMetadata {
                total_size: u64,
            }
            #[derive(Serialize)]
            struct Index<'a> {
                metadata: IndexMetadata,
                weight_map: BTreeMap<&'a str, &'a str>,
            }
            let weight_map = self
                .state
                .closed
                .iter()
                .zip(&finals)
                .flat_map(|(shard, file)| {
                    shard
                        .contents
                        .tensors
                        .iter()
                        .map(move |t| (t.name.as_str(), file.as_str()))
                })
                .collect();
            let index = Index {
                metadata: IndexMetadata {
                    total_size: self.state.data_bytes(),
                },
                weight_map,
            };
            let mut json = serde_json::to_vec_pretty(&index).expect("the index serializes");
            json.push(b'\n');
            let path = self.dir.join(INDEX_FILE);
            File::create(&path)
                .and_then(|mut f| {
                    f.write_all(&json)?;
                    f.sync_all()
                })
                .map_err(|e| ModelError::io(&path, e))?;
            files.push(INDEX_FILE.to_string());
        }
        sync_dir(&self.dir)?;
        Ok(files)
    }

    fn check_usable(&self) -> Result<()> {
        if self.failed {
            return Err(ModelError::Invalid(format!(
                "{}: an earlier write failed; resume from the last checkpoint",
                self.dir.display()
            )));
        }
        Ok(())
    }

    fn open_part_path(&self) -> PathBuf {
        self.dir.join(part_name(self.state.closed.len() + 1))
    }

    /// Writes the open shard's file (header + data part) and, if `reopen`, starts the next
    /// shard. The part is removed only once the shard file is durable, so that a crash at any
    /// point leaves one of the two complete for [`ShardWriter::resume`].
    fn close_open(&mut self, reopen: bool) -> Result<()> {
        let shard = self.state.closed.len() + 1;
        let part_path = self.dir.join(part_name(shard));
        let closed_path = self.dir.join(closed_name(shard));
        self.part
            .flush()
            .map_err(|e| ModelError::io(&part_path, e))?;
        let header = header_bytes(&closed_path, &self.state.open)?;
        let data_len = self.state.open.data_len();
        let mut part = File::open(&part_path).map_err(|e| ModelError::io(&part_path, e))?;
        let mut out = File::create(&closed_path).map_err(|e| ModelError::io(&closed_path, e))?;
        out.write_all(&header)
            .map_err(|e| ModelError::io(&closed_path, e))?;
        let copied =
            std::io::copy(&mut part, &mut out).map_err(|e| ModelError::io(&closed_path, e))?;
        if copied != data_len {
            return Err(ModelError::malformed(
                &part_path,
                format!("holds {copied} bytes, the shard's tensors {data_len}"),
            ));
        }
        out.sync_all()
            .map_err(|e| ModelError::io(&closed_path, e))?;
        sync_dir(&self.dir)?;

        let contents = std::mem::replace(&mut self.state.open, ShardContents::new());
        tracing::debug!(
            "{}: shard {shard} closed ({} tensors, {data_len} bytes)",
            self.dir.display(),
            contents.tensors.len()
        );
        self.state.closed.push(ClosedShard {
            file: closed_name(shard),
            contents,
        });
        if reopen {
            // The old part's handle is dropped before its file is removed.
            self.part = create_part(&self.dir.join(part_name(shard + 1)))?;
        }
        std::fs::remove_file(&part_path).map_err(|e| ModelError::io(&part_path, e))
    }
}

/// Checks that `state` is self-consistent (file names, contiguous offsets matching the sizes,
/// unique tensor names) and returns its tensor names.
fn check_state(dir: &Path, state: &ShardState) -> Result<HashSet<String>> {
    let bad = |msg: String| {
        ModelError::Invalid(format!(
            "{}: inconsistent shard state: {msg}",
            dir.display()
        ))
    };
    for (i, shard) in state.closed.iter().enumerate() {
        if shard.file != closed_name(i + 1) {
            return Err(bad(format!(
                "closed shard {} is named `{}`",
                i + 1,
                shard.file
            )));
        }
    }
    let mut names = HashSet::new();
    let shards = state
        .closed
        .iter()
        .map(|s| &s.contents)
        .chain([&state.open]);
    for contents in shards {
        let mut end = 0;
        for t in &contents.tensors {
            let expected = tensor_bytes(t.dtype, &t.shape).map(|b| b as u64);
            if t.data_offsets[0] != end || t.data_offsets[1].checked_sub(end) != expected {
                return Err(bad(format!("tensor `{}` has bad offsets", t.name)));
            }
            if !names.insert(t.name.clone()) {
                return Err(bad(format!("tensor `{}` appears twice", t.name)));
            }
            end = t.data_offsets[1];
        }
    }
    Ok(names)
}

/// Checks that the closed shard file is the one the state describes: same header, full length.
fn check_closed_shard(path: &Path, contents: &ShardContents) -> Result<()> {
    let header = header_bytes(path, contents)?;
    let mut file = File::open(path).map_err(|e| ModelError::io(path, e))?;
    let len = file.metadata().map_err(|e| ModelError::io(path, e))?.len();
    let mut on_disk = vec![0; header.len()];
    let same_header = file.read_exact(&mut on_disk).is_ok() && on_disk == header;
    if !same_header || len != header.len() as u64 + contents.data_len() {
        return Err(ModelError::malformed(
            path,
            "the shard does not match the checkpoint being resumed",
        ));
    }
    Ok(())
}

/// The open shard's data part, cut back to the `len` bytes the checkpoint had. If the shard was
/// closed after the checkpoint (its part removed), the bytes are taken back from its file.
fn restore_part(dir: &Path, shard: usize, len: u64) -> Result<File> {
    let part_path = dir.join(part_name(shard));
    let closed_path = dir.join(closed_name(shard));
    let open_rw = |path: &Path, create: bool| {
        OpenOptions::new()
            .read(true)
            .write(true)
            .create(create)
            .truncate(false)
            .open(path)
            .map_err(|e| ModelError::io(path, e))
    };
    if part_path.is_file() {
        let part = open_rw(&part_path, false)?;
        let have = part
            .metadata()
            .map_err(|e| ModelError::io(&part_path, e))?
            .len();
        if have < len {
            return Err(ModelError::malformed(
                &part_path,
                format!("holds {have} bytes, the checkpoint being resumed wrote {len}"),
            ));
        }
        part.set_len(len)
            .and_then(|()| part.sync_all())
            .map_err(|e| ModelError::io(&part_path, e))?;
        return Ok(part);
    }
    if len == 0 {
        return open_rw(&part_path, true);
    }
    if !closed_path.is_file() {
        return Err(ModelError::io(
            &part_path,
            std::io::Error::new(
                std::io::ErrorKind::NotFound,
                "the data of the checkpoint's open shard is gone (no part and no closed shard)",
            ),
        ));
    }
    let mut closed = File::open(&closed_path).map_err(|e| ModelError::io(&closed_path, e))?;
    let mut prefix = [0; 8];
    closed
        .read_exact(&mut prefix)
        .map_err(|e| ModelError::io(&closed_path, e))?;
    let header_len = u64::from_le_bytes(prefix);
    let file_len = closed
        .metadata()
        .map_err(|e| ModelError::io(&closed_path, e))?
        .len();
    if header_len
        .checked_add(8 + len)
        .is_none_or(|end| end > file_len)
    {
        return Err(ModelError::malformed(
            &closed_path,
            "too short to hold the data of the checkpoint being resumed",
        ));
    }
    let mut part = open_rw(&part_path, true)?;
    closed
        .seek(SeekFrom::Start(8 + header_len))
        .map_err(|e| ModelError::io(&closed_path, e))?;
    let copied = std::io::copy(&mut (&mut closed).take(len), &mut part)
        .map_err(|e| ModelError::io(&part_path, e))?;
    if copied != len {
        return Err(ModelError::malformed(
            &closed_path,
            "shorter than it claims",
        ));
    }
    part.sync_all().map_err(|e| ModelError::io(&part_path, e))?;
    Ok(part)
}

/// Removes the temporary files of shards after `open_shard` and the closed file of
/// `open_shard` itself: all written after the checkpoint being resumed.
fn remove_later_files(dir: &Path, open_shard: usize) -> Result<()> {
    let entries = std::fs::read_dir(dir).map_err(|e| ModelError::io(dir, e))?;
    for entry in entries {
        let entry = entry.map_err(|e| ModelError::io(dir, e))?;
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        let stale = match (
            temp_shard_number(name, "part"),
            temp_shard_number(name, "closed"),
        ) {
            (Some(k), _) => k != open_shard,
            (_, Some(k)) => k >= open_shard,
            _ => false,
        };
        if stale {
            let path = entry.path();
            std::fs::remove_file(&path).map_err(|e| ModelError::io(&path, e))?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hf_dir::SafetensorsDir;
    use proptest::prelude::*;
    use safetensors::SafeTensors;

    /// A tensor to add: name, dtype, shape, bytes, metadata.
    type Item = (String, Dtype, Vec<usize>, Vec<u8>, Vec<(String, String)>);

    /// `count` tensors of `sizes[i]` f16 values, with distinct recognisable bytes.
    fn items(sizes: &[usize]) -> Vec<Item> {
        sizes
            .iter()
            .enumerate()
            .map(|(i, &n)| {
                let bytes = (0..2 * n).map(|j| (i * 31 + j * 7) as u8).collect();
                (format!("t.{i:03}"), Dtype::F16, vec![n], bytes, Vec::new())
            })
            .collect()
    }

    fn add_all(w: &mut ShardWriter, items: &[Item]) {
        for (name, dtype, shape, bytes, meta) in items {
            w.add(name, *dtype, shape, bytes, meta).unwrap();
        }
    }

    fn write_all(dir: &Path, max: u64, items: &[Item]) -> Vec<String> {
        let mut w = ShardWriter::new(dir, max).unwrap();
        add_all(&mut w, items);
        w.finish().unwrap()
    }

    /// Every file of `dir`, by name.
    fn snapshot(dir: &Path) -> BTreeMap<String, Vec<u8>> {
        std::fs::read_dir(dir)
            .unwrap()
            .map(|e| {
                let e = e.unwrap();
                (
                    e.file_name().into_string().unwrap(),
                    std::fs::read(e.path()).unwrap(),
                )
            })
            .collect()
    }

    /// tensor name → (file, metadata of that file), through the safetensors crate.
    fn read_back(dir: &Path, files: &[String], items: &[Item]) -> BTreeMap<String, String> {
        let mut where_is = BTreeMap::new();
        for file in files.iter().filter(|f| f.ends_with(".safetensors")) {
            let bytes = std::fs::read(dir.join(file)).unwrap();
            let st = SafeTensors::deserialize(&bytes).unwrap();
            let (_, meta) = SafeTensors::read_metadata(&bytes).unwrap();
            assert_eq!(
                meta.metadata().as_ref().unwrap().get("format").unwrap(),
                "pt"
            );
            for name in st.names() {
                where_is.insert(name.to_string(), file.clone());
            }
            // The data section holds the tensors in the order added. Offsets are compared, not
            // `offset_keys()`, whose order among empty tensors (equal offsets) is arbitrary.
            let mut positions: Vec<usize> = st
                .names()
                .iter()
                .map(|n| items.iter().position(|it| it.0 == *n).unwrap())
                .collect();
            positions.sort();
            let mut end = 0;
            for &i in &positions {
                let offsets = meta.info(&items[i].0).unwrap().data_offsets;
                assert_eq!(offsets.0, end, "{file}: `{}` out of order", items[i].0);
                end = offsets.1;
            }
            for i in positions {
                let (name, dtype, shape, data, _) = &items[i];
                let view = st.tensor(name).unwrap();
                assert_eq!(view.dtype(), *dtype);
                assert_eq!(view.shape(), shape.as_slice());
                assert_eq!(view.data(), data.as_slice(), "{name}");
            }
        }
        assert_eq!(where_is.len(), items.len());
        where_is
    }

    /// A `config.json` so that `SafetensorsDir` opens the directory.
    fn write_config(dir: &Path) {
        let config = crate::LlamaConfig {
            hidden_size: 8,
            intermediate_size: 16,
            num_attention_heads: 2,
            num_key_value_heads: 2,
            num_hidden_layers: 1,
            rms_norm_eps: 1e-5,
            rope_theta: 10_000.0,
            rope_scaling: None,
            max_position_embeddings: 64,
            vocab_size: 32,
            tie_word_embeddings: true,
            bos_token_id: None,
            eos_token_id: None,
        };
        std::fs::write(
            dir.join("config.json"),
            serde_json::to_vec(&config.to_hf_json()).unwrap(),
        )
        .unwrap();
    }

    fn check_with_hf_reader(dir: &Path, items: &[Item]) {
        write_config(dir);
        let st = SafetensorsDir::open(dir).unwrap();
        let mut expected: Vec<String> = items.iter().map(|it| it.0.clone()).collect();
        expected.sort();
        assert_eq!(st.names(), expected);
        for (name, dtype, shape, data, _) in items {
            let raw = st.raw(name).unwrap();
            assert_eq!(
                (raw.dtype, &raw.shape, raw.data),
                (*dtype, shape, &data[..])
            );
        }
    }

    #[test]
    fn single_shard_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let mut items = items(&[3, 0, 0, 17, 1]);
        // Other dtypes, and a 2-d shape.
        items.push((
            "w.f32".into(),
            Dtype::F32,
            vec![2, 3],
            (0..24).collect(),
            Vec::new(),
        ));
        items.push(("w.u8".into(), Dtype::U8, vec![5], vec![9; 5], Vec::new()));
        let files = write_all(dir.path(), 1 << 20, &items);
        assert_eq!(files, vec![SINGLE_FILE.to_string()]);
        let on_disk: Vec<String> = snapshot(dir.path()).into_keys().collect();
        assert_eq!(on_disk, files, "temporary files are gone");

        let bytes = std::fs::read(dir.path().join(SINGLE_FILE)).unwrap();
        let header_len = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
        assert_eq!(header_len % 8, 0);
        let header = std::str::from_utf8(&bytes[8..8 + header_len]).unwrap();
        assert!(header.starts_with("{\"__metadata__\":{\"format\":\"pt\"}"));
        assert!(
            header.trim_end_matches(' ').ends_with('}'),
            "padded with spaces"
        );
        let data_len: usize = items.iter().map(|it| it.3.len()).sum();
        assert_eq!(bytes.len(), 8 + header_len + data_len);

        read_back(dir.path(), &files, &items);
        check_with_hf_reader(dir.path(), &items);
    }

    #[test]
    fn multi_shard_round_trip_and_index() {
        let dir = tempfile::tempdir().unwrap();
        // 40-byte limit: [10 + 10 + 10] | [30] | [64 alone, over the limit] | [2 + 20]
        let items = items(&[5, 5, 5, 15, 32, 1, 10]);
        let files = write_all(dir.path(), 40, &items);
        let shard_names: Vec<String> = (1..=4)
            .map(|i| format!("model-{i:05}-of-00004.safetensors"))
            .collect();
        assert_eq!(files[..4], shard_names[..]);
        assert_eq!(files[4], INDEX_FILE);
        assert_eq!(files.len(), 5);
        let mut on_disk: Vec<String> = snapshot(dir.path()).into_keys().collect();
        on_disk.sort();
        let mut expected = files.clone();
        expected.sort();
        assert_eq!(on_disk, expected);

        let where_is = read_back(dir.path(), &files, &items);
        let layout: Vec<&str> = items.iter().map(|it| &where_is[&it.0][..11]).collect();
        assert_eq!(
            layout,
            [
                "model-00001",
                "model-00001",
                "model-00001",
                "model-00002",
                "model-00003",
                "model-00004",
                "model-00004"
            ]
        );

        let index: serde_json::Value =
            serde_json::from_slice(&std::fs::read(dir.path().join(INDEX_FILE)).unwrap()).unwrap();
        let total: usize = items.iter().map(|it| it.3.len()).sum();
        assert_eq!(index["metadata"]["total_size"], total as u64);
        let map = index["weight_map"].as_object().unwrap();
        assert_eq!(map.len(), items.len());
        for (name, file) in &where_is {
            assert_eq!(map[name], file.as_str());
        }
        check_with_hf_reader(dir.path(), &items);
    }

    #[test]
    fn oversize_tensor_gets_its_own_shard() {
        let dir = tempfile::tempdir().unwrap();
        // The first tensor is over the limit on its own: it opens a shard and fills it.
        let items = items(&[100, 100, 1]);
        let files = write_all(dir.path(), 10, &items);
        assert_eq!(files.len(), 4);
        let where_is = read_back(dir.path(), &files, &items);
        assert_eq!(where_is["t.000"], "model-00001-of-00003.safetensors");
        assert_eq!(where_is["t.001"], "model-00002-of-00003.safetensors");
        assert_eq!(where_is["t.002"], "model-00003-of-00003.safetensors");
    }

    #[test]
    fn metadata_lands_in_the_tensors_shard() {
        let dir = tempfile::tempdir().unwrap();
        let mut items = items(&[4, 4, 4, 4]);
        let kv = |k: &str, v: &str| (k.to_string(), v.to_string());
        items[1].4 = vec![kv("layer", "0"), kv("bits", "3")];
        items[2].4 = vec![kv("layer", "1")];
        items[3].4 = vec![kv("layer", "1"), kv("format", "pt")];
        // 16-byte limit: [t0 t1] | [t2 t3]
        let files = write_all(dir.path(), 16, &items);
        let meta = |file: &str| {
            let bytes = std::fs::read(dir.path().join(file)).unwrap();
            let (_, m) = SafeTensors::read_metadata(&bytes).unwrap();
            m.metadata()
                .clone()
                .unwrap()
                .into_iter()
                .collect::<BTreeMap<_, _>>()
        };
        let m1 = meta(&files[0]);
        let m2 = meta(&files[1]);
        assert_eq!(
            m1,
            BTreeMap::from([kv("bits", "3"), kv("format", "pt"), kv("layer", "0")])
        );
        assert_eq!(m2, BTreeMap::from([kv("format", "pt"), kv("layer", "1")]));
    }

    #[test]
    fn bad_adds_are_errors_that_change_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let items = items(&[4, 4]);
        let mut w = ShardWriter::new(dir.path(), 1000).unwrap();
        let (name, dtype, shape, bytes, _) = &items[0];
        let meta = vec![("k".to_string(), "a".to_string())];
        w.add(name, *dtype, shape, bytes, &meta).unwrap();
        let before = w.checkpoint().unwrap();
        let err = w.add(name, *dtype, shape, bytes, &[]).unwrap_err();
        assert!(err.to_string().contains("already written"), "{err}");
        let err = w.add("x", Dtype::F32, &[3], &[0; 8], &[]).unwrap_err();
        assert!(err.to_string().contains("do not make"), "{err}");
        let err = w.add(METADATA_KEY, Dtype::U8, &[1], &[0], &[]).unwrap_err();
        assert!(err.to_string().contains("not a valid tensor name"), "{err}");
        let clash = vec![("k".to_string(), "b".to_string())];
        let err = w.add("y", Dtype::U8, &[1], &[0], &clash).unwrap_err();
        assert!(err.to_string().contains("conflicts"), "{err}");
        let format = vec![("format".to_string(), "np".to_string())];
        let err = w.add("y", Dtype::U8, &[1], &[0], &format).unwrap_err();
        assert!(err.to_string().contains("conflicts"), "{err}");
        assert_eq!(w.checkpoint().unwrap(), before);
        add_all(&mut w, &items[1..]);
        let files = w.finish().unwrap();
        read_back(dir.path(), &files, &items);
    }

    #[test]
    fn resume_checks_the_directory_matches() {
        let dir = tempfile::tempdir().unwrap();
        let items = items(&[8, 8, 8]);
        let mut w = ShardWriter::new(dir.path(), 20).unwrap();
        add_all(&mut w, &items[..2]);
        let state = w.checkpoint().unwrap();
        drop(w);
        let err = ShardWriter::resume(dir.path(), 21, &state).err().unwrap();
        assert!(err.to_string().contains("shard limit"), "{err}");
        // The closed first shard, altered.
        let closed = dir.path().join(closed_name(1));
        let mut bytes = std::fs::read(&closed).unwrap();
        bytes.pop();
        std::fs::write(&closed, &bytes).unwrap();
        let err = ShardWriter::resume(dir.path(), 20, &state).err().unwrap();
        assert!(
            matches!(err, ModelError::Malformed { .. }) && err.to_string().contains("00001"),
            "{err}"
        );
        std::fs::remove_file(&closed).unwrap();
        let err = ShardWriter::resume(dir.path(), 20, &state).err().unwrap();
        assert!(err.to_string().contains("00001"), "{err}");
    }

    #[test]
    fn resume_after_a_crash_while_closing_a_shard() {
        let items = items(&[8, 8, 8, 8]);
        let reference = tempfile::tempdir().unwrap();
        write_all(reference.path(), 20, &items);

        let dir = tempfile::tempdir().unwrap();
        let mut w = ShardWriter::new(dir.path(), 20).unwrap();
        add_all(&mut w, &items[..1]);
        let state = w.checkpoint().unwrap();
        drop(w);
        // A shard file cut short, as left by a crash before its data part was removed.
        std::fs::write(dir.path().join(closed_name(1)), b"partial").unwrap();
        let mut w = ShardWriter::resume(dir.path(), 20, &state).unwrap();
        add_all(&mut w, &items[1..]);
        w.finish().unwrap();
        assert_eq!(snapshot(dir.path()), snapshot(reference.path()));
    }

    /// How the first run ends.
    #[derive(Clone, Copy, Debug)]
    enum Crash {
        /// The writer is dropped (buffered bytes reach the file).
        Drop,
        /// The writer vanishes without flushing, as in a killed process.
        Kill,
    }

    fn interrupted_run(
        dir: &Path,
        max: u64,
        items: &[Item],
        checkpoint_at: usize,
        crash_at: usize,
        crash: Crash,
    ) -> Vec<String> {
        let mut w = ShardWriter::new(dir, max).unwrap();
        add_all(&mut w, &items[..checkpoint_at]);
        let state = w.checkpoint().unwrap();
        add_all(&mut w, &items[checkpoint_at..crash_at]);
        match crash {
            Crash::Drop => drop(w),
            Crash::Kill => std::mem::forget(w),
        }
        // The state goes through JSON, as a caller would store it.
        let state: ShardState =
            serde_json::from_str(&serde_json::to_string(&state).unwrap()).unwrap();
        let mut w = ShardWriter::resume(dir, max, &state).unwrap();
        assert_eq!(w.checkpoint().unwrap(), state);
        add_all(&mut w, &items[checkpoint_at..]);
        w.finish().unwrap()
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        /// A run interrupted anywhere after a checkpoint and resumed from it writes the same
        /// bytes as an uninterrupted one.
        #[test]
        fn resumed_run_is_byte_identical(
            sizes in prop::collection::vec(0usize..24, 0..12),
            max in 0u64..64,
            cut in (0.0f64..=1.0, 0.0f64..=1.0),
            kill in any::<bool>(),
        ) {
            let items = items(&sizes);
            let n = items.len();
            let checkpoint_at = (cut.0 * n as f64) as usize;
            let crash_at = checkpoint_at + (cut.1 * (n - checkpoint_at) as f64) as usize;
            let crash = if kill { Crash::Kill } else { Crash::Drop };

            let reference = tempfile::tempdir().unwrap();
            let files = write_all(reference.path(), max, &items);
            read_back(reference.path(), &files, &items);

            let dir = tempfile::tempdir().unwrap();
            let resumed = interrupted_run(dir.path(), max, &items, checkpoint_at, crash_at, crash);
            prop_assert_eq!(resumed, files);
            prop_assert_eq!(snapshot(dir.path()), snapshot(reference.path()));
        }
    }
}
