use std::collections::BTreeSet;

use model_llama::LinearKind;
use quant_core::QuantDim;
use serde::{Deserialize, Serialize};

/// How the quantization dim of each linear is chosen.
/// Serialized as its string form (`oc`, `ic`, `ada`, `ic:qkv,down`, ...).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum DimPolicy {
    /// The same dim everywhere (`oc`: the usual grouping; `ic`: per-IC everywhere).
    Fixed(QuantDim),
    /// Per-IC on the named linears, per-OC elsewhere (ablations: `ic:qkv`, `ic:down`, ...).
    IcOn(BTreeSet<LinearKind>),
    /// AdaDim: per linear, the dim with the lower output error on calibration data.
    Ada,
}

impl DimPolicy {
    /// The dims to try for `kind`: one for fixed policies, both for AdaDim.
    pub fn candidates(&self, kind: LinearKind) -> Vec<QuantDim> {
        match self {
            DimPolicy::Fixed(d) => vec![*d],
            DimPolicy::IcOn(set) if set.contains(&kind) => vec![QuantDim::Ic],
            DimPolicy::IcOn(_) => vec![QuantDim::Oc],
            DimPolicy::Ada => QuantDim::ALL.to_vec(),
        }
    }

    pub fn is_adaptive(&self) -> bool {
        matches!(self, DimPolicy::Ada)
    }
}

impl std::fmt::Display for DimPolicy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DimPolicy::Fixed(d) => write!(f, "{d}"),
            DimPolicy::Ada => f.write_str("ada"),
            DimPolicy::IcOn(set) => {
                let names: Vec<_> = set.iter().map(|k| k.short_name()).collect();
                write!(f, "ic:{}", names.join(","))
            }
        }
    }
}

impl std::str::FromStr for DimPolicy {
    type Err = String;

    /// `oc`, `ic`, `ada`, or `ic:<list>` where the list names linears (`q,k,v,o,gate,up,down`)
    /// or the groups `qkv`, `mlp` (gate, up, down) and `all`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "ada" => return Ok(DimPolicy::Ada),
            "oc" | "ic" => return Ok(DimPolicy::Fixed(s.parse()?)),
            _ => {}
        }
        let list = s.strip_prefix("ic:").ok_or_else(|| {
            format!("unknown dim policy `{s}` (expected oc, ic, ada or ic:<linears>)")
        })?;
        let mut set = BTreeSet::new();
        for item in list.split(',').map(str::trim) {
            match item {
                "qkv" => set.extend([LinearKind::Q, LinearKind::K, LinearKind::V]),
                "mlp" => set.extend([LinearKind::Gate, LinearKind::Up, LinearKind::Down]),
                "all" => set.extend(LinearKind::ALL),
                one => {
                    set.insert(one.parse()?);
                }
            }
        }
        if set.is_empty() {
            return Err(format!("`{s}` names no linear"));
        }
        Ok(DimPolicy::IcOn(set))
    }
}

impl TryFrom<String> for DimPolicy {
    type Error = String;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        s.parse()
    }
}

impl From<DimPolicy> for String {
    fn from(p: DimPolicy) -> Self {
        p.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_ablation_variants() {
        let p: DimPolicy = "ic:qkv,down".parse().unwrap();
        assert_eq!(p.candidates(LinearKind::K), vec![QuantDim::Ic]);
        assert_eq!(p.candidates(LinearKind::Down), vec![QuantDim::Ic]);
        assert_eq!(p.candidates(LinearKind::Up), vec![QuantDim::Oc]);
        assert_eq!(p.to_string(), "ic:q,k,v,down");
        assert_eq!(
            "ic:all"
                .parse::<DimPolicy>()
                .unwrap()
                .candidates(LinearKind::O),
            vec![QuantDim::Ic]
        );
        assert_eq!(
            "ada"
                .parse::<DimPolicy>()
                .unwrap()
                .candidates(LinearKind::O)
                .len(),
            2
        );
        assert!("ic:".parse::<DimPolicy>().is_err());
        assert!("ic:foo".parse::<DimPolicy>().is_err());
        assert!("xy".parse::<DimPolicy>().is_err());
    }
}
