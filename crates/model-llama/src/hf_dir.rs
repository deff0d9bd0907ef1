//! Hugging Face checkpoint directories: `config.json` plus one `model.safetensors` or shards
//! listed in `model.safetensors.index.json`, memory-mapped and read tensor by tensor.

use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};

use half::{bf16, f16};
use memmap2::Mmap;
use rayon::prelude::*;
use safetensors::SafeTensors;
use safetensors::tensor::{Dtype, Metadata, TensorView};

use crate::checkpoint::{HostTensor, TensorSource};
use crate::config::LlamaConfig;
use crate::error::{ModelError, Result};

struct Shard {
    path: PathBuf,
    mmap: Mmap,
    header_len: usize,
    metadata: Metadata,
}

/// A Hugging Face LLaMA directory read through memory maps.
pub struct SafetensorsDir {
    dir: PathBuf,
    config: LlamaConfig,
    shards: Vec<Shard>,
    /// tensor name → shard index
    index: HashMap<String, usize>,
    /// The directory's `config.json`, parsed, for extra blocks such as `quantization_config`.
    raw_config: serde_json::Value,
}

/// A raw tensor: dtype, shape and its bytes inside the memory map.
pub struct RawTensor<'a> {
    pub dtype: Dtype,
    pub shape: Vec<usize>,
    pub data: &'a [u8],
}

impl SafetensorsDir {
    pub fn open(dir: &Path) -> Result<Self> {
        if !dir.is_dir() {
            return Err(ModelError::io(
                dir,
                std::io::Error::new(std::io::ErrorKind::NotFound, "not a directory"),
            ));
        }
        let config_path = dir.join("config.json");
        let config = LlamaConfig::from_json_file(&config_path)?;
        let raw_config: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(&config_path).map_err(|e| ModelError::io(&config_path, e))?,
        )
        .map_err(|e| ModelError::malformed(&config_path, e.to_string()))?;
        let files = shard_files(dir)?;
        let mut shards = Vec::with_capacity(files.len());
        let mut index = HashMap::new();
        for (i, path) in files.into_iter().enumerate() {
            let shard = open_shard(path)?;
            for name in shard.metadata.tensors().keys() {
                index.insert(name.clone(), i);
            }
            shards.push(shard);
        }
        Ok(Self {
            dir: dir.to_path_buf(),
            config,
            shards,
            index,
            raw_config,
        })
    }

    pub fn raw_config(&self) -> &serde_json::Value {
        &self.raw_config
    }

    pub fn names(&self) -> Vec<String> {
        let mut names: Vec<_> = self.index.keys().cloned().collect();
        names.sort();
        names
    }

    /// The tensor's dtype, shape and bytes, without conversion.
    pub fn raw(&self, name: &str) -> Result<RawTensor<'_>> {
        let shard = self.shard_of(name)?;
        let info = shard.metadata.info(name).expect("indexed tensor exists");
        let start = shard.header_len + info.data_offsets.0;
        let end = shard.header_len + info.data_offsets.1;
        let data = shard.mmap.get(start..end).ok_or_else(|| {
            ModelError::malformed(
                &shard.path,
                format!("tensor `{name}` lies outside the file"),
            )
        })?;
        TensorView::new(info.dtype, info.shape.clone(), data)
            .map_err(|e| ModelError::malformed(&shard.path, format!("tensor `{name}`: {e}")))?;
        Ok(RawTensor {
            dtype: info.dtype,
            shape: info.shape.clone(),
            data,
        })
    }

    /// Drops tensor `name`'s pages from memory, once it has been copied out (see
    /// `crate::mapped`).
    pub fn release(&self, name: &str) {
        if let Ok(shard) = self.shard_of(name)
            && let Some(info) = shard.metadata.info(name)
        {
            let start = shard.header_len + info.data_offsets.0;
            let end = shard.header_len + info.data_offsets.1;
            crate::mapped::release(&shard.mmap, start..end);
        }
    }

    /// The file holding tensor `name`.
    pub fn file_of(&self, name: &str) -> Result<PathBuf> {
        Ok(self.shard_of(name)?.path.clone())
    }

    /// The `__metadata__` entry `key` of the file holding tensor `name`.
    pub fn shard_metadata(&self, name: &str, key: &str) -> Result<Option<&str>> {
        let shard = self.shard_of(name)?;
        Ok(shard
            .metadata
            .metadata()
            .as_ref()
            .and_then(|m| m.get(key))
            .map(String::as_str))
    }

    fn shard_of(&self, name: &str) -> Result<&Shard> {
        let &i = self
            .index
            .get(name)
            .ok_or_else(|| ModelError::MissingTensor {
                path: self.dir.clone(),
                name: name.to_string(),
            })?;
        Ok(&self.shards[i])
    }
}

impl TensorSource for SafetensorsDir {
    fn path(&self) -> &Path {
        &self.dir
    }

    fn config(&self) -> &LlamaConfig {
        &self.config
    }

    fn contains(&self, name: &str) -> bool {
        self.index.contains_key(name)
    }

    fn load(&self, name: &str) -> Result<HostTensor> {
        let raw = self.raw(name)?;
        let data = to_f32(raw.dtype, raw.data).ok_or_else(|| ModelError::Unsupported {
            path: self
                .shard_of(name)
                .map(|s| s.path.clone())
                .unwrap_or_default(),
            what: "tensor dtype",
            value: format!("{:?} (tensor `{name}`)", raw.dtype),
        })?;
        let shape = raw.shape;
        self.release(name);
        Ok(HostTensor::new(shape, data))
    }
}

/// Little-endian f32/f16/bf16 bytes → f32; `None` for other dtypes.
///
/// Parallel: on a 7B layer this widening (and the page faults of the mapped bytes it reads)
/// would otherwise be a serial step of every quantized linear.
pub fn to_f32(dtype: Dtype, bytes: &[u8]) -> Option<Vec<f32>> {
    let widen16 = |f: fn(u16) -> f32| {
        bytes
            .par_chunks_exact(2)
            .map(|c| f(u16::from_le_bytes([c[0], c[1]])))
            .collect()
    };
    match dtype {
        Dtype::F32 => Some(
            bytes
                .par_chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect(),
        ),
        Dtype::F16 => Some(widen16(|b| f16::from_bits(b).to_f32())),
        Dtype::BF16 => Some(widen16(|b| bf16::from_bits(b).to_f32())),
        _ => None,
    }
}

fn shard_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let single = dir.join("model.safetensors");
    if single.is_file() {
        return Ok(vec![single]);
    }
    let index_path = dir.join("model.safetensors.index.json");
    if !index_path.is_file() {
        return Err(ModelError::io(
            &single,
            std::io::Error::new(
                std::io::ErrorKind::NotFound,
                "no model.safetensors nor model.safetensors.index.json in the directory",
            ),
        ));
    }
    let text = std::fs::read_to_string(&index_path).map_err(|e| ModelError::io(&index_path, e))?;
    let value: serde_json::Value = serde_json::from_str(&text)
        .map_err(|e| ModelError::malformed(&index_path, e.to_string()))?;
    let map = value
        .get("weight_map")
        .and_then(|m| m.as_object())
        .ok_or_else(|| ModelError::malformed(&index_path, "no `weight_map` object"))?;
    let mut files: Vec<String> = map
        .values()
        .map(|v| {
            let name = v
                .as_str()
                .ok_or_else(|| ModelError::malformed(&index_path, "non-string shard name"))?;
            // A shard lives in the directory: an absolute path or `..` would read any file.
            let mut parts = Path::new(name).components();
            match (parts.next(), parts.next()) {
                (Some(std::path::Component::Normal(_)), None) => Ok(name.to_owned()),
                _ => Err(ModelError::malformed(
                    &index_path,
                    format!("shard name {name:?} is not a file name in the directory"),
                )),
            }
        })
        .collect::<Result<_>>()?;
    files.sort();
    files.dedup();
    Ok(files.into_iter().map(|f| dir.join(f)).collect())
}

fn open_shard(path: PathBuf) -> Result<Shard> {
    let file = File::open(&path).map_err(|e| ModelError::io(&path, e))?;
    // SAFETY: the map is read-only; a checkpoint modified while mapped is the user's error
    // and at worst yields wrong weights, which is what reading it would give too.
    let mmap = unsafe { Mmap::map(&file) }.map_err(|e| ModelError::io(&path, e))?;
    let (header_len, metadata) = SafeTensors::read_metadata(&mmap)
        .map_err(|e| ModelError::malformed(&path, format!("not a safetensors file: {e}")))?;
    Ok(Shard {
        path,
        header_len: header_len + 8,
        mmap,
        metadata,
    })
}
