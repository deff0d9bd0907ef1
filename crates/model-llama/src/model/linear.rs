use burn::prelude::*;

/// A bias-free linear layer `y = x · Wᵀ`.
///
/// The weight is kept transposed (`[in, out]`) so the forward is a plain row-major matmul.
#[derive(Clone, Debug)]
pub struct Linear<B: Backend> {
    weight_t: Tensor<B, 2>,
}

impl<B: Backend> Linear<B> {
    /// From a Hugging Face weight `W: [out, in]`.
    pub fn from_weight(weight: Tensor<B, 2>) -> Self {
        Self {
            weight_t: weight.transpose(),
        }
    }

    /// `W: [out, in]`, as stored in checkpoints.
    pub fn weight(&self) -> Tensor<B, 2> {
        self.weight_t.clone().transpose()
    }

    pub fn in_features(&self) -> usize {
        self.weight_t.dims()[0]
    }

    pub fn out_features(&self) -> usize {
        self.weight_t.dims()[1]
    }

    /// Applies the layer to the last dimension of `x`.
    pub fn forward<const D: usize>(&self, x: Tensor<B, D>) -> Tensor<B, D> {
        let dims = x.dims();
        let rows: usize = dims[..D - 1].iter().product();
        let y = x
            .reshape([rows, dims[D - 1]])
            .matmul(self.weight_t.clone());
        let mut out = dims;
        out[D - 1] = self.out_features();
        y.reshape(out)
    }
}
