//! A small GGUF file written here is read back exactly; corrupt variants give `Malformed` errors
//! naming the file, never a panic.

use crate::gguf_support;

use std::path::{Path, PathBuf};

use gguf_support::{GgufWriter, Layout, Val, f16_bits, str_arr};
use model_llama::ModelError;
use model_llama::gguf::{GgmlType, GgufFile, GgufValue};

fn sample() -> GgufWriter {
    // Q8_0: one block, d = 0.25, q = -16..16.
    let mut q8 = f16_bits(0.25).to_vec();
    q8.extend((0..32).map(|i| (i as i8 - 16) as u8));
    GgufWriter::new()
        .kv("general.architecture", Val::Str("llama".into()))
        .kv("u8", Val::U8(200))
        .kv("i8", Val::I8(-5))
        .kv("u16", Val::U16(60000))
        .kv("i16", Val::I16(-30000))
        .kv("u32", Val::U32(4_000_000_000))
        .kv("i32", Val::I32(-2_000_000_000))
        .kv("u64", Val::U64(1 << 40))
        .kv("i64", Val::I64(-(1 << 40)))
        .kv("f32", Val::F32(1.5))
        .kv("f64", Val::F64(-2.25))
        .kv("bool", Val::Bool(true))
        .kv("strings", str_arr(&["a", "", "ünï"]))
        .kv("ints", Val::Arr(5, vec![Val::I32(1), Val::I32(-2)]))
        .kv(
            "nested",
            Val::Arr(9, vec![Val::Arr(4, vec![Val::U32(7)]), Val::Arr(4, vec![])]),
        )
        .f32_tensor("mat", &[3, 2], &[1., 2., 3., 4., 5., 6.])
        .tensor("q8", &[32], 8, q8)
        .f32_tensor("vec", &[5], &[0.5, -0.5, 1.0, 2.0, 3.0])
}

fn write(dir: &Path, name: &str, bytes: &[u8]) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, bytes).unwrap();
    path
}

/// Opening `bytes` must fail with `Malformed` naming the file; returns the message.
fn expect_malformed(dir: &Path, bytes: &[u8]) -> String {
    let path = write(dir, "bad.gguf", bytes);
    match GgufFile::open(&path) {
        Err(ModelError::Malformed { path: p, msg }) => {
            assert_eq!(p, path);
            let shown = ModelError::malformed(&p, msg.clone()).to_string();
            assert!(shown.contains("bad.gguf"), "{shown}");
            msg
        }
        Err(other) => panic!("expected Malformed, got {other}"),
        Ok(_) => panic!("corrupt file opened without error"),
    }
}

#[test]
fn reads_back_metadata_and_tensors() {
    let dir = tempfile::tempdir().unwrap();
    for version in [2, 3] {
        let mut w = sample();
        w.version = version;
        let path = write(dir.path(), "ok.gguf", &w.to_bytes().0);
        let f = GgufFile::open(&path).unwrap();
        assert_eq!(f.version(), version);
        assert_eq!(f.metadata().len(), 15);
        assert_eq!(f.require_str("general.architecture").unwrap(), "llama");
        assert_eq!(f.get("u8"), Some(&GgufValue::U8(200)));
        assert_eq!(f.get("i8"), Some(&GgufValue::I8(-5)));
        assert_eq!(f.get("u16"), Some(&GgufValue::U16(60000)));
        assert_eq!(f.get("i16"), Some(&GgufValue::I16(-30000)));
        assert_eq!(f.get("u32"), Some(&GgufValue::U32(4_000_000_000)));
        assert_eq!(f.get("i32"), Some(&GgufValue::I32(-2_000_000_000)));
        assert_eq!(f.get("u64"), Some(&GgufValue::U64(1 << 40)));
        assert_eq!(f.get("i64"), Some(&GgufValue::I64(-(1 << 40))));
        assert_eq!(f.get("f32"), Some(&GgufValue::F32(1.5)));
        assert_eq!(f.get("f64"), Some(&GgufValue::F64(-2.25)));
        assert_eq!(f.get("bool"), Some(&GgufValue::Bool(true)));
        let strings: Vec<_> = f
            .require_array("strings")
            .unwrap()
            .iter()
            .map(|v| v.as_str().unwrap())
            .collect();
        assert_eq!(strings, ["a", "", "ünï"]);
        assert_eq!(
            f.get("ints"),
            Some(&GgufValue::Array(vec![
                GgufValue::I32(1),
                GgufValue::I32(-2)
            ]))
        );
        assert_eq!(
            f.get("nested"),
            Some(&GgufValue::Array(vec![
                GgufValue::Array(vec![GgufValue::U32(7)]),
                GgufValue::Array(vec![])
            ]))
        );
        assert_eq!(f.require_usize("u32").unwrap(), 4_000_000_000);
        assert!(f.require_usize("i8").is_err(), "negative is not a usize");
        assert_eq!(f.require_f64("f32").unwrap(), 1.5);
        assert!(matches!(
            f.require_str("missing"),
            Err(ModelError::Malformed { .. })
        ));

        let names: Vec<_> = f.tensors().iter().map(|t| t.name.as_str()).collect();
        assert_eq!(names, ["mat", "q8", "vec"]);
        let mat = f.tensor_f32("mat").unwrap();
        assert_eq!(mat.shape, [2, 3], "ne [3, 2] is row-major [2, 3]");
        assert_eq!(mat.data, [1., 2., 3., 4., 5., 6.]);
        assert_eq!(f.tensor_info("q8").unwrap().dtype, GgmlType::Q8_0);
        let q8 = f.tensor_f32("q8").unwrap();
        let expected: Vec<f32> = (0..32).map(|i| (i as f32 - 16.0) * 0.25).collect();
        assert_eq!(q8.data, expected);
        assert_eq!(
            f.tensor_f32("vec").unwrap().data,
            [0.5, -0.5, 1.0, 2.0, 3.0]
        );
        assert!(matches!(
            f.tensor_f32("nope"),
            Err(ModelError::MissingTensor { .. })
        ));
    }
}

#[test]
fn honours_general_alignment() {
    let dir = tempfile::tempdir().unwrap();
    let mut w = sample().kv("general.alignment", Val::U32(256));
    w.alignment = 256;
    let (bytes, layout) = w.to_bytes();
    assert_eq!(layout.data_start % 256, 0);
    let path = write(dir.path(), "aligned.gguf", &bytes);
    let f = GgufFile::open(&path).unwrap();
    assert_eq!(f.tensor_info("vec").unwrap().offset, 512);
    assert_eq!(
        f.tensor_f32("vec").unwrap().data,
        [0.5, -0.5, 1.0, 2.0, 3.0]
    );
    assert_eq!(f.tensor_f32("mat").unwrap().data, [1., 2., 3., 4., 5., 6.]);
}

#[test]
fn every_truncation_is_malformed() {
    let dir = tempfile::tempdir().unwrap();
    let (bytes, _) = sample().to_bytes();
    for len in 0..bytes.len() {
        expect_malformed(dir.path(), &bytes[..len]);
    }
}

fn patch(bytes: &[u8], at: usize, with: &[u8]) -> Vec<u8> {
    let mut b = bytes.to_vec();
    b[at..at + with.len()].copy_from_slice(with);
    b
}

#[test]
fn corrupt_headers_are_malformed() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (bytes, l): (Vec<u8>, Layout) = sample().to_bytes();
    let (_, mat_dim, _, mat_offset) = l.tensor_fields[0];
    let (_, _, _, vec_offset) = l.tensor_fields[2];

    assert!(expect_malformed(d, &patch(&bytes, 0, b"GGML")).contains("magic"));
    for v in [0u32, 1, 4, 0x0300_0000] {
        let msg = expect_malformed(d, &patch(&bytes, 4, &v.to_le_bytes()));
        assert!(msg.contains("version"), "{msg}");
    }
    // Absurd counts must be rejected before anything is allocated.
    for at in [l.tensor_count_at, l.kv_count_at] {
        for n in [u64::MAX, 1 << 40, 1000] {
            expect_malformed(d, &patch(&bytes, at, &n.to_le_bytes()));
        }
    }
    // Key length of the first metadata entry.
    expect_malformed(d, &patch(&bytes, 24, &u64::MAX.to_le_bytes()));
    // Tensor data past the end, misaligned, overflowing sizes, too many dims, bad bool.
    let contains = |b: Vec<u8>, what: &str| {
        let msg = expect_malformed(d, &b);
        assert!(msg.contains(what), "`{msg}` should mention `{what}`");
    };
    contains(
        patch(&bytes, vec_offset, &(1u64 << 20).to_le_bytes()),
        "outside",
    );
    contains(
        patch(&bytes, vec_offset, &u64::MAX.to_le_bytes()),
        "aligned",
    );
    contains(
        patch(&bytes, vec_offset, &(u64::MAX - 31).to_le_bytes()),
        "outside",
    );
    contains(patch(&bytes, mat_offset, &8u64.to_le_bytes()), "aligned");
    contains(patch(&bytes, mat_dim, &u64::MAX.to_le_bytes()), "overflow");
    contains(
        patch(&bytes, mat_dim, &(1u64 << 62).to_le_bytes()),
        "overflow",
    );
    contains(
        patch(&bytes, mat_dim, &(1u64 << 40).to_le_bytes()),
        "outside",
    );
    contains(
        patch(&bytes, l.tensor_fields[0].0, &5u32.to_le_bytes()),
        "dimensions",
    );
    // A Q8_0 tensor whose rows are not whole blocks.
    let mut w = sample();
    w.tensors[1].ne = vec![16, 2];
    assert!(expect_malformed(d, &w.to_bytes().0).contains("block"));
    let w = GgufWriter::new().kv("flag", Val::U8(2));
    let mut b = w.to_bytes().0;
    let ty_at = 24 + 8 + 4;
    b[ty_at..ty_at + 4].copy_from_slice(&7u32.to_le_bytes()); // claim bool, payload 2
    contains(b, "bool");
    // Unknown metadata value type.
    let mut b = GgufWriter::new().kv("x", Val::U32(1)).to_bytes().0;
    b[ty_at - 3..ty_at + 1].copy_from_slice(&99u32.to_le_bytes());
    contains(b, "type 99");
    // An array claiming more elements than bytes left.
    let mut b = GgufWriter::new().kv("arr", str_arr(&["x"])).to_bytes().0;
    let count_at = 24 + 8 + 3 + 4 + 4;
    b[count_at..count_at + 8].copy_from_slice(&(1u64 << 59).to_le_bytes());
    contains(b, "array elements");
    // Duplicates.
    contains(sample().kv("u8", Val::U8(1)).to_bytes().0, "duplicate");
    contains(
        sample().f32_tensor("vec", &[1], &[0.0]).to_bytes().0,
        "duplicate",
    );
    // Alignment that is not a power of two.
    contains(
        sample().kv("general.alignment", Val::U32(24)).to_bytes().0,
        "alignment",
    );
    // Invalid UTF-8 in a key.
    let mut b = GgufWriter::new().kv("abc", Val::U8(1)).to_bytes().0;
    b[32] = 0xff;
    contains(b, "UTF-8");
}

#[test]
fn unsupported_tensor_types_are_reported_on_load() {
    let dir = tempfile::tempdir().unwrap();
    // Q4_K (id 12) has a known size (bounds are checked) but no dequantizer; id 99 is unknown.
    let w = GgufWriter::new()
        .tensor("k4", &[256], 12, vec![0; 144])
        .tensor("odd", &[4], 99, vec![0; 16]);
    let path = write(dir.path(), "types.gguf", &w.to_bytes().0);
    let f = GgufFile::open(&path).unwrap();
    for (name, ty) in [("k4", "Q4_K"), ("odd", "99")] {
        match f.tensor_f32(name) {
            Err(e @ ModelError::Unsupported { .. }) => {
                let msg = e.to_string();
                assert!(msg.contains("types.gguf") && msg.contains(ty), "{msg}");
            }
            other => panic!("expected Unsupported for {name}, got {other:?}"),
        }
    }
    // A Q4_K tensor cut short is caught at open time.
    let w = GgufWriter::new().tensor("k4", &[256], 12, vec![0; 100]);
    expect_malformed(dir.path(), &w.to_bytes().0);
}
