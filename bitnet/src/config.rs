//! The model configuration, read from a Hugging Face BitNet `config.json`.

use serde::Deserialize;
use std::path::{Path, PathBuf};

/// Why a `config.json` could not be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read (missing, unreadable).
    #[error("cannot read BitNet config {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The operating system's error.
        source: std::io::Error,
    },
    /// The file is not JSON of the expected shape (syntax, missing field, wrong type).
    #[error("invalid BitNet config {path}: {source}")]
    Json {
        /// The file.
        path: PathBuf,
        /// serde_json's error, with line and column.
        source: serde_json::Error,
    },
    /// The values are well formed but this crate cannot run them.
    #[error("unsupported BitNet config {path}: {reason}")]
    Unsupported {
        /// The file.
        path: PathBuf,
        /// What is unsupported.
        reason: String,
    },
}

/// The fields of a BitNet b1.58 `config.json` this crate uses (others are ignored).
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct BitNetConfig {
    /// Model width (embedding size).
    pub hidden_size: usize,
    /// FFN inner width (gate/up output, down input).
    pub intermediate_size: usize,
    /// Number of decoder layers.
    pub num_hidden_layers: usize,
    /// Query heads.
    pub num_attention_heads: usize,
    /// Key/value heads (grouped-query attention); defaults to `num_attention_heads`.
    #[serde(default)]
    pub num_key_value_heads: Option<usize>,
    /// RMSNorm epsilon, added to the mean square before the square root.
    pub rms_norm_eps: f64,
    /// RoPE base frequency as transformers 4 writes it (top level); see [`Self::rope_base`].
    #[serde(default)]
    pub rope_theta: Option<f64>,
    /// RoPE settings as transformers 5 writes them; see [`Self::rope_base`].
    #[serde(default)]
    pub rope_parameters: Option<RopeParameters>,
    /// Longest sequence (prompt + generated) the KV cache is sized for.
    pub max_position_embeddings: usize,
    /// Vocabulary size (embedding and head rows).
    pub vocab_size: usize,
    /// Whether the head reuses the embedding matrix.
    #[serde(default)]
    pub tie_word_embeddings: bool,
    /// FFN activation; only `"relu2"` (squared ReLU) is supported.
    pub hidden_act: String,
    /// Beginning-of-sequence token id.
    #[serde(default)]
    pub bos_token_id: Option<u32>,
    /// End-of-sequence token id(s).
    #[serde(default)]
    pub eos_token_id: Option<TokenIds>,
}

/// `rope_parameters` of a transformers 5 config.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct RopeParameters {
    /// RoPE base frequency.
    #[serde(default)]
    pub rope_theta: Option<f64>,
    /// Only `"default"` (plain RoPE, no scaling) is supported.
    #[serde(default)]
    pub rope_type: Option<String>,
}

/// One token id or several (configs write `eos_token_id` both ways).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(untagged)]
pub enum TokenIds {
    /// A single id.
    One(u32),
    /// A list of ids.
    Many(Vec<u32>),
}

/// transformers' default RoPE base when a config names none.
const DEFAULT_ROPE_THETA: f64 = 10_000.0;

impl BitNetConfig {
    /// Reads and validates `config.json` at `path`.
    pub fn from_file(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        Self::from_json(&text, path)
    }

    /// Parses and validates JSON text; `path` only names the source in errors.
    pub fn from_json(text: &str, path: &Path) -> Result<Self, ConfigError> {
        let cfg: Self = serde_json::from_str(text).map_err(|source| ConfigError::Json {
            path: path.to_path_buf(),
            source,
        })?;
        cfg.validate().map_err(|reason| ConfigError::Unsupported {
            path: path.to_path_buf(),
            reason,
        })?;
        Ok(cfg)
    }

    /// Key/value heads (`num_attention_heads` when the file omits it).
    pub fn kv_heads(&self) -> usize {
        self.num_key_value_heads.unwrap_or(self.num_attention_heads)
    }

    /// RoPE base frequency: `rope_parameters.rope_theta` (transformers 5), else `rope_theta`
    /// (transformers 4), else transformers' default 10000.
    pub fn rope_base(&self) -> f64 {
        self.rope_parameters
            .as_ref()
            .and_then(|r| r.rope_theta)
            .or(self.rope_theta)
            .unwrap_or(DEFAULT_ROPE_THETA)
    }

    /// End-of-sequence token ids (empty when the config names none).
    pub fn eos_ids(&self) -> Vec<u32> {
        match &self.eos_token_id {
            None => Vec::new(),
            Some(TokenIds::One(id)) => vec![*id],
            Some(TokenIds::Many(ids)) => ids.clone(),
        }
    }

    /// Width of one attention head.
    pub fn head_dim(&self) -> usize {
        self.hidden_size / self.num_attention_heads
    }

    fn validate(&self) -> Result<(), String> {
        if self.hidden_act != "relu2" {
            return Err(format!(
                "hidden_act {:?}: only \"relu2\" (squared ReLU) is supported",
                self.hidden_act
            ));
        }
        let sizes = [
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("num_hidden_layers", self.num_hidden_layers),
            ("num_attention_heads", self.num_attention_heads),
            ("num_key_value_heads", self.kv_heads()),
            ("max_position_embeddings", self.max_position_embeddings),
            ("vocab_size", self.vocab_size),
        ];
        if let Some((name, _)) = sizes.iter().find(|(_, v)| *v == 0) {
            return Err(format!("{name} is 0"));
        }
        if !self.hidden_size.is_multiple_of(self.num_attention_heads) {
            return Err(format!(
                "hidden_size {} is not a multiple of num_attention_heads {}",
                self.hidden_size, self.num_attention_heads
            ));
        }
        if !self.head_dim().is_multiple_of(2) {
            return Err(format!("head dim {} is odd (RoPE rotates pairs)", self.head_dim()));
        }
        if !self.num_attention_heads.is_multiple_of(self.kv_heads()) {
            return Err(format!(
                "num_attention_heads {} is not a multiple of num_key_value_heads {}",
                self.num_attention_heads,
                self.kv_heads()
            ));
        }
        if !(self.rms_norm_eps.is_finite() && self.rms_norm_eps > 0.0) {
            return Err(format!("rms_norm_eps {} is not a positive number", self.rms_norm_eps));
        }
        if let Some(kind) = self.rope_parameters.as_ref().and_then(|r| r.rope_type.as_deref()) {
            if kind != "default" {
                return Err(format!("rope_type {kind:?}: only \"default\" RoPE is supported"));
            }
        }
        let theta = self.rope_base();
        if !(theta.is_finite() && theta > 0.0) {
            return Err(format!("rope_theta {theta} is not a positive number"));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // The fields of microsoft/bitnet-b1.58-2B-4T's config.json this crate reads, as quoted in a
    // public copy of the model card (the hub itself is not reachable from here); its
    // quantization_config ({"quant_method": "bitnet", ...}) and auto_map are left out.
    const REAL: &str = r#"{"architectures":["BitNetForCausalLM"],"bos_token_id":128000,
      "eos_token_id":128001,"hidden_act":"relu2","hidden_size":2560,"intermediate_size":6912,
      "max_position_embeddings":4096,"model_type":"bitnet","num_attention_heads":20,
      "num_hidden_layers":30,"num_key_value_heads":5,"rms_norm_eps":1e-05,"rope_theta":500000.0,
      "tie_word_embeddings":true,"vocab_size":128256}"#;

    fn parse(text: &str) -> Result<BitNetConfig, ConfigError> {
        BitNetConfig::from_json(text, Path::new("cfg.json"))
    }

    #[test]
    fn reads_2b4t_config() {
        let c = parse(REAL).unwrap();
        assert_eq!(
            (c.hidden_size, c.intermediate_size, c.num_hidden_layers),
            (2560, 6912, 30)
        );
        assert_eq!((c.num_attention_heads, c.kv_heads(), c.head_dim()), (20, 5, 128));
        assert_eq!((c.rms_norm_eps, c.rope_base()), (1e-5, 500000.0));
        assert_eq!((c.bos_token_id, c.eos_ids()), (Some(128000), vec![128001]));
        assert!(c.tie_word_embeddings);
    }

    #[test]
    fn reads_transformers_5_rope_parameters_and_eos_lists() {
        let v5 = REAL
            .replace(
                "\"rope_theta\":500000.0",
                "\"rope_parameters\":{\"rope_theta\":250000.0,\"rope_type\":\"default\"}",
            )
            .replace("\"eos_token_id\":128001", "\"eos_token_id\":[128001,128009]");
        let c = parse(&v5).unwrap();
        assert_eq!(c.rope_base(), 250000.0);
        assert_eq!(c.eos_ids(), vec![128001, 128009]);
        let no_rope = REAL.replace("\"rope_theta\":500000.0,", "");
        assert_eq!(parse(&no_rope).unwrap().rope_base(), 10000.0);
        let scaled = REAL.replace(
            "\"rope_theta\":500000.0",
            "\"rope_parameters\":{\"rope_type\":\"yarn\"}",
        );
        let e = parse(&scaled).unwrap_err();
        assert!(e.to_string().contains("yarn"), "{e}");
    }

    #[test]
    fn missing_file_is_io_error_naming_path() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("config.json");
        let e = BitNetConfig::from_file(&p).unwrap_err();
        assert!(matches!(e, ConfigError::Io { .. }));
        assert!(e.to_string().contains("config.json"), "{e}");
    }

    #[test]
    fn bad_json_and_missing_field_are_json_errors() {
        assert!(matches!(parse("{not json"), Err(ConfigError::Json { .. })));
        let no_hidden = REAL.replace("\"hidden_size\":2560,", "");
        let e = parse(&no_hidden).unwrap_err();
        assert!(e.to_string().contains("hidden_size"), "{e}");
    }

    #[test]
    fn unsupported_values_are_named() {
        let cases = [
            ("\"relu2\"", "\"silu\"", "hidden_act"),
            (
                "\"num_key_value_heads\":5",
                "\"num_key_value_heads\":3",
                "num_key_value_heads",
            ),
            ("\"num_attention_heads\":20", "\"num_attention_heads\":7", "multiple"),
            ("\"vocab_size\":128256", "\"vocab_size\":0", "vocab_size is 0"),
            ("\"rms_norm_eps\":1e-05", "\"rms_norm_eps\":0", "rms_norm_eps"),
        ];
        for (from, to, needle) in cases {
            let e = parse(&REAL.replace(from, to)).unwrap_err();
            assert!(matches!(e, ConfigError::Unsupported { .. }), "{to}: {e}");
            assert!(e.to_string().contains(needle), "{to}: {e}");
        }
    }
}
