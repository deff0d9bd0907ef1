//! Chat messages to a prompt through the checkpoint's own chat template (a Hugging Face Jinja
//! template, rendered with minijinja and its Python-method compatibility).

use minijinja::{Environment, ErrorKind, context};
use serde::{Deserialize, Serialize};

/// One chat message. `content` is a string or a list of parts, of which the text parts count.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
pub struct ChatMessage {
    pub role: String,
    #[serde(default, deserialize_with = "content_text")]
    pub content: String,
}

fn content_text<'de, D: serde::Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Content {
        Text(String),
        Parts(Vec<Part>),
        Null(()),
    }
    #[derive(Deserialize)]
    struct Part {
        #[serde(rename = "type")]
        kind: String,
        #[serde(default)]
        text: String,
    }
    Ok(match Content::deserialize(d)? {
        Content::Text(t) => t,
        Content::Parts(parts) => {
            if let Some(p) = parts.iter().find(|p| p.kind != "text") {
                return Err(serde::de::Error::custom(format!(
                    "content part of type `{}` is not supported (only `text`)",
                    p.kind
                )));
            }
            parts.into_iter().map(|p| p.text).collect()
        }
        Content::Null(()) => String::new(),
    })
}

/// A compiled chat template with the special tokens it may refer to.
pub struct ChatTemplate {
    env: Environment<'static>,
    bos_token: String,
    eos_token: String,
}

impl std::fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatTemplate").finish_non_exhaustive()
    }
}

const NAME: &str = "chat";

impl ChatTemplate {
    /// Compiles `source`; `bos_token`/`eos_token` are the texts templates see under those names.
    pub fn new(source: &str, bos_token: &str, eos_token: &str) -> Result<Self, minijinja::Error> {
        let mut env = Environment::new();
        // Hugging Face templates call Python string methods (`.strip()`, `.startswith()`).
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        // ... and transformers' `raise_exception` to reject conversations they cannot render.
        env.add_function("raise_exception", |message: String| -> Result<(), _> {
            Err(minijinja::Error::new(ErrorKind::InvalidOperation, message))
        });
        // Jinja as transformers configures it.
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.add_template_owned(NAME, source.to_string())?;
        Ok(Self {
            env,
            bos_token: bos_token.to_string(),
            eos_token: eos_token.to_string(),
        })
    }

    /// The prompt for `messages`, ending where the assistant's answer starts.
    pub fn render(&self, messages: &[ChatMessage]) -> Result<String, minijinja::Error> {
        self.env.get_template(NAME)?.render(context! {
            messages => messages,
            add_generation_prompt => true,
            bos_token => self.bos_token,
            eos_token => self.eos_token,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn messages(json: serde_json::Value) -> Vec<ChatMessage> {
        serde_json::from_value(json).unwrap()
    }

    #[test]
    fn renders_a_chatml_template_with_python_methods() {
        let t = ChatTemplate::new(
            "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'].strip() \
             + '<|im_end|>\n' }}{% endfor %}{% if add_generation_prompt %}\
             {{ '<|im_start|>assistant\n' }}{% endif %}",
            "<s>",
            "</s>",
        )
        .unwrap();
        let m = messages(serde_json::json!([
            {"role": "system", "content": " Be brief. "},
            {"role": "user", "content": [{"type": "text", "text": "Hi"}, {"type": "text", "text": "!"}]},
        ]));
        assert_eq!(
            t.render(&m).unwrap(),
            "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi!<|im_end|>\n\
             <|im_start|>assistant\n"
        );
    }

    #[test]
    fn template_errors_are_reported() {
        let t = ChatTemplate::new(
            "{% if messages[0]['role'] != 'user' %}{{ raise_exception('user first') }}{% endif %}\
             {{ bos_token }}{{ messages[0]['content'] }}",
            "<s>",
            "</s>",
        )
        .unwrap();
        let user = messages(serde_json::json!([{"role": "user", "content": "x"}]));
        assert_eq!(t.render(&user).unwrap(), "<s>x");
        let system = messages(serde_json::json!([{"role": "system", "content": "x"}]));
        assert!(
            t.render(&system)
                .unwrap_err()
                .to_string()
                .contains("user first")
        );
        assert!(ChatTemplate::new("{% if %}", "", "").is_err());
        let image: Result<Vec<ChatMessage>, _> = serde_json::from_value(serde_json::json!(
            [{"role": "user", "content": [{"type": "image_url"}]}]
        ));
        assert!(image.unwrap_err().to_string().contains("image_url"));
    }
}
