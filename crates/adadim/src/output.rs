//! Writing a run's results: the packed checkpoint (SPEC §7) and the fake-quant export (dense
//! dequantized weights any LLaMA loader reads). Both are staged and renamed into place at the end.

use std::path::{Path, PathBuf};

use model_llama::TensorSource;
use model_llama::export::{OwnedTensor, hf_tensor_names, stage_hf_dir};
use model_llama::packed::packed_tensors;
use model_llama::staging::write_atomic;
use model_llama::tokenizer::LlamaTokenizer;

use crate::error::Result;
use crate::pipeline::QuantizedModel;
use crate::report::RunReport;

/// Non-linear tensors (embedding, norms, untied head) in f16, as HF checkpoints ship them.
fn dense_tensors(
    src: &dyn TensorSource,
    q: &QuantizedModel,
    mut linear: impl FnMut(&str, &quant_core::PackedLinear) -> Vec<(String, OwnedTensor)>,
) -> Result<Vec<(String, OwnedTensor)>> {
    let mut out = Vec::new();
    for name in hf_tensor_names(src) {
        let module = name.strip_suffix(".weight").unwrap_or(&name);
        match q.linears.iter().find(|(m, _)| m == module) {
            Some((m, packed)) => out.extend(linear(m, packed)),
            None => {
                let t = src.load(&name)?;
                out.push((name, OwnedTensor::f16_from_f32(t.shape, &t.data)));
            }
        }
    }
    Ok(out)
}

fn finish(
    staging: model_llama::staging::StagingDir,
    tokenizer: &LlamaTokenizer,
    report: &RunReport,
) -> Result<PathBuf> {
    tokenizer.save(&staging.join("tokenizer.json"))?;
    let json = serde_json::to_vec_pretty(report).expect("report serializes");
    write_atomic(&staging.join("adadim_report.json"), &json)?;
    Ok(staging.commit()?)
}

/// The packed checkpoint: codes, scales and zeros per linear, `quantization_config` in config.json.
pub fn write_packed(
    src: &dyn TensorSource,
    tokenizer: &LlamaTokenizer,
    q: &QuantizedModel,
    report: &RunReport,
    out: &Path,
) -> Result<PathBuf> {
    let tensors = dense_tensors(src, q, packed_tensors)?;
    let mut config = src.config().to_hf_json();
    config["quantization_config"] =
        serde_json::to_value(&q.quantization).expect("quantization config serializes");
    finish(stage_hf_dir(out, &config, &tensors)?, tokenizer, report)
}

/// The fake-quant export: an ordinary f16 HF directory whose linears hold the dequantized weights.
pub fn write_fake_quant(
    src: &dyn TensorSource,
    tokenizer: &LlamaTokenizer,
    q: &QuantizedModel,
    report: &RunReport,
    out: &Path,
) -> Result<PathBuf> {
    let tensors = dense_tensors(src, q, |m, p| {
        vec![(
            format!("{m}.weight"),
            OwnedTensor::f16_from_f32(vec![p.out_features, p.in_features], &p.dequantize()),
        )]
    })?;
    finish(
        stage_hf_dir(out, &src.config().to_hf_json(), &tensors)?,
        tokenizer,
        report,
    )
}
