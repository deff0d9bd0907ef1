//! The OpenAI request bodies the server reads. Fields it does not use are ignored, as OpenAI's
//! clients send many; options it cannot honour are rejected in `routes`.

use serde::Deserialize;

use crate::chat::ChatMessage;

/// `POST /v1/completions`.
#[derive(Clone, Debug, Deserialize)]
pub struct CompletionRequest {
    pub model: Option<String>,
    pub prompt: Prompt,
    pub max_tokens: Option<i64>,
    pub temperature: Option<f32>,
    pub top_p: Option<f32>,
    pub seed: Option<i64>,
    pub stop: Option<Stop>,
    pub stream: Option<bool>,
    /// Number of alternatives per position to report with each token's log-probability.
    pub logprobs: Option<i64>,
    /// Return the prompt in front of the completion (with its tokens' log-probabilities when
    /// `logprobs` is set).
    pub echo: Option<bool>,
    pub n: Option<i64>,
}

/// `POST /v1/chat/completions`.
#[derive(Clone, Debug, Deserialize)]
pub struct ChatRequest {
    pub model: Option<String>,
    pub messages: Vec<ChatMessage>,
    pub max_tokens: Option<i64>,
    /// The newer name of `max_tokens`.
    pub max_completion_tokens: Option<i64>,
    pub temperature: Option<f32>,
    pub top_p: Option<f32>,
    pub seed: Option<i64>,
    pub stop: Option<Stop>,
    pub stream: Option<bool>,
    pub stream_options: Option<StreamOptions>,
    /// Report each generated token's log-probability.
    pub logprobs: Option<bool>,
    /// With `logprobs`, this many alternatives per position (0..=20).
    pub top_logprobs: Option<i64>,
    pub n: Option<i64>,
}

#[derive(Clone, Debug, Default, Deserialize)]
pub struct StreamOptions {
    #[serde(default)]
    pub include_usage: bool,
}

/// A prompt as text or token ids, one or several (lm-evaluation-harness sends token ids).
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(untagged)]
pub enum Prompt {
    Text(String),
    Tokens(Vec<u32>),
    Texts(Vec<String>),
    TokenLists(Vec<Vec<u32>>),
}

/// One prompt of a request.
#[derive(Clone, Debug, PartialEq)]
pub enum PromptItem {
    Text(String),
    Tokens(Vec<u32>),
}

impl Prompt {
    pub fn items(self) -> Vec<PromptItem> {
        match self {
            Prompt::Text(t) => vec![PromptItem::Text(t)],
            Prompt::Tokens(t) => vec![PromptItem::Tokens(t)],
            Prompt::Texts(ts) => ts.into_iter().map(PromptItem::Text).collect(),
            Prompt::TokenLists(ts) => ts.into_iter().map(PromptItem::Tokens).collect(),
        }
    }
}

/// Where generation stops early: one string or several.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(untagged)]
pub enum Stop {
    One(String),
    Many(Vec<String>),
}

impl Stop {
    pub fn strings(self) -> Vec<String> {
        match self {
            Stop::One(s) => vec![s],
            Stop::Many(v) => v,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prompts_in_every_openai_shape() {
        let p = |v: serde_json::Value| serde_json::from_value::<Prompt>(v).unwrap().items();
        let text = |s: &str| PromptItem::Text(s.into());
        assert_eq!(p("a".into()), [text("a")]);
        assert_eq!(p(serde_json::json!(["a", "b"])), [text("a"), text("b")]);
        assert_eq!(
            p(serde_json::json!([1, 2])),
            [PromptItem::Tokens(vec![1, 2])]
        );
        assert_eq!(
            p(serde_json::json!([[1], [2, 3]])),
            [PromptItem::Tokens(vec![1]), PromptItem::Tokens(vec![2, 3])]
        );
        assert!(serde_json::from_value::<Prompt>(serde_json::json!([-1])).is_err());
        assert!(serde_json::from_value::<Prompt>(serde_json::json!({"a": 1})).is_err());
    }
}
