//! Rendering chat messages with the model's own Jinja chat template (`tokenizer_config.json`
//! `chat_template`) through minijinja, with Python-compatible string methods.

use moe_core::{Error, Result};
use moe_loader::ConfigFile;

use crate::request::ChatMessage;
use crate::tokenizer::special_token_text;

/// A model's chat template.
pub struct ChatTemplate {
    source: String,
    bos_token: String,
    eos_token: String,
}

impl ChatTemplate {
    /// Reads `chat_template` (a string, or a list of named templates: `default` is used).
    pub fn from_tokenizer_config(cfg: &ConfigFile) -> Result<Option<Self>> {
        let source = match cfg.raw("chat_template") {
            None => return Ok(None),
            Some(serde_json::Value::String(s)) => s.clone(),
            Some(serde_json::Value::Array(items)) => {
                let named = |name: &str| {
                    items
                        .iter()
                        .find(|i| i.get("name").and_then(|n| n.as_str()) == Some(name))
                        .and_then(|i| i.get("template"))
                        .and_then(|t| t.as_str())
                };
                named("default")
                    .or_else(|| {
                        items
                            .first()
                            .and_then(|i| i.get("template"))
                            .and_then(|t| t.as_str())
                    })
                    .ok_or_else(|| cfg.error("chat_template", "list has no usable template"))?
                    .to_string()
            }
            Some(other) => {
                return Err(cfg.error("chat_template", format!("expected a string, found {other}")))
            }
        };
        Ok(Some(Self {
            source,
            bos_token: special_token_text(cfg, "bos_token").unwrap_or_default(),
            eos_token: special_token_text(cfg, "eos_token").unwrap_or_default(),
        }))
    }

    /// Renders the conversation, ending with the assistant's turn opener.
    pub fn render(&self, messages: &[ChatMessage]) -> Result<String> {
        let mut env = minijinja::Environment::new();
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function(
            "raise_exception",
            |msg: String| -> std::result::Result<String, minijinja::Error> {
                Err(minijinja::Error::new(
                    minijinja::ErrorKind::InvalidOperation,
                    msg,
                ))
            },
        );
        env.add_function("strftime_now", |_fmt: String| -> String { String::new() });
        let err = |e: minijinja::Error| Error::Tokenizer(format!("chat template: {e}"));
        env.add_template("chat", &self.source).map_err(err)?;
        let template = env.get_template("chat").map_err(err)?;
        template
            .render(minijinja::context! {
                messages => messages,
                add_generation_prompt => true,
                bos_token => &self.bos_token,
                eos_token => &self.eos_token,
            })
            .map_err(err)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_a_chatml_template_with_python_methods() {
        let cfg = ConfigFile::from_value(
            "tokenizer_config.json",
            serde_json::json!({
                "eos_token": "<|im_end|>",
                "chat_template": "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content.strip() }}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
            }),
        );
        let t = ChatTemplate::from_tokenizer_config(&cfg).unwrap().unwrap();
        let out = t
            .render(&[ChatMessage {
                role: "user".into(),
                content: " hi ".into(),
            }])
            .unwrap();
        assert_eq!(
            out,
            "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
        );
    }
}
