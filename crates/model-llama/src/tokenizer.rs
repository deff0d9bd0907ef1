//! The model's tokenizer: a Hugging Face `tokenizers` tokenizer, either read from a
//! `tokenizer.json` or rebuilt from a GGUF file's `tokenizer.ggml.*` metadata.
//!
//! A GGUF file stores the vocabulary, the merges and token types but only *names* its
//! pre-tokenizer (`tokenizer.ggml.pre`), so each supported name is mapped here to the pipeline
//! the original `tokenizer.json` uses. Unknown names are rejected rather than approximated:
//! a slightly wrong pre-tokenizer silently changes perplexity.

use std::path::Path;

use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::models::bpe::BPE;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::{AddedToken, PreTokenizerWrapper, Tokenizer};

use crate::error::{ModelError, Result};
use crate::gguf::GgufFile;

/// llama.cpp's `LLAMA_TOKEN_TYPE_CONTROL` and `LLAMA_TOKEN_TYPE_USER_DEFINED`.
const TOKEN_TYPE_CONTROL: i64 = 3;
const TOKEN_TYPE_USER_DEFINED: i64 = 4;

/// A byte-level BPE tokenizer with the model's special-token ids and chat template.
#[derive(Clone)]
pub struct LlamaTokenizer {
    inner: Tokenizer,
    bos: Option<u32>,
    eos: Option<u32>,
    /// The Jinja template that turns chat messages into a prompt (Hugging Face's
    /// `chat_template`, GGUF's `tokenizer.chat_template`).
    chat_template: Option<String>,
}

impl std::fmt::Debug for LlamaTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LlamaTokenizer")
            .field("vocab_size", &self.vocab_size())
            .field("bos", &self.bos)
            .field("eos", &self.eos)
            .finish()
    }
}

impl LlamaTokenizer {
    /// Rebuilds the tokenizer from `tokenizer.ggml.*` metadata. Supported: model `gpt2`
    /// (byte-level BPE) with pre-tokenizer `smollm` or `gpt-2`.
    pub fn from_gguf(file: &GgufFile) -> Result<Self> {
        let path = file.path();
        let model = file.require_str("tokenizer.ggml.model")?;
        if model != "gpt2" {
            return Err(ModelError::Unsupported {
                path: path.into(),
                what: "tokenizer model (tokenizer.ggml.model)",
                value: format!("`{model}` (only `gpt2`, byte-level BPE, is supported)"),
            });
        }
        let pre = file.require_str("tokenizer.ggml.pre")?;
        let pre_tokenizer = pre_tokenizer(pre).ok_or_else(|| ModelError::Unsupported {
            path: path.into(),
            what: "pre-tokenizer (tokenizer.ggml.pre)",
            value: format!("`{pre}` (supported: smollm, gpt-2)"),
        })?;

        let tokens = string_array(file, "tokenizer.ggml.tokens")?;
        let merges = string_array(file, "tokenizer.ggml.merges")?
            .into_iter()
            .enumerate()
            .map(|(i, m)| match m.split_once(' ') {
                Some((a, b)) if !a.is_empty() && !b.is_empty() => {
                    Ok((a.to_string(), b.to_string()))
                }
                _ => Err(ModelError::malformed(
                    path,
                    format!(
                        "tokenizer.ggml.merges[{i}] = {m:?} is not two tokens separated by a space"
                    ),
                )),
            })
            .collect::<Result<Vec<_>>>()?;
        let token_types = match file.get("tokenizer.ggml.token_type") {
            None => vec![],
            Some(_) => {
                let types = file.require_array("tokenizer.ggml.token_type")?;
                if types.len() != tokens.len() {
                    return Err(ModelError::malformed(
                        path,
                        format!(
                            "tokenizer.ggml.token_type has {} entries for {} tokens",
                            types.len(),
                            tokens.len()
                        ),
                    ));
                }
                types
                    .iter()
                    .map(|t| {
                        t.as_i64().ok_or_else(|| {
                            file.wrong_type("tokenizer.ggml.token_type", "an integer array")
                        })
                    })
                    .collect::<Result<Vec<_>>>()?
            }
        };

        let vocab: tokenizers::models::bpe::Vocab = tokens
            .iter()
            .enumerate()
            .map(|(id, t)| (t.to_string(), id as u32))
            .collect();
        if vocab.len() != tokens.len() {
            return Err(ModelError::malformed(
                path,
                "tokenizer.ggml.tokens has duplicate tokens",
            ));
        }
        let bpe = BPE::builder()
            .vocab_and_merges(vocab, merges)
            .build()
            .map_err(|e| ModelError::malformed(path, format!("tokenizer BPE: {e}")))?;

        let mut inner = Tokenizer::new(bpe);
        inner.with_pre_tokenizer(Some(pre_tokenizer));
        inner.with_decoder(Some(ByteLevelDecoder::default()));
        let special: Vec<AddedToken> = token_types
            .iter()
            .zip(&tokens)
            .filter(|(t, _)| matches!(**t, TOKEN_TYPE_CONTROL | TOKEN_TYPE_USER_DEFINED))
            .map(|(_, tok)| AddedToken::from(tok.to_string(), true))
            .collect();
        inner.add_special_tokens(&special);

        let id = |key: &str| -> Result<Option<u32>> {
            let Some(v) = file.get(key) else {
                return Ok(None);
            };
            let id = v
                .as_u64()
                .and_then(|v| u32::try_from(v).ok())
                .filter(|&id| (id as usize) < tokens.len())
                .ok_or_else(|| {
                    ModelError::malformed(path, format!("`{key}` = {v:?} is not a token id"))
                })?;
            Ok(Some(id))
        };
        let chat_template = match file.get("tokenizer.chat_template") {
            None => None,
            Some(v) => Some(
                v.as_str()
                    .ok_or_else(|| file.wrong_type("tokenizer.chat_template", "a string"))?
                    .to_string(),
            ),
        };
        Ok(Self {
            inner,
            bos: id("tokenizer.ggml.bos_token_id")?,
            eos: id("tokenizer.ggml.eos_token_id")?,
            chat_template,
        })
    }

    /// Reads a Hugging Face `tokenizer.json`. The BOS/EOS ids and the chat template come from a
    /// `tokenizer_config.json` next to it (`bos_token`/`eos_token`, `chat_template`), when there
    /// is one.
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| ModelError::io(path, e))?;
        let malformed = |e: &dyn std::fmt::Display| {
            ModelError::malformed(path, format!("not a tokenizer.json: {e}"))
        };
        // `tokenizers` 0.22 panics instead of failing on some bad input: on JSON that does not
        // parse (its decoder section is read with an `expect`), and on some sections that parse
        // but are wrong (a `Precompiled` normalizer's charsmap). Checking the syntax first
        // avoids the common case; catching the panic covers the rest.
        serde_json::from_str::<serde::de::IgnoredAny>(&text).map_err(|e| malformed(&e))?;
        let inner = std::panic::catch_unwind(|| text.parse::<Tokenizer>())
            .map_err(|_| malformed(&"the tokenizers library panicked reading it"))?
            .map_err(|e| malformed(&e))?;
        let mut tok = Self {
            inner,
            bos: None,
            eos: None,
            chat_template: None,
        };
        let config_path = path.with_file_name("tokenizer_config.json");
        if config_path.is_file() {
            let text = std::fs::read_to_string(&config_path)
                .map_err(|e| ModelError::io(&config_path, e))?;
            let config: serde_json::Value = serde_json::from_str(&text)
                .map_err(|e| ModelError::malformed(&config_path, e.to_string()))?;
            let id_of = |key: &str| {
                let v = config.get(key)?;
                let content = v.as_str().or_else(|| v.get("content")?.as_str())?;
                tok.inner.token_to_id(content)
            };
            tok.bos = id_of("bos_token");
            tok.eos = id_of("eos_token");
            tok.chat_template =
                chat_template(&config).map_err(|e| ModelError::malformed(&config_path, e))?;
        }
        Ok(tok)
    }

    /// Writes `tokenizer_config.json` (the special tokens and the chat template, what
    /// [`Self::from_file`] reads back) atomically.
    pub fn save_config(&self, path: &Path) -> Result<()> {
        let mut config = serde_json::Map::new();
        let token = |id: Option<u32>| id.and_then(|id| self.id_to_token(id));
        if let Some(bos) = token(self.bos) {
            config.insert("bos_token".into(), bos.into());
        }
        if let Some(eos) = token(self.eos) {
            config.insert("eos_token".into(), eos.into());
        }
        if let Some(template) = &self.chat_template {
            config.insert("chat_template".into(), template.clone().into());
        }
        let json = serde_json::to_vec_pretty(&config).expect("json serializes");
        crate::staging::write_atomic(path, &json)
    }

    /// The chat template, when the checkpoint has one.
    pub fn chat_template(&self) -> Option<&str> {
        self.chat_template.as_deref()
    }

    /// Writes `tokenizer.json` atomically (a temporary file in the same directory, then a rename).
    pub fn save(&self, path: &Path) -> Result<()> {
        let json = self
            .inner
            .to_string(true)
            .map_err(|e| ModelError::Tokenizer(format!("cannot serialize: {e}")))?;
        // Not a `tempfile` temporary: those are created 0600, and the rename would keep that
        // mode where every other output file gets the usual 0666 less the umask.
        crate::staging::write_atomic(path, json.as_bytes())
    }

    /// Token ids of `text`, without BOS (these models are trained without it) or any other
    /// added token; special tokens written in the text (`<|im_start|>`) are recognised.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let enc = self
            .inner
            .encode(text, false)
            .map_err(|e| ModelError::Tokenizer(format!("encode: {e}")))?;
        Ok(enc.get_ids().to_vec())
    }

    /// The text of `ids`, special tokens included (so `decode(encode(s)) == s`).
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.inner
            .decode(ids, false)
            .map_err(|e| ModelError::Tokenizer(format!("decode: {e}")))
    }

    pub fn bos_id(&self) -> Option<u32> {
        self.bos
    }

    pub fn eos_id(&self) -> Option<u32> {
        self.eos
    }

    /// Number of ids, added tokens included.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    pub fn id_to_token(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }

    /// The wrapped `tokenizers` tokenizer.
    pub fn inner(&self) -> &Tokenizer {
        &self.inner
    }
}

/// The pre-tokenizer the original `tokenizer.json` of models tagged `pre` uses.
fn pre_tokenizer(pre: &str) -> Option<PreTokenizerWrapper> {
    // `use_regex = true` is the GPT-2 split regex; SmolLM2 first splits digits one by one.
    let byte_level = ByteLevel::new(false, true, true);
    Some(match pre {
        "smollm" => Sequence::new(vec![Digits::new(true).into(), byte_level.into()]).into(),
        "gpt-2" | "gpt2" => byte_level.into(),
        _ => return None,
    })
}

/// `chat_template` of a `tokenizer_config.json`: a string, or a list of named templates (then
/// the one named `default`).
fn chat_template(config: &serde_json::Value) -> std::result::Result<Option<String>, String> {
    let bad = || "`chat_template` is neither a string nor a list of {name, template}".to_string();
    match config.get("chat_template") {
        None | Some(serde_json::Value::Null) => Ok(None),
        Some(serde_json::Value::String(t)) => Ok(Some(t.clone())),
        Some(serde_json::Value::Array(named)) => {
            for entry in named {
                let name = entry.get("name").and_then(|n| n.as_str()).ok_or_else(bad)?;
                let template = entry
                    .get("template")
                    .and_then(|t| t.as_str())
                    .ok_or_else(bad)?;
                if name == "default" {
                    return Ok(Some(template.to_string()));
                }
            }
            Ok(None)
        }
        Some(_) => Err(bad()),
    }
}

fn string_array<'a>(file: &'a GgufFile, key: &str) -> Result<Vec<&'a str>> {
    file.require_array(key)?
        .iter()
        .map(|v| {
            v.as_str()
                .ok_or_else(|| file.wrong_type(key, "an array of strings"))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[cfg(unix)]
    #[test]
    fn saved_file_has_the_usual_mode() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let tok = LlamaTokenizer {
            inner: Tokenizer::new(BPE::default()),
            bos: None,
            eos: None,
            chat_template: None,
        };
        let path = dir.path().join("tokenizer.json");
        tok.save(&path).unwrap();
        // A file written the ordinary way shows what the umask allows.
        let reference = dir.path().join("reference");
        std::fs::write(&reference, b"{}").unwrap();
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&path), mode(&reference));
        let back = LlamaTokenizer::from_file(&path).unwrap();
        assert_eq!(back.vocab_size(), 0);
    }
}
