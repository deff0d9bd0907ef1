//! Writing a run's results as its layers finish: the packed checkpoint (docs/method.md §6) and
//! optionally the fake-quant export (dense dequantized weights any LLaMA loader reads), each
//! streamed into sharded safetensors in a staging directory beside its destination.
//!
//! After every layer the staging directory holds a progress record: the shards written so far,
//! the records of the finished layers, and the calibration activations the next layer starts
//! from (made durable on a thread of their own while the next layer runs). A run that was
//! killed resumes from it (`--resume`) and writes exactly the bytes an uninterrupted run would:
//! the activations are saved bit for bit and the memory plan, which decides how sums are
//! chunked, is the interrupted run's.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufWriter, Read, Write};
use std::path::{Path, PathBuf};

use kernels::QuantBackend;
use model_llama::TensorSource;
use model_llama::export::{MAX_SHARD_BYTES, OwnedTensor, write_config};
use model_llama::packed::{HEAD_MODULE, HeadQuantization, packed_layout_metadata, packed_tensors};
use model_llama::shards::{ShardState, ShardWriter};
use model_llama::staging::{StagingDir, sync_path, write_atomic};
use model_llama::tokenizer::LlamaTokenizer;
use quant_core::QuantDim;
use serde::{Deserialize, Serialize};

use crate::error::{AdadimError, Result};
use crate::memory::MemoryPlan;
use crate::pipeline::{Activations, FinishedLayer, LayerSink, LinearRecord, QuantizeOptions};
use crate::report::RunReport;

const PROGRESS_FILE: &str = "adadim_progress.json";
/// Bumped when the progress record changes meaning: an older run is then not resumed.
const PROGRESS_FORMAT: u32 = 1;

/// What an interrupted run had finished.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Progress {
    format: u32,
    /// The options, model and calibration text the run was started with.
    fingerprint: BTreeMap<String, serde_json::Value>,
    pub plan: MemoryPlan,
    pub layers_done: usize,
    packed: ShardState,
    fake_quant: Option<ShardState>,
    pub records: Vec<LinearRecord>,
    dims: BTreeMap<String, QuantDim>,
    /// `[blocks, seqlen, hidden]` f32 activations entering layer `layers_done`.
    activations: Option<String>,
    /// Wall time spent by the earlier attempts.
    pub seconds: f64,
}

/// One output directory being written.
struct Staged {
    staging: StagingDir,
    writer: ShardWriter,
}

impl Staged {
    fn add(&mut self, name: &str, t: &OwnedTensor, metadata: &[(String, String)]) -> Result<()> {
        Ok(self
            .writer
            .add(name, t.dtype, &t.shape, &t.bytes, metadata)?)
    }

    /// A tensor of the source, in f16 as Hugging Face checkpoints ship them.
    fn add_source(&mut self, src: &dyn TensorSource, name: &str) -> Result<()> {
        let t = src.load(name)?;
        self.add(name, &OwnedTensor::f16_from_f32(t.shape, &t.data), &[])
    }
}

/// The packed checkpoint and the optional fake-quant export, written as layers finish.
pub struct Outputs<'a> {
    src: &'a dyn TensorSource,
    packed: Staged,
    fake_quant: Option<Staged>,
    progress: Progress,
    saving: PendingSave,
}

/// The last finished layer's activations and progress record, being made durable on their own
/// thread while the next layer runs: on a 7B shape the fsync of a quarter of a GB left both
/// cores idle on the main thread.
#[derive(Default)]
struct PendingSave(Option<std::thread::JoinHandle<Result<()>>>);

impl PendingSave {
    /// Waits until the record being written is durable.
    fn wait(&mut self) -> Result<()> {
        match self.0.take() {
            Some(handle) => handle.join().unwrap_or_else(|_| {
                Err(AdadimError::Invalid(
                    "the thread saving the run's progress panicked".into(),
                ))
            }),
            None => Ok(()),
        }
    }
}

impl Drop for PendingSave {
    /// A run that fails mid-layer still leaves its last finished layer resumable.
    fn drop(&mut self) {
        if let Err(e) = self.wait() {
            tracing::warn!("saving the run's progress failed: {e}");
        }
    }
}

impl<'a> Outputs<'a> {
    /// Starts a run's outputs (destinations checked, staging directories created) and writes
    /// what precedes the first layer.
    pub fn create(
        src: &'a dyn TensorSource,
        out: &Path,
        fake_quant: Option<&Path>,
        overwrite: bool,
        fingerprint: BTreeMap<String, serde_json::Value>,
        plan: MemoryPlan,
    ) -> Result<Self> {
        let open = |dest: &Path| -> Result<Staged> {
            let staging = StagingDir::resumable(dest, overwrite, false)?;
            let writer = ShardWriter::new(staging.path(), MAX_SHARD_BYTES)?;
            Ok(Staged { staging, writer })
        };
        let mut packed = open(out)?;
        let mut fake = fake_quant.map(open).transpose()?;
        // A tied embedding is the packed head's dequantization (written at the end).
        if !(packs_head(src.config()) && src.config().tie_word_embeddings) {
            packed.add_source(src, "model.embed_tokens.weight")?;
        }
        if let Some(fake) = &mut fake {
            fake.add_source(src, "model.embed_tokens.weight")?;
        }
        let outputs = Self {
            src,
            progress: Progress {
                format: PROGRESS_FORMAT,
                fingerprint,
                plan,
                layers_done: 0,
                packed: packed.writer.checkpoint()?,
                fake_quant: fake.as_mut().map(|f| f.writer.checkpoint()).transpose()?,
                records: Vec::new(),
                dims: BTreeMap::new(),
                activations: None,
                seconds: 0.0,
            },
            packed,
            fake_quant: fake,
            saving: PendingSave::default(),
        };
        outputs.save_progress()?;
        Ok(outputs)
    }

    /// Reopens an interrupted run's outputs; its options, model and calibration text must be
    /// the ones given now. Returns the activations the next layer starts from.
    pub fn resume<B: QuantBackend>(
        src: &'a dyn TensorSource,
        out: &Path,
        fake_quant: Option<&Path>,
        overwrite: bool,
        fingerprint: &BTreeMap<String, serde_json::Value>,
        device: &B::Device,
    ) -> Result<(Self, Option<Activations<B>>)> {
        let staging = StagingDir::resumable(out, overwrite, true)?;
        let path = staging.join(PROGRESS_FILE);
        let text = std::fs::read_to_string(&path).map_err(|e| AdadimError::Io {
            path: path.clone(),
            source: e,
        })?;
        let progress: Progress = serde_json::from_str(&text)
            .map_err(|e| AdadimError::Invalid(format!("{}: {e}", path.display())))?;
        if progress.format != PROGRESS_FORMAT {
            return Err(AdadimError::Invalid(format!(
                "{}: written by another version of this tool (progress format {}); remove {} \
                 to start over",
                path.display(),
                progress.format,
                staging.path().display()
            )));
        }
        check_fingerprint(&progress.fingerprint, fingerprint, staging.path())?;
        remove_stale_activations(staging.path(), progress.activations.as_deref())?;
        let writer = ShardWriter::resume(staging.path(), MAX_SHARD_BYTES, &progress.packed)?;
        let packed = Staged { staging, writer };
        let fake = match (fake_quant, &progress.fake_quant) {
            (Some(dest), Some(state)) => {
                let staging = StagingDir::resumable(dest, overwrite, true)?;
                let writer = ShardWriter::resume(staging.path(), MAX_SHARD_BYTES, state)?;
                Some(Staged { staging, writer })
            }
            (None, None) => None,
            _ => unreachable!("the fingerprint records whether a fake-quant export is written"),
        };
        let activations = match &progress.activations {
            Some(name) => {
                let config = src.config();
                let file = packed.staging.join(name);
                let data = read_f32(&file)?;
                let block = progress.plan.seqlen * config.hidden_size;
                if data.len() != progress.plan.blocks * block {
                    return Err(AdadimError::Invalid(format!(
                        "{}: {} values, expected {} blocks of {block}",
                        file.display(),
                        data.len(),
                        progress.plan.blocks
                    )));
                }
                Some(Activations::from_host(
                    &data,
                    [
                        progress.plan.blocks,
                        progress.plan.seqlen,
                        config.hidden_size,
                    ],
                    progress.plan.chunk_blocks,
                    device,
                ))
            }
            None => None,
        };
        tracing::info!(
            layers_done = progress.layers_done,
            dir = %packed.staging.path().display(),
            "resuming"
        );
        Ok((
            Self {
                src,
                packed,
                fake_quant: fake,
                progress,
                saving: PendingSave::default(),
            },
            activations,
        ))
    }

    pub fn progress(&self) -> &Progress {
        &self.progress
    }

    fn save_progress(&self) -> Result<()> {
        save_progress(self.packed.staging.path(), &self.progress)
    }

    /// Writes the rest of the checkpoint (final norm, an untied head, config, tokenizer,
    /// report) and moves the outputs into place.
    pub fn finish(
        mut self,
        opts: &QuantizeOptions,
        tokenizer: &LlamaTokenizer,
        report: &RunReport,
    ) -> Result<PathBuf> {
        self.saving.wait()?;
        let src = self.src;
        let config = src.config();
        let head_name = model_llama::load::head_name(src);
        let untied_head = head_name == "lm_head.weight";
        let mut quantization = opts.quantization_config(self.progress.dims.clone());
        let mut packed = self.packed;
        if packs_head(config) {
            let (_, w) = model_llama::load::head_weight(src, None)?;
            let head = quant_core::quantize_q8(&w, config.vocab_size, config.hidden_size)
                .map_err(|source| AdadimError::Quant {
                    context: head_name.to_string(),
                    source,
                })?
                .pack();
            let layout = packed_layout_metadata(HEAD_MODULE, &head);
            for (name, t) in packed_tensors(HEAD_MODULE, &head) {
                packed.add(&name, &t, std::slice::from_ref(&layout))?;
            }
            quantization.head = Some(HeadQuantization::of(&head));
        } else if untied_head {
            packed.add_source(src, head_name)?;
        }
        let mut packed_config = config.to_hf_json();
        packed_config["quantization_config"] =
            serde_json::to_value(quantization).expect("quantization config serializes");
        let report_json = serde_json::to_vec_pretty(report).expect("report serializes");
        let staging_dir = packed.staging.path().to_path_buf();
        let mut dests = Vec::new();
        let mut fake_quant = self.fake_quant;
        if let Some(fake) = &mut fake_quant
            && untied_head
        {
            fake.add_source(src, head_name)?;
        }
        for (staged, config_json) in std::iter::once((packed, packed_config))
            .chain(fake_quant.map(|f| (f, config.to_hf_json())))
        {
            let mut staged = staged;
            staged.add_source(src, "model.norm.weight")?;
            staged.writer.finish()?;
            let dir = staged.staging.path();
            write_config(dir, &config_json)?;
            tokenizer.save(&staged.staging.join("tokenizer.json"))?;
            tokenizer.save_config(&staged.staging.join("tokenizer_config.json"))?;
            write_atomic(&staged.staging.join("adadim_report.json"), &report_json)?;
            dests.push(staged.staging);
        }
        // The progress record and activations are the run's own scratch files.
        for name in std::iter::once(PROGRESS_FILE.to_string()).chain(self.progress.activations) {
            let path = staging_dir.join(name);
            std::fs::remove_file(&path).map_err(|e| AdadimError::Io { path, source: e })?;
        }
        let mut out = None;
        for staging in dests {
            let dest = staging.commit()?;
            out.get_or_insert(dest);
        }
        Ok(out.expect("the packed checkpoint is written"))
    }
}

impl<B: QuantBackend> LayerSink<B> for Outputs<'_> {
    fn layer_done(
        &mut self,
        index: usize,
        layer: FinishedLayer,
        next_input: &Activations<B>,
    ) -> Result<()> {
        for s in std::iter::once(&mut self.packed).chain(self.fake_quant.as_mut()) {
            for (name, w) in &layer.norms {
                s.add(name, &OwnedTensor::f16_from_f32(vec![w.len()], w), &[])?;
            }
        }
        for (module, p) in &layer.linears {
            let layout = packed_layout_metadata(module, p);
            for (name, t) in packed_tensors(module, p) {
                self.packed.add(&name, &t, std::slice::from_ref(&layout))?;
            }
            if let Some(fake) = &mut self.fake_quant {
                let w =
                    OwnedTensor::f16_from_f32(vec![p.out_features, p.in_features], &p.dequantize());
                fake.add(&format!("{module}.weight"), &w, &[])?;
            }
            self.progress.dims.insert(module.clone(), p.dim);
        }
        self.saving.wait()?;
        let name = format!("{ACTIVATIONS_PREFIX}{}.bin", index + 1);
        let previous = self.progress.activations.replace(name.clone());
        self.progress.packed = self.packed.writer.checkpoint()?;
        if let Some(fake) = &mut self.fake_quant {
            self.progress.fake_quant = Some(fake.writer.checkpoint()?);
        }
        self.progress.layers_done = index + 1;
        self.progress.records.extend(layer.records);
        // The shards are durable up to this layer. The activations go into the page cache
        // here; their fsync and the record follow while the next layer runs (a run killed
        // before the record lands resumes from the layer before).
        let dir = self.packed.staging.path().to_path_buf();
        let written = write_activations(&dir.join(&name), next_input)?;
        let progress = self.progress.clone();
        let save = move || -> Result<()> {
            written.commit()?;
            save_progress(&dir, &progress)?;
            if let Some(old) = previous {
                let path = dir.join(old);
                std::fs::remove_file(&path).map_err(|e| AdadimError::Io { path, source: e })?;
            }
            Ok(())
        };
        let handle = std::thread::Builder::new()
            .name("adadim-save".into())
            .spawn(save)
            .map_err(|source| AdadimError::Io {
                path: self.packed.staging.path().to_path_buf(),
                source,
            })?;
        self.saving = PendingSave(Some(handle));
        Ok(())
    }
}

/// How the activation files a run keeps between layers are named: this, the layers done, `.bin`.
const ACTIVATIONS_PREFIX: &str = "adadim_activations-";

/// Removes the activation files in the run's staging directory `dir` other than `current`, the
/// one its progress record names. A run killed after recording a layer but before removing the
/// layer before's activations leaves that file behind; it is this tool's scratch, and would
/// otherwise end up in the finished checkpoint.
fn remove_stale_activations(dir: &Path, current: Option<&str>) -> Result<()> {
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| AdadimError::Io { path, source }
    };
    for entry in std::fs::read_dir(dir).map_err(io(dir))? {
        let path = entry.map_err(io(dir))?.path();
        let Some(name) = path.file_name().and_then(|n| n.to_str()) else {
            continue;
        };
        let stale =
            name.starts_with(ACTIVATIONS_PREFIX) && name.ends_with(".bin") && Some(name) != current;
        if stale {
            std::fs::remove_file(&path).map_err(io(&path))?;
        }
    }
    Ok(())
}

/// Writes the progress record into the staging directory `dir`, durably.
fn save_progress(dir: &Path, progress: &Progress) -> Result<()> {
    let json = serde_json::to_vec_pretty(progress).expect("progress serializes");
    write_atomic(&dir.join(PROGRESS_FILE), &json)?;
    Ok(sync_path(dir)?)
}

/// Whether the packed checkpoint stores the head in 8 bits (docs/method.md §6.1): when its rows
/// split into whole groups.
fn packs_head(config: &model_llama::LlamaConfig) -> bool {
    config.hidden_size.is_multiple_of(quant_core::Q8_GROUP)
}

/// Activations written under a temporary name, not yet durable.
struct WrittenActivations {
    file: File,
    tmp: PathBuf,
    path: PathBuf,
}

impl WrittenActivations {
    /// fsyncs the file and gives it its name.
    fn commit(self) -> Result<()> {
        let io = |e| AdadimError::Io {
            path: self.path.clone(),
            source: e,
        };
        self.file.sync_all().map_err(io)?;
        std::fs::rename(&self.tmp, &self.path).map_err(io)
    }
}

/// Writes the activations as raw little-endian f32 beside `path`; [`WrittenActivations::commit`]
/// makes them durable under `path`.
fn write_activations<B: QuantBackend>(
    path: &Path,
    a: &Activations<B>,
) -> Result<WrittenActivations> {
    let io = |e| AdadimError::Io {
        path: path.to_path_buf(),
        source: e,
    };
    let tmp = path.with_extension("tmp");
    let mut w = BufWriter::new(File::create(&tmp).map_err(io)?);
    a.for_each_host_chunk(|values| w.write_all(bytemuck::cast_slice(values)).map_err(io))?;
    let file = w.into_inner().map_err(|e| io(e.into_error()))?;
    Ok(WrittenActivations {
        file,
        tmp,
        path: path.to_path_buf(),
    })
}

fn read_f32(path: &Path) -> Result<Vec<f32>> {
    let io = |e| AdadimError::Io {
        path: path.to_path_buf(),
        source: e,
    };
    let mut bytes = Vec::new();
    File::open(path)
        .and_then(|mut f| f.read_to_end(&mut bytes))
        .map_err(io)?;
    if bytes.len() % 4 != 0 {
        return Err(AdadimError::Invalid(format!(
            "{}: not a whole number of f32 values",
            path.display()
        )));
    }
    Ok(bytemuck::pod_collect_to_vec(&bytes))
}

/// Errors unless an interrupted run's fingerprint equals this run's, naming what differs.
fn check_fingerprint(
    saved: &BTreeMap<String, serde_json::Value>,
    now: &BTreeMap<String, serde_json::Value>,
    dir: &Path,
) -> Result<()> {
    let keys: std::collections::BTreeSet<&String> = saved.keys().chain(now.keys()).collect();
    let differ: Vec<String> = keys
        .into_iter()
        .filter(|k| saved.get(*k) != now.get(*k))
        .map(|k| {
            let show = |v: Option<&serde_json::Value>| v.map_or("none".into(), |v| v.to_string());
            format!(
                "{k} (interrupted run: {}, now: {})",
                show(saved.get(k)),
                show(now.get(k))
            )
        })
        .collect();
    if differ.is_empty() {
        return Ok(());
    }
    Err(AdadimError::Invalid(format!(
        "{}: the interrupted run used a different {}; resume with the same model, \
         calibration text and options, or remove the directory to start over",
        dir.display(),
        differ.join(", ")
    )))
}
