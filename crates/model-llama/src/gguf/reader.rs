//! The GGUF container (v2 and v3): header, metadata, tensor infos and the aligned data section,
//! parsed from a memory map.
//!
//! Every count and length in the header is untrusted: before anything is allocated it is checked
//! against the bytes left in the file (each element takes at least a known number of bytes), so a
//! corrupt header yields [`ModelError::Malformed`] instead of a huge allocation or a panic.

use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};

use memmap2::Mmap;

use super::dequant::{self, DequantError, GgmlType};
use crate::checkpoint::HostTensor;
use crate::error::{ModelError, Result};

const MAGIC: &[u8; 4] = b"GGUF";
const DEFAULT_ALIGNMENT: u64 = 32;
/// ggml tensors have at most 4 dimensions.
const MAX_DIMS: u32 = 4;
/// Arrays of arrays are legal; deeper nesting than this is only seen in hostile files.
const MAX_NESTING: usize = 8;

/// A metadata value.
#[derive(Clone, Debug, PartialEq)]
pub enum GgufValue {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    U64(u64),
    I64(i64),
    F32(f32),
    F64(f64),
    Bool(bool),
    String(String),
    Array(Vec<GgufValue>),
}

impl GgufValue {
    /// Any non-negative integer value, whatever its width.
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            Self::U8(v) => Some(v.into()),
            Self::U16(v) => Some(v.into()),
            Self::U32(v) => Some(v.into()),
            Self::U64(v) => Some(v),
            Self::I8(v) => u64::try_from(v).ok(),
            Self::I16(v) => u64::try_from(v).ok(),
            Self::I32(v) => u64::try_from(v).ok(),
            Self::I64(v) => u64::try_from(v).ok(),
            _ => None,
        }
    }

    /// Any integer value, whatever its width.
    pub fn as_i64(&self) -> Option<i64> {
        match *self {
            Self::I8(v) => Some(v.into()),
            Self::I16(v) => Some(v.into()),
            Self::I32(v) => Some(v.into()),
            Self::I64(v) => Some(v),
            _ => self.as_u64().and_then(|v| i64::try_from(v).ok()),
        }
    }

    /// Any numeric value as f64.
    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            Self::F32(v) => Some(v.into()),
            Self::F64(v) => Some(v),
            _ => self.as_i64().map(|v| v as f64),
        }
    }

    pub fn as_bool(&self) -> Option<bool> {
        match *self {
            Self::Bool(v) => Some(v),
            _ => None,
        }
    }

    pub fn as_str(&self) -> Option<&str> {
        match self {
            Self::String(s) => Some(s),
            _ => None,
        }
    }

    pub fn as_array(&self) -> Option<&[GgufValue]> {
        match self {
            Self::Array(v) => Some(v),
            _ => None,
        }
    }
}

/// Where one tensor lives and how it is stored.
#[derive(Clone, Debug, PartialEq)]
pub struct GgufTensorInfo {
    pub name: String,
    /// ggml's `ne`: innermost (contiguous) dimension first, i.e. reversed w.r.t. row-major.
    pub ne: Vec<u64>,
    pub dtype: GgmlType,
    /// Offset from the start of the data section.
    pub offset: u64,
}

impl GgufTensorInfo {
    /// The row-major shape (`ne` reversed): a linear `[out, in]` has `ne = [in, out]`.
    pub fn shape(&self) -> Vec<usize> {
        // `open` checked that the element count fits in usize, so every dim does too.
        self.ne.iter().rev().map(|&d| d as usize).collect()
    }

    pub fn n_elements(&self) -> usize {
        self.ne.iter().product::<u64>() as usize
    }
}

/// A memory-mapped GGUF file.
pub struct GgufFile {
    path: PathBuf,
    mmap: Mmap,
    version: u32,
    metadata: Vec<(String, GgufValue)>,
    metadata_index: HashMap<String, usize>,
    tensors: Vec<GgufTensorInfo>,
    tensor_index: HashMap<String, usize>,
    data_start: usize,
}

impl std::fmt::Debug for GgufFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GgufFile")
            .field("path", &self.path)
            .field("version", &self.version)
            .field("metadata", &self.metadata.len())
            .field("tensors", &self.tensors.len())
            .finish()
    }
}

impl GgufFile {
    /// Maps and parses `path`, checking that every tensor lies inside the file.
    pub fn open(path: &Path) -> Result<Self> {
        let file = File::open(path).map_err(|e| ModelError::io(path, e))?;
        // SAFETY: the map is read-only; a file modified while mapped is the user's error and at
        // worst yields wrong weights (every access is bounds-checked against the map's length).
        let mmap = unsafe { Mmap::map(&file) }.map_err(|e| ModelError::io(path, e))?;
        let header = parse(&mmap).map_err(|msg| ModelError::malformed(path, msg))?;
        let metadata_index = header
            .metadata
            .iter()
            .enumerate()
            .map(|(i, (k, _))| (k.clone(), i))
            .collect();
        let tensor_index = header
            .tensors
            .iter()
            .enumerate()
            .map(|(i, t)| (t.name.clone(), i))
            .collect();
        Ok(Self {
            path: path.to_path_buf(),
            mmap,
            version: header.version,
            metadata: header.metadata,
            metadata_index,
            tensors: header.tensors,
            tensor_index,
            data_start: header.data_start,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn version(&self) -> u32 {
        self.version
    }

    /// All metadata, in file order.
    pub fn metadata(&self) -> &[(String, GgufValue)] {
        &self.metadata
    }

    pub fn get(&self, key: &str) -> Option<&GgufValue> {
        self.metadata_index.get(key).map(|&i| &self.metadata[i].1)
    }

    /// The value of `key`, or a `Malformed` error naming the file and the key.
    pub fn require(&self, key: &str) -> Result<&GgufValue> {
        self.get(key)
            .ok_or_else(|| ModelError::malformed(&self.path, format!("missing metadata `{key}`")))
    }

    /// `key` as a string, or an error naming the file and the key.
    pub fn require_str(&self, key: &str) -> Result<&str> {
        self.require(key)?
            .as_str()
            .ok_or_else(|| self.wrong_type(key, "a string"))
    }

    /// `key` as a non-negative integer (any width), or an error naming the file and the key.
    pub fn require_usize(&self, key: &str) -> Result<usize> {
        self.require(key)?
            .as_u64()
            .and_then(|v| usize::try_from(v).ok())
            .ok_or_else(|| self.wrong_type(key, "a non-negative integer"))
    }

    /// `key` as a number (any type), or an error naming the file and the key.
    pub fn require_f64(&self, key: &str) -> Result<f64> {
        self.require(key)?
            .as_f64()
            .ok_or_else(|| self.wrong_type(key, "a number"))
    }

    /// `key` as an array, or an error naming the file and the key.
    pub fn require_array(&self, key: &str) -> Result<&[GgufValue]> {
        self.require(key)?
            .as_array()
            .ok_or_else(|| self.wrong_type(key, "an array"))
    }

    pub(crate) fn wrong_type(&self, key: &str, expected: &str) -> ModelError {
        ModelError::malformed(&self.path, format!("metadata `{key}` is not {expected}"))
    }

    /// Tensor infos, in file order.
    pub fn tensors(&self) -> &[GgufTensorInfo] {
        &self.tensors
    }

    pub fn tensor_info(&self, name: &str) -> Option<&GgufTensorInfo> {
        self.tensor_index.get(name).map(|&i| &self.tensors[i])
    }

    /// The stored bytes of tensor `name`.
    pub fn tensor_bytes(&self, name: &str) -> Result<&[u8]> {
        let info = self.info_or_missing(name)?;
        let len = tensor_byte_len(info).ok_or_else(|| self.unsupported(info))?;
        // `open` checked the range; recomputing it keeps this free of unchecked indexing.
        let start = self.data_start + info.offset as usize;
        self.mmap.get(start..start + len).ok_or_else(|| {
            ModelError::malformed(&self.path, format!("tensor `{name}` lies outside the file"))
        })
    }

    /// Tensor `name` dequantized to f32, in row-major layout (`ne` reversed).
    pub fn tensor_f32(&self, name: &str) -> Result<HostTensor> {
        let info = self.info_or_missing(name)?;
        let bytes = self.tensor_bytes(name)?;
        let data =
            dequant::dequantize(info.dtype, bytes, info.n_elements()).map_err(|e| match e {
                DequantError::Unsupported(_) => self.unsupported(info),
                DequantError::Length { .. } => {
                    ModelError::malformed(&self.path, format!("tensor `{name}`: {e}"))
                }
            })?;
        // The values are copied out: the mapped pages are no longer needed.
        let start = bytes.as_ptr() as usize - self.mmap.as_ptr() as usize;
        crate::mapped::release(&self.mmap, start..start + bytes.len());
        Ok(HostTensor::new(info.shape(), data))
    }

    fn info_or_missing(&self, name: &str) -> Result<&GgufTensorInfo> {
        self.tensor_info(name)
            .ok_or_else(|| ModelError::MissingTensor {
                path: self.path.clone(),
                name: name.to_string(),
            })
    }

    fn unsupported(&self, info: &GgufTensorInfo) -> ModelError {
        ModelError::Unsupported {
            path: self.path.clone(),
            what: "tensor type",
            value: format!("{} (tensor `{}`)", info.dtype, info.name),
        }
    }
}

fn tensor_byte_len(info: &GgufTensorInfo) -> Option<usize> {
    dequant::byte_len(info.dtype, info.n_elements())
}

struct Header {
    version: u32,
    metadata: Vec<(String, GgufValue)>,
    tensors: Vec<GgufTensorInfo>,
    data_start: usize,
}

/// Parsing errors are plain messages; `open` attaches the file name.
type ParseResult<T> = std::result::Result<T, String>;

fn parse(bytes: &[u8]) -> ParseResult<Header> {
    let mut c = Cursor { bytes, pos: 0 };
    let magic = c
        .take(4)
        .map_err(|_| "file too short for a GGUF header".to_string())?;
    if magic != MAGIC {
        return Err(format!("bad magic {magic:02x?} (expected \"GGUF\")"));
    }
    let version = c.u32()?;
    if !(2..=3).contains(&version) {
        let hint = if version.swap_bytes() <= 3 {
            " (big-endian GGUF is not supported)"
        } else {
            ""
        };
        return Err(format!(
            "unsupported GGUF version {version}{hint}; expected 2 or 3"
        ));
    }
    let n_tensors = c.u64()?;
    let n_kv = c.u64()?;
    // Minimum sizes: a key-value is a key length + type (12 bytes), a tensor info a name length,
    // n_dims, type and offset (24 bytes).
    let n_kv = c.count(n_kv, 12, "metadata entries")?;
    let n_tensors = c.count(n_tensors, 24, "tensors")?;

    let mut metadata = Vec::with_capacity(n_kv);
    let mut seen = HashMap::with_capacity(n_kv);
    for _ in 0..n_kv {
        let key = c.string()?;
        let ty = c.u32()?;
        let value = c
            .value(ty, 0)
            .map_err(|e| format!("metadata `{key}`: {e}"))?;
        if seen.insert(key.clone(), ()).is_some() {
            return Err(format!("duplicate metadata key `{key}`"));
        }
        metadata.push((key, value));
    }
    let alignment = match metadata.iter().find(|(k, _)| k == "general.alignment") {
        None => DEFAULT_ALIGNMENT,
        Some((_, v)) => match v.as_u64() {
            Some(a) if a > 0 && a.is_power_of_two() && a <= 1 << 20 => a,
            _ => return Err(format!("`general.alignment` = {v:?} is not a power of two")),
        },
    };

    let mut tensors = Vec::with_capacity(n_tensors);
    let mut names = HashMap::with_capacity(n_tensors);
    for _ in 0..n_tensors {
        let name = c.string()?;
        let n_dims = c.u32()?;
        if n_dims > MAX_DIMS {
            return Err(format!(
                "tensor `{name}` has {n_dims} dimensions (at most {MAX_DIMS})"
            ));
        }
        let ne = (0..n_dims)
            .map(|_| c.u64())
            .collect::<ParseResult<Vec<_>>>()?;
        let dtype = GgmlType::from_id(c.u32()?);
        let offset = c.u64()?;
        if names.insert(name.clone(), ()).is_some() {
            return Err(format!("duplicate tensor `{name}`"));
        }
        tensors.push(GgufTensorInfo {
            name,
            ne,
            dtype,
            offset,
        });
    }

    let data_start = align_up(c.pos as u64, alignment)
        .filter(|&s| s <= bytes.len() as u64)
        .ok_or_else(|| "the data section starts past the end of the file".to_string())?;
    let data_len = bytes.len() as u64 - data_start;
    for t in &tensors {
        check_tensor(t, alignment, data_len)?;
    }
    Ok(Header {
        version,
        metadata,
        tensors,
        data_start: data_start as usize,
    })
}

fn check_tensor(t: &GgufTensorInfo, alignment: u64, data_len: u64) -> ParseResult<()> {
    let name = &t.name;
    let n =
        t.ne.iter()
            .try_fold(1u64, |acc, &d| acc.checked_mul(d))
            .filter(|&n| usize::try_from(n).is_ok())
            .ok_or_else(|| format!("tensor `{name}`: element count of {:?} overflows", t.ne))?;
    if !t.offset.is_multiple_of(alignment) {
        return Err(format!(
            "tensor `{name}`: offset {} is not {alignment}-aligned",
            t.offset
        ));
    }
    let Some((block, _)) = t.dtype.block_layout() else {
        // Its size is unknown; reading it reports the type as unsupported.
        return Ok(());
    };
    if t.ne
        .first()
        .is_some_and(|&d| !d.is_multiple_of(block as u64))
    {
        return Err(format!(
            "tensor `{name}`: row length {} is not a multiple of the {} block size {block}",
            t.ne[0], t.dtype
        ));
    }
    let len = dequant::byte_len(t.dtype, n as usize)
        .ok_or_else(|| format!("tensor `{name}`: size overflows"))?;
    match t.offset.checked_add(len as u64) {
        Some(end) if end <= data_len => Ok(()),
        _ => Err(format!(
            "tensor `{name}` ({len} bytes at offset {}) lies outside the data section ({data_len} bytes): truncated file?",
            t.offset
        )),
    }
}

fn align_up(pos: u64, alignment: u64) -> Option<u64> {
    pos.checked_add(alignment - 1)
        .map(|p| p / alignment * alignment)
}

struct Cursor<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl<'a> Cursor<'a> {
    fn remaining(&self) -> usize {
        self.bytes.len() - self.pos
    }

    fn take(&mut self, n: usize) -> ParseResult<&'a [u8]> {
        if n > self.remaining() {
            return Err(format!(
                "unexpected end of file at byte {} (needed {n} more bytes): truncated header?",
                self.pos
            ));
        }
        let s = &self.bytes[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }

    fn array<const N: usize>(&mut self) -> ParseResult<[u8; N]> {
        Ok(self.take(N)?.try_into().expect("take returned N bytes"))
    }

    fn u32(&mut self) -> ParseResult<u32> {
        Ok(u32::from_le_bytes(self.array()?))
    }

    fn u64(&mut self) -> ParseResult<u64> {
        Ok(u64::from_le_bytes(self.array()?))
    }

    /// A count of items each taking at least `min_size` bytes, checked against what is left.
    fn count(&self, n: u64, min_size: usize, what: &str) -> ParseResult<usize> {
        let fits = usize::try_from(n)
            .ok()
            .and_then(|n| n.checked_mul(min_size))
            .is_some_and(|bytes| bytes <= self.remaining());
        if !fits {
            return Err(format!(
                "{n} {what} cannot fit in the {} bytes left at byte {}",
                self.remaining(),
                self.pos
            ));
        }
        Ok(n as usize)
    }

    fn string(&mut self) -> ParseResult<String> {
        let len = self.u64()?;
        let len = self.count(len, 1, "string bytes")?;
        let raw = self.take(len)?;
        String::from_utf8(raw.to_vec())
            .map_err(|_| format!("invalid UTF-8 string at byte {}", self.pos - len))
    }

    fn value(&mut self, ty: u32, depth: usize) -> ParseResult<GgufValue> {
        use GgufValue as V;
        Ok(match ty {
            0 => V::U8(self.array::<1>()?[0]),
            1 => V::I8(self.array::<1>()?[0] as i8),
            2 => V::U16(u16::from_le_bytes(self.array()?)),
            3 => V::I16(i16::from_le_bytes(self.array()?)),
            4 => V::U32(self.u32()?),
            5 => V::I32(i32::from_le_bytes(self.array()?)),
            6 => V::F32(f32::from_le_bytes(self.array()?)),
            7 => match self.array::<1>()?[0] {
                0 => V::Bool(false),
                1 => V::Bool(true),
                b => return Err(format!("invalid bool byte {b}")),
            },
            8 => V::String(self.string()?),
            9 => {
                if depth >= MAX_NESTING {
                    return Err(format!("arrays nested deeper than {MAX_NESTING}"));
                }
                let elem = self.u32()?;
                let n = self.u64()?;
                let n = self.count(n, min_value_size(elem)?, "array elements")?;
                let mut items = Vec::with_capacity(n);
                for _ in 0..n {
                    items.push(self.value(elem, depth + 1)?);
                }
                V::Array(items)
            }
            10 => V::U64(self.u64()?),
            11 => V::I64(i64::from_le_bytes(self.array()?)),
            12 => V::F64(f64::from_le_bytes(self.array()?)),
            other => return Err(format!("unknown value type {other}")),
        })
    }
}

/// The fewest bytes a value of type `ty` takes on disk.
fn min_value_size(ty: u32) -> ParseResult<usize> {
    Ok(match ty {
        0 | 1 | 7 => 1,
        2 | 3 => 2,
        4..=6 => 4,
        8 | 10 | 11 | 12 => 8,
        9 => 12,
        other => return Err(format!("unknown array element type {other}")),
    })
}
