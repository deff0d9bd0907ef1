//! A tiny GGUF writer for tests: enough of the format to produce valid files and, by editing the
//! bytes, corrupt ones.
#![allow(dead_code)]

/// A metadata value, encoded as GGUF does (type id + little-endian payload).
#[derive(Clone, Debug)]
pub enum Val {
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
    Str(String),
    /// Element type id and elements (all of that type).
    Arr(u32, Vec<Val>),
}

impl Val {
    pub fn type_id(&self) -> u32 {
        match self {
            Val::U8(_) => 0,
            Val::I8(_) => 1,
            Val::U16(_) => 2,
            Val::I16(_) => 3,
            Val::U32(_) => 4,
            Val::I32(_) => 5,
            Val::F32(_) => 6,
            Val::Bool(_) => 7,
            Val::Str(_) => 8,
            Val::Arr(..) => 9,
            Val::U64(_) => 10,
            Val::I64(_) => 11,
            Val::F64(_) => 12,
        }
    }

    fn encode(&self, out: &mut Vec<u8>) {
        match self {
            Val::U8(v) => out.push(*v),
            Val::I8(v) => out.push(*v as u8),
            Val::U16(v) => out.extend(v.to_le_bytes()),
            Val::I16(v) => out.extend(v.to_le_bytes()),
            Val::U32(v) => out.extend(v.to_le_bytes()),
            Val::I32(v) => out.extend(v.to_le_bytes()),
            Val::U64(v) => out.extend(v.to_le_bytes()),
            Val::I64(v) => out.extend(v.to_le_bytes()),
            Val::F32(v) => out.extend(v.to_le_bytes()),
            Val::F64(v) => out.extend(v.to_le_bytes()),
            Val::Bool(v) => out.push(*v as u8),
            Val::Str(s) => put_str(out, s),
            Val::Arr(ty, items) => {
                out.extend(ty.to_le_bytes());
                out.extend((items.len() as u64).to_le_bytes());
                for item in items {
                    item.encode(out);
                }
            }
        }
    }
}

pub fn str_arr(items: &[&str]) -> Val {
    Val::Arr(8, items.iter().map(|s| Val::Str(s.to_string())).collect())
}

pub fn put_str(out: &mut Vec<u8>, s: &str) {
    out.extend((s.len() as u64).to_le_bytes());
    out.extend(s.as_bytes());
}

pub struct Tensor {
    pub name: String,
    /// ggml order (innermost first).
    pub ne: Vec<u64>,
    pub type_id: u32,
    pub data: Vec<u8>,
}

pub struct GgufWriter {
    pub version: u32,
    pub alignment: u64,
    pub kvs: Vec<(String, Val)>,
    pub tensors: Vec<Tensor>,
}

/// Byte positions of interesting fields in the written file, for corruption tests.
#[derive(Debug, Default)]
pub struct Layout {
    pub tensor_count_at: usize,
    pub kv_count_at: usize,
    /// Per tensor: position of its n_dims, first dim, type and offset fields.
    pub tensor_fields: Vec<(usize, usize, usize, usize)>,
    pub data_start: usize,
}

impl GgufWriter {
    pub fn new() -> Self {
        Self {
            version: 3,
            alignment: 32,
            kvs: vec![],
            tensors: vec![],
        }
    }

    pub fn kv(mut self, key: &str, v: Val) -> Self {
        self.kvs.push((key.to_string(), v));
        self
    }

    pub fn tensor(mut self, name: &str, ne: &[u64], type_id: u32, data: Vec<u8>) -> Self {
        self.tensors.push(Tensor {
            name: name.to_string(),
            ne: ne.to_vec(),
            type_id,
            data,
        });
        self
    }

    pub fn f32_tensor(self, name: &str, ne: &[u64], values: &[f32]) -> Self {
        let data = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        self.tensor(name, ne, 0, data)
    }

    pub fn to_bytes(&self) -> (Vec<u8>, Layout) {
        let mut layout = Layout::default();
        let mut out = b"GGUF".to_vec();
        out.extend(self.version.to_le_bytes());
        layout.tensor_count_at = out.len();
        out.extend((self.tensors.len() as u64).to_le_bytes());
        layout.kv_count_at = out.len();
        out.extend((self.kvs.len() as u64).to_le_bytes());
        for (k, v) in &self.kvs {
            put_str(&mut out, k);
            out.extend(v.type_id().to_le_bytes());
            v.encode(&mut out);
        }
        let align = |n: usize| n.div_ceil(self.alignment as usize) * self.alignment as usize;
        let mut offset = 0usize;
        let mut offsets = vec![];
        for t in &self.tensors {
            put_str(&mut out, &t.name);
            let n_dims_at = out.len();
            out.extend((t.ne.len() as u32).to_le_bytes());
            let dim_at = out.len();
            for d in &t.ne {
                out.extend(d.to_le_bytes());
            }
            let type_at = out.len();
            out.extend(t.type_id.to_le_bytes());
            let offset_at = out.len();
            out.extend((offset as u64).to_le_bytes());
            layout
                .tensor_fields
                .push((n_dims_at, dim_at, type_at, offset_at));
            offsets.push(offset);
            offset = align(offset + t.data.len());
        }
        out.resize(align(out.len()), 0);
        layout.data_start = out.len();
        for (t, off) in self.tensors.iter().zip(offsets) {
            out.resize(layout.data_start + off, 0);
            out.extend(&t.data);
        }
        (out, layout)
    }
}

pub fn f16_bits(v: f32) -> [u8; 2] {
    half::f16::from_f32(v).to_bits().to_le_bytes()
}
