use burn::prelude::*;
use kernels::QuantBackend;

use crate::config::{LlamaConfig, RopeScaling};

/// Rotary position embeddings in the Hugging Face ("rotate half") convention.
#[derive(Clone, Debug)]
pub struct Rope<B: QuantBackend> {
    /// `[max_positions, head_dim]`
    cos: Tensor<B, 2>,
    sin: Tensor<B, 2>,
}

/// Inverse frequencies `θ^(−2i/d)`, adjusted by llama3 rope scaling when configured.
pub fn inv_freq(config: &LlamaConfig) -> Vec<f64> {
    let d = config.head_dim();
    let base: Vec<f64> = (0..d / 2)
        .map(|i| 1.0 / config.rope_theta.powf(2.0 * i as f64 / d as f64))
        .collect();
    match &config.rope_scaling {
        Some(s) => base.into_iter().map(|f| llama3_scale(f, s)).collect(),
        None => base,
    }
}

fn llama3_scale(freq: f64, s: &RopeScaling) -> f64 {
    let orig = s.original_max_position_embeddings as f64;
    let low_wavelen = orig / s.low_freq_factor;
    let high_wavelen = orig / s.high_freq_factor;
    let wavelen = 2.0 * std::f64::consts::PI / freq;
    if wavelen < high_wavelen {
        freq
    } else if wavelen > low_wavelen {
        freq / s.factor
    } else {
        let smooth =
            (orig / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor);
        (1.0 - smooth) * freq / s.factor + smooth * freq
    }
}

impl<B: QuantBackend> Rope<B> {
    pub fn new(config: &LlamaConfig, max_positions: usize, device: &B::Device) -> Self {
        let freqs = inv_freq(config);
        let d = config.head_dim();
        let mut cos = Vec::with_capacity(max_positions * d);
        let mut sin = Vec::with_capacity(max_positions * d);
        for p in 0..max_positions {
            // cos/sin repeat once per half of the head, matching `rotate_half`.
            for _ in 0..2 {
                for &f in &freqs {
                    let angle = p as f64 * f;
                    cos.push(angle.cos() as f32);
                    sin.push(angle.sin() as f32);
                }
            }
        }
        let table = |v: Vec<f32>| Tensor::from_data(TensorData::new(v, [max_positions, d]), device);
        Self {
            cos: table(cos),
            sin: table(sin),
        }
    }

    pub fn max_positions(&self) -> usize {
        self.cos.dims()[0]
    }

    /// Rotates every head of `x: [batch, seq, heads·head_dim]` whose first position is `start`.
    pub fn apply(&self, x: Tensor<B, 3>, heads: usize, start: usize) -> Tensor<B, 3> {
        let seq = x.dims()[1];
        assert!(
            start + seq <= self.max_positions(),
            "sequence of {} tokens exceeds the rotary table ({} positions)",
            start + seq,
            self.max_positions()
        );
        let cos = self.cos.clone().narrow(0, start, seq);
        let sin = self.sin.clone().narrow(0, start, seq);
        B::rotary(x, cos, sin, heads)
    }

    /// The tables of one position per row: row `i` of a batched decode step's `[1, n, ..]`
    /// inputs is at `positions[i]`. Every layer of the step rotates with the same tables.
    pub fn at_positions(&self, positions: &[usize]) -> RowPositions<B> {
        let last = positions.iter().max().map_or(0, |p| p + 1);
        assert!(
            last <= self.max_positions(),
            "position {} exceeds the rotary table ({} positions)",
            last - 1,
            self.max_positions()
        );
        let ids: Vec<i64> = positions.iter().map(|&p| p as i64).collect();
        let ids = Tensor::<B, 1, Int>::from_data(
            TensorData::new(ids, [positions.len()]),
            &self.cos.device(),
        );
        RowPositions {
            positions: positions.to_vec(),
            cos: self.cos.clone().select(0, ids.clone()),
            sin: self.sin.clone().select(0, ids),
        }
    }
}

/// [`Rope::at_positions`]: the rotary tables `[n, head_dim]` of one position per row.
#[derive(Clone, Debug)]
pub struct RowPositions<B: QuantBackend> {
    positions: Vec<usize>,
    cos: Tensor<B, 2>,
    sin: Tensor<B, 2>,
}

impl<B: QuantBackend> RowPositions<B> {
    /// The position of each row.
    pub fn positions(&self) -> &[usize] {
        &self.positions
    }

    /// Rotates row `i` of `x: [1, n, heads·head_dim]` as position `positions[i]`.
    pub fn apply(&self, x: Tensor<B, 3>, heads: usize) -> Tensor<B, 3> {
        assert_eq!(x.dims()[1], self.positions.len(), "one position per row");
        B::rotary(x, self.cos.clone(), self.sin.clone(), heads)
    }
}
