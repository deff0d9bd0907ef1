//! `cargo xtask quantize --config` and `cargo xtask ablation`: quantization jobs on the shipped
//! model (or any model), each followed by a perplexity evaluation of the packed output.

use std::path::{Path, PathBuf};
use std::time::Instant;

use adadim::{DimPolicy, Recipe, RunReport, RunSpec};
use anyhow::{Context, Result};
use burn::backend::NdArray;
use model_llama::perplexity::PerplexityReport;
use quant_core::GroupSize;
use serde::Deserialize;

type B = NdArray<f32>;

/// Paths in configs are relative to the repository root; `model = "smollm2"` is the shipped
/// test model, fetched and cached on first use.
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .ancestors()
        .nth(2)
        .expect("xtask/jobs lives in the repo")
        .to_path_buf()
}

pub fn resolve(path: &Path) -> Result<PathBuf> {
    if path == Path::new("smollm2") {
        return Ok(test_assets::smollm2_gguf()?);
    }
    Ok(if path.is_absolute() {
        path.to_path_buf()
    } else {
        repo_root().join(path)
    })
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EvalSpec {
    #[serde(default = "default_text")]
    pub text: PathBuf,
    #[serde(default = "default_seqlen")]
    pub seqlen: usize,
    #[serde(default)]
    pub windows: Option<usize>,
}

fn default_text() -> PathBuf {
    "assets/wiki-eval.txt".into()
}
fn default_seqlen() -> usize {
    2048
}

impl Default for EvalSpec {
    fn default() -> Self {
        Self {
            text: default_text(),
            seqlen: default_seqlen(),
            windows: Some(16),
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JobConfig {
    pub quantize: RunSpec,
    #[serde(default)]
    pub eval: Option<EvalSpec>,
}

fn resolved(mut spec: RunSpec) -> Result<RunSpec> {
    spec.model = resolve(&spec.model)?;
    spec.calib = resolve(&spec.calib)?;
    spec.out = resolve(&spec.out)?;
    spec.fake_quant = spec.fake_quant.as_deref().map(resolve).transpose()?;
    Ok(spec)
}

/// Perplexity of any checkpoint under `eval`.
pub fn evaluate(model: &Path, eval: &EvalSpec) -> Result<PerplexityReport> {
    let m = model_llama::open_model(model)?;
    let text_path = resolve(&eval.text)?;
    let text = std::fs::read_to_string(&text_path)
        .with_context(|| format!("cannot read {}", text_path.display()))?;
    let tokens = m.tokenizer.encode(&text)?;
    // Layer by layer, as `adadim eval` does: a 7B model is never held whole.
    Ok(m.perplexity::<B>(&tokens, eval.seqlen, eval.windows, &Default::default())?)
}

/// A job config with its paths resolved.
pub fn load_job(config: &Path) -> Result<JobConfig> {
    let text = std::fs::read_to_string(config)
        .with_context(|| format!("cannot read {}", config.display()))?;
    let job: JobConfig = toml::from_str(&text)
        .with_context(|| format!("{}: invalid job config", config.display()))?;
    Ok(JobConfig {
        quantize: resolved(job.quantize)?,
        ..job
    })
}

pub fn quantize(config: &Path) -> Result<()> {
    let job = load_job(config)?;
    let spec = job.quantize;
    let report = adadim::run::<B>(&spec, &Default::default())?;
    println!(
        "{}: {} {} w{}g{} in {:.1} s, peak RSS {:.0} MiB; per-IC: {}",
        spec.out.display(),
        report.method,
        report.policy,
        report.bits,
        report.group_size,
        report.seconds,
        report.peak_rss_mib.unwrap_or(f64::NAN),
        ic_summary(&report)
    );
    if let Some(eval) = job.eval {
        let r = evaluate(&spec.out, &eval)?;
        println!(
            "perplexity {:.3} ({} windows × {}; {:.1} s)",
            r.perplexity, r.windows, r.seqlen, r.seconds
        );
    }
    Ok(())
}

fn ic_summary(report: &RunReport) -> String {
    report
        .ic_count
        .iter()
        .map(|(k, n)| format!("{}:{n}", k.short_name()))
        .collect::<Vec<_>>()
        .join(" ")
}

#[derive(clap::Args, Debug)]
pub struct AblationArgs {
    #[arg(long, value_delimiter = ',', default_value = "3,4")]
    pub bits: Vec<u32>,
    #[arg(long, default_value_t = GroupSize::Len(64), allow_negative_numbers = true)]
    pub group_size: GroupSize,
    /// Variants, space-separated: each a `+`-joined list of `method/dim` and `key=value` with
    /// key recipe, range, score, propagate, refit or sym (e.g. `gptq/ada+range=search`, `recipe=best`),
    /// on top of the paper's recipe.
    #[arg(
        long,
        value_delimiter = ' ',
        default_value = "rtn/oc rtn/ic:qkv rtn/ic:down rtn/ic:qkv,down rtn/ic:all rtn/ada gptq/oc gptq/ic:all gptq/ada"
    )]
    pub variants: Vec<String>,
    /// The docs section (`<!-- bench:NAME -->`) the table replaces, so that a run of other
    /// variants does not replace the main grid.
    #[arg(long, default_value = "ablation")]
    pub section: String,
    #[arg(long, default_value_t = adadim::defaults::CALIB_SAMPLES)]
    pub calib_samples: usize,
    #[arg(long, default_value_t = 16)]
    pub windows: usize,
    #[arg(long, default_value = "docs/results.md")]
    pub out: PathBuf,
}

struct Row {
    name: String,
    ppl: f64,
    seconds: Option<f64>,
    rss: Option<f64>,
    report: Option<RunReport>,
}

pub fn ablation(args: &AblationArgs) -> Result<()> {
    let model = resolve(Path::new("smollm2"))?;
    let eval = EvalSpec {
        windows: Some(args.windows),
        ..Default::default()
    };
    let t = Instant::now();
    let fp = evaluate(&model, &eval)?;
    let mut rows = vec![Row {
        name: "FP32 (dequantized GGUF)".into(),
        ppl: fp.perplexity,
        seconds: None,
        rss: None,
        report: None,
    }];
    println!(
        "FP perplexity {:.3} ({:.1} s)",
        fp.perplexity,
        t.elapsed().as_secs_f64()
    );
    for &bits in &args.bits {
        for variant in &args.variants {
            let name = format!(
                "w{bits}g{} {}",
                args.group_size,
                variant.replace(['/', '+'], " ")
            );
            let out = repo_root()
                .join("out/ablation")
                .join(name.replace([' ', ':', ',', '='], "_"));
            let calib = resolve(Path::new(adadim::defaults::CALIB_TEXT))?;
            // Variants start from the paper's method, so that each names what it adds.
            let base = RunSpec {
                recipe: Recipe::Paper,
                ..RunSpec::new(model.clone(), calib, out.clone())
            };
            let spec = RunSpec {
                calib_samples: args.calib_samples,
                bits,
                group_size: args.group_size,
                overwrite: true,
                ..with_variant(base, variant)?
            };
            let report = adadim::run::<B>(&spec, &Default::default())?;
            let r = evaluate(&out, &eval)?;
            println!(
                "{name}: perplexity {:.3}, {:.1} s; per-IC {}",
                r.perplexity,
                report.seconds,
                ic_summary(&report)
            );
            rows.push(Row {
                name,
                ppl: r.perplexity,
                seconds: Some(report.seconds),
                rss: report.peak_rss_mib,
                report: Some(report),
            });
            write_results(args, &rows, &eval)?;
        }
    }
    write_results(args, &rows, &eval)
}

/// `spec` with the choices of an ablation variant (see [`AblationArgs::variants`]).
fn with_variant(mut spec: RunSpec, variant: &str) -> Result<RunSpec> {
    let bad = |e: String| anyhow::anyhow!("variant `{variant}`: {e}");
    for item in variant.split('+') {
        if let Some((method, dim)) = item.split_once('/') {
            spec.method = Some(method.parse().map_err(bad)?);
            spec.dim = Some(dim.parse::<DimPolicy>().map_err(bad)?);
            continue;
        }
        match item.split_once('=') {
            Some(("recipe", v)) => spec.recipe = v.parse().map_err(bad)?,
            Some(("range", v)) => spec.range = Some(v.parse().map_err(bad)?),
            Some(("score", v)) => spec.score = Some(v.parse().map_err(bad)?),
            Some(("propagate", v)) => spec.propagate = Some(v.parse().map_err(bad)?),
            Some(("sym", v)) => spec.sym = v.parse().map_err(|e| bad(format!("{e}")))?,
            Some(("refit", v)) => spec.refit = Some(v.parse().map_err(|e| bad(format!("{e}")))?),
            _ => return Err(bad(format!("`{item}` is not method/dim or key=value"))),
        }
    }
    Ok(spec)
}

fn write_results(args: &AblationArgs, rows: &[Row], eval: &EvalSpec) -> Result<()> {
    let calib_samples = args.calib_samples;
    let title = match args.section.as_str() {
        "ablation" => "## Ablation on SmolLM2-135M-Instruct (`cargo xtask ablation`)".to_string(),
        s => format!("### Ablation `{s}` (`cargo xtask ablation --section {s}`)"),
    };
    let mut md = format!(
        "{title}\n\n\
         Protocol (docs/method.md §5): calibration = first {calib_samples} lines of `assets/lee-news.txt` \
         that tokenize to ≤ 512 tokens, concatenated, 512-token blocks; perplexity on \
         `assets/wiki-eval.txt`, windows of {} tokens, first {} windows. CPU (ndarray backend), \
         2-core Xeon. Note: the shipped model's weights were stored as GGUF Q4_1 (4-bit blocks of \
         32 along the input dimension), which favours per-OC grouping at 4 bits.\n\n\
         | configuration | perplexity | quantization time (s) | peak RSS (MiB) |\n|---|---|---|---|\n",
        eval.seqlen,
        eval.windows.map_or("all".into(), |w| w.to_string()),
    );
    for r in rows {
        let opt = |v: Option<f64>| v.map_or("–".into(), |v| format!("{v:.0}"));
        md.push_str(&format!(
            "| {} | {:.3} | {} | {} |\n",
            r.name,
            r.ppl,
            opt(r.seconds),
            opt(r.rss)
        ));
    }
    for r in rows
        .iter()
        .filter(|r| r.report.as_ref().is_some_and(|rep| rep.policy == "ada"))
    {
        let rep = r.report.as_ref().expect("filtered");
        // Collapsed: a map is 30-odd lines per variant.
        md.push_str(&format!(
            "\n<details><summary>Choices of {} (I = per-IC, O = per-OC); per-IC count by linear: \
             {}</summary>\n\n```\n{}```\n\n</details>\n",
            r.name,
            ic_summary(rep),
            rep.choice_map()
        ));
    }
    crate::write_report_section(&args.out, &args.section, &md)
}

#[cfg(test)]
mod tests {
    use super::*;
    use adadim::RangeMode;

    /// Ablation variants set exactly the choices they name.
    #[test]
    fn variants_name_their_choices() {
        let variant_spec = |v| with_variant(RunSpec::new("m".into(), "c".into(), "o".into()), v);
        let spec = variant_spec("gptq/ic:down+range=search+propagate=quantized").unwrap();
        assert_eq!(spec.method, Some(adadim::Method::Gptq));
        assert_eq!(spec.dim, Some("ic:down".parse().unwrap()));
        assert_eq!(spec.range, Some(RangeMode::Search));
        assert_eq!(spec.propagate, Some(adadim::Propagate::Quantized));
        assert_eq!(spec.score, None);
        assert_eq!(
            variant_spec("recipe=best").unwrap().choices(),
            Recipe::Best.choices()
        );
        // RTN under a GPTQ-scoring recipe scores RTN candidates and refits nothing; other
        // choices stay the recipe's.
        let rtn = variant_spec("recipe=best+rtn/ada").unwrap().choices();
        assert_eq!(
            rtn,
            adadim::Choices {
                method: adadim::Method::Rtn,
                score: adadim::Score::Rtn,
                refit: false,
                ..Recipe::Best.choices()
            }
        );
        assert!(variant_spec("rtn/oc+sym=true").unwrap().sym);
        // AWQ comes with its clip search (searched ranges) unless the variant says otherwise.
        let awq = variant_spec("awq/ada").unwrap().choices();
        assert_eq!(
            (awq.method, awq.range),
            (adadim::Method::Awq, adadim::RangeMode::Search)
        );
        let plain = variant_spec("awq/oc+range=minmax").unwrap().choices();
        assert_eq!(plain.range, adadim::RangeMode::MinMax);
        // AWQ before GPTQ keeps the recipe's score and brings the clip search too.
        let both = variant_spec("recipe=best+awq-gptq/ada").unwrap().choices();
        assert_eq!(
            both,
            adadim::Choices {
                method: adadim::Method::AwqGptq,
                ..Recipe::Best.choices()
            }
        );
        for bad in [
            "gptq",
            "hqq/ada",
            "gptq/ada+range=wide",
            "gptq/ada+sym=yes",
            "gptq/ada+wide=1",
        ] {
            assert!(variant_spec(bad).is_err(), "{bad}");
        }
    }

    /// Every shipped config reads, the keys it leaves out take the library's defaults, and
    /// GPTQ's table reaches the run.
    #[test]
    fn configs_parse_with_the_library_defaults() {
        let dir = repo_root().join("configs");
        let mut n = 0;
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            let text = std::fs::read_to_string(&path).unwrap();
            let job: JobConfig =
                toml::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            assert!(job.quantize.bits == 3 || job.quantize.bits == 4);
            n += 1;
        }
        assert!(n >= 7, "{n} configs in {}", dir.display());
        let minimal = "[quantize]\nmodel = \"m\"\ncalib = \"c\"\nout = \"o\"\n";
        let spec = toml::from_str::<JobConfig>(minimal).unwrap().quantize;
        let new = RunSpec::new("m".into(), "c".into(), "o".into());
        assert_eq!(format!("{spec:?}"), format!("{new:?}"));
        assert_eq!(spec.bits, adadim::defaults::BITS);
        assert_eq!(spec.group_size, adadim::defaults::GROUP_SIZE);
        assert_eq!(spec.choices(), adadim::defaults::RECIPE.choices());
        assert_eq!(spec.calib_samples, adadim::defaults::CALIB_SAMPLES);
        assert_eq!(spec.gptq, quant_core::GptqOptions::default());
        let set = format!(
            "{minimal}group_size = -1\n[quantize.gptq]\npercdamp = 0.1\nact_order = false\n"
        );
        let spec = toml::from_str::<JobConfig>(&set).unwrap().quantize;
        assert_eq!(spec.group_size, GroupSize::Whole);
        assert_eq!(spec.gptq.percdamp, 0.1);
        assert!(!spec.gptq.act_order);
        assert_eq!(spec.gptq.block_size, 128, "unset knobs keep their default");
        // A recipe sets the choices; a key the config names overrides it.
        let best = format!("{minimal}recipe = \"best\"\nrange = \"minmax\"\n");
        let spec = toml::from_str::<JobConfig>(&best).unwrap().quantize;
        assert_eq!(
            spec.choices(),
            adadim::Choices {
                range: RangeMode::MinMax,
                ..Recipe::Best.choices()
            }
        );
        for bad in [
            format!("{minimal}group_size = 0\n"),
            format!("{minimal}recipe = \"fast\"\n"),
            format!("{minimal}score = \"awq\"\n"),
            format!("{minimal}[quantize.gptq]\ndamp = 0.1\n"),
        ] {
            assert!(toml::from_str::<JobConfig>(&bad).is_err(), "{bad}");
        }
    }
}
