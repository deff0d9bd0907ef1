//! The main job end to end on the shipped model, with a short calibration: quantize with
//! RTN-AdaDim, write the packed checkpoint and the fake-quant export, load both back.

use adadim::{DimPolicy, Method, RunSpec};
use adadim_e2e::{Cpu, eval_tokens, smollm2};
use model_llama::assets::repo_asset;
use model_llama::perplexity::perplexity;

#[test]
fn quantized_model_is_worse_than_fp_and_packed_matches_fake_quant() {
    let dir = tempfile::tempdir().unwrap();
    let spec = RunSpec {
        model: smollm2(),
        calib: repo_asset("lee-news.txt"),
        calib_samples: 8,
        calib_seqlen: 256,
        calib_seed: None,
        bits: 3,
        group_size: 64,
        method: Method::Rtn,
        dim: DimPolicy::Ada,
        out: dir.path().join("packed"),
        fake_quant: Some(dir.path().join("fake")),
    };
    let report = adadim::run::<Cpu>(&spec, &Default::default()).unwrap();
    assert_eq!(report.linears.len(), 30 * 7);
    let ic: usize = report.ic_count.values().sum();
    eprintln!("per-IC linears: {ic} of 210 ({:?})", report.ic_count);
    assert!(
        ic > 0 && ic < 210,
        "AdaDim picks IC for some linears, not all"
    );

    let device = Default::default();
    let ppl = |path: &std::path::Path| {
        let m = model_llama::open_model(path).unwrap();
        let model = m.load::<Cpu>(&device).unwrap();
        perplexity(&model, &eval_tokens(&m.tokenizer), 2048, Some(2))
            .unwrap()
            .perplexity
    };
    let fp = ppl(&spec.model);
    let packed = ppl(&spec.out);
    let fake = ppl(spec.fake_quant.as_ref().unwrap());
    eprintln!("perplexity over 2 windows: FP {fp:.3}, packed {packed:.3}, fake-quant {fake:.3}");
    assert!(
        packed.is_finite() && packed > fp,
        "packed {packed} vs FP {fp}"
    );
    // The fake-quant export rounds the dequantized weights to f16.
    assert!(
        (packed - fake).abs() / fake < 1e-3,
        "packed {packed} vs fake-quant {fake}"
    );
}
