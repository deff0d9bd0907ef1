//! Generated tokens to text pieces: the stop token and stop strings end the text, and a piece
//! that might still become a stop string, or is an incomplete UTF-8 character, is held back
//! until the next token decides it.

use model_llama::LlamaTokenizer;

/// The text of one sequence, built a token at a time.
pub struct TextStream<'t> {
    tokenizer: &'t LlamaTokenizer,
    stop_token: Option<u32>,
    stop: Vec<String>,
    tokens: Vec<u32>,
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
        let text = self.decode();
        // A stop string may begin in the held-back tail.
        let search_from = floor_char_boundary(&text, self.sent.saturating_sub(self.max_stop_len()));
        let first_stop = self
            .stop
            .iter()
            .filter_map(|s| {
                text[search_from..]
                    .find(s.as_str())
                    .map(|i| search_from + i)
            })
            .min();
        if let Some(end) = first_stop {
            self.stopped = true;
            return (self.take(&text, end), true);
        }
        let mut safe = text.trim_end_matches('\u{FFFD}').len();
        let settled = safe;
        for s in &self.stop {
            for (i, _) in s.char_indices().skip(1) {
                if text[..settled].ends_with(&s[..i]) {
                    safe = safe.min(settled - i);
                }
            }
        }
        (self.take(&text, safe), false)
    }

    /// The held-back text, once the sequence has ended without a stop string.
    pub fn rest(&mut self) -> String {
        let text = self.decode();
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

    fn decode(&self) -> String {
        self.tokenizer.decode(&self.tokens).unwrap_or_default()
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
