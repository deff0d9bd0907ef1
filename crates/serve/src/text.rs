//! Generated tokens to text pieces: the stop token and stop strings end the text, and a piece
//! that might still become a stop string, or is an incomplete UTF-8 character, is held back
//! until the next token decides it.
//!
//! Each token costs the same whatever the text's length: only the newest tokens are decoded,
//! beside a few before them for context (a decoder may drop the leading space of the first
//! token it sees, and one character's bytes may straddle tokens). Decoding the whole sequence
//! again for every token made a long completion quadratic, on the thread that serves every
//! connection.

use model_llama::LlamaTokenizer;

/// The text of one sequence, built a token at a time.
pub struct TextStream<'t> {
    tokenizer: &'t LlamaTokenizer,
    stop_token: Option<u32>,
    stop: Vec<String>,
    tokens: Vec<u32>,
    /// The text of `tokens[..read]`, which later tokens do not change.
    text: String,
    /// `tokens[context..read]` are decoded again beside the newer ones, for context.
    context: usize,
    read: usize,
    /// Bytes of the text already handed out.
    sent: usize,
    stopped: bool,
}

impl<'t> TextStream<'t> {
    pub fn new(tokenizer: &'t LlamaTokenizer, stop_token: Option<u32>, stop: Vec<String>) -> Self {
        Self {
            tokenizer,
            stop_token,
            stop: stop.into_iter().filter(|s| !s.is_empty()).collect(),
            tokens: Vec::new(),
            text: String::new(),
            context: 0,
            read: 0,
            sent: 0,
            stopped: false,
        }
    }

    /// Adds `token`; returns the text now certain to follow, and whether the text has ended
    /// (a stop string was completed, or `token` is the stop token).
    pub fn push(&mut self, token: u32) -> (String, bool) {
        if self.stopped {
            return (String::new(), true);
        }
        if Some(token) == self.stop_token {
            self.stopped = true;
            return (self.rest(), true);
        }
        self.tokens.push(token);
        let tail = self.tail();
        // The text from where a stop string may begin (in the held-back part) to the end:
        // `recent[i]` is byte `base + i` of the whole text.
        let base = floor_char_boundary(&self.text, self.sent.saturating_sub(self.max_stop_len()));
        let recent = [&self.text[base..], &tail].concat();
        let from = self.sent.saturating_sub(base).min(recent.len());
        let search_from = floor_char_boundary(&recent, from.saturating_sub(self.max_stop_len()));
        let first_stop = self
            .stop
            .iter()
            .filter_map(|s| {
                recent[search_from..]
                    .find(s.as_str())
                    .map(|i| search_from + i)
            })
            .min();
        if let Some(end) = first_stop {
            self.stopped = true;
            return (self.take(&recent, base, end), true);
        }
        let mut safe = recent.trim_end_matches('\u{FFFD}').len();
        let settled = safe;
        for s in &self.stop {
            for (i, _) in s.char_indices().skip(1) {
                if recent[..settled].ends_with(&s[..i]) {
                    safe = safe.min(settled - i);
                }
            }
        }
        // An incomplete character waits for its next bytes, its tokens still unread.
        if !tail.ends_with('\u{FFFD}') {
            self.text.push_str(&tail);
            (self.context, self.read) = (self.read, self.tokens.len());
        }
        (self.take(&recent, base, safe), false)
    }

    /// The held-back text, once the sequence has ended without a stop string.
    pub fn rest(&mut self) -> String {
        let base = floor_char_boundary(&self.text, self.sent);
        let recent = [&self.text[base..], &self.tail()].concat();
        self.take(&recent, base, recent.len())
    }

    /// `recent[..end]` from the first byte not yet sent, where `recent` is the whole text from
    /// byte `base` on.
    fn take(&mut self, recent: &str, base: usize, end: usize) -> String {
        let start = floor_char_boundary(recent, self.sent.saturating_sub(base));
        if end <= start {
            return String::new();
        }
        self.sent = base + end;
        recent[start..end].to_string()
    }

    /// The text of `tokens[read..]`, decoded after `tokens[context..read]`. Where later tokens
    /// rewrite the context's text, the whole sequence is decoded: SentencePiece's byte fallback
    /// turns a whole run of byte tokens into replacement characters while it ends in an
    /// incomplete character, so the tail ends in one and waits for the next token.
    fn tail(&self) -> String {
        let before = self.decode(&self.tokens[self.context..self.read]);
        let after = self.decode(&self.tokens[self.context..]);
        match after.strip_prefix(before.as_str()) {
            Some(tail) => tail.to_string(),
            None => {
                let whole = self.decode(&self.tokens);
                whole[floor_char_boundary(&whole, self.text.len())..].to_string()
            }
        }
    }

    fn decode(&self, tokens: &[u32]) -> String {
        self.tokenizer.decode(tokens).unwrap_or_default()
    }

    fn max_stop_len(&self) -> usize {
        self.stop.iter().map(String::len).max().unwrap_or(0)
    }
}

fn floor_char_boundary(s: &str, mut i: usize) -> usize {
    i = i.min(s.len());
    while !s.is_char_boundary(i) {
        i -= 1;
    }
    i
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    /// The naive reference: the whole sequence decoded again for every token, and the same
    /// rules for what is held back.
    struct Whole<'t> {
        tokenizer: &'t LlamaTokenizer,
        stop_token: Option<u32>,
        stop: Vec<String>,
        tokens: Vec<u32>,
        sent: usize,
        stopped: bool,
    }

    impl Whole<'_> {
        fn push(&mut self, token: u32) -> (String, bool) {
            if self.stopped {
                return (String::new(), true);
            }
            if Some(token) == self.stop_token {
                self.stopped = true;
                return (self.rest(), true);
            }
            self.tokens.push(token);
            let text = self.tokenizer.decode(&self.tokens).unwrap();
            let longest = self.stop.iter().map(String::len).max().unwrap_or(0);
            let from = floor_char_boundary(&text, self.sent.saturating_sub(longest));
            let first = (self.stop.iter())
                .filter_map(|s| text[from..].find(s.as_str()).map(|i| from + i))
                .min();
            if let Some(end) = first {
                self.stopped = true;
                return (self.take(&text, end), true);
            }
            let settled = text.trim_end_matches('\u{FFFD}').len();
            let mut safe = settled;
            for s in &self.stop {
                for (i, _) in s.char_indices().skip(1) {
                    if text[..settled].ends_with(&s[..i]) {
                        safe = safe.min(settled - i);
                    }
                }
            }
            (self.take(&text, safe), false)
        }

        fn rest(&mut self) -> String {
            let text = self.tokenizer.decode(&self.tokens).unwrap();
            self.take(&text, text.len())
        }

        fn take(&mut self, text: &str, end: usize) -> String {
            let start = floor_char_boundary(text, self.sent);
            if end <= start {
                return String::new();
            }
            self.sent = end;
            text[start..end].to_string()
        }
    }

    /// Whether decoding `tokens` one more at a time only ever appends to the text, once a
    /// trailing incomplete character is set aside. Byte-level BPE always does; SentencePiece's
    /// byte fallback does not when a run of byte tokens ends in an incomplete character: the
    /// whole run then decodes to replacement characters, the complete ones before it too.
    fn appends_only(tokenizer: &LlamaTokenizer, tokens: &[u32]) -> bool {
        let whole = tokenizer.decode(tokens).unwrap();
        (1..tokens.len()).all(|i| {
            let text = tokenizer.decode(&tokens[..i]).unwrap();
            whole.starts_with(text.trim_end_matches('\u{FFFD}'))
        })
    }

    /// Streams random token sequences through both and compares every piece: `ids` draws a
    /// token, and the stop strings are cut from each sequence's own text (so that they occur),
    /// or are text that does not. Only sequences whose decoding [`appends_only`] count: the
    /// reference hands out pieces of a text that later tokens rewrite for the others.
    fn matches_whole_decoding(tokenizer: &LlamaTokenizer, ids: impl Fn(&mut StdRng) -> u32) {
        let mut rng = StdRng::seed_from_u64(7);
        let stop_token = Some(ids(&mut rng));
        let (mut stops_seen, mut compared) = (0, 0);
        for trial in 0..400 {
            let len = rng.random_range(1..60);
            let tokens: Vec<u32> = (0..len).map(|_| ids(&mut rng)).collect();
            if !appends_only(tokenizer, &tokens) {
                continue;
            }
            compared += 1;
            let whole = tokenizer.decode(&tokens).unwrap();
            let chars: Vec<char> = whole.chars().collect();
            let stop: Vec<String> = match trial % 3 {
                0 => vec![],
                1 if !chars.is_empty() => {
                    let at = rng.random_range(0..chars.len());
                    let n = rng.random_range(1..=3).min(chars.len() - at);
                    vec![chars[at..at + n].iter().collect(), "\u{1}never".into()]
                }
                _ => vec!["\u{1}never".into()],
            };
            let mut fast = TextStream::new(tokenizer, stop_token, stop.clone());
            let mut slow = Whole {
                tokenizer,
                stop_token,
                stop: stop.into_iter().filter(|s| !s.is_empty()).collect(),
                tokens: vec![],
                sent: 0,
                stopped: false,
            };
            let mut text = String::new();
            for (i, &t) in tokens.iter().enumerate() {
                let piece = fast.push(t);
                assert_eq!(
                    piece,
                    slow.push(t),
                    "trial {trial}, token {i} of {tokens:?}"
                );
                text.push_str(&piece.0);
                if piece.1 {
                    stops_seen += 1;
                    break;
                }
            }
            let rest = fast.rest();
            assert_eq!(rest, slow.rest(), "trial {trial}: {tokens:?}");
            if !slow.stopped {
                assert_eq!(text + &rest, whole, "trial {trial}: {tokens:?}");
            }
        }
        assert!(compared > 150, "only {compared} sequences compared");
        assert!(stops_seen > 50, "only {stops_seen} sequences met a stop");
    }

    #[test]
    fn byte_level_bpe_streams_as_whole_decoding_does() {
        let gguf = test_assets::smollm2_gguf().expect("the test model can be fetched");
        let tokenizer = model_llama::open_model(&gguf).unwrap().tokenizer;
        let vocab = tokenizer.vocab_size() as u32;
        // Mostly the ids of a text with multi-byte characters (so that characters straddle
        // tokens), and any id at all.
        let text = "Größe: 5 €, naïve café — 日本語のテキスト 😀👍🏽 ok";
        let common = tokenizer.encode(text).unwrap();
        matches_whole_decoding(&tokenizer, |rng| {
            if rng.random_bool(0.7) {
                common[rng.random_range(0..common.len())]
            } else {
                rng.random_range(0..vocab)
            }
        });
    }

    /// LLaMA-2's `tokenizer.json` decoder (SentencePiece pieces, byte fallback, the first
    /// space stripped) on a small vocabulary.
    #[test]
    fn sentencepiece_byte_fallback_streams_as_whole_decoding_does() {
        let mut vocab = serde_json::Map::new();
        let mut add = |t: String| {
            let id = vocab.len();
            vocab.insert(t, id.into());
        };
        for t in ["<unk>", "<s>", "</s>"] {
            add(t.into());
        }
        for b in 0..=255u8 {
            add(format!("<0x{b:02X}>"));
        }
        for t in [
            "▁",
            "▁the",
            "▁cat",
            "s",
            "é",
            "▁naïve",
            "日本",
            "▁😀",
            "a",
            "▁▁",
        ] {
            add(t.into());
        }
        let n = vocab.len() as u32;
        let json = serde_json::json!({
            "version": "1.0", "truncation": null, "padding": null, "added_tokens": [],
            "normalizer": null, "pre_tokenizer": null, "post_processor": null,
            "decoder": {"type": "Sequence", "decoders": [
                {"type": "Replace", "pattern": {"String": "▁"}, "content": " "},
                {"type": "ByteFallback"},
                {"type": "Fuse"},
                {"type": "Strip", "content": " ", "start": 1, "stop": 0}]},
            "model": {"type": "BPE", "dropout": null, "unk_token": "<unk>",
                      "continuing_subword_prefix": null, "end_of_word_suffix": null,
                      "fuse_unk": true, "byte_fallback": true, "vocab": vocab, "merges": []}
        });
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tokenizer.json");
        std::fs::write(&path, json.to_string()).unwrap();
        let tokenizer = LlamaTokenizer::from_file(&path).unwrap();
        // "€" is the bytes E2 82 AC, "é" C3 A9: byte tokens that complete characters, and
        // stray ones that never do.
        let bytes = [0xE2, 0x82, 0xAC, 0xC3, 0xA9].map(|b| 3 + b);
        matches_whole_decoding(&tokenizer, |rng| {
            if rng.random_bool(0.4) {
                bytes[rng.random_range(0..bytes.len())]
            } else {
                rng.random_range(0..n)
            }
        });
    }
}
