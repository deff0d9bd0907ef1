use serde::{Deserialize, Serialize};

use crate::QuantError;

/// The dimension along which a group runs.
///
/// `W` is `[out_features, in_features]` as in Hugging Face checkpoints.
/// * `Oc` (per output channel): a group is `group_size` consecutive input weights of one output row.
/// * `Ic` (per input channel): a group is `group_size` consecutive output rows of one input column,
///   i.e. `Oc` grouping applied to `Wᵀ`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum QuantDim {
    Oc,
    Ic,
}

impl QuantDim {
    pub const ALL: [QuantDim; 2] = [QuantDim::Oc, QuantDim::Ic];

    /// `(rows, cols)` of the *grouped matrix*: `W` for `Oc`, `Wᵀ` for `Ic`.
    /// Groups always run along `cols`, so every algorithm is written once, for rows.
    pub fn grouped_shape(self, out_features: usize, in_features: usize) -> (usize, usize) {
        match self {
            QuantDim::Oc => (out_features, in_features),
            QuantDim::Ic => (in_features, out_features),
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            QuantDim::Oc => "oc",
            QuantDim::Ic => "ic",
        }
    }
}

impl std::fmt::Display for QuantDim {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for QuantDim {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "oc" => Ok(QuantDim::Oc),
            "ic" => Ok(QuantDim::Ic),
            other => Err(format!(
                "unknown quantization dim `{other}` (expected oc or ic)"
            )),
        }
    }
}

/// How long a group is along the grouped dimension.
///
/// Written as one integer on the command line, in configs and in checkpoints: `-1` for
/// [`GroupSize::Whole`] (the convention of GPTQ checkpoints), the length otherwise.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "i64", into = "i64")]
pub enum GroupSize {
    /// One group over the whole grouped dimension.
    Whole,
    /// Groups of this many weights (positive).
    Len(usize),
}

impl GroupSize {
    /// The written form: `-1` for the whole dimension, else the length.
    pub fn as_i64(self) -> i64 {
        match self {
            GroupSize::Whole => -1,
            GroupSize::Len(g) => g as i64,
        }
    }
}

impl TryFrom<i64> for GroupSize {
    type Error = QuantError;
    fn try_from(v: i64) -> Result<Self, QuantError> {
        match v {
            -1 => Ok(GroupSize::Whole),
            g if g > 0 => Ok(GroupSize::Len(g as usize)),
            _ => Err(QuantError::InvalidGroupSize(v)),
        }
    }
}

impl From<GroupSize> for i64 {
    fn from(g: GroupSize) -> i64 {
        g.as_i64()
    }
}

impl std::fmt::Display for GroupSize {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.as_i64())
    }
}

impl std::str::FromStr for GroupSize {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let v: i64 = s.trim().parse().map_err(|_| {
            format!("invalid group size `{s}`: expected a positive length or -1 (whole dimension)")
        })?;
        GroupSize::try_from(v).map_err(|e| e.to_string())
    }
}

/// Bits, group size and dimension of a group quantizer, asymmetric unless `sym`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct QuantConfig {
    pub bits: u32,
    pub group_size: GroupSize,
    pub dim: QuantDim,
    /// Symmetric groups: a scale only, the zero point fixed at the centre code
    /// (docs/method.md §2.2).
    #[serde(default)]
    pub sym: bool,
}

impl QuantConfig {
    /// Validates `bits` (2, 3, 4, 8) and `group_size` (a positive length or the whole dimension).
    pub fn new(bits: u32, group_size: GroupSize, dim: QuantDim) -> Result<Self, QuantError> {
        if !matches!(bits, 2 | 3 | 4 | 8) {
            return Err(QuantError::UnsupportedBits(bits));
        }
        if group_size == GroupSize::Len(0) {
            return Err(QuantError::InvalidGroupSize(0));
        }
        Ok(Self {
            bits,
            group_size,
            dim,
            sym: false,
        })
    }

    pub fn with_dim(self, dim: QuantDim) -> Self {
        Self { dim, ..self }
    }

    pub fn with_sym(self, sym: bool) -> Self {
        Self { sym, ..self }
    }

    /// Largest code, `2^bits − 1`.
    pub fn maxq(&self) -> u32 {
        (1 << self.bits) - 1
    }

    /// The resolved group length for a grouped dimension of length `len`.
    pub fn group_len(&self, len: usize) -> Result<usize, QuantError> {
        let g = match self.group_size {
            GroupSize::Whole => len,
            GroupSize::Len(g) => g,
        };
        if g == 0 || !len.is_multiple_of(g) {
            return Err(QuantError::GroupSizeDoesNotDivide {
                group_size: g,
                len,
                dim_name: match self.dim {
                    QuantDim::Oc => "in_features",
                    QuantDim::Ic => "out_features",
                },
            });
        }
        Ok(g)
    }

    /// Checks that a `[out_features, in_features]` weight can be quantized with this config
    /// and returns the resolved group length.
    pub fn check_shape(
        &self,
        out_features: usize,
        in_features: usize,
    ) -> Result<usize, QuantError> {
        if out_features == 0 || in_features == 0 {
            return Err(QuantError::Shape(format!(
                "empty weight [{out_features}, {in_features}]"
            )));
        }
        let (_, cols) = self.dim.grouped_shape(out_features, in_features);
        self.group_len(cols)
    }
}
