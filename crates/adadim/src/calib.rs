//! The calibration set: text samples tokenized, concatenated and cut into fixed-length blocks.

use std::path::Path;

use rand::SeedableRng;
use rand::seq::SliceRandom;

use model_llama::InvalidOption;

use crate::error::{AdadimError, Result};

#[derive(Clone, Debug)]
pub struct CalibOptions {
    /// Lines (samples) taken from the text.
    pub n_samples: usize,
    /// Block length; samples longer than this are skipped.
    pub seqlen: usize,
    /// Shuffle the lines with this seed before taking samples (`None`: file order).
    pub shuffle_seed: Option<u64>,
}

impl CalibOptions {
    /// Checks that the options can give a calibration set at all, before any text is read.
    pub fn validate(&self) -> std::result::Result<(), InvalidOption> {
        if self.n_samples == 0 {
            return Err(InvalidOption::new(
                "n_samples",
                "0 samples give no calibration data; need at least 1",
            ));
        }
        if self.seqlen == 0 {
            return Err(InvalidOption::new(
                "seqlen",
                "blocks of 0 tokens hold no calibration data; need at least 1",
            ));
        }
        Ok(())
    }
}

/// Builds the calibration blocks from `text` (one sample per non-empty line): the first
/// `n_samples` lines that tokenize to at most `seqlen` tokens, concatenated and cut into blocks
/// of `seqlen` tokens (the remainder is dropped).
pub fn calibration_blocks(
    text: &str,
    encode: impl Fn(&str) -> Result<Vec<u32>>,
    opts: &CalibOptions,
) -> Result<Vec<Vec<u32>>> {
    opts.validate()?;
    let mut lines: Vec<&str> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect();
    if let Some(seed) = opts.shuffle_seed {
        lines.shuffle(&mut rand::rngs::StdRng::seed_from_u64(seed));
    }
    let mut stream = Vec::new();
    let mut taken = 0;
    for line in lines {
        if taken == opts.n_samples {
            break;
        }
        let ids = encode(line)?;
        if ids.len() <= opts.seqlen {
            stream.extend(ids);
            taken += 1;
        }
    }
    let blocks: Vec<Vec<u32>> = stream
        .chunks_exact(opts.seqlen)
        .map(<[u32]>::to_vec)
        .collect();
    if blocks.is_empty() {
        return Err(AdadimError::EmptyCalibration(format!(
            "{taken} usable samples gave {} tokens, fewer than one block of {}",
            stream.len(),
            opts.seqlen
        )));
    }
    tracing::info!(
        samples = taken,
        tokens = stream.len(),
        blocks = blocks.len(),
        "calibration set"
    );
    Ok(blocks)
}

/// Reads a calibration text file and builds the blocks.
pub fn calibration_from_file(
    path: &Path,
    encode: impl Fn(&str) -> Result<Vec<u32>>,
    opts: &CalibOptions,
) -> Result<Vec<Vec<u32>>> {
    opts.validate()?;
    let text = std::fs::read_to_string(path).map_err(|e| AdadimError::Io {
        path: path.to_path_buf(),
        source: e,
    })?;
    if text.trim().is_empty() {
        return Err(AdadimError::EmptyCalibration(format!(
            "{}: the file is empty",
            path.display()
        )));
    }
    calibration_blocks(&text, encode, opts).map_err(|e| match e {
        AdadimError::EmptyCalibration(msg) => {
            AdadimError::EmptyCalibration(format!("{}: {msg}", path.display()))
        }
        other => other,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn words(s: &str) -> Result<Vec<u32>> {
        Ok(s.split_whitespace().map(|w| w.len() as u32).collect())
    }

    #[test]
    fn skips_long_samples_concatenates_and_cuts() {
        let text = "a bb ccc\n\ntoo long line of many words here\ndd e\nf\n";
        let opts = CalibOptions {
            n_samples: 3,
            seqlen: 4,
            shuffle_seed: None,
        };
        // samples: [1,2,3], [2,1], [1] (the 7-word line is skipped) → 6 tokens → one block.
        assert_eq!(
            calibration_blocks(text, words, &opts).unwrap(),
            vec![vec![1, 2, 3, 2]]
        );
    }

    #[test]
    fn zero_samples_or_length_are_invalid_options() {
        for (n_samples, seqlen, option) in [(0, 4, "n_samples"), (3, 0, "seqlen")] {
            let opts = CalibOptions {
                n_samples,
                seqlen,
                shuffle_seed: None,
            };
            assert_eq!(opts.validate().unwrap_err().option, option);
            match calibration_blocks("a b c d e\n", words, &opts) {
                Err(AdadimError::InvalidOption(e)) => assert_eq!(e.option, option),
                other => panic!("{other:?}"),
            }
        }
    }

    #[test]
    fn empty_calibration_is_an_error() {
        let opts = CalibOptions {
            n_samples: 8,
            seqlen: 16,
            shuffle_seed: None,
        };
        assert!(matches!(
            calibration_blocks("a b\n", words, &opts),
            Err(AdadimError::EmptyCalibration(_))
        ));
    }
}
