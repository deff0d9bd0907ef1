//! The named choices of a run (docs/method.md §4.5–4.7): how weights are rounded, what chooses the
//! dim, what the next layer is calibrated on, and the recipes that set them together. Each is
//! one type from the CLI flag through the config key to the report, spelled the same in all.

use quant_core::RangeMode;
use serde::{Deserialize, Serialize};

use crate::policy::DimPolicy;

/// A fieldless enum with one name per variant, used as-is by clap, serde and the report.
macro_rules! named_choice {
    ($(#[$meta:meta])* $name:ident { $($(#[$vmeta:meta])* $variant:ident = $text:literal,)+ }) => {
        $(#[$meta])*
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
        pub enum $name {
            $($(#[$vmeta])* #[serde(rename = $text)] $variant,)+
        }

        impl $name {
            pub const ALL: &[$name] = &[$($name::$variant),+];

            pub fn as_str(self) -> &'static str {
                match self {
                    $($name::$variant => $text,)+
                }
            }
        }

        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(self.as_str())
            }
        }

        impl std::str::FromStr for $name {
            type Err = String;
            fn from_str(s: &str) -> Result<Self, Self::Err> {
                Self::ALL
                    .iter()
                    .copied()
                    .find(|v| v.as_str() == s)
                    .ok_or_else(|| {
                        let names: Vec<_> = Self::ALL.iter().map(|v| v.as_str()).collect();
                        format!("unknown value `{s}` (expected {})", names.join(" or "))
                    })
            }
        }
    };
}

named_choice! {
    /// How each linear's weights are rounded.
    Method {
        /// Round to nearest (docs/method.md §2).
        Rtn = "rtn",
        /// GPTQ's error compensation (docs/method.md §3).
        Gptq = "gptq",
        /// AWQ's activation-aware channel scales, folded into the layer before RTN
        /// (docs/method.md §4.8).
        Awq = "awq",
        /// AWQ's channel scales folded in, then GPTQ on the folded layer (docs/method.md §4.8).
        AwqGptq = "awq-gptq",
    }
}

impl Method {
    /// Whether GPTQ rounds the weights (`gptq`, `awq-gptq`); otherwise RTN does.
    pub fn solves_gptq(self) -> bool {
        matches!(self, Method::Gptq | Method::AwqGptq)
    }

    /// Whether AWQ's channel scales are searched and folded in before rounding.
    pub fn folds_awq(self) -> bool {
        matches!(self, Method::Awq | Method::AwqGptq)
    }
}

named_choice! {
    /// Which candidates AdaDim's dim choice compares (docs/method.md §4.5).
    Score {
        /// The RTN candidates of both dims, as the paper does, whatever the method.
        Rtn = "rtn",
        /// The candidates the method produces: with GPTQ, both dims solved.
        Gptq = "gptq",
    }
}

named_choice! {
    /// What layer k + 1 is calibrated on (docs/method.md §4.6).
    Propagate {
        /// The full-precision outputs of layers 0..k, as the paper does.
        Fp = "fp",
        /// The outputs of the already quantized layers 0..k, as GPTQ's sequential mode does.
        Quantized = "quantized",
    }
}

named_choice! {
    /// A named set of the choices below (docs/method.md §4.7).
    Recipe {
        /// The paper's method: RTN-AdaDim (RTN-scored, min-max groups, FP propagation).
        Paper = "paper",
        /// This project's most accurate combination (docs/results.md): GPTQ-AdaDim with
        /// searched ranges, GPTQ-scored dims, quantized propagation and refitted groups.
        Best = "best",
    }
}

/// The choices a recipe sets; a run may override each of them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Choices {
    pub method: Method,
    pub dim: DimPolicy,
    pub range: RangeMode,
    pub score: Score,
    pub propagate: Propagate,
    /// GPTQ's per-OC group parameters refitted to its codes (docs/method.md §3.1).
    pub refit: bool,
}

impl Recipe {
    pub fn choices(self) -> Choices {
        match self {
            Recipe::Paper => Choices {
                method: Method::Rtn,
                dim: DimPolicy::Ada,
                range: RangeMode::MinMax,
                score: Score::Rtn,
                propagate: Propagate::Fp,
                refit: false,
            },
            Recipe::Best => Choices {
                method: Method::Gptq,
                dim: DimPolicy::Ada,
                range: RangeMode::Search,
                score: Score::Gptq,
                propagate: Propagate::Quantized,
                refit: true,
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The one name of each value reads back through `FromStr` and serde alike, and an
    /// unknown name lists the known ones.
    #[test]
    fn names_round_trip_through_parsing_and_serde() {
        fn check<T>(all: &[T])
        where
            T: Copy + PartialEq + std::fmt::Debug + std::fmt::Display + std::str::FromStr,
            T: Serialize + for<'de> Deserialize<'de>,
            <T as std::str::FromStr>::Err: std::fmt::Debug,
        {
            for &v in all {
                let name = v.to_string();
                assert_eq!(name.parse::<T>().unwrap(), v);
                assert_eq!(serde_json::to_string(&v).unwrap(), format!("\"{name}\""));
                assert_eq!(
                    serde_json::from_str::<T>(&format!("\"{name}\"")).unwrap(),
                    v
                );
            }
        }
        check(Method::ALL);
        check(Score::ALL);
        check(Propagate::ALL);
        check(Recipe::ALL);
        let err = "hqq".parse::<Method>().unwrap_err();
        assert!(
            err.contains("`hqq`") && err.contains("rtn or gptq or awq"),
            "{err}"
        );
    }
}
