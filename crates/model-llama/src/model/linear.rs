use burn::prelude::*;
use kernels::{QuantBackend, QuantLinear, WeightKind};

/// A bias-free linear layer `y = x · Wᵀ`, dense or on packed quantized weights.
#[derive(Clone, Debug)]
pub enum Linear<B: QuantBackend> {
    /// The weight kept transposed (`[in, out]`) so the forward is a plain row-major matmul.
    Dense { weight_t: Tensor<B, 2> },
    /// Packed codes multiplied by the dequantizing kernel of the backend.
    Quant(QuantLinear<B>),
}

impl<B: QuantBackend> Linear<B> {
    /// From a row-major `W: [out, in]` in host memory.
    pub fn from_host_weight(w: &[f32], [out, inp]: [usize; 2], device: &B::Device) -> Self {
        // Stored transposed and contiguous: a strided `transpose` view would be copied by every
        // matmul (that copy dominated decoding), and a view read out element by element is
        // slow, so the transpose is done once with a cache-blocked copy.
        let w_t = quant_core::transpose(w, out, inp);
        Self::Dense {
            weight_t: Tensor::from_data(TensorData::new(w_t, [inp, out]), device),
        }
    }

    pub fn in_features(&self) -> usize {
        match self {
            Self::Dense { weight_t } => weight_t.dims()[0],
            Self::Quant(q) => q.in_features(),
        }
    }

    pub fn out_features(&self) -> usize {
        match self {
            Self::Dense { weight_t } => weight_t.dims()[1],
            Self::Quant(q) => q.out_features(),
        }
    }

    /// The form the weight is stored in.
    pub fn kind(&self) -> WeightKind {
        match self {
            Self::Dense { .. } => WeightKind::F32,
            Self::Quant(q) => q.kind(),
        }
    }

    /// `Wᵀ [in, out]` in f32. A dense layer hands out its tensor; a compact one is multiplied
    /// out (the identity through its kernel), which costs a product with `in × in` inputs:
    /// for tests and one-off inspection, not for a forward.
    pub fn weight_t(&self) -> Tensor<B, 2> {
        match self {
            Self::Dense { weight_t } => weight_t.clone(),
            Self::Quant(q) => q.forward(Tensor::eye(q.in_features(), q.device())),
        }
    }

    /// Applies the layer to the last dimension of `x`.
    pub fn forward<const D: usize>(&self, x: Tensor<B, D>) -> Tensor<B, D> {
        match self {
            Self::Quant(q) => q.forward(x),
            Self::Dense { weight_t } => B::dense_linear(x, weight_t.clone()),
        }
    }

    /// [`Self::forward`] of each of `layers` on the same `x`, the same results. Packed layers
    /// go to the backend together ([`QuantLinear::forward_many`]: on the host, one parallel
    /// pass instead of one per layer).
    pub fn forward_many<const D: usize>(x: Tensor<B, D>, layers: &[&Self]) -> Vec<Tensor<B, D>> {
        let quant: Option<Vec<&QuantLinear<B>>> = layers
            .iter()
            .map(|l| match l {
                Self::Quant(q) => Some(q),
                Self::Dense { .. } => None,
            })
            .collect();
        match quant {
            Some(quant) => QuantLinear::forward_many(x, &quant),
            None => layers.iter().map(|l| l.forward(x.clone())).collect(),
        }
    }
}

#[cfg(all(test, feature = "ndarray"))]
mod tests {
    use burn::backend::NdArray;
    use quant_core::{GroupSize, QuantConfig, QuantDim, quantize_rtn};

    use super::*;

    /// A packed layer multiplied out is its dequantized weight, transposed, for both dims.
    #[test]
    fn a_packed_layers_weight_t_is_its_dequantized_transpose() {
        let device = Default::default();
        let (out, inp) = (48, 64);
        let w: Vec<f32> = (0..out * inp)
            .map(|i| ((i * 37 % 101) as f32 - 50.0) / 70.0)
            .collect();
        for dim in QuantDim::ALL {
            let config = QuantConfig::new(3, GroupSize::Len(16), dim).unwrap();
            let packed = quantize_rtn(&w, out, inp, config).unwrap().pack();
            let layer = Linear::<NdArray>::Quant(QuantLinear::new(&packed, &device).unwrap());
            let want = quant_core::transpose(&packed.dequantize(), out, inp);
            let got = layer.weight_t();
            assert_eq!(got.dims(), [inp, out]);
            let got = got.into_data().to_vec::<f32>().unwrap();
            for (g, w) in got.iter().zip(&want) {
                assert!((g - w).abs() <= 1e-6 * (1.0 + w.abs()), "{dim}: {g} vs {w}");
            }
            assert!(matches!(layer.kind(), WeightKind::Packed { bits: 3, .. }));
        }
    }
}
