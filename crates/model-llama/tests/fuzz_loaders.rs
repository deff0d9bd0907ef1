//! Mutation fuzzing of every loader: small valid files (GGUF, safetensors directories single and
//! sharded, packed checkpoints, `config.json`, `tokenizer.json`) are truncated, bit-flipped, given
//! huge counts, lengths and offsets, wrong dtypes and shapes, and inconsistent metadata. Whatever
//! the input, a loader must not panic, must fail with an error naming the file, and must not make
//! an allocation larger than the file could justify.
//!
//! Failures are not persisted by proptest: each one found is kept below as a named regression
//! test with its fixed input.

mod gguf_support;

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::LazyLock;

use gguf_support::{GgufWriter, Val, str_arr};
use model_llama::export::OwnedTensor;
use model_llama::gguf::{GgufCheckpoint, GgufFile};
use model_llama::hf_dir::SafetensorsDir;
use model_llama::packed::{PackedDir, QuantizationConfig, packed_layout_metadata, packed_tensors};
use model_llama::{LinearKind, LlamaConfig, LlamaTokenizer, TensorSource};
use proptest::prelude::*;
use proptest::sample::Index;
use quant_core::{GroupSize, QuantConfig, QuantDim, quantize_rtn};
use safetensors::tensor::{Dtype, TensorView};
use serde_json::{Value, json};

// ---------------------------------------------------------------------------------------------
// Allocation accounting

/// The system allocator, recording the largest single request made on each thread.
struct Counting;

thread_local! {
    static LARGEST: Cell<usize> = const { Cell::new(0) };
}

fn note(size: usize) {
    // `try_with`: allocations made while the thread is being torn down are not counted.
    let _ = LARGEST.try_with(|l| {
        if size > l.get() {
            l.set(size);
        }
    });
}

// SAFETY: every call is forwarded unchanged to `System`, which upholds `GlobalAlloc`'s contract;
// the bookkeeping only touches a const-initialised thread-local without a destructor, which
// never allocates.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        note(layout.size());
        // SAFETY: forwarded with the caller's guarantees.
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        note(layout.size());
        // SAFETY: forwarded with the caller's guarantees.
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: forwarded with the caller's guarantees.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        note(new_size);
        // SAFETY: forwarded with the caller's guarantees.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

/// Runs `f`; returns its result and the largest single allocation it made on this thread.
fn largest_allocation<T>(f: impl FnOnce() -> T) -> (T, usize) {
    LARGEST.with(|l| l.set(0));
    let out = f();
    (out, LARGEST.with(Cell::get))
}

/// What reading `file_bytes` bytes may allocate at once: the decoded form of a file is a small
/// multiple of its size (f32 from 2-bit codes is 16×), plus fixed-size tables (a tokenizer's
/// cache).
fn allocation_bound(file_bytes: usize) -> usize {
    64 * file_bytes + (1 << 20)
}

fn config() -> ProptestConfig {
    // A fixed seed keeps the suite deterministic; PROPTEST_RNG_SEED and PROPTEST_CASES
    // override both for a longer search.
    ProptestConfig {
        cases: 10_000,
        failure_persistence: None,
        rng_seed: proptest::test_runner::RngSeed::Fixed(0xADAD1),
        ..ProptestConfig::default()
    }
}

// ---------------------------------------------------------------------------------------------
// Mutations

/// Values that break length, count and offset fields.
fn hostile_u64() -> impl Strategy<Value = u64> {
    prop_oneof![
        Just(0),
        Just(1),
        Just(u64::MAX),
        Just(u64::MAX - 7),
        Just(i64::MAX as u64),
        Just(1 << 32),
        Just(1 << 40),
        Just(1 << 61),
        Just(u32::MAX as u64),
        0u64..4096,
        any::<u64>(),
    ]
}

/// One change to a file's bytes.
#[derive(Clone, Debug)]
enum ByteMutation {
    /// Keep only a prefix.
    Truncate(Index),
    /// Flip one bit in the header.
    FlipHeaderBit(Index, u8),
    /// Flip one bit anywhere.
    FlipBit(Index, u8),
    /// Overwrite a known 8-byte field (a length, count or offset).
    Field64(Index, u64),
    /// Overwrite a known 4-byte field (a type id or dimension count).
    Field32(Index, u32),
    /// Overwrite 8 bytes anywhere in the header.
    Header64(Index, u64),
}

fn byte_mutation() -> impl Strategy<Value = ByteMutation> {
    prop_oneof![
        any::<Index>().prop_map(ByteMutation::Truncate),
        (any::<Index>(), 0u8..8).prop_map(|(i, b)| ByteMutation::FlipHeaderBit(i, b)),
        (any::<Index>(), 0u8..8).prop_map(|(i, b)| ByteMutation::FlipBit(i, b)),
        (any::<Index>(), hostile_u64()).prop_map(|(i, v)| ByteMutation::Field64(i, v)),
        (any::<Index>(), hostile_u64()).prop_map(|(i, v)| ByteMutation::Field32(i, v as u32)),
        (any::<Index>(), hostile_u64()).prop_map(|(i, v)| ByteMutation::Header64(i, v)),
    ]
}

/// A binary file and where its header fields are.
#[derive(Clone)]
struct Binary {
    bytes: Vec<u8>,
    header_len: usize,
    fields64: Vec<usize>,
    fields32: Vec<usize>,
}

impl Binary {
    fn apply(&mut self, m: &ByteMutation) {
        let len = self.bytes.len();
        let header = self.header_len.min(len);
        let put = |bytes: &mut Vec<u8>, at: usize, v: &[u8]| {
            let end = (at + v.len()).min(bytes.len());
            if at < end {
                bytes[at..end].copy_from_slice(&v[..end - at]);
            }
        };
        match m {
            ByteMutation::Truncate(i) => self.bytes.truncate(i.index(len + 1)),
            ByteMutation::FlipHeaderBit(i, b) if header > 0 => {
                self.bytes[i.index(header)] ^= 1 << b;
            }
            ByteMutation::FlipBit(i, b) if len > 0 => self.bytes[i.index(len)] ^= 1 << b,
            ByteMutation::Field64(i, v) if !self.fields64.is_empty() => {
                let at = self.fields64[i.index(self.fields64.len())];
                put(&mut self.bytes, at, &v.to_le_bytes());
            }
            ByteMutation::Field32(i, v) if !self.fields32.is_empty() => {
                let at = self.fields32[i.index(self.fields32.len())];
                put(&mut self.bytes, at, &v.to_le_bytes());
            }
            ByteMutation::Header64(i, v) if header > 0 => {
                put(&mut self.bytes, i.index(header), &v.to_le_bytes());
            }
            _ => {}
        }
    }
}

/// Values that break JSON fields: wrong types, huge, negative and fractional numbers, dtype
/// names, odd strings, containers.
fn hostile_json() -> impl Strategy<Value = Value> {
    prop_oneof![
        hostile_u64().prop_map(|v| json!(v)),
        any::<i64>().prop_map(|v| json!(v)),
        Just(json!(-1)),
        Just(json!(1e308)),
        Just(json!(0.5)),
        Just(Value::Null),
        Just(json!(true)),
        prop::sample::select(vec![
            "",
            "F32",
            "F16",
            "BF16",
            "U32",
            "I32",
            "U8",
            "I8",
            "BOOL",
            "F64",
            "F8_E4M3",
            "oc",
            "ic",
            "adadim",
            "rtn",
            "llama3",
            "<|endoftext|>",
            "a",
            "../x",
            "/",
            ".",
        ])
        .prop_map(|s| json!(s)),
        "[a-zA-Z0-9_.Ġ -]{0,12}".prop_map(|s| json!(s)),
        Just(json!([])),
        Just(json!({})),
        Just(json!([u64::MAX, u64::MAX])),
        Just(json!([0, u64::MAX])),
        Just(json!([1u64 << 32, 1u64 << 32, 1u64 << 32])),
        prop::collection::vec(0u64..64, 0..4).prop_map(|v| json!(v)),
    ]
}

/// One change to a JSON document.
#[derive(Clone, Debug)]
enum JsonMutation {
    /// Replace the value at one path (any depth, the root included).
    Replace(Index, Value),
    /// Remove the value at one path from its object or array.
    Remove(Index),
    /// Add an entry to the object or array at one path.
    Add(Index, String, Value),
}

fn json_mutation() -> impl Strategy<Value = JsonMutation> {
    prop_oneof![
        3 => (any::<Index>(), hostile_json()).prop_map(|(i, v)| JsonMutation::Replace(i, v)),
        1 => any::<Index>().prop_map(JsonMutation::Remove),
        1 => (any::<Index>(), "[a-z_.]{0,8}", hostile_json())
            .prop_map(|(i, k, v)| JsonMutation::Add(i, k, v)),
    ]
}

#[derive(Clone, Debug)]
enum Step {
    Key(String),
    At(usize),
}

fn paths(v: &Value, prefix: &mut Vec<Step>, out: &mut Vec<Vec<Step>>) {
    out.push(prefix.clone());
    match v {
        Value::Object(m) => {
            for (k, child) in m {
                prefix.push(Step::Key(k.clone()));
                paths(child, prefix, out);
                prefix.pop();
            }
        }
        Value::Array(a) => {
            for (i, child) in a.iter().enumerate() {
                prefix.push(Step::At(i));
                paths(child, prefix, out);
                prefix.pop();
            }
        }
        _ => {}
    }
}

fn at_mut<'a>(v: &'a mut Value, path: &[Step]) -> &'a mut Value {
    path.iter().fold(v, |v, s| match s {
        Step::Key(k) => &mut v[k.as_str()],
        Step::At(i) => &mut v[*i],
    })
}

fn apply_json(doc: &mut Value, m: &JsonMutation) {
    let mut all = vec![];
    paths(doc, &mut vec![], &mut all);
    match m {
        JsonMutation::Replace(i, new) => *at_mut(doc, &all[i.index(all.len())]) = new.clone(),
        JsonMutation::Remove(i) => {
            let path = &all[i.index(all.len())];
            if let Some((last, parent)) = path.split_last() {
                match (at_mut(doc, parent), last) {
                    (Value::Object(o), Step::Key(k)) => {
                        o.remove(k);
                    }
                    (Value::Array(a), Step::At(j)) => {
                        a.remove(*j);
                    }
                    _ => {}
                }
            }
        }
        JsonMutation::Add(i, key, new) => match at_mut(doc, &all[i.index(all.len())]) {
            Value::Object(o) => {
                o.insert(key.clone(), new.clone());
            }
            Value::Array(a) => a.push(new.clone()),
            _ => {}
        },
    }
}

/// A change to one file of a directory.
#[derive(Clone, Debug)]
enum FileMutation {
    Bytes(ByteMutation),
    /// A structural change to a JSON file, or to a safetensors file's JSON header.
    Json(JsonMutation),
    Delete,
}

fn file_mutation() -> impl Strategy<Value = (Index, FileMutation)> {
    let m = prop_oneof![
        4 => byte_mutation().prop_map(FileMutation::Bytes),
        5 => json_mutation().prop_map(FileMutation::Json),
        1 => Just(FileMutation::Delete),
    ];
    (any::<Index>(), m)
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Kind {
    Json,
    Safetensors,
}

/// A directory of files to write.
#[derive(Clone)]
struct DirFiles(Vec<(&'static str, Kind, Option<Vec<u8>>)>);

impl DirFiles {
    fn apply(&mut self, (which, m): &(Index, FileMutation)) {
        let n = self.0.len();
        let (_, kind, content) = &mut self.0[which.index(n)];
        let Some(bytes) = content else {
            return;
        };
        match m {
            FileMutation::Delete => *content = None,
            FileMutation::Bytes(b) => {
                let mut bin = match kind {
                    Kind::Json => Binary {
                        header_len: bytes.len(),
                        bytes: std::mem::take(bytes),
                        fields64: vec![],
                        fields32: vec![],
                    },
                    Kind::Safetensors => safetensors_binary(std::mem::take(bytes)),
                };
                bin.apply(b);
                *bytes = bin.bytes;
            }
            FileMutation::Json(j) => match kind {
                Kind::Json => {
                    if let Ok(mut doc) = serde_json::from_slice::<Value>(bytes) {
                        apply_json(&mut doc, j);
                        *bytes = serde_json::to_vec(&doc).unwrap();
                    }
                }
                Kind::Safetensors => {
                    if let Some((mut doc, data)) = split_safetensors(bytes) {
                        apply_json(&mut doc, j);
                        *bytes = join_safetensors(&doc, &data);
                    }
                }
            },
        }
    }

    fn write(&self, dir: &Path) -> usize {
        let mut total = 0;
        for (name, _, content) in &self.0 {
            if let Some(bytes) = content {
                std::fs::write(dir.join(name), bytes).unwrap();
                total += bytes.len();
            }
        }
        total
    }
}

// ---------------------------------------------------------------------------------------------
// Checking a result

/// The message with its sources, as the command line shows it.
fn chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut cur = e.source();
    while let Some(s) = cur {
        out = format!("{out}: {s}");
        cur = s.source();
    }
    out
}

/// Every error must name `path` (a file, or the directory the files are in).
fn check_errors(errors: &[String], path: &Path) -> Result<(), TestCaseError> {
    let shown = path.display().to_string();
    for e in errors {
        prop_assert!(e.contains(&shown), "error does not name {shown}: {e}");
    }
    Ok(())
}

fn check_allocation(largest: usize, file_bytes: usize) -> Result<(), TestCaseError> {
    prop_assert!(
        largest <= allocation_bound(file_bytes),
        "a {largest}-byte allocation reading {file_bytes} bytes"
    );
    Ok(())
}

/// Collects the error of `r`, if any; returns the value.
fn note_err<T, E: std::error::Error>(r: Result<T, E>, errors: &mut Vec<String>) -> Option<T> {
    r.map_err(|e| errors.push(chain(&e))).ok()
}

// ---------------------------------------------------------------------------------------------
// Fixtures

/// Deterministic filler bytes.
fn noise(n: usize, seed: u32) -> Vec<u8> {
    let mut x = seed.wrapping_mul(2_654_435_761).wrapping_add(1);
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            (x >> 8) as u8
        })
        .collect()
}

/// Deterministic weights in [-1, 1).
fn weights(n: usize, seed: u32) -> Vec<f32> {
    noise(n, seed)
        .into_iter()
        .map(|b| b as f32 / 128.0 - 1.0)
        .collect()
}

const TOKENS: [&str; 16] = [
    "<|endoftext|>",
    "a",
    "b",
    "c",
    "d",
    "Ġ",
    "ab",
    "abc",
    "Ġa",
    "Ġab",
    "1",
    "2",
    "cd",
    "dd",
    "ba",
    "Ġc",
];
const MERGES: [&str; 6] = ["a b", "ab c", "Ġ a", "Ġa b", "c d", "Ġ c"];

/// A tiny LLaMA as GGUF: every metadata key the loader reads, a byte-level BPE tokenizer, and
/// tensors in several ggml types.
fn gguf_fixture() -> Binary {
    gguf_binary(&gguf_writer())
}

fn gguf_writer() -> GgufWriter {
    // hidden 32 (2 heads of 16, 1 KV head), ffn 64, 1 layer, vocab 16.
    let types = [
        ("attn_q", [32, 32], 8u32, 34usize),
        ("attn_k", [32, 16], 2, 18),
        ("attn_v", [32, 16], 3, 20),
        ("attn_output", [32, 32], 1, 64),
        ("ffn_gate", [32, 64], 6, 22),
        ("ffn_up", [32, 64], 7, 24),
        ("ffn_down", [64, 32], 30, 64),
    ];
    let mut w = GgufWriter::new()
        .kv("general.architecture", Val::Str("llama".into()))
        .kv("general.alignment", Val::U32(32))
        .kv("llama.embedding_length", Val::U32(32))
        .kv("llama.feed_forward_length", Val::U32(64))
        .kv("llama.attention.head_count", Val::U32(2))
        .kv("llama.attention.head_count_kv", Val::U32(1))
        .kv("llama.block_count", Val::U32(1))
        .kv("llama.attention.layer_norm_rms_epsilon", Val::F32(1e-5))
        .kv("llama.rope.freq_base", Val::F32(10_000.0))
        .kv("llama.context_length", Val::U64(64))
        .kv("llama.rope.dimension_count", Val::U32(16))
        .kv("tokenizer.ggml.model", Val::Str("gpt2".into()))
        .kv("tokenizer.ggml.pre", Val::Str("smollm".into()))
        .kv("tokenizer.ggml.tokens", str_arr(&TOKENS))
        .kv("tokenizer.ggml.merges", str_arr(&MERGES))
        .kv(
            "tokenizer.ggml.token_type",
            Val::Arr(
                5,
                (0..TOKENS.len())
                    .map(|i| Val::I32(if i == 0 { 3 } else { 1 }))
                    .collect(),
            ),
        )
        .kv("tokenizer.ggml.bos_token_id", Val::U32(0))
        .kv("tokenizer.ggml.eos_token_id", Val::U32(0))
        .f32_tensor("token_embd.weight", &[32, 16], &weights(512, 1))
        .f32_tensor("output_norm.weight", &[32], &[1.0; 32])
        .f32_tensor("blk.0.attn_norm.weight", &[32], &[1.0; 32])
        .f32_tensor("blk.0.ffn_norm.weight", &[32], &[1.0; 32]);
    for (i, (name, ne, ty, block_bytes)) in types.into_iter().enumerate() {
        let elems = (ne[0] * ne[1]) as usize;
        let bytes = if ty == 1 || ty == 30 {
            noise(elems * 2, i as u32)
        } else {
            noise(elems / 32 * block_bytes, i as u32)
        };
        w = w.tensor(&format!("blk.0.{name}.weight"), &ne, ty, bytes);
    }
    w
}

fn gguf_binary(w: &GgufWriter) -> Binary {
    let (bytes, layout) = w.to_bytes();
    let mut fields64 = vec![layout.tensor_count_at, layout.kv_count_at];
    let mut fields32 = vec![];
    for &(n_dims_at, dim_at, type_at, offset_at) in &layout.tensor_fields {
        fields64.extend([dim_at, offset_at]);
        fields32.extend([n_dims_at, type_at]);
    }
    Binary {
        bytes,
        header_len: layout.data_start,
        fields64,
        fields32,
    }
}

fn tiny_config(hidden: usize, intermediate: usize) -> LlamaConfig {
    serde_json::from_value(json!({
        "hidden_size": hidden, "intermediate_size": intermediate,
        "num_attention_heads": 2, "num_key_value_heads": 1, "num_hidden_layers": 1,
        "vocab_size": 16, "max_position_embeddings": 64, "rms_norm_eps": 1e-5,
    }))
    .unwrap()
}

fn safetensors_bytes(tensors: &[(String, OwnedTensor)]) -> Vec<u8> {
    safetensors_bytes_with(tensors, &[])
}

/// A safetensors file with `extra` entries in its `__metadata__`.
fn safetensors_bytes_with(
    tensors: &[(String, OwnedTensor)],
    extra: &[(String, String)],
) -> Vec<u8> {
    let mut meta = HashMap::new();
    meta.insert("format".to_string(), "pt".to_string());
    meta.extend(extra.iter().cloned());
    let views: Vec<(&str, TensorView<'_>)> = tensors
        .iter()
        .map(|(n, t)| {
            let view = TensorView::new(t.dtype, t.shape.clone(), &t.bytes).unwrap();
            (n.as_str(), view)
        })
        .collect();
    safetensors::serialize(views.iter().map(|(n, v)| (*n, v)), Some(meta)).unwrap()
}

/// A safetensors file's header JSON and data.
fn split_safetensors(bytes: &[u8]) -> Option<(Value, Vec<u8>)> {
    let n = u64::from_le_bytes(bytes.get(..8)?.try_into().ok()?) as usize;
    let header = bytes.get(8..8usize.checked_add(n)?)?;
    Some((
        serde_json::from_slice(header).ok()?,
        bytes[8 + n..].to_vec(),
    ))
}

fn join_safetensors(header: &Value, data: &[u8]) -> Vec<u8> {
    let json = serde_json::to_vec(header).unwrap();
    let mut out = (json.len() as u64).to_le_bytes().to_vec();
    out.extend(json);
    out.extend(data);
    out
}

/// A safetensors file as a binary: its header length is the one 8-byte field.
fn safetensors_binary(bytes: Vec<u8>) -> Binary {
    let header_len = split_safetensors(&bytes)
        .map(|(h, _)| 8 + serde_json::to_vec(&h).unwrap().len())
        .unwrap_or(bytes.len())
        .min(bytes.len());
    Binary {
        bytes,
        header_len,
        fields64: vec![0],
        fields32: vec![],
    }
}

fn config_json(config: &LlamaConfig) -> Vec<u8> {
    serde_json::to_vec_pretty(&config.to_hf_json()).unwrap()
}

/// The dense tensors of a tiny HF checkpoint in several dtypes (one the loader cannot convert).
fn dense_tensors() -> Vec<(String, OwnedTensor)> {
    let bf16: Vec<half::bf16> = weights(64, 3)
        .into_iter()
        .map(half::bf16::from_f32)
        .collect();
    vec![
        (
            "model.embed_tokens.weight".into(),
            OwnedTensor::f32(vec![16, 8], &weights(128, 1)),
        ),
        (
            "model.norm.weight".into(),
            OwnedTensor::f16_from_f32(vec![8], &[1.0; 8]),
        ),
        (
            "model.layers.0.self_attn.q_proj.weight".into(),
            OwnedTensor::from_pod(Dtype::BF16, vec![8, 8], &bf16),
        ),
        (
            "model.layers.0.mlp.up_proj.weight".into(),
            OwnedTensor::from_pod(Dtype::I32, vec![16, 8], &[7i32; 128]),
        ),
    ]
}

/// A single-file HF directory: `config.json` and `model.safetensors`.
fn single_dir() -> DirFiles {
    DirFiles(vec![
        (
            "config.json",
            Kind::Json,
            Some(config_json(&tiny_config(8, 16))),
        ),
        (
            "model.safetensors",
            Kind::Safetensors,
            Some(safetensors_bytes(&dense_tensors())),
        ),
    ])
}

/// A sharded HF directory: `config.json`, two shards and `model.safetensors.index.json`.
fn sharded_dir() -> DirFiles {
    let tensors = dense_tensors();
    let (a, b) = tensors.split_at(2);
    let shard = |i: usize| format!("model-0000{i}-of-00002.safetensors");
    let mut weight_map = serde_json::Map::new();
    for (name, _) in a {
        weight_map.insert(name.clone(), json!(shard(1)));
    }
    for (name, _) in b {
        weight_map.insert(name.clone(), json!(shard(2)));
    }
    let index = json!({"metadata": {"total_size": 1000}, "weight_map": weight_map});
    DirFiles(vec![
        (
            "config.json",
            Kind::Json,
            Some(config_json(&tiny_config(8, 16))),
        ),
        (
            "model.safetensors.index.json",
            Kind::Json,
            Some(serde_json::to_vec_pretty(&index).unwrap()),
        ),
        (
            "model-00001-of-00002.safetensors",
            Kind::Safetensors,
            Some(safetensors_bytes(a)),
        ),
        (
            "model-00002-of-00002.safetensors",
            Kind::Safetensors,
            Some(safetensors_bytes(b)),
        ),
    ])
}

/// A packed checkpoint of a tiny LLaMA (hidden 32, ffn 64): every linear RTN-quantized to
/// 3 bits in groups of 16, per-OC or per-IC, with its `quantization_config`.
fn packed_dir() -> DirFiles {
    packed_dir_with(false)
}

/// [`packed_dir`] with symmetric groups or not.
fn packed_dir_with(sym: bool) -> DirFiles {
    let config = tiny_config(32, 64);
    let mut tensors = vec![(
        "model.embed_tokens.weight".to_string(),
        OwnedTensor::f16_from_f32(vec![16, 32], &weights(512, 9)),
    )];
    for name in [
        "model.norm.weight",
        "model.layers.0.input_layernorm.weight",
        "model.layers.0.post_attention_layernorm.weight",
    ] {
        tensors.push((name.into(), OwnedTensor::f16_from_f32(vec![32], &[1.0; 32])));
    }
    let mut dims = BTreeMap::new();
    let mut layouts = Vec::new();
    for (i, kind) in LinearKind::ALL.into_iter().enumerate() {
        let module = kind.hf_prefix(0);
        let [out, inp] = model_llama::linear_shape(&config, kind);
        let dim = if i % 2 == 0 {
            QuantDim::Oc
        } else {
            QuantDim::Ic
        };
        let q = quantize_rtn(
            &weights(out * inp, i as u32),
            out,
            inp,
            QuantConfig::new(3, GroupSize::Len(16), dim)
                .unwrap()
                .with_sym(sym),
        )
        .unwrap();
        tensors.extend(packed_tensors(&module, &q.pack()));
        layouts.push(packed_layout_metadata(&module, &q.pack()));
        dims.insert(module, dim);
    }
    let mut config_json = config.to_hf_json();
    config_json["quantization_config"] = serde_json::to_value(QuantizationConfig {
        quant_method: "adadim".into(),
        algorithm: "rtn".into(),
        bits: 3,
        group_size: GroupSize::Len(16),
        dims,
        head: None,
        sym,
    })
    .unwrap();
    DirFiles(vec![
        (
            "config.json",
            Kind::Json,
            Some(serde_json::to_vec_pretty(&config_json).unwrap()),
        ),
        (
            "model.safetensors",
            Kind::Safetensors,
            Some(safetensors_bytes_with(&tensors, &layouts)),
        ),
    ])
}

fn tokenizer_json() -> Vec<u8> {
    use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
    use tokenizers::models::bpe::BPE;
    use tokenizers::pre_tokenizers::byte_level::ByteLevel;
    use tokenizers::{AddedToken, PreTokenizerWrapper, Tokenizer};

    let vocab: tokenizers::models::bpe::Vocab = TOKENS
        .iter()
        .enumerate()
        .map(|(i, t)| (t.to_string(), i as u32))
        .collect();
    let merges = MERGES
        .iter()
        .map(|m| {
            let (a, b) = m.split_once(' ').unwrap();
            (a.to_string(), b.to_string())
        })
        .collect();
    let bpe = BPE::builder()
        .vocab_and_merges(vocab, merges)
        .build()
        .unwrap();
    let mut t = Tokenizer::new(bpe);
    t.with_pre_tokenizer(Some(PreTokenizerWrapper::from(ByteLevel::new(
        false, true, true,
    ))));
    t.with_decoder(Some(ByteLevelDecoder::default()));
    t.add_special_tokens(&[AddedToken::from("<|endoftext|>", true)]);
    t.to_string(true).unwrap().into_bytes()
}

fn tokenizer_dir() -> DirFiles {
    let config = json!({"bos_token": "<|endoftext|>", "eos_token": {"content": "<|endoftext|>"}});
    DirFiles(vec![
        ("tokenizer.json", Kind::Json, Some(tokenizer_json())),
        (
            "tokenizer_config.json",
            Kind::Json,
            Some(serde_json::to_vec(&config).unwrap()),
        ),
    ])
}

// ---------------------------------------------------------------------------------------------
// The loaders, read through

/// Opens a GGUF file as the command line does (the container, then the LLaMA checkpoint and
/// its tokenizer) and reads every tensor; returns the errors met.
fn read_gguf(path: &Path) -> Vec<String> {
    let mut errors = vec![];
    if let Some(f) = note_err(GgufFile::open(path), &mut errors) {
        for (key, _) in f.metadata() {
            let _ = (f.require_usize(key), f.require_f64(key), f.require_str(key));
        }
        for t in f.tensors() {
            note_err(f.tensor_bytes(&t.name), &mut errors);
            note_err(f.tensor_f32(&t.name), &mut errors);
        }
    }
    if let Some(c) = note_err(GgufCheckpoint::open(path), &mut errors) {
        if let Some(tok) = note_err(c.tokenizer(), &mut errors) {
            use_tokenizer(&tok);
        }
        for name in c.names() {
            note_err(c.load(&name), &mut errors);
        }
    }
    errors
}

/// Encodes and decodes with a tokenizer that loaded: an error is acceptable there (a strange
/// vocabulary may not cover the text), a panic is not.
fn use_tokenizer(tok: &LlamaTokenizer) {
    if let Ok(ids) = tok.encode("abc ab<|endoftext|> cd12") {
        let _ = tok.decode(&ids);
    }
}

/// Opens a safetensors directory and reads every tensor, raw and as f32.
fn read_safetensors_dir(dir: &Path) -> Vec<String> {
    let mut errors = vec![];
    if let Some(d) = note_err(SafetensorsDir::open(dir), &mut errors) {
        for name in d.names() {
            note_err(d.raw(&name), &mut errors);
            note_err(d.load(&name), &mut errors);
        }
        note_err(d.load("model.layers.9.mlp.down_proj.weight"), &mut errors);
    }
    errors
}

/// Opens a packed directory and reads every linear packed and dequantized, and every tensor.
fn read_packed_dir(dir: &Path) -> Vec<String> {
    let mut errors = vec![];
    match PackedDir::open(dir) {
        Err(e) => errors.push(chain(&e)),
        Ok(None) => {}
        Ok(Some(p)) => {
            let mut modules: Vec<String> = p.quantization().dims.keys().cloned().collect();
            modules.extend(LinearKind::ALL.map(|k| k.hf_prefix(0)));
            for m in &modules {
                if let Some(packed) = note_err(p.packed_linear(m), &mut errors) {
                    let _ = packed.dequantize();
                }
                note_err(p.load(&format!("{m}.weight")), &mut errors);
            }
            for name in ["model.embed_tokens.weight", "model.norm.weight"] {
                note_err(p.load(name), &mut errors);
            }
        }
    }
    errors
}

fn read_config(path: &Path) -> Vec<String> {
    let mut errors = vec![];
    if let Some(c) = note_err(LlamaConfig::from_json_file(path), &mut errors) {
        let _ = (c.head_dim(), c.context_length(), c.to_hf_json());
    }
    errors
}

fn read_tokenizer(path: &Path) -> Vec<String> {
    let mut errors = vec![];
    if let Some(tok) = note_err(LlamaTokenizer::from_file(path), &mut errors) {
        use_tokenizer(&tok);
    }
    errors
}

// ---------------------------------------------------------------------------------------------
// Runs of one input

thread_local! {
    /// This thread's scratch directory, in memory where the system has a tmpfs: each case
    /// writes its files afresh, and on a disk file system that would dominate the run time.
    static SCRATCH: tempfile::TempDir = {
        let shm = Path::new("/dev/shm");
        match shm.is_dir() {
            true => tempfile::tempdir_in(shm).or_else(|_| tempfile::tempdir()),
            false => tempfile::tempdir(),
        }
        .unwrap()
    };
}

/// Some panics inside `tokenizers` are caught by the loader; with `RUST_BACKTRACE` set the
/// default hook would symbolize a backtrace for each (megabytes of allocations that are not the
/// parser's). The message alone is kept.
fn quiet_panics() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| std::panic::set_hook(Box::new(|info| eprintln!("{info}"))));
}

/// An empty directory `name` in this thread's scratch directory.
fn fresh_dir(name: &str) -> std::path::PathBuf {
    quiet_panics();
    let dir = SCRATCH.with(|s| s.path().join(name));
    if dir.exists() {
        std::fs::remove_dir_all(&dir).unwrap();
    }
    std::fs::create_dir(&dir).unwrap();
    dir
}

/// Reads `bytes` as a GGUF file, checks the properties; returns the errors met.
fn run_gguf(bytes: &[u8]) -> Result<Vec<String>, TestCaseError> {
    let path = fresh_dir("gguf").join("model.gguf");
    std::fs::write(&path, bytes).unwrap();
    let (errors, largest) = largest_allocation(|| read_gguf(&path));
    check_errors(&errors, &path)?;
    check_allocation(largest, bytes.len())?;
    Ok(errors)
}

/// Reads `files` as a directory with `read`, checks the properties; returns the errors met.
fn run_dir(files: &DirFiles, read: fn(&Path) -> Vec<String>) -> Result<Vec<String>, TestCaseError> {
    let root = fresh_dir("ckpt");
    let total = files.write(&root);
    let (errors, largest) = largest_allocation(|| read(&root));
    check_errors(&errors, &root)?;
    check_allocation(largest, total)?;
    Ok(errors)
}

fn run_json_file(
    name: &str,
    bytes: &[u8],
    read: fn(&Path) -> Vec<String>,
) -> Result<(), TestCaseError> {
    let path = fresh_dir("json").join(name);
    std::fs::write(&path, bytes).unwrap();
    let (errors, largest) = largest_allocation(|| read(&path));
    check_errors(&errors, &path)?;
    check_allocation(largest, bytes.len())
}

fn mutated_json(doc: &[u8], muts: &[Result<JsonMutation, ByteMutation>]) -> Vec<u8> {
    let mut bytes = doc.to_vec();
    for m in muts {
        match m {
            Ok(j) => {
                if let Ok(mut v) = serde_json::from_slice::<Value>(&bytes) {
                    apply_json(&mut v, j);
                    bytes = serde_json::to_vec(&v).unwrap();
                }
            }
            Err(b) => {
                let mut bin = Binary {
                    header_len: bytes.len(),
                    bytes,
                    fields64: vec![],
                    fields32: vec![],
                };
                bin.apply(b);
                bytes = bin.bytes;
            }
        }
    }
    bytes
}

fn json_or_byte_mutation() -> impl Strategy<Value = Result<JsonMutation, ByteMutation>> {
    prop_oneof![
        3 => json_mutation().prop_map(Ok),
        1 => byte_mutation().prop_map(Err),
    ]
}

// ---------------------------------------------------------------------------------------------
// The properties

// Built once: every case mutates a copy.
static GGUF: LazyLock<Binary> = LazyLock::new(gguf_fixture);
static SINGLE: LazyLock<DirFiles> = LazyLock::new(single_dir);
static SHARDED: LazyLock<DirFiles> = LazyLock::new(sharded_dir);
static PACKED: LazyLock<DirFiles> = LazyLock::new(packed_dir);
static TOKENIZER: LazyLock<DirFiles> = LazyLock::new(tokenizer_dir);
static CONFIG: LazyLock<Vec<u8>> = LazyLock::new(|| config_json(&tiny_config(8, 16)));

#[test]
fn valid_fixtures_load() {
    let dir = tempfile::tempdir().unwrap();
    let gguf = dir.path().join("model.gguf");
    std::fs::write(&gguf, gguf_fixture().bytes).unwrap();
    assert_eq!(read_gguf(&gguf), Vec::<String>::new());
    let tokenizer = |d: &Path| read_tokenizer(&d.join("tokenizer.json"));
    // In the HF fixtures the I32 tensor cannot be read as f32 and `layers.9` does not exist.
    for (name, files, read, errors) in [
        (
            "single",
            single_dir(),
            read_safetensors_dir as fn(&Path) -> Vec<String>,
            2,
        ),
        ("sharded", sharded_dir(), read_safetensors_dir, 2),
        ("packed", packed_dir(), read_packed_dir, 0),
        ("tokenizer", tokenizer_dir(), tokenizer, 0),
    ] {
        let root = dir.path().join(name);
        std::fs::create_dir(&root).unwrap();
        files.write(&root);
        let got = read(&root);
        assert_eq!(got.len(), errors, "{name}: {got:?}");
    }
    let packed = PackedDir::open(&dir.path().join("packed"))
        .unwrap()
        .unwrap();
    assert_eq!(packed.quantization().dims.len(), 7);
    let tok = LlamaTokenizer::from_file(&dir.path().join("tokenizer/tokenizer.json")).unwrap();
    assert_eq!(tok.eos_id(), Some(0));
    assert_eq!(
        tok.decode(&tok.encode("abc ab cd12").unwrap()).unwrap(),
        "abc ab cd12"
    );
    let c = GgufCheckpoint::open(&gguf).unwrap();
    assert_eq!(c.names().len(), 11);
    let config = dir.path().join("single/config.json");
    assert_eq!(read_config(&config), Vec::<String>::new());
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn gguf_mutations(muts in prop::collection::vec(byte_mutation(), 1..4)) {
        let mut file = GGUF.clone();
        for m in &muts {
            file.apply(m);
        }
        run_gguf(&file.bytes)?;
    }

    #[test]
    fn safetensors_single_mutations(muts in prop::collection::vec(file_mutation(), 1..4)) {
        let mut files = SINGLE.clone();
        for m in &muts {
            files.apply(m);
        }
        run_dir(&files, read_safetensors_dir)?;
    }

    #[test]
    fn safetensors_sharded_mutations(muts in prop::collection::vec(file_mutation(), 1..4)) {
        let mut files = SHARDED.clone();
        for m in &muts {
            files.apply(m);
        }
        run_dir(&files, read_safetensors_dir)?;
    }

    #[test]
    fn packed_mutations(muts in prop::collection::vec(file_mutation(), 1..4)) {
        let mut files = PACKED.clone();
        for m in &muts {
            files.apply(m);
        }
        run_dir(&files, read_packed_dir)?;
    }

    #[test]
    fn config_mutations(muts in prop::collection::vec(json_or_byte_mutation(), 1..4)) {
        let bytes = mutated_json(&CONFIG, &muts);
        run_json_file("config.json", &bytes, read_config)?;
    }

    #[test]
    fn tokenizer_mutations(muts in prop::collection::vec(file_mutation(), 1..4)) {
        let mut files = TOKENIZER.clone();
        for m in &muts {
            files.apply(m);
        }
        run_dir(&files, |d| read_tokenizer(&d.join("tokenizer.json")))?;
    }
}

// ---------------------------------------------------------------------------------------------
// Regressions: inputs the fuzzing found, fixed

/// The file's text as JSON, changed by `f`.
fn edit_json(bytes: &mut Option<Vec<u8>>, f: impl FnOnce(&mut Value)) {
    let mut doc: Value = serde_json::from_slice(bytes.as_ref().unwrap()).unwrap();
    f(&mut doc);
    *bytes = Some(serde_json::to_vec(&doc).unwrap());
}

fn file_mut<'a>(files: &'a mut DirFiles, name: &str) -> &'a mut Option<Vec<u8>> {
    &mut files.0.iter_mut().find(|(n, _, _)| *n == name).unwrap().2
}

/// `GgufCheckpoint::open` listed the tensor names of every layer the header claimed: a
/// `block_count` of 2^40 never finished.
#[test]
fn regression_gguf_huge_block_count_is_not_enumerated() {
    let mut w = gguf_writer();
    for (key, v) in &mut w.kvs {
        if key == "llama.block_count" {
            *v = Val::U64(1 << 40);
        }
    }
    let errors = run_gguf(&gguf_binary(&w).bytes).unwrap();
    assert!(errors.is_empty(), "{errors:?}");
}

/// A shard name in `model.safetensors.index.json` was joined to the directory as given: `/`
/// or `../x` opened files outside it, and the error named neither the index nor the directory.
#[test]
fn regression_index_shard_outside_the_directory() {
    for bad in [
        "/",
        "../model-00001-of-00002.safetensors",
        "/etc/passwd",
        "",
    ] {
        let mut files = SHARDED.clone();
        edit_json(
            file_mut(&mut files, "model.safetensors.index.json"),
            |doc| {
                doc["weight_map"]["model.norm.weight"] = json!(bad);
            },
        );
        let errors = run_dir(&files, read_safetensors_dir).unwrap();
        assert!(
            errors.len() == 1 && errors[0].contains("model.safetensors.index.json"),
            "{bad:?}: {errors:?}"
        );
    }
}

/// A symmetric checkpoint reads; one that says it is symmetric while a zero point is off the
/// centre code is refused, naming the tensor.
#[test]
fn symmetric_checkpoints_hold_their_zero_points_at_the_centre() {
    let sym = packed_dir_with(true);
    assert_eq!(
        run_dir(&sym, read_packed_dir).unwrap(),
        Vec::<String>::new()
    );
    let mut files = PACKED.clone();
    edit_json(file_mut(&mut files, "config.json"), |doc| {
        doc["quantization_config"]["sym"] = json!(true);
    });
    let errors = run_dir(&files, read_packed_dir).unwrap();
    assert!(
        errors
            .iter()
            .any(|e| e.contains(".zeros`: the checkpoint is symmetric")),
        "{errors:?}"
    );
}

/// A packed checkpoint whose group size does not divide a linear's dimension (config.json's
/// sizes changed) failed with the quantizer's error alone, naming no file.
#[test]
fn regression_packed_settings_not_fitting_the_config() {
    let mut files = PACKED.clone();
    edit_json(file_mut(&mut files, "config.json"), |doc| {
        doc["intermediate_size"] = json!(24);
    });
    let errors = run_dir(&files, read_packed_dir).unwrap();
    assert!(
        errors.iter().any(|e| e.contains("does not divide")),
        "{errors:?}"
    );
}

/// Shapes from config.json whose buffer sizes wrap around to zero (hidden 2^34 at 8 bits, groups
/// of 16) passed validation with empty tensors, and dequantizing them indexed out of bounds.
#[cfg(target_pointer_width = "64")]
#[test]
fn regression_packed_shape_overflow() {
    let mut files = PACKED.clone();
    let module = "model.layers.0.self_attn.q_proj";
    edit_json(file_mut(&mut files, "config.json"), |doc| {
        doc["hidden_size"] = json!(1u64 << 34);
        doc["head_dim"] = json!(1u64 << 33);
        doc["quantization_config"]["bits"] = json!(8);
    });
    let empty = |dtype| OwnedTensor {
        dtype,
        shape: vec![0, 0],
        bytes: vec![],
    };
    let tensors = vec![
        (format!("{module}.qweight"), empty(Dtype::U32)),
        (format!("{module}.scales"), empty(Dtype::F16)),
        (format!("{module}.zeros"), empty(Dtype::F16)),
    ];
    // A layout record that agrees with the config, so the shape check is what is reached.
    let layout = json!({
        "format_version": model_llama::packed::LAYOUT_VERSION,
        "dim": "oc", "bits": 8, "group_size": 16, "shape": [1u64 << 34, 1u64 << 34],
    });
    *file_mut(&mut files, "model.safetensors") = Some(safetensors_bytes_with(
        &tensors,
        &[(module.to_string(), layout.to_string())],
    ));
    let errors = run_dir(&files, read_packed_dir).unwrap();
    assert!(
        errors
            .iter()
            .any(|e| e.contains(module) && e.contains("too large")),
        "{errors:?}"
    );
}

/// `tokenizers` panics on a tokenizer.json cut short inside its `decoder`, on a
/// `continuing_subword_prefix` longer than a merge's second token, and on a `Precompiled`
/// normalizer whose charsmap is not base64: each is a clean error naming the file.
#[test]
fn regression_tokenizer_inputs_that_panic_in_tokenizers() {
    let original = tokenizer_json();
    let with = |f: fn(&mut Value)| {
        let mut bytes = Some(original.clone());
        edit_json(&mut bytes, f);
        bytes.unwrap()
    };
    let at = original
        .windows(9)
        .position(|w| w == b"\"decoder\"")
        .unwrap();
    let inputs = [
        ("cut in the decoder", original[..at + 30].to_vec()),
        (
            "long subword prefix",
            with(|doc| doc["model"]["continuing_subword_prefix"] = json!("F32")),
        ),
        (
            "precompiled charsmap",
            with(|doc| {
                doc["normalizer"] = json!({"type": "Precompiled", "precompiled_charsmap": "!!"})
            }),
        ),
    ];
    for (what, bytes) in inputs {
        let mut files = TOKENIZER.clone();
        *file_mut(&mut files, "tokenizer.json") = Some(bytes);
        let errors = run_dir(&files, |d| read_tokenizer(&d.join("tokenizer.json"))).unwrap();
        assert!(
            errors.len() == 1 && errors[0].contains("tokenizer.json"),
            "{what}: {errors:?}"
        );
    }
}

#[test]
fn allocation_accounting_sees_large_requests() {
    let (v, largest) = largest_allocation(|| vec![1u8; 3 << 20]);
    assert_eq!(v.len(), 3 << 20);
    assert!(largest >= 3 << 20, "{largest}");
    let (_, largest) = largest_allocation(|| 1 + 1);
    assert_eq!(largest, 0);
}

/// A linear's dim changed in config.json (the layout its tensors carry says otherwise) is an
/// error naming that linear, not a silently misread weight.
#[test]
fn a_dim_that_disagrees_with_the_tensors_layout_is_refused() {
    let mut files = PACKED.clone();
    let module = "model.layers.0.self_attn.q_proj";
    edit_json(file_mut(&mut files, "config.json"), |doc| {
        doc["quantization_config"]["dims"][module] = json!("ic");
    });
    let errors = run_dir(&files, read_packed_dir).unwrap();
    assert!(!errors.is_empty());
    for e in &errors {
        assert!(e.contains(module) && e.contains("disagrees"), "{e}");
    }
}

/// A layout record of another format version is refused, naming the linear and the version.
#[test]
fn an_unknown_layout_version_is_refused() {
    let mut files = PACKED.clone();
    let module = "model.layers.0.mlp.down_proj";
    let bytes = file_mut(&mut files, "model.safetensors");
    let (mut header, data) = split_safetensors(bytes.as_ref().unwrap()).unwrap();
    let record = header["__metadata__"][module].as_str().unwrap().to_string();
    let mut layout: Value = serde_json::from_str(&record).unwrap();
    layout["format_version"] = json!(99);
    header["__metadata__"][module] = json!(layout.to_string());
    *bytes = Some(join_safetensors(&header, &data));
    let errors = run_dir(&files, read_packed_dir).unwrap();
    assert!(!errors.is_empty());
    for e in &errors {
        assert!(e.contains(module) && e.contains("99"), "{e}");
    }
}
